<?php

/**
 * mailgate_answering: mailgate's shared-inbox marks in Roundcube's message list.
 *
 * mailgate (its docs/webmail.md tells how to install this plugin) sets ordinary IMAP
 * keywords on the messages of a shared mailbox:
 *
 *   $Answering, $Answering<Name>  <Name> has a draft reply to the message
 *   $AnsweredBy<Name>             <Name> sent a reply
 *   $Note                         an agent's internal note
 *
 * Roundcube keeps keywords it does not know without showing them. This plugin hands the
 * message list the ones above (in each row's extra flags) and the names' spelling (from the
 * folder's PERMANENTFLAGS, which list the keywords in use: Roundcube itself upper-cases
 * them), and mailgate_answering.js marks the rows: when the list is loaded and at every
 * refresh (refresh_interval).
 *
 * @license GNU GPLv3+
 */
class mailgate_answering extends rcube_plugin
{
    public $task = 'mail';

    public function init()
    {
        $this->add_hook('messages_list', [$this, 'messages_list']);
        $this->add_hook('refresh', [$this, 'refresh']);
        $this->add_texts('localization/', true);
        $this->include_script('mailgate_answering.js');
        $this->include_stylesheet('mailgate_answering.css');
    }

    /**
     * The mark keywords among Roundcube's flags of a message (keys upper case, without "$"),
     * in lower case: "answering", "answeringanna", "answeredbyanna", "note".
     */
    private static function marks($flags)
    {
        $marks = [];
        foreach ((array) $flags as $flag => $set) {
            $flag = strtolower($flag);
            if ($set && ($flag === 'note' || strpos($flag, 'answering') === 0 || strpos($flag, 'answeredby') === 0)) {
                $marks[] = $flag;
            }
        }
        return $marks;
    }

    /**
     * The agents' names as mailgate spells them in the folders' keywords, by lower case name:
     * ["annanowak" => "AnnaNowak"].
     */
    private static function names($folders)
    {
        $storage = rcmail::get_instance()->get_storage();
        $names = [];
        foreach (array_unique($folders) as $folder) {
            foreach ($storage->get_permflags($folder) as $flag) {
                if (preg_match('/^\$(?:Answering|AnsweredBy)([A-Za-z]+)$/', $flag, $m)) {
                    $names[strtolower($m[1])] = $m[1];
                }
            }
        }
        return $names;
    }

    /** The message list: each marked row's marks, and the names they hold. */
    public function messages_list($args)
    {
        $folders = [];
        foreach ((array) $args['messages'] as $header) {
            if (empty($header) || !($marks = self::marks($header->flags))) {
                continue;
            }
            $header->list_flags['extra_flags']['mailgate_answering'] = $marks;
            $folders[] = $header->folder;
        }
        if ($folders) {
            rcmail::get_instance()->output->set_env('mailgate_answering_names', self::names($folders));
        }
        return $args;
    }

    /**
     * A refresh that updates the listed rows' flags (env recent_flags): the marks of every row
     * it names (none takes a row's marks off), and the names they hold.
     */
    public function refresh($args)
    {
        $rcmail = rcmail::get_instance();
        $marks = [];
        foreach ((array) $rcmail->output->get_env('recent_flags') as $uid => $flags) {
            $marks[$uid] = self::marks($flags);
        }
        if ($marks) {
            $rcmail->output->set_env('mailgate_answering_marks', $marks);
        }
        if (array_filter($marks)) {
            $rcmail->output->set_env('mailgate_answering_names', self::names([$rcmail->storage->get_folder()]));
        }
        return $args;
    }
}

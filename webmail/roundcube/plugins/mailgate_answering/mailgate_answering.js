/**
 * mailgate_answering: marks the message list's rows that mailgate's keywords mark
 * (see mailgate_answering.php): who is answering, who answered, internal notes.
 *
 * @licstart  The following is the entire license notice for the
 * JavaScript code in this file.
 *
 * This program is free software: you can redistribute it and/or modify
 * it under the terms of the GNU General Public License as published by
 * the Free Software Foundation, either version 3 of the License, or
 * (at your option) any later version.
 *
 * @licend  The above is the entire license notice
 * for the JavaScript code in this file.
 */

var mailgate_answering = {
  // A name as mailgate spells it ("annanowak" => "AnnaNowak"), words apart: "Anna Nowak".
  spell: function(name, names) {
    var spelled = (names && names[name]) || name.charAt(0).toUpperCase() + name.slice(1);
    return spelled.replace(/([a-z])([A-Z])/g, '$1 $2');
  },

  text: function(label, names) {
    return rcmail.get_label(label, 'mailgate_answering').replace('$names', names.join(', '));
  },

  // Mark a row (its <tr>) by its mark keywords in lower case ("answering", "answeringanna",
  // "answeredbyanna", "note"); none takes the marks off. Each mark: a class on the row and,
  // first in the subject, a badge naming the agents, its title saying what it means.
  mark: function(tr, keywords, names) {
    var answering = [], answered_by = [], marks = [],
      cell = $(tr).find('td.subject span.subject').first();

    $.each(keywords || [], function(i, keyword) {
      if (keyword.indexOf('answeredby') == 0 && keyword.length > 10)
        answered_by.push(mailgate_answering.spell(keyword.slice(10), names));
      else if (keyword.indexOf('answering') == 0 && keyword.length > 9)
        answering.push(mailgate_answering.spell(keyword.slice(9), names));
    });

    if (answering.length)
      marks.push(['answering', answering.join(', '), this.text('answering', answering)]);
    else if ($.inArray('answering', keywords || []) >= 0)
      marks.push(['answering', '?', this.text('someoneanswering', [])]);
    if (answered_by.length)
      marks.push(['answeredby', answered_by.join(', '), this.text('answeredby', answered_by)]);
    if ($.inArray('note', keywords || []) >= 0)
      marks.push(['note', this.text('notebadge', []), this.text('note', [])]);

    if (!cell.length)  // the list layout, not widescreen
      cell = $(tr).find('td.subject').first();
    $(tr).removeClass('mailgate-answering mailgate-answeredby mailgate-note');
    cell.find('.mailgate-mark').remove();
    $.each(marks.reverse(), function(i, mark) {
      $(tr).addClass('mailgate-' + mark[0]);
      $('<span>').addClass('mailgate-mark mailgate-' + mark[0] + '-mark skip-on-drag')
        .attr('title', mark[2]).text(mark[1]).prependTo(cell);
    });
  }
};

if (window.rcmail) {
  // Rows as the list is loaded: their marks come with them (extra flags).
  rcmail.addEventListener('insertrow', function(evt) {
    var flags = evt.uid && evt.row.obj && evt.row.flags;
    if (flags && flags.mailgate_answering)
      mailgate_answering.mark(evt.row.obj, flags.mailgate_answering, rcmail.env.mailgate_answering_names);
  });

  // A refresh that updates the listed rows' flags: those rows marked again.
  var refreshed = function(evt) {
    var env = evt.response.env || {}, list = rcmail.message_list,
      names = $.extend({}, rcmail.env.mailgate_answering_names, env.mailgate_answering_names);

    $.each(env.mailgate_answering_marks || {}, function(uid, keywords) {
      var row = list && list.rows[uid];
      if (row && row.obj)
        mailgate_answering.mark(row.obj, keywords, names);
    });
  };
  rcmail.addEventListener('responsebeforerefresh', refreshed);
  rcmail.addEventListener('responsebeforecheck-recent', refreshed);
}

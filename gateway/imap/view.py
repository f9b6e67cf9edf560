"""A session's view of its selected folder: the one place that decides what the session is told.

Theory of operation
-------------------
Message sequence numbers are per session: they are positions in the sorted
list of UIDs this session has been told about. The folder itself changes
under the session (other sessions, new mail); the view changes only when the
session reports it, and every report goes through :meth:`View.report`:

* new messages are appended when the session says ``* n EXISTS``;
* an expunge is removed when the session says ``* n EXPUNGE``. Until then the
  UID keeps its sequence number (RFC 3501 7.4.1 and RFC 2180 4.3 forbid
  EXPUNGE responses during FETCH, STORE and SEARCH by sequence number), it is
  *gone*: commands skip it, and it stays pending however far ``modseq``
  moves on;
* flag changes of other sessions are reported as ``* n FETCH (FLAGS ...)``;
  the session's own (STORE, the ``\\Seen`` a FETCH sets) were answered by the
  command itself and are remembered in ``own`` so they are not told twice;
* ``modseq`` is the highest MODSEQ whose changes the session has looked at.
  Only :meth:`report` raises it, after it has taken every change up to it
  (pending expunges included), so nothing below it can be lost;
* ``keywords`` are the keywords announced in ``* FLAGS``; a new one is
  announced again, with ``PERMANENTFLAGS``, before the first response that
  shows it;
* ``recent`` are the messages this session holds ``\\Recent`` for (RFC 3501
  2.3.2: the first session to see a message gets it; the folder's
  ``recent_uid`` counter decides who is first; a session adding messages to
  its own folder takes them when it adds them, in ``claimed``, as Dovecot's
  appending session gets them). ``* n RECENT`` is sent when their number
  changes.

The order of one report is Dovecot's: FLAGS, flag FETCHes (numbered before
the expunges), EXPUNGEs (highest first), EXISTS, RECENT.

Updating searches (CONTEXT=SEARCH, RFC 5267 4.3) live in the view too, so they
end when the folder is closed: each :class:`Update` keeps the UIDs its search
matches. When a report tells expunges, the expunged members leave first
(``REMOVEFROM``, numbered before the EXPUNGEs, sent before the flag FETCHes);
after the report the session re-checks the search on the messages that
changed or arrived and :meth:`View.search_updated` tells the difference, as
Dovecot does: ``REMOVEFROM (0 ...)`` and ``ADDTO (0 ...)``, position 0.

Once the client enabled QRESYNC (RFC 7162 3.2), expunges are told as one
``* VANISHED uid-set`` (same place, same rules as EXPUNGE), flag FETCHes
carry the UID, and after each report :meth:`View.highest_to_tell` decides
whether the client hears the folder's HIGHESTMODSEQ (RFC 7162 3.2.10), as
Dovecot decides it: ``told`` is the highest MODSEQ the client may store as
complete (not raised while expunges are held back), ``fetched`` the highest
MODSEQ the session's FETCH responses showed since the last report.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Sequence, Set
from dataclasses import dataclass, field

from gateway.imap import wire
from gateway.imap.commands import SearchKey, SeqSet
from storage.flags import join_flags

SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")
# System flags in RFC 3501's order, then \Recent, then keywords (Dovecot's order).
_FLAG_ORDER = {name: i for i, name in enumerate((*SYSTEM_FLAGS, "\\Recent"))}


@dataclass(frozen=True, slots=True)
class FlagRow:
    """A message's flags as stored."""

    uid: int
    sysflags: int
    keywords: str
    modseq: int


@dataclass(frozen=True, slots=True)
class FolderChanges:
    """What the folder holds beyond the view: read by the session in one transaction."""

    highest: int  # the folder's HIGHESTMODSEQ when read
    new: Sequence[FlagRow]  # messages above the view's largest UID
    changed: Sequence[FlagRow]  # known messages with a MODSEQ above the view's
    expunged: Sequence[int]  # UIDs expunged above the view's MODSEQ
    recent: frozenset[int] = frozenset()  # which of ``new`` are this session's \Recent
    keywords: frozenset[str] = frozenset()  # the folder's keywords, read when a new one shows up


@dataclass
class Update:
    """An updating search (``RETURN (UPDATE)``): its tag, whether it answers UIDs, its key and the
    UIDs it matches now."""

    tag: str
    uid: bool
    key: SearchKey
    result: set[int]


def keywords_of(text: str) -> list[str]:
    return [k for k in text.split(" ") if k]


@dataclass
class View:
    """The selected folder as this session knows it."""

    folder_id: int
    name: str
    readonly: bool
    uidvalidity: int
    uids: list[int]
    modseq: int
    keywords: set[str] = field(default_factory=set)
    recent: set[int] = field(default_factory=set)
    gone: set[int] = field(default_factory=set)  # expunged, not yet reported
    own: dict[int, int] = field(default_factory=dict)  # UID -> MODSEQ of own changes, already answered
    claimed: list[tuple[int, int]] = field(default_factory=list)  # \Recent UID ranges taken, not yet seen
    recent_told: int = 0
    told: int = 0  # QRESYNC: the HIGHESTMODSEQ the client may take as complete
    fetched: int = 0  # the highest MODSEQ shown in a FETCH response since the last report
    updates: dict[str, Update] = field(default_factory=dict)  # updating searches by tag

    @property
    def exists(self) -> int:
        return len(self.uids)

    @property
    def max_uid(self) -> int:
        return self.uids[-1] if self.uids else 0

    def seq(self, uid: int) -> int | None:
        """The sequence number of a UID in the view, if it has one."""
        i = bisect_left(self.uids, uid)
        return i + 1 if i < len(self.uids) and self.uids[i] == uid else None

    def resolve(self, sequence: SeqSet, *, uid: bool, saved: list[int] | None = None) -> list[int]:
        """The UIDs a sequence set names, ascending, without unreported expunges.

        With ``uid``, ``*`` is the largest UID and ranges need not hit existing
        UIDs; otherwise numbers are sequence numbers, ``*`` the last one.
        """
        if sequence.saved:
            return [u for u in (saved or []) if self.seq(u) is not None and u not in self.gone]
        out: set[int] = set()
        if uid:
            top = self.max_uid
            for lo, hi in sequence.ranges:
                a, b = top if lo is None else lo, top if hi is None else hi
                a, b = min(a, b), max(a, b)
                out.update(self.uids[bisect_left(self.uids, a) : bisect_left(self.uids, b + 1)])
        else:
            n = len(self.uids)
            for lo, hi in sequence.ranges:
                a, b = n if lo is None else lo, n if hi is None else hi
                a, b = max(min(a, b), 1), min(max(a, b), n)
                out.update(self.uids[a - 1 : b])
        return sorted(out - self.gone)

    # ------------------------------------------------------------------ what the session says

    def flag_list(self, uid: int, sysflags: int, keywords: str) -> bytes:
        """A message's FLAGS value as this session sees it (with ``\\Recent`` if it holds it)."""
        names = join_flags(sysflags, keywords)
        if uid in self.recent:
            names = (*names, "\\Recent")
        return wire.flags(sorted(names, key=lambda n: _FLAG_ORDER.get(n, len(_FLAG_ORDER))))

    def flags_responses(self) -> list[bytes]:
        """``FLAGS`` and ``OK [PERMANENTFLAGS]``: the system flags and the known keywords."""
        flags = [*SYSTEM_FLAGS, *sorted(self.keywords)]
        permanent = wire.flags([*flags, "\\*"] if not self.readonly else [])
        return [b"FLAGS " + wire.flags(flags), b"OK [PERMANENTFLAGS " + permanent + b"] flags"]

    def learn_keywords(self, keywords: Iterable[str]) -> list[bytes]:
        """FLAGS and PERMANENTFLAGS again if any of ``keywords`` is new to the session."""
        new = set(keywords) - self.keywords
        if not new:
            return []
        self.keywords |= new
        return self.flags_responses()

    def answered(self, uid: int, modseq: int) -> None:
        """A change of the session's own that its command has already shown."""
        self.own[uid] = max(modseq, self.own.get(uid, 0))

    def showed_modseq(self, modseq: int) -> None:
        """A FETCH response of the session showed this MODSEQ."""
        self.fetched = max(self.fetched, modseq)

    def highest_to_tell(self, highest: int) -> int | None:
        """After a report under QRESYNC: the HIGHESTMODSEQ to tell the client, if any.

        Told when the folder moved past what the client knows and no FETCH
        showed it already (a VANISHED or EXISTS moved it); while expunges are
        held back, the last complete one, and only if a FETCH showed a higher
        MODSEQ the client might store instead.
        """
        tell = None
        if self.gone:
            tell = self.told if self.fetched > self.told else None
        else:
            tell = highest if highest > self.told and highest > self.fetched else None
            self.told = highest
        self.fetched = 0
        return tell

    def report(
        self,
        changes: FolderChanges,
        *,
        allow_expunge: bool,
        condstore: bool,
        send_uid: bool = False,
        qresync: bool = False,
    ) -> list[bytes]:
        """The untagged responses for ``changes``, the view updated to match them.

        ``send_uid``: flag changes name their UID too (during UID STORE, as Dovecot does,
        and always under ``qresync``, when expunges are told as VANISHED).
        """
        send_uid = send_uid or qresync
        out: list[bytes] = []
        self.gone.update(u for u in changes.expunged if self.seq(u) is not None)
        rows = [r for r in changes.changed if r.uid not in self.gone and self.own.get(r.uid, 0) < r.modseq]
        out += self.learn_keywords(
            {*changes.keywords, *(k for r in (*rows, *changes.new) for k in keywords_of(r.keywords))}
        )
        if allow_expunge:  # updating searches lose expunged members before the EXPUNGEs are told
            lines = (self._update_line(u, removed=u.result & self.gone) for u in self.updates.values())
            out += [line for line in lines if line]
        for r in sorted(rows, key=lambda r: r.uid):
            seq = self.seq(r.uid)
            if seq is None:
                continue
            modseq = (b"UID %d " % r.uid if send_uid else b"") + (
                b"MODSEQ (%d) " % r.modseq if condstore else b""
            )
            if condstore:
                self.showed_modseq(r.modseq)
            out.append(
                b"%d FETCH (" % seq
                + modseq
                + b"FLAGS "
                + self.flag_list(r.uid, r.sysflags, r.keywords)
                + b")"
            )
        self.own = {u: m for u, m in self.own.items() if m > changes.highest}
        if allow_expunge:
            gone, self.gone = self.gone, set()
            out += self._expunged(gone, qresync=qresync)
        new = sorted(r.uid for r in changes.new if r.uid > self.max_uid)
        if new:
            self.uids.extend(new)
            self.recent |= changes.recent
            self.recent.update(u for u in new for a, b in self.claimed if a <= u < b)
            self.claimed = [(a, b) for a, b in self.claimed if b > self.max_uid + 1]
            out.append(b"%d EXISTS" % self.exists)
        out += self.recent_changed()
        self.modseq = max(self.modseq, changes.highest)
        return out

    def search_updated(self, update: Update, checked: Iterable[int], matching: Iterable[int]) -> bytes:
        """The ESEARCH update for ``update`` once the messages ``checked`` were searched again and
        ``matching`` of them matched (empty if its result did not change)."""
        checked = set(checked) - self.gone
        matching = set(matching) & checked
        return self._update_line(
            update, removed=(update.result & checked) - matching, added=matching - update.result
        )

    def _update_line(self, update: Update, *, removed: set[int], added: Set[int] = frozenset()) -> bytes:
        """``ESEARCH (TAG ..) [UID] REMOVEFROM (0 ..) ADDTO (0 ..)``, numbered as the view numbers now
        (empty if nothing changed); ``update``'s result updated to match."""
        if not removed and not added:
            return b""
        update.result -= removed
        update.result |= added
        line = b'ESEARCH (TAG "' + update.tag.encode() + b'")' + (b" UID" if update.uid else b"")
        for name, uids in ((b"REMOVEFROM", removed), (b"ADDTO", added)):
            if uids:
                numbers = uids if update.uid else [self.seq(u) or 0 for u in uids]
                line += b" " + name + b" (0 " + wire.uid_set(numbers) + b")"
        return line

    def _expunged(self, uids: Iterable[int], *, qresync: bool) -> list[bytes]:
        """EXPUNGE responses (highest first), or one VANISHED under ``qresync``, for ``uids``
        leaving the view."""
        out = []
        vanished = []
        for uid in sorted(uids, reverse=True):
            n = self.seq(uid)
            if n is not None:
                del self.uids[n - 1]
                out.append(b"%d EXPUNGE" % n)
                vanished.append(uid)
            self.gone.discard(uid)
            self.recent.discard(uid)
        if qresync:
            return [b"VANISHED " + wire.uid_set(vanished)] if vanished else []
        return out

    def recent_changed(self) -> list[bytes]:
        """``* n RECENT`` if the number of messages the session holds \\Recent for changed."""
        count = len(self.recent)
        if count == self.recent_told:
            return []
        self.recent_told = count
        return [b"%d RECENT" % count]

"""A session's view of its selected folder.

Theory of operation
-------------------
Message sequence numbers are per session: they are positions in the sorted
list of UIDs this session has been told about. The folder itself changes
under the session (other sessions, new mail); the view changes only when the
session reports it:

* new messages are appended when the session says ``* n EXISTS``;
* an expunge is removed when the session says ``* n EXPUNGE``. Until then the
  UID keeps its sequence number (RFC 3501 7.4.1 forbids EXPUNGE responses
  during FETCH, STORE and SEARCH), and commands skip it;
* ``modseq`` is the highest MODSEQ whose changes the session has reported.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

from gateway.imap.commands import SeqSet


@dataclass
class View:
    """The selected folder as this session knows it."""

    folder_id: int
    name: str
    readonly: bool
    uidvalidity: int
    uids: list[int]
    modseq: int
    gone: set[int] = field(default_factory=set)  # expunged, not yet reported

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

    def add(self, uids: list[int]) -> None:
        """New messages (UIDs above every known one), before ``* n EXISTS``."""
        self.uids.extend(u for u in sorted(uids) if u > self.max_uid)

    def remove(self, uid: int) -> int | None:
        """Drop an expunged UID; returns the sequence number to report."""
        n = self.seq(uid)
        if n is not None:
            del self.uids[n - 1]
        self.gone.discard(uid)
        return n

"""The folder index: what every session of the process knows of its open folders, shared.

Theory of operation
-------------------
Sessions used to ask the database, before every tagged reply, whether their
folder had changed (a thread hop and a query per command, per session). The
index asks once per change instead: for each folder some session has open it
keeps, in memory, each message's flags, keywords, MODSEQ, size, internal
date and blob address, the folder's HIGHESTMODSEQ, UIDNEXT and ``\\Recent`` mark, every keyword
seen in it, and two logs ordered by MODSEQ: which messages changed, and which
were expunged while the folder was open. Sessions derive their reports
(:meth:`gateway.imap.view.View.report`) and their FETCHes from it (all but
ENVELOPE and BODYSTRUCTURE, which are stored in the database).

The database stays the one durable truth. Writers commit there, then
:meth:`gateway.notify.Changes.publish` the folders they touched; the index
marks those *stale*, and so it does for the same notices from other
instances on PostgreSQL (:class:`gateway.notify.ClusterNotices`; after a
lost connection to it, every folder). The next session to look refreshes a
stale folder with one read of what has a MODSEQ above the index's (changed
and new messages, expunges), under the folder's lock so that one refresh
serves every session waiting. A folder nobody marked stale is still
refreshed once per :data:`RECHECK` seconds, for writers that send no notice
(the CLI's restore, a notice lost with the process that was to send it). So
a NOOP, an IDLE wake-up or a FETCH of flags in a folder with no change
issues no statement at all.

A folder is loaded when the first session opens it (SELECT/EXAMINE); when
the last one closes it, it is kept for a while (clients go back and forth
between two folders), at most 64 such folders for 5 minutes, then evicted.
A session of this process that changed flags or expunged (STORE, EXPUNGE, the
\\Seen a FETCH sets) hands its committed changes to the index itself
(:meth:`FolderIndex.wrote`) when nothing else is outstanding, so its own
write is not read back. That never hides another writer's change, here or on
another instance: every write takes the folder's next MODSEQ under its row
lock, so a write committed in between leaves a gap the shortcut refuses. Expunge records older than every open
session's view are dropped, and the change log is compacted when it grows to
twice the folder. Memory: about 400 bytes per message of an open folder
(measured in tests/test_imap_index.py).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from bisect import bisect_right
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime

from sqlalchemy import select

from gateway.notify import Changes
from storage.db import Database
from storage.flags import SEEN
from storage.models import Expunge, Folder, Message

RECHECK = 30.0  # seconds after which an unchanged folder is read again (writes sending no notice)
IDLE_KEEP = 64  # folders kept loaded with no session on them
IDLE_TTL = 300.0  # seconds one is kept
_MAX = 2**63


@dataclass(slots=True)
class Entry:
    """One message as the index keeps it."""

    uid: int
    sysflags: int
    keywords: str
    modseq: int
    size: int
    internal_date: datetime
    blob: str  # the blob store's address of the message


# The columns an Entry is made of, in its order.
ENTRY_COLUMNS = (
    Message.uid, Message.sysflags, Message.keywords, Message.modseq, Message.size, Message.internal_date,
    Message.blob,
)  # fmt: skip


@dataclass
class FolderState:
    """An open folder: its messages and what changed while it was open."""

    folder_id: int
    loaded: bool = False
    highest: int = 0  # HIGHESTMODSEQ the index has read up to
    uidnext: int = 1
    recent_uid: int = 1
    messages: dict[int, Entry] = field(default_factory=dict)
    unseen: int = 0  # messages without \Seen
    keywords: set[str] = field(default_factory=set)  # every keyword seen in the folder
    changes: list[tuple[int, int]] = field(default_factory=list)  # (MODSEQ, UID), ascending MODSEQ
    expunges: list[tuple[int, int]] = field(default_factory=list)  # (MODSEQ, UID), ascending MODSEQ
    floor: int = 0  # every expunge above this MODSEQ is in ``expunges``
    gone: bool = False  # the folder was deleted
    notices: int = 0  # change notices received
    read: int = -1  # ``notices`` when the folder was last read (or a write taken): stale if behind
    checked: float = 0.0  # monotonic time of the last read
    users: dict[int, int] = field(default_factory=dict)  # session view -> the MODSEQ it has seen
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def stale(self) -> bool:
        return self.read != self.notices

    def changed_since(self, modseq: int) -> Iterator[Entry]:
        """Messages whose last change is above ``modseq``, in MODSEQ order."""
        for m, uid in self.changes[bisect_right(self.changes, (modseq, _MAX)) :]:
            entry = self.messages.get(uid)
            if entry is not None and entry.modseq == m:
                yield entry

    def expunged_since(self, modseq: int) -> list[int] | None:
        """UIDs expunged above ``modseq``; None if the index no longer knows (below its floor)."""
        if modseq < self.floor:
            return None
        return [uid for _, uid in self.expunges[bisect_right(self.expunges, (modseq, _MAX)) :]]

    def apply(self, rows: Iterable[Entry], expunged: Iterable[tuple[int, int]]) -> None:
        """Take changed or new messages and expunges read from the database (ascending MODSEQ)."""
        for entry in rows:
            old = self.messages.get(entry.uid)
            self.unseen += _unseen(entry) - (_unseen(old) if old is not None else 0)
            self.messages[entry.uid] = entry
            self.changes.append((entry.modseq, entry.uid))
            self.keywords.update(k for k in entry.keywords.split(" ") if k)
        for modseq, uid in expunged:
            old = self.messages.pop(uid, None)
            if old is not None:
                self.unseen -= _unseen(old)
            self.expunges.append((modseq, uid))
        self.changes.sort()
        self.expunges.sort()
        if len(self.changes) > 2 * len(self.messages) + 1000:
            self.changes = sorted((e.modseq, e.uid) for e in self.messages.values())
        # Expunges every open view has taken are history.
        oldest = min(self.users.values(), default=self.highest)
        if oldest > self.floor:
            self.expunges = self.expunges[bisect_right(self.expunges, (oldest, _MAX)) :]
            self.floor = oldest


def _unseen(entry: Entry) -> int:
    return 0 if entry.sysflags & SEEN else 1


class FolderIndex:
    """The open folders of this process, kept current by change notices (see the module doc)."""

    def __init__(self, db: Database, changes: Changes) -> None:
        self.db = db
        self.folders: dict[int, FolderState] = {}
        self._keys = itertools.count(1)
        self._idle: dict[int, float] = {}  # folders nobody has open -> since when, oldest first
        changes.subscribe(self._invalidate)

    def _invalidate(self, folder_ids: set[int] | None) -> None:
        """A change notice, from this process or another instance (None: any folder may have changed)."""
        for folder_id in self.folders if folder_ids is None else folder_ids:
            state = self.folders.get(folder_id)
            if state is not None:
                state.notices += 1

    def open(self, folder_id: int, modseq: int) -> int:
        """A session's view of the folder, at ``modseq``, uses the index until :meth:`close`: its key."""
        self._idle.pop(folder_id, None)
        state = self.folders.setdefault(folder_id, FolderState(folder_id))
        key = next(self._keys)
        state.users[key] = modseq
        return key

    def close(self, folder_id: int, key: int) -> None:
        """The view is gone. A folder nobody has open is kept a while (clients go back and forth
        between folders), at most :data:`IDLE_KEEP` of them for :data:`IDLE_TTL` seconds."""
        state = self.folders.get(folder_id)
        if state is None:
            return
        state.users.pop(key, None)
        if state.users:
            return
        now = time.monotonic()
        self._idle[folder_id] = now
        while self._idle:
            oldest, since = next(iter(self._idle.items()))
            if len(self._idle) <= IDLE_KEEP and now - since < IDLE_TTL:
                break
            del self._idle[oldest]
            self.folders.pop(oldest, None)

    def seen(self, folder_id: int, key: int, modseq: int) -> None:
        """The view has taken every change up to ``modseq``."""
        state = self.folders.get(folder_id)
        if state is not None and key in state.users:
            state.users[key] = modseq

    def wrote(
        self,
        folder_id: int,
        modseq: int,
        flags: Iterable[tuple[int, int, str]] = (),
        expunged: Iterable[int] = (),
    ) -> None:
        """This process just committed, and announced, flag changes ``(uid, sysflags, keywords)`` or
        expunges of the folder at ``modseq`` (its HIGHESTMODSEQ was ``modseq - 1``): taken as if
        read back, so nobody reads them. Only when nothing else is outstanding: no other notice
        since the last read, no gap in MODSEQ, no read in flight; otherwise the folder stays stale
        and is read."""
        state = self.folders.get(folder_id)
        if (
            state is None
            or not state.loaded
            or state.lock.locked()
            or state.notices != state.read + 1
            or state.highest != modseq - 1
        ):
            return
        rows = []
        for uid, sysflags, keywords in flags:
            old = state.messages.get(uid)
            if old is None:
                return
            rows.append(replace(old, sysflags=sysflags, keywords=keywords, modseq=modseq))
        state.highest = modseq
        state.apply(rows, [(modseq, uid) for uid in expunged])
        state.read = state.notices

    def loaded(self, folder_id: int) -> FolderState | None:
        """The folder's state if some session has it open and it is current (no statement needed)."""
        state = self.folders.get(folder_id)
        if state is None or not state.loaded or state.stale or state.lock.locked():
            return None
        return state if time.monotonic() - state.checked < RECHECK else None

    async def current(self, folder_id: int) -> FolderState:
        """The folder as the database has it now (as of the last change notice), read only if stale."""
        state = self.folders[folder_id]
        if not state.stale and not state.lock.locked() and time.monotonic() - state.checked < RECHECK:
            return state
        async with state.lock:  # a refresh in flight may be reading what this caller must see: wait
            if state.stale or time.monotonic() - state.checked >= RECHECK:
                await self._refresh(state)
        return state

    async def _refresh(self, state: FolderState) -> None:
        state.read = state.notices  # a notice arriving while we read makes it stale again
        state.checked = time.monotonic()
        columns = ENTRY_COLUMNS
        async with self.db.read() as s:
            row = (
                await s.execute(
                    select(Folder.highestmodseq, Folder.uidnext, Folder.recent_uid).where(
                        Folder.id == state.folder_id
                    )
                )
            ).one_or_none()
            if row is None:  # deleted: nothing of it is served any more
                state.gone = True
                state.messages.clear()
                return
            highest = int(row.highestmodseq)
            rows: list[Entry] = []
            expunged: list[tuple[int, int]] = []
            if not state.loaded or highest > state.highest:
                # Bounded by ``highest``: what a later commit changes is the next refresh's.
                query = select(*columns).where(
                    Message.folder_id == state.folder_id, Message.modseq <= highest
                )
                if state.loaded:
                    query = query.where(Message.modseq > state.highest)
                rows = [Entry(*r) for r in await s.execute(query.order_by(Message.modseq))]
            if state.loaded and highest > state.highest:
                expunged = [
                    (int(m), int(u))
                    for m, u in await s.execute(
                        select(Expunge.modseq, Expunge.uid)
                        .where(
                            Expunge.folder_id == state.folder_id,
                            Expunge.modseq > state.highest,
                            Expunge.modseq <= highest,
                        )
                        .order_by(Expunge.modseq)
                    )
                ]
        if not state.loaded:
            state.loaded, state.floor = True, highest
        state.highest, state.uidnext, state.recent_uid = highest, row.uidnext, row.recent_uid
        state.apply(rows, expunged)

"""Folder-change notices: writers announce the folders they changed; idling sessions wake up and the
folder index (gateway/imap/index.py) marks them stale, in this process and, on PostgreSQL, in every
instance on the database.

Theory of operation
-------------------
In a process, :class:`Changes` fans out synchronously: a writer, after its
commit, :meth:`Changes.publish`-es the ids of the folders it changed; the
listeners (the folder index) are told first, then every
:meth:`Changes.watch`-er of one of those folders is woken.

Across instances on PostgreSQL, :class:`ClusterNotices` carries the same
notices with ``LISTEN/NOTIFY`` on the channel :data:`CHANNEL`, over one
connection of its own, kept open:

- Sending. Every notice published here is also handed to it
  (:meth:`Changes.forward`); the ids gather in a set, and its task sends
  them with ``pg_notify`` on that connection, all that gathered in one
  statement (what is published while it is sent goes in the next). A
  payload is folder ids in decimal, comma-separated, shorter than
  PostgreSQL's 8000 bytes (:func:`payloads`); a batch needing more than
  :data:`MAX_PAYLOADS` of them goes as ``*``: anything may have changed.
- After the commit, not in it. NOTIFY is its own transaction, sent after the
  writer committed, rather than a statement in the writing transaction: a
  transaction that notified takes a database-wide lock at commit (PostgreSQL
  serialises the commits of every notifying transaction), which every write
  of every instance would then queue for, and no writer needs to know of the
  cluster. The price: the notices of a process that dies between a commit
  and its NOTIFY are lost; readers then see the change at their periodic
  recheck (30 s), as with any lost notice. Receivers see the change when
  the notice comes, since it was committed before it was sent.
- Receiving. A notice is handed to :meth:`Changes.receive`: the listeners
  and watchers of this process, never sent on. A notice this connection sent
  (PostgreSQL names the sending session) is dropped: it was delivered here
  when published, before it was sent, so the echo is news to nobody, and
  dropping it spares the folder index reading back its own writes.
- Losing the connection. A lost connection (the driver sees it close; a
  silent one fails the ping sent after :data:`PING` seconds of quiet) is
  opened again after a backoff doubling from :data:`BACKOFF_MIN` to
  :data:`BACKOFF_MAX`; ids not sent yet are kept and sent then. What other
  instances announced meanwhile is lost, so after every LISTEN this process
  takes "anything may have changed" (``receive(None)``): the folder index
  marks every folder stale and idling sessions look again.

On SQLite there is one instance and none of this runs. The connection must
reach PostgreSQL itself or a session-pooling proxy: LISTEN does not work
through transaction pooling.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

log = structlog.get_logger(__name__)

CHANNEL = "mailgate_folders"
PAYLOAD_LIMIT = 7999  # bytes: PostgreSQL refuses a payload of 8000 or more
MAX_PAYLOADS = 8  # a batch needing more payloads (some 8000 folders) is sent as EVERYTHING
EVERYTHING = "*"
PING = 10.0  # seconds of quiet after which the connection is tested
TIMEOUT = 5.0  # seconds a NOTIFY or a ping may take
BACKOFF_MIN, BACKOFF_MAX = 0.5, 30.0  # seconds between attempts to connect again

# Told the changed folders on every notice; None: anything may have changed (notices were lost).
Listener = Callable[[set[int] | None], None]


class Changes:
    """Folder-change announcements within one daemon process (and, forwarded, to other instances)."""

    def __init__(self) -> None:
        self._waiters: defaultdict[int, set[asyncio.Event]] = defaultdict(set)
        self._listeners: list[Listener] = []
        self._forwarders: list[Callable[[set[int]], None]] = []

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener`` with the changed folders on every notice, before anyone is woken."""
        self._listeners.append(listener)

    def forward(self, sender: Callable[[set[int]], None]) -> None:
        """Also hand ``sender`` every notice published here (not those received)."""
        self._forwarders.append(sender)

    def publish(self, folder_ids: Iterable[int]) -> None:
        """This process changed these folders: tell the listeners, wake the sessions watching one,
        and forward the notice."""
        changed = set(folder_ids)
        if not changed:
            return
        self.receive(changed)
        for send in self._forwarders:
            send(changed)

    def receive(self, folder_ids: set[int] | None) -> None:
        """A notice of changed folders (None: any folder may have changed), told in this process only."""
        for listener in self._listeners:
            listener(folder_ids)
        if folder_ids is None:
            events = {e for watching in self._waiters.values() for e in watching}
        else:
            events = {e for folder_id in folder_ids for e in self._waiters.get(folder_id, ())}
        for event in events:
            event.set()

    @contextmanager
    def watch(self, *folder_ids: int) -> Iterator[asyncio.Event]:
        """An event set when one of the folders changes, for the duration of the block."""
        event = asyncio.Event()
        for folder_id in folder_ids:
            self._waiters[folder_id].add(event)
        try:
            yield event
        finally:
            for folder_id in folder_ids:
                self._waiters[folder_id].discard(event)
                if not self._waiters[folder_id]:
                    del self._waiters[folder_id]


def payloads(folder_ids: Iterable[int], limit: int = PAYLOAD_LIMIT) -> list[str]:
    """NOTIFY payloads naming ``folder_ids``: ascending, comma-separated, each at most ``limit`` bytes."""
    out: list[str] = []
    part: list[str] = []
    size = 0
    for folder_id in sorted(set(folder_ids)):
        digits = str(folder_id)
        if part and size + 1 + len(digits) > limit:
            out.append(",".join(part))
            part, size = [], 0
        size += len(digits) + (1 if part else 0)
        part.append(digits)
    if part:
        out.append(",".join(part))
    return out


def parse(payload: str) -> set[int] | None:
    """The folder ids a payload names; None for :data:`EVERYTHING` or a payload not understood."""
    if payload == EVERYTHING:
        return None
    try:
        return {int(p) for p in payload.split(",")}
    except ValueError:
        log.warning("notify.unreadable_notice", payload=payload[:80])
        return None


class ClusterNotices:
    """Carries :class:`Changes` between the instances on one PostgreSQL database (see the module doc)."""

    def __init__(self, url: str, changes: Changes) -> None:
        self.url = url
        self.changes = changes
        self.backend: int | None = None  # the listening session's pid while connected
        self._pending: set[int] = set()  # published here, not sent yet
        self._wake = asyncio.Event()  # something to send, or the connection was lost
        self._delay = BACKOFF_MIN
        changes.forward(self._send)

    def _send(self, folder_ids: set[int]) -> None:
        self._pending |= folder_ids
        self._wake.set()

    def _on_notice(self, _connection: object, pid: int, _channel: str, payload: str) -> None:
        if pid == self.backend:  # ours: delivered here when it was published
            return
        self.changes.receive(parse(payload))

    async def run(self) -> None:
        """Listen and send for the daemon's life, connecting again after a loss (cancel to stop)."""
        while True:
            try:
                await self._session()
                log.warning("notify.connection_lost", retry_in=self._delay)
            except Exception as exc:  # noqa: BLE001 (whatever the connection raised, it is opened again)
                # Not only OSError, SQLAlchemy's and asyncpg's Postgres/Interface errors: a statement
                # sent while the server's goodbye is arriving fails with asyncpg's InternalClientError.
                error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                log.warning("notify.connection_failed", error=error, retry_in=self._delay)
            await asyncio.sleep(self._delay)
            self._delay = min(2 * self._delay, BACKOFF_MAX)

    async def _session(self) -> None:
        """One connection's life: LISTEN, then send what is published until it is lost."""
        engine = create_async_engine(self.url, poolclass=NullPool)  # the daemon's settings (TLS, ...)
        try:
            async with engine.connect() as connection:
                pg: Any = (await connection.get_raw_connection()).driver_connection  # asyncpg's
                lost = False

                def on_lost(_connection: object) -> None:
                    nonlocal lost
                    lost = True
                    self._wake.set()

                pg.add_termination_listener(on_lost)
                self.backend = pg.get_server_pid()
                await pg.add_listener(CHANNEL, self._on_notice)
                self._delay = BACKOFF_MIN
                log.info("notify.listening", channel=CHANNEL, backend=self.backend)
                self.changes.receive(None)  # what others announced while this process did not listen
                while True:
                    self._wake.clear()
                    if lost:
                        return
                    if self._pending:
                        batch, self._pending = self._pending, set()
                        try:
                            await self._notify(pg, batch)
                        except BaseException:
                            self._pending |= batch  # sent again on the next connection
                            raise
                        continue
                    try:
                        async with asyncio.timeout(PING):  # not wait_for: it can swallow a cancel (3.11)
                            await self._wake.wait()
                    except TimeoutError:
                        await pg.fetchval("SELECT 1", timeout=TIMEOUT)
        finally:
            self.backend = None
            await engine.dispose()

    @staticmethod
    async def _notify(pg: Any, folder_ids: set[int]) -> None:
        parts = payloads(folder_ids)
        if len(parts) > MAX_PAYLOADS:
            parts = [EVERYTHING]
        await pg.execute(
            "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p", CHANNEL, parts, timeout=TIMEOUT
        )

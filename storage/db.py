"""Engines and transactions for SQLite (embedded default) and PostgreSQL.

Writers and readers are separate on SQLite: writers share one connection and
open their transactions with ``BEGIN IMMEDIATE``, so two writers never both
hold a read snapshot and then fail to upgrade; readers run in WAL mode beside
them. Commits are durable (``synchronous=FULL``) before :meth:`Database.write`
returns. PostgreSQL needs neither trick. SQLite statements run on the event
loop and only the waits (a write lock another process holds, the commit's
fsync) on a thread: :mod:`storage.sqlite_driver` says why.

Group commit: :meth:`Database.grouped` runs a writer's function in a write
transaction shared with the writers that queued while the previous one
committed, each in its own SAVEPOINT, so N concurrent IMAP STOREs cost one
commit (one fsync) instead of N. A function that raises is rolled back alone;
the others' results are handed out only after the commit, and a failed commit
fails them all. A function alone in its transaction needs no SAVEPOINT: its
failure rolls the whole transaction back.

Counting: every statement sent and every commit made through a
:class:`Database` is counted in its :class:`Activity` (the metrics
``mailgate_db_statements_total`` and ``mailgate_db_commits_total``), so a
bench or an operator can divide them by the messages stored.

Cancellation: a write transaction cut off by cancelling its task can, on
SQLite, leave its connection orphaned (its lock or commit still running on a
thread) and holding the write lock, so every later writer waits out the busy timeout.
Code that shutdown or a supervisor may cancel runs its write transactions
through :meth:`Database.transaction` or a whole pass through
:func:`uninterrupted`; ingest commits in a task of its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from storage import sqlite_driver

BUSY_TIMEOUT_MS = 30_000

T = TypeVar("T")


async def uninterrupted(work: Awaitable[T]) -> T:
    """Await ``work`` to its end even if the caller is cancelled meanwhile; then re-raise the cancellation.

    For a pass of a background loop that writes: the loop stops between
    transactions, never inside one (see the module's docstring).
    """
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        if not task.done():
            await asyncio.wait({task})
        raise


@dataclass
class Activity:
    """Statements executed and transactions committed through one :class:`Database`, since it opened."""

    statements: int = 0
    commits: int = 0

    def watch(self, engine: AsyncEngine) -> None:
        """Count ``engine``'s statements and commits."""

        @event.listens_for(engine.sync_engine, "before_cursor_execute")
        def _statement(*_: Any) -> None:
            self.statements += 1

        @event.listens_for(engine.sync_engine, "commit")
        def _commit(_conn: Any) -> None:
            self.commits += 1


def _sqlite_engine(url: str, *, begin: str, pool_size: int) -> AsyncEngine:
    engine = create_async_engine(
        make_url(url).set(drivername=sqlite_driver.DRIVERNAME),  # no transaction control: BEGIN is ours
        pool_size=pool_size,
        max_overflow=0,
        pool_timeout=300,
    )

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        cur = dbapi_connection.cursor()
        for pragma in (
            "journal_mode=WAL",
            "synchronous=FULL",
            f"busy_timeout={BUSY_TIMEOUT_MS}",
            "foreign_keys=ON",
        ):
            cur.execute(f"PRAGMA {pragma}")
        cur.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql(begin)

    return engine


def _private(db: Path) -> None:
    """Take group write and all other users' access off existing SQLite files.

    New files get that from the daemon's umask (0027); this mends files made
    by an earlier version or by hand.
    """
    for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        with suppress(FileNotFoundError):
            mode = path.stat().st_mode & 0o7777
            if mode & 0o027:
                path.chmod(mode & ~0o027)


class Database:
    """One database, SQLite or PostgreSQL, with read and write transactions."""

    def __init__(self, url: str) -> None:
        self.url = url
        parsed = make_url(url)
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        if self.is_sqlite:
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
                _private(Path(parsed.database))
            self.writer = _sqlite_engine(url, begin="BEGIN IMMEDIATE", pool_size=1)
            self.reader = _sqlite_engine(url, begin="BEGIN", pool_size=4)
        else:
            self.writer = create_async_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=True)
            self.reader = self.writer
        self.activity = Activity()
        for engine in {self.writer, self.reader}:
            self.activity.watch(engine)
        self._write_sessions = async_sessionmaker(self.writer, expire_on_commit=False)
        self._queued: list[tuple[Callable[[AsyncSession], Awaitable[Any]], asyncio.Future[Any]]] = []
        self._committer: asyncio.Task[None] | None = None
        self._read_sessions = async_sessionmaker(self.reader, expire_on_commit=False)

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncSession]:
        """A write transaction, committed when the block exits without error."""
        async with self._write_sessions() as session, session.begin():
            yield session

    async def transaction(self, fn: Callable[[AsyncSession], Awaitable[T]]) -> T:
        """``fn`` in a write transaction that cancelling the caller never cuts off (:func:`uninterrupted`)."""

        async def run() -> T:
            async with self.write() as s:
                return await fn(s)

        return await uninterrupted(run())

    async def grouped(self, fn: Callable[[AsyncSession], Awaitable[T]]) -> T:
        """``fn`` in a write transaction shared with other writers (group commit, see the module doc).

        Runs in the committer task, so cancelling the caller never cuts the transaction off;
        ``fn`` must not open a write transaction of its own.
        """
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queued.append((fn, future))
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit_queued(), name="group-commit")
        return await asyncio.shield(future)

    async def _commit_queued(self) -> None:
        while self._queued:
            batch, self._queued = self._queued, []
            done: list[tuple[asyncio.Future[Any], Any]] = []
            try:
                async with self.write() as s:
                    if len(batch) == 1:  # alone: its failure is the transaction's (see the module doc)
                        fn, future = batch[0]
                        done.append((future, await fn(s)))
                    else:
                        for fn, future in batch:
                            try:
                                async with s.begin_nested():
                                    done.append((future, await fn(s)))
                            except Exception as exc:  # noqa: BLE001 (handed to its caller; the others go on)
                                future.set_exception(exc)
                            # Flushed (or rolled back): each function starts with an empty identity map, so
                            # a rollback's expiry never reaches objects another one holds.
                            s.expunge_all()
            except BaseException as exc:  # the transaction failed: so did every function in it not failed yet
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc if isinstance(exc, Exception) else RuntimeError("cancelled"))
                if not isinstance(exc, Exception):
                    raise
                continue
            for future, result in done:
                future.set_result(result)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        """A transaction for reading; loaded objects stay usable after it ends."""
        async with self._read_sessions() as session, session.begin():
            yield session

    async def close(self) -> None:
        """Dispose of the connection pools."""
        await self.writer.dispose()
        if self.reader is not self.writer:
            await self.reader.dispose()

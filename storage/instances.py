"""Who runs against this database: one instance at a time until clustering lands.

Theory of operation
-------------------
``mailgate run`` takes an exclusive lock bound to the database before it
migrates or listens (:func:`lock`), and holds it until it exits:

- PostgreSQL: the session advisory lock :data:`ADVISORY_KEY` on a connection
  of its own, kept open for the daemon's life; the server releases it when
  that session ends, so a killed process never leaves it behind.
- SQLite: ``flock(LOCK_EX | LOCK_NB)`` on ``<database>.lock`` beside the
  database file; the kernel releases it when the process dies.

Holding the lock, the instance records itself in ``instances`` (id, host,
pid, start, heartbeat) and refreshes ``heartbeat_at`` every :data:`HEARTBEAT`
seconds; a clean stop deletes its row. A second instance finds the lock
taken, reads the holder's row (the newest heartbeat) and refuses to start
with :class:`InstanceConflict`, which names it. On PostgreSQL each heartbeat
also checks that the lock's session is the one that took it; if it is gone
(the server restarted), the lock is gone with it: :class:`LockLost`, and the
daemon stops rather than run unguarded. The lock is belt and braces: the
relay queue's claims (:mod:`storage.queue`) keep sends exclusive anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from dataclasses import dataclass
from datetime import datetime
from io import TextIOWrapper
from pathlib import Path

from sqlalchemy import delete, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from storage.db import Database
from storage.models import Instance

ADVISORY_KEY = 0x6D61696C67617465  # "mailgate" in ASCII: the PostgreSQL advisory lock's key
HEARTBEAT = 10.0  # seconds between heartbeats


class InstanceConflict(Exception):
    """Another live instance holds the database."""

    def __init__(self, holder: Instance | None) -> None:
        if holder is None:
            who = "another instance (not registered yet)"
        else:
            who = (
                f'instance "{holder.id}" (pid {holder.pid} on host {holder.hostname}, '
                f"started {holder.started_at.isoformat(timespec='seconds')}, "
                f"last heartbeat {holder.heartbeat_at.isoformat(timespec='seconds')})"
            )
        super().__init__(
            f"the database is in use by {who}; "
            "only one instance may run against a database until clustering is configured"
        )
        self.holder = holder


class LockLost(Exception):
    """The PostgreSQL session holding the lock ended."""


@dataclass
class Lock:
    """The database's exclusive lock, held by this process (one of the two kinds)."""

    db: Database
    engine: AsyncEngine | None = None  # PostgreSQL: the lock's own connection
    connection: AsyncConnection | None = None
    backend: int | None = None  # the PostgreSQL session (backend pid) holding the lock
    file: TextIOWrapper | None = None  # SQLite: the flocked sidecar file
    instance: str | None = None

    async def register(self, instance: str, hostname: str, now: datetime) -> None:
        """Record this process as ``instance`` (replacing what a dead run of it left)."""
        async with self.db.write() as s:
            row = await s.get(Instance, instance)
            if row is None:
                row = Instance(id=instance)
                s.add(row)
            row.hostname, row.pid, row.started_at, row.heartbeat_at = hostname, os.getpid(), now, now
        self.instance = instance

    async def beat(self, now: datetime) -> None:
        """Refresh this instance's heartbeat; :class:`LockLost` if the lock's session ended."""
        if self.connection is not None:
            try:
                backend = await self.connection.scalar(text("SELECT pg_backend_pid()"))
            except SQLAlchemyError as exc:
                raise LockLost(str(exc).splitlines()[0]) from exc
            if backend != self.backend:  # reconnected: a new session, without the lock
                raise LockLost(f"the lock's session {self.backend} ended")
        async with self.db.write() as s:
            row = await s.get(Instance, self.instance)
            if row is not None:
                row.heartbeat_at = now

    async def release(self) -> None:
        """Delete this instance's row, then give the lock up."""
        if self.instance is not None:
            with contextlib.suppress(SQLAlchemyError, OSError):
                async with self.db.write() as s:
                    await s.execute(delete(Instance).where(Instance.id == self.instance))
        if self.connection is not None:
            await self.connection.close()
        if self.engine is not None:
            await self.engine.dispose()
        if self.file is not None:
            self.file.close()  # closing the file drops the flock


def _lock_file(path: Path) -> TextIOWrapper | None:
    """``path`` opened and flocked, or None when another process holds it."""
    file = path.open("a", encoding="utf-8")
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.close()
        return None
    return file


async def holder(db: Database) -> Instance | None:
    """The instance with the newest heartbeat (the lock's holder), if the table has one."""
    try:
        async with db.read() as s:
            return await s.scalar(select(Instance).order_by(Instance.heartbeat_at.desc()).limit(1))
    except SQLAlchemyError:
        return None  # e.g. a database not migrated yet


async def lock(db: Database) -> Lock:
    """Take the database's exclusive lock; :class:`InstanceConflict` when someone holds it."""
    if db.is_sqlite:
        database = make_url(db.url).database
        if not database or database == ":memory:":
            return Lock(db)  # a private in-memory database: nobody else can use it
        file = await asyncio.to_thread(_lock_file, Path(f"{database}.lock"))
        if file is None:
            raise InstanceConflict(await holder(db))
        return Lock(db, file=file)
    engine = create_async_engine(db.url, poolclass=NullPool)
    try:
        connection = await engine.connect()
        connection = await connection.execution_options(isolation_level="AUTOCOMMIT")
        taken = await connection.scalar(text("SELECT pg_try_advisory_lock(:key)"), {"key": ADVISORY_KEY})
        backend = await connection.scalar(text("SELECT pg_backend_pid()"))
    except BaseException:
        await engine.dispose()
        raise
    if not taken:
        await connection.close()
        await engine.dispose()
        raise InstanceConflict(await holder(db))
    return Lock(db, engine=engine, connection=connection, backend=backend)

"""Who runs against this database: instances, their heartbeats, and which of them may start.

Theory of operation
-------------------
Every ``mailgate run`` is an *instance* with an id (``gateway.instance``,
by default the machine's host name). Before it migrates or listens it takes
a lock (:func:`lock`) and holds it until it exits:

- PostgreSQL, where several instances make a cluster: the session advisory
  lock of its *id* (:func:`advisory_key`), on a connection of its own kept
  open for the daemon's life. Instances with different ids run side by side;
  a second process with an id already running is refused, because two
  processes answering to one id would each take the other's relay claims
  (and leases) for its own. The server releases the lock when that session
  ends, so a killed process never leaves it behind.
- SQLite, the embedded database of one instance: ``flock(LOCK_EX |
  LOCK_NB)`` on ``<database>.lock`` beside the database file, whatever the
  id: a second instance is refused. The kernel releases it when the process
  dies.

A refused instance gets :class:`InstanceConflict`, which names the holder
from its row. On PostgreSQL the start-up that follows (migrations, the
file's tenants applied) runs under one more advisory lock, the cluster's
(:meth:`Lock.starting`), so instances started together migrate one after
the other.

Holding its lock, the instance records itself in ``instances`` (id, host,
pid, start, heartbeat; the row a dead run of the same id left is replaced)
and refreshes ``heartbeat_at`` every :data:`HEARTBEAT` seconds; a clean stop
deletes its row. An instance whose heartbeat is older than :data:`TTL` is
reported dead (:func:`cluster`); its row stays until its id starts again.
What a dead instance held is given back: its upstream leases run out
(:mod:`storage.leases`); its relay claims are taken over at once on
PostgreSQL, where its id's lock is seen free, and otherwise run out
(:mod:`storage.queue`). An instance that starts releases its own id's old
relay claims at once: holding its id's lock, no other live process is that
instance. Heartbeats are
written with each host's clock, so the hosts' clocks must agree to well
within ``TTL - HEARTBEAT`` (NTP does).

On PostgreSQL each heartbeat also checks that the lock's session is the one
that took it; if it is gone (the server restarted), the lock is gone with
it: :class:`LockLost`, and the daemon stops rather than run unguarded.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from io import TextIOWrapper
from pathlib import Path

from sqlalchemy import delete, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.pool import NullPool

from storage.db import Database
from storage.models import Instance, Outbound, UpstreamLease

HEARTBEAT = 10.0  # seconds between heartbeats
TTL = timedelta(seconds=3 * HEARTBEAT)  # an instance not heard of for this long is dead


def _key(name: bytes) -> int:
    """A PostgreSQL advisory lock key (a signed 64-bit integer) for ``name``."""
    return int.from_bytes(hashlib.sha256(b"mailgate\0" + name).digest()[:8], "big", signed=True)


STARTUP_KEY = _key(b"start-up")  # the cluster's start-up lock (migrations, the file's tenants applied)


def advisory_key(instance: str) -> int:
    """The PostgreSQL advisory lock key held by the instance with this id."""
    return _key(b"instance\0" + instance.encode())


class InstanceConflict(Exception):
    """Another live process holds this database (SQLite) or this instance id (PostgreSQL)."""

    def __init__(self, holder: Instance | None, *, sqlite: bool) -> None:
        if holder is None:
            who = "another instance (not registered yet)"
        else:
            who = (
                f'instance "{holder.id}" (pid {holder.pid} on host {holder.hostname}, '
                f"started {holder.started_at.isoformat(timespec='seconds')}, "
                f"last heartbeat {holder.heartbeat_at.isoformat(timespec='seconds')})"
            )
        why = (
            "only one instance may run against a database on SQLite; "
            "run several on PostgreSQL (docs/scaling.md)"
            if sqlite
            else "only one instance may run against a database under each id: "
            "give this one another [gateway] instance"
        )
        super().__init__(f"the database is in use by {who}; {why}")
        self.holder = holder


class LockLost(Exception):
    """The PostgreSQL session holding the lock ended."""


@contextlib.asynccontextmanager
async def _startup_lock(connection: AsyncConnection) -> AsyncIterator[None]:
    await connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": STARTUP_KEY})
    try:
        yield
    finally:
        with contextlib.suppress(SQLAlchemyError):  # a lost session took the lock with it
            await connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": STARTUP_KEY})


@contextlib.asynccontextmanager
async def starting_alone(db: Database) -> AsyncIterator[None]:
    """The cluster's start-up lock for a process that is no instance (``mailgate migrate``)."""
    if db.is_sqlite:  # SQLite serialises the migrations' writers itself
        yield
        return
    async with db.writer.connect() as connection, _startup_lock(connection):
        yield


@dataclass
class Lock:
    """This process's lock (one of the two kinds), held for its life."""

    db: Database
    engine: AsyncEngine | None = None  # PostgreSQL: the lock's own connection
    connection: AsyncConnection | None = None
    backend: int | None = None  # the PostgreSQL session (backend pid) holding the lock
    file: TextIOWrapper | None = None  # SQLite: the flocked sidecar file
    instance: str | None = None

    @contextlib.asynccontextmanager
    async def starting(self) -> AsyncIterator[None]:
        """The block runs under the cluster's start-up lock (PostgreSQL; waits for it): one
        instance at a time migrates the database and applies its file. SQLite: nobody else runs."""
        if self.connection is None:
            yield
            return
        async with _startup_lock(self.connection):
            yield

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


async def holder(db: Database, instance: str | None = None) -> Instance | None:
    """The row of ``instance``, or (None) the one with the newest heartbeat, if there is one."""
    query = select(Instance)
    if instance is None:
        query = query.order_by(Instance.heartbeat_at.desc()).limit(1)
    else:
        query = query.where(Instance.id == instance)
    try:
        async with db.read() as s:
            return await s.scalar(query)
    except SQLAlchemyError:
        return None  # e.g. a database not migrated yet


async def lock(db: Database, instance: str) -> Lock:
    """Take this process's lock as ``instance``; :class:`InstanceConflict` when it is held."""
    if db.is_sqlite:
        database = make_url(db.url).database
        if not database or database == ":memory:":
            return Lock(db)  # a private in-memory database: nobody else can use it
        file = await asyncio.to_thread(_lock_file, Path(f"{database}.lock"))
        if file is None:
            raise InstanceConflict(await holder(db), sqlite=True)
        return Lock(db, file=file)
    engine = create_async_engine(db.url, poolclass=NullPool)
    try:
        connection = await engine.connect()
        connection = await connection.execution_options(isolation_level="AUTOCOMMIT")
        taken = await connection.scalar(
            text("SELECT pg_try_advisory_lock(:key)"), {"key": advisory_key(instance)}
        )
        backend = await connection.scalar(text("SELECT pg_backend_pid()"))
    except BaseException:
        await engine.dispose()
        raise
    if not taken:
        await connection.close()
        await engine.dispose()
        raise InstanceConflict(await holder(db, instance), sqlite=False)
    return Lock(db, engine=engine, connection=connection, backend=backend)


@dataclass(frozen=True, slots=True)
class Member:
    """An instance as ``mailgate cluster status`` shows it."""

    row: Instance
    alive: bool  # heard of within TTL
    relay_claims: int  # queued messages it is attempting now (unexpired claims)
    upstream_leases: int  # upstream folders it pulls now (unexpired leases, storage.leases)


async def cluster(s: AsyncSession, now: datetime) -> list[Member]:
    """Every instance registered in the database, by id, with whether it lives and what it holds."""
    rows = (await s.scalars(select(Instance).order_by(Instance.id))).all()
    claims = dict(
        (
            await s.execute(
                select(Outbound.claimed_by, func.count())
                .where(Outbound.claimed_by.is_not(None), Outbound.claimed_until > now)
                .group_by(Outbound.claimed_by)
            )
        ).all()
    )
    leases = dict(
        (
            await s.execute(
                select(UpstreamLease.holder, func.count())
                .where(UpstreamLease.expires_at > now)
                .group_by(UpstreamLease.holder)
            )
        ).all()
    )
    return [
        Member(r, now - r.heartbeat_at < TTL, int(claims.get(r.id, 0)), int(leases.get(r.id, 0)))
        for r in rows
    ]

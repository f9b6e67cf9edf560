"""The SQLite driver under SQLAlchemy's asyncio engine: statements on the loop, waits on a thread.

Theory of operation. SQLAlchemy's ``sqlite+aiosqlite`` dialect drives an
object with aiosqlite's interface. aiosqlite runs every call (each cursor,
execute, fetch and close) on its own thread and wakes the event loop for
each result: about 80 us of two threads' time per call, four calls per
statement, so an IMAP APPEND of eleven statements cost 44 hops and most of
its CPU. Here the same interface runs a statement directly on the loop: on
the page cache a statement costs microseconds, the same order as the Python
that builds it and reads its rows. What can wait goes to a thread:

* opening a connection;
* ``BEGIN IMMEDIATE`` when another connection holds the write lock (a CLI
  command, a migration): it waits up to the busy timeout. It is first tried
  on the loop with the busy timeout off, and a free lock (nearly always: one
  writer connection per process) is taken there at once;
* ``COMMIT`` (the connection's ``commit()``) of a transaction that may have
  written, which fsyncs the WAL (``synchronous=FULL``) and may run an
  automatic checkpoint; a reader's (deferred ``BEGIN``, no row changed)
  writes nothing and ends on the loop;
* closing a connection.

A write transaction therefore costs one thread hop whatever its statements
(two when it waits for the lock), and a read transaction none. Readers never wait for a lock in WAL mode, and
writers hold it from ``BEGIN IMMEDIATE`` on, so the statements in between
never sleep on ``busy_timeout``. Large scans are bounded by their callers
(batches, ``LIMIT``), as their rows' Python processing on the loop already is.

Each connection has a thread of its own for its waits, as aiosqlite does: a
shared pool could fill with writers waiting for the lock while the holder's
``COMMIT`` queues behind them (eight databases on one file in one process
did that: every waiter timed out). One connection is used by one task at a
time (SQLAlchemy's pool and its per-connection lock), so its thread never
races the loop.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Self, TypeVar

T = TypeVar("T")

# Statements that can sleep (on a lock or a disk flush) rather than compute: run on a thread.
_WAITING = ("BEGIN IMMEDIATE", "BEGIN EXCLUSIVE", "COMMIT", "END", "VACUUM", "PRAGMA WAL_CHECKPOINT")


def _waits(sql: str) -> bool:
    return sql.lstrip()[:22].upper().startswith(_WAITING)


def _locks(sql: str) -> bool:
    """Whether ``sql`` takes the write lock and nothing else (see :meth:`Connection.lock_at_once`)."""
    return sql.lstrip()[:16].upper().startswith(("BEGIN IMMEDIATE", "BEGIN EXCLUSIVE"))


class Cursor:
    """aiosqlite's cursor interface over a sqlite3 cursor (see the module's docstring)."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._cursor = connection._conn.cursor()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_: object) -> None:
        self._cursor.close()

    async def execute(self, sql: str, parameters: Any = ()) -> Self:
        waits = _waits(sql)
        if not waits:
            self._cursor.execute(sql, parameters)
        elif not (_locks(sql) and self._connection.lock_at_once(self._cursor, sql)):
            await self._connection.waiting(self._cursor.execute, sql, parameters)
        if sql.lstrip()[:5].upper() == "BEGIN":
            self._connection.began(reading=not waits)
        return self

    async def executemany(self, sql: str, parameters: Iterable[Any]) -> Self:
        self._cursor.executemany(sql, parameters)
        return self

    async def fetchone(self) -> Any:
        return self._cursor.fetchone()

    async def fetchmany(self, size: int | None = None) -> list[Any]:
        return self._cursor.fetchmany(self._cursor.arraysize if size is None else size)

    async def fetchall(self) -> list[Any]:
        return self._cursor.fetchall()

    async def close(self) -> None:
        self._cursor.close()

    @property
    def description(self) -> Any:
        return self._cursor.description

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    @property
    def lastrowid(self) -> int | None:
        return self._cursor.lastrowid

    @property
    def arraysize(self) -> int:
        return self._cursor.arraysize

    @arraysize.setter
    def arraysize(self, value: int) -> None:
        self._cursor.arraysize = value


class Connection:
    """aiosqlite's connection interface, the part SQLAlchemy's dialect uses, over one sqlite3 connection.

    The dialect checks ``_connection`` to know the connection is open; the driver leaves transaction
    control to the caller (``isolation_level`` None: the engine emits ``BEGIN`` itself).
    """

    def __init__(self, conn: sqlite3.Connection, thread: ThreadPoolExecutor) -> None:
        self._conn = conn
        self._thread = thread  # this connection's waits, one at a time
        self._connection: sqlite3.Connection | None = conn
        self._reading = False  # the open transaction began deferred (a reader's)
        self._changes = 0  # rows changed through this connection when it began
        self._busy_ms: int | None = None  # the connection's busy timeout, read once

    async def waiting(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on this connection's own thread."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, functools.partial(fn, *args))

    def lock_at_once(self, cursor: sqlite3.Cursor, sql: str) -> bool:
        """Take the write lock on the loop if it is free; False if another connection holds it.

        The busy timeout is off for this one statement, so it fails at once instead of sleeping;
        the caller then waits for the lock on the thread. The lock is free nearly always (one
        writer connection per process): this saves an APPEND the two thread hand-offs of a
        ``BEGIN IMMEDIATE``, 0.3-0.6 ms while the blob writer works (2026-12-05).
        """
        if self._busy_ms is None:
            self._busy_ms = int(self._conn.execute("PRAGMA busy_timeout").fetchone()[0])
        self._conn.execute("PRAGMA busy_timeout = 0")
        try:
            cursor.execute(sql)
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY:
                raise
            return False
        finally:
            self._conn.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
        return True

    def began(self, *, reading: bool) -> None:
        self._reading = reading
        self._changes = self._conn.total_changes

    @property
    def isolation_level(self) -> str | None:
        return self._conn.isolation_level

    def cursor(self) -> Cursor:
        return Cursor(self)

    async def execute(self, sql: str, parameters: Sequence[Any] = ()) -> Cursor:
        return await self.cursor().execute(sql, parameters)

    async def commit(self) -> None:
        if not self._conn.in_transaction:
            return
        if self._reading and self._conn.total_changes == self._changes:
            self._conn.commit()  # nothing to flush
        else:
            await self.waiting(self._conn.commit)

    async def rollback(self) -> None:
        self._conn.rollback()

    async def create_function(self, *args: Any, **kw: Any) -> None:
        self._conn.create_function(*args, **kw)

    async def close(self) -> None:
        if self._connection is not None:
            self._connection = None
            try:
                await self.waiting(self._conn.close)
            finally:
                self._thread.shutdown(wait=False)

    def stop(self) -> None:
        """Close at once (SQLAlchemy's terminate, when a graceful close is impossible)."""
        if self._connection is not None:
            self._connection = None
            self._conn.close()
            self._thread.shutdown(wait=False)


async def connect(database: str) -> Connection:
    """Open ``database`` (a path or ``:memory:``) without a transaction of the driver's own."""

    def opened() -> sqlite3.Connection:
        # check_same_thread: the waits run on the connection's thread (never at the same time as the loop).
        return sqlite3.connect(database, isolation_level=None, check_same_thread=False)

    thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
    try:
        conn = await asyncio.get_running_loop().run_in_executor(thread, opened)
    except BaseException:
        thread.shutdown(wait=False)
        raise
    return Connection(conn, thread)

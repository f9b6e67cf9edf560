"""The SQLite driver under SQLAlchemy's asyncio engine: statements on the loop, waits on a thread.

Theory of operation. SQLAlchemy's asyncio engine runs its synchronous ORM and Core code in a
greenlet, and a driver suspends that greenlet (``await_``) wherever it must wait, so that the
event loop goes on meanwhile. aiosqlite's dialect suspends it for every call (cursor, execute,
fetch, close), each call a coroutine, a lock and a hop to aiosqlite's thread and back: about
80 us of two threads' time per call, four calls per statement. The first version of this driver
ran those calls on the loop but kept aiosqlite's interface, so each still went through
SQLAlchemy's async adapter (a greenlet switch to the loop and back, a coroutine, a lock): an IMAP
APPEND's five statements and commit cost 1.4-1.7 ms of the loop's CPU, against 0.5 ms for the
same statements through SQLAlchemy's plain synchronous sqlite3 driver (2026-12-05, second
session).

So this driver is the sqlite3 module itself under SQLAlchemy's own pysqlite dialect
(:class:`Dialect`, declared asynchronous so the asyncio engine takes it): a statement runs on
the loop as a plain sqlite3 call, with no greenlet switch; on the page cache it costs
microseconds, the same order as the Python that builds it and reads its rows. The greenlet is
suspended only for what can wait, which runs on a thread of the connection's own:

* opening a connection, and closing it;
* ``BEGIN IMMEDIATE`` when another connection holds the write lock (a CLI command, a
  migration): it waits up to the busy timeout. It is first tried on the loop with the busy
  timeout off, and a free lock (nearly always: one writer connection per process) is taken
  there at once;
* ``COMMIT`` (the connection's ``commit()``) of a transaction that may have written, which
  fsyncs the WAL (``synchronous=FULL``) and may run an automatic checkpoint; a reader's
  (deferred ``BEGIN``, no row changed) writes nothing and ends on the loop.

A write transaction therefore costs one thread hop whatever its statements (two when it waits
for the lock), and a read transaction none. Readers never wait for a lock in WAL mode, and
writers hold it from ``BEGIN IMMEDIATE`` on, so the statements in between never sleep on
``busy_timeout``. Large scans are bounded by their callers (batches, ``LIMIT``), as their rows'
Python processing on the loop already is.

Each connection has a thread of its own for its waits: a shared pool could fill with writers
waiting for the lock while the holder's ``COMMIT`` queues behind them (eight databases on one
file in one process did that: every waiter timed out). One connection is used by one task at a
time (SQLAlchemy's pool), so its thread never races the loop.

:class:`storage.db.Database` opens ``sqlite+aiosqlite://`` URLs (the configured form) with this
driver (:data:`DRIVERNAME`).
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Self, TypeVar

from sqlalchemy import pool
from sqlalchemy.dialects import registry
from sqlalchemy.dialects.sqlite.base import SQLiteExecutionContext
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite
from sqlalchemy.engine import URL
from sqlalchemy.util import await_

T = TypeVar("T")

DRIVERNAME = "sqlite+mailgate"

# Statements that can sleep (on a lock or a disk flush) rather than compute: run on a thread.
_WAITING = ("BEGIN IMMEDIATE", "BEGIN EXCLUSIVE", "COMMIT", "END", "VACUUM", "PRAGMA WAL_CHECKPOINT")


def _waits(sql: str) -> bool:
    return sql.lstrip()[:22].upper().startswith(_WAITING)


def _locks(sql: str) -> bool:
    """Whether ``sql`` takes the write lock and nothing else (see :meth:`Connection.lock_at_once`)."""
    return sql.lstrip()[:16].upper().startswith(("BEGIN IMMEDIATE", "BEGIN EXCLUSIVE"))


class StreamingCursor(sqlite3.Cursor):
    """sqlite3's cursor, its rows read as they are fetched (a server-side cursor: ``stream``); a
    statement that can wait suspends the caller for its connection's thread."""

    connection: Connection

    def execute(self, sql: str, parameters: Any = (), /) -> Self:
        connection = self.connection
        waits = _waits(sql)
        if not waits:
            super().execute(sql, parameters)
        elif not (_locks(sql) and connection.lock_at_once(self, sql)):
            connection.waiting(functools.partial(sqlite3.Cursor.execute, self, sql, parameters))
        if sql.lstrip()[:5].upper() == "BEGIN":
            connection.began(reading=not waits)
        return self


class Cursor(StreamingCursor):
    """A cursor whose rows are all read when its statement runs, as aiosqlite's adapter does: a
    result stays readable after its transaction ends and its connection serves another."""

    _rows: deque[Any]

    def execute(self, sql: str, parameters: Any = (), /) -> Self:
        super().execute(sql, parameters)
        self._rows = deque(super().fetchall() if self.description is not None else ())
        return self

    def executemany(self, sql: str, parameters: Any, /) -> Self:
        super().executemany(sql, parameters)
        self._rows = deque()
        return self

    def fetchone(self) -> Any:
        return self._rows.popleft() if self._rows else None

    def fetchmany(self, size: int | None = None) -> list[Any]:
        rows = self._rows
        return [rows.popleft() for _ in range(min(self.arraysize if size is None else size, len(rows)))]

    def fetchall(self) -> list[Any]:
        rows = list(self._rows)
        self._rows.clear()
        return rows

    async def _async_soft_close(self) -> None:
        """Called by SQLAlchemy's asyncio results on an async driver's cursor once they hold its
        statement's result: here its rows are read already, so there is nothing to release."""


class Connection(sqlite3.Connection):
    """sqlite3's connection with no transaction control of its own (``isolation_level`` None: the
    engine emits ``BEGIN`` itself), whose waits run on :attr:`thread` (see the module's docstring)."""

    thread: ThreadPoolExecutor  # this connection's waits, one at a time; set by connect()

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._reading = False  # the open transaction began deferred (a reader's)
        self._changes = 0  # rows changed through this connection when it began
        self._busy_ms: int | None = None  # the connection's busy timeout, read once

    def waiting(self, fn: Callable[[], T]) -> T:
        """``fn()`` on this connection's own thread, the caller's greenlet suspended meanwhile."""
        return await_(asyncio.get_running_loop().run_in_executor(self.thread, fn))

    def lock_at_once(self, cursor: sqlite3.Cursor, sql: str) -> bool:
        """Take the write lock on the loop if it is free; False if another connection holds it.

        The busy timeout is off for this one statement, so it fails at once instead of sleeping;
        the caller then waits for the lock on the thread. The lock is free nearly always (one
        writer connection per process): this saves an APPEND the two thread hand-offs of a
        ``BEGIN IMMEDIATE``, 0.3-0.6 ms while the blob writer works (2026-12-05).
        """
        if self._busy_ms is None:
            self._busy_ms = int(super().execute("PRAGMA busy_timeout").fetchone()[0])
        super().execute("PRAGMA busy_timeout = 0")
        try:
            sqlite3.Cursor.execute(cursor, sql)
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY:
                raise
            return False
        finally:
            super().execute(f"PRAGMA busy_timeout = {self._busy_ms}")
        return True

    def began(self, *, reading: bool) -> None:
        self._reading = reading
        self._changes = self.total_changes

    def cursor(self, factory: Any = Cursor) -> StreamingCursor:  # type: ignore[override]
        cursor: StreamingCursor = super().cursor(factory)
        return cursor

    def commit(self) -> None:
        if not self.in_transaction:
            return
        if self._reading and self.total_changes == self._changes:
            super().commit()  # nothing to flush
        else:
            self.waiting(functools.partial(sqlite3.Connection.commit, self))

    def close(self) -> None:
        try:
            self.waiting(functools.partial(sqlite3.Connection.close, self))
        finally:
            self.thread.shutdown(wait=False)

    def stop(self) -> None:
        """Close at once (SQLAlchemy's terminate, when a graceful close is impossible)."""
        try:
            super().close()
        finally:
            self.thread.shutdown(wait=False)


class _Module:
    """The sqlite3 module as the dialect's DB-API, whose ``connect`` opens a :class:`Connection`."""

    def __getattr__(self, name: str) -> Any:
        return getattr(sqlite3, name)

    @staticmethod
    def connect(database: str, *_: Any, **__: Any) -> Connection:
        """Open ``database`` (a path or ``:memory:``) on the connection's thread."""
        thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")

        # check_same_thread: the waits run on the connection's thread (never at the same time as the loop).
        def opening() -> Connection:
            return Connection(database, isolation_level=None, check_same_thread=False)

        try:
            conn = await_(asyncio.get_running_loop().run_in_executor(thread, opening))
        except BaseException:
            thread.shutdown(wait=False)
            raise
        conn.thread = thread
        return conn


class _ExecutionContext(SQLiteExecutionContext):
    def create_server_side_cursor(self) -> Any:
        return self._dbapi_connection.cursor(StreamingCursor)


class Dialect(SQLiteDialect_pysqlite):
    """SQLAlchemy's pysqlite dialect over :class:`_Module`, for the asyncio engine."""

    driver = "mailgate"
    is_async = True
    has_terminate = True
    supports_statement_cache = True
    supports_server_side_cursors = True
    execution_ctx_cls = _ExecutionContext

    @classmethod
    def import_dbapi(cls) -> Any:
        return _Module()

    @classmethod
    def get_pool_class(cls, url: URL) -> type[pool.Pool]:
        return pool.AsyncAdaptedQueuePool if cls._is_url_file_db(url) else pool.StaticPool

    def do_terminate(self, dbapi_connection: Any) -> None:
        dbapi_connection.stop()


registry.register(DRIVERNAME.replace("+", "."), __name__, "Dialect")

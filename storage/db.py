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

Hot statements: SQLAlchemy's execution of a cached statement costs 50-100 us of the loop's
CPU (the session, the execution context, the result) where sqlite3 runs it in 4 us; a message
goes through a few such statements every time (UIDs and usage, the message row, the queue's
bookkeeping). :class:`Prepared` compiles one of those once and, on SQLite, runs it on the
transaction's sqlite3 connection itself; on PostgreSQL it goes through the session as any other.

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
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

from sqlalchemy import event
from sqlalchemy.engine import Connection, CursorResult, Dialect, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.sql import Executable
from sqlalchemy.sql.dml import UpdateBase
from sqlalchemy.sql.selectable import Select

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


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a :class:`Prepared` statement returned: its rows (RETURNING or SELECT) and the rows it changed."""

    rows: list[tuple[Any, ...]]
    rowcount: int


@dataclass(frozen=True, slots=True)
class _Plan:
    """A statement compiled for SQLite for one set of parameter names."""

    sql: str
    compiled: Any  # SQLCompiler: construct_params() fills in the statement's own literals
    binds: tuple[tuple[str, Callable[[Any], Any] | None], ...]  # positional names and their processors
    results: tuple[Callable[[Any], Any] | None, ...]  # per returned column


async def rows_changed(s: AsyncSession, statement: Executable) -> int:
    """Execute an INSERT, UPDATE or DELETE through the session; how many rows it changed."""
    return cast(CursorResult[Any], await s.execute(statement)).rowcount


_CONNECTION = "mailgate.prepared.connection"  # Session.info: (innermost transaction, its connection)


class Prepared:
    """A Core statement on tables (not ORM entities) run for every message: compiled once, and on
    SQLite run by sqlite3 on the transaction's connection (see the module's docstring).

    It behaves as ``session.execute`` does for such a statement: it neither flushes the session
    nor touches its objects; parameters and returned values go through their columns' types as
    the dialect adapts them (a datetime is stored as SQLAlchemy stores it); a database error is
    SQLAlchemy's (``IntegrityError``, ...); the statement is counted (:class:`Activity`). A
    statement whose columns would need Python-side defaults for the parameters given goes through
    the session, which fills them in.
    """

    def __init__(self, statement: Select[Any] | UpdateBase) -> None:
        self.statement = statement
        self._plans: dict[tuple[str, ...], _Plan | None] = {}

    async def run(self, s: AsyncSession, params: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> Outcome:
        """Execute with ``params``, or once per mapping of a sequence of them (rows in that order)."""
        sets = [params] if isinstance(params, Mapping) else params
        conn = await self._connection(s)
        plans = self._plans_for(conn.dialect, sets)
        if plans is None:
            result = cast(CursorResult[Any], await s.execute(self.statement, params))
            return Outcome(
                [tuple(row) for row in result.all()] if result.returns_rows else [], result.rowcount
            )
        rows: list[tuple[Any, ...]] = []
        changed = 0
        # sqlite3's own cursor: these statements never wait (the driver's cursor is for those that may).
        cursor = sqlite3.Connection.cursor(cast(sqlite3.Connection, conn.connection.driver_connection))
        try:
            for plan, one in zip(plans, sets, strict=True):
                given = plan.compiled.construct_params(one)
                values = [given[n] if process is None else process(given[n]) for n, process in plan.binds]
                conn.dispatch.before_cursor_execute(conn, cursor, plan.sql, values, None, False)
                try:
                    cursor.execute(plan.sql, values)
                except sqlite3.Error as exc:
                    raise DBAPIError.instance(
                        plan.sql, values, exc, sqlite3.Error, dialect=conn.dialect
                    ) from exc
                for row in cursor.fetchall():
                    rows.append(
                        tuple(v if p is None else p(v) for p, v in zip(plan.results, row, strict=True))
                    )
                changed += max(cursor.rowcount, 0)
        finally:
            cursor.close()
        return Outcome(rows, changed)

    @staticmethod
    async def _connection(s: AsyncSession) -> Connection:
        """The session's connection, asked of the session once per transaction or SAVEPOINT: asking
        costs a greenlet switch and the session's bookkeeping (20 us), and it is what emits the
        SAVEPOINT of a nested transaction that has not used the connection yet."""
        sync = s.sync_session
        info = sync.info
        known = info.get(_CONNECTION)
        if known is not None and known[0] is (sync.get_nested_transaction() or sync.get_transaction()):
            conn: Connection = known[1]
            return conn
        conn = (await s.connection()).sync_connection  # type: ignore[assignment]
        info[_CONNECTION] = (sync.get_nested_transaction() or sync.get_transaction(), conn)
        return conn

    def _plans_for(self, dialect: Dialect, sets: Sequence[Mapping[str, Any]]) -> list[_Plan] | None:
        """A plan per parameter set; None when SQLAlchemy must run the statement (not SQLite, no
        parameters, or defaults to fill in)."""
        if dialect.driver != sqlite_driver.Dialect.driver or not sets:
            return None
        plans = []
        for one in sets:
            plan = self._plan(dialect, tuple(one))
            if plan is None:
                return None
            plans.append(plan)
        return plans

    def _plan(self, dialect: Dialect, names: tuple[str, ...]) -> _Plan | None:
        try:
            return self._plans[names]
        except KeyError:
            pass
        compiled = self.statement.compile(dialect=dialect, column_keys=list(names))
        plan = None
        if not (compiled.insert_prefetch or compiled.update_prefetch):
            binds = tuple(
                (name, compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect))
                for name in compiled.positiontup or ()
            )
            returned = self.statement.exported_columns
            results = tuple(c.type.dialect_impl(dialect).result_processor(dialect, None) for c in returned)
            plan = _Plan(str(compiled), compiled, binds, results)
        self._plans[names] = plan
        return plan


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

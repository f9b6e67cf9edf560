"""storage.sqlite_driver: statements and a free write lock on the loop; a held lock, a commit on a thread.

SQLite only (the driver is SQLite's): which thread runs each statement, that a
writer waiting for another process' lock leaves the loop running, and that a
commit is durable and visible to the readers.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import event, select, text, update

from gateway.config import parse_config
from gateway.daemon import open_store
from storage import mailstore
from storage.db import Database
from storage.models import Folder
from tests.conftest import config_dict


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    config = parse_config(config_dict(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'mailgate.db'}"))
    database, _ = await open_store(config)
    yield database
    await database.close()


async def record_threads(db: Database) -> list[tuple[str, bool]]:
    """(statement's first word, ran on this thread) for every statement the engines send from now on."""
    loop_thread = threading.get_ident()
    seen: list[tuple[str, bool]] = []

    def trace(conn: sqlite3.Connection) -> None:
        def statement(sql: str) -> None:
            seen.append((sql.split()[0].upper(), threading.get_ident() == loop_thread))

        conn.set_trace_callback(statement)

    for engine in (db.writer, db.reader):
        event.listen(engine.sync_engine, "connect", lambda dbapi, _rec: trace(dbapi))
        await engine.dispose()  # connections opened from now on are traced
    return seen


async def test_reads_and_a_free_write_lock_run_on_the_loop_and_a_write_hops_only_for_its_commit(
    db: Database,
) -> None:
    """Since 2026-12-05 a free write lock is taken on the loop (BEGIN IMMEDIATE with the busy
    timeout off for it): the lock's thread hops cost an APPEND 0.3-0.6 ms."""
    seen = await record_threads(db)
    async with db.read() as s:
        folder = await mailstore.get_folder(s, "acme", "INBOX")
    assert folder is not None
    reads = list(seen)
    assert ("SELECT", True) in reads
    assert all(on_loop for _, on_loop in reads), reads

    seen.clear()

    async def bump(s):  # type: ignore[no-untyped-def]
        await s.execute(update(Folder).where(Folder.id == folder.id).values(subscribed=True))

    await db.grouped(bump)
    off_loop = [word for word, on_loop in seen if not on_loop]
    assert off_loop == ["COMMIT"], seen  # the commit's fsync
    assert ("BEGIN", True) in seen
    assert ("UPDATE", True) in seen


async def test_a_writer_waiting_for_another_process_lock_leaves_the_loop_running(
    db: Database, tmp_path: Path
) -> None:
    """Another process (here a plain sqlite3 connection) holds the write lock for a while: the loop keeps
    serving while mailgate's writer waits for it, and the write lands once the lock is free."""
    other = sqlite3.connect(tmp_path / "mailgate.db", isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    held = 0.6
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    async def mark(s):  # type: ignore[no-untyped-def]
        await s.execute(update(Folder).where(Folder.name == "INBOX").values(subscribed=False))

    ticking = asyncio.create_task(ticker())
    release = asyncio.get_running_loop().call_later(held, other.commit)
    started = time.monotonic()
    try:
        await asyncio.wait_for(db.grouped(mark), 30)
    finally:
        release.cancel()
        ticking.cancel()
        other.close()
    assert time.monotonic() - started >= held * 0.9  # it really waited for the lock
    assert ticks >= held / 0.01 / 3  # and the loop ran meanwhile
    async with db.read() as s:
        assert await s.scalar(select(Folder.subscribed).where(Folder.name == "INBOX")) is False


async def test_a_commit_is_on_disk_before_the_write_returns(db: Database, tmp_path: Path) -> None:
    async def rename(s):  # type: ignore[no-untyped-def]
        await s.execute(update(Folder).where(Folder.name == "INBOX").values(uidvalidity=424242))

    await db.grouped(rename)
    with sqlite3.connect(tmp_path / "mailgate.db") as fresh:  # another connection: only what was committed
        assert fresh.execute("SELECT uidvalidity FROM folders WHERE name = 'INBOX'").fetchone() == (424242,)


async def test_a_failing_statement_raises_and_the_connection_stays_usable(db: Database) -> None:
    with pytest.raises(Exception, match="no such table"):
        async with db.read() as s:
            await s.execute(text("SELECT * FROM no_such_table"))
    async with db.read() as s:
        assert await s.scalar(text("SELECT 1")) == 1


async def test_writers_of_eight_databases_on_one_file_never_starve_the_holders_commit(
    db: Database, tmp_path: Path
) -> None:
    """Regression (CI 2026-12-04, test_no_two_holders_under_concurrent_acquire[sqlite]): the waits ran
    on the loop's shared thread pool (6 threads here), eight writers waiting for the lock filled it,
    and the holder's COMMIT queued behind them until every wait timed out ("database is locked").
    Each connection now waits on a thread of its own."""
    others = [Database(db.url) for _ in range(7)]

    def bump(s):  # type: ignore[no-untyped-def]
        return s.execute(
            update(Folder).where(Folder.name == "INBOX").values(uidvalidity=Folder.uidvalidity + 1)
        )

    async def writes(database: Database) -> None:
        for _ in range(5):
            await database.grouped(bump)

    try:
        async with db.read() as s:
            before = await s.scalar(select(Folder.uidvalidity).where(Folder.name == "INBOX"))
        await asyncio.wait_for(asyncio.gather(*(writes(d) for d in [db, *others])), 60)
        async with db.read() as s:
            assert await s.scalar(select(Folder.uidvalidity).where(Folder.name == "INBOX")) == before + 40
    finally:
        for other in others:
            await other.close()

"""Database.grouped: concurrent writers share one commit; one that fails is undone alone."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import event, select, update

from gateway.config import parse_config
from gateway.daemon import open_store
from storage import mailstore
from storage.db import Database
from storage.models import Folder
from tests.conftest import config_dict


@pytest.fixture
async def db(tmp_path: Path, db_url: str) -> AsyncIterator[Database]:
    config = parse_config(config_dict(tmp_path, db_url))
    database, _ = await open_store(config)
    yield database
    await database.close()


async def test_concurrent_writers_share_one_commit_and_a_failure_is_undone_alone(db: Database) -> None:
    async with db.read() as s:
        folder = await mailstore.get_folder(s, "acme", "INBOX")
    assert folder is not None
    commits: list[int] = []
    event.listen(db.writer.sync_engine, "commit", lambda conn: commits.append(1))

    def bump(n: int, fail: bool = False):  # type: ignore[no-untyped-def]
        async def fn(s):  # type: ignore[no-untyped-def]
            await s.execute(
                update(Folder).where(Folder.id == folder.id).values(uidvalidity=Folder.uidvalidity + n)
            )
            if fail:
                raise ValueError("refused")
            return n

        return fn

    before = folder.uidvalidity
    results = await asyncio.gather(
        db.grouped(bump(1)), db.grouped(bump(10, fail=True)), db.grouped(bump(100)), return_exceptions=True
    )
    assert results[0] == 1
    assert isinstance(results[1], ValueError)
    assert results[2] == 100
    assert len(commits) == 1, commits
    async with db.read() as s:
        after = await s.scalar(select(Folder.uidvalidity).where(Folder.id == folder.id))
    assert after == before + 101


async def test_a_writer_alone_in_its_transaction_is_undone_when_it_fails(db: Database) -> None:
    """A lone function runs without a SAVEPOINT (2026-12-04, issue #13's APPEND): its failure must
    roll its writes back all the same, reach its caller, and leave the next writer a clean start."""
    async with db.read() as s:
        folder = await mailstore.get_folder(s, "acme", "INBOX")
    assert folder is not None
    statements: list[str] = []
    event.listen(db.writer.sync_engine, "before_cursor_execute", lambda *a: statements.append(a[2]))

    async def bump_then_fail(s):  # type: ignore[no-untyped-def]
        await s.execute(
            update(Folder).where(Folder.id == folder.id).values(uidvalidity=Folder.uidvalidity + 7)
        )
        raise ValueError("refused")

    async def bump(s):  # type: ignore[no-untyped-def]
        await s.execute(
            update(Folder).where(Folder.id == folder.id).values(uidvalidity=Folder.uidvalidity + 1)
        )
        return "done"

    with pytest.raises(ValueError, match="refused"):
        await db.grouped(bump_then_fail)
    assert await db.grouped(bump) == "done"
    assert not [s for s in statements if "SAVEPOINT" in s.upper()], statements
    async with db.read() as s:
        after = await s.scalar(select(Folder.uidvalidity).where(Folder.id == folder.id))
    assert after == folder.uidvalidity + 1


async def test_activity_counts_each_statement_and_each_commit(db: Database) -> None:
    """What ``mailgate_db_statements_total`` and ``mailgate_db_commits_total`` report."""
    before = (db.activity.statements, db.activity.commits)

    async def touch(s):  # type: ignore[no-untyped-def]
        await s.execute(select(Folder.id).limit(1))
        await s.execute(select(Folder.name).limit(1))

    await asyncio.gather(*(db.grouped(touch) for _ in range(3)))
    async with db.read() as s:
        await s.execute(select(Folder.id).limit(1))
    statements = db.activity.statements - before[0]
    commits = db.activity.commits - before[1]
    # 3 x 2 statements, 1 read, plus the savepoints and BEGINs the dialect sends itself; the
    # group commits once, the read transaction commits as it ends.
    assert statements >= 7
    assert commits in (2, 3), commits  # the group may take two commits if a writer came late


async def test_a_cancelled_caller_does_not_cut_the_transaction_off(db: Database) -> None:
    async with db.read() as s:
        folder = await mailstore.get_folder(s, "acme", "INBOX")
    assert folder is not None
    started = asyncio.Event()

    async def slow(s):  # type: ignore[no-untyped-def]
        started.set()
        await asyncio.sleep(0.2)
        await s.execute(update(Folder).where(Folder.id == folder.id).values(uidvalidity=4242))

    task = asyncio.create_task(db.grouped(slow))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await db.grouped(lambda s: asyncio.sleep(0))  # queued behind it: runs once it committed
    async with db.read() as s:
        assert await s.scalar(select(Folder.uidvalidity).where(Folder.id == folder.id)) == 4242

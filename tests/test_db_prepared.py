"""storage.db.Prepared: a hot statement run by sqlite3 itself behaves as session.execute would.

On both backends (PostgreSQL goes through the session): parameters through their
columns' types and back, rows in the order of the parameter sets, rows changed,
SQLAlchemy's errors, defaults filled in, statements counted, and a SAVEPOINT's
rollback undoing it.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from storage.blobs import BlobStore
from storage.db import Database, Prepared
from storage.models import Base, OutboundLog

LOG = Base.metadata.tables["outbound_log"]
INSERT = Prepared(insert(LOG).returning(LOG.c.id, LOG.c.at, sort_by_parameter_order=True))
RENAME = Prepared(update(LOG).where(LOG.c.queue_id == bindparam("old")).values(queue_id=bindparam("new")))
AT = datetime(2026, 12, 5, 9, 30, 15, 123456, tzinfo=UTC)


@pytest.fixture
def db(store: tuple[Database, BlobStore]) -> Database:
    return store[0]


def row(queue_id: str, event: str = "queued") -> dict[str, object]:
    return {"queue_id": queue_id, "tenant_id": "acme", "at": AT, "event": event}


async def test_rows_come_back_in_order_through_their_types_and_changes_are_counted(db: Database) -> None:
    before = db.activity.statements
    async with db.write() as s:
        inserted = await INSERT.run(s, [row("q1"), row("q2"), row("q3")])
        renamed = await RENAME.run(s, {"old": "q2", "new": "q2b"})
    assert [at for _, at in inserted.rows] == [AT, AT, AT]  # a datetime again, not SQLite's text
    ids = [id_ for id_, _ in inserted.rows]
    assert ids == sorted(ids)
    assert len(set(ids)) == 3
    assert renamed.rowcount == 1
    assert db.activity.statements - before >= 2  # counted like any statement (4 on SQLite: one per row)
    async with db.read() as s:
        stored = (await s.execute(select(OutboundLog).order_by(OutboundLog.id))).scalars().all()
    assert [(r.id, r.queue_id, r.at) for r in stored] == [
        (ids[0], "q1", AT),
        (ids[1], "q2b", AT),
        (ids[2], "q3", AT),
    ]


async def test_a_default_not_given_is_filled_in_as_the_session_does(db: Database) -> None:
    """``id`` comes from the database; a column with a Python-side default goes through the session."""
    tenants = Base.metadata.tables["tenants"]
    add = Prepared(insert(tenants))
    async with db.write() as s:
        await add.run(s, {"id": "newco"})  # name, active, usage: Python-side defaults
    async with db.read() as s:
        name, active, used = (
            await s.execute(
                select(tenants.c.name, tenants.c.active, tenants.c.used_bytes).where(tenants.c.id == "newco")
            )
        ).one()
    assert (name, active, used) == ("", True, 0)


async def test_a_constraint_violation_is_sqlalchemys_error_and_is_undone_alone(db: Database) -> None:
    async def good(s):  # type: ignore[no-untyped-def]
        return (await INSERT.run(s, row("ok"))).rows[0][0]

    async def bad(s):  # type: ignore[no-untyped-def]
        await INSERT.run(s, row("half"))  # undone with its SAVEPOINT
        await INSERT.run(s, {**row("bad"), "tenant_id": "no-such-tenant"})  # foreign key

    results = await asyncio.gather(
        db.grouped(good), db.grouped(bad), db.grouped(good), return_exceptions=True
    )
    assert isinstance(results[1], IntegrityError), results
    assert isinstance(results[0], int)
    assert isinstance(results[2], int)
    async with db.read() as s:
        kept = (await s.execute(select(LOG.c.queue_id))).scalars().all()
    assert sorted(kept) == ["ok", "ok"]


async def test_each_transaction_asks_for_its_own_connection(db: Database) -> None:
    """The connection is remembered per transaction: a session's next transaction must not reuse
    the connection of one it rolled back."""
    async with AsyncSession(db.writer) as s:
        async with s.begin():
            await INSERT.run(s, row("first"))
        transaction = await s.begin()
        await INSERT.run(s, row("second"))
        await transaction.rollback()
        async with s.begin():
            await INSERT.run(s, row("third"))
    async with db.read() as s:
        kept = (await s.execute(select(LOG.c.queue_id))).scalars().all()
    assert sorted(kept) == ["first", "third"]


async def test_writers_racing_through_group_commit_each_get_their_own_row(db: Database) -> None:
    """Writers racing through group commit: every row lands once, with its own id."""

    async def one(i: int):  # type: ignore[no-untyped-def]
        return await db.grouped(lambda s: INSERT.run(s, row(f"r{i}")))

    outcomes = await asyncio.gather(*(one(i) for i in range(20)))
    assert len({o.rows[0][0] for o in outcomes}) == 20
    async with db.read() as s:
        assert len((await s.execute(select(LOG.c.id))).all()) == 20

"""Claiming due messages (storage.queue.due) with a backlog: the rows claimed, in due order, and no more."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import event

from gateway.config import parse_config
from gateway.daemon import open_store
from gateway.relay import worker
from storage import queue
from storage.models import Outbound
from tests.conftest import config_dict


async def test_a_claim_pass_loads_only_the_rows_it_claims(tmp_path: Path, db_url: str) -> None:
    """Regression (issue #16): with a backlog, every claiming pass built an ORM row for each of up to 200
    due messages to claim the one or two there was room for (a relay bench spent ~5 % of its loop there)."""
    db, _ = await open_store(parse_config(config_dict(tmp_path, db_url)))
    start = datetime.now(UTC) - timedelta(minutes=1)
    loaded: list[int] = []

    def on_load(target: Outbound, _context: object) -> None:
        loaded.append(target.id)

    event.listen(Outbound, "load", on_load)
    try:
        async with db.write() as s:
            for i in range(50):
                await queue.enqueue(
                    s,
                    tenant_id="acme",
                    mail_from="biuro@acme.test",
                    recipients=[f"c{i}@example.org"],
                    blob="x",
                    size=1,
                    now=start + timedelta(seconds=i),
                )
        loaded.clear()
        now = datetime.now(UTC)
        args = {"claim_for": worker.CLAIM, "concurrency": {"acme": 3}}
        async with db.write() as s:
            taken = await queue.due(s, now, instance="i1", **args)
        assert [q.pending for q in taken] == [("c0@example.org",), ("c1@example.org",), ("c2@example.org",)]
        assert len(loaded) == 3, loaded
        async with db.write() as s:
            assert await queue.due(s, now, instance="i1", **args) == []  # no room left: nothing more
        async with db.write() as s:
            await queue.unclaim(s, taken[1].row, "i1")
        async with db.write() as s:
            (again,) = await queue.due(s, now, instance="i1", **args)
        assert again.pending == ("c1@example.org",)  # the oldest due message there is room for
    finally:
        event.remove(Outbound, "load", on_load)
        await db.close()

"""Cluster-wide jobs (storage.jobs): two instances on one database, over a day of fake clock.

Done-means 4 of issue #15: exactly one snapshot, one purge run per period and
one quota notice per crossing exist, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway.config import parse_config
from gateway.scheduler import Scheduler
from storage import jobs, snapshots
from tests.conftest import config_dict
from tests.test_quotas import HASH, NOW, Env, mail


@pytest.fixture
async def two(tmp_path: Path, db_url: str) -> AsyncIterator[tuple[Env, Env]]:
    from gateway.daemon import open_store

    data = config_dict(tmp_path, db_url, quota="1 MB")
    data["tenants"][0]["agents"] = [{"login": "anna@acme.test", "password_hash": HASH}]
    data["snapshots"] = {"dir": str(tmp_path / "snapshots"), "keep": 30}
    envs = []
    stores = []
    clock = [NOW]
    for name in ("mg1", "mg2"):
        config = parse_config({**data, "gateway": {**data["gateway"], "instance": name}})
        db, blobs = await open_store(config)
        stores.append((db, blobs))
        envs.append(Env(config, db, blobs, clock))  # one clock: the instances' clocks agree
    yield envs[0], envs[1]
    for db, blobs in stores:
        await blobs.close()
        await db.close()


async def test_claim_is_won_once_and_taken_over_only_from_a_dead_holder(db_url: str, tmp_path: Path) -> None:
    from gateway.daemon import open_store

    db, blobs = await open_store(parse_config(config_dict(tmp_path, db_url)))
    try:
        stale = timedelta(hours=1)

        async def claim(instance: str, at: Any) -> bool:
            async with db.write() as s:
                return await jobs.claim(s, "snapshot", "2026-06-01", instance, at, stale)

        won = await asyncio.gather(claim("mg1", NOW), claim("mg2", NOW))
        assert sorted(won) == [False, True]
        assert not await claim("mg3", NOW + timedelta(minutes=59))  # its holder may still be at it
        assert await claim("mg3", NOW + timedelta(minutes=61))  # its holder died: taken over
        async with db.write() as s:
            await jobs.finish(s, "snapshot", "2026-06-01", NOW + timedelta(minutes=70))
        assert not await claim("mg1", NOW + timedelta(days=1))  # done: never again
    finally:
        await blobs.close()
        await db.close()


async def test_over_a_day_two_instances_take_one_snapshot_one_purge_an_hour_and_warn_once(
    two: tuple[Env, Env], db_url: str
) -> None:
    a, b = two
    for n in range(4):  # 4 x ~200 KB and 150 KB of a 1 MB quota: over 80 % and 95 %
        await a.deliver(mail(n, 200_000))
    await a.deliver(mail(9, 150_000))
    instances: tuple[Scheduler, Scheduler] = (a.scheduler, b.scheduler)
    warned = 0
    snapshot_day = NOW.astimezone().date().isoformat()
    for hour in range(24):
        a.clock[0] = NOW + timedelta(hours=hour)
        results = await asyncio.gather(*(s.hourly_purge() for s in instances))
        assert results == [None, None]
        warned += sum(await asyncio.gather(*(s.quota_warnings() for s in instances)))
        for s in instances:
            await s.once("snapshot", snapshot_day, timedelta(hours=6), s.snapshot)
    async with a.db.read() as s:
        purges = await jobs.runs(s, "spam-purge")
        taken = await jobs.runs(s, "snapshot")
    assert len(purges) == 24
    assert len({r.period for r in purges}) == 24
    assert all(r.finished_at is not None for r in purges)
    assert len(taken) == 1
    assert len(snapshots.listing(a.config.snapshots.dir)) == 1
    assert warned == 2  # 80 % and 95 %, each once, though both instances looked every hour
    assert len(await a.rows("INBOX")) == 5 + 2

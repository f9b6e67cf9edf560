"""Cancelling a task never leaves the database locked (the daemon's 30-second stop, CI of 2026-12-03).

On SQLite, a write transaction cut off by cancellation while other writers
wait could leave an orphaned connection holding the write lock: the next
writer (at shutdown, deleting the instance's row) waited out the 30-second
busy timeout. Shutdown cancels the relay worker's loop, the scheduler, the
heartbeats and the pullers; each runs its writes through
``Database.transaction`` or ``uninterrupted``. Each case below cancels at
random points (bounded: 400 rounds) with other writers queued, and the next
write must go through at once.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.config import parse_config
from gateway.daemon import open_store
from gateway.ingest import Pipeline
from gateway.relay.worker import RelayWorker
from gateway.smtp.outbox import Outbox
from storage.db import Database
from tests.conftest import config_dict, free_port

ROUNDS = 400


async def _insert(s: AsyncSession) -> None:
    await s.execute(text("INSERT INTO probe VALUES (1)"))
    await s.execute(text("SELECT count(*) FROM probe"))


async def _cancel_at_random(
    db: Database,
    victim: Callable[[], Awaitable[object]],
    before: Callable[[], Awaitable[object]] | None = None,
) -> None:
    """Each round: ``before()``, then ``victim`` beside two queued writers, cancelled at a random
    point; then the next write must go through at once."""
    rng = random.Random(7)
    for _ in range(ROUNDS):
        if before is not None:
            await before()
        others = [asyncio.create_task(db.transaction(_insert)) for _ in range(2)]
        task = asyncio.ensure_future(victim())
        for _ in range(rng.randint(0, 40)):
            await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, *others, return_exceptions=True)
        async with asyncio.timeout(5):  # the busy timeout is 30 s: a leaked lock shows here
            await db.transaction(_insert)


async def _probe_table(db: Database) -> None:
    async with db.write() as s:
        await s.execute(text("CREATE TABLE IF NOT EXISTS probe (x integer)"))


async def test_a_cancelled_transaction_never_leaves_the_database_locked(tmp_path: Path, db_url: str) -> None:
    db = Database(db_url)
    try:
        await _probe_table(db)
        await _cancel_at_random(db, lambda: db.transaction(_insert))
    finally:
        await db.close()


async def test_cancelling_the_relay_loop_mid_pass_leaves_no_lock(tmp_path: Path, db_url: str) -> None:
    """The defect itself: shutdown cancelled ``RelayWorker.run`` inside its claiming transaction."""
    data = config_dict(tmp_path, db_url)
    data["tenants"][0]["smtp"] = {"host": "127.0.0.1", "port": free_port(), "from": "biuro@acme.test"}
    config = parse_config(data)
    db, blobs = await open_store(config)
    try:
        await _probe_table(db)
        pipeline = Pipeline(db, blobs)
        worker = RelayWorker(lambda: config, db, blobs, pipeline)
        outbox = Outbox(db, blobs, pipeline.changes, worker.wake.set)
        tenant = config.tenant("acme")
        message = b"From: biuro@acme.test\r\nTo: c@example.org\r\nSubject: x\r\n\r\nx\r\n"

        async def queue() -> None:
            await outbox.submit(tenant, None, "biuro@acme.test", ["c@example.org"], message)

        await _cancel_at_random(db, worker.run, before=queue)
        await worker.drain()
    finally:
        await db.close()


async def test_a_wake_just_before_the_stop_never_keeps_the_relay_loop_running(
    tmp_path: Path, db_url: str
) -> None:
    """Regression (2026-12-05): a daemon did not stop within 30 s of SIGTERM. Its wake loops
    waited with ``asyncio.wait_for(event.wait(), poll)``, which in Python 3.11 returns instead of
    raising when the task is cancelled in the loop iteration its event was set: the loop went on
    and the shutdown waited for it forever. They now wait with ``asyncio.timeout``."""
    config = parse_config(config_dict(tmp_path, db_url))
    db, blobs = await open_store(config)
    try:
        worker = RelayWorker(lambda: config, db, blobs, Pipeline(db, blobs))
        for spins in range(30):
            task = asyncio.create_task(worker.run())
            await asyncio.sleep(0.02)  # its pass is done (nothing queued): it waits for a wake-up
            worker.wake.set()
            for _ in range(spins % 6):
                await asyncio.sleep(0)
            task.cancel()
            done, _ = await asyncio.wait([task], timeout=5)
            assert done, f"the relay loop went on after its cancellation, {spins % 6} iterations after a wake"
        await worker.drain()
    finally:
        await db.close()

"""Cluster-wide jobs: each periodic job runs once per period for all the instances on a database.

Theory of operation
-------------------
A run of a job for a period (the snapshot of one day, the spam purge of one
hour) is claimed by inserting its row into ``job_runs``: the primary key
(job, period) lets one insert win, and only the instance whose insert won
runs it, recording ``finished_at`` when done. A claim whose holder has not
finished within ``stale`` (the holder died in the middle) is taken over by a
conditional update, so a period is never lost for good, and never run twice
while its holder lives. Jobs that run every minute and must not interleave
(quota warnings) serialise instead with :func:`serialised`: a transaction-level
advisory lock on PostgreSQL (SQLite's writers are serialised already).
"""

from __future__ import annotations

import zlib
from datetime import datetime, timedelta

from sqlalchemy import delete, insert, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from storage.db import rows_changed
from storage.models import JobRun

KEEP = timedelta(days=30)  # finished runs are remembered this long


async def claim(
    s: AsyncSession, job: str, period: str, instance: str, now: datetime, stale: timedelta
) -> bool:
    """True when this instance is to run ``job`` for ``period`` (nobody has, or its holder died)."""
    try:
        async with s.begin_nested():
            await s.execute(insert(JobRun).values(job=job, period=period, instance=instance, started_at=now))
    except IntegrityError:
        pass
    else:
        return True
    taken = await rows_changed(
        s,
        update(JobRun)
        .where(
            JobRun.job == job,
            JobRun.period == period,
            JobRun.finished_at.is_(None),
            JobRun.started_at < now - stale,
        )
        .values(instance=instance, started_at=now),
    )
    return bool(taken)


async def finish(s: AsyncSession, job: str, period: str, now: datetime) -> None:
    """Record the run as done, and forget runs older than :data:`KEEP`."""
    await s.execute(update(JobRun).where(JobRun.job == job, JobRun.period == period).values(finished_at=now))
    await s.execute(delete(JobRun).where(JobRun.started_at < now - KEEP))


async def runs(s: AsyncSession, job: str) -> list[JobRun]:
    """The remembered runs of a job, oldest first."""
    return list((await s.scalars(select(JobRun).where(JobRun.job == job).order_by(JobRun.started_at))).all())


async def serialised(s: AsyncSession, name: str) -> None:
    """Hold a cluster-wide lock named ``name`` until this transaction ends (PostgreSQL)."""
    if (await s.connection()).dialect.name == "postgresql":
        await s.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": zlib.crc32(name.encode())})

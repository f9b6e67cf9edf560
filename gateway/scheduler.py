"""Jobs the daemon runs on its own: quota warnings, the spam purge, the daily snapshot.

Each job runs on a timer in one task; a failing job is logged and tried
again at its next time, never taking the daemon down. Nothing depends on
anyone logging in.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime, make_msgid

import structlog

import quotas
from gateway import metrics
from gateway.config import Config
from gateway.ingest import Delivery, Pipeline
from storage import retention, snapshots
from storage.blobs import BlobStore
from storage.db import Database

log = structlog.get_logger(__name__)

QUOTA_EVERY = 60.0
PURGE_EVERY = 3600.0


def _human(n: int) -> str:
    for unit, factor in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= factor:
            return f"{n / factor:.1f} {unit}"
    return f"{n} B"


def quota_notice(hostname: str, warning: quotas.QuotaWarning, now: datetime) -> bytes:
    """The message telling a tenant it is filling up."""
    u = warning.usage
    what = f"folder {u.folder}" if u.folder else "mailbox"
    again = " (still)" if warning.repeated else ""
    subject = f"Quota warning: {what} {u.percent:.0f}% full{again}"
    body = f"The {what} uses {_human(u.used)} of {_human(u.limit)} ({u.percent:.0f}%).\r\n\r\n" + (
        "It is full: new mail is deferred (senders retry) and upstream mail\r\n"
        "waits upstream until space is freed.\r\n"
        if u.level >= 100
        else "When it is full, new mail will be deferred until space is freed. Spam does not count.\r\n"
    )
    return (
        f"From: mailgate <mailgate@{hostname}>\r\nTo: {u.tenant_id}\r\nSubject: {subject}\r\n"
        f"Date: {format_datetime(now)}\r\nMessage-ID: {make_msgid(domain=hostname)}\r\n"
        "Auto-Submitted: auto-generated\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + body
    ).encode("utf-8")


class Scheduler:
    """Runs the periodic jobs until cancelled."""

    def __init__(
        self,
        config: Callable[[], Config],
        db: Database,
        blobs: BlobStore,
        pipeline: Pipeline,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.config = config
        self.db = db
        self.blobs = blobs
        self.pipeline = pipeline
        self.clock = clock or (lambda: datetime.now(UTC))
        self.last_snapshot: datetime | None = None
        self._rescheduled = asyncio.Event()

    async def quota_warnings(self) -> int:
        """Deliver due quota warnings; how many."""
        now = self.clock()
        async with self.db.write() as s:
            due = await quotas.warnings(s, now)
        config = self.config()
        for warning in due:
            u = warning.usage
            log.warning("quota.warning", tenant=u.tenant_id, folder=u.folder, percent=round(u.percent, 1))
            with contextlib.suppress(KeyError):
                tenant = config.tenant(u.tenant_id)
                message = quota_notice(config.gateway.hostname, warning, now)
                await self.pipeline.deliver(tenant, message, Delivery(source="notice", system=True))
        return len(due)

    async def purge_spam(self, *, dry_run: bool = False) -> retention.PurgeReport:
        """Delete spam older than ``retention.spam_days``."""
        config = self.config()
        async with snapshots.maintenance_lock(config.gateway.data_dir):
            report = await retention.purge_spam(
                self.db, self.blobs, self.clock(), config.retention.spam_days, dry_run=dry_run
            )
        if report.messages:
            log.info("retention.purged", messages=dict(report.messages), dry_run=dry_run)
            if not dry_run:
                for tenant, n in report.messages.items():
                    metrics.SPAM_PURGED.labels(tenant).inc(n)
        return report

    async def snapshot(self) -> snapshots.SnapshotInfo:
        """Take a snapshot now and keep the newest ``snapshots.keep``."""
        config = self.config()
        info = await snapshots.create(
            self.db, self.blobs, config.snapshots.dir, self.clock(), config.gateway.data_dir
        )
        await asyncio.to_thread(snapshots.prune, config.snapshots.dir, config.snapshots.keep)
        self.last_snapshot = info.created_at
        log.info("snapshot.created", name=info.name, messages=info.messages)
        return info

    def next_snapshot(self, now: datetime) -> datetime:
        """The next local ``snapshots.at`` after ``now``."""
        at = self.config().snapshots.at
        local = now.astimezone()
        when = local.replace(hour=at.hour, minute=at.minute, second=0, microsecond=0)
        return when if when > local else when + timedelta(days=1)

    async def run(self) -> None:
        """Run every job on its timer."""
        await asyncio.gather(
            self._every(QUOTA_EVERY, self.quota_warnings),
            self._every(PURGE_EVERY, self.purge_spam),
            self._daily_snapshots(),
        )

    async def _every(self, seconds: float, job: Callable[[], Awaitable[object]]) -> None:
        while True:
            try:
                await job()
            except Exception:
                log.exception("scheduler.job_failed", job=getattr(job, "__name__", "job"))
            await asyncio.sleep(seconds)

    def reschedule(self) -> None:
        """The configuration changed: compute the next snapshot time again (``snapshots.at``)."""
        self._rescheduled.set()

    async def _daily_snapshots(self) -> None:
        while True:
            self._rescheduled.clear()
            wait = (self.next_snapshot(self.clock()) - self.clock()).total_seconds()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._rescheduled.wait(), max(wait, 1.0))
                continue  # woken by a reload: the time may have moved
            try:
                await self.snapshot()
            except Exception:
                log.exception("scheduler.job_failed", job="snapshot")

"""Jobs the daemon runs on its own: quota notices, the spam purge, the expunge history, the plan
lifecycle, the daily snapshot.

Each job runs on a timer in one task; a failing job is logged and tried
again at its next time, never taking the daemon down. Nothing depends on
anyone logging in. The quota job (every minute, and at once when the
pipeline reports mail waiting for room) sends threshold warnings, ends
relay-in deferrals that have room again, and announces each deferral
episode once with a "mail is waiting" notice (its dedupe key is the
episode's start, so a restart or a second instance never sends it twice).

With several instances on one database, the snapshot and the spam purge run
once per period for the whole cluster (a claimed row in ``job_runs``, see
:mod:`storage.jobs`), and the quota job's transactions take a cluster-wide
lock, so each crossing is warned once; the lifecycle's steps are claimed
one by one (:mod:`gateway.lifecycle`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime, make_msgid

import structlog

import quotas
from gateway import lifecycle, metrics
from gateway.config import Config
from gateway.ingest import Delivery, Pipeline
from storage import jobs, mailstore, retention, snapshots
from storage.blobs import BlobStore
from storage.db import Database, uninterrupted

log = structlog.get_logger(__name__)

QUOTA_EVERY = 60.0
PURGE_EVERY = 3600.0
LIFECYCLE_EVERY = 600.0


def _human(n: int) -> str:
    for unit, factor in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= factor:
            return f"{n / factor:.1f} {unit}"
    return f"{n} B"


FREEING = (
    "To free space: delete mail you no longer need (and expunge it), or move\r\n"
    "it to Spam (Spam does not count), or ask for a higher quota.\r\n"
)


def _notice(hostname: str, tenant_id: str, subject: str, body: str, now: datetime) -> bytes:
    return (
        f"From: mailgate <mailgate@{hostname}>\r\nTo: {tenant_id}\r\nSubject: {subject}\r\n"
        f"Date: {format_datetime(now)}\r\nMessage-ID: {make_msgid(domain=hostname)}\r\n"
        "Auto-Submitted: auto-generated\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + body
    ).encode("utf-8")


def quota_notice(hostname: str, warning: quotas.QuotaWarning, now: datetime) -> bytes:
    """The message telling a tenant it crossed a threshold (80, 95 or 100 %)."""
    u = warning.usage
    what = f"folder {u.folder}" if u.folder else "mailbox"
    again = " (still)" if warning.repeated else ""
    subject = f"Quota warning: the {what} has passed {warning.threshold}% of its quota{again}"
    free = max(u.limit - u.used, 0)
    body = (
        f"The {what} has passed {warning.threshold}% of its quota: it uses {_human(u.used)}"
        f" of {_human(u.limit)} ({u.percent:.0f}%), {_human(free)} left.\r\n\r\n"
        "A message bigger than the space left is not stored but deferred: relay-in\r\n"
        "senders are asked to retry, upstream mail waits on the upstream server.\r\n"
        "Spam does not count.\r\n\r\n" + FREEING
    )
    return _notice(hostname, u.tenant_id, subject, body, now)


def waiting_notice(
    hostname: str, episode: quotas.Episode, usage: quotas.Usage | None, now: datetime
) -> bytes:
    """The one message telling a tenant that mail now waits for room: how much, from where, what frees it."""
    lines = []
    if "imap" in episode.waiting:
        n, size = episode.waiting["imap"]
        lines.append(
            f"- from the upstream mailboxes: {n} message(s), {_human(size)}, left untouched on\r\n"
            "  the upstream server; each is pulled as soon as it fits.\r\n"
        )
    if "smtp" in episode.waiting:
        n, size = episode.waiting["smtp"]
        lines.append(
            f"- from other mail servers (SMTP): {n} delivery attempt(s), {_human(size)}, refused\r\n"
            '  with "452 mailbox full"; the senders\' servers retry them, usually for a few\r\n'
            "  days, before they give up and tell the sender. A retry counts again.\r\n"
        )
    full = (
        f"The mailbox uses {_human(usage.used)} of {_human(usage.limit)} ({usage.percent:.0f}%); the mail\r\n"
        "waiting does not fit in what is left.\r\n\r\n"
        if usage is not None
        else ""
    )
    body = (
        f"Since {episode.since:%Y-%m-%d %H:%M} UTC new mail for this mailbox is waiting because\r\n"
        "it does not fit in the quota. Nothing is lost yet.\r\n\r\n"
        + full
        + "Waiting now:\r\n"
        + "".join(lines)
        + "\r\n"
        + FREEING
        + "The waiting mail arrives by itself once there is room.\r\n"
    )
    return _notice(hostname, episode.tenant_id, "Mail is waiting: the mailbox is full", body, now)


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
        """Deliver due quota warnings, one per threshold crossed; how many."""
        now = self.clock()
        async with self.db.write() as s:
            await jobs.serialised(s, "quota")  # instances in turn: each crossing warned once
            due = await quotas.warnings(s, now)
        config = self.config()
        for warning in due:
            u = warning.usage
            log.warning(
                "quota.warning",
                tenant=u.tenant_id,
                folder=u.folder,
                threshold=warning.threshold,
                percent=round(u.percent, 1),
            )
            with contextlib.suppress(KeyError):
                tenant = config.tenant(u.tenant_id)
                message = quota_notice(config.gateway.hostname, warning, now)
                await self.pipeline.deliver(tenant, message, Delivery(source="notice", system=True))
        return len(due)

    async def quota_deferrals(self) -> int:
        """End relay-in deferrals that have room again; announce new episodes; how many announced."""
        now = self.clock()
        async with self.db.write() as s:
            await jobs.serialised(s, "quota")
            for tenant_id, source in await quotas.end_with_room(s):
                log.info("quota.deferral_ended", tenant=tenant_id, source=source)
            episodes = await quotas.unannounced(s)
            usage = {u.tenant_id: u for u in await quotas.usages(s) if u.folder is None}
        config = self.config()
        announced = 0
        for episode in episodes:
            log.warning("quota.mail_waiting", tenant=episode.tenant_id, waiting=episode.waiting)
            with contextlib.suppress(KeyError):
                tenant = config.tenant(episode.tenant_id)
                message = waiting_notice(config.gateway.hostname, episode, usage.get(episode.tenant_id), now)
                delivery = Delivery(source="notice", system=True, dedupe_key=episode.key)
                announced += not (await self.pipeline.deliver(tenant, message, delivery)).duplicate
        return announced

    async def quota_jobs(self) -> None:
        """Warnings and deferrals, every minute and whenever mail starts waiting."""
        while True:
            self.pipeline.deferrals.clear()
            for job in (self.quota_deferrals, self.quota_warnings):
                try:
                    await uninterrupted(job())
                except Exception:
                    log.exception("scheduler.job_failed", job=job.__name__)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(QUOTA_EVERY):  # not wait_for: it can swallow a cancel (3.11)
                    await self.pipeline.deferrals.wait()

    async def purge_spam(self, *, dry_run: bool = False) -> retention.PurgeReport:
        """Delete spam older than ``retention.spam_days``."""
        config = self.config()
        async with snapshots.maintenance_lock(config.gateway.data_dir):
            report = await retention.purge_spam(
                self.db, self.blobs, self.clock(), config.retention.spam_days, dry_run=dry_run
            )
        self.pipeline.changes.publish(report.folders)  # open IMAP sessions are told of the expunges
        if report.messages:
            log.info("retention.purged", messages=dict(report.messages), dry_run=dry_run)
            if not dry_run:
                for tenant, n in report.messages.items():
                    metrics.SPAM_PURGED.labels(tenant).inc(n)
        return report

    async def plan_lifecycle(self) -> None:
        """Take the tenants' due plan steps: notice, read-only, deletion (:mod:`gateway.lifecycle`)."""
        await lifecycle.step(self.config(), self.db, self.blobs, self.pipeline, self.clock())

    async def once(
        self, job: str, period: str, stale: timedelta, work: Callable[[], Awaitable[object]]
    ) -> bool:
        """Run ``work`` if no instance on the database ran ``job`` for ``period``; True if it ran here."""
        now, instance = self.clock(), self.config().gateway.effective_instance
        async with self.db.write() as s:
            if not await jobs.claim(s, job, period, instance, now, stale):
                return False
        await work()
        async with self.db.write() as s:
            await jobs.finish(s, job, period, self.clock())
        return True

    async def hourly_purge(self) -> None:
        """The spam purge, once an hour for the whole cluster."""
        hour = self.clock().astimezone(UTC).strftime("%Y-%m-%dT%H")
        await self.once("spam-purge", hour, timedelta(hours=1), self.purge_spam)

    async def prune_expunges(self) -> int:
        """Forget expunged UIDs older than ``mailstore.EXPUNGE_HISTORY`` (IMAP QRESYNC's history)."""
        async with self.db.write() as s:
            pruned = await mailstore.prune_expunges(s, self.clock())
        if pruned:
            log.info("imap.expunges_pruned", rows=pruned)
        return pruned

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
            self.quota_jobs(),
            self._every(PURGE_EVERY, self.hourly_purge),
            self._every(PURGE_EVERY, self.prune_expunges),
            self._every(LIFECYCLE_EVERY, self.plan_lifecycle),
            self._daily_snapshots(),
        )

    async def _every(self, seconds: float, job: Callable[[], Awaitable[object]]) -> None:
        while True:
            try:
                await job()  # a job that writes keeps each transaction uninterrupted itself
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
                async with asyncio.timeout(max(wait, 1.0)):  # not wait_for: it can swallow a cancel (3.11)
                    await self._rescheduled.wait()
                continue  # woken by a reload: the time may have moved
            day = self.clock().astimezone().date().isoformat()
            try:
                await self.once("snapshot", day, timedelta(hours=6), self.snapshot)
            except Exception:
                log.exception("scheduler.job_failed", job="snapshot")

"""The plan lifecycle's steps, taken by the scheduler: notice, read-only, deletion.

Theory of operation
-------------------
:func:`gateway.plans.standing` says where a tenant stands on a day; the
front-ends enforce it (read-only IMAP, refused submission, deferred relay-in,
paused pulls) by asking it themselves. This module takes the steps that
happen once, each recorded on the tenant's row with its time, so a restart or
a second instance never takes one twice (a step is claimed by the one
transaction whose conditional update finds it unrecorded: on PostgreSQL the
row lock makes a second instance's update wait, then find it recorded):

- **notice** (``notice_days`` before the end): one message into the tenant's
  INBOX addressed to its administrators (delivered with a dedupe key naming
  the end date) and, when the tenant has a ``contact``, one through the
  tenant's own relay, queued in the same transaction that records
  ``noticed_at``;
- **read-only** (the day after the end): ``read_only_at`` is recorded and logged;
- **deletion** (after ``read_only_days``, a trial's ``convert_days``): a last
  snapshot is taken and named in the log, then every row of the tenant is
  deleted and the blobs no other tenant references are removed.

``renew`` clears ``noticed_at`` and ``read_only_at`` (the next end gets its
own notice) and records ``renewed_at``.

A tenant whose step fails (a snapshot that cannot be written, say) is logged
and tried again at the next pass; the other tenants' steps are taken anyway.
"""

from __future__ import annotations

from datetime import datetime
from email.utils import format_datetime, make_msgid

import structlog
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.config import Config, TenantSection
from gateway.ingest import Delivery, Pipeline
from gateway.plans import Standing, standing
from storage import catalog, queue, retention, snapshots
from storage.blobs import BlobStore
from storage.db import Database, rows_changed
from storage.models import Tenant

log = structlog.get_logger(__name__)


def notice_message(hostname: str, tenant: TenantSection, st: Standing, to: list[str], now: datetime) -> bytes:
    """The "your plan ends" message, naming the plan, the end and what follows."""
    ends = st.ends.isoformat() if st.ends else "?"
    days = (st.ends - now.date()).days if st.ends else 0
    what = "trial" if tenant.paid_until is None else f"plan {tenant.plan or ''}".rstrip()
    last = st.deleted_on.isoformat() if st.deleted_on else "?"
    body = (
        f"Your {what} for {tenant.name or tenant.id} ends in {days} days, on {ends}.\r\n\r\n"
        "Renew it before then to keep full service. If it is not renewed, the\r\n"
        "account works read-only from the next day: mail can be read and\r\n"
        "downloaded, but not sent, and new mail waits. On "
        f"{last} the account is\r\ndeleted with all its mail.\r\n"
    )
    return (
        f"From: mailgate <mailgate@{hostname}>\r\nTo: {', '.join(to) or tenant.id}\r\n"
        f"Subject: Your plan ends in {days} days ({ends})\r\n"
        f"Date: {format_datetime(now)}\r\nMessage-ID: {make_msgid(domain=hostname)}\r\n"
        "Auto-Submitted: auto-generated\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + body
    ).encode("utf-8")


async def _claim(s: AsyncSession, tenant_id: str, step: str, now: datetime) -> bool:
    """Record ``step`` (a column of :data:`storage.catalog.LIFECYCLE`) unless it is recorded;
    True for the transaction that recorded it, which alone takes the step."""
    column = getattr(Tenant, step)
    changed = await rows_changed(
        s, update(Tenant).where(Tenant.id == tenant_id, column.is_(None)).values({step: now})
    )
    return changed == 1


async def notify(
    config: Config, db: Database, pipeline: Pipeline, tenant: TenantSection, now: datetime
) -> None:
    """Tell the tenant's administrators (INBOX) and its contact (relay) that the plan ends."""
    st = standing(tenant, now.date())
    admins = [a.login for a in tenant.agents if a.role == "admin" and not a.disabled]
    hostname = config.gateway.hostname
    message = notice_message(hostname, tenant, st, admins, now)
    key = f"plan-notice/{tenant.id}/{st.ends}"
    await pipeline.deliver(tenant, message, Delivery(source="notice", system=True, dedupe_key=key))
    sender = tenant.smtp.from_ if tenant.smtp is not None else None
    relayed = notice_message(hostname, tenant, st, [str(tenant.contact)], now) if tenant.contact else None
    digest = await pipeline.blobs.put(relayed) if relayed is not None and sender is not None else None
    async with db.write() as s:
        if not await _claim(s, tenant.id, "noticed_at", now):
            return  # another instance was first
        if relayed is not None and digest is not None and tenant.contact is not None and sender is not None:
            await queue.enqueue(
                s,
                tenant_id=tenant.id,
                mail_from=sender,
                recipients=[tenant.contact],
                blob=digest,
                size=len(relayed),
                now=now,
            )
    if tenant.contact is not None and sender is None:
        log.warning(
            "lifecycle.notice_not_relayed", tenant=tenant.id, reason="the tenant has no [tenants.smtp] from"
        )
    log.info(
        "lifecycle.noticed",
        tenant=tenant.id,
        ends=str(st.ends),
        admins=len(admins),
        contact=digest is not None,
    )


async def delete_tenant(db: Database, blobs: BlobStore, config: Config, tenant_id: str, now: datetime) -> str:
    """Take a last snapshot, then delete the tenant's rows and its unshared blobs; the snapshot's name."""
    info = await snapshots.create(db, blobs, config.snapshots.dir, now, config.gateway.data_dir)
    log.warning("lifecycle.final_snapshot", tenant=tenant_id, snapshot=info.name, path=str(info.path))
    async with db.write() as s:
        freed = await catalog.delete_tenant(s, tenant_id)
    async with snapshots.maintenance_lock(config.gateway.data_dir):
        removed = await retention.collect_blobs(db, blobs, freed, now.timestamp())
    log.warning("lifecycle.deleted", tenant=tenant_id, blobs_removed=removed, snapshot=info.name)
    return info.name


async def step(config: Config, db: Database, blobs: BlobStore, pipeline: Pipeline, now: datetime) -> None:
    """Take every tenant's due lifecycle step; one tenant's failure does not hold back the others."""
    async with db.read() as s:
        taken = await catalog.lifecycle(s)
    for tenant in config.tenants:
        try:
            await _step(config, db, blobs, pipeline, tenant, taken.get(tenant.id, {}), now)
        except Exception:
            log.exception("lifecycle.step_failed", tenant=tenant.id)


async def _step(
    config: Config,
    db: Database,
    blobs: BlobStore,
    pipeline: Pipeline,
    tenant: TenantSection,
    steps: dict[str, datetime | None],
    now: datetime,
) -> None:
    st = standing(tenant, now.date())
    if st.state == "notice" and steps.get("noticed_at") is None:
        await notify(config, db, pipeline, tenant, now)
    elif st.state == "read_only" and not tenant.suspended and steps.get("read_only_at") is None:
        async with db.write() as s:
            claimed = await _claim(s, tenant.id, "read_only_at", now)
        if claimed:
            log.warning("lifecycle.read_only", tenant=tenant.id, why=st.why)
    elif st.state == "deleted":
        await delete_tenant(db, blobs, config, tenant.id, now)

"""Quota policy and accounting: per tenant and per folder, the Spam folder never counting.

Usage comes from the counters the mail store keeps in the same transaction
as the messages (``tenants.used_bytes`` already excludes the ``\\Junk``
folder), so a check is two row reads. Every entry path uses :func:`check`:
relay-in answers ``452 4.2.2`` (the sender retries later), pull leaves the
upstream message where it is, IMAP APPEND/COPY/MOVE answer
``NO [OVERQUOTA]``. Only the copy of a sent message is stored regardless.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from storage.errors import StoreError
from storage.models import Folder, QuotaNotice, Tenant

JUNK = "\\Junk"
LEVELS = (80, 95, 100)  # warning thresholds, percent


class QuotaExceeded(StoreError):
    """Storing this would go over a quota."""

    imap_code = "OVERQUOTA"
    smtp_reply = "452 4.2.2 Mailbox full, try again later"

    def __init__(self, what: str, used: int, limit: int, adding: int, *, folder_id: int | None) -> None:
        super().__init__(f"{what} quota exceeded: {used} + {adding} bytes over the limit of {limit}")
        self.what = what
        self.folder_id = folder_id  # the quota root: this folder, or None for the tenant
        self.adding = adding


async def check(s: AsyncSession, folder: Folder, adding: int, *, tenant_adding: int | None = None) -> None:
    """Raise :class:`QuotaExceeded` if ``adding`` bytes do not fit in ``folder``.

    ``tenant_adding`` is what the tenant's usage grows by, when it differs
    (a move between two counted folders adds nothing to the tenant).
    """
    if adding <= 0 or folder.special_use == JUNK:
        return
    tenant_adding = adding if tenant_adding is None else tenant_adding
    folder_row = (
        await s.execute(select(Folder.used_bytes, Folder.quota_bytes).where(Folder.id == folder.id))
    ).one()
    if folder_row.quota_bytes is not None and folder_row.used_bytes + adding > folder_row.quota_bytes:
        raise QuotaExceeded(
            f"folder {folder.name!r}",
            folder_row.used_bytes,
            folder_row.quota_bytes,
            adding,
            folder_id=folder.id,
        )
    tenant = (
        await s.execute(select(Tenant.used_bytes, Tenant.quota_bytes).where(Tenant.id == folder.tenant_id))
    ).one()
    if (
        tenant_adding > 0
        and tenant.quota_bytes is not None
        and tenant.used_bytes + tenant_adding > tenant.quota_bytes
    ):
        raise QuotaExceeded(
            f"tenant {folder.tenant_id!r}",
            tenant.used_bytes,
            tenant.quota_bytes,
            tenant_adding,
            folder_id=None,
        )


async def room(s: AsyncSession, tenant_id: str, folder_id: int | None) -> int | None:
    """Bytes that still fit under a quota root (a folder, or the tenant for None); None: no limit.

    A folder that no longer exists limits nothing.
    """
    query = (
        select(Tenant.used_bytes, Tenant.quota_bytes).where(Tenant.id == tenant_id)
        if folder_id is None
        else select(Folder.used_bytes, Folder.quota_bytes).where(Folder.id == folder_id)
    )
    row = (await s.execute(query)).one_or_none()
    return None if row is None or row.quota_bytes is None else row.quota_bytes - row.used_bytes


@dataclass(frozen=True, slots=True)
class Usage:
    """A quota root's usage: the tenant (``folder`` None) or one folder."""

    tenant_id: str
    folder: str | None
    used: int
    limit: int

    @property
    def percent(self) -> float:
        return 100.0 * self.used / self.limit if self.limit else 0.0

    @property
    def level(self) -> int:
        """The highest warning threshold reached (0 for none)."""
        return max((lvl for lvl in LEVELS if self.percent >= lvl), default=0)


async def usages(s: AsyncSession) -> Sequence[Usage]:
    """Every tenant and folder that has a quota, with its usage."""
    out = [
        Usage(t.id, None, t.used_bytes, t.quota_bytes)
        for t in (await s.scalars(select(Tenant).where(Tenant.quota_bytes.is_not(None), Tenant.active))).all()
        if t.quota_bytes is not None
    ]
    folders = (
        await s.scalars(
            select(Folder).where(Folder.quota_bytes.is_not(None)).order_by(Folder.tenant_id, Folder.name)
        )
    ).all()
    out += [
        Usage(f.tenant_id, f.name, f.used_bytes, f.quota_bytes) for f in folders if f.quota_bytes is not None
    ]
    return out


@dataclass(frozen=True, slots=True)
class QuotaWarning:
    """A quota root that crossed a threshold (or is still above 95 % a day later)."""

    usage: Usage
    repeated: bool


async def warnings(s: AsyncSession, now: datetime) -> list[QuotaWarning]:
    """Warnings to send now, recording them; a root back below a threshold is re-armed.

    Each root warns once per crossing of 80, 95 and 100 %, and again daily
    while at or above 95 %.
    """
    out = []
    for usage in await usages(s):
        key = (usage.tenant_id, usage.folder or "")
        state = await s.get(QuotaNotice, key)
        if state is None:
            state = QuotaNotice(tenant_id=key[0], folder=key[1], level=0, notified_at=now)
            s.add(state)
        level = usage.level
        if level > state.level:
            out.append(QuotaWarning(usage, repeated=False))
        elif level >= 95 and level == state.level and now - state.notified_at >= timedelta(days=1):
            out.append(QuotaWarning(usage, repeated=True))
        elif level == state.level:
            continue
        state.level, state.notified_at = level, now
    return out

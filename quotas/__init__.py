"""Quota policy and accounting: per tenant and per folder, the Spam folder never counting.

Usage comes from the counters the mail store keeps in the same transaction
as the messages (``tenants.used_bytes`` already excludes the ``\\Junk``
folder), so a check is two row reads. Every entry path uses :func:`check`:
relay-in answers ``452 4.2.2`` (the sender retries later), pull leaves the
upstream message where it is, IMAP APPEND/COPY/MOVE answer
``NO [OVERQUOTA]``. Only the copy of a sent message and our own notices are
stored regardless.

Deferrals
---------
Mail that waits because it does not fit is recorded in the database, per
tenant and source (``quota_deferrals``), so the gauge
``mailgate_quota_deferred_messages`` survives restarts and agrees between
instances:

* ``imap``: the upstream messages waiting (``upstream_waiting``, one row per
  upstream UID, kept by the puller in the transactions that add and store
  them); the row is their count and size, and goes with the last of them.
* ``smtp``: relay-in refusals (``452``) since the deferral began. A sender's
  retry of the same message counts again (nothing identifies it before it is
  accepted). It ends when a relay-in message at least as large as the
  average refused one is stored for the tenant, or when the tenant has room
  for that much again (looked at every minute).

All of a tenant's rows share the ``since`` of the first: one *episode*,
announced once by a "mail is waiting" notice in the tenant's INBOX, whose
dedupe key is the episode's start.

Warnings
--------
Each crossing of 80, 95 and 100 % upwards gets its own notice naming that
threshold, however many are crossed between two looks; a root that falls
back below a threshold is re-armed for it. At or above 95 % the notice is
repeated daily.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import bindparam, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from storage.db import Prepared
from storage.errors import StoreError
from storage.mailstore import canonical_name
from storage.models import Base, Folder, IngestKey, QuotaDeferral, QuotaNotice, Tenant, UpstreamWaiting

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


# One statement, built once: the folder's and the tenant's usage and limits.
_folders, _tenants = (Base.metadata.tables[n] for n in ("folders", "tenants"))
_USAGE = Prepared(  # on every delivery: Core on the tables, compiled once
    select(_folders.c.used_bytes, _folders.c.quota_bytes, _tenants.c.used_bytes, _tenants.c.quota_bytes)
    .join(_tenants, _tenants.c.id == _folders.c.tenant_id)
    .where(_folders.c.id == bindparam("fid"))
)


async def check(s: AsyncSession, folder: Folder, adding: int, *, tenant_adding: int | None = None) -> None:
    """Raise :class:`QuotaExceeded` if ``adding`` bytes do not fit in ``folder``.

    ``tenant_adding`` is what the tenant's usage grows by, when it differs
    (a move between two counted folders adds nothing to the tenant).
    """
    if adding <= 0 or folder.special_use == JUNK:
        return
    ((used, quota, tenant_used, tenant_quota),) = (await _USAGE.run(s, {"fid": folder.id})).rows
    _check(
        folder,
        used,
        quota,
        tenant_used,
        tenant_quota,
        adding,
        adding if tenant_adding is None else tenant_adding,
    )


# An APPEND's first statement: the folder, and its tenant's usage for the quota check.
_FOLDER_AND_TENANT_USAGE = (
    select(Folder, Tenant.used_bytes, Tenant.quota_bytes)
    .join(Tenant, Tenant.id == Folder.tenant_id)
    .where(Folder.tenant_id == bindparam("tid"), Folder.name == bindparam("name"))
)


@dataclass(frozen=True, slots=True)
class Target:
    """A folder to store into, read in the writing transaction with its tenant's usage, so that
    :meth:`check` reads nothing more (an APPEND: one statement instead of two)."""

    folder: Folder
    tenant_used: int
    tenant_quota: int | None

    def check(self, adding: int) -> None:
        """:func:`check` on the usage read with the folder."""
        folder = self.folder
        if adding > 0 and folder.special_use != JUNK:
            _check(
                folder,
                folder.used_bytes,
                folder.quota_bytes,
                self.tenant_used,
                self.tenant_quota,
                adding,
                adding,
            )


async def target(s: AsyncSession, tenant_id: str, name: str) -> Target | None:
    """The tenant's folder with this name and the tenant's usage; None if there is no such folder."""
    row = (
        await s.execute(_FOLDER_AND_TENANT_USAGE, {"tid": tenant_id, "name": canonical_name(name)})
    ).one_or_none()
    return None if row is None else Target(*row)


def _check(
    folder: Folder,
    folder_used: int,
    folder_quota: int | None,
    tenant_used: int,
    tenant_quota: int | None,
    adding: int,
    tenant_adding: int,
) -> None:
    if folder_quota is not None and folder_used + adding > folder_quota:
        raise QuotaExceeded(f"folder {folder.name!r}", folder_used, folder_quota, adding, folder_id=folder.id)
    if tenant_adding > 0 and tenant_quota is not None and tenant_used + tenant_adding > tenant_quota:
        raise QuotaExceeded(
            f"tenant {folder.tenant_id!r}", tenant_used, tenant_quota, tenant_adding, folder_id=None
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
    """A quota root that crossed ``threshold`` (or is still above 95 % a day later)."""

    usage: Usage
    threshold: int  # 80, 95 or 100
    repeated: bool


async def warnings(s: AsyncSession, now: datetime) -> list[QuotaWarning]:
    """Warnings to send now, recording them; a root back below a threshold is re-armed.

    One warning per threshold crossed upwards since the last look (0 to 100 %
    gives three), and one daily while at or above 95 %.
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
            out += [QuotaWarning(usage, lvl, repeated=False) for lvl in LEVELS if state.level < lvl <= level]
        elif level >= 95 and level == state.level and now - state.notified_at >= timedelta(days=1):
            out.append(QuotaWarning(usage, level, repeated=True))
        elif level == state.level:
            continue
        state.level, state.notified_at = level, now
    return out


SOURCES = ("smtp", "imap")  # where deferred mail comes from: relay-in, upstream pull


async def _insert(s: AsyncSession) -> type[postgresql.Insert] | type[sqlite.Insert]:
    return postgresql.Insert if (await s.connection()).dialect.name == "postgresql" else sqlite.Insert


async def _episode_start(s: AsyncSession, tenant_id: str, now: datetime) -> datetime:
    """The ``since`` of the tenant's open deferral episode, or ``now`` for a new one."""
    since = await s.scalar(select(func.min(QuotaDeferral.since)).where(QuotaDeferral.tenant_id == tenant_id))
    return since or now


async def record_refusal(s: AsyncSession, tenant_id: str, source: str, size: int, now: datetime) -> bool:
    """Count one message refused for quota (e.g. relay-in ``452``); True if it began the episode."""
    since = await _episode_start(s, tenant_id, now)
    stmt = (await _insert(s))(QuotaDeferral).values(
        tenant_id=tenant_id, source=source, messages=1, bytes=size, since=since, last_at=now
    )
    await s.execute(
        stmt.on_conflict_do_update(
            index_elements=["tenant_id", "source"],
            set_={
                "messages": QuotaDeferral.messages + 1,
                "bytes": QuotaDeferral.bytes + size,
                "last_at": now,
            },
        )
    )
    return since == now


async def delivered(s: AsyncSession, tenant_id: str, source: str, size: int) -> None:
    """A message of ``size`` bytes from ``source`` was stored: a deferral of that size is over."""
    row = await s.get(QuotaDeferral, (tenant_id, source))
    if row is not None and size * row.messages >= row.bytes:
        await s.delete(row)


async def sync_waiting(s: AsyncSession, tenant_id: str, now: datetime) -> bool:
    """Make the tenant's ``imap`` deferral match its waiting upstream messages.

    Call in the transaction that adds or removes ``upstream_waiting`` rows.
    True if this began the tenant's deferral episode.
    """
    count, size = (
        await s.execute(
            select(func.count(), func.coalesce(func.sum(UpstreamWaiting.size), 0)).where(
                UpstreamWaiting.tenant_id == tenant_id
            )
        )
    ).one()
    row = await s.get(QuotaDeferral, (tenant_id, "imap"))
    if count == 0:
        if row is not None:
            await s.delete(row)
        return False
    if row is None:
        since = await _episode_start(s, tenant_id, now)
        s.add(
            QuotaDeferral(
                tenant_id=tenant_id, source="imap", messages=count, bytes=size, since=since, last_at=now
            )
        )
        return since == now
    if count > row.messages:
        row.last_at = now
    row.messages, row.bytes = count, size
    return False


async def end_with_room(s: AsyncSession) -> list[tuple[str, str]]:
    """End relay-in deferrals whose tenant has room again for the average refused message."""
    ended = []
    for row in (await s.scalars(select(QuotaDeferral).where(QuotaDeferral.source == "smtp"))).all():
        left = await room(s, row.tenant_id, None)
        if left is None or left * row.messages >= row.bytes:
            await s.delete(row)
            ended.append((row.tenant_id, row.source))
    return ended


@dataclass(frozen=True, slots=True)
class Episode:
    """A tenant's mail waiting for room: since when, and how much from each source."""

    tenant_id: str
    since: datetime
    waiting: dict[str, tuple[int, int]]  # source: (messages, bytes)

    @property
    def key(self) -> str:
        """The dedupe key of its one notice."""
        return f"notice:waiting/{self.since.strftime('%Y%m%dT%H%M%S.%f')}"


async def unannounced(s: AsyncSession) -> list[Episode]:
    """Open deferral episodes whose notice is not stored yet."""
    episodes: dict[str, Episode] = {}
    for row in (await s.scalars(select(QuotaDeferral).order_by(QuotaDeferral.tenant_id))).all():
        episode = episodes.setdefault(row.tenant_id, Episode(row.tenant_id, row.since, {}))
        episode.waiting[row.source] = (row.messages, row.bytes)
    out = []
    for episode in episodes.values():
        key = IngestKey.tenant_id == episode.tenant_id, IngestKey.key == episode.key
        if await s.scalar(select(func.count()).select_from(IngestKey).where(*key)) == 0:
            out.append(episode)
    return out

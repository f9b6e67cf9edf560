"""Leases on upstream folders: exactly one instance pulls a given folder at a time.

Theory of operation
-------------------
A lease is a row of ``upstream_leases`` keyed by (tenant, mailbox, upstream
folder): the holder's instance id, ``acquired_at`` (when this holder's
tenure began: it names the tenure) and ``expires_at``. Every change is one
conditional statement, a compare-and-set on holder and expiry, so two
instances can never both hold a lease whatever the interleaving:

- :func:`acquire`: an upsert that takes a free folder (no row) or an expired
  lease, starting a new tenure; it changes nothing while a lease runs.
- :func:`renew`: pushes ``expires_at`` to ``now + ttl`` on every lease of
  the instance that has not run out yet, and returns them with their
  tenures; a lease missing from the answer, or back with another tenure, was
  lost (expired, or taken over) meanwhile.
- :func:`release`: deletes the instance's own rows (clean stop, surplus,
  a folder no longer configured), so another takes them without waiting.

On PostgreSQL the statements lock the row they look at, so a concurrent
acquire waits and then sees the winner's holder; on SQLite (one instance)
writers are serialised anyway. Each runs in a transaction of its own, and
none waits for a row while holding another: acquire and release touch one
row each, and the renewal of all of an instance's leases skips the rows a
store in flight has locked (those are renewed one by one after it). A pull's
storing transaction may lock several leases (a group commit), so this is what
keeps renewals, takeovers and stores free of deadlocks.

The storing transaction of a pull *fences* on its lease (:meth:`Lease.check`):
it reads the row ``FOR UPDATE`` and rolls back with :class:`LeaseLost` unless
the puller's own tenure still holds, unexpired. So nothing is stored after a
loss, not even when the lease has come back to the same instance since (a
new tenure, and a new puller that reads the folder's state afresh), and a
takeover waits for a store in flight to commit first (the new holder then
reads the folder's last UID after it). The dedupe key of a pulled message
(account, folder, UIDVALIDITY, UID) and the folder's last-UID advance,
committed in one transaction with the message, keep every message stored
once in any case.

:func:`balance` is one instance's periodic turn (every :data:`TICK`): renew;
count the live instances (a heartbeat within :data:`storage.instances.TTL`,
this one always included); its share is ``ceil(folders / live)`` (:func:`share`); release the
leases of folders no longer configured and any surplus beyond the share; take
free or expired leases, in random order, up to the share. An instance that
joins takes what the others release at their next turn; the leases of one
that stops renewing expire after :data:`TTL` and are taken by the survivors
once it no longer counts as live. Expiry is judged by each instance's clock:
the hosts' clocks must agree (NTP) to well within ``TTL - TICK``.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import delete, select, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from storage import instances
from storage.db import Database, rows_changed
from storage.models import Instance, UpstreamLease

TTL = timedelta(seconds=30)  # a lease not renewed for this long may be taken over
TICK = TTL / 6  # between an instance's turns (renewal, rebalancing): many renewals per TTL

Key = tuple[str, str, str]  # tenant id, mailbox name, upstream folder


class LeaseLost(Exception):
    """This instance no longer holds the folder's lease: its puller stops, storing nothing more."""


def share(folders: int, live: int) -> int:
    """How many leases each of ``live`` instances aims at: ``ceil(folders / live)``."""
    return math.ceil(folders / max(live, 1))


def _key(lease: UpstreamLease) -> Key:
    return (lease.tenant_id, lease.mailbox, lease.folder)


_folder_key = tuple_(UpstreamLease.tenant_id, UpstreamLease.mailbox, UpstreamLease.folder)


async def acquire(
    s: AsyncSession, key: Key, holder: str, now: datetime, ttl: timedelta = TTL
) -> datetime | None:
    """Take ``key`` for ``holder`` if it is free or expired: the new tenure (``now``), else None."""
    tenant_id, mailbox, folder = key
    conn = await s.connection()
    insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    stmt = insert(UpstreamLease).values(
        tenant_id=tenant_id, mailbox=mailbox, folder=folder, holder=holder, acquired_at=now
    )
    stmt = stmt.values(expires_at=now + ttl)
    stmt = stmt.on_conflict_do_update(
        index_elements=[UpstreamLease.tenant_id, UpstreamLease.mailbox, UpstreamLease.folder],
        set_={
            "holder": stmt.excluded.holder,
            "acquired_at": stmt.excluded.acquired_at,
            "expires_at": stmt.excluded.expires_at,
        },
        where=UpstreamLease.expires_at <= now,
    )
    return now if await rows_changed(s, stmt) == 1 else None


async def renew(
    s: AsyncSession, holder: str, now: datetime, ttl: timedelta = TTL, key: Key | None = None
) -> dict[Key, datetime]:
    """Extend unexpired leases of ``holder`` to ``now + ttl``; those renewed, with their tenures.

    Without ``key``, every one not locked this moment by a store in flight (PostgreSQL skips
    those: a renewal holding some rows never waits for another); with ``key``, that one alone,
    waiting for its store to end.
    """
    query = update(UpstreamLease).where(UpstreamLease.holder == holder, UpstreamLease.expires_at > now)
    if key is None:
        unlocked = (
            select(UpstreamLease.tenant_id, UpstreamLease.mailbox, UpstreamLease.folder)
            .where(UpstreamLease.holder == holder, UpstreamLease.expires_at > now)
            .with_for_update(skip_locked=True)
        )
        query = query.where(_folder_key.in_(unlocked))
    else:
        query = query.where(_folder_key == key)
    result = await s.execute(
        query.values(expires_at=now + ttl).returning(
            UpstreamLease.tenant_id, UpstreamLease.mailbox, UpstreamLease.folder, UpstreamLease.acquired_at
        )
    )
    return {(t, m, f): since for t, m, f, since in result.all()}


async def release(s: AsyncSession, holder: str, keys: Iterable[Key] | None = None) -> int:
    """Give up ``keys`` (None: every lease) of ``holder``; how many it held."""
    query = delete(UpstreamLease).where(UpstreamLease.holder == holder)
    if keys is not None:
        keys = list(keys)
        if not keys:
            return 0
        query = query.where(_folder_key.in_(keys))
    return await rows_changed(s, query)


async def leases(s: AsyncSession) -> Sequence[UpstreamLease]:
    """Every lease row (held, or expired and not taken yet), by holder and folder."""
    query = select(UpstreamLease).order_by(
        UpstreamLease.holder, UpstreamLease.tenant_id, UpstreamLease.mailbox, UpstreamLease.folder
    )
    return (await s.scalars(query)).all()


async def live_instances(s: AsyncSession, me: str, now: datetime) -> set[str]:
    """Instances heard of within :data:`storage.instances.TTL` of ``now``, ``me`` always among them."""
    ids = await s.scalars(select(Instance.id).where(Instance.heartbeat_at > now - instances.TTL))
    return {*ids, me}


@dataclass(frozen=True, slots=True)
class Lease:
    """One tenure of an instance's lease on a folder, as its puller sees it."""

    key: Key
    holder: str
    since: datetime  # the tenure: the lease's acquired_at when the puller was started
    clock: Callable[[], datetime]

    async def check(self, s: AsyncSession) -> None:
        """The fence: call inside a storing transaction; :class:`LeaseLost` (rolling it back)
        unless this tenure still holds, and then it stays so until the transaction ends."""
        held = await s.scalar(
            select(UpstreamLease.holder)
            .where(_folder_key == self.key, UpstreamLease.holder == self.holder)
            .where(UpstreamLease.acquired_at == self.since, UpstreamLease.expires_at > self.clock())
            .with_for_update()
        )
        if held is None:
            raise LeaseLost(f"lease on {'/'.join(self.key)} lost by {self.holder}")


@dataclass(slots=True)
class Balance:
    """What one :func:`balance` turn did."""

    held: dict[Key, datetime] = field(default_factory=dict)  # the leases held after it, with tenures
    acquired: list[Key] = field(default_factory=list)
    released: list[Key] = field(default_factory=list)
    lost: set[Key] = field(default_factory=set)  # tenures held before the turn that ended
    share: int = 0
    live: int = 1


async def balance(
    db: Database,
    me: str,
    wanted: Sequence[Key],
    held: Mapping[Key, datetime],
    now: datetime,
    ttl: timedelta = TTL,
    rng: random.Random | None = None,
) -> Balance:
    """One turn of instance ``me`` over the configured folders ``wanted`` (see the module doc).

    ``held`` is what the caller believes it holds (with the tenures); what it no longer does
    comes back as ``lost``.
    """
    rng = rng or random.Random()
    renewed = await db.transaction(lambda s: renew(s, me, now, ttl))
    async with db.read() as s:
        live = await live_instances(s, me, now)
        rows = {_key(lease): lease for lease in await leases(s)}
    for key, row in rows.items():  # skipped, a store in flight: renewed alone, after that store
        if row.holder == me and row.expires_at > now and key not in renewed:
            renewed |= await db.transaction(functools.partial(renew, holder=me, now=now, ttl=ttl, key=key))
    out = Balance(share=share(len(set(wanted)), len(live)), live=len(live))
    out.lost = {key for key, since in held.items() if renewed.get(key) != since}
    keep = sorted(renewed.keys() & set(wanted))
    out.released = sorted(renewed.keys() - set(wanted)) + keep[out.share :]
    for key in out.released:  # one at a time: a release waiting for a store holds no other row
        await db.transaction(functools.partial(release, holder=me, keys=[key]))
    out.held = {key: renewed[key] for key in keep[: out.share]}
    free = [
        k for k in dict.fromkeys(wanted) if k not in out.held and (k not in rows or rows[k].expires_at <= now)
    ]
    rng.shuffle(free)
    for key in free:
        if len(out.held) >= out.share:
            break
        since = await db.transaction(functools.partial(acquire, key=key, holder=me, now=now, ttl=ttl))
        if since is not None:
            out.held[key] = since
            out.acquired.append(key)
    return out

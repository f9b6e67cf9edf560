"""The outbound relay queue: messages with per-recipient state.

A queued message's blob and rows are committed before the submitting client
gets ``250``. A recipient is ``pending`` until the tenant's server accepts it
(``sent``) or refuses it for good or the message expires (``failed``). A
message whose recipients are all done leaves the queue.

Claims: an instance takes a due message with :func:`due`, which marks it
``claimed_by`` that instance until ``claimed_until``, in the same write
transaction that selects it (PostgreSQL skips rows another transaction is
claiming, SQLite serialises writers), so two instances never both attempt
it. :func:`record` ends the claim with the attempt's results. A claim whose
holder died runs out and the message is due again for anyone; an instance
that restarts releases its own old claims at once (:func:`release`). The
holder must finish an attempt before its claim runs out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import Outbound, OutboundRecipient


@dataclass(frozen=True, slots=True)
class Queued:
    """A queued message and its recipients still to deliver."""

    row: Outbound
    pending: tuple[str, ...]


async def enqueue(
    s: AsyncSession,
    *,
    tenant_id: str,
    mail_from: str,
    recipients: Iterable[str],
    blob: str,
    size: int,
    now: datetime,
    agent_id: int | None = None,
    original_id: int | None = None,
) -> Outbound:
    """Queue a message for the tenant's relay, due now."""
    row = Outbound(
        tenant_id=tenant_id,
        agent_id=agent_id,
        mail_from=mail_from,
        blob=blob,
        size=size,
        created_at=now,
        next_attempt_at=now,
        attempts=0,
        original_id=original_id,
        delay_notified=False,
    )
    s.add(row)
    await s.flush()
    s.add_all(
        OutboundRecipient(outbound_id=row.id, address=a, state="pending") for a in dict.fromkeys(recipients)
    )
    await s.flush()
    return row


async def due(
    s: AsyncSession,
    now: datetime,
    *,
    instance: str,
    claim_for: timedelta,
    room: Mapping[str, int],
    limit: int = 200,
) -> list[Queued]:
    """Claim messages whose next attempt is due, with their pending recipients.

    Call it in a write transaction. At most ``room[tenant]`` messages of each
    tenant are claimed (tenants not in ``room`` get none); a message claimed by
    another instance is skipped until its claim runs out at ``claimed_until``.
    """
    tenants = [t for t, n in room.items() if n > 0]
    if not tenants:
        return []
    candidates = (
        await s.scalars(
            select(Outbound)
            .where(
                Outbound.next_attempt_at <= now,
                Outbound.tenant_id.in_(tenants),
                or_(Outbound.claimed_until.is_(None), Outbound.claimed_until <= now),
            )
            .order_by(Outbound.next_attempt_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    ).all()
    left = dict(room)
    rows: list[Outbound] = []
    for row in candidates:
        if left[row.tenant_id] > 0:
            left[row.tenant_id] -= 1
            row.claimed_by, row.claimed_until = instance, now + claim_for
            rows.append(row)
    if not rows:
        return []
    await s.flush()
    pending: dict[int, list[str]] = {}
    for outbound_id, address in await s.execute(
        select(OutboundRecipient.outbound_id, OutboundRecipient.address).where(
            OutboundRecipient.outbound_id.in_([r.id for r in rows]), OutboundRecipient.state == "pending"
        )
    ):
        pending.setdefault(outbound_id, []).append(address)
    return [Queued(r, tuple(pending.get(r.id, ()))) for r in rows]


async def release(s: AsyncSession, instance: str) -> int:
    """End every claim ``instance`` holds (its previous run died holding them); how many."""
    result = await s.execute(
        update(Outbound)
        .where(Outbound.claimed_by == instance)
        .values(claimed_by=None, claimed_until=None)
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


async def record(
    s: AsyncSession,
    outbound_id: int,
    results: Mapping[str, tuple[str, str]],
    *,
    error: str | None,
    next_attempt_at: datetime,
) -> bool:
    """Record an attempt and end its claim: each recipient's new state and reply; True when done.

    A message with no pending recipient left is removed from the queue.
    """
    for address, (state, reply) in results.items():
        await s.execute(
            update(OutboundRecipient)
            .where(OutboundRecipient.outbound_id == outbound_id, OutboundRecipient.address == address)
            .values(state=state, last_reply=reply[:500])
        )
    left = await s.scalar(
        select(func.count()).where(
            OutboundRecipient.outbound_id == outbound_id, OutboundRecipient.state == "pending"
        )
    )
    if not left:
        await s.execute(delete(Outbound).where(Outbound.id == outbound_id))
        return True
    await s.execute(
        update(Outbound)
        .where(Outbound.id == outbound_id)
        .values(
            attempts=Outbound.attempts + 1,
            last_error=error,
            next_attempt_at=next_attempt_at,
            claimed_by=None,
            claimed_until=None,
        )
    )
    return False


async def listing(
    s: AsyncSession, tenant_id: str | None = None
) -> Sequence[tuple[Outbound, list[OutboundRecipient]]]:
    """Every queued message with its recipients, oldest first."""
    query = select(Outbound).order_by(Outbound.created_at, Outbound.id)
    if tenant_id is not None:
        query = query.where(Outbound.tenant_id == tenant_id)
    rows = (await s.scalars(query)).all()
    recipients = (
        await s.scalars(
            select(OutboundRecipient).where(OutboundRecipient.outbound_id.in_([r.id for r in rows]))
        )
    ).all()
    by_id: dict[int, list[OutboundRecipient]] = {}
    for r in recipients:
        by_id.setdefault(r.outbound_id, []).append(r)
    return [(row, by_id.get(row.id, [])) for row in rows]


async def retry_now(s: AsyncSession, outbound_id: int, now: datetime) -> bool:
    """Make a queued message due now; False if there is no such message."""
    result = await s.execute(update(Outbound).where(Outbound.id == outbound_id).values(next_attempt_at=now))
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def drop(s: AsyncSession, outbound_id: int) -> bool:
    """Remove a message from the queue without sending it; False if there is none."""
    result = await s.execute(delete(Outbound).where(Outbound.id == outbound_id))
    return bool(result.rowcount)  # type: ignore[attr-defined]

"""The outbound relay queue: messages with per-recipient state.

A queued message's blob and rows are committed before the submitting client
gets ``250``. A recipient is ``pending`` until the tenant's server accepts it
(``sent``) or refuses it for good or the message expires (``failed``). A
message whose recipients are all done leaves the queue.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, func, select, update
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
    s: AsyncSession, now: datetime, *, exclude: Iterable[int] = (), limit: int = 200
) -> list[Queued]:
    """Messages whose next attempt is due, with their pending recipients."""
    rows = (
        await s.scalars(
            select(Outbound)
            .where(Outbound.next_attempt_at <= now, Outbound.id.not_in(list(exclude)))
            .order_by(Outbound.next_attempt_at)
            .limit(limit)
        )
    ).all()
    if not rows:
        return []
    pending: dict[int, list[str]] = {}
    for outbound_id, address in await s.execute(
        select(OutboundRecipient.outbound_id, OutboundRecipient.address).where(
            OutboundRecipient.outbound_id.in_([r.id for r in rows]), OutboundRecipient.state == "pending"
        )
    ):
        pending.setdefault(outbound_id, []).append(address)
    return [Queued(r, tuple(pending.get(r.id, ()))) for r in rows]


async def record(
    s: AsyncSession,
    outbound_id: int,
    results: Mapping[str, tuple[str, str]],
    *,
    error: str | None,
    next_attempt_at: datetime,
) -> bool:
    """Record an attempt: each recipient's new state and reply; True when the message is done.

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
        .values(attempts=Outbound.attempts + 1, last_error=error, next_attempt_at=next_attempt_at)
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

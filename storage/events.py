"""Agent activity events: ``read`` and ``collision`` (once per agent and message), ``answered``."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import Agent, Event


async def record_reads(
    s: AsyncSession, tenant_id: str, agent_id: int, message_ids: Iterable[int], at: datetime
) -> None:
    """Record that an agent read these messages; a message already read by them is skipped."""
    rows = [
        {"tenant_id": tenant_id, "agent_id": agent_id, "message_id": m, "kind": "read", "at": at}
        for m in message_ids
    ]
    if not rows:
        return
    conn = await s.connection()
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    stmt = dialect.insert(Event).on_conflict_do_nothing(
        index_elements=["agent_id", "message_id"], index_where=text("kind = 'read'")
    )
    await s.execute(stmt, rows)


async def record_collision(
    s: AsyncSession, tenant_id: str, agent_id: int, message_id: int, at: datetime
) -> bool:
    """Record that an agent's reply collided on a customer message; False if it was counted already.

    A collision is counted once per agent and customer message, whether the
    reply was held (and perhaps submitted again) or sent. Call it with the
    customer message's row locked, so two submissions cannot both count.
    """
    counted = await s.scalar(
        select(Event.id)
        .where(Event.agent_id == agent_id, Event.message_id == message_id, Event.kind == "collision")
        .limit(1)
    )
    if counted is not None:
        return False
    s.add(Event(tenant_id=tenant_id, agent_id=agent_id, message_id=message_id, kind="collision", at=at))
    await s.flush()
    return True


@dataclass(frozen=True, slots=True)
class AgentStats:
    """One agent's activity in a period."""

    login: str
    name: str
    read: int
    replies: int
    collisions: int
    first_responses: tuple[float, ...]  # seconds, for each customer message this agent answered first

    def percentile(self, p: float) -> float | None:
        """The p-th percentile of first-response times (nearest rank), None without any."""
        values = sorted(self.first_responses)
        if not values:
            return None
        return values[min(len(values) - 1, max(0, math.ceil(p / 100 * len(values)) - 1))]


async def first_responses(
    s: AsyncSession, tenant_id: str | None = None, since: datetime | None = None
) -> dict[tuple[str, int], list[float]]:
    """Seconds to the first answer of each answered message, by (tenant, agent who answered first)."""
    query = select(Event.tenant_id, Event.agent_id, Event.message_id, Event.at, Event.response_seconds).where(
        Event.kind == "answered"
    )
    if tenant_id is not None:
        query = query.where(Event.tenant_id == tenant_id)
    if since is not None:
        query = query.where(Event.at >= since)
    first: dict[int | None, tuple[datetime, str, int, float]] = {}
    for tenant, agent_id, message_id, at, seconds in await s.execute(query):
        if message_id not in first or at < first[message_id][0]:
            first[message_id] = (at, tenant, agent_id, float(seconds or 0.0))
    out: dict[tuple[str, int], list[float]] = {}
    for _, tenant, agent_id, seconds in first.values():
        out.setdefault((tenant, agent_id), []).append(seconds)
    return out


async def agent_stats(s: AsyncSession, tenant_id: str, since: datetime) -> list[AgentStats]:
    """Per agent of the tenant: reads, replies, collisions and first-response times since ``since``."""
    agents = (
        await s.execute(select(Agent.id, Agent.login, Agent.name).where(Agent.tenant_id == tenant_id))
    ).all()
    counts: dict[tuple[int, str], int] = {}
    for agent_id, kind, n in await s.execute(
        select(Event.agent_id, Event.kind, func.count())
        .where(Event.tenant_id == tenant_id, Event.at >= since)
        .group_by(Event.agent_id, Event.kind)
    ):
        counts[(agent_id, kind)] = n
    responses = {agent: times for (_, agent), times in (await first_responses(s, tenant_id, since)).items()}
    return [
        AgentStats(
            login,
            name,
            counts.get((agent_id, "read"), 0),
            counts.get((agent_id, "answered"), 0),
            counts.get((agent_id, "collision"), 0),
            tuple(responses.get(agent_id, ())),
        )
        for agent_id, login, name in sorted(agents, key=lambda a: a.login)
    ]

"""Agent activity events: ``read`` (once per agent and message), ``answered``, ``collision``."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import Event


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

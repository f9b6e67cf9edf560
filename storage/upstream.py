"""State of upstream IMAP pulls: per-folder progress and per-mailbox health."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import UpstreamFolder, UpstreamMailbox


async def folder_state(s: AsyncSession, tenant_id: str, mailbox: str, folder: str) -> UpstreamFolder | None:
    """How far this upstream folder has been pulled, if it ever was."""
    return await s.get(UpstreamFolder, (tenant_id, mailbox, folder))


async def advance(
    s: AsyncSession, tenant_id: str, mailbox: str, folder: str, uidvalidity: int, last_uid: int
) -> None:
    """Record progress; call inside the transaction that stores the messages."""
    row = await s.get(UpstreamFolder, (tenant_id, mailbox, folder))
    if row is None:
        s.add(
            UpstreamFolder(
                tenant_id=tenant_id,
                mailbox=mailbox,
                folder=folder,
                uidvalidity=uidvalidity,
                last_uid=last_uid,
            )
        )
    else:
        row.uidvalidity, row.last_uid = uidvalidity, last_uid
    await s.flush()


async def _row(s: AsyncSession, tenant_id: str, mailbox: str) -> UpstreamMailbox:
    row = await s.get(UpstreamMailbox, (tenant_id, mailbox))
    if row is None:
        row = UpstreamMailbox(tenant_id=tenant_id, name=mailbox, state="new", messages_pulled=0)
        s.add(row)
        await s.flush()
    return row


async def record_success(
    s: AsyncSession, tenant_id: str, mailbox: str, folder: str, state: str, at: datetime
) -> None:
    """A folder of the mailbox was reached and synchronised.

    The row shows the mailbox's worst folder: while another folder's error
    waits for its next attempt, that error and its state stay.
    """
    row = await _row(s, tenant_id, mailbox)
    row.last_success_at = at
    pending = row.next_attempt_at is not None and row.next_attempt_at > at
    if not pending or (row.last_error or "").startswith(f"{folder}: "):
        row.state, row.next_attempt_at = state, None


async def record_pulled(s: AsyncSession, tenant_id: str, mailbox: str, count: int) -> None:
    """Count messages stored from this mailbox."""
    await _row(s, tenant_id, mailbox)
    await s.execute(
        update(UpstreamMailbox)
        .where(UpstreamMailbox.tenant_id == tenant_id, UpstreamMailbox.name == mailbox)
        .values(messages_pulled=UpstreamMailbox.messages_pulled + count)
    )


async def record_error(
    s: AsyncSession,
    tenant_id: str,
    mailbox: str,
    folder: str,
    state: str,
    error: str,
    at: datetime,
    next_attempt_at: datetime,
) -> None:
    """A folder of the mailbox failed (``state`` e.g. ``error``, ``auth_failed``, ``over_quota``).

    ``last_error`` becomes ``"<folder>: <error>"``; ``next_attempt_at`` is when it is tried again.
    """
    row = await _row(s, tenant_id, mailbox)
    row.state, row.last_error, row.last_error_at = state, f"{folder}: {error}"[:500], at
    row.next_attempt_at = next_attempt_at


async def mailboxes(s: AsyncSession, tenant_id: str | None = None) -> Sequence[UpstreamMailbox]:
    """Every upstream mailbox's health, optionally of one tenant."""
    query = select(UpstreamMailbox).order_by(UpstreamMailbox.tenant_id, UpstreamMailbox.name)
    if tenant_id is not None:
        query = query.where(UpstreamMailbox.tenant_id == tenant_id)
    return (await s.scalars(query)).all()

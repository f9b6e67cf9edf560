"""State of upstream IMAP pulls: per-folder progress, waiting lists and per-mailbox health."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from storage.db import rows_changed
from storage.models import UpstreamFolder, UpstreamMailbox, UpstreamWaiting


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
    waits for its next attempt, that error and its state stay, and so does
    ``last_success_at`` (one stuck folder is a mailbox not being pulled).
    """
    row = await _row(s, tenant_id, mailbox)
    pending = row.next_attempt_at is not None and row.next_attempt_at > at
    if not pending or (row.last_error or "").startswith(f"{folder}: "):
        row.state, row.next_attempt_at = state, None
        row.last_success_at = at


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


async def add_waiting(
    s: AsyncSession,
    tenant_id: str,
    mailbox: str,
    folder: str,
    uidvalidity: int,
    uid: int,
    size: int,
    at: datetime,
) -> None:
    """An upstream message that does not fit now; call in the transaction that advances past it."""
    if await s.get(UpstreamWaiting, (tenant_id, mailbox, folder, uid)) is None:
        s.add(
            UpstreamWaiting(
                tenant_id=tenant_id,
                mailbox=mailbox,
                folder=folder,
                uid=uid,
                uidvalidity=uidvalidity,
                size=size,
                since=at,
            )
        )
        await s.flush()


async def waiting(s: AsyncSession, tenant_id: str, mailbox: str, folder: str) -> Sequence[UpstreamWaiting]:
    """The folder's messages waiting for room, in UID order."""
    return (
        await s.scalars(
            select(UpstreamWaiting)
            .where(
                UpstreamWaiting.tenant_id == tenant_id,
                UpstreamWaiting.mailbox == mailbox,
                UpstreamWaiting.folder == folder,
            )
            .order_by(UpstreamWaiting.uid)
        )
    ).all()


async def drop_waiting(
    s: AsyncSession,
    tenant_id: str,
    mailbox: str,
    folder: str,
    uids: Sequence[int] | None = None,
    *,
    except_uidvalidity: int | None = None,
) -> int:
    """Remove waiting rows: these UIDs (stored, or gone upstream), or all of the folder's
    (of another UIDVALIDITY than ``except_uidvalidity``); how many."""
    query = delete(UpstreamWaiting).where(
        UpstreamWaiting.tenant_id == tenant_id,
        UpstreamWaiting.mailbox == mailbox,
        UpstreamWaiting.folder == folder,
    )
    if uids is not None:
        query = query.where(UpstreamWaiting.uid.in_(uids))
    if except_uidvalidity is not None:
        query = query.where(UpstreamWaiting.uidvalidity != except_uidvalidity)
    return await rows_changed(s, query)

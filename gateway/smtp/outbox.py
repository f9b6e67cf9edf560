"""Accepting mail for relay: limits, collision detection, queue, Sent copy, answered events.

Theory of operation
-------------------
A message to relay (an agent's submission, or a trusted server relaying for
its tenant) passes the tenant's limits (size, attachments); then one
transaction checks an agent's reply for a collision (with the answered
message's row locked, so two simultaneous replies cannot both pass), queues
it for the tenant's relay, files a copy in the tenant's ``\\Sent`` folder and, when it
answers a stored customer message, records an ``answered`` event with the
response time and sets ``\\Answered`` on that message. Only after that commit
does the client get ``250``.

The customer message a reply answers is the most recent stored message of
the tenant (outside ``\\Sent``) named in its In-Reply-To or References. It is
a collision when another agent answered that very message first, or has the
first reply to it in the queue: a newer customer message in the thread is a
new message to answer, so replying to it never collides.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

import quotas
from gateway.auth import Identity
from gateway.config import TenantSection
from gateway.ingest import describe
from gateway.message import Headers, parse_headers
from gateway.notify import Changes
from gateway.smtp import policy
from storage import mailstore, queue
from storage.blobs import BlobStore
from storage.db import Database
from storage.models import Agent, Event, Folder, Message, Outbound

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Original:
    """The customer message a reply answers."""

    id: int
    folder_id: int
    uid: int
    received_at: datetime


class Outbox:
    """Queues messages for the tenants' relays."""

    def __init__(
        self,
        db: Database,
        blobs: BlobStore,
        changes: Changes,
        wake: Callable[[], None],
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.db = db
        self.blobs = blobs
        self.changes = changes
        self.wake = wake
        self.clock = clock or (lambda: datetime.now(UTC))

    async def submit(
        self,
        tenant: TenantSection,
        identity: Identity | None,
        mail_from: str,
        recipients: Sequence[str],
        data: bytes,
    ) -> str:
        """Check, queue and file one message; the SMTP reply to give."""
        if len(data) > tenant.max_message_size:
            return policy.TOO_BIG.format(limit=tenant.max_message_size)
        attachments = await asyncio.to_thread(policy.count_attachments, data)
        if attachments > tenant.max_attachments:
            return policy.TOO_MANY_ATTACHMENTS.format(count=attachments, limit=tenant.max_attachments)
        headers = parse_headers(data)
        refused = policy.foreign_header_sender(tenant, headers)
        if refused is not None:
            log.info("outbox.header_sender_refused", tenant=tenant.id, reply=refused)
            return refused
        now = self.clock()
        original = await self._original(tenant.id, headers)
        digest = await self.blobs.put(data)
        sent_copy = await asyncio.to_thread(describe, data, headers, digest, now, frozenset({"\\Seen"}))
        collision = None
        async with self.db.write() as s:
            if identity is not None and original is not None and tenant.collision != "off":
                # Checked inside the write transaction, with the answered message's
                # row locked (SQLite serialises writers anyway): two agents replying
                # at the same moment cannot both pass.
                await s.execute(select(Message.id).where(Message.id == original.id).with_for_update())
                collision = await self._collision(s, identity, original)
                if collision is not None and tenant.collision == "hold":
                    who, when = collision
                    log.info("outbox.collision_held", tenant=tenant.id, agent=identity.login, answered_by=who)
                    return policy.COLLISION.format(who=who, when=when.strftime("%Y-%m-%d %H:%M UTC"))
            row = await queue.enqueue(
                s,
                tenant_id=tenant.id,
                mail_from=mail_from,
                recipients=recipients,
                blob=digest,
                size=len(data),
                now=now,
                agent_id=identity.agent_id if identity else None,
                original_id=original.id if original else None,
            )
            sent = await mailstore.special_folder(s, tenant.id, "\\Sent")
            if sent is not None:
                # Refusing to send would be worse than going over quota: the copy is kept.
                try:
                    await quotas.check(s, sent, len(data))
                except quotas.QuotaExceeded as exc:
                    log.warning("outbox.sent_copy_over_quota", tenant=tenant.id, reason=str(exc))
                await mailstore.append(s, sent, [sent_copy])
            if identity is not None and original is not None:
                await self._answered(s, tenant.id, identity, original, now, collision is not None)
        self.changes.publish(
            [f for f in (sent.id if sent else None, original.folder_id if original else None) if f]
        )
        self.wake()
        log.info("outbox.queued", tenant=tenant.id, queue_id=row.id, rcpts=len(recipients), size=len(data))
        return f"{policy.OK} queued as {row.id}"

    async def _original(self, tenant_id: str, headers: Headers) -> Original | None:
        ids = [*headers.in_reply_to, *headers.references]
        if not ids:
            return None
        async with self.db.read() as s:
            row = (
                await s.execute(
                    select(Message.id, Message.folder_id, Message.uid, Message.received_at)
                    .join(Folder, Folder.id == Message.folder_id)
                    .where(
                        Message.tenant_id == tenant_id,
                        Message.message_id.in_(ids),
                        Folder.special_use.is_distinct_from("\\Sent"),
                    )
                    .order_by(Message.received_at.desc(), Message.id.desc())
                    .limit(1)
                )
            ).first()
        return Original(*row) if row is not None else None

    async def _collision(
        self, s: AsyncSession, identity: Identity, original: Original
    ) -> tuple[str, datetime] | None:
        """Who else answered (or is answering) this message first, and when.

        The first answer decides: once an agent answered, a colleague's later
        reply (even one let through under ``warn``) does not make that agent's
        own follow-ups collisions.
        """
        answered = (
            await s.execute(
                select(Agent.login, Event.at, Event.agent_id)
                .join(Agent, Agent.id == Event.agent_id)
                .where(Event.message_id == original.id, Event.kind == "answered")
                .order_by(Event.at, Event.id)
                .limit(1)
            )
        ).first()
        if answered is not None:
            return None if answered[2] == identity.agent_id else (answered[0], answered[1])
        queued = (
            await s.execute(
                select(Agent.login, Outbound.created_at, Outbound.agent_id)
                .join(Agent, Agent.id == Outbound.agent_id)
                .where(Outbound.original_id == original.id)
                .order_by(Outbound.created_at, Outbound.id)
                .limit(1)
            )
        ).first()
        if queued is None or queued[2] == identity.agent_id:
            return None
        return queued[0], queued[1]

    async def _answered(
        self,
        s: AsyncSession,
        tenant_id: str,
        identity: Identity,
        original: Original,
        now: datetime,
        collided: bool,
    ) -> None:
        s.add(
            Event(
                tenant_id=tenant_id,
                agent_id=identity.agent_id,
                message_id=original.id,
                kind="answered",
                at=now,
                response_seconds=max(0.0, (now - original.received_at).total_seconds()),
            )
        )
        if collided:
            s.add(
                Event(
                    tenant_id=tenant_id,
                    agent_id=identity.agent_id,
                    message_id=original.id,
                    kind="collision",
                    at=now,
                )
            )
        folder = await s.get(Folder, original.folder_id)
        if folder is not None:
            await mailstore.store_flags(s, folder, [original.uid], ["\\Answered"], "add")

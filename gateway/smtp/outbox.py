"""Accepting mail for relay: limits, collision detection, queue, Sent copy, answered events.

Theory of operation
-------------------
A message to relay (an agent's submission, or a trusted server relaying for
its tenant) passes the tenant's limits (size, attachments); then one
transaction checks an agent's reply for a collision (with the answered
message's row locked, so two simultaneous replies cannot both pass), queues
it for the tenant's relay, files a copy in the tenant's ``\\Sent`` folder
(unless the agent's ``save_sent`` is ``never``; the copy records whose
submission it is, so that the agent's client's own copy is recognised, see
:meth:`gateway.imap.session.Session.cmd_append`) and, when it answers a
stored customer message, records an ``answered`` event with the response
time and sets ``\\Answered`` on that message. Only after that commit does
the client get ``250``, naming the message's queue id: the id the SMTP
transaction's log lines already carry, unless (very rarely) another message
once had it.

The customer message a reply answers is the most recent stored message of
the tenant (outside ``\\Sent`` and ``\\Drafts``) named in its In-Reply-To or
References (:func:`gateway.answering.find_original`); its copies in every
folder get ``\\Answered`` and the agent's ``$AnsweredBy<Name>``. It is
a collision when another agent answered that very message first, or has the
first reply to it in the queue: a newer customer message in the thread is a
new message to answer, so replying to it never collides. A collision
counts (a ``collision`` event) once per agent and customer message, whether
the reply is held (``450``, committed before the reply) or sent.

The tenant's plan: a read-only tenant (:func:`gateway.plans.standing`)
sends nothing (``554 5.7.1``, saying why). Under a plan with
``max_outbound_per_month`` the message that would go over it in the calendar
month (UTC) is refused (``554 5.7.0``). The count is of messages, not
recipients: the ``queued`` entries of the tenant's outbound history (never
pruned), so every message queued for the tenant's relay counts, forwards and
bounces too. It is taken in the transaction that queues the message, after
locking the tenant's row (PostgreSQL; SQLite serialises writers), so two
messages sent at once cannot both take the last one.

An agent's footer (:mod:`gateway.footer`) is added after the limits (which
judge the client's message) and before anything is stored: the queued
message and the ``\\Sent`` copy are the same bytes, the same blob.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

import quotas
from gateway import answering, metrics
from gateway.answering import Original
from gateway.auth import Identity
from gateway.config import TenantSection
from gateway.footer import add_footer
from gateway.ingest import MimeWorker
from gateway.message import Headers, parse_headers
from gateway.notify import Changes
from gateway.plans import standing
from gateway.smtp import policy
from gateway.smtp.hourly import HourlyLimits
from storage import events, mailstore, queue
from storage.blobs import BlobStore
from storage.db import Database
from storage.models import Agent, Event, Message, Outbound, OutboundLog, Tenant

log = structlog.get_logger(__name__)

NOTE_FLAGS = frozenset({"\\Seen", answering.NOTE})


@dataclass(frozen=True, slots=True)
class Submitted:
    """The SMTP reply to give, and the queue id when the message was queued."""

    reply: str
    queue_id: str | None = None


def going_out(tenant: TenantSection, identity: Identity | None, recipients: Sequence[str]) -> list[str]:
    """The recipients a message is relayed to: an agent's without the tenant's notes address."""
    if identity is None:
        return list(recipients)
    notes = tenant.effective_notes_address
    return [r for r in recipients if r.lower() != notes]


class Outbox:
    """Queues messages for the tenants' relays."""

    def __init__(
        self,
        db: Database,
        blobs: BlobStore,
        changes: Changes,
        wake: Callable[[], None],
        clock: Callable[[], datetime] | None = None,
        hourly: HourlyLimits | None = None,
        mime: MimeWorker | None = None,
    ) -> None:
        """``mime`` describes the Sent copies and notes (the ingest pipeline's, in the daemon)."""
        self.db = db
        self.mime = mime or MimeWorker()
        self.hourly = hourly  # [limits.outbound]: per agent and tenant, per hour
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
        queue_id: str | None = None,
    ) -> Submitted:
        """Check, queue and file one message, as ``queue_id`` if that id is unused (else a fresh one).

        First the hourly limits (:mod:`gateway.smtp.hourly`): a message that is then not
        queued after all gives its place back.
        """
        agent = identity.login if identity is not None else ""
        outgoing = going_out(tenant, identity, recipients)
        # An internal note is not outgoing mail: the notes address takes no place, a note alone none.
        reserved = self.hourly.reserve(tenant.id, agent, len(outgoing)) if self.hourly and outgoing else None
        if isinstance(reserved, str):
            metrics.OUTBOUND_LIMITED.labels(tenant.id, agent).inc()
            log.warning("outbox.hourly_limit", tenant=tenant.id, agent=agent or None, reply=reserved)
            return Submitted(reserved)
        try:
            submitted = await self._submit(tenant, identity, mail_from, recipients, outgoing, data, queue_id)
        except BaseException:
            if self.hourly is not None and reserved is not None:
                self.hourly.release(reserved)
            raise
        if submitted.queue_id is None and self.hourly is not None and reserved is not None:
            self.hourly.release(reserved)
        return submitted

    async def _submit(
        self,
        tenant: TenantSection,
        identity: Identity | None,
        mail_from: str,
        recipients: Sequence[str],
        outgoing: Sequence[str],
        data: bytes,
        queue_id: str | None,
    ) -> Submitted:
        queue_id = queue_id or queue.new_id()
        where = standing(tenant)
        if not where.writable:
            log.info("outbox.read_only", tenant=tenant.id, state=where.state, reason=where.why)
            return Submitted(policy.read_only(where.why))
        if len(data) > tenant.max_message_size:
            return Submitted(policy.too_big(tenant.max_message_size))
        attachments = await asyncio.to_thread(policy.count_attachments, data)
        if attachments > tenant.max_attachments:
            return Submitted(
                policy.TOO_MANY_ATTACHMENTS.format(count=attachments, limit=tenant.max_attachments)
            )
        headers = parse_headers(data)
        logger = log.bind(
            tenant=tenant.id,
            agent=identity.login if identity else None,
            queue_id=queue_id,
            message_id=headers.message_id,
        )
        refused = policy.foreign_header_sender(tenant, headers)
        if refused is not None:
            logger.info("outbox.header_sender_refused", reply=refused)
            return Submitted(refused)
        now = self.clock()
        if len(outgoing) < len(recipients):
            # An internal note: filed in the conversation, never relayed; the other recipients
            # (a reply-all) get the message without the notes address in the envelope.
            noted = answering.note_form(data, headers)
            note_blob, [(_, _, note)] = await asyncio.gather(
                self.blobs.put(noted), self.mime.examine([noted], [now])
            )
            note = dataclasses.replace(note, blob=note_blob, flags=NOTE_FLAGS)
            recipients = outgoing
            if not recipients:
                # A note alone must fit the quota (452: the client keeps it and tries again); the
                # note copy of a reply-all is kept whatever the quota, as the \Sent copy is.
                try:
                    async with self.db.write() as s:
                        folder_id = await answering.file_note(s, tenant.id, headers, note, check_quota=True)
                except quotas.QuotaExceeded as exc:
                    logger.info("outbox.note_over_quota", reason=str(exc))
                    return Submitted(exc.smtp_reply)
                self.changes.publish([folder_id])
                logger.info("outbox.note_filed", folder_id=folder_id)
                return Submitted(f"{policy.OK} note filed, not sent")
        else:
            note = None
        original = await self._original(tenant.id, headers)
        agent = tenant.agent(identity.login) if identity is not None else None
        save_sent = agent.save_sent if agent is not None else "auto"
        if agent is not None and agent.footer:
            data = await asyncio.to_thread(add_footer, data, agent.footer)
        # The blob is written while the Sent copy is described (child processes both).
        digest, [(_, _, described)] = await asyncio.gather(
            self.blobs.put(data), self.mime.examine([data], [now])
        )
        sent_copy = dataclasses.replace(
            described,
            blob=digest,
            flags=frozenset({"\\Seen"}),
            submitted_by=identity.agent_id if identity is not None else None,
        )

        async def queue_it(s: AsyncSession) -> tuple[Submitted, set[int], bool]:
            """The transaction: the monthly limit, the collision check, the queue row, the note
            and Sent copies, the answered marks; the reply, the folders changed, whether it collided."""
            limit = await self._over_monthly_limit(s, tenant, now)
            if limit is not None:
                metrics.OUTBOUND_LIMITED.labels(tenant.id, identity.login if identity else "").inc()
                logger.info("outbox.monthly_limit", limit=limit, plan=tenant.plan)
                return Submitted(policy.monthly_limit(limit, tenant.plan or "")), set(), False
            collision = None
            if identity is not None and original is not None and tenant.collision != "off":
                # Checked inside the write transaction, with the answered message's
                # row locked (SQLite serialises writers anyway): two agents replying
                # at the same moment cannot both pass.
                await s.execute(select(Message.id).where(Message.id == original.id).with_for_update())
                collision = await self._collision(s, identity, original)
                if collision is not None:
                    counted = await events.record_collision(s, tenant.id, identity.agent_id, original.id, now)
                    if tenant.collision == "hold":
                        who, when = collision
                        # Returning commits the collision event before the client hears 450.
                        logger.info("outbox.collision_held", answered_by=who, counted=counted)
                        held = policy.COLLISION.format(who=who, when=when.strftime("%Y-%m-%d %H:%M UTC"))
                        return Submitted(held), set(), True
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
                message_id=headers.message_id,
                queue_id=queue_id,
                agent_login=identity.login if identity else None,
            )
            note_folder = (
                await answering.file_note(s, tenant.id, headers, note, check_quota=False)
                if note is not None
                else None
            )
            sent = None if save_sent == "never" else await mailstore.special_folder(s, tenant.id, "\\Sent")
            if sent is not None:
                # Refusing to send would be worse than going over quota: the copy is kept.
                try:
                    await quotas.check(s, sent, len(data))
                except quotas.QuotaExceeded as exc:
                    logger.warning("outbox.sent_copy_over_quota", queue_id=row.queue_id, reason=str(exc))
                await mailstore.append(s, sent, [sent_copy])
            marked: set[int] = set()
            if identity is not None and original is not None:
                marked = await self._answered(s, tenant, identity, original, now)
            changed = {*marked, *([sent.id] if sent else []), *([note_folder] if note_folder else [])}
            return (
                Submitted(f"{policy.OK} queued as {row.queue_id}", row.queue_id),
                changed,
                collision is not None,
            )

        # Group commit: submissions arriving while one commits share the next transaction.
        submitted, changed, collided = await self.db.grouped(queue_it)
        if submitted.queue_id is None:
            return submitted
        self.changes.publish(changed)
        self.wake()
        logger.info(
            "outbox.queued",
            queue_id=submitted.queue_id,
            rcpts=len(recipients),
            domains=sorted({r.rpartition("@")[2] for r in recipients}),
            size=len(data),
            collision=collided,
        )
        return submitted

    @staticmethod
    async def _over_monthly_limit(s: AsyncSession, tenant: TenantSection, now: datetime) -> int | None:
        """The plan's monthly limit when this month's messages have reached it, else None.

        Call it in the write transaction that queues the message: it locks the
        tenant's row first, so concurrent submissions count one after another.
        """
        limit = tenant.plan_section.max_outbound_per_month if tenant.plan_section is not None else 0
        if not limit:
            return None
        await s.execute(select(Tenant.id).where(Tenant.id == tenant.id).with_for_update())
        month = now.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        sent = await s.scalar(
            select(func.count()).where(
                OutboundLog.tenant_id == tenant.id, OutboundLog.event == "queued", OutboundLog.at >= month
            )
        )
        return limit if (sent or 0) >= limit else None

    async def _original(self, tenant_id: str, headers: Headers) -> Original | None:
        async with self.db.read() as s:
            return await answering.find_original(s, tenant_id, headers)

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
        tenant: TenantSection,
        identity: Identity,
        original: Original,
        now: datetime,
    ) -> set[int]:
        """Record the answer; ``\\Answered`` and the agent's ``$AnsweredBy<Name>`` on every copy of
        the customer message, the agent's answering marks ended (:func:`gateway.answering.answered`);
        the folders changed."""
        s.add(
            Event(
                tenant_id=tenant.id,
                agent_id=identity.agent_id,
                message_id=original.id,
                kind="answered",
                at=now,
                response_seconds=max(0.0, (now - original.received_at).total_seconds()),
            )
        )
        return await answering.answered(s, tenant, identity, original.message_id)

"""The outbound relay queue: messages with per-recipient state.

A queued message's blob and rows are committed before the submitting client
gets ``250``. A recipient is ``pending`` until the tenant's server accepts it
(``sent``) or refuses it for good or the message expires (``failed``). A
message whose recipients are all done leaves the queue.

Claims: an instance takes a due message with :func:`due`, which marks it
``claimed_by`` that instance until ``claimed_until``, in the same write
transaction that selects it (PostgreSQL skips rows another transaction is
claiming, SQLite serialises writers), so two instances never both attempt
it, and at most the tenant's concurrency of its messages are claimed at once
across every instance. :func:`record` ends the claim with the attempt's
results; :func:`unclaim` ends it without any (the attempt could not be made).

The end of DATA: the holder commits :func:`ending` (``ended_at``) just before
it sends the final ``.``, and :func:`record` clears it with the server's
answer. A message whose holder died between the two may or may not be at
the server: it is never claimed again by itself (:func:`due` skips it; a
resend could duplicate it, assuming it sent could lose it) but shows as
``uncertain`` for the operator, whose ``queue retry`` sends it again and
``queue drop`` takes it off. A holder that dies before :func:`ending` left
the server with no message (an unfinished DATA is discarded), so the
message is simply attempted again. On PostgreSQL
the claims of an instance whose id lock is free (its process was killed)
are taken over at once (:func:`_dead_holders`). A claim whose
holder died runs out and the message is due again for anyone; an instance
that restarts releases its own old claims at once (:func:`release`). The
holder must finish an attempt before its claim runs out.

Identity and history: each message gets its ``queue_id`` when queued (12
random hex digits, checked against every id ever used, so never reused): the
one id the submitting client, ``mailgate queue``, the logs and the DSN show.
Every change of state writes an ``outbound_log`` row in the same
transaction: ``queued`` (its ``reply`` holds a JSON summary: sender, agent,
Message-ID, size, recipients), one row per recipient and attempt (``sent``,
``deferred``, ``failed``, ``expired``, with the attempt number, smarthost
and reply), ``retry`` and ``dropped`` by the operator, and ``notified`` for
each DSN; the rows outlive the message (``mailgate queue show``). A message
queued without an id (before migration 0008) gets one at the relay
worker's next pass (:func:`due`); its history starts there.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import bindparam, delete, exists, func, insert, or_, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from storage import jobs
from storage.db import Prepared, rows_changed
from storage.instances import advisory_key
from storage.models import Agent, Base, Instance, Outbound, OutboundLog, OutboundRecipient

# A holder ends every attempt within this (the relay worker cuts it off), its answer recorded.
ATTEMPT_DEADLINE = timedelta(minutes=10)

# What an attempt's outcome for a recipient (the ``outbound_log`` event) leaves as its state.
OUTCOMES = {"sent": "sent", "deferred": "pending", "failed": "failed", "expired": "failed"}


@dataclass(frozen=True, slots=True)
class Queued:
    """A queued message, its recipients still to deliver and the login of the agent who sent it."""

    row: Outbound
    pending: tuple[str, ...]
    agent: str | None = None


def new_id() -> str:
    """A fresh random queue id (12 lowercase hex digits); :func:`enqueue` makes sure it is unused."""
    return secrets.token_hex(6)


# The statements every queued message goes through, built once and run as storage.db.Prepared
# (Core on the tables): building one and its cache key costs 50-80 us a call, and SQLAlchemy's
# execution of it as much again, a good part of a relayed message's CPU (docs/benchmarks.md, the relay).
_outbound, _recipients, _log_rows = (
    Base.metadata.tables[n] for n in ("outbound", "outbound_recipients", "outbound_log")
)
_ID_TAKEN = Prepared(
    select(
        exists().where(_outbound.c.queue_id == bindparam("qid"))
        | exists().where(_log_rows.c.queue_id == bindparam("qid"))
    )
)
_INSERT_OUTBOUND = Prepared(insert(_outbound).returning(_outbound.c.id))
_INSERT_RECIPIENTS = Prepared(insert(_recipients))
_INSERT_LOG = Prepared(insert(_log_rows))
_ENDING = Prepared(
    update(_outbound)
    .where(
        _outbound.c.id == bindparam("oid"),
        _outbound.c.claimed_by == bindparam("instance"),
        _outbound.c.ended_at.is_(None),
    )
    .values(ended_at=bindparam("at"))
)
_DELETE = Prepared(delete(_outbound).where(_outbound.c.id == bindparam("oid")))


async def _unused_id(s: AsyncSession, wanted: str | None = None) -> str:
    """``wanted`` (or a fresh id) unless a message, present or past, has it; then a fresh one."""
    candidate = wanted or new_id()
    while (await _ID_TAKEN.run(s, {"qid": candidate})).rows[0][0]:
        candidate = new_id()
    return candidate


def _log(row: Outbound, at: datetime, event: str, **fields: object) -> dict[str, object]:
    """An ``outbound_log`` row about ``row`` (for ``_INSERT_LOG``)."""
    if row.queue_id is None:  # every path here named the message first
        raise ValueError(f"outbound message {row.id} has no queue id")
    return {"queue_id": row.queue_id, "tenant_id": row.tenant_id, "at": at, "event": event, **fields}


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
    message_id: str | None = None,
    queue_id: str | None = None,
    agent_login: str | None = None,
) -> Outbound:
    """Queue a message for the tenant's relay, due now; the row returned (not in the session) has
    its ``id`` and ``queue_id``.

    ``queue_id`` is the id to give it if no message ever had it (the SMTP
    transaction's own), else a fresh one is chosen. ``agent_login`` is the
    login of ``agent_id`` when the caller knows it (else it is looked up).
    """
    values = {
        "queue_id": await _unused_id(s, queue_id),
        "message_id": message_id,
        "tenant_id": tenant_id,
        "agent_id": agent_id,
        "mail_from": mail_from,
        "blob": blob,
        "size": size,
        "created_at": now,
        "next_attempt_at": now,
        "attempts": 0,
        "original_id": original_id,
        "delay_notified": False,
    }
    # A Core insert, not the session's unit of work (a flush per message); the row returned is
    # not in the session (callers read it).
    ((outbound_id,),) = (await _INSERT_OUTBOUND.run(s, values)).rows
    row = Outbound(id=outbound_id, **values)
    addresses = list(dict.fromkeys(recipients))
    # The recipients and the history line as Core inserts: nothing reads them back as objects here.
    await _INSERT_RECIPIENTS.run(
        s, [{"outbound_id": row.id, "address": a, "state": "pending"} for a in addresses]
    )
    if agent_login is None and agent_id is not None:
        agent_login = await s.scalar(select(Agent.login).where(Agent.id == agent_id))
    summary = {
        "mail_from": mail_from,
        "agent": agent_login if agent_id is not None else None,
        "message_id": message_id,
        "size": size,
        "recipients": addresses,
    }
    await _INSERT_LOG.run(s, _log(row, now, "queued", reply=json.dumps(summary, ensure_ascii=False)))
    return row


async def due(
    s: AsyncSession,
    now: datetime,
    *,
    instance: str,
    claim_for: timedelta,
    concurrency: Mapping[str, int],
    limit: int = 200,
) -> list[Queued]:
    """Claim messages whose next attempt is due, with their pending recipients.

    Call it in a write transaction. Each tenant has at most
    ``concurrency[tenant]`` messages claimed at once across every instance
    (tenants not in ``concurrency`` get none): the claims held now, by this
    instance or a live other, count against it. Claiming instances take turns
    (:func:`storage.jobs.serialised`), so two of them never both see the same
    free room. A message claimed by another instance is skipped until its
    claim runs out at ``claimed_until`` or its holder is found dead.
    """
    # Messages queued before ids existed get one now, claimable or not, so `queue` commands can name them.
    for unnamed in (
        await s.scalars(
            select(Outbound).where(Outbound.queue_id.is_(None)).limit(limit).with_for_update(skip_locked=True)
        )
    ).all():
        unnamed.queue_id = await _unused_id(s)
    await jobs.serialised(s, "relay-claims")
    dead = await _dead_holders(s, now)
    held = dict(
        (
            await s.execute(
                select(Outbound.tenant_id, func.count())
                .where(Outbound.claimed_until > now, Outbound.claimed_by.not_in(dead))
                .group_by(Outbound.tenant_id)
            )
        ).all()
    )
    left = {t: n - held.get(t, 0) for t, n in concurrency.items()}
    tenants = [t for t, n in left.items() if n > 0]
    if not tenants:
        await s.flush()
        return []
    # Up to ``limit`` due messages are looked at, but only the few there is room for are claimed:
    # read ids, and load rows only for those (a backlog of hundreds made each pass build hundreds
    # of ORM objects to claim one or two of them).
    candidates = (
        await s.execute(
            select(Outbound.id, Outbound.tenant_id)
            .where(
                Outbound.next_attempt_at <= now,
                Outbound.ended_at.is_(None),
                Outbound.tenant_id.in_(tenants),
                or_(
                    Outbound.claimed_until.is_(None),
                    Outbound.claimed_until <= now,
                    Outbound.claimed_by.in_(dead),
                ),
            )
            .order_by(Outbound.next_attempt_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    ).all()
    chosen: dict[int, int] = {}  # id -> its place in the due order
    for outbound_id, tenant_id in candidates:
        if left[tenant_id] > 0:
            left[tenant_id] -= 1
            chosen[outbound_id] = len(chosen)
    if not chosen:
        await s.flush()
        return []
    # With each one's agent login (for the logs) in the same query.
    found = sorted(
        (
            await s.execute(
                select(Outbound, Agent.login)
                .outerjoin(Agent, Agent.id == Outbound.agent_id)
                .where(Outbound.id.in_(list(chosen)))
            )
        ).all(),
        key=lambda found: chosen[found[0].id],
    )
    rows = [row for row, _ in found]
    for row in rows:
        row.claimed_by, row.claimed_until = instance, now + claim_for
    await s.flush()
    pending: dict[int, list[str]] = {}
    for outbound_id, address in await s.execute(
        select(OutboundRecipient.outbound_id, OutboundRecipient.address).where(
            OutboundRecipient.outbound_id.in_([r.id for r in rows]), OutboundRecipient.state == "pending"
        )
    ):
        pending.setdefault(outbound_id, []).append(address)
    return [Queued(r, tuple(pending.get(r.id, ())), login) for r, login in found]


async def _dead_holders(s: AsyncSession, now: datetime) -> list[str]:
    """Registered instances holding unexpired claims whose id lock is free: their process is gone.

    PostgreSQL only (on SQLite one instance runs and releases its old claims
    at start). A live instance holds the session advisory lock of its id
    (:func:`storage.instances.advisory_key`) until its process ends, so a
    claim of an id whose lock nobody holds belongs to a killed run and is
    taken over at once rather than when ``claimed_until`` comes. A holder
    without an ``instances`` row (never registered) keeps its claims until
    they run out.
    """
    if s.get_bind().dialect.name != "postgresql":
        return []
    holders = (
        await s.scalars(
            select(Instance.id).where(
                Instance.id.in_(
                    select(Outbound.claimed_by).where(
                        Outbound.claimed_by.is_not(None), Outbound.claimed_until > now
                    )
                )
            )
        )
    ).all()
    if not holders:
        return []
    locked = {
        int.from_bytes(((classid << 32) | objid).to_bytes(8, "big"), "big", signed=True)
        for classid, objid in await s.execute(
            text(
                "SELECT classid::bigint, objid::bigint FROM pg_locks"
                " WHERE locktype = 'advisory' AND objsubid = 1 AND granted"
            )
        )
    }
    return [h for h in holders if advisory_key(h) not in locked]


class ClaimLost(Exception):
    """The claim on a message is no longer this instance's: it must not send the end of DATA."""


async def ending(s: AsyncSession, row: Outbound, instance: str, at: datetime) -> None:
    """Note that ``instance`` is about to send the end of DATA (see the module's doc).

    Raises :class:`ClaimLost` if the claim is no longer ``instance``'s (it
    ran out and another instance took the message): then the transaction is
    left unfinished and the server discards it.
    """
    if not (await _ENDING.run(s, {"oid": row.id, "instance": instance, "at": at})).rowcount:
        raise ClaimLost(f"queued message {row.queue_id} is no longer claimed by {instance}")


def uncertain(row: Outbound, now: datetime) -> bool:
    """True when the message's end of DATA was sent and its answer never recorded (its holder died)."""
    return row.ended_at is not None and (
        row.claimed_until is None or row.claimed_until <= now or row.ended_at <= now - ATTEMPT_DEADLINE
    )


async def unclaim(s: AsyncSession, row: Outbound, instance: str) -> None:
    """End ``instance``'s claim on a message without recording an attempt: due again at once."""
    await s.execute(
        update(Outbound)
        .where(Outbound.id == row.id, Outbound.claimed_by == instance)
        .values(claimed_by=None, claimed_until=None)
        .execution_options(synchronize_session=False)
    )


async def release(s: AsyncSession, instance: str) -> int:
    """End every claim ``instance`` holds (its previous run died holding them); how many."""
    return await rows_changed(
        s,
        update(Outbound)
        .where(Outbound.claimed_by == instance)
        .values(claimed_by=None, claimed_until=None)
        .execution_options(synchronize_session=False),
    )


async def record(
    s: AsyncSession,
    row: Outbound,
    results: Mapping[str, tuple[str, str]],
    *,
    pending: Collection[str],
    error: str | None,
    next_attempt_at: datetime,
    at: datetime,
    smarthost: str | None,
) -> bool:
    """Record attempt ``row.attempts + 1`` of a claimed message and end its claim; True when done.

    ``results`` maps each attempted recipient to its outcome (a key of
    :data:`OUTCOMES`) and the reply; each is logged with the attempt number
    and ``smarthost``. ``pending`` is the recipients that were pending when
    the message was claimed (the claim kept anyone else from changing them).
    A message with no pending recipient left is removed from the queue (its
    log stays): when every one of ``pending`` is done, at once, without
    updating the recipients first (the usual case, and the one between a
    server's ``250`` and this commit, where a crash means a resend: kept
    short).
    """
    attempt = row.attempts + 1
    if results:
        await _INSERT_LOG.run(
            s,
            [
                _log(
                    row,
                    at,
                    outcome,
                    attempt=attempt,
                    recipient=address,
                    smarthost=smarthost,
                    reply=reply[:500],
                )
                for address, (outcome, reply) in results.items()
            ],
        )
    if set(pending) <= {a for a, (outcome, _) in results.items() if OUTCOMES[outcome] != "pending"}:
        await _DELETE.run(s, {"oid": row.id})
        return True
    for address, (outcome, reply) in results.items():
        await s.execute(
            update(OutboundRecipient)
            .where(OutboundRecipient.outbound_id == row.id, OutboundRecipient.address == address)
            .values(state=OUTCOMES[outcome], last_reply=reply[:500])
        )
    left = await s.scalar(
        select(func.count()).where(
            OutboundRecipient.outbound_id == row.id, OutboundRecipient.state == "pending"
        )
    )
    if not left:
        await _DELETE.run(s, {"oid": row.id})
        return True
    await s.execute(
        update(Outbound)
        .where(Outbound.id == row.id)
        .values(
            attempts=Outbound.attempts + 1,
            last_error=error,
            next_attempt_at=next_attempt_at,
            claimed_by=None,
            claimed_until=None,
            ended_at=None,
        )
    )
    return False


async def notified(s: AsyncSession, row: Outbound, at: datetime, what: str) -> None:
    """Log that a DSN about the message went to its sender (``what`` names it)."""
    await _INSERT_LOG.run(s, _log(row, at, "notified", reply=what))


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


async def _by_queue_id(s: AsyncSession, queue_id: str) -> Outbound | None:
    return await s.scalar(select(Outbound).where(Outbound.queue_id == queue_id).with_for_update())


async def retry_now(s: AsyncSession, queue_id: str, now: datetime) -> bool:
    """Make a queued message due now (the operator's retry); False if there is no such message."""
    row = await _by_queue_id(s, queue_id)
    if row is None:
        return False
    row.next_attempt_at = now
    row.ended_at = None  # the operator's word: send it again even if the server may have it
    await _INSERT_LOG.run(s, _log(row, now, "retry"))
    await s.flush()
    return True


async def drop(s: AsyncSession, queue_id: str, now: datetime) -> bool:
    """Remove a message from the queue without sending it; False if there is none."""
    row = await _by_queue_id(s, queue_id)
    if row is None:
        return False
    pending = (
        await s.scalars(
            select(OutboundRecipient.address).where(
                OutboundRecipient.outbound_id == row.id, OutboundRecipient.state == "pending"
            )
        )
    ).all()
    await _INSERT_LOG.run(s, _log(row, now, "dropped", reply=" ".join(pending) or None))
    await _DELETE.run(s, {"oid": row.id})
    return True


@dataclass(frozen=True, slots=True)
class History:
    """A message's history (oldest first) and, while it is queued, its row and recipients."""

    queue_id: str
    tenant_id: str
    log: tuple[OutboundLog, ...]
    row: Outbound | None
    recipients: tuple[OutboundRecipient, ...]


async def history(s: AsyncSession, queue_id: str) -> History | None:
    """Everything known about a message, queued or gone; None if no message ever had ``queue_id``."""
    log = (
        await s.scalars(
            select(OutboundLog)
            .where(OutboundLog.queue_id == queue_id)
            .order_by(OutboundLog.at, OutboundLog.id)
        )
    ).all()
    row = await s.scalar(select(Outbound).where(Outbound.queue_id == queue_id))
    if row is None and not log:
        return None
    recipients = (
        (await s.scalars(select(OutboundRecipient).where(OutboundRecipient.outbound_id == row.id))).all()
        if row is not None
        else []
    )
    tenant_id = row.tenant_id if row is not None else log[0].tenant_id
    return History(queue_id, tenant_id, tuple(log), row, tuple(recipients))


@dataclass(frozen=True, slots=True)
class Summary:
    """What was queued: from the ``queued`` log row, or (queued before ids existed) the queue row."""

    mail_from: str | None
    agent: str | None
    message_id: str | None
    size: int | None
    recipients: tuple[str, ...]


def summary(h: History) -> Summary:
    """The message's summary as queued."""
    queued = next((e for e in h.log if e.event == "queued" and e.reply), None)
    if queued is not None and queued.reply is not None:
        data = json.loads(queued.reply)
        return Summary(
            data.get("mail_from"),
            data.get("agent"),
            data.get("message_id"),
            data.get("size"),
            tuple(data.get("recipients", ())),
        )
    row = h.row
    return Summary(
        row.mail_from if row else None,
        None,
        row.message_id if row else None,
        row.size if row else None,
        tuple(r.address for r in h.recipients),
    )

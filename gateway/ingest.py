"""The ingest pipeline: one path for every source (SMTP, IMAP pull, APPEND).

Theory of operation
-------------------
1. Parse the header block only; the raw bytes are never changed.
2. Decide: the spam verdict (upstream headers, or the source says so), then
   the tenant's rules, give a folder, labels and flags. :func:`decide` is pure
   so ``mailgate rules test`` shows exactly what delivery would do.
3. Commit: the blob is written and fsynced first, then one transaction
   records the dedupe key, creates the folder if needed, appends the message
   (UID, MODSEQ and usage counters) and queues any forwards.
4. Only when :meth:`Pipeline.deliver` returns may the source acknowledge
   (SMTP ``250``, upstream delete). A crash before that loses nothing: the
   source retries, and the dedupe key turns the retry into a no-op.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

import rules
from gateway.config import TenantSection
from gateway.message import Headers, parse_headers
from storage import mailstore
from storage.blobs import BlobStore
from storage.db import Database
from storage.models import IngestKey, Outbound, OutboundRecipient

log = structlog.get_logger(__name__)

_SPAM_HEADERS = ("x-spam-flag", "x-spam", "x-spam-status")


@dataclass(frozen=True, slots=True)
class Delivery:
    """How a message reached us, as told by its source."""

    source: str  # "smtp", "imap", "append": the metrics label
    mail_from: str = ""
    recipients: tuple[str, ...] = ()  # envelope recipients of this tenant
    dedupe_key: str | None = None  # e.g. "imap:acct/INBOX/uidvalidity/uid"; else Message-ID + body hash
    default_folder: str = mailstore.INBOX  # where mail goes when no rule picks a folder
    spam: bool = False  # the source already knows it is spam (upstream Junk)
    received_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    """Where a message goes and with which flags, and why."""

    folder: str | None  # None: the tenant's \\Junk folder
    flags: frozenset[str]
    spam: bool
    spam_reason: str
    decision: rules.Decision

    def explain(self) -> str:
        """Human-readable explanation for ``mailgate rules test``."""
        lines = [self.decision.explain()]
        if self.spam:
            lines.append(f"spam: yes ({self.spam_reason})")
        lines.append("delivered to: " + (self.folder or "the \\Junk folder"))
        if self.flags:
            lines.append("flags: " + " ".join(sorted(self.flags)))
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What delivery did."""

    tenant: str
    folder: str
    uid: int | None  # None for a duplicate
    duplicate: bool
    verdict: Verdict = field(repr=False)


def spam_verdict(headers: Headers) -> str | None:
    """The upstream header that marks a message as spam, or None."""
    for name in _SPAM_HEADERS:
        for value in headers.get_all(name):
            if value.strip().lower().startswith("yes"):
                return f"{name}: {value.strip()[:40]}"
    return None


class _HeaderMap(Mapping[str, tuple[str, ...]]):
    """Decoded header values by lower-case name, decoded only when a rule asks."""

    def __init__(self, headers: Headers) -> None:
        self._headers = headers

    def __getitem__(self, name: str) -> tuple[str, ...]:
        return self._headers.get_all(name)

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys(n.lower() for n, _ in self._headers.fields))

    def __len__(self) -> int:
        return len({n.lower() for n, _ in self._headers.fields})


def message_view(headers: Headers, size: int, delivery: Delivery) -> rules.MessageView:
    """What the rules see: envelope and header recipients, senders, subject, headers."""
    recipients = tuple(dict.fromkeys((*delivery.recipients, *headers.to_addrs, *headers.cc_addrs)))
    sender = (delivery.mail_from.lower(),) if delivery.mail_from else ()
    senders = tuple(dict.fromkeys((*headers.from_addrs, *sender)))
    return rules.MessageView(
        recipients=recipients,
        senders=senders,
        subject=headers.subject,
        headers=_HeaderMap(headers),
        size=size,
    )


def decide(tenant: TenantSection, headers: Headers, size: int, delivery: Delivery) -> Verdict:
    """Spam verdict and rules: the pure part of delivery."""
    decision = rules.evaluate(tenant.ruleset, message_view(headers, size, delivery))
    reason = "the source says so" if delivery.spam else spam_verdict(headers)
    if reason is None and decision.spam:
        reason = "a rule says so"
    flags = set(decision.labels)
    if decision.seen:
        flags.add("\\Seen")
    if decision.flagged:
        flags.add("\\Flagged")
    folder = None if reason else (decision.folder or delivery.default_folder)
    return Verdict(folder, frozenset(flags), reason is not None, reason or "", decision)


def fallback_key(headers: Headers, raw: bytes) -> str:
    """Dedupe key when the source has none: Message-ID (or origin fields) plus body hash."""
    h = hashlib.sha256()
    if headers.message_id:
        h.update(b"mid\0" + headers.message_id.encode("utf-8", "surrogateescape"))
    else:
        for name in ("from", "date", "subject", "to"):
            for value in headers.get_all(name):
                h.update(name.encode() + b"\0" + value.encode("utf-8", "surrogateescape") + b"\0")
    h.update(b"\0body\0" + hashlib.sha256(memoryview(raw)[headers.body_offset :]).digest())
    return "h:" + h.hexdigest()


class Pipeline:
    """Delivers raw messages into the mail store."""

    def __init__(self, db: Database, blobs: BlobStore, clock: Callable[[], datetime] | None = None) -> None:
        self.db = db
        self.blobs = blobs
        self.clock = clock or (lambda: datetime.now(UTC))

    async def deliver(self, tenant: TenantSection, raw: bytes, delivery: Delivery) -> Outcome:
        """Store ``raw`` byte-exact for ``tenant``; returns once it is durable."""
        headers = parse_headers(raw)
        verdict = decide(tenant, headers, len(raw), delivery)
        key = delivery.dedupe_key or await asyncio.to_thread(fallback_key, headers, raw)
        digest = await self.blobs.put(raw)
        now = self.clock()
        try:
            async with self.db.write() as s:
                if await s.get(IngestKey, (tenant.id, key)) is not None:
                    return self._duplicate(tenant, verdict)
                s.add(IngestKey(tenant_id=tenant.id, key=key, created_at=now))
                if verdict.folder is None:
                    folder = await mailstore.special_folder(s, tenant.id, mailstore.JUNK)
                    if folder is None:
                        folder = await mailstore.create_folder(
                            s, tenant.id, "Spam", special_use=mailstore.JUNK
                        )
                else:
                    folder = await mailstore.get_folder(s, tenant.id, verdict.folder)
                    if folder is None:
                        folder = await mailstore.create_folder(s, tenant.id, verdict.folder)
                (stored,) = await mailstore.append(
                    s,
                    folder,
                    [
                        mailstore.NewMessage(
                            blob=digest,
                            size=len(raw),
                            received_at=delivery.received_at or now,
                            message_id=headers.message_id,
                            in_reply_to=headers.in_reply_to[0] if headers.in_reply_to else None,
                            references=" ".join(headers.references) or None,
                            subject=headers.subject,
                            from_addr=", ".join(headers.from_addrs),
                            to_addr=", ".join(headers.to_addrs),
                            sent_date=headers.date,
                            flags=verdict.flags,
                        )
                    ],
                )
                folder_name = folder.name
                await self._queue_forwards(s, tenant, verdict, digest, len(raw), now)
        except IntegrityError:
            # A concurrent delivery of the same message committed first (PostgreSQL).
            async with self.db.read() as s:
                if await s.get(IngestKey, (tenant.id, key)) is not None:
                    return self._duplicate(tenant, verdict)
            raise
        log.info(
            "ingest.stored",
            tenant=tenant.id,
            source=delivery.source,
            folder=folder_name,
            uid=stored.uid,
            size=len(raw),
            spam=verdict.spam,
            rules=[t.rule for t in verdict.decision.trace if t.matched],
        )
        return Outcome(tenant.id, folder_name, stored.uid, False, verdict)

    def _duplicate(self, tenant: TenantSection, verdict: Verdict) -> Outcome:
        log.info("ingest.duplicate", tenant=tenant.id)
        return Outcome(tenant.id, verdict.folder or mailstore.JUNK, None, True, verdict)

    async def _queue_forwards(
        self, s: AsyncSession, tenant: TenantSection, verdict: Verdict, digest: str, size: int, now: datetime
    ) -> None:
        forwards = verdict.decision.forwards
        if not forwards or verdict.spam:
            return
        sender = tenant.smtp.from_ if tenant.smtp else None
        if sender is None:
            log.warning(
                "ingest.forward_skipped", tenant=tenant.id, reason="the tenant has no [tenants.smtp] from"
            )
            return
        out = Outbound(
            tenant_id=tenant.id,
            mail_from=sender,
            blob=digest,
            size=size,
            created_at=now,
            next_attempt_at=now,
            attempts=0,
        )
        s.add(out)
        await s.flush()
        s.add_all(OutboundRecipient(outbound_id=out.id, address=a, state="pending") for a in forwards)

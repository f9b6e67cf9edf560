"""The ingest pipeline: one path for every source (SMTP, IMAP pull, APPEND).

Theory of operation
-------------------
1. Parse the header block only; the raw bytes are never changed.
2. Decide: the spam verdict (the source says so, the spam filter's verdict the
   source asked for (:mod:`gateway.spam`), upstream headers), then
   the tenant's rules, give a folder, labels and flags. :func:`decide` is pure
   so ``mailgate rules test`` shows exactly what delivery would do.
3. Commit: the blob is written and fsynced first, then one transaction
   records the dedupe key, creates the folder if needed, appends the message
   (UID, MODSEQ and usage counters) and queues any forwards. A forwarded
   copy (From rewritten, see :mod:`gateway.forward`) is its own blob, written
   with the message's before the transaction; its envelope sender is SRS.
   :meth:`Pipeline.prepare` does steps 1-2 and the blob writes for a whole
   batch, in two child processes that work at once (:class:`MimeWorker`,
   :mod:`storage.blobs.writer`), and :meth:`Pipeline.commit` the
   transaction, so a source can prepare its next batch while one commits.
4. Only when :meth:`Pipeline.deliver` returns may the source acknowledge
   (SMTP ``250``, upstream delete). A crash before that loses nothing: the
   source retries, and the dedupe key turns the retry into a no-op.
5. Mail that does not fit the quota raises :class:`quotas.QuotaExceeded`
   (relay-in answers ``452``). A relay-in refusal is recorded as the tenant's
   ``smtp`` quota deferral (in a transaction of its own), and a relay-in
   message stored ends it (:func:`quotas.delivered`, in the storing
   transaction). :attr:`Pipeline.deferrals` is set whenever mail starts
   waiting, so the scheduler announces it at once.

Group commit: deliveries that arrive while a transaction is being committed
wait, and are then committed together in the next one. One writer
transaction (and one fsync) thus serves many concurrent deliveries instead
of each paying for its own. The commits run in a task of their own, so a
client that hangs up cannot cancel a transaction that holds others' mail;
if a shared transaction fails, each delivery in it is retried alone, so one
bad message never fails its neighbours.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import pickle
import secrets
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog
from sqlalchemy import bindparam, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

import quotas
import rules
from gateway import forward, metrics, mutf7, srs
from gateway.config import TenantSection
from gateway.imap import mime, sort
from gateway.message import Headers, parse_headers
from gateway.notify import Changes
from gateway.spam import Filter as SpamFilter
from gateway.spam import Result as SpamResult
from storage import mailstore, queue
from storage.blobs import BlobStore
from storage.child import Child, serve
from storage.db import Database
from storage.errors import StoreError
from storage.models import Folder, IngestKey, SpamVerdict

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
    system: bool = False  # our own notice (quota warning, DSN): stored even over quota
    scan: SpamResult | None = None  # the spam filter's verdict (its headers already prepended)


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
    folder_id: int | None = None  # None for a duplicate


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


# Characters Thunderbird turns into "_" when it makes a tag's keyword, plus the rest of IMAP's
# atom-specials (a keyword is an atom: RFC 3501 flag-keyword).
_NOT_IN_KEYWORD = frozenset(' ()/{%*<>\\"]')


def label_keyword(label: str) -> str:
    """The IMAP keyword of a rule's label.

    A label that is already an atom of printable ASCII is the keyword as
    written (``Invoice``). Any other is mapped as Thunderbird makes a tag's
    key from its name: characters an atom cannot hold (and ``/``) become
    ``_``, the rest is modified UTF-7 (RFC 3501 5.1.3), then lower case:
    ``"Księgowość (pilne)"`` is ``ksi&ark-gowo&avsbbw-__pilne_``, so a
    Thunderbird user who makes a tag of that name sees it on the messages the
    rule labelled.
    """
    if label.isascii() and label.isprintable() and not _NOT_IN_KEYWORD.intersection(label):
        return label
    cleaned = "".join("_" if c in _NOT_IN_KEYWORD or not c.isprintable() else c for c in label)
    return mutf7.encode(cleaned).lower()


def decide(tenant: TenantSection, headers: Headers, size: int, delivery: Delivery) -> Verdict:
    """Spam verdict and rules: the pure part of delivery."""
    decision = rules.evaluate(tenant.ruleset, message_view(headers, size, delivery))
    reason = "the source says so" if delivery.spam else None
    if reason is None and delivery.scan is not None and delivery.scan.junk(tenant.spam):
        reason = delivery.scan.reason
    reason = reason or spam_verdict(headers)
    if reason is None and decision.spam:
        reason = "a rule says so"
    flags = {label_keyword(label) for label in decision.labels}
    if decision.seen:
        flags.add("\\Seen")
    if decision.flagged:
        flags.add("\\Flagged")
    folder = None if reason else (decision.folder or delivery.default_folder)
    return Verdict(folder, frozenset(flags), reason is not None, reason or "", decision)


def describe(
    raw: bytes,
    headers: Headers,
    digest: str,
    received_at: datetime,
    flags: frozenset[str],
    internal_date: datetime | None = None,
) -> mailstore.NewMessage:
    """A stored message's metadata: searchable header fields and IMAP structures.

    Parses the MIME structure once (CPU-heavy on big messages: call it in a thread).
    """
    message = mailstore.NewMessage(
        blob=digest,
        size=len(raw),
        received_at=received_at,
        internal_date=internal_date,
        message_id=headers.message_id,
        in_reply_to=headers.in_reply_to[0] if headers.in_reply_to else None,
        references=" ".join(headers.references) or None,
        subject=headers.subject,
        from_addr=", ".join(headers.from_addrs),
        to_addr=", ".join(headers.to_addrs),
        sent_date=headers.date,
        flags=flags,
    )
    return with_structures(raw, message, headers)


def with_structures(
    raw: bytes, message: mailstore.NewMessage, headers: Headers | None = None
) -> mailstore.NewMessage:
    """``message`` with its IMAP ENVELOPE, BODYSTRUCTURE, BODY and SORT keys computed from ``raw``
    (and from ``headers``, ``raw``'s parsed headers when the caller has them)."""
    envelope, bodystructure, body = mime.structures(raw)
    fields = (headers or parse_headers(raw)).fields
    subject = next((v for name, v in fields if name.lower() == "subject"), b"")
    return dataclasses.replace(
        message,
        envelope=envelope,
        bodystructure=bodystructure,
        body=body,
        sort_keys=sort.keys(sort.subject_text(subject), envelope),
    )


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


Examined = tuple[Headers, str, mailstore.NewMessage]


def examine(raws: Sequence[bytes], received: Sequence[datetime]) -> list[Examined]:
    """The CPU-bound part of preparing messages, plain data in and out (:class:`MimeWorker`): each
    message's headers, content key and metadata (the caller fills in its ``blob`` and ``flags``)."""
    out = []
    for raw, at in zip(raws, received, strict=True):
        headers = parse_headers(raw)
        out.append((headers, fallback_key(headers, raw), describe(raw, headers, "", at, frozenset())))
    return out


class MimeWorker:
    """Where :func:`examine` runs: the MIME work of every source's messages (pull and relay-in
    batches, APPENDs).

    With ``child`` (the daemon, on a machine with a core to spare) it runs in a child process
    (:mod:`storage.child`), out of the event loop's GIL and with no thread: a ProcessPoolExecutor
    brought each result back through two threads of its own, and a thread of the daemon shares the
    GIL with the loop. A child that dies fails what it had not answered: that work is done on a
    thread, and the next call starts a new child. Without ``child``, up to :data:`INLINE` bytes are
    examined on the event loop (a thread hop costs more) and more on a thread.
    """

    def __init__(self, *, child: bool = False) -> None:
        self.child = Child(__name__, "mime_main") if child else None

    async def examine(self, raws: Sequence[bytes], received: Sequence[datetime]) -> list[Examined]:
        """:func:`examine` of ``raws``, received at ``received``."""
        if self.child is not None:
            try:
                answer = await self.child.ask([pickle.dumps(list(received)), *raws])
            except OSError:
                log.warning("ingest.mime_process_lost", fallback="thread")
            else:
                examined: list[Examined] = pickle.loads(answer)  # noqa: S301 (our own child's answer)
                return examined
        elif sum(map(len, raws)) <= INLINE:
            return examine(raws, received)
        return await asyncio.to_thread(examine, raws, received)

    async def close(self) -> None:
        """End the child process, if any."""
        if self.child is not None:
            await self.child.close()


def mime_main() -> None:
    """The MIME worker's child process: :func:`examine` for each request (:class:`MimeWorker`)."""

    def answer(requests: list[list[bytes]]) -> list[bytes]:
        return [pickle.dumps(examine(frames[1:], pickle.loads(frames[0]))) for frames in requests]  # noqa: S301 (from our parent)

    serve(answer)


async def mime_worker() -> MimeWorker:
    """The daemon's :class:`MimeWorker`: a child process, started now, when the machine has a core
    to spare."""
    worker = MimeWorker(child=(os.cpu_count() or 1) >= 2)
    if worker.child is not None:
        await worker.child.start()
    return worker


@dataclass(frozen=True, slots=True)
class _Forward:
    """A forwarded copy to queue with the message: envelope, recipients, its durable blob."""

    mail_from: str
    recipients: tuple[str, ...]
    blob: str
    size: int


@dataclass(frozen=True, slots=True)
class Prepared:
    """A message ready to commit: parsed, decided, its blob (and its forwards' blobs) durable
    (:meth:`Pipeline.prepare`)."""

    raw_size: int
    headers: Headers
    delivery: Delivery
    verdict: Verdict
    keys: tuple[str, ...]
    digest: str
    message: mailstore.NewMessage
    forwards: tuple[_Forward, ...] = ()


GROUP_MAX = 500  # messages per group-commit transaction
INLINE = 64 * 1024  # bytes of messages examined on the event loop when there is no MIME child process

_SEEN_KEYS = select(IngestKey.key).where(
    IngestKey.tenant_id == bindparam("tid"), IngestKey.key.in_(bindparam("keys", expanding=True))
)
_INSERT_KEYS = insert(IngestKey)
# A message already given a verdict (the same content, stored before) keeps its row: one
# statement per group commit instead of a SELECT and an INSERT (issue #18).
_INSERT_VERDICTS = {
    "postgresql": postgresql.insert(SpamVerdict).on_conflict_do_nothing(),
    "sqlite": sqlite.insert(SpamVerdict).on_conflict_do_nothing(),
}


@dataclass(slots=True)
class _Job:
    """One deliver_many call waiting for a group commit."""

    tenant: TenantSection
    prepared: Sequence[Prepared]
    within: Within | None
    done: asyncio.Future[list[Outcome]]


# Runs inside the delivery transaction with the batch's outcomes (e.g. to
# advance an upstream folder's state and count what was stored).
Within = Callable[[AsyncSession, list["Outcome"]], Awaitable[None]]


class Pipeline:
    """Delivers raw messages into the mail store."""

    def __init__(
        self,
        db: Database,
        blobs: BlobStore,
        clock: Callable[[], datetime] | None = None,
        changes: Changes | None = None,
        srs_signer: srs.Signer | None = None,
        spam_filter: SpamFilter | None = None,
        workers: MimeWorker | None = None,
    ) -> None:
        """``srs_signer`` signs forwards' envelope senders (the daemon's persistent keys,
        :func:`gateway.forward.load_signer`); without one, a random key of this process.
        ``workers`` (:func:`mime_worker`) does the messages' MIME work; :meth:`close` stops it.
        """
        self.db = db
        self.blobs = blobs
        self.srs = srs_signer or srs.Signer((secrets.token_bytes(32),))
        self.clock = clock or (lambda: datetime.now(UTC))
        self.changes = changes or Changes()
        self.spam = spam_filter  # asked by the sources (relay-in, pull) before they deliver
        self.workers = workers or MimeWorker()
        self._pending: deque[_Job] = deque()
        self._drainer: asyncio.Task[None] | None = None
        self.deferrals = asyncio.Event()  # set when mail waits for quota (relay-in here, pull in the puller)

    async def deliver(self, tenant: TenantSection, raw: bytes, delivery: Delivery) -> Outcome:
        """Store ``raw`` byte-exact for ``tenant``; returns once it is durable."""
        (outcome,) = await self.deliver_many(tenant, [(raw, delivery)])
        return outcome

    async def deliver_many(
        self,
        tenant: TenantSection,
        items: Sequence[tuple[bytes, Delivery]],
        within: Within | None = None,
    ) -> list[Outcome]:
        """Store several messages in one transaction; returns once all are durable.

        A message is a duplicate when any of its dedupe keys (the source's own
        key, and always Message-ID plus body hash) was recorded before, or
        earlier in the same batch. ``within`` runs inside the transaction.
        """
        return await self.commit(tenant, await self.prepare(tenant, items), within)

    async def prepare(self, tenant: TenantSection, items: Sequence[tuple[bytes, Delivery]]) -> list[Prepared]:
        """The work before a commit, for a batch: headers, dedupe keys and MIME structures
        (:class:`MimeWorker`) while the blobs are written and fsynced (the blob writer), then the
        rules and any forwarded copies. Nothing is committed: a batch prepared and
        never committed leaves only unreferenced blobs, which retention removes."""
        if not items:
            return []
        now = self.clock()
        raws = [raw for raw, _ in items]
        received = [delivery.received_at or now for _, delivery in items]
        examined, digests = await asyncio.gather(
            self.workers.examine(raws, received), self.blobs.put_many(raws)
        )
        prepared = []
        for (raw, delivery), (headers, content_key, message), digest in zip(
            items, examined, digests, strict=True
        ):
            verdict = decide(tenant, headers, len(raw), delivery)
            keys = (delivery.dedupe_key, content_key) if delivery.dedupe_key else (content_key,)
            forwards = await self._forwards(tenant, raw, headers, delivery, verdict, digest)
            message = dataclasses.replace(message, blob=digest, flags=verdict.flags)
            prepared.append(Prepared(len(raw), headers, delivery, verdict, keys, digest, message, forwards))
        return prepared

    async def close(self) -> None:
        """Stop the MIME worker's child process, if any."""
        await self.workers.close()

    async def commit(
        self, tenant: TenantSection, prepared: Sequence[Prepared], within: Within | None = None
    ) -> list[Outcome]:
        """Commit prepared messages in one transaction (shared with other callers' by group commit);
        returns once it is durable. See :meth:`deliver_many`."""
        job = _Job(tenant, prepared, within, asyncio.get_running_loop().create_future())
        self._pending.append(job)
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain(), name="ingest-commit")
        try:
            outcomes = await asyncio.shield(job.done)
        except quotas.QuotaExceeded:
            await self._deferred(tenant, [p for p in prepared if p.delivery.source == "smtp"])
            raise
        for p, out in zip(prepared, outcomes, strict=True):
            if not out.duplicate:
                metrics.MESSAGES_RECEIVED.labels(tenant.id, p.delivery.source).inc()
            log.info(
                "ingest.duplicate" if out.duplicate else "ingest.stored",
                tenant=tenant.id,
                source=p.delivery.source,
                folder=out.folder,
                uid=out.uid,
                size=p.raw_size,
                spam=p.verdict.spam,
                spam_reason=p.verdict.spam_reason or None,
                spam_score=p.delivery.scan.score if p.delivery.scan else None,
                rules=[t.rule for t in p.verdict.decision.trace if t.matched],
            )
        return outcomes

    async def _deferred(self, tenant: TenantSection, refused: Sequence[Prepared]) -> None:
        """Record relay-in messages refused for quota (the sender retries them later)."""
        if not refused:
            return
        now = self.clock()
        try:
            async with self.db.write() as s:
                began = False
                for p in refused:
                    began = await quotas.record_refusal(s, tenant.id, "smtp", p.raw_size, now) or began
        except Exception:  # the refusal stands; only its bookkeeping failed
            log.exception("ingest.quota_deferral_not_recorded", tenant=tenant.id)
            return
        log.info("ingest.quota_deferred", tenant=tenant.id, source="smtp", deferral_began=began)
        self.deferrals.set()

    async def _drain(self) -> None:
        """Commit pending jobs, as many per transaction as are waiting."""
        while self._pending:
            group: list[_Job] = []
            size = 0
            while self._pending and (not group or size + len(self._pending[0].prepared) <= GROUP_MAX):
                job = self._pending.popleft()
                group.append(job)
                size += len(job.prepared)
            try:
                results = await self._commit(group)
            except Exception:  # noqa: BLE001 (each job is retried alone just below)
                results = None
            if results is not None:
                self.changes.publish(o.folder_id for r in results for o in r if o.folder_id is not None)
                for job, outcomes in zip(group, results, strict=True):
                    job.done.set_result(outcomes)
                continue
            for job in group:
                await self._commit_alone(job)

    async def _commit_alone(self, job: _Job) -> None:
        for attempt in (1, 2):
            try:
                (outcomes,) = await self._commit([job])
            except IntegrityError:
                # A concurrent writer (another process, PostgreSQL) recorded the same
                # key first; once more, its keys are now visible and dedupe it.
                if attempt == 2:
                    job.done.set_exception(StoreError("concurrent delivery conflict"))
            except Exception as exc:  # noqa: BLE001 (handed to the waiting source)
                job.done.set_exception(exc)
                return
            else:
                self.changes.publish(o.folder_id for o in outcomes if o.folder_id is not None)
                job.done.set_result(outcomes)
                return

    async def _forwards(
        self,
        tenant: TenantSection,
        raw: bytes,
        headers: Headers,
        delivery: Delivery,
        verdict: Verdict,
        digest: str,
    ) -> tuple[_Forward, ...]:
        """The forwarded copies the rules ask for (none for spam), their blobs written."""
        decision = verdict.decision
        if not decision.forwards or verdict.spam:
            return ()
        address = tenant.smtp.from_ if tenant.smtp else None
        if address is None:
            log.warning(
                "ingest.forward_skipped", tenant=tenant.id, reason="the tenant has no [tenants.smtp] from"
            )
            return ()
        # SMTP tells the envelope sender ("" for a bounce: forwarded as one); our own
        # notices are bounces too; pulled mail has none, so its From stands in.
        if delivery.source == "smtp" or delivery.system:
            original: str | None = "" if delivery.mail_from == "<>" else delivery.mail_from
        else:
            original = headers.from_addrs[0] if headers.from_addrs else None
        try:
            mail_from = (
                address
                if original is None
                else self.srs.forward(original, forward.srs_domain(tenant), self.clock())
            )
        except srs.Malformed:  # no address to return bounces to: they go to the tenant
            mail_from = address
        kept = tuple(a for a in decision.forwards if a in decision.keep_from)
        rewritten = tuple(a for a in decision.forwards if a not in decision.keep_from)
        out = [_Forward(mail_from, kept, digest, len(raw))] if kept else []
        if rewritten:
            data = forward.rewrite_from(raw, address=address, via=tenant.name or tenant.id)
            out.append(_Forward(mail_from, rewritten, await self.blobs.put(data), len(data)))
        return tuple(out)

    async def _commit(self, jobs: Sequence[_Job]) -> list[list[Outcome]]:
        """One transaction for all ``jobs``; their outcomes, in order."""
        now = self.clock()
        by_tenant: dict[str, list[int]] = {}
        for i, job in enumerate(jobs):
            by_tenant.setdefault(job.tenant.id, []).append(i)
        results: list[list[Outcome]] = [[] for _ in jobs]
        async with self.db.write() as s:
            for indexes in by_tenant.values():
                stored = await self._store(s, [jobs[i] for i in indexes], now)
                for i, outcomes in zip(indexes, stored, strict=True):
                    results[i] = outcomes
        return results

    async def _store(self, s: AsyncSession, jobs: Sequence[_Job], now: datetime) -> list[list[Outcome]]:
        """Store the jobs of one tenant: one key lookup, one append per folder."""
        tenant = jobs[0].tenant
        items = [(j, p) for j, job in enumerate(jobs) for p in job.prepared]
        all_keys = [k for _, p in items for k in p.keys]
        seen = set((await s.execute(_SEEN_KEYS, {"tid": tenant.id, "keys": all_keys})).scalars())
        folders: dict[str | None, Folder] = {}
        groups: dict[int, list[int]] = {}
        outcomes: list[Outcome | None] = []
        new_keys: list[dict[str, object]] = []
        for n, (_, p) in enumerate(items):
            if seen.intersection(p.keys):
                outcomes.append(Outcome(tenant.id, p.verdict.folder or mailstore.JUNK, None, True, p.verdict))
                continue
            seen.update(p.keys)
            new_keys += [{"tenant_id": tenant.id, "key": k, "created_at": now} for k in p.keys]
            if p.verdict.folder not in folders:
                folders[p.verdict.folder] = await self._folder(s, tenant.id, p.verdict.folder)
            groups.setdefault(folders[p.verdict.folder].id, []).append(n)
            outcomes.append(None)
        if new_keys:
            await s.execute(_INSERT_KEYS, new_keys)
        verdicts = {
            p.digest: {
                "tenant_id": tenant.id,
                "blob": p.digest,
                "score": p.delivery.scan.score if p.delivery.scan else None,
                "action": p.delivery.scan.action if p.delivery.scan else "",
                "reason": p.verdict.spam_reason[:255],
                "learned": "",
                "created_at": now,
            }
            for (_, p), out in zip(items, outcomes, strict=True)
            if out is None and (p.delivery.scan is not None or p.verdict.spam)
        }
        if verdicts:
            await s.execute(_INSERT_VERDICTS[s.get_bind().dialect.name], list(verdicts.values()))
        by_id = {f.id: f for f in folders.values()}
        for folder_id, indexes in groups.items():
            folder = by_id[folder_id]
            await quotas.check(
                s, folder, sum(items[n][1].raw_size for n in indexes if not items[n][1].delivery.system)
            )
            stored = await mailstore.append(s, folder, [items[n][1].message for n in indexes])
            for n, st in zip(indexes, stored, strict=True):
                outcomes[n] = Outcome(tenant.id, folder.name, st.uid, False, items[n][1].verdict, folder.id)
                await self._queue_forwards(s, tenant, items[n][1], now)
        per_job: list[list[Outcome]] = [[] for _ in jobs]
        for (j, _), out in zip(items, outcomes, strict=True):
            if out is not None:  # always, by now: every item was stored or found duplicate
                per_job[j].append(out)
        relayed = [
            p.raw_size
            for (_, p), o in zip(items, outcomes, strict=True)
            if o and not o.duplicate and p.delivery.source == "smtp"
        ]
        if relayed:
            await quotas.delivered(s, tenant.id, "smtp", max(relayed))
        for job, outs in zip(jobs, per_job, strict=True):
            if job.within is not None:
                await job.within(s, outs)
        return per_job

    @staticmethod
    async def _folder(s: AsyncSession, tenant_id: str, name: str | None) -> Folder:
        """The target folder (None: the \\Junk one), created on first use."""
        if name is None:
            folder = await mailstore.special_folder(s, tenant_id, mailstore.JUNK)
            return folder or await mailstore.create_folder(s, tenant_id, "Spam", special_use=mailstore.JUNK)
        folder = await mailstore.get_folder(s, tenant_id, name)
        return folder or await mailstore.create_folder(s, tenant_id, name)

    @staticmethod
    async def _queue_forwards(s: AsyncSession, tenant: TenantSection, p: Prepared, now: datetime) -> None:
        for f in p.forwards:
            await queue.enqueue(
                s,
                tenant_id=tenant.id,
                mail_from=f.mail_from,
                recipients=f.recipients,
                blob=f.blob,
                size=f.size,
                now=now,
            )

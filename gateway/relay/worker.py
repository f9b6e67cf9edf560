"""Delivers the outbound queue through each tenant's own SMTP server.

Theory of operation
-------------------
The worker wakes when something is queued (or every :data:`POLL` seconds),
takes the messages whose next attempt is due, and sends each through its
tenant's ``[tenants.smtp]`` settings, at most ``queue.concurrency`` at a time
per tenant. Security is always explicit: ``tls`` is implicit TLS, ``starttls``
requires STARTTLS (and refuses to send without it), ``none`` upgrades when
the server offers STARTTLS unless the tenant pinned ``security = "none"``. A
password never crosses a non-loopback link in clear unless the tenant set
``allow_plaintext_auth``. With ``auth = "oauth2"`` the access token comes from
the process's :class:`~gateway.oauth2.Tokens` (shared with the pullers) and
goes as SASL ``OAUTHBEARER`` or ``XOAUTH2``, whichever the server offers;
while no token can be had, the message is deferred (``451 4.7.0 OAuth2: ...``).

A connection whose transaction completed is kept for the tenant's next
message (:mod:`gateway.relay.smarthosts`): consecutive messages to one
smarthost skip the connection, greeting, EHLO, STARTTLS and AUTH.

The queue's bookkeeping goes through group commit (:meth:`storage.db.Database.grouped`): a
pass's claims, each attempt's end-of-DATA mark and each recorded outcome share
commits with whatever other deliveries write at the same moment.

Each pass claims the due messages it can start now in the database
(:func:`storage.queue.due`): ``queue.concurrency`` per tenant minus the
claims held by every instance, so two instances never attempt one message
and a tenant's smarthost never has more than ``queue.concurrency`` of its
messages in flight from the whole cluster. An attempt is cut off after
:data:`DEADLINE`, well before its claim runs out (:data:`CLAIM`); one that
could not be made at all (its blob unreadable, the database gone) gives its
claim back.

An attempt's outcome is an :class:`Attempt`. A recipient is ``sent`` only
when the transaction completed: the server accepted it at RCPT and answered
``250`` to the end of DATA. It is ``failed`` only on a ``5xx`` the server
gave to that recipient (RCPT) or to the message (MAIL, DATA), or when
configuration forbids sending. Everything else is ``pending`` and retried on
the ``queue.retry`` schedule: a ``4xx``, a network error or timeout, and any
reply other than the one expected at a stage, whatever its code (a ``250``
to AUTH is not a ``235``), kept as ``451 4.4.1 <stage> answered ...``. A
refused AUTH (``535``) is pending too: the tenant's credentials are the
operator's to fix, and the message waits for that until ``queue.lifetime``,
when every pending recipient fails. Failed recipients get one RFC 3464
notification delivered to the sender's tenant INBOX; a message still
undelivered after ``queue.delay_notice`` gets one delay notice. An attempt's
results are committed right after the server's answer, before QUIT, so a
restart resends only what was never accepted, or what the server accepted in
the instant before a crash (the irreducible window of SMTP: the server has
the message before we can write that down).

Tracing: each attempt's results are committed with one ``outbound_log`` row
per recipient (outcome, attempt number, smarthost, reply), and logged as one
``relay.attempt`` line with the tenant, agent, queue id, Message-ID and, per
recipient, its domain, outcome and the server's reply. A DSN names the queue
id and is logged (``notified``) in the transaction that delivers it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import ipaddress
import os
import re
import ssl
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import aiosmtplib
import structlog
from pydantic import SecretStr
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from gateway import metrics, oauth2
from gateway.config import Config, SMTPRelaySection, TenantSection
from gateway.ingest import Delivery, Outcome, Pipeline
from gateway.oauth2 import TokenError, Tokens, TokenSource
from gateway.relay import dsn, smarthosts
from gateway.relay.smarthosts import Smarthosts
from storage import queue
from storage.blobs import BlobStore
from storage.db import Database, uninterrupted
from storage.models import Outbound

log = structlog.get_logger(__name__)

T = TypeVar("T")

POLL = 5.0
TIMEOUT = 60.0  # per SMTP command
DEADLINE = queue.ATTEMPT_DEADLINE.total_seconds()  # per attempt, whatever the server does
CLAIM = timedelta(minutes=15)  # longer than DEADLINE: a live sender never loses its claim


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@functools.lru_cache(maxsize=32)
def _context(ca_file: str | None, mtime: float | None) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=ca_file)


def client_context(relay: SMTPRelaySection) -> ssl.SSLContext:
    """The TLS client context for a relay, built once per CA file (and its version).

    Building one loads the system trust store: tens of milliseconds of CPU in
    the event loop, far too much to spend on every attempt.
    """
    ca_file = str(relay.ca_file) if relay.ca_file else None
    return _context(ca_file, os.stat(ca_file).st_mtime if ca_file else None)


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one attempt established, recipient by recipient (each reply as ``"code text"``).

    Built only by :meth:`of`, so the rule lives in one place: ``sent`` holds
    recipients the server accepted at RCPT of a transaction whose DATA it
    answered ``250``, nothing else; ``failed`` holds 5xx replies; ``pending``
    everything to retry. ``error`` says why the transaction did not complete.
    """

    sent: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    pending: dict[str, str] = field(default_factory=dict)
    error: str | None = None

    @classmethod
    def of(
        cls,
        recipients: Iterable[str],
        refused: dict[str, str],
        reply: str,
        *,
        completed: bool,
        error: str | None = None,
    ) -> Attempt:
        """Each recipient's RCPT refusal if it had one, else ``reply``: sent only if ``completed``."""
        attempt = cls(error=error)
        for address in recipients:
            if address in refused:
                own = refused[address]
                (attempt.failed if own.startswith("5") else attempt.pending)[address] = own
            elif completed:
                attempt.sent[address] = reply
            else:
                (attempt.failed if reply.startswith("5") else attempt.pending)[address] = reply
        return attempt


# What each stage must answer. Any other reply, even a 2xx, means the transaction did not complete.
EXPECTED = {
    "greeting": "220",
    "EHLO": "250",
    "STARTTLS": "220",
    "AUTH": "235",
    "MAIL": "250",
    "RCPT": "250 or 251",
    "DATA": "354, then 250",
}


def _answered(stage: str, exc: aiosmtplib.SMTPResponseException) -> str:
    return f"{stage} answered {exc.code} {exc.message}: expected {EXPECTED[stage]}"


async def send(
    relay: SMTPRelaySection,
    hostname: str,
    mail_from: str,
    recipients: list[str],
    data: bytes,
    ending: Callable[[], Awaitable[None]],
    settle: Callable[[Attempt], Awaitable[T]],
    *,
    pool: Smarthosts,
    tenant_id: str,
    tokens: Tokens | None = None,
) -> T:
    """Send one message through ``relay`` and hand the outcome to ``settle`` before QUIT or reuse.

    ``ending`` runs just before the end of DATA (:func:`_transact`). The
    transaction is cut off after :data:`DEADLINE`. ``settle`` (recording the
    outcome) runs while the connection is still open: between the server's
    ``250`` and the recorded outcome lies the one moment where a killed
    process makes its message be sent again, and waiting for the server's
    answer to QUIT first would only widen it. A connection kept in ``pool``
    from an earlier message of the tenant is used if there is one (one found
    stale at ``MAIL`` is replaced by a fresh one, the message not yet begun);
    after a completed transaction the connection goes back to ``pool``.
    """
    oauth = None
    if relay.oauth2 is not None:
        source = (tokens or Tokens()).source(tenant_id, oauth2.SMTP_LABEL, relay.oauth2)
        try:
            oauth = (source, await source.token())
        except TokenError as exc:
            reply = f"451 4.7.0 OAuth2: {exc}"
            return await settle(Attempt.of(recipients, {}, reply, completed=False, error=reply))
    k = smarthosts.key(tenant_id, relay)
    kept = pool.take(k)
    client, messages = (kept.client, kept.messages) if kept else (_client(relay, hostname), 0)
    completed = False
    try:
        try:
            attempt = await _transact(
                client, relay, mail_from, recipients, data, ending, kept is not None, oauth
            )
        except _Stale:
            client.close()
            client, messages = _client(relay, hostname), 0
            attempt = await _transact(client, relay, mail_from, recipients, data, ending, False, oauth)
        completed = bool(attempt.sent)  # only a transaction whose DATA was answered 250 sends
        return await settle(attempt)
    finally:
        if completed and client.is_connected:
            pool.keep(k, client, messages + 1)
        else:
            await smarthosts.quit_politely(client)


def _client(relay: SMTPRelaySection, hostname: str) -> aiosmtplib.SMTP:
    """An unconnected client for ``relay``, its security explicit (see the module's doc)."""
    host, port, security = relay.effective
    start_tls: bool | None = True if security == "starttls" else None
    if security == "none" and relay.security_pinned:
        start_tls = False
    return aiosmtplib.SMTP(
        hostname=host,
        port=port,
        use_tls=security == "tls",
        start_tls=False if security == "tls" else start_tls,
        tls_context=client_context(relay),
        timeout=TIMEOUT,
        local_hostname=hostname,
    )


async def _authenticate_oauth2(
    client: aiosmtplib.SMTP, user: str, host: str, port: int, source: TokenSource, token: SecretStr
) -> None:
    """AUTH OAUTHBEARER or XOAUTH2 with an initial response; a challenge is the server's error."""
    if client.is_ehlo_or_helo_needed:
        await client.ehlo()
    mech = oauth2.mechanism(m.upper() for m in client.server_auth_methods)
    if mech is None:
        raise aiosmtplib.SMTPAuthenticationError(504, "the server offers neither OAUTHBEARER nor XOAUTH2")
    initial = base64.b64encode(oauth2.initial_response(mech, user, host, port, token))
    reply = await client.execute_command(b"AUTH", mech.encode(), initial)
    if reply.code == 334:  # the error, as a challenge: answered so that the server ends the exchange
        reply = await client.execute_command(base64.b64encode(oauth2.ABORT[mech]))
    if reply.code != 235:
        source.refused(token)  # maybe revoked early: the next attempt asks for a new one
        raise aiosmtplib.SMTPAuthenticationError(reply.code, reply.message)


class _Stale(Exception):
    """A kept connection failed at ``MAIL``: the server closed it meanwhile."""


def dot_stuffed(data: bytes) -> bytes:
    """A message as DATA carries it, up to the final ``.``: CRLF line ends, leading dots doubled."""
    lines = _LINE_END.sub(b"\r\n", data)
    if not lines.endswith(b"\r\n"):
        lines += b"\r\n"
    return _LEADING_DOT.sub(b"..", lines)


_LINE_END = re.compile(rb"\r\n|\r|\n")
_LEADING_DOT = re.compile(rb"^\.", re.MULTILINE)


async def _transact(
    client: aiosmtplib.SMTP,
    relay: SMTPRelaySection,
    mail_from: str,
    recipients: list[str],
    data: bytes,
    ending: Callable[[], Awaitable[None]],
    connected: bool,
    oauth: tuple[TokenSource, SecretStr] | None = None,
) -> Attempt:
    """One SMTP transaction on ``client``: its :class:`Attempt`.

    An unconnected ``client`` is connected first (greeting, EHLO, STARTTLS,
    AUTH); a ``connected`` one (kept from an earlier message) starts at
    ``MAIL``, and raises :class:`_Stale` if the server closed it meanwhile.

    ``ending`` is awaited after the message and before the final ``.``: it
    records that the server may have the message from then on (see
    :func:`storage.queue.ending`); if it raises, the transaction is left
    unfinished and the server discards it.
    """
    host = relay.effective[0]
    stage = "MAIL" if connected else "connect"
    refused: dict[str, str] = {}  # RCPT refusals: a 4xx or 5xx as given, anything else as a 451
    try:
        async with asyncio.timeout(DEADLINE):
            if not connected:
                await client.connect()  # greeting, EHLO, STARTTLS
            if relay.username and not connected:
                stage = "AUTH"
                encrypted = client.get_transport_info("sslcontext") is not None
                if not encrypted and not _loopback(host) and not relay.allow_plaintext_auth:
                    # Configuration forbids sending to this server at all: fails like a 5xx.
                    reply = f"554 5.7.10 refusing to send the password in clear to {host}"
                    return Attempt.of(recipients, {}, reply, completed=False, error=reply)
                if oauth is not None:
                    await _authenticate_oauth2(client, relay.username, *relay.effective[:2], *oauth)
                else:
                    password = relay.password()
                    await client.login(relay.username, password.get_secret_value() if password else "")
            stage = "MAIL"
            await client.mail(
                mail_from, options=[f"SIZE={len(data)}"] if client.supports_extension("size") else []
            )
            stage = "RCPT"
            for address in recipients:
                try:
                    await client.rcpt(address)
                except aiosmtplib.SMTPRecipientRefused as exc:
                    given = 400 <= exc.code < 600
                    refused[address] = (
                        f"{exc.code} {exc.message}" if given else f"451 4.4.1 {_answered(stage, exc)}"
                    )
            if len(refused) == len(recipients):
                return Attempt.of(recipients, refused, "", completed=False)
            stage = "DATA"
            start = await client.execute_command(b"DATA")
            if start.code != 354:
                raise aiosmtplib.SMTPDataError(start.code, start.message)
            protocol = client.protocol
            if protocol is None:
                raise aiosmtplib.SMTPServerDisconnected("connection lost")
            protocol.write(dot_stuffed(data))
            try:
                await ending()  # committed: from here on the server may have the message
                # No await between the end of DATA and reading its answer: nothing else reads it.
                protocol.write(b".\r\n")
                done = await protocol.read_response(timeout=TIMEOUT)
            except BaseException:
                client.close()  # not QUIT inside DATA: an unfinished message is discarded
                raise
            if done.code != 250:
                raise aiosmtplib.SMTPDataError(done.code, done.message)
            return Attempt.of(recipients, refused, f"{done.code} {done.message}", completed=True)
    except aiosmtplib.SMTPResponseException as exc:
        if connected and stage == "MAIL" and exc.code == 421:
            raise _Stale from exc  # the server is closing the kept connection
        if isinstance(exc, aiosmtplib.SMTPConnectResponseError):
            stage = "greeting"
        elif isinstance(exc, aiosmtplib.SMTPHeloError):
            stage = "EHLO"
        elif stage == "connect":
            stage = "STARTTLS"
        if exc.code >= 500 and stage in ("MAIL", "DATA"):
            reply = f"{exc.code} {exc.message}"  # the server refused the message itself
            return Attempt.of(recipients, refused, reply, completed=False, error=reply)
        error = _answered(stage, exc)
    except (aiosmtplib.SMTPException, OSError, TimeoutError, ValueError) as exc:
        if connected and stage == "MAIL" and isinstance(exc, ConnectionError):
            raise _Stale from exc  # the server closed the kept connection
        error = f"{type(exc).__name__}: {exc or 'no reply'} (at {stage})"
    return Attempt.of(recipients, refused, f"451 4.4.1 {error}", completed=False, error=error)


@dataclass(frozen=True, slots=True)
class Settled:
    """An attempt as recorded: each recipient's outcome and reply, and the notices it calls for."""

    attempt: Attempt
    results: dict[str, tuple[str, str]]
    failures: list[dsn.RecipientStatus]
    delayed: list[dsn.RecipientStatus]
    done: bool
    notify_delay: bool


def _status(reply: str) -> str:
    """The enhanced status code in a reply (``"550 5.1.1 ..."``), or one made from the basic code."""
    code, _, text = reply.partition(" ")
    first = text.split(" ", 1)[0]
    if first.count(".") == 2 and first[0] in "245":
        return first
    return f"{code[:1]}.0.0"


class RelayWorker:
    """Drains the outbound queue."""

    def __init__(
        self,
        config: Callable[[], Config],
        db: Database,
        blobs: BlobStore,
        pipeline: Pipeline,
        clock: Callable[[], datetime] | None = None,
        tokens: Tokens | None = None,
    ) -> None:
        self.config = config
        self.tokens = tokens or Tokens()  # OAuth2 access tokens, shared with the pullers
        self.db = db
        self.blobs = blobs
        self.pipeline = pipeline
        self.clock = clock or (lambda: datetime.now(UTC))
        self.wake = asyncio.Event()
        self.smarthosts = Smarthosts()  # connections kept from one message to the next
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Deliver what is due, then wait for more, until cancelled.

        Cancelling (shutdown) never cuts off a pass's claiming transaction
        (:func:`storage.db.uninterrupted`); :meth:`drain` then waits for the
        deliveries it started.
        """
        while True:
            # Cleared before the pass: a wake-up that arrives during it starts the next one.
            self.wake.clear()
            try:
                await uninterrupted(self.run_once())
            except Exception:
                log.exception("relay.pass_failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL):  # not wait_for: it can swallow a cancel (3.11)
                    await self.wake.wait()
            self.smarthosts.expire()

    async def run_once(self) -> None:
        """Claim what is due, as far as each tenant's concurrency allows, and start delivering it."""
        config = self.config()
        concurrency = {t.id: config.queue.concurrency for t in config.tenants}

        async def claim(s: AsyncSession) -> list[queue.Queued]:
            return await queue.due(
                s,
                self.clock(),
                instance=config.gateway.effective_instance,
                claim_for=CLAIM,
                concurrency=concurrency,
            )

        items = await self.db.grouped(claim)
        for item in items:
            task = asyncio.create_task(self._deliver(config, item))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait for deliveries in flight, then close the kept connections (tests and shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        await self.smarthosts.close()

    async def _deliver(self, config: Config, item: queue.Queued) -> None:
        """Attempt a claimed message under the configuration it was claimed with (its tenant exists)."""
        row = item.row
        try:
            await self._attempt(config, config.tenant(row.tenant_id), item)
        except Exception:
            log.exception(
                "relay.attempt_failed",
                tenant=row.tenant_id,
                agent=item.agent,
                queue_id=row.queue_id,
                message_id=row.message_id,
            )
            # Not recorded: give the claim back so that it does not hold the tenant's room for
            # the claim's 15 minutes (if the database is what failed, the claim runs out instead).
            try:
                async with self.db.write() as s:
                    await queue.unclaim(s, row, config.gateway.effective_instance)
            except Exception:
                log.exception("relay.unclaim_failed", tenant=row.tenant_id, queue_id=row.queue_id)
        finally:
            self.wake.set()  # a slot is free: more of this tenant's mail may be due

    async def _attempt(self, config: Config, tenant: TenantSection, item: queue.Queued) -> None:
        row = item.row
        now = self.clock()
        # With its size: a small blob is read on the loop, cheaper than a thread hop (FsBlobStore.get_many).
        (data,) = await self.blobs.get_many([row.blob], row.size)
        smarthost = None
        if tenant.smtp is not None:
            host, port, _ = tenant.smtp.effective
            smarthost = f"{host}:{port}"

        async def ending() -> None:
            async def mark(s: AsyncSession) -> None:
                await queue.ending(s, row, config.gateway.effective_instance, self.clock())

            await self.db.grouped(mark)

        async def settle(attempt: Attempt) -> Settled:
            return await self._record(config, item, attempt, now, smarthost)

        if tenant.smtp is None:
            reply = "554 5.3.5 the tenant has no outbound SMTP settings"
            settled = await settle(Attempt.of(item.pending, {}, reply, completed=False, error=reply))
        elif not item.pending:
            settled = await settle(Attempt())
        else:
            settled = await send(
                tenant.smtp,
                config.gateway.hostname,
                row.mail_from,
                list(item.pending),
                data,
                ending,
                settle,
                pool=self.smarthosts,
                tenant_id=tenant.id,
                tokens=self.tokens,
            )
        attempt, results = settled.attempt, settled.results
        for outcome, _ in results.values():
            result = {"sent": "sent", "deferred": "deferred"}.get(outcome, "bounced")
            metrics.RELAY_MESSAGES.labels(tenant.id, result).inc()
        log.info(
            "relay.attempt",
            tenant=tenant.id,
            agent=item.agent,
            queue_id=row.queue_id,
            message_id=row.message_id,
            attempt=row.attempts + 1,
            smarthost=smarthost,
            # Each recipient by its domain only; the reply is the server's, verbatim.
            recipients=[
                {"domain": address.rpartition("@")[2], "result": outcome, "reply": reply[:500]}
                for address, (outcome, reply) in results.items()
            ],
            sent=len(attempt.sent),
            failed=len(settled.failures),
            deferred=len(settled.delayed),
            done=settled.done,
            error=attempt.error,
        )
        if settled.failures:
            await self._notify(config, item, data, settled.failures, now)
        if settled.notify_delay:
            await self._notify(config, item, data, settled.delayed, now)

    async def _record(
        self, config: Config, item: queue.Queued, attempt: Attempt, now: datetime, smarthost: str | None
    ) -> Settled:
        """Commit an attempt's outcome, recipient by recipient, and end the claim."""
        row = item.row
        expired = now - row.created_at >= config.queue.lifetime
        results: dict[str, tuple[str, str]] = {r: ("sent", reply) for r, reply in attempt.sent.items()}
        failures = [
            dsn.RecipientStatus(r, "failed", _status(reply), reply) for r, reply in attempt.failed.items()
        ]
        for status in failures:
            results[status.address] = ("failed", status.diagnostic)
        delayed: list[dsn.RecipientStatus] = []
        for rcpt, reply in attempt.pending.items():
            if expired:
                failures.append(dsn.RecipientStatus(rcpt, "failed", "4.4.7", reply))
                results[rcpt] = ("expired", reply)
            else:
                delayed.append(dsn.RecipientStatus(rcpt, "delayed", _status(reply), reply))
                results[rcpt] = ("deferred", reply)
        schedule = config.queue.retry
        wait = schedule[min(row.attempts, len(schedule) - 1)]
        notify_delay = (
            bool(delayed) and not row.delay_notified and now - row.created_at >= config.queue.delay_notice
        )

        async def write(s: AsyncSession) -> bool:
            done = await queue.record(
                s,
                row,
                results,
                pending=item.pending,
                error=attempt.error
                or next((r for outcome, r in results.values() if outcome != "sent"), None),
                next_attempt_at=now + wait,
                at=now,
                smarthost=smarthost,
            )
            if notify_delay and not done:
                await s.execute(update(Outbound).where(Outbound.id == row.id).values(delay_notified=True))
            return done

        done = await self.db.grouped(write)  # with the other deliveries' records and claims
        return Settled(attempt, results, failures, delayed, done, notify_delay)

    async def _notify(
        self,
        config: Config,
        item: queue.Queued,
        data: bytes,
        recipients: list[dsn.RecipientStatus],
        now: datetime,
    ) -> None:
        """Deliver a DSN to the sender's tenant INBOX (never for a null sender)."""
        row = item.row
        mail_from = row.mail_from
        tenant = config.tenant_for_address(mail_from) if mail_from else None
        if tenant is None:
            return
        message = dsn.build(
            reporting_mta=config.gateway.hostname,
            to=mail_from,
            original=data,
            recipients=recipients,
            arrival=row.created_at,
            now=now,
            queue_id=row.queue_id,
        )
        failed = any(r.action == "failed" for r in recipients)
        what = f"{'failure' if failed else 'delay'} notice to {mail_from} about " + " ".join(
            r.address for r in recipients
        )

        async def logged(s: AsyncSession, _: list[Outcome]) -> None:
            await queue.notified(s, row, now, what)

        await self.pipeline.deliver_many(
            tenant, [(message, Delivery(source="dsn", recipients=(mail_from,), system=True))], within=logged
        )
        log.info(
            "relay.notified",
            tenant=row.tenant_id,
            agent=item.agent,
            queue_id=row.queue_id,
            message_id=row.message_id,
            failed=failed,
            rcpts=len(recipients),
        )

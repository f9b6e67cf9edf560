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
``allow_plaintext_auth``.

Each recipient's reply is kept: ``2xx`` sent, ``5xx`` failed, ``4xx`` (and
network errors) retried on the ``queue.retry`` schedule until
``queue.lifetime`` has passed, when it fails too. Failed recipients get one
RFC 3464 notification delivered to the sender's tenant INBOX; a message still
undelivered after ``queue.delay_notice`` gets one delay notice. An attempt's
results are committed right after the server's answer, so a restart resends
only what was never accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import os
import ssl
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime

import aiosmtplib
import structlog

from gateway import metrics
from gateway.config import Config, SMTPRelaySection, TenantSection
from gateway.ingest import Delivery, Pipeline
from gateway.relay import dsn
from storage import queue
from storage.blobs import BlobStore
from storage.db import Database
from storage.models import Outbound

log = structlog.get_logger(__name__)

POLL = 5.0
TIMEOUT = 60.0


class RelayRefused(Exception):
    """Sending is impossible by configuration (e.g. STARTTLS missing): fails like a 5xx."""


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


async def send(
    relay: SMTPRelaySection, hostname: str, mail_from: str, recipients: list[str], data: bytes
) -> dict[str, tuple[int, str]]:
    """Send one message; each recipient's reply (code, text).

    Raises :class:`aiosmtplib.SMTPException` (or OSError) for failures that
    concern the whole message, :class:`RelayRefused` when configuration forbids sending.
    """
    host, port, security = relay.effective
    context = client_context(relay)
    start_tls: bool | None = True if security == "starttls" else None
    if security == "none" and relay.security_pinned:
        start_tls = False
    client = aiosmtplib.SMTP(
        hostname=host,
        port=port,
        use_tls=security == "tls",
        start_tls=False if security == "tls" else start_tls,
        tls_context=context,
        timeout=TIMEOUT,
        local_hostname=hostname,
    )
    await client.connect()
    try:
        if relay.username:
            encrypted = client.get_transport_info("sslcontext") is not None
            if not encrypted and not _loopback(host) and not relay.allow_plaintext_auth:
                raise RelayRefused(f"refusing to send the password in clear to {host}")
            password = relay.password()
            await client.login(relay.username, password.get_secret_value() if password else "")
        try:
            refused, _ = await client.sendmail(mail_from, recipients, data)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            return {e.recipient: (e.code, e.message) for e in exc.recipients}
        return {r: (refused[r].code, refused[r].message) if r in refused else (250, "OK") for r in recipients}
    finally:
        if client.is_connected:
            try:
                await client.quit()
            except (aiosmtplib.SMTPException, OSError):
                client.close()


def _status(code: int, reply: str) -> str:
    """The enhanced status code in a reply, or one made from the basic code."""
    first = reply.split(" ", 1)[0]
    if first.count(".") == 2 and first[0] in "245":
        return first
    return f"{code // 100}.0.0"


class RelayWorker:
    """Drains the outbound queue."""

    def __init__(
        self,
        config: Callable[[], Config],
        db: Database,
        blobs: BlobStore,
        pipeline: Pipeline,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.config = config
        self.db = db
        self.blobs = blobs
        self.pipeline = pipeline
        self.clock = clock or (lambda: datetime.now(UTC))
        self.wake = asyncio.Event()
        self._inflight: set[int] = set()
        self._limits: defaultdict[str, asyncio.Semaphore] = defaultdict(
            lambda: asyncio.Semaphore(self.config().queue.concurrency)
        )
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Deliver what is due, then wait for more, until cancelled."""
        while True:
            # Cleared before the pass: a wake-up that arrives during it starts the next one.
            self.wake.clear()
            try:
                await self.run_once()
            except Exception:
                log.exception("relay.pass_failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), POLL)

    async def run_once(self) -> None:
        """Start a delivery for every due message not already in flight."""
        async with self.db.read() as s:
            items = await queue.due(s, self.clock(), exclude=self._inflight)
        for item in items:
            self._inflight.add(item.row.id)
            task = asyncio.create_task(self._deliver(item))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait for deliveries in flight (tests and shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _deliver(self, item: queue.Queued) -> None:
        row = item.row
        try:
            config = self.config()
            try:
                tenant = config.tenant(row.tenant_id)
            except KeyError:
                return
            async with self._limits[row.tenant_id]:
                await self._attempt(config, tenant, item)
        finally:
            self._inflight.discard(row.id)

    async def _attempt(self, config: Config, tenant: TenantSection, item: queue.Queued) -> None:
        row = item.row
        now = self.clock()
        data = await self.blobs.get(row.blob)
        replies: dict[str, tuple[int, str]]
        error: str | None = None
        if tenant.smtp is None:
            replies = {r: (554, "5.3.5 the tenant has no outbound SMTP settings") for r in item.pending}
        elif not item.pending:
            replies = {}
        else:
            try:
                replies = await send(
                    tenant.smtp, config.gateway.hostname, row.mail_from, list(item.pending), data
                )
            except RelayRefused as exc:
                replies = {r: (554, f"5.7.10 {exc}") for r in item.pending}
            except aiosmtplib.SMTPResponseException as exc:
                replies = {r: (exc.code, exc.message) for r in item.pending}
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                error = f"{type(exc).__name__}: {exc}"
                replies = {r: (451, f"4.4.1 {error}") for r in item.pending}
        expired = now - row.created_at >= config.queue.lifetime
        results: dict[str, tuple[str, str]] = {}
        failures: list[dsn.RecipientStatus] = []
        delayed: list[dsn.RecipientStatus] = []
        for rcpt, (code, text) in replies.items():
            reply = f"{code} {text}"
            if 200 <= code < 300:
                results[rcpt] = ("sent", reply)
            elif code >= 500 or expired:
                results[rcpt] = ("failed", reply)
                status = _status(code, text) if code >= 500 else "4.4.7"
                failures.append(dsn.RecipientStatus(rcpt, "failed", status, reply))
            else:
                results[rcpt] = ("pending", reply)
                delayed.append(dsn.RecipientStatus(rcpt, "delayed", _status(code, text), reply))
        schedule = config.queue.retry
        wait = schedule[min(row.attempts, len(schedule) - 1)]
        notify_delay = (
            bool(delayed) and not row.delay_notified and now - row.created_at >= config.queue.delay_notice
        )
        async with self.db.write() as s:
            done = await queue.record(
                s,
                row.id,
                results,
                error=error or next((r for _, r in results.values() if not r.startswith("2")), None),
                next_attempt_at=now + wait,
            )
            if notify_delay and not done:
                stored = await s.get(Outbound, row.id)
                if stored is not None:
                    stored.delay_notified = True
        for state, _ in results.values():
            result = {"sent": "sent", "failed": "bounced"}.get(state, "deferred")
            metrics.RELAY_MESSAGES.labels(tenant.id, result).inc()
        log.info(
            "relay.attempt",
            tenant=tenant.id,
            queue_id=row.id,
            sent=sum(state == "sent" for state, _ in results.values()),
            failed=len(failures),
            deferred=len(delayed),
            done=done,
        )
        if failures:
            await self._notify(config, row, data, failures, now)
        if notify_delay:
            await self._notify(config, row, data, delayed, now)

    async def _notify(
        self, config: Config, row: Outbound, data: bytes, recipients: list[dsn.RecipientStatus], now: datetime
    ) -> None:
        """Deliver a DSN to the sender's tenant INBOX (never for a null sender)."""
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
        )
        await self.pipeline.deliver(
            tenant, message, Delivery(source="dsn", recipients=(mail_from,), system=True)
        )

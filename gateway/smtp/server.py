"""SMTP relay-in: the one I/O class over aiosmtpd (asyncio-native, no Controller).

aiosmtpd runs the protocol state machine; :class:`RelayHandler` decides with
:mod:`gateway.smtp.policy` and delivers through the ingest pipeline, answering
``250`` only after the commit. :class:`MailgateSMTP` translates aiosmtpd's own
replies into enhanced status codes and never lets an exception's text reach
the client; it also reports to the listener's
:class:`~gateway.connections.ConnectionGate` (caps, making room, stress) and
arms aiosmtpd's idle timer from it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import socket
import ssl
import weakref
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, AnyStr

import structlog
from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, Session

from gateway import metrics, plans, spam, srs
from gateway.auth import Authenticator, AuthUnavailable, Identity
from gateway.config import Config, TenantSection
from gateway.connections import ConnectionGate
from gateway.ingest import Delivery, Pipeline
from gateway.message import parse_headers
from gateway.smtp import policy
from gateway.smtp.data import BlockDataSMTP
from gateway.smtp.outbox import Outbox
from storage import queue
from storage.db import uninterrupted
from storage.errors import StoreError

log = structlog.get_logger(__name__)

# aiosmtpd's size refusals (SIZE= at MAIL, too much DATA): replaced by ours, naming the limit.
_TOO_BIG = ("552 Error: Too much mail data", "552 Error: message size exceeds")
# aiosmtpd replies that lack enhanced status codes, by prefix.
_TRANSLATE = (
    ("500 Line too long", "500 5.5.2 Line too long"),
    ("500 Command line too long", "500 5.5.2 Command line too long"),
    ("500 Error: (", policy.TEMPFAIL),  # an exception's text: never shown to clients
)


class Limits:
    """Per-listener protocol bounds: recipients, line length, commands per session.

    Connection caps and idle timeouts are configuration (``[limits.smtp]``),
    applied by the listener's :class:`~gateway.connections.ConnectionGate`.
    """

    def __init__(self, *, recipients: int = 100, line_length: int = 32 * 1024, commands: int = 1000) -> None:
        self.recipients = recipients
        self.line_length = line_length
        self.commands = commands


class MailgateSMTP(BlockDataSMTP):
    """aiosmtpd's SMTP with our DATA reader, reply translation, connection gate and adaptive idle timeout.

    A session is *early* until ``MAIL FROM`` is accepted; the gate may close an
    early session that sits idle, and under stress allows it a shorter idle
    timeout. The timer is re-armed when a command starts and when its reply
    is sent, so it always reflects the session's current state.
    """

    def __init__(self, handler: RelayHandler, gate: ConnectionGate, limits: Limits, **kwargs: Any) -> None:
        # aiosmtpd sizes its stream reader from this during __init__.
        self.line_length_limit = limits.line_length
        self._gate = gate
        self.client_ip = ""
        self._admitted = False
        self._busy = False  # a command is being handled
        self._last_active = 0.0
        super().__init__(handler, **kwargs)
        self._listener = "submission" if getattr(handler, "submission", False) else "smtp"

    # ------------------------------------------------------------------ gate (Tracked)

    def _early(self) -> bool:
        return self.envelope is None or self.envelope.mail_from is None

    def idle_early_since(self) -> float | None:
        if self._busy or not self._early():
            return None
        return self._last_active

    def evict(self) -> None:
        if self.transport is not None:
            if isinstance(self.transport, asyncio.WriteTransport):
                self.transport.write(policy.EVICTED.format(host=self.hostname).encode() + b"\r\n")
            self.transport.close()

    def stress_changed(self) -> None:
        if self.transport is None or self._busy:
            return
        remaining = self._last_active + self._gate.timeout(self._early()) - self.loop.time()
        super()._reset_timeout(max(remaining, 0.001))

    def _reset_timeout(self, duration: float | None = None) -> None:
        # aiosmtpd calls this when a connection is made and when a valid command starts.
        self._busy = self.transport is not None
        self._last_active = self.loop.time()
        super()._reset_timeout(duration or self._gate.timeout(self._early()))

    # ------------------------------------------------------------------ connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        starttls = self.transport is not None
        super().connection_made(transport)
        if starttls:
            return
        self._busy = False
        peer = transport.get_extra_info("peername")
        self.client_ip = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        if self._gate.admit(self):
            self._admitted = True
            metrics.SESSIONS.labels(self._listener).inc()
            # AUTH before TLS only from this machine (aiosmtpd keeps these per connection).
            if _loopback(self.client_ip) and getattr(self.event_handler, "auth", None) is not None:
                self._auth_require_tls = False
                self.require_starttls = False
            return
        # Refuse before the greeting task gets to speak.
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()
        if isinstance(transport, asyncio.WriteTransport):
            transport.write(policy.TOO_MANY_CONNECTIONS.format(host=self.hostname).encode() + b"\r\n")
        transport.close()

    def _size_limit(self) -> int:
        """The limit a size refusal names: the tenant's the client relays for, else the listener's."""
        tenant = None
        if isinstance(self.event_handler, RelayHandler) and self.session is not None:
            tenant = self.event_handler.relay_tenant(self.session)
        return tenant.max_message_size if tenant is not None else self.data_size_limit or 0

    def connection_lost(self, error: Exception | None) -> None:
        if self._admitted:
            self._gate.release(self)
            self._admitted = False
        super().connection_lost(error)

    async def push(self, status: AnyStr) -> None:
        text = status.decode("utf-8", "replace") if isinstance(status, bytes) else str(status)
        if text.startswith(_TOO_BIG):
            text = policy.too_big(self._size_limit())
        for prefix, replacement in _TRANSLATE:
            if text.startswith(prefix):
                text = replacement
                break
        await super().push(text)
        # A reply ends a command (or asks the client for more): idle again, in the new state.
        if self.transport is not None and not text.startswith("354"):
            self._busy = False
            self._last_active = self.loop.time()
            super()._reset_timeout(self._gate.timeout(self._early()))


class RelayHandler:
    """aiosmtpd handler for the ``smtp`` (relay-in) and submission listeners.

    On ``smtp``, mail for the tenants' domains is delivered through the ingest
    pipeline; mail for other domains is relayed only for a client that
    authenticated as one of a tenant's agents or connects from a tenant's
    ``trusted_networks``, and only with a sender address that tenant owns
    (no open relay, ever); mail for a read-only tenant is deferred at RCPT
    (``450 4.2.1``: its sender retries). On submission, AUTH is required
    and every recipient is relayed.
    """

    def __init__(
        self,
        config: Callable[[], Config],
        pipeline: Pipeline,
        limits: Limits,
        *,
        outbox: Outbox | None = None,
        auth: Authenticator | None = None,
        submission: bool = False,
    ) -> None:
        self.config = config
        self.pipeline = pipeline
        self.limits = limits
        self.outbox = outbox
        self.auth = auth
        self.submission = submission
        self.inflight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        # Per transaction: each accepted SRS recipient, with its tenant and the address it reverses to.
        self._bounces: weakref.WeakKeyDictionary[Envelope, dict[str, tuple[str, str]]] = (
            weakref.WeakKeyDictionary()
        )

    # ------------------------------------------------------------------ AUTH

    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> AuthResult:
        if len(args) == 1:
            response = await server.challenge_auth("")
            if response is MISSING:
                return AuthResult(success=False, handled=False)
        else:
            try:
                response = base64.b64decode(args[1], validate=True)
            except binascii.Error:
                return AuthResult(success=False, handled=False)
        parts = bytes(response).split(b"\0")
        if len(parts) != 3:
            return AuthResult(success=False, handled=False)
        return await self._verify(server, parts[1], parts[2])

    async def auth_LOGIN(self, server: SMTP, args: list[str]) -> AuthResult:
        try:
            if len(args) == 1:
                login = await server.challenge_auth(server.AuthLoginUsernameChallenge)
            else:
                login = base64.b64decode(args[1], validate=True)
        except binascii.Error:
            return AuthResult(success=False, handled=False)
        if login is MISSING:
            return AuthResult(success=False, handled=False)
        password = await server.challenge_auth(server.AuthLoginPasswordChallenge)
        if password is MISSING:
            return AuthResult(success=False, handled=False)
        return await self._verify(server, bytes(login), bytes(password))

    async def _verify(self, server: SMTP, login: bytes, password: bytes) -> AuthResult:
        if self.auth is None or server.session is None:
            return AuthResult(success=False, handled=False)
        try:
            identity = await self.auth.verify(
                login.decode("utf-8", "replace"),
                password.decode("utf-8", "replace"),
                _peer(server.session),
                "submission" if self.submission else "smtp",
            )
        except AuthUnavailable:
            return AuthResult(success=False, handled=False, message=policy.AUTH_BUSY)
        if identity is None:
            # handled=False: aiosmtpd then answers 535 (handled=True would leave the client waiting).
            return AuthResult(success=False, handled=False)
        return AuthResult(success=True, auth_data=identity)

    # ------------------------------------------------------------------ envelope

    def relay_tenant(self, session: Session) -> TenantSection | None:
        """The tenant this client may relay for: by its AUTH, or by its trusted network."""
        config = self.config()
        identity = session.auth_data if session.authenticated else None
        if isinstance(identity, Identity):
            return next((t for t in config.tenants if t.id == identity.tenant_id), None)
        try:
            ip = ipaddress.ip_address(_peer(session))
        except ValueError:
            return None
        return next((t for t in config.tenants if any(ip in n for n in t.trusted_networks)), None)

    def owns_sender(self, tenant: TenantSection, address: str) -> bool:
        """Whether ``address`` is one the tenant may send as."""
        owner = self.config().tenant_for_address(address) if address else None
        return owner is not None and owner.id == tenant.id

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        if policy.has_control(address):
            return policy.BAD_SENDER
        # An agent always sends as its tenant; a trusted server only when it relays
        # outward, which RCPT decides.
        if session.authenticated or self.submission:
            tenant = self.relay_tenant(session)
            if tenant is None or not self.owns_sender(tenant, address):
                return policy.SENDER_NOT_OWNED.format(addr=address)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if policy.has_control(address):
            return policy.BAD_ADDRESS
        if len(envelope.rcpt_tos) >= self.limits.recipients:
            return policy.TOO_MANY_RECIPIENTS
        if not self.submission:
            if (bounce := self._srs_rcpt(envelope, address, rcpt_options)) is not None:
                return bounce
            routed = policy.route_recipient(
                self.config(), address, policy.declared_size(envelope.mail_options)
            )
            if isinstance(routed, str):
                # A foreign recipient: relayed only for a tenant's client, with that tenant's sender.
                tenant = self.relay_tenant(session) if routed.startswith("554 5.7.1") else None
                if tenant is not None and not self.owns_sender(tenant, envelope.mail_from or ""):
                    routed = policy.SENDER_NOT_OWNED.format(addr=envelope.mail_from or "")
                    tenant = None
                if tenant is None:
                    log.info("smtp.rcpt_refused", peer=_peer(session), rcpt=address, reply=routed[:9])
                    return routed
            elif (deferred := _read_only(routed)) is not None:
                log.info("smtp.rcpt_refused", peer=_peer(session), rcpt=address, reply=deferred[:9])
                return deferred
        elif "@" not in address:
            return policy.BAD_ADDRESS
        envelope.rcpt_tos.append(address.lower())
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.inflight += 1
        self.idle.clear()
        # One id per transaction, on every log line about it, in its Received: header and its reply;
        # mail relayed outward keeps it as its queue id.
        queue_id = queue.new_id()
        identity = session.auth_data if isinstance(session.auth_data, Identity) else None
        logger = log.bind(
            listener="submission" if self.submission else "smtp",
            peer=_peer(session),
            agent=identity.login if identity else None,
            queue_id=queue_id,
        )
        try:
            # A client that disconnects now cancels aiosmtpd's handler: the commit still ends cleanly.
            return await uninterrupted(self._data(session, envelope, logger, queue_id))
        except StoreError as exc:
            logger.warning("smtp.store_error", error=str(exc))
            return exc.smtp_reply
        except Exception:
            logger.exception("smtp.data_failed")
            return policy.TEMPFAIL
        finally:
            self.inflight -= 1
            if self.inflight == 0:
                self.idle.set()

    async def _data(self, session: Session, envelope: Envelope, logger: Any, queue_id: str) -> str:
        data: bytes = envelope.original_content or b""
        if policy.has_bare_newline(data):
            logger.warning("smtp.bare_newline")
            return policy.BARE_NEWLINE
        config = self.config()
        local: dict[str, tuple[TenantSection, list[str]]] = {}
        foreign: list[str] = []
        bounces = self._bounces.pop(envelope, {})
        for rcpt in (r for r in envelope.rcpt_tos if r not in bounces):
            routed = None if self.submission else policy.route_recipient(config, rcpt, None)
            if isinstance(routed, TenantSection):
                local.setdefault(routed.id, (routed, []))[1].append(rcpt)
            else:
                foreign.append(rcpt)
        relaying = self.relay_tenant(session) if foreign else None
        if foreign and (relaying is None or self.outbox is None):
            return policy.TEMPFAIL  # the configuration changed since RCPT
        for tenant, _ in local.values():
            if len(data) > tenant.max_message_size:
                return policy.too_big(tenant.max_message_size)
            if (deferred := _read_only(tenant)) is not None:
                return deferred  # it became read-only since RCPT
        scans: dict[str, spam.Result | None] = {}
        if self.pipeline.spam is not None and not session.authenticated:
            # Before anything is relayed or stored: a refusal must leave no trace.
            for tenant, rcpts in local.values():
                try:
                    scans[tenant.id] = scan = await self.pipeline.spam.check(
                        tenant,
                        data,
                        mail_from=envelope.mail_from or "",
                        recipients=rcpts,
                        ip=_peer(session),
                        helo=session.host_name,
                        queue_id=queue_id,
                    )
                except spam.Unavailable as exc:
                    return exc.smtp_reply
                if scan is not None and (refusal := scan.refusal(tenant.spam)) is not None:
                    logger.info("smtp.spam_refused", tenant=tenant.id, action=scan.action, score=scan.score)
                    return refusal
        if relaying is not None and self.outbox is not None:
            identity = session.auth_data if isinstance(session.auth_data, Identity) else None
            submitted = await self.outbox.submit(
                relaying, identity, envelope.mail_from or "", foreign, data, queue_id
            )
            if submitted.queue_id is None:
                return submitted.reply
            queue_id = submitted.queue_id
        if bounces:
            await self._relay_bounces(envelope.mail_from, bounces, data)
        now = datetime.now(UTC)
        protocol = "ESMTP" + ("S" if session.ssl else "") + ("A" if session.authenticated else "")
        for tenant, rcpts in local.values():
            received = policy.received_header(
                helo=session.host_name,
                peer_ip=_peer(session),
                hostname=config.gateway.hostname,
                protocol=protocol,
                queue_id=queue_id,
                recipients=rcpts,
                now=now,
            )
            scan = scans.get(tenant.id)
            if scan is not None:
                received = (
                    scan.header_block(config.gateway.hostname, tenant.spam, envelope.mail_from or "")
                    + received
                )
            delivery = Delivery(
                source="smtp", mail_from=envelope.mail_from or "", recipients=tuple(rcpts), scan=scan
            )
            await self.pipeline.deliver(tenant, received + data, delivery)
        tenants = sorted({*local, *([relaying.id] if relaying is not None else [])})
        logger.info(
            "smtp.transaction",
            queue_id=queue_id,
            tenant=tenants[0] if len(tenants) == 1 else None,
            tenants=tenants,
            message_id=parse_headers(data).message_id,
            mail_from=envelope.mail_from,
            rcpts=len(envelope.rcpt_tos),
            relayed=len(foreign),
            size=len(data),
        )
        return f"{policy.OK} queued as {queue_id}"

    # ------------------------------------------------------------------ bounces to SRS addresses

    def _srs_rcpt(self, envelope: Envelope, address: str, rcpt_options: list[str]) -> str | None:
        """RCPT to an SRS0 address at a tenant's domain: accepted only if we signed it and it is
        not expired (the bounce is then relayed to the original sender); None for any other address.
        """
        if self.outbox is None or not srs.is_srs(address):
            return None
        tenant = self.config().tenant_for_domain(address.rpartition("@")[2].lower())
        if tenant is None:
            return None
        try:
            original = self.pipeline.srs.reverse(address, datetime.now(UTC))
        except srs.SRSError as exc:
            log.info("smtp.srs_refused", tenant=tenant.id, reason=exc.reason)
            return policy.INVALID_SRS.format(addr=address)
        self._bounces.setdefault(envelope, {})[address.lower()] = (tenant.id, original)
        envelope.rcpt_tos.append(address.lower())
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def _relay_bounces(
        self, mail_from: str | None, bounces: dict[str, tuple[str, str]], data: bytes
    ) -> None:
        """Queue a message to SRS addresses for the original senders, through each tenant's relay.

        A system relay with the envelope sender as given (a bounce's is null): no
        agent, no Sent copy, and no From:/Sender: check (a bounce is from the
        remote server that made it, never from the tenant).
        """
        sender = "" if mail_from in (None, "<>") else mail_from
        if self.outbox is None:
            raise RuntimeError("SRS recipients are accepted only with an outbox")
        by_tenant: dict[str, list[str]] = {}
        for tenant_id, original in bounces.values():
            by_tenant.setdefault(tenant_id, []).append(original)
        digest = await self.outbox.blobs.put(data)
        now = datetime.now(UTC)
        async with self.outbox.db.write() as s:
            for tenant_id, originals in by_tenant.items():
                await queue.enqueue(
                    s,
                    tenant_id=tenant_id,
                    mail_from=sender,
                    recipients=originals,
                    blob=digest,
                    size=len(data),
                    now=now,
                )
        self.outbox.wake()
        log.info("smtp.srs_bounce_queued", tenants=sorted(by_tenant), rcpts=len(bounces), size=len(data))

    async def handle_exception(self, error: Exception) -> str:
        log.error("smtp.protocol_error", error_type=type(error).__name__)
        return policy.TEMPFAIL


def _read_only(tenant: TenantSection) -> str | None:
    """The deferral of mail for ``tenant`` while it is read-only, naming why; None when it takes mail."""
    standing = plans.standing(tenant)
    return None if standing.writable else policy.read_only_deferred(standing.why)


def _peer(session: Session) -> str:
    peer = session.peer
    return str(peer[0]) if isinstance(peer, tuple) else str(peer)


def _loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


class RelayServer:
    """An SMTP listener (``smtp``, ``submission`` or ``submissions``): binds, limits, drains."""

    def __init__(
        self,
        config: Callable[[], Config],
        pipeline: Pipeline,
        *,
        tls: ssl.SSLContext | None = None,
        limits: Limits | None = None,
        outbox: Outbox | None = None,
        auth: Authenticator | None = None,
        submission: bool = False,
        implicit_tls: bool = False,
    ) -> None:
        self.config = config
        self.limits = limits or Limits()
        self.handler = RelayHandler(
            config, pipeline, self.limits, outbox=outbox, auth=auth, submission=submission
        )
        name = ("submissions" if implicit_tls else "submission") if submission else "smtp"
        self.gate = ConnectionGate(lambda: self.config().limits.smtp, name)
        self.tls = tls
        self.submission = submission
        self.implicit_tls = implicit_tls
        self._server: asyncio.Server | None = None
        self._protocols: weakref.WeakSet[MailgateSMTP] = weakref.WeakSet()

    def _factory(self) -> MailgateSMTP:
        config = self.config()
        proto = MailgateSMTP(
            self.handler,
            self.gate,
            self.limits,
            hostname=config.gateway.hostname,
            ident="mailgate ESMTP",
            data_size_limit=max((t.max_message_size for t in config.tenants), default=10**6),
            enable_SMTPUTF8=True,
            tls_context=None if self.implicit_tls else self.tls,
            require_starttls=self.submission and not self.implicit_tls,
            auth_required=self.submission,
            auth_require_tls=not self.implicit_tls,
            auth_exclude_mechanism=[] if self.handler.auth is not None else ["PLAIN", "LOGIN"],
            timeout=config.limits.smtp.timeout.total_seconds(),
            command_call_limit={"*": self.limits.commands},
        )
        self._protocols.add(proto)
        return proto

    async def start(self, host: str, port: int) -> None:
        """Listen on ``host:port`` (port 0 picks a free one)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._factory, host, port, reuse_address=True, ssl=self.tls if self.implicit_tls else None
        )

    async def start_on_socket(self, sock: socket.socket) -> None:
        """Listen on an inherited socket (systemd socket activation)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._factory, sock=sock, ssl=self.tls if self.implicit_tls else None
        )

    @property
    def port(self) -> int:
        """The bound port."""
        if self._server is None:
            raise RuntimeError("the listener is not started")
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self, grace: float = 30.0) -> None:
        """Stop accepting, let in-flight deliveries commit, then close sessions."""
        if self._server is not None:
            self._server.close()
        try:
            async with asyncio.timeout(grace):  # not wait_for: it can swallow a cancel (3.11)
                await self.handler.idle.wait()
        except TimeoutError:
            log.warning("smtp.drain_timeout", inflight=self.handler.inflight)
        for proto in list(self._protocols):
            if proto.transport is not None:
                proto.transport.close()
        if self._server is not None:
            await self._server.wait_closed()

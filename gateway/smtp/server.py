"""SMTP relay-in: the one I/O class over aiosmtpd (asyncio-native, no Controller).

aiosmtpd runs the protocol state machine; :class:`RelayHandler` decides with
:mod:`gateway.smtp.policy` and delivers through the ingest pipeline, answering
``250`` only after the commit. :class:`MailgateSMTP` translates aiosmtpd's own
replies into enhanced status codes and never lets an exception's text reach
the client.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import ssl
import weakref
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, AnyStr

import structlog
from aiosmtpd.smtp import SMTP, Envelope, Session

from gateway.config import Config, TenantSection
from gateway.ingest import Delivery, Pipeline
from gateway.smtp import policy
from storage.errors import StoreError

log = structlog.get_logger(__name__)

# aiosmtpd replies that lack enhanced status codes, by prefix.
_TRANSLATE = (
    ("552 Error: Too much mail data", "552 5.3.4 Message size exceeds fixed limit"),
    ("552 Error: message size exceeds", "552 5.3.4 Message size exceeds fixed limit"),
    ("500 Line too long", "500 5.5.2 Line too long"),
    ("500 Command line too long", "500 5.5.2 Command line too long"),
    ("500 Error: (", policy.TEMPFAIL),  # an exception's text: never shown to clients
)


class Limits:
    """Per-listener bounds on connections, recipients, line length and idle time."""

    def __init__(
        self,
        *,
        connections: int = 500,
        connections_per_ip: int = 50,
        recipients: int = 100,
        line_length: int = 32 * 1024,
        idle_timeout: float = 300.0,
        commands: int = 1000,
    ) -> None:
        self.connections = connections
        self.connections_per_ip = connections_per_ip
        self.recipients = recipients
        self.line_length = line_length
        self.idle_timeout = idle_timeout
        self.commands = commands


class ConnectionGate:
    """Counts a listener's open connections, in total and per client address."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.total = 0
        self.per_ip: Counter[str] = Counter()

    def admit(self, ip: str) -> bool:
        """Count a new connection; False (and not counted) when over a limit."""
        if self.total >= self.limits.connections or self.per_ip[ip] >= self.limits.connections_per_ip:
            return False
        self.total += 1
        self.per_ip[ip] += 1
        return True

    def release(self, ip: str) -> None:
        """Forget a connection that :meth:`admit` counted."""
        self.total -= 1
        self.per_ip[ip] -= 1
        if self.per_ip[ip] <= 0:
            del self.per_ip[ip]


class MailgateSMTP(SMTP):
    """aiosmtpd's SMTP with our reply translation and connection limits."""

    def __init__(self, handler: RelayHandler, gate: ConnectionGate, **kwargs: Any) -> None:
        # aiosmtpd sizes its stream reader from this during __init__.
        self.line_length_limit = gate.limits.line_length
        super().__init__(handler, **kwargs)
        self._gate = gate
        self._admitted_ip: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        starttls = self.transport is not None
        super().connection_made(transport)
        if starttls:
            return
        peer = transport.get_extra_info("peername")
        ip = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        if self._gate.admit(ip):
            self._admitted_ip = ip
            return
        # Refuse before the greeting task gets to speak.
        log.warning("smtp.too_many_connections", peer=ip)
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()
        if isinstance(transport, asyncio.WriteTransport):
            transport.write(policy.TOO_MANY_CONNECTIONS.format(host=self.hostname).encode() + b"\r\n")
        transport.close()

    def connection_lost(self, error: Exception | None) -> None:
        if self._admitted_ip is not None:
            self._gate.release(self._admitted_ip)
            self._admitted_ip = None
        super().connection_lost(error)

    async def push(self, status: AnyStr) -> None:
        text = status.decode("utf-8", "replace") if isinstance(status, bytes) else str(status)
        for prefix, replacement in _TRANSLATE:
            if text.startswith(prefix):
                text = replacement
                break
        await super().push(text)


class RelayHandler:
    """aiosmtpd handler: recipient policy and delivery for relay-in."""

    def __init__(self, config: Callable[[], Config], pipeline: Pipeline, limits: Limits) -> None:
        self.config = config
        self.pipeline = pipeline
        self.limits = limits
        self.inflight = 0
        self.idle = asyncio.Event()
        self.idle.set()

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if len(envelope.rcpt_tos) >= self.limits.recipients:
            return policy.TOO_MANY_RECIPIENTS
        routed = policy.route_recipient(self.config(), address, policy.declared_size(envelope.mail_options))
        if isinstance(routed, str):
            log.info("smtp.rcpt_refused", peer=_peer(session), rcpt=address, reply=routed[:9])
            return routed
        envelope.rcpt_tos.append(address.lower())
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.inflight += 1
        self.idle.clear()
        try:
            return await self._data(server, session, envelope)
        except StoreError as exc:
            log.warning("smtp.store_error", peer=_peer(session), error=str(exc))
            return exc.smtp_reply
        except Exception:
            log.exception("smtp.data_failed", peer=_peer(session))
            return policy.TEMPFAIL
        finally:
            self.inflight -= 1
            if self.inflight == 0:
                self.idle.set()

    async def _data(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data: bytes = envelope.original_content or b""
        queue_id = secrets.token_hex(6)
        if policy.has_bare_newline(data):
            log.warning("smtp.bare_newline", peer=_peer(session), queue_id=queue_id)
            return policy.BARE_NEWLINE
        config = self.config()
        by_tenant: dict[str, tuple[TenantSection, list[str]]] = {}
        for rcpt in envelope.rcpt_tos:
            routed = policy.route_recipient(config, rcpt, None)
            if isinstance(routed, str):  # the configuration changed since RCPT
                return policy.TEMPFAIL
            by_tenant.setdefault(routed.id, (routed, []))[1].append(rcpt)
        for tenant, _ in by_tenant.values():
            if len(data) > tenant.max_message_size:
                return policy.TOO_BIG.format(limit=tenant.max_message_size)
        now = datetime.now(UTC)
        protocol = "ESMTPS" if session.ssl else "ESMTP"
        for tenant, rcpts in by_tenant.values():
            trace = policy.received_header(
                helo=session.host_name,
                peer_ip=_peer(session),
                hostname=config.gateway.hostname,
                protocol=protocol,
                queue_id=queue_id,
                recipients=rcpts,
                now=now,
            )
            delivery = Delivery(source="smtp", mail_from=envelope.mail_from or "", recipients=tuple(rcpts))
            await self.pipeline.deliver(tenant, trace + data, delivery)
        log.info(
            "smtp.transaction",
            peer=_peer(session),
            queue_id=queue_id,
            mail_from=envelope.mail_from,
            rcpts=len(envelope.rcpt_tos),
            size=len(data),
            tenants=sorted(by_tenant),
        )
        return f"{policy.OK} queued as {queue_id}"

    async def handle_exception(self, error: Exception) -> str:
        log.error("smtp.protocol_error", error_type=type(error).__name__)
        return policy.TEMPFAIL


def _peer(session: Session) -> str:
    peer = session.peer
    return str(peer[0]) if isinstance(peer, tuple) else str(peer)


class RelayServer:
    """The relay-in listener: binds, limits connections, drains on stop."""

    def __init__(
        self,
        config: Callable[[], Config],
        pipeline: Pipeline,
        *,
        tls: ssl.SSLContext | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.config = config
        self.limits = limits or Limits()
        self.handler = RelayHandler(config, pipeline, self.limits)
        self.gate = ConnectionGate(self.limits)
        self.tls = tls
        self._server: asyncio.Server | None = None
        self._protocols: weakref.WeakSet[MailgateSMTP] = weakref.WeakSet()

    def _factory(self) -> MailgateSMTP:
        config = self.config()
        proto = MailgateSMTP(
            self.handler,
            self.gate,
            hostname=config.gateway.hostname,
            ident="mailgate ESMTP",
            data_size_limit=max((t.max_message_size for t in config.tenants), default=10**6),
            enable_SMTPUTF8=True,
            tls_context=self.tls,
            timeout=self.limits.idle_timeout,
            command_call_limit={"*": self.limits.commands},
        )
        self._protocols.add(proto)
        return proto

    async def start(self, host: str, port: int) -> None:
        """Listen on ``host:port`` (port 0 picks a free one)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._factory, host, port, reuse_address=True)

    async def start_on_socket(self, sock: socket.socket) -> None:
        """Listen on an inherited socket (systemd socket activation)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._factory, sock=sock)

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
            await asyncio.wait_for(self.handler.idle.wait(), grace)
        except TimeoutError:
            log.warning("smtp.drain_timeout", inflight=self.handler.inflight)
        for proto in list(self._protocols):
            if proto.transport is not None:
                proto.transport.close()
        self._protocols.clear()
        if self._server is not None:
            await self._server.wait_closed()

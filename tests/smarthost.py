"""A test smarthost: an asyncio aiosmtpd server requiring (or not) TLS and AUTH, recording what it gets."""

from __future__ import annotations

import asyncio
import ssl
from collections import Counter
from dataclasses import dataclass, field
from email import message_from_bytes
from typing import Any

import trustme
from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, LoginPassword, Session


@dataclass
class Received:
    mail_from: str
    rcpts: list[str]
    data: bytes


@dataclass
class Smarthost:
    """Accepts mail on 127.0.0.1; ``reply`` can be set to a failure such as ``"451 4.3.0 later"``.

    ``answers`` replaces the reply to ``AUTH``, ``MAIL`` or ``RCPT`` (e.g. ``{"MAIL": "251 odd"}``);
    ``reply`` the one to the end of DATA.
    """

    username: str | None = None
    password: str | None = None
    security: str = "none"  # none | starttls | tls
    ca: trustme.CA = field(default_factory=trustme.CA)
    reply: str | None = None
    answers: dict[str, str] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    server: asyncio.Server | None = None
    sessions: list[SMTP] = field(default_factory=list)  # every connection accepted, oldest first

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    def _context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
        return ctx

    async def handle_AUTH(self, server: SMTP, session: Session, envelope: Envelope, args: Any) -> Any:
        return self.answers.get("AUTH", MISSING)

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope, *args: Any) -> Any:
        return self.answers.get("MAIL", MISSING)

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, *args: Any) -> Any:
        return self.answers.get("RCPT", MISSING)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.reply is not None:
            return self.reply
        self.received.append(
            Received(envelope.mail_from or "", list(envelope.rcpt_tos), envelope.original_content or b"")
        )
        return "250 2.0.0 OK"

    def _authenticator(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        ok = (
            isinstance(data, LoginPassword)
            and data.login.decode() == self.username
            and data.password.decode() == self.password
        )
        return AuthResult(success=ok, handled=False)

    async def start(self) -> Smarthost:
        ctx = self._context() if self.security != "none" else None
        loop = asyncio.get_running_loop()

        def factory() -> SMTP:
            session = SMTP(
                self,
                hostname="smarthost.test",
                tls_context=ctx if self.security == "starttls" else None,
                require_starttls=self.security == "starttls",
                auth_required=self.username is not None,
                auth_require_tls=self.security != "none",
                authenticator=self._authenticator if self.username is not None else None,
            )
            self.sessions.append(session)
            return session

        self.server = await loop.create_server(
            factory, "127.0.0.1", 0, ssl=ctx if self.security == "tls" else None
        )
        return self

    def hang_up(self) -> None:
        """Close every open connection, as a server does with idle ones."""
        for session in self.sessions:
            if session.transport is not None:
                session.transport.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    def ca_file(self, directory: Any) -> str:
        path = directory / "smarthost-ca.pem"
        path.write_bytes(self.ca.cert_pem.bytes())
        return str(path)


@dataclass
class Slow(Smarthost):
    """Sleeps ``delay`` before answering DATA; counts the transactions in flight, in all and per
    Message-ID (``peak``, ``most``: the highest counts seen at once)."""

    delay: float = 0.5
    in_flight: int = 0
    peak: int = 0
    active: Counter[str] = field(default_factory=Counter)
    most: Counter[str] = field(default_factory=Counter)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> Any:
        msgid = str(message_from_bytes(envelope.original_content or b"").get("Message-ID", "")).strip()
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        self.active[msgid] += 1
        self.most[msgid] = max(self.most[msgid], self.active[msgid])
        try:
            await asyncio.sleep(self.delay)
            return await super().handle_DATA(server, session, envelope)
        finally:
            self.in_flight -= 1
            self.active[msgid] -= 1

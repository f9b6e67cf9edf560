"""Outbound relay end to end: security modes, retries, bounces, restarts, no open relay, limits, collisions.

The relay targets are real: ``tests.smarthost`` (aiosmtpd with none/STARTTLS/
implicit TLS and AUTH) and Postfix ``smtp-sink`` (tests marked ``peers``).
The gateway runs in-process (listeners, Outbox, RelayWorker driven with
``run_once()``) except for the ``kill -9`` test, which runs ``mailgate run``
as a subprocess; ``mailgate queue list`` is always the real CLI.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import signal
import smtplib
import ssl
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email import message_from_bytes
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session
from argon2 import PasswordHasher
from sqlalchemy import select

from gateway.auth import Authenticator
from gateway.config import Config, load_config, parse_config
from gateway.daemon import open_store
from gateway.ingest import Delivery, Pipeline
from gateway.notify import Changes
from gateway.relay import worker as relay_worker
from gateway.relay.worker import RelayWorker
from gateway.smtp import server as smtp_server
from gateway.smtp.outbox import Outbox
from gateway.smtp.server import RelayServer
from storage import mailstore, queue
from storage.blobs import BlobStore
from storage.db import Database
from storage.flags import ANSWERED
from storage.models import Agent, Event, Message, OutboundLog
from tests.conftest import Sink, config_dict, free_port
from tests.daemon import Daemon
from tests.smarthost import Smarthost

# The smarthost with security "none" requires AUTH without TLS on purpose; aiosmtpd warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning")

PASSWORD = "agent-password"
HASH = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash(PASSWORD)
RELAY_PASSWORD = "tenant-relay-secret"
RELAY_ENV = "MAILGATE_TEST_RELAY_PASSWORD"
CUSTOMER = "customer@example.org"
SENDER = "biuro@acme.test"


# --------------------------------------------------------------------------- messages


def message(
    msgid: str,
    *,
    sender: str = SENDER,
    to: str = CUSTOMER,
    subject: str = "Re: order",
    in_reply_to: str | None = None,
    references: str | None = None,
    body: bytes = b"Your order ships today.\r\n",
) -> bytes:
    head = f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: {msgid}\r\n"
    if in_reply_to:
        head += f"In-Reply-To: {in_reply_to}\r\n"
    if references:
        head += f"References: {references}\r\n"
    return head.encode() + b"\r\n" + body


def with_attachments(msgid: str, count: int) -> bytes:
    parts = b"--b\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n" + b"".join(
        b"--b\r\nContent-Type: application/octet-stream\r\n"
        b'Content-Disposition: attachment; filename="f%d.bin"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\nAAAA\r\n" % i
        for i in range(count)
    )
    return (
        (
            f"From: {SENDER}\r\nTo: {CUSTOMER}\r\nSubject: files\r\nMessage-ID: {msgid}\r\n"
            'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
        ).encode()
        + parts
        + b"--b--\r\n"
    )


def big(msgid: str, size: int) -> bytes:
    line = b"x" * 998 + b"\r\n"
    return message(msgid, body=line * (size // len(line) + 1))


# --------------------------------------------------------------------------- in-process gateway


class Gateway:
    """Listeners ``smtp`` and ``submission`` (STARTTLS with a trustme CA), Outbox, RelayWorker.

    ``config`` may be replaced by a test (trusted networks, collision mode):
    every component reads it through :meth:`current`.
    """

    def __init__(self, config: Config, db: Database, blobs: BlobStore, auth_delay: float):
        self.config, self.db, self.blobs = config, db, blobs
        self.changes = Changes()
        self.pipeline = Pipeline(db, blobs, changes=self.changes)
        self.worker = RelayWorker(self.current, db, blobs, self.pipeline)
        self.outbox = Outbox(db, blobs, self.changes, self.worker.wake.set)
        self.auth = Authenticator(self.current, db, failure_delay=auth_delay)
        ca = trustme.CA()
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1").configure_cert(tls)
        self.client_tls = ssl.create_default_context()
        ca.configure_trust(self.client_tls)
        common: dict[str, Any] = {"tls": tls, "outbox": self.outbox, "auth": self.auth}
        self.smtp = RelayServer(self.current, self.pipeline, **common)
        self.submission = RelayServer(self.current, self.pipeline, submission=True, **common)

    def current(self) -> Config:
        return self.config

    def tenant(self, tenant_id: str = "acme") -> Any:
        return self.config.tenant(tenant_id)

    async def relay(self) -> None:
        """One pass of the relay worker, waited for."""
        await self.worker.run_once()
        await self.worker.drain()

    async def folder(self, name: str, tenant: str = "acme") -> list[bytes]:
        async with self.db.read() as s:
            f = await mailstore.require_folder(s, tenant, name)
            blobs = (
                await s.scalars(select(Message.blob).where(Message.folder_id == f.id).order_by(Message.uid))
            ).all()
        return [await self.blobs.get(b) for b in blobs]

    async def dsns(self) -> list[bytes]:
        return [m for m in await self.folder("INBOX") if b"multipart/report" in m]

    async def queued(self) -> list[tuple[Any, dict[str, tuple[str, str | None]]]]:
        async with self.db.read() as s:
            rows = await queue.listing(s)
        return [(row, {r.address: (r.state, r.last_reply) for r in rcpts}) for row, rcpts in rows]

    async def events(self) -> list[tuple[str, str, str | None]]:
        """(kind, agent login, the answered message's Message-ID), oldest first."""
        async with self.db.read() as s:
            rows = await s.execute(
                select(Event.kind, Agent.login, Message.message_id)
                .join(Agent, Agent.id == Event.agent_id)
                .outerjoin(Message, Message.id == Event.message_id)
                .order_by(Event.id)
            )
            return [(k, a, m) for k, a, m in rows]

    async def flags(self, msgid: str) -> int:
        async with self.db.read() as s:
            return int(await s.scalar(select(Message.sysflags).where(Message.message_id == msgid)) or 0)


def gateway_config(tmp_path: Path, db_url: str, smtp: dict[str, Any] | None = None, **tenant: Any) -> Config:
    data = config_dict(tmp_path, db_url, **tenant)
    if smtp is not None:
        data["tenants"][0]["smtp"] = smtp
    data["tenants"][0]["agents"] = [
        {"login": "anna@acme.test", "name": "Anna", "password_hash": HASH},
        {"login": "piotr@acme.test", "name": "Piotr", "password_hash": HASH},
    ]
    data["tenants"][1]["agents"] = [{"login": "bob@beta.test", "password_hash": HASH}]
    data["queue"] = {"retry": ["1s"]}
    return parse_config(data)


@contextlib.asynccontextmanager
async def running(config: Config, *, auth_delay: float = 0.01) -> AsyncIterator[Gateway]:
    db, blobs = await open_store(config)
    g = Gateway(config, db, blobs, auth_delay)
    try:
        await g.smtp.start("127.0.0.1", 0)
        await g.submission.start("127.0.0.1", 0)
        yield g
    finally:
        await g.submission.stop(grace=5)
        await g.smtp.stop(grace=5)
        await g.worker.drain()
        await db.close()


def relay_settings(host: Smarthost, tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    smtp: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": host.port,
        "security": host.security,
        "username": SENDER,
        "password_env": RELAY_ENV,
        "from": SENDER,
        "ca_file": host.ca_file(tmp_path),
    }
    smtp.update(overrides)
    return {k: v for k, v in smtp.items() if v is not None}


@dataclass
class AuthCountingSmarthost(Smarthost):
    """The test smarthost, also counting AUTH attempts (to prove a password was never sent)."""

    auth_attempts: int = 0
    tls_sessions: list[bool] = field(default_factory=list)
    per_connection: int | None = None  # messages a connection takes before MAIL gets 421
    mails: Counter[int] = field(default_factory=Counter)  # MAIL commands per connection

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope, *args: Any) -> Any:
        self.mails[id(server)] += 1
        if self.per_connection is not None and self.mails[id(server)] > self.per_connection:
            return "421 4.7.0 enough messages on this connection"
        return await super().handle_MAIL(server, session, envelope, *args)

    def _authenticator(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        self.auth_attempts += 1
        return super()._authenticator(server, session, envelope, mechanism, data)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert server.transport is not None
        self.tls_sessions.append(server.transport.get_extra_info("ssl_object") is not None)
        return await super().handle_DATA(server, session, envelope)

    async def start(self) -> AuthCountingSmarthost:
        # As Smarthost.start, but AUTH is offered on an implicit-TLS connection too: aiosmtpd's
        # auth_require_tls only knows STARTTLS, so Smarthost(security="tls") never offers AUTH.
        ctx = self._context() if self.security != "none" else None

        def factory() -> SMTP:
            session = SMTP(
                self,
                hostname="smarthost.test",
                tls_context=ctx if self.security == "starttls" else None,
                require_starttls=self.security == "starttls",
                auth_required=self.username is not None,
                auth_require_tls=self.security == "starttls",
                authenticator=self._authenticator if self.username is not None else None,
            )
            self.sessions.append(session)
            return session

        self.server = await asyncio.get_running_loop().create_server(
            factory, "127.0.0.1", 0, ssl=ctx if self.security == "tls" else None
        )
        return self


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """SQLite only: for SMTP policy that does not depend on the engine (keeps the file fast).

    The queue, retry, bounce, restart and collision tests run on both engines (``db_url``).
    """
    return f"sqlite+aiosqlite:///{tmp_path / 'mailgate.db'}"


@pytest.fixture(autouse=True)
def relay_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(RELAY_ENV, RELAY_PASSWORD)


@contextlib.asynccontextmanager
async def smarthost(security: str, *, auth: bool = True) -> AsyncIterator[AuthCountingSmarthost]:
    host = AuthCountingSmarthost(
        username=SENDER if auth else None, password=RELAY_PASSWORD if auth else None, security=security
    )
    await host.start()
    try:
        yield host
    finally:
        await host.stop()


async def queue_one(g: Gateway, msgid: str = "<out-1@acme.test>", agent: bool = False) -> None:
    """Queue a message as the tenant's relay would get it from an agent (without the SMTP dialogue)."""
    submitted = await g.outbox.submit(g.tenant(), None, SENDER, [CUSTOMER], message(msgid))
    assert submitted.reply.startswith("250 "), submitted.reply


# --------------------------------------------------------------------------- SMTP client helpers


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def reply_text(code: int, text: bytes) -> str:
    return f"{code} {text.decode('utf-8', 'replace')}"


def transact(
    c: smtplib.SMTP, mail_from: str, rcpts: list[str], data: bytes, options: tuple[str, ...] = ()
) -> str:
    """MAIL, RCPT..., DATA; the first refusal, or the final reply."""
    code, text = c.mail(mail_from, list(options))
    if code != 250:
        c.rset()
        return reply_text(code, text)
    for rcpt in rcpts:
        code, text = c.rcpt(rcpt)
        if code != 250:
            c.rset()
            return reply_text(code, text)
    code, text = c.data(data)
    return reply_text(code, text)


def send(
    port: int,
    mail_from: str,
    rcpts: list[str],
    data: bytes,
    *,
    login: str | None = None,
    password: str = PASSWORD,
    tls: ssl.SSLContext | None = None,
    options: tuple[str, ...] = (),
) -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as c:
        c.ehlo("client.test")
        if tls is not None:
            c.starttls(context=tls)
            c.ehlo("client.test")
        if login is not None:
            code, text = c.docmd("AUTH", "PLAIN " + b64(f"\0{login}\0{password}"))
            if code != 235:
                return reply_text(code, text)
        return transact(c, mail_from, rcpts, data, options)


async def asend(port: int, mail_from: str, rcpts: list[str], data: bytes, **kwargs: Any) -> str:
    return await asyncio.to_thread(send, port, mail_from, rcpts, data, **kwargs)


async def reply_as(g: Gateway, login: str, data: bytes) -> str:
    return await asend(g.submission.port, SENDER, [CUSTOMER], data, login=login)


# --------------------------------------------------------------------------- 1. security modes


@pytest.mark.parametrize("security", ["none", "starttls", "tls"])
async def test_each_security_mode_delivers_to_a_matching_smarthost(
    tmp_path: Path, sqlite_url: str, security: str
) -> None:
    async with smarthost(security) as host:
        config = gateway_config(tmp_path, sqlite_url, relay_settings(host, tmp_path))
        async with running(config) as g:
            await queue_one(g)
            await g.relay()
            assert await g.queued() == []
    (got,) = host.received
    assert got.mail_from == SENDER
    assert got.rcpts == [CUSTOMER]
    assert got.data == message("<out-1@acme.test>")
    assert host.auth_attempts == 1
    assert host.tls_sessions == [security != "none"]


async def relayed(g: Gateway, host: Smarthost, count: int) -> None:
    """Let the worker run (no drain between passes: kept connections stay) until ``count`` arrived."""
    deadline = time.monotonic() + 20
    while len(host.received) < count:
        assert time.monotonic() < deadline, f"{len(host.received)} of {count} received"
        await g.worker.run_once()
        await asyncio.sleep(0.05)


def one_at_a_time(host: Smarthost, tmp_path: Path, url: str) -> Config:
    """The tenant relaying through ``host`` with ``queue.concurrency`` 1: one connection at a time."""
    config = gateway_config(tmp_path, url, relay_settings(host, tmp_path))
    return config.model_copy(update={"queue": config.queue.model_copy(update={"concurrency": 1})})


def received_ids(host: Smarthost) -> list[str]:
    return [str(message_from_bytes(r.data)["Message-ID"]) for r in host.received]


async def test_consecutive_messages_share_one_connection_then_a_closed_one_is_replaced(
    tmp_path: Path, sqlite_url: str
) -> None:
    """A completed transaction's connection carries the tenant's next message (issue #16); one the
    server closed meanwhile is replaced at MAIL, the message neither deferred nor sent twice."""
    async with smarthost("starttls") as host, running(one_at_a_time(host, tmp_path, sqlite_url)) as g:
        for i in range(5):
            await queue_one(g, f"<reuse-{i}@acme.test>")
        await relayed(g, host, 5)
        assert (len(host.sessions), host.auth_attempts) == (1, 1)
        host.hang_up()
        await asyncio.sleep(0.1)
        await queue_one(g, "<after-hang-up@acme.test>")
        await relayed(g, host, 6)
        await g.worker.drain()
        assert await g.queued() == []
        assert len(host.sessions) == 2
    assert received_ids(host) == [*(f"<reuse-{i}@acme.test>" for i in range(5)), "<after-hang-up@acme.test>"]
    assert host.tls_sessions == [True] * 6


async def test_a_kept_connection_refused_at_mail_with_421_is_replaced_not_deferred(
    tmp_path: Path, sqlite_url: str
) -> None:
    """A server that takes two messages per connection: the third MAIL's 421 on a kept connection
    sends the message on a fresh one at once, without recording a deferral."""
    async with smarthost("none") as host:
        host.per_connection = 2
        async with running(one_at_a_time(host, tmp_path, sqlite_url)) as g:
            for i in range(5):
                await queue_one(g, f"<limit-{i}@acme.test>")
            await relayed(g, host, 5)
            await g.worker.drain()
            assert await g.queued() == []
            async with g.db.read() as s:
                events = (await s.scalars(select(OutboundLog.event))).all()
    assert sorted(events) == ["queued"] * 5 + ["sent"] * 5
    assert (len(host.sessions), host.auth_attempts) == (3, 3)
    assert received_ids(host) == [f"<limit-{i}@acme.test>" for i in range(5)]


async def test_none_upgrades_when_offered_unless_pinned(tmp_path: Path, sqlite_url: str) -> None:
    async with smarthost("starttls", auth=False) as host:
        # security not given: "none" from the defaults, not pinned: STARTTLS is used when offered.
        config = gateway_config(
            tmp_path, sqlite_url, relay_settings(host, tmp_path, security=None, username=None)
        )
        async with running(config) as g:
            await queue_one(g, "<unpinned@acme.test>")
            await g.relay()
            assert await g.queued() == []
        assert [r.data for r in host.received] == [message("<unpinned@acme.test>")]
        assert host.tls_sessions == [True]
        # security = "none" pinned: no STARTTLS; this server insists on it and refuses MAIL (530, a 5xx).
        pinned = gateway_config(
            tmp_path, sqlite_url, relay_settings(host, tmp_path, security="none", username=None)
        )
        async with running(pinned) as g:
            await queue_one(g, "<pinned@acme.test>")
            await g.relay()
            assert await g.queued() == []
            (report,) = await g.dsns()
        assert len(host.received) == 1
        assert b"STARTTLS" in report
        assert b"Action: failed" in report


async def test_starttls_required_but_not_offered_is_not_sent(tmp_path: Path, sqlite_url: str) -> None:
    async with smarthost("none") as host:
        config = gateway_config(tmp_path, sqlite_url, relay_settings(host, tmp_path, security="starttls"))
        async with running(config) as g:
            await queue_one(g)
            await g.relay()
            ((row, rcpts),) = await g.queued()
    # Not sent, and kept for a retry (as Postfix's "TLS is required, but was not offered" does);
    # the reason is in the queue for `mailgate queue list`.
    assert host.received == []
    assert host.auth_attempts == 0  # the password never went out over the plain connection
    assert rcpts[CUSTOMER][0] == "pending"
    assert row.attempts == 1
    assert "STARTTLS" in (row.last_error or ""), row.last_error


def test_loopback_is_decided_by_the_literal_host() -> None:
    # Hosts that may receive the relay password without TLS (no opt-in needed).
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert relay_worker._loopback(host), host
    # Anything else counts as remote, even a name that happens to resolve to loopback.
    for host in ("10.0.0.1", "192.0.2.1", "smtp.gmail.com", "localhost.localdomain", "", "::ffff:10.0.0.1"):
        assert not relay_worker._loopback(host), host


async def test_password_is_not_sent_in_clear_to_a_remote_host(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every test peer is on loopback: make the worker treat 127.0.0.1 as a remote host.
    monkeypatch.setattr(relay_worker, "_loopback", lambda host: False)
    async with smarthost("none") as host:
        config = gateway_config(tmp_path, sqlite_url, relay_settings(host, tmp_path))
        async with running(config) as g:
            await queue_one(g, "<clear@acme.test>")
            await g.relay()
            assert await g.queued() == []  # refused for good: a configuration problem, not a retry
            (report,) = await g.dsns()
        assert host.auth_attempts == 0
        assert host.received == []
        assert b"Status: 5.7.10" in report
        assert b"in clear" in report
        # The explicit opt-in sends it.
        opted = gateway_config(
            tmp_path, sqlite_url, relay_settings(host, tmp_path, allow_plaintext_auth=True)
        )
        async with running(opted) as g:
            await queue_one(g, "<opt-in@acme.test>")
            await g.relay()
            assert await g.queued() == []
        assert host.auth_attempts == 1
        assert [r.data for r in host.received] == [message("<opt-in@acme.test>")]


@pytest.mark.parametrize("security", ["starttls", "tls"])
async def test_password_to_a_remote_host_over_tls_is_fine(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch, security: str
) -> None:
    monkeypatch.setattr(relay_worker, "_loopback", lambda host: False)
    async with smarthost(security) as host:
        config = gateway_config(tmp_path, sqlite_url, relay_settings(host, tmp_path))
        async with running(config) as g:
            await queue_one(g)
            await g.relay()
            assert await g.queued() == []
    assert host.auth_attempts == 1
    assert len(host.received) == 1


# --------------------------------------------------------------------------- 2. smtp-sink: retry, bounce, CLI


def write_toml(tmp_path: Path, db_url: str, relay_port: int, listen: str = 'smtp = ""') -> Path:
    path = tmp_path / "mailgate.toml"
    path.write_text(
        f"""
[gateway]
hostname = "mx.test"
data_dir = "{tmp_path / "var"}"
database_url = "{db_url}"

[listen]
{listen}

[queue]
retry = ["1s"]

[[tenants]]
id = "acme"
domains = ["acme.test"]

[tenants.smtp]
host = "127.0.0.1"
port = {relay_port}
from = "{SENDER}"

[[tenants.agents]]
login = "anna@acme.test"
password_hash = "{HASH}"
""",
        encoding="utf-8",
    )
    return path


def cli_queue(config: Path) -> list[dict[str, Any]]:
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "-c", str(config), "queue", "list", "--format", "json"],
        capture_output=True,
        check=True,
        timeout=60,
    )
    rows: list[dict[str, Any]] = json.loads(out.stdout)
    return rows


async def aqueue(config: Path) -> list[dict[str, Any]]:
    return await asyncio.to_thread(cli_queue, config)


@pytest.mark.peers
async def test_smtp_sink_451_is_retried_until_accepted(tmp_path: Path, db_url: str, sink: Sink) -> None:
    path = write_toml(tmp_path, db_url, sink.port)
    async with running(load_config(path)) as g:
        await queue_one(g, "<retry-me@acme.test>")
        ((row, _),) = await g.queued()
        assert (row.attempts, row.last_error) == (0, None)

        sink.start("-r", "RCPT", "-b", "451 4.3.0 sink says try later")
        await g.relay()
        (row,) = await aqueue(path)
        assert row["attempts"] == 1
        assert row["last_error"] == "451 4.3.0 sink says try later"
        assert row["recipients"] == f"{CUSTOMER}(pending)"
        assert sink.captured() == []

        # The server is down for a while: a network error is a retry too.
        sink.stop()
        await asyncio.sleep(1.1)  # retry = ["1s"]
        await g.relay()
        (row,) = await aqueue(path)
        assert row["attempts"] == 2
        assert row["last_error"].startswith("SMTPConnectError: Error connecting to 127.0.0.1"), row[
            "last_error"
        ]

        sink.start()  # the same port, accepting now
        deadline = time.monotonic() + 10
        while await g.queued() and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            await g.relay()
        assert await aqueue(path) == []
        assert await g.dsns() == []
    assert sink.message_ids() == Counter({"<retry-me@acme.test>": 1})
    (captured,) = sink.captured()
    assert b"X-Rcpt-Args: <customer@example.org>" in captured
    assert b"Your order ships today." in captured


@pytest.mark.peers
async def test_smtp_sink_550_bounces_into_the_senders_inbox(tmp_path: Path, db_url: str, sink: Sink) -> None:
    path = write_toml(tmp_path, db_url, sink.port)
    sink.start("-f", ".", "-B", "550 5.7.1 sink refuses this message")
    async with running(load_config(path)) as g:
        await queue_one(g, "<bounce-me@acme.test>")
        await g.relay()
        assert await aqueue(path) == []  # failed for good: out of the queue
        (report,) = await g.dsns()
        assert len(await g.folder("INBOX")) == 1
    dsn = message_from_bytes(report)
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    assert dsn["To"] == f"<{SENDER}>"
    assert "Undelivered" in dsn["Subject"]
    text, status, headers = dsn.get_payload()  # type: ignore[misc]
    assert "550 5.7.1 sink refuses this message" in text.get_payload()
    status_text = str(status)
    assert f"Final-Recipient: rfc822; {CUSTOMER}" in status_text
    assert "Action: failed" in status_text
    assert "Status: 5.7.1" in status_text
    assert headers.get_content_type() == "text/rfc822-headers"
    assert "Message-ID: <bounce-me@acme.test>" in str(headers)


# --------------------------------------------------------------------------- 3. kill -9 with a full queue


def submit_many(port: int, count: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as c:
        c.ehlo("agent.test")
        c.login("anna@acme.test", PASSWORD)
        for i in range(count):
            refused = c.sendmail(SENDER, [CUSTOMER], message(f"<kill-{i}@acme.test>"))
            assert refused == {}


@pytest.mark.peers
def test_kill_9_with_100_queued_delivers_each_exactly_once(tmp_path: Path, db_url: str, sink: Sink) -> None:
    port = free_port()
    path = write_toml(tmp_path, db_url, sink.port, f'smtp = ""\nsubmission = "127.0.0.1:{port}"')
    daemon = Daemon(path, port, tmp_path)
    daemon.start()
    try:
        submit_many(port, 100)  # the relay refuses connections: everything stays queued
        rows = cli_queue(path)
        assert len(rows) == 100
        assert daemon.signal(signal.SIGKILL) == -signal.SIGKILL

        sink.start()
        daemon.start()
        daemon.wait_for("the queue to drain", lambda: cli_queue(path) == [], 60)
        assert daemon.signal(signal.SIGTERM) == 0
    finally:
        daemon.stop()
    ids = sink.message_ids()
    assert set(ids) == {f"<kill-{i}@acme.test>" for i in range(100)}
    assert max(ids.values()) == 1, [m for m, n in ids.items() if n > 1]


# --------------------------------------------------------------------------- 4. no open relay


async def test_smtp_listener_refuses_relay_without_auth(tmp_path: Path, sqlite_url: str) -> None:
    async with running(gateway_config(tmp_path, sqlite_url)) as g:
        for sender in (SENDER, CUSTOMER):
            reply = await asend(g.smtp.port, sender, [CUSTOMER], message("<r@acme.test>"))
            assert reply.startswith(f"554 5.7.1 <{CUSTOMER}>"), reply
        # Mail for the tenant's own domain is still taken.
        reply = await asend(g.smtp.port, CUSTOMER, [SENDER], message("<in@example.org>"))
        assert reply.startswith("250 "), reply
        assert await g.queued() == []


async def test_submission_refuses_unauthenticated_mail_and_rcpt(tmp_path: Path, sqlite_url: str) -> None:
    def dialogue(port: int) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
            c.ehlo("client.test")
            assert c.mail(SENDER)[0] == 530
            code, text = c.rcpt(CUSTOMER)
            assert (code, text[:5]) == (530, b"5.7.0")
            assert c.docmd("DATA")[0] == 530

    async with running(gateway_config(tmp_path, sqlite_url)) as g:
        await asyncio.to_thread(dialogue, g.submission.port)
        assert await g.queued() == []


@pytest.mark.parametrize("listener", ["smtp", "submission"])
async def test_agent_may_only_send_as_its_own_tenant(tmp_path: Path, sqlite_url: str, listener: str) -> None:
    async with running(gateway_config(tmp_path, sqlite_url)) as g:
        port = getattr(g, listener).port
        for sender in ("only@beta.test", "someone@example.org", ""):
            reply = await asend(port, sender, [CUSTOMER], message("<x@acme.test>"), login="anna@acme.test")
            assert reply.startswith("553 5.7.1"), (sender, reply)
        reply = await asend(port, SENDER, [CUSTOMER], message("<ok@acme.test>"), login="anna@acme.test")
        assert reply.startswith("250 "), reply
        ((row, rcpts),) = await g.queued()
        assert (row.mail_from, list(rcpts)) == (SENDER, [CUSTOMER])


async def test_trusted_network_relays_only_for_its_tenants_senders(tmp_path: Path, sqlite_url: str) -> None:
    config = gateway_config(tmp_path, sqlite_url, trusted_networks=["127.0.0.1/32"])
    async with running(config) as g:
        reply = await asend(g.smtp.port, SENDER, [CUSTOMER], message("<trusted@acme.test>"))
        assert reply.startswith("250 "), reply
        ((row, _),) = await g.queued()
        assert (row.tenant_id, row.agent_id) == ("acme", None)
        for sender in ("only@beta.test", "someone@example.org"):
            reply = await asend(g.smtp.port, sender, [CUSTOMER], message("<spoof@acme.test>"))
            assert reply.startswith("553 5.7.1"), (sender, reply)
        assert len(await g.queued()) == 1
        # Inbound mail from any sender to the tenant is still delivered locally.
        reply = await asend(g.smtp.port, CUSTOMER, [SENDER], message("<in@example.org>", sender=CUSTOMER))
        assert reply.startswith("250 "), reply
        assert len(await g.folder("INBOX")) == 1
        # Another client (not in the networks) gets nothing: drop the trust again.
        g.config = gateway_config(tmp_path, sqlite_url)
        reply = await asend(g.smtp.port, SENDER, [CUSTOMER], message("<untrusted@acme.test>"))
        assert reply.startswith("554 5.7.1"), reply


async def test_auth_before_tls_is_refused_on_a_remote_connection(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tests connect from 127.0.0.1: make the listeners treat every peer as remote.
    monkeypatch.setattr(smtp_server, "_loopback", lambda ip: False)
    plain = "PLAIN " + b64(f"\0anna@acme.test\0{PASSWORD}")

    def dialogue(smtp_port: int, submission_port: int, tls: ssl.SSLContext) -> None:
        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=10) as c:
            c.ehlo("client.test")
            assert c.has_extn("starttls")
            assert not c.has_extn("auth")
            code, text = c.docmd("AUTH", plain)
            assert (code, text[:6]) == (538, b"5.7.11"), text
            c.starttls(context=tls)
            c.ehlo("client.test")
            assert "PLAIN" in c.esmtp_features["auth"].upper()
            assert c.docmd("AUTH", plain)[0] == 235
        with smtplib.SMTP("127.0.0.1", submission_port, timeout=10) as c:
            c.ehlo("client.test")
            assert not c.has_extn("auth")
            assert c.docmd("AUTH", plain)[0] == 530  # must STARTTLS first
            assert c.mail(SENDER)[0] == 530

    async with running(gateway_config(tmp_path, sqlite_url)) as g:
        await asyncio.to_thread(dialogue, g.smtp.port, g.submission.port, g.client_tls)
        reply = await asend(
            g.submission.port, SENDER, [CUSTOMER], message("<tls@acme.test>"),
            login="anna@acme.test", tls=g.client_tls,
        )  # fmt: skip
        assert reply.startswith("250 "), reply


async def test_wrong_password_is_delayed_and_counted(tmp_path: Path, sqlite_url: str) -> None:
    delay = 0.3
    config = gateway_config(tmp_path, sqlite_url)
    limits = parse_config({"limits": {"auth": {"max_failures": 3}}}).limits
    config = config.model_copy(update={"limits": limits})
    async with running(config, auth_delay=delay) as g:

        def auth(password: str) -> tuple[int, float]:
            with smtplib.SMTP("127.0.0.1", g.submission.port, timeout=10) as c:
                c.ehlo("client.test")
                started = time.monotonic()
                code, _ = c.docmd("AUTH", "PLAIN " + b64(f"\0anna@acme.test\0{password}"))
                return code, time.monotonic() - started

        for _ in range(2):
            code, took = await asyncio.to_thread(auth, "wrong")
            assert code == 535
            assert took >= delay
        code, took = await asyncio.to_thread(auth, PASSWORD)
        assert code == 235  # two failures: still allowed
        code, took = await asyncio.to_thread(auth, "wrong")
        assert (code, took >= delay) == (535, True)
        # Three failures from this address: even the right password is refused now, after the delay.
        code, took = await asyncio.to_thread(auth, PASSWORD)
        assert (code, took >= delay) == (535, True)


# --------------------------------------------------------------------------- 5. limits


async def test_attachment_and_size_limits(tmp_path: Path, sqlite_url: str) -> None:
    async with running(gateway_config(tmp_path, sqlite_url)) as g:
        port, anna = g.submission.port, {"login": "anna@acme.test"}
        reply = await asend(port, SENDER, [CUSTOMER], with_attachments("<four@acme.test>", 4), **anna)
        assert reply.startswith("552 5.3.4"), reply
        assert "attachments" in reply
        assert "4" in reply
        assert "limit is 3" in reply
        reply = await asend(port, SENDER, [CUSTOMER], with_attachments("<three@acme.test>", 3), **anna)
        assert reply.startswith("250 "), reply

        huge = big("<huge@acme.test>", 21 * 10**6)
        # Declared with SIZE: refused at MAIL FROM ...
        reply = await asend(port, SENDER, [CUSTOMER], huge, options=(f"SIZE={len(huge)}",), **anna)
        assert reply.startswith("552 5.3.4"), reply
        assert "size" in reply.lower()
        # ... and undeclared: refused after DATA.
        reply = await asend(port, SENDER, [CUSTOMER], huge, **anna)
        assert reply.startswith("552 5.3.4"), reply
        assert "size" in reply.lower()
        queued = await g.queued()
        assert len(queued) == 1
        assert len(await g.folder("Sent")) == 1


async def test_tenant_size_limit_below_the_listener_limit(tmp_path: Path, sqlite_url: str) -> None:
    # The listener accepts up to the largest tenant limit (beta: 20 MB); acme's 1 MB is the Outbox's.
    async with running(gateway_config(tmp_path, sqlite_url, max_message_size="1 MB")) as g:
        reply = await reply_as(g, "anna@acme.test", big("<mb@acme.test>", 1_500_000))
        assert reply.startswith("552 5.3.4"), reply
        assert "1000000" in reply
        assert await g.queued() == []


# --------------------------------------------------------------------------- 6. collisions


async def test_collision_hold_then_warn(tmp_path: Path, db_url: str) -> None:
    async with running(gateway_config(tmp_path, db_url, collision="hold")) as g:
        customer = message("<c1@example.org>", sender=CUSTOMER, to=SENDER, subject="order 17")
        await g.pipeline.deliver(g.tenant(), customer, Delivery(source="smtp", recipients=(SENDER,)))

        a1 = message("<a1@acme.test>", in_reply_to="<c1@example.org>", references="<c1@example.org>")
        assert (await reply_as(g, "anna@acme.test", a1)).startswith("250 ")
        assert await g.flags("<c1@example.org>") & ANSWERED

        b1 = message("<b1@acme.test>", in_reply_to="<c1@example.org>")
        held = await reply_as(g, "piotr@acme.test", b1)
        assert held.startswith("450 4.7.1"), held
        assert "anna@acme.test" in held

        a2 = message(
            "<a2@acme.test>", in_reply_to="<c1@example.org>", references="<c1@example.org> <a1@acme.test>"
        )
        assert (await reply_as(g, "anna@acme.test", a2)).startswith("250 ")  # not a collision: her own
        assert await g.events() == [
            ("answered", "anna@acme.test", "<c1@example.org>"),
            ("collision", "piotr@acme.test", "<c1@example.org>"),  # held, and counted
            ("answered", "anna@acme.test", "<c1@example.org>"),
        ]
        assert len(await g.queued()) == 2

        g.config = gateway_config(tmp_path, db_url, collision="warn")
        b2 = message("<b2@acme.test>", in_reply_to="<c1@example.org>")
        assert (await reply_as(g, "piotr@acme.test", b2)).startswith("250 ")
        # His collision on this customer message counted already (when b1 was held): once per agent.
        assert (await g.events())[3:] == [("answered", "piotr@acme.test", "<c1@example.org>")]

        # Anna answered first: piotr's reply under "warn" does not make her follow-ups collisions.
        g.config = gateway_config(tmp_path, db_url, collision="hold")
        a3 = message("<a3@acme.test>", in_reply_to="<c1@example.org>")
        reply = await reply_as(g, "anna@acme.test", a3)
        assert reply.startswith("250 "), reply
        assert (await g.events())[4:] == [("answered", "anna@acme.test", "<c1@example.org>")]
        held = await reply_as(g, "piotr@acme.test", message("<b3@acme.test>", in_reply_to="<c1@example.org>"))
        assert held.startswith("450 4.7.1"), held
        assert "anna@acme.test" in held
        assert len(await g.events()) == 5  # counted once already

        # The customer writes again in the thread: a new message to answer, by anyone.
        again = message(
            "<c2@example.org>", sender=CUSTOMER, to=SENDER, subject="Re: order 17",
            in_reply_to="<a1@acme.test>", references="<c1@example.org> <a1@acme.test>",
        )  # fmt: skip
        await g.pipeline.deliver(g.tenant(), again, Delivery(source="smtp", recipients=(SENDER,)))
        b4 = message(
            "<b4@acme.test>", in_reply_to="<c2@example.org>",
            references="<c1@example.org> <a1@acme.test> <c2@example.org>",
        )  # fmt: skip
        reply = await reply_as(g, "piotr@acme.test", b4)
        assert reply.startswith("250 "), reply
        assert (await g.events())[5:] == [("answered", "piotr@acme.test", "<c2@example.org>")]
        assert await g.flags("<c2@example.org>") & ANSWERED

        sent = [str(message_from_bytes(m)["Message-ID"]) for m in await g.folder("Sent")]
        assert sent == [
            "<a1@acme.test>",
            "<a2@acme.test>",
            "<b2@acme.test>",
            "<a3@acme.test>",
            "<b4@acme.test>",
        ]
        assert len(await g.queued()) == 5  # the accepted replies only: b1 and b3 were held
        # Both customer messages stay in INBOX, both flagged \Answered; held replies left no trace.
        assert len(await g.folder("INBOX")) == 2
        assert await g.flags("<c1@example.org>") & await g.flags("<c2@example.org>") & ANSWERED

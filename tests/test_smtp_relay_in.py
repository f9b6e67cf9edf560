"""SMTP relay-in against our real listener: smtplib, raw sockets and swaks."""

from __future__ import annotations

import asyncio
import smtplib
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import select

from gateway.config import Config, parse_config
from gateway.daemon import open_store
from gateway.ingest import Pipeline
from gateway.smtp.server import Limits, RelayServer
from storage import mailstore
from storage.blobs import BlobStore
from storage.db import Database
from storage.models import Message
from tests.conftest import config_dict, peer

MESSAGE = (
    b"From: Customer <customer@example.org>\r\n"
    b"To: biuro@acme.test\r\n"
    b"Subject: hello\r\n"
    b"Message-ID: <m1@example.org>\r\n"
    b"\r\n"
    b"Hello there.\r\n"
)


class Relay:
    """A running relay-in listener on an ephemeral port, with its store."""

    def __init__(self, server: RelayServer, db: Database, blobs: BlobStore) -> None:
        self.server, self.db, self.blobs = server, db, blobs

    @property
    def port(self) -> int:
        return self.server.port

    async def messages(self, tenant: str, folder: str) -> list[bytes]:
        async with self.db.read() as s:
            f = await mailstore.require_folder(s, tenant, folder)
            blobs = (
                await s.scalars(select(Message.blob).where(Message.folder_id == f.id).order_by(Message.uid))
            ).all()
        return [await self.blobs.get(b) for b in blobs]

    async def send(self, *args: object, **kwargs: object) -> object:
        return await asyncio.to_thread(smtp_send, self.port, *args, **kwargs)


def smtp_send(port: int, mail_from: str, rcpts: list[str], data: bytes) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
        return c.sendmail(mail_from, rcpts, data)


async def start_relay(config: Config, limits: Limits | None = None) -> Relay:
    db, blobs = await open_store(config)
    server = RelayServer(lambda: config, Pipeline(db, blobs), limits=limits)
    await server.start("127.0.0.1", 0)
    return Relay(server, db, blobs)


@pytest.fixture
async def relay(config: Config) -> AsyncIterator[Relay]:
    r = await start_relay(config)
    yield r
    await r.server.stop()
    await r.db.close()


def smtp_error(exc_info: pytest.ExceptionInfo[BaseException]) -> str:
    exc = exc_info.value
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        ((code, text),) = exc.recipients.values()
        return f"{code} {text.decode()}"
    assert isinstance(exc, smtplib.SMTPResponseException)
    return f"{exc.smtp_code} {exc.smtp_error.decode()}"


async def test_accepts_and_stores_byte_exact_after_a_trace_header(relay: Relay) -> None:
    assert await relay.send("customer@example.org", ["biuro@acme.test"], MESSAGE) == {}
    (stored,) = await relay.messages("acme", "INBOX")
    assert stored.startswith(b"Received: from ")
    assert b"for <biuro@acme.test>" in stored
    assert stored.endswith(MESSAGE)


async def test_rule_files_into_folder_and_spam_into_junk(relay: Relay) -> None:
    order = MESSAGE.replace(b"Subject: hello", b"Subject: =?UTF-8?Q?Zam=C3=B3wienie?= 12").replace(
        b"m1@", b"m2@"
    )
    spam = MESSAGE.replace(b"Subject: hello", "X-Spam-Flag: YES\r\nSubject: zamówienie".encode()).replace(
        b"m1@", b"m3@"
    )
    await relay.send("customer@example.org", ["biuro@acme.test"], order)
    await relay.send("customer@example.org", ["biuro@acme.test"], spam)
    assert len(await relay.messages("acme", "Orders")) == 1
    assert len(await relay.messages("acme", "Spam")) == 1
    assert await relay.messages("acme", "INBOX") == []


async def test_foreign_domain_is_relay_denied(relay: Relay) -> None:
    with pytest.raises(smtplib.SMTPRecipientsRefused) as exc:
        await relay.send("a@example.org", ["victim@elsewhere.test"], MESSAGE)
    assert smtp_error(exc).startswith("554 5.7.1")


async def test_address_not_listed_by_tenant_is_unknown_user(relay: Relay) -> None:
    with pytest.raises(smtplib.SMTPRecipientsRefused) as exc:
        await relay.send("a@example.org", ["other@beta.test"], MESSAGE)
    assert smtp_error(exc).startswith("550 5.1.1")
    assert await relay.send("a@example.org", ["only@beta.test"], MESSAGE) == {}


async def test_per_recipient_results_and_one_copy_per_tenant(relay: Relay) -> None:
    refused = await relay.send(
        "a@example.org", ["a@acme.test", "b@acme.test", "only@beta.test", "x@nowhere.test"], MESSAGE
    )
    assert list(refused) == ["x@nowhere.test"]
    assert refused["x@nowhere.test"][0] == 554
    assert len(await relay.messages("acme", "INBOX")) == 1
    assert len(await relay.messages("beta", "INBOX")) == 1


async def test_retried_message_is_stored_once(relay: Relay) -> None:
    for _ in range(3):
        await relay.send("customer@example.org", ["biuro@acme.test"], MESSAGE)
    assert len(await relay.messages("acme", "INBOX")) == 1


async def test_message_over_tenant_limit_is_refused(tmp_path: Path, db_url: str) -> None:
    config = parse_config(config_dict(tmp_path, db_url, max_message_size="2 KB"))
    relay = await start_relay(config)
    try:
        big = MESSAGE + b"x" * 3000 + b"\r\n"
        with pytest.raises(smtplib.SMTPException) as exc:
            await relay.send("a@example.org", ["biuro@acme.test"], big)
        assert smtp_error(exc).startswith("552 5.3.4")
        # Without SIZE= the limit is enforced after DATA, with the same reply.
        commands = [b"EHLO x", b"MAIL FROM:<a@example.org>", b"RCPT TO:<biuro@acme.test>", b"DATA"]
        replies = await asyncio.to_thread(raw_session, relay.port, commands, big + b".\r\n")
        assert replies[-2].startswith(b"552 5.3.4"), replies
        assert await relay.messages("acme", "INBOX") == []
    finally:
        await relay.server.stop()
        await relay.db.close()


def raw_session(port: int, commands: list[bytes], data: bytes | None = None) -> list[bytes]:
    """Speak SMTP by hand; returns every reply line read."""
    replies: list[bytes] = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        f = sock.makefile("rb")

        def read_reply() -> None:
            while True:
                line = f.readline()
                replies.append(line.rstrip(b"\r\n"))
                if len(line) < 4 or line[3:4] != b"-":
                    return

        read_reply()
        for command in commands:
            sock.sendall(command + b"\r\n")
            read_reply()
        if data is not None:
            sock.sendall(data)
            read_reply()
            sock.sendall(b"QUIT\r\n")
            read_reply()
    return replies


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"\n.\n", id="lf-dot-lf"),
        pytest.param(b"\r\n.\n", id="crlf-dot-lf"),
        pytest.param(b"\n.\r\n", id="lf-dot-crlf"),
        pytest.param(b"\r.\r", id="cr-dot-cr"),
        pytest.param(b"\r\n.\r", id="crlf-dot-cr"),
    ],
)
async def test_smtp_smuggling_does_not_inject_a_second_message(relay: Relay, payload: bytes) -> None:
    smuggled = (
        b"Subject: first\r\n\r\nfirst body"
        + payload
        + b"MAIL FROM:<ceo@acme.test>\r\nRCPT TO:<biuro@acme.test>\r\nDATA\r\n"
        + b"From: ceo@acme.test\r\nSubject: smuggled\r\n\r\nsmuggled\r\n.\r\n"
    )
    replies = await asyncio.to_thread(
        raw_session,
        relay.port,
        [b"EHLO x", b"MAIL FROM:<a@example.org>", b"RCPT TO:<biuro@acme.test>", b"DATA"],
        smuggled,
    )
    assert any(r.startswith(b"550 5.5.2") for r in replies), replies
    assert await relay.messages("acme", "INBOX") == []


async def test_helo_cannot_inject_a_header(relay: Relay) -> None:
    replies = await asyncio.to_thread(
        raw_session,
        relay.port,
        [b"EHLO evil\rX-Injected: yes", b"MAIL FROM:<a@example.org>", b"RCPT TO:<biuro@acme.test>", b"DATA"],
        MESSAGE + b".\r\n",
    )
    assert replies[-2].startswith(b"250"), replies
    (stored,) = await relay.messages("acme", "INBOX")
    head = stored.split(b"\r\n\r\n", 1)[0]
    assert b"X-Injected" not in head.replace(b"evil?X-Injected", b"")
    assert b"\r" not in head.replace(b"\r\n", b"")


async def test_too_many_recipients(tmp_path: Path, db_url: str) -> None:
    config = parse_config(config_dict(tmp_path, db_url))
    relay = await start_relay(config, Limits(recipients=2))
    try:
        refused = await relay.send("a@example.org", ["a@acme.test", "b@acme.test", "c@acme.test"], MESSAGE)
        assert refused["c@acme.test"][0] == 452
    finally:
        await relay.server.stop()
        await relay.db.close()


async def test_connection_limit_answers_421_and_keeps_serving(tmp_path: Path, db_url: str) -> None:
    config = parse_config({**config_dict(tmp_path, db_url), "limits": {"smtp": {"per_ip": 2}}})
    relay = await start_relay(config)
    try:

        def crowd() -> bytes:
            socks = [socket.create_connection(("127.0.0.1", relay.port), timeout=5) for _ in range(3)]
            try:
                greetings = [s.recv(200) for s in socks]
            finally:
                for s in socks:
                    s.close()
            return greetings[2]

        assert (await asyncio.to_thread(crowd)).startswith(b"421 4.7.0")
        assert await relay.send("a@example.org", ["biuro@acme.test"], MESSAGE) == {}
    finally:
        await relay.server.stop()
        await relay.db.close()


async def test_overlong_command_line_is_refused(relay: Relay) -> None:
    replies = await asyncio.to_thread(raw_session, relay.port, [b"EHLO " + b"x" * 2000, b"NOOP"])
    assert replies[1].startswith(b"500"), replies
    assert replies[2].startswith(b"250"), replies


async def test_swaks_delivers(relay: Relay) -> None:
    swaks = peer("swaks")
    proc = await asyncio.create_subprocess_exec(
        swaks,
        "--server",
        f"127.0.0.1:{relay.port}",
        "--to",
        "sklep@acme.test",
        "--from",
        "c@example.org",
        "--header",
        "Subject: zamówienie 7",
        "--body",
        "Proszę o fakturę.",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode()
    assert b"<-  250 2.0.0 OK queued as" in out
    assert len(await relay.messages("acme", "Orders")) == 1

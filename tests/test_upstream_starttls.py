"""``security = "starttls"`` to upstream IMAP: required, never opportunistic.

A private Dovecot offers STARTTLS on its plain port with a test CA; a server
that does not offer it (a stand-in recording every byte it receives) is left
before any credential is sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.config import parse_config
from gateway.daemon import open_store
from gateway.ingest import Pipeline
from gateway.pull.imap_client import UpstreamError
from gateway.pull.puller import FolderPuller, HostLimits, jobs
from tests.conftest import config_dict
from tests.dovecot import Dovecot

PASSWORD = "upstream-secret-pw"
pytestmark = pytest.mark.peers


@pytest.fixture
def upstream_password(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("MAILGATE_TEST_UPSTREAM", PASSWORD)
    return PASSWORD


async def pull_once(tmp_path: Path, db_url: str, box: dict[str, Any]) -> int:
    config = parse_config(config_dict(tmp_path, db_url, mailboxes=[box]))
    db, blobs = await open_store(config)
    try:
        (job,) = list(jobs(config))
        puller = FolderPuller(job, lambda: config, Pipeline(db, blobs), db, HostLimits())
        client = await puller.connect()
        try:
            return await puller.sync(client)
        finally:
            await client.logout()
    finally:
        await db.close()


def box(host: str, port: int, **fields: Any) -> dict[str, Any]:
    return {
        "name": "biuro",
        "host": host,
        "port": port,
        "security": "starttls",
        "username": "biuro",
        "password_env": "MAILGATE_TEST_UPSTREAM",
        "idle": False,
        **fields,
    }


async def test_starttls_on_the_plain_port_pulls(
    tmp_path: Path, db_url: str, dovecot: Dovecot, upstream_password: str
) -> None:
    dovecot.add_user("biuro", upstream_password)
    dovecot.append("biuro", "INBOX", b"Subject: s\r\nMessage-ID: <s@x>\r\n\r\nbody\r\n")
    pulled = await pull_once(tmp_path, db_url, box(dovecot.host, dovecot.port, ca_file=str(dovecot.cafile)))
    assert pulled == 1
    *_, login = [line for line in dovecot.log().splitlines() if "Login: user=<biuro>" in line]
    assert ", TLS," in login  # mailgate's login (the last) came over the upgraded connection


async def test_an_untrusted_certificate_fails_before_the_login(
    tmp_path: Path, db_url: str, dovecot: Dovecot, upstream_password: str
) -> None:
    dovecot.add_user("biuro", upstream_password)
    with pytest.raises(UpstreamError, match="TLS handshake after STARTTLS"):
        await pull_once(tmp_path, db_url, box(dovecot.host, dovecot.port))  # system trust only
    assert "Login: user=<biuro>" not in dovecot.log()


class NoStartTLS:
    """An IMAP greeting without STARTTLS, recording everything a client sends."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> NoStartTLS:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] no TLS here\r\n")
        try:
            while line := await asyncio.wait_for(reader.readline(), 10):
                self.received += line
                tag = line.split(b" ", 1)[0]
                if b"CAPABILITY" in line.upper():
                    writer.write(b"* CAPABILITY IMAP4rev1 AUTH=PLAIN LOGIN\r\n" + tag + b" OK done\r\n")
                elif b"LOGOUT" in line.upper():
                    writer.write(b"* BYE\r\n" + tag + b" OK bye\r\n")
                else:
                    writer.write(tag + b" OK whatever\r\n")
                await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def no_starttls() -> AsyncIterator[NoStartTLS]:
    async with NoStartTLS() as server:
        yield server


async def test_a_server_without_starttls_is_refused_and_never_sees_the_password(
    tmp_path: Path, db_url: str, no_starttls: NoStartTLS, upstream_password: str
) -> None:
    with pytest.raises(UpstreamError, match=r"does not offer STARTTLS \(security = \"starttls\"\)"):
        await pull_once(tmp_path, db_url, box("127.0.0.1", no_starttls.port))
    await asyncio.sleep(0.1)
    assert PASSWORD.encode() not in no_starttls.received
    assert b"LOGIN" not in no_starttls.received.upper().replace(b"LOGOUT", b"")
    assert b"AUTHENTICATE" not in no_starttls.received.upper()

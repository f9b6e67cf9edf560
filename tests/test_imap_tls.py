"""IMAP over TLS: STARTTLS, implicit TLS, and no cleartext login from the network."""

from __future__ import annotations

import asyncio
import imaplib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme
from argon2 import PasswordHasher

from gateway.auth import Authenticator
from gateway.config import Config, parse_config
from gateway.daemon import open_store
from gateway.imap import commands as c
from gateway.imap.index import FolderIndex
from gateway.imap.server import IMAPServer
from gateway.imap.session import Session
from gateway.notify import Changes
from storage.db import Database
from tests.conftest import config_dict

PASSWORD = "agent-password"
HASH = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash(PASSWORD)


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def setup(tmp_path: Path, db_url: str) -> AsyncIterator[tuple[Config, Database, Authenticator, object]]:
    data = config_dict(tmp_path, db_url)
    data["tenants"][0]["agents"] = [{"login": "anna@acme.test", "password_hash": HASH}]
    config = parse_config(data)
    db, blobs = await open_store(config)
    yield config, db, Authenticator(lambda: config, db, failure_delay=0.01), blobs
    await db.close()


def server_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    return ctx


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "imaps"])
async def test_tls_listeners(
    setup: tuple[Config, Database, Authenticator, object], ca: trustme.CA, implicit: bool
) -> None:
    config, db, auth, blobs = setup
    server = IMAPServer(
        lambda: config,
        db,
        blobs,
        auth,
        Changes(),
        tls=server_context(ca),
        implicit_tls=implicit,  # type: ignore[arg-type]
    )
    await server.start("127.0.0.1", 0)

    def scenario() -> None:
        if implicit:
            client = imaplib.IMAP4_SSL("127.0.0.1", server.port, ssl_context=client_context(ca), timeout=10)
        else:
            client = imaplib.IMAP4("127.0.0.1", server.port, timeout=10)
            assert "STARTTLS" in client.capabilities
            client.starttls(client_context(ca))
            assert "STARTTLS" not in client.capabilities
        assert client.login("anna@acme.test", PASSWORD)[0] == "OK"
        assert client.select("INBOX")[0] == "OK"
        client.logout()

    try:
        await asyncio.to_thread(scenario)
    finally:
        await server.stop()


async def test_no_cleartext_login_from_the_network(
    setup: tuple[Config, Database, Authenticator, object],
) -> None:
    config, db, auth, blobs = setup
    session = Session(
        config=lambda: config, db=db, blobs=blobs, auth=auth, changes=Changes(),  # type: ignore[arg-type]
        index=FolderIndex(db, Changes()), peer="192.0.2.7", tls=False, starttls_available=True,
        loopback=False,
    )  # fmt: skip
    assert "LOGINDISABLED" in session.capabilities()
    assert "AUTH=PLAIN" not in session.capabilities()
    await session.handle(c.Login("a1", "LOGIN", "anna@acme.test", PASSWORD))
    assert session.take() == b"a1 NO [PRIVACYREQUIRED] log in over TLS (STARTTLS) first\r\n"
    session.tls = True
    await session.handle(c.Login("a2", "LOGIN", "anna@acme.test", PASSWORD))
    assert session.take().startswith(b"a2 OK")


async def test_authenticate_plain_without_initial_response(
    setup: tuple[Config, Database, Authenticator, object],
) -> None:
    config, db, auth, blobs = setup
    server = IMAPServer(lambda: config, db, blobs, auth, Changes())  # type: ignore[arg-type]
    await server.start("127.0.0.1", 0)

    def scenario() -> None:
        client = imaplib.IMAP4("127.0.0.1", server.port, timeout=10)
        # imaplib sends AUTHENTICATE PLAIN, waits for "+", then sends the response.
        typ, _ = client.authenticate("PLAIN", lambda _: f"\0anna@acme.test\0{PASSWORD}".encode())
        assert typ == "OK"
        client.logout()

    try:
        await asyncio.to_thread(scenario)
    finally:
        await server.stop()

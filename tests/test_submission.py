"""Submission and relay through the tenant's own SMTP server (in-process, real swaks)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from argon2 import PasswordHasher
from sqlalchemy import select

from gateway.auth import Authenticator
from gateway.config import Config, parse_config
from gateway.daemon import open_store
from gateway.ingest import Pipeline
from gateway.notify import Changes
from gateway.relay.worker import RelayWorker
from gateway.smtp.outbox import Outbox
from gateway.smtp.server import RelayServer
from storage import mailstore
from storage.blobs import BlobStore
from storage.db import Database
from storage.models import Message
from tests.conftest import config_dict, peer
from tests.smarthost import Smarthost

PASSWORD = "agent-password"
HASH = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash(PASSWORD)
RELAY_PASSWORD = "tenant-relay-secret"


class Gateway:
    def __init__(
        self, config: Config, db: Database, blobs: BlobStore, submission: RelayServer, worker: RelayWorker
    ) -> None:
        self.config, self.db, self.blobs, self.submission, self.worker = config, db, blobs, submission, worker

    async def folder(self, name: str, tenant: str = "acme") -> list[bytes]:
        async with self.db.read() as s:
            f = await mailstore.require_folder(s, tenant, name)
            blobs = (
                await s.scalars(select(Message.blob).where(Message.folder_id == f.id).order_by(Message.uid))
            ).all()
        return [await self.blobs.get(b) for b in blobs]


@pytest.fixture
async def smarthost() -> AsyncIterator[Smarthost]:
    host = await Smarthost(username="biuro@acme.test", password=RELAY_PASSWORD, security="starttls").start()
    yield host
    await host.stop()


async def start_gateway(tmp_path: Path, db_url: str, smtp: dict[str, Any], **tenant: Any) -> Gateway:
    data = config_dict(tmp_path, db_url, smtp=smtp, **tenant)
    data["tenants"][0]["agents"] = [
        {"login": "anna@acme.test", "password_hash": HASH},
        {"login": "piotr@acme.test", "password_hash": HASH},
    ]
    config = parse_config(data)
    db, blobs = await open_store(config)
    changes = Changes()
    pipeline = Pipeline(db, blobs, changes=changes)
    worker = RelayWorker(lambda: config, db, blobs, pipeline)
    outbox = Outbox(db, blobs, changes, worker.wake.set)
    ca = trustme.CA()
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(tls)
    auth = Authenticator(lambda: config, db, failure_delay=0.05)
    submission = RelayServer(lambda: config, pipeline, tls=tls, outbox=outbox, auth=auth, submission=True)
    await submission.start("127.0.0.1", 0)
    return Gateway(config, db, blobs, submission, worker)


@pytest.fixture
async def gateway(
    tmp_path: Path, db_url: str, smarthost: Smarthost, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Gateway]:
    monkeypatch.setenv("MAILGATE_TEST_RELAY", RELAY_PASSWORD)
    smtp = {
        "host": "127.0.0.1",
        "port": smarthost.port,
        "security": "starttls",
        "username": "biuro@acme.test",
        "password_env": "MAILGATE_TEST_RELAY",
        "from": "biuro@acme.test",
        "ca_file": smarthost.ca_file(tmp_path),
    }
    g = await start_gateway(tmp_path, db_url, smtp)
    yield g
    await g.submission.stop()
    await g.worker.drain()
    await g.db.close()


async def swaks(port: int, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        peer("swaks"), "--server", f"127.0.0.1:{port}", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate()
    return out.decode("utf-8", "replace")


async def test_submission_over_starttls_relays_byte_exact_and_keeps_a_sent_copy(
    gateway: Gateway, smarthost: Smarthost, tmp_path: Path
) -> None:
    message = tmp_path / "reply.eml"
    message.write_bytes(
        b"From: Biuro <biuro@acme.test>\r\nTo: customer@example.org\r\nSubject: Re: order\r\n"
        b"Message-ID: <reply-1@acme.test>\r\n\r\nYour order ships today.\r\n"
    )
    out = await swaks(
        gateway.submission.port, "--tls", "--auth", "PLAIN", "--auth-user", "anna@acme.test",
        "--auth-password", PASSWORD, "--from", "biuro@acme.test", "--to", "customer@example.org",
        "--data", str(message),
    )  # fmt: skip
    assert "250 2.0.0 OK queued as" in out, out
    await gateway.worker.run_once()
    await gateway.worker.drain()
    (got,) = smarthost.received
    assert got.rcpts == ["customer@example.org"]
    (sent,) = await gateway.folder("Sent")
    assert got.data == sent
    assert b"\r\n\r\nYour order ships today.\r\n" in got.data

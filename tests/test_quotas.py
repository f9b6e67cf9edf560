"""Quotas (Spam excluded), warnings, the spam purge, snapshots and restore."""

from __future__ import annotations

import asyncio
import imaplib
import smtplib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher
from sqlalchemy import select

from gateway.auth import Authenticator
from gateway.config import Config, parse_config
from gateway.daemon import open_store
from gateway.imap.server import IMAPServer
from gateway.ingest import Delivery, Pipeline, with_structures
from gateway.notify import Changes
from gateway.scheduler import Scheduler
from gateway.smtp.server import RelayServer
from storage import mailstore, snapshots
from storage.blobs import BlobStore
from storage.db import Database
from storage.flags import join_flags
from storage.models import Message
from tests.conftest import config_dict, on_every_blob_backend

PASSWORD = "agent-password"
HASH = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash(PASSWORD)
NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def mail(n: int, size: int = 0, spam: bool = False, subject: str = "hello") -> bytes:
    head = (
        f"From: c{n}@example.org\r\nTo: biuro@acme.test\r\nSubject: {subject} {n}\r\nMessage-ID: <q{n}@x>\r\n"
    )
    if spam:
        head += "X-Spam-Flag: YES\r\n"
    lines = b"".join(b"x" * 76 + b"\r\n" for _ in range(size // 78))
    return (head + "\r\n").encode() + lines + b"\r\n"


class Env:
    def __init__(self, config: Config, db: Database, blobs: BlobStore, clock: list[datetime]) -> None:
        self.config, self.db, self.blobs, self.clock = config, db, blobs, clock
        self.changes = Changes()
        self.pipeline = Pipeline(db, blobs, clock=lambda: clock[0], changes=self.changes)
        self.scheduler = Scheduler(lambda: config, db, blobs, self.pipeline, clock=lambda: clock[0])

    async def deliver(self, raw: bytes, **kw: Any) -> Any:
        return await self.pipeline.deliver(self.config.tenant("acme"), raw, Delivery(source="smtp", **kw))

    async def folders(self) -> dict[str, tuple[int, int]]:
        async with self.db.read() as s:
            return {f.name: (f.used_messages, f.used_bytes) for f in await mailstore.list_folders(s, "acme")}

    async def rows(self, folder: str) -> list[Message]:
        async with self.db.read() as s:
            f = await mailstore.require_folder(s, "acme", folder)
            return list(
                (
                    await s.scalars(select(Message).where(Message.folder_id == f.id).order_by(Message.uid))
                ).all()
            )


@pytest.fixture
async def env(tmp_path: Path, db_url: str, blobs_section: dict[str, Any]) -> AsyncIterator[Env]:
    data = config_dict(tmp_path, db_url, quota="1 MB")
    data["tenants"][0]["agents"] = [{"login": "anna@acme.test", "password_hash": HASH}]
    data["snapshots"] = {"dir": str(tmp_path / "snapshots"), "keep": 3}
    data["blobs"] = blobs_section
    config = parse_config(data)
    db, blobs = await open_store(config)
    yield Env(config, db, blobs, [NOW])
    await blobs.close()
    await db.close()


async def test_quota_boundaries_over_smtp_and_imap(env: Env) -> None:
    relay = RelayServer(lambda: env.config, env.pipeline)
    await relay.start("127.0.0.1", 0)
    imap = IMAPServer(
        lambda: env.config, env.db, env.blobs, Authenticator(lambda: env.config, env.db), env.changes
    )
    await imap.start("127.0.0.1", 0)

    def smtp(raw: bytes) -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as c:
            c.ehlo("x")
            c.mail("c@example.org")
            c.rcpt("biuro@acme.test")
            return c.data(raw)

    try:
        for n in range(4):  # 4 x ~200 KB fit in 1 MB
            assert (await asyncio.to_thread(smtp, mail(n, 200_000)))[0] == 250
        code, text = await asyncio.to_thread(smtp, mail(10, 300_000))  # data() returns the final reply
        assert (code, text[:5]) == (452, b"4.2.2")
        # The same message as spam is accepted: Spam never counts.
        assert (await asyncio.to_thread(smtp, mail(11, 300_000, spam=True)))[0] == 250
        folders = await env.folders()
        assert folders["Spam"][0] == 1

        def client() -> None:
            c = imaplib.IMAP4("127.0.0.1", imap.port, timeout=10)
            c.login("anna@acme.test", PASSWORD)
            typ, data = c.getquotaroot("INBOX")
            used_kib = -(-folders["INBOX"][1] // 1024)
            assert any(f"(STORAGE {used_kib} 976)".encode() in d for d in data[1]), data
            c.select("Spam")
            typ, data = c._simple_command("MOVE", "1", "INBOX")  # type: ignore[attr-defined]
            assert typ == "NO"
            assert b"[OVERQUOTA]" in data[0]
            c.logout()

        await asyncio.to_thread(client)
    finally:
        await relay.stop()
        await imap.stop()


async def test_warnings_once_per_crossing_and_again_after_rearming(env: Env) -> None:
    async def notices() -> list[str]:
        return [r.subject for r in await env.rows("INBOX") if r.subject.startswith("Quota warning")]

    await env.deliver(mail(1, 820_000))  # 82 %
    assert await env.scheduler.quota_warnings() == 1
    assert await env.scheduler.quota_warnings() == 0  # once per crossing
    await env.deliver(mail(2, 140_000))  # 96 %
    assert await env.scheduler.quota_warnings() == 1
    env.clock[0] += timedelta(days=1, minutes=1)  # still above 95 % a day later
    assert await env.scheduler.quota_warnings() == 1
    assert len(await notices()) == 3
    # Drop below 80 % (re-arms), then rise again: warned again.
    async with env.db.write() as s:
        inbox = await mailstore.require_folder(s, "acme", "INBOX")
        big = [r.uid for r in await env.rows("INBOX") if r.size > 500_000]
        await mailstore.expunge(s, inbox, big)
    assert await env.scheduler.quota_warnings() == 0
    await env.deliver(mail(3, 850_000))  # 14 % + 85 %: past 80 and 95 again, one notice each
    assert await env.scheduler.quota_warnings() == 2
    assert (await notices())[-2:] == [
        "Quota warning: the mailbox has passed 80% of its quota",
        "Quota warning: the mailbox has passed 95% of its quota",
    ]


@on_every_blob_backend
async def test_spam_purge_by_received_date_with_a_moved_clock(env: Env) -> None:
    for n, days in ((1, 91), (2, 89), (3, 91)):
        await env.deliver(mail(n, spam=n != 3), received_at=NOW - timedelta(days=days))
    env.clock[0] = NOW
    dry = await env.scheduler.purge_spam(dry_run=True)
    assert dict(dry.messages) == {"acme": 1}
    assert (await env.folders())["Spam"][0] == 2
    spam_id = (await env.rows("Spam"))[0].folder_id
    told: list[set[int]] = []
    env.changes.subscribe(told.append)
    done = await env.scheduler.purge_spam()
    assert dict(done.messages) == dict(dry.messages)
    assert spam_id in set().union(*told)  # open IMAP sessions (the folder index) hear of it at once
    folders = await env.folders()
    assert folders["Spam"][0] == 1
    assert folders["INBOX"][0] == 1  # old non-spam is never touched
    assert [r.subject for r in await env.rows("Spam")] == ["hello 2"]


@on_every_blob_backend
async def test_two_snapshots_in_one_second_get_distinct_names(env: Env) -> None:
    """The defect: a second snapshot within the same second (the scheduler's and `mailgate snapshot
    create`, or two creates) failed with 'Directory not empty' (tests/test_operator_docs.py, CI)."""
    first = await env.scheduler.snapshot()  # the clock stands still: both at NOW
    second = await env.scheduler.snapshot()
    assert second.name == first.name + "-2"
    assert [i.name for i in snapshots.listing(first.path.parent)][:2] == [second.name, first.name]
    assert snapshots.verify(second.path) == []


@on_every_blob_backend
async def test_snapshot_restore_is_byte_exact_and_idempotent(env: Env) -> None:
    for n in range(5):
        await env.deliver(mail(n, 1000), received_at=NOW - timedelta(hours=n))
    async with env.db.write() as s:
        inbox = await mailstore.require_folder(s, "acme", "INBOX")
        await mailstore.store_flags(s, inbox, [1, 3], ["\\Flagged", "Important"], "add")
    before = await env.rows("INBOX")
    info = await env.scheduler.snapshot()
    assert snapshots.verify(info.path) == []
    async with env.db.write() as s:
        inbox = await mailstore.require_folder(s, "acme", "INBOX")
        await mailstore.expunge(s, inbox, [1, 2, 3, 4, 5])
        await mailstore.delete_folder(s, "acme", "Orders")

    async def restore(**kw: Any) -> snapshots.RestoreReport:
        return await snapshots.restore(
            env.db, env.blobs, info.path, tenant_id="acme", describe=with_structures, **kw
        )

    first = await restore(folder="INBOX")
    again = await restore(folder="INBOX")
    assert (first.restored, again.restored, again.skipped) == (5, 0, 5)
    restored = await env.rows(f"Restored/{info.name[:8]}/INBOX")
    assert [await env.blobs.get(r.blob) for r in restored] == [await env.blobs.get(r.blob) for r in before]
    assert [join_flags(r.sysflags, r.keywords) for r in restored] == [
        join_flags(r.sysflags, r.keywords) for r in before
    ]
    assert [r.internal_date for r in restored] == [r.internal_date for r in before]
    assert all(r.envelope for r in restored)
    one = await restore(message_id="<q2@x>", in_place=True)
    assert one.restored == 1
    assert [r.message_id for r in await env.rows("INBOX")] == ["<q2@x>"]


async def test_snapshot_while_delivering_is_consistent(env: Env, tmp_path: Path) -> None:
    env.config.tenant("acme")

    async def deliver_many() -> None:
        for n in range(1000):
            await env.deliver(mail(100 + n, 200))

    delivering = asyncio.create_task(deliver_many())
    await asyncio.sleep(0.2)
    info = await env.scheduler.snapshot()
    await delivering
    assert 0 < info.messages <= 1000
    assert snapshots.verify(info.path) == []
    assert [i.name for i in snapshots.listing(env.config.snapshots.dir)] == [info.name]

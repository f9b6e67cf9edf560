"""Pulling from a real Dovecot, in-process: byte-exact, rules, Junk, policies, UIDVALIDITY."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from gateway.config import Config, TenantSection, parse_config
from gateway.daemon import open_store
from gateway.ingest import Outcome, Pipeline, Prepared, Within
from gateway.message import parse_headers
from gateway.pull.imap_client import UpstreamError
from gateway.pull.puller import BATCH, FolderPuller, HostLimits, jobs
from storage import mailstore, upstream
from storage.blobs import BlobStore
from storage.db import Database
from storage.errors import StoreError
from storage.models import Message, Tenant
from tests import corpus
from tests.conftest import config_dict
from tests.dovecot import Dovecot

PASSWORD = "upstream-secret"
pytestmark = pytest.mark.peers


def mailbox(dovecot: Dovecot, user: str, **fields: Any) -> dict[str, Any]:
    return dovecot.mailbox(user, **{"folders": {"INBOX": "INBOX", "Junk": "Spam"}, **fields})


class Env:
    """A store and a configuration pulling from Dovecot users."""

    def __init__(self, config: Config, db: Database, blobs: BlobStore) -> None:
        self.config, self.db, self.blobs = config, db, blobs
        self.pipeline = Pipeline(db, blobs)

    def puller(self, mailbox: str, folder: str = "INBOX") -> FolderPuller:
        (job,) = [j for j in jobs(self.config) if j.mailbox.name == mailbox and j.folder == folder]
        return FolderPuller(job, lambda: self.config, self.pipeline, self.db, HostLimits())

    async def pull(self, mailbox: str, folder: str = "INBOX") -> int:
        puller = self.puller(mailbox, folder)
        client = await puller.connect()
        try:
            return await puller.sync(client)
        finally:
            await client.logout()

    async def stored(self, folder: str | None = None) -> list[bytes]:
        async with self.db.read() as s:
            query = select(Message.blob).where(Message.tenant_id == "acme").order_by(Message.id)
            if folder is not None:
                f = await mailstore.require_folder(s, "acme", folder)
                query = query.where(Message.folder_id == f.id)
            blobs = (await s.scalars(query)).all()
        return [await self.blobs.get(b) for b in blobs]

    async def count(self) -> int:
        async with self.db.read() as s:
            return int(await s.scalar(select(func.count()).select_from(Message)) or 0)


@pytest.fixture
def upstream_password(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("MAILGATE_TEST_UPSTREAM", PASSWORD)
    return PASSWORD


async def make_env(tmp_path: Path, db_url: str, boxes: list[dict[str, Any]]) -> Env:
    config = parse_config(config_dict(tmp_path, db_url, mailboxes=boxes))
    db, blobs = await open_store(config)
    return Env(config, db, blobs)


@pytest.fixture
async def env(tmp_path: Path, db_url: str, dovecot: Dovecot, upstream_password: str) -> AsyncIterator[Env]:
    for user in ("biuro", "sklep"):
        dovecot.add_user(user, upstream_password)
    e = await make_env(tmp_path, db_url, [mailbox(dovecot, "biuro"), mailbox(dovecot, "sklep")])
    yield e
    await e.db.close()


async def test_pull_stores_every_message_byte_exact(env: Env, dovecot: Dovecot) -> None:
    messages = corpus.normal(20) + corpus.malformed() + corpus.large(2)
    for m in messages:
        dovecot.append("biuro", "INBOX", m)
    dovecot.append("sklep", "INBOX", corpus.normal(1, seed=7)[0])
    upstream_bytes = dovecot.messages("biuro", "INBOX")

    assert await env.pull("biuro") == len(messages)
    assert await env.pull("sklep") == 1
    stored = await env.stored()
    assert sorted(stored) == sorted([*upstream_bytes, *dovecot.messages("sklep", "INBOX")])
    # BODY.PEEK[]: nothing was marked read upstream.
    assert all("\\Seen" not in f.flags for f in dovecot.fetch("biuro", "INBOX"))


async def test_rules_route_pulled_mail_and_upstream_junk_is_spam(env: Env, dovecot: Dovecot) -> None:
    order = b"From: k@example.org\r\nSubject: zam\xc3\xb3wienie 5\r\nMessage-ID: <o@x>\r\n\r\nx\r\n"
    # A message the rules would file elsewhere is still spam when it comes from Junk.
    junk = b"From: s@example.org\r\nSubject: zam\xc3\xb3wienie tanio\r\nMessage-ID: <j@x>\r\n\r\ny\r\n"
    dovecot.append("biuro", "INBOX", order)
    dovecot.append("biuro", "Junk", junk)
    await env.pull("biuro", "INBOX")
    await env.pull("biuro", "Junk")
    assert len(await env.stored("Orders")) == 1
    assert len(await env.stored("Spam")) == 1


async def test_large_mailbox_pulls_completely_and_a_second_pass_fetches_nothing(
    env: Env, dovecot: Dovecot
) -> None:
    dovecot.deliver_files("biuro", "INBOX", corpus.normal(5000, size=2000))
    assert await env.pull("biuro") == 5000
    assert await env.pull("biuro") == 0
    assert await env.count() == 5000
    async with env.db.read() as s:
        state = await upstream.folder_state(s, "acme", "biuro", "INBOX")
        (health,) = await upstream.mailboxes(s, "acme") or [None]
    assert state is not None
    assert state.last_uid == 5000
    assert health is not None
    assert health.messages_pulled == 5000


async def test_uidvalidity_change_makes_no_duplicates_and_no_gaps(env: Env, dovecot: Dovecot) -> None:
    first = corpus.normal(30, seed=1)
    dovecot.deliver_files("biuro", "INBOX", first)
    assert await env.pull("biuro") == 30
    old = dovecot.uidvalidity("biuro")
    dovecot.deliver_files("biuro", "INBOX", corpus.normal(5, seed=2), sync=False)
    assert dovecot.recreate_folder("biuro", "INBOX") != old
    assert await env.pull("biuro") == 5
    assert await env.count() == 35
    assert sorted(await env.stored()) == sorted(dovecot.messages("biuro", "INBOX"))


@pytest.mark.parametrize("policy", ["seen", "delete", "move:Archive"])
async def test_after_fetch_policy_is_applied_after_commit(
    tmp_path: Path, db_url: str, dovecot: Dovecot, upstream_password: str, policy: str
) -> None:
    dovecot.add_user("biuro", upstream_password)
    dovecot.create_folder("biuro", "Archive")
    dovecot.deliver_files("biuro", "INBOX", corpus.normal(60))
    env = await make_env(tmp_path, db_url, [mailbox(dovecot, "biuro", after_fetch=policy)])
    try:
        assert await env.pull("biuro") == 60
        left = dovecot.fetch("biuro", "INBOX")
        if policy == "seen":
            assert all("\\Seen" in f.flags for f in left)
        else:
            assert left == []
        if policy.startswith("move:"):
            assert dovecot.exists("biuro", "Archive") == 60
        assert await env.count() == 60
    finally:
        await env.db.close()


async def test_policy_missed_by_a_crash_is_reapplied_without_reimport(
    tmp_path: Path, db_url: str, dovecot: Dovecot, upstream_password: str
) -> None:
    dovecot.add_user("biuro", upstream_password)
    dovecot.deliver_files("biuro", "INBOX", corpus.normal(10))
    # First pass with "keep" stands for a run that crashed after the commit and
    # before deleting upstream; the next run has after_fetch = "delete".
    keep = await make_env(tmp_path, db_url, [mailbox(dovecot, "biuro")])
    assert await keep.pull("biuro") == 10
    await keep.db.close()
    delete = await make_env(tmp_path, db_url, [mailbox(dovecot, "biuro", after_fetch="delete")])
    try:
        assert await delete.pull("biuro") == 0
        assert dovecot.exists("biuro") == 0
        assert await delete.count() == 10
    finally:
        await delete.db.close()


async def test_implicit_tls_with_the_configured_ca(
    tmp_path: Path, db_url: str, dovecot: Dovecot, upstream_password: str
) -> None:
    dovecot.add_user("biuro", upstream_password)
    dovecot.deliver_files("biuro", "INBOX", corpus.normal(3))
    box = mailbox(dovecot, "biuro", port=dovecot.tls_port, security="tls", ca_file=str(dovecot.cafile))
    env = await make_env(tmp_path, db_url, [box])
    try:
        assert await env.pull("biuro") == 3
    finally:
        await env.db.close()


async def test_wrong_password_is_an_auth_failure(
    tmp_path: Path, db_url: str, dovecot: Dovecot, upstream_password: str
) -> None:
    from gateway.pull.imap_client import AuthFailed

    dovecot.add_user("biuro", "another-password")
    env = await make_env(tmp_path, db_url, [mailbox(dovecot, "biuro")])
    try:
        with pytest.raises(AuthFailed):
            await env.puller("biuro").connect()
    finally:
        await env.db.close()


async def test_connection_dropped_mid_fetch_fails_fast_and_next_pass_completes(
    tmp_path: Path, db_url: str, dovecot: Dovecot, upstream_password: str
) -> None:
    from tests.dovecot import dropping_proxy

    dovecot.add_user("biuro", upstream_password)
    dovecot.deliver_files("biuro", "INBOX", corpus.normal(200, size=5000))
    with dropping_proxy(dovecot.port, drop_after_bytes=300_000, max_drops=1) as proxy:
        env = await make_env(tmp_path, db_url, [mailbox(dovecot, "biuro", port=proxy.port)])
        try:
            with pytest.raises(UpstreamError):
                await env.pull("biuro")
            partial = await env.count()
            assert 0 < partial < 200
            assert await env.pull("biuro") == 200 - partial
            assert await env.count() == 200
        finally:
            await env.db.close()


async def test_over_quota_leaves_mail_upstream_until_space_is_freed(
    tmp_path: Path, db_url: str, dovecot: Dovecot, upstream_password: str
) -> None:
    from gateway.ingest import Delivery

    dovecot.add_user("biuro", upstream_password)
    dovecot.deliver_files("biuro", "INBOX", corpus.normal(5, size=100_000, seed=5))
    data = config_dict(
        tmp_path, db_url, quota="300 KB", mailboxes=[mailbox(dovecot, "biuro", after_fetch="delete")]
    )
    config = parse_config(data)
    db, blobs = await open_store(config)
    env = Env(config, db, blobs)
    try:
        filler = b"Subject: filler\r\nMessage-ID: <filler@x>\r\n\r\n" + b"y" * 76 * 3000 + b"\r\n"
        await env.pipeline.deliver(config.tenant("acme"), filler, Delivery(source="smtp"))
        assert await env.pull("biuro") == 0  # all five wait
        assert dovecot.exists("biuro") == 5  # nothing was taken, nothing deleted upstream
        async with db.write() as s:
            inbox = await mailstore.require_folder(s, "acme", "INBOX")
            await mailstore.expunge(s, inbox, [1])
        # Room for some of the five: those are stored (and deleted upstream), the rest waits.
        stored = await env.pull("biuro")
        assert 0 < stored < 5
        assert await env.count() == stored
        assert dovecot.exists("biuro") == 5 - stored
        async with db.write() as s:
            tenant = await s.get(Tenant, "acme")
            assert tenant is not None
            tenant.quota_bytes = 10**7
        assert await env.pull("biuro") == 5 - stored
        assert dovecot.exists("biuro") == 0
        assert await env.count() == 5
    finally:
        await db.close()


async def last_uid(env: Env, mailbox: str, folder: str = "INBOX") -> int:
    async with env.db.read() as s:
        state = await upstream.folder_state(s, "acme", mailbox, folder)
    return 0 if state is None else state.last_uid


async def test_pipelined_batches_commit_in_order_and_none_after_a_failed_commit(
    env: Env, dovecot: Dovecot
) -> None:
    """Batch 3 is fetched and prepared while batch 2 commits; batch 2's commit fails: batch 3 is
    never committed, and the last UID stays at batch 1's last message (no gap behind it)."""
    total = 5 * BATCH
    dovecot.deliver_files("biuro", "INBOX", corpus.normal(total, size=2000, seed=21))
    prepare, commit = env.pipeline.prepare, env.pipeline.commit
    prepared, commits = 0, 0
    third_prepared = asyncio.Event()

    async def counting_prepare(tenant: TenantSection, items: Sequence[tuple[bytes, Any]]) -> list[Prepared]:
        nonlocal prepared
        out = await prepare(tenant, items)
        prepared += 1
        if prepared == 3:
            third_prepared.set()
        return out

    async def failing_second_commit(
        tenant: TenantSection, batch: Sequence[Prepared], within: Within | None = None
    ) -> list[Outcome]:
        nonlocal commits
        commits += 1
        if commits == 2:
            await asyncio.wait_for(third_prepared.wait(), 30)  # the pipeline overlaps batches
            raise StoreError("the disk is full")
        return await commit(tenant, batch, within)

    env.pipeline.prepare = counting_prepare  # type: ignore[method-assign]
    env.pipeline.commit = failing_second_commit  # type: ignore[method-assign]
    with pytest.raises(StoreError):
        await env.pull("biuro")
    assert commits == 2
    assert prepared >= 3
    assert await env.count() == BATCH
    assert await last_uid(env, "biuro") == BATCH  # UIDs 1..BATCH: exactly what is stored
    env.pipeline.prepare, env.pipeline.commit = prepare, commit  # type: ignore[method-assign]
    assert await env.pull("biuro") == total - BATCH
    assert await env.count() == total
    assert await last_uid(env, "biuro") == total


async def test_pipelined_policy_acts_upstream_only_on_committed_batches(
    tmp_path: Path, db_url: str, dovecot: Dovecot, upstream_password: str
) -> None:
    """With after_fetch = "delete" and batches overlapping, no message of a batch is gone
    upstream when its commit starts."""
    dovecot.add_user("biuro", upstream_password)
    dovecot.deliver_files("biuro", "INBOX", corpus.normal(6 * BATCH, size=2000, seed=22))
    env = await make_env(tmp_path, db_url, [mailbox(dovecot, "biuro", after_fetch="delete")])
    commit = env.pipeline.commit
    gone_before_commit: list[str | None] = []

    async def checking_commit(
        tenant: TenantSection, batch: Sequence[Prepared], within: Within | None = None
    ) -> list[Outcome]:
        left = await asyncio.to_thread(dovecot.messages, "biuro", "INBOX")
        upstream_ids = {parse_headers(m).message_id for m in left}
        gone_before_commit.extend(
            p.headers.message_id for p in batch if p.headers.message_id not in upstream_ids
        )
        return await commit(tenant, batch, within)

    env.pipeline.commit = checking_commit  # type: ignore[method-assign,assignment]
    try:
        assert await env.pull("biuro") == 6 * BATCH
        assert gone_before_commit == []
        assert dovecot.exists("biuro") == 0
        assert await env.count() == 6 * BATCH
    finally:
        await env.db.close()


async def test_fetch_records_split_right_whatever_parentheses_the_bodies_hold(
    env: Env, dovecot: Dovecot
) -> None:
    """The FETCH reader balances the parentheses of the response's text lines, never of the
    literals: bodies full of unbalanced ones still come out one message each, byte-exact."""
    base = corpus.normal(1, seed=40)[0]
    messages = [
        base.replace(b"Message-ID: <", b"Message-ID: <p%d." % i, 1).replace(
            b"\r\n\r\n", b"\r\n\r\n((( " + b")" * i + b"\r\n(\r\n", 1
        )
        for i in range(BATCH + 5)
    ]
    dovecot.deliver_files("biuro", "INBOX", messages)
    assert await env.pull("biuro") == len(messages)
    assert sorted(await env.stored()) == sorted(dovecot.messages("biuro", "INBOX"))

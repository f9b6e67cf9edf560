"""Mail store, config sync and migrations, on SQLite and PostgreSQL (the blob store: test_blobs.py)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import select, text, update

from gateway.config import Config, parse_config
from gateway.daemon import open_store
from gateway.tenants import apply
from storage import mailstore
from storage.blobs import BlobStore
from storage.db import Database
from storage.errors import FolderExists, NoSuchFolder, StoreError
from storage.models import Agent, Base, Expunge, Folder, Message, Tenant
from tests.conftest import config_dict, on_every_blob_backend

NOW = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def msg(blob: str = "0" * 64, size: int = 100, **kw: object) -> mailstore.NewMessage:
    return mailstore.NewMessage(blob=blob, size=size, received_at=NOW, **kw)  # type: ignore[arg-type]


async def usage(db: Database, tenant: str, folder: str) -> tuple[int, int, int, int]:
    async with db.read() as s:
        f = await mailstore.require_folder(s, tenant, folder)
        t = await s.get(Tenant, tenant)
        assert t is not None
        return f.used_bytes, f.used_messages, t.used_bytes, t.used_messages


async def test_schema_from_migrations_equals_models(store: tuple[Database, BlobStore]) -> None:
    db, _ = store

    def diff(conn: object) -> list[object]:
        return list(compare_metadata(MigrationContext.configure(conn), Base.metadata))  # type: ignore[arg-type]

    async with db.writer.connect() as conn:
        assert await conn.run_sync(diff) == []


async def test_sync_creates_default_and_configured_folders(store: tuple[Database, BlobStore]) -> None:
    db, _ = store
    async with db.read() as s:
        names = {f.name: f.special_use for f in await mailstore.list_folders(s, "acme")}
        agent = await s.scalar(select(Agent).where(Agent.login == "anna@acme.test"))
    assert names == {
        "INBOX": "\\Inbox",
        "Sent": "\\Sent",
        "Drafts": "\\Drafts",
        "Trash": "\\Trash",
        "Spam": "\\Junk",
        "Archive": "\\Archive",
        "Templates": None,
        "Orders": None,
    }
    assert agent is not None
    assert agent.active


async def test_apply_is_idempotent_keeps_unmentioned_tenants_and_deactivates_removed_agents(
    config: Config, store: tuple[Database, BlobStore]
) -> None:
    db, _ = store
    data = config_dict(Path("/tmp"), config.gateway.database_url, agents=[])
    data["tenants"] = data["tenants"][:1]
    smaller = parse_config(data)
    assert await apply(db, smaller) == ["tenant acme"]
    assert await apply(db, smaller) == []
    async with db.read() as s:
        beta = await s.get(Tenant, "beta")
        agent = await s.scalar(select(Agent).where(Agent.login == "anna@acme.test"))
        folders = await mailstore.list_folders(s, "acme")
    assert beta is not None
    assert beta.active  # a file that does not mention a tenant never removes it (only --prune does)
    assert agent is not None
    assert not agent.active
    assert len(folders) == 8


@on_every_blob_backend
async def test_append_allocates_strictly_increasing_uids_and_counts(
    store: tuple[Database, BlobStore],
) -> None:
    db, _ = store
    async with db.write() as s:
        inbox = await mailstore.require_folder(s, "acme", "inbox")
        first = await mailstore.append(s, inbox, [msg(size=10), msg(size=20)])
        second = await mailstore.append(s, inbox, [msg(size=30)])
    assert [m.uid for m in first + second] == [1, 2, 3]
    assert first[0].modseq < second[0].modseq
    assert await usage(db, "acme", "INBOX") == (60, 3, 60, 3)


@on_every_blob_backend
async def test_concurrent_appends_never_share_a_uid(store: tuple[Database, BlobStore]) -> None:
    db, _ = store

    async def one() -> int:
        async with db.write() as s:
            inbox = await mailstore.require_folder(s, "acme", "INBOX")
            (stored,) = await mailstore.append(s, inbox, [msg()])
            return stored.uid

    uids = await asyncio.gather(*(one() for _ in range(20)))
    assert sorted(uids) == list(range(1, 21))


async def test_junk_does_not_count_against_the_tenant(store: tuple[Database, BlobStore]) -> None:
    db, _ = store
    async with db.write() as s:
        spam = await mailstore.require_folder(s, "acme", "Spam")
        await mailstore.append(s, spam, [msg(size=500)])
    assert await usage(db, "acme", "Spam") == (500, 1, 0, 0)


@on_every_blob_backend
async def test_flags_copy_move_expunge(store: tuple[Database, BlobStore]) -> None:
    db, _ = store
    async with db.write() as s:
        inbox = await mailstore.require_folder(s, "acme", "INBOX")
        orders = await mailstore.require_folder(s, "acme", "Orders")
        spam = await mailstore.require_folder(s, "acme", "Spam")
        await mailstore.append(
            s, inbox, [msg(size=10, flags=frozenset({"\\Seen"})), msg(size=20), msg(size=40)]
        )
        changes = await mailstore.store_flags(s, inbox, [1, 2], ["\\flagged", "Orders"], "add")
        assert [c.flags for c in changes] == [("\\Seen", "\\Flagged", "Orders"), ("\\Flagged", "Orders")]
        assert await mailstore.store_flags(s, inbox, [1], ["\\Flagged"], "add") == []
        removed = await mailstore.store_flags(s, inbox, [1], ["\\Seen"], "remove")
        assert removed[0].modseq > changes[0].modseq
        copied = await mailstore.copy(s, inbox, [1, 2], orders)
        assert [(src, st.uid) for src, st in copied] == [(1, 1), (2, 2)]
        moved = await mailstore.move(s, inbox, [3], spam)
        assert [(src, st.uid) for src, st in moved] == [(3, 1)]
        await mailstore.store_flags(s, inbox, [2], ["\\Deleted"], "add")
        assert await mailstore.expunge(s, inbox) == [2]
    assert await usage(db, "acme", "INBOX") == (10, 1, 40, 3)
    assert await usage(db, "acme", "Orders") == (30, 2, 40, 3)
    assert await usage(db, "acme", "Spam") == (40, 1, 40, 3)


@pytest.mark.parametrize(
    ("age_days", "pruned", "kept", "floor"),
    [(7, 0, [1, 2, 3], 0), (29, 0, [1, 2, 3], 0), (31, 2, [3], "first expunge")],
)
async def test_expunge_history_is_kept_30_days_then_pruned(
    store: tuple[Database, BlobStore], age_days: int, pruned: int, kept: list[int], floor: object
) -> None:
    """QRESYNC's history: expunged UIDs stay 30 days; pruning raises folders.expunges_pruned to
    the highest MODSEQ it forgot, so a resync from below it knows the history is incomplete."""
    db, _ = store
    async with db.write() as s:
        inbox = await mailstore.require_folder(s, "acme", "INBOX")
        await mailstore.append(s, inbox, [msg(), msg(), msg()])
        await mailstore.expunge(s, inbox, [1, 2])
    async with db.write() as s:
        first = await s.scalar(select(Expunge.modseq).where(Expunge.uid == 1))
        aged = datetime.now(UTC) - timedelta(days=age_days)
        await s.execute(update(Expunge).values(expunged_at=aged))
        await mailstore.expunge(s, await mailstore.require_folder(s, "acme", "INBOX"), [3])  # now
    async with db.write() as s:
        assert await mailstore.prune_expunges(s, datetime.now(UTC)) == pruned
    async with db.read() as s:
        assert sorted((await s.scalars(select(Expunge.uid))).all()) == kept
        inbox = await mailstore.require_folder(s, "acme", "INBOX")
        assert inbox.expunges_pruned == (first if floor == "first expunge" else floor)


async def test_folder_create_rename_delete(store: tuple[Database, BlobStore]) -> None:
    db, _ = store
    async with db.write() as s:
        parent = await mailstore.create_folder(s, "acme", "Clients")
        await mailstore.create_folder(s, "acme", "Clients/Big")
        with pytest.raises(FolderExists):
            await mailstore.create_folder(s, "acme", "Clients")
        with pytest.raises(StoreError):
            await mailstore.create_folder(s, "acme", "a//b")
        await mailstore.append(s, parent, [msg(size=7)])
        await mailstore.rename_folder(s, "acme", "Clients", "Customers")
        assert await mailstore.get_folder(s, "acme", "Customers/Big") is not None
        old_validity = parent.uidvalidity
        await mailstore.delete_folder(s, "acme", "Customers")
        with pytest.raises(NoSuchFolder):
            await mailstore.require_folder(s, "acme", "Customers")
        again = await mailstore.create_folder(s, "acme", "Customers")
        assert again.uidvalidity > old_validity
        with pytest.raises(StoreError):
            await mailstore.delete_folder(s, "acme", "INBOX")
    async with db.read() as s:
        t = await s.get(Tenant, "acme")
        assert t is not None
        assert t.used_bytes == 0


async def test_uidvalidity_differs_between_folders(store: tuple[Database, BlobStore]) -> None:
    db, _ = store
    async with db.read() as s:
        values = (await s.scalars(select(Folder.uidvalidity).where(Folder.tenant_id == "acme"))).all()
    assert len(set(values)) == len(values)


@on_every_blob_backend
async def test_restart_reopens_the_same_store(config: Config) -> None:
    db, _ = await open_store(config)
    async with db.write() as s:
        inbox = await mailstore.require_folder(s, "acme", "INBOX")
        await mailstore.append(s, inbox, [msg()])
    await db.close()
    db, _ = await open_store(config)
    try:
        async with db.write() as s:
            inbox = await mailstore.require_folder(s, "acme", "INBOX")
            (stored,) = await mailstore.append(s, inbox, [msg()])
        assert stored.uid == 2
    finally:
        await db.close()


async def test_sqlite_runs_durable_and_strict(store: tuple[Database, BlobStore]) -> None:
    db, _ = store
    if not db.is_sqlite:
        pytest.skip("SQLite pragmas")
    async with db.write() as s:
        mode = (await s.execute(text("PRAGMA journal_mode"))).scalar()
        sync = (await s.execute(text("PRAGMA synchronous"))).scalar()
        fks = (await s.execute(text("PRAGMA foreign_keys"))).scalar()
        busy = (await s.execute(text("PRAGMA busy_timeout"))).scalar()
    assert (mode, sync, fks) == ("wal", 2, 1)  # synchronous=2 is FULL
    assert busy is not None
    assert busy >= 10_000


async def test_header_text_with_nul_and_surrogates_is_stored(store: tuple[Database, BlobStore]) -> None:
    db, _ = store
    async with db.write() as s:
        inbox = await mailstore.require_folder(s, "acme", "INBOX")
        await mailstore.append(s, inbox, [msg(subject="a\x00b\udcff", message_id="<\x00@x>")])
    async with db.read() as s:
        row = await s.scalar(select(Message).where(Message.folder_id == inbox.id))
    assert row is not None
    assert row.subject == "a\ufffdb?"


async def test_read_event_is_recorded_once_per_agent_and_message(store: tuple[Database, BlobStore]) -> None:
    from storage.events import record_reads
    from storage.models import Event

    db, _ = store
    async with db.write() as s:
        inbox = await mailstore.require_folder(s, "acme", "INBOX")
        stored = await mailstore.append(s, inbox, [msg(), msg()])
        agent = await s.scalar(select(Agent).where(Agent.login == "anna@acme.test"))
        assert agent is not None
    for _ in range(3):
        async with db.write() as s:
            await record_reads(s, "acme", agent.id, [m.id for m in stored], NOW)
    async with db.read() as s:
        kinds = (await s.scalars(select(Event.kind).where(Event.agent_id == agent.id))).all()
    assert kinds == ["read", "read"]

"""Point-in-time snapshots of all tenants' mail, and additive restore from them.

Theory of operation
-------------------
Each snapshot is a directory with ``metadata.db`` (SQLite, the same schema)
and ``manifest.json``; the message files are in ``blobs/`` beside the
snapshots, shared by all of them, laid out as the local blob directory is.
With the local directory backend they are hard links to the immutable,
content-addressed files of the live store (no data is copied); with blobs in
PostgreSQL or S3 they are copies, each checked against its sha256. Either
way a snapshot survives the live blob's deletion, and a snapshot adds only
the blobs the earlier ones lack, so a second one costs little. The snapshot
directory is readable without the live database or blob store, whichever
backends they are.

Consistency while the daemon runs: on SQLite the online backup API copies
the database pages of one instant; on PostgreSQL the mail tables are read in
one REPEATABLE READ transaction. Blobs are written
before the rows that name them are committed, so every row read has its
blob; the maintenance lock keeps blob garbage collection out while the links
are made. The directory is built under a temporary name and renamed when
complete: a crashed snapshot never looks like one.

Restore copies messages from a snapshot into the live store additively: by
default into ``Restored/<date>/<folder>``, or with ``in_place`` into the
original folders. A message already present in the target folder (same
blob, same Message-ID) is skipped, so restoring twice never duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import itertools
import json
import os
import shutil
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, func, insert, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession

from storage import mailstore
from storage.blobs import BlobStore, FsBlobStore
from storage.db import Database
from storage.flags import join_flags
from storage.models import Base, Folder, Message

CHUNK = 2000
# Blobs of all snapshots, hard links into the live store, shared: a snapshot
# adds only the blobs the previous ones do not have.
POOL = "blobs"
_TABLE_NAMES = ("tenants", "domains", "agents", "folders", "messages")
# Not copied: recomputed from the blob on restore, and large.
_SKIP = {"envelope", "bodystructure", "body"}
NAME_FORMAT = "%Y%m%d-%H%M%S"


@contextlib.asynccontextmanager
async def maintenance_lock(data_dir: Path) -> AsyncIterator[None]:
    """Exclusive across processes: snapshots and blob garbage collection never overlap."""
    fd = await asyncio.to_thread(_open_lock, data_dir)
    try:
        await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _open_lock(data_dir: Path) -> int:
    data_dir.mkdir(parents=True, exist_ok=True)
    return os.open(data_dir / "maintenance.lock", os.O_RDWR | os.O_CREAT, 0o600)


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """A snapshot on disk, from its manifest."""

    name: str
    path: Path
    created_at: datetime
    messages: int
    bytes: int
    tenants: int


def _engine(path: Path) -> Engine:
    return create_engine(f"sqlite:///{path}")


@contextlib.asynccontextmanager
async def _consistent(db: Database) -> AsyncIterator[AsyncSession]:
    """A read transaction that sees one instant across all its statements."""
    if db.is_sqlite:
        async with db.read() as s:
            yield s
        return
    async with db.reader.connect() as conn:
        conn = await conn.execution_options(isolation_level="REPEATABLE READ")
        async with AsyncSession(bind=conn) as s, s.begin():
            yield s


async def create(
    db: Database, blobs: BlobStore, directory: Path, now: datetime, data_dir: Path
) -> SnapshotInfo:
    """Take a snapshot of everything into ``directory/<timestamp>`` (``<timestamp>-2`` and so on
    for a second one within the same second: names sort in the order they were taken)."""
    pool = directory / POOL
    async with maintenance_lock(data_dir):  # one snapshot at a time: the name below stays ours
        base = name = now.astimezone(UTC).strftime(NAME_FORMAT)
        for n in itertools.count(2):
            if not (directory / name).exists():
                break
            name = f"{base}-{n}"
        final = directory / name
        partial = directory / f".{name}.partial"
        await asyncio.to_thread(_fresh_dir, partial)
        if db.is_sqlite:
            # SQLite's online backup copies the pages of one consistent instant.
            await asyncio.to_thread(_backup, db, partial / "metadata.db")
        else:
            await _export(db, partial / "metadata.db")
        # Blobs named by the copied rows exist (written before their rows were
        # committed) and stay (the lock keeps garbage collection out).
        messages, size, digests = await asyncio.to_thread(_message_blobs, partial / "metadata.db")
        await _pool(blobs, pool, digests)
        tenants = await asyncio.to_thread(_count_tenants, partial / "metadata.db")
        manifest = {
            "name": name,
            "created_at": now.isoformat(),
            "messages": messages,
            "bytes": size,
            "tenants": tenants,
        }
        await asyncio.to_thread(_finish, partial, final, manifest)
    return SnapshotInfo(name, final, now, messages, size, tenants)


def _backup(db: Database, target: Path) -> None:
    source = sqlite3.connect(make_url(db.url).database or "")
    try:
        destination = sqlite3.connect(target)
        try:
            source.backup(destination)
        finally:
            destination.close()
    finally:
        source.close()


async def _export(db: Database, target: Path) -> None:
    """Copy the mail tables, read at one instant, into a new SQLite file."""
    engine = _engine(target)
    tables = [Base.metadata.tables[n] for n in _TABLE_NAMES]
    await asyncio.to_thread(Base.metadata.create_all, engine, tables)
    async with _consistent(db) as s:
        for table in tables:
            columns = [c for c in table.columns if c.name not in _SKIP]
            result = await s.stream(select(*columns).order_by(*table.primary_key.columns))
            async for chunk in result.mappings().partitions(CHUNK):
                await asyncio.to_thread(_write, engine, table, [dict(r) for r in chunk])
    engine.dispose()


def _message_blobs(path: Path) -> tuple[int, int, set[str]]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        rows = conn.execute("SELECT blob, size FROM messages").fetchall()
    return len(rows), sum(r[1] for r in rows), {r[0] for r in rows}


def _count_tenants(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return int(conn.execute("SELECT count(*) FROM tenants").fetchone()[0])


def _write(engine: Engine, table: Any, rows: list[dict[str, Any]]) -> None:
    with engine.begin() as conn:
        conn.execute(insert(table), rows)


def _blob_path(root: Path, digest: str) -> Path:
    return root / digest[:2] / digest[2:4] / digest


async def _pool(blobs: BlobStore, pool: Path, digests: set[str]) -> None:
    """Put the blobs into the snapshots' pool: hard links from a local store, checked copies from others."""
    if isinstance(blobs, FsBlobStore):
        await asyncio.to_thread(_link, blobs, pool, digests)
        return
    target = FsBlobStore(pool)
    for digest in sorted(digests):
        if await target.exists(digest):
            continue
        stored = await target.put(await blobs.get(digest))
        if stored != digest:
            await target.delete(stored)
            raise OSError(f"blob {digest} read back from the blob store with sha256 {stored}")


def _link(blobs: FsBlobStore, root: Path, digests: set[str]) -> None:
    for digest in digests:
        target = _blob_path(root, digest)
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(blobs.path(digest), target)
        except OSError:  # another file system: copy instead
            shutil.copy2(blobs.path(digest), target)


def _fresh_dir(partial: Path) -> None:
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)


def _finish(partial: Path, final: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest, make everything durable, then give the snapshot its name."""
    (partial / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    for path in (partial / "metadata.db", partial / "manifest.json", partial):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    os.replace(partial, final)


def listing(directory: Path) -> list[SnapshotInfo]:
    """Complete snapshots, newest first."""
    out: list[SnapshotInfo] = []
    if not directory.exists():
        return out
    for path in directory.iterdir():
        manifest = path / "manifest.json"
        if path.name.startswith(".") or not manifest.exists():
            continue
        data = json.loads(manifest.read_text(encoding="utf-8"))
        created = datetime.fromisoformat(data["created_at"])
        out.append(SnapshotInfo(path.name, path, created, data["messages"], data["bytes"], data["tenants"]))
    return sorted(out, key=lambda i: i.name, reverse=True)


def prune(directory: Path, keep: int) -> list[str]:
    """Delete all but the ``keep`` newest snapshots, and pool blobs no kept one names."""
    snaps = listing(directory)
    old = snaps[keep:]
    for info in old:
        shutil.rmtree(info.path)
    if old:
        wanted: set[str] = set()
        for info in snaps[:keep]:
            wanted |= _message_blobs(info.path / "metadata.db")[2]
        for blob in (directory / POOL).glob("*/*/*"):
            if blob.name not in wanted:
                blob.unlink()
    return [i.name for i in old]


def verify(path: Path, progress: Callable[[int, int], None] | None = None) -> list[str]:
    """Problems found in a snapshot: every blob's hash, and the metadata against itself."""
    problems: list[str] = []
    engine = _engine(path / "metadata.db")
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(Message.id, Message.blob, Message.size, Message.folder_id)).all()
            folders = {
                r.id: r
                for r in conn.execute(select(Folder.id, Folder.name, Folder.used_bytes, Folder.used_messages))
            }
    finally:
        engine.dispose()
    per_folder: dict[int, list[int]] = {}
    for n, row in enumerate(rows, 1):
        blob = _blob_path(path.parent / POOL, row.blob)
        try:
            data = blob.read_bytes()
        except FileNotFoundError:
            problems.append(f"message {row.id}: blob {row.blob} missing")
            continue
        if hashlib.sha256(data).hexdigest() != row.blob:
            problems.append(f"message {row.id}: blob {row.blob} is corrupt")
        if len(data) != row.size:
            problems.append(f"message {row.id}: size {row.size} but blob has {len(data)} bytes")
        if row.folder_id not in folders:
            problems.append(f"message {row.id}: folder {row.folder_id} missing")
        per_folder.setdefault(row.folder_id, [0, 0])
        per_folder[row.folder_id][0] += row.size
        per_folder[row.folder_id][1] += 1
        if progress is not None:
            progress(n, len(rows))
    for folder_id, folder in folders.items():
        used, count = per_folder.get(folder_id, [0, 0])
        if (used, count) != (folder.used_bytes, folder.used_messages):
            said = f"{folder.used_messages} messages / {folder.used_bytes} bytes"
            problems.append(f"folder {folder.name!r}: counters say {said}, found {count} / {used}")
    return problems


# --------------------------------------------------------------------------- restore


@dataclass
class RestoreReport:
    """What a restore did."""

    restored: int = 0
    skipped: int = 0
    folders: int = 0


def _snapshot_messages(
    path: Path, tenant_id: str, folder: str | None, message_id: str | None
) -> list[dict[str, Any]]:
    engine = _engine(path / "metadata.db")
    try:
        with engine.connect() as conn:
            query = (
                select(Message, Folder.name.label("folder_name"))
                .join(Folder, Folder.id == Message.folder_id)
                .where(Message.tenant_id == tenant_id)
                .order_by(Folder.name, Message.uid)
            )
            if folder is not None:
                query = query.where(Folder.name == mailstore.canonical_name(folder))
            if message_id is not None:
                query = query.where(Message.message_id == message_id)
            return [dict(r) for r in conn.execute(query).mappings()]
    finally:
        engine.dispose()


def _chunks(items: list[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


async def restore(
    db: Database,
    blobs: BlobStore,
    path: Path,
    *,
    tenant_id: str,
    folder: str | None = None,
    message_id: str | None = None,
    in_place: bool = False,
    describe: Callable[[bytes, mailstore.NewMessage], mailstore.NewMessage] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> RestoreReport:
    """Copy messages from the snapshot at ``path`` into the live store, additively.

    ``describe`` recomputes what the snapshot does not keep (IMAP structures)
    from a message's bytes.
    """
    rows = await asyncio.to_thread(_snapshot_messages, path, tenant_id, folder, message_id)
    report = RestoreReport()
    prefix = f"Restored/{path.name[:8]}/"
    seen_folders: set[str] = set()
    done = 0
    for chunk in _chunks(rows, 200):
        async with db.write() as s:
            for row in chunk:
                target_name = row["folder_name"] if in_place else prefix + row["folder_name"]
                target = await mailstore.get_folder(s, tenant_id, target_name)
                if target is None:
                    target = await _create_with_parents(s, tenant_id, target_name)
                if target_name not in seen_folders:
                    seen_folders.add(target_name)
                    report.folders += 1
                present = await s.scalar(
                    select(func.count()).where(
                        Message.folder_id == target.id,
                        Message.blob == row["blob"],
                        Message.message_id.is_(None)
                        if row["message_id"] is None
                        else Message.message_id == row["message_id"],
                    )
                )
                if present:
                    report.skipped += 1
                    continue
                source = _blob_path(path.parent / POOL, row["blob"])
                if not await blobs.exists(row["blob"]):
                    await blobs.put(await asyncio.to_thread(source.read_bytes))
                message = mailstore.NewMessage(
                    blob=row["blob"],
                    size=row["size"],
                    received_at=row["received_at"],
                    internal_date=row["internal_date"],
                    message_id=row["message_id"],
                    in_reply_to=row["in_reply_to"],
                    references=row["references"],
                    subject=row["subject"],
                    from_addr=row["from_addr"],
                    to_addr=row["to_addr"],
                    sent_date=row["sent_date"],
                    flags=frozenset(_flags(row)),
                )
                if describe is not None:
                    message = describe(await blobs.get(row["blob"]), message)
                await mailstore.append(s, target, [message])
                report.restored += 1
        done += len(chunk)
        if progress is not None:
            progress(done, len(rows))
    return report


def _flags(row: dict[str, Any]) -> tuple[str, ...]:
    return join_flags(row["sysflags"], row["keywords"])


async def _create_with_parents(s: AsyncSession, tenant_id: str, name: str) -> Folder:
    parts = name.split(mailstore.DELIMITER)
    for i in range(1, len(parts)):
        parent = mailstore.DELIMITER.join(parts[:i])
        if await mailstore.get_folder(s, tenant_id, parent) is None:
            await mailstore.create_folder(s, tenant_id, parent)
    return await mailstore.create_folder(s, tenant_id, name)

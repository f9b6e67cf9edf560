"""Retention: spam older than ``retention.spam_days`` is deleted, and blobs nobody references.

The purge works in short batches (one transaction each, through the mail
store, so counters stay right) and only ever touches folders whose
special-use is ``\\Junk``. A blob is removed only when no message or queued
message refers to it and it was not written or reused for
:data:`BLOB_GRACE` seconds: a delivery that is reusing it right now has just
touched it, so it is spared.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import exists, select

from storage import mailstore
from storage.blobs import BlobStore
from storage.db import Database, uninterrupted
from storage.models import Folder, Message, Outbound

BATCH = 500
BLOB_GRACE = 3600.0


@dataclass
class PurgeReport:
    """What a purge removed (or, dry, would remove), per tenant."""

    messages: Counter[str] = field(default_factory=Counter)
    bytes: Counter[str] = field(default_factory=Counter)
    blobs_removed: int = 0
    folders: set[int] = field(default_factory=set)  # the folders it expunged from


async def purge_spam(
    db: Database, blobs: BlobStore, now: datetime, days: int, *, dry_run: bool = False
) -> PurgeReport:
    """Delete (or count) spam received more than ``days`` days before ``now``."""
    cutoff = now - timedelta(days=days)
    report = PurgeReport()
    expired = (
        select(Message.id, Message.folder_id, Message.uid, Message.size, Message.blob, Message.tenant_id)
        .join(Folder, Folder.id == Message.folder_id)
        .where(Folder.special_use == mailstore.JUNK, Message.received_at < cutoff)
        .order_by(Message.id)
    )
    if dry_run:
        async with db.read() as s:
            for row in await s.execute(expired):
                report.messages[row.tenant_id] += 1
                report.bytes[row.tenant_id] += row.size
        return report
    freed: set[str] = set()

    async def batch() -> int:
        async with db.write() as s:
            rows = (await s.execute(expired.limit(BATCH))).all()
            by_folder: dict[int, list[int]] = {}
            for row in rows:
                by_folder.setdefault(row.folder_id, []).append(row.uid)
                report.messages[row.tenant_id] += 1
                report.bytes[row.tenant_id] += row.size
                freed.add(row.blob)
            for folder_id, uids in by_folder.items():
                folder = await s.get(Folder, folder_id)
                if folder is not None:
                    await mailstore.expunge(s, folder, uids)
                    report.folders.add(folder_id)
        return len(rows)

    while await uninterrupted(batch()) == BATCH:  # shutdown stops it between batches
        pass
    report.blobs_removed = await collect_blobs(db, blobs, freed, now.timestamp())
    return report


async def collect_blobs(db: Database, blobs: BlobStore, candidates: Iterable[str], now: float) -> int:
    """Remove the candidate blobs that nothing references and nobody touched lately."""
    removed = 0
    for digest in candidates:
        age = await blobs.age(digest, now)
        if age is None or age < BLOB_GRACE:
            continue
        async with db.read() as s:
            used = await s.scalar(select(exists().where(Message.blob == digest))) or await s.scalar(
                select(exists().where(Outbound.blob == digest))
            )
        if not used:
            await blobs.delete(digest)
            removed += 1
    return removed

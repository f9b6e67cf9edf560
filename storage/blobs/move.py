"""Moving an installation's blobs from one backend to another (``mailgate blobs migrate --to B``).

Theory of operation
-------------------
The configuration file says which backend the daemon uses (``[blobs]
backend``); the database's one ``blob_location`` row says where a move put
the blobs (``backend``) and, until the move ends, which backend still holds
copies (``previous``). A move has two halves, each run of the command doing
what is left of them:

1. **Copy and switch** (the daemon may be running on the old backend): every
   blob a message or a queued message names is copied to the new backend,
   unless it is there, and every one is then read back from the new backend
   in chunks and its sha256 checked. Only when all are verified is the switch
   recorded: ``backend`` = new, ``previous`` = old. From then on a daemon
   started with the old ``[blobs] backend`` refuses to start
   (:func:`gateway.blobs.open_blobs`), so nothing writes to the old backend
   once it has been restarted with the new one.
2. **Catch up and delete** (once the file says the new backend): blobs the
   daemon wrote to the old backend between the copy and its restart are
   copied and verified, then every blob is deleted from the old backend and
   ``previous`` is cleared. Until then the daemon reads through
   :class:`Moving`: a blob not yet on the new backend is read from the old.

Every step is idempotent: a run interrupted anywhere is finished by running
the command again; a blob already on the target is not copied twice.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import select, union

from storage.blobs.interface import HASH_INLINE, BlobStore, MissingBlob
from storage.db import Database
from storage.models import BlobLocation, Message, Outbound

PAGE = 1000
SHOWN = 10  # missing blobs named in an error


class MoveError(Exception):
    """The move cannot go on; nothing was switched or deleted that would lose a blob."""


@dataclass
class MoveReport:
    """What a run did, and what the operator does next."""

    copied: int = 0
    verified: int = 0
    deleted: int = 0
    lines: list[str] = field(default_factory=list)


async def location(db: Database) -> BlobLocation | None:
    """Where the last move put the blobs; None when they never moved."""
    async with db.read() as s:
        return await s.get(BlobLocation, 1)


async def referenced(db: Database) -> AsyncIterator[str]:
    """Every digest a message or a queued message names, once each, in order, a page at a time."""
    after = ""
    while True:
        query = union(
            select(Message.blob.label("blob")).where(Message.blob > after),
            select(Outbound.blob.label("blob")).where(Outbound.blob > after),
        )
        async with db.read() as s:
            page = list(await s.scalars(select(query.subquery().c.blob).order_by("blob").limit(PAGE)))
        for digest in page:
            yield digest
        if len(page) < PAGE:
            return
        after = page[-1]


async def still_referenced(db: Database, digest: str) -> bool:
    """True while a row names the blob (garbage collection may take one that is no longer named)."""
    async with db.read() as s:
        for column in (Message.blob, Outbound.blob):
            if await s.scalar(select(column).where(column == digest).limit(1)) is not None:
                return True
    return False


async def stored_digest(store: BlobStore, digest: str) -> str:
    """The sha256 of the blob as ``store`` returns it, read in chunks."""
    h = hashlib.sha256()
    async for chunk in store.stream(digest):
        if len(chunk) > HASH_INLINE:
            await asyncio.to_thread(h.update, chunk)
        else:
            h.update(chunk)
    return h.hexdigest()


async def copy(
    db: Database,
    source: BlobStore,
    target: BlobStore,
    report: MoveReport,
    *,
    verify_present: bool,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Copy every referenced blob that ``target`` lacks and check its sha256 there (with
    ``verify_present``, also those it had); :class:`MoveError` if any is lost or corrupt."""
    missing: list[str] = []
    seen = 0
    async for digest in referenced(db):
        seen += 1
        present = await target.exists(digest)
        if not present:
            try:
                data = await source.get(digest)
            except MissingBlob:
                if await still_referenced(db, digest):
                    missing.append(digest)
                continue
            await target.put(data)
            report.copied += 1
        if not present or verify_present:
            found = await stored_digest(target, digest)
            if found != digest:
                raise MoveError(f"blob {digest} reads back from the target with sha256 {found}")
            report.verified += 1
        if progress is not None:
            progress(seen)
    if missing:
        names = ", ".join(missing[:SHOWN]) + (" ..." if len(missing) > SHOWN else "")
        raise MoveError(f"{len(missing)} blob(s) named by messages are on neither backend: {names}")


async def delete_all(store: BlobStore, report: MoveReport) -> None:
    """Delete every blob of the backend a move left (all are verified on the new one)."""
    async for digest in store.digests():
        await store.delete(digest)
        report.deleted += 1


async def record(db: Database, backend: str, previous: str | None) -> None:
    """Write the ``blob_location`` row."""
    async with db.write() as s:
        row = await s.get(BlobLocation, 1)
        if row is None:
            s.add(BlobLocation(id=1, backend=backend, previous=previous, switched_at=datetime.now(UTC)))
        else:
            row.backend, row.previous, row.switched_at = backend, previous, datetime.now(UTC)


async def migrate(
    db: Database,
    to: str,
    configured: str,
    open_store: Callable[[str], BlobStore],
    progress: Callable[[int], None] | None = None,
) -> MoveReport:
    """Do what is left of moving the blobs to backend ``to``; ``configured`` is the file's
    ``[blobs] backend``, ``open_store`` opens a backend by name."""
    report = MoveReport()
    where = await location(db)
    current = where.backend if where is not None else configured
    previous = where.previous if where is not None else None
    if current != to:
        if previous is not None:
            raise MoveError(
                f'the move from "{previous}" to "{current}" is not finished: set [blobs] backend = '
                f'"{current}", restart mailgate, and run "mailgate blobs migrate --to {current}" first'
            )
        if configured not in (current, to):
            raise MoveError(f'[blobs] backend is "{configured}" but the blobs are on "{current}"')
        source, target = open_store(current), open_store(to)
        try:
            await copy(db, source, target, report, verify_present=True, progress=progress)
        finally:
            await _close(source, target)
        await record(db, to, current)
        report.lines.append(
            f"copied {report.copied} blob(s) from {current} to {to}; {report.verified} verified on {to}"
        )
        report.lines.append(f"switched: the database records that the blobs are on {to}")
        previous = current
        if configured != to:
            report.lines.append(
                f'next: set [blobs] backend = "{to}" in the configuration, restart mailgate (every '
                f'instance), then run "mailgate blobs migrate --to {to}" again to delete them from {current}'
            )
            return report
    if previous is None:
        report.lines.append(f"the blobs are on {to}; nothing to move")
        return report
    if configured != to:
        report.lines.append(
            f'waiting for the configuration: set [blobs] backend = "{to}", restart mailgate, and run '
            "this command again; the blobs stay on both backends until then"
        )
        return report
    source, target = open_store(previous), open_store(to)
    try:
        before = report.copied
        await copy(db, source, target, report, verify_present=False)
        if report.copied > before:
            caught_up = report.copied - before
            report.lines.append(f"copied {caught_up} blob(s) written meanwhile to {to}, verified")
        await delete_all(source, report)
    finally:
        await _close(source, target)
    await record(db, to, None)
    report.lines.append(f"deleted {report.deleted} blob(s) from {previous}; the move to {to} is complete")
    return report


async def _close(*stores: BlobStore) -> None:
    for store in stores:
        await store.close()


class Moving:
    """The daemon's blob store between a move's switch and its end: blobs are written to the new
    backend, and one not copied yet is read from the old."""

    def __init__(self, current: BlobStore, previous: BlobStore) -> None:
        self.current, self.previous = current, previous

    async def put(self, data: bytes) -> str:
        return await self.current.put(data)

    async def put_many(self, datas: Sequence[bytes]) -> list[str]:
        return [await self.put(data) for data in datas]

    async def get(self, digest: str) -> bytes:
        try:
            return await self.current.get(digest)
        except MissingBlob:
            return await self.previous.get(digest)

    async def get_many(self, digests: Sequence[str], size: int) -> list[bytes]:
        try:
            return await self.current.get_many(digests, size)
        except MissingBlob:
            return [await self.get(d) for d in digests]

    async def stream(self, digest: str) -> AsyncIterator[bytes]:
        store = self.current if await self.current.exists(digest) else self.previous
        async for chunk in store.stream(digest):
            yield chunk

    async def exists(self, digest: str) -> bool:
        return await self.current.exists(digest) or await self.previous.exists(digest)

    async def age(self, digest: str, now: float) -> float | None:
        age = await self.current.age(digest, now)
        return age if age is not None else await self.previous.age(digest, now)

    async def delete(self, digest: str) -> None:
        await self.current.delete(digest)
        await self.previous.delete(digest)

    def digests(self) -> AsyncIterator[str]:
        return self.current.digests()

    async def close(self) -> None:
        await _close(self.current, self.previous)

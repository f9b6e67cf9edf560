"""The PostgreSQL backend: blobs as rows of the database every instance already shares.

A blob is one ``blobs`` row (size, number of chunks, created and last-touched
time) and its bytes cut into ``blob_chunks`` rows of at most
:data:`~storage.blobs.CHUNK` bytes, so a 50 MB message is fifty values, not
one. :meth:`PostgresBlobStore.put` inserts the row and its chunks in one
transaction and returns after the commit; a second put of the same bytes
(or one racing it: the primary key serialises them) only sets
``touched_at``. :meth:`PostgresBlobStore.stream` reads one chunk per
statement, holding no connection between chunks.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime

from sqlalchemy import delete, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert

from storage.blobs.interface import CHUNK, MissingBlob, sha256
from storage.db import Database
from storage.models import Blob, BlobChunk

INSERT_BATCH = 8  # chunks per INSERT statement (8 MiB)
LIST_PAGE = 1000


class PostgresBlobStore:
    """Blobs in the ``blobs`` and ``blob_chunks`` tables of ``db`` (a PostgreSQL database)."""

    def __init__(self, db: Database) -> None:
        if db.is_sqlite:
            raise ValueError("blobs in the database need PostgreSQL (gateway.database_url)")
        self.db = db

    async def put(self, data: bytes) -> str:
        """Store ``data`` (committed when this returns) and return its sha256 hex digest."""
        digest = await sha256(data)
        now = datetime.now(UTC)
        chunks = max(1, -(-len(data) // CHUNK))  # an empty blob is one empty chunk
        async with self.db.write() as s:
            new = await s.scalar(
                pg_insert(Blob)
                .values(digest=digest, size=len(data), chunks=chunks, created_at=now, touched_at=now)
                .on_conflict_do_nothing()
                .returning(Blob.digest)
            )
            if new is None:  # stored already: reused now
                await s.execute(update(Blob).where(Blob.digest == digest).values(touched_at=now))
                return digest
            for first in range(0, chunks, INSERT_BATCH):
                rows = [
                    {"digest": digest, "n": n, "data": data[n * CHUNK : (n + 1) * CHUNK]}
                    for n in range(first, min(first + INSERT_BATCH, chunks))
                ]
                await s.execute(insert(BlobChunk), rows)
        return digest

    async def put_many(self, datas: Sequence[bytes]) -> list[str]:
        return [await self.put(data) for data in datas]

    async def get(self, digest: str) -> bytes:
        """The bytes of a blob."""
        return (await self.get_many([digest], 0))[0]

    async def get_many(self, digests: Sequence[str], size: int) -> list[bytes]:
        """The bytes of several blobs, read in one statement."""
        parts: dict[str, list[bytes]] = {d: [] for d in digests}
        async with self.db.read() as s:
            rows = await s.execute(
                select(BlobChunk.digest, BlobChunk.data)
                .where(BlobChunk.digest.in_(set(digests)))
                .order_by(BlobChunk.digest, BlobChunk.n)
            )
            for digest, data in rows:
                parts[digest].append(data)
        missing = [d for d, p in parts.items() if not p]
        if missing:
            raise MissingBlob(f"no blob {missing[0]}")
        return [b"".join(parts[d]) for d in digests]

    async def stream(self, digest: str) -> AsyncIterator[bytes]:
        """The blob chunk by chunk, one statement each."""
        async with self.db.read() as s:
            chunks = await s.scalar(select(Blob.chunks).where(Blob.digest == digest))
        if chunks is None:
            raise MissingBlob(f"no blob {digest}")
        for n in range(chunks):
            async with self.db.read() as s:
                data = await s.scalar(
                    select(BlobChunk.data).where(BlobChunk.digest == digest, BlobChunk.n == n)
                )
            if data is None:  # deleted while being read
                raise MissingBlob(f"no blob {digest}")
            yield data

    async def exists(self, digest: str) -> bool:
        """True when the blob's row is there."""
        async with self.db.read() as s:
            return await s.scalar(select(Blob.digest).where(Blob.digest == digest)) is not None

    async def age(self, digest: str, now: float) -> float | None:
        """Seconds since the blob was last written or reused."""
        async with self.db.read() as s:
            touched = await s.scalar(select(Blob.touched_at).where(Blob.digest == digest))
        return None if touched is None else now - touched.timestamp()

    async def delete(self, digest: str) -> None:
        """Remove the blob's row and (by cascade) its chunks."""
        async with self.db.write() as s:
            await s.execute(delete(Blob).where(Blob.digest == digest))

    async def digests(self) -> AsyncIterator[str]:
        """Every blob's digest, a page at a time."""
        after = ""
        while True:
            async with self.db.read() as s:
                page = list(
                    await s.scalars(
                        select(Blob.digest).where(Blob.digest > after).order_by(Blob.digest).limit(LIST_PAGE)
                    )
                )
            for digest in page:
                yield digest
            if len(page) < LIST_PAGE:
                return
            after = page[-1]

    async def close(self) -> None:
        """Nothing of its own: the database is closed by its owner."""

"""The blob store interface that every backend implements (see :mod:`storage.blobs`)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Sequence
from typing import Literal, Protocol

Backend = Literal["fs", "postgresql", "s3"]
BACKENDS: tuple[Backend, ...] = ("fs", "postgresql", "s3")
CHUNK = 1024 * 1024  # the pieces a blob is stored (PostgreSQL) and streamed in
HASH_INLINE = 64 * 1024  # bytes hashed on the event loop; more in a thread


class MissingBlob(FileNotFoundError):
    """No blob with this digest is stored."""


class BlobStore(Protocol):
    """Immutable blobs named by the sha256 hex digest of their bytes."""

    async def put(self, data: bytes) -> str:
        """Store ``data`` durably (or mark the stored copy as reused); its sha256 hex digest."""
        ...

    async def put_many(self, datas: Sequence[bytes]) -> list[str]:
        """:meth:`put` of each of ``datas`` (the caller bounds how many); their digests, in order."""
        ...

    async def get(self, digest: str) -> bytes:
        """The bytes of a blob; :class:`MissingBlob` if there is none."""
        ...

    async def get_many(self, digests: Sequence[str], size: int) -> list[bytes]:
        """The bytes of several blobs (``size`` bytes in all, the caller bounds it), in order."""
        ...

    def stream(self, digest: str) -> AsyncIterator[bytes]:
        """A blob's bytes in pieces of at most :data:`CHUNK` bytes, never all in memory at once."""
        ...

    async def exists(self, digest: str) -> bool:
        """True when the blob is stored."""
        ...

    async def age(self, digest: str, now: float) -> float | None:
        """Seconds from the blob's last write or reuse to ``now`` (a Unix time); None if absent."""
        ...

    async def delete(self, digest: str) -> None:
        """Remove a blob (garbage collection and moves between backends only)."""
        ...

    def digests(self) -> AsyncIterator[str]:
        """Every stored blob's digest, in no particular order."""
        ...

    async def close(self) -> None:
        """Release connections; the store is not used afterwards."""
        ...


async def sha256(data: bytes) -> str:
    """The sha256 hex digest of ``data``, computed in a thread for more than :data:`HASH_INLINE` bytes."""
    if len(data) <= HASH_INLINE:
        return hashlib.sha256(data).hexdigest()
    return await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())

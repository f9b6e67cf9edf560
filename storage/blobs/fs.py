"""Content-addressed blob store for raw RFC 5322 messages.

A blob is stored once under its sha256 (``ab/cd/abcd…``), written to a
temporary file, fsynced, renamed into place, and its directory fsynced: after
:meth:`BlobStore.put` returns, the bytes survive a crash. Blobs are immutable,
so snapshots can hard-link them and two messages with the same bytes share
one file.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

INLINE_READ = 64 * 1024  # bytes of blobs read without a thread hop (see BlobStore.get_many)


class BlobStore:
    """Immutable blobs under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._tmp = root / "tmp"

    def path(self, digest: str) -> Path:
        """Where the blob with this sha256 hex digest lives."""
        return self.root / digest[:2] / digest[2:4] / digest

    async def put(self, data: bytes) -> str:
        """Store ``data`` durably (in a thread) and return its sha256 hex digest."""
        return await asyncio.to_thread(self.put_sync, data)

    def put_sync(self, data: bytes) -> str:
        """Blocking :meth:`put`, for threads and command-line tools."""
        digest = hashlib.sha256(data).hexdigest()
        final = self.path(digest)
        if final.exists():
            # Touch it: garbage collection spares blobs used recently (see retention).
            try:
                os.utime(final)
            except FileNotFoundError:
                pass
            else:
                return digest
        self._tmp.mkdir(parents=True, exist_ok=True)
        if not final.parent.exists():
            final.parent.mkdir(parents=True, exist_ok=True)
            _fsync_dir(final.parent.parent)
            _fsync_dir(final.parent.parent.parent)
        fd, tmp = tempfile.mkstemp(dir=self._tmp, prefix=digest[:16])
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(final.parent)
        return digest

    async def get(self, digest: str) -> bytes:
        """The bytes of a blob (read in a thread)."""
        return await asyncio.to_thread(self.path(digest).read_bytes)

    async def get_many(self, digests: Sequence[str], size: int) -> list[bytes]:
        """The bytes of several blobs (``size`` in all), read in one thread hop (the caller bounds
        how many). Up to :data:`INLINE_READ` bytes are read on the event loop: a thread hop costs
        about 80 us, reading a 6 KB file from the page cache 8 us (measured here, docs/benchmarks.md)."""
        if size <= INLINE_READ:
            return self._read(digests)
        return await asyncio.to_thread(self._read, digests)

    def _read(self, digests: Sequence[str]) -> list[bytes]:
        return [self.path(d).read_bytes() for d in digests]

    def exists(self, digest: str) -> bool:
        """True when the blob is present."""
        return self.path(digest).exists()

    def age(self, digest: str, now: float) -> float | None:
        """Seconds since the blob was last written or reused, None if absent."""
        try:
            return now - self.path(digest).stat().st_mtime
        except FileNotFoundError:
            return None

    def delete(self, digest: str) -> None:
        """Remove a blob (garbage collection only)."""
        self.path(digest).unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

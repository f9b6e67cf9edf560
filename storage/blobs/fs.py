"""The local directory backend: the default, for one instance.

A blob is stored once under its sha256 (``ab/cd/abcd…``), written to a
temporary file, fsynced, renamed into place, and its directory fsynced: after
:meth:`FsBlobStore.put` returns, the bytes survive a crash. The event loop's
writes are made by a child process (:mod:`storage.blobs.writer` says why). Blobs are
immutable, so snapshots can hard-link them and two messages with the same
bytes share one file. A file's mtime is its last write or reuse.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from storage.blobs.interface import CHUNK, MissingBlob
from storage.blobs.writer import BlobWriter

INLINE_READ = 64 * 1024  # bytes of blobs read without a thread hop (see FsBlobStore.get_many)


class FsBlobStore:
    """Immutable blobs under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._tmp = root / "tmp"
        self._prefix = f"{root}{os.sep}"  # reads build paths as strings: pathlib costs 10 us a read
        self._writer = BlobWriter(root)  # the event loop's writes (the blocking ones are *_sync)

    def path(self, digest: str) -> Path:
        """Where the blob with this sha256 hex digest lives."""
        return self.root / digest[:2] / digest[2:4] / digest

    async def put(self, data: bytes) -> str:
        """Store ``data`` durably and return its sha256 hex digest."""
        return (await self.put_many([data]))[0]

    async def put_many(self, datas: Sequence[bytes]) -> list[str]:
        """Store several blobs durably, written by the blob writer process
        (:mod:`storage.blobs.writer`); their digests, in order."""
        return await self._writer.put_many(datas) if datas else []

    def put_sync(self, data: bytes) -> str:
        """Blocking :meth:`put`, for threads and command-line tools."""
        return self.put_many_sync([data])[0]

    def put_many_sync(self, datas: Sequence[bytes]) -> list[str]:
        """Blocking :meth:`put_many`: every new blob is written to a temporary file, then each is
        fsynced, renamed into place, and each directory that changed is fsynced once, after all
        the renames (the first directory fsync commits the journal for the others: half the CPU of
        one :meth:`put_sync` per blob, measured in docs/benchmarks.md).

        As few system calls as the guarantees allow: in the daemon, this thread takes the GIL back
        after each one, and waits for it while the event loop is busy (an APPEND's blob waited
        0.3-0.8 ms after each of its ~15 calls, strace 2026-12-05)."""
        digests = [hashlib.sha256(data).hexdigest() for data in datas]
        dirs: dict[Path, None] = {}  # to fsync, in order
        files: list[tuple[int, str, Path]] = []  # fd, temporary path, final path
        new: set[Path] = set()
        try:
            for data, digest in zip(datas, digests, strict=True):
                final = self.path(digest)
                if final in new:
                    continue  # the same bytes twice in one batch
                try:
                    # Stored already: touch it (garbage collection spares blobs used recently, see
                    # retention), one call for the check and the touch.
                    os.utime(final)
                    continue
                except FileNotFoundError:
                    pass
                dirs.update(dict.fromkeys(_make_dirs(final.parent)))
                fd, tmp = self._temporary(digest)
                files.append((fd, tmp, final))
                new.add(final)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            for fd, _, _ in files:
                os.fsync(fd)
            for _, tmp, final in files:
                os.replace(tmp, final)
                dirs[final.parent] = None
        except BaseException:
            for _, tmp, _ in files:
                Path(tmp).unlink(missing_ok=True)
            raise
        finally:
            for fd, _, _ in files:
                os.close(fd)
        for path in dirs:
            _fsync_dir(path)
        return digests

    def _temporary(self, digest: str) -> tuple[int, str]:
        """A new temporary file for a blob (the ``tmp`` directory is made the first time)."""
        try:
            return tempfile.mkstemp(dir=self._tmp, prefix=digest[:16])
        except FileNotFoundError:
            self._tmp.mkdir(parents=True, exist_ok=True)
            return tempfile.mkstemp(dir=self._tmp, prefix=digest[:16])

    async def get(self, digest: str) -> bytes:
        """The bytes of a blob (read in a thread)."""
        return await asyncio.to_thread(self._read_one, digest)

    async def get_many(self, digests: Sequence[str], size: int) -> list[bytes]:
        """The bytes of several blobs (``size`` in all), read in one thread hop (the caller bounds
        how many). Up to :data:`INLINE_READ` bytes are read on the event loop: a thread hop costs
        about 80 us, reading a 6 KB file from the page cache 8 us (measured here, docs/benchmarks.md)."""
        if size <= INLINE_READ:
            return self._read(digests)
        return await asyncio.to_thread(self._read, digests)

    def _read(self, digests: Sequence[str]) -> list[bytes]:
        return [self._read_one(d) for d in digests]

    def _read_one(self, digest: str) -> bytes:
        try:
            with open(f"{self._prefix}{digest[:2]}{os.sep}{digest[2:4]}{os.sep}{digest}", "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise MissingBlob(f"no blob {digest}") from None

    async def stream(self, digest: str) -> AsyncIterator[bytes]:
        """The blob in pieces of :data:`CHUNK` bytes, each read in a thread."""
        try:
            f = await asyncio.to_thread(self.path(digest).open, "rb")
        except FileNotFoundError:
            raise MissingBlob(f"no blob {digest}") from None
        try:
            while chunk := await asyncio.to_thread(f.read, CHUNK):
                yield chunk
        finally:
            f.close()

    async def exists(self, digest: str) -> bool:
        """True when the blob is present."""
        return self.path(digest).exists()

    async def age(self, digest: str, now: float) -> float | None:
        """Seconds since the blob was last written or reused, None if absent."""
        try:
            return now - self.path(digest).stat().st_mtime
        except FileNotFoundError:
            return None

    async def delete(self, digest: str) -> None:
        """Remove a blob (garbage collection only)."""
        await asyncio.to_thread(self.path(digest).unlink, missing_ok=True)

    async def digests(self) -> AsyncIterator[str]:
        """Every stored blob's digest, listed a directory at a time in a thread."""
        if not self.root.exists():
            return
        for top in await asyncio.to_thread(_subdirs, self.root):
            for sub in await asyncio.to_thread(_subdirs, top):
                for name in await asyncio.to_thread(_names, sub):
                    yield name

    async def close(self) -> None:
        """End the blob writer process."""
        await self._writer.close()


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and len(p.name) == 2)


def _names(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def _make_dirs(leaf: Path) -> list[Path]:
    """Create ``ab/cd`` as needed; the directories whose entries changed, to fsync.

    Only the parent of a directory made here changed: the store's root only when ``ab`` is
    new (an APPEND into a fresh ``cd`` directory cost four fsyncs, not three, strace 2026-12-04).
    One call when ``cd`` exists.
    """
    try:
        leaf.mkdir()
    except FileExistsError:
        return []
    except FileNotFoundError:
        changed = []
        try:
            leaf.parent.mkdir(parents=True)
            changed.append(leaf.parent.parent)
        except FileExistsError:
            pass  # made meanwhile by another writer
        try:
            leaf.mkdir()
        except FileExistsError:
            return changed
        return [*changed, leaf.parent]
    return [leaf.parent]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""The blob writer process: :class:`~storage.blobs.fs.FsBlobStore`'s durable writes, out of the daemon's GIL.

Theory of operation
-------------------
Writing a blob durably is a dozen system calls: create a temporary file,
write, fsync, rename into place, fsync the directories. In a thread of the
daemon, each call ends by taking the GIL back, and while the event loop runs
Python (an APPEND's transaction, a FETCH), the thread waits for it after
every call: strace of an APPEND's blob showed 0.3-0.8 ms futex waits after
each call, 2-2.5 ms for a write that takes 0.6 ms alone.

So the daemon's writes go to one :class:`storage.child.Child` per store,
which runs :meth:`FsBlobStore.put_many_sync` and answers each batch, in
order. Batches that arrive while it flushes are written together (up to
:data:`GATHER` bytes), sharing their directory fsyncs. The guarantees are
the store's own: the child answers ``ok`` only after the bytes and their
directory entries are fsynced, and the caller commits nothing that names a
blob before its ``ok``; a child that dies fails the batches it had not
answered (:mod:`storage.child`).

A batch is one request, a frame per blob; its answer is ``ok`` and the
batch's digests, or ``error`` and what failed.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from storage.child import Child, serve

GATHER = 32 * 1024 * 1024  # bytes of waiting batches the child writes together, at most


class BlobWriter:
    """Durable blob writes for one store root, in a child process (see the module's docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._child = Child(__name__, "main", str(root))

    async def put_many(self, datas: Sequence[bytes]) -> list[str]:
        """Write ``datas`` durably; their sha256 hex digests, in order. :class:`OSError` if not written."""
        word, _, rest = (await self._child.ask(datas)).decode("ascii", "replace").partition(" ")
        if word != "ok":
            raise OSError(f"blob not written: {rest}")
        return rest.split()

    async def close(self) -> None:
        """End the child once it has answered what it was sent (bounded: killed after 30 s)."""
        await self._child.close()


def main() -> None:
    """The child: write each gathered run of batches, answer each batch, until stdin closes."""
    from storage.blobs.fs import FsBlobStore

    store = FsBlobStore(Path(sys.argv[1]))

    def write(batches: list[list[bytes]]) -> list[bytes]:
        try:
            digests = store.put_many_sync([data for batch in batches for data in batch])
        except OSError as exc:
            return [b"error " + " ".join(str(exc).split()).encode("utf-8", "replace")] * len(batches)
        answers = []
        for batch in batches:
            mine, digests = digests[: len(batch)], digests[len(batch) :]
            answers.append(" ".join(["ok", *mine]).encode("ascii"))
        return answers

    serve(write, GATHER)

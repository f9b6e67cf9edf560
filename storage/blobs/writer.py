"""The blob writer process: :class:`~storage.blobs.fs.FsBlobStore`'s durable writes, out of the daemon's GIL.

Theory of operation
-------------------
Writing a blob durably is a dozen system calls: create a temporary file,
write, fsync, rename into place, fsync the directories. In a thread of the
daemon, each call ends by taking the GIL back, and while the event loop runs
Python (an APPEND's transaction, a FETCH), the thread waits for it after
every call: strace of an APPEND's blob showed 0.3-0.8 ms futex waits after
each call, 2-2.5 ms for a write that takes 0.6 ms alone. A child process has
a GIL of its own.

So the daemon's writes go down a pipe to one child that runs
:meth:`FsBlobStore.put_many_sync` and answers each batch, in order. Batches
that arrive while it flushes are written together (up to :data:`GATHER`
bytes), sharing their directory fsyncs. The guarantees are the store's own:
the child answers ``ok`` only after the bytes and their directory entries
are fsynced, and the caller commits nothing that names a blob before its
``ok``.

Wire (the child's stdin and stdout): a batch is its blob count, then each
blob's length and bytes (big-endian 32-bit counts); an answer is one line,
``ok`` and the batch's digests, or ``error`` and what failed.

The parent side needs no thread: the event loop reads the answers. If the
child exits (killed, or crashed), every batch it had not answered fails with
:class:`OSError` (nothing was acknowledged: the caller refuses or retries),
and the next batch starts a new child. The child ignores SIGINT and SIGTERM
(sent to the daemon's whole process group) and ends when its stdin closes:
:meth:`BlobWriter.close`, or the daemon's death.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import struct
import sys
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

GATHER = 32 * 1024 * 1024  # bytes of waiting batches the child writes together, at most
ANSWER_LIMIT = 4 * 1024 * 1024  # longest answer line (65 bytes a digest): the callers bound their batches
_COUNT = struct.Struct(">I")
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # where ``storage`` is importable from
PYTHONPATH = os.environ.get("PYTHONPATH")


@dataclass
class _Child:
    process: asyncio.subprocess.Process
    stdin: asyncio.StreamWriter
    stdout: asyncio.StreamReader
    loop: asyncio.AbstractEventLoop
    waiting: deque[asyncio.Future[list[str]]] = field(default_factory=deque)
    reader: asyncio.Task[None] | None = None
    gone: bool = False


class BlobWriter:
    """Durable blob writes for one store root, in a child process (see the module's docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._child: _Child | None = None

    async def put_many(self, datas: Sequence[bytes]) -> list[str]:
        """Write ``datas`` durably; their sha256 hex digests, in order. :class:`OSError` if not written."""
        child = await self._running()
        stdin = child.stdin
        future: asyncio.Future[list[str]] = child.loop.create_future()
        # One batch's bytes go into the pipe's buffer with no await between them, so batches never
        # interleave and the answers come back in the order of child.waiting.
        stdin.write(_COUNT.pack(len(datas)))
        for data in datas:
            stdin.write(_COUNT.pack(len(data)))
            stdin.write(data)
        child.waiting.append(future)
        with contextlib.suppress(ConnectionError):  # the child is gone: its reader fails the future
            await stdin.drain()
        return await future

    async def _running(self) -> _Child:
        loop = asyncio.get_running_loop()
        child = self._child
        if child is not None and not child.gone and child.loop is loop:
            return child
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            f"from {__name__} import main; main()",
            str(self.root),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [_PACKAGE_ROOT, PYTHONPATH]))},
            limit=ANSWER_LIMIT,
        )
        if process.stdin is None or process.stdout is None:  # never: both are pipes
            raise OSError("the blob writer process has no pipes")
        if self._child is not None and not self._child.gone and self._child.loop is loop:
            process.kill()  # another caller started one meanwhile
            await process.wait()
            return self._child
        child = _Child(process, process.stdin, process.stdout, loop)
        child.reader = asyncio.create_task(self._answers(child), name="blob-writer")
        self._child = child
        return child

    @staticmethod
    async def _answers(child: _Child) -> None:
        try:
            while line := await child.stdout.readline():
                future = child.waiting.popleft()
                if future.done():  # its caller was cancelled
                    continue
                word, _, rest = line.decode("ascii", "replace").rstrip("\n").partition(" ")
                if word == "ok":
                    future.set_result(rest.split())
                else:
                    future.set_exception(OSError(f"blob not written: {rest}"))
        finally:
            child.gone = True
            while child.waiting:
                future = child.waiting.popleft()
                if not future.done():
                    future.set_exception(OSError("the blob writer process exited before answering"))

    async def close(self) -> None:
        """End the child once it has answered what it was sent (bounded: killed after 30 s)."""
        child, self._child = self._child, None
        if child is None or child.loop is not asyncio.get_running_loop():
            return
        child.stdin.close()
        try:
            async with asyncio.timeout(30):
                await child.process.wait()
        except TimeoutError:
            child.process.kill()
            await child.process.wait()
        if child.reader is not None:
            await asyncio.wait([child.reader])


class _Batches:
    """The batches on a file descriptor, read whole (the child's side of the wire)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = bytearray()

    def _take(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = os.read(self.fd, max(n - len(self.buffer), 1 << 16))
            if not chunk:
                raise EOFError
            self.buffer += chunk
        taken = bytes(self.buffer[:n])
        del self.buffer[:n]
        return taken

    def batch(self) -> list[bytes]:
        (count,) = _COUNT.unpack(self._take(4))
        return [self._take(_COUNT.unpack(self._take(4))[0]) for _ in range(count)]

    def more(self) -> bool:
        """Whether another batch has begun to arrive (so it can join this write)."""
        return bool(self.buffer) or bool(select.select([self.fd], [], [], 0)[0])


def main() -> None:
    """The child: write each gathered run of batches, answer each batch, until stdin closes."""
    from storage.blobs.fs import FsBlobStore

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    store = FsBlobStore(Path(sys.argv[1]))
    batches = _Batches(sys.stdin.fileno())
    out = sys.stdout.buffer
    while True:
        try:
            gathered = [batches.batch()]
            size = sum(map(len, gathered[0]))
            while size < GATHER and batches.more():
                gathered.append(batches.batch())
                size += sum(map(len, gathered[-1]))
        except EOFError:
            return
        try:
            digests = store.put_many_sync([data for batch in gathered for data in batch])
        except OSError as exc:
            reason = " ".join(str(exc).split()).encode("utf-8", "replace")
            out.write(b"".join(b"error " + reason + b"\n" for _ in gathered))
        else:
            lines = []
            for batch in gathered:
                mine, digests = digests[: len(batch)], digests[len(batch) :]
                lines.append(" ".join(["ok", *mine]).encode("ascii") + b"\n")
            out.write(b"".join(lines))
        out.flush()

"""A worker process the event loop talks to over a pipe: work out of the daemon's GIL, no thread.

Theory of operation
-------------------
Work handed to a thread of the daemon (a blob's dozen system calls, a
message's MIME parse) shares the interpreter lock with the event loop: while
the loop runs Python, the thread waits for the lock after every system call
or every few milliseconds of bytecode, and the loop waits in turn when the
thread holds it (strace of an APPEND's blob: 0.3-0.8 ms futex waits after
each call). ``concurrent.futures.ProcessPoolExecutor`` moves the work out but
brings its results back through two threads of its own. A :class:`Child` is
one process started with ``python -c "from MODULE import FUNCTION; FUNCTION()"``,
fed requests down its stdin and read from its stdout by the loop itself.

Wire: a request is its frame count, then each frame's length and bytes; an
answer is its length and bytes (big-endian 32-bit counts). Answers come back
in the order of the requests. The child side (:func:`serve`) reads a
request, then any others already waiting (up to ``gather`` bytes), hands
them to its function together (the blob writer shares directory fsyncs
between them) and writes one answer per request.

If the child exits (killed, crashed), every request it had not answered
fails with :class:`OSError` (nothing it did was acknowledged: the caller
refuses, retries or does the work itself), and the next request starts a
new child. The child ignores SIGINT and SIGTERM (sent to the daemon's whole
process group) and ends when its stdin closes: :meth:`Child.close`, or the
daemon's death.
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ANSWER_LIMIT = 256 * 1024 * 1024  # an answer longer than this means a broken child
_COUNT = struct.Struct(">I")
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])  # where ``storage`` is importable from


@dataclass
class _Running:
    process: asyncio.subprocess.Process
    stdin: asyncio.StreamWriter
    stdout: asyncio.StreamReader
    loop: asyncio.AbstractEventLoop
    waiting: deque[asyncio.Future[bytes]] = field(default_factory=deque)
    reader: asyncio.Task[None] | None = None
    gone: bool = False


class Child:
    """One worker process running ``module``'s ``function()`` with ``args`` in ``sys.argv`` (see the
    module's docstring); ``function`` calls :func:`serve`."""

    def __init__(self, module: str, function: str, *args: str) -> None:
        self.module = module
        self.function = function
        self.args = args
        self._running: _Running | None = None

    async def ask(self, frames: Sequence[bytes]) -> bytes:
        """Send one request; its answer. :class:`OSError` if the child exits before answering."""
        child = await self._start()
        future: asyncio.Future[bytes] = child.loop.create_future()
        # A request's bytes go into the pipe's buffer with no await between them, so requests never
        # interleave and the answers come back in the order of child.waiting.
        child.stdin.write(_COUNT.pack(len(frames)))
        for frame in frames:
            child.stdin.write(_COUNT.pack(len(frame)))
            child.stdin.write(frame)
        child.waiting.append(future)
        with contextlib.suppress(ConnectionError):  # the child is gone: its reader fails the future
            await child.stdin.drain()
        return await future

    async def start(self) -> None:
        """Start the child now (its imports run while the caller goes on), not at the first request."""
        await self._start()

    async def _start(self) -> _Running:
        loop = asyncio.get_running_loop()
        child = self._running
        if child is not None and not child.gone and child.loop is loop:
            return child
        pythonpath = os.environ.get("PYTHONPATH")
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            f"from {self.module} import {self.function}; {self.function}()",
            *self.args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [_PACKAGE_ROOT, pythonpath]))},
        )
        if process.stdin is None or process.stdout is None:  # never: both are pipes
            raise OSError(f"the {self.module} process has no pipes")
        if self._running is not None and not self._running.gone and self._running.loop is loop:
            process.kill()  # another caller started one meanwhile
            await process.wait()
            return self._running
        child = _Running(process, process.stdin, process.stdout, loop)
        child.reader = asyncio.create_task(self._answers(child), name=self.module)
        self._running = child
        return child

    async def _answers(self, child: _Running) -> None:
        try:
            while True:
                try:
                    (size,) = _COUNT.unpack(await child.stdout.readexactly(4))
                    if size > ANSWER_LIMIT:  # a broken child: it answers nothing more
                        child.process.kill()
                        break
                    answer = await child.stdout.readexactly(size)
                except asyncio.IncompleteReadError:
                    break
                future = child.waiting.popleft()
                if not future.done():  # else its caller was cancelled
                    future.set_result(answer)
        finally:
            child.gone = True
            while child.waiting:
                future = child.waiting.popleft()
                if not future.done():
                    future.set_exception(OSError(f"the {self.module} process exited before answering"))

    async def close(self) -> None:
        """End the child once it has answered what it was sent (bounded: killed after 30 s)."""
        child, self._running = self._running, None
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


class _Requests:
    """The requests on a file descriptor, read whole (the child's side of the wire)."""

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

    def request(self) -> list[bytes]:
        (count,) = _COUNT.unpack(self._take(4))
        return [self._take(_COUNT.unpack(self._take(4))[0]) for _ in range(count)]

    def more(self) -> bool:
        """Whether another request has begun to arrive (so it can join this run)."""
        return bool(self.buffer) or bool(select.select([self.fd], [], [], 0)[0])


def serve(answer: Callable[[list[list[bytes]]], list[bytes]], gather: int = 0) -> None:
    """The child's loop: read a request and those waiting behind it (up to ``gather`` bytes),
    write ``answer(requests)``'s answers, one per request, in order; return when stdin closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    requests = _Requests(sys.stdin.fileno())
    out = sys.stdout.buffer
    while True:
        try:
            gathered = [requests.request()]
            size = sum(map(len, gathered[0]))
            while size < gather and requests.more():
                gathered.append(requests.request())
                size += sum(map(len, gathered[-1]))
        except EOFError:
            return
        out.write(b"".join(_COUNT.pack(len(a)) + a for a in answer(gathered)))
        out.flush()

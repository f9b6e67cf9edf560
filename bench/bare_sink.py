"""A bare aiosmtpd sink: the framework ceiling the benches compare mailgate with.

Issue #16 measures mailgate against what an operator would get from aiosmtpd
alone: a server whose handler writes each message to its own file, fsyncs it
and only then answers 250 (acknowledge after the data is durable, as mailgate
does). It runs as its own process so its CPU and peak RSS are measured apart:

    .venv/bin/python bench/bare_sink.py --port P --dir D

It listens on 127.0.0.1 only and exits 0 on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session

HOST = "127.0.0.1"


def write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file and fsync it (file and directory entry)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    dirfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


class FileHandler:
    """aiosmtpd handler: one fsynced file per message, then 250."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.counter = itertools.count(1)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        path = self.directory / f"{next(self.counter):09d}.eml"
        await asyncio.to_thread(write_durably, path, content)  # the file I/O stays off the loop
        return "250 2.0.0 Ok: stored"


async def serve(port: int, directory: Path) -> None:
    loop = asyncio.get_running_loop()
    handler = FileHandler(directory)
    server = await loop.create_server(lambda: SMTP(handler, hostname="bare-sink"), HOST, port)
    stopped = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopped.set)
    async with server:
        await stopped.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1")
    p.add_argument("--dir", type=Path, required=True, help="directory for the message files (must exist)")
    args = p.parse_args()
    asyncio.run(serve(args.port, args.dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

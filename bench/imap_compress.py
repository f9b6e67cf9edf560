"""COMPRESS=DEFLATE (RFC 4978): the daemon's memory per idle session, compressed and not.

A ``mailgate run`` (SQLite, one IMAP listener) gets ``--sessions`` logged-in
connections that then sit idle, first plain, then (fresh connections) each
after ``COMPRESS DEFLATE`` and one compressed NOOP, so that both the deflate
and the inflate state exist. Printed: the daemon's VmRSS growth per session
for each kind, and the difference (what compression costs an idle phone).
Only 127.0.0.1 is used; the connection count and every wait are bounded.

    .venv/bin/python bench/imap_compress.py [--sessions 200]

The raw client, the daemon wrapper and the /proc readers are bench/imap.py's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.imap import (  # noqa: E402
    LOGIN,
    PASSWORD,
    BenchError,
    Client,
    Mailgate,
    free_port,
    proc_status,
    raise_nofile,
    write_mailgate_config,
)


def compressed_noop(client: Client) -> None:
    """COMPRESS DEFLATE, then one NOOP through the compressed stream (its reply read and checked)."""
    client.command("COMPRESS DEFLATE")
    out, back = zlib.compressobj(6, zlib.DEFLATED, -15), zlib.decompressobj(-15)
    client.sock.sendall(out.compress(b"z NOOP\r\n") + out.flush(zlib.Z_SYNC_FLUSH))
    reply = b""
    deadline = time.monotonic() + client.timeout
    while b"z OK" not in reply:
        if time.monotonic() > deadline:
            raise BenchError("no compressed reply to NOOP")
        reply += back.decompress(client.sock.recv(65536))


def rss_after(pid: int, sessions: list[Client]) -> int:
    time.sleep(1.0)  # let the daemon settle
    if not sessions:
        raise BenchError("no sessions")
    return proc_status(pid)["VmRSS"]


def open_sessions(port: int, n: int, timeout: float, compress: bool) -> list[Client]:
    clients = []
    for _ in range(n):
        c = Client(port, timeout)
        c.login(LOGIN, PASSWORD)
        if compress:
            compressed_noop(c)
        clients.append(c)
    return clients


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args()
    raise_nofile(args.sessions * 2 + 100)
    with tempfile.TemporaryDirectory(prefix="mailgate-compress-") as name:
        tmp = Path(name)
        port = free_port()
        mailgate = Mailgate(write_mailgate_config(tmp, port), tmp, port)
        try:
            warm = open_sessions(port, 5, args.timeout, compress=True)  # imports, first allocations
            base = rss_after(mailgate.pid, warm)
            per: dict[str, float] = {}
            for kind, compress in (("plain", False), ("COMPRESS=DEFLATE", True)):
                sessions = open_sessions(port, args.sessions, args.timeout, compress)
                grown = rss_after(mailgate.pid, sessions) - base
                per[kind] = grown / args.sessions
                for c in sessions:
                    c.close()
                time.sleep(1.0)
                base = proc_status(mailgate.pid)["VmRSS"]
            for c in warm:
                c.close()
        finally:
            status = mailgate.stop()
        if status != 0:
            raise BenchError(f"mailgate exited with {status} on SIGTERM")
    print(f"{args.sessions} idle sessions each; daemon VmRSS growth per session:")
    for kind, kib in per.items():
        print(f"  {kind:<18} {kib:7.1f} KiB")
    print(f"  compression costs {per['COMPRESS=DEFLATE'] - per['plain']:.1f} KiB per idle session")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"imap_compress: {exc}", file=sys.stderr)
        sys.exit(1)

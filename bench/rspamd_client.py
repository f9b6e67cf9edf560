"""rspamd client benchmark: mailgate's CPU per ``/checkv2`` request with httpx and with aiohttp.

Issue #18: rspamd 3.4 closes the connection after every answer, so each scan is a new
connection and the HTTP client's per-request cost is most of what asking costs mailgate.
This posts a 4 KB message shaped like smtp-source's, with relay-in's headers, to a private
rspamd (tests/rspamd.py, hyperscan loaded; over TCP and over a Unix socket),
``--in-flight`` at a time, ``--rounds`` rounds of ``--requests`` after a warm-up, and
prints the CPU time of the client's thread (the event loop) per request.

    .venv/bin/python bench/rspamd_client.py [--requests 400] [--rounds 3] [--in-flight 8]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from bench.smtp_ingest import RECIPIENT, SENDER  # noqa: E402 (after the path is set)
from tests.rspamd import Rspamd  # noqa: E402

BODY = b"From: <%s>\r\nTo: <%s>\r\nMessage-Id: <client@bench>\r\n\r\n" % (
    SENDER.encode(),
    RECIPIENT.encode(),
) + b"".join(b"%dX\r\n" % i for i in range(4096 // 80 + 1))
HEADERS = [
    ("Deliver-To", "bench"),
    ("From", SENDER),
    ("Rcpt", RECIPIENT),
    ("IP", "127.0.0.1"),
    ("Helo", "bench"),
]
WARM = 50

Post = Callable[[], Awaitable[bytes]]


def httpx_post(url: str, uds: str | None, limit: int) -> tuple[Post, Callable[[], Awaitable[None]]]:
    transport = httpx.AsyncHTTPTransport(uds=uds) if uds else None
    client = httpx.AsyncClient(
        transport=transport, limits=httpx.Limits(max_connections=limit), trust_env=False
    )

    async def post() -> bytes:
        response = await client.post(f"{url}/checkv2", content=BODY, headers=HEADERS, timeout=30)
        response.raise_for_status()
        return response.content

    return post, client.aclose


def aiohttp_post(url: str, uds: str | None, limit: int) -> tuple[Post, Callable[[], Awaitable[None]]]:
    connector = aiohttp.UnixConnector(path=uds, limit=limit) if uds else aiohttp.TCPConnector(limit=limit)
    session = aiohttp.ClientSession(connector=connector, trust_env=False)

    async def post() -> bytes:
        async with session.post(f"{url}/checkv2", data=BODY, headers=HEADERS) as response:
            response.raise_for_status()
            return await response.read()

    return post, session.close


async def cpu_per_request(post: Post, requests: int, in_flight: int) -> float:
    """Milliseconds of this thread's CPU per request, ``in_flight`` at a time."""
    slots = asyncio.Semaphore(in_flight)

    async def one() -> None:
        async with slots:
            await post()

    before = time.thread_time()
    await asyncio.gather(*(one() for _ in range(requests)))
    return 1000 * (time.thread_time() - before) / requests


async def measure(targets: list[tuple[str, str, str | None]], args: argparse.Namespace) -> None:
    for target, url, uds in targets:
        clients = {
            name: make(url, uds, args.in_flight)
            for name, make in (("httpx", httpx_post), ("aiohttp", aiohttp_post))
        }
        figures: dict[str, list[float]] = {name: [] for name in clients}
        for post, _ in clients.values():
            await cpu_per_request(post, WARM, args.in_flight)
        for _ in range(args.rounds):
            for name, (post, _) in clients.items():
                figures[name].append(await cpu_per_request(post, args.requests, args.in_flight))
        for name, (_, close) in clients.items():
            await close()
            print(f"{target:22s} {name:8s} " + " ".join(f"{ms:5.2f}" for ms in figures[name]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--in-flight", type=int, default=8)
    args = parser.parse_args()
    print(
        f"rspamd_client: CPU ms per /checkv2 request, {args.in_flight} in flight,"
        f" {args.rounds} rounds of {args.requests}"
    )
    with tempfile.TemporaryDirectory(prefix="mailgate-bench-rspamd-client-", dir="/tmp") as root:
        sock = Path(root) / "normal.sock"
        rspamd = Rspamd(Path(root) / "rspamd", learning=False, log_level="info", unix_socket=sock)
        try:
            rspamd.start()
            rspamd.wait_hyperscan()
            unix = ("rspamd, Unix socket", "http://localhost", str(sock))
            targets = [("rspamd, TCP", rspamd.url, None), unix]
            asyncio.run(measure(targets, args))
        finally:
            rspamd.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

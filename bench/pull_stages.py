"""Where a pulled message's CPU goes, stage by stage, and whether MIME work pays off the loop.

Companion of ``bench/pull.py`` (issue #16): that bench times the whole daemon;
this one runs each stage of the pull path in-process, on the same corpus
(``tests.corpus.normal(M, size)``, distinct ~10 KB messages), in batches of
``gateway.pull.puller.BATCH``, and prints CPU milliseconds per message (the
process's user + system time, all threads) and wall milliseconds:

* ``fetch``: ``UpstreamIMAP.fetch`` of every batch from a private Dovecot
  (``tests/dovecot.py``, 127.0.0.1), aioimaplib's parsing included;
* ``headers``, ``rules``, ``dedupe key``, ``describe`` (IMAP ENVELOPE, two
  BODYSTRUCTUREs, SORT keys): the CPU-bound part of ``Pipeline.prepare``;
* ``blobs, one put each`` against ``blobs, put_many``: the local blob store,
  every file and directory fsynced;
* ``commit``: ``Pipeline.commit`` of prepared batches (one transaction each)
  on SQLite, or on PostgreSQL with ``--database-url``, including the
  ``ingest.stored`` log line per message (to /dev/null);
* ``prepare``: ``Pipeline.prepare`` whole (analysis and blobs overlapping).

Then the MIME offload question: ``describe`` for all messages inline, on a
pool of 2 threads and on a pool of 2 processes (a batch per task), with the
wall time and the CPU the *calling* process spent (for the pool of processes,
pickling; the workers' CPU is reported apart).

    .venv/bin/python bench/pull_stages.py [--messages 2000] [--size 10000]
        [--database-url postgresql+asyncpg://postgres@127.0.0.1:5432/mailgate_bench_stages]

A PostgreSQL database named there is created (it must not exist) and dropped.
Nothing but 127.0.0.1 is contacted; every loop is bounded by ``--messages``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import secrets
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from bench.pull import DOVECOT, BenchError, pg_database, psql
from gateway import ingest, logs
from gateway.config import parse_config
from gateway.daemon import open_store
from gateway.message import parse_headers
from gateway.pull.imap_client import UpstreamIMAP
from gateway.pull.puller import BATCH
from storage import mailstore
from storage.blobs import FsBlobStore
from tests import corpus
from tests.conftest import config_dict
from tests.dovecot import Dovecot

T = TypeVar("T")
NOW = datetime(2026, 12, 4, tzinfo=UTC)


def cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def row(name: str, n: int, cpu_s: float, wall_s: float, note: str = "") -> None:
    print(f"{name:<28}{cpu_s / n * 1e3:>10.3f}{wall_s / n * 1e3:>10.3f}  {note}")


async def timed(name: str, n: int, work: Callable[[], Awaitable[T]], note: str = "") -> T:
    c, w = cpu(), time.perf_counter()
    out = await work()
    row(name, n, cpu() - c, time.perf_counter() - w, note)
    return out


def in_batches(items: Sequence[T]) -> list[Sequence[T]]:
    return [items[i : i + BATCH] for i in range(0, len(items), BATCH)]


def describe_batch(batch: Sequence[bytes]) -> list[mailstore.NewMessage]:
    return [ingest.describe(raw, parse_headers(raw), "", NOW, frozenset()) for raw in batch]


async def offload(name: str, messages: list[bytes], pool: Executor | None) -> None:
    """``describe`` every message, a batch per call: inline, or on ``pool`` (as many at once as it
    has), which is then shut down (so its processes' CPU is counted)."""
    loop = asyncio.get_running_loop()
    c, cc, w = cpu(), children_cpu(), time.perf_counter()
    batches = in_batches(messages)
    if pool is None:
        for batch in batches:
            describe_batch(batch)
    else:
        await asyncio.gather(*(loop.run_in_executor(pool, describe_batch, b) for b in batches))
    wall, own = time.perf_counter() - w, cpu() - c
    if pool is not None:
        pool.shutdown(wait=True)
    workers = (children_cpu() - cc) / len(messages) * 1e3
    row(name, len(messages), own, wall, f"worker processes' CPU {workers:.3f} ms/msg" if workers else "")


async def main_async(args: argparse.Namespace) -> None:
    messages = corpus.normal(args.messages, size=args.size, seed=1)
    n = len(messages)
    logs.configure(json=True)
    sys.stdout.flush()
    with tempfile.TemporaryDirectory(prefix="mailgate-bench-stages-") as workdir:
        tmp = Path(workdir)
        print(f"pull stages: {n} messages x ~{args.size} bytes, batches of {BATCH}")
        print(f"{'stage':<28}{'CPU ms':>10}{'wall ms':>10}  (per message)")
        with Dovecot(DOVECOT) as dovecot:
            password = secrets.token_hex(8)
            dovecot.add_user("stages", password)
            dovecot.deliver_files("stages", "INBOX", messages)
            client = await UpstreamIMAP.connect("127.0.0.1", dovecot.port, security="none")
            await client.login("stages", password)
            await client.select("INBOX")
            uids = list(range(1, n + 1))

            async def fetch() -> list[bytes]:
                out: list[bytes] = []
                for batch in in_batches(uids):
                    bodies = await client.fetch(batch)
                    out += [bodies[u] for u in batch]
                return out

            fetched = await timed("fetch (aioimaplib)", n, fetch)
            await client.logout()
        assert len(fetched) == n

        async def each(fn: Callable[[bytes], object]) -> None:
            for raw in fetched:
                fn(raw)

        config = parse_config(config_dict(tmp, args.database_url or f"sqlite+aiosqlite:///{tmp / 'db'}"))
        tenant = config.tenant("acme")
        delivery = ingest.Delivery(source="imap")
        headers = {id(r): parse_headers(r) for r in fetched}
        await timed("headers", n, lambda: each(parse_headers))
        await timed(
            "rules", n, lambda: each(lambda r: ingest.decide(tenant, headers[id(r)], len(r), delivery))
        )
        await timed(
            "dedupe key (body sha256)", n, lambda: each(lambda r: ingest.fallback_key(headers[id(r)], r))
        )
        await timed("describe (MIME)", n, lambda: each(lambda r: describe_batch([r])))

        one = FsBlobStore(tmp / "blobs-one")
        await timed("blobs, one put each", n, lambda: each(one.put_sync))
        many = FsBlobStore(tmp / "blobs-many")

        async def put_many() -> None:
            for batch in in_batches(fetched):
                many.put_many_sync(batch)

        await timed("blobs, put_many per batch", n, put_many)

        db, blobs = await open_store(config)
        pipeline = ingest.Pipeline(db, blobs)
        try:
            items = [
                (r, ingest.Delivery(source="imap", dedupe_key=f"imap:b/INBOX/1/{i}"))
                for i, r in enumerate(fetched)
            ]

            async def prepare() -> list[list[ingest.Prepared]]:
                return [await pipeline.prepare(tenant, b) for b in in_batches(items)]

            prepared = await timed("prepare (whole)", n, prepare)
            devnull = os.open(os.devnull, os.O_WRONLY)
            saved = os.dup(2), os.dup(1)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            try:
                c, w = cpu(), time.perf_counter()
                for batch in prepared:
                    await pipeline.commit(tenant, batch)
                commit_cpu, commit_wall = cpu() - c, time.perf_counter() - w
            finally:
                os.dup2(saved[0], 2)
                os.dup2(saved[1], 1)
                os.close(devnull)
            row(
                "commit (+ log line)",
                n,
                commit_cpu,
                commit_wall,
                "PostgreSQL" if args.database_url else "SQLite",
            )
        finally:
            await db.close()

        print("MIME work (describe) off the event loop, a batch per task:")
        await offload("  inline", fetched, None)
        await offload("  2 threads", fetched, ThreadPoolExecutor(2))
        await offload("  2 processes (forked)", fetched, ProcessPoolExecutor(2))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=2000, help="messages (default 2000)")
    p.add_argument("--size", type=int, default=10_000, help="bytes per message (default 10000)")
    p.add_argument("--database-url", default="", help="postgresql+asyncpg://...@127.0.0.1/SCRATCH_DB")
    args = p.parse_args()
    if args.messages < 1 or args.messages > 100_000:
        p.error("--messages: 1 to 100000")
    pg = args.database_url
    try:
        if pg:
            name = pg_database(pg)
            psql(pg, f"CREATE DATABASE {name}")
        try:
            asyncio.run(main_async(args))
        finally:
            if pg:
                psql(pg, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    except (BenchError, RuntimeError) as exc:
        print(f"pull stages: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

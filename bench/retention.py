"""Spam purge benchmark: ``storage.retention.purge_spam`` over N expired spam rows.

A child process loads one tenant (``bench``) directly through the mail store
(``mailstore.append`` of ``--batch`` messages per transaction, no SMTP):

* N **expired spam** rows in the tenant's ``\\Junk`` folder (``Spam``),
  received 100-110 days ago: all must go (``spam_days = 90``);
* ``--recent`` **recent spam** rows (0-80 days old) in the same folder: must stay;
* ``--ham`` **non-spam** rows in INBOX and Archive, received 0-400 days ago
  (so half of them are older than the cutoff): must stay.

The chunks of the three kinds are interleaved in arrival order, so ids of
survivors sit between the ids of expired rows, as in a real store.

Blobs: one row per message but not one blob per row. ``--blobs`` distinct
~2-4 KB spam messages (written with ``FsBlobStore.put_sync``) are shared
round-robin by the N expired rows (a spam wave repeats itself; a million
distinct files would only measure the file system). A few of them are also
referenced by a ham row (must survive the garbage collection) and a few were
"reused right now" (mtime = now: spared by the 1 h grace); every other blob's
mtime is set 100 days back, so the garbage collection really deletes them.
Each row has its own Message-ID and the IMAP structures of its blob.

The bench process then opens the store and runs the purge in-process
(``purge_spam(db, blobs, now, 90)``, what ``mailgate purge-spam`` and the
scheduler call), timing the delete batches and the blob garbage collection
separately. Peak memory is the process's ``ru_maxrss`` (= VmHWM) before and
after the purge: the load ran in another process, so the difference is the
purge's own. With ``--dry-run`` a second child first times ``dry_run=True``
(it counts the expired rows) and reports its own peak RSS.

Afterwards it verifies: no expired spam left, every survivor still there,
each folder's ``used_messages``/``used_bytes`` equal to a COUNT/SUM over its
rows, the tenant counters equal to the non-Junk folders' sums, the report's
counts, and which blob files were (not) deleted. Exits 1 on any mismatch.

    .venv/bin/python bench/retention.py [--rows 1000000] [--recent 20000] [--ham 50000]
        [--blobs 2000] [--batch 5000] [--dry-run]
        [--database-url postgresql+asyncpg://postgres@127.0.0.1:5432/mailgate_bench]

With a PostgreSQL URL the named database is created (it must not exist) and
dropped at the end. Everything else lives in a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import func, select, text  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from gateway.config import Config, parse_config  # noqa: E402
from gateway.daemon import open_store  # noqa: E402
from gateway.ingest import describe  # noqa: E402
from gateway.message import parse_headers  # noqa: E402
from storage import mailstore, retention  # noqa: E402
from storage.blobs import FsBlobStore  # noqa: E402
from storage.db import Database  # noqa: E402
from storage.models import Expunge, Folder, Message, Tenant  # noqa: E402

TENANT = "bench"
SPAM_DAYS = 90
DAY = 86400.0
SHARED_WITH_HAM = 20  # expired-spam blobs also referenced by a ham row: must survive
TOUCHED_NOW = 10  # expired-spam blobs "reused right now" (mtime = now): spared by the grace


class BenchError(Exception):
    """The benchmark could not run."""


# --------------------------------------------------------------------------- measuring


def vm_kib(field: str) -> int:
    """A ``Vm*`` line of /proc/self/status, in KiB (0 when not on Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def maxrss_kib() -> int:
    """Peak RSS of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads) so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def mib(kib: int) -> str:
    return f"{kib / 1024:.0f} MiB"


def database_bytes(db: Database, data_dir: Path) -> int:
    if db.is_sqlite:
        return sum(p.stat().st_size for p in data_dir.glob("mailgate.db*"))
    return -1  # filled in by an async query; see pg_size


async def pg_size(db: Database) -> int:
    async with db.read() as s:
        return int(await s.scalar(text("SELECT pg_database_size(current_database())")) or 0)


async def db_size(db: Database, data_dir: Path) -> int:
    return database_bytes(db, data_dir) if db.is_sqlite else await pg_size(db)


# --------------------------------------------------------------------------- the store


def make_config(data_dir: Path, database_url: str) -> Config:
    return parse_config(
        {
            "gateway": {"hostname": "bench.test", "data_dir": str(data_dir), "database_url": database_url},
            "listen": {"smtp": "127.0.0.1:0"},
            "retention": {"spam_days": SPAM_DAYS},
            "tenants": [{"id": TENANT, "domains": ["bench.test"]}],
        }
    )


_TEXT = (
    "offer free winner money click now limited price viagra crypto bonus account verify urgent "
    "order invoice meeting tomorrow please attached regards thanks question delivery customer "
    "refund shipping update password security team support product discount unsubscribe"
)
WORDS = tuple(_TEXT.split())


def raw_message(rng: random.Random, n: int, kind: str) -> bytes:
    """A plausible 2-4 KB text message, distinct per (kind, n)."""
    sender = f"{rng.choice(WORDS)}{n}@{kind}-sender{n % 97}.example"
    subject = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))).capitalize()
    lines = []
    size = rng.randint(2000, 4000)
    while sum(len(x) + 2 for x in lines) < size:
        lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 12))))
    head = (
        f"Received: from mx{n % 7}.{kind}.example (mx.{kind}.example [192.0.2.{n % 250 + 1}])\r\n"
        f"\tby bench.test with ESMTP id {kind}{n:08d}; Mon, 02 Nov 2026 10:00:00 +0000\r\n"
        f"From: {sender}\r\nTo: support@bench.test\r\nSubject: {subject}\r\n"
        f"Date: Mon, 02 Nov 2026 10:{n % 60:02d}:00 +0000\r\n"
        f"Message-ID: <{kind}.{n}@bench.example>\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\n"
    )
    return head.encode() + "\r\n".join(lines).encode() + b"\r\n"


def templates(blobs: FsBlobStore, rng: random.Random, count: int, kind: str) -> list[mailstore.NewMessage]:
    """``count`` distinct blobs written to the store, each with its parsed metadata."""
    out = []
    for n in range(count):
        raw = raw_message(rng, n, kind)
        digest = blobs.put_sync(raw)
        epoch = datetime(2000, 1, 1, tzinfo=UTC)
        out.append(describe(raw, parse_headers(raw), digest, epoch, frozenset()))
    return out


def schedule(kinds: dict[str, int], batch: int) -> Iterator[tuple[str, int, int]]:
    """(kind, first index, count) chunks of each kind, interleaved evenly."""
    chunks = []
    for kind, total in kinds.items():
        n = -(-total // batch) if total else 0
        for i in range(n):
            start = i * batch
            chunks.append(((i + 0.5) / n, kind, start, min(batch, total - start)))
    for _, kind, start, count in sorted(chunks):
        yield kind, start, count


async def load(args: argparse.Namespace, data_dir: Path) -> dict[str, Any]:
    """Fill the store; returns what the purge must do, for the verification."""
    started = time.perf_counter()
    db, blobs = await open_store(make_config(data_dir, args.database_url))
    now = datetime.fromisoformat(args.now)
    rng = random.Random(1)
    spam = templates(blobs, rng, args.blobs, "spam")
    recent = templates(blobs, rng, max(1, args.blobs // 10), "recent")
    ham = templates(blobs, rng, max(SHARED_WITH_HAM + 1, args.blobs // 4), "ham")
    shared = [t.blob for t in spam[:SHARED_WITH_HAM]]
    ham[:SHARED_WITH_HAM] = [  # ham rows that reuse an expired spam blob (e.g. moved then copied)
        mailstore.NewMessage(blob=t.blob, size=t.size, received_at=t.received_at)
        for t in spam[:SHARED_WITH_HAM]
    ]
    touched = [t.blob for t in spam[SHARED_WITH_HAM : SHARED_WITH_HAM + TOUCHED_NOW]]
    blobs_done = time.perf_counter()

    async with db.read() as s:
        folders = {
            name: await mailstore.require_folder(s, TENANT, name) for name in ("Spam", "INBOX", "Archive")
        }
    assert folders["Spam"].special_use == mailstore.JUNK

    kinds = {"expired": args.rows, "recent": args.recent, "ham": args.ham}
    for kind, start, count in schedule(kinds, args.batch):
        pool = {"expired": spam, "recent": recent, "ham": ham}[kind]
        folder = (
            folders["Spam"] if kind != "ham" else folders["INBOX" if start // args.batch % 2 else "Archive"]
        )
        if kind == "expired":
            low, high = 100 * DAY, 110 * DAY
        elif kind == "recent":
            low, high = 0.0, 80 * DAY
        else:
            low, high = 0.0, 400 * DAY
        rows = []
        for i in range(start, start + count):
            t = pool[i % len(pool)]
            when = now - timedelta(seconds=rng.uniform(low, high))
            rows.append(
                mailstore.NewMessage(
                    blob=t.blob,
                    size=t.size,
                    received_at=when,
                    message_id=f"<{kind}.{i}@bench.example>",
                    subject=t.subject,
                    from_addr=t.from_addr,
                    to_addr=t.to_addr,
                    sent_date=t.sent_date,
                    flags=frozenset({"\\Seen"}) if kind == "ham" and i % 3 else frozenset(),
                    envelope=t.envelope,
                    bodystructure=t.bodystructure,
                    body=t.body,
                )
            )
        async with db.write() as s:
            await mailstore.append(s, folder, rows)
    rows_done = time.perf_counter()

    # Every blob is old except the ones "reused right now".
    old = now.timestamp() - 100 * DAY
    for t in (*spam, *recent, *ham):
        os.utime(blobs.path(t.blob), (old, old))
    for digest in touched:
        os.utime(blobs.path(digest), (now.timestamp(), now.timestamp()))
    analyzed = not db.is_sqlite and not args.no_analyze
    if analyzed:  # what autovacuum would have done by then (this bench's server may run without it)
        async with db.writer.connect() as conn:
            await (await conn.execution_options(isolation_level="AUTOCOMMIT")).execute(text("ANALYZE"))
    size = await db_size(db, data_dir)
    await db.close()
    return {
        "blob_seconds": blobs_done - started,
        "row_seconds": rows_done - blobs_done,
        "analyzed": analyzed,
        "rss_kib": maxrss_kib(),
        "db_bytes": size,
        "expired_blobs": [t.blob for t in spam],
        "shared_blobs": shared,
        "touched_blobs": touched,
        "survivor_blobs": sorted({t.blob for t in (*recent, *ham)}),
    }


async def dry_run(args: argparse.Namespace, data_dir: Path) -> dict[str, Any]:
    db, blobs = await open_store(make_config(data_dir, args.database_url))
    before = maxrss_kib()
    started = time.perf_counter()
    report = await retention.purge_spam(db, blobs, datetime.fromisoformat(args.now), SPAM_DAYS, dry_run=True)
    seconds = time.perf_counter() - started
    await db.close()
    return {
        "seconds": seconds,
        "messages": report.messages[TENANT],
        "rss_before_kib": before,
        "rss_kib": maxrss_kib(),
    }


def child(args: argparse.Namespace, phase: str, data_dir: Path) -> dict[str, Any]:
    """Run ``phase`` (load, dry) in a fresh interpreter; its JSON result."""
    cmd = [sys.executable, __file__, "--phase", phase, "--data-dir", str(data_dir), "--now", args.now]
    cmd += ["--rows", str(args.rows), "--recent", str(args.recent), "--ham", str(args.ham)]
    cmd += ["--blobs", str(args.blobs), "--batch", str(args.batch)]
    cmd += ["--database-url", args.database_url] + (["--no-analyze"] if args.no_analyze else [])
    try:
        done = subprocess.run(cmd, capture_output=True, timeout=args.timeout, check=False)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{phase} did not finish within {args.timeout:.0f}s") from None
    if done.returncode != 0:
        raise BenchError(f"{phase} failed:\n{done.stderr.decode(errors='replace')[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return result


# --------------------------------------------------------------------------- the purge


async def purge(args: argparse.Namespace, data_dir: Path, loaded: dict[str, Any]) -> list[str]:
    """Time the purge in this process, verify the result; the problems found."""
    db, blobs = await open_store(make_config(data_dir, args.database_url))
    now = datetime.fromisoformat(args.now)
    cutoff = now - timedelta(days=SPAM_DAYS)
    gc_seconds = gc_cpu = 0.0
    real_collect = retention.collect_blobs

    async def timed_collect(*a: Any, **kw: Any) -> int:
        nonlocal gc_seconds, gc_cpu
        t0, c0 = time.perf_counter(), cpu_seconds()
        try:
            return await real_collect(*a, **kw)
        finally:
            gc_seconds, gc_cpu = time.perf_counter() - t0, cpu_seconds() - c0

    # The hourly job when nothing has expired yet (20 days earlier), on the full store.
    started = time.perf_counter()
    idle = await retention.purge_spam(db, blobs, now - timedelta(days=20), SPAM_DAYS)
    total = args.rows + args.recent + args.ham
    print(
        f"idle purge before (nothing expired yet, {total:,} rows): {time.perf_counter() - started:.2f} s, "
        f"{idle.messages[TENANT]} purged"
    )

    batch_seconds: list[float] = []
    real_write = db.write

    @contextlib.asynccontextmanager
    async def timed_write() -> AsyncIterator[Any]:
        t0 = time.perf_counter()
        async with real_write() as s:
            yield s
        batch_seconds.append(time.perf_counter() - t0)

    retention.collect_blobs = timed_collect  # type: ignore[assignment]
    db.write = timed_write  # type: ignore[method-assign]
    rss_before, hwm_before = maxrss_kib(), vm_kib("VmHWM")
    started, cpu_started = time.perf_counter(), cpu_seconds()
    try:
        report = await retention.purge_spam(db, blobs, now, SPAM_DAYS)
    finally:
        retention.collect_blobs = real_collect
        db.write = real_write  # type: ignore[method-assign]
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    rss_after, hwm_after = maxrss_kib(), vm_kib("VmHWM")
    size_after = await db_size(db, data_dir)

    n = report.messages[TENANT]
    delete_s = seconds - gc_seconds
    batches = -(-args.rows // retention.BATCH)
    print(
        f"purge: {n} rows in {seconds:.1f} s = {n / seconds:,.0f} rows/s "
        f"({retention.BATCH} per transaction, {batches} transactions); CPU {cpu:.1f} s"
    )
    print(
        f"  delete batches: {delete_s:.1f} s ({n / max(delete_s, 1e-9):,.0f} rows/s, "
        f"{1000 * delete_s / batches:.1f} ms per batch); CPU {cpu - gc_cpu:.1f} s"
    )
    tenth = max(1, len(batch_seconds) // 10)
    deciles = [1000 * sum(batch_seconds[i : i + tenth]) / tenth for i in range(0, tenth * 10, tenth)]
    print("  ms per batch transaction, by tenth of the run: " + " ".join(f"{d:.0f}" for d in deciles))
    candidates = len(loaded["expired_blobs"])
    print(
        f"  blob GC: {gc_seconds:.2f} s for {candidates} candidate blobs "
        f"({1000 * gc_seconds / candidates:.2f} ms each), {report.blobs_removed} removed; "
        f"CPU {gc_cpu:.2f} s"
    )
    print(
        f"  peak RSS: {mib(rss_before)} before, {mib(rss_after)} after: "
        f"the purge added {mib(rss_after - rss_before)} (ru_maxrss; VmHWM {mib(hwm_before)} -> "
        f"{mib(hwm_after)})"
    )
    print(f"  database: {loaded['db_bytes'] / 1e6:,.0f} MB before, {size_after / 1e6:,.0f} MB after")

    problems = await verify(db, blobs, loaded, cutoff, args, report)
    async with db.read() as s:
        expunges = int(await s.scalar(select(func.count()).select_from(Expunge)) or 0)
    print(f"  expunges table afterwards: {expunges:,} rows (one per purged message, never pruned)")

    # The hourly job once everything expired is gone.
    remaining = args.recent + args.ham
    started = time.perf_counter()
    idle = await retention.purge_spam(db, blobs, now, SPAM_DAYS)
    idle_s = time.perf_counter() - started
    print(
        f"idle purge after (nothing expired, {remaining:,} rows left): {1000 * idle_s:.0f} ms, "
        f"{idle.messages[TENANT]} purged"
    )
    if db.is_sqlite:
        print(f"  SQLite plan of the batch query: {await sqlite_plan(db, cutoff)}")
    await db.close()
    return problems


async def sqlite_plan(db: Database, cutoff: datetime) -> str:
    """EXPLAIN QUERY PLAN of purge_spam's batch query (the same SELECT, literal values)."""
    sql = (
        "SELECT messages.id, messages.folder_id, messages.uid, messages.size, messages.blob, "
        "messages.tenant_id FROM messages JOIN folders ON folders.id = messages.folder_id "
        "WHERE folders.special_use = ? AND messages.received_at < ? ORDER BY messages.id LIMIT ?"
    )
    naive = cutoff.astimezone(UTC).replace(tzinfo=None).isoformat(" ")
    params = (mailstore.JUNK, naive, retention.BATCH)

    def plan(s: Session) -> list[Any]:  # the driver's own statement: on the session's sync connection
        return list(s.connection().exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", params))

    async with db.read() as s:
        rows = await s.run_sync(plan)
    return "; ".join(str(r[-1]) for r in rows)


async def verify(
    db: Database,
    blobs: FsBlobStore,
    loaded: dict[str, Any],
    cutoff: datetime,
    args: argparse.Namespace,
    report: retention.PurgeReport,
) -> list[str]:
    problems = []
    async with db.read() as s:
        folders = (
            await s.execute(
                select(
                    Folder.id, Folder.name, Folder.special_use, Folder.used_messages, Folder.used_bytes
                ).where(Folder.tenant_id == TENANT)
            )
        ).all()
        actual = {
            r.folder_id: (int(r.n), int(r.b or 0))
            for r in await s.execute(
                select(
                    Message.folder_id, func.count().label("n"), func.sum(Message.size).label("b")
                ).group_by(Message.folder_id)
            )
        }
        expired_left = await s.scalar(
            select(func.count())
            .select_from(Message)
            .join(Folder, Folder.id == Message.folder_id)
            .where(Folder.special_use == mailstore.JUNK, Message.received_at < cutoff)
        )
        tenant = (
            await s.execute(select(Tenant.used_messages, Tenant.used_bytes).where(Tenant.id == TENANT))
        ).one()
    by_name = {}
    for f in folders:
        count, size = actual.get(f.id, (0, 0))
        by_name[f.name] = count
        if (f.used_messages, f.used_bytes) != (count, size):
            problems.append(
                f"folder {f.name}: counters {f.used_messages} / {f.used_bytes} B, rows {count} / {size} B"
            )
    if expired_left:
        problems.append(f"{expired_left} expired spam rows left")
    if by_name.get("Spam", 0) != args.recent:
        problems.append(f"Spam holds {by_name.get('Spam', 0)} rows, expected the {args.recent} recent ones")
    ham_left = by_name.get("INBOX", 0) + by_name.get("Archive", 0)
    if ham_left != args.ham:
        problems.append(f"INBOX + Archive hold {ham_left} rows, expected {args.ham}")
    non_junk = [f for f in folders if f.special_use != mailstore.JUNK]
    want = (
        sum(actual.get(f.id, (0, 0))[0] for f in non_junk),
        sum(actual.get(f.id, (0, 0))[1] for f in non_junk),
    )
    if (tenant.used_messages, tenant.used_bytes) != want:
        problems.append(f"tenant counters {tuple(tenant)} but non-Junk rows {want}")
    if report.messages[TENANT] != args.rows:
        problems.append(f"report says {report.messages[TENANT]} purged, expected {args.rows}")
    spared = set(loaded["shared_blobs"]) | set(loaded["touched_blobs"])
    gone = [d for d in loaded["expired_blobs"] if d not in spared]
    expected_removed = len(gone) if args.rows >= len(loaded["expired_blobs"]) else None
    if expected_removed is not None and report.blobs_removed != expected_removed:
        problems.append(f"{report.blobs_removed} blobs removed, expected {expected_removed}")
    if expected_removed is not None and any(blobs.path(d).exists() for d in gone):
        problems.append("an unreferenced old blob is still there")
    missing = [d for d in (*spared, *loaded["survivor_blobs"]) if not blobs.path(d).exists()]
    if missing:
        problems.append(f"{len(missing)} blobs that must survive were deleted, e.g. {missing[0]}")
    print(
        f"verified: Spam {by_name.get('Spam', 0)} (recent), INBOX+Archive {ham_left}, expired left "
        f"{expired_left}, folder and tenant counters {'OK' if not problems else 'see below'}; "
        f"{len(spared)} spared blobs ({SHARED_WITH_HAM} still referenced, {TOUCHED_NOW} touched now) present"
    )
    return problems


# --------------------------------------------------------------------------- PostgreSQL scratch database


def admin_dsn(url: str) -> tuple[str, str]:
    """(asyncpg DSN of the server's ``postgres`` database, scratch database name)."""
    parts = urlsplit(url)
    if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise BenchError("--database-url: the benchmark only talks to a local PostgreSQL")
    name = parts.path.lstrip("/")
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
        raise BenchError("--database-url must name a scratch database, e.g. .../mailgate_bench")
    return urlunsplit(("postgresql", parts.netloc, "/postgres", "", "")), name


async def pg_admin(dsn: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


# --------------------------------------------------------------------------- main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000, help="expired spam rows to purge (1,000,000)")
    p.add_argument("--recent", type=int, default=20_000, help="recent spam rows that stay (20,000)")
    p.add_argument("--ham", type=int, default=50_000, help="non-spam rows that stay (50,000)")
    p.add_argument("--blobs", type=int, default=2000, help="distinct expired-spam blobs, shared by the rows")
    p.add_argument("--batch", type=int, default=5000, help="messages per load transaction (5000)")
    p.add_argument(
        "--no-analyze",
        action="store_true",
        help="PostgreSQL: skip the ANALYZE after loading (the planner then guesses blind)",
    )
    p.add_argument("--dry-run", action="store_true", help="also time purge_spam(dry_run=True) first")
    p.add_argument(
        "--database-url",
        default="",
        help="default: embedded SQLite; or postgresql+asyncpg://postgres@127.0.0.1:5432/SCRATCH_DB",
    )
    p.add_argument("--timeout", type=float, default=3600.0, help="limit for the load and dry-run, seconds")
    p.add_argument("--phase", choices=("load", "dry"), help=argparse.SUPPRESS)
    p.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument(
        "--now", default=datetime.now(UTC).replace(microsecond=0).isoformat(), help=argparse.SUPPRESS
    )
    args = p.parse_args()
    if min(args.rows, args.blobs, args.batch) < 1 or min(args.recent, args.ham) < 0:
        p.error("--rows, --blobs and --batch must be positive")
    if args.database_url and not args.database_url.startswith("postgresql+asyncpg://"):
        p.error("--database-url: only postgresql+asyncpg://... (SQLite is the default)")

    if args.phase:
        run = load if args.phase == "load" else dry_run
        print(json.dumps(asyncio.run(run(args, args.data_dir))))
        return 0

    backend = "PostgreSQL" if args.database_url else "SQLite"
    print(
        f"retention: {args.rows:,} expired spam rows ({args.blobs} distinct blobs), {args.recent:,} recent "
        f"spam, {args.ham:,} non-spam; {backend}"
    )
    try:
        dsn, name = admin_dsn(args.database_url) if args.database_url else ("", "")
        with tempfile.TemporaryDirectory(prefix="mailgate-bench-retention-") as tmp:
            if dsn:
                asyncio.run(pg_admin(dsn, f"CREATE DATABASE {name}"))
            try:
                data_dir = Path(tmp) / "var"
                loaded = child(args, "load", data_dir)
                total = args.rows + args.recent + args.ham
                print(
                    f"load: {total:,} rows in {loaded['row_seconds']:.1f} s "
                    f"({total / loaded['row_seconds']:,.0f} rows/s, {args.batch} per transaction); "
                    f"blobs {loaded['blob_seconds']:.1f} s; database {loaded['db_bytes'] / 1e6:,.0f} MB; "
                    f"loader peak RSS {mib(loaded['rss_kib'])}"
                    + ("; then ANALYZE" if loaded["analyzed"] else "")
                )
                if args.dry_run:
                    dry = child(args, "dry", data_dir)
                    print(
                        f"dry run: {dry['messages']:,} rows counted in {dry['seconds']:.1f} s; peak RSS "
                        f"{mib(dry['rss_before_kib'])} -> {mib(dry['rss_kib'])} "
                        f"(+{mib(dry['rss_kib'] - dry['rss_before_kib'])})"
                    )
                problems = asyncio.run(purge(args, data_dir, loaded))
            finally:
                if dsn:
                    asyncio.run(pg_admin(dsn, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    except BenchError as exc:
        print(f"retention: error: {exc}", file=sys.stderr)
        return 1
    for problem in problems:
        print(f"retention: FAIL: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

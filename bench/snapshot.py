"""Snapshot benchmark: a full snapshot of N messages, then one after 1 % of them changed.

The bench fills a fresh store (SQLite by default) with ``--messages`` distinct
messages of 2-5 KB over ``--tenants`` tenants (INBOX 60 %, Archive 25 %, Sent
10 %, Spam 5 %; mixed flags; each with its parsed header fields and IMAP
structures, as ingest stores them). The rows go in through
``mailstore.append`` (``--batch`` per transaction). The blob files are written
straight into the blob store's layout (``ab/cd/<sha256>``) without the
per-blob fsyncs of ``FsBlobStore.put_sync``, followed by one ``sync()``: the
files are the same, only loading is faster.

Then it measures, in this process:

1. ``snapshots.create`` (what ``mailgate snapshot create`` and the daily job
   call) into ``<data_dir>/snapshots``: wall and CPU time, split by the helpers
   of ``storage/snapshots.py`` that this version has (wrapped here, looked up
   by name): the SQLite online backup (``_backup``) or the SQLAlchemy export
   (``_export``, ``_write``), listing the digests, hard-linking the blobs
   (``_link``: a check, ``mkdir`` and ``os.link`` per blob; *links made* are
   the blob files that appeared) and the final fsyncs and rename
   (``_finish``); what no helper covers is printed as the rest (in the
   version before the shared pool: reading the live database);
2. its disk use, ``du``-style (``st_blocks * 512``, each inode once) over the
   snapshot's directory and the shared blob pool (``snapshots/blobs``, when
   the version has one): *new* = blocks of inodes that did not exist before
   (directories, metadata.db, manifest; a hard-linked blob is not new), and
   *apparent* = the sum of the file sizes there (what copying it would take);
3. ``--change`` (1 %) of the messages change: 50 % of those changes are new
   deliveries (new blobs through ``FsBlobStore.put``), 45 % flag changes
   (``mailstore.store_flags``, one per message), 5 % expunges;
4. a second ``snapshots.create`` a day later, measured the same way (*new*
   now also excludes inodes the first snapshot created), and the ratios
   second / first;
5. ``snapshots.verify`` of both, timed (any problem fails the bench); then
   ``snapshots.prune`` to one, timed; then reference floors: ``cp -al`` of the
   live blob tree and (SQLite) an online backup of the live database.

    .venv/bin/python bench/snapshot.py [--messages 100000] [--tenants 4] [--change 0.01]
        [--database-url postgresql+asyncpg://postgres@127.0.0.1:5432/mailgate_bench] [--keep DIR]

With a PostgreSQL URL the named database is created (it must not exist) and
dropped at the end. The data lives in a temporary directory (``--keep DIR``:
there instead, left in place).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import inspect
import os
import random
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from retention import BenchError, admin_dsn, pg_admin  # noqa: E402 (bench/retention.py)
from sqlalchemy import select  # noqa: E402

from gateway.config import Config, parse_config  # noqa: E402
from gateway.daemon import open_store  # noqa: E402
from gateway.ingest import describe  # noqa: E402
from gateway.message import parse_headers  # noqa: E402
from storage import mailstore, snapshots  # noqa: E402
from storage.blobs import FsBlobStore  # noqa: E402
from storage.db import Database  # noqa: E402
from storage.models import Folder, Message  # noqa: E402

FOLDERS = (("INBOX", 0.60), ("Archive", 0.25), ("Sent", 0.10), ("Spam", 0.05))
_TEXT = (
    "order invoice meeting tomorrow please attached regards thanks question delivery customer "
    "refund shipping update password security team support product discount account payment "
    "received problem broken package address change cancel return warranty price offer status "
    "tracking"
)
WORDS = tuple(_TEXT.split())


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def make_config(data_dir: Path, database_url: str, tenants: int) -> Config:
    return parse_config(
        {
            "gateway": {"hostname": "bench.test", "data_dir": str(data_dir), "database_url": database_url},
            "listen": {"smtp": "127.0.0.1:0"},
            "snapshots": {"dir": str(data_dir / "snapshots")},
            "tenants": [{"id": f"t{i}", "domains": [f"t{i}.test"]} for i in range(tenants)],
        }
    )


# --------------------------------------------------------------------------- loading


def raw_message(rng: random.Random, n: int, tenant: str) -> bytes:
    """A distinct, plausible 2-5 KB text message."""
    subject = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))).capitalize()
    size = rng.randint(2000, 5000)
    lines: list[str] = []
    length = 0
    while length < size:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 13)))
        lines.append(line)
        length += len(line) + 2
    head = (
        f"Received: from mail{n % 13}.customer.example (mail.customer.example [198.51.100.{n % 250 + 1}])\r\n"
        f"\tby mx.{tenant}.test with ESMTP id Q{n:09d}; Mon, 02 Nov 2026 10:00:00 +0000\r\n"
        f"From: Customer {n} <c{n}@customer{n % 500}.example>\r\nTo: support@{tenant}.test\r\n"
        f"Subject: {subject} #{n}\r\nDate: Mon, 02 Nov 2026 10:{n % 60:02d}:00 +0000\r\n"
        f"Message-ID: <m{n}.{rng.getrandbits(32):08x}@customer.example>\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\n"
    )
    return head.encode() + "\r\n".join(lines).encode() + b"\r\n"


def write_blob(blobs: FsBlobStore, data: bytes) -> str:
    """Put a blob in the store's layout without fsyncs (the caller syncs once at the end)."""
    digest = hashlib.sha256(data).hexdigest()
    path = blobs.path(digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return digest


def random_flags(rng: random.Random, folder: str) -> frozenset[str]:
    flags = set()
    if folder != "INBOX" or rng.random() < 0.7:
        flags.add("\\Seen")
    if rng.random() < 0.2:
        flags.add("\\Answered")
    if rng.random() < 0.05:
        flags.add("\\Flagged")
    if rng.random() < 0.1:
        flags.add(rng.choice(("Orders", "Urgent", "Later")))
    return frozenset(flags)


async def load(db: Database, blobs: FsBlobStore, args: argparse.Namespace, now: datetime) -> None:
    rng = random.Random(7)
    tenants = [f"t{i}" for i in range(args.tenants)]
    async with db.read() as s:
        folders = {(t, f): await mailstore.require_folder(s, t, f) for t in tenants for f, _ in FOLDERS}
    pending: dict[tuple[str, str], list[mailstore.NewMessage]] = {}
    names, weights = [f for f, _ in FOLDERS], [w for _, w in FOLDERS]
    for n in range(args.messages):
        tenant = tenants[n % len(tenants)]
        folder = rng.choices(names, weights)[0]
        raw = raw_message(rng, n, tenant)
        digest = write_blob(blobs, raw)
        received = now - timedelta(seconds=(args.messages - n) * 300)
        message = describe(raw, parse_headers(raw), digest, received, random_flags(rng, folder))
        batch = pending.setdefault((tenant, folder), [])
        batch.append(message)
        if len(batch) >= args.batch:
            async with db.write() as s:
                await mailstore.append(s, folders[tenant, folder], batch)
            pending[tenant, folder] = []
    async with db.write() as s:
        for key, batch in pending.items():
            await mailstore.append(s, folders[key], batch)
    await asyncio.to_thread(os.sync)


async def change(db: Database, blobs: FsBlobStore, args: argparse.Namespace, now: datetime) -> Counter[str]:
    """Change ``--change`` of the messages: deliveries, flag changes, expunges."""
    rng = random.Random(11)
    total = max(1, round(args.messages * args.change))
    deliveries, expunges = total // 2, max(1, total // 20)
    flag_changes = total - deliveries - expunges
    done: Counter[str] = Counter()
    async with db.read() as s:
        rows = (await s.execute(select(Message.folder_id, Message.uid))).all()
        folders = {f.id: f for f in await s.scalars(select(Folder))}
    picked = rng.sample(rows, flag_changes + expunges)
    by_folder: dict[int, list[int]] = {}
    for folder_id, uid in picked[:flag_changes]:
        by_folder.setdefault(folder_id, []).append(uid)
    async with db.write() as s:
        for folder_id, uids in by_folder.items():
            for uid in uids:  # one STORE per message, as IMAP clients send them
                flag = rng.choice(("\\Seen", "\\Flagged", "\\Answered", "Urgent"))
                mode = rng.choice(("add", "remove"))
                changed = await mailstore.store_flags(s, folders[folder_id], [uid], [flag], mode)
                done["flag changes"] += 1
                done["flag changes that changed something"] += len(changed)
        for folder_id, uid in picked[flag_changes:]:
            done["expunges"] += len(await mailstore.expunge(s, folders[folder_id], [uid]))
    inbox = {f.tenant_id: f for f in folders.values() if f.name == "INBOX"}
    tenants = sorted(inbox)
    for n in range(deliveries):
        tenant = tenants[n % len(tenants)]
        raw = raw_message(rng, args.messages + n, tenant)
        digest = await blobs.put(raw)  # as ingest does: fsynced
        message = describe(raw, parse_headers(raw), digest, now, frozenset())
        async with db.write() as s:
            await mailstore.append(s, inbox[tenant], [message])
        done["deliveries"] += 1
    return done


# --------------------------------------------------------------------------- measuring


@dataclass
class Phases:
    """Wall seconds spent in each helper of ``snapshots.create`` that this version has."""

    seconds: Counter[str] = field(default_factory=Counter)
    calls: Counter[str] = field(default_factory=Counter)
    digests: int = 0  # digests handed to _link (each is checked, new ones linked)
    links: int = 0  # blob files that appeared (links made), counted on disk


# The helpers of storage/snapshots.py, before and after the shared pool (4eaf6a7), and
# what they do. ``_write`` runs inside ``_export`` when both exist.
HELPERS = {
    "_backup": "SQLite online backup",
    "_export": "export rows (SQLAlchemy)",
    "_write": "write metadata.db",
    "_message_blobs": "list digests",
    "_link": "link blobs",
    "_count_tenants": "count tenants",
    "_finish": "fsync+rename",
    "_fresh_dir": "mkdir",
}


def instrument(phases: Phases) -> Callable[[], None]:
    """Time snapshots' helpers (module globals, looked up at each call); returns the undo."""
    originals = {name: getattr(snapshots, name) for name in HELPERS if hasattr(snapshots, name)}

    def done(name: str, t0: float) -> None:
        phases.seconds[name] += time.perf_counter() - t0
        phases.calls[name] += 1

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.iscoroutinefunction(fn):

            async def awrapper(*a: Any, **kw: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return await fn(*a, **kw)
                finally:
                    done(name, t0)

            return awrapper

        def wrapper(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                done(name, t0)
                if name == "_link":
                    phases.digests += len(a[2])

        return wrapper

    for name, fn in originals.items():
        setattr(snapshots, name, timed(name, fn))

    def undo() -> None:
        for name, fn in originals.items():
            setattr(snapshots, name, fn)

    return undo


def blob_files(roots: list[Path]) -> int:
    """Files under these blob trees (``ab/cd/<digest>``)."""
    return sum(len(files) for root in roots for _, _, files in os.walk(root))


@dataclass
class Usage:
    """Disk use of one directory tree, du-style."""

    apparent: int = 0  # sum of st_size of its regular files, each inode once
    new_bytes: int = 0  # st_blocks * 512 of inodes not in ``known``
    new_inodes: int = 0
    directories: int = 0
    directory_bytes: int = 0
    files: int = 0
    metadata_bytes: int = 0
    inodes: set[tuple[int, int]] = field(default_factory=set)


def usage(roots: list[Path], known: set[tuple[int, int]]) -> Usage:
    """Disk use of the snapshot's directory and of the shared blob pool (its growth counts)."""
    u = Usage()
    for dirpath, _dirnames, filenames in (w for root in roots for w in os.walk(root)):
        for name in (".", *filenames):
            st = os.lstat(os.path.join(dirpath, name))
            key = (st.st_dev, st.st_ino)
            if key in u.inodes:
                continue
            u.inodes.add(key)
            allocated = st.st_blocks * 512
            if name == ".":
                u.directories += 1
                u.directory_bytes += allocated
            else:
                u.files += 1
                u.apparent += st.st_size
                if name == "metadata.db":
                    u.metadata_bytes = allocated
            if key not in known:
                u.new_inodes += 1
                u.new_bytes += allocated
    return u


def inodes_of(root: Path) -> set[tuple[int, int]]:
    out = set()
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            out.add((st.st_dev, st.st_ino))
    return out


@dataclass
class Shot:
    name: str
    seconds: float
    cpu: float
    phases: Phases
    usage: Usage
    messages: int
    verify_seconds: float = 0.0
    problems: list[str] = field(default_factory=list)


async def take(
    db: Database, blobs: FsBlobStore, config: Config, now: datetime, known: set[tuple[int, int]]
) -> Shot:
    phases = Phases()
    pool = config.snapshots.dir / getattr(snapshots, "POOL", "blobs")  # shared pool, if this version has one
    pool_before = await asyncio.to_thread(blob_files, [pool])
    undo = instrument(phases)
    await asyncio.to_thread(os.sync)  # nothing of the load or the changes left to flush
    started, cpu_started = time.perf_counter(), cpu_seconds()
    try:
        info = await snapshots.create(db, blobs, config.snapshots.dir, now, config.gateway.data_dir)
    finally:
        undo()
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    phases.links = await asyncio.to_thread(blob_files, [pool, info.path / "blobs"]) - pool_before
    return Shot(info.name, seconds, cpu, phases, usage([info.path, pool], known), info.messages)


def mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def report(label: str, shot: Shot) -> None:
    p, u = shot.phases, shot.usage
    nested = {"_write"} if p.calls["_export"] else set()
    top = [k for k in HELPERS if p.calls[k] and k not in nested]
    rest = shot.seconds - sum(p.seconds[k] for k in top)
    print(
        f"{label}: {shot.messages:,} messages in {shot.seconds:.1f} s (CPU {shot.cpu:.1f} s); "
        f"new on disk {mb(u.new_bytes)} in {u.new_inodes:,} inodes, apparent {mb(u.apparent)}"
    )
    parts = []
    for k in top:
        part = f"{HELPERS[k]} {p.seconds[k]:.2f} s"
        if k == "_link":
            each = 1e6 * p.seconds[k] / max(p.digests, 1)
            part += f" ({p.digests:,} digests, {each:.0f} us each; {p.links:,} links made)"
        if k == "_export" and p.calls["_write"]:
            part += f" (of which write metadata.db {p.seconds['_write']:.2f} s in {p.calls['_write']} chunks)"
        parts.append(part)
    label_rest = (
        "read live DB (SQLAlchemy stream) + event loop" if p.calls["_write"] and not nested else "rest"
    )
    parts.append(f"{label_rest} {rest:.2f} s")
    print("  time: " + " | ".join(parts))
    print(
        f"  disk: metadata.db {mb(u.metadata_bytes)}, {u.directories:,} directories {mb(u.directory_bytes)}, "
        f"{u.files:,} files"
    )


async def reference(db: Database, blobs: FsBlobStore, data_dir: Path) -> None:
    """Floors for the same work done without Python in the loop: ``cp -al`` and SQLite's backup."""
    ref = data_dir / "reference"
    ref.mkdir()
    await asyncio.to_thread(os.sync)
    t0 = time.perf_counter()
    subprocess.run(["cp", "-al", str(blobs.root), str(ref / "blobs")], check=True, timeout=3600)
    cp_seconds = time.perf_counter() - t0
    line = f"reference: cp -al of the blob tree {cp_seconds:.1f} s"
    if db.is_sqlite:
        live = data_dir / "mailgate.db"
        t0 = time.perf_counter()
        await asyncio.to_thread(_sqlite_backup, live, ref / "backup.db")
        line += (
            f"; SQLite online backup of the whole live DB {time.perf_counter() - t0:.1f} s "
            f"({mb((ref / 'backup.db').stat().st_size)}, IMAP structures included)"
        )
    print(line)
    await asyncio.to_thread(shutil.rmtree, ref)


def _sqlite_backup(source: Path, target: Path) -> None:
    src, dst = sqlite3.connect(source), sqlite3.connect(target)
    try:
        src.backup(dst)
        dst.execute("PRAGMA synchronous=FULL")
        dst.commit()
    finally:
        src.close()
        dst.close()
    fd = os.open(target, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- main


async def run(args: argparse.Namespace, data_dir: Path) -> int:
    config = make_config(data_dir, args.database_url, args.tenants)
    db, blobs = await open_store(config)
    now = datetime.now(UTC).replace(microsecond=0)
    t0 = time.perf_counter()
    await load(db, blobs, args, now)
    live = inodes_of(blobs.root)
    live_bytes = sum(os.lstat(os.path.join(d, f)).st_size for d, _, fs in os.walk(blobs.root) for f in fs)
    print(
        f"load: {args.messages:,} messages ({mb(live_bytes)} of blobs, {len(live):,} files) "
        f"in {time.perf_counter() - t0:.0f} s"
    )

    first = await take(db, blobs, config, now, live)
    report("full snapshot", first)

    t0 = time.perf_counter()
    done = await change(db, blobs, args, now + timedelta(hours=12))
    print(f"changes in {time.perf_counter() - t0:.1f} s: " + ", ".join(f"{v} {k}" for k, v in done.items()))

    known = inodes_of(blobs.root) | first.usage.inodes
    second = await take(db, blobs, config, now + timedelta(days=1), known)
    report("second snapshot", second)
    print(
        f"second / first: time {second.seconds / first.seconds:.2f}, CPU {second.cpu / first.cpu:.2f}, "
        f"new disk {second.usage.new_bytes / first.usage.new_bytes:.2f}, "
        f"apparent {second.usage.apparent / first.usage.apparent:.2f}"
    )

    failed = False
    for shot in (first, second):
        path = config.snapshots.dir / shot.name
        t0 = time.perf_counter()
        shot.problems = await asyncio.to_thread(snapshots.verify, path)
        shot.verify_seconds = time.perf_counter() - t0
        print(
            f"verify {shot.name}: {shot.verify_seconds:.1f} s, "
            f"{len(shot.problems)} problem(s){': ' + shot.problems[0] if shot.problems else ''}"
        )
        failed = failed or bool(shot.problems)
    t0 = time.perf_counter()
    pruned = await asyncio.to_thread(snapshots.prune, config.snapshots.dir, 1)
    print(
        f"prune (keep=1; the daily job prunes the same way): removed {', '.join(pruned)} "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    await reference(db, blobs, data_dir)
    await db.close()
    if second.messages != args.messages + done["deliveries"] - done["expunges"]:
        print(f"snapshot: FAIL: second snapshot holds {second.messages} messages", file=sys.stderr)
        failed = True
    return 1 if failed else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=100_000, help="messages to load (100,000)")
    p.add_argument("--tenants", type=int, default=4, help="tenants they are spread over (4)")
    p.add_argument("--change", type=float, default=0.01, help="fraction changed before the second (0.01)")
    p.add_argument("--batch", type=int, default=5000, help="messages per load transaction (5000)")
    p.add_argument(
        "--database-url",
        default="",
        help="default: embedded SQLite; or postgresql+asyncpg://postgres@127.0.0.1:5432/SCRATCH_DB",
    )
    p.add_argument("--keep", type=Path, help="put the data here and leave it (default: a temp dir)")
    args = p.parse_args()
    if args.messages < 100 or args.tenants < 1 or args.batch < 1 or not 0 < args.change < 0.5:
        p.error("--messages >= 100, --tenants and --batch positive, 0 < --change < 0.5")
    if args.database_url and not args.database_url.startswith("postgresql+asyncpg://"):
        p.error("--database-url: only postgresql+asyncpg://... (SQLite is the default)")
    backend = "PostgreSQL" if args.database_url else "SQLite"
    print(f"snapshot: {args.messages:,} messages over {args.tenants} tenants, {backend}")
    try:
        dsn, name = admin_dsn(args.database_url) if args.database_url else ("", "")
        if dsn:
            asyncio.run(pg_admin(dsn, f"CREATE DATABASE {name}"))
        try:
            if args.keep:
                args.keep.mkdir(parents=True, exist_ok=False)
                return asyncio.run(run(args, args.keep / "var"))
            with tempfile.TemporaryDirectory(prefix="mailgate-bench-snapshot-") as tmp:
                status = asyncio.run(run(args, Path(tmp) / "var"))
                t0 = time.perf_counter()
                shutil.rmtree(Path(tmp) / "var")
                print(f"cleanup: {time.perf_counter() - t0:.1f} s")
                return status
        finally:
            if dsn:
                asyncio.run(pg_admin(dsn, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    except BenchError as exc:
        print(f"snapshot: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

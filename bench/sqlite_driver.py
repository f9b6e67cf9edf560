"""The SQLite driver under SQLAlchemy: aiosqlite against mailgate's own (``storage/sqlite_driver.py``).

Issue #16 asked for aiosqlite's thread hop to be measured against the
alternatives. Both drivers sit under the same ``storage.db.Database`` (the
same engines, pragmas, ``BEGIN IMMEDIATE`` and group commit); only the dialect
and the object that runs the statements differ: SQLAlchemy's aiosqlite dialect
hands every cursor, execute, fetch and close to aiosqlite's thread through its
async adapter; mailgate's (``sqlite+mailgate``) is the sqlite3 module under the
pysqlite dialect, statements on the loop and only ``BEGIN IMMEDIATE`` (when the
lock is taken), ``COMMIT``, opening and closing on a thread.

Each round, on a fresh migrated database per driver (the order alternates):

* **APPEND transactions**: what an IMAP APPEND commits, one at a time
  (``Database.grouped``: the folder, the quota check, ``mailstore.append`` of
  one message whose blob is already stored);
* **the same, 8 writers at once** (group commit shares their commits);
* **read transactions**: the folder and the flags of 20 messages, one at a time.

It prints transactions/s, the process's CPU per transaction (all threads), and
mailgate's driver over aiosqlite (> 1: mailgate's is faster). Checks: every
folder ends with the messages appended, and its counters agree. Exits 1 otherwise.

    .venv/bin/python bench/sqlite_driver.py [--transactions 1000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import quotas  # noqa: E402
from gateway.config import parse_config  # noqa: E402
from gateway.daemon import open_store  # noqa: E402
from gateway.ingest import describe  # noqa: E402
from gateway.message import parse_headers  # noqa: E402
from storage import mailstore, sqlite_driver  # noqa: E402
from storage.db import Database  # noqa: E402
from storage.models import Folder, Message  # noqa: E402
from tests.corpus import normal  # noqa: E402

TENANT = "bench"
WRITERS = 8
DRIVERS = ("aiosqlite", "mailgate")


def use_driver(name: str) -> None:
    """Make the next :class:`Database` open its SQLite engines with driver ``name``."""
    sqlite_driver.DRIVERNAME = f"sqlite+{name}"


def cpu() -> float:
    return time.process_time()


async def one_round(driver: str, n: int, tmp: Path) -> dict[str, tuple[float, float]]:
    """{phase: (seconds, CPU seconds)} for one driver on a fresh database."""
    use_driver(driver)
    data = tmp / driver
    config = parse_config(
        {
            "gateway": {"hostname": "bench.test", "data_dir": str(data)},
            "listen": {"smtp": "127.0.0.1:0"},
            "tenants": [{"id": TENANT, "domains": ["bench.test"]}],
        }
    )
    db, blobs = await open_store(config)
    try:
        now = datetime.now(UTC)
        messages = []
        for raw in normal(n * 2, size=5000, seed=len(driver)):
            messages.append(describe(raw, parse_headers(raw), await blobs.put(raw), now, frozenset()))
        async with db.write() as s:
            for name in ("One", "Many"):
                await mailstore.create_folder(s, TENANT, name)

        def appending(name: str, message: mailstore.NewMessage) -> Callable[[AsyncSession], Awaitable[Any]]:
            async def append(s: AsyncSession) -> Any:
                folder = await mailstore.require_folder(s, TENANT, name)
                await quotas.check(s, folder, message.size)
                return await mailstore.append(s, folder, [message])

            return append

        async def read(s: AsyncSession) -> int:
            folder = await mailstore.require_folder(s, TENANT, "One")
            rows = await s.execute(
                select(Message.uid, Message.sysflags, Message.keywords)
                .where(Message.folder_id == folder.id)
                .order_by(Message.uid.desc())
                .limit(20)
            )
            return len(rows.all())

        out: dict[str, tuple[float, float]] = {}
        t0, c0 = time.perf_counter(), cpu()
        for message in messages[:n]:
            await db.grouped(appending("One", message))
        out["APPEND transactions, one at a time"] = (time.perf_counter() - t0, cpu() - c0)

        async def writer(chunk: list[mailstore.NewMessage]) -> None:
            for message in chunk:
                await db.grouped(appending("Many", message))

        rest = messages[n:]
        t0, c0 = time.perf_counter(), cpu()
        await asyncio.gather(*(writer(rest[i::WRITERS]) for i in range(WRITERS)))
        out[f"APPEND transactions, {WRITERS} writers"] = (time.perf_counter() - t0, cpu() - c0)

        t0, c0 = time.perf_counter(), cpu()
        for _ in range(n):
            async with db.read() as s:
                await read(s)
        out["read transactions (folder + 20 flags)"] = (time.perf_counter() - t0, cpu() - c0)

        await verify(db, n)
        return out
    finally:
        await blobs.close()
        await db.close()


async def verify(db: Database, n: int) -> None:
    async with db.read() as s:
        for name in ("One", "Many"):
            folder = await mailstore.require_folder(s, TENANT, name)
            count, size = (
                await s.execute(
                    select(func.count(), func.coalesce(func.sum(Message.size), 0)).where(
                        Message.folder_id == folder.id
                    )
                )
            ).one()
            current = await s.get(Folder, folder.id)
            assert current is not None
            if count != n or (current.used_messages, current.used_bytes) != (count, size):
                raise SystemExit(
                    f"{name}: {count} messages (expected {n}), counters "
                    f"{current.used_messages}/{current.used_bytes} vs {count}/{size}"
                )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--transactions", type=int, default=1000, help="transactions per phase (1000)")
    p.add_argument("--repeat", type=int, default=3, help="rounds; the best of each is shown (3)")
    args = p.parse_args()
    best: dict[str, dict[str, tuple[float, float]]] = {d: {} for d in DRIVERS}
    with tempfile.TemporaryDirectory(prefix="mailgate-bench-sqlite-") as t:
        for r in range(args.repeat):
            for driver in DRIVERS if r % 2 == 0 else reversed(DRIVERS):
                tmp = Path(t) / f"round{r}"
                tmp.mkdir(exist_ok=True)
                for phase, (secs, cpus) in asyncio.run(one_round(driver, args.transactions, tmp)).items():
                    if phase not in best[driver] or secs < best[driver][phase][0]:
                        best[driver][phase] = (secs, cpus)
            print(f"round {r + 1}/{args.repeat} done", flush=True)
    n = args.transactions
    print(f"\n{n} transactions per phase, best of {args.repeat} rounds; CPU: the whole process, all threads")
    print(
        f"{'phase':42} {'aiosqlite tx/s':>14} {'CPU ms/tx':>9} {'mailgate tx/s':>14} {'CPU ms/tx':>9} ratio"
    )
    for phase in best["mailgate"]:
        a_s, a_c = best["aiosqlite"][phase]
        m_s, m_c = best["mailgate"][phase]
        rates = f"{n / a_s:14.0f} {a_c / n * 1000:9.2f} {n / m_s:14.0f} {m_c / n * 1000:9.2f}"
        print(f"{phase:42} {rates} {a_s / m_s:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

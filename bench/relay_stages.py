"""CPU per message by stage of the mail path, in one process (issue #16: why the rates are what they are).

bench/smtp_ingest.py and bench/relay.py time mailgate as a daemon: they give rates and the
daemon's CPU, not where it goes. This bench drives the stages directly, one after another,
on one in-process gateway (SQLite in a temporary directory, the tests' configuration: tenant
acme, agent anna) and prints each stage's CPU (this process, all threads), statements and
commits per message:

* **ingest**: ``Pipeline.deliver`` of N messages of ~4 KB to the tenant's INBOX, 8 at a
  time (relay-in's work after DATA: rules, dedupe key, blob, MIME structures, commit);
* **submission**: ``Outbox.submit`` of N replies by the agent, 8 at a time (limits, the blob,
  the Sent copy, the queue rows: all a submission does after DATA, without AUTH);
* **delivery**: the relay worker sending the N queued messages to Postfix ``smtp-sink``
  (claims, blob read, the SMTP conversation, the end-of-DATA mark, the outcome).

The SMTP protocol itself (aiosmtpd's commands, the DATA reader) is not in these figures.
Exits 1 if a submission is refused or the queue is not empty after the delivery stage.

    .venv/bin/python bench/relay_stages.py [--messages 300]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gateway.ingest import Delivery  # noqa: E402
from storage.db import Database  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.test_outbox_group_commit import identities  # noqa: E402
from tests.test_relay import CUSTOMER, SENDER, gateway_config, message, running  # noqa: E402

SMTP_SINK = "/usr/sbin/smtp-sink"
BODY = (b"x" * 72 + b"\r\n") * 55  # ~4 KB


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def stage(name: str, db: Database, n: int, work: Callable[[], Awaitable[None]]) -> None:
    statements, commits, used, started = (
        db.activity.statements,
        db.activity.commits,
        cpu(),
        time.perf_counter(),
    )
    await work()
    seconds = time.perf_counter() - started
    print(
        f"{name:<12} {1000 * (cpu() - used) / n:8.2f} {(db.activity.statements - statements) / n:11.1f}"
        f" {(db.activity.commits - commits) / n:8.2f} {n / seconds:7.0f}"
    )


async def run(n: int) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="relay-stages-"))
    port = free_port()
    sink = subprocess.Popen([SMTP_SINK, "-u", "nobody", f"127.0.0.1:{port}", "64"])
    try:
        deadline = time.monotonic() + 10
        while True:  # until smtp-sink listens (it exits if the port was taken meanwhile)
            if sink.poll() is not None or time.monotonic() > deadline:
                print(f"FAILED: smtp-sink did not listen on {port}")
                return 1
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        smtp = {"host": "127.0.0.1", "port": port, "security": "none", "from": SENDER}
        async with running(gateway_config(tmp, f"sqlite+aiosqlite:///{tmp / 'mailgate.db'}", smtp)) as g:
            anna = (await identities(g))["anna@acme.test"]
            eight = asyncio.Semaphore(8)

            async def ingest() -> None:
                async def one(i: int) -> None:
                    raw = message(f"<in{i}@example.org>", sender=CUSTOMER, to=SENDER, body=BODY)
                    async with eight:
                        await g.pipeline.deliver(
                            g.tenant(), raw, Delivery(source="smtp", recipients=(SENDER,))
                        )

                await asyncio.gather(*(one(i) for i in range(n)))

            refused: list[str] = []

            async def submission() -> None:
                async def one(i: int) -> None:
                    async with eight:
                        raw = message(f"<out{i}@acme.test>", body=BODY)
                        submitted = await g.outbox.submit(g.tenant(), anna, SENDER, [CUSTOMER], raw)
                    if submitted.queue_id is None:
                        refused.append(submitted.reply)

                await asyncio.gather(*(one(i) for i in range(n)))

            async def delivery() -> None:
                deadline = time.monotonic() + 300
                while await g.queued() and time.monotonic() < deadline:
                    await g.worker.run_once()
                    while g.worker._tasks:
                        await asyncio.gather(*list(g.worker._tasks), return_exceptions=True)

            print(f"relay_stages: {n} messages of {len(BODY)} body bytes, SQLite, 8 at a time")
            print("stage        CPU ms/msg  statements  commits   msg/s")
            await stage("ingest", g.db, n, ingest)
            await stage("submission", g.db, n, submission)
            await stage("delivery", g.db, n, delivery)
            left = len(await g.queued())
        if refused or left:
            print(f"FAILED: {len(refused)} submissions refused ({refused[:1]}), {left} left in the queue")
            return 1
        return 0
    finally:
        sink.terminate()
        sink.wait(10)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=300)
    args = p.parse_args()
    return asyncio.run(run(args.messages))


if __name__ == "__main__":
    raise SystemExit(main())

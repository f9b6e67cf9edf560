"""kill -9 under the SMTP intake benchmark's load (issue #16, Done 4): eight senders, each on its
own kept connection as ``smtp-source -d`` does, are cut off mid-stream by a kill -9; after a
restart every message is sent again that did not get its 250, and some that did (a 250 lost on
the wire). Every message is then stored exactly once: none lost, none twice."""

from __future__ import annotations

import asyncio
import signal
import smtplib
import threading
import time
from collections import Counter
from pathlib import Path

from sqlalchemy import select

from storage.db import Database
from storage.models import Message
from tests.conftest import free_port
from tests.daemon import Daemon, write_config

SENDERS = 8
PER_SENDER = 150  # 1200 messages in all; the kill comes after about a third of them
KILL_AFTER = 400
BODY = b"x" * 4000 + b"\r\n"


def message(n: int) -> bytes:
    return (
        b"From: Customer <customer@example.org>\r\nTo: biuro@acme.test\r\n"
        b"Subject: load %d\r\nMessage-ID: <load-%d@example.org>\r\n\r\n" % (n, n) + BODY
    )


def sender(
    port: int, numbers: list[int], acked: set[int], lock: threading.Lock, stop: threading.Event
) -> None:
    """Send ``numbers`` over one connection until done, cut off, or ``stop``; record each 250."""
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
            c.ehlo("client.test")
            for n in numbers:
                if stop.is_set():
                    return
                c.mail("customer@example.org")
                c.rcpt("biuro@acme.test")
                code, _ = c.data(message(n))
                if code == 250:
                    with lock:
                        acked.add(n)
    except (OSError, smtplib.SMTPException):
        return  # the daemon was killed under this connection


def stored_ids(db_url: str) -> Counter[str]:
    async def read() -> Counter[str]:
        db = Database(db_url)
        try:
            async with db.read() as s:
                rows = await s.scalars(select(Message.message_id).where(Message.tenant_id == "acme"))
                return Counter(r for r in rows if r is not None)
        finally:
            await db.close()

    return asyncio.run(read())


def test_kill_9_under_relay_in_load_loses_and_duplicates_nothing(tmp_path: Path, db_url: str) -> None:
    port = free_port()
    d = Daemon(write_config(tmp_path, db_url, port), port, tmp_path)
    total = SENDERS * PER_SENDER
    acked: set[int] = set()
    lock, stop = threading.Lock(), threading.Event()
    try:
        d.start()
        threads = [
            threading.Thread(target=sender, args=(port, list(range(i, total, SENDERS)), acked, lock, stop))
            for i in range(SENDERS)
        ]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120
        while len(acked) < KILL_AFTER and time.monotonic() < deadline and any(t.is_alive() for t in threads):
            time.sleep(0.01)
        d.signal(signal.SIGKILL)
        stop.set()
        for t in threads:
            t.join(30)
        before = set(acked)
        assert KILL_AFTER <= len(before) < total, len(before)
        # Every 250 given before the kill is on disk already.
        on_disk = stored_ids(db_url)
        assert {f"<load-{n}@example.org>" for n in before} <= set(on_disk)
        assert max(on_disk.values()) == 1

        d.start()
        again = sorted(set(range(total)) - before) + sorted(before)[:50]  # and 50 whose 250 was "lost"
        rest: set[int] = set()
        sender(port, again, rest, lock, threading.Event())
        assert rest == set(again)
        stored = stored_ids(db_url)
        assert set(stored) == {f"<load-{n}@example.org>" for n in range(total)}
        assert max(stored.values()) == 1, [k for k, v in stored.items() if v > 1][:5]
        assert d.signal(signal.SIGTERM) == 0
    finally:
        stop.set()
        d.stop()

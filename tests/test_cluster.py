"""Several instances on one PostgreSQL (issue #15): who may start, change notices across
instances (Done means 3), UIDs under concurrent writers, ``mailgate cluster status``.

Two ``mailgate run`` subprocesses (instances "a" and "b", blobs in PostgreSQL)
share one fresh database; IMAP sessions and SMTP clients talk to each over
loopback. The notice tests run on PostgreSQL only; on SQLite a second
instance is refused, whatever its id.
"""

from __future__ import annotations

import asyncio
import imaplib
import json
import re
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import text

from gateway import notify
from gateway.notify import Changes, ClusterNotices
from storage import instances
from storage.db import Database
from tests.conftest import free_port
from tests.daemon import Daemon, write_config
from tests.test_auth_cache import HASH, PASSWORD
from tests.test_imap_differential import read_response

pytestmark = pytest.mark.peers

POSTGRESQL_ONLY = "several instances run on PostgreSQL only; on SQLite a second one is refused (tested below)"


def message(n: int) -> bytes:
    return (
        f"From: Customer <c{n}@example.org>\r\nTo: biuro@acme.test\r\nSubject: question {n}\r\n"
        f"Message-ID: <cl{n}@example.org>\r\nDate: Mon, 1 Jan 2024 10:00:00 +0000\r\n\r\nBody {n}.\r\n"
    ).encode()


@dataclass
class Instance:
    """One ``mailgate run`` of the cluster: its id, daemon, IMAP port and metrics port (0: none)."""

    id: str
    daemon: Daemon
    imap_port: int
    metrics_port: int = 0

    @classmethod
    def configure(
        cls, root: Path, db_url: str, instance: str, blobs: str = "postgresql", metrics: bool = False
    ) -> Instance:
        """The file of tenant acme (agent anna) for ``instance``, with its own listeners, under ``root``;
        ``metrics``: a ``[listen] metrics`` listener too (bench/cluster_scale.py scrapes it)."""
        root.mkdir()
        smtp_port, imap_port = free_port(), free_port()
        metrics_port = free_port() if metrics else 0
        extra = f'\n[[tenants.agents]]\nlogin = "anna@acme.test"\npassword_hash = "{HASH}"\n'
        extra += f'\n[blobs]\nbackend = "{blobs}"\n'
        path = write_config(root, db_url, smtp_port, extra)
        body = path.read_text(encoding="utf-8")
        body = body.replace("[gateway]\n", f'[gateway]\ninstance = "{instance}"\n', 1)
        listen = f'imap = "127.0.0.1:{imap_port}"\n'
        if metrics_port:
            listen += f'metrics = "127.0.0.1:{metrics_port}"\n'
        body = body.replace("[listen]\n", f"[listen]\n{listen}", 1)
        path.write_text(body, encoding="utf-8")
        return cls(instance, Daemon(path, smtp_port, root), imap_port, metrics_port)

    def start(self) -> None:
        self.daemon.start()  # until SMTP listens; IMAP starts after it
        self.daemon.wait_for("the imap listener", self.imap_listening, 10)

    def imap_listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.imap_port), timeout=1).close()
        except OSError:
            return False
        return True

    def imap(self) -> imaplib.IMAP4:
        c = imaplib.IMAP4("127.0.0.1", self.imap_port, timeout=10)
        c.login("anna@acme.test", PASSWORD)
        return c

    def send(self, data: bytes) -> None:
        with smtplib.SMTP("127.0.0.1", self.daemon.port, timeout=10) as c:
            assert c.sendmail("customer@example.org", ["biuro@acme.test"], data) == {}

    def refused(self) -> subprocess.CompletedProcess[str]:
        """``mailgate run`` with this file, expected to exit at once (the timeout catches one that runs)."""
        return subprocess.run(
            [sys.executable, "-m", "gateway", "-c", str(self.daemon.config), "run"],
            cwd=self.daemon.cwd,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )


@pytest.fixture
def pg_url(db_url: str) -> str:
    if db_url.startswith("sqlite"):
        pytest.skip(POSTGRESQL_ONLY)
    return db_url


@pytest.fixture
def pair(tmp_path: Path, pg_url: str) -> Iterator[tuple[Instance, Instance]]:
    """Instances "a" and "b" on one fresh database, started together (they migrate it one at a time)."""
    a = Instance.configure(tmp_path / "a", pg_url, "a")
    b = Instance.configure(tmp_path / "b", pg_url, "b")
    try:
        with ThreadPoolExecutor(2) as pool:
            for started in [pool.submit(a.start), pool.submit(b.start)]:
                started.result()
        yield a, b
    finally:
        a.daemon.stop()
        b.daemon.stop()


def command(c: imaplib.IMAP4, tag: bytes, line: bytes) -> list[bytes]:
    """Send a tagged command; its response lines, the tagged one last."""
    c.send(tag + b" " + line + b"\r\n")
    return read_response(c, tag).splitlines()


def expect(c: imaplib.IMAP4, wanted: bytes, seconds: float) -> float:
    """Read untagged lines (during IDLE) until one contains ``wanted``; the seconds it took."""
    start = time.monotonic()
    c.sock.settimeout(seconds)
    try:
        while True:
            line = c.readline()
            assert line, "connection closed"
            if wanted in line:
                return time.monotonic() - start
    finally:
        c.sock.settimeout(10)


# --------------------------------------------------------------------------- Done means 3


def test_idle_on_one_instance_hears_exists_within_a_second_of_mail_relayed_in_through_another(
    pair: tuple[Instance, Instance],
) -> None:
    a, b = pair
    c = a.imap()
    try:
        assert c.select("INBOX") == ("OK", [b"0"])
        c.send(b"i IDLE\r\n")
        assert c.readline().startswith(b"+ ")
        latencies = []
        for n in (1, 2, 3):
            b.send(message(n))  # 250: committed on b
            sent = time.monotonic()
            expect(c, b"* %d EXISTS" % n, 5)
            latencies.append(time.monotonic() - sent)
        c.send(b"DONE\r\n")
        assert read_response(c, b"i").splitlines()[-1].startswith(b"i OK")
    finally:
        c.logout()
    assert max(latencies) < 1.0, latencies


def test_flag_set_and_expunge_made_on_one_instance_reach_the_next_noop_on_another(
    pair: tuple[Instance, Instance],
) -> None:
    a, b = pair
    for n in (1, 2):
        b.send(message(n))
    b.daemon.wait_for("two messages", lambda: b.daemon.folders("acme").get("INBOX") == 2, 10)
    on_a, on_b = a.imap(), b.imap()
    try:
        assert on_a.select("INBOX") == ("OK", [b"2"])
        assert on_b.select("INBOX")[0] == "OK"
        # a's index now holds the folder: only a notice from b can tell it of b's writes.
        assert command(on_a, b"n0", b"NOOP") == [b"n0 OK NOOP completed"]
        assert command(on_b, b"s1", rb"UID STORE 1 +FLAGS (\Flagged)")[-1].startswith(b"s1 OK")
        time.sleep(0.25)  # the notice's way: well under Done means' second
        answer = command(on_a, b"n1", b"NOOP")
        assert answer[0].startswith(b"* 1 FETCH ("), answer
        assert rb"\Flagged" in answer[0], answer
        assert command(on_b, b"s2", rb"UID STORE 2 +FLAGS (\Deleted)")[-1].startswith(b"s2 OK")
        assert command(on_b, b"e2", b"EXPUNGE")[-1].startswith(b"e2 OK")
        time.sleep(0.25)
        answer = command(on_a, b"n2", b"NOOP")
        assert b"* 2 EXPUNGE" in answer, answer
        # a's own write after b's is taken as its own without hiding b's (MODSEQ order).
        assert command(on_b, b"s3", rb"UID STORE 1 +FLAGS (\Answered)")[-1].startswith(b"s3 OK")
        mine = command(on_a, b"s4", rb"UID STORE 1 +FLAGS (\Seen)")
        assert mine[-1].startswith(b"s4 OK"), mine
        time.sleep(0.25)
        flags = command(on_a, b"f4", b"UID FETCH 1 (FLAGS)")
        for flag in (rb"\Answered", rb"\Seen", rb"\Flagged"):
            assert flag in flags[0], flags
    finally:
        on_a.logout()
        on_b.logout()


APPENDS = 500  # per instance
CONNECTIONS = 4  # per instance


def test_two_instances_appending_to_one_folder_give_distinct_strictly_ascending_uids(
    pair: tuple[Instance, Instance],
) -> None:
    a, b = pair
    done = threading.Event()

    def appender(instance: Instance, worker: int) -> list[int]:
        c = instance.imap()
        uids = []
        try:
            for n in range(APPENDS // CONNECTIONS):
                typ, data = c.append("INBOX", None, None, message(worker * 10_000 + n))
                assert typ == "OK", data
                m = re.search(rb"\[APPENDUID \d+ (\d+)\]", data[0])
                assert m is not None, data
                uids.append(int(m.group(1)))
        finally:
            c.logout()
        return uids

    def observer() -> list[int]:
        """UIDs in the order a session on a sees them appear: each new one above all seen before."""
        c = a.imap()
        seen: list[int] = []
        try:
            c.select("INBOX")
            deadline = None  # once the appends are done: a second for the last notices to come
            for _ in range(10_000):  # bounded; the appends end long before
                typ, data = c.uid("SEARCH", "ALL")
                assert typ == "OK"
                new = sorted(set(map(int, data[0].split())) - set(seen))
                assert not new or not seen or new[0] > seen[-1], (seen[-5:], new[:5])
                seen += new
                if done.is_set():
                    deadline = deadline or time.monotonic() + 1.0
                    if len(seen) == 2 * APPENDS or time.monotonic() > deadline:
                        break
        finally:
            c.logout()
        return seen

    with ThreadPoolExecutor(2 * CONNECTIONS + 1) as pool:
        watching = pool.submit(observer)
        workers = [
            pool.submit(appender, instance, i * CONNECTIONS + k)
            for i, instance in enumerate((a, b))
            for k in range(CONNECTIONS)
        ]
        per_connection = [w.result(timeout=300) for w in workers]
        done.set()
        seen = watching.result(timeout=60)
    for uids in per_connection:
        assert uids == sorted(set(uids)), "a connection's UIDs ascend"
    every = [u for uids in per_connection for u in uids]
    assert len(set(every)) == len(every) == 2 * APPENDS
    assert seen == sorted(every)  # every UID, seen in ascending order
    c = b.imap()
    try:
        c.select("INBOX")
        typ, data = c.uid("FETCH", "1:*", "(MODSEQ)")
        assert typ == "OK"
    finally:
        c.logout()
    pairs = sorted(
        (int(m.group(1)), int(m.group(2)))
        for m in (re.search(rb"UID (\d+) MODSEQ \((\d+)\)", d) for d in data if isinstance(d, bytes))
        if m is not None
    )
    assert [u for u, _ in pairs] == sorted(every)
    modseqs = [m for _, m in pairs]
    assert modseqs == sorted(set(modseqs)), "one MODSEQ per APPEND, in the UIDs' order"


# --------------------------------------------------------------------------- who may start


def test_a_second_process_with_a_running_instance_id_is_refused(
    pair: tuple[Instance, Instance], tmp_path: Path, pg_url: str
) -> None:
    a, b = pair
    again = Instance.configure(tmp_path / "a-again", pg_url, "a")
    refused = again.refused()
    assert refused.returncode == 1, refused.stderr
    assert a.daemon.proc is not None
    assert f'the database is in use by instance "a" (pid {a.daemon.proc.pid} on host ' in refused.stderr
    assert "give this one another [gateway] instance" in refused.stderr
    assert a.daemon.proc.poll() is None  # both run on
    assert b.daemon.proc is not None
    assert b.daemon.proc.poll() is None


def test_sqlite_refuses_a_second_instance_whatever_its_id(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'mailgate.db'}"
    first = Instance.configure(tmp_path / "first", url, "first", blobs="fs")
    second = Instance.configure(tmp_path / "second", url, "second", blobs="fs")
    first.start()
    try:
        refused = second.refused()
        assert refused.returncode == 1, refused.stderr
        assert 'the database is in use by instance "first" (pid ' in refused.stderr
        assert "only one instance may run against a database on SQLite" in refused.stderr
        assert "run several on PostgreSQL (docs/scaling.md)" in refused.stderr
        assert first.daemon.proc is not None
        assert first.daemon.proc.poll() is None
    finally:
        first.daemon.stop()


def test_cluster_status_lists_both_instances_alive_and_a_killed_one_dead_after_the_ttl(
    pair: tuple[Instance, Instance], pg_url: str
) -> None:
    a, b = pair
    rows = json.loads(a.daemon.cli("cluster", "status", "--format", "json"))
    assert [r["id"] for r in rows] == ["a", "b"]
    for row, instance in zip(rows, pair, strict=True):
        assert instance.daemon.proc is not None
        assert row["pid"] == instance.daemon.proc.pid
        assert row["alive"] is True
        assert row["relay_claims"] == 0  # nothing queued
        assert row["upstream_leases"] == 0  # no mailboxes
        assert set(row) == {
            "id",
            "host",
            "pid",
            "started",
            "heartbeat",
            "alive",
            "relay_claims",
            "upstream_leases",
        }
    table = a.daemon.cli("cluster", "status")
    assert table.splitlines()[0].split() == [
        "ID", "HOST", "PID", "STARTED", "HEARTBEAT", "ALIVE", "RELAY_CLAIMS", "UPSTREAM_LEASES"
    ]  # fmt: skip

    assert b.daemon.signal(signal.SIGKILL) == -signal.SIGKILL  # its row stays; it beats no more

    async def alive_at(seconds_after_b_beat: float) -> dict[str, bool]:
        db = Database(pg_url)
        try:
            async with db.read() as s:
                row = await instances.holder(db, "b")
                assert row is not None
                at = row.heartbeat_at + timedelta(seconds=seconds_after_b_beat)
                return {m.row.id: m.alive for m in await instances.cluster(s, at) if m.row.id == "b"}
        finally:
            await db.close()

    ttl = instances.TTL.total_seconds()
    assert asyncio.run(alive_at(ttl - 1)) == {"b": True}
    assert asyncio.run(alive_at(ttl)) == {"b": False}
    assert a.daemon.signal(signal.SIGTERM) == 0  # a clean stop deletes its row
    rows = json.loads(b.daemon.cli("cluster", "status", "--format", "json"))
    assert [r["id"] for r in rows] == ["b"]


# --------------------------------------------------------------------------- the notice carrier


def test_notice_payloads_stay_under_postgresql_limit_and_name_every_folder() -> None:
    ids = set(range(1, 5000)) | {2**40, 2**62}
    parts = notify.payloads(ids)
    assert len(parts) > 1
    assert all(len(p.encode()) <= notify.PAYLOAD_LIMIT < 8000 for p in parts)
    assert set().union(*(notify.parse(p) or set() for p in parts)) == ids
    assert notify.parse(notify.EVERYTHING) is None
    assert notify.parse("1,x") is None


async def test_notices_cross_instances_skip_their_sender_and_survive_a_dropped_connection(
    pg_url: str,
) -> None:
    """Two carriers on one database: a notice published on one reaches the other's listeners
    (not its own twice); after the server drops a connection it listens again, tells its process
    that anything may have changed, and sends what was published meanwhile."""
    heard: dict[str, list[set[int] | None]] = {"one": [], "two": []}
    carriers, tasks = {}, []
    for name in heard:
        changes = Changes()
        changes.subscribe(heard[name].append)
        carriers[name] = ClusterNotices(pg_url, changes)
        tasks.append(asyncio.create_task(carriers[name].run()))

    async def until(what: str, check: object, seconds: float = 5.0) -> None:
        deadline = time.monotonic() + seconds
        while not check():  # type: ignore[operator]
            assert time.monotonic() < deadline, f"{what}: {heard}"
            await asyncio.sleep(0.01)

    db = Database(pg_url)
    try:
        await until("both listening", lambda: all(c.backend for c in carriers.values()))
        await until("the first look", lambda: heard["one"] and heard["two"])
        for name in heard:
            assert heard[name] == [None]  # on listening: anything may have changed
            heard[name].clear()
        carriers["one"].changes.publish([7, 8])
        await until("the notice", lambda: heard["two"])
        assert heard["two"] == [{7, 8}]
        await asyncio.sleep(0.2)
        assert heard["one"] == [{7, 8}]  # delivered at publish; the echo from the server is dropped

        dropped = carriers["two"].backend
        heard["two"].clear()
        async with db.write() as s:
            await s.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": dropped})
        carriers["two"].changes.publish([9])  # while (or just before) the drop is noticed
        await until("two listening again", lambda: None in heard["two"])
        assert carriers["two"].backend not in (None, dropped)
        assert heard["two"] == [{9}, None]  # its own at once; then, listening again, anything
        await until("the notice published meanwhile", lambda: {9} in heard["one"])
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await db.close()


async def test_mailgate_migrate_waits_for_the_cluster_start_up_lock(tmp_path: Path, pg_url: str) -> None:
    """Regression: ``mailgate migrate`` migrated at once even while an instance was migrating."""
    node = Instance.configure(tmp_path / "m", pg_url, "m")
    db = Database(pg_url)
    try:
        async with db.writer.connect() as holder:  # an instance starting: it holds the lock
            await holder.execute(text("SELECT pg_advisory_lock(:key)"), {"key": instances.STARTUP_KEY})
            migrate = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway", "-c", str(node.daemon.config), "migrate",
                cwd=node.daemon.cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )  # fmt: skip
            try:
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(migrate.wait()), 3)
            finally:
                await holder.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": instances.STARTUP_KEY})
            out, err = await asyncio.wait_for(migrate.communicate(), 60)
        assert migrate.returncode == 0, err.decode()
        assert b"database schema is up to date" in out
    finally:
        await db.close()

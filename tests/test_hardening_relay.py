"""Issue #10, defects 2 and 3: a relay failure is never a delivery; one instance per database.

Peers: Postfix ``smtp-sink`` (it answers AUTH with ``250``, not ``235``), the
``tests.smarthost`` aiosmtpd server with replaced answers, and ``mailgate
run`` itself as a subprocess for the single-instance lock, on SQLite and
PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import smtplib
import subprocess
import sys
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.config import Config, parse_config
from gateway.daemon import open_store
from gateway.metrics import REGISTRY
from gateway.relay import worker
from gateway.relay.worker import RelayWorker
from storage import queue
from storage.db import Database
from storage.models import Outbound
from tests.conftest import Sink, config_dict, free_port
from tests.daemon import Daemon, write_config
from tests.smarthost import Slow, Smarthost
from tests.test_relay import (
    CUSTOMER,
    HASH,
    PASSWORD,
    RELAY_ENV,
    RELAY_PASSWORD,
    SENDER,
    gateway_config,
    message,
    queue_one,
    relay_settings,
    running,
)

pytestmark = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning")


def relay_metric(result: str, tenant: str = "acme") -> float:
    value = REGISTRY.get_sample_value("mailgate_relay_messages_total", {"tenant": tenant, "result": result})
    return value or 0.0


# ------------------------------------------------------------------ defect 2: a failure is never "sent"


@pytest.mark.peers
def test_auth_answered_250_is_not_sent(tmp_path: Path, sink: Sink) -> None:
    """smtp-sink answers AUTH with 250: the message stays queued, named, and nothing counts as sent."""
    sink.start()
    port, metrics_port = free_port(), free_port()
    config = tmp_path / "mailgate.toml"
    config.write_text(
        f"""
[gateway]
hostname = "mx.test"
data_dir = "{tmp_path / "var"}"

[listen]
smtp = ""
submission = "127.0.0.1:{port}"
metrics = "127.0.0.1:{metrics_port}"

[[tenants]]
id = "acme"
domains = ["acme.test"]

[tenants.smtp]
host = "127.0.0.1"
port = {sink.port}
from = "{SENDER}"
username = "{SENDER}"
password_env = "{RELAY_ENV}"

[[tenants.agents]]
login = "anna@acme.test"
password_hash = "{HASH}"
""",
        encoding="utf-8",
    )
    daemon = Daemon(config, port, tmp_path, env={RELAY_ENV: RELAY_PASSWORD})
    daemon.start()
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as c:
            c.login("anna@acme.test", PASSWORD)
            assert c.sendmail(SENDER, [CUSTOMER], message("<auth-250@acme.test>")) == {}

        def queued() -> list[dict[str, Any]]:
            rows: list[dict[str, Any]] = json.loads(daemon.cli("queue", "list", "--format", "json"))
            return rows

        daemon.wait_for("an attempt", lambda: [r["attempts"] for r in queued()] != [0], 30)
        rows = queued()
        assert len(rows) == 1, "the message left the queue as if it had been sent"
        (row,) = rows
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            exposition = r.read().decode()
        assert daemon.signal(signal.SIGTERM) == 0
    finally:
        daemon.stop()
    assert row["recipients"] == f"{CUSTOMER}(pending)"
    assert row["last_error"].startswith("AUTH answered 250 2.0.0 Ok: expected 235"), row["last_error"]
    assert sink.captured() == []
    assert 'mailgate_relay_messages_total{result="sent",tenant="acme"} 0.0' in exposition
    assert 'mailgate_relay_messages_total{result="deferred",tenant="acme"} 0.0' not in exposition
    attempts = [
        e for e in map(json.loads, daemon.log.read_text().splitlines()) if e.get("event") == "relay.attempt"
    ]
    assert attempts
    assert all(e["sent"] == 0 and not e["done"] for e in attempts), attempts
    assert "AUTH answered 250" in attempts[0]["error"]


@pytest.mark.parametrize(
    ("stage", "answer"),
    [
        ("AUTH", "250 2.0.0 Ok"),
        ("MAIL", "251 2.1.0 fine, I suppose"),
        ("RCPT", "252 2.1.5 cannot verify"),
        ("DATA", "251 2.0.0 kept, oddly"),  # the end of DATA: only 250 completes a transaction
    ],
)
async def test_a_2xx_before_the_transaction_completed_is_never_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str, answer: str
) -> None:
    monkeypatch.setenv(RELAY_ENV, RELAY_PASSWORD)
    host = Smarthost(username=SENDER, password=RELAY_PASSWORD)
    if stage == "DATA":
        host.reply = answer
    else:
        host.answers[stage] = answer
    await host.start()
    sent_before, deferred_before = relay_metric("sent"), relay_metric("deferred")
    try:
        config = gateway_config(
            tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'mailgate.db'}", relay_settings(host, tmp_path)
        )
        async with running(config) as g:
            await queue_one(g)
            await g.relay()
            ((row, rcpts),) = await g.queued()
    finally:
        await host.stop()
    state, reply = rcpts[CUSTOMER]
    assert state == "pending"
    assert reply is not None
    assert reply.startswith(f"451 4.4.1 {stage} answered {answer}: expected "), reply
    assert row.last_error is not None
    assert reply.endswith(row.last_error), row.last_error  # `queue list` names it too
    assert relay_metric("sent") == sent_before
    assert relay_metric("deferred") == deferred_before + 1


# ------------------------------------------------------------- defect 3: one instance, claimed messages


def test_second_instance_refuses_to_start(tmp_path: Path, db_url: str) -> None:
    # The same database, different listeners: only the database's lock can stop the second.
    port, other_port = free_port(), free_port()
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    first = write_config(tmp_path / "first", db_url, port)
    second = write_config(tmp_path / "second", db_url, other_port)
    daemon = Daemon(first, port, first.parent)
    other = Daemon(second, other_port, second.parent)
    daemon.start()
    try:
        assert daemon.proc is not None
        # The timeout only keeps a second daemon that wrongly starts from hanging the test.
        refused = subprocess.run(
            [sys.executable, "-m", "gateway", "-c", str(second), "run"],
            cwd=second.parent,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert refused.returncode == 1, refused.stderr
        host = os.uname().nodename  # gateway.instance defaults to it
        named = f'the database is in use by instance "{host}" (pid {daemon.proc.pid} on host {host}, started '
        assert named in refused.stderr
        assert "only one instance may run against a database" in refused.stderr
        assert daemon.proc.poll() is None  # the first runs on

        # A holder killed with -9 leaves no lock behind: the next instance starts.
        assert daemon.signal(signal.SIGKILL) == -signal.SIGKILL
        other.start()
        assert other.signal(signal.SIGTERM) == 0
    finally:
        daemon.stop()
        other.stop()


def with_instance(config: Config, instance: str) -> Config:
    return config.model_copy(update={"gateway": config.gateway.model_copy(update={"instance": instance})})


@pytest.mark.peers
async def test_queue_claim_is_exclusive(tmp_path: Path, db_url: str, sink: Sink) -> None:
    """Two instances' relay workers on one database: every message is delivered once."""
    sink.start()
    settings = {"host": "127.0.0.1", "port": sink.port, "from": SENDER}
    one = with_instance(gateway_config(tmp_path, db_url, settings), "w1")
    two = with_instance(one, "w2")
    async with running(one) as g:
        for i in range(40):
            await queue_one(g, f"<claim-{i}@acme.test>")
        other_db = Database(db_url)  # a second instance has its own connections
        other = RelayWorker(lambda: two, other_db, g.blobs, g.pipeline)
        try:
            for _ in range(100):
                if not await g.queued():
                    break
                await asyncio.gather(g.worker.run_once(), other.run_once())
                await asyncio.gather(g.worker.drain(), other.drain())
            assert await g.queued() == []
        finally:
            await other_db.close()
    ids = sink.message_ids()
    assert set(ids) == {f"<claim-{i}@acme.test>" for i in range(40)}
    assert ids.most_common(1)[0][1] == 1, [m for m, n in ids.items() if n > 1]


async def test_a_tenants_concurrency_holds_across_instances(tmp_path: Path, db_url: str) -> None:
    """Two instances' workers, queue.concurrency = 2: the smarthost never has three of the tenant's
    messages at once (each instance counted only its own, so the cluster sent up to twice as many)."""
    slow = await Slow(delay=0.3).start()
    data = config_dict(tmp_path, db_url)
    data["tenants"][0]["smtp"] = {"host": "127.0.0.1", "port": slow.port, "from": SENDER}
    data["queue"] = {"retry": ["1s"], "concurrency": 2}
    one = with_instance(parse_config(data), "w1")
    two = with_instance(one, "w2")
    try:
        async with running(one) as g:
            for i in range(12):
                await queue_one(g, f"<room-{i}@acme.test>")
            other_db = Database(db_url)
            other = RelayWorker(lambda: two, other_db, g.blobs, g.pipeline)
            try:
                for _ in range(400):  # each pass of both claims what the room allows, until done
                    if not await g.queued():
                        break
                    await asyncio.gather(g.worker.run_once(), other.run_once())
                    await asyncio.sleep(0.05)
                await asyncio.gather(g.worker.drain(), other.drain())
                assert await g.queued() == []
            finally:
                await other_db.close()
    finally:
        await slow.stop()
    assert len(slow.received) == 12
    assert slow.peak == 2, slow.peak
    assert max(slow.most.values()) == 1


CLAIM_ARGS: dict[str, Any] = {"claim_for": worker.CLAIM, "concurrency": {"acme": 10}}


async def claimed_by_dead(db: Database, now: datetime) -> tuple[Outbound, queue.Queued]:
    """A message queued at ``now`` and claimed by instance "dead"."""
    async with db.write() as s:
        row = await queue.enqueue(
            s, tenant_id="acme", mail_from=SENDER, recipients=[CUSTOMER], blob="x", size=1, now=now
        )
    async with db.write() as s:
        (taken,) = await queue.due(s, now, instance="dead", **CLAIM_ARGS)
    return row, taken


async def test_a_message_whose_holder_died_after_the_end_of_data_is_held_not_resent(
    tmp_path: Path, db_url: str
) -> None:
    """Regression for the duplicates of a kill -9 (tests/test_cluster_relay.py): the server may have
    a message whose end of DATA went out unrecorded, so only the operator sends it again."""
    db, _ = await open_store(parse_config(config_dict(tmp_path, db_url)))
    now = datetime.now(UTC)
    claim = CLAIM_ARGS
    try:
        row, taken = await claimed_by_dead(db, now)
        async with db.write() as s:
            with pytest.raises(queue.ClaimLost):  # only the holder may end the DATA
                await queue.ending(s, taken.row, "live", now)
        async with db.write() as s:
            await queue.ending(s, taken.row, "dead", now)
            assert not queue.uncertain(await s.get_one(Outbound, row.id), now)  # its holder may live
        later = now + worker.CLAIM
        async with db.write() as s:
            assert await queue.due(s, later, instance="live", **claim) == []  # the claim ran out
            assert await queue.release(s, "dead") == 1  # "dead" starting again
            assert await queue.due(s, later, instance="dead", **claim) == []
        async with db.read() as s:
            assert queue.uncertain(await s.get_one(Outbound, row.id), later)
        async with db.write() as s:
            assert await queue.retry_now(s, row.queue_id or "", later)  # the operator's decision
        async with db.write() as s:
            (again,) = await queue.due(s, later, instance="live", **claim)
        assert again.row.id == row.id
        assert again.row.ended_at is None
    finally:
        await db.close()


@pytest.mark.parametrize(
    ("data", "wire"),
    [
        (b"a\r\nb\r\n", b"a\r\nb\r\n"),
        (b"a\nb", b"a\r\nb\r\n"),
        (b"a\rb\r\n", b"a\r\nb\r\n"),
        (b".\r\n", b"..\r\n"),
        (b"x\r\n.hidden\r\n..\r\n", b"x\r\n..hidden\r\n...\r\n"),
        (b"", b"\r\n"),
    ],
)
def test_dot_stuffed_makes_crlf_lines_and_doubles_leading_dots(data: bytes, wire: bytes) -> None:
    assert worker.dot_stuffed(data) == wire


@given(st.binary(max_size=300))
def test_dot_stuffed_never_ends_the_data_early_and_unstuffs_to_the_crlf_message(data: bytes) -> None:
    wire = worker.dot_stuffed(data)
    lines = wire.split(b"\r\n")
    assert lines[-1] == b""
    assert all(line != b"." for line in lines)
    unstuffed = b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)
    normal = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    assert unstuffed == (normal if normal.endswith(b"\r\n") else normal + b"\r\n")


async def test_an_expired_claim_is_taken_over(tmp_path: Path, db_url: str) -> None:
    db, _ = await open_store(parse_config(config_dict(tmp_path, db_url)))
    now = datetime.now(UTC)
    claim = CLAIM_ARGS
    try:
        row, taken = await claimed_by_dead(db, now)
        assert (taken.row.id, taken.row.claimed_by, taken.pending) == (row.id, "dead", (CUSTOMER,))
        async with db.write() as s:
            assert await queue.due(s, now + worker.CLAIM / 2, instance="live", **claim) == []
        async with db.write() as s:  # its holder never recorded an attempt: the claim ran out
            (again,) = await queue.due(s, now + worker.CLAIM, instance="live", **claim)
        assert again.row.claimed_by == "live"
        async with db.write() as s:
            await queue.record(
                s,
                again.row,
                {CUSTOMER: ("deferred", "451 later")},
                pending=(CUSTOMER,),
                error="451 later",
                next_attempt_at=now,
                at=now,
                smarthost="127.0.0.1:25",
            )
        async with db.write() as s:  # recorded: the claim ended and the message is anyone's
            (third,) = await queue.due(s, now, instance="dead", **claim)
            assert third.row.id == row.id
            assert await queue.release(s, "dead") == 1  # what "dead" does when it starts again
        async with db.write() as s:
            assert len(await queue.due(s, now, instance="live", **claim)) == 1
    finally:
        await db.close()

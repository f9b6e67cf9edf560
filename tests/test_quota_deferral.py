"""Issue #11: quota deferral announces itself.

Defects: mail that waited for room was invisible (one notice saying the
mailbox "will" defer, no alert, only ``mailgate mailboxes``); one big waiting
upstream message held back every smaller one behind it; quota notices named
the current percentage and several thresholds crossed within a minute gave
one notice.

Relay-in is real SMTP (our RelayServer, or the daemon), upstream is a real
Dovecot, and the alert rules run in ``promtool`` on series taken from a real
daemon's scrape.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import json
import smtplib
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from gateway.config import Config, parse_config
from gateway.daemon import open_store
from gateway.ingest import Delivery, Pipeline
from gateway.metrics import DatabaseCollector
from gateway.pull.puller import FolderPuller, HostLimits, jobs
from gateway.scheduler import Scheduler
from gateway.smtp.server import RelayServer
from storage import mailstore
from storage.blobs import BlobStore
from storage.db import Database
from storage.models import Message, QuotaDeferral, UpstreamFolder, UpstreamWaiting
from tests import corpus
from tests.conftest import REPO, config_dict, free_port, peer
from tests.daemon import Daemon, write_config
from tests.dovecot import Dovecot
from tests.test_pull_daemon import mailbox_toml

PASSWORD = "upstream-secret"
ALERTS = REPO / "config" / "prometheus" / "mailgate-alerts.yml"
WAITING = "Mail is waiting: the mailbox is full"
pytestmark = pytest.mark.peers


def mail(n: int, size: int, subject: str = "hello") -> bytes:
    """A message of about ``size`` bytes (at least the header)."""
    head = (
        f"From: c{n}@example.org\r\nTo: biuro@acme.test\r\nSubject: {subject} {n}\r\nMessage-ID: <d{n}@x>\r\n"
    )
    return (head + "\r\n").encode() + b"".join(b"x" * 76 + b"\r\n" for _ in range(size // 78)) + b"\r\n"


class Env:
    """A tenant ``acme`` with a quota: pipeline, scheduler, metrics collector, puller of Dovecot's biuro."""

    def __init__(self, config: Config, db: Database, blobs: BlobStore) -> None:
        self.config, self.db, self.blobs = config, db, blobs
        self.pipeline = Pipeline(db, blobs)
        self.scheduler = Scheduler(lambda: config, db, blobs, self.pipeline)
        self.collector = DatabaseCollector(lambda: config, db)

    async def fill(self, raw: bytes, *, system: bool = False) -> None:
        await self.pipeline.deliver(self.config.tenant("acme"), raw, Delivery(source="smtp", system=system))

    async def pull(self) -> int:
        (job,) = [j for j in jobs(self.config) if j.folder == "INBOX"]
        puller = FolderPuller(job, lambda: self.config, self.pipeline, self.db, HostLimits())
        client = await puller.connect()
        try:
            return await puller.sync(client)
        finally:
            await client.logout()

    async def subjects(self, folder: str = "INBOX") -> list[str]:
        async with self.db.read() as s:
            f = await mailstore.require_folder(s, "acme", folder)
            rows = await s.scalars(
                select(Message.subject).where(Message.folder_id == f.id).order_by(Message.uid)
            )
            return [r or "" for r in rows]

    async def notices(self, subject: str) -> list[email.message.Message]:
        async with self.db.read() as s:
            blobs = (await s.scalars(select(Message.blob).where(Message.subject == subject))).all()
        return [email.message_from_bytes(await self.blobs.get(b)) for b in blobs]

    async def gauge(self) -> dict[str, float]:
        """``mailgate_quota_deferred_messages`` of acme by source, as a scrape shows it."""
        await self.collector.refresh()
        registry = CollectorRegistry()
        registry.register(self.collector)
        out = {}
        for family in text_string_to_metric_families(generate_latest(registry).decode()):
            if family.name == "mailgate_quota_deferred_messages":
                out = {s.labels["source"]: s.value for s in family.samples if s.labels["tenant"] == "acme"}
        return out

    async def waiting(self) -> list[tuple[int, int]]:
        async with self.db.read() as s:
            rows = await s.scalars(select(UpstreamWaiting).order_by(UpstreamWaiting.uid))
            return [(r.uid, r.size) for r in rows]

    async def free(self, folder: str = "INBOX", *, larger_than: int = 0) -> None:
        """An agent deletes big mail."""
        async with self.db.write() as s:
            f = await mailstore.require_folder(s, "acme", folder)
            big = (
                await s.scalars(
                    select(Message.uid).where(Message.folder_id == f.id, Message.size > larger_than)
                )
            ).all()
            await mailstore.expunge(s, f, list(big))


@pytest.fixture
async def env(
    tmp_path: Path, db_url: str, dovecot: Dovecot, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Any]:
    monkeypatch.setenv("MAILGATE_TEST_UPSTREAM", PASSWORD)
    dovecot.add_user("biuro", PASSWORD)
    opened: list[Env] = []

    async def make(quota: str) -> Env:
        box = dovecot.mailbox("biuro", folders={"INBOX": "INBOX"}, after_fetch="delete")
        config = parse_config(config_dict(tmp_path, db_url, quota=quota, rules=[], mailboxes=[box]))
        db, blobs = await open_store(config)
        opened.append(Env(config, db, blobs))
        return opened[-1]

    yield make
    for e in opened:
        await e.db.close()


def smtp_send(port: int, raw: bytes) -> int:
    """One relay-in delivery; the final reply code."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        c.ehlo("sender.example.org")
        c.mail("c@example.org")
        c.rcpt("biuro@acme.test")
        code, _ = c.data(raw)
        return code


async def test_deferral_announces_itself_once_smtp_and_pull(env: Any, dovecot: Dovecot) -> None:
    e: Env = await env("1 MB")
    relay = RelayServer(lambda: e.config, e.pipeline)
    await relay.start("127.0.0.1", 0)
    try:
        assert await asyncio.to_thread(smtp_send, relay.port, mail(1, 840_000)) == 250  # 84 %
        big = mail(2, 300_000)
        # The next message does not fit at 84 %: 452, twice (the sender's retry counts again).
        assert await asyncio.to_thread(smtp_send, relay.port, big) == 452
        assert await asyncio.to_thread(smtp_send, relay.port, big) == 452
        dovecot.deliver_files("biuro", "INBOX", corpus.normal(1, size=250_000, seed=11))
        assert await e.pull() == 0  # waits upstream
        assert dovecot.exists("biuro") == 1

        assert await e.scheduler.quota_deferrals() == 1
        assert await e.scheduler.quota_deferrals() == 0  # one notice per episode
        assert await e.gauge() == {"smtp": 2, "imap": 1}
        (notice,) = await e.notices(WAITING)
        body = notice.get_payload()
        assert isinstance(body, str)
        assert "from the upstream mailboxes: 1 message(s)" in body
        assert "from other mail servers (SMTP): 2 delivery attempt(s)" in body
        assert "To free space" in body
        assert "Spam does not count" in body
        # More mail waiting in the same episode announces nothing new.
        dovecot.deliver_files("biuro", "INBOX", corpus.normal(1, size=250_000, seed=12))
        assert await e.pull() == 0
        assert await e.gauge() == {"smtp": 2, "imap": 2}
        assert await e.scheduler.quota_deferrals() == 0

        # Space is freed: the pulled mail comes in, the sender's retry is accepted, the gauge is 0.
        await e.free(larger_than=500_000)
        assert await e.pull() == 2
        assert dovecot.exists("biuro") == 0  # after_fetch = delete, now that they are stored
        assert await asyncio.to_thread(smtp_send, relay.port, big) == 250
        assert await e.gauge() == {"smtp": 0, "imap": 0}
        async with e.db.read() as s:
            assert await s.scalar(select(func.count()).select_from(QuotaDeferral)) == 0
        assert len(await e.notices(WAITING)) == 1
    finally:
        await relay.stop()


async def test_smtp_deferral_ends_when_there_is_room_even_if_the_sender_gave_up(env: Any) -> None:
    e: Env = await env("1 MB")
    relay = RelayServer(lambda: e.config, e.pipeline)
    await relay.start("127.0.0.1", 0)
    try:
        assert await asyncio.to_thread(smtp_send, relay.port, mail(1, 840_000)) == 250
        assert await asyncio.to_thread(smtp_send, relay.port, mail(2, 300_000)) == 452
        # A small message still fits: it does not end the deferral of the big one.
        assert await asyncio.to_thread(smtp_send, relay.port, mail(3, 1_000)) == 250
        await e.scheduler.quota_deferrals()
        assert await e.gauge() == {"smtp": 1, "imap": 0}
        await e.free(larger_than=500_000)
        assert await e.scheduler.quota_deferrals() == 0  # ended (room), not announced again
        assert await e.gauge() == {"smtp": 0, "imap": 0}
    finally:
        await relay.stop()


async def test_waiting_large_message_does_not_block_smaller_ones(env: Any, dovecot: Dovecot) -> None:
    e: Env = await env("10 MB")
    await e.fill(mail(1, 8_400_000))  # 84 %
    five_mb = corpus.normal(1, size=5_000_000, seed=21)
    small = corpus.normal(20, size=20_000, seed=22)
    dovecot.deliver_files("biuro", "INBOX", five_mb + small)

    assert await e.pull() == 20
    assert len(await e.subjects()) == 21  # the filler and the 20
    assert [uid for uid, _ in await e.waiting()] == [1]
    assert dovecot.exists("biuro") == 1  # the big one stays upstream, untouched (after_fetch = delete)
    assert await e.gauge() == {"smtp": 0, "imap": 1}
    async with e.db.read() as s:
        state = await s.get(UpstreamFolder, ("acme", "biuro", "INBOX"))
        assert state is not None
        assert state.last_uid == 21

    # Later passes neither import anything twice nor touch the waiting message.
    more = corpus.normal(3, size=20_000, seed=23)
    dovecot.deliver_files("biuro", "INBOX", more)
    assert await e.pull() == 3
    assert await e.pull() == 0
    assert dovecot.exists("biuro") == 1

    await e.free(larger_than=1_000_000)
    assert await e.pull() == 1
    assert dovecot.exists("biuro") == 0
    assert await e.waiting() == []
    assert await e.gauge() == {"smtp": 0, "imap": 0}
    async with e.db.read() as s:
        assert await s.scalar(select(func.count()).select_from(Message)) == 20 + 3 + 1  # the filler is gone


async def test_uidvalidity_change_drops_the_waiting_list_without_duplicates(
    env: Any, dovecot: Dovecot
) -> None:
    e: Env = await env("1 MB")
    await e.fill(mail(1, 840_000))
    dovecot.deliver_files(
        "biuro", "INBOX", corpus.normal(1, size=300_000, seed=31) + corpus.normal(2, seed=32)
    )
    assert await e.pull() == 2
    assert len(await e.waiting()) == 1
    dovecot.recreate_folder("biuro", "INBOX")  # same three messages, new UIDVALIDITY
    assert await e.pull() == 0  # the two are known (dedupe); the big one waits under its new UID
    assert len(await e.waiting()) == 1
    async with e.db.read() as s:
        (w,) = (await s.scalars(select(UpstreamWaiting))).all()
        assert w.uidvalidity == dovecot.uidvalidity("biuro")
    assert await e.gauge() == {"smtp": 0, "imap": 1}


async def test_each_threshold_crossing_gets_its_own_notice(env: Any) -> None:
    e: Env = await env("1 MB")

    async def warnings() -> list[str]:
        return [s for s in await e.subjects() if s.startswith("Quota warning")]

    # 0 % to past 100 % between two looks of the minute job (a sent copy is stored regardless).
    await e.fill(mail(1, 500_000))
    await e.fill(mail(2, 460_000))
    await e.fill(mail(3, 100_000), system=True)
    assert await e.scheduler.quota_warnings() == 3
    assert await warnings() == [
        "Quota warning: the mailbox has passed 80% of its quota",
        "Quota warning: the mailbox has passed 95% of its quota",
        "Quota warning: the mailbox has passed 100% of its quota",
    ]
    (eighty,) = await e.notices("Quota warning: the mailbox has passed 80% of its quota")
    body = eighty.get_payload()
    assert isinstance(body, str)
    assert "has passed 80% of its quota" in body
    assert await e.scheduler.quota_warnings() == 0

    # Below 80 %, then above it again: a new 80 % notice.
    await e.free(larger_than=300_000)
    assert await e.scheduler.quota_warnings() == 0
    await e.fill(mail(4, 700_000))
    assert await e.scheduler.quota_warnings() == 1
    assert (await warnings())[-1] == "Quota warning: the mailbox has passed 80% of its quota"


# --------------------------------------------------------------------------- alerts on a real scrape


def scrape(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return str(r.read().decode())


def wait_for(check: Any, what: str, seconds: float = 90) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    pytest.fail(f"never: {what}")


def promtool_test(exposition: str, scraped_at: float, minutes: int) -> dict[str, Any]:
    """A promtool unit test whose input series are the scrape's mailgate samples, held for ``minutes``.

    Prometheus adds ``job`` and ``instance``. promtool's clock starts at 0: the
    scrape happens at 0, so timestamps are rebased (a value T becomes
    T - scraped_at, whole seconds).
    """
    series = []
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if not sample.name.startswith("mailgate_") or sample.name.endswith("_created"):
                continue
            value = sample.value
            if sample.name.endswith("_timestamp_seconds") and value > 0:
                value = round(value - scraped_at)
            labels = {"job": "mailgate", "instance": "gw1:9464", **sample.labels}
            selector = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
            series.append({"series": f"{sample.name}{{{selector}}}", "values": f"{value:.15g}x{minutes}"})
    return {"input_series": series, "interval": "1m"}


def humanize_duration(seconds: int) -> str:
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return (f"{hours}h " if hours else "") + f"{minutes}m {secs}s"


def test_alerts_fire_on_a_real_scrape_while_deferring(
    tmp_path: Path, dovecot: Dovecot, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAILGATE_TEST_UPSTREAM", PASSWORD)
    dovecot.add_user("biuro", PASSWORD)
    dovecot.deliver_files("biuro", "INBOX", corpus.normal(1, seed=41))  # pulled: a last success
    smtp_port, metrics_port = free_port(), free_port()
    db = tmp_path / "mailgate.db"
    extra = 'quota = "1 MB"\n' + mailbox_toml(
        "biuro", dovecot.port, idle=False, poll_interval="1s", after_fetch="delete"
    )
    path = write_config(tmp_path, f"sqlite+aiosqlite:///{db}", smtp_port, extra)
    path.write_text(
        path.read_text().replace("[listen]\n", f'[listen]\nmetrics = "127.0.0.1:{metrics_port}"\n')
    )
    daemon = Daemon(path, smtp_port, tmp_path)
    daemon.start()
    try:
        wait_for(lambda: dovecot.exists("biuro") == 0, "the first message is pulled")
        assert smtp_send(smtp_port, mail(1, 840_000)) == 250  # 84 %
        assert smtp_send(smtp_port, mail(2, 300_000)) == 452
        dovecot.deliver_files("biuro", "INBOX", corpus.normal(1, size=300_000, seed=42))

        def deferring() -> tuple[str, float] | None:
            at = time.time()
            text = scrape(metrics_port)
            wanted = (
                'mailgate_quota_deferred_messages{source="imap",tenant="acme"} 1.0',
                'mailgate_quota_deferred_messages{source="smtp",tenant="acme"} 1.0',
            )
            return (text, at) if all(w in text for w in wanted) else None

        exposition, scraped_at = wait_for(deferring, "the deferred gauge in /metrics")

        def subjects() -> list[str]:
            with contextlib.closing(sqlite3.connect(db)) as c:
                return [r[0] for r in c.execute("SELECT subject FROM messages ORDER BY id")]

        wait_for(lambda: WAITING in subjects(), "the mail-is-waiting notice")
        assert subjects().count(WAITING) == 1
        state = daemon.cli("mailboxes", "--format", "json")
        assert '"over_quota"' in state
    finally:
        daemon.stop()
    assert subjects().count(WAITING) == 1

    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(exposition)
        for s in f.samples
    }
    last_success = samples[
        ("mailgate_upstream_last_success_timestamp_seconds", (("mailbox", "biuro"), ("tenant", "acme")))
    ]
    assert last_success > 0
    used = samples[("mailgate_storage_used_bytes", (("folder", ""), ("tenant", "acme")))]
    assert 0.8 < used / 1_000_000 < 0.95  # deferring below 95 %

    test = promtool_test(exposition, scraped_at, 60)
    eval_at = 45 * 60
    stale = humanize_duration(eval_at - round(last_success - scraped_at))
    common = (
        'The tenant got a "mail is waiting" notice in its INBOX. Free space (delete or archive mail)'
        " or raise the quota; the waiting mail then arrives by itself."
        " `mailgate folders --tenant acme` shows the usage."
    )
    test["alert_rule_test"] = [
        {
            "eval_time": "45m",
            "alertname": "QuotaDeferring",
            "exp_alerts": [
                {
                    "exp_labels": {
                        "severity": "warning",
                        "job": "mailgate",
                        "tenant": "acme",
                        "source": "imap",
                    },
                    "exp_annotations": {
                        "summary": "Mail for tenant acme waits over quota (imap)",
                        "description": "1 upstream message(s) of tenant acme do not fit its quota and wait"
                        " upstream. " + common,
                    },
                },
                {
                    "exp_labels": {
                        "severity": "warning",
                        "job": "mailgate",
                        "tenant": "acme",
                        "source": "smtp",
                    },
                    "exp_annotations": {
                        "summary": "Mail for tenant acme waits over quota (smtp)",
                        "description": "1 relay-in delivery attempt(s) for tenant acme were refused with 452"
                        " 4.2.2 (mailbox full) since the deferral began; senders retry. " + common,
                    },
                },
            ],
        },
        {
            "eval_time": "45m",
            "alertname": "UpstreamNotPulling",
            "exp_alerts": [
                {
                    "exp_labels": {
                        "severity": "warning",
                        "job": "mailgate",
                        "tenant": "acme",
                        "mailbox": "biuro",
                    },
                    "exp_annotations": {
                        "summary": "Upstream mailbox acme/biuro is not being pulled",
                        "description": "mailgate last pulled the upstream mailbox biuro of tenant acme"
                        f" {stale} ago, so new customer mail there is not reaching the agents. `mailgate"
                        " mailboxes --tenant acme` shows the last error (login refused, server unreachable,"
                        " certificate, over quota).",
                    },
                }
            ],
        },
        # A usage level, not a deferral: quiet at 84 % (QuotaDeferring is the alert for this).
        {"eval_time": "45m", "alertname": "QuotaAbove95", "exp_alerts": []},
    ]
    rules = tmp_path / "mailgate-alerts.yml"
    rules.write_text(ALERTS.read_text(encoding="utf-8"), encoding="utf-8")
    tests = tmp_path / "from-a-real-scrape.test.yml"
    tests.write_text(
        # JSON is YAML.
        json.dumps({"rule_files": [rules.name], "evaluation_interval": "1m", "tests": [test]}, indent=1),
        encoding="utf-8",
    )
    out = subprocess.run(
        [peer("promtool"), "test", "rules", tests.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr

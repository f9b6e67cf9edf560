"""Issue #14, Done-means 3: a tenant's plan lifecycle, end to end, on a fake clock.

The daemon and the CLI run under libfaketime (``FAKETIME="+25d"``; the
monotonic clock stays real, so asyncio's timers do too) and are restarted at
successive offsets: the scheduler's lifecycle job runs at start. Tenants
``alpha`` and ``beta`` (plan 3gb, paid until today + 20 days) and ``gamma``
(no end) get mail; then

- at +0d both are told, once: a notice in their INBOX (IMAP) and one relayed
  to their ``contact`` (smtp-sink as their relay), again once after a restart;
- at +25d both are read-only (IMAP SELECT is ``[READ-ONLY]``, APPEND
  ``NO [CANNOT]``, submission ``554 5.7.1``, relay-in ``450 4.2.1``); beta is
  renewed and has full service within 2 s;
- at +60d alpha is deleted: no row of it remains, nor a blob only it used,
  its final snapshot is named in the log and exists; beta's and gamma's mail
  is untouched (counts and the sha256 of every blob).

At each step ``tenant show`` gives the steps taken, ``/metrics`` the plan's
end, and ``promtool`` fires (or not) the plan alerts on the scrape.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import glob
import hashlib
import imaplib
import json
import signal
import smtplib
import sqlite3
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from gateway import lifecycle
from gateway.blobs import open_blobs
from gateway.config import load_config, parse_config
from gateway.daemon import open_store
from gateway.ingest import Pipeline
from storage import catalog, snapshots
from storage.blobs import BlobStore
from storage.db import Database
from storage.models import Base, Folder, Message, Outbound, Tenant
from tests.conftest import Sink, config_dict, free_port, missing_peer, peer
from tests.daemon import Daemon
from tests.test_observability import wait_http
from tests.test_quota_deferral import promtool_test, scrape, wait_for

pytestmark = pytest.mark.peers

PASSWORD = "agent-password"
DAY = 86400
NOTICE = "Your plan ends in"
ALERTS = Path(__file__).resolve().parent.parent / "config" / "prometheus" / "mailgate-alerts.yml"


def libfaketime() -> str:
    """The preloadable libfaketime (Debian package ``faketime``), or skip/fail."""
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    if not found:
        missing_peer("libfaketime is not installed (make peers installs the faketime package)")
    return found[0]


def config_text(tmp_path: Path, db_url: str, ports: dict[str, int]) -> str:
    listen = "\n".join(f'{key} = "127.0.0.1:{port}"' for key, port in ports.items())
    return f"""
[gateway]
hostname = "mx.test"
data_dir = "{tmp_path / "var"}"
database_url = "{db_url}"

[listen]
{listen}

[snapshots]
dir = "{tmp_path / "snapshots"}"
"""


def tenants_text(relay_port: int, paid_until: date) -> str:
    """The three tenants, applied once with ``config apply`` (the daemon's file declares none)."""
    hashed = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash(PASSWORD)
    out = []
    for tenant, plan in (("alpha", True), ("beta", True), ("gamma", False)):
        dates = f'plan = "3gb"\npaid_until = {paid_until.isoformat()}\ncontact = "owner@{tenant}.example"\n'
        out.append(f"""
[[tenants]]
id = "{tenant}"
domains = ["{tenant}.test"]
{dates if plan else ""}
[tenants.smtp]
host = "127.0.0.1"
port = {relay_port}
security = "none"
from = "biuro@{tenant}.test"

[[tenants.agents]]
login = "boss@{tenant}.test"
role = "admin"
password_hash = "{hashed}"

[[tenants.agents]]
login = "anna@{tenant}.test"
password_hash = "{hashed}"
""")
    return "".join(out)


def mail(subject: str, to: str = "biuro@example.test", sender: str = "customer@example.org") -> bytes:
    return (
        f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{hashlib.sha256(subject.encode()).hexdigest()}@example.org>\r\n\r\n{subject}\r\n"
    ).encode()


def smtp_reply(port: int, rcpts: list[str], data: bytes, login: str | None = None) -> str:
    """The first reply that is not a success (or the final 250), as ``"code text"``."""
    sender = login or "customer@example.org"
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        c.ehlo("client.test")
        if login is not None:
            c.login(login, PASSWORD)
        for code, text in (c.mail(sender), *(c.rcpt(r) for r in rcpts)):
            if code >= 300:
                return f"{code} {text.decode()}"
        code, text = c.data(data)
        return f"{code} {text.decode()}"


class World:
    """The daemon under a fake clock, its relay (smtp-sink), and what the test looks at."""

    def __init__(self, tmp_path: Path, db_url: str, sink: Sink) -> None:
        self.tmp_path, self.db_url, self.sink = tmp_path, db_url, sink
        self.today = datetime.now(UTC).date()  # the real day: offsets count from it
        self.paid_until = self.today + timedelta(days=20)
        self.ports = {k: free_port() for k in ("smtp", "submission", "imap", "metrics")}
        config = tmp_path / "mailgate.toml"
        config.write_text(config_text(tmp_path, db_url, self.ports), encoding="utf-8")
        env = {"LD_PRELOAD": libfaketime(), "FAKETIME": "+0d", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
        self.daemon = Daemon(config, self.ports["smtp"], tmp_path, env=env)
        self.offset = 0

    # --- the clock and the daemon

    def at(self, days: int) -> None:
        """(Re)start the daemon and its commands ``days`` after today."""
        if self.daemon.proc is not None and self.daemon.proc.poll() is None:
            assert self.daemon.signal(signal.SIGTERM) == 0
        self.offset = days
        self.daemon.env["FAKETIME"] = f"+{days}d"
        self.daemon.start()
        wait_http(self.ports["metrics"], "/readyz", lambda body: True)

    def now(self) -> float:
        return time.time() + self.offset * DAY

    def fake_date(self) -> date:
        return datetime.fromtimestamp(self.now(), UTC).date()

    def show(self, tenant: str) -> dict[str, Any]:
        shown: dict[str, Any] = json.loads(self.daemon.cli("tenant", "show", tenant, "--format", "json"))
        return shown

    def log_lines(self, event: str) -> list[str]:
        return [line for line in self.daemon.log.read_text().splitlines() if event in line]

    # --- the database, read directly

    def query(self, work: Any) -> Any:
        async def run() -> Any:
            db = Database(self.db_url)
            try:
                async with db.read() as s:
                    return await work(s)
            finally:
                await db.close()

        return asyncio.run(run())

    def stamps(self, tenant: str) -> dict[str, datetime | None]:
        async def work(s: Any) -> dict[str, datetime | None]:
            return (await catalog.lifecycle(s))[tenant]

        found: dict[str, datetime | None] = self.query(work)
        return found

    def queued(self, tenant: str) -> int:
        """Messages of the tenant in the relay queue."""

        async def work(s: Any) -> int:
            return await s.scalar(select(func.count()).where(Outbound.tenant_id == tenant)) or 0

        n: int = self.query(work)
        return n

    def mail_of(self, tenant: str) -> tuple[Counter[str], list[str]]:
        """The tenant's messages per folder, and the sha256 of each of its blobs' stored bytes."""

        async def work(s: Any) -> list[tuple[str, str]]:
            rows = await s.execute(
                select(Folder.name, Message.blob)
                .join(Folder, Folder.id == Message.folder_id)
                .where(Message.tenant_id == tenant)
            )
            return [(r[0], r[1]) for r in rows]

        rows = self.query(work)

        async def read(store: BlobStore) -> list[bytes]:
            return [await store.get(b) for _, b in rows]

        stored = self.blobs(read)
        return Counter(f for f, _ in rows), sorted(hashlib.sha256(b).hexdigest() for b in stored)

    def blobs(self, work: Any) -> Any:
        """``work(store)`` on the daemon's blob store, as the daemon opens it."""

        async def run() -> Any:
            db = Database(self.db_url)
            store = await open_blobs(load_config(self.daemon.config), db)
            try:
                return await work(store)
            finally:
                await store.close()
                await db.close()

        return asyncio.run(run())

    def stored(self, digests: set[str]) -> set[str]:
        """Those of the blobs still stored."""

        async def work(store: BlobStore) -> set[str]:
            return {d for d in digests if await store.exists(d)}

        found: set[str] = self.blobs(work)
        return found

    def blobs_of(self, tenant: str) -> set[str]:
        async def work(s: Any) -> set[str]:
            messages = await s.scalars(select(Message.blob).where(Message.tenant_id == tenant))
            queued = await s.scalars(select(Outbound.blob).where(Outbound.tenant_id == tenant))
            return set(messages.all()) | set(queued.all())

        found: set[str] = self.query(work)
        return found

    def rows_of(self, tenant: str) -> dict[str, int]:
        """Rows of the tenant in every table with a ``tenant_id`` (and its row in ``tenants``)."""

        async def work(s: Any) -> dict[str, int]:
            out = {}
            for table in Base.metadata.sorted_tables:
                column = table.c.get("tenant_id") if table is not Tenant.__table__ else table.c.id
                if column is not None:
                    out[table.name] = await s.scalar(select(func.count()).where(column == tenant)) or 0
            return out

        counts: dict[str, int] = self.query(work)
        return counts

    def orphans(self) -> dict[str, int]:
        """Rows whose parent row (by a foreign key that is set) is gone."""

        async def work(s: Any) -> dict[str, int]:
            out = {}
            for table in Base.metadata.sorted_tables:
                for fk in table.foreign_keys:
                    n = await s.scalar(
                        select(func.count())
                        .select_from(table)
                        .where(fk.parent.is_not(None), fk.parent.not_in(select(fk.column)))
                    )
                    if n:
                        out[f"{table.name}.{fk.parent.name}"] = n
            return out

        found: dict[str, int] = self.query(work)
        return found

    # --- what the agents and the relay see

    def imap(self, login: str) -> imaplib.IMAP4:
        c = imaplib.IMAP4("127.0.0.1", self.ports["imap"], timeout=30)
        c.login(login, PASSWORD)
        return c

    def notices_in_inbox(self, tenant: str) -> list[email.message.Message]:
        c = self.imap(f"boss@{tenant}.test")
        try:
            c.select("INBOX", readonly=True)
            _, data = c.search(None, "SUBJECT", f'"{NOTICE}"')
            out = []
            for n in data[0].split():
                _, parts = c.fetch(n, "(BODY.PEEK[])")
                raw = parts[0]
                assert isinstance(raw, tuple)
                out.append(email.message_from_bytes(raw[1]))
            return out
        finally:
            c.logout()

    def relayed_notices(self, tenant: str) -> list[email.message.Message]:
        out = []
        for raw in self.sink.captured():
            m = email.message_from_bytes(raw)
            if str(m["Subject"]).startswith(NOTICE) and m["To"] == f"owner@{tenant}.example":
                out.append(m)
        return out

    def expiry(self) -> dict[str, float]:
        """``mailgate_tenant_expiry_timestamp_seconds`` by tenant, as scraped."""
        out = {}
        for family in text_string_to_metric_families(scrape(self.ports["metrics"])):
            if family.name == "mailgate_tenant_expiry_timestamp_seconds":
                out = {s.labels["tenant"]: s.value for s in family.samples}
        return out

    def alerts(self, tmp_name: str, expected: dict[str, list[str]]) -> None:
        """promtool on this scrape: each plan alert fires for exactly the ``expected`` tenants."""
        exposition, at = scrape(self.ports["metrics"]), self.now()
        test = promtool_test(exposition, at, 10)
        test["alert_rule_test"] = [
            {
                "eval_time": "5m",
                "alertname": name,
                "exp_alerts": [
                    {
                        "exp_labels": {"severity": severity, "job": "mailgate", "tenant": t},
                        "exp_annotations": self.annotations(name, t, exposition, at),
                    }
                    for t in expected[name]
                ],
            }
            for name, severity in (
                ("MailgateTenantPlanEnding", "warning"),
                ("MailgateTenantReadOnly", "critical"),
            )
        ]
        rules = self.tmp_path / "mailgate-alerts.yml"
        rules.write_text(ALERTS.read_text(encoding="utf-8"), encoding="utf-8")
        path = self.tmp_path / f"{tmp_name}.test.yml"
        path.write_text(
            json.dumps({"rule_files": [rules.name], "evaluation_interval": "1m", "tests": [test]}),
            encoding="utf-8",
        )
        out = subprocess.run(
            [peer("promtool"), "test", "rules", path.name],
            cwd=self.tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stdout + out.stderr

    def annotations(self, name: str, tenant: str, exposition: str, at: float) -> dict[str, str]:
        """The alert's annotations at 5 minutes into the promtool test (rebased: ``at`` is 0)."""
        (ts,) = [
            s.value
            for f in text_string_to_metric_families(exposition)
            for s in f.samples
            if s.name == "mailgate_tenant_expiry_timestamp_seconds" and s.labels["tenant"] == tenant
        ]
        left = round(ts - at) - 300
        if name == "MailgateTenantPlanEnding":
            d = humanize(left)
            return {
                "summary": f"The plan of tenant {tenant} ends in {d}",
                "description": f"Tenant {tenant}'s paid plan or trial ends in {d}; then the account works"
                " read-only (no sending, new mail waits) and, after the plan's read_only_days, it is"
                f" deleted with its mail. Once paid: `mailgate tenant renew {tenant} --until YYYY-MM-DD`.",
            }
        d = humanize(-left)
        return {
            "summary": f"Tenant {tenant} is read-only: its plan ended {d} ago",
            "description": f"Tenant {tenant}'s paid plan or trial ended {d} ago: its agents can read mail"
            " but not send, relay-in senders are asked to retry and upstream mail waits. After the plan's"
            f" read_only_days the tenant is deleted with its mail (`mailgate tenant show {tenant}` gives"
            f" the day). `mailgate tenant renew {tenant} --until YYYY-MM-DD` restores full service at once.",
        }


def humanize(seconds: int) -> str:
    """Prometheus's humanizeDuration of whole seconds."""
    days, rest = divmod(seconds, DAY)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes}m {secs}s"
    return (f"{hours}h " if hours else "") + f"{minutes}m {secs}s"


def start_of_day_after(day: date) -> float:
    after = day + timedelta(days=1)
    return datetime(after.year, after.month, after.day, tzinfo=UTC).timestamp()


@pytest.fixture
def world(tmp_path: Path, db_url: str, sink: Sink) -> Iterator[World]:
    peer("promtool")
    w = World(tmp_path, db_url, sink)
    yield w
    w.daemon.stop()


def test_one_tenant_walks_notice_read_only_deleted_another_is_renewed(world: World) -> None:
    w, d, smtp = world, world.daemon, world.ports["smtp"]
    w.sink.start()
    # --- +0d: both plans end in 20 days: each tenant is told at start, once
    (w.tmp_path / "tenants.toml").write_text(tenants_text(w.sink.port, w.paid_until), encoding="utf-8")
    d.cli("migrate")
    d.cli("config", "apply", str(w.tmp_path / "tenants.toml"))
    w.at(0)
    for tenant in ("alpha", "beta", "gamma"):
        for n in range(3):
            assert smtp_reply(smtp, [f"biuro@{tenant}.test"], mail(f"{tenant} {n}")).startswith("250")
    for tenant in ("alpha", "gamma"):  # the same bytes in both: one blob, shared
        c = w.imap(f"anna@{tenant}.test")
        assert c.append("INBOX", None, None, mail("both"))[0] == "OK"
        c.logout()
    for tenant in ("alpha", "beta"):
        wait_for(lambda t=tenant: w.relayed_notices(t), f"{tenant}'s relayed notice", 20)
        (notice,) = w.notices_in_inbox(tenant)
        assert notice["To"] == f"boss@{tenant}.test"
        assert w.paid_until.isoformat() in str(notice["Subject"])
        body = notice.get_payload()
        assert isinstance(body, str)
        assert f"plan 3gb for {tenant} ends in 20 days, on {w.paid_until.isoformat()}" in body
        (relayed,) = w.relayed_notices(tenant)
        assert relayed["Subject"] == notice["Subject"]
    assert w.stamps("gamma") == {"noticed_at": None, "read_only_at": None, "renewed_at": None}
    assert w.notices_in_inbox("gamma") == []

    # --- +1d: after a restart, still told once; full service; the gauge and the alert
    w.at(1)
    for tenant in ("alpha", "beta"):
        shown = w.show(tenant)
        assert shown["state"] == "notice"
        assert shown["noticed_at"].startswith(w.today.isoformat())
        assert (shown["read_only_at"], shown["renewed_at"]) == (None, None)
    assert w.expiry() == {t: start_of_day_after(w.paid_until) for t in ("alpha", "beta")}
    w.alerts("notice", {"MailgateTenantPlanEnding": ["alpha", "beta"], "MailgateTenantReadOnly": []})
    c = w.imap("anna@alpha.test")
    c.select("INBOX")
    assert c.append("INBOX", None, None, mail("alpha appended"))[0] == "OK"
    c.logout()
    for tenant in ("alpha", "beta"):  # this run's lifecycle pass is long over: nothing queued again
        assert (len(w.relayed_notices(tenant)) + w.queued(tenant), len(w.notices_in_inbox(tenant))) == (1, 1)
    gamma_before = w.mail_of("gamma")
    alpha_blobs = w.blobs_of("alpha")
    shared = alpha_blobs & w.blobs_of("gamma")
    assert len(shared) == 1

    # --- +25d: the plans ended on day 20: read-only
    w.at(25)
    wait_for(lambda: all(w.stamps(t)["read_only_at"] for t in ("alpha", "beta")), "read-only recorded")
    for tenant in ("alpha", "beta"):
        shown = w.show(tenant)
        assert shown["state"] == "read_only"
        assert shown["read_only_at"].startswith(w.fake_date().isoformat())
        assert shown["deleted_on"] == (w.paid_until + timedelta(days=31)).isoformat()
        assert_read_only(w, tenant)
        assert (len(w.relayed_notices(tenant)) + w.queued(tenant), len(w.notices_in_inbox(tenant))) == (1, 1)
    w.alerts("read_only", {"MailgateTenantPlanEnding": [], "MailgateTenantReadOnly": ["alpha", "beta"]})

    # beta renews while read-only: full service at once, also in a session opened before
    session = w.imap("anna@beta.test")
    session.select("INBOX", readonly=True)
    assert session.append("INBOX", None, None, mail("beta before renewal"))[0] == "NO"
    until = w.fake_date() + timedelta(days=365)
    d.cli("tenant", "renew", "beta", "--until", until.isoformat())
    renewed = time.monotonic()
    wait_for(
        lambda: session.append("INBOX", None, None, mail("beta after renewal"))[0] == "OK",
        "APPEND after the renewal",
        5,
    )
    took = time.monotonic() - renewed
    assert took < 2.0, f"{took:.1f} s:\n" + "\n".join(d.log.read_text().splitlines()[-8:])
    session.logout()
    c = w.imap("anna@beta.test")
    assert c.select("INBOX")[0] == "OK"  # not [READ-ONLY]: imaplib raises on that
    c.logout()
    assert smtp_reply(smtp, ["biuro@beta.test"], mail("beta relay-in after renewal")).startswith("250")
    reply = mail("beta reply", "klient@example.org", "anna@beta.test")
    sent = smtp_reply(w.ports["submission"], ["klient@example.org"], reply, "anna@beta.test")
    assert sent.startswith("250"), sent
    shown = w.show("beta")
    assert shown["state"] == "active"
    assert (shown["noticed_at"], shown["read_only_at"]) == (None, None)
    assert shown["renewed_at"].startswith(w.fake_date().isoformat())
    beta_before = w.mail_of("beta")
    assert beta_before[0]["INBOX"] == 3 + 1 + 2  # relay-in, the notice, after the renewal
    alpha_messages = sum(w.mail_of("alpha")[0].values())

    # --- +60d: alpha's read-only month is over: deleted, with a final snapshot
    w.at(60)
    wait_for(lambda: w.log_lines("lifecycle.deleted"), "alpha deleted", 30)
    (line,) = w.log_lines("lifecycle.final_snapshot")
    logged = json.loads(line)
    assert logged["tenant"] == "alpha"
    snapshot = w.tmp_path / "snapshots" / logged["snapshot"]
    assert snapshots.verify(snapshot) == []
    with contextlib.closing(sqlite3.connect(snapshot / "metadata.db")) as kept:
        (n,) = kept.execute("SELECT count(*) FROM messages WHERE tenant_id = 'alpha'").fetchone()
    assert n == alpha_messages
    rows = w.rows_of("alpha")
    assert rows == dict.fromkeys(rows, 0)
    assert w.orphans() == {}
    assert w.stored(alpha_blobs) == shared
    assert w.mail_of("gamma") == gamma_before
    assert w.mail_of("beta") == beta_before
    # Until the daemon serves the catalog without alpha (a poll, within 1 s) relay-in defers.
    wait_for(
        lambda: smtp_reply(smtp, ["biuro@alpha.test"], mail("too late"))[:3] in ("550", "554"),
        "relay-in refuses alpha's domain",
        3,
    )
    with pytest.raises(imaplib.IMAP4.error):
        w.imap("anna@alpha.test")

    # --- +61d: a restart deletes nothing again; the gauges as read at start
    w.at(61)
    assert w.expiry() == {"beta": start_of_day_after(until)}
    w.alerts("deleted", {"MailgateTenantPlanEnding": [], "MailgateTenantReadOnly": []})
    assert len(w.log_lines("lifecycle.deleted")) == 1
    assert w.show("beta")["state"] == "active"
    assert w.mail_of("beta") == beta_before


def assert_read_only(w: World, tenant: str) -> None:
    """IMAP reads but does not write; submission refuses; relay-in defers (senders retry)."""
    c = w.imap(f"anna@{tenant}.test")
    try:
        with pytest.raises(imaplib.IMAP4.readonly):
            c.select("INBOX")
        typ, data = c.select("INBOX", readonly=True)
        assert typ == "OK"
        assert int(data[0]) >= 4
        typ, _ = c.fetch("1", "(BODY[])")  # reading and downloading work
        assert typ == "OK"
        typ, data = c.append("INBOX", None, None, mail("not stored"))
        assert typ == "NO"
        assert data[0].startswith(b"[CANNOT]"), data
        assert w.paid_until.isoformat().encode() in data[0]
    finally:
        c.logout()
    sent = smtp_reply(
        w.ports["submission"],
        ["klient@example.org"],
        mail("refused", "klient@example.org", f"anna@{tenant}.test"),
        f"anna@{tenant}.test",
    )
    assert sent.startswith("554 5.7.1"), sent
    assert w.paid_until.isoformat() in sent
    deferred = smtp_reply(w.ports["smtp"], [f"biuro@{tenant}.test"], mail("waits"))
    assert deferred.startswith("450 4.2.1"), deferred


# --------------------------------------------------------------------------- the steps, in process


def lifecycle_config(tmp_path: Path, db_url: str) -> dict[str, Any]:
    """Tenant ``acme`` (plan 3gb, paid until today + 20 days, a contact, a relay, an admin) and ``beta``."""
    return config_dict(
        tmp_path,
        db_url,
        plan="3gb",
        paid_until=(datetime.now(UTC).date() + timedelta(days=20)).isoformat(),
        contact="owner@acme.example",
        smtp={"host": "127.0.0.1", "port": 2525, "security": "none", "from": "biuro@acme.test"},
        agents=[{"login": "boss@acme.test", "role": "admin", "password_hash": "$argon2id$v=19$x"}],
    )


async def noticed_by(tmp_path: Path, db_url: str, instances: int) -> tuple[list[tuple[int, bytes]], int]:
    """``instances`` schedulers on one database take acme's notice at once: the relay queue's
    (size, bytes) and the notices in the INBOX."""
    config = parse_config(lifecycle_config(tmp_path, db_url))
    db, blobs = await open_store(config)
    others = [Database(db_url) for _ in range(instances - 1)]
    try:
        tenant, now = config.tenant("acme"), datetime.now(UTC)
        await asyncio.gather(
            *(lifecycle.notify(config, d, Pipeline(d, blobs), tenant, now) for d in (db, *others))
        )
        async with db.read() as s:
            queued = (await s.scalars(select(Outbound).where(Outbound.tenant_id == "acme"))).all()
            notices = await s.scalar(
                select(func.count()).where(Message.tenant_id == "acme", Message.subject.startswith(NOTICE))
            )
            assert (await catalog.lifecycle(s))["acme"]["noticed_at"] is not None
        return [(row.size, await blobs.get(row.blob)) for row in queued], notices or 0
    finally:
        for d in others:
            await d.close()
        await blobs.close()
        await db.close()


async def test_two_instances_noticing_at_once_relay_one_notice(tmp_path: Path, db_url: str) -> None:
    """Each instance's scheduler finds the notice due; one takes it (each one relayed it, on PostgreSQL)."""
    queued, notices = await noticed_by(tmp_path, db_url, 4)
    assert (len(queued), notices) == (1, 1)


async def test_the_relayed_notice_is_queued_with_its_size(tmp_path: Path, db_url: str) -> None:
    """``queue list`` and the relay's SIZE= tell the notice's size (it was queued as 0 bytes)."""
    ((size, raw),), _ = await noticed_by(tmp_path, db_url, 1)
    assert size == len(raw)
    assert raw.startswith(b"From: mailgate <mailgate@mx.test>\r\nTo: owner@acme.example\r\n")


async def test_a_tenant_whose_deletion_fails_does_not_hold_back_the_others_steps(
    tmp_path: Path, db_url: str
) -> None:
    """A snapshot that cannot be written stops that tenant's deletion, not the next tenant's notice."""
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("", encoding="utf-8")
    data = lifecycle_config(tmp_path, db_url)
    data["snapshots"] = {"dir": str(blocked)}
    paid = (datetime.now(UTC).date() + timedelta(days=365)).isoformat()
    data["tenants"].insert(0, {"id": "aaa", "domains": ["aaa.test"], "plan": "3gb", "paid_until": paid})
    db, blobs = await open_store(parse_config(data))
    # Its plan then ended 90 days ago (a file declaring it so from the start is not applied at all).
    data["tenants"][0]["paid_until"] = (datetime.now(UTC).date() - timedelta(days=90)).isoformat()
    config = parse_config(data)
    try:
        assert config.tenants[0].id == "aaa"  # its step comes first
        await lifecycle.step(config, db, blobs, Pipeline(db, blobs), datetime.now(UTC))
        async with db.read() as s:
            steps = await catalog.lifecycle(s)
        assert "aaa" in steps  # not deleted without its final snapshot
        assert steps["acme"]["noticed_at"] is not None
    finally:
        await blobs.close()
        await db.close()

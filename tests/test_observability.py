"""What operators run mailgate with: alert rules, the Grafana dashboard, the systemd units.

The alert rules and the dashboard only work if every ``mailgate_*`` series
they query is one the daemon really exports, with the labels they use: a
renamed metric or a typo silently yields "no data" and an alert that never
fires. So the names are extracted from the files and checked against a
running daemon's ``/metrics`` (and, for database-backed families that need
upstream mailboxes to have samples, against the collector fed with one value
of each), ``promtool`` checks the rules, runs their unit tests and lints the
exposition, and ``systemd-analyze verify`` checks the unit files.
"""

from __future__ import annotations

import contextlib
import imaplib
import json
import re
import shutil
import signal
import smtplib
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from argon2 import PasswordHasher
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import ListenSection
from gateway.metrics import DatabaseCollector
from storage.db import Activity
from tests.conftest import REPO, free_port, peer
from tests.daemon import Daemon

ALERTS = REPO / "config" / "prometheus" / "mailgate-alerts.yml"
ALERT_TESTS = REPO / "config" / "prometheus" / "mailgate-alerts.test.yml"
DASHBOARD = REPO / "config" / "grafana" / "mailgate.json"
SYSTEMD = REPO / "systemd"

ALERT_NAMES = {
    "MailgateDown",
    "RelayQueueStuck",
    "RelayQueueOld",
    "RelayFailureRatio",
    "UpstreamNotPulling",
    "QuotaDeferring",
    "QuotaAbove95",
    "SnapshotTooOld",
    "MailgateTenantPlanEnding",
    "MailgateTenantReadOnly",
    "MailgateOAuth2TokenFailing",
    "MailgateSpamFilterFailing",
    "MailgateOutboundLimited",
}
# The dashboard shows each of these (the contract metrics of DESIGN.md section 6).
DASHBOARD_METRICS = {
    "mailgate_agent_messages_read_total",
    "mailgate_agent_replies_total",
    "mailgate_agent_collisions_total",
    "mailgate_agent_first_response_seconds_bucket",
    "mailgate_messages_received_total",
    "mailgate_relay_messages_total",
    "mailgate_relay_queue_messages",
    "mailgate_relay_queue_oldest_age_seconds",
    "mailgate_storage_used_bytes",
    "mailgate_storage_limit_bytes",
    "mailgate_upstream_last_success_timestamp_seconds",
    "mailgate_snapshot_last_success_timestamp_seconds",
}
# Series with a tenant label: the dashboard filters each by its $tenant variable.
TENANT_METRICS = (DASHBOARD_METRICS - {"mailgate_snapshot_last_success_timestamp_seconds"}) | {
    "mailgate_spam_purged_messages_total"
}
# Socket units: one per [listen] key (FileDescriptorName= names every socket of a unit).
SOCKET_PORTS = {"smtp": 25, "submission": 587, "submissions": 465, "imap": 143, "imaps": 993}
# Labels Prometheus adds at scrape time.
SCRAPE_LABELS = {"job", "instance"}

PASSWORD = "agent-password"
METRIC = re.compile(r"\bmailgate_[a-zA-Z0-9_]+")
SELECTOR = re.compile(r"\b(mailgate_[a-zA-Z0-9_]+)\s*\{([^}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


# --------------------------------------------------------------------------- reading the files


def alert_rules() -> dict[str, str]:
    """``{alert name: rule text}`` of the rules file (its layout: one ``- alert:`` item per rule)."""
    text = ALERTS.read_text(encoding="utf-8")
    chunks = re.split(r"^\s*- alert: ", text, flags=re.MULTILINE)[1:]
    return {chunk.split("\n", 1)[0].strip(): chunk for chunk in chunks}


def rule_expr(rule: str) -> str:
    """The ``expr:`` of one rule: inline, or a block scalar (``expr: |``) of deeper-indented lines."""
    lines = rule.split("\n")
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)expr:\s*(.*)$", line)
        if m is None:
            continue
        if m.group(2) not in ("|", ">", "|-", ">-"):
            return m.group(2)
        indent = len(m.group(1))
        block = []
        for more in lines[i + 1 :]:
            if more.strip() and len(more) - len(more.lstrip()) <= indent:
                break
            block.append(more.strip())
        return " ".join(block)
    raise AssertionError(f"no expr in rule:\n{rule}")


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def dashboard_panels() -> list[dict[str, Any]]:
    out = []
    for p in dashboard()["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # a collapsed row holds its panels
    return out


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard_panels() for t in p.get("targets", [])]


def grafana_to_promql(expr: str) -> str:
    """A dashboard query with Grafana's variables replaced by what they expand to."""
    for var, value in (
        ("$__rate_interval", "5m"),
        ("$__interval", "1m"),
        ("$__range", "7d"),
        ("$tenant", ".*"),
    ):
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def alert_test_series() -> set[str]:
    return set(re.findall(r"series:\s*'(mailgate_[a-zA-Z0-9_]+)", ALERT_TESTS.read_text(encoding="utf-8")))


def all_queries() -> dict[str, str]:
    """Every PromQL query of the dashboard and the alert rules, by where it comes from."""
    out = {f"alert {name}": rule_expr(rule) for name, rule in alert_rules().items()}
    out.update({f"dashboard #{i}": grafana_to_promql(e) for i, e in enumerate(dashboard_exprs())})
    return out


# --------------------------------------------------------------------------- the exposition


def exported_series(exposition: str) -> dict[str, set[str]]:
    """``{series name: label names seen}`` for every family: ``_total``/``_bucket``/... by type."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "summary": ("", "_count", "_sum", "_created"),
        "gauge": ("",),
        "unknown": ("",),
    }
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(exposition):
        for suffix in suffixes[family.type]:
            out.setdefault(family.name + suffix, set())
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


def merge(*expositions: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for e in expositions:
        for name, labels in exported_series(e).items():
            out.setdefault(name, set()).update(labels)
    return out


def synthetic_exposition() -> str:
    """The database-backed families with one value each (no database: the collector's data set by hand).

    A test daemon has no upstream mailbox that ever succeeded, so this is
    where the labels of every database family are seen, and what
    ``promtool check metrics`` lints with samples present.
    """
    # Never refreshed: no database, only the process's counters of what it asked of one.
    no_database = SimpleNamespace(activity=Activity(statements=10, commits=2))
    collector = DatabaseCollector(lambda: None, no_database)  # type: ignore[arg-type, return-value]
    data = collector.data
    data.reads[("acme", "anna@acme.test")] = 3
    data.replies[("acme", "anna@acme.test")] = 2
    data.collisions[("acme", "anna@acme.test")] = 1
    data.first_response[("acme", "anna@acme.test")] = [42.0, 4000.0]
    data.queue["acme"] = (2, 120.0)
    data.storage.extend([("acme", "", 100, 1000), ("acme", "Orders", 10, 500), ("acme", "Spam", 5, None)])
    data.upstream[("acme", "biuro")] = 1.7e9
    data.expiry["acme"] = 1.7e9
    data.snapshot = 1.7e9
    registry = CollectorRegistry()
    registry.register(collector)
    return generate_latest(registry).decode()


def promtool_check_metrics(exposition: str) -> None:
    out = subprocess.run(
        [peer("promtool"), "check", "metrics"],
        input=exposition.encode(),
        capture_output=True,
        timeout=60,
    )
    lint = (out.stdout + out.stderr).decode()
    assert (out.returncode, lint) == (0, ""), f"promtool check metrics:\n{lint}"


# --------------------------------------------------------------------------- a running daemon


def config_text(tmp_path: Path, ports: dict[str, int]) -> str:
    hashed = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash(PASSWORD)
    listen = "\n".join(f'{key} = "127.0.0.1:{port}"' for key, port in ports.items())
    return f"""
[gateway]
hostname = "mx.test"
data_dir = "{tmp_path / "var"}"
database_url = "sqlite+aiosqlite:///{tmp_path / "mailgate.db"}"

[listen]
{listen}

[snapshots]
dir = "{tmp_path / "snapshots"}"

[[tenants]]
id = "acme"
domains = ["acme.test"]
quota = "1 GB"

[tenants.smtp]
host = "127.0.0.1"
port = {free_port()}
security = "none"
from = "biuro@acme.test"

[[tenants.agents]]
login = "anna@acme.test"
password_hash = "{hashed}"

[[tenants.folders]]
name = "Orders"
quota = "500 MB"
"""


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_http(port: int, path: str, check: object, seconds: float = 20) -> str:
    """GET ``path`` until ``check(body)``; returns the body."""
    deadline = time.monotonic() + seconds
    last = ""
    while time.monotonic() < deadline:
        try:
            status, last = http_get(port, path)
        except OSError:
            status = 0
        if status == 200 and check(last):  # type: ignore[operator]
            return last
        time.sleep(0.1)
    pytest.fail(f"GET {path} never satisfied the check; last:\n{last[-3000:]}")


class Scrapes:
    """A daemon run through mail in, an agent's read and reply, a deferred relay, a snapshot."""

    def __init__(self, tmp_path: Path) -> None:
        self.ports = {k: free_port() for k in ("smtp", "submission", "imap", "metrics")}
        config = tmp_path / "mailgate.toml"
        config.write_text(config_text(tmp_path, self.ports), encoding="utf-8")
        self.daemon = Daemon(config, self.ports["smtp"], tmp_path)
        self.db = tmp_path / "mailgate.db"
        self.scrapes: list[str] = []
        self.health: dict[str, tuple[int, str]] = {}

    def run(self) -> None:
        d, ports = self.daemon, self.ports
        d.start()
        wait_http(ports["metrics"], "/readyz", lambda body: True)
        self.health = {path: http_get(ports["metrics"], path) for path in ("/healthz", "/readyz")}
        with smtplib.SMTP("127.0.0.1", ports["smtp"], timeout=30) as c:
            c.sendmail(
                "klient@example.org",
                ["biuro@acme.test"],
                b"From: klient@example.org\r\nTo: biuro@acme.test\r\nSubject: pytanie\r\n"
                b"Message-ID: <q1@example.org>\r\n\r\nHello?\r\n",
            )
        imap = imaplib.IMAP4("127.0.0.1", ports["imap"], timeout=30)
        imap.login("anna@acme.test", PASSWORD)
        imap.select("INBOX")
        imap.fetch("1", "(BODY[])")
        imap.append("Spam", None, None, b"From: spammer@example.net\r\nSubject: win\r\n\r\nwin\r\n")
        imap.logout()
        with smtplib.SMTP("127.0.0.1", ports["submission"], timeout=30) as c:
            c.login("anna@acme.test", PASSWORD)
            c.sendmail(
                "biuro@acme.test",
                ["klient@example.org"],
                b"From: biuro@acme.test\r\nTo: klient@example.org\r\nSubject: Re: pytanie\r\n"
                b"In-Reply-To: <q1@example.org>\r\nMessage-ID: <r1@acme.test>\r\n\r\nAnswer.\r\n",
            )
        # The tenant's smarthost port is closed: the relay attempt is deferred.
        self.scrapes.append(wait_http(ports["metrics"], "/metrics", lambda body: 'result="deferred"' in body))
        d.cli("snapshot", "create")
        # Database-backed metrics are re-read every 15 s, and at start-up: restart. The spam
        # purge runs at start-up too, unless an instance already ran this hour's purge (the first
        # start did): forget that run, and make the Spam message old enough for the purge (by
        # hand in the database, as nothing in mailgate backdates arrival).
        assert d.signal(signal.SIGTERM) == 0
        with contextlib.closing(sqlite3.connect(self.db)) as db, db:
            backdated = db.execute(
                "UPDATE messages SET received_at = '2000-01-01 00:00:00.000000' WHERE folder_id IN "
                "(SELECT id FROM folders WHERE name = 'Spam')"
            ).rowcount
            forgotten = db.execute("DELETE FROM job_runs WHERE job = 'spam-purge'").rowcount
        assert (backdated, forgotten) == (1, 1)
        d.start()
        self.scrapes.append(
            wait_http(
                ports["metrics"],
                "/metrics",
                lambda body: (
                    "\nmailgate_snapshot_last_success_timestamp_seconds " in body
                    and "\nmailgate_spam_purged_messages_total{" in body
                ),
            )
        )

    def stop(self) -> None:
        self.daemon.stop()


@pytest.fixture(scope="module")
def scrapes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scrapes]:
    s = Scrapes(tmp_path_factory.mktemp("observability"))
    try:
        s.run()
        yield s
    finally:
        s.stop()


# --------------------------------------------------------------------------- alert rules


def test_promtool_checks_the_alert_rules() -> None:
    out = subprocess.run(
        [peer("promtool"), "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(ALERT_NAMES)} rules found" in out.stdout


def test_promtool_unit_tests_of_the_alert_rules_pass() -> None:
    out = subprocess.run(
        [peer("promtool"), "test", "rules", ALERT_TESTS.name],
        cwd=ALERT_TESTS.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_every_alert_has_severity_summary_description_and_tests_both_ways() -> None:
    rules = alert_rules()
    assert set(rules) == ALERT_NAMES
    for name, rule in rules.items():
        assert re.search(r"^\s+severity: (critical|warning)\s*$", rule, re.MULTILINE), name
        assert re.search(r"^\s+summary: \S", rule, re.MULTILINE), name
        assert re.search(r"^\s+description: \S", rule, re.MULTILINE), name
    # Each alert's unit tests include an evaluation where it fires and one where it does not.
    tests = ALERT_TESTS.read_text(encoding="utf-8")
    cases = re.findall(r"alertname: (\w+)\n\s+exp_alerts:( \[\])?", tests)
    fires = {name for name, empty in cases if not empty}
    quiet = {name for name, empty in cases if empty}
    assert (fires, quiet) == (ALERT_NAMES, ALERT_NAMES)


# --------------------------------------------------------------------------- dashboard


def test_dashboard_is_an_importable_grafana_dashboard() -> None:
    d = dashboard()
    assert d["schemaVersion"] >= 39
    assert d["uid"] == "mailgate"
    assert d["id"] is None  # import assigns one
    assert [(i["name"], i["type"], i["pluginId"]) for i in d["__inputs"]] == [
        ("DS_PROMETHEUS", "datasource", "prometheus")
    ]
    (tenant,) = d["templating"]["list"]
    assert tenant["name"] == "tenant"
    assert tenant["query"]["query"] == "label_values(mailgate_storage_used_bytes, tenant)"
    assert tenant["datasource"]["uid"] == "${DS_PROMETHEUS}"
    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels:
        grid = p["gridPos"]
        assert 0 <= grid["x"] <= grid["x"] + grid["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
            # Every per-tenant series follows the tenant selector.
            tenant_metrics = [m for m in METRIC.findall(t["expr"]) if m in TENANT_METRICS]
            filtered = [m for m, matchers in SELECTOR.findall(t["expr"]) if 'tenant=~"$tenant"' in matchers]
            assert tenant_metrics == filtered, f"{p['title']}: {t['expr']}"
    used = {m for e in dashboard_exprs() for m in METRIC.findall(e)}
    assert used >= DASHBOARD_METRICS, f"the dashboard does not show {sorted(DASHBOARD_METRICS - used)}"


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses them: each query as a recording rule, Grafana's variables expanded."""
    rules = [
        f"      - record: dashboard:query_{i}\n        expr: {json.dumps(grafana_to_promql(e))}"
        for i, e in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text("groups:\n  - name: dashboard\n    rules:\n" + "\n".join(rules) + "\n", encoding="utf-8")
    out = subprocess.run(
        [peer("promtool"), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


# --------------------------------------------------------------------------- against the daemon


def test_healthz_and_readyz_answer_200(scrapes: Scrapes) -> None:
    assert scrapes.health == {"/healthz": (200, "ok\n"), "/readyz": (200, "ready\n")}


def test_every_queried_metric_is_exported_with_the_labels_used(scrapes: Scrapes) -> None:
    exported = merge(*scrapes.scrapes, synthetic_exposition())
    queries = all_queries()
    used = {m for q in queries.values() for m in METRIC.findall(q)} | alert_test_series()
    missing = sorted(used - set(exported))
    assert missing == [], f"queried but not exported: {missing}; exported: {sorted(exported)}"
    for where, q in queries.items():
        for name, matchers in SELECTOR.findall(q):
            labels = set(MATCHER.findall(matchers))
            assert labels <= exported[name] | SCRAPE_LABELS, (
                f"{where}: {name} has no {labels - exported[name]}"
            )
        grouping = {g.strip() for clause in GROUPING.findall(q) for g in clause.split(",") if g.strip()}
        available = set().union(*(exported[m] for m in METRIC.findall(q))) | SCRAPE_LABELS | {"le"}
        assert grouping <= available, f"{where}: no metric there has {grouping - available}"


def test_the_daemon_scrape_has_samples_of_what_it_did(scrapes: Scrapes) -> None:
    first, second = scrapes.scrapes
    assert 'mailgate_messages_received_total{source="smtp",tenant="acme"} 1.0' in first
    assert 'mailgate_relay_messages_total{result="deferred",tenant="acme"}' in first
    statements = re.search(r"^mailgate_db_statements_total (\S+)$", first, re.M)
    commits = re.search(r"^mailgate_db_commits_total (\S+)$", first, re.M)
    assert statements
    assert commits
    assert float(statements[1]) > float(commits[1]) > 0
    for line in (
        'mailgate_agent_messages_read_total{agent="anna@acme.test",tenant="acme"} 1.0',
        'mailgate_agent_replies_total{agent="anna@acme.test",tenant="acme"} 1.0',
        'mailgate_agent_first_response_seconds_count{agent="anna@acme.test",tenant="acme"} 1.0',
        'mailgate_relay_queue_messages{tenant="acme"} 1.0',
        'mailgate_storage_limit_bytes{folder="Orders",tenant="acme"}',
        'mailgate_spam_purged_messages_total{tenant="acme"} 1.0',
        "mailgate_up 1.0",
    ):
        assert line in second


def test_promtool_lints_the_exposition_clean(scrapes: Scrapes) -> None:
    for exposition in (*scrapes.scrapes, synthetic_exposition()):
        promtool_check_metrics(exposition)


# --------------------------------------------------------------------------- systemd units


def unit_settings(path: Path) -> dict[str, list[str]]:
    """``{Key: [values]}`` of a unit file (sections merged; comments skipped)."""
    out: dict[str, list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_one_socket_unit_per_listen_key_all_passed_to_the_service() -> None:
    sockets = sorted(SYSTEMD.glob("mailgate-*.socket"))
    found = {}
    for path in sockets:
        key = path.stem.removeprefix("mailgate-")
        s = unit_settings(path)
        assert s["FileDescriptorName"] == [key], path.name
        assert s["Service"] == ["mailgate.service"], path.name
        assert key in ListenSection.model_fields, f"{path.name}: no [listen] key {key!r}"
        found[key] = int(s["ListenStream"][0].rpartition(":")[2])
    assert found == SOCKET_PORTS
    service = unit_settings(SYSTEMD / "mailgate.service")
    passed = {name for value in service["Sockets"] for name in value.split()}
    assert passed == {p.name for p in sockets}
    for key, value in {
        "Type": "notify",
        "ExecStart": "/opt/mailgate/.venv/bin/mailgate -c /etc/mailgate/mailgate.toml run",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "WatchdogSec": "30",
        "CapabilityBoundingSet": "",
        "ProtectSystem": "strict",
    }.items():
        assert service[key] == [value], key


def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    """Optional peer: ``systemd-analyze`` is not among the required ones; skipped without it."""
    analyze = peer_optional("systemd-analyze")
    # The unit's ExecStart= must exist to verify: point it at this checkout's console script.
    mailgate = Path(sys.executable).parent / "mailgate"
    units = []
    for path in [SYSTEMD / "mailgate.service", *sorted(SYSTEMD.glob("mailgate-*.socket"))]:
        text = path.read_text(encoding="utf-8").replace("/opt/mailgate/.venv/bin/mailgate", str(mailgate))
        (tmp_path / path.name).write_text(text, encoding="utf-8")
        units.append(f"./{path.name}")
    out = subprocess.run(
        [analyze, "verify", *units], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    # verify exits 0 on unknown keys and bad values too, with a warning naming the file.
    complaints = [line for line in (out.stdout + out.stderr).splitlines() if "mailgate" in line]
    assert (out.returncode, complaints) == (0, [])


def peer_optional(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (optional peer: the unit files are not verified)")
    return found

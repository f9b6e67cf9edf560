"""The admin HTTP API against a running daemon (issue #14, "Done means" 1 and 2).

A daemon whose file declares no tenant is given one entirely through the API
(tenant, agents, rule, upstream mailbox) and must serve it within 2 seconds
of the last call, without SIGHUP: IMAP login, a relayed message filed by the
rule, the upstream message pulled. ``config export`` applied to a fresh
database shows the same tenant. A tenant administrator manages its own
tenant only. schemathesis checks every operation of ``/openapi.json``
against the running daemon, bounded in examples; since the document gives
request bodies as free objects, hostile values of every key the file knows
are sent too: each is stored and served, or refused with a 400 naming it.
"""

from __future__ import annotations

import imaplib
import json
import re
import smtplib
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from argon2 import PasswordHasher
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway.config import AgentSection, MailboxSection, RuleSection, TenantSection
from tests.conftest import free_port, new_database
from tests.daemon import Daemon
from tests.dovecot import Dovecot

pytestmark = pytest.mark.peers

TOKEN = "operator-token-9f3c1e"
OPERATOR = {"Authorization": f"Bearer {TOKEN}"}
PASSWORD = "agent-password-1"
UPSTREAM = "upstream-secret"
ENV = {"MAILGATE_TEST_UPSTREAM": UPSTREAM}
V1 = "/api/v1"
HASH = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash(PASSWORD)
SERVED_WITHIN = 2.0  # seconds from the last API call to every effect
# Who may do what is decided before the database is asked, and the schema is the same on
# both engines: those tests run on SQLite only. Storing (seats, hostile values) runs on both.
ONE_ENGINE = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


def gateway_config(directory: Path, db_url: str, listen: dict[str, int]) -> Path:
    """A daemon's own settings and no tenant at all; the operator's token in a file."""
    directory.mkdir(parents=True, exist_ok=True)
    token = directory / "admin.token"
    token.write_text(TOKEN + "\n", encoding="utf-8")
    listeners = "\n".join(f'{name} = "127.0.0.1:{port}"' for name, port in listen.items())
    path = directory / "mailgate.toml"
    path.write_text(
        f"""
[gateway]
hostname = "mx.test"
data_dir = "{directory / "var"}"
database_url = "{db_url}"

[listen]
{listeners}

[admin]
token_file = "{token}"
""",
        encoding="utf-8",
    )
    return path


class Api:
    """JSON over HTTP to the admin listener, as one principal (headers or Basic credentials)."""

    def __init__(
        self, base: str, headers: dict[str, str] | None = None, basic: tuple[str, str] | None = None
    ) -> None:
        self.base = base
        self.session = requests.Session()
        self.session.headers.update(headers or {})
        self.session.auth = basic

    def __call__(self, method: str, path: str, body: Any = None) -> requests.Response:
        return self.session.request(method, self.base + V1 + path, json=body, timeout=30)

    def ok(self, method: str, path: str, body: Any = None) -> Any:
        """The answer's JSON; fails the test on anything but 2xx."""
        r = self(method, path, body)
        assert r.ok, f"{method} {path}: {r.status_code} {r.text}"
        return r.json() if r.content else None


@dataclass
class Gateway:
    daemon: Daemon
    ports: dict[str, int]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.ports['admin']}"

    @property
    def operator(self) -> Api:
        return Api(self.base, OPERATOR)

    def as_agent(self, login: str, password: str = PASSWORD) -> Api:
        return Api(self.base, basic=(login, password))

    def serves(self, address: str, seconds: float) -> None:
        """Wait until the daemon serves the tenant of ``address`` (its autoconfiguration answers)."""

        def check() -> bool:
            url = f"{self.base}/mail/config-v1.1.xml"
            return requests.get(url, params={"emailaddress": address}, timeout=10).status_code == 200

        self.daemon.wait_for(f"the tenant of {address} served", check, seconds)


@pytest.fixture
def gateway(tmp_path: Path, db_url: str) -> Iterator[Gateway]:
    """A running daemon without tenants, listening for SMTP, submission, IMAP and the admin API."""
    ports = {name: free_port() for name in ("smtp", "submission", "imap", "admin")}
    d = Daemon(gateway_config(tmp_path, db_url, ports), ports["admin"], tmp_path, env=ENV)
    d.start()
    yield Gateway(d, ports)
    d.stop()


@pytest.fixture
async def fresh_db_url(db_url: str, tmp_path: Path) -> AsyncIterator[str]:
    """Another empty database on the same engine as ``db_url``."""
    engine = "sqlite" if db_url.startswith("sqlite") else "postgresql"
    async with new_database(engine, tmp_path / "fresh.db") as url:
        yield url


def agent(login: str, role: str = "agent", **fields: Any) -> dict[str, Any]:
    return {"login": login, "password": PASSWORD, "role": role, **fields}


ORDERS = {"name": "Orders"}
ORDERS_RULE = {
    "name": "orders",
    "conditions": [{"field": "subject", "op": "contains", "value": "Order #"}],
    "actions": [{"folder": "Orders"}],
    "stop": True,
}

UPSTREAM_MESSAGE = (
    b"From: Supplier <supplier@example.org>\r\n"
    b"To: biuro@acme-upstream.test\r\n"
    b"Subject: waiting upstream\r\n"
    b"Message-ID: <upstream-1@example.org>\r\n"
    b"Date: Mon, 01 Jun 2026 10:00:00 +0000\r\n"
    b"\r\n"
    b"Pulled by mailgate.\r\n"
)

RELAYED_MESSAGE = (
    b"From: Customer <customer@example.org>\r\n"
    b"To: biuro@acme.test\r\n"
    b"Subject: Order #1001\r\n"
    b"Message-ID: <order-1001@example.org>\r\n"
    b"\r\n"
    b"Two boxes, please.\r\n"
)


def pulled(daemon: Daemon) -> bool:
    """The daemon's log reports a message pulled from upstream and stored."""
    events = (json.loads(line) for line in daemon.log.read_text().splitlines() if line.startswith("{"))
    return any(e.get("event") == "ingest.stored" and e.get("source") == "imap" for e in events)


def messages(client: imaplib.IMAP4, folder: str) -> int:
    typ, data = client.status(folder, "(MESSAGES)")
    found = re.search(rb"MESSAGES (\d+)", data[0] if isinstance(data[0], bytes) else b"")
    assert typ == "OK", data
    assert found is not None, data
    return int(found.group(1))


def subjects(client: imaplib.IMAP4, folder: str) -> list[bytes]:
    typ, _ = client.select(folder, readonly=True)
    assert typ == "OK"
    typ, data = client.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert typ == "OK"
    return [part[1].strip() for part in data if isinstance(part, tuple)]


# --------------------------------------------------------------------------- Done means 1


def test_tenant_made_through_the_api_alone_is_served_within_two_seconds_and_survives_export_and_apply(
    gateway: Gateway, dovecot: Dovecot, fresh_db_url: str, tmp_path: Path
) -> None:
    dovecot.add_user("biuro", UPSTREAM)
    dovecot.append("biuro", "INBOX", UPSTREAM_MESSAGE)
    op = gateway.operator
    created = op.ok(
        "POST",
        "/tenants",
        {
            "id": "acme",
            "name": "ACME",
            "domains": ["acme.test"],
            "plan": "3gb",
            "folders": [ORDERS],
        },
    )
    assert created["plan"] == "3gb"
    assert created["state"] == "active"
    op.ok("POST", "/tenants/acme/agents", agent("anna@acme.test", "admin", name="Anna"))
    shown = op.ok("POST", "/tenants/acme/agents", agent("bartek@acme.test", name="Bartek"))
    assert "password" not in shown
    assert "password_hash" not in shown
    op.ok("POST", "/tenants/acme/rules", ORDERS_RULE)
    mailbox = {
        "name": "biuro",
        "host": "127.0.0.1",
        "port": dovecot.port,
        "security": "none",
        "username": "biuro",
        "password_env": "MAILGATE_TEST_UPSTREAM",
        "idle": True,
    }
    op.ok("POST", "/tenants/acme/mailboxes", mailbox)
    last_call = time.monotonic()

    # The mailbox, the last change, is pulled: the daemon serves the whole tenant (waiting for
    # that, not retrying the login: a refused login costs the client a second).
    gateway.daemon.wait_for("the upstream message pulled", lambda: pulled(gateway.daemon), SERVED_WITHIN)
    client = imaplib.IMAP4("127.0.0.1", gateway.ports["imap"], timeout=10)
    try:
        assert client.login("bartek@acme.test", PASSWORD)[0] == "OK"
        with smtplib.SMTP("127.0.0.1", gateway.ports["smtp"], timeout=10) as smtp:
            smtp.ehlo("client.test")
            smtp.mail("customer@example.org")
            assert smtp.rcpt("biuro@acme.test")[0] == 250
            assert smtp.data(RELAYED_MESSAGE)[0] == 250
        gateway.daemon.wait_for(
            "the rule filing the relayed message",
            lambda: messages(client, "Orders") == 1 and messages(client, "INBOX") == 1,
            SERVED_WITHIN,
        )
        took = time.monotonic() - last_call
        assert took < SERVED_WITHIN, f"{took:.2f}s from the last API call"
        assert subjects(client, "Orders") == [b"Subject: Order #1001"]
        assert subjects(client, "INBOX") == [b"Subject: waiting upstream"]
    finally:
        client.logout()

    # Round trip: export, apply into a fresh database, the same tenant show.
    d = gateway.daemon
    exported = tmp_path / "export.toml"
    d.cli("config", "export", "-o", str(exported))
    before = d.cli("tenant", "show", "acme", "--format", "json")
    fresh = Daemon(gateway_config(tmp_path / "fresh", fresh_db_url, {}), 0, tmp_path / "fresh")
    fresh.cli("migrate")
    fresh.cli("config", "apply", str(exported))
    assert fresh.cli("tenant", "show", "acme", "--format", "json") == before
    assert json.loads(before)["tenant"]["agents"][0] == {
        "login": "anna@acme.test",
        "name": "Anna",
        "role": "admin",
    }
    # The password hashes travel too: the export of the copy is the export of the original.
    assert fresh.cli("config", "export") == exported.read_text(encoding="utf-8")


# --------------------------------------------------------------------------- Done means 2


def hashed(login: str, role: str = "agent") -> dict[str, Any]:
    """An agent as the file writes it: with its password's hash."""
    return {"login": login, "password_hash": HASH, "role": role}


@pytest.fixture
def two_tenants(gateway: Gateway) -> Gateway:
    """acme on plan 1.2gb (3 seats) with an admin and an agent; beta with its own admin and rule.

    Each tenant is one change, beta the last: once beta is served, so is acme.
    """
    op = gateway.operator
    acme = [hashed("anna@acme.test", "admin"), hashed("bartek@acme.test")]
    op.ok("POST", "/tenants", {"id": "acme", "domains": ["acme.test"], "plan": "1.2gb", "agents": acme})
    beta = {
        "id": "beta",
        "domains": ["beta.test"],
        "plan": "3gb",
        "agents": [hashed("carl@beta.test", "admin")],
    }
    op.ok("POST", "/tenants", {**beta, "rules": [ORDERS_RULE]})
    gateway.serves("carl@beta.test", 5)
    return gateway


def test_tenant_admin_manages_own_agents_and_rules_within_the_seats(two_tenants: Gateway) -> None:
    anna = two_tenants.as_agent("anna@acme.test")
    assert [t["id"] for t in anna.ok("GET", "/tenants")] == ["acme"]
    assert anna.ok("GET", "/tenants/acme")["plan"] == "1.2gb"
    assert [a["login"] for a in anna.ok("GET", "/tenants/acme/agents")] == [
        "anna@acme.test",
        "bartek@acme.test",
    ]

    # Agents: add the third seat, then one more is refused naming the plan.
    r = anna("POST", "/tenants/acme/agents", agent("cora@acme.test", footer="Cora, ACME"))
    assert r.status_code == 201, r.text
    r = anna("POST", "/tenants/acme/agents", agent("dora@acme.test"))
    assert r.status_code == 409, r.text
    assert "plan 1.2gb" in r.json()["error"]
    assert "3 seats" in r.json()["error"]
    assert r.json()["field"] == "agents"
    # Read at once, not a second later when the daemon serves it: the API reads the database.
    assert len(anna.ok("GET", "/tenants/acme/agents")) == 3
    changed = anna.ok("PATCH", "/tenants/acme/agents/cora@acme.test", {"name": "Cora", "footer": "-- Cora"})
    assert (changed["name"], changed["footer"]) == ("Cora", "-- Cora")
    assert anna.ok("GET", "/tenants/acme/agents/cora@acme.test")["name"] == "Cora"
    assert anna("DELETE", "/tenants/acme/agents/cora@acme.test").status_code == 204
    assert anna("GET", "/tenants/acme/agents/cora@acme.test").status_code == 404

    # Rules: add, change, move, remove.
    assert anna("POST", "/tenants/acme/rules", ORDERS_RULE).status_code == 201
    spam = {
        "name": "spam",
        "conditions": [{"field": "sender", "op": "contains", "value": "@spam.test"}],
        "actions": [{"spam": True}],
    }
    assert anna("POST", "/tenants/acme/rules", spam).status_code == 201, "spam rule"
    anna.ok("PATCH", "/tenants/acme/rules/orders", {"match": "all"})
    moved = anna.ok("POST", "/tenants/acme/rules/spam/move", {"position": 1})
    assert [(x["name"], x.get("match", "any")) for x in moved] == [("spam", "any"), ("orders", "all")]
    assert anna("DELETE", "/tenants/acme/rules/orders").status_code == 204
    assert [x["name"] for x in anna.ok("GET", "/tenants/acme/rules")] == ["spam"]


@ONE_ENGINE
def test_tenant_admin_gets_403_on_another_tenant_and_on_operator_actions(two_tenants: Gateway) -> None:
    op, anna = two_tenants.operator, two_tenants.as_agent("anna@acme.test")
    beta_before = op.ok("GET", "/tenants/beta")
    forbidden = [
        ("GET", "/tenants/beta", None),
        ("PATCH", "/tenants/beta", {"name": "Taken"}),
        ("DELETE", "/tenants/beta", None),
        ("GET", "/tenants/beta/agents", None),
        ("POST", "/tenants/beta/agents", agent("mole@beta.test")),
        ("GET", "/tenants/beta/agents/carl@beta.test", None),
        ("PATCH", "/tenants/beta/agents/carl@beta.test", {"role": "agent"}),
        ("DELETE", "/tenants/beta/agents/carl@beta.test", None),
        ("GET", "/tenants/beta/rules", None),
        ("POST", "/tenants/beta/rules", {**ORDERS_RULE, "name": "mine"}),
        ("GET", "/tenants/beta/rules/orders", None),
        ("PATCH", "/tenants/beta/rules/orders", {"stop": False}),
        ("POST", "/tenants/beta/rules/orders/move", {"position": 1}),
        ("DELETE", "/tenants/beta/rules/orders", None),
        ("GET", "/tenants/nonexistent", None),
        # The operator's own, even on the admin's tenant:
        ("POST", "/tenants", {"id": "gamma", "domains": ["gamma.test"]}),
        ("PATCH", "/tenants/acme", {"plan": "12gb"}),
        ("POST", "/tenants/acme/renew", {"until": "2030-01-01"}),
        ("POST", "/tenants/acme/suspend", None),
        ("POST", "/tenants/acme/resume", None),
        ("DELETE", "/tenants/acme", None),
        ("GET", "/tenants/acme/mailboxes", None),
        (
            "POST",
            "/tenants/acme/mailboxes",
            {"name": "x", "host": "127.0.0.1", "username": "x", "password_env": "X"},
        ),
        ("DELETE", "/tenants/acme/mailboxes/x", None),
    ]
    for method, path, body in forbidden:
        r = anna(method, path, body)
        assert r.status_code == 403, f"{method} {path}: {r.status_code} {r.text}"
        assert r.json()["error"]
    assert op.ok("GET", "/tenants/beta") == beta_before
    assert op.ok("GET", "/tenants/acme")["plan"] == "1.2gb"


@ONE_ENGINE
def test_plain_agents_wrong_passwords_and_no_credentials_are_refused(two_tenants: Gateway) -> None:
    base = two_tenants.base
    r = Api(base, basic=("bartek@acme.test", PASSWORD))("GET", "/tenants/acme")
    assert r.status_code == 403, r.text
    assert "not a tenant administrator" in r.json()["error"]
    r = Api(base, basic=("anna@acme.test", "wrong-password"))("GET", "/tenants/acme")
    assert r.status_code == 401, r.text
    assert r.headers["WWW-Authenticate"].startswith("Basic")
    r = Api(base)("GET", "/tenants/acme")
    assert r.status_code == 401, r.text
    assert r.json()["error"]
    r = Api(base, {"Authorization": "Bearer not-the-token"})("GET", "/tenants")
    assert r.status_code == 401, r.text


# --------------------------------------------------------------------------- schemathesis, hostile values

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
MAILBOX = {"name": "biuro", "host": "127.0.0.1", "port": 1, "security": "none", "username": "b"}
# The seeded items, named in the fixed path parameters of a second schemathesis pass.
SEEDED = {"agents": "anna@acme.test", "rules": "orders", "mailboxes": "biuro"}


def seed(gateway: Gateway) -> None:
    """Tenant acme (no plan: no seat limit) with an admin, a folder, a rule and a paused mailbox."""
    acme = {
        "id": "acme",
        "domains": ["acme.test"],
        "agents": [hashed("anna@acme.test", "admin")],
        "folders": [ORDERS],
        "rules": [ORDERS_RULE],
        "mailboxes": [{**MAILBOX, "password_env": "MAILGATE_TEST_UPSTREAM", "idle": False}],
    }
    gateway.operator.ok("POST", "/tenants", acme)


@schemathesis.serializer("message/rfc822")
def rfc822_serializer(ctx: schemathesis.SerializationContext, value: Any) -> dict[str, Any]:
    """A template's body: the generated bytes (or text) as they are."""
    return {"data": value if isinstance(value, bytes) else str(value).encode("utf-8", "surrogatepass")}


def fixed_parameters(operation: schemathesis.APIOperation) -> dict[str, str] | None:
    """Path parameters naming the seeded tenant and item (None: keep deleting acme out of it)."""
    path = operation.path
    if "{tenant_id}" not in path or (path.endswith("{tenant_id}") and operation.method.upper() == "DELETE"):
        return None
    fixed = {"tenant_id": "acme"}
    if "{name}" in path:
        fixed["name"] = SEEDED[path.split("/")[5]]
    return fixed


@ONE_ENGINE
def test_openapi_operations_answer_no_500_and_conform_to_the_schema(gateway: Gateway) -> None:
    seed(gateway)
    schema = schemathesis.openapi.from_url(gateway.base + "/openapi.json", timeout=10)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 29
    for operation in operations:
        # Generated path parameters (mostly no such tenant), then the seeded tenant's items.
        passes: list[tuple[dict[str, str] | None, int]] = [(None, 15)]
        if (fixed := fixed_parameters(operation)) is not None:
            passes.append((fixed, 25))
        for path_parameters, examples in passes:
            strategy = operation.as_strategy(path_parameters=path_parameters)

            @settings(
                max_examples=examples,
                deadline=5000,
                phases=[Phase.explicit, Phase.generate, Phase.shrink],
                suppress_health_check=list(HealthCheck),
                database=None,
            )
            @given(case=strategy)
            def run(case: schemathesis.Case) -> None:
                case.call_and_validate(base_url=gateway.base, headers=OPERATOR, checks=CHECKS, timeout=10)

            run()


# Values of every kind for every key the API takes, with the edges where storage or the
# plan lifecycle has limits: 64-bit columns, bounded text columns, text PostgreSQL cannot
# hold (NUL), text that is not Unicode (lone surrogates), dates at the end of the calendar.
EDGES = st.sampled_from(
    [
        2**63 - 1,
        2**63,
        -(2**63) - 1,
        10**23,
        "9223372036854775808 B",
        "9999-12-31",
        "x" * 400,
        "a\x00b",
        "\ud800",
        "",
    ]
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(exclude_categories=()), max_size=12)
    | EDGES
)
KEYS = st.text(max_size=8) | EDGES.map(str)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
    max_leaves=6,
)


def keys(model: type[BaseModel], *left_out: str) -> list[str]:
    """The model's keys as the file writes them."""
    return sorted(
        f.alias or name for name, f in model.model_fields.items() if (f.alias or name) not in left_out
    )


TARGETS = [
    ("PATCH", "/tenants/acme", keys(TenantSection, "id", "agents", "rules", "mailboxes", "folders")),
    ("PATCH", "/tenants/acme/agents/anna@acme.test", [*keys(AgentSection, "login"), "password"]),
    ("PATCH", "/tenants/acme/rules/orders", keys(RuleSection, "name")),
    ("PATCH", "/tenants/acme/mailboxes/biuro", keys(MailboxSection, "name")),
    ("POST", "/tenants", keys(TenantSection, "id", "domains")),
    ("POST", "/tenants/acme/renew", ["until"]),
]


LATE = "9999-12-31"
# (what, method, path, body, the field named in the 400)
REFUSED: list[tuple[str, str, str, dict[str, Any], str | None]] = [
    (
        "poll interval past timedelta",
        "PATCH",
        "/tenants/acme/mailboxes/biuro",
        {"poll_interval": 8.64e13},
        "mailboxes[0].poll_interval",
    ),
    ("size past float", "PATCH", "/tenants/acme", {"quota": "9" * 400 + " GB"}, "quota"),
    ("quota over 64 bits", "PATCH", "/tenants/acme", {"quota": 10**23}, "quota"),
    ("quota text over 64 bits", "PATCH", "/tenants/acme", {"quota": "9223372036854775808 B"}, "quota"),
    (
        "folder quota over 64 bits",
        "POST",
        "/tenants",
        {"id": "big", "domains": ["big.test"], "folders": [{"name": "X", "quota": 2**63}]},
        "folders[0].quota",
    ),
    ("NUL in a name", "PATCH", "/tenants/acme", {"name": "a\x00b"}, "name"),
    ("lone surrogate in a name", "PATCH", "/tenants/acme", {"name": "\ud800"}, "name"),
    ("lone surrogate in a key", "PATCH", "/tenants/acme", {"\ud800": 1}, None),
    ("tenant name over its column", "PATCH", "/tenants/acme", {"name": "x" * 256}, "name"),
    (
        "agent name over its column",
        "PATCH",
        "/tenants/acme/agents/anna@acme.test",
        {"name": "x" * 256},
        "agents[0].name",
    ),
    (
        "agent login over its column",
        "POST",
        "/tenants/acme/agents",
        {"login": "x" * 320 + "@acme.test", "password_hash": HASH},
        "agents[1].login",
    ),
]


def test_values_storage_or_the_lifecycle_cannot_hold_are_refused_with_400_and_none_answers_500(
    gateway: Gateway,
) -> None:
    seed(gateway)
    op = gateway.operator
    before = op.ok("GET", "/tenants")
    for what, method, path, body, field in REFUSED:
        r = op(method, path, body)
        assert r.status_code == 400, f"{what}: {r.status_code} {r.text}"
        assert r.json()["field"] == field, f"{what}: {r.text}"
    assert op.ok("GET", "/tenants") == before
    # The calendar's last day is a valid end: the days after it stop there instead of overflowing.
    late = op.ok("PATCH", "/tenants/acme", {"paid_until": LATE})
    assert (late["ends"], late["deleted_on"]) == (LATE, LATE)
    assert op.ok("POST", "/tenants/acme/renew", {"until": "2030-01-31"})["ends"] == "2030-01-31"
    for method in ("GET", "PATCH", "DELETE"):  # no such tenant, on every engine
        r = op(method, "/tenants/a%00b", {} if method == "PATCH" else None)
        assert r.status_code == 404, f"{method}: {r.status_code} {r.text}"

    # Then any value of any key: stored (and then served, shown, listed) or refused.
    made = iter(range(10**6))

    @settings(
        max_examples=100,
        deadline=5000,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(target=st.sampled_from(TARGETS), data=st.data())
    def run(target: tuple[str, str, list[str]], data: st.DataObject) -> None:
        method, path, fields = target
        body = {data.draw(st.sampled_from(fields), "key"): data.draw(VALUES, "value")}
        if path == "/tenants":
            n = next(made)
            body |= {"id": f"t{n}", "domains": [f"t{n}.test"]}
        r = op(method, path, body)
        assert r.status_code in (200, 201, 400, 409), f"{method} {path} {body!r}: {r.status_code} {r.text}"
        assert isinstance(r.json(), dict)
        if r.ok:
            listed = op("GET", "/tenants")
            assert listed.status_code == 200, f"after {method} {path} {body!r}: {listed.text}"

    run()


def test_a_tenant_admin_adds_templates_over_the_api_that_every_agent_reads_over_imap(
    two_tenants: Gateway,
) -> None:
    template = b"From: anna@acme.test\r\nSubject: Thanks for your order\r\n\r\nDear customer,\r\n"
    url = f"{two_tenants.base}{V1}/tenants/acme/templates"
    headers = {"Content-Type": "message/rfc822"}
    made = requests.post(url, data=template, headers=headers, auth=("anna@acme.test", PASSWORD), timeout=30)
    assert made.status_code == 201, made.text
    uid = made.json()["uid"]
    refused = requests.post(
        url, data=template, headers=headers, auth=("bartek@acme.test", PASSWORD), timeout=30
    )
    assert refused.status_code == 403  # a plain agent changes templates nowhere
    foreign = requests.post(
        f"{two_tenants.base}{V1}/tenants/beta/templates", data=template, headers=headers,
        auth=("anna@acme.test", PASSWORD), timeout=30,
    )  # fmt: skip
    assert foreign.status_code == 403
    listed = two_tenants.as_agent("anna@acme.test").ok("GET", "/tenants/acme/templates")
    assert [(t["uid"], t["subject"]) for t in listed] == [(uid, "Thanks for your order")]
    client = imaplib.IMAP4("127.0.0.1", two_tenants.ports["imap"], timeout=10)
    try:
        client.login("bartek@acme.test", PASSWORD)
        assert subjects(client, "Templates") == [b"Subject: Thanks for your order"]
    finally:
        client.logout()
    gone = two_tenants.as_agent("anna@acme.test")("DELETE", f"/tenants/acme/templates/{uid}")
    assert gone.status_code == 204
    assert two_tenants.as_agent("anna@acme.test").ok("GET", "/tenants/acme/templates") == []


def test_autoconfig_and_autodiscover_answer_over_http_for_an_agents_address(two_tenants: Gateway) -> None:
    base = two_tenants.base
    for path in ("/mail/config-v1.1.xml", "/.well-known/autoconfig/mail/config-v1.1.xml"):
        r = requests.get(base + path, params={"emailaddress": "anna@acme.test"}, timeout=10)
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/xml")
        incoming = ET.fromstring(r.content).find("emailProvider/incomingServer")  # noqa: S314 (our answer)
        assert incoming is not None
        assert incoming.findtext("port") == str(two_tenants.ports["imap"])
    request = (
        b'<?xml version="1.0" encoding="utf-8"?><Autodiscover xmlns="http://schemas.microsoft.com/'
        b'exchange/autodiscover/outlook/requestschema/2006"><Request><EMailAddress>anna@acme.test'
        b"</EMailAddress><AcceptableResponseSchema>http://schemas.microsoft.com/exchange/autodiscover/"
        b"outlook/responseschema/2006a</AcceptableResponseSchema></Request></Autodiscover>"
    )
    r = requests.post(base + "/autodiscover/autodiscover.xml", data=request, timeout=10)
    assert r.status_code == 200
    ns = {"a": "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"}
    protocols = ET.fromstring(r.content).iterfind(".//a:Protocol", ns)  # noqa: S314 (our answer)
    ports = {p.findtext("a:Type", namespaces=ns): p.findtext("a:Port", namespaces=ns) for p in protocols}
    assert ports["IMAP"] == str(two_tenants.ports["imap"])
    unknown = requests.get(base + "/mail/config-v1.1.xml", params={"emailaddress": "x@else.test"}, timeout=10)
    assert unknown.status_code == 404


def test_a_template_uid_past_32_bits_is_a_400_not_a_500(two_tenants: Gateway) -> None:
    """schemathesis: DELETE …/templates/195353567912991948800 overflowed the database's integer."""
    r = two_tenants.operator("DELETE", "/tenants/acme/templates/195353567912991948800")
    assert r.status_code == 400
    assert r.json()["field"] == "uid"

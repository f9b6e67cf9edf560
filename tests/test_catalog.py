"""Tenants as data: validated edits, plan limits, the file's reconcile, export/apply, the CLI.

On SQLite and PostgreSQL (the ``store`` fixture).
"""

from __future__ import annotations

import json
import subprocess
from datetime import date
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from sqlalchemy import select

from gateway import tenants
from gateway.config import Config, load_config, parse_config
from storage import catalog
from storage.blobs import BlobStore
from storage.db import Database
from storage.models import Agent, Domain, Folder, Tenant
from tests.conftest import config_dict
from tests.test_cli import mailgate_command

HASH = "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$3rPMAh4bbGFm3DM2lpGkfTxrRmCsK4zN1OvrJbYKtgQ"


def agent(login: str, **kw: Any) -> dict[str, Any]:
    return {"login": login, "password_hash": HASH, **kw}


async def add(db: Database, config: Config, tenant_id: str, **data: Any) -> Any:
    body = {"id": tenant_id, "domains": [f"{tenant_id}.test"], **data}
    return await tenants.edit(db, config, tenant_id, tenants.creating(body, config.plans), create=True)


async def test_a_new_tenant_gets_its_rows_and_default_folders(
    config: Config, store: tuple[Database, BlobStore]
) -> None:
    db, _ = store
    await add(db, config, "gamma", plan="3gb", agents=[agent("ola@gamma.test")])
    async with db.read() as s:
        row = await s.get(Tenant, "gamma")
        domains = (await s.scalars(select(Domain.name).where(Domain.tenant_id == "gamma"))).all()
        agents = (await s.scalars(select(Agent.login).where(Agent.tenant_id == "gamma"))).all()
        folders = set((await s.scalars(select(Folder.name).where(Folder.tenant_id == "gamma"))).all())
    assert row is not None
    assert row.quota_bytes == 3 * 10**9  # the plan's quota
    assert domains == ["gamma.test"]
    assert agents == ["ola@gamma.test"]
    assert {"INBOX", "Sent", "Spam", "Templates"} <= folders


async def test_every_change_moves_the_generation_and_no_change_does_not(
    config: Config, store: tuple[Database, BlobStore]
) -> None:
    db, _ = store
    async with db.read() as s:
        before = await catalog.generation(s)
    await add(db, config, "gamma")
    await tenants.edit(db, config, "gamma", tenants.set_fields({"name": "Gamma"}))
    async with db.read() as s:
        after = await catalog.generation(s)
    assert after == before + 2
    await tenants.apply(db, config)  # the file says what the database already holds
    async with db.read() as s:
        assert await catalog.generation(s) == after


@pytest.mark.parametrize(
    ("change", "status", "field"),
    [
        (tenants.set_fields({"max_attachments": "many"}), 400, "max_attachments"),
        (tenants.set_fields({"plan": "gold"}), 400, "plan"),
        (tenants.set_fields({"domains": ["acme.test"]}), 409, "domains[0]"),  # acme's domain
        (tenants.add_item("agents", agent("anna@acme.test")), 409, "agents[0].login"),  # acme's agent
        (tenants.add_item("agents", {"login": "x@gamma.test"}), 400, "agents[0].password_hash"),
        (tenants.add_item("rules", {"name": "r", "actions": [{"folder": 1}]}), 400, "rules[0].actions[0]"),
        (tenants.remove_item("rules", "nope"), 404, "rules"),
        (tenants.set_fields({"agents": []}), 400, "agents"),
    ],
)
async def test_a_refused_change_names_its_field_and_changes_nothing(
    config: Config, store: tuple[Database, BlobStore], change: tenants.Change, status: int, field: str
) -> None:
    db, _ = store
    await add(db, config, "gamma")
    async with db.read() as s:
        before = await catalog.definition(s, "gamma")
    with pytest.raises(tenants.CatalogError) as e:
        await tenants.edit(db, config, "gamma", change)
    assert (e.value.status, e.value.field) == (status, field)
    async with db.read() as s:
        assert await catalog.definition(s, "gamma") == before


async def test_seats_refuse_exactly_the_first_agent_over_the_plan(
    config: Config, store: tuple[Database, BlobStore]
) -> None:
    db, _ = store
    await add(db, config, "gamma", plan="1.2gb")  # 3 seats
    for n in range(3):
        await tenants.edit(db, config, "gamma", tenants.add_item("agents", agent(f"a{n}@gamma.test")))
    with pytest.raises(tenants.CatalogError) as e:
        await tenants.edit(db, config, "gamma", tenants.add_item("agents", agent("a3@gamma.test")))
    assert e.value.status == 409
    assert "plan 1.2gb has 3 seats" in e.value.message


async def test_lowering_seats_is_refused_unless_forced_which_disables_the_newest(
    config: Config, store: tuple[Database, BlobStore]
) -> None:
    db, _ = store
    agents = [agent(f"a{n}@gamma.test") for n in range(4)]
    await add(db, config, "gamma", plan="3gb", agents=agents)
    with pytest.raises(tenants.CatalogError) as e:
        await tenants.edit(db, config, "gamma", tenants.set_fields({"seats": 2}))
    assert (e.value.status, e.value.field) == (409, "seats")
    t = await tenants.edit(db, config, "gamma", tenants.set_fields({"seats": 2}), force=True)
    assert [a.login for a in t.agents if a.disabled] == ["a2@gamma.test", "a3@gamma.test"]
    async with db.read() as s:
        active = (await s.scalars(select(Agent.login).where(Agent.tenant_id == "gamma", Agent.active))).all()
    assert sorted(active) == ["a0@gamma.test", "a1@gamma.test"]
    # A plan with fewer seats is a lowering too.
    await add(db, config, "zeta", plan="3gb", agents=[agent(f"a{n}@zeta.test") for n in range(4)])
    with pytest.raises(tenants.CatalogError) as e:
        await tenants.edit(db, config, "zeta", tenants.set_fields({"plan": "1.2gb"}))
    assert "plan 1.2gb has 3 seats but 4 agents are enabled" in e.value.message


async def test_mailboxes_beyond_the_plan_are_refused(
    config: Config, store: tuple[Database, BlobStore]
) -> None:
    db, _ = store
    await add(db, config, "gamma", plan="trial")  # one upstream mailbox
    box = {"host": "127.0.0.1", "security": "none", "username": "u", "password_env": "X"}
    await tenants.edit(db, config, "gamma", tenants.add_item("mailboxes", {"name": "one", **box}))
    with pytest.raises(tenants.CatalogError) as e:
        await tenants.edit(db, config, "gamma", tenants.add_item("mailboxes", {"name": "two", **box}))
    assert e.value.message == "plan trial allows 1 upstream mailboxes"


async def test_a_trial_plan_starts_a_trial(config: Config, store: tuple[Database, BlobStore]) -> None:
    db, _ = store
    t = await add(db, config, "gamma", plan="trial")
    assert t.trial_until is not None
    assert (t.trial_until - date.today()).days == 59  # 60 days, today included


async def test_rules_move_in_order(config: Config, store: tuple[Database, BlobStore]) -> None:
    db, _ = store
    rules = [{"name": n, "actions": [{"folder": n}]} for n in ("a", "b", "c")]
    await add(db, config, "gamma", rules=rules)
    t = await tenants.edit(db, config, "gamma", tenants.move_item("rules", "c", 1))
    assert [r.name for r in t.rules] == ["c", "a", "b"]
    assert [r.name for r in t.ruleset.rules] == ["c", "a", "b"]


async def test_export_applies_unchanged_into_a_fresh_database(
    tmp_path: Path, config: Config, store: tuple[Database, BlobStore]
) -> None:
    db, _ = store
    mailbox = {
        "name": "biuro",
        "host": "127.0.0.1",
        "security": "none",
        "username": "u",
        "password_env": "X",
        "poll_interval": "90s",
        "folders": {"INBOX": "INBOX", "Junk": "Spam"},
    }
    rule = {
        "name": "fw",
        "conditions": [{"field": "size", "op": "gt", "value": "1 MB"}],
        "actions": [{"forward": "x@else.test", "rewrite_from": False}, {"seen": True}],
    }
    await add(db, config, "gamma", plan="6gb", paid_until="2027-05-01", mailboxes=[mailbox], rules=[rule])
    served = await tenants.load(db, config)
    text = tenants.export(served)
    again = load_config(_write(tmp_path / "export.toml", text))
    assert tenants.export(again) == text
    assert [tenants.document(t) for t in again.tenants] == [tenants.document(t) for t in served.tenants]


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def mailgate(config: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*mailgate_command(), "-c", str(config), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_manages_tenants_agents_rules_and_mailboxes(tmp_path: Path) -> None:
    data = config_dict(tmp_path)
    data["tenants"] = []
    path = _write(tmp_path / "mailgate.toml", tomli_w.dumps(data))
    assert mailgate(path, "migrate").returncode == 0

    def ok(*args: str, stdin: str = "") -> str:
        done = mailgate(path, *args, stdin=stdin)
        assert done.returncode == 0, done.stderr
        return done.stdout

    ok("tenant", "add", "delta", "--domain", "delta.test", "--plan", "1.2gb", "--paid-until", "2030-01-31")
    ok("agent", "add", "--tenant", "delta", "ewa@delta.test", "--role", "admin", stdin="pw-ewa\n")
    ok("agent", "add", "--tenant", "delta", "jan@delta.test", "--footer", "Jan\nDelta", stdin="pw-jan\n")
    ok(
        "rule",
        "add",
        "--tenant",
        "delta",
        "orders",
        "--if",
        "subject",
        "contains",
        "order",
        "--folder",
        "Orders",
    )
    ok(
        "rule",
        "add",
        "--tenant",
        "delta",
        "vip",
        "--if",
        "sender",
        "is",
        "vip@x.test",
        "--flag",
        "--position",
        "1",
    )
    box = ("--host", "127.0.0.1", "--security", "none", "--username", "u", "--password-env", "X")
    ok("mailbox", "add", "--tenant", "delta", "biuro", *box)
    ok("tenant", "set", "delta", "max_attachments=5", 'quota="2 GB"', "name=Delta Ltd")
    shown = json.loads(ok("tenant", "show", "delta", "--format", "json"))
    t = shown["tenant"]
    assert t["max_attachments"] == 5
    assert t["quota"] == 2 * 10**9
    assert t["name"] == "Delta Ltd"
    assert [a["login"] for a in t["agents"]] == ["ewa@delta.test", "jan@delta.test"]
    assert all("password_hash" not in a for a in t["agents"])  # never shown
    assert [r["name"] for r in t["rules"]] == ["vip", "orders"]
    assert shown["state"] == "active"
    rules = json.loads(ok("rule", "list", "--tenant", "delta", "--format", "json"))
    assert rules[0]["actions"] == [{"flag": True}]
    listing = json.loads(ok("tenant", "list", "--format", "json"))
    assert listing[0]["id"] == "delta"
    assert listing[0]["seats"] == 3

    ok("tenant", "suspend", "delta")
    assert json.loads(ok("tenant", "show", "delta", "--format", "json"))["state"] == "read_only"
    ok("tenant", "resume", "delta")
    ok("tenant", "renew", "delta", "--until", "2031-01-31")
    shown = json.loads(ok("tenant", "show", "delta", "--format", "json"))
    assert shown["state"] == "active"
    assert shown["ends"] == "2031-01-31"
    assert shown["renewed_at"] is not None

    ok("agent", "passwd", "--tenant", "delta", "jan@delta.test", stdin="new-pw\n")
    ok("agent", "remove", "--tenant", "delta", "jan@delta.test")
    ok("rule", "move", "--tenant", "delta", "orders", "--to", "1")
    ok("rule", "remove", "--tenant", "delta", "vip")
    ok("mailbox", "remove", "--tenant", "delta", "biuro")
    plans = json.loads(ok("plan", "list", "--format", "json"))
    assert {p["name"] for p in plans} >= {"1.2gb", "3gb", "6gb", "12gb", "trial"}
    assert json.loads(ok("plan", "show", "3gb", "--format", "json"))["quota"] == 3 * 10**9

    export = ok("config", "export")
    assert 'id = "delta"' in export

    refused = mailgate(path, "tenant", "set", "delta", "max_attachments=-1")
    assert refused.returncode == 1
    assert refused.stderr.startswith("error: max_attachments: ")
    refused = mailgate(path, "tenant", "delete", "delta")
    assert refused.returncode == 1
    assert "--yes" in refused.stderr
    assert "delta" in ok("tenant", "delete", "delta", "--yes")
    assert json.loads(ok("tenant", "list", "--format", "json")) == []


def test_cli_seats_refuse_the_first_agent_over_the_plan_naming_it(tmp_path: Path) -> None:
    data = config_dict(tmp_path)
    data["tenants"] = [{"id": "eps", "domains": ["eps.test"], "plan": "1.2gb"}]
    path = _write(tmp_path / "mailgate.toml", tomli_w.dumps(data))
    assert mailgate(path, "migrate").returncode == 0
    for n in range(3):
        done = mailgate(path, "agent", "add", "--tenant", "eps", f"a{n}@eps.test", stdin="pw\n")
        assert done.returncode == 0, done.stderr
    done = mailgate(path, "agent", "add", "--tenant", "eps", "a3@eps.test", stdin="pw\n")
    assert done.returncode == 1
    assert "plan 1.2gb has 3 seats" in done.stderr


def test_config_apply_prune_deletes_only_what_the_file_does_not_declare(tmp_path: Path) -> None:
    data = config_dict(tmp_path)
    path = _write(tmp_path / "mailgate.toml", tomli_w.dumps(data))
    assert mailgate(path, "migrate").returncode == 0
    only = {"tenants": [t for t in data["tenants"] if t["id"] == "acme"]}
    declared = _write(tmp_path / "acme.toml", tomli_w.dumps(only))
    done = mailgate(path, "config", "apply", str(declared))
    assert done.returncode == 0, done.stderr
    ids = {t["id"] for t in json.loads(mailgate(path, "tenant", "list", "--format", "json").stdout)}
    assert ids == {t["id"] for t in data["tenants"]}  # nothing deleted without --prune
    done = mailgate(path, "config", "apply", str(declared), "--prune")
    assert done.returncode == 0, done.stderr
    assert "deleted" in done.stdout
    ids = {t["id"] for t in json.loads(mailgate(path, "tenant", "list", "--format", "json").stdout)}
    assert ids == {"acme"}


def test_file_tenants_still_validate_with_the_same_errors() -> None:
    data = config_dict(Path("/tmp"))
    data["tenants"][0]["plan"] = "gold"
    with pytest.raises(Exception, match=r"tenants\[0\]\.plan: unknown plan 'gold'"):
        parse_config(data)


async def test_only_declared_plans_are_stored_so_files_without_them_change_nothing(
    tmp_path: Path, db_url: str, store: tuple[Database, BlobStore]
) -> None:
    db, _ = store
    data = config_dict(tmp_path, db_url)
    data["plans"] = {"big": {"quota": "50 GB", "seats": 40}}
    await tenants.apply(db, parse_config(data))
    await tenants.apply(db, parse_config(config_dict(tmp_path, db_url)))  # another instance's file: no plans
    async with db.read() as s:
        _, stored = await catalog.definitions(s)
    assert stored == {"big": {"quota": 50 * 10**9, "seats": 40}}
    served = await tenants.load(db, parse_config(config_dict(tmp_path, db_url)))
    assert served.plans["big"].seats == 40
    assert served.plans["3gb"].seats == 5


async def test_a_file_tenant_whose_plan_ended_is_not_brought_back_after_its_deletion(
    tmp_path: Path, db_url: str, store: tuple[Database, BlobStore]
) -> None:
    db, _ = store
    data = config_dict(tmp_path, db_url)
    data["tenants"][1] |= {"plan": "3gb", "paid_until": "2020-01-31"}  # long past its read-only days
    async with db.write() as s:
        await catalog.delete_tenant(s, "beta")  # as the lifecycle did
    changes = await tenants.apply(db, parse_config(data))
    assert any(c.startswith("skipped tenant beta: plan 3gb ended on 2020-01-31") for c in changes)
    async with db.read() as s:
        assert await s.get(Tenant, "beta") is None

"""The catalog commands of the CLI: ``tenant``, ``agent``, ``rule``, ``mailbox``, ``plan``, ``config``.

Each is a change of one tenant's definition through :func:`gateway.tenants.edit`,
the same as the admin API makes: running daemons see it within a second.
Values given as ``KEY=VALUE`` are read as TOML values when they parse as one
(``max_attachments=5``, ``domains=["a.test"]``, ``quota="6 GB"``) and as text
otherwise (``name=ACME``); ``KEY=`` resets a key to its default.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
import tomllib
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from gateway import tenants
from gateway.config import Config, ConfigError, TenantSection, load_config
from gateway.plans import standing
from storage import catalog
from storage.db import Database

FORMATS = ("table", "json")


def _value(text: str) -> Any:
    if text == "":
        return None
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _pairs(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise tenants.CatalogError(400, f"expected KEY=VALUE, got {item!r}")
        out[key.strip()] = _value(value.strip())
    return out


def _password(args: argparse.Namespace) -> str:
    """The password from stdin (one line), or asked twice at a terminal."""
    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise tenants.CatalogError(400, "the passwords differ", "password")
        return password
    return sys.stdin.readline().rstrip("\r\n")


def _print(data: Any, fmt: str) -> None:
    if fmt == "json":
        print(json.dumps(data, ensure_ascii=False, indent=2, default=str))
        return
    if isinstance(data, list):
        from gateway.cli import print_rows

        print_rows(data, list(data[0]) if data else [], "table")
        return
    for key, value in data.items():
        shown = (
            value if isinstance(value, str | int | float) or value is None else json.dumps(value, default=str)
        )
        print(f"{key}: {'-' if shown is None else shown}")


async def _with_db(config: Config, work: Callable[[Database], Awaitable[Any]]) -> Any:
    from gateway.cli import open_for_reading

    db = await open_for_reading(config)
    try:
        return await work(db)
    finally:
        await db.close()


def _run(config: Config, work: Callable[[Database], Awaitable[Any]]) -> int:
    try:
        asyncio.run(_with_db(config, work))
    except tenants.CatalogError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def summary(t: TenantSection, used: int | None) -> dict[str, Any]:
    """A tenant's row in ``tenant list``."""
    st = standing(t)
    return {
        "id": t.id,
        "name": t.name,
        "plan": t.plan,
        "state": st.state,
        "ends": st.ends.isoformat() if st.ends else None,
        "agents": sum(not a.disabled for a in t.agents),
        "seats": t.effective_seats or None,
        "used_bytes": used,
        "quota": t.effective_quota,
    }


async def details(db: Database, t: TenantSection) -> dict[str, Any]:
    """``tenant show``: the definition (without password hashes), where it stands, the steps taken."""
    async with db.read() as s:
        steps = (await catalog.lifecycle(s)).get(t.id, {})
    st = standing(t)
    return {
        "tenant": tenants.show(t),
        "state": st.state,
        "ends": st.ends.isoformat() if st.ends else None,
        "deleted_on": st.deleted_on.isoformat() if st.deleted_on else None,
        **{k: v.isoformat() if v else None for k, v in steps.items()},
    }


async def _delete(config: Config, db: Database, tenant_id: str) -> str:
    """Delete a tenant with its mail (a last snapshot first); the snapshot's name."""
    from gateway.blobs import open_blobs
    from gateway.lifecycle import delete_tenant

    blobs = await open_blobs(config, db)
    try:
        return await delete_tenant(db, blobs, config, tenant_id, datetime.now(UTC))
    finally:
        await blobs.close()


# --------------------------------------------------------------------------- commands


def cmd_tenant(config: Config, args: argparse.Namespace) -> int:
    verb = args.tenant_command

    async def work(db: Database) -> None:
        if verb == "list":
            served = await tenants.load(db, config)
            async with db.read() as s:
                used = await catalog.usage(s)
            _print([summary(t, used.get(t.id)) for t in served.tenants], args.format)
        elif verb == "show":
            _print(await details(db, await tenants.get(db, config, args.id)), args.format)
        elif verb == "add":
            data: dict[str, Any] = {"id": args.id, "domains": args.domain, **_pairs(args.set or [])}
            for key in ("name", "plan", "contact"):
                if getattr(args, key):
                    data[key] = getattr(args, key)
            for key in ("paid_until", "trial_until"):
                if getattr(args, key):
                    data[key] = getattr(args, key).isoformat()
            served = await tenants.load(db, config)
            t = await tenants.edit(db, config, args.id, tenants.creating(data, served.plans), create=True)
            print(f"tenant {t.id} added")
        elif verb == "set":
            await tenants.edit(db, config, args.id, tenants.set_fields(_pairs(args.pairs)), force=args.force)
            print(f"tenant {args.id} changed")
        elif verb in ("suspend", "resume"):
            change = tenants.set_fields({"suspended": True if verb == "suspend" else None})
            await tenants.edit(db, config, args.id, change)
            print(f"tenant {args.id} {verb}d")
        elif verb == "renew":
            stamps = {**tenants.RENEWED, "renewed_at": datetime.now(UTC)}
            await tenants.edit(db, config, args.id, tenants.renewing(args.until), stamps=stamps)
            print(f"tenant {args.id} paid until {args.until.isoformat()}")
        elif verb == "delete":
            if not args.yes:
                raise tenants.CatalogError(400, "deleting a tenant deletes its mail: add --yes to confirm")
            snapshot = await _delete(config, db, args.id)
            print(f"tenant {args.id} deleted; its last snapshot is {snapshot}")

    return _run(config, work)


def cmd_agent(config: Config, args: argparse.Namespace) -> int:
    verb = args.agent_command

    async def work(db: Database) -> None:
        if verb == "list":
            t = await tenants.get(db, config, args.tenant)
            rows = [
                {
                    "login": a.login,
                    "name": a.name,
                    "role": a.role,
                    "disabled": a.disabled,
                    "folders": ", ".join(a.folders) or "all",
                }
                for a in t.agents
            ]
            _print(rows, args.format)
            return
        if verb == "add":
            item: dict[str, Any] = {"login": args.login, **_pairs(args.set or [])}
            for key in ("name", "role", "footer"):
                if getattr(args, key) is not None:
                    item[key] = getattr(args, key)
            if args.folder:
                item["folders"] = args.folder
            item["password_hash"] = await tenants.hash_password(_password(args))
            await tenants.edit(db, config, args.tenant, tenants.add_item("agents", item))
        elif verb == "set":
            await tenants.edit(
                db, config, args.tenant, tenants.set_item("agents", args.login, _pairs(args.pairs))
            )
        elif verb == "passwd":
            hashed = await tenants.hash_password(_password(args))
            change = tenants.set_item("agents", args.login, {"password_hash": hashed})
            await tenants.edit(db, config, args.tenant, change)
        elif verb == "remove":
            await tenants.edit(db, config, args.tenant, tenants.remove_item("agents", args.login))
        print(f"agent {args.login}: {verb} done")

    return _run(config, work)


def _rule(args: argparse.Namespace) -> dict[str, Any]:
    conditions = [{"field": f, "op": o, "value": v} for f, o, v in args.condition or []]
    actions: list[dict[str, Any]] = [{"folder": f} for f in args.folder or []]
    actions += [{"label": x} for x in args.label or []]
    actions += [{"forward": x} for x in args.forward or []]
    actions += [{flag: True} for flag in ("spam", "seen", "flag") if getattr(args, flag)]
    rule: dict[str, Any] = {
        "name": args.name,
        "match": args.match,
        "conditions": conditions,
        "actions": actions,
    }
    if args.stop:
        rule["stop"] = True
    return rule


def cmd_rule(config: Config, args: argparse.Namespace) -> int:
    verb = args.rule_command

    async def work(db: Database) -> None:
        if verb == "list":
            t = await tenants.get(db, config, args.tenant)
            rules = tenants.show(t).get("rules", [])
            if args.format == "json":
                _print(rules, "json")
                return
            rows = [
                {
                    "position": i,
                    "name": r["name"],
                    "match": r.get("match", "any"),
                    "conditions": "; ".join(
                        f"{c['field']} {c['op']} {c['value']}" for c in r.get("conditions", [])
                    ),
                    "actions": ", ".join(f"{k}={v}" for a in r["actions"] for k, v in a.items()),
                    "stop": bool(r.get("stop")),
                }
                for i, r in enumerate(rules, 1)
            ]
            _print(rows, "table")
            return
        if verb == "add":
            await tenants.edit(db, config, args.tenant, tenants.add_item("rules", _rule(args)))
            if args.position:
                await tenants.edit(
                    db, config, args.tenant, tenants.move_item("rules", args.name, args.position)
                )
        elif verb == "remove":
            await tenants.edit(db, config, args.tenant, tenants.remove_item("rules", args.name))
        elif verb == "move":
            await tenants.edit(db, config, args.tenant, tenants.move_item("rules", args.name, args.to))
        print(f"rule {args.name}: {verb} done")

    return _run(config, work)


def cmd_mailbox(config: Config, args: argparse.Namespace) -> int:
    verb = args.mailbox_command

    async def work(db: Database) -> None:
        if verb == "list":
            t = await tenants.get(db, config, args.tenant)
            rows = [
                {
                    "name": m.name,
                    "host": m.host,
                    "port": m.port,
                    "security": m.security,
                    "username": m.username,
                    "folders": ", ".join(f"{k}->{v}" for k, v in m.folders.items()),
                    "after_fetch": m.after_fetch,
                }
                for m in t.mailboxes
            ]
            _print(rows, args.format)
            return
        if verb == "add":
            item: dict[str, Any] = {
                "name": args.name,
                "host": args.host,
                "port": args.port,
                "security": args.security,
                "username": args.username,
                **_pairs(args.set or []),
            }
            for key in ("password_file", "password_env", "token_file", "token_env"):
                if getattr(args, key):
                    item[key] = getattr(args, key)
            if args.folder:
                item["folders"] = dict(f.split("=", 1) if "=" in f else (f, f) for f in args.folder)
            await tenants.edit(db, config, args.tenant, tenants.add_item("mailboxes", item))
        elif verb == "remove":
            await tenants.edit(db, config, args.tenant, tenants.remove_item("mailboxes", args.name))
        print(f"mailbox {args.name}: {verb} done")

    return _run(config, work)


def cmd_plan(config: Config, args: argparse.Namespace) -> int:
    async def work(db: Database) -> None:
        plans = (await tenants.load(db, config)).plans
        if args.plan_command == "show":
            if args.name not in plans:
                raise tenants.CatalogError(404, f"no plan {args.name!r} (known: {', '.join(sorted(plans))})")
            _print({"name": args.name, **plans[args.name].model_dump(mode="json")}, args.format)
            return
        _print([{"name": n, **p.model_dump(mode="json")} for n, p in sorted(plans.items())], args.format)

    return _run(config, work)


def cmd_config(config: Config, args: argparse.Namespace) -> int:
    async def export(db: Database) -> None:
        text = tenants.export(await tenants.load(db, config))
        if args.output:
            await asyncio.to_thread(Path(args.output).write_text, text, encoding="utf-8")
        else:
            sys.stdout.write(text)

    if args.config_command == "export":
        return _run(config, export)
    try:
        declared = load_config(Path(args.file))
    except ConfigError as exc:
        for e in exc.errors:
            print(f"error: {e}", file=sys.stderr)
        return 1

    async def apply(db: Database) -> None:
        changes = await tenants.apply(
            db,
            config.model_copy(update={"plans": declared.plans, "tenants": declared.tenants}),
            prune=args.prune,
        )
        for change in changes:
            if change.startswith("delete "):
                tenant_id = change.removeprefix("delete ")
                snapshot = await _delete(config, db, tenant_id)
                print(f"tenant {tenant_id} deleted (not in {args.file}); its last snapshot is {snapshot}")
            else:
                print(change if change.startswith("skipped") else f"applied: {change}")
        if not changes:
            print("nothing to change")

    return _run(config, apply)


# --------------------------------------------------------------------------- parser


def add_parsers(sub: Any) -> None:
    """The catalog commands, on the main parser's subparsers."""

    def listing(p: argparse.ArgumentParser) -> None:
        p.add_argument("--format", choices=FORMATS, default="table")

    t = sub.add_parser(
        "tenant", help="tenants: add, list, show, set, suspend, resume, renew, delete"
    ).add_subparsers(dest="tenant_command", required=True)
    listing(t.add_parser("list", help="tenants with plan, state and usage"))
    show = t.add_parser("show", help="a tenant's definition, plan state and lifecycle steps")
    show.add_argument("id")
    listing(show)
    add = t.add_parser("add", help="a new tenant")
    add.add_argument("id")
    add.add_argument("--domain", action="append", required=True, help="a mail domain (repeatable)")
    add.add_argument("--name")
    add.add_argument("--plan")
    add.add_argument("--paid-until", type=date.fromisoformat, metavar="YYYY-MM-DD")
    add.add_argument("--trial-until", type=date.fromisoformat, metavar="YYYY-MM-DD")
    add.add_argument("--contact", help="the customer's address for plan notices")
    add.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other [[tenants]] key")
    set_ = t.add_parser("set", help="change keys of a tenant (KEY=VALUE; KEY= resets)")
    set_.add_argument("id")
    set_.add_argument("pairs", nargs="+", metavar="KEY=VALUE")
    set_.add_argument("--force", action="store_true", help="lowering seats disables the newest agents")
    for verb, text in (("suspend", "make read-only until resumed"), ("resume", "end a suspension")):
        t.add_parser(verb, help=text).add_argument("id")
    renew = t.add_parser("renew", help="paid until a new date: full service at once")
    renew.add_argument("id")
    renew.add_argument("--until", type=date.fromisoformat, required=True, metavar="YYYY-MM-DD")
    delete = t.add_parser("delete", help="delete a tenant with its mail (a last snapshot is kept)")
    delete.add_argument("id")
    delete.add_argument("--yes", action="store_true", help="confirm")
    for p in t.choices.values():
        p.set_defaults(func=cmd_tenant)

    a = sub.add_parser("agent", help="a tenant's agents").add_subparsers(dest="agent_command", required=True)
    listing(a.add_parser("list", help="the tenant's agents"))
    add = a.add_parser("add", help="a new agent; the password is read from stdin or asked for")
    add.add_argument("login")
    add.add_argument("--name")
    add.add_argument("--role", choices=["agent", "admin"])
    add.add_argument("--footer", help="appended to each message the agent sends")
    add.add_argument("--folder", action="append", help="a folder the agent sees (repeatable; default all)")
    add.add_argument("--set", action="append", metavar="KEY=VALUE")
    set_ = a.add_parser("set", help="change keys of an agent (KEY=VALUE; KEY= resets)")
    set_.add_argument("login")
    set_.add_argument("pairs", nargs="+", metavar="KEY=VALUE")
    a.add_parser("passwd", help="a new password, read from stdin or asked for").add_argument("login")
    a.add_parser("remove", help="remove an agent (its statistics stay)").add_argument("login")
    for p in a.choices.values():
        p.add_argument("--tenant", required=True)
        p.set_defaults(func=cmd_agent)

    r = sub.add_parser("rule", help="a tenant's routing rules").add_subparsers(
        dest="rule_command", required=True
    )
    listing(r.add_parser("list", help="the rules, in the order they run"))
    add = r.add_parser("add", help="a new rule (at the end, or at --position)")
    add.add_argument("name")
    add.add_argument("--if", dest="condition", nargs=3, action="append", metavar=("FIELD", "OP", "VALUE"))
    add.add_argument("--match", choices=["any", "all"], default="any")
    add.add_argument("--folder", action="append")
    add.add_argument("--label", action="append")
    add.add_argument("--forward", action="append")
    for flag in ("spam", "seen", "flag", "stop"):
        add.add_argument(f"--{flag}", action="store_true")
    add.add_argument("--position", type=int, help="1 = first")
    r.add_parser("remove", help="remove a rule").add_argument("name")
    move = r.add_parser("move", help="move a rule to another position")
    move.add_argument("name")
    move.add_argument("--to", type=int, required=True, help="1 = first")
    for p in r.choices.values():
        p.add_argument("--tenant", required=True)
        p.set_defaults(func=cmd_rule)

    m = sub.add_parser("mailbox", help="a tenant's upstream IMAP mailboxes").add_subparsers(
        dest="mailbox_command", required=True
    )
    listing(m.add_parser("list", help="the upstream mailboxes"))
    add = m.add_parser("add", help="a new upstream mailbox to pull from")
    add.add_argument("name")
    add.add_argument("--host", required=True)
    add.add_argument("--port", type=int, default=993)
    add.add_argument("--security", choices=["none", "tls"], default="tls")
    add.add_argument("--username", required=True)
    for key in ("password-file", "password-env", "token-file", "token-env"):
        add.add_argument(f"--{key}")
    add.add_argument("--folder", action="append", metavar="UPSTREAM=LOCAL", help="default INBOX=INBOX")
    add.add_argument("--set", action="append", metavar="KEY=VALUE")
    m.add_parser("remove", help="stop pulling from a mailbox").add_argument("name")
    for p in m.choices.values():
        p.add_argument("--tenant", required=True)
        p.set_defaults(func=cmd_mailbox)

    pl = sub.add_parser("plan", help="plans").add_subparsers(dest="plan_command", required=True)
    listing(pl.add_parser("list", help="the plans and their limits"))
    show = pl.add_parser("show", help="one plan")
    show.add_argument("name")
    listing(show)
    for p in pl.choices.values():
        p.set_defaults(func=cmd_plan)

    c = sub.add_parser("config", help="tenants and plans as TOML").add_subparsers(
        dest="config_command", required=True
    )
    export = c.add_parser("export", help="the database's tenants and plans as TOML that apply takes")
    export.add_argument("-o", "--output", help="a file (default: stdout)")
    apply = c.add_parser("apply", help="create and update the tenants and plans a TOML file declares")
    apply.add_argument("file")
    apply.add_argument("--prune", action="store_true", help="also delete tenants the file does not declare")
    for p in c.choices.values():
        p.set_defaults(func=cmd_config)

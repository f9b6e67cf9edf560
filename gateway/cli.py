"""The ``mailgate`` command line (DESIGN.md section 6)."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import SQLAlchemyError

from gateway import logs
from gateway.config import (
    Config,
    ConfigError,
    MailboxSection,
    SMTPRelaySection,
    default_config_path,
    load_config,
)
from storage.db import Database

if TYPE_CHECKING:
    from storage import queue

UMASK = 0o027

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


def _human_size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, factor in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= factor:
            return f"{n / factor:.1f} {unit}"
    return f"{n} B"


def print_rows(rows: Sequence[dict[str, Any]], columns: Sequence[str], fmt: str) -> None:
    """Print a listing as an aligned table or as a JSON array of objects."""
    if fmt == "json":
        print(json.dumps([{c: r[c] for c in columns} for r in rows], ensure_ascii=False, indent=2))
        return
    cells = [[c.upper() for c in columns]] + [
        ["-" if r[c] is None else str(r[c]) for c in columns] for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _database_text(config: Config) -> str:
    """The database for humans, never showing a password put in the URL."""
    from sqlalchemy.engine import make_url

    url = config.gateway.database_url
    if not url:
        return f"sqlite in {config.gateway.data_dir}"
    try:
        return make_url(url).render_as_string(hide_password=True)
    except SQLAlchemyError:
        return url.partition("://")[0] + "://..."


def secret_errors(config: Config) -> list[str]:
    """Secrets the configuration refers to but that cannot be read."""
    errors = []
    for i, tenant in enumerate(config.tenants):
        sections: list[tuple[str, Any]] = [(f"tenants[{i}].smtp", tenant.smtp)]
        sections += [(f"tenants[{i}].mailboxes[{j}]", m) for j, m in enumerate(tenant.mailboxes)]
        for path, section in sections:
            if section is None:
                continue
            try:
                section.password()
            except ConfigError as exc:
                errors += [f"{path}.{e}" for e in exc.errors]
            if section.oauth2 is not None:
                errors += [f"{path}.oauth2.{e}" for e in section.oauth2.unreadable()]
    try:
        config.srs.secret()
    except ConfigError as exc:
        errors += exc.errors
    try:
        config.blobs.s3_credentials()
    except ConfigError as exc:
        errors += exc.errors
    return errors


# --------------------------------------------------------------------------- commands


def cmd_check_config(config: Config, args: argparse.Namespace) -> int:
    errors = secret_errors(config)
    if errors:
        for e in errors:
            print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    print(f"configuration OK: {args.config}")
    listeners = [f"{k} {v}" for k, v in config.listen.model_dump().items() if v]
    print(f"listeners: {', '.join(listeners) or 'none'}")
    print(f"database: {_database_text(config)}")
    for t in config.tenants:
        print(
            f"tenant {t.id} ({t.name or 'no name'}): domains {', '.join(t.domains)}; "
            f"{len(t.agents)} agent(s), {len(t.rules)} rule(s), {len(t.mailboxes)} mailbox(es); "
            f"quota {_human_size(t.effective_quota)}, max message {_human_size(t.max_message_size)}"
        )
    return EXIT_OK


def cmd_run(config: Config, args: argparse.Namespace) -> int:
    from gateway.daemon import Daemon
    from storage.instances import InstanceConflict

    logs.configure()
    try:
        return asyncio.run(Daemon(config, args.config).run())
    except ConfigError as exc:
        for e in exc.errors:
            print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except InstanceConflict as exc:  # another instance runs against this database (logged too)
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR


def cmd_migrate(config: Config, args: argparse.Namespace) -> int:
    from gateway.daemon import open_store
    from storage import instances

    async def go() -> None:
        db = Database(config.gateway.effective_database_url)
        try:
            async with instances.starting_alone(db):  # not at once with a starting instance
                await open_store(config, db)
        finally:
            await db.close()

    asyncio.run(go())
    print("database schema is up to date; tenants, agents and folders synchronised")
    return EXIT_OK


class NotMigrated(Exception):
    """The database has no (or an old) schema."""


async def open_for_reading(config: Config) -> Database:
    """The database, after checking its schema is current (CLI listings never migrate)."""
    from storage.db import Database
    from storage.migrate import is_current

    db = Database(config.gateway.effective_database_url)
    if not await is_current(db):
        await db.close()
        raise NotMigrated("the database is not initialised or not up to date: run 'mailgate migrate'")
    return db


async def served(config: Config) -> Config:
    """The configuration with the database's tenants and plans (the file's alone if none is set up)."""
    from gateway import tenants
    from storage.migrate import is_current

    db = Database(config.gateway.effective_database_url)
    try:
        return await tenants.load(db, config) if await is_current(db) else config
    finally:
        await db.close()


def cmd_hash_password(args: argparse.Namespace) -> int:
    from argon2 import PasswordHasher

    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            print("error: the passwords differ", file=sys.stderr)
            return EXIT_ERROR
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("error: empty password", file=sys.stderr)
        return EXIT_ERROR
    print(PasswordHasher().hash(password))
    return EXIT_OK


def cmd_rules_test(config: Config, args: argparse.Namespace) -> int:
    from gateway.ingest import Delivery, decide
    from gateway.message import parse_headers

    tenant = config.tenant(args.tenant)
    raw = Path(args.file).read_bytes()
    headers = parse_headers(raw)
    delivery = Delivery(source="cli", mail_from=args.mail_from or "", recipients=tuple(args.rcpt or ()))
    verdict = decide(tenant, headers, len(raw), delivery)
    print(f"message: {args.file} ({len(raw)} bytes), subject {headers.subject!r}")
    print(verdict.explain())
    return EXIT_OK


def cmd_folders(config: Config, args: argparse.Namespace) -> int:
    from storage import mailstore

    tenant = config.tenant(args.tenant)

    async def go() -> list[dict[str, Any]]:
        db = await open_for_reading(config)
        try:
            async with db.read() as s:
                folders = await mailstore.list_folders(s, tenant.id)
        finally:
            await db.close()
        return [
            {
                "name": f.name,
                "special_use": f.special_use,
                "messages": f.used_messages,
                "bytes": f.used_bytes,
                "quota": f.quota_bytes,
            }
            for f in folders
        ]

    rows = asyncio.run(go())
    print_rows(rows, ["name", "special_use", "messages", "bytes", "quota"], args.format)
    return EXIT_OK


def cmd_mailboxes(config: Config, args: argparse.Namespace) -> int:
    from storage import upstream

    tenants = [config.tenant(args.tenant)] if args.tenant else list(config.tenants)

    async def go() -> list[dict[str, Any]]:
        db = await open_for_reading(config)
        try:
            async with db.read() as s:
                rows = await upstream.mailboxes(s, args.tenant)
        finally:
            await db.close()
        health = {(r.tenant_id, r.name): r for r in rows}
        out = []
        for t in tenants:
            for m in t.mailboxes:
                r = health.get((t.id, m.name))
                out.append(
                    {
                        "tenant": t.id,
                        "name": m.name,
                        "host": f"{m.host}:{m.port}",
                        "state": r.state if r else "new",
                        "last_success": r.last_success_at.isoformat(timespec="seconds")
                        if r and r.last_success_at
                        else None,
                        "last_error": r.last_error if r else None,
                        "next_attempt": r.next_attempt_at.isoformat(timespec="seconds")
                        if r and r.next_attempt_at
                        else None,
                        "messages_pulled": r.messages_pulled if r else 0,
                    }
                )
        return out

    columns = [
        "tenant",
        "name",
        "host",
        "state",
        "last_success",
        "last_error",
        "next_attempt",
        "messages_pulled",
    ]
    print_rows(asyncio.run(go()), columns, args.format)
    return EXIT_OK


def cmd_cluster(config: Config, args: argparse.Namespace) -> int:
    """``cluster status``: the instances registered in the database, alive or not, and what they hold."""
    from datetime import UTC, datetime

    from storage import instances

    async def go() -> list[instances.Member]:
        db = await open_for_reading(config)
        try:
            async with db.read() as s:
                return await instances.cluster(s, datetime.now(UTC))
        finally:
            await db.close()

    rows = [
        {
            "id": m.row.id,
            "host": m.row.hostname,
            "pid": m.row.pid,
            "started": m.row.started_at.isoformat(timespec="seconds"),
            "heartbeat": m.row.heartbeat_at.isoformat(timespec="seconds"),
            "alive": m.alive,
            "relay_claims": m.relay_claims,
            "upstream_leases": m.upstream_leases,
        }
        for m in asyncio.run(go())
    ]
    columns = ["id", "host", "pid", "started", "heartbeat", "alive", "relay_claims", "upstream_leases"]
    print_rows(rows, columns, args.format)
    return EXIT_OK


def _print_queue_history(h: queue.History, fmt: str) -> None:
    """``queue show``: the message's summary, its recipients' states and its whole history."""
    from datetime import UTC, datetime

    from storage import queue

    summary = queue.summary(h)
    state = "queued" if h.row is not None else "dropped" if h.log[-1].event == "dropped" else "done"
    last: dict[str, tuple[str, str | None]] = {}
    for e in h.log:
        if e.recipient is not None:
            last[e.recipient] = ({"deferred": "pending"}.get(e.event, e.event), e.reply)
    if h.row is not None:
        last.update({r.address: (r.state, r.last_reply) for r in h.recipients})
    recipients = [
        {"address": a, "state": last.get(a, ("pending", None))[0], "last_reply": last.get(a, (None, None))[1]}
        for a in dict.fromkeys([*summary.recipients, *last])
    ]
    history = [
        {
            "at": e.at.isoformat(timespec="seconds"),
            "event": e.event,
            "attempt": e.attempt,
            "recipient": e.recipient,
            "smarthost": e.smarthost,
            "reply": None if e.event == "queued" else e.reply,
        }
        for e in h.log
    ]
    row = h.row
    out: dict[str, Any] = {
        "id": h.queue_id,
        "tenant": h.tenant_id,
        "state": state,
        "mail_from": summary.mail_from,
        "agent": summary.agent,
        "message_id": summary.message_id,
        "size": summary.size,
        "attempts": row.attempts if row else None,
        "next_attempt": row.next_attempt_at.isoformat(timespec="seconds") if row else None,
        "last_error": row.last_error if row else None,
        "claimed_by": row.claimed_by if row else None,
        # The end of DATA went out and its holder died before the answer: retry or drop is yours.
        "uncertain": queue.uncertain(row, datetime.now(UTC)) if row else None,
        "recipients": recipients,
        "history": history,
    }
    if fmt == "json":
        print(json.dumps(out, ensure_ascii=False, indent=2))
        return
    fields = [k for k in out if k not in ("recipients", "history")]
    width = max(map(len, fields))
    for key in fields:
        print(f"{key + ':':<{width + 1}} {'-' if out[key] is None else out[key]}")
    print()
    print_rows(recipients, ["address", "state", "last_reply"], "table")
    print()
    print_rows(history, ["at", "event", "attempt", "recipient", "smarthost", "reply"], "table")


def cmd_queue(config: Config, args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from storage import queue

    async def go() -> int:
        db = await open_for_reading(config)
        try:
            if args.queue_command == "list":
                now = datetime.now(UTC)
                async with db.read() as s:
                    rows = await queue.listing(s, args.tenant)
                out = [
                    {
                        "id": row.queue_id,  # None until the daemon names a message queued before ids
                        "tenant": row.tenant_id,
                        "mail_from": row.mail_from,
                        "recipients": " ".join(f"{r.address}({r.state})" for r in rcpts),
                        "size": row.size,
                        "created": row.created_at.isoformat(timespec="seconds"),
                        "attempts": row.attempts,
                        "next_attempt": row.next_attempt_at.isoformat(timespec="seconds"),
                        "last_error": row.last_error,
                        "claimed_by": row.claimed_by,
                        "uncertain": queue.uncertain(row, now),
                    }
                    for row, rcpts in rows
                ]
                columns = ["id", "tenant", "mail_from", "recipients", "size", "created", "attempts"]
                print_rows(
                    out, [*columns, "next_attempt", "last_error", "claimed_by", "uncertain"], args.format
                )
                return EXIT_OK
            if args.queue_command == "show":
                async with db.read() as s:
                    history = await queue.history(s, args.id)
                if history is None:
                    print(f"error: no message {args.id} was ever queued", file=sys.stderr)
                    return EXIT_ERROR
                _print_queue_history(history, args.format)
                return EXIT_OK
            async with db.write() as s:
                if args.queue_command == "retry":
                    found = await queue.retry_now(s, args.id, datetime.now(UTC))
                else:
                    found = await queue.drop(s, args.id, datetime.now(UTC))
        finally:
            await db.close()
        if not found:
            print(f"error: no queued message {args.id} (see mailgate queue show {args.id})", file=sys.stderr)
            return EXIT_ERROR
        verb = (
            "due now (the running daemon sends it within seconds)"
            if args.queue_command == "retry"
            else "dropped"
        )
        print(f"message {args.id}: {verb}")
        return EXIT_OK

    return asyncio.run(go())


def _progress(label: str) -> Any:
    """A one-line progress bar on a terminal; nothing otherwise."""
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        width = 30
        filled = width * done // max(total, 1)
        print(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}", end="", file=sys.stderr)
        if done >= total:
            print(file=sys.stderr)

    return show


async def _maintenance(config: Config) -> Any:
    """Database (migrated), blobs and a scheduler, for maintenance commands."""
    from gateway.daemon import open_store
    from gateway.forward import load_signer
    from gateway.ingest import Pipeline
    from gateway.scheduler import Scheduler

    db, blobs = await open_store(config)
    return db, Scheduler(lambda: config, db, blobs, Pipeline(db, blobs, srs_signer=load_signer(config)))


def cmd_purge_spam(config: Config, args: argparse.Namespace) -> int:
    async def go() -> Any:
        db, scheduler = await _maintenance(config)
        try:
            return await scheduler.purge_spam(dry_run=args.dry_run)
        finally:
            await scheduler.blobs.close()
            await db.close()

    report = asyncio.run(go())
    verb = "would delete" if args.dry_run else "deleted"
    rows = [
        {"tenant": t, "messages": report.messages[t], "bytes": report.bytes[t]}
        for t in sorted(report.messages)
    ]
    total = sum(report.messages.values())
    print(f"spam older than {config.retention.spam_days} days: {verb} {total} message(s)")
    if rows:
        print_rows(rows, ["tenant", "messages", "bytes"], "table")
    return EXIT_OK


def cmd_snapshot(config: Config, args: argparse.Namespace) -> int:
    from storage import snapshots

    directory = config.snapshots.dir
    if args.snapshot_command == "list":
        rows = [
            {
                "name": i.name,
                "created": i.created_at.isoformat(timespec="seconds"),
                "messages": i.messages,
                "bytes": i.bytes,
                "tenants": i.tenants,
            }
            for i in snapshots.listing(directory)
        ]
        print_rows(rows, ["name", "created", "messages", "bytes", "tenants"], args.format)
        return EXIT_OK
    if args.snapshot_command == "verify":
        names = [args.name] if args.name else [i.name for i in snapshots.listing(directory)]
        bad = 0
        for name in names:
            problems = snapshots.verify(directory / name, _progress(f"verify {name}"))
            print(f"{name}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
            for p in problems:
                print(f"  {p}")
            bad += bool(problems)
        return EXIT_ERROR if bad or not names else EXIT_OK

    async def go() -> Any:
        db, scheduler = await _maintenance(config)
        try:
            return await scheduler.snapshot()
        finally:
            await scheduler.blobs.close()
            await db.close()

    info = asyncio.run(go())
    print(f"snapshot {info.name}: {info.messages} message(s), {info.bytes} bytes, in {info.path}")
    return EXIT_OK


def cmd_restore(config: Config, args: argparse.Namespace) -> int:
    from gateway.ingest import with_structures
    from storage import snapshots

    config.tenant(args.tenant)
    name = args.snapshot
    if name == "latest":
        newest = snapshots.listing(config.snapshots.dir)
        if not newest:
            print(f"error: no snapshot in {config.snapshots.dir}", file=sys.stderr)
            return EXIT_ERROR
        name = newest[0].name
    path = config.snapshots.dir / name
    if not (path / "manifest.json").exists():
        print(f"error: no snapshot {name!r} in {config.snapshots.dir}", file=sys.stderr)
        return EXIT_ERROR

    async def go() -> Any:
        db, scheduler = await _maintenance(config)
        try:
            return await snapshots.restore(
                db,
                scheduler.blobs,
                path,
                tenant_id=args.tenant,
                folder=args.folder,
                message_id=args.message_id,
                in_place=args.in_place,
                describe=with_structures,
                progress=_progress("restore"),
            )
        finally:
            await scheduler.blobs.close()
            await db.close()

    report = asyncio.run(go())
    where = "their original folders" if args.in_place else f"Restored/{name[:8]}/..."
    print(
        f"restored {report.restored} message(s) into {where}; "
        f"{report.skipped} already present, skipped; {report.folders} folder(s)"
    )
    return EXIT_OK


def cmd_oauth2_authorize(config: Config, args: argparse.Namespace) -> int:
    """``oauth2 authorize``: the mailbox owner's consent, stored as the refresh token."""
    from gateway.oauth2 import AuthorizeError, authorize

    found: list[tuple[str, MailboxSection | SMTPRelaySection]] = []
    for t in config.tenants:
        if args.tenant and t.id != args.tenant:
            continue
        if args.smtp and t.smtp is not None:
            found.append((f"the smarthost of tenant {t.id}", t.smtp))
        found += [(f"mailbox {m.name} of tenant {t.id}", m) for m in t.mailboxes if m.name == args.mailbox]
    what = "smarthost" if args.smtp else f"mailbox {args.mailbox!r}"
    if len(found) != 1:
        why = "no" if not found else "more than one (give --tenant)"
        print(f"error: {why} {what} in the configuration", file=sys.stderr)
        return EXIT_ERROR
    name, section = found[0]
    if section.oauth2 is None:
        print(f'error: {name} has auth = "password"', file=sys.stderr)
        return EXIT_ERROR
    try:
        path = asyncio.run(authorize(section.oauth2, show=lambda line: print(line, flush=True)))
    except AuthorizeError as exc:
        print(f"error: {name}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(f"{name}: the refresh token is stored in {path}; a running daemon uses it at its next attempt")
    return 0


def cmd_blobs(config: Config, args: argparse.Namespace) -> int:
    """``blobs migrate --to BACKEND``: what is left of moving the blobs (storage.blobs.move)."""
    from gateway.blobs import blob_store
    from storage.blobs.move import MoveError, MoveReport, migrate

    def counted(n: int) -> None:
        print(f"\rblobs checked: {n}", end="", file=sys.stderr, flush=True)

    async def go() -> MoveReport:
        db = await open_for_reading(config)
        try:
            return await migrate(
                db,
                args.to,
                config.blobs.backend,
                lambda backend: blob_store(config, db, backend),
                progress=counted if sys.stderr.isatty() else None,
            )
        finally:
            await db.close()
            if sys.stderr.isatty():
                print(file=sys.stderr)

    try:
        report = asyncio.run(go())
    except (MoveError, ConfigError) as exc:
        for line in exc.errors if isinstance(exc, ConfigError) else [str(exc)]:
            print(f"error: {line}", file=sys.stderr)
        return EXIT_ERROR
    for line in report.lines:
        print(line)
    return EXIT_OK


def cmd_stats_agents(config: Config, args: argparse.Namespace) -> int:
    import csv
    from datetime import UTC, datetime

    from gateway.config import parse_duration
    from storage import events

    config.tenant(args.tenant)
    since = datetime.now(UTC) - parse_duration(args.since)

    async def go() -> list[events.AgentStats]:
        db = await open_for_reading(config)
        try:
            async with db.read() as s:
                return await events.agent_stats(s, args.tenant, since)
        finally:
            await db.close()

    rows = [
        {
            "agent": a.login,
            "name": a.name,
            "read": a.read,
            "replies": a.replies,
            "collisions": a.collisions,
            "median_first_response_seconds": a.percentile(50),
            "p90_first_response_seconds": a.percentile(90),
        }
        for a in asyncio.run(go())
    ]
    columns = ["agent", "name", "read", "replies", "collisions"]
    columns += ["median_first_response_seconds", "p90_first_response_seconds"]
    if args.format == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    else:
        print_rows(rows, columns, args.format)
    return EXIT_OK


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``mailgate``."""
    from gateway.admin.cli import add_parsers

    p = argparse.ArgumentParser(prog="mailgate", description="Mail gateway for shared mailboxes.")
    p.add_argument(
        "-c",
        "--config",
        type=Path,
        default=None,
        help="configuration file (default: $MAILGATE_CONFIG, then /etc/mailgate/mailgate.toml)",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("run", help="run the daemon in the foreground").set_defaults(func=cmd_run)
    sub.add_parser("check-config", help="validate the configuration").set_defaults(func=cmd_check_config)
    sub.add_parser("migrate", help="apply database migrations").set_defaults(func=cmd_migrate)
    sub.add_parser("hash-password", help="read a password on stdin, print an argon2 hash").set_defaults(
        func=cmd_hash_password, needs_config=False
    )
    rules_p = sub.add_parser("rules", help="routing rules").add_subparsers(
        dest="rules_command", required=True
    )
    t = rules_p.add_parser("test", help="show where a message would be filed, and why")
    t.add_argument("--tenant", required=True)
    t.add_argument("--from", dest="mail_from", help="envelope sender (MAIL FROM)")
    t.add_argument("--rcpt", action="append", help="envelope recipient (repeatable)")
    t.add_argument("file", metavar="FILE.eml")
    t.set_defaults(func=cmd_rules_test, serves_tenants=True)
    f = sub.add_parser("folders", help="a tenant's folders with usage")
    f.add_argument("--tenant", required=True)
    f.add_argument("--format", choices=["table", "json"], default="table")
    f.set_defaults(func=cmd_folders, serves_tenants=True)
    m = sub.add_parser(
        "mailboxes", help="upstream mailboxes: state, last success, last error, messages pulled"
    )
    m.add_argument("--tenant")
    m.add_argument("--format", choices=["table", "json"], default="table")
    m.set_defaults(func=cmd_mailboxes, serves_tenants=True)
    q = sub.add_parser("queue", help="the outbound relay queue").add_subparsers(
        dest="queue_command", required=True
    )
    ql = q.add_parser("list", help="queued messages with their recipients' state")
    ql.add_argument("--tenant")
    ql.add_argument("--format", choices=["table", "json"], default="table")
    ql.set_defaults(func=cmd_queue)
    for verb, text in (
        ("retry", "make a message due now"),
        ("drop", "remove a message without sending it"),
        ("show", "a message's summary and whole history, also after it left the queue"),
    ):
        qv = q.add_parser(verb, help=text)
        qv.add_argument("id", type=str.lower, help="its queue id (as in 250 ... queued as ID)")
        if verb == "show":
            qv.add_argument("--format", choices=["table", "json"], default="table")
        qv.set_defaults(func=cmd_queue)
    cl = sub.add_parser("cluster", help="the instances on this database").add_subparsers(
        dest="cluster_command", required=True
    )
    cs = cl.add_parser(
        "status", help="instances: host, pid, last heartbeat, alive, relay claims and leases held"
    )
    cs.add_argument("--format", choices=["table", "json"], default="table")
    cs.set_defaults(func=cmd_cluster)
    ps = sub.add_parser("purge-spam", help="delete spam older than retention.spam_days now")
    ps.add_argument("--dry-run", action="store_true", help="report what would be deleted")
    ps.set_defaults(func=cmd_purge_spam)
    sn = sub.add_parser("snapshot", help="snapshots of all mail").add_subparsers(
        dest="snapshot_command", required=True
    )
    sn.add_parser("create", help="take a snapshot now").set_defaults(func=cmd_snapshot)
    sl = sn.add_parser("list", help="snapshots, newest first")
    sl.add_argument("--format", choices=["table", "json"], default="table")
    sl.set_defaults(func=cmd_snapshot)
    sv = sn.add_parser("verify", help="check every blob's hash and the metadata")
    sv.add_argument("name", nargs="?", help="one snapshot (default: all)")
    sv.set_defaults(func=cmd_snapshot)
    st = sub.add_parser("stats", help="statistics").add_subparsers(dest="stats_command", required=True)
    sa = st.add_parser("agents", help="per agent: read, replies, collisions, first-response time")
    sa.add_argument("--tenant", required=True)
    sa.add_argument("--since", default="7d", help="period, e.g. 7d, 24h (default 7d)")
    sa.add_argument("--format", choices=["table", "csv", "json"], default="table")
    sa.set_defaults(func=cmd_stats_agents, serves_tenants=True)
    bl = sub.add_parser("blobs", help="the message blob store").add_subparsers(
        dest="blobs_command", required=True
    )
    bm = bl.add_parser(
        "migrate", help="move the blobs to another backend: copy, verify, switch, delete (docs/blobs.md)"
    )
    bm.add_argument("--to", required=True, choices=["fs", "postgresql", "s3"])
    bm.set_defaults(func=cmd_blobs)
    oa = sub.add_parser("oauth2", help="OAuth2 credentials").add_subparsers(
        dest="oauth2_command", required=True
    )
    oz = oa.add_parser(
        "authorize", help="the mailbox owner's consent (device flow or browser): stores the refresh token"
    )
    which = oz.add_mutually_exclusive_group(required=True)
    which.add_argument("--mailbox", help="an upstream mailbox with auth = oauth2")
    which.add_argument("--smtp", action="store_true", help="the tenant's smarthost (with --tenant)")
    oz.add_argument("--tenant")
    oz.set_defaults(func=cmd_oauth2_authorize, serves_tenants=True)
    r = sub.add_parser("restore", help="copy mail back from a snapshot, additively")
    r.add_argument("--snapshot", required=True, help="a name from 'snapshot list', or 'latest'")
    r.add_argument("--tenant", required=True)
    r.add_argument("--folder")
    r.add_argument("--message-id")
    r.add_argument(
        "--in-place", action="store_true", help="into the original folders, skipping what is there"
    )
    r.set_defaults(func=cmd_restore, serves_tenants=True)
    add_parsers(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mailgate`` console script."""
    # Mail metadata and snapshots are private whatever the caller's umask:
    # files 0640, directories 0750 (systemd's UMask= says the same).
    os.umask(UMASK)
    args = build_parser().parse_args(argv)
    logs.configure(level="warning")  # log lines go to stderr: stdout is the command's output
    func: Callable[..., int] = args.func
    if not getattr(args, "needs_config", True):
        return func(args)
    args.config = args.config or default_config_path()
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for e in exc.errors:
            print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    try:
        if getattr(args, "serves_tenants", False):
            config = asyncio.run(served(config))
        return func(config, args)
    except KeyError as exc:  # an unknown --tenant
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return EXIT_ERROR
    except NotMigrated as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:  # a missing file, or a database that cannot be reached
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_ERROR
    except SQLAlchemyError as exc:  # e.g. a database that does not exist, a bad URL
        detail = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        print(f"error: database: {detail}", file=sys.stderr)
        return EXIT_ERROR

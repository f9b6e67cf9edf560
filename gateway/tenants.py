"""Tenants as managed data: validated edits, the file's reconcile, export.

Theory of operation
-------------------
Tenants (their agents, rules, folders and upstream mailboxes) and plans are
defined in the database (:mod:`storage.catalog`); the configuration file
keeps the daemon's own settings. A definition is stored in its canonical
form, :func:`document`: the keys of a ``[[tenants]]`` table as the file
writes them, defaults left out. So a tenant described in the file, made
through the admin API or the CLI, or exported and applied again, is stored
alike, and ``config export`` writes TOML that ``config apply`` takes
unchanged.

Every change is a read-modify-write of one tenant's document in one write
transaction (:func:`edit`): the row is locked, the change applied to a copy,
the result validated as the file would be (errors name the field), checked
against the other tenants (ids, domains, logins unique), against the
plan's limits (seats, mailboxes) and against what storage and the lifecycle
hold (:func:`_check_storable`: text that fits its column, without NUL; 64-bit
numbers; an end date that leaves room for the read-only days), then stored
with the rows that follow it: a refusal is a 400, never a failed write.
The daemon serves :func:`load`'s configuration: the file's settings with the
database's plans and tenants. It polls the catalog's generation
(:class:`Watcher`) and switches to the new configuration when it moves, so a
change made by any instance or command reaches it within
:data:`POLL_INTERVAL`.

The file's ``[[tenants]]`` and ``[plans.*]`` are applied on start and on
reload (:func:`apply`): what the file declares is created or updated (a
tenant declared in the file is owned by it: an edit made through the API to
such a tenant lasts until the next start or reload); what it does not
mention stays, unless ``prune`` deletes it. A declared tenant whose plan has
ended past its read-only days is not applied: the lifecycle deletes it, and
the file declaring it still must not bring it back to be deleted again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator, Mapping
from datetime import date, datetime, timedelta
from typing import Any

import structlog
import tomli_w
from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from gateway.config import (
    BUILTIN_PLANS,
    Config,
    PlanSection,
    TenantSection,
    check_tenants,
    format_errors,
)
from gateway.plans import standing, today
from rules import ActionKind
from storage import catalog
from storage.db import Database, uninterrupted
from storage.models import Agent, Folder, Tenant, UpstreamFolder, UpstreamMailbox

log = structlog.get_logger(__name__)

POLL_INTERVAL = 1.0  # seconds between two reads of the catalog's generation


class CatalogError(Exception):
    """A refused change: the HTTP status, the field it is about, and the message."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


def document(section: TenantSection | PlanSection) -> dict[str, Any]:
    """The canonical definition: the file's keys, defaults left out."""
    return section.model_dump(mode="json", by_alias=True, exclude_defaults=True, exclude_none=True)


def validate(data: Mapping[str, Any], prefix: str = "") -> TenantSection:
    """A tenant's definition validated; CatalogError (400) names the first bad field."""
    try:
        return TenantSection.model_validate(data)
    except ValidationError as exc:
        path, _, message = format_errors(exc)[0].partition(": ")
        raise CatalogError(400, message, prefix + path if path != "(top level)" else prefix or None) from None


def storage_spec(t: TenantSection) -> catalog.TenantSpec:
    """What the mail store needs of a tenant."""
    return catalog.TenantSpec(
        id=t.id,
        name=t.name,
        quota_bytes=t.effective_quota,
        domains=t.domains,
        agents=tuple(catalog.AgentSpec(a.login, a.name, a.password_hash, not a.disabled) for a in t.agents),
        folders=tuple(catalog.FolderSpec(f.name, f.quota, f.special_use) for f in t.folders),
    )


def _plans(base: Config, stored: Mapping[str, Mapping[str, Any]]) -> dict[str, PlanSection]:
    plans = dict(base.plans)
    for name, data in stored.items():
        try:
            plans[name] = PlanSection.model_validate(data)
        except ValidationError as exc:
            log.error("catalog.plan_invalid", plan=name, errors=format_errors(exc))
    return plans


def _served(base: Config, plans: dict[str, PlanSection], docs: list[dict[str, Any]]) -> Config:
    """The file's settings with these plans and tenants; a definition that no longer validates is skipped."""
    tenants = []
    for data in docs:
        try:
            tenants.append(validate(data))
        except CatalogError as exc:
            log.error("catalog.tenant_invalid", tenant=data.get("id"), error=str(exc))
    config = base.model_copy(update={"plans": plans})
    try:
        return config.with_tenants(tuple(tenants))
    except ValidationError as exc:  # a plan the file dropped, say
        kept: list[TenantSection] = []
        for t in tenants:
            try:
                config.with_tenants((*kept, t))
                kept.append(t)
            except ValidationError:
                log.error("catalog.tenant_invalid", tenant=t.id, errors=format_errors(exc))
        return config.with_tenants(tuple(kept))


async def load(db: Database, base: Config) -> Config:
    """The configuration to serve: ``base``'s settings with the database's plans and tenants."""
    async with db.read() as s:
        docs, plans = await catalog.definitions(s)
    return _served(base, _plans(base, plans), docs)


async def apply(db: Database, config: Config, *, prune: bool = False) -> list[str]:
    """Make the database hold the file's plans and tenants; returns what changed, for humans.

    Pruning deletes the tenants the file does not declare, with their data
    (:func:`gateway.lifecycle.delete_tenant` is the caller's to run for those:
    their ids are returned as ``"delete <id>"``).
    """
    changes = []
    async with db.write() as s:
        if await catalog.put_plans(s, _declared_plans(config)):
            changes.append("plans")
        for t in config.tenants:
            st = standing(t)
            if st.state == "deleted":
                # Deleted by the plan lifecycle (or due to be): declaring it again must not bring
                # it back only to delete it again, every start.
                log.warning("catalog.file_tenant_ended", tenant=t.id, why=st.why)
                changes.append(f"skipped tenant {t.id}: {st.why}")
                continue
            if await catalog.put_tenant(s, storage_spec(t), document(t)):
                changes.append(f"tenant {t.id}")
        if prune:
            docs, _ = await catalog.definitions(s)
            declared = {t.id for t in config.tenants}
            changes += [f"delete {d['id']}" for d in docs if d["id"] not in declared]
    return changes


def _declared_plans(config: Config) -> dict[str, dict[str, Any]]:
    """The plans that are not built in as they are: those a file (or the database) declares."""
    return {name: document(p) for name, p in sorted(config.plans.items()) if BUILTIN_PLANS.get(name) != p}


def export(config: Config) -> str:
    """The served plans (those not built in as they are) and tenants as TOML that :func:`apply` takes."""
    plans = _declared_plans(config)
    data: dict[str, Any] = {}
    if plans:
        data["plans"] = plans
    data["tenants"] = [document(t) for t in config.tenants]
    return tomli_w.dumps(data)


def show(t: TenantSection) -> dict[str, Any]:
    """A tenant's definition for ``tenant show`` and the API: password hashes left out."""
    data = document(t)
    for agent in data.get("agents", []):
        agent.pop("password_hash", None)
    return data


def _check_limits(old: TenantSection | None, new: TenantSection, data: dict[str, Any], force: bool) -> bool:
    """Refuse an edit that takes a count over the plan's limit (a count already over may only fall).

    Lowering the seats (the tenant's or by a new plan) below the agents enabled
    is refused unless ``force``, which disables the most recently added agents
    in ``data`` and returns True (validate again).
    """
    plan = f"plan {new.plan}" if new.plan else "the tenant"
    seats, limit = sum(not a.disabled for a in new.agents), new.effective_seats
    before = sum(not a.disabled for a in old.agents) if old is not None else 0
    lowered = old is not None and (old.effective_seats == 0 or limit < old.effective_seats)
    if limit and seats > limit and lowered and seats <= before:
        if not force:
            raise CatalogError(
                409,
                f"{plan} has {limit} seats but {seats} agents are enabled: "
                "remove or disable agents first, or force to disable the newest",
                "seats",
            )
        agents = data["agents"] = [dict(a) for a in data.get("agents", [])]
        enabled = [a for a in agents if not a.get("disabled")]
        for agent in enabled[limit:]:
            agent["disabled"] = True
        return True
    if limit and seats > limit and seats > before:
        raise CatalogError(
            409, f"{plan} has {limit} seats and {before} are taken: no seat for another agent", "agents"
        )
    most = new.plan_section.max_mailboxes if new.plan_section is not None else 0
    mailboxes, had = len(new.mailboxes), len(old.mailboxes) if old is not None else 0
    if most and mailboxes > most and mailboxes > had:
        raise CatalogError(409, f"{plan} allows {most} upstream mailboxes", "mailboxes")
    return False


INT64 = 2**63 - 1  # the database's integer columns


def _check_values(value: Any, field: str = "") -> None:
    """Refuse what no column holds, anywhere in a definition: NUL or lone surrogates, integers over 64 bits.

    SQLite would take a NUL that PostgreSQL refuses: refused on both, the
    engines stay alike.
    """
    if isinstance(value, str):
        if "\x00" in value:
            raise CatalogError(400, "text may not contain NUL", field or None)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise CatalogError(400, "text must be Unicode (a lone surrogate is not)", field or None) from None
    elif isinstance(value, int) and not isinstance(value, bool) and not -INT64 - 1 <= value <= INT64:
        raise CatalogError(400, "a number over 64 bits", field or None)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_values(key, f"{field}.{key}" if field else str(key))
            _check_values(item, f"{field}.{key}" if field else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_values(item, f"{field}[{i}]")


def _texts(t: TenantSection) -> Iterator[tuple[str, str, Any]]:
    """(field, text, the column it is stored in) for the tenant's text that has a bounded column."""
    yield "name", t.name, Tenant.name
    for i, a in enumerate(t.agents):
        yield f"agents[{i}].login", a.login, Agent.login
        yield f"agents[{i}].name", a.name, Agent.name
    for i, m in enumerate(t.mailboxes):
        yield f"mailboxes[{i}].name", m.name, UpstreamMailbox.name
        for upstream, local in m.folders.items():
            yield f"mailboxes[{i}].folders.{upstream}", upstream, UpstreamFolder.folder
            yield f"mailboxes[{i}].folders.{upstream}", local, Folder.name
    for i, r in enumerate(t.rules):
        for j, action in enumerate(r.actions):
            if action.kind is ActionKind.FOLDER and action.value is not None:
                yield f"rules[{i}].actions[{j}].folder", action.value, Folder.name


def _check_storable(t: TenantSection) -> None:
    """Refuse a definition the database or the plan lifecycle cannot hold; the error names the field."""
    _check_values(document(t))
    for field, text, column in _texts(t):
        length = getattr(column.type, "length", None)
        if length is not None and len(text) > length:
            raise CatalogError(400, f"at most {length} characters", field)


Change = Callable[[dict[str, Any]], None]


async def edit(
    db: Database,
    base: Config,
    tenant_id: str,
    change: Change,
    *,
    create: bool = False,
    force: bool = False,
    stamps: Mapping[str, datetime | None] | None = None,
) -> TenantSection:
    """Apply ``change`` to a tenant's definition (a new one when ``create``), validated, and store it.

    ``force`` lets lowered seats disable the newest agents instead of refusing;
    ``stamps`` records lifecycle steps in the same transaction.
    """
    try:
        _check_values(tenant_id, "id")
    except CatalogError:
        if create:
            raise
        raise CatalogError(404, f"no tenant {tenant_id!r}") from None  # none could have this id
    async with db.write() as s:
        current = await catalog.definition(s, tenant_id, lock=True)
        if create and current is not None:
            raise CatalogError(409, f"tenant {tenant_id!r} exists", "id")
        if not create and current is None:
            raise CatalogError(404, f"no tenant {tenant_id!r}")
        data: dict[str, Any] = dict(current or {})
        change(data)
        if data.get("id") != tenant_id:
            raise CatalogError(400, "a tenant's id cannot be changed", "id")
        docs, stored_plans = await catalog.definitions(s)
        config = base.model_copy(update={"plans": _plans(base, stored_plans)})
        new = validate(data)
        others = tuple(validate(d) for d in docs if d["id"] != tenant_id)
        try:
            config.with_tenants((*others, new))
        except ValidationError as exc:
            path, _, message = format_errors(exc)[0].partition(": ")
            field = path.split("]", 1)[1].lstrip(".") if path.startswith("tenants[") else path
            raise CatalogError(
                409 if "used twice" in message or "belongs to" in message else 400, message, field
            ) from None
        old = validate(current) if current is not None else None
        if old is not None:
            with contextlib.suppress(ValidationError):  # its plan may be gone: then nothing was bought
                check_tenants((old,), config.plans)
        if _check_limits(old, new, data, force):
            new = validate(data)
            config.with_tenants((*others, new))
        _check_storable(new)
        await catalog.put_tenant(s, storage_spec(new), document(new))
        if stamps:
            await catalog.set_lifecycle(s, tenant_id, stamps)
    log.info("catalog.tenant_changed", tenant=tenant_id, created=create)
    return new


# --------------------------------------------------------------------------- changes, shared by CLI and API

LISTS = {"agents": "login", "rules": "name", "mailboxes": "name", "folders": "name"}


def _items(data: dict[str, Any], key: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = list(data.get(key, []))
    data[key] = items
    return items


def _index(items: list[dict[str, Any]], key: str, name: str) -> int:
    ident = LISTS[key]
    for i, item in enumerate(items):
        if item.get(ident) == name:
            return i
    raise CatalogError(404, f"no {key[:-1]} {name!r}", key)


def creating(data: Mapping[str, Any], plans: Mapping[str, PlanSection]) -> Change:
    """A new tenant's definition; on a trial plan with no dates, the trial starts today."""

    def change(current: dict[str, Any]) -> None:
        current.update(data)
        plan = plans.get(str(current.get("plan")))
        if (
            plan is not None
            and plan.trial_days
            and not current.get("paid_until")
            and not current.get("trial_until")
        ):
            current["trial_until"] = (today() + timedelta(days=plan.trial_days - 1)).isoformat()

    return change


def renewing(until: date) -> Change:
    """Paid until ``until``: a trial converts, a read-only tenant gets full service back."""
    return set_fields({"paid_until": until.isoformat(), "trial_until": None})


RENEWED = {"noticed_at": None, "read_only_at": None}  # with renewed_at: the steps start again


def set_fields(fields: Mapping[str, Any]) -> Change:
    """Set (or, with None, reset to the default) top-level keys of the tenant."""

    def change(data: dict[str, Any]) -> None:
        for key, value in fields.items():
            if key in LISTS:
                raise CatalogError(400, f"change {key} one by one, not by setting the list", key)
            if value is None:
                data.pop(key, None)
            else:
                data[key] = value

    return change


def add_item(key: str, item: Mapping[str, Any]) -> Change:
    """Append an agent, rule, mailbox or folder; 409 when one of that name exists."""

    def change(data: dict[str, Any]) -> None:
        items = _items(data, key)
        name = item.get(LISTS[key])
        if any(i.get(LISTS[key]) == name for i in items):
            raise CatalogError(409, f"{key[:-1]} {name!r} exists", f"{key}.{LISTS[key]}")
        items.append(dict(item))

    return change


def set_item(key: str, name: str, fields: Mapping[str, Any]) -> Change:
    """Change keys of one agent, rule, mailbox or folder (None resets a key to its default)."""

    def change(data: dict[str, Any]) -> None:
        items = _items(data, key)
        i = _index(items, key, name)
        item = dict(items[i])
        for k, v in fields.items():
            if k == LISTS[key] and v != name:
                raise CatalogError(400, f"a {key[:-1]}'s {k} cannot be changed", f"{key}.{k}")
            if v is None:
                item.pop(k, None)
            else:
                item[k] = v
        items[i] = item

    return change


def remove_item(key: str, name: str) -> Change:
    """Remove one agent, rule, mailbox or folder."""

    def change(data: dict[str, Any]) -> None:
        items = _items(data, key)
        del items[_index(items, key, name)]

    return change


def move_item(key: str, name: str, position: int) -> Change:
    """Move one rule (rules run in order) to ``position`` (1 = first)."""

    def change(data: dict[str, Any]) -> None:
        items = _items(data, key)
        if not 1 <= position <= len(items):
            raise CatalogError(400, f"position must be between 1 and {len(items)}", "position")
        items.insert(position - 1, items.pop(_index(items, key, name)))

    return change


async def hash_password(password: str) -> str:
    """An argon2id hash (in a thread: argon2 is slow on purpose)."""
    from argon2 import PasswordHasher

    if not password:
        raise CatalogError(400, "the password is empty", "password")
    return await asyncio.to_thread(PasswordHasher().hash, password)


async def get(db: Database, base: Config, tenant_id: str) -> TenantSection:
    """One tenant as served; CatalogError 404 when there is none."""
    config = await load(db, base)
    for t in config.tenants:
        if t.id == tenant_id:
            return t
    raise CatalogError(404, f"no tenant {tenant_id!r}")


class Watcher:
    """Polls the catalog's generation and hands each new configuration to ``switch``."""

    def __init__(
        self, db: Database, base: Callable[[], Config], switch: Callable[[Config], Awaitable[None]]
    ) -> None:
        self.db = db
        self.base = base
        self.switch = switch
        self.seen: int | None = None

    async def refresh(self) -> None:
        """Switch to the database's definitions now if they changed since the last look."""
        async with self.db.read() as s:
            now = await catalog.generation(s)
        if now != self.seen:
            self.seen = now
            await self.switch(await load(self.db, self.base()))

    async def run(self) -> None:
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            try:
                await uninterrupted(self.refresh())
            except (SQLAlchemyError, OSError) as exc:
                log.warning("catalog.poll_failed", error=str(exc))

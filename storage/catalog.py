"""The tenant catalog: each tenant's and plan's definition, and the rows that follow it.

Theory of operation
-------------------
A tenant is defined by one JSON document (the keys of a ``[[tenants]]``
table: its agents, rules and mailboxes included) in ``tenants.spec``, a plan
by one in ``plans.spec``. The gateway validates a document before it is
stored; storage keeps it opaque. Storing a tenant's definition also makes the
rows the mail store works with agree with it, in the same transaction: the
tenant's row (name, quota), its domains, its agents (one removed from the
definition is marked inactive, never deleted: its events stay) and its
folders (the configured ones and the defaults). Every change bumps the one
row of ``catalog_generation``: each instance polls it and reloads the
definitions when it moves, so a change made anywhere reaches every daemon on
the database within one poll.

Deleting a tenant removes every row that belongs to it, children first, and
returns the blobs its messages and queued mail referred to; the caller
removes those nothing else references after commit
(:func:`storage.retention.collect_blobs`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Table, delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from storage import mailstore
from storage.models import Agent, Base, CatalogGeneration, Domain, Message, Outbound, Plan, Tenant


@dataclass(frozen=True, slots=True)
class AgentSpec:
    login: str
    name: str
    password_hash: str
    active: bool = True


@dataclass(frozen=True, slots=True)
class FolderSpec:
    name: str
    quota_bytes: int | None = None
    special_use: str | None = None


@dataclass(frozen=True, slots=True)
class TenantSpec:
    """What the mail store needs of a tenant's definition."""

    id: str
    name: str
    quota_bytes: int | None
    domains: tuple[str, ...]
    agents: tuple[AgentSpec, ...] = ()
    folders: tuple[FolderSpec, ...] = ()


async def generation(s: AsyncSession) -> int:
    """The catalog's generation: it moves whenever a tenant or plan changes."""
    return await s.scalar(select(CatalogGeneration.generation).where(CatalogGeneration.id == 1)) or 0


async def _bump(s: AsyncSession) -> None:
    await s.execute(
        update(CatalogGeneration)
        .where(CatalogGeneration.id == 1)
        .values(generation=CatalogGeneration.generation + 1)
    )


async def definitions(s: AsyncSession) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Every defined tenant's document (by id) and every plan's (by name)."""
    tenants = (await s.scalars(select(Tenant.spec).where(Tenant.spec.is_not(None)).order_by(Tenant.id))).all()
    plans = (await s.execute(select(Plan.name, Plan.spec).order_by(Plan.name))).all()
    return [json.loads(t) for t in tenants if t], {name: json.loads(spec) for name, spec in plans}


async def definition(s: AsyncSession, tenant_id: str, *, lock: bool = False) -> dict[str, Any] | None:
    """One tenant's document; ``lock`` holds its row until commit (a read-modify-write)."""
    query = select(Tenant.spec).where(Tenant.id == tenant_id)
    spec = await s.scalar(query.with_for_update() if lock else query)
    return json.loads(spec) if spec else None


async def put_plans(s: AsyncSession, plans: Mapping[str, Mapping[str, Any]]) -> bool:
    """Store these plans' definitions (others stay); True when anything changed."""
    have = {p.name: p for p in (await s.scalars(select(Plan))).all()}
    changed = False
    for name, document in plans.items():
        text = json.dumps(document, sort_keys=True)
        if name not in have:
            s.add(Plan(name=name, spec=text))
        elif have[name].spec != text:
            have[name].spec = text
        else:
            continue
        changed = True
    if changed:
        await _bump(s)
    return changed


async def put_tenant(s: AsyncSession, spec: TenantSpec, document: Mapping[str, Any]) -> bool:
    """Store a tenant's definition and make its rows follow it; True when the definition changed."""
    text = json.dumps(document, sort_keys=True, ensure_ascii=False)
    tenant = await s.get(Tenant, spec.id)
    if tenant is None:
        tenant = Tenant(id=spec.id, used_bytes=0, used_messages=0, last_uidvalidity=0)
        s.add(tenant)
    changed = tenant.spec != text
    tenant.spec = text
    tenant.name = spec.name
    tenant.quota_bytes = spec.quota_bytes
    tenant.active = True
    await s.flush()
    await _sync_rows(s, spec)
    if changed:
        await _bump(s)
    return changed


async def usage(s: AsyncSession) -> dict[str, int]:
    """Each tenant's bytes stored (Spam excluded)."""
    return {r[0]: r[1] for r in await s.execute(select(Tenant.id, Tenant.used_bytes))}


LIFECYCLE = ("noticed_at", "read_only_at", "renewed_at")


async def set_lifecycle(s: AsyncSession, tenant_id: str, stamps: Mapping[str, datetime | None]) -> None:
    """Record lifecycle steps (:data:`LIFECYCLE`) on the tenant's row."""
    await s.execute(update(Tenant).where(Tenant.id == tenant_id).values(**stamps))


async def lifecycle(s: AsyncSession) -> dict[str, dict[str, datetime | None]]:
    """Each tenant's recorded lifecycle steps."""
    rows = await s.execute(select(Tenant.id, *(getattr(Tenant, c) for c in LIFECYCLE)))
    return {r[0]: dict(zip(LIFECYCLE, r[1:], strict=True)) for r in rows}


async def _sync_rows(s: AsyncSession, spec: TenantSpec) -> None:
    await s.execute(delete(Domain).where(Domain.tenant_id == spec.id, Domain.name.not_in(spec.domains)))
    have = set((await s.scalars(select(Domain.name).where(Domain.tenant_id == spec.id))).all())
    s.add_all(Domain(name=d, tenant_id=spec.id) for d in spec.domains if d not in have)

    logins = {a.login for a in spec.agents}
    await s.execute(
        update(Agent).where(Agent.tenant_id == spec.id, Agent.login.not_in(logins)).values(active=False)
    )
    for a in spec.agents:
        agent = await s.scalar(select(Agent).where(Agent.login == a.login))
        if agent is None:
            s.add(
                Agent(
                    tenant_id=spec.id,
                    login=a.login,
                    name=a.name,
                    password_hash=a.password_hash,
                    active=a.active,
                )
            )
        else:
            agent.tenant_id, agent.name, agent.password_hash, agent.active = (
                spec.id,
                a.name,
                a.password_hash,
                a.active,
            )
    await s.flush()

    configured_uses = {f.special_use for f in spec.folders if f.special_use}
    wanted = list(spec.folders) + [
        FolderSpec(name, special_use=use)
        for name, use in mailstore.DEFAULT_FOLDERS
        if use not in configured_uses
    ]
    for f in wanted:
        folder = await mailstore.get_folder(s, spec.id, f.name)
        if folder is None:
            # A default folder is skipped when some folder already has its role.
            if (
                f.special_use
                and f.special_use not in configured_uses
                and await mailstore.special_folder(s, spec.id, f.special_use) is not None
            ):
                continue
            await mailstore.create_folder(
                s, spec.id, f.name, special_use=f.special_use, quota_bytes=f.quota_bytes
            )
        else:
            folder.quota_bytes = f.quota_bytes if f in spec.folders else folder.quota_bytes
            if f.special_use:
                folder.special_use = f.special_use
    await s.flush()


def _owned_rows(table: Table, tenant_id: str) -> ColumnElement[bool] | None:
    """The tenant's rows of ``table``: by its ``tenant_id``, or by a parent row's; None if none."""
    if "tenant_id" in table.c:
        return table.c.tenant_id == tenant_id
    for fk in table.foreign_keys:
        parent = fk.column.table
        if "tenant_id" in parent.c:
            return fk.parent.in_(select(fk.column).where(parent.c.tenant_id == tenant_id))
    return None


async def delete_tenant(s: AsyncSession, tenant_id: str) -> set[str]:
    """Delete every row of the tenant; the blobs its rows referred to (maybe shared) are returned."""
    blobs = set((await s.scalars(select(Message.blob).where(Message.tenant_id == tenant_id))).all())
    blobs |= set((await s.scalars(select(Outbound.blob).where(Outbound.tenant_id == tenant_id))).all())
    for table in reversed(Base.metadata.sorted_tables):  # children first
        where = _owned_rows(table, tenant_id)
        if where is not None:
            await s.execute(delete(table).where(where))
    await s.execute(delete(Tenant).where(Tenant.id == tenant_id))
    await _bump(s)
    return blobs

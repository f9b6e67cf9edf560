"""Synchronise the configured tenants, domains, agents and folders into the database.

The configuration is the source of truth for who exists; the database keeps
the mail. A tenant or agent that disappears from the configuration is marked
inactive, never deleted: its mail stays until an operator removes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from storage import mailstore
from storage.models import Agent, Domain, Tenant


@dataclass(frozen=True, slots=True)
class AgentSpec:
    login: str
    name: str
    password_hash: str


@dataclass(frozen=True, slots=True)
class FolderSpec:
    name: str
    quota_bytes: int | None = None
    special_use: str | None = None


@dataclass(frozen=True, slots=True)
class TenantSpec:
    id: str
    name: str
    quota_bytes: int | None
    domains: tuple[str, ...]
    agents: tuple[AgentSpec, ...] = ()
    folders: tuple[FolderSpec, ...] = ()


async def sync_tenants(s: AsyncSession, tenants: Sequence[TenantSpec]) -> None:
    """Make the database agree with the configured tenants (idempotent)."""
    configured = {t.id for t in tenants}
    await s.execute(update(Tenant).where(Tenant.id.not_in(configured)).values(active=False))
    await s.execute(delete(Domain).where(Domain.tenant_id.not_in(configured)))
    for spec in tenants:
        await _sync_tenant(s, spec)


async def _sync_tenant(s: AsyncSession, spec: TenantSpec) -> None:
    tenant = await s.get(Tenant, spec.id)
    if tenant is None:
        tenant = Tenant(id=spec.id, used_bytes=0, used_messages=0, last_uidvalidity=0)
        s.add(tenant)
    tenant.name = spec.name
    tenant.quota_bytes = spec.quota_bytes
    tenant.active = True
    await s.flush()

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
                    tenant_id=spec.id, login=a.login, name=a.name, password_hash=a.password_hash, active=True
                )
            )
        else:
            agent.tenant_id, agent.name, agent.password_hash, agent.active = (
                spec.id,
                a.name,
                a.password_hash,
                True,
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

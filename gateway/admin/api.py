"""The admin HTTP API (``listen.admin``): tenants, agents, rules, mailboxes and plans as JSON.

Theory of operation
-------------------
A FastAPI application, served by uvicorn inside the daemon's event loop
(:class:`AdminServer`), with its OpenAPI document at ``/openapi.json``. Every
change goes through :func:`gateway.tenants.edit`, as the CLI's do: field
names are the TOML keys, errors are ``{"error": ..., "field": ...}`` with
400/401/403/404/409, and every daemon on the database serves the change
within a second. Reads come from the database too, not from what this daemon
serves yet, so a client reads its own writes at once.

Who may do what:

- the **operator** (``Authorization: Bearer`` with the token of
  ``admin.token_file``): everything;
- a **tenant administrator** (HTTP Basic with the login and password of an
  agent whose ``role`` is ``admin``; checked by the daemon's
  :class:`~gateway.auth.Authenticator`, so failures count toward the same
  per-address limit as IMAP's and SMTP's): reading its own tenant, and its
  agents (within the seats), rules and footers. Anything of another tenant
  answers 403; tenants, plans dates, mailboxes and deletion are the operator's.

The same listener answers client autoconfiguration
(:mod:`gateway.admin.autoconfig`), without authentication. Requests are
bounded: bodies over :data:`MAX_BODY` are refused before they are read whole,
and uvicorn caps connections and idle time.
"""

from __future__ import annotations

import asyncio
import hmac
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Annotated, Any

import structlog
import uvicorn
from fastapi import Body, Depends, FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBasic, HTTPBasicCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict
from sqlalchemy import select
from starlette.types import ASGIApp, Receive, Scope, Send

import quotas
from gateway import tenants
from gateway.admin import autoconfig
from gateway.auth import Authenticator, AuthUnavailable
from gateway.config import Config, ConfigError, TenantSection, TLSSection
from gateway.imap import mime
from gateway.ingest import describe
from gateway.lifecycle import delete_tenant
from gateway.message import parse_headers
from gateway.notify import Changes
from gateway.plans import standing
from storage import catalog, mailstore
from storage.blobs import BlobStore
from storage.db import Database
from storage.models import Message

log = structlog.get_logger(__name__)

MAX_BODY = 1024 * 1024  # bytes of a request body


class Error(BaseModel):
    """Every refusal: what is wrong, and the field it is about (a TOML key path) when there is one."""

    error: str
    field: str | None = None


class Renewal(BaseModel):
    model_config = ConfigDict(extra="forbid")

    until: date


class Move(BaseModel):
    model_config = ConfigDict(extra="forbid")

    position: int


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": Error, "description": text}
    for code, text in (
        (400, "invalid request; the field is named"),
        (401, "no or wrong credentials"),
        (403, "not yours to manage"),
        (404, "no such tenant, agent, rule, mailbox or plan"),
        (409, "conflicts with another tenant or with the plan's limits"),
    )
}

Document = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is asking: the operator (``tenant`` None) or one tenant's administrator."""

    tenant: str | None

    def may(self, tenant_id: str) -> None:
        if self.tenant is not None and self.tenant != tenant_id:
            raise tenants.CatalogError(403, f"you administer tenant {self.tenant!r} only")

    def operator(self) -> None:
        if self.tenant is not None:
            raise tenants.CatalogError(403, "only the operator may do this")


class _BodyLimit:
    """Refuses a body over :data:`MAX_BODY`, or one of unknown length, before it is read."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            length = headers.get(b"content-length")
            refusal = None
            if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
                refusal = JSONResponse({"error": f"the request body is over {MAX_BODY} bytes"}, 413)
            elif length is None and b"transfer-encoding" in headers:
                refusal = JSONResponse({"error": "give the body's Content-Length"}, 411)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


@dataclass(frozen=True, slots=True)
class Context:
    """What the routes work on: the daemon's database, configurations, authenticator and blobs."""

    db: Database
    served: Callable[[], Config]  # the file's settings with the database's tenants and plans
    base: Callable[[], Config]  # the file's
    auth: Authenticator
    blobs: BlobStore
    changes: Changes  # tells IMAP sessions of a template added or removed


_bearer = HTTPBearer(auto_error=False)
_basic = HTTPBasic(auto_error=False)


async def principal(
    request: Request,
    token: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    login: Annotated[HTTPBasicCredentials | None, Depends(_basic)],
) -> Principal:
    """The operator (bearer token) or a tenant administrator (Basic); 401/403 otherwise."""
    ctx: Context = request.app.state.ctx
    if token is not None:
        try:
            expected = ctx.base().admin.token()
        except ConfigError as exc:  # an unreadable token file: nobody is the operator until it is fixed
            log.error("admin.token_unreadable", errors=exc.errors)
            expected = None
        if expected is not None and hmac.compare_digest(
            token.credentials.encode(), expected.get_secret_value().encode()
        ):
            return Principal(None)
        raise tenants.CatalogError(401, "wrong token")
    if login is None:
        raise tenants.CatalogError(401, "credentials needed: the operator's bearer token or an admin's login")
    peer = request.client.host if request.client else "unknown"
    try:
        identity = await ctx.auth.verify(login.username, login.password, peer, "admin")
    except AuthUnavailable as exc:
        raise tenants.CatalogError(401, str(exc)) from None
    if identity is None:
        raise tenants.CatalogError(401, "wrong login or password")
    agent = ctx.served().tenant(identity.tenant_id).agent(identity.login)
    if agent is None or agent.role != "admin":
        raise tenants.CatalogError(403, "this login is not a tenant administrator")
    return Principal(identity.tenant_id)


Who = Annotated[Principal, Depends(principal)]
Uid = Annotated[int, Path(ge=1, le=2**32 - 1, description="the template's IMAP UID")]
Body_ = Annotated[Document, Body()]


def build_app(ctx: Context) -> FastAPI:
    """The admin application."""
    app = FastAPI(
        title="mailgate admin API",
        version="1",
        docs_url=None,
        redoc_url=None,
        description="Tenants, agents, rules, upstream mailboxes and plans. Field names are the TOML keys.",
    )
    app.state.ctx = ctx
    app.add_middleware(_BodyLimit)
    db, served, base = ctx.db, ctx.served, ctx.base

    @app.exception_handler(tenants.CatalogError)
    async def refused(request: Request, exc: tenants.CatalogError) -> JSONResponse:
        headers = {"WWW-Authenticate": 'Basic realm="mailgate"'} if exc.status == 401 else None
        return JSONResponse({"error": exc.message, "field": exc.field}, exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "path", "query")]
        return JSONResponse(
            {"error": first.get("msg", "invalid request"), "field": ".".join(loc) or None}, 400
        )

    async def tenant(tenant_id: str) -> TenantSection:
        # From the database, not the served configuration: a read sees the writes before it.
        return await tenants.get(db, base(), tenant_id)

    async def shown(t: TenantSection) -> Document:
        async with db.read() as s:
            steps = (await catalog.lifecycle(s)).get(t.id, {})
        st = standing(t)
        return {
            **tenants.show(t),
            "state": st.state,
            "ends": st.ends,
            "deleted_on": st.deleted_on,
            **steps,
        }

    async def edit(tenant_id: str, change: tenants.Change, **kwargs: Any) -> TenantSection:
        return await tenants.edit(db, base(), tenant_id, change, **kwargs)

    def item(t: TenantSection, key: str, name: str) -> Document:
        items: list[Document] = tenants.show(t).get(key, [])
        for i in items:
            if i.get(tenants.LISTS[key]) == name:
                return i
        raise tenants.CatalogError(404, f"no {key[:-1]} {name!r}", key)

    async def agent_fields(data: Document) -> Document:
        data = dict(data)
        password = data.pop("password", None)
        if password is not None:
            if not isinstance(password, str):
                raise tenants.CatalogError(400, "the password is text", "password")
            if "password_hash" in data:
                raise tenants.CatalogError(400, "give password or password_hash, not both", "password")
            data["password_hash"] = await tenants.hash_password(password)
        return data

    v1 = "/api/v1"
    r = ERRORS

    # -- tenants ------------------------------------------------------------------------------

    @app.get(f"{v1}/tenants", responses=r, tags=["tenants"])
    async def list_tenants(who: Who) -> list[Document]:
        listed = (await tenants.load(db, base())).tenants
        return [await shown(t) for t in listed if who.tenant in (None, t.id)]

    @app.post(f"{v1}/tenants", status_code=201, responses=r, tags=["tenants"])
    async def add_tenant(who: Who, data: Body_) -> Document:
        who.operator()
        tenant_id = data.get("id")
        if not isinstance(tenant_id, str):
            raise tenants.CatalogError(400, "a tenant needs an id", "id")
        t = await edit(tenant_id, tenants.creating(data, served().plans), create=True)
        return await shown(t)

    @app.get(f"{v1}/tenants/{{tenant_id}}", responses=r, tags=["tenants"])
    async def get_tenant(who: Who, tenant_id: str) -> Document:
        who.may(tenant_id)
        return await shown(await tenant(tenant_id))

    @app.patch(f"{v1}/tenants/{{tenant_id}}", responses=r, tags=["tenants"])
    async def set_tenant(who: Who, tenant_id: str, data: Body_) -> Document:
        who.may(tenant_id)
        who.operator()
        force = bool(data.pop("force", False))
        return await shown(await edit(tenant_id, tenants.set_fields(data), force=force))

    @app.delete(f"{v1}/tenants/{{tenant_id}}", status_code=204, responses=r, tags=["tenants"])
    async def delete(who: Who, tenant_id: str) -> Response:
        who.may(tenant_id)
        who.operator()
        await tenant(tenant_id)
        await delete_tenant(db, ctx.blobs, base(), tenant_id, datetime.now(UTC))
        return Response(status_code=204)

    @app.post(f"{v1}/tenants/{{tenant_id}}/renew", responses=r, tags=["tenants"])
    async def renew(who: Who, tenant_id: str, body: Renewal) -> Document:
        who.may(tenant_id)
        who.operator()
        stamps = {**tenants.RENEWED, "renewed_at": datetime.now(UTC)}
        return await shown(await edit(tenant_id, tenants.renewing(body.until), stamps=stamps))

    for verb, suspended in (("suspend", True), ("resume", None)):

        def make(flag: bool | None) -> Callable[..., Awaitable[Document]]:
            async def switch(who: Who, tenant_id: str) -> Document:
                who.may(tenant_id)
                who.operator()
                return await shown(await edit(tenant_id, tenants.set_fields({"suspended": flag})))

            return switch

        app.post(f"{v1}/tenants/{{tenant_id}}/{verb}", responses=r, tags=["tenants"], name=verb)(
            make(suspended)
        )

    # -- agents, rules, mailboxes ----------------------------------------------------------------

    for key, ident, admin_may in (
        ("agents", "login", True),
        ("rules", "name", True),
        ("mailboxes", "name", False),
    ):
        _lists(app, v1, key, ident, admin_may, tenant, item, edit, agent_fields)

    @app.post(f"{v1}/tenants/{{tenant_id}}/rules/{{name}}/move", responses=r, tags=["rules"])
    async def move_rule(who: Who, tenant_id: str, name: str, body: Move) -> list[Document]:
        who.may(tenant_id)
        t = await edit(tenant_id, tenants.move_item("rules", name, body.position))
        return list(tenants.show(t).get("rules", []))

    # -- templates: the tenant's shared Templates folder -------------------------------------------

    @app.get(f"{v1}/tenants/{{tenant_id}}/templates", responses=r, tags=["templates"])
    async def list_templates(who: Who, tenant_id: str) -> list[Document]:
        who.may(tenant_id)
        await tenant(tenant_id)
        async with db.read() as s:
            folder = await mailstore.require_folder(s, tenant_id, mailstore.TEMPLATES)
            rows = await s.execute(
                select(Message.uid, Message.subject, Message.size, Message.internal_date)
                .where(Message.folder_id == folder.id)
                .order_by(Message.uid)
            )
            return [dict(row._mapping) for row in rows]

    @app.post(
        f"{v1}/tenants/{{tenant_id}}/templates",
        status_code=201,
        responses=r,
        tags=["templates"],
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"message/rfc822": {"schema": {"type": "string", "format": "binary"}}},
            }
        },
    )
    async def add_template(who: Who, tenant_id: str, request: Request) -> Document:
        """Store a message (RFC 5322, the request body) as a template; every agent sees it over IMAP."""
        who.may(tenant_id)
        t = await tenant(tenant_id)
        body = await request.body()
        if not body.strip():
            raise tenants.CatalogError(400, "send the template as the body (Content-Type: message/rfc822)")
        if len(body) > t.max_message_size:
            raise tenants.CatalogError(400, f"a template is at most {t.max_message_size} bytes")
        raw = await asyncio.to_thread(mime.stored_form, body)
        digest = await ctx.blobs.put(raw)
        now = datetime.now(UTC)
        message = await asyncio.to_thread(
            describe, raw, parse_headers(raw), digest, now, frozenset({"\\Seen"})
        )
        async with db.write() as s:
            folder = await mailstore.require_folder(s, tenant_id, mailstore.TEMPLATES)
            try:
                await quotas.check(s, folder, len(raw))
            except quotas.QuotaExceeded as exc:
                raise tenants.CatalogError(409, str(exc)) from None
            (stored,) = await mailstore.append(s, folder, [message])
        ctx.changes.publish([folder.id])
        return {"uid": stored.uid, "subject": message.subject, "size": len(raw), "internal_date": now}

    @app.delete(
        f"{v1}/tenants/{{tenant_id}}/templates/{{uid}}", status_code=204, responses=r, tags=["templates"]
    )
    async def remove_template(who: Who, tenant_id: str, uid: Uid) -> Response:
        who.may(tenant_id)
        await tenant(tenant_id)
        async with db.write() as s:
            folder = await mailstore.require_folder(s, tenant_id, mailstore.TEMPLATES)
            if not await mailstore.expunge(s, folder, [uid]):
                raise tenants.CatalogError(404, f"no template {uid}")
        ctx.changes.publish([folder.id])
        return Response(status_code=204)

    # -- plans ----------------------------------------------------------------------------------

    @app.get(f"{v1}/plans", responses=r, tags=["plans"])
    async def list_plans(who: Who) -> list[Document]:
        return [{"name": n, **p.model_dump(mode="json")} for n, p in sorted(served().plans.items())]

    @app.get(f"{v1}/plans/{{name}}", responses=r, tags=["plans"])
    async def get_plan(who: Who, name: str) -> Document:
        plan = served().plans.get(name)
        if plan is None:
            raise tenants.CatalogError(404, f"no plan {name!r}")
        return {"name": name, **plan.model_dump(mode="json")}

    # -- client autoconfiguration ------------------------------------------------------------------

    def xml(answer: bytes | None) -> Response:
        if answer is None:
            return Response(status_code=404)
        return Response(answer, media_type="application/xml")

    @app.get("/mail/config-v1.1.xml", include_in_schema=False)
    @app.get("/.well-known/autoconfig/mail/config-v1.1.xml", include_in_schema=False)
    async def thunderbird(emailaddress: str = "") -> Response:
        return xml(autoconfig.thunderbird(served(), emailaddress))

    @app.post("/autodiscover/autodiscover.xml", include_in_schema=False)
    @app.post("/Autodiscover/Autodiscover.xml", include_in_schema=False)
    async def outlook(request: Request) -> Response:
        address = autoconfig.request_address(await request.body())
        return xml(autoconfig.autodiscover(served(), address) if address else None)

    return app


def _lists(
    app: FastAPI,
    v1: str,
    key: str,
    ident: str,
    admin_may: bool,
    tenant: Callable[[str], Awaitable[TenantSection]],
    item: Callable[[TenantSection, str, str], Document],
    edit: Callable[..., Awaitable[TenantSection]],
    agent_fields: Callable[[Document], Awaitable[Document]],
) -> None:
    """The routes of one list of a tenant: ``/tenants/{tenant}/<key>[/{name}]``."""
    path = f"{v1}/tenants/{{tenant_id}}/{key}"
    r = ERRORS

    def allowed(who: Principal, tenant_id: str) -> None:
        who.may(tenant_id)
        if not admin_may:
            who.operator()

    async def fields(data: Document) -> Document:
        return await agent_fields(data) if key == "agents" else data

    async def list_items(who: Who, tenant_id: str) -> list[Document]:
        allowed(who, tenant_id)
        return list(tenants.show(await tenant(tenant_id)).get(key, []))

    async def add(who: Who, tenant_id: str, data: Body_) -> Document:
        allowed(who, tenant_id)
        name = data.get(ident)
        if not isinstance(name, str):
            raise tenants.CatalogError(400, f"give the {ident}", ident)
        t = await edit(tenant_id, tenants.add_item(key, await fields(data)))
        return item(t, key, name)

    async def get(who: Who, tenant_id: str, name: str) -> Document:
        allowed(who, tenant_id)
        return item(await tenant(tenant_id), key, name)

    async def change(who: Who, tenant_id: str, name: str, data: Body_) -> Document:
        allowed(who, tenant_id)
        t = await edit(tenant_id, tenants.set_item(key, name, await fields(data)))
        return item(t, key, name)

    async def remove(who: Who, tenant_id: str, name: str) -> Response:
        allowed(who, tenant_id)
        await edit(tenant_id, tenants.remove_item(key, name))
        return Response(status_code=204)

    tags: list[str | Any] = [key]
    app.get(path, responses=r, tags=tags, name=f"list_{key}")(list_items)
    app.post(path, status_code=201, responses=r, tags=tags, name=f"add_{key}")(add)
    app.get(f"{path}/{{name}}", responses=r, tags=tags, name=f"get_{key}")(get)
    app.patch(f"{path}/{{name}}", responses=r, tags=tags, name=f"set_{key}")(change)
    app.delete(f"{path}/{{name}}", status_code=204, responses=r, tags=tags, name=f"remove_{key}")(remove)


class AdminServer:
    """Serves the admin application on one listener, with uvicorn's protocol, in the daemon's loop.

    uvicorn's start-up and shutdown are driven directly (not ``serve()``): the
    daemon owns the signals and the lifecycle.
    """

    def __init__(self, app: FastAPI, connections: int, timeout: float, tls: TLSSection) -> None:
        config = uvicorn.Config(
            app,
            log_config=None,
            access_log=False,
            lifespan="off",
            limit_concurrency=connections,
            timeout_keep_alive=int(max(timeout, 1)),
            timeout_graceful_shutdown=5,
            h11_max_incomplete_event_size=64 * 1024,
            server_header=False,
            proxy_headers=False,
            ssl_certfile=tls.cert_file,
            ssl_keyfile=tls.key_file,
        )
        config.load()
        self.server = uvicorn.Server(config)
        self.sock: socket.socket | None = None

    async def start(self, host: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        await self.start_on_socket(sock)

    async def start_on_socket(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.server.lifespan = self.server.config.lifespan_class(self.server.config)
        await self.server.startup(sockets=[sock])

    @property
    def port(self) -> int:
        if self.sock is None:
            raise RuntimeError("not started")
        return int(self.sock.getsockname()[1])

    async def stop(self) -> None:
        if self.server.started:
            await self.server.shutdown()

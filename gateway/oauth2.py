"""OAuth2 access tokens for upstream IMAP and outbound SMTP: one component shared by every puller and relay.

Theory of operation
-------------------
A mailbox or a tenant's smarthost with ``auth = "oauth2"`` names, in its
``oauth2`` table, a token endpoint (``token_url``, filled by the provider's
preset), a client (``client_id``, ``client_secret_file``) and either a
``refresh_token_file`` (delegated access: the mailbox owner consented once,
with ``mailgate oauth2 authorize``) or nothing more (the client-credentials
grant: Microsoft's app-only access). :class:`Tokens` holds one
:class:`TokenSource` per credential; every puller of the mailbox's folders
and every relay to the smarthost asks it for the access token and gets the
cached one until it comes within :func:`margin` of expiry; then exactly one
of them (a lock) asks the endpoint for a new one, the others wait for it.

A provider may rotate the refresh token: the new one answered with the
access token is written back to ``refresh_token_file`` atomically (a
temporary file fsynced, renamed over, the directory fsynced), and kept in
memory whatever the disk says, since the old one may no longer work. The
file is read again when it changes (an operator authorized again).

A failed request backs the source off: from :data:`BACKOFF_FIRST` doubling to
:data:`BACKOFF_MAX`; meanwhile every request for a token fails at once with
the same :class:`TokenError` and the endpoint is not asked again. A refused
grant (``invalid_grant``: the refresh token was revoked or expired) waits
the cap, or less: until the refresh token file changes. Each failed request
counts in ``mailgate_oauth2_token_errors_total{tenant,mailbox}``; the
pullers record the error as the folder's state (``mailgate mailboxes``).

Secrets (client secret, refresh and access tokens) are held as
:class:`~pydantic.SecretStr` and never formatted into a message: an error
carries the endpoint's ``error`` code and description only.

The SASL mechanisms that carry the access token are here too, as pure
functions: ``XOAUTH2`` (Google's and Microsoft's) and ``OAUTHBEARER`` (RFC
7628); :func:`mechanism` picks the standard one when the server offers it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx
import structlog
from pydantic import SecretStr

from gateway.config import OAuth2Section
from gateway.metrics import OAUTH2_TOKEN_ERRORS

log = structlog.get_logger(__name__)

BACKOFF_FIRST, BACKOFF_MAX = 5.0, 15 * 60.0  # seconds between failed requests to a token endpoint
HTTP_TIMEOUT = 30.0
SMTP_LABEL = "[smtp]"  # the metric's mailbox label of a tenant's smarthost credential


class TokenError(Exception):
    """No access token now: why (never a secret), and when the endpoint will be asked again."""

    def __init__(self, reason: str, retry_in: float, *, revoked: bool = False, code: str = "") -> None:
        super().__init__(reason)
        self.retry_in = retry_in
        self.revoked = revoked
        self.code = code  # the endpoint's "error", if it answered one


def margin(lifetime: float) -> float:
    """How long before expiry a token is renewed: a fifth of its lifetime, at most five minutes."""
    return min(300.0, lifetime / 5)


# --------------------------------------------------------------------------- SASL (pure)


def xoauth2(user: str, token: SecretStr) -> bytes:
    """The ``XOAUTH2`` initial response (before base64)."""
    return f"user={user}\x01auth=Bearer {token.get_secret_value()}\x01\x01".encode()


def oauthbearer(user: str, host: str, port: int, token: SecretStr) -> bytes:
    """The ``OAUTHBEARER`` initial response (RFC 7628 section 3.1, before base64)."""
    authzid = user.replace("=", "=3D").replace(",", "=2C")
    fields = f"host={host}\x01port={port}\x01auth=Bearer {token.get_secret_value()}"
    return f"n,a={authzid},\x01{fields}\x01\x01".encode()


# What a client answers to the server's error challenge, so that the server ends the exchange.
ABORT = {"OAUTHBEARER": b"\x01", "XOAUTH2": b""}


def mechanism(offered: Iterable[str]) -> str | None:
    """``OAUTHBEARER`` if offered, else ``XOAUTH2`` if offered, else None (``offered``: upper case)."""
    names = set(offered)
    return next((m for m in ("OAUTHBEARER", "XOAUTH2") if m in names), None)


def initial_response(mech: str, user: str, host: str, port: int, token: SecretStr) -> bytes:
    """The initial response of ``mech`` (one of :func:`mechanism`'s answers)."""
    return oauthbearer(user, host, port, token) if mech == "OAUTHBEARER" else xoauth2(user, token)


# --------------------------------------------------------------------------- files


def _read_secret(path: Path) -> tuple[SecretStr, float]:
    """A secret file's content (trailing newline dropped) and modification time."""
    with path.open(encoding="utf-8") as f:
        return SecretStr(f.read().strip()), os.fstat(f.fileno()).st_mtime


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def write_secret(path: Path, value: SecretStr) -> None:
    """Replace ``path`` with ``value`` atomically and durably (mode 0600)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, value.get_secret_value().encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dirfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


# --------------------------------------------------------------------------- endpoint


@dataclass(frozen=True, slots=True)
class Granted:
    """What a token endpoint answered: an access token, its lifetime, maybe a new refresh token."""

    access_token: SecretStr
    expires_in: float
    refresh_token: SecretStr | None


async def _post(url: str, form: dict[str, str], what: str, wanted: str) -> dict[str, Any]:
    """POST a form to an OAuth2 endpoint: its JSON answer, which has ``wanted``, or ``TokenError``."""
    try:
        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT, follow_redirects=False) as http:
            response = await http.post(url, data=form, headers={"Accept": "application/json"})
        body = response.json() if response.content else {}
    except (httpx.HTTPError, ValueError) as exc:
        raise TokenError(f"{what} unreachable or answered garbage: {type(exc).__name__}", 0) from None
    if not isinstance(body, dict):
        body = {}
    if response.status_code != 200 or not isinstance(body.get(wanted), str):
        error = str(body.get("error") or f"HTTP {response.status_code}")[:64]
        description = str(body.get("error_description") or "")[:200]
        reason = f"{what} refused: {error}" + (f" ({description})" if description else "")
        raise TokenError(reason, 0, revoked=error == "invalid_grant", code=error)
    return body


async def request_token(url: str, form: dict[str, str]) -> Granted:
    """POST a grant to a token endpoint (RFC 6749 section 4): :class:`Granted`, or ``TokenError``."""
    body = await _post(url, form, "token endpoint", "access_token")
    try:
        expires_in = float(body.get("expires_in", 3600))
    except (TypeError, ValueError):
        expires_in = 3600.0
    refresh = body.get("refresh_token")
    return Granted(
        SecretStr(body["access_token"]),
        max(expires_in, 1.0),
        SecretStr(refresh) if isinstance(refresh, str) and refresh else None,
    )


# --------------------------------------------------------------------------- sources


class TokenSource:
    """Access tokens for one credential (a mailbox's, or a tenant's smarthost's)."""

    def __init__(
        self, tenant_id: str, label: str, section: OAuth2Section, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.tenant_id, self.label, self.section = tenant_id, label, section
        self.clock = clock
        self.log = log.bind(tenant=tenant_id, mailbox=label)
        self._lock = asyncio.Lock()
        self._access: SecretStr | None = None
        self._renew_at = 0.0  # when the cached access token is to be renewed
        self._refresh: SecretStr | None = None
        self._refresh_mtime: float | None = None  # of the file, when _refresh was read or written
        self._failed: TokenError | None = None
        self._retry_at = 0.0
        self._backoff = BACKOFF_FIRST
        OAUTH2_TOKEN_ERRORS.labels(tenant_id, label)  # the series exists, at 0, before any error

    @property
    def error(self) -> str | None:
        """Why the last request failed, while the source backs off."""
        return str(self._failed) if self._failed is not None else None

    async def token(self) -> SecretStr:
        """A valid access token: the cached one, or a new one from the endpoint (``TokenError``)."""
        if self._access is not None and self.clock() < self._renew_at:
            return self._access
        async with self._lock:
            now = self.clock()
            if self._access is not None and now < self._renew_at:
                return self._access  # another task renewed it while this one waited
            if self._failed is not None and now < self._retry_at and not await self._reauthorized():
                raise TokenError(str(self._failed), self._retry_at - now, revoked=self._failed.revoked)
            try:
                granted = await request_token(self.section.effective_token_url, await self._form())
            except TokenError as exc:
                self._fail(exc)
                raise TokenError(str(exc), self._retry_at - self.clock(), revoked=exc.revoked) from None
            path = self.section.refresh_token_file
            if granted.refresh_token is not None and path is not None:
                await self._store_refresh(path, granted.refresh_token)
            self._access = granted.access_token
            self._renew_at = self.clock() + granted.expires_in - margin(granted.expires_in)
            if self._failed is not None:
                self.log.info("oauth2.recovered")
            self._failed, self._backoff = None, BACKOFF_FIRST
            return self._access

    def refused(self, token: SecretStr) -> None:
        """The server refused ``token``: the next request renews it (the endpoint's back-off still holds)."""
        if self._access is not None and self._access.get_secret_value() == token.get_secret_value():
            self._access = None

    def _fail(self, exc: TokenError) -> None:
        OAUTH2_TOKEN_ERRORS.labels(self.tenant_id, self.label).inc()
        delay = BACKOFF_MAX if exc.revoked else self._backoff
        self._backoff = min(self._backoff * 2, BACKOFF_MAX)
        if self._failed is None or str(self._failed) != str(exc):
            self.log.warning("oauth2.failed", error=str(exc), retry_in=round(delay))
        self._failed, self._retry_at, self._access = exc, self.clock() + delay, None

    async def _reauthorized(self) -> bool:
        """True when the refresh token file changed since it was read (e.g. authorized again)."""
        path = self.section.refresh_token_file
        return path is not None and await asyncio.to_thread(_mtime, path) != self._refresh_mtime

    async def _form(self) -> dict[str, str]:
        section = self.section
        form = {"client_id": section.client_id}
        if section.client_secret_file is not None:
            form["client_secret"] = (await self._read(section.client_secret_file)).get_secret_value()
        path = section.refresh_token_file
        if path is None:
            form |= {"grant_type": "client_credentials", "scope": section.effective_scope}
            return form
        if self._refresh is None or await self._reauthorized():
            self._refresh, self._refresh_mtime = await self._read_with_mtime(path)
        form |= {"grant_type": "refresh_token", "refresh_token": self._refresh.get_secret_value()}
        return form

    async def _read(self, path: Path) -> SecretStr:
        return (await self._read_with_mtime(path))[0]

    @staticmethod
    async def _read_with_mtime(path: Path) -> tuple[SecretStr, float]:
        try:
            return await asyncio.to_thread(_read_secret, path)
        except OSError as exc:
            raise TokenError(f"cannot read {str(path)!r}: {exc.strerror}", 0) from None

    async def _store_refresh(self, path: Path, refresh: SecretStr) -> None:
        """Keep a rotated refresh token, and write it back to its file."""
        if self._refresh is not None and refresh.get_secret_value() == self._refresh.get_secret_value():
            return
        self._refresh = refresh
        try:
            await asyncio.to_thread(write_secret, path, refresh)
            self._refresh_mtime = await asyncio.to_thread(_mtime, path)
        except OSError as exc:  # still used from memory; lost at restart unless the file is fixed
            self.log.error("oauth2.refresh_token_not_saved", file=str(path), error=exc.strerror)


class Tokens:
    """The token sources of every credential, shared by all pullers and relays of a process."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._sources: dict[tuple[str, str], TokenSource] = {}

    def source(self, tenant_id: str, label: str, section: OAuth2Section) -> TokenSource:
        """The source of this credential (a new one when its settings changed)."""
        found = self._sources.get((tenant_id, label))
        if found is None or found.section != section:
            found = self._sources[(tenant_id, label)] = TokenSource(tenant_id, label, section, self.clock)
        return found


# --------------------------------------------------------------------------- consent

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
CONSENT_WAIT = 600.0  # seconds the loopback listener waits for the browser


class AuthorizeError(Exception):
    """The device authorization did not complete (never a secret in the message)."""


async def authorize(section: OAuth2Section, show: Callable[[str], None]) -> Path:
    """The mailbox owner's consent, stored as the refresh token in ``refresh_token_file``: by the
    device flow where the provider has one, else by a redirect to a loopback address."""
    path = section.refresh_token_file
    if path is None:
        raise AuthorizeError("no refresh_token_file: this credential uses the client-credentials grant")
    client = {"client_id": section.client_id}
    if section.client_secret_file is not None:
        try:
            secret, _ = await asyncio.to_thread(_read_secret, section.client_secret_file)
        except OSError as exc:
            raise AuthorizeError(f"cannot read {str(section.client_secret_file)!r}: {exc.strerror}") from None
        client["client_secret"] = secret.get_secret_value()
    if section.effective_device_url:
        granted = await authorize_device(section, client, show)
    elif section.effective_authorization_url:
        granted = await authorize_loopback(section, client, show)
    else:
        raise AuthorizeError("give device_authorization_url or authorization_url")
    if granted.refresh_token is None:
        raise AuthorizeError("the provider granted no refresh token (is offline access in the scope?)")
    await asyncio.to_thread(write_secret, path, granted.refresh_token)
    return path


async def authorize_device(
    section: OAuth2Section,
    client: dict[str, str],
    show: Callable[[str], None],
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> Granted:
    """The device authorization grant (RFC 8628): ``show`` the user where to sign in and the code
    to enter, and poll until they did."""
    url = section.effective_device_url
    try:
        device = await _post(
            url, {**client, "scope": section.effective_scope}, "device endpoint", "device_code"
        )
    except TokenError as exc:
        raise AuthorizeError(str(exc)) from None
    where = (
        device.get("verification_uri_complete")
        or device.get("verification_uri")
        or device.get("verification_url")
    )
    show(f"Sign in as the mailbox's owner at {where} and enter the code {device.get('user_code')}")
    interval = float(device.get("interval") or 5)
    deadline = clock() + float(device.get("expires_in") or 900)
    form = {**client, "grant_type": DEVICE_GRANT, "device_code": str(device["device_code"])}
    while clock() < deadline:
        await sleep(interval)
        try:
            return await request_token(section.effective_token_url, form)
        except TokenError as exc:
            if exc.code == "authorization_pending":
                continue
            if exc.code == "slow_down":
                interval += 5
                continue
            raise AuthorizeError(str(exc)) from None
    raise AuthorizeError("the code expired before it was entered")


async def authorize_loopback(
    section: OAuth2Section, client: dict[str, str], show: Callable[[str], None]
) -> Granted:
    """The authorization code grant with PKCE (RFC 6749 4.1, RFC 7636, RFC 8252 7.3): ``show``
    the address to open; the browser is sent back to a one-shot listener on 127.0.0.1."""
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    state = secrets.token_urlsafe(16)
    answered: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 10)
            target = [*request.split(), b"", b""][1].decode("ascii", "replace")
            query = dict(parse_qsl(urlsplit(target).query))
            ours = query.get("state") == state and ("code" in query or "error" in query)
            text = "mailgate: done, you can close this window." if ours else "mailgate: not this request."
            writer.write(
                f"HTTP/1.1 {200 if ours else 400} OK\r\nContent-Type: text/plain; charset=utf-8\r\n"
                f"Content-Length: {len(text)}\r\nConnection: close\r\n\r\n{text}".encode()
            )
            await writer.drain()
            if ours and not answered.done():
                answered.set_result(query)
        except (OSError, TimeoutError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    redirect = f"http://127.0.0.1:{port}/"
    params = {
        "response_type": "code",
        "client_id": section.client_id,
        "redirect_uri": redirect,
        "scope": section.effective_scope,
        "state": state,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "access_type": "offline",  # Google: a refresh token
        "prompt": "consent",
    }
    show(
        f"Open in a browser on this machine (or through `ssh -L {port}:127.0.0.1:{port}`), sign in as "
        f"the mailbox's owner and allow access: {section.effective_authorization_url}?{urlencode(params)}"
    )
    try:
        query = await asyncio.wait_for(answered, CONSENT_WAIT)
    except TimeoutError:
        raise AuthorizeError(f"no answer from the browser within {CONSENT_WAIT:.0f} s") from None
    finally:
        server.close()
        await server.wait_closed()
    if "code" not in query:
        raise AuthorizeError(f"the provider refused: {query.get('error', '')[:64]}")
    form = {**client, "grant_type": "authorization_code", "code": query["code"], "redirect_uri": redirect}
    try:
        return await request_token(section.effective_token_url, form | {"code_verifier": verifier})
    except TokenError as exc:
        raise AuthorizeError(str(exc)) from None

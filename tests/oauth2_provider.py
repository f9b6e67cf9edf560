"""A local OAuth2 provider stand-in for tests (127.0.0.1, an ephemeral port, a thread of its own).

It plays Microsoft's or Google's identity platform closely enough for
mailgate's token component and a private Dovecot's ``oauth2`` passdb:

* ``POST /token``: the ``refresh_token``, ``client_credentials`` and
  ``urn:ietf:params:oauth:grant-type:device_code`` grants (RFC 6749, RFC
  8628), client authentication by ``client_secret`` in the form; access
  tokens live :attr:`Provider.lifetime` seconds; with :attr:`rotate` every
  refresh answers a new refresh token and revokes the old one;
* ``POST /device``: device authorization (RFC 8628 section 3.1); a test
  approves the user code with :meth:`Provider.approve`;
* the ``authorization_code`` grant with PKCE (RFC 7636): a test plays the
  browser, getting a code with :meth:`Provider.consent` for the redirect
  and challenge the authorization address carries;
* ``POST /introspect``: token introspection (RFC 7662) as Dovecot asks it
  (``introspection_mode = post``), answering ``active`` and ``username``.

Every request is counted by grant (:attr:`Provider.requests`), so a test can
check that the token endpoint is not hammered. A thread (not the test's event
loop) serves, so Dovecot's introspection is answered while a test blocks.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import parse_qs

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


@dataclass
class _Device:
    client_id: str
    scope: str
    user_code: str
    user: str | None = None  # set when approved


class Provider:
    """The stand-in; use as a context manager. Tokens are random and opaque."""

    def __init__(self, *, lifetime: float = 3600, rotate: bool = True) -> None:
        self.lifetime = lifetime
        self.rotate = rotate
        self.clients: dict[str, str] = {}  # client_id: secret ("" for a public client)
        self.app_users: dict[str, str] = {}  # client_id: the mailbox its app-only tokens may open
        self.refresh_tokens: dict[str, tuple[str, str]] = {}  # token: (client_id, user)
        self.access_tokens: dict[str, tuple[str, float]] = {}  # token: (user, expiry)
        self.devices: dict[str, _Device] = {}  # device_code: its state
        self.codes: dict[str, tuple[str, str, str, str]] = {}  # code: (client_id, user, redirect, challenge)
        self.requests: Counter[str] = Counter()  # by grant type, and "introspect", "device"
        self.lock = threading.Lock()
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
                with provider.lock:
                    status, body = provider.handle(self.path, form)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="oauth2", daemon=True)

    # ------------------------------------------------------------------ set-up by tests

    def client(self, client_id: str, secret: str = "", *, app_user: str | None = None) -> None:
        """Register a client (and, with ``app_user``, let it have app-only tokens for that mailbox)."""
        self.clients[client_id] = secret
        if app_user is not None:
            self.app_users[client_id] = app_user

    def grant(self, client_id: str, user: str) -> str:
        """A refresh token, as if ``user`` had consented (the delegated case)."""
        token = "rt-" + secrets.token_urlsafe(16)
        with self.lock:
            self.refresh_tokens[token] = (client_id, user)
        return token

    def revoke(self, user: str) -> None:
        """Revoke every refresh and access token of ``user`` (e.g. the password was changed)."""
        with self.lock:
            for table in (self.refresh_tokens, self.access_tokens):
                for token in [t for t, v in table.items() if user in v]:
                    del table[token]

    def approve(self, user_code: str, user: str) -> None:
        """The user signs in and enters ``user_code`` (the device flow's second device)."""
        with self.lock:
            for device in self.devices.values():
                if device.user_code == user_code:
                    device.user = user
                    return
        raise KeyError(user_code)

    def consent(self, client_id: str, user: str, redirect_uri: str, challenge: str) -> str:
        """``user`` allowed ``client_id`` in the browser: the code the redirect carries."""
        code = "ac-" + secrets.token_urlsafe(16)
        with self.lock:
            self.codes[code] = (client_id, user, redirect_uri, challenge)
        return code

    def active(self, user: str) -> list[str]:
        """Refresh tokens of ``user`` that still work."""
        with self.lock:
            return [t for t, (_, u) in self.refresh_tokens.items() if u == user]

    # ------------------------------------------------------------------ endpoints

    def handle(self, path: str, form: dict[str, str]) -> tuple[int, dict[str, object]]:
        if path == "/introspect":
            self.requests["introspect"] += 1
            found = self.access_tokens.get(form.get("token", ""))
            if found is None or found[1] < time.time():
                return 200, {"active": False}
            return 200, {"active": True, "username": found[0]}
        client_id = form.get("client_id", "")
        if client_id not in self.clients or self.clients[client_id] != form.get("client_secret", ""):
            return 401, {"error": "invalid_client"}
        if path == "/device":
            self.requests["device"] += 1
            code, user_code = secrets.token_urlsafe(16), secrets.token_hex(4).upper()
            self.devices[code] = _Device(client_id, form.get("scope", ""), user_code)
            return 200, {
                "device_code": code,
                "user_code": user_code,
                "verification_uri": f"{self.url}/device-login",
                "expires_in": 600,
                "interval": 1,
            }
        if path != "/token":
            return 404, {"error": "not_found"}
        grant = form.get("grant_type", "")
        self.requests[grant] += 1
        if grant == "refresh_token":
            found_rt = self.refresh_tokens.get(form.get("refresh_token", ""))
            if found_rt is None or found_rt[0] != client_id:
                return 400, {"error": "invalid_grant", "error_description": "the refresh token is revoked"}
            user = found_rt[1]
            if self.rotate:
                del self.refresh_tokens[form["refresh_token"]]
                return 200, self._issue(client_id, user, refresh=True)
            return 200, self._issue(client_id, user, refresh=False)
        if grant == "client_credentials":
            if client_id not in self.app_users:
                return 400, {"error": "unauthorized_client"}
            return 200, self._issue(client_id, self.app_users[client_id], refresh=False)
        if grant == DEVICE_GRANT:
            device = self.devices.get(form.get("device_code", ""))
            if device is None or device.client_id != client_id:
                return 400, {"error": "invalid_grant"}
            if device.user is None:
                return 400, {"error": "authorization_pending"}
            del self.devices[form["device_code"]]
            return 200, self._issue(client_id, device.user, refresh=True)
        if grant == "authorization_code":
            found_code = self.codes.pop(form.get("code", ""), None)
            verifier = form.get("code_verifier", "").encode()
            proof = base64.urlsafe_b64encode(hashlib.sha256(verifier).digest()).rstrip(b"=").decode()
            if found_code is None or found_code[::2] != (client_id, form.get("redirect_uri")):
                return 400, {"error": "invalid_grant"}
            if found_code[3] != proof:
                return 400, {"error": "invalid_grant", "error_description": "PKCE verification failed"}
            return 200, self._issue(client_id, found_code[1], refresh=True)
        return 400, {"error": "unsupported_grant_type"}

    def _issue(self, client_id: str, user: str, *, refresh: bool) -> dict[str, object]:
        access = "at-" + secrets.token_urlsafe(16)
        self.access_tokens[access] = (user, time.time() + self.lifetime)
        body: dict[str, object] = {"access_token": access, "token_type": "Bearer"}
        body["expires_in"] = self.lifetime
        if refresh:
            token = "rt-" + secrets.token_urlsafe(16)
            self.refresh_tokens[token] = (client_id, user)
            body["refresh_token"] = token
        return body

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Provider:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

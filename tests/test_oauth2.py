"""OAuth2 upstream credentials against a local provider stand-in and a private Dovecot that
introspects its tokens: the shared token component, SASL OAUTHBEARER and XOAUTH2, refresh
across expiries, rotation written back, a revoked grant reported without hammering."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
from aiosmtpd.smtp import SMTP, AuthResult
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import OAuth2Section, parse_config
from gateway.daemon import open_store
from gateway.ingest import Pipeline
from gateway.metrics import REGISTRY
from gateway.oauth2 import BACKOFF_MAX, TokenError, Tokens, margin
from gateway.pull.imap_client import AuthFailed
from gateway.pull.puller import FolderPuller, HostLimits, jobs
from tests.conftest import config_dict, free_port, peer
from tests.daemon import Daemon, write_config
from tests.dovecot import Dovecot
from tests.oauth2_provider import DEVICE_GRANT, Provider
from tests.smarthost import Smarthost
from tests.test_quota_deferral import scrape
from tests.test_relay import CUSTOMER, SENDER, gateway_config, queue_one, relay_settings, running

pytestmark = pytest.mark.peers

REPO = Path(__file__).resolve().parent.parent
ALERTS = REPO / "config" / "prometheus" / "mailgate-alerts.yml"


@pytest.fixture
def provider() -> Iterator[Provider]:
    with Provider(lifetime=3600) as p:
        p.client("mailgate", "client-secret")
        yield p


def section(provider: Provider, tmp_path: Path, user: str | None = "biuro", **fields: Any) -> dict[str, Any]:
    """An ``oauth2`` table for the stand-in; with ``user``, a refresh token of theirs in a file."""
    secret = tmp_path / "client-secret"
    secret.write_text("client-secret\n")
    table: dict[str, Any] = {
        "provider": "generic",
        "token_url": f"{provider.url}/token",
        "device_authorization_url": f"{provider.url}/device",
        "client_id": "mailgate",
        "client_secret_file": str(secret),
        "scope": "mail",
        **fields,
    }
    if user is not None:
        refresh = tmp_path / f"{user}.refresh"
        refresh.write_text(provider.grant("mailgate", user) + "\n")
        table["refresh_token_file"] = str(refresh)
    return table


def samples(name: str) -> dict[tuple[str, str], float]:
    """The process registry's samples of a family, by (tenant, mailbox)."""
    return {
        (s.labels["tenant"], s.labels["mailbox"]): s.value
        for m in REGISTRY.collect()
        for s in m.samples
        if s.name == name
    }


# --------------------------------------------------------------------------- the token component


async def test_tokens_are_cached_renewed_before_expiry_and_rotated_into_the_file(
    provider: Provider, tmp_path: Path
) -> None:
    provider.lifetime = 10
    now = [1000.0]
    tokens = Tokens(clock=lambda: now[0])
    cfg = OAuth2Section.model_validate(section(provider, tmp_path))
    path = cfg.refresh_token_file
    assert path is not None
    source = tokens.source("acme", "biuro", cfg)
    first = await source.token()
    assert tokens.source("acme", "biuro", cfg) is source  # one source per credential
    assert await source.token() is first  # cached: one request
    now[0] += 10 - margin(10) - 0.01
    assert await source.token() is first
    now[0] += 0.02  # within the margin: renewed before it expires
    second = await source.token()
    assert second.get_secret_value() != first.get_secret_value()
    assert provider.requests["refresh_token"] == 2
    # Each refresh rotated the refresh token: the file holds the one that works, mode 0600.
    assert provider.active("biuro") == [path.read_text().strip()]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


async def test_concurrent_requests_share_one_refresh(provider: Provider, tmp_path: Path) -> None:
    source = Tokens().source("acme", "biuro", OAuth2Section.model_validate(section(provider, tmp_path)))
    got = await asyncio.gather(*(source.token() for _ in range(20)))
    assert len({t.get_secret_value() for t in got}) == 1
    assert provider.requests["refresh_token"] == 1


async def test_client_credentials_grant(provider: Provider, tmp_path: Path) -> None:
    provider.client("app", "client-secret", app_user="biuro")
    cfg = OAuth2Section.model_validate(section(provider, tmp_path, user=None, client_id="app"))
    token = await Tokens().source("acme", "biuro", cfg).token()
    assert token.get_secret_value() in provider.access_tokens
    assert provider.requests == {"client_credentials": 1}


async def test_a_revoked_grant_backs_off_until_the_file_changes_and_never_logs_a_secret(
    provider: Provider, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    now = [1000.0]
    cfg = OAuth2Section.model_validate(section(provider, tmp_path))
    path = cfg.refresh_token_file
    assert path is not None
    revoked = path.read_text().strip()
    provider.revoke("biuro")
    before = samples("mailgate_oauth2_token_errors_total").get(("acme", "revoked"), 0.0)
    source = Tokens(clock=lambda: now[0]).source("acme", "revoked", cfg)
    for _ in range(50):
        with pytest.raises(TokenError) as caught:
            await source.token()
        assert caught.value.revoked
        assert "invalid_grant" in str(caught.value)
        assert 0 < caught.value.retry_in <= BACKOFF_MAX
        now[0] += 1
    assert provider.requests["refresh_token"] == 1  # the endpoint is not hammered
    assert samples("mailgate_oauth2_token_errors_total")[("acme", "revoked")] == before + 1
    # The operator authorizes again: the new file is used at once, not after the back-off.
    path.write_text(provider.grant("mailgate", "biuro") + "\n")
    os.utime(path, (time.time() + 2, time.time() + 2))
    assert (await source.token()).get_secret_value() in provider.access_tokens
    assert source.error is None
    logged = caplog.text + "".join(capsys.readouterr())
    assert "oauth2.failed" in logged
    for secret in [revoked, "client-secret", *provider.access_tokens, *provider.refresh_tokens]:
        assert secret not in logged


async def test_an_unreachable_endpoint_backs_off_doubling(tmp_path: Path) -> None:
    now = [0.0]
    port = free_port()  # nothing listens there
    cfg = OAuth2Section.model_validate(
        {"provider": "generic", "token_url": f"http://127.0.0.1:{port}/token", "client_id": "c", "scope": "s"}
        | {"refresh_token_file": str(tmp_path / "rt")}
    )
    (tmp_path / "rt").write_text("x")
    source = Tokens(clock=lambda: now[0]).source("acme", "down", cfg)
    waits = []
    for _ in range(4):
        with pytest.raises(TokenError) as caught:
            await source.token()
        waits.append(caught.value.retry_in)
        now[0] += caught.value.retry_in
    assert waits == [5.0, 10.0, 20.0, 40.0]


# --------------------------------------------------------------------------- pulling with Dovecot


@pytest.fixture
def oauth_dovecot(request: pytest.FixtureRequest, provider: Provider) -> Iterator[Dovecot]:
    """A private Dovecot whose oauth2 passdb introspects at the stand-in (SASL mechanisms: the param)."""
    server = Dovecot()
    server.use_oauth2(f"{provider.url}/introspect", getattr(request, "param", "xoauth2 oauthbearer"))
    with server:
        server.add_user("biuro", "not-used-here")
        yield server


async def make_puller(tmp_path: Path, db_url: str, box: dict[str, Any]) -> tuple[FolderPuller, Any]:
    config = parse_config(config_dict(tmp_path, db_url, mailboxes=[box]))
    db, blobs = await open_store(config)
    (job,) = list(jobs(config))
    return FolderPuller(job, lambda: config, Pipeline(db, blobs), db, HostLimits(), tokens=Tokens()), db


def oauth_box(dovecot: Dovecot, table: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {
        "name": "biuro",
        "host": dovecot.host,
        "port": dovecot.port,
        "security": "none",
        "username": "biuro",
        "auth": "oauth2",
        "oauth2": table,
        "idle": False,
        **fields,
    }


@pytest.mark.parametrize(
    ("oauth_dovecot", "expected"),
    [("xoauth2", "XOAUTH2"), ("xoauth2 oauthbearer", "OAUTHBEARER")],
    indirect=["oauth_dovecot"],
)
async def test_pulls_with_the_mechanism_the_server_offers(
    oauth_dovecot: Dovecot, provider: Provider, tmp_path: Path, db_url: str, expected: str
) -> None:
    oauth_dovecot.append("biuro", "INBOX", b"Subject: hello\r\nMessage-ID: <a@x>\r\n\r\nbody\r\n")
    puller, db = await make_puller(tmp_path, db_url, oauth_box(oauth_dovecot, section(provider, tmp_path)))
    try:
        client = await puller.connect()
        try:
            assert await puller.sync(client) == 1
        finally:
            await client.logout()
    finally:
        await db.close()
    assert f"user=<biuro>, method={expected}" in oauth_dovecot.log()
    assert provider.requests["introspect"] >= 1


async def test_a_token_the_server_refuses_is_an_auth_failure(
    oauth_dovecot: Dovecot, provider: Provider, tmp_path: Path, db_url: str
) -> None:
    table = section(provider, tmp_path, user="sklep")  # tokens of someone else: the username does not match
    puller, db = await make_puller(tmp_path, db_url, oauth_box(oauth_dovecot, table))
    try:
        with pytest.raises(AuthFailed, match=r"refused the OAuth2 token \(OAUTHBEARER\)"):
            await puller.connect()
    finally:
        await db.close()


def doveadm_kick(dovecot: Dovecot, user: str) -> None:
    subprocess.run(
        [peer("doveadm"), "-c", str(dovecot.conf_path), "kick", user],
        check=True,
        capture_output=True,
        timeout=30,
    )


# --------------------------------------------------------------------------- the daemon


def oauth_toml(dovecot: Dovecot, table: dict[str, Any]) -> str:
    lines = [
        "[[tenants.mailboxes]]",
        'name = "biuro"',
        'host = "127.0.0.1"',
        f"port = {dovecot.port}",
        'security = "none"',
        'username = "biuro"',
        'auth = "oauth2"',
        "idle = false",
        'poll_interval = "1s"',
        "[tenants.mailboxes.oauth2]",
        *(f'{k} = "{v}"' for k, v in table.items()),
    ]
    return "\n".join(lines) + "\n"


def test_the_daemon_pulls_across_three_expiries_and_reports_a_revoked_grant(
    tmp_path: Path, db_url: str, provider: Provider, oauth_dovecot: Dovecot
) -> None:
    provider.lifetime = 4
    table = section(provider, tmp_path)
    refresh_file = Path(table["refresh_token_file"])
    smtp_port, metrics_port = free_port(), free_port()
    path = write_config(tmp_path, db_url, smtp_port, oauth_toml(oauth_dovecot, table))
    listen = f'[listen]\nmetrics = "127.0.0.1:{metrics_port}"\n'
    path.write_text(path.read_text().replace("[listen]\n", listen))
    daemon = Daemon(path, smtp_port, tmp_path)
    daemon.start()
    try:
        for expiry in range(4):
            message = f"Subject: {expiry}\r\nMessage-ID: <{expiry}@x>\r\n\r\n.\r\n".encode()
            oauth_dovecot.append("biuro", "INBOX", message)
            daemon.wait_for(
                f"message {expiry + 1} pulled",
                lambda n=expiry + 1: daemon.folders("acme").get("INBOX") == n,
                30,
            )
            if expiry < 3:
                time.sleep(provider.lifetime + 0.5)  # the token the connection logged in with expired
                doveadm_kick(oauth_dovecot, "biuro")  # a new connection needs a new token
        logins = oauth_dovecot.log().count("user=<biuro>, method=OAUTHBEARER")
        assert logins >= 4
        # One refresh per expiry (plus the first token), never more than one per login.
        assert 4 <= provider.requests["refresh_token"] <= logins
        assert provider.active("biuro") == [refresh_file.read_text().strip()]  # rotated, written back

        provider.revoke("biuro")
        time.sleep(provider.lifetime + 0.5)
        doveadm_kick(oauth_dovecot, "biuro")
        daemon.wait_for(
            "the revoked grant reported", lambda: daemon.mailboxes()["biuro"]["state"] == "oauth2_failed", 30
        )
        row = daemon.mailboxes()["biuro"]
        assert "invalid_grant" in str(row["last_error"])
        asked = provider.requests["refresh_token"]
        time.sleep(5)  # the pullers keep waiting; the endpoint is not asked again
        assert provider.requests["refresh_token"] == asked
        exposition = scrape(metrics_port)
        errors = {
            (s.labels["tenant"], s.labels["mailbox"]): s.value
            for f in text_string_to_metric_families(exposition)
            for s in f.samples
            if s.name == "mailgate_oauth2_token_errors_total"
        }
        assert errors == {("acme", "biuro"): 1.0}
        promtool_fires_the_alert(tmp_path, ("acme", "biuro"))
        for secret in [*provider.access_tokens, *provider.refresh_tokens, "client-secret"]:
            assert secret not in daemon.log.read_text()
    finally:
        daemon.stop()


def promtool_fires_the_alert(tmp_path: Path, labels: tuple[str, str]) -> None:
    """promtool: a counter with the scraped labels growing as a revoked grant makes it (every 15
    minutes) fires MailgateOAuth2TokenFailing after 30 minutes, and not before."""
    tenant, mailbox = labels
    test = {
        "rule_files": [str(ALERTS)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {
                        "series": f'mailgate_oauth2_token_errors_total{{job="mailgate", instance="gw1:9464", '
                        f'tenant="{tenant}", mailbox="{mailbox}"}}',
                        "values": "0 " + " ".join(str(1 + m // 15) for m in range(60)),
                    }
                ],
                "alert_rule_test": [
                    {"eval_time": "20m", "alertname": "MailgateOAuth2TokenFailing", "exp_alerts": []},
                    {
                        "eval_time": "45m",
                        "alertname": "MailgateOAuth2TokenFailing",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "warning",
                                    "job": "mailgate",
                                    "instance": "gw1:9464",
                                    "tenant": tenant,
                                    "mailbox": mailbox,
                                },
                                "exp_annotations": {
                                    "summary": f"OAuth2 tokens for {tenant}/{mailbox} keep failing",
                                    "description": (
                                        f"mailgate cannot get an OAuth2 access token for {mailbox} of tenant "
                                        f'{tenant} ("[smtp]": its outbound smarthost), so its mail is not '
                                        "pulled or not sent. `mailgate mailboxes --tenant "
                                        f"{tenant}` shows the endpoint's answer; "
                                        '"invalid_grant" means the refresh token was '
                                        "revoked or expired: run `mailgate oauth2 authorize --mailbox "
                                        f"{mailbox}` with the mailbox owner."
                                    ),
                                },
                            }
                        ],
                    },
                ],
            }
        ],
    }
    path = tmp_path / "oauth2-alert.test.yml"
    path.write_text(json.dumps(test))  # JSON is YAML
    out = subprocess.run(
        [peer("promtool"), "test", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


# --------------------------------------------------------------------------- outbound SMTP


@dataclass
class OAuthSmarthost(Smarthost):
    """A smarthost accepting only ``AUTH XOAUTH2``, with a token the stand-in issued for ``username``."""

    provider: Provider | None = None
    mechanisms_used: list[str] = field(default_factory=list)

    async def auth_XOAUTH2(self, server: SMTP, args: list[str]) -> AuthResult:
        self.mechanisms_used.append("XOAUTH2")
        raw = base64.b64decode(args[1]) if len(args) > 1 else await server.challenge_auth("")
        fields = dict(f.split("=", 1) for f in raw.decode().split("\x01") if "=" in f)
        token = fields.get("auth", "").removeprefix("Bearer ")
        assert self.provider is not None
        found = self.provider.access_tokens.get(token)
        if found is not None and found[0] == self.username == fields.get("user") and found[1] > time.time():
            return AuthResult(success=True, handled=False)
        await server.challenge_auth(json.dumps({"status": "401"}).encode())  # the error, as Google does
        return AuthResult(success=False, handled=False)

    async def start(self) -> OAuthSmarthost:
        def factory() -> SMTP:
            session = SMTP(
                self,
                hostname="smarthost.test",
                auth_required=True,
                auth_require_tls=False,
                auth_exclude_mechanism=["LOGIN", "PLAIN"],
            )
            self.sessions.append(session)
            return session

        self.server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
        return self


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning")
async def test_replies_relay_through_a_smarthost_that_accepts_only_xoauth2(
    provider: Provider, tmp_path: Path, db_url: str
) -> None:
    host = await OAuthSmarthost(username=SENDER, provider=provider).start()
    try:
        table = section(provider, tmp_path, user=SENDER)
        smtp = relay_settings(host, tmp_path, password_env=None, auth="oauth2", oauth2=table)
        async with running(gateway_config(tmp_path, db_url, smtp)) as g:
            await queue_one(g)
            await g.relay()
            assert await g.queued() == []
            (got,) = host.received
            assert got.rcpts == [CUSTOMER]
            assert host.mechanisms_used == ["XOAUTH2"]
            errors = samples("mailgate_oauth2_token_errors_total")[("acme", "[smtp]")]

            # Revoked: the message waits (deferred, the endpoint's answer as the reason), not bounced.
            provider.revoke(SENDER)
            g.worker.tokens = Tokens()  # as after a restart: no cached access token
            await queue_one(g, "<out-2@acme.test>")
            await g.relay()
            ((_, states),) = await g.queued()
            state, reply = states[CUSTOMER]
            assert state == "pending"
            assert reply is not None
            assert reply.startswith("451 4.7.0 OAuth2: token endpoint refused: invalid_grant")
            assert len(host.received) == 1
            assert samples("mailgate_oauth2_token_errors_total")[("acme", "[smtp]")] == errors + 1
    finally:
        await host.stop()


# --------------------------------------------------------------------------- oauth2 authorize


def test_oauth2_authorize_completes_the_device_flow_and_stores_the_refresh_token(
    provider: Provider, tmp_path: Path, db_url: str, oauth_dovecot: Dovecot
) -> None:
    table = section(provider, tmp_path)
    refresh_file = Path(table["refresh_token_file"])
    earlier = refresh_file.read_text().strip()
    refresh_file.unlink()  # not there yet: the command writes it
    path = write_config(tmp_path, db_url, free_port(), oauth_toml(oauth_dovecot, table))
    command = [sys.executable, "-m", "gateway", "-c", str(path), "oauth2", "authorize", "--mailbox", "biuro"]
    with subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        shown = proc.stdout.readline().decode()
        code = re.search(r"enter the code (\S+)", shown)
        assert code is not None, shown
        assert f"{provider.url}/device-login" in shown
        time.sleep(1.5)  # the command polls meanwhile: "authorization_pending"
        provider.approve(code.group(1), "biuro")
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    assert f"the refresh token is stored in {refresh_file}" in out.decode()
    assert set(provider.active("biuro")) == {earlier, refresh_file.read_text().strip()}
    assert stat.S_IMODE(refresh_file.stat().st_mode) == 0o600
    assert provider.requests[DEVICE_GRANT] >= 2
    for secret in [*provider.refresh_tokens, *provider.access_tokens, "client-secret"]:
        assert secret not in shown + out.decode() + err.decode()


def test_oauth2_authorize_names_what_is_wrong(provider: Provider, tmp_path: Path, db_url: str) -> None:
    path = write_config(tmp_path, db_url, free_port())
    base = [sys.executable, "-m", "gateway", "-c", str(path), "oauth2", "authorize"]
    out = subprocess.run([*base, "--mailbox", "nope"], cwd=tmp_path, capture_output=True, timeout=60)
    assert out.returncode == 1
    assert b"error: no mailbox 'nope' in the configuration" in out.stderr


def test_oauth2_authorize_without_a_device_flow_uses_a_loopback_redirect(
    provider: Provider, tmp_path: Path, db_url: str, oauth_dovecot: Dovecot
) -> None:
    """Google's device flow grants no mail scope: the browser comes back to 127.0.0.1 (PKCE)."""
    table = section(provider, tmp_path, device_authorization_url="", authorization_url=f"{provider.url}/auth")
    refresh_file = Path(table["refresh_token_file"])
    path = write_config(tmp_path, db_url, free_port(), oauth_toml(oauth_dovecot, table))
    command = [sys.executable, "-m", "gateway", "-c", str(path), "oauth2", "authorize", "--mailbox", "biuro"]
    with subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        shown = proc.stdout.readline().decode()
        address = re.search(r"allow access: (\S+)", shown)
        assert address is not None, shown
        assert address.group(1).startswith(f"{provider.url}/auth?")
        query = dict(parse_qsl(urlsplit(address.group(1)).query))
        assert query["code_challenge_method"] == "S256"
        code = provider.consent("mailgate", "biuro", query["redirect_uri"], query["code_challenge"])
        # A request without the right state is not taken for the answer.
        forged = httpx.get(query["redirect_uri"], params={"code": code, "state": "forged"}, timeout=10)
        assert forged.status_code == 400
        back = httpx.get(query["redirect_uri"], params={"code": code, "state": query["state"]}, timeout=10)
        assert "you can close this window" in back.text
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    assert refresh_file.read_text().strip() in provider.active("biuro")
    assert provider.requests["authorization_code"] == 1

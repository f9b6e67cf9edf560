"""Configuration: the TOML file of DESIGN.md section 6, validated.

Every model is frozen and forbids unknown keys, so a typo is an error rather
than a silently ignored setting. Errors are reported with field paths such as
``tenants[0].smtp.port``. Secrets are never values in the file: a ``*_file``
path or a ``*_env`` variable name refers to them, and they are read only on
demand into :class:`pydantic.SecretStr`, whose repr is masked.

Relative paths (``data_dir``, ``*_file``) are relative to the working
directory of the process, as with most daemons run under systemd
(``WorkingDirectory=``/``StateDirectory=``).
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from datetime import date, time, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    PlainSerializer,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from rules import Action, ActionKind, Condition, Rule, RuleError, RuleSet, compile_rules, parse_op

# --------------------------------------------------------------------------- values

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


MAX_SIZE = 2**63 - 1  # what the database's 64-bit counters hold
MAX_DURATION = timedelta(days=36500)


def parse_size(value: object) -> int:
    """Parse ``"20 MB"``, ``"1.2 GB"``, ``"512 KiB"`` or a plain integer into bytes.

    KB/MB/GB are decimal (as capacity is sold), KiB/MiB/GiB binary.
    """
    if isinstance(value, bool):
        raise ValueError("expected a size such as '20 MB'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        if value > MAX_SIZE:
            raise ValueError("a size this large cannot be stored")
        return value
    if not isinstance(value, str):
        raise ValueError("expected a size such as '20 MB'")
    m = _SIZE_RE.match(value)
    if not m:
        raise ValueError(f"invalid size {value!r}: expected a number and a unit such as '20 MB'")
    number, unit = m.groups()
    size = float(number) * _SIZE_UNITS[(unit or "b").lower()]
    if size > MAX_SIZE:
        raise ValueError(f"size {value!r} is too large")
    return int(size)


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: object) -> timedelta:
    """Parse ``"60s"``, ``"90d"``, ``"1h30m"`` or a number of seconds."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool):
        raise ValueError("expected a duration such as '60s'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.replace(" ", "").lower()
        parts = _DURATION_RE.findall(text)
        if not text or "".join(n + u for n, u in parts) != text:
            raise ValueError(f"invalid duration {value!r}: expected e.g. '60s', '5m', '90d', '1h30m'")
        seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    else:
        raise ValueError("expected a duration such as '60s'")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    if not seconds <= MAX_DURATION.total_seconds():  # also NaN and infinity
        raise ValueError("a duration is at most 100 years")
    return timedelta(seconds=seconds)


def _parse_listen(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("expected 'host:port' or '' to disable")
    if value == "":
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"invalid listen address {value!r}: expected 'host:port', e.g. '127.0.0.1:2525'")
    return value


Size = Annotated[int, BeforeValidator(parse_size, json_schema_input_type=int | str)]


def _duration_text(value: timedelta) -> str:
    """A duration as the file writes it (``"90s"``), so a dumped definition loads again."""
    return f"{value.total_seconds():g}s"


Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration, json_schema_input_type=int | float | str),
    PlainSerializer(_duration_text, return_type=str, when_used="json"),
]
ListenAddress = Annotated[str, BeforeValidator(_parse_listen)]
Domain = Annotated[
    str,
    BeforeValidator(lambda v: v.strip().lower().rstrip(".") if isinstance(v, str) else v),
    Field(
        max_length=253,
        pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$",
    ),
]
Address = Annotated[
    str,
    BeforeValidator(lambda v: v.strip().lower() if isinstance(v, str) else v),
    Field(pattern=r"^[^@\s<>]+@[^@\s<>]+$"),
]
_DECEPTIVE = frozenset('@%!"')  # in a local part: routing to, or quoting, another address
SpecialUse = Literal["\\Inbox", "\\Sent", "\\Drafts", "\\Trash", "\\Junk", "\\Archive"]
Security = Literal["none", "starttls", "tls"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _error_at(loc: tuple[int | str, ...], message: str) -> ValidationError:
    """An error at ``loc`` below the model being validated (pydantic prefixes the outer path)."""
    error = PydanticCustomError("value_error", "{message}", {"message": message})
    return ValidationError.from_exception_data("Config", [InitErrorDetails(type=error, loc=loc, input=None)])


class SecretRef(_Model):
    """Mixin for sections holding a secret as ``<name>_file`` / ``<name>_env``."""

    @staticmethod
    def _read(file: Path | None, env: str | None, what: str) -> SecretStr | None:
        if file is not None:
            try:
                return SecretStr(file.read_text(encoding="utf-8").rstrip("\r\n"))
            except OSError as exc:
                raise ConfigError([f"{what}_file: cannot read {str(file)!r}: {exc.strerror}"]) from None
        if env is not None:
            if env not in os.environ:
                raise ConfigError([f"{what}_env: environment variable {env!r} is not set"])
            return SecretStr(os.environ[env])
        return None


# --------------------------------------------------------------------------- sections


class GatewaySection(_Model):
    hostname: str = "localhost"
    data_dir: Path = Path("var")
    database_url: str = ""
    instance: str = Field("", max_length=255)  # this process's id in the database; "" = the host's name

    @field_validator("database_url")
    @classmethod
    def _supported_database(cls, v: str) -> str:
        if v and not v.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError(
                "expected '' (SQLite in data_dir), 'sqlite+aiosqlite:///PATH' or 'postgresql+asyncpg://...'"
            )
        return v

    @property
    def effective_database_url(self) -> str:
        """The configured URL, or the embedded SQLite database in ``data_dir``."""
        return self.database_url or f"sqlite+aiosqlite:///{self.data_dir / 'mailgate.db'}"

    @property
    def effective_instance(self) -> str:
        """The configured instance id, or the machine's host name (not ``hostname``, the mail name)."""
        return self.instance or os.uname().nodename


class ListenSection(_Model):
    smtp: ListenAddress = "127.0.0.1:2525"
    submission: ListenAddress = ""
    submissions: ListenAddress = ""
    imap: ListenAddress = ""
    imaps: ListenAddress = ""
    metrics: ListenAddress = ""
    admin: ListenAddress = ""  # admin API, its OpenAPI document, and client autoconfiguration


class AdminSection(SecretRef):
    """The admin API's operator credential: a bearer token read from a file."""

    token_file: Path | None = None

    @field_validator("token_file", mode="before")
    @classmethod
    def _empty_is_none(cls, v: object) -> object:
        return None if v == "" else v

    def token(self) -> SecretStr | None:
        """The operator's token; None when no file is set (then only tenant admins get in)."""
        return self._read(self.token_file, None, "admin.token")


class TLSSection(_Model):
    cert_file: Path | None = None
    key_file: Path | None = None

    @field_validator("cert_file", "key_file", mode="before")
    @classmethod
    def _empty_is_none(cls, v: object) -> object:
        return None if v == "" else v

    @model_validator(mode="after")
    def _both_or_neither(self) -> TLSSection:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be set together")
        return self


class RetentionSection(_Model):
    spam_days: int = Field(90, ge=1)


def _http_url(url: str) -> str:
    """An http:// or https:// base URL (a filter's, such as rspamd's workers)."""
    parsed = urlsplit(url)
    if url and (parsed.scheme not in ("http", "https") or not parsed.hostname):
        raise ValueError(f"{url!r}: expected http://host:port or https://host:port")
    return url.rstrip("/")


class SpamSection(_Model):
    """The spam filter asked about inbound mail (docs/spam.md); "" trusts upstream headers only."""

    engine: Literal["", "rspamd"] = ""
    url: Annotated[str, AfterValidator(_http_url)] = "http://127.0.0.1:11333"  # rspamd's normal worker
    controller_url: Annotated[str, AfterValidator(_http_url)] = ""  # learning; "": url's host, port 11334
    timeout: Duration = Field(timedelta(seconds=5), gt=timedelta(0), le=timedelta(minutes=5))
    on_error: Literal["accept", "tempfail"] = "accept"  # rspamd unreachable: store unscanned, or 451
    max_in_flight: int = Field(32, ge=1, le=1024)  # checks and learns in flight, whole daemon


class TenantSpamSection(_Model):
    """A tenant's own spam settings; unset thresholds follow rspamd's actions."""

    enabled: bool = True
    junk_score: float | None = None  # at or above: the Junk folder (else from "add header" on)
    reject_score: float | None = None  # at or above: relay-in refuses (else rspamd's "reject")


class SnapshotsSection(_Model):
    dir: Path = Path("var/snapshots")
    at: time = time(2, 30)
    keep: int = Field(7, ge=1)


class BlobsSection(SecretRef):
    """Where message blobs live (docs/blobs.md): the local directory, PostgreSQL or an S3 bucket."""

    backend: Literal["fs", "postgresql", "s3"] = "fs"
    s3_endpoint: str = ""  # "" : AWS; or e.g. http://127.0.0.1:9000 (MinIO)
    s3_bucket: str = ""
    s3_region: str = ""
    s3_access_key_file: Path | None = None  # both or neither; neither: the standard AWS credential chain
    s3_secret_key_file: Path | None = None

    @field_validator("s3_access_key_file", "s3_secret_key_file", mode="before")
    @classmethod
    def _empty_is_none(cls, v: object) -> object:
        return None if v == "" else v

    @field_validator("s3_endpoint")
    @classmethod
    def _url(cls, v: str) -> str:
        if v and not re.fullmatch(r"https?://[^/\s]+/?", v):
            raise ValueError("expected '' (AWS) or an http(s)://host[:port] URL")
        return v

    @model_validator(mode="after")
    def _complete(self) -> BlobsSection:
        if (self.s3_access_key_file is None) != (self.s3_secret_key_file is None):
            raise ValueError("s3_access_key_file and s3_secret_key_file must be set together")
        if self.backend == "s3" and not self.s3_bucket:
            raise _error_at(("s3_bucket",), 'backend "s3" needs s3_bucket')
        return self

    def s3_credentials(self) -> tuple[SecretStr, SecretStr] | None:
        """The access and secret key read from their files; None when no files are set."""
        access = self._read(self.s3_access_key_file, None, "blobs.s3_access_key")
        secret = self._read(self.s3_secret_key_file, None, "blobs.s3_secret_key")
        return None if access is None or secret is None else (access, secret)


# OAuth2 providers (DESIGN.md section 6b): token endpoint, device authorization endpoint (RFC 8628),
# the scope of delegated access (a refresh token), the scope of app-only access (client credentials),
# authorization endpoint (the loopback redirect). Google's device flow does not grant mail scopes.
OAUTH2_PRESETS: Mapping[str, tuple[str, str, str, str, str]] = {
    "microsoft": (
        "https://login.microsoftonline.com/organizations/oauth2/v2.0/token",
        "https://login.microsoftonline.com/organizations/oauth2/v2.0/devicecode",
        "offline_access https://outlook.office.com/IMAP.AccessAsUser.All https://outlook.office.com/SMTP.Send",
        "https://outlook.office365.com/.default",
        "https://login.microsoftonline.com/organizations/oauth2/v2.0/authorize",
    ),
    "google": (
        "https://oauth2.googleapis.com/token",
        "",
        "https://mail.google.com/",
        "",
        "https://accounts.google.com/o/oauth2/v2/auth",
    ),
    "generic": ("", "", "", "", ""),
}


def _endpoint(url: str) -> str:
    """An OAuth2 endpoint: https, or http to a loopback address only."""
    if not url:
        return url
    parsed = urlsplit(url)
    loopback = parsed.hostname in ("localhost", "::1") or (parsed.hostname or "").startswith("127.")
    if parsed.scheme != "https" and not (parsed.scheme == "http" and loopback):
        raise ValueError(f"{url!r}: an OAuth2 endpoint must be https:// (http:// only to loopback)")
    return url


class OAuth2Section(_Model):
    """OAuth2 client credentials of an upstream mailbox or a smarthost (``auth = "oauth2"``)."""

    provider: Literal["microsoft", "google", "generic"]
    token_url: Annotated[str, AfterValidator(_endpoint)] = ""  # "": the provider's
    device_authorization_url: Annotated[str, AfterValidator(_endpoint)] = ""  # for `oauth2 authorize`
    authorization_url: Annotated[str, AfterValidator(_endpoint)] = ""  # `oauth2 authorize` without one
    client_id: str = Field(min_length=1)
    client_secret_file: Path | None = None
    refresh_token_file: Path | None = None  # delegated access; without it, the client-credentials grant
    scope: str = ""  # "": the provider's

    @field_validator("client_secret_file", "refresh_token_file", mode="before")
    @classmethod
    def _empty_is_none(cls, v: object) -> object:
        return None if v == "" else v

    @model_validator(mode="after")
    def _complete(self) -> OAuth2Section:
        if self.provider == "generic" and not self.token_url:
            raise ValueError('provider = "generic" needs token_url')
        if self.refresh_token_file is None:
            if self.client_secret_file is None:
                raise ValueError("the client-credentials grant (no refresh_token_file) needs a client secret")
            if self.provider == "google":
                raise ValueError("Google grants mail access by a user's consent: give refresh_token_file")
            if self.provider == "microsoft" and not self.token_url:
                raise ValueError(
                    "Microsoft app-only access needs token_url = "
                    '"https://login.microsoftonline.com/<directory id>/oauth2/v2.0/token"'
                )
        if not self.effective_scope:
            raise ValueError("give scope")
        return self

    def unreadable(self) -> list[str]:
        """The secret files that cannot be read now, as check-config reports them."""
        errors = []
        for key in ("client_secret_file", "refresh_token_file"):
            path: Path | None = getattr(self, key)
            if path is not None and not os.access(path, os.R_OK):
                errors.append(f"{key}: cannot read {str(path)!r}")
        return errors

    @property
    def effective_token_url(self) -> str:
        return self.token_url or OAUTH2_PRESETS[self.provider][0]

    @property
    def effective_device_url(self) -> str:
        return self.device_authorization_url or OAUTH2_PRESETS[self.provider][1]

    @property
    def effective_authorization_url(self) -> str:
        return self.authorization_url or OAUTH2_PRESETS[self.provider][4]

    @property
    def effective_scope(self) -> str:
        preset = OAUTH2_PRESETS[self.provider]
        return self.scope or (preset[2] if self.refresh_token_file is not None else preset[3])


# Outbound presets (DESIGN.md section 2, contract).
SMTP_PRESETS: Mapping[str, tuple[str, int, Security]] = {
    "gmail": ("smtp.gmail.com", 587, "starttls"),
    "interia": ("poczta.interia.pl", 587, "none"),
    "onet": ("smtp.poczta.onet.pl", 465, "tls"),
    "wp": ("smtp.wp.pl", 465, "tls"),
    "o2": ("poczta.o2.pl", 587, "none"),
}


class SMTPRelaySection(SecretRef):
    """A tenant's outbound SMTP settings, from a preset or given in full."""

    preset: Literal["gmail", "interia", "onet", "wp", "o2"] | None = None
    host: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    security: Security | None = None
    username: str | None = None
    auth: Literal["password", "oauth2"] = "password"
    password_file: Path | None = None
    password_env: str | None = None
    oauth2: OAuth2Section | None = None  # with auth = "oauth2": SASL XOAUTH2 or OAUTHBEARER
    from_: Address | None = Field(None, alias="from")
    ca_file: Path | None = None
    # Send the password over a connection without TLS to a non-loopback host.
    allow_plaintext_auth: bool = False

    @field_validator("ca_file", "password_file", mode="before")
    @classmethod
    def _empty_is_none(cls, v: object) -> object:
        return None if v == "" else v

    @model_validator(mode="after")
    def _complete(self) -> SMTPRelaySection:
        if self.preset is None and (self.host is None or self.port is None):
            raise ValueError("give a preset or both host and port")
        if self.password_file is not None and self.password_env is not None:
            raise ValueError("give password_file or password_env, not both")
        if (self.auth == "oauth2") != (self.oauth2 is not None):
            raise ValueError('auth = "oauth2" goes with an [tenants.smtp.oauth2] table, and only with it')
        if self.auth == "oauth2" and (not self.username or self.password_file or self.password_env):
            raise ValueError('auth = "oauth2" needs username, and takes no password_file or password_env')
        return self

    @property
    def effective(self) -> tuple[str, int, Security]:
        """Host, port and security after applying the preset."""
        p_host, p_port, p_sec = SMTP_PRESETS[self.preset] if self.preset else ("", 25, "none")
        return (self.host or p_host, self.port or p_port, self.security or p_sec)

    @property
    def security_pinned(self) -> bool:
        """True when ``security`` was set explicitly (``none`` then forbids STARTTLS)."""
        return self.security is not None

    def password(self) -> SecretStr | None:
        """Read the password from its file or environment variable."""
        return self._read(self.password_file, self.password_env, "password")


class AgentSection(_Model):
    login: Address
    name: str = ""
    password_hash: str = Field(pattern=r"^\$argon2(id|i|d)\$")
    folders: tuple[str, ...] = ()
    # "admin": also manages the tenant's agents, rules, footers and templates (admin API, Templates).
    role: Literal["agent", "admin"] = "agent"
    footer: str = Field("", max_length=4000)  # appended to each message the agent submits
    disabled: bool = False  # kept, but may not log in (e.g. over the plan's seats)
    # Who files the agent's sent mail in \Sent: "auto" mailgate, and a client's own copy of it
    # (same Message-ID, within 24 h) is answered with mailgate's; "always" both; "never" the client.
    save_sent: Literal["auto", "always", "never"] = "auto"

    def __repr_args__(self) -> Any:
        for k, v in super().__repr_args__():
            yield (k, "**********" if k == "password_hash" else v)


class FolderSection(_Model):
    name: str = Field(min_length=1, max_length=255)
    quota: Size | None = None
    special_use: SpecialUse | None = None


AFTER_FETCH_RE = r"^(keep|seen|delete|move:.+)$"


class MailboxSection(SecretRef):
    """An upstream IMAP account to pull from."""

    name: str = Field(min_length=1)
    host: str
    port: int = Field(993, ge=1, le=65535)
    security: Security = "tls"  # "starttls": required, the connection fails without it
    username: str
    auth: Literal["password", "oauth2"] = "password"
    password_file: Path | None = None
    password_env: str | None = None
    oauth2: OAuth2Section | None = None  # with auth = "oauth2": SASL OAUTHBEARER or XOAUTH2
    ca_file: Path | None = None  # extra CA bundle to trust; default: system trust
    plaintext_login: bool = False  # allow a password over security = "none" to a non-loopback host
    folders: dict[str, str] = Field(default_factory=lambda: {"INBOX": "INBOX"}, min_length=1)
    after_fetch: str = Field("keep", pattern=AFTER_FETCH_RE)
    idle: bool = True
    poll_interval: Duration = Field(timedelta(seconds=60), ge=timedelta(seconds=1))
    max_connections: int | None = Field(None, ge=1, le=100)  # None: by provider (Gmail 10, M365 15, else 5)

    @model_validator(mode="after")
    def _credentials(self) -> MailboxSection:
        if self.auth == "oauth2":
            if self.oauth2 is None:
                raise ValueError('auth = "oauth2" needs an [tenants.mailboxes.oauth2] table')
            if (self.password_file, self.password_env) != (None, None):
                raise ValueError('auth = "oauth2" takes no password_file or password_env')
        else:
            if self.oauth2 is not None:
                raise ValueError('an oauth2 table needs auth = "oauth2"')
            if (self.password_file, self.password_env).count(None) != 1:
                raise ValueError("give exactly one of password_file, password_env")
        loopback = self.host in ("localhost", "::1") or self.host.startswith("127.")
        if self.security == "none" and not loopback and not self.plaintext_login:
            raise ValueError(
                f'security = "none" would send the credentials in clear to {self.host}: '
                'use "tls" or "starttls", or set plaintext_login = true to accept that'
            )
        return self

    def password(self) -> SecretStr | None:
        """Read the password from its file or environment variable."""
        return self._read(self.password_file, self.password_env, "password")

    @property
    def effective_max_connections(self) -> int:
        """The connection budget: the configured one, else the provider's (by host name)."""
        if self.max_connections is not None:
            return self.max_connections
        host = self.host.lower().rstrip(".")
        for suffix, budget in MAX_CONNECTIONS_PRESETS.items():
            if host == suffix or host.endswith("." + suffix):
                return budget
        return 5


# Connections per upstream account, under the providers' limits (Gmail about 15, Microsoft 365 about 20).
MAX_CONNECTIONS_PRESETS: Mapping[str, int] = {
    "gmail.com": 10,
    "googlemail.com": 10,
    "office365.com": 15,
    "outlook.com": 15,
}


class ConditionSection(_Model):
    field: str
    op: str
    value: str | int

    @model_validator(mode="after")
    def _check(self) -> ConditionSection:
        try:
            parse_op(self.op)
        except RuleError as exc:  # reported at this path; the rule's name is not known here
            raise ValueError(exc.message) from None
        return self

    def to_rule(self) -> Condition:
        """The rules-package condition, with sizes converted to bytes."""
        op, negate = parse_op(self.op)
        value = parse_size(self.value) if self.field == "size" else self.value
        return Condition(field=self.field, op=op, value=value, negate=negate)


def _action(item: object) -> Action:
    options = dict(item) if isinstance(item, Mapping) else {}
    rewrite_from = options.pop("rewrite_from", True)
    if len(options) != 1:
        raise ValueError(
            'an action is a table with exactly one key, e.g. { folder = "Orders" }'
            " (a forward may add rewrite_from = false)"
        )
    ((key, value),) = options.items()
    try:
        kind = ActionKind(key)
    except ValueError:
        names = ", ".join(k.value for k in ActionKind)
        raise ValueError(f"unknown action {key!r} (expected one of {names})") from None
    if kind in (ActionKind.SPAM, ActionKind.SEEN, ActionKind.FLAG):
        if value is not True:
            raise ValueError(f"action {key!r} takes the value true")
        return Action(kind)
    if not isinstance(value, str):
        raise ValueError(f"action {key!r} takes a string")
    if not isinstance(rewrite_from, bool):
        raise ValueError("rewrite_from takes true or false")
    if not rewrite_from and kind is not ActionKind.FORWARD:
        raise ValueError("rewrite_from applies to forward actions only")
    return Action(kind, value, rewrite_from)


def _action_table(action: Action) -> dict[str, str | bool]:
    """An action as the file writes it (``{ folder = "Orders" }``)."""
    table: dict[str, str | bool] = {action.kind.value: action.value or True}
    if action.kind is ActionKind.FORWARD and not action.rewrite_from:
        table["rewrite_from"] = False
    return table


class RuleSection(_Model):
    name: str = Field(min_length=1)
    match: Literal["any", "all"] = "any"
    conditions: tuple[ConditionSection, ...] = ()
    actions: tuple[
        Annotated[
            Action,
            BeforeValidator(_action, json_schema_input_type=dict[str, str | bool]),
            PlainSerializer(_action_table, return_type=dict[str, str | bool]),
        ],
        ...,
    ]
    stop: bool = False

    @model_validator(mode="after")
    def _compile(self) -> RuleSection:
        # Actions first (errors at this rule), then each condition alone, so that an
        # error such as a bad regex is reported at its own path and names the rule.
        compile_rules([Rule(self.name, (), self.actions)])
        for i, condition in enumerate(self.conditions):
            try:
                compile_rules([Rule(self.name, (condition.to_rule(),), self.actions)])
            except ValueError as exc:
                text = str(exc) if isinstance(exc, RuleError) else f"rule {self.name!r}: {exc}"
                raise _error_at(("conditions", i), text) from None
        return self

    def to_rule(self) -> Rule:
        """The rules-package rule."""
        return Rule(
            name=self.name,
            conditions=tuple(c.to_rule() for c in self.conditions),
            actions=self.actions,
            match=self.match,
            stop=self.stop,
        )


class PlanSection(_Model):
    """What a tenant buys (``[plans.NAME]``); 0 means unlimited for the counts."""

    quota: Size | None = None  # None: set per tenant
    seats: int = Field(0, ge=0)  # agents that may log in
    max_mailboxes: int = Field(0, ge=0)  # upstream mailboxes
    max_outbound_per_month: int = Field(0, ge=0)  # messages submitted per calendar month (UTC)
    trial_days: int = Field(0, ge=0)  # a new tenant on this plan runs a trial this long
    convert_days: int = Field(14, ge=0)  # after a trial: read-only this long, then deleted
    notice_days: int = Field(30, ge=0)  # the "your plan ends" notice this long before the end
    read_only_days: int = Field(30, ge=0)  # after a paid plan ends: read-only this long, then deleted


# The tiers of DESIGN.md section 2; [plans.NAME] in the file adds plans or replaces these.
BUILTIN_PLANS: Mapping[str, PlanSection] = {
    "1.2gb": PlanSection(quota=1_200_000_000, seats=3, max_mailboxes=2),
    "3gb": PlanSection(quota=3 * 10**9, seats=5, max_mailboxes=3),
    "6gb": PlanSection(quota=6 * 10**9, seats=10, max_mailboxes=5),
    "12gb": PlanSection(quota=12 * 10**9, seats=20, max_mailboxes=10),
    "custom": PlanSection(),  # "above that set individually": quota and limits per tenant
    "trial": PlanSection(
        quota=5 * 10**9, seats=3, max_mailboxes=1, max_outbound_per_month=100, trial_days=60, convert_days=14
    ),
}


class TenantSection(_Model):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    name: str = ""
    domains: tuple[Domain, ...] = Field(min_length=1)
    addresses: tuple[Address, ...] = ()
    quota: Size | None = None
    max_message_size: Size = 20 * 10**6
    max_attachments: int = Field(3, ge=0)
    collision: Literal["hold", "warn", "off"] = "hold"
    # Mail servers in these networks may relay through the smtp listener without AUTH.
    trusted_networks: tuple[IPvAnyNetwork, ...] = ()
    smtp: SMTPRelaySection | None = None
    agents: tuple[AgentSection, ...] = ()
    folders: tuple[FolderSection, ...] = ()
    mailboxes: tuple[MailboxSection, ...] = ()
    rules: tuple[RuleSection, ...] = ()
    plan: str | None = None  # a name in [plans]; None: no plan rules (quota as set here)
    paid_until: date | None = None  # the last day of the paid plan
    trial_until: date | None = None  # the last day of the trial
    contact: Address | None = None  # the customer's own address: plan notices go here too
    suspended: bool = False  # by the operator: read-only until resumed
    seats: int | None = Field(None, ge=0)  # agents that may log in, when bought apart from the plan
    spam: TenantSpamSection = TenantSpamSection()
    # Internal notes (gateway.answering): mail an agent sends here is filed in the conversation,
    # never relayed. None: notes@ the first domain.
    notes_address: Address | None = None
    # An agent's saved draft reply marks the customer message ($Answering) for at most this long.
    answering_expiry: Duration = Field(timedelta(hours=2), ge=timedelta(minutes=1))

    _ruleset: RuleSet = PrivateAttr()
    _plan: PlanSection | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _check(self) -> TenantSection:
        for i, addr in enumerate(self.addresses):
            if addr.rpartition("@")[2] not in self.domains:
                raise _error_at(("addresses", i), f"address {addr!r} is not in the tenant's domains")
        if self.notes_address is not None and self.notes_address.rpartition("@")[2] not in self.domains:
            raise _error_at(("notes_address",), f"{self.notes_address!r} is not in the tenant's domains")
        names = [f.name for f in self.folders]
        if len(set(names)) != len(names):
            raise ValueError("folder names must be unique")
        mailboxes = [m.name for m in self.mailboxes]
        if len(set(mailboxes)) != len(mailboxes):
            raise ValueError("mailbox names must be unique")
        self._ruleset = compile_rules([r.to_rule() for r in self.rules])
        return self

    @property
    def ruleset(self) -> RuleSet:
        """The tenant's rules, compiled once."""
        return self._ruleset

    @property
    def plan_section(self) -> PlanSection | None:
        """The tenant's plan, resolved against the configuration's plans."""
        return self._plan

    @property
    def effective_seats(self) -> int:
        """Agents that may be enabled: the tenant's own count, else its plan's (0: unlimited)."""
        if self.seats is not None:
            return self.seats
        return self._plan.seats if self._plan is not None else 0

    @property
    def effective_quota(self) -> int | None:
        """The tenant's own quota, else its plan's."""
        if self.quota is not None:
            return self.quota
        return self._plan.quota if self._plan is not None else None

    @property
    def effective_notes_address(self) -> str:
        """Where agents send internal notes: ``notes_address``, else notes@ the first domain."""
        return self.notes_address or f"notes@{self.domains[0]}"

    def agent(self, login: str) -> AgentSection | None:
        """The agent with this login (lower case), if the tenant has one."""
        return next((a for a in self.agents if a.login == login), None)

    def accepts(self, address: str) -> bool:
        """True when ``address`` (lower-case) is a recipient this tenant takes mail for."""
        if self.addresses:
            return address in self.addresses
        return address.rpartition("@")[2] in self.domains

    def owns(self, address: str) -> bool:
        """True when mail may be sent as ``address``: its ``smtp.from`` or a plain address at its domains.

        A local part that hides another address (``"x@other"@``, ``x%other@``,
        ``other!x@``) or holds control characters is never the tenant's.
        """
        address = address.lower()
        local, _, domain = address.rpartition("@")
        if not local or any(c in _DECEPTIVE or ord(c) < 32 or ord(c) == 127 for c in local):
            return False
        return domain in self.domains or (self.smtp is not None and self.smtp.from_ == address)


class QueueSection(_Model):
    """The outbound relay queue: when to retry, when to give up."""

    retry: tuple[Duration, ...] = tuple(
        timedelta(seconds=x) for x in (60, 300, 900, 1800, 3600, 7200)
    )  # the last interval repeats
    lifetime: Duration = timedelta(days=5)
    delay_notice: Duration = timedelta(hours=4)
    concurrency: int = Field(4, ge=1, le=100)  # deliveries in flight per tenant

    @field_validator("retry")
    @classmethod
    def _not_empty(cls, v: tuple[timedelta, ...]) -> tuple[timedelta, ...]:
        if not v:
            raise ValueError("give at least one retry interval")
        return v


class SRSSection(SecretRef):
    """Sender Rewriting Scheme keys and lifetime for forwarded mail (:mod:`gateway.srs`).

    The secret holds one key per line: the first signs, every one verifies
    (rotate by putting the new key first). Without ``secret_file`` or
    ``secret_env`` a random key is made once in ``data_dir/srs.secret``.
    """

    secret_file: Path | None = None
    secret_env: str | None = None
    max_age: Duration = Field(timedelta(days=21), ge=timedelta(days=1), le=timedelta(days=1000))

    @field_validator("secret_file", mode="before")
    @classmethod
    def _empty_is_none(cls, v: object) -> object:
        return None if v == "" else v

    @model_validator(mode="after")
    def _one_secret(self) -> SRSSection:
        if self.secret_file is not None and self.secret_env is not None:
            raise ValueError("give secret_file or secret_env, not both")
        return self

    def secret(self) -> SecretStr | None:
        """Read the keys from their file or environment variable; None when neither is set."""
        return self._read(self.secret_file, self.secret_env, "srs.secret")


class ListenerLimits(_Model):
    """Connection caps and idle timeouts of one kind of listener (each listener has its own count).

    ``per_network`` counts a client's /24 (IPv4) or /64 (IPv6). Once a
    listener holds ``stress_at`` of ``connections``, sessions that have not
    yet started a transaction (SMTP: before ``MAIL``; IMAP: before login) may
    idle only ``stress_timeout``; at a cap, the longest-idle such session is
    closed to make room for a new client rather than refusing it.
    """

    connections: int = Field(ge=1)
    per_ip: int = Field(ge=1)
    per_network: int = Field(ge=1)
    timeout: Duration
    stress_timeout: Duration
    stress_at: float = Field(0.8, gt=0, le=1)


class SMTPLimits(ListenerLimits):
    """``smtp``, ``submission``, ``submissions``; ``timeout`` is the idle timeout in every state."""

    connections: int = Field(500, ge=1)
    per_ip: int = Field(50, ge=1)
    per_network: int = Field(100, ge=1)
    timeout: Duration = timedelta(seconds=300)
    stress_timeout: Duration = timedelta(seconds=10)


class IMAPLimits(ListenerLimits):
    """``imap``, ``imaps``; ``timeout`` is the idle timeout before login (30 min after it)."""

    connections: int = Field(5000, ge=1)
    per_ip: int = Field(100, ge=1)
    per_network: int = Field(300, ge=1)
    timeout: Duration = timedelta(seconds=60)
    stress_timeout: Duration = timedelta(seconds=10)
    unauthenticated_literal: Size = Field(8 * 1024, ge=64)  # bytes a literal may carry before login


class HTTPLimits(ListenerLimits):
    """``metrics``; ``timeout`` bounds reading a whole request."""

    connections: int = Field(100, ge=1)
    per_ip: int = Field(20, ge=1)
    per_network: int = Field(50, ge=1)
    timeout: Duration = timedelta(seconds=10)
    stress_timeout: Duration = timedelta(seconds=2)


class AuthLimits(_Model):
    """Password checks: a failure limit per client address, and a budget for the whole daemon."""

    max_failures: int = Field(10, ge=1)  # per client address within ``window``
    window: Duration = timedelta(minutes=10)
    concurrent_checks: int = Field(1, ge=1, le=64)  # argon2 verifications at once, all clients
    queue: int = Field(64, ge=0)  # attempts waiting for a check; beyond: "try again later"
    cache_ttl: Duration = timedelta(hours=1)  # a verified login skips argon2 this long; "0s": never
    cache_size: int = Field(10_000, ge=0)  # logins remembered at most


class OutboundLimits(_Model):
    """Submissions per sliding hour (an abused login); 0 = no limit. 450 4.7.1 beyond."""

    agent_messages_per_hour: int = Field(300, ge=0)
    agent_recipients_per_hour: int = Field(1500, ge=0)
    tenant_messages_per_hour: int = Field(1500, ge=0)
    tenant_recipients_per_hour: int = Field(6000, ge=0)


class LimitsSection(_Model):
    smtp: SMTPLimits = SMTPLimits()
    imap: IMAPLimits = IMAPLimits()
    http: HTTPLimits = HTTPLimits()
    auth: AuthLimits = AuthLimits()
    outbound: OutboundLimits = OutboundLimits()


class Config(_Model):
    gateway: GatewaySection = GatewaySection()
    listen: ListenSection = ListenSection()
    tls: TLSSection = TLSSection()
    retention: RetentionSection = RetentionSection()
    spam: SpamSection = SpamSection()
    snapshots: SnapshotsSection = SnapshotsSection()
    queue: QueueSection = QueueSection()
    limits: LimitsSection = LimitsSection()
    srs: SRSSection = SRSSection()
    admin: AdminSection = AdminSection()
    blobs: BlobsSection = BlobsSection()
    plans: dict[str, PlanSection] = Field(default_factory=lambda: dict(BUILTIN_PLANS))
    tenants: tuple[TenantSection, ...] = ()

    @field_validator("plans", mode="before")
    @classmethod
    def _builtin_plans(cls, v: object) -> object:
        return {**BUILTIN_PLANS, **v} if isinstance(v, Mapping) else v

    @model_validator(mode="after")
    def _implicit_tls_needs_a_certificate(self) -> Config:
        for name in ("imaps", "submissions"):
            if getattr(self.listen, name) and self.tls.cert_file is None:
                raise _error_at(("listen", name), "implicit TLS needs [tls] cert_file and key_file")
        return self

    @model_validator(mode="after")
    def _blobs_in_postgresql_need_it(self) -> Config:
        if self.blobs.backend == "postgresql" and not self.gateway.database_url.startswith("postgresql"):
            raise _error_at(
                ("blobs", "backend"), 'backend "postgresql" needs a PostgreSQL gateway.database_url'
            )
        return self

    @model_validator(mode="after")
    def _unique(self) -> Config:
        check_tenants(self.tenants, self.plans)
        return self

    def with_tenants(self, tenants: tuple[TenantSection, ...]) -> Config:
        """This configuration serving ``tenants`` (from the database) instead of the file's."""
        check_tenants(tenants, self.plans)
        return self.model_copy(update={"tenants": tenants})

    def tenant(self, tenant_id: str) -> TenantSection:
        """The tenant with this id; KeyError names it if there is none."""
        for t in self.tenants:
            if t.id == tenant_id:
                return t
        raise KeyError(f"no tenant {tenant_id!r} in the configuration")

    def tenant_for_address(self, address: str) -> TenantSection | None:
        """The tenant owning an address: its ``smtp.from`` or any address at its domains."""
        return next((t for t in self.tenants if t.owns(address)), None)

    def tenant_for_domain(self, domain: str) -> TenantSection | None:
        """The tenant owning ``domain`` (lower-case), if any."""
        for t in self.tenants:
            if domain in t.domains:
                return t
        return None


def check_tenants(tenants: tuple[TenantSection, ...], plans: Mapping[str, PlanSection]) -> None:
    """Checks across tenants (ids, domains and logins unique), and each tenant's plan resolved."""
    seen_ids: set[str] = set()
    owner: dict[str, str] = {}
    logins: set[str] = set()
    for i, t in enumerate(tenants):
        if t.id in seen_ids:
            raise _error_at(("tenants", i, "id"), f"tenant id {t.id!r} is used twice")
        seen_ids.add(t.id)
        if t.plan is not None and t.plan not in plans:
            known = ", ".join(sorted(plans))
            raise _error_at(("tenants", i, "plan"), f"unknown plan {t.plan!r} (known: {known})")
        t._plan = plans[t.plan] if t.plan is not None else None
        for j, d in enumerate(t.domains):
            if d in owner:
                message = f"domain {d!r} belongs to tenants {owner[d]!r} and {t.id!r}"
                raise _error_at(("tenants", i, "domains", j), message)
            owner[d] = t.id
        for j, a in enumerate(t.agents):
            if a.login in logins:
                message = f"agent login {a.login!r} is used twice"
                raise _error_at(("tenants", i, "agents", j, "login"), message)
            logins.add(a.login)


# --------------------------------------------------------------------------- loading


class ConfigError(Exception):
    """An invalid configuration; ``errors`` are lines of ``path: message``."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


# Location parts pydantic adds that are not keys of the file: union members ("str",
# "int"), dict-key markers ("[key]") and schema tags ("function-after[...]").
# Matched whole, so that keys such as "strona" or "[Gmail]/Spam" are kept.
_INTERNAL_LOC = re.compile(r"str|int|float|bool|\[key\]|[a-z]+(?:-[a-z]+)*\[.*\]", re.DOTALL)


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _INTERNAL_LOC.fullmatch(part) or not out:
            out += ("." if out else "") + part
    return out


def format_errors(exc: ValidationError) -> list[str]:
    """Turn pydantic errors into ``tenants[0].smtp.port: message`` lines."""
    lines = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{_path(loc) or '(top level)'}: {msg}")
    return lines


def parse_config(data: Mapping[str, Any]) -> Config:
    """Validate already-parsed TOML data."""
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc)) from None


def load_config(path: Path) -> Config:
    """Read and validate a TOML configuration file."""
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError([f"{path}: {exc.strerror}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: invalid TOML: {exc}"]) from None
    return parse_config(data)


def json_schema() -> str:
    """The JSON schema of the configuration file (shipped as config/mailgate.schema.json)."""
    schema = Config.model_json_schema(by_alias=True, mode="validation")
    return json.dumps(schema, indent=2, ensure_ascii=False, sort_keys=True) + "\n"


def default_config_path() -> Path:
    """``$MAILGATE_CONFIG``, then ``/etc/mailgate/mailgate.toml``."""
    return Path(os.environ.get("MAILGATE_CONFIG") or "/etc/mailgate/mailgate.toml")

"""The configuration file: values, validation with field paths, secrets, presets."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError

from gateway.config import (
    SMTP_PRESETS,
    Config,
    ConfigError,
    load_config,
    parse_config,
    parse_duration,
    parse_size,
)
from tests.conftest import EXAMPLE_CONFIG, config_dict

AGENT_HASH = "$argon2id$v=19$x"  # the agent's hash in config_dict


def mailgate_command() -> list[str]:
    """The installed console script next to this interpreter, else ``python -m gateway``."""
    script = shutil.which("mailgate", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "gateway"]


def run_mailgate(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MAILGATE_CONFIG"}
    return subprocess.run(
        [*mailgate_command(), *args], capture_output=True, text=True, timeout=60, cwd=cwd, env=env
    )


def errors_of(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as excinfo:
        parse_config(data)
    assert str(excinfo.value) == "\n".join(excinfo.value.errors)
    return excinfo.value.errors


# --------------------------------------------------------------------------- the example


def test_example_config_is_valid_and_its_rules_compile() -> None:
    config = load_config(EXAMPLE_CONFIG)
    tenant = config.tenant("example")
    assert tenant.domains == ("example.test",)
    assert tenant.effective_quota == 1_200_000_000
    assert tenant.max_message_size == 20_000_000
    assert [r.name for r in tenant.ruleset.rules] == ["orders", "invoices"]
    assert len(tenant.ruleset.compiled) == 2
    invoices = tenant.ruleset.rules[1]
    assert invoices.conditions[1].value == 10_000_000  # "10 MB" in a size condition
    assert tenant.smtp is not None
    assert tenant.smtp.effective == ("127.0.0.1", 2526, "none")
    assert tenant.smtp.security_pinned


def test_example_config_passes_check_config(tmp_path: Path) -> None:
    result = run_mailgate("-c", str(EXAMPLE_CONFIG), "check-config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "tenant example" in result.stdout


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("20 MB", 20_000_000),
        ("1.2 GB", 1_200_000_000),
        ("512 KiB", 512 * 1024),
        ("1.5MiB", 1_572_864),
        ("100 b", 100),
        ("7", 7),
        (0, 0),
        (1024, 1024),
    ],
)
def test_parse_size(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "MB", "-1 MB", "1 XB", "1 MB extra", True, None, 1.5, -1])
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match=r"size"):
        parse_size(bad)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("60s", timedelta(seconds=60)),
        ("5m", timedelta(minutes=5)),
        ("90d", timedelta(days=90)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("250ms", timedelta(milliseconds=250)),
        ("2w", timedelta(weeks=2)),
        (30, timedelta(seconds=30)),
        (timedelta(hours=1), timedelta(hours=1)),
    ],
)
def test_parse_duration(text: object, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("bad", ["", "1x", "m5", "-1s", "5", True, None, -3])
def test_parse_duration_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match=r"duration"):
        parse_duration(bad)


def test_sizes_and_durations_in_the_config(tmp_path: Path) -> None:
    config = parse_config(config_dict(tmp_path, quota="6 GB", mailboxes=_mailbox(poll_interval="5m")))
    tenant = config.tenant("acme")
    assert tenant.quota == 6_000_000_000
    assert tenant.folders[0].quota == 500_000_000
    assert tenant.mailboxes[0].poll_interval == timedelta(minutes=5)


# --------------------------------------------------------------------------- field-path errors


def _tenant(data: dict[str, Any], index: int = 0) -> dict[str, Any]:
    tenant: dict[str, Any] = data["tenants"][index]
    return tenant


def _condition(data: dict[str, Any]) -> dict[str, Any]:
    condition: dict[str, Any] = _tenant(data)["rules"][0]["conditions"][0]
    return condition


def _mailbox(**fields: Any) -> list[dict[str, Any]]:
    box = {"name": "biuro", "host": "imap.test", "username": "u", "password_env": "IMAP_PW"}
    if "password_file" in fields or "oauth2" in fields:
        del box["password_env"]
    return [{**box, **fields}]


OAUTH2 = {"provider": "google", "client_id": "c", "client_secret_file": "s", "refresh_token_file": "r"}

INVALID: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    (
        "password in clear to a remote host",
        lambda d: _tenant(d).update(mailboxes=_mailbox(security="none", port=143)),
        'tenants[0].mailboxes[0]: security = "none" would send the credentials in clear',
    ),
    (
        "two credentials",
        lambda d: _tenant(d).update(mailboxes=_mailbox(password_file="P", password_env="P")),
        "tenants[0].mailboxes[0]: give exactly one of",
    ),
    (
        "oauth2 table without auth = oauth2",
        lambda d: _tenant(d).update(mailboxes=_mailbox(oauth2=OAUTH2)),
        'tenants[0].mailboxes[0]: an oauth2 table needs auth = "oauth2"',
    ),
    (
        "oauth2 with a password",
        lambda d: _tenant(d).update(mailboxes=_mailbox(auth="oauth2", oauth2=OAUTH2, password_env="P")),
        'tenants[0].mailboxes[0]: auth = "oauth2" takes no password_file or password_env',
    ),
    (
        "oauth2 token endpoint in clear",
        lambda d: _tenant(d).update(
            mailboxes=_mailbox(auth="oauth2", oauth2={**OAUTH2, "token_url": "http://idp.test/token"})
        ),
        "tenants[0].mailboxes[0].oauth2.token_url: 'http://idp.test/token': an OAuth2 endpoint must be https://",
    ),
    (
        "Microsoft app-only access without the directory's token endpoint",
        lambda d: _tenant(d).update(
            mailboxes=_mailbox(
                auth="oauth2", oauth2={"provider": "microsoft", "client_id": "c", "client_secret_file": "s"}
            )
        ),
        "tenants[0].mailboxes[0].oauth2: Microsoft app-only access needs token_url",
    ),
    (
        "smtp oauth2 without its table",
        lambda d: _tenant(d).update(smtp={"preset": "gmail", "username": "u", "auth": "oauth2"}),
        'tenants[0].smtp: auth = "oauth2" goes with an [tenants.smtp.oauth2] table',
    ),
    ("unknown top-level key", lambda d: d.update(bogus=1), "bogus: unknown key"),
    (
        "unknown tenant key",
        lambda d: _tenant(d).update(quotta="1 GB"),
        "tenants[0].quotta: unknown key",
    ),
    (
        "unknown key starting like a type name",
        lambda d: _tenant(d).update(smtp={"preset": "gmail", "string": "x"}),
        "tenants[0].smtp.string: unknown key",
    ),
    (
        "smtp port out of range",
        lambda d: _tenant(d).update(smtp={"host": "smtp.test", "port": 70000}),
        "tenants[0].smtp.port: ",
    ),
    (
        "smtp without preset or host",
        lambda d: _tenant(d).update(smtp={"username": "u"}),
        "tenants[0].smtp: give a preset or both host and port",
    ),
    (
        "bad regex",
        lambda d: _condition(d).update(op="matches", value="("),
        "tenants[0].rules[0].conditions[0]: rule 'orders': invalid pattern '('",
    ),
    (
        "unknown field",
        lambda d: _condition(d).update(field="colour"),
        "tenants[0].rules[0].conditions[0]: rule 'orders': unknown field 'colour'",
    ),
    (
        "bad size in a condition",
        lambda d: _condition(d).update(field="size", op="gt", value="1 XB"),
        "tenants[0].rules[0].conditions[0]: rule 'orders': invalid size '1 XB'",
    ),
    (
        "unknown action",
        lambda d: _tenant(d)["rules"][0]["actions"].__setitem__(0, {"move": "Orders"}),
        "tenants[0].rules[0].actions[0]: unknown action 'move'",
    ),
    (
        "invalid label",
        lambda d: _tenant(d)["rules"][0].update(actions=[{"label": "two words"}]),
        "tenants[0].rules[0]: rule 'orders': label 'two words' is not a valid IMAP keyword",
    ),
    (
        "unknown op",
        lambda d: _condition(d).update(op="fuzzy"),
        "tenants[0].rules[0].conditions[0]: unknown operator 'fuzzy'",
    ),
    (
        "duplicate tenant id",
        lambda d: _tenant(d, 1).update(id="acme"),
        "tenants[1].id: tenant id 'acme' is used twice",
    ),
    (
        "duplicate domain",
        lambda d: _tenant(d, 1).update(domains=["beta.test", "ACME.test."], addresses=[]),
        "tenants[1].domains[1]: domain 'acme.test' belongs to tenants 'acme' and 'beta'",
    ),
    (
        "duplicate agent login",
        lambda d: _tenant(d, 1).update(agents=_tenant(d)["agents"], addresses=[]),
        "tenants[1].agents[0].login: agent login 'anna@acme.test' is used twice",
    ),
    (
        "bad listen address",
        lambda d: d["listen"].update(smtp="localhost"),
        "listen.smtp: invalid listen address 'localhost'",
    ),
    (
        "listen port out of range",
        lambda d: d["listen"].update(imap="127.0.0.1:65536"),
        "listen.imap: invalid listen address",
    ),
    (
        "address outside the domains",
        lambda d: _tenant(d).update(addresses=["biuro@acme.test", "sklep@other.test"]),
        "tenants[0].addresses[1]: address 'sklep@other.test' is not in the tenant's domains",
    ),
    (
        "password hash not argon2",
        lambda d: _tenant(d)["agents"][0].update(password_hash="secret"),
        "tenants[0].agents[0].password_hash: ",
    ),
    (
        "invalid after_fetch",
        lambda d: _tenant(d).update(mailboxes=_mailbox(after_fetch="move:")),
        "tenants[0].mailboxes[0].after_fetch: ",
    ),
    (
        "invalid poll interval",
        lambda d: _tenant(d).update(mailboxes=_mailbox(poll_interval="often")),
        "tenants[0].mailboxes[0].poll_interval: invalid duration 'often'",
    ),
    (
        "mailbox folder mapping keeps the key in the path",
        lambda d: _tenant(d).update(mailboxes=_mailbox(folders={"[Gmail]/Spam": 1})),
        "tenants[0].mailboxes[0].folders.[Gmail]/Spam: ",
    ),
    (
        "bad quota",
        lambda d: _tenant(d).update(quota="lots"),
        "tenants[0].quota: invalid size 'lots'",
    ),
    (
        "tls cert without key",
        lambda d: d.update(tls={"cert_file": "cert.pem"}),
        "tls: cert_file and key_file must be set together",
    ),
]


@pytest.mark.parametrize(("mutate", "expected"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_config_names_the_field(
    tmp_path: Path, mutate: Callable[[dict[str, Any]], None], expected: str
) -> None:
    data = copy.deepcopy(config_dict(tmp_path))
    parse_config(data)  # valid before the change
    mutate(data)
    errors = errors_of(data)
    assert any(e.startswith(expected) for e in errors), errors


def test_rule_errors_name_the_rule_and_its_index(tmp_path: Path) -> None:
    rules = [
        {"name": "first", "conditions": [], "actions": [{"folder": "A"}]},
        {
            "name": "second",
            "conditions": [
                {"field": "subject", "op": "contains", "value": "ok"},
                {"field": "header:X-Thing", "op": "not_matches", "value": "[unclosed"},
            ],
            "actions": [{"folder": "B"}],
        },
    ]
    (error,) = errors_of(config_dict(tmp_path, rules=rules))
    assert error.startswith("tenants[0].rules[1].conditions[1]: rule 'second': invalid pattern '[unclosed'")


def test_all_errors_are_reported_together(tmp_path: Path) -> None:
    data = config_dict(tmp_path)
    data["listen"]["smtp"] = "nope"
    data["tenants"][0]["smtp"] = {"host": "smtp.test", "port": 0}
    data["retention"] = {"spam_days": 0}
    errors = errors_of(data)
    assert [e.split(":")[0] for e in errors] == ["listen.smtp", "retention.spam_days", "tenants[0].smtp.port"]


def test_load_config_reports_bad_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[gateway\nhostname = 1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"invalid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"missing\.toml"):
        load_config(tmp_path / "missing.toml")


# --------------------------------------------------------------------------- secrets


def test_password_file_is_read_on_demand(tmp_path: Path) -> None:
    secret_file = tmp_path / "smtp-password"
    smtp = {"preset": "gmail", "username": "biuro@acme.test", "password_file": str(secret_file)}
    config = parse_config(config_dict(tmp_path, smtp=smtp))  # the file need not exist yet
    secret_file.write_text("s3cr3t-Pa55\n", encoding="utf-8")
    smtp_section = config.tenant("acme").smtp
    assert smtp_section is not None
    password = smtp_section.password()
    assert isinstance(password, SecretStr)
    assert password.get_secret_value() == "s3cr3t-Pa55"  # trailing newline stripped
    assert "s3cr3t" not in repr(password)
    assert "s3cr3t" not in str(password)
    secret_file.write_text("rotated\n", encoding="utf-8")
    rotated = smtp_section.password()
    assert rotated is not None
    assert rotated.get_secret_value() == "rotated"
    for text in (repr(config), str(config), repr(smtp_section), str(config.tenant("acme"))):
        assert "s3cr3t" not in text
        assert "rotated" not in text
        assert AGENT_HASH not in text
        assert "argon2" not in text


def test_password_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mailbox = _mailbox(password_env="MAILGATE_TEST_IMAP_PASSWORD")
    config = parse_config(config_dict(tmp_path, mailboxes=mailbox))
    section = config.tenant("acme").mailboxes[0]
    monkeypatch.delenv("MAILGATE_TEST_IMAP_PASSWORD", raising=False)
    with pytest.raises(ConfigError) as excinfo:
        section.password()
    (error,) = excinfo.value.errors
    assert error.startswith("password_env: ")
    assert "MAILGATE_TEST_IMAP_PASSWORD" in error
    monkeypatch.setenv("MAILGATE_TEST_IMAP_PASSWORD", "from-env")
    password = section.password()
    assert password is not None
    assert password.get_secret_value() == "from-env"
    assert "from-env" not in repr(config)


def test_missing_password_file_raises_config_error(tmp_path: Path) -> None:
    smtp = {"preset": "gmail", "password_file": str(tmp_path / "absent")}
    section = parse_config(config_dict(tmp_path, smtp=smtp)).tenant("acme").smtp
    assert section is not None
    with pytest.raises(ConfigError, match=r"^password_file: cannot read"):
        section.password()


def test_no_password_configured_is_none(tmp_path: Path) -> None:
    section = parse_config(config_dict(tmp_path, smtp={"preset": "wp"})).tenant("acme").smtp
    assert section is not None
    assert section.password() is None


def test_password_file_and_env_together_are_refused(tmp_path: Path) -> None:
    smtp = {"preset": "gmail", "password_file": "a", "password_env": "B"}
    (error,) = errors_of(config_dict(tmp_path, smtp=smtp))
    assert error == "tenants[0].smtp: give password_file or password_env, not both"


def test_secret_values_are_not_config_keys(tmp_path: Path) -> None:
    (error,) = errors_of(config_dict(tmp_path, smtp={"preset": "gmail", "password": "plain"}))
    assert error == "tenants[0].smtp.password: unknown key"


def test_check_config_reports_an_unreadable_password_file(tmp_path: Path) -> None:
    config = tmp_path / "mailgate.toml"
    config.write_text(
        f"""
[gateway]
data_dir = "{tmp_path / "var"}"

[[tenants]]
id = "acme"
domains = ["acme.test"]

[tenants.smtp]
preset = "gmail"
password_file = "{tmp_path / "no-such-secret"}"
""",
        encoding="utf-8",
    )
    result = run_mailgate("-c", str(config), "check-config", cwd=tmp_path)
    assert result.returncode == 1
    assert "tenants[0].smtp.password_file: cannot read " in result.stderr
    assert "no-such-secret" in result.stderr
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- presets


def test_preset_onet(tmp_path: Path) -> None:
    smtp = parse_config(config_dict(tmp_path, smtp={"preset": "onet"})).tenant("acme").smtp
    assert smtp is not None
    assert smtp.effective == ("smtp.poczta.onet.pl", 465, "tls")
    assert smtp.security_pinned is False


@pytest.mark.parametrize(
    ("preset", "expected"),
    [
        ("gmail", ("smtp.gmail.com", 587, "starttls")),
        ("interia", ("poczta.interia.pl", 587, "none")),
        ("onet", ("smtp.poczta.onet.pl", 465, "tls")),
        ("wp", ("smtp.wp.pl", 465, "tls")),
        ("o2", ("poczta.o2.pl", 587, "none")),
    ],
)
def test_presets_match_the_design_table(tmp_path: Path, preset: str, expected: tuple[str, int, str]) -> None:
    assert SMTP_PRESETS[preset] == expected
    smtp = parse_config(config_dict(tmp_path, smtp={"preset": preset})).tenant("acme").smtp
    assert smtp is not None
    assert smtp.effective == expected
    assert not smtp.security_pinned


def test_all_presets_are_covered() -> None:
    assert set(SMTP_PRESETS) == {"gmail", "interia", "onet", "wp", "o2"}


def test_explicit_settings_override_the_preset(tmp_path: Path) -> None:
    smtp_cfg = {"preset": "interia", "host": "relay.test", "port": 2525, "security": "none"}
    smtp = parse_config(config_dict(tmp_path, smtp=smtp_cfg)).tenant("acme").smtp
    assert smtp is not None
    assert smtp.effective == ("relay.test", 2525, "none")
    assert smtp.security_pinned is True
    partial = parse_config(config_dict(tmp_path, smtp={"preset": "gmail", "port": 465, "security": "tls"}))
    assert partial.tenants[0].smtp is not None
    assert partial.tenants[0].smtp.effective == ("smtp.gmail.com", 465, "tls")


def test_host_and_port_without_preset(tmp_path: Path) -> None:
    smtp = {"host": "smtp.test", "port": 587, "from": "Biuro@ACME.test"}
    section = parse_config(config_dict(tmp_path, smtp=smtp)).tenant("acme").smtp
    assert section is not None
    assert section.effective == ("smtp.test", 587, "none")
    assert section.from_ == "biuro@acme.test"


def test_unknown_preset_is_refused(tmp_path: Path) -> None:
    (error,) = errors_of(config_dict(tmp_path, smtp={"preset": "yahoo"}))
    assert error.startswith("tenants[0].smtp.preset: ")


# --------------------------------------------------------------------------- the model


def test_config_is_frozen(tmp_path: Path) -> None:
    config = parse_config(config_dict(tmp_path))
    with pytest.raises(ValidationError, match=r"frozen"):
        config.gateway.hostname = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError, match=r"frozen"):
        config.tenants = ()  # type: ignore[misc]
    with pytest.raises(ValidationError, match=r"frozen"):
        config.tenant("acme").max_attachments = 10  # type: ignore[misc]
    assert isinstance(config.tenants, tuple)


def test_defaults(tmp_path: Path) -> None:
    config = Config()
    assert config.tenants == ()
    assert config.listen.smtp == "127.0.0.1:2525"
    assert config.gateway.effective_database_url == "sqlite+aiosqlite:///var/mailgate.db"
    tenant = parse_config(config_dict(tmp_path)).tenant("acme")
    assert tenant.max_message_size == 20_000_000
    assert tenant.max_attachments == 3
    assert tenant.collision == "hold"


def test_domains_are_normalised(tmp_path: Path) -> None:
    config = parse_config(config_dict(tmp_path, domains=["ACME.Test.", " shop.acme.test "]))
    assert config.tenant("acme").domains == ("acme.test", "shop.acme.test")
    assert config.tenant_for_domain("shop.acme.test") is config.tenant("acme")
    assert config.tenant_for_domain("nobody.test") is None


def test_unknown_tenant_is_a_key_error_naming_it(tmp_path: Path) -> None:
    config = parse_config(config_dict(tmp_path))
    with pytest.raises(KeyError, match=r"nope"):
        config.tenant("nope")


def test_accepts_any_address_at_the_domains_when_addresses_is_empty(tmp_path: Path) -> None:
    acme = parse_config(config_dict(tmp_path)).tenant("acme")
    assert acme.addresses == ()
    assert acme.accepts("biuro@acme.test")
    assert acme.accepts("anyone@acme.test")
    assert not acme.accepts("biuro@beta.test")
    assert not acme.accepts("biuro@sub.acme.test")


def test_accepts_only_listed_addresses(tmp_path: Path) -> None:
    config = parse_config(config_dict(tmp_path))
    beta = config.tenant("beta")
    assert beta.addresses == ("only@beta.test",)
    assert beta.accepts("only@beta.test")
    assert not beta.accepts("other@beta.test")
    assert not beta.accepts("only@acme.test")
    shop = parse_config(config_dict(tmp_path, addresses=["Sklep@ACME.test"])).tenant("acme")
    assert shop.addresses == ("sklep@acme.test",)  # normalised to lower case
    assert shop.accepts("sklep@acme.test")
    assert not shop.accepts("biuro@acme.test")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("poll_interval", 8.64e13),
        ("poll_interval", "9" * 400 + "d"),
        ("quota", "9" * 400 + " GB"),
        ("quota", 2**70),
    ],
)
def test_sizes_and_durations_too_large_are_errors_at_their_field_not_overflow_tracebacks(
    key: str, value: object
) -> None:
    mailbox = {"name": "m", "host": "127.0.0.1", "security": "none", "username": "u", "password_env": "X"}
    tenant: dict[str, object] = {"id": "a", "domains": ["a.test"], "mailboxes": [mailbox]}
    if key == "quota":
        tenant["quota"] = value
    else:
        mailbox[key] = value
    with pytest.raises(ConfigError) as e:
        parse_config({"tenants": [tenant]})
    assert e.value.errors[0].startswith(
        "tenants[0].quota: " if key == "quota" else "tenants[0].mailboxes[0].poll_interval: "
    )

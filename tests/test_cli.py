"""The ``mailgate`` console script, run for real in subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import argon2
import pytest

from gateway.config import load_config
from gateway.daemon import open_store
from tests.conftest import EXAMPLE_CONFIG

FOLDER_KEYS = {"name", "special_use", "messages", "bytes", "quota"}

ORDER_MESSAGE = (
    b"From: Klient <klient@example.org>\r\n"
    b"To: biuro@example.test\r\n"
    b"Subject: =?UTF-8?Q?Zam=C3=B3wienie?= 5\r\n"
    b"Message-ID: <order-5@example.org>\r\n"
    b"\r\n"
    b"Prosze o wycene.\r\n"
)
SPAM_MESSAGE = (
    b"From: Winner <winner@spam.example>\r\n"
    b"To: biuro@example.test\r\n"
    b"Subject: You won\r\n"
    b"X-Spam-Flag: YES\r\n"
    b"\r\n"
    b"Click.\r\n"
)
PLAIN_MESSAGE = (
    b"From: Klient <klient@example.org>\r\nTo: biuro@example.test\r\nSubject: Hello\r\n\r\nHi.\r\n"
)


def mailgate_command() -> list[str]:
    """The console script installed next to this interpreter (``python -m gateway`` otherwise)."""
    script = shutil.which("mailgate", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "gateway"]


def run(
    *args: str,
    cwd: Path,
    input: str | None = None,
    env: dict[str, str] | None = None,
    command: list[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``mailgate ARGS``; ``$MAILGATE_CONFIG`` comes only from ``env``."""
    environ = {k: v for k, v in os.environ.items() if k != "MAILGATE_CONFIG"}
    environ.update(env or {})
    result = subprocess.run(
        [*(command or mailgate_command()), *args],
        capture_output=True,
        text=True,
        input=input if input is not None else "",
        cwd=cwd,
        env=environ,
        timeout=60,
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


def toml_str(value: str | Path) -> str:
    """A TOML basic string (JSON's escaping is valid TOML)."""
    return json.dumps(str(value))


def write_config(tmp_path: Path, db_url: str = "", extra: str = "") -> Path:
    """A minimal configuration file: tenant ``acme`` at acme.test with one folder."""
    path = tmp_path / "mailgate.toml"
    path.write_text(
        f"""
[gateway]
hostname = "mx.test"
data_dir = {toml_str(tmp_path / "var")}
database_url = {toml_str(db_url)}

[listen]
smtp = "127.0.0.1:0"

[[tenants]]
id = "acme"
name = "ACME"
domains = ["acme.test"]
{extra}
[[tenants.folders]]
name = "Orders"
quota = "500 MB"
""",
        encoding="utf-8",
    )
    return path


# --------------------------------------------------------------------------- check-config


def test_check_config_prints_a_summary(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    result = run("-c", str(config), "check-config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"configuration OK: {config}" in result.stdout
    assert "listeners: smtp 127.0.0.1:0" in result.stdout
    assert "tenant acme (ACME): domains acme.test" in result.stdout
    assert result.stderr == ""


def test_check_config_of_the_example(tmp_path: Path) -> None:
    result = run("-c", str(EXAMPLE_CONFIG), "check-config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "tenant example" in result.stdout
    assert "2 rule(s)" in result.stdout


def test_check_config_refuses_broken_toml(tmp_path: Path) -> None:
    config = tmp_path / "broken.toml"
    config.write_text('[gateway\nhostname = "x"\n', encoding="utf-8")
    result = run("-c", str(config), "check-config", cwd=tmp_path)
    assert result.returncode == 1
    assert "invalid TOML" in result.stderr
    assert str(config) in result.stderr
    assert result.stdout == ""


def test_check_config_names_an_unknown_key(tmp_path: Path) -> None:
    config = write_config(tmp_path, extra='colour = "blue"\n')
    result = run("-c", str(config), "check-config", cwd=tmp_path)
    assert result.returncode == 1
    assert "error: tenants[0].colour: unknown key" in result.stderr.splitlines()


def test_check_config_reports_every_invalid_field(tmp_path: Path) -> None:
    config = write_config(tmp_path, extra='quota = "lots"\nmax_attachments = -1\n')
    result = run("-c", str(config), "check-config", cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert any(line.startswith("error: tenants[0].quota: invalid size 'lots'") for line in lines), lines
    assert any(line.startswith("error: tenants[0].max_attachments: ") for line in lines), lines


def test_check_config_with_a_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"
    result = run("-c", str(missing), "check-config", cwd=tmp_path)
    assert result.returncode == 1
    assert str(missing) in result.stderr
    assert "No such file" in result.stderr


def test_config_path_from_the_environment(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    result = run("check-config", cwd=tmp_path, env={"MAILGATE_CONFIG": str(config)})
    assert result.returncode == 0, result.stderr
    assert f"configuration OK: {config}" in result.stdout
    missing = tmp_path / "from-env.toml"
    result = run("check-config", cwd=tmp_path, env={"MAILGATE_CONFIG": str(missing)})
    assert result.returncode == 1
    assert str(missing) in result.stderr


def test_explicit_config_wins_over_the_environment(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    env = {"MAILGATE_CONFIG": str(tmp_path / "missing.toml")}
    result = run("-c", str(config), "check-config", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr


def test_check_config_refuses_an_unsupported_database(tmp_path: Path) -> None:
    config = write_config(tmp_path, db_url="mysql://db.test/mailgate")
    result = run("-c", str(config), "check-config", cwd=tmp_path)
    assert result.returncode == 1
    assert "error: gateway.database_url: " in result.stderr


def test_check_config_never_prints_a_database_password(tmp_path: Path) -> None:
    config = write_config(tmp_path, db_url="postgresql+asyncpg://mailgate:hunter2@db.test/mailgate")
    result = run("-c", str(config), "check-config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout + result.stderr
    assert "database: postgresql+asyncpg://mailgate:***@db.test/mailgate" in result.stdout


# --------------------------------------------------------------------------- hash-password


def test_hash_password_from_stdin(tmp_path: Path) -> None:
    # No configuration is needed, even when the default one does not exist.
    env = {"MAILGATE_CONFIG": str(tmp_path / "missing.toml")}
    result = run("hash-password", cwd=tmp_path, input="correct horse battery\n", env=env)
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    assert line.startswith("$argon2id$")
    assert argon2.PasswordHasher().verify(line, "correct horse battery")
    with pytest.raises(argon2.exceptions.VerifyMismatchError):
        argon2.PasswordHasher().verify(line, "correct horse battery\n")


@pytest.mark.parametrize("stdin", ["", "\n", "\r\n"])
def test_hash_password_refuses_an_empty_password(tmp_path: Path, stdin: str) -> None:
    result = run("hash-password", cwd=tmp_path, input=stdin)
    assert result.returncode == 1
    assert "empty password" in result.stderr
    assert result.stdout == ""


# --------------------------------------------------------------------------- storage


async def test_migrate_is_idempotent(tmp_path: Path, db_url: str) -> None:
    config = write_config(tmp_path, db_url)
    for _ in range(2):
        result = run("-c", str(config), "migrate", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert "up to date" in result.stdout


async def test_folders_as_json_and_table(tmp_path: Path, db_url: str) -> None:
    path = write_config(tmp_path, db_url)
    db, _ = await open_store(load_config(path))  # what the daemon does at start: migrate + sync
    await db.close()

    result = run("-c", str(path), "folders", "--tenant", "acme", "--format", "json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    folders = json.loads(result.stdout)
    assert isinstance(folders, list)
    assert folders
    for folder in folders:
        assert isinstance(folder, dict)
        assert set(folder) == FOLDER_KEYS
    by_name = {f["name"]: f for f in folders}
    assert by_name["Orders"] == {
        "name": "Orders",
        "special_use": None,
        "messages": 0,
        "bytes": 0,
        "quota": 500_000_000,
    }
    assert by_name["INBOX"]["special_use"] == "\\Inbox"
    assert any(f["special_use"] == "\\Junk" for f in folders)

    result = run("-c", str(path), "folders", "--tenant", "acme", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["NAME", "SPECIAL_USE", "MESSAGES", "BYTES", "QUOTA"]
    assert len(rows) == len(folders)
    assert ["Orders", "-", "0", "0", "500000000"] in [row.split() for row in rows]


async def test_folders_of_an_unknown_tenant(tmp_path: Path, db_url: str) -> None:
    path = write_config(tmp_path, db_url)
    db, _ = await open_store(load_config(path))
    await db.close()
    result = run("-c", str(path), "folders", "--tenant", "nope", "--format", "json", cwd=tmp_path)
    assert result.returncode == 1
    assert "no tenant 'nope'" in result.stderr
    assert result.stdout == ""


async def test_folders_before_migrate_is_a_clear_error(tmp_path: Path, db_url: str) -> None:
    path = write_config(tmp_path, db_url)
    result = run("-c", str(path), "folders", "--tenant", "acme", cwd=tmp_path)
    assert result.returncode == 1
    assert "migrate" in result.stderr


def test_unreachable_database_is_a_clear_error(tmp_path: Path) -> None:
    config = write_config(tmp_path, db_url="postgresql+asyncpg://postgres@127.0.0.1:1/mailgate")
    result = run("-c", str(config), "migrate", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("error: ")
    assert "error: : " not in result.stderr


# --------------------------------------------------------------------------- rules test


def rules_test(tmp_path: Path, message: bytes, *extra: str, tenant: str = "example") -> str:
    eml = tmp_path / "message.eml"
    eml.write_bytes(message)
    result = run(
        "-c", str(EXAMPLE_CONFIG), "rules", "test", "--tenant", tenant, *extra, str(eml), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_rules_test_matches_an_encoded_subject(tmp_path: Path) -> None:
    out = rules_test(tmp_path, ORDER_MESSAGE)
    assert "subject 'Zamówienie 5'" in out
    assert "rule 'orders': matched" in out.splitlines()
    assert "folder: Orders (rule 'orders')" in out
    assert "delivered to: Orders" in out.splitlines()


def test_rules_test_sends_upstream_spam_to_junk(tmp_path: Path) -> None:
    out = rules_test(tmp_path, SPAM_MESSAGE)
    assert "spam: yes (x-spam-flag: YES)" in out
    assert "delivered to: the \\Junk folder" in out.splitlines()


def test_rules_test_with_an_envelope_recipient(tmp_path: Path) -> None:
    out = rules_test(tmp_path, PLAIN_MESSAGE)
    assert "rule 'orders': not matched" in out.splitlines()
    assert "delivered to: INBOX" in out.splitlines()
    out = rules_test(tmp_path, PLAIN_MESSAGE, "--rcpt", "sklep@example.test")
    assert "rule 'orders': matched" in out.splitlines()
    assert "+ recipient is 'sklep@example.test'" in out
    assert "delivered to: Orders" in out.splitlines()


def test_rules_test_unknown_tenant(tmp_path: Path) -> None:
    eml = tmp_path / "message.eml"
    eml.write_bytes(ORDER_MESSAGE)
    result = run("-c", str(EXAMPLE_CONFIG), "rules", "test", "--tenant", "nope", str(eml), cwd=tmp_path)
    assert result.returncode == 1
    assert "no tenant 'nope'" in result.stderr


def test_rules_test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.eml"
    result = run(
        "-c", str(EXAMPLE_CONFIG), "rules", "test", "--tenant", "example", str(missing), cwd=tmp_path
    )
    assert result.returncode == 1
    assert str(missing) in result.stderr
    assert "No such file" in result.stderr


# --------------------------------------------------------------------------- the parser


def test_python_m_gateway_help(tmp_path: Path) -> None:
    result = run("--help", cwd=tmp_path, command=[sys.executable, "-m", "gateway"])
    assert result.returncode == 0
    assert result.stdout.startswith("usage: mailgate")
    for command in ("check-config", "migrate", "hash-password", "rules", "folders"):
        assert command in result.stdout


def test_missing_command_is_a_usage_error(tmp_path: Path) -> None:
    result = run(cwd=tmp_path)
    assert result.returncode == 2
    assert "usage: mailgate" in result.stderr

"""The daemon as a process: start-up, SIGTERM, kill -9 durability, the example config."""

from __future__ import annotations

import imaplib
import os
import re
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import EXAMPLE_CONFIG, free_port, peer
from tests.daemon import Daemon, write_config

MESSAGE = (
    b"From: Customer <customer@example.org>\r\n"
    b"To: biuro@acme.test\r\n"
    b"Subject: durable\r\n"
    b"Message-ID: <durable-1@example.org>\r\n"
    b"\r\n"
    b"Please do not lose me.\r\n"
)


@pytest.fixture
def daemon(tmp_path: Path, db_url: str) -> Iterator[Daemon]:
    port = free_port()
    d = Daemon(write_config(tmp_path, db_url, port), port, tmp_path)
    yield d
    d.stop()


def send(port: int, data: bytes = MESSAGE, rcpt: str = "biuro@acme.test") -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        c.ehlo("client.test")
        c.mail("customer@example.org")
        c.rcpt(rcpt)
        return c.data(data)


def test_sigterm_exits_zero(daemon: Daemon) -> None:
    daemon.start()
    assert send(daemon.port)[0] == 250
    assert daemon.signal(signal.SIGTERM) == 0
    log = daemon.log.read_text()
    assert "daemon.stopped" in log
    assert daemon.folders("acme")["INBOX"] == 1


def test_kill_9_right_after_250_keeps_the_message_once(daemon: Daemon) -> None:
    daemon.start()
    code, _ = send(daemon.port)
    assert code == 250
    daemon.signal(signal.SIGKILL)
    daemon.start()
    # The sender never saw the 250 in the worst case and retries: still once.
    assert send(daemon.port)[0] == 250
    assert daemon.folders("acme")["INBOX"] == 1
    assert daemon.signal(signal.SIGTERM) == 0


def test_sighup_with_broken_config_keeps_serving(daemon: Daemon) -> None:
    daemon.start()
    good = daemon.config.read_text()
    daemon.config.write_text(good + "\nbogus = 1\n")
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "config.reload_refused" not in daemon.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "bogus: unknown key" in daemon.log.read_text()
    assert send(daemon.port)[0] == 250


def test_example_config_runs_and_files_mail(tmp_path: Path) -> None:
    """The README's quick start: the example config, with only the port and paths moved."""
    port = free_port()
    text = EXAMPLE_CONFIG.read_text(encoding="utf-8")
    text = text.replace('smtp = "127.0.0.1:2525"', f'smtp = "127.0.0.1:{port}"')
    imap_port = free_port()
    text = text.replace('imap = "127.0.0.1:2143"', f'imap = "127.0.0.1:{imap_port}"')
    text = text.replace('submission = "127.0.0.1:2587"', f'submission = "127.0.0.1:{free_port()}"')
    text = text.replace('metrics = "127.0.0.1:9464"', f'metrics = "127.0.0.1:{free_port()}"')
    text = re.sub(r'^data_dir = "var"', f'data_dir = "{tmp_path / "var"}"', text, flags=re.MULTILINE)
    config = tmp_path / "example.toml"
    config.write_text(text, encoding="utf-8")
    d = Daemon(config, port, tmp_path)
    d.start()
    try:
        swaks = peer("swaks")
        base = [swaks, "--server", f"127.0.0.1:{port}", "--from", "klient@example.org"]
        runs = [
            ["--to", "biuro@example.test", "--header", "Subject: pytanie"],
            ["--to", "biuro@example.test", "--header", "Subject: Zamówienie 12"],
            ["--to", "sklep@example.test", "--header", "Subject: cokolwiek"],
            ["--to", "biuro@example.test", "--header", "Subject: Faktura nr 7"],
            ["--to", "biuro@example.test", "--add-header", "X-Spam-Flag: YES", "--header", "Subject: win"],
        ]
        for args in runs:
            out = subprocess.run(base + args, capture_output=True, timeout=60, check=False)
            assert out.returncode == 0, out.stdout.decode() + out.stderr.decode()
            assert b"250 2.0.0 OK" in out.stdout
        folders = d.folders("example")
        client = imaplib.IMAP4("127.0.0.1", imap_port, timeout=10)
        client.login("anna@example.test", "demo-password")
        assert client.select("Orders") == ("OK", [b"2"])
        client.logout()
        assert folders["INBOX"] == 1
        assert folders["Orders"] == 2
        assert folders["Invoices"] == 1
        assert folders["Spam"] == 1
        assert d.signal(signal.SIGTERM) == 0
    finally:
        d.stop()


def test_run_refuses_an_invalid_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[gateway]\nhostname = 1\n")
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "-c", str(bad), "run"], capture_output=True, timeout=60, check=False
    )
    assert out.returncode == 1
    assert b"gateway.hostname" in out.stderr


def test_default_config_path_from_environment(tmp_path: Path) -> None:
    env = dict(os.environ, MAILGATE_CONFIG=str(EXAMPLE_CONFIG))
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config"],
        capture_output=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert out.returncode == 0, out.stderr

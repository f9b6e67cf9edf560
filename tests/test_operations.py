"""Operating the daemon: systemd readiness, watchdog and socket activation; agent statistics in metrics."""

from __future__ import annotations

import imaplib
import json
import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from tests.conftest import free_port

PASSWORD = "agent-password"
HASH = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash(PASSWORD)


def config_text(tmp_path: Path, db_url: str, listen: dict[str, int], collision: str = "warn") -> str:
    listeners = "\n".join(f'{k} = "127.0.0.1:{v}"' for k, v in listen.items())
    return f"""
[gateway]
hostname = "mx.test"
data_dir = "{tmp_path / "var"}"
database_url = "{db_url}"

[listen]
{listeners}

[[tenants]]
id = "acme"
domains = ["acme.test"]
collision = "{collision}"

[tenants.smtp]
host = "127.0.0.1"
port = {free_port()}
security = "none"
from = "biuro@acme.test"

[[tenants.agents]]
login = "anna@acme.test"
password_hash = "{HASH}"

[[tenants.agents]]
login = "bartek@acme.test"
password_hash = "{HASH}"
"""


def test_systemd_readiness_watchdog_stopping_and_socket_activation(tmp_path: Path, db_url: str) -> None:
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(30)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    config = tmp_path / "mailgate.toml"
    config.write_text(config_text(tmp_path, db_url, {"smtp": free_port()}), encoding="utf-8")
    env = dict(
        os.environ,
        NOTIFY_SOCKET=str(notify_path),
        WATCHDOG_USEC="1000000",
        LISTEN_FDS="1",
        LISTEN_FDNAMES="smtp",
    )

    # As systemd does: the socket as fd 3, and LISTEN_PID the daemon's own pid
    # (the launcher sets both, then becomes the daemon).
    fd = listener.fileno()
    launcher = (
        f"import os, sys; os.dup2({fd}, 3); os.environ['LISTEN_PID'] = str(os.getpid()); "
        f"os.execv(sys.executable, [sys.executable, '-m', 'gateway', '-c', {str(config)!r}, 'run'])"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", launcher],
        env=env,
        cwd=tmp_path,
        pass_fds=(fd,),
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "daemon.log").open("wb"),
    )
    try:
        try:
            assert notify.recv(4096) == b"READY=1"
        except TimeoutError:
            pytest.fail((tmp_path / "daemon.log").read_text())
        # Ready means listening: the inherited socket answers at once.
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            assert client.noop()[0] == 250
        deadline = time.monotonic() + 10
        while notify.recv(4096) != b"WATCHDOG=1":
            assert time.monotonic() < deadline
        proc.send_signal(signal.SIGTERM)
        while (message := notify.recv(4096)) == b"WATCHDOG=1":
            pass
        assert message == b"STOPPING=1"
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        notify.close()
        listener.close()


class Daemon:
    def __init__(self, tmp_path: Path, db_url: str, collision: str = "warn") -> None:
        self.ports = {k: free_port() for k in ("smtp", "submission", "imap", "metrics")}
        self.config = tmp_path / "mailgate.toml"
        self.config.write_text(config_text(tmp_path, db_url, self.ports, collision), encoding="utf-8")
        self.tmp = tmp_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "-c", str(self.config), "run"],
            cwd=self.tmp,
            stdout=subprocess.DEVNULL,
            stderr=(self.tmp / "daemon.log").open("ab"),
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{self.ports['metrics']}/readyz", timeout=2
                ) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        pytest.fail((self.tmp / "daemon.log").read_text())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            assert self.proc.wait(30) == 0

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.ports['metrics']}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.read().decode()

    def stats(self) -> dict[str, dict[str, object]]:
        out = subprocess.run(
            [sys.executable, "-m", "gateway", "-c", str(self.config), "stats", "agents", "--tenant", "acme",
             "--format", "json"],
            capture_output=True, check=True, timeout=60, cwd=self.tmp,
        )  # fmt: skip
        return {row["agent"]: row for row in json.loads(out.stdout)}


def value(metrics: str, name: str, agent: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + "{") and f'agent="{agent}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize("collision", ["warn", "hold"])
def test_agent_statistics_scenario_survives_a_restart(tmp_path: Path, db_url: str, collision: str) -> None:
    """B's reply to a customer A answered counts one collision for B, whether it is sent or held."""
    d = Daemon(tmp_path, db_url, collision)
    d.start()
    try:
        with smtplib.SMTP("127.0.0.1", d.ports["smtp"], timeout=10) as c:
            for n in range(1, 6):
                c.sendmail(
                    "klient@example.org",
                    ["biuro@acme.test"],
                    f"From: klient{n}@example.org\r\nSubject: pytanie {n}\r\n"
                    f"Message-ID: <c{n}@example.org>\r\n\r\n?\r\n",
                )

        def read(login: str, numbers: str) -> None:
            client = imaplib.IMAP4("127.0.0.1", d.ports["imap"], timeout=10)
            client.login(login, PASSWORD)
            client.select("INBOX")
            client.fetch(numbers, "(BODY[])")
            client.logout()

        def reply(login: str, n: int) -> int:
            """The reply's SMTP code at the end of DATA."""
            with smtplib.SMTP("127.0.0.1", d.ports["submission"], timeout=10) as c:
                c.login(login, PASSWORD)
                assert c.mail("biuro@acme.test")[0] == 250
                assert c.rcpt(f"klient{n}@example.org")[0] == 250
                code, _ = c.data(
                    f"From: biuro@acme.test\r\nSubject: Re: pytanie {n}\r\n"
                    f"In-Reply-To: <c{n}@example.org>\r\n"
                    f"Message-ID: <r{n}.{login}@acme.test>\r\n\r\nOdpowiedz.\r\n"
                )
                return code

        read("anna@acme.test", "1:3")
        read("bartek@acme.test", "4")
        assert reply("anna@acme.test", 1) == 250
        assert reply("anna@acme.test", 2) == 250
        # anna answered it: a collision, sent under "warn", held under "hold", counted in both
        assert reply("bartek@acme.test", 1) == {"warn": 250, "hold": 450}[collision]
        bartek_replies = {"warn": 1, "hold": 0}[collision]
        expected = {
            ("mailgate_agent_messages_read_total", "anna@acme.test"): 3,
            ("mailgate_agent_messages_read_total", "bartek@acme.test"): 1,
            ("mailgate_agent_replies_total", "anna@acme.test"): 2,
            ("mailgate_agent_replies_total", "bartek@acme.test"): bartek_replies,
            ("mailgate_agent_collisions_total", "anna@acme.test"): 0,
            ("mailgate_agent_collisions_total", "bartek@acme.test"): 1,
            ("mailgate_agent_first_response_seconds_count", "anna@acme.test"): 2,
            ("mailgate_agent_first_response_seconds_count", "bartek@acme.test"): 0,
        }
        for _ in (1, 2):  # before and after a restart
            d.stop()
            d.start()
            scrape = d.metrics()
            assert {key: value(scrape, *key) for key in expected} == expected
        stats = d.stats()
        assert (stats["anna@acme.test"]["read"], stats["anna@acme.test"]["replies"]) == (3, 2)
        bartek = stats["bartek@acme.test"]
        assert (bartek["read"], bartek["replies"], bartek["collisions"]) == (1, bartek_replies, 1)
        assert stats["anna@acme.test"]["median_first_response_seconds"] is not None
    finally:
        d.stop()


def test_no_password_reaches_the_log(tmp_path: Path, db_url: str) -> None:
    d = Daemon(tmp_path, db_url)
    d.start()
    try:
        client = imaplib.IMAP4("127.0.0.1", d.ports["imap"], timeout=10)
        client.login("anna@acme.test", PASSWORD)
        client.logout()
        client = imaplib.IMAP4("127.0.0.1", d.ports["imap"], timeout=10)
        with pytest.raises(imaplib.IMAP4.error):
            client.login("anna@acme.test", PASSWORD + "-wrong")
        with smtplib.SMTP("127.0.0.1", d.ports["submission"], timeout=10) as c:
            c.login("bartek@acme.test", PASSWORD)
    finally:
        d.stop()
    log = (tmp_path / "daemon.log").read_text()
    assert "imap.login" in log
    assert PASSWORD not in log
    assert "AUTH PLAIN" not in log


def test_readyz_fails_while_the_database_is_locked_and_recovers(tmp_path: Path) -> None:
    import sqlite3

    d = Daemon(tmp_path, "")
    d.start()
    url = f"http://127.0.0.1:{d.ports['metrics']}/readyz"
    try:
        lock = sqlite3.connect(tmp_path / "var" / "mailgate.db", isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")
        try:
            with pytest.raises(urllib.error.HTTPError) as unready:
                urllib.request.urlopen(url, timeout=30)
            assert unready.value.code == 503
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        with urllib.request.urlopen(url, timeout=30) as r:
            assert r.status == 200
    finally:
        d.stop()


def test_sighup_applies_a_new_rule_while_idle_sessions_stay(tmp_path: Path, db_url: str) -> None:
    d = Daemon(tmp_path, db_url)
    d.start()
    idle = socket.create_connection(("127.0.0.1", d.ports["imap"]), timeout=10)
    lines = idle.makefile("rb")
    try:
        lines.readline()
        idle.sendall(b"a LOGIN anna@acme.test " + PASSWORD.encode() + b"\r\nb SELECT INBOX\r\nc IDLE\r\n")
        while not lines.readline().startswith(b"+"):
            pass
        d.config.write_text(
            d.config.read_text()
            + '\n[[tenants.rules]]\nname = "new"\n'
            + 'conditions = [{ field = "subject", op = "contains", value = "nowa" }]\n'
            + 'actions = [{ folder = "Nowe" }]\n',
            encoding="utf-8",
        )
        assert d.proc is not None
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while "config.reloaded" not in (tmp_path / "daemon.log").read_text():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with smtplib.SMTP("127.0.0.1", d.ports["smtp"], timeout=10) as c:
            c.sendmail("k@example.org", ["biuro@acme.test"], "Subject: nowa sprawa\r\n\r\nx\r\n")
        command = ["folders", "--tenant", "acme", "--format", "json"]
        out = subprocess.run(
            [sys.executable, "-m", "gateway", "-c", str(d.config), *command],
            capture_output=True, check=True, timeout=60, cwd=tmp_path,
        )  # fmt: skip
        assert {r["name"]: r["messages"] for r in json.loads(out.stdout)}.get("Nowe") == 1
        idle.sendall(b"DONE\r\n")
        while not (line := lines.readline()).startswith(b"c "):
            assert line
        assert line.startswith(b"c OK")
    finally:
        idle.close()
        d.stop()

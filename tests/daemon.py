"""``mailgate run`` as a subprocess, for end-to-end tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


def write_config(tmp_path: Path, db_url: str, port: int, extra: str = "") -> Path:
    """A config with tenant acme at acme.test; ``extra`` is appended (e.g. mailboxes)."""
    path = tmp_path / "mailgate.toml"
    path.write_text(
        f"""
[gateway]
hostname = "mx.test"
data_dir = "{tmp_path / "var"}"
database_url = "{db_url}"

[listen]
smtp = "127.0.0.1:{port}"

[[tenants]]
id = "acme"
domains = ["acme.test"]
{extra}
""",
        encoding="utf-8",
    )
    return path


class Daemon:
    """``mailgate run`` in a subprocess, with its log in a file."""

    def __init__(
        self,
        config: Path,
        port: int,
        cwd: Path,
        env: dict[str, str] | None = None,
        also: tuple[int, ...] = (),
    ) -> None:
        """``start`` waits until ``port`` and the ``also`` ports accept connections."""
        self.config, self.port, self.also, self.cwd = config, port, also, cwd
        self.env = {**os.environ, **(env or {})}
        self.log = cwd / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "-c", str(self.config), "run"],
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        deadline = time.monotonic() + 30
        waiting = [self.port, *self.also]  # the listeners bind one after another
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"daemon exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", waiting[0]), timeout=1).close()
            except OSError:
                time.sleep(0.05)
            else:
                waiting.pop(0)
                if not waiting:
                    return
        pytest.fail(f"daemon did not listen on {waiting[0]}:\n{self.log.read_text()}")

    def signal(self, sig: int) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def cli(self, *args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "gateway", "-c", str(self.config), *args],
            cwd=self.cwd,
            capture_output=True,
            check=True,
            timeout=60,
            env=self.env,  # the daemon's environment (a fake clock, say) is the command's too
        )
        return out.stdout.decode()

    def folders(self, tenant: str) -> dict[str, int]:
        rows = json.loads(self.cli("folders", "--tenant", tenant, "--format", "json"))
        return {r["name"]: r["messages"] for r in rows}

    def mailboxes(self) -> dict[str, dict[str, object]]:
        return {r["name"]: r for r in json.loads(self.cli("mailboxes", "--format", "json"))}

    def wait_for(self, what: str, check: object, seconds: float) -> float:
        """Poll ``check()`` until true; returns the seconds it took, fails after ``seconds``."""
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            if check():  # type: ignore[operator]
                return time.monotonic() - start
            time.sleep(0.05)
        pytest.fail(f"{what} not within {seconds}s:\n{self.log.read_text()[-3000:]}")

"""The README's quick start, run literally on a fresh clone (issue #11: docs that stand alone).

The commands are taken from the README itself: ``make run`` from the first
block (in the background, as "in one terminal"), then every command of the
blocks that follow, in order, each as written; a command ending in ``&``
runs in the background. Nothing is substituted, so the fixed ports of the
example configuration (2525, 2526, 2587, 2143, 9464) must be free.
"""

from __future__ import annotations

import mailbox
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from email.header import decode_header
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, peer

QUICK_START = re.compile(r"^## Quick start\n(.*?)^## ", re.MULTILINE | re.DOTALL)
BLOCK = re.compile(r"^```sh\n(.*?)^```", re.MULTILINE | re.DOTALL)
PORTS = (2525, 2526, 2587, 2143, 9464)


def quick_start_commands() -> tuple[str, list[str]]:
    """``make run`` and the commands after it, from the README's quick start."""
    section = QUICK_START.search((REPO / "README.md").read_text(encoding="utf-8"))
    assert section is not None, "the README has no '## Quick start' section"
    blocks = BLOCK.findall(section.group(1))
    first = [line for line in blocks[0].splitlines() if line.startswith("make run")]
    assert len(first) == 1, blocks[0]
    commands: list[str] = []
    for block in blocks[1:]:
        commands += [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]
    return first[0].split("#")[0].strip(), commands


def test_the_quick_start_is_a_list_of_commands() -> None:
    run, commands = quick_start_commands()
    assert run == "make run"
    assert any(c.startswith("swaks --server 127.0.0.1:2525") for c in commands)
    assert any(c.endswith("&") for c in commands)  # the sink


def _wait_for(port: int, proc: subprocess.Popen[bytes], log: Path, seconds: float = 600) -> None:
    deadline = time.monotonic() + seconds
    while True:
        if proc.poll() is not None:
            pytest.fail(
                f"'make run' exited with {proc.returncode}:\n{log.read_text(errors='replace')[-4000:]}"
            )
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail(f"nothing listens on {port}:\n{log.read_text(errors='replace')[-4000:]}")
            time.sleep(0.2)
        else:
            return


def _shell(command: str, cwd: Path, **kwargs: Any) -> subprocess.Popen[bytes]:
    """Start one README command as its reader would type it, in a process group of its own."""
    return subprocess.Popen(command, shell=True, cwd=cwd, start_new_session=True, **kwargs)  # noqa: S602


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def clone(tmp_path: Path) -> Iterator[Path]:
    """A fresh clone of this repository's committed state."""
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    for port in PORTS:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                pytest.skip(f"port {port} of the example configuration is in use")
    target = tmp_path / "mailgate"
    subprocess.run(["git", "clone", "-q", str(REPO), str(target)], check=True, timeout=120)
    yield target
    shutil.rmtree(target, ignore_errors=True)


@pytest.mark.timeout(900)
def test_readme_quick_start_runs_literally(clone: Path) -> None:
    peer("swaks")
    run, commands = quick_start_commands()
    log = clone / "make-run.log"
    background: list[subprocess.Popen[bytes]] = []
    with log.open("wb") as out:
        daemon = _shell(run, clone, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_for(2525, daemon, log)
        _wait_for(2587, daemon, log, 30)
        outputs: dict[str, str] = {}
        for command in commands:
            if command.endswith("&"):
                proc = _shell(command[:-1], clone, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                background.append(proc)
                _wait_for(int(re.findall(r"127\.0\.0\.1:(\d+)", command)[0]), proc, log, 60)
                continue
            proc = _shell(command, clone, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            printed, _ = proc.communicate(timeout=120)
            text = printed.decode(errors="replace")
            assert proc.returncode == 0, f"{command}\n{text}"
            outputs[command] = text
        folders = next(o for c, o in outputs.items() if "folders --tenant" in c)
        assert re.search(r"^Orders\s+-\s+1\s", folders, re.MULTILINE), folders
        why = next(o for c, o in outputs.items() if "rules test" in c)
        assert "orders" in why, why
        sink = mailbox.Maildir(clone / "var" / "sink", create=False)
        deadline = time.monotonic() + 60
        while not len(sink) and time.monotonic() < deadline:
            time.sleep(0.2)
        (reply,) = list(sink)
        # The sink re-encodes the raw UTF-8 subject swaks sent (as unknown-8bit).
        subject = b"".join(
            p if isinstance(p, bytes) else p.encode() for p, _ in decode_header(reply["Subject"])
        )
        assert subject.decode("utf-8") == "Re: Zamówienie 12"
    finally:
        for proc in background:
            _stop(proc)
        _stop(daemon)

"""A private rspamd (Debian's ``rspamd`` 3.x) started by tests, on 127.0.0.1 only.

The daemon runs in the foreground from a temporary directory: its own
``rspamd.conf`` (Debian's rule set from ``/etc/rspamd`` through ``$CONFDIR``,
but ``$LOCAL_CONFDIR``, ``$DBDIR``, ``$RUNDIR`` and ``$LOGDIR`` inside the
temporary directory), the normal and controller workers on free loopback
ports, no proxy or fuzzy worker, and no system service. With ``learning``, a
private ``redis-server`` on a loopback port backs the Bayes statistics.

DNS goes to a closed loopback port (queries fail at once: SPF, DKIM and DMARC
report a DNS failure and no RBL is asked), so results do not depend on the
network. One test symbol (a Lua rule), ``MAILGATE_TEST_SPAMMY`` (score 7: rspamd's ``add
header``), fires on a Subject containing :data:`ADD_HEADER_SUBJECT`.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

HOST = "127.0.0.1"
ADD_HEADER_SUBJECT = "mailgate-add-header-test"
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"

_CONFIG = """\
.include "$CONFDIR/common.conf"
options {{
    pidfile = "$RUNDIR/rspamd.pid";
    .include "$CONFDIR/options.inc"
    dns {{ nameserver = ["{dns}"]; timeout = 0.2s; retransmits = 1; }}
    local_addrs = [];
    disable_hyperscan = true;
}}
logging {{
    type = "file";
    filename = "$LOGDIR/rspamd.log";
    level = "notice";
}}
worker "normal" {{
    bind_socket = "{host}:{normal}";
    .include "$CONFDIR/worker-normal.inc"
    count = 1;
}}
worker "controller" {{
    bind_socket = "{host}:{controller}";
    .include "$CONFDIR/worker-controller.inc"
    count = 1;
    secure_ip = ["{host}"];
}}
"""

_LUA = f"""\
rspamd_config.MAILGATE_TEST_SPAMMY = {{
  callback = function(task)
    return (task:get_subject() or ''):find('{ADD_HEADER_SUBJECT}', 1, true) ~= nil
  end,
  score = 7.0,
  description = 'mailgate test: scored as add header',
}}
"""


class Rspamd:
    """One private rspamd: ``url`` (checks) and ``controller`` (learning, ``stat``)."""

    def __init__(self, root: Path, *, learning: bool) -> None:
        from tests.conftest import free_port  # here: conftest imports this module

        self.root = root
        self.normal_port = free_port()
        self.controller_port = free_port()
        self.redis_port = free_port() if learning else None
        self.url = f"http://{HOST}:{self.normal_port}"
        self.controller = f"http://{HOST}:{self.controller_port}"
        self._proc: subprocess.Popen[bytes] | None = None
        self._redis: subprocess.Popen[bytes] | None = None
        for sub in ("local.d", "override.d", "db", "run", "log"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        (root / "rspamd.conf").write_text(
            _CONFIG.format(
                host=HOST,
                normal=self.normal_port,
                controller=self.controller_port,
                dns=f"{HOST}:{free_port()}",
            )
        )
        (root / "rspamd.local.lua").write_text(_LUA)
        # Host name checks score every loopback test sender as spam: off, for stable verdicts.
        (root / "local.d" / "hfilter.conf").write_text("enabled = false;\n")
        # Greylisting (on once redis is there) would defer every test's first message.
        (root / "local.d" / "greylist.conf").write_text("enabled = false;\n")
        # Tests relay from 127.0.0.1, a "local" address: check SPF, DKIM and DMARC anyway.
        for module in ("spf", "dkim", "dmarc"):
            (root / "local.d" / f"{module}.conf").write_text("check_local = true;\n")
        if self.redis_port is not None:
            (root / "local.d" / "redis.conf").write_text(f'servers = "{HOST}:{self.redis_port}";\n')
            # Learn from the first message on: the test counts learns, it does not grade them.
            (root / "local.d" / "classifier-bayes.conf").write_text(
                "min_learns = 1;\nmin_tokens = 1;\nautolearn = false;\n"
                'learn_condition = "return function() return true end";\n'
            )

    def start(self) -> None:
        """Start (or restart) the daemon; returns once it answers ``/ping``."""
        from tests.conftest import missing_peer  # here: conftest imports this module

        if self.redis_port is not None and self._redis is None:
            redis = shutil.which("redis-server")
            if redis is None:
                missing_peer("redis-server is not installed (rspamd's Bayes statistics need it)")
            assert redis is not None
            self._redis = subprocess.Popen(
                [redis, "--bind", HOST, "--port", str(self.redis_port), "--save", "", "--appendonly", "no"],
                cwd=self.root,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        user = pwd.getpwuid(os.getuid()).pw_name
        args = ["rspamd", "-f", "-c", str(self.root / "rspamd.conf")]
        for var, value in (
            ("CONFDIR", "/etc/rspamd"),
            ("LOCAL_CONFDIR", str(self.root)),
            ("DBDIR", str(self.root / "db")),
            ("RUNDIR", str(self.root / "run")),
            ("LOGDIR", str(self.root / "log")),
        ):
            args.append(f"--var={var}={value}")
        if os.getuid() == 0:
            args += ["-u", user, "-g", user, "-i"]
        self._proc = subprocess.Popen(
            [shutil.which("rspamd") or "rspamd", *args[1:]],
            cwd=self.root,
            stdout=subprocess.DEVNULL,
            stderr=(self.root / "log" / "stderr").open("ab"),
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"rspamd exited: {self.log()[-2000:]}")
            if self._ping(self.url) and self._ping(self.controller):
                return
            time.sleep(0.1)
        raise RuntimeError(f"rspamd did not answer in 30 s: {self.log()[-2000:]}")

    def stop(self) -> None:
        """Stop the daemon (redis stays: a restart keeps the statistics)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def close(self) -> None:
        self.stop()
        if self._redis is not None:
            self._redis.terminate()
            self._redis.wait(10)
            self._redis = None

    def log(self) -> str:
        parts = [p.read_text(errors="replace") for p in (self.root / "log").iterdir() if p.is_file()]
        return "\n".join(parts)

    @staticmethod
    def _ping(base: str) -> bool:
        try:
            with urllib.request.urlopen(f"{base}/ping", timeout=1) as r:  # noqa: S310 (loopback only)
                return bool(r.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def stat(self) -> dict[str, object]:
        """The controller's ``/stat`` (learned counts, per statfile)."""
        with urllib.request.urlopen(f"{self.controller}/stat", timeout=5) as r:  # noqa: S310 (loopback only)
            data: dict[str, object] = json.loads(r.read())
        return data

    def learned(self) -> int:
        """Messages learned so far, spam and ham together (``stat``'s ``learned``; the
        per-statfile counts come from Redis only every minute or so)."""
        return int(str(self.stat().get("learned", 0)))


def _start(learning: bool) -> Iterator[Rspamd]:
    from tests.conftest import missing_peer  # here: conftest imports this module

    if shutil.which("rspamd") is None or not Path("/etc/rspamd/common.conf").exists():
        missing_peer("rspamd is not installed (make peers installs it)")
    root = Path(tempfile.mkdtemp(prefix="mg-rspamd-", dir="/tmp"))
    root.chmod(0o755)
    server = Rspamd(root, learning=learning)
    try:
        server.start()
        yield server
    finally:
        server.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def rspamd() -> Iterator[Rspamd]:
    """A private rspamd (with a private redis-server for its Bayes statistics) per test module.

    It takes about ten seconds to start, so a module shares it: tests that stop it start it again.
    """
    yield from _start(learning=True)

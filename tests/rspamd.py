"""A private rspamd (Debian's ``rspamd`` 3.x) started by tests, on 127.0.0.1 only.

The daemon runs in the foreground from a temporary directory: its own
``rspamd.conf`` (Debian's rule set from ``/etc/rspamd`` through ``$CONFDIR``,
but ``$LOCAL_CONFDIR``, ``$DBDIR``, ``$RUNDIR`` and ``$LOGDIR`` inside the
temporary directory), the normal and controller workers on free loopback
ports, no proxy or fuzzy worker, and no system service. With ``learning``, a
private ``redis-server`` on a loopback port backs the Bayes statistics.

DNS goes to :class:`NxDomain`, a stub on a loopback port that answers every
query at once with "no such domain", as a local caching resolver answers the
names a network-less machine cannot know: SPF, DKIM and DMARC find no record,
no RBL lists anyone, and no scan waits for a resolver timeout (a closed port
made rspamd wait out its timeout on every query). The options that say so sit in
``override.d/options.inc``, included at priority 10 as Debian's own
``rspamd.conf`` does: set after ``options.inc`` at the same priority they were
ignored (UCL keeps the first of two equal keys), and rspamd asked the machine's
resolver. ``fuzzy_check`` is off (its servers are on the internet).

Hyperscan is on, as in Debian's default configuration: the ``hs_helper``
process compiles the regular expressions into ``$DBDIR`` in the background after
start-up, and scans use PCRE until it is done; :meth:`Rspamd.wait_hyperscan`
waits for it (with ``log_level="info"``, where rspamd says so).

One test symbol (a Lua rule), ``MAILGATE_TEST_SPAMMY`` (score 7: rspamd's ``add
header``), fires on a Subject containing :data:`ADD_HEADER_SUBJECT`.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
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
    .include(try=true; priority=10) "$LOCAL_CONFDIR/override.d/options.inc"
}}
logging {{
    type = "file";
    filename = "$LOGDIR/rspamd.log";
    level = "{log_level}";
}}
worker "normal" {{
    bind_socket = "{host}:{normal}";{normal_socket}
    .include "$CONFDIR/worker-normal.inc"
    count = {workers};
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
# Over options.inc's values (at priority 10): see the module's docstring.
_OPTIONS = """\
dns {{ nameserver = ["{dns}"]; timeout = 1s; retransmits = 1; }}
local_addrs = [];
"""


class NxDomain:
    """A DNS stub on a loopback UDP port: every query is answered at once with NXDOMAIN."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind((HOST, 0))
        self.address = f"{HOST}:{self._sock.getsockname()[1]}"
        self.answered = 0
        self._thread = threading.Thread(target=self._serve, name="nxdomain", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                query, peer = self._sock.recvfrom(4096)
            except OSError:
                return  # closed
            if len(query) < 12:
                continue
            qid, flags = struct.unpack("!HH", query[:4])
            end = 12  # the question's name: labels up to the root's zero byte, then type and class
            while end < len(query) and query[end]:
                end += 1 + query[end]
            # QR, the query's opcode and RD, RA, rcode 3 (NXDOMAIN); the question echoed, no records.
            header = struct.pack("!HHHHHH", qid, 0x8000 | (flags & 0x7900) | 0x0080 | 3, 1, 0, 0, 0)
            self._sock.sendto(header + query[12 : end + 5], peer)
            self.answered += 1

    def close(self) -> None:
        self._sock.close()
        self._thread.join(5)


class Rspamd:
    """One private rspamd: ``url`` (checks) and ``controller`` (learning, ``stat``)."""

    def __init__(
        self,
        root: Path,
        *,
        learning: bool,
        workers: int = 1,
        log_level: str = "notice",
        unix_socket: Path | None = None,
    ) -> None:
        """``unix_socket``: the normal worker listens on that path too (bench/rspamd_client.py)."""
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
        self.dns = NxDomain()
        (root / "rspamd.conf").write_text(
            _CONFIG.format(
                host=HOST,
                normal=self.normal_port,
                normal_socket=f'\n    bind_socket = "{unix_socket} mode=0600";' if unix_socket else "",
                controller=self.controller_port,
                workers=workers,
                log_level=log_level,
            )
        )
        (root / "override.d" / "options.inc").write_text(_OPTIONS.format(dns=self.dns.address))
        # Its servers are on the internet (and rspamd would resolve their names at start-up).
        (root / "local.d" / "fuzzy_check.conf").write_text("enabled = false;\n")
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
        self.dns.close()

    def wait_hyperscan(self, timeout: float = 120.0) -> int:
        """Wait until a normal worker has loaded the hyperscan database ``hs_helper`` compiled;
        returns how many regular expressions it holds. Needs ``log_level="info"``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(r"\(normal\).*full hyperscan database of (\d+) regexps", self.log())
            if found:
                return int(found.group(1))
            if self._proc is None or self._proc.poll() is not None:
                raise RuntimeError(f"rspamd exited: {self.log()[-2000:]}")
            time.sleep(0.5)
        raise RuntimeError(f"rspamd did not load its hyperscan database in {timeout:.0f} s")

    @property
    def pid(self) -> int:
        """The main process's id (the workers are its children)."""
        assert self._proc is not None, "not started"
        return self._proc.pid

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

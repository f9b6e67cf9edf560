"""Issue #10, defects 4, 5 and 6: no client may exhaust the daemon's memory, CPU or connections.

Each test is named for the defect it guards against and failed on the code
before the fix.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher

from gateway import metrics
from gateway.auth import Authenticator
from gateway.config import Config, parse_config
from gateway.connections import ConnectionGate, network
from gateway.daemon import open_store
from gateway.imap.server import IMAPServer
from gateway.ingest import Pipeline
from gateway.metrics import DatabaseCollector, MetricsServer
from gateway.notify import Changes
from gateway.smtp.server import RelayServer
from storage.db import Database
from tests.conftest import config_dict, free_port

PASSWORD = "agent-password"
# A real argon2id cost: what an attacker would make the daemon spend.
HASH = PasswordHasher().hash(PASSWORD)


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """SQLite only: these limits do not depend on the storage engine."""
    return f"sqlite+aiosqlite:///{tmp_path / 'mailgate.db'}"


def _config(tmp_path: Path, db_url: str, limits: dict[str, Any] | None = None) -> Config:
    data = config_dict(tmp_path, db_url)
    data["tenants"][0]["agents"] = [{"login": "anna@acme.test", "password_hash": HASH}]
    data["limits"] = limits or {}
    return parse_config(data)


@contextlib.asynccontextmanager
async def _smtp(config: Config, *, auth: bool = False) -> AsyncIterator[tuple[RelayServer, Database]]:
    db, blobs = await open_store(config)
    authenticator = Authenticator(lambda: config, db, failure_delay=0.01) if auth else None
    server = RelayServer(lambda: config, Pipeline(db, blobs), auth=authenticator)
    await server.start("127.0.0.1", 0)
    try:
        yield server, db
    finally:
        await server.stop(grace=1)
        await db.close()


@contextlib.asynccontextmanager
async def _imap(config: Config) -> AsyncIterator[IMAPServer]:
    db, blobs = await open_store(config)
    server = IMAPServer(lambda: config, db, blobs, Authenticator(lambda: config, db), Changes())
    await server.start("127.0.0.1", 0)
    try:
        yield server
    finally:
        await server.stop()
        await db.close()


def _connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.settimeout(10)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def _line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


# --------------------------------------------------------------------------- pure


@pytest.mark.parametrize(
    ("ip", "net"),
    [
        ("192.0.2.17", "192.0.2.0/24"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("::ffff:192.0.2.200", "192.0.2.0/24"),
        ("fe80::1%eth0", "fe80::/64"),
        ("unknown", "unknown"),
    ],
)
def test_network_of_a_client(ip: str, net: str) -> None:
    assert network(ip) == net


# --------------------------------------------------------------------------- defect 4


def _vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_defect4_unauthenticated_literals_cannot_exhaust_memory(tmp_path: Path) -> None:
    """20 clients announcing a 45 MB LOGIN literal and sending 10 MB each: the daemon grows < 20 MB."""
    imap_port, smtp_port = free_port(), free_port()
    config = tmp_path / "mailgate.toml"
    config.write_text(
        f'[gateway]\nhostname = "mx.test"\ndata_dir = "{tmp_path / "var"}"\n'
        f'[listen]\nsmtp = "127.0.0.1:{smtp_port}"\nimap = "127.0.0.1:{imap_port}"\n'
        '[[tenants]]\nid = "acme"\ndomains = ["acme.test"]\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "-c", str(config), "run"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", imap_port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the daemon did not listen"
                time.sleep(0.05)
        before = _vm_hwm(proc.pid)
        socks = [_connect(imap_port) for _ in range(20)]
        chunk = b"x" * 65536
        for sock in socks:
            assert _line(sock).startswith(b"* OK")
            sock.sendall(b"a LOGIN {45000000+}\r\n")
        for _ in range(160):  # 10 MiB per client, interleaved
            for sock in socks:
                with contextlib.suppress(OSError):
                    sock.sendall(chunk)
        for sock in socks:
            with contextlib.suppress(OSError):
                assert b"BYE" in _line(sock)
            sock.close()
        grown = _vm_hwm(proc.pid) - before
        assert grown < 20 * 2**20, f"VmHWM grew by {grown / 2**20:.1f} MiB"
    finally:
        proc.kill()
        proc.wait()


async def test_defect4_synchronising_literal_before_login_is_refused(tmp_path: Path, db_url: str) -> None:
    config = _config(tmp_path, db_url, {"imap": {"unauthenticated_literal": "1 KiB"}})
    async with _imap(config) as server:

        def scenario() -> list[bytes]:
            with _connect(server.port) as sock:
                _line(sock)
                sock.sendall(b"a LOGIN {2000}\r\n")
                refused = _line(sock)
                sock.sendall(b"b LOGIN {6}\r\n")
                go_on = _line(sock)
                sock.sendall(b"anna@x wrong\r\n")
                return [refused, go_on, _line(sock)]

        refused, go_on, answer = await asyncio.to_thread(scenario)
        assert refused.startswith(b"* BAD [TOOBIG]") or refused.startswith(b"a BAD"), refused
        assert go_on.startswith(b"+"), go_on
        assert answer.startswith(b"b NO"), answer


async def test_defect4_imap_connections_are_capped_per_address(tmp_path: Path, db_url: str) -> None:
    config = _config(tmp_path, db_url, {"imap": {"per_ip": 3}})
    async with _imap(config) as server:

        def scenario() -> tuple[list[bytes], bytes]:
            held = [_connect(server.port) for _ in range(3)]
            greetings = [_line(s) for s in held]
            with _connect(server.port) as extra:
                refused = _line(extra)
            with _connect(server.port, "127.0.0.2") as other:
                greetings.append(_line(other))
            for s in held:
                s.close()
            return greetings, refused

        greetings, refused = await asyncio.to_thread(scenario)
        assert all(g.startswith(b"* OK") for g in greetings), greetings
        assert refused.startswith(b"* BYE too many connections"), refused


async def test_defect4_metrics_listener_is_capped_and_requests_are_timed(tmp_path: Path, db_url: str) -> None:
    """The metrics listener too: connections per address are capped, and a request trickled
    line by line (each line within the old per-line timeout) is cut at the request's deadline."""
    config = _config(tmp_path, db_url, {"http": {"per_ip": 2, "timeout": "1s"}})
    db, _ = await open_store(config)
    gate = ConnectionGate(lambda: config.limits.http, "metrics")
    server = MetricsServer(DatabaseCollector(lambda: config, db), gate)
    await server.start("127.0.0.1", 0)
    try:

        def scenario() -> tuple[bytes, bytes, float]:
            with _connect(server.port) as slow, _connect(server.port):
                time.sleep(0.2)
                with _connect(server.port) as third:
                    refused = third.recv(100)
                started = time.monotonic()
                slow.sendall(b"GET /healthz HTTP/1.1\r\n")
                cut = b""
                with contextlib.suppress(OSError):
                    for _ in range(50):
                        slow.sendall(b"X-Slow: 1\r\n")
                        time.sleep(0.2)
                    cut = slow.recv(100)
                return refused, cut, time.monotonic() - started

        refused, cut, took = await asyncio.to_thread(scenario)
        assert refused == b""  # closed at once: over the per-address cap
        assert cut == b""
        assert took < 5  # cut at the 1 s deadline; 50 lines take 10 s
    finally:
        await server.stop()
        await db.close()


# --------------------------------------------------------------------------- defect 5


async def _parallel(calls: list[tuple[Any, ...]]) -> list[Any]:
    """Run blocking client calls at once, on threads of their own (not the loop's default pool,
    which the server's own password checks need)."""
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(len(calls)) as pool:
        return list(await asyncio.gather(*(loop.run_in_executor(pool, *call) for call in calls)))


def _auth_plain(port: int, password: str, source: str = "127.0.0.1") -> int:
    with smtplib.SMTP(timeout=60, source_address=(source, 0)) as c:
        c.connect("127.0.0.1", port)
        c.ehlo("client.test")
        token = base64.b64encode(f"\0anna@acme.test\0{password}".encode()).decode()
        code, _ = c.docmd("AUTH", "PLAIN " + token)
        return code


async def test_defect5_parallel_wrong_auth_runs_at_most_the_limit_of_checks(
    tmp_path: Path, db_url: str
) -> None:
    config = _config(tmp_path, db_url, {"auth": {"concurrent_checks": 2}})
    async with _smtp(config, auth=True) as (server, _):
        before = metrics.AUTH_CHECKS._value.get()
        codes = await _parallel([(_auth_plain, server.port, "wrong")] * 40)
        checks = metrics.AUTH_CHECKS._value.get() - before
        assert set(codes) == {535}, codes
        assert checks <= config.limits.auth.max_failures, f"{checks} password checks for 40 attempts"


async def test_defect5_global_check_budget_refuses_at_once_when_full(tmp_path: Path, db_url: str) -> None:
    """Attempts from rotating addresses wait for at most ``queue`` places, then get 454 unchecked."""
    config = _config(tmp_path, db_url, {"auth": {"concurrent_checks": 1, "queue": 2}})
    async with _smtp(config, auth=True) as (server, _):
        before = metrics.AUTH_CHECKS._value.get()
        sources = [f"127.0.{n}.1" for n in range(1, 13)]
        codes = await _parallel([(_auth_plain, server.port, "wrong", s) for s in sources])
        checks = metrics.AUTH_CHECKS._value.get() - before
        assert 454 in codes, codes
        assert set(codes) <= {454, 535}, codes
        assert checks == codes.count(535) < len(sources)


# --------------------------------------------------------------------------- defect 6


@contextlib.contextmanager
def _hold(port: int, sources: list[str], per_source: int) -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    try:
        for source in sources:
            for _ in range(per_source):
                with contextlib.suppress(OSError):
                    socks.append(_connect(port, source))
        yield socks
    finally:
        for s in socks:
            s.close()


async def test_defect6_idle_connections_from_few_addresses_cannot_lock_port_25(
    tmp_path: Path, db_url: str
) -> None:
    """12 addresses x 50 idle connections against the default caps: a new sender still gets 220."""
    config = _config(tmp_path, db_url)
    async with _smtp(config) as (server, _):

        def scenario() -> bytes:
            sources = [f"127.0.{n}.1" for n in range(1, 13)]
            with _hold(server.port, sources, 50):
                time.sleep(1.5)  # they are idle now
                with _connect(server.port, "127.0.99.1") as newcomer:
                    return _line(newcomer)

        banner = await asyncio.to_thread(scenario)
        assert banner.startswith(b"220 "), banner


async def test_defect6_connections_are_capped_per_network(tmp_path: Path, db_url: str) -> None:
    config = _config(tmp_path, db_url, {"smtp": {"per_network": 3}})
    async with _smtp(config) as (server, _):

        def scenario() -> tuple[bytes, bytes, bytes]:
            with _hold(server.port, ["127.0.5.1", "127.0.5.2", "127.0.5.3"], 1) as held:
                for s in held:
                    _line(s)
                    s.sendall(b"MAIL FROM:<a@example.org>\r\n")  # busy: not to be closed for room
                    _line(s)
                with _connect(server.port, "127.0.5.4") as same_net:
                    refused = _line(same_net)
                with _connect(server.port, "127.0.6.1") as other_net:
                    other = _line(other_net)
            time.sleep(0.5)  # the listener sees them close
            with _hold(server.port, ["127.0.5.1", "127.0.5.2", "127.0.5.3"], 1):
                time.sleep(1.5)
                with _connect(server.port, "127.0.5.4") as same_net:
                    admitted = _line(same_net)
            return refused, other, admitted

        refused, other, admitted = await asyncio.to_thread(scenario)
        assert refused.startswith(b"421 4.7.0"), refused
        assert other.startswith(b"220 "), other
        assert admitted.startswith(b"220 "), admitted  # an idle one was closed to make room


async def test_defect6_stress_cuts_the_idle_timeout_before_mail(tmp_path: Path, db_url: str) -> None:
    limits = {"smtp": {"connections": 10, "stress_at": 0.5, "stress_timeout": "1s"}}
    config = _config(tmp_path, db_url, limits)
    async with _smtp(config) as (server, _):

        def scenario() -> tuple[bytes, bytes]:
            with _connect(server.port) as busy, _hold(server.port, ["127.0.0.1"], 5) as idle:
                _line(busy)
                busy.sendall(b"EHLO client.test\r\nMAIL FROM:<a@example.org>\r\n")
                while not _line(busy).startswith(b"250 2.1.0"):
                    pass
                for s in idle:
                    _line(s)
                closed = idle[0].recv(100)  # EOF once the short idle timeout passes
                busy.sendall(b"NOOP\r\n")
                return closed, _line(busy)

        closed, alive = await asyncio.to_thread(scenario)
        assert closed == b"", closed
        assert alive.startswith(b"250"), alive

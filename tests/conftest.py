"""Shared fixtures: databases (SQLite and PostgreSQL), configs, real peers."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from email import message_from_bytes
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from gateway.config import Config, parse_config
from gateway.daemon import open_store
from storage.blobs import BlobStore
from storage.db import Database
from tests.dovecot import dovecot  # noqa: F401 (fixture: a private Dovecot per test)

REQUIRE_PEERS = os.environ.get("MAILGATE_REQUIRE_PEERS") == "1"
PG_DSN = os.environ.get("MAILGATE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REPO = Path(__file__).resolve().parent.parent
EXAMPLE_CONFIG = REPO / "config" / "mailgate.example.toml"
# Well-known Debian locations of peers that are not on a normal user's PATH.
_SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")


def missing_peer(reason: str) -> None:
    """Skip the test, or fail it when CI requires every real peer."""
    if REQUIRE_PEERS:
        pytest.fail(f"required peer missing: {reason}")
    pytest.skip(reason)


def peer(name: str) -> str:
    """Path of a peer executable (swaks, smtp-sink, ...), or skip/fail."""
    found = shutil.which(name) or next(
        (f"{d}/{name}" for d in _SBIN if os.access(f"{d}/{name}", os.X_OK)), None
    )
    if found is None:
        missing_peer(f"{name} is not installed (make peers installs it)")
    assert found is not None
    return found


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- databases


@pytest.fixture(params=["sqlite", "postgresql"])
async def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh, empty database URL: every storage test runs on both engines."""
    async with new_database(request.param, tmp_path / "mailgate.db") as url:
        yield url


@asynccontextmanager
async def new_database(engine: str, sqlite_path: Path) -> AsyncIterator[str]:
    """An empty database on ``engine`` ("sqlite": the file ``sqlite_path``), dropped afterwards."""
    if engine == "sqlite":
        yield f"sqlite+aiosqlite:///{sqlite_path}"
        return
    name = f"mailgate_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = await asyncpg.connect(PG_DSN, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        missing_peer(f"PostgreSQL at {PG_DSN} is not reachable: {exc}")
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def config_dict(tmp_path: Path, db_url: str = "", **tenant: Any) -> dict[str, Any]:
    """A small valid configuration as data: tenant ``acme`` at acme.test, one rule."""
    t: dict[str, Any] = {
        "id": "acme",
        "name": "ACME",
        "domains": ["acme.test"],
        "agents": [{"login": "anna@acme.test", "name": "Anna", "password_hash": "$argon2id$v=19$x"}],
        "folders": [{"name": "Orders", "quota": "500 MB"}],
        "rules": [
            {
                "name": "orders",
                "conditions": [{"field": "subject", "op": "contains", "value": "zamówienie"}],
                "actions": [{"folder": "Orders"}, {"label": "Orders"}],
                "stop": True,
            }
        ],
    }
    t.update(tenant)
    return {
        "gateway": {"hostname": "mx.test", "data_dir": str(tmp_path / "var"), "database_url": db_url},
        "listen": {"smtp": "127.0.0.1:0"},
        "tenants": [t, {"id": "beta", "domains": ["beta.test"], "addresses": ["only@beta.test"]}],
    }


@pytest.fixture
def config(tmp_path: Path, db_url: str) -> Config:
    """The small configuration on the test's database."""
    return parse_config(config_dict(tmp_path, db_url))


@pytest.fixture
async def store(config: Config) -> AsyncIterator[tuple[Database, BlobStore]]:
    """Migrated database with the config's tenants synchronised, and a blob store."""
    db, blobs = await open_store(config)
    yield db, blobs
    await db.close()


# --------------------------------------------------------------------------- smtp-sink


class Sink:
    """Postfix smtp-sink on 127.0.0.1:``port``, each message captured to a file in ``dump``."""

    def __init__(self, port: int, dump: Path) -> None:
        self.port, self.dump = port, dump
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *options: str) -> None:
        cmd = [peer("smtp-sink")]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]  # smtp-sink refuses to run as root without it
        cmd += ["-d", f"{self.dump}/msg.", *options, f"127.0.0.1:{self.port}", "64"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"smtp-sink exited with {self.proc.returncode}"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            except OSError:
                time.sleep(0.05)
            else:
                return
        pytest.fail(f"smtp-sink did not listen on {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def captured(self) -> list[bytes]:
        return [p.read_bytes() for p in sorted(self.dump.iterdir())]

    def message_ids(self) -> Counter[str]:
        ids: Counter[str] = Counter()
        for raw in self.captured():
            ids[str(message_from_bytes(raw).get("Message-ID", "")).strip()] += 1
        return ids


@pytest.fixture
def sink() -> Iterator[Sink]:
    peer("smtp-sink")
    # smtp-sink drops to "nobody" (as root), which cannot enter pytest's private tmp_path.
    dump = Path(tempfile.mkdtemp(prefix="mailgate-sink-"))
    dump.chmod(0o777)
    s = Sink(free_port(), dump)
    yield s
    s.stop()
    shutil.rmtree(dump, ignore_errors=True)

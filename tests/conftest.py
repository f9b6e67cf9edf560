"""Shared fixtures: databases (SQLite, PostgreSQL), blob stores (fs, PostgreSQL, S3), configs, real peers."""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import socket
import subprocess
import sys
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

from gateway.blobs import blob_store
from gateway.config import Config, parse_config
from gateway.daemon import open_store
from storage.blobs import BACKENDS, BlobStore
from storage.db import Database
from storage.migrate import migrate
from tests.dovecot import dovecot  # noqa: F401 (fixture: a private Dovecot per test)
from tests.rspamd import rspamd  # noqa: F401 (fixture: a private rspamd per test module)

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
    """A currently free TCP port on 127.0.0.1, below the kernel's ephemeral range.

    A port the kernel hands out (bind to 0) may be given again to an outgoing
    connection (a database pool, an SMTP client) before the daemon that is to
    listen on it binds: "address already in use" (seen in CI). Ports under
    ``ip_local_port_range`` are never picked for outgoing connections.
    """
    for _ in range(200):
        port = random.randint(20000, 32000)
        if port in _HANDED_OUT:  # one test asks for several before any is bound
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.append(port)
        del _HANDED_OUT[:-64]
        return port
    raise RuntimeError("no free port in 20000-32000")


_HANDED_OUT: list[int] = []


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
def config(tmp_path: Path, db_url: str, blobs_section: dict[str, Any]) -> Config:
    """The small configuration on the test's database and blob backend."""
    return parse_config({**config_dict(tmp_path, db_url), "blobs": blobs_section})


@pytest.fixture
async def store(config: Config) -> AsyncIterator[tuple[Database, BlobStore]]:
    """Migrated database with the config's tenants synchronised, and a blob store."""
    db, blobs = await open_store(config)
    yield db, blobs
    await blobs.close()
    await db.close()


# --------------------------------------------------------------------------- blob stores

# A test (or module: pytestmark) marked so runs on each blob backend; others on "fs".
on_every_blob_backend = pytest.mark.parametrize("blob_backend", BACKENDS, indirect=True)


@pytest.fixture
def blob_backend(request: pytest.FixtureRequest) -> str:
    """The test's ``[blobs] backend``: "fs" unless the test runs ``on_every_blob_backend``."""
    return str(getattr(request, "param", "fs"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Blobs in PostgreSQL need a PostgreSQL database: their SQLite cases are not run."""
    keep, drop = [], []
    for item in items:
        params = (
            item.callspec.params if isinstance(item, pytest.Function) and hasattr(item, "callspec") else {}
        )
        impossible = params.get("blob_backend") == "postgresql" and params.get("db_url") == "sqlite"
        (drop if impossible else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 and a free port, for the whole session: its endpoint URL."""
    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("flask") is None:
        missing_peer("moto[server] is not installed (pip install -e '.[test]')")
    port = free_port()
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, f"moto's server exited with {proc.returncode}"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"moto's S3 server did not listen on {port}")
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


async def s3_bucket(endpoint: str, directory: Path) -> dict[str, Any]:
    """A new bucket on the S3 server at ``endpoint``: the ``[blobs]`` keys for it (keys in files)."""
    from aiobotocore.session import get_session

    (directory / "s3-access").write_text("mailgate-test\n")
    (directory / "s3-secret").write_text("mailgate-test-secret\n")
    bucket = f"mailgate-{uuid.uuid4().hex[:12]}"
    async with get_session().create_client(
        "s3",
        region_name="us-east-1",
        endpoint_url=endpoint,
        aws_access_key_id="mailgate-test",
        aws_secret_access_key="mailgate-test-secret",
    ) as client:
        await client.create_bucket(Bucket=bucket)
    return {
        "s3_endpoint": endpoint,
        "s3_bucket": bucket,
        "s3_region": "us-east-1",
        "s3_access_key_file": str(directory / "s3-access"),
        "s3_secret_key_file": str(directory / "s3-secret"),
    }


@pytest.fixture
async def blobs_section(request: pytest.FixtureRequest, blob_backend: str, tmp_path: Path) -> dict[str, Any]:
    """The ``[blobs]`` section for the test's backend; for "s3" a fresh bucket on the session's server."""
    if blob_backend != "s3":
        return {"backend": blob_backend}
    return {"backend": "s3", **await s3_bucket(request.getfixturevalue("s3_server"), tmp_path)}


@pytest.fixture
async def blobs(blob_backend: str, blobs_section: dict[str, Any], tmp_path: Path) -> AsyncIterator[BlobStore]:
    """A bare blob store on the test's backend (for "postgresql", in a fresh migrated database)."""
    engine = "postgresql" if blob_backend == "postgresql" else "sqlite"
    async with new_database(engine, tmp_path / "blobs.db") as url:
        gateway = {"data_dir": str(tmp_path / "var"), "database_url": url}
        db = Database(url)
        if blob_backend == "postgresql":
            await migrate(db)
        store = blob_store(parse_config({"gateway": gateway, "blobs": blobs_section}), db, blob_backend)
        try:
            yield store
        finally:
            await store.close()
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

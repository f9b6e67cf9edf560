"""Issue #10, defect 7: the upstream puller must back off per folder, not hammer the provider.

Logins are counted in Dovecot's own log; the puller runs on a virtual clock
(:class:`FakeTime`), so fifteen minutes pass in a moment and no test depends
on how fast this machine is.
"""

from __future__ import annotations

import asyncio
import imaplib
import json
import random
import subprocess
import sys
import time as wallclock
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher
from sqlalchemy import func, select

from gateway.auth import Authenticator
from gateway.config import Config, load_config
from gateway.daemon import open_store
from gateway.imap.server import IMAPServer
from gateway.ingest import Delivery, Pipeline
from gateway.notify import Changes
from gateway.pull.manager import PullManager
from gateway.pull.puller import BACKOFF_FIRST, BACKOFF_MAX, FolderPuller, HostLimits, jobs
from gateway.tenants import apply
from storage.blobs import BlobStore
from storage.db import Database
from storage.models import Message
from tests import corpus
from tests.conftest import free_port
from tests.daemon import write_config
from tests.dovecot import Dovecot
from tests.test_pull_daemon import mailbox_toml

PASSWORD = "upstream-secret"
AGENT_PASSWORD = "agent-password"
AGENT_HASH = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash(AGENT_PASSWORD)
EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
FIFTEEN_MINUTES = 15 * 60.0
GUARD = 120  # seconds of real time before a broken test gives up instead of hanging
pytestmark = pytest.mark.peers


class FakeTime:
    """A virtual clock: a sleep within ``limit`` passes at once; one beyond it parks until
    :meth:`run_until` moves the limit past its end."""

    def __init__(self) -> None:
        self.now = 0.0
        self.limit = 0.0
        self.sleeps: list[float] = []
        self.parks = 0
        self._cond = asyncio.Condition()

    def wall(self) -> datetime:
        return EPOCH + timedelta(seconds=self.now)

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        async with self._cond:
            while self.now + seconds > self.limit:
                self.parks += 1
                self._cond.notify_all()
                await self._cond.wait()
            self.now += seconds

    async def run_until(self, limit: float) -> None:
        """Let virtual time pass up to ``limit``; return once a sleeper parks beyond it."""
        async with self._cond:
            self.limit = limit
            seen = self.parks
            self._cond.notify_all()
            await asyncio.wait_for(self._cond.wait_for(lambda: self.parks > seen), GUARD)

    async def parked_again(self, seen: int) -> None:
        """Return once a sleeper parks (again) after ``seen`` parks."""
        async with self._cond:
            await asyncio.wait_for(self._cond.wait_for(lambda: self.parks > seen), GUARD)


class Gate:
    """The gateway's store and configuration (a real TOML file), pulling from Dovecot."""

    def __init__(self, path: Path, config: Config, db: Database, blobs: BlobStore) -> None:
        self.path, self.config, self.db, self.blobs = path, config, db, blobs
        self.changes = Changes()
        self.pipeline = Pipeline(db, blobs, changes=self.changes)

    def puller(self, time: FakeTime, folder: str = "INBOX") -> FolderPuller:
        (job,) = [j for j in jobs(self.config) if j.folder == folder]
        return FolderPuller(
            job,
            lambda: self.config,
            self.pipeline,
            self.db,
            HostLimits(),
            clock=time.wall,
            sleep=time.sleep,
            rng=random.Random(10),
        )

    async def count(self) -> int:
        async with self.db.read() as s:
            return int(await s.scalar(select(func.count()).select_from(Message)) or 0)

    def mailboxes(self) -> dict[str, dict[str, Any]]:
        """``mailgate mailboxes --format json``, run for real."""
        out = subprocess.run(
            [sys.executable, "-m", "gateway", "-c", str(self.path), "mailboxes", "--format", "json"],
            capture_output=True,
            check=True,
            timeout=60,
        )
        return {r["name"]: r for r in json.loads(out.stdout)}


@pytest.fixture
async def gate(
    tmp_path: Path, db_url: str, dovecot: Dovecot, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Any]:
    monkeypatch.setenv("MAILGATE_TEST_UPSTREAM", PASSWORD)
    dovecot.add_user("biuro", PASSWORD)
    opened: list[Gate] = []

    async def make(tenant: str = "", folders: str = "", after_fetch: str = "keep") -> Gate:
        extra = tenant + mailbox_toml("biuro", dovecot.port, idle=False, after_fetch=after_fetch) + folders
        path = write_config(tmp_path, db_url, free_port(), extra)
        config = load_config(path)
        db, blobs = await open_store(config)
        opened.append(Gate(path, config, db, blobs))
        return opened[-1]

    yield make
    for g in opened:
        await g.db.close()


def logins(dovecot: Dovecot, user: str) -> int:
    """Logins of ``user`` that Dovecot has logged, once every earlier one is in the log."""
    # Dovecot's processes log through its log service: a login of our own,
    # made after the ones counted, shows that those are written.
    dovecot.add_user("sentinel", PASSWORD)
    seen = dovecot.log_path.read_text().count("Login: user=<sentinel>")
    dovecot.exists("sentinel")
    deadline = wallclock.monotonic() + GUARD
    while dovecot.log_path.read_text().count("Login: user=<sentinel>") == seen:
        assert wallclock.monotonic() < deadline, "Dovecot did not log a login"
        wallclock.sleep(0.01)
    return dovecot.log_path.read_text().count(f"Login: user=<{user}>")


async def run_for(puller: FolderPuller, time: FakeTime, seconds: float) -> None:
    task = asyncio.create_task(puller.run())
    try:
        await time.run_until(seconds)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def next_attempt(row: dict[str, Any]) -> datetime:
    assert row["next_attempt"], row
    return datetime.fromisoformat(row["next_attempt"])


async def test_over_quota_folder_backs_off(gate: Any, dovecot: Dovecot) -> None:
    dovecot.deliver_files("biuro", "INBOX", corpus.normal(5, size=100_000, seed=5))
    g = await gate(tenant='quota = "50 KB"\n', after_fetch="delete")
    time = FakeTime()
    before = logins(dovecot, "biuro")

    await run_for(g.puller(time), time, FIFTEEN_MINUTES)

    assert 1 <= logins(dovecot, "biuro") - before <= 10
    assert dovecot.exists("biuro") == 5  # all of it still waits upstream
    assert await g.count() == 0
    row = g.mailboxes()["biuro"]
    assert row["state"] == "over_quota"
    assert row["last_error"].startswith("INBOX: over quota (tenant 'acme' quota exceeded")
    # The attempt parked beyond the fifteen minutes is the one shown, at most the cap away.
    assert EPOCH + timedelta(seconds=FIFTEEN_MINUTES) < next_attempt(row)
    assert next_attempt(row) <= EPOCH + timedelta(seconds=FIFTEEN_MINUTES + BACKOFF_MAX)


async def test_missing_upstream_folder_backs_off(gate: Any, dovecot: Dovecot) -> None:
    g = await gate(folders='[tenants.mailboxes.folders]\nArchive2 = "INBOX"\n')
    time = FakeTime()
    before = logins(dovecot, "biuro")

    await run_for(g.puller(time, "Archive2"), time, FIFTEEN_MINUTES)

    assert 1 <= logins(dovecot, "biuro") - before <= 10
    # Each wait about doubles (jitter takes up to half off), up to the cap.
    assert all(b >= a / 2 for a, b in zip(time.sleeps, time.sleeps[1:], strict=False))
    assert max(time.sleeps) <= BACKOFF_MAX
    row = g.mailboxes()["biuro"]
    assert row["state"] == "error"
    assert row["last_error"].startswith("Archive2: SELECT Archive2 refused: ")
    assert "exist" in row["last_error"]
    assert EPOCH + timedelta(seconds=FIFTEEN_MINUTES) < next_attempt(row)


async def test_successful_pass_resets_backoff(gate: Any, dovecot: Dovecot) -> None:
    g = await gate(folders='[tenants.mailboxes.folders]\nArchive2 = "INBOX"\n')
    time = FakeTime()
    task = asyncio.create_task(g.puller(time, "Archive2").run())
    try:
        await time.run_until(60)  # the folder is missing: the waits grow
        assert time.sleeps[-1] > BACKOFF_FIRST
        dovecot.append("biuro", "Archive2", corpus.normal(1, seed=3)[0])
        # The pending wait ends, the pass completes, the poll interval parks.
        await time.run_until(time.now + time.sleeps[-1])
        assert await g.count() == 1
        row = g.mailboxes()["biuro"]
        assert (row["state"], row["next_attempt"]) == ("ok", None)
        with dovecot.connect("biuro") as c:
            assert c.delete('"Archive2"')[0] == "OK"
        await time.run_until(time.now + 60)  # the next poll fails
        assert time.sleeps[-1] <= BACKOFF_FIRST  # back to the first step, not where it had grown to
        assert g.mailboxes()["biuro"]["state"] == "error"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


AGENT_TOML = f"""
quota = "300 KB"
[[tenants.agents]]
login = "anna@acme.test"
password_hash = "{AGENT_HASH}"
"""


def expunge_everything(port: int) -> None:
    """An agent deletes the tenant's mail over our own IMAP server."""
    c = imaplib.IMAP4("127.0.0.1", port, timeout=10)
    try:
        c.login("anna@acme.test", AGENT_PASSWORD)
        c.select("INBOX")
        c.store("1:*", "+FLAGS", "(\\Deleted)")
        assert c.expunge()[0] == "OK"
    finally:
        c.logout()


@pytest.mark.parametrize("change", ["expunge", "reload"])
async def test_quota_change_wakes_waiting_folder(gate: Any, dovecot: Dovecot, change: str) -> None:
    dovecot.deliver_files("biuro", "INBOX", corpus.normal(2, size=100_000, seed=6))
    g = await gate(tenant=AGENT_TOML, after_fetch="delete")
    filler = b"Subject: filler\r\nMessage-ID: <filler@x>\r\n\r\n" + b"y" * 76 * 3000 + b"\r\n"
    await g.pipeline.deliver(g.config.tenant("acme"), filler, Delivery(source="smtp"))
    time = FakeTime()
    auth = Authenticator(lambda: g.config, g.db, failure_delay=0.05)
    imap = IMAPServer(lambda: g.config, g.db, g.blobs, auth, g.changes)
    await imap.start("127.0.0.1", 0)
    manager = PullManager(lambda: g.config, g.pipeline, g.db, sleep=time.sleep)
    try:
        manager.apply(g.config)
        await time.run_until(0)  # over quota: waiting up to the cap
        assert g.mailboxes()["biuro"]["state"] == "over_quota"
        assert dovecot.exists("biuro") == 2
        seen = time.parks
        if change == "expunge":
            await asyncio.to_thread(expunge_everything, imap.port)
        else:
            g.path.write_text(g.path.read_text().replace('quota = "300 KB"', 'quota = "10 MB"'))
            new = load_config(g.path)
            await apply(g.db, new)  # what the daemon's reload does
            g.config = new
            manager.apply(new)
        await time.parked_again(seen)  # after the pass, at the poll interval
        assert time.now == 0  # not a moment of the backoff passed
        assert dovecot.exists("biuro") == 0
        assert await g.count() == (2 if change == "expunge" else 3)
        assert g.mailboxes()["biuro"]["state"] == "ok"
    finally:
        await manager.stop()
        await imap.stop()


async def test_partly_waiting_folder_keeps_polling_and_wakes_on_room(gate: Any, dovecot: Dovecot) -> None:
    """Issue #11: a pass that stored some mail while a bigger message waits is a success, not a backoff."""
    big = corpus.normal(1, size=200_000, seed=7)
    dovecot.deliver_files("biuro", "INBOX", big + corpus.normal(3, size=10_000, seed=8))
    g = await gate(tenant=AGENT_TOML, after_fetch="delete")
    filler = b"Subject: filler\r\nMessage-ID: <filler@x>\r\n\r\n" + b"y" * 76 * 3000 + b"\r\n"
    await g.pipeline.deliver(g.config.tenant("acme"), filler, Delivery(source="smtp"))
    time = FakeTime()
    auth = Authenticator(lambda: g.config, g.db, failure_delay=0.05)
    imap = IMAPServer(lambda: g.config, g.db, g.blobs, auth, g.changes)
    await imap.start("127.0.0.1", 0)
    manager = PullManager(lambda: g.config, g.pipeline, g.db, sleep=time.sleep)
    try:
        manager.apply(g.config)
        await time.run_until(0)  # the three small ones are in; the big one waits
        assert await g.count() == 4
        assert dovecot.exists("biuro") == 1
        row = g.mailboxes()["biuro"]
        assert (row["state"], row["next_attempt"]) == ("ok", None)
        assert time.sleeps[-1] == g.config.tenant("acme").mailboxes[0].poll_interval.total_seconds()
        seen = time.parks
        await asyncio.to_thread(expunge_everything, imap.port)
        await time.parked_again(seen)
        assert time.now == 0  # woken by the room, not by the poll interval
        assert dovecot.exists("biuro") == 0
        assert await g.count() == 1
    finally:
        await manager.stop()
        await imap.stop()

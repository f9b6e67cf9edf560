"""The per-account connection budget: 30 upstream folders with ``max_connections = 5`` never hold
more than 5 connections at the server (``doveadm who``), and mail in any folder is pulled within
about the poll interval."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from gateway.config import MailboxSection, parse_config
from gateway.daemon import open_store
from gateway.ingest import Pipeline
from gateway.pull.puller import FolderPuller, HostLimits, jobs, polled
from storage.models import Message
from tests.conftest import config_dict, peer
from tests.dovecot import Dovecot

PASSWORD = "upstream-secret"
POLL = 2.0
pytestmark = pytest.mark.peers


def connections(dovecot: Dovecot, user: str) -> int:
    """The user's IMAP connections Dovecot counts now (one line each with ``who -1``)."""
    out = subprocess.run(
        [peer("doveadm"), "-c", str(dovecot.conf_path), "who", "-1", user],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return sum(1 for line in out.stdout.splitlines() if line.split()[:1] == [user])


class Sampler(threading.Thread):
    """Counts the user's connections every 50 ms until stopped; keeps the highest count."""

    def __init__(self, dovecot: Dovecot, user: str) -> None:
        super().__init__(daemon=True)
        self.dovecot, self.user = dovecot, user
        self.highest, self.samples = 0, 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.highest = max(self.highest, connections(self.dovecot, self.user))
            self.samples += 1
            self.done.wait(0.05)


async def test_thirty_folders_within_five_connections(
    tmp_path: Path, db_url: str, dovecot: Dovecot, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAILGATE_TEST_UPSTREAM", PASSWORD)
    dovecot.add_user("biuro", PASSWORD)
    names = ["INBOX", *(f"F{i:02d}" for i in range(1, 30))]
    with dovecot.connect("biuro") as c:
        for name in names[1:]:
            dovecot._create(c, name)
    box = dovecot.mailbox(
        "biuro",
        folders=dict.fromkeys(names, "INBOX"),
        poll_interval=f"{POLL:g}s",
        max_connections=5,
        idle=True,  # the folders with a connection of their own IDLE; the rest are polled
    )
    config = parse_config(config_dict(tmp_path, db_url, mailboxes=[box]))
    db, blobs = await open_store(config)
    pipeline, limits = Pipeline(db, blobs), HostLimits()
    all_jobs = list(jobs(config))
    assert sum(not polled(j) for j in all_jobs) == 4  # INBOX, F01..F03 IDLE; 26 share one
    sampler = Sampler(dovecot, "biuro")
    sampler.start()
    tasks = [
        asyncio.create_task(FolderPuller(j, lambda: config, pipeline, db, limits).run()) for j in all_jobs
    ]

    async def stored() -> int:
        async with db.read() as s:
            return int(await s.scalar(select(func.count()).select_from(Message)) or 0)

    try:
        await asyncio.sleep(3 * POLL)  # every folder had its first pass
        assert await stored() == 0
        delays = []
        for n, folder in enumerate(["F29", "INBOX", "F07", "F02", "F15"], 1):
            msg = f"Subject: {folder}\r\nMessage-ID: <{folder}@x>\r\n\r\n.\r\n".encode()
            await asyncio.to_thread(dovecot.deliver_files, "biuro", folder, [msg], sync=False)
            start = time.monotonic()
            while await stored() < n:
                assert time.monotonic() - start < 3 * POLL, f"{folder}: not pulled"
                await asyncio.sleep(0.02)
            delays.append(time.monotonic() - start)
        print(f"pulled after {[round(d, 2) for d in delays]} s; at most {sampler.highest} connections")
        assert max(delays) < POLL + 1.0
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await limits.close()
        sampler.done.set()
        sampler.join(10)
        await db.close()
    assert sampler.samples > 20
    assert 1 <= sampler.highest <= 5


@pytest.mark.parametrize(
    ("host", "given", "budget"),
    [
        ("imap.gmail.com", None, 10),
        ("outlook.office365.com", None, 15),
        ("imap.example.test", None, 5),
        ("imap.gmail.com", 3, 3),
    ],
)
def test_the_budget_defaults_by_provider(host: str, given: int | None, budget: int) -> None:
    box = {"name": "b", "host": host, "username": "u", "password_env": "P", "max_connections": given}
    assert MailboxSection.model_validate(box).effective_max_connections == budget

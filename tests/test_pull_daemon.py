"""Pulling inside the running daemon: IDLE, polling, kill -9, failing mailboxes."""

from __future__ import annotations

import asyncio
import random
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage import upstream
from storage.db import Database
from tests import corpus, procfs
from tests.conftest import free_port
from tests.daemon import Daemon, write_config
from tests.dovecot import Dovecot, dropping_proxy

PASSWORD = "upstream-secret"
ENV = {"MAILGATE_TEST_UPSTREAM": PASSWORD}
pytestmark = pytest.mark.peers


def mailbox_toml(name: str, port: int, *, user: str | None = None, **fields: object) -> str:
    lines = [
        "[[tenants.mailboxes]]",
        f'name = "{name}"',
        'host = "127.0.0.1"',
        f"port = {port}",
        'security = "none"',
        f'username = "{user or name}"',
        'password_env = "MAILGATE_TEST_UPSTREAM"',
    ]
    for key, value in fields.items():
        lines.append(f"{key} = {str(value).lower() if isinstance(value, bool) else repr(value)}")
    return "\n".join(lines).replace("'", '"') + "\n"


@pytest.fixture
def start(tmp_path: Path, db_url: str) -> Iterator[object]:
    daemons: list[Daemon] = []

    def run(extra: str) -> Daemon:
        port = free_port()
        d = Daemon(write_config(tmp_path, db_url, port, extra), port, tmp_path, env=ENV)
        d.start()
        daemons.append(d)
        return d

    yield run
    for d in daemons:
        d.stop()


def inbox(d: Daemon) -> int:
    return d.folders("acme").get("INBOX", 0)


def test_idle_delivers_a_new_upstream_message_within_two_seconds(start: object, dovecot: Dovecot) -> None:
    dovecot.add_user("biuro", PASSWORD)
    d = start(mailbox_toml("biuro", dovecot.port, idle=True))  # type: ignore[operator]
    d.wait_for("the IDLE state", lambda: d.mailboxes()["biuro"]["state"] == "idle", 20)
    dovecot.append("biuro", "INBOX", corpus.normal(1)[0])
    d.wait_for("the pushed message", lambda: inbox(d) == 1, 2.0)


def test_polling_delivers_within_one_poll_interval(start: object, dovecot: Dovecot) -> None:
    dovecot.add_user("biuro", PASSWORD)
    d = start(mailbox_toml("biuro", dovecot.port, idle=False, poll_interval="3s"))  # type: ignore[operator]
    d.wait_for("the first poll", lambda: d.mailboxes()["biuro"]["state"] == "ok", 20)
    dovecot.append("biuro", "INBOX", corpus.normal(1)[0])
    d.wait_for("the polled message", lambda: inbox(d) == 1, 3.0 + 1.0)


def message_ids(messages: list[bytes]) -> list[str]:
    out = []
    for m in messages:
        found = re.search(rb"^Message-I[dD]: (<[^>]+>)", m, re.MULTILINE)
        assert found is not None
        out.append(found.group(1).decode())
    return out


def run_until_stored(d: Daemon, target: int) -> None:
    """Start the daemon and wait until its log shows ``target`` messages stored in all."""
    d.start()
    d.wait_for(f"{target} messages stored", lambda: d.log.read_text().count("ingest.stored") >= target, 60)


def test_kill_9_during_a_pull_loses_and_duplicates_nothing(
    tmp_path: Path, db_url: str, dovecot: Dovecot
) -> None:
    total = 2000
    dovecot.add_user("biuro", PASSWORD)
    dovecot.deliver_files("biuro", "INBOX", corpus.normal(total, size=3000))
    everything = set(message_ids(dovecot.messages("biuro", "INBOX")))
    port = free_port()
    config = write_config(tmp_path, db_url, port, mailbox_toml("biuro", dovecot.port, after_fetch="delete"))
    d = Daemon(config, port, tmp_path, env=ENV)
    # Kill at random points of the pull: when the log shows that a random
    # number of messages more has been stored since the last kill.
    targets = sorted(random.Random(2026).sample(range(50, total - 50), 5))
    try:
        for target in targets:
            run_until_stored(d, target)
            d.signal(signal.SIGKILL)
            upstream_left = set(message_ids(dovecot.messages("biuro", "INBOX")))
            stored = inbox(d)
            # Mid-pull, and whatever left upstream had been stored first; nothing twice.
            assert 0 < stored < total
            assert stored >= len(everything - upstream_left)
        d.start()
        d.wait_for("the final pull", lambda: inbox(d) == total and dovecot.exists("biuro") == 0, 120)
        assert inbox(d) == total
        assert d.signal(signal.SIGTERM) == 0
    finally:
        d.stop()


def folder_last_uid(db_url: str, mailbox: str) -> int:
    """The last UID the daemon's database records for ``mailbox``'s INBOX (0: none yet)."""

    async def read() -> int:
        db = Database(db_url)
        try:
            async with db.read() as s:
                state = await upstream.folder_state(s, "acme", mailbox, "INBOX")
            return 0 if state is None else state.last_uid
        finally:
            await db.close()

    return asyncio.run(read())


def processes() -> dict[int, tuple[int, str]]:
    """Every live process: its parent and its state (Linux /proc)."""
    return {pid: (int(fields[1]), fields[0]) for pid, fields in procfs.stats()}


def children(pid: int) -> set[int]:
    return {p for p, (ppid, state) in processes().items() if ppid == pid and state != "Z"}


def alive(pids: set[int]) -> set[int]:
    return {p for p, (_, state) in processes().items() if p in pids and state != "Z"}


def test_kill_9_mid_pipeline_leaves_the_last_uid_on_the_last_committed_message(
    tmp_path: Path, db_url: str, dovecot: Dovecot
) -> None:
    """Batches overlap (fetch, prepare, commit); whenever the daemon is killed, what is stored is
    exactly UIDs 1..last UID: the last UID never passed an uncommitted message, nothing twice.
    The MIME process dies with the daemon."""
    total = 1500
    dovecot.add_user("biuro", PASSWORD)
    dovecot.deliver_files("biuro", "INBOX", corpus.normal(total, size=3000, seed=31))  # UIDs 1..total
    port = free_port()
    config = write_config(tmp_path, db_url, port, mailbox_toml("biuro", dovecot.port, after_fetch="keep"))
    d = Daemon(config, port, tmp_path, env=ENV)
    targets = sorted(random.Random(2027).sample(range(50, total - 50), 4))
    try:
        for target in targets:
            run_until_stored(d, target)
            assert d.proc is not None
            pid = d.proc.pid
            kids = children(pid)
            assert kids  # the MIME worker and blob writer processes (gateway.ingest.MimeWorker), at least
            d.signal(signal.SIGKILL)
            d.wait_for("the daemon's processes to die with it", lambda k=kids: not alive(k), 10)
            stored = inbox(d)
            assert 0 < stored < total
            assert folder_last_uid(db_url, "biuro") == stored
        d.start()
        d.wait_for("the final pull", lambda: inbox(d) == total, 120)
        assert folder_last_uid(db_url, "biuro") == total
        assert d.mailboxes()["biuro"]["messages_pulled"] == total
        assert d.signal(signal.SIGTERM) == 0
    finally:
        d.stop()


def test_failing_mailboxes_do_not_stop_the_others(start: object, dovecot: Dovecot) -> None:
    dovecot.add_user("good", PASSWORD)
    dovecot.add_user("badpass", "something-else")
    dovecot.add_user("dropped", PASSWORD)
    dovecot.deliver_files("good", "INBOX", corpus.normal(20, seed=1))
    dovecot.deliver_files("dropped", "INBOX", corpus.normal(200, size=5000, seed=2))
    with dropping_proxy(dovecot.port, drop_after_bytes=200_000) as proxy:
        extra = (
            mailbox_toml("good", dovecot.port, idle=True)
            + mailbox_toml("badpass", dovecot.port)
            + mailbox_toml("unreachable", free_port(), user="nobody")
            + mailbox_toml("dropped", proxy.port)
        )
        d = start(extra)  # type: ignore[operator]

        def settled() -> bool:
            boxes = d.mailboxes()
            return (
                boxes["badpass"]["state"] == "auth_failed"
                and boxes["unreachable"]["state"] == "error"
                and boxes["dropped"]["state"] == "error"
                and boxes["good"]["state"] == "idle"
            )

        d.wait_for("every mailbox's state", settled, 30)
        boxes = d.mailboxes()
        assert boxes["good"]["messages_pulled"] == 20
        assert "refused the login" in str(boxes["badpass"]["last_error"])
        assert "cannot connect" in str(boxes["unreachable"]["last_error"])
        assert "connection lost" in str(boxes["dropped"]["last_error"])
        # The good mailbox keeps pulling while the others fail.
        dovecot.append("good", "INBOX", corpus.normal(1, seed=3)[0])
        d.wait_for(
            "a new message on the good mailbox", lambda: d.mailboxes()["good"]["messages_pulled"] == 21, 5
        )
        # A refused login is logged once, not on every retry.
        assert d.log.read_text().count("refused the login") == 1


def test_mailboxes_added_and_removed_on_reload(start: object, dovecot: Dovecot) -> None:
    dovecot.add_user("biuro", PASSWORD)
    dovecot.add_user("sklep", PASSWORD)
    dovecot.deliver_files("biuro", "INBOX", corpus.normal(3, seed=1))
    dovecot.deliver_files("sklep", "INBOX", corpus.normal(4, seed=2))
    d = start(mailbox_toml("biuro", dovecot.port, idle=True))  # type: ignore[operator]
    d.wait_for("biuro pulled", lambda: inbox(d) == 3, 20)
    text = d.config.read_text()
    d.config.write_text(
        text.split("[[tenants.mailboxes]]")[0] + mailbox_toml("sklep", dovecot.port, idle=True)
    )
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    d.wait_for("sklep pulled after the reload", lambda: inbox(d) == 7, 20)
    # biuro is no longer watched: a new message there stays upstream.
    dovecot.append("biuro", "INBOX", corpus.normal(1, seed=3)[0])
    dovecot.append("sklep", "INBOX", corpus.normal(1, seed=4)[0])
    d.wait_for("sklep's new message", lambda: inbox(d) == 8, 5)
    assert dovecot.exists("biuro") == 4


def test_hundreds_of_mailboxes_in_one_process(start: object, dovecot: Dovecot) -> None:
    count = 200
    extra = ""
    for i in range(count):
        dovecot.add_user(f"user{i}", PASSWORD)
        dovecot.deliver_files(f"user{i}", "INBOX", corpus.normal(2, size=1000, seed=i))
        extra += mailbox_toml(f"user{i}", dovecot.port, idle=True)
    d = start(extra)  # type: ignore[operator]
    d.wait_for(f"{2 * count} messages", lambda: inbox(d) == 2 * count, 120)
    # A mailbox records its success just after storing its messages.
    d.wait_for("every mailbox idling", lambda: {b["state"] for b in d.mailboxes().values()} == {"idle"}, 30)
    assert len(d.mailboxes()) == count

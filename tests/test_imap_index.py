"""The folder index (gateway/imap/index.py): reads touch no database when nothing changed.

Statements are counted with SQLAlchemy's engine events on both pools (every
cursor execution and every transaction begun). The multi-session semantics
the index serves are diffed against Dovecot in tests/test_imap_multisession.py.
"""

from __future__ import annotations

import asyncio
import gc
import random
import re
import socket
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select, update

from gateway.auth import Authenticator
from gateway.config import parse_config
from gateway.daemon import open_store
from gateway.imap import index as index_module
from gateway.imap import server as server_module
from gateway.imap.index import Entry, FolderIndex, FolderState
from gateway.imap.server import IMAPServer
from gateway.ingest import Pipeline
from gateway.notify import Changes
from storage.db import Database
from storage.flags import SEEN, join_flags
from storage.models import Folder, Message
from tests.conftest import config_dict
from tests.test_imap import HASH, PASSWORD, Server, message, run


@pytest.fixture
async def imap(tmp_path: Path, db_url: str) -> AsyncIterator[Server]:
    data = config_dict(tmp_path, db_url)
    data["tenants"][0]["agents"] = [{"login": "anna@acme.test", "password_hash": HASH}]
    config = parse_config(data)
    db, blobs = await open_store(config)
    changes = Changes()
    pipeline = Pipeline(db, blobs, changes=changes)
    server = IMAPServer(lambda: config, db, blobs, Authenticator(lambda: config, db), changes)
    await server.start("127.0.0.1", 0)
    s = Server(config, db, server, pipeline)
    for n in range(1, 6):
        await s.deliver(message(n))
    yield s
    await server.stop()
    await db.close()


@contextmanager
def statements(db: Database) -> Iterator[list[str]]:
    """Every statement and transaction begun on either pool while the block runs."""
    seen: list[str] = []

    def executed(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    def begun(conn: Any) -> None:
        seen.append("BEGIN")

    engines = {db.writer.sync_engine, db.reader.sync_engine}
    for engine in engines:
        event.listen(engine, "before_cursor_execute", executed)
        event.listen(engine, "begin", begun)
    try:
        yield seen
    finally:
        for engine in engines:
            event.remove(engine, "before_cursor_execute", executed)
            event.remove(engine, "begin", begun)


class Raw:
    """A raw IMAP connection: send a tagged line, read up to its tagged reply."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")
        self.file.readline()
        self.n = 0

    def command(self, line: bytes) -> list[bytes]:
        self.n += 1
        tag = b"x%d " % self.n
        self.sock.sendall(tag + line + b"\r\n")
        return self.until(tag)

    def until(self, prefix: bytes) -> list[bytes]:
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                raise EOFError
            lines.append(line)
            if line.startswith(prefix):
                return lines

    def close(self) -> None:
        self.file.close()
        self.sock.close()


async def test_no_statement_for_noop_idle_wakeup_or_fetch_in_an_unchanged_folder(
    imap: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 13, Done 4: NOOP, an IDLE wake-up that finds nothing and FETCHes of flags (and of
    bodies: the index has the blob address) cost no statement once the folder is loaded."""
    monkeypatch.setattr(server_module, "IDLE_RECHECK", 0.1)  # IDLE wakes ten times a second
    c = await run(Raw, imap.server.port)
    await run(c.command, b"LOGIN anna@acme.test " + PASSWORD.encode())
    await run(c.command, b"SELECT INBOX")
    await run(c.command, b"NOOP")  # the index loads the folder here

    def session() -> list[list[bytes]]:
        out = [c.command(b"NOOP") for _ in range(5)]
        out.append(c.command(b"FETCH 1:* (FLAGS)"))
        out.append(c.command(b"UID FETCH 1:* (UID FLAGS RFC822.SIZE INTERNALDATE MODSEQ)"))
        out.append(c.command(b"UID FETCH 2 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])"))
        c.sock.sendall(b"i IDLE\r\n")
        c.until(b"+")
        time.sleep(0.6)  # several wake-ups
        c.sock.sendall(b"DONE\r\n")
        out.append(c.until(b"i "))
        return out

    with statements(imap.db) as seen:
        answers = await run(session)
    assert seen == [], seen
    assert b" OK " in answers[5][-1]
    assert sum(line.startswith(b"* ") and b"FETCH (FLAGS" in line for line in answers[5]) == 5
    assert b"Subject: hello 2" in b"".join(answers[7])
    assert answers[-1] == [b"i OK IDLE terminated\r\n"]

    # A change is read once, by whoever looks first, and told as before.
    await imap.deliver(message(6))
    with statements(imap.db) as seen:
        noop = await run(c.command, b"NOOP")
    assert b"* 6 EXISTS\r\n" in noop
    assert seen, "the new message was read from the database"
    with statements(imap.db) as seen:
        await run(c.command, b"NOOP")
    assert seen == []
    c.close()


async def test_writes_of_other_processes_are_seen_after_the_recheck(
    imap: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that sends no change notice (another process: the CLI, another instance) is read
    when the folder's recheck is due (index.RECHECK), not before."""
    monkeypatch.setattr(index_module, "RECHECK", 0.5)
    c = await run(Raw, imap.server.port)
    await run(c.command, b"LOGIN anna@acme.test " + PASSWORD.encode())
    await run(c.command, b"SELECT INBOX")
    await run(c.command, b"NOOP")
    other = Database(imap.db.url)  # its own pools: no notice reaches this process's index
    async with other.write() as s:
        folder = await s.scalar(select(Folder.id).where(Folder.tenant_id == "acme", Folder.name == "INBOX"))
        highest = await s.scalar(
            update(Folder)
            .where(Folder.id == folder)
            .values(highestmodseq=Folder.highestmodseq + 1)
            .returning(Folder.highestmodseq)
        )
        await s.execute(
            update(Message)
            .where(Message.folder_id == folder, Message.uid == 3)
            .values(sysflags=Message.sysflags.op("|")(SEEN), modseq=highest)
        )
    await other.close()
    assert not any(b"FETCH" in line for line in await run(c.command, b"NOOP"))
    await asyncio.sleep(0.6)
    told = await run(c.command, b"NOOP")
    assert b"* 3 FETCH (FLAGS (\\Seen \\Recent))\r\n" in told, told
    c.close()


async def test_a_folder_nobody_has_open_is_evicted_after_a_while(
    imap: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(index_module, "IDLE_TTL", 0.0)  # at once
    a, b = await run(Raw, imap.server.port), await run(Raw, imap.server.port)
    for c in (a, b):
        await run(c.command, b"LOGIN anna@acme.test " + PASSWORD.encode())
        await run(c.command, b"SELECT INBOX")
    index = imap.server.index
    assert len(index.folders) == 1
    ((state),) = index.folders.values()
    assert len(state.users) == 2
    await run(a.command, b"UNSELECT")
    assert len(state.users) == 1
    b.close()  # a dropped connection closes its view too
    for _ in range(100):
        if not index.folders:
            break
        await asyncio.sleep(0.02)
    assert index.folders == {}
    a.close()


def test_expunge_history_is_kept_for_the_oldest_open_view() -> None:
    """An expunge stays in the index until every open view has taken it; a view older than
    the index's floor is answered None (the session then reads the database's history)."""
    when = datetime(2024, 1, 1, tzinfo=UTC)
    state = FolderState(1, loaded=True, highest=10, floor=10)
    state.users = {1: 10, 2: 12}
    state.apply([Entry(5, 0, "", 11, 100, when, "b5")], [(12, 3), (13, 4)])
    assert state.expunged_since(10) == [3, 4]
    assert state.expunged_since(12) == [4]
    assert [e.uid for e in state.changed_since(10)] == [5]
    state.users = {2: 12}
    state.apply([], [])
    assert state.floor == 12
    assert state.expunged_since(10) is None
    assert state.expunged_since(12) == [4]


async def test_memory_per_indexed_message_is_bounded(tmp_path: Path) -> None:
    """What docs/benchmarks.md states per message of an open folder, measured."""
    when = datetime(2024, 1, 1, tzinfo=UTC)
    n = 5000
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    state = FolderState(1)
    state.apply([Entry(uid, 0, "", uid + 1, 5000 + uid, when, f"{uid:064x}") for uid in range(1, n + 1)], [])
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    per_message = (after - before) / n
    print(f"folder index: {per_message:.0f} bytes per message")
    assert per_message < 500


def test_index_subscribes_to_change_notices(tmp_path: Path) -> None:
    changes = Changes()
    index = FolderIndex(Database(f"sqlite+aiosqlite:///{tmp_path}/unused.sqlite3"), changes)
    key = index.open(7, 0)
    index.folders[7].read = index.folders[7].notices
    assert not index.folders[7].stale
    changes.publish([7, 8])
    assert index.folders[7].stale
    index.close(7, key)  # kept a while with nobody on it, still told of changes
    index.folders[7].read = index.folders[7].notices
    changes.publish([7])
    assert index.folders[7].stale


async def test_status_unseen_of_an_open_folder_is_counted_by_the_index(imap: Server) -> None:
    """STATUS UNSEEN of a folder some session has open comes from the index's running count
    (no COUNT over the folder) and stays equal to the database's through changes."""
    a, b = await run(Raw, imap.server.port), await run(Raw, imap.server.port)
    for c in (a, b):
        await run(c.command, b"LOGIN anna@acme.test " + PASSWORD.encode())
    await run(a.command, b"SELECT INBOX")
    await run(a.command, b"NOOP")
    answers = []
    for step in (b"STORE 1:2 +FLAGS (\\Seen)", b"STORE 1 -FLAGS (\\Seen)", b"EXPUNGE"):
        if step == b"EXPUNGE":
            await run(a.command, b"STORE 3 +FLAGS.SILENT (\\Deleted)")
        await run(a.command, step)
        with statements(imap.db) as seen:
            answers.append(await run(b.command, b"STATUS INBOX (MESSAGES UNSEEN)"))
        assert not any("count(" in q.lower() for q in seen), seen
    assert [x[0] for x in answers] == [
        b"* STATUS INBOX (MESSAGES 5 UNSEEN 3)\r\n",
        b"* STATUS INBOX (MESSAGES 5 UNSEEN 4)\r\n",
        b"* STATUS INBOX (MESSAGES 4 UNSEEN 3)\r\n",
    ]
    a.close()
    b.close()


async def test_sessions_agree_with_the_database_after_random_concurrent_changes(imap: Server) -> None:
    """Three sessions STORE, EXPUNGE and APPEND at random, at the same time (group commit, the
    index taking a session's own writes); afterwards each one's view, after a NOOP, is what the
    database holds: the same UIDs, the same flags."""
    clients = [await run(Raw, imap.server.port) for _ in range(3)]
    for c in clients:
        await run(c.command, b"LOGIN anna@acme.test " + PASSWORD.encode())
        await run(c.command, b"SELECT INBOX")
    body = b"From: a@example.org\r\nSubject: random\r\n\r\nx\r\n"

    top = [5]  # the highest UID so far (from APPENDUID)

    def work(n: int) -> None:
        rng = random.Random(n)
        c = clients[n]
        for _ in range(60):
            c.command(b"NOOP")
            action = rng.random()
            if action < 0.6:  # by UID: one that is gone is simply not changed
                flag = rng.choice([b"\\Seen", b"\\Flagged", b"Urgent", b"\\Answered", b"\\Deleted"])
                sign = rng.choice([b"+", b"-"])
                c.command(
                    b"UID STORE %d %sFLAGS (%s)" % (rng.randint(max(1, top[0] - 8), top[0]), sign, flag)
                )
            elif action < 0.7:
                c.command(b"EXPUNGE")
            else:
                c.n += 1
                tag = b"x%d " % c.n
                c.sock.sendall(tag + b"APPEND INBOX {%d+}\r\n" % len(body) + body + b"\r\n")
                m = re.search(rb"APPENDUID \d+ (\d+)", c.until(tag)[-1])
                assert m is not None
                top[0] = max(top[0], int(m[1]))

    await asyncio.gather(*(run(work, n) for n in range(3)))
    async with imap.db.read() as s:
        folder = await s.scalar(select(Folder.id).where(Folder.tenant_id == "acme", Folder.name == "INBOX"))
        truth = {
            uid: set(join_flags(bits, words))
            for uid, bits, words in await s.execute(
                select(Message.uid, Message.sysflags, Message.keywords).where(Message.folder_id == folder)
            )
        }
    assert len(truth) > 5
    assert any(truth.values())  # the random work left some flags
    for c in clients:
        await run(c.command, b"NOOP")
        answer = await run(c.command, b"FETCH 1:* (UID FLAGS)") if truth else []
        seen = {}
        for line in answer:
            m = re.match(rb"\* \d+ FETCH \(UID (\d+) FLAGS \(([^)]*)\)\)", line)
            if m:
                seen[int(m[1])] = {f.decode() for f in m[2].split()} - {"\\Recent"}
        assert seen == truth
        c.close()


async def test_a_folder_deleted_under_a_session_serves_nothing_more(imap: Server) -> None:
    """The index forgets a deleted folder at once (DELETE announces it): the session that still has
    it selected gets no stale FETCH answers, as before the index (it read no rows then)."""
    a, b = await run(Raw, imap.server.port), await run(Raw, imap.server.port)
    for c in (a, b):
        await run(c.command, b"LOGIN anna@acme.test " + PASSWORD.encode())
    await run(a.command, b"CREATE Doomed")
    body = b"Subject: x\r\n\r\nx\r\n"
    a.n += 1
    await run(a.sock.sendall, b"x%d APPEND Doomed {%d+}\r\n" % (a.n, len(body)) + body + b"\r\n")
    await run(a.until, b"x%d " % a.n)
    await run(a.command, b"SELECT Doomed")
    assert any(b"FETCH" in line for line in await run(a.command, b"FETCH 1:* (UID FLAGS)"))
    assert (await run(b.command, b"DELETE Doomed"))[-1].startswith(b"x2 OK")
    after = await run(a.command, b"UID FETCH 1:* (FLAGS)")
    assert not any(b"FETCH (" in line for line in after), after
    a.close()
    b.close()

"""QRESYNC (RFC 7162 3.2), mailgate against a real Dovecot 2.3, with the multi-session machinery.

Session B enables QRESYNC, notes the folder's UIDVALIDITY and HIGHESTMODSEQ
("MARK": ``{V}`` and ``{M}`` in later lines), session A expunges and changes
flags; B then resyncs with SELECT/EXAMINE (QRESYNC ...) (with and without
known UIDs and sequence match data) or UID FETCH (CHANGEDSINCE ... VANISHED),
or is told A's expunges as VANISHED during NOOP, IDLE and its own commands.
Every answer must be Dovecot's, normalised as tests/test_imap_multisession.py
normalises (MODSEQs by rank, UIDVALIDITY, texts).

Not diffed, checked on mailgate alone: the expunge history after a week and
after it was pruned (Dovecot's history cannot be set back), and hostile input
(a MODSEQ of 2**63 is BAD here as RFC 7162's 63-bit grammar says; Dovecot
accepts it).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from storage import mailstore
from storage.db import Database
from storage.models import Expunge, Folder
from tests.test_imap_differential import LOGIN, PASSWORD, Mailgate
from tests.test_imap_multisession import Client, Server, Step, compare, message
from tests.test_imap_multisession import dovecot_server as dovecot_server  # the module's Dovecot

pytestmark = pytest.mark.peers

ENABLE: Step = ("B", "ENABLE QRESYNC")
# A removes messages 1 and 3 and changes the flags of 2 and 4, after B noted where it was.
CHANGES: list[Step] = [
    ENABLE,
    ("B", "MARK"),
    ("A", r"STORE 1,3 +FLAGS.SILENT (\Deleted)"),
    # B sees \Deleted first: Dovecot also reports the flags of a message expunged meanwhile,
    # mailgate keeps no flags of expunged messages (as in tests/test_imap_multisession.py).
    ("B", "NOOP"),
    ("A", "EXPUNGE"),
    ("A", r"STORE 1 +FLAGS (\Flagged)"),  # UID 2
    ("A", r"STORE 2 +FLAGS (\Seen)"),  # UID 4
]

RESYNCS: dict[str, list[Step]] = {
    "SELECT": [("B", "SELECT {f} (QRESYNC ({V} {M}))")],
    "EXAMINE": [("B", "EXAMINE {f} (QRESYNC ({V} {M}))")],
    "since 1": [("B", "SELECT {f} (QRESYNC ({V} 1))")],
    "known UIDs": [("B", "SELECT {f} (QRESYNC ({V} {M} 1:3))")],
    "known UIDs past the end": [("B", "SELECT {f} (QRESYNC ({V} {M} 2:10))")],
    "sequence match data": [("B", "SELECT {f} (QRESYNC ({V} {M} 1:4 (1:4 1:4)))")],
    "sequence match data, partial": [("B", "EXAMINE {f} (QRESYNC ({V} 1 2:4 (2 2)))")],
    "with CONDSTORE": [("B", "SELECT {f} (CONDSTORE QRESYNC ({V} {M}))")],
    "another UIDVALIDITY": [("B", "SELECT {f} (QRESYNC (1 {M} 1:4))")],
    "twice": [("B", "SELECT {f} (QRESYNC ({V} {M}))"), ("B", "SELECT {f} (QRESYNC ({V} {M} 1:4))")],
    # After a NOOP: B's FETCH would serve the expunged messages it was not told of (Dovecot, from
    # its cache) or skip them (mailgate), as RFC 2180 4.1 allows both.
    "UID FETCH": [("B", "NOOP"), ("B", "UID FETCH 1:* (FLAGS) (CHANGEDSINCE {M} VANISHED)")],
    "UID FETCH, VANISHED first": [("B", "NOOP"), ("B", "UID FETCH 2:4 (FLAGS) (VANISHED CHANGEDSINCE 1)")],
    "UID FETCH without VANISHED": [("B", "NOOP"), ("B", "UID FETCH 1:* (FLAGS) (CHANGEDSINCE {M})")],
}
# B's view afterwards: numbering as A's, nothing lost.
AFTER: list[Step] = [
    ("B", "NOOP"),
    ("B", "FETCH 1:* (UID FLAGS)"),
    ("A", "NOOP"),
    ("A", "FETCH 1:* (UID FLAGS)"),
]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def mailgate(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mailgate]:
    with Mailgate(request.param, tmp_path_factory.mktemp(request.param)) as server:
        yield server


@pytest.fixture(scope="module")
def mailgate_server(mailgate: Mailgate) -> Server:
    return Server("mailgate", mailgate.port, LOGIN, PASSWORD)


@pytest.mark.parametrize("resync", list(RESYNCS))
def test_resync_after_other_sessions_changes_as_dovecot(
    dovecot_server: Server, mailgate_server: Server, resync: str
) -> None:
    """SELECT/EXAMINE (QRESYNC ...) and UID FETCH (CHANGEDSINCE ... VANISHED): VANISHED (EARLIER)
    and the changed messages' FETCH (UID FLAGS MODSEQ), as Dovecot answers them."""
    compare(dovecot_server, mailgate_server, [*CHANGES, *RESYNCS[resync], *AFTER])


LOOKS: dict[str, list[Step]] = {
    "NOOP": [("B", "NOOP")],
    "IDLE": [("B", "IDLE"), ("B", "DONE")],
    "UID STORE": [("B", r"UID STORE 2 +FLAGS (\Answered)")],
    "STORE": [("B", r"STORE 2 +FLAGS (\Answered)")],
    "CHECK": [("B", "CHECK")],
    # A tagged OK with a response code of its own: HIGHESTMODSEQ comes untagged then.
    "UID STORE UNCHANGEDSINCE": [("B", r"UID STORE 2,4 (UNCHANGEDSINCE 1) +FLAGS (\Draft)")],
    "UID COPY": [("B", "UID COPY 2 {g}")],
    "UID MOVE": [("B", "UID MOVE 4 {g}")],
    # By UID, a search tells expunges unless it names messages by number or UID (as Dovecot 2.3).
    "UID SEARCH": [("B", "UID SEARCH UNDELETED")],
    "UID SEARCH by UID": [("B", "UID SEARCH UID 2,4")],
    "UID SORT": [("B", "UID SORT (ARRIVAL) UTF-8 UNDELETED")],
    "SEARCH": [("B", "SEARCH UNDELETED")],
}


@pytest.mark.parametrize("look", list(LOOKS))
def test_expunges_are_told_as_vanished_once_qresync_is_on(
    dovecot_server: Server, mailgate_server: Server, look: str
) -> None:
    """A QRESYNC session hears other sessions' expunges as ``* VANISHED``, its flag FETCHes carry
    UIDs, and HIGHESTMODSEQ comes when a VANISHED moved it, as Dovecot tells them."""
    compare(dovecot_server, mailgate_server, [*CHANGES, *LOOKS[look], *AFTER])


def test_expunges_while_idling_are_told_as_vanished(dovecot_server: Server, mailgate_server: Server) -> None:
    script: list[Step] = [
        ENABLE,
        ("A", r"STORE 2:3 +FLAGS.SILENT (\Deleted)"),
        ("B", "IDLE"),
        ("A", "EXPUNGE"),
        ("B", "DONE"),
        *AFTER,
    ]
    compare(dovecot_server, mailgate_server, script)


def test_own_expunge_move_and_store_under_qresync(dovecot_server: Server, mailgate_server: Server) -> None:
    """B's own EXPUNGE, UID EXPUNGE and MOVE answer VANISHED; its STORE replies carry UID and MODSEQ."""
    script: list[Step] = [
        ENABLE,
        ("B", r"STORE 1 +FLAGS.SILENT (\Deleted)"),
        ("B", r"STORE 2 +FLAGS (\Deleted)"),
        ("B", "UID EXPUNGE 2"),
        ("B", "EXPUNGE"),
        ("B", "MOVE 1 {g}"),
        ("B", "UID FETCH 1:* (FLAGS) (CHANGEDSINCE 1 VANISHED)"),
        *AFTER,
    ]
    compare(dovecot_server, mailgate_server, script)


def test_enable_qresync_after_other_sessions_changes(dovecot_server: Server, mailgate_server: Server) -> None:
    """ENABLE QRESYNC in a selected folder reports where the session is; what happened meanwhile
    comes as FETCH and VANISHED, then the new HIGHESTMODSEQ."""
    script: list[Step] = [
        ("A", r"STORE 2 +FLAGS.SILENT (\Deleted)"),
        ("B", "NOOP"),
        ("A", "EXPUNGE"),
        ("A", r"STORE 1 +FLAGS (\Seen)"),
        ENABLE,
        ("B", "NOOP"),
        ("B", "NOOP"),
        *AFTER,
    ]
    compare(dovecot_server, mailgate_server, script)


def test_qresync_refusals_as_dovecot(dovecot_server: Server, mailgate_server: Server) -> None:
    """QRESYNC parameters without ENABLE QRESYNC, VANISHED without CHANGEDSINCE or on FETCH by
    number: BAD (RFC 7162 3.2.5, 3.2.6)."""
    script: list[Step] = [
        ("B", "MARK"),
        ("B", "SELECT {f} (QRESYNC ({V} 1))"),
        ("B", "UID FETCH 1:* (FLAGS) (CHANGEDSINCE 1 VANISHED)"),
        ENABLE,
        ("B", "UID FETCH 1:* (FLAGS) (VANISHED)"),
        ("B", "FETCH 1:* (FLAGS) (CHANGEDSINCE 1 VANISHED)"),
        ("B", "NOOP"),
    ]
    compare(dovecot_server, mailgate_server, script)


# --------------------------------------------------------------------------- mailgate alone


def _folder(client: Client, messages: int = 4) -> tuple[str, int]:
    """A fresh folder with ``messages`` messages; its name and UIDVALIDITY."""
    name = f"qr{time.monotonic_ns()}"
    client.command(b"CREATE " + name.encode())
    for n in range(1, messages + 1):
        raw = message(n)
        client.command(b"APPEND %s () {%d+}\r\n%s" % (name.encode(), len(raw), raw))
    status = client.command(b"STATUS " + name.encode() + b" (UIDVALIDITY)")
    found = re.search(rb"UIDVALIDITY (\d+)", status)
    assert found, status
    return name, int(found.group(1))


def _modseq(client: Client, name: str) -> int:
    found = re.search(
        rb"HIGHESTMODSEQ (\d+)", client.command(b"STATUS " + name.encode() + b" (HIGHESTMODSEQ)")
    )
    assert found
    return int(found.group(1))


async def _age_expunges(db: Database, name: str, age: timedelta) -> int:
    """Date the folder's expunge history back by ``age``, then run the scheduler's hourly pruning."""
    async with db.write() as s:
        folder_id = await s.scalar(select(Folder.id).where(Folder.name == name))
        await s.execute(
            update(Expunge).where(Expunge.folder_id == folder_id).values(expunged_at=datetime.now(UTC) - age)
        )
    async with db.write() as s:
        return await mailstore.prune_expunges(s, datetime.now(UTC))


def test_resync_after_a_week_still_gets_vanished(mailgate: Mailgate) -> None:
    """The expunge history is kept 30 days: a client back after a week hears VANISHED (EARLIER)
    for what went, from the history; after it was pruned, from the folder's UIDs (still correct)."""
    assert mailgate.db is not None
    a, b = (
        Client(Server("mailgate", mailgate.port, LOGIN, PASSWORD)),
        Client(Server("mailgate", mailgate.port, LOGIN, PASSWORD)),
    )
    try:
        name, uidvalidity = _folder(a)
        since = _modseq(a, name)
        a.command(b"SELECT " + name.encode())
        a.command(rb"STORE 1,3 +FLAGS.SILENT (\Deleted)")
        a.command(b"EXPUNGE")
        assert mailgate.run(_age_expunges(mailgate.db, name, timedelta(days=7))) == 0
        b.command(b"ENABLE QRESYNC")
        resync = b"SELECT %s (QRESYNC (%d %d))" % (name.encode(), uidvalidity, since)
        out = b.command(resync)
        assert b"* VANISHED (EARLIER) 1,3\r\n" in out, out
        # A month later the history is gone: the answer comes from the UIDs the folder lacks.
        assert mailgate.run(_age_expunges(mailgate.db, name, timedelta(days=31))) == 2
        out = b.command(resync)
        assert b"* VANISHED (EARLIER) 1,3\r\n" in out, out
        out = b.command(b"SELECT %s (QRESYNC (%d %d 2:10))" % (name.encode(), uidvalidity, since))
        assert b"* VANISHED (EARLIER) 3\r\n" in out, out
        # A resync from after the pruned part is answered from the history again.
        later = _modseq(a, name)
        a.command(rb"UID STORE 2 +FLAGS.SILENT (\Deleted)")
        a.command(b"EXPUNGE")
        out = b.command(b"SELECT %s (QRESYNC (%d %d))" % (name.encode(), uidvalidity, later))
        assert b"* VANISHED (EARLIER) 2\r\n" in out, out
    finally:
        a.close()
        b.close()


def test_hostile_qresync_input_gets_the_rfc_answer(mailgate: Mailgate) -> None:
    """Never a traceback: 1,000,000 known-UID ranges (over the line limit), 4,000 ranges against a
    pruned history (answered range by range), a MODSEQ of 2**63, a UID of 2**32."""
    assert mailgate.db is not None
    client = Client(Server("mailgate", mailgate.port, LOGIN, PASSWORD))
    try:
        name, uidvalidity = _folder(client)
        client.command(b"ENABLE QRESYNC")
        huge = ",".join(str(2 * n + 1) for n in range(1_000_000)).encode()
        client.send(b"SELECT %s (QRESYNC (%d 1 %s))" % (name.encode(), uidvalidity, huge))
        assert client.readline() == b"* BAD request too long\r\n"  # the line limit, before any parsing
        assert client.command(b"NOOP").endswith(b"OK NOOP completed\r\n")
        client.command(b"SELECT " + name.encode())
        client.command(rb"STORE 1 +FLAGS.SILENT (\Deleted)")
        client.command(b"EXPUNGE")
        mailgate.run(_age_expunges(mailgate.db, name, timedelta(days=31)))
        many = ",".join(f"{4 * n + 1}:{4 * n + 2}" for n in range(4_000)).encode()  # within the 64 KiB line
        started = time.monotonic()
        out = client.command(b"SELECT %s (QRESYNC (%d 1 %s))" % (name.encode(), uidvalidity, many))
        assert time.monotonic() - started < 5
        assert b"* VANISHED (EARLIER) 1\r\n" in out, out[:2000]  # UIDs from UIDNEXT on never existed
        assert out.rstrip().endswith(b"SELECT completed"), out[-200:]
        for line in (
            b"SELECT %s (QRESYNC (%d 9223372036854775808))" % (name.encode(), uidvalidity),
            b"SELECT %s (QRESYNC (%d 1 1:4294967296))" % (name.encode(), uidvalidity),
            b"SELECT %s (QRESYNC (%d 1 1:*))" % (name.encode(), uidvalidity),
            b"SELECT %s (QRESYNC (%d 1 1:4 (1:4)))" % (name.encode(), uidvalidity),
            b"SELECT %s (QRESYNC (%d))" % (name.encode(), uidvalidity),
            b"UID FETCH 1:* (FLAGS) (CHANGEDSINCE 9223372036854775808 VANISHED)",
        ):
            out = client.command(line)
            assert re.search(rb"^T\d+ BAD ", out, re.M), (line, out)
    finally:
        client.close()


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(pytest.main([str(Path(__file__))]))

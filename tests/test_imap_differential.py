"""mailgate's IMAP server against a real Dovecot 2.3, end to end over the wire.

The same corpus (multipart/alternative and mixed, attachments, message/rfc822
inside, RFC 2047 and RFC 2231 encoded names with Polish letters, malformed
messages) is APPENDed over IMAP, in the same order, with the same flags and
the same explicit INTERNALDATE, to a private Dovecot (``tests.dovecot``) and
to mailgate's IMAP server (run in-process, on SQLite and on PostgreSQL). Both
mailboxes are fresh, so both hand out UIDs 1..N and sequence numbers align.

Then FETCH items and SEARCH commands are sent raw to both servers and the
untagged ``FETCH`` / ``SEARCH`` responses are compared byte for byte, item by
item (Dovecot orders items inside the parentheses its own way), normalised
only for UID numbers (compared by rank) and INTERNALDATE (compared as an
instant: the zone an internal date is shown in is the server's choice).

mailgate runs in a thread with its own event loop, so that one server (and
one corpus APPEND) serves every test of the module for each database engine.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import difflib
import imaplib
import re
import threading
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest
from argon2 import PasswordHasher

from gateway.auth import Authenticator
from gateway.config import parse_config
from gateway.daemon import open_store
from gateway.imap.server import IMAPServer
from gateway.notify import Changes
from storage.db import Database
from tests import corpus
from tests.conftest import PG_DSN, config_dict, missing_peer
from tests.dovecot import running_dovecot
from tests.test_imap_mime import mime_named

pytestmark = pytest.mark.peers

HOST = "127.0.0.1"
LOGIN, PASSWORD = "anna@acme.test", "differential-secret"
T = TypeVar("T")
HASH = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash(PASSWORD)

# --------------------------------------------------------------------------- the corpus

_H = "From: Jan Kowalski <jan.kowalski@example.org>\r\nTo: Biuro <biuro@acme.test>\r\nMIME-Version: 1.0\r\n"


def _search_messages() -> dict[str, bytes]:
    """Messages whose headers and text the SEARCH commands aim at."""

    def msg(head: str, body: str) -> bytes:
        return (_H + head + "\r\n" + body).encode("utf-8")

    return {
        "polish_utf8_subject": msg(
            "Subject: Zamówienie nr 7\r\nDate: Sat, 02 Mar 2024 23:30:00 -0500\r\n"
            "Message-ID: <pl-utf8@example.org>\r\nContent-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n",
            "Dzień dobry, proszę o fakturę.\r\n",
        ),
        "polish_qp_subject": msg(
            "Subject: =?UTF-8?Q?Pilne_zam=C3=B3wienie?=\r\nDate: Sun, 03 Mar 2024 00:15:00 +0200\r\n"
            "Message-ID: <pl-qp@example.org>\r\nContent-Type: text/plain; charset=iso-8859-2\r\n"
            "Content-Transfer-Encoding: quoted-printable\r\n",
            "Prosz=EA o wysy=B3k=EA paczki.\r\nKod: ZX-4711\r\n",
        ),
        "ascii_lookalike": msg(
            "Subject: zamowienie bez ogonkow\r\nDate: Mon, 04 Mar 2024 10:00:00 +0000\r\n"
            "Message-ID: <pl-ascii@example.org>\r\nX-Priority: 1\r\n",
            "Plain ASCII body, tracking number ZX-4711.\r\n",
        ),
        "comment_addresses": msg(  # RFC 5322 comments and folding inside addresses (Dovecot's parser)
            "Subject: addresses with comments\r\nDate: Wed, 06 Mar 2024 08:00:00 +0000\r\n"
            "Message-ID: <comments@example.org>\r\n"
            'Cc: <user-from (comment)@ (comment) domain.org>, Grupa: a@b.c, "Kowalski, Jan"\r\n'
            " (dział) <jan (x) . kowalski @ firma . pl>;, =?UTF-8?Q?=C5=81ukasz?= <l@x.pl>\r\n"
            "Bcc: undisclosed-recipients:;\r\n",
            "Addresses.\r\n",
        ),
        "base64_text": msg(
            "Subject: base64 body\r\nDate: Tue, 05 Mar 2024 12:00:00 +0100\r\n"
            "Message-ID: <b64@example.org>\r\n"
            "Content-Type: multipart/mixed; boundary=b64\r\n",
            "--b64\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            + base64.b64encode("Potwierdzam odbiór paczki numer QK-991.".encode()).decode()
            + "\r\n"
            + "--b64--\r\n",
        ),
    }


def messages() -> dict[str, bytes]:
    """Everything appended, in APPEND order."""
    named = {f"normal{i}": m for i, m in enumerate(corpus.normal(3, size=2500))}
    named |= {f"malformed_{k}": v for k, v in corpus.malformed_named().items()}
    named |= mime_named()
    named["large"] = corpus.large(1, size=120_000)[0]
    named |= _search_messages()
    return named


MESSAGES = messages()
NAMES = list(MESSAGES)
_TZ = ("+0000", "+0100", "-0500", "+0530", "+0200")


def flags_of(i: int) -> str:
    """The flags message ``i`` is APPENDed with (the same to both servers).

    Message 0 gets both keywords, so Dovecot registers them in alphabetical
    order: it lists keywords in the order the mailbox first saw them, mailgate
    sorts them (a flag list is a set; only that order is left to the data).
    """
    flags = []
    if i % 5 == 0:
        flags.append("\\Answered")
    if i % 4 == 1:
        flags.append("\\Flagged")
    if i % 3 == 0:
        flags.append("\\Seen")
    if i % 11 == 4:
        flags.append("\\Draft")
    if i % 13 == 6:
        flags.append("\\Deleted")
    if i % 7 == 0:
        flags.append("$Forwarded")
    if i % 6 == 0:
        flags.append("Orders")
    return " ".join(flags)


def date_of(i: int) -> str:
    """The INTERNALDATE of message ``i``: March 1..5, 2024, at midday UTC in various zones.

    Midday UTC keeps the UTC day and the day in any zone within +-10 hours the
    same (SINCE/BEFORE/ON compare days, and Dovecot takes its local zone).
    """
    tz = _TZ[i % len(_TZ)]
    sign = -1 if tz[0] == "-" else 1
    minutes = 12 * 60 + (i % 50) + sign * (int(tz[1:3]) * 60 + int(tz[3:]))
    return f"{1 + i % 5:02d}-Mar-2024 {minutes // 60:02d}:{minutes % 60:02d}:{i % 60:02d} {tz}"


# --------------------------------------------------------------------------- raw IMAP


def connect(port: int, user: str, password: str) -> imaplib.IMAP4:
    client = imaplib.IMAP4(HOST, port, timeout=30)
    client.login(user, password)
    return client


def append(client: imaplib.IMAP4, raw: bytes, flags: str, date: str, mailbox: str = "INBOX") -> None:
    """APPEND with the bytes sent unchanged (imaplib.append rewrites line ends)."""
    client.literal = raw  # type: ignore[attr-defined]
    typ, data = client._simple_command("APPEND", mailbox, f"({flags})", f'"{date}"')  # type: ignore[attr-defined]
    assert typ == "OK", data


_counter = iter(range(10**9))


def read_response(client: imaplib.IMAP4, tag: bytes) -> bytes:
    """Everything up to and including the tagged line, literals inline (no 1 MB line limit:
    a message of 10,000 parts has a longer BODYSTRUCTURE)."""
    out = bytearray()
    while True:
        line = client.file.readline()  # type: ignore[attr-defined]
        if not line:
            raise EOFError("connection closed")
        out += line
        m = re.search(rb"\{(\d+)\}\r\n$", line)
        if m:
            out += client.file.read(int(m.group(1)))  # type: ignore[attr-defined]
        elif line.startswith(tag + b" "):
            return bytes(out)


def command(client: imaplib.IMAP4, line: bytes) -> bytes:
    """Send one command (LITERAL+ literals inline), return every response up to the tagged one."""
    tag = b"D%d" % next(_counter)
    client.send(tag + b" " + line + b"\r\n")
    response = read_response(client, tag)
    assert response.splitlines()[-1].startswith(tag + b" OK"), response[-300:]
    return response


_FETCH = re.compile(rb"\* (\d+) FETCH \(")
_SPECIAL = re.compile(rb'[()"{]')
_QUOTED = re.compile(rb'"(?:[^"\\\r\n]|\\.)*"')
_LITERAL = re.compile(rb"\{(\d+)\}\r\n")
_ATOM = re.compile(rb"[^ ()\[\]\r\n]+(?:\[[^\]]*\](?:<\d+>)?)?")


def _skip_value(data: bytes, i: int) -> int:
    """Index after the IMAP value at ``data[i]``: atom (or FETCH item name), string, literal or list.

    Like tests.test_imap_mime's, but jumps from one ``( ) " {`` to the next: that one takes
    seconds over the megabyte BODYSTRUCTURE of a message of 10,000 parts.
    """
    depth = 0
    while True:
        c = data[i : i + 1]
        if c == b'"':
            m = _QUOTED.match(data, i)
            assert m is not None, data[i : i + 80]
            i = m.end()
        elif c == b"{" or (c == b"~" and data[i + 1 : i + 2] == b"{"):  # a literal or a literal8
            m = _LITERAL.match(data, i + (c == b"~"))
            assert m is not None, data[i : i + 80]
            i = m.end() + int(m.group(1))
            assert i <= len(data), "literal longer than the data"
        elif c == b"(":
            depth += 1
            i += 1
        elif c == b")" and depth:
            depth -= 1
            i += 1
        elif depth == 0:
            m = _ATOM.match(data, i)
            assert m is not None, data[i : i + 80]
            i = m.end()
        if depth == 0:
            return i
        m = _SPECIAL.search(data, i)
        assert m is not None, "unbalanced parentheses"
        i = m.start()


def untagged(response: bytes) -> Iterator[tuple[int, bytes]]:
    """(start, end) offsets of each untagged response (an untagged FETCH may carry literals)."""
    i = 0
    while i < len(response):
        m = _FETCH.match(response, i)
        end = _skip_value(response, m.end() - 1) if m else response.index(b"\r\n", i)
        assert response[end : end + 2] == b"\r\n", response[i : end + 2]
        yield i, end
        i = end + 2


def fetches(response: bytes) -> dict[int, list[tuple[bytes, bytes]]]:
    """The ``name value`` pairs of every untagged FETCH, by sequence number, values as wire bytes."""
    out: dict[int, list[tuple[bytes, bytes]]] = {}
    for start, end in untagged(response):
        m = _FETCH.match(response, start)
        if m is None:
            continue
        i, items = m.end(), out.setdefault(int(m.group(1)), [])
        while i < end - 1:
            if response[i : i + 1] == b" ":
                i += 1
                continue
            stop = _skip_value(response, i)
            name = response[i:stop]
            i = _skip_value(response, stop + 1)
            items.append((name, response[stop + 1 : i]))
    return out


def search_result(response: bytes) -> list[bytes]:
    return [response[s:e] for s, e in untagged(response) if response[s:e].startswith(b"* SEARCH")]


# --------------------------------------------------------------------------- the two servers


@dataclass
class Side:
    """One server with the corpus appended: its port and how UIDs map to message ranks."""

    name: str
    port: int
    user: str
    password: str
    rank: dict[int, int] = field(default_factory=dict)

    def session(self) -> imaplib.IMAP4:
        client = connect(self.port, self.user, self.password)
        typ, data = client.select("INBOX", readonly=True)
        assert typ == "OK", data
        assert int(data[0]) == len(MESSAGES), data
        return client


def load(side: Side) -> Side:
    """APPEND the corpus, then consume Dovecot's \\Recent (mailgate keeps none) and rank the UIDs."""
    client = connect(side.port, side.user, side.password)
    try:
        for i, raw in enumerate(MESSAGES.values()):
            append(client, raw, flags_of(i), date_of(i))
        client.select("INBOX")  # read-write: takes the \\Recent flags (no CLOSE: it would expunge)
        response = command(client, b"FETCH 1:* (UID)")
        uids = {seq: int(items[0][1]) for seq, items in fetches(response).items()}
    finally:
        client.logout()
    assert sorted(uids) == list(range(1, len(MESSAGES) + 1))
    side.rank = {uid: seq for seq, uid in uids.items()}
    return side


class Mailgate:
    """mailgate's IMAP server in a thread with its own event loop."""

    def __init__(self, engine: str, tmp: Path) -> None:
        self.engine, self.tmp = engine, tmp
        self.port = 0
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.db: Database | None = None  # mailgate's store, for tests that change it behind IMAP's back
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)

    def __enter__(self) -> Mailgate:
        self._thread.start()
        if not self._ready.wait(60):
            raise TimeoutError("mailgate did not start")
        if self._error is not None:
            raise self._error
        return self

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on mailgate's event loop (where its database lives) and wait for it."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(60)

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    async def _main(self) -> None:
        try:
            async with self._database() as url:
                data = config_dict(self.tmp, url)
                data["tenants"][0]["agents"] = [{"login": LOGIN, "password_hash": HASH}]
                config = parse_config(data)
                db, blobs = await open_store(config)
                self.db = db
                try:
                    auth = Authenticator(lambda: config, db, failure_delay=0.05)
                    server = IMAPServer(lambda: config, db, blobs, auth, Changes())
                    await server.start(HOST, 0)
                    try:
                        self.port = server.port
                        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
                        self._ready.set()
                        await self._stop.wait()
                    finally:
                        await server.stop()
                finally:
                    await db.close()
        except BaseException as exc:  # noqa: BLE001 (handed to the fixture: a skip without PostgreSQL)
            self._error = exc
        finally:
            self._ready.set()

    @contextlib.asynccontextmanager
    async def _database(self) -> AsyncIterator[str]:
        if self.engine == "sqlite":
            yield f"sqlite+aiosqlite:///{self.tmp / 'mailgate.db'}"
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


@pytest.fixture(scope="module")
def dovecot_side() -> Iterator[Side]:
    user, password = "diff@acme.test", "dovecot-secret"
    with running_dovecot({user: password}) as server:
        yield load(Side("dovecot", server.port, user, password))


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def mailgate_side(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Side]:
    with Mailgate(request.param, tmp_path_factory.mktemp(request.param)) as server:
        yield load(Side("mailgate", server.port, LOGIN, PASSWORD))


Sessions = tuple[Side, imaplib.IMAP4, Side, imaplib.IMAP4]


@pytest.fixture(scope="module")
def sessions(dovecot_side: Side, mailgate_side: Side) -> Iterator[Sessions]:
    """One EXAMINEd session on each server: (dovecot, its session, mailgate, its session)."""
    theirs, ours = dovecot_side.session(), mailgate_side.session()
    yield dovecot_side, theirs, mailgate_side, ours
    for client in (theirs, ours):
        with contextlib.suppress(Exception):
            client.logout()


# --------------------------------------------------------------------------- FETCH


def normalised(side: Side, name: bytes, value: bytes) -> bytes:
    """A FETCH value with UIDs replaced by their rank and INTERNALDATE by the UTC instant."""
    if name == b"UID":
        return b"#%d" % side.rank[int(value)]
    if name == b"INTERNALDATE":
        instant = datetime.strptime(value.decode().strip('"'), "%d-%b-%Y %H:%M:%S %z").astimezone(UTC)
        return instant.isoformat().encode()
    return value


def fetch_one(side: Side, client: imaplib.IMAP4, line: bytes) -> dict[int, dict[bytes, bytes]]:
    """Run one FETCH: {seq: {item name: normalised value}}."""
    got = {}
    for seq, items in fetches(command(client, line)).items():
        names = [n for n, _ in items]
        assert len(set(names)) == len(names), (side.name, seq, names)
        got[seq] = {n: normalised(side, n, v) for n, v in items}
    return got


def fetch_both(sessions: Sessions, line: bytes) -> tuple[dict[int, dict[bytes, bytes]], ...]:
    """Run one FETCH on both servers: (Dovecot's answers, ours)."""
    return fetch_one(*sessions[:2], line), fetch_one(*sessions[2:], line)


def _short(value: bytes) -> bytes:
    return value if len(value) <= 600 else value[:300] + b" ... " + value[-300:]


def differences(theirs: dict[int, dict[bytes, bytes]], ours: dict[int, dict[bytes, bytes]]) -> list[str]:
    out = []
    for seq in sorted(set(theirs) | set(ours)):
        a, b = theirs.get(seq, {}), ours.get(seq, {})
        for name in sorted(set(a) | set(b)):
            if a.get(name) != b.get(name):
                av, bv = a.get(name), b.get(name)
                out.append(
                    f"#{seq} {NAMES[seq - 1]} {name.decode()}:\n"
                    f"  dovecot: {None if av is None else _short(av)!r}\n"
                    f"  mailgate: {None if bv is None else _short(bv)!r}"
                )
    return out


ITEMS = (
    "UID",
    "FLAGS",
    "INTERNALDATE",
    "RFC822.SIZE",
    "ENVELOPE",
    "BODYSTRUCTURE",
    "BODY",
    "BODY.PEEK[]",
    "BODY.PEEK[HEADER]",
    "BODY.PEEK[HEADER.FIELDS (FROM TO SUBJECT DATE)]",
    "BODY.PEEK[HEADER.FIELDS.NOT (RECEIVED)]",
    "BODY.PEEK[TEXT]",
    "BODY.PEEK[1]",
    "BODY.PEEK[1.2]",
    "BODY.PEEK[1.MIME]",
    "BODY.PEEK[2]",
    "BODY.PEEK[2.HEADER]",
    "BODY.PEEK[2.TEXT]",
    "BODY.PEEK[2.1.MIME]",
    "BODY.PEEK[]<0.100>",
    "BODY.PEEK[1]<10.20>",
    "BODY.PEEK[TEXT]<5.3>",  # not <5.0>: Dovecot accepts it, RFC 3501 wants a non-zero length (we: BAD)
    "BODY.PEEK[HEADER]<2000000.10>",
    "RFC822.HEADER",
    "RFC822.TEXT",
)
BINARY_ITEMS = (  # RFC 3516: decoded base64 and quoted-printable parts
    "BINARY.PEEK[]",
    "BINARY.PEEK[1]",
    "BINARY.PEEK[2]",
    "BINARY.PEEK[1.1]",
    "BINARY.PEEK[1.2]",
    "BINARY.PEEK[2]<3.40>",
    "BINARY.SIZE[1]",
    "BINARY.SIZE[2]",
    "BINARY.SIZE[1.2]",
)


@pytest.mark.parametrize("item", ITEMS)
def test_fetch_item_matches_dovecot(sessions: Sessions, item: str) -> None:
    """``FETCH 1:* (item)``: every message's value is Dovecot's."""
    theirs, ours = fetch_both(sessions, b"FETCH 1:* (" + item.encode() + b")")
    assert len(theirs) == len(MESSAGES)
    diff = differences(theirs, ours)
    assert not diff, f"{len(diff)} differences for {item}:\n" + "\n".join(diff[:20])


@pytest.mark.parametrize("item", BINARY_ITEMS)
def test_binary_fetch_matches_dovecot(sessions: Sessions, item: str) -> None:
    """``FETCH n (item)`` per message: the value, or the same ``NO [code]`` (a part that cannot be decoded
    fails the whole FETCH, so each message is asked on its own)."""
    diff: list[str] = []
    for n, name in enumerate(NAMES, 1):
        answers = []
        for client in (sessions[1], sessions[3]):
            tag = b"B%d" % next(_counter)
            client.send(tag + b" FETCH %d (%s)\r\n" % (n, item.encode()))
            response = read_response(client, tag)
            status = response.splitlines()[-1][len(tag) + 1 :].split(b"]")[0]
            answers.append((status if not status.startswith(b"OK") else b"OK", fetches(response)))
        (their_status, theirs), (our_status, ours) = answers
        if their_status != our_status:
            diff.append(f"#{n} {name}: Dovecot {their_status!r}, mailgate {our_status!r}")
        elif their_status == b"OK":
            diff += differences(
                {k: dict(v) for k, v in theirs.items()}, {k: dict(v) for k, v in ours.items()}
            )
    assert not diff, f"{len(diff)} differences for {item}:\n" + "\n".join(diff[:20])


def test_fetch_all_items_at_once_matches_dovecot(sessions: Sessions) -> None:
    """Every item in one ``UID FETCH 1:*`` (items compared by name: the order is the server's)."""
    theirs, ours = fetch_both(sessions, b"UID FETCH 1:* (" + " ".join(ITEMS).encode() + b")")
    assert len(theirs) == len(MESSAGES)
    assert all(len(items) == len(ITEMS) for items in theirs.values())
    diff = differences(theirs, ours)
    assert not diff, f"{len(diff)} differences:\n" + "\n".join(diff[:20])


def test_internal_dates_are_the_appended_ones(sessions: Sessions) -> None:
    """INTERNALDATE is compared as an instant (Dovecot shows it in its local zone, not the
    APPENDed one): on both servers that instant is the one APPENDed."""
    for side, client in (sessions[:2], sessions[2:]):
        got = fetch_one(side, client, b"FETCH 1:* (INTERNALDATE)")
        for seq, items in got.items():
            appended = b'"%s"' % date_of(seq - 1).encode()
            assert items[b"INTERNALDATE"] == normalised(side, b"INTERNALDATE", appended), (side.name, seq)


# --------------------------------------------------------------------------- SEARCH


def utf8(text: str) -> bytes:
    """A LITERAL+ literal (non-ASCII search strings cannot be quoted)."""
    data = text.encode()
    return b"{%d+}\r\n" % len(data) + data


SEARCHES: tuple[bytes, ...] = (
    b"ALL",
    b"SEEN",
    b"UNSEEN",
    b"FLAGGED",
    b"ANSWERED UNFLAGGED",
    b"DRAFT",
    b"DELETED",
    b"UNDELETED SEEN",
    b"KEYWORD $Forwarded",
    b"KEYWORD Orders",
    b"UNKEYWORD orders",
    b"KEYWORD NoSuchKeyword",
    b"LARGER 5000",
    b"SMALLER 300",
    b"LARGER 200 SMALLER 1000",
    b"1:5,10,*",
    b"2:4 SEEN",
    b"UID 3:7,20:*",
    b"UID 1,3,5 NOT SEEN",
    b"SINCE 03-Mar-2024",
    b"BEFORE 03-Mar-2024",
    b"ON 04-Mar-2024",
    b"SINCE 02-Mar-2024 BEFORE 04-Mar-2024",
    b"SENTSINCE 03-Mar-2024",
    b"SENTON 02-Mar-2024",  # the day as written (02 Mar -0500), not the UTC day (03 Mar)
    b"SENTON 03-Mar-2024",
    # Messages without a usable Date were sent on 1 Jan 1970, for both servers.
    b"SENTBEFORE 02-Mar-2024",
    b"NOT SENTBEFORE 02-Mar-2024",
    b"SENTON 01-Jan-1970",
    b"SENTBEFORE 02-Mar-2024 SENTSINCE 01-Jan-1971",
    b"NOT SENTBEFORE 02-Mar-2024 SENTSINCE 01-Jan-1971",
    b"SUBJECT boundary",
    b'SUBJECT "quoted boundary"',
    b"CHARSET UTF-8 SUBJECT " + utf8("zamówienie"),
    b"CHARSET UTF-8 SUBJECT " + utf8("ZAMÓWIENIE"),
    b"SUBJECT zamowienie",
    b"FROM kowalski",
    b"CHARSET UTF-8 FROM " + utf8("Łukasz"),
    b"TO biuro@acme.test",
    b"CC b@c.d",
    b"SUBJECT Zofia",
    b"TO Zofia",
    b"CHARSET UTF-8 TO " + utf8("Zofia Ł"),
    b"FROM Nowak",
    b'FROM "Nowak, Anna"',
    b"FROM anna@example.org",
    b"CC Team",
    b"BCC broken",
    b"CC user-from@domain.org",  # comments inside the address
    b'CC "user-from (comment)"',  # the raw text: not found by Dovecot either
    b"CC jan.kowalski@firma.pl",
    b'CC "Kowalski, Jan"',
    b"CHARSET UTF-8 CC " + utf8("Łukasz <l@x.pl>"),
    b"BCC undisclosed-recipients",
    b'HEADER Cc "(comment)"',  # HEADER searches the field's text
    b"HEADER Subject inner",
    b'HEADER Content-Type ""',
    b"HEADER Content-Type multipart",
    b"CHARSET UTF-8 SUBJECT " + utf8("zażółć"),
    b"CHARSET UTF-8 TEXT " + utf8("ZAŻÓŁĆ"),
    b"CHARSET UTF-8 BODY " + utf8("Café"),
    # Not compared: SUBJECT "Résumé" on a Subject of raw Latin-1 bytes (malformed_latin1_headers).
    # No charset is declared: Dovecot reads invalid UTF-8 as U+FFFD, we fall back to cp1252/latin-1.
    b"HEADER Message-ID <rfc2047-polish@example.org>",
    b'HEADER X-Priority ""',
    b"HEADER X-Spam-Flag YES",
    b'BODY "Second part"',
    b"BODY ZX-4711",
    b"BODY QK-991",
    b"CHARSET UTF-8 BODY " + utf8("wysyłkę"),
    b"CHARSET UTF-8 BODY " + utf8("gęślą"),
    b"TEXT ZX-4711",
    b"TEXT kowalski",
    # BODY: decoded text of text/* and message/* leaf parts only (as Dovecot's message-search.c),
    # no header field of any part (RFC 9051 6.4.4), no preamble or epilogue, no encoded bytes
    b"BODY UG90d2ll",  # base64 of a text part
    b"BODY =C5",  # quoted-printable
    b"BODY AAAA",  # base64 of an attachment
    b"BODY ABC",  # the decoded "QUJD" of a part without MIME-Version
    b"BODY Content-Type",
    b"BODY multipart",
    b"BODY html",
    b"BODY plain",
    b"BODY inner",  # the Subject of an embedded message
    b"BODY Subject",
    b"BODY Faktura",  # a Content-Description
    b"BODY Epilogue",
    b"BODY Preamble",
    b"BODY body",  # also: an application/* leaf and a duplicate Content-Transfer-Encoding
    b"BODY first",
    b"BODY <b>",
    # TEXT: every header block (MIME parts' and embedded messages' too) and BODY's text
    b"TEXT Content-Type",
    b"TEXT inner",
    b"TEXT Faktura",
    b"TEXT att1@example.org",
    b"TEXT text/html",
    b"TEXT Epilogue",
    b"TEXT boundary",
    b"TEXT ABC",
    b"NOT SEEN",
    b"NOT FLAGGED NOT ANSWERED",
    b"OR FLAGGED KEYWORD Orders",
    b"OR SEEN OR FLAGGED DRAFT",
    b"NOT (OR SEEN FLAGGED)",
    b"OR (SEEN LARGER 1000) (NOT SEEN SMALLER 500)",
    b"(FLAGGED (SINCE 02-Mar-2024 (UNSEEN)))",
    b"OR SUBJECT nested NOT (FROM kowalski OR SEEN SMALLER 400)",
)


def _text_key(criteria: bytes) -> bool:
    return any(k in criteria.split() for k in (b"BODY", b"TEXT", b"SUBJECT", b"FROM", b"TO", b"CC", b"BCC"))


# UID SEARCH only differs in what it answers with: the text keys (slow, they read every
# message) are run as SEARCH only, the others both ways.
CASES = [(c, False) for c in SEARCHES] + [(c, True) for c in SEARCHES if not _text_key(c)]


@pytest.mark.parametrize(
    ("criteria", "uid"),
    CASES,
    ids=[("UID SEARCH " if u else "SEARCH ") + c.decode("utf-8", "replace") for c, u in CASES],
)
def test_search_matches_dovecot(sessions: Sessions, criteria: bytes, uid: bool) -> None:
    """The ``* SEARCH`` line is Dovecot's (UIDs compared by rank)."""
    line = (b"UID SEARCH " if uid else b"SEARCH ") + criteria
    answers = []
    for side, client in (sessions[:2], sessions[2:]):
        (result,) = search_result(command(client, line))
        if uid:
            ranks = sorted(side.rank[int(n)] for n in result.split()[2:])
            result = b"* SEARCH" + b"".join(b" #%d" % r for r in ranks)
        answers.append(result)
    theirs, ours = answers

    def named(result: bytes) -> set[str]:
        return {NAMES[int(n.strip(b"#")) - 1] for n in result.split()[2:]}

    assert ours == theirs, (
        f"\n dovecot: {theirs!r}\nmailgate: {ours!r}\n"
        f"only dovecot: {sorted(named(theirs) - named(ours))}\n"
        f"only mailgate: {sorted(named(ours) - named(theirs))}"
    )


def test_undated_messages_agree(sessions: Sessions) -> None:
    """Both servers date messages without a usable Date header 1 Jan 1970 (there are more than 10)."""
    dovecot, mailgate = sessions[1], sessions[3]
    (theirs,) = search_result(command(dovecot, b"SEARCH SENTBEFORE 02-Jan-1970"))
    (ours,) = search_result(command(mailgate, b"SEARCH SENTBEFORE 02-Jan-1970"))
    assert ours == theirs
    assert len(theirs.split()) > 10


# --------------------------------------------------------------------------- SORT (RFC 5256) and ESORT


SORTS = [
    b"(ARRIVAL) UTF-8 ALL",
    b"(DATE) UTF-8 ALL",
    b"(REVERSE DATE) UTF-8 ALL",
    b"(SIZE) UTF-8 ALL",
    b"(REVERSE SIZE) UTF-8 ALL",
    b"(SUBJECT) UTF-8 ALL",
    b"(SUBJECT DATE) UTF-8 ALL",
    b"(FROM) UTF-8 ALL",
    b"(TO) UTF-8 ALL",
    b"(CC) UTF-8 ALL",
    b"(REVERSE ARRIVAL) UTF-8 SEEN",
    b"(SUBJECT) UTF-8 SUBJECT zam",
    b"(REVERSE SUBJECT REVERSE FROM) UTF-8 NOT DELETED",
]


@pytest.mark.parametrize(
    "command_line",
    [b"SORT RETURN (MIN MAX COUNT) (DATE) UTF-8 ALL", b"UID SORT RETURN (ALL) (SUBJECT) UTF-8 SEEN"],
)
def test_esort_matches_dovecot(sessions: Sessions, command_line: bytes) -> None:
    """ESORT (RFC 5267): the ESEARCH answer (UIDs mapped to ranks, as everywhere here)."""
    answers = []
    for side, client in ((sessions[0], sessions[1]), (sessions[2], sessions[3])):
        line = next(x for x in command(client, command_line).split(b"\r\n") if x.startswith(b"* ESEARCH"))
        words = line.split(b" ")[4:]  # after '* ESEARCH (TAG "..")'
        if b"UID" in command_line[:4] and words[:1] == [b"UID"]:
            words = words[1:]
            words[1::2] = [b",".join(b"#%d" % side.rank[int(n)] for n in w.split(b",")) for w in words[1::2]]
        answers.append(words)
    assert answers[0] == answers[1]


@pytest.mark.parametrize("criteria", SORTS, ids=[c.decode() for c in SORTS])
def test_sort_matches_dovecot(sessions: Sessions, criteria: bytes) -> None:
    """``SORT``: the same order as Dovecot's, message by message."""
    theirs = command(sessions[1], b"SORT " + criteria)
    ours = command(sessions[3], b"SORT " + criteria)
    their_line = next(line for line in theirs.split(b"\r\n") if line.startswith(b"* SORT"))
    our_line = next(line for line in ours.split(b"\r\n") if line.startswith(b"* SORT"))
    names = {n: name for n, name in enumerate(NAMES, 1)}
    # "duplicates" has two Subject fields: both servers sort by the first (its ENVELOPE holds the last).
    their_order = [names[int(n)] for n in their_line.split()[2:]]
    our_order = [names[int(n)] for n in our_line.split()[2:]]
    assert our_order == their_order, "\n".join(
        difflib.unified_diff(their_order, our_order, "dovecot", "mailgate", lineterm="", n=1)
    )


# --------------------------------------------------------------------------- THREAD (RFC 5256)


def _thread_corpus() -> list[bytes]:
    """A conversation as mail clients leave it: Re:/Fwd:/[tag] prefixes, missing and broken References,
    a loop, equal dates, a reply whose parent is absent, encoded Polish subjects."""

    def m(n: int, subject: str, date: str, refs: str = "", irt: str = "", msgid: str | None = None) -> bytes:
        head = f"From: a{n}@example.org\r\nSubject: {subject}\r\nDate: {date}\r\n"
        head += f"Message-ID: {msgid if msgid is not None else f'<t{n}@x>'}\r\n"
        head += (f"References: {refs}\r\n" if refs else "") + (f"In-Reply-To: {irt}\r\n" if irt else "")
        return (head + "\r\nbody\r\n").encode()

    d = "Mon, 04 Mar 2024 10:{:02d}:00 +0000"
    return [
        m(1, "Zamówienie 17", d.format(1)),
        m(2, "Re: Zamówienie 17", d.format(2), refs="<t1@x>"),
        m(3, "RE: Re: Zamówienie 17", d.format(3), refs="<t1@x> <t2@x>"),
        m(4, "Fwd: Zamówienie 17", d.format(4)),  # no references: joins by subject
        m(5, "[ACME] Re: Zamówienie 17", d.format(5), irt="<t2@x>"),
        m(6, "Re: lost parent", d.format(6), refs="<missing@x>"),
        m(7, "Re: lost parent", d.format(6), refs="<missing@x>"),  # equal date
        m(8, "=?UTF-8?Q?Faktura_=C5=82=C3=B3d=C5=BA?=", d.format(8)),
        m(9, "Re: Faktura łódź", d.format(9), refs="<t8@x> <t9@x>"),  # refers to itself
        m(10, "Loop a", d.format(10), refs="<t11@x>"),
        m(11, "Loop b", d.format(11), refs="<t10@x>"),
        m(12, "no id", d.format(12), msgid=""),
        m(13, "Re: no id", d.format(13), irt="<t1@x> <t12@x>"),
        m(14, "Dup id", d.format(14), msgid="<t1@x>"),
        m(15, "Pytanie", d.format(1)),
        m(16, "pytanie", d.format(15)),
        m(17, "(fwd) Pytanie (fwd)", d.format(16)),
    ]


@pytest.fixture(scope="module")
def threads(dovecot_side: Side, mailgate_side: Side) -> Iterator[tuple[imaplib.IMAP4, imaplib.IMAP4]]:
    clients = []
    folder = f"Threads{uuid.uuid4().hex[:8]}"  # Dovecot serves both engines' modules
    for side in (dovecot_side, mailgate_side):
        client = connect(side.port, side.user, side.password)
        command(client, f'CREATE "{folder}"'.encode())
        for raw in _thread_corpus():
            append(client, raw, "", date_of(0), folder)
        command(client, f'SELECT "{folder}"'.encode())
        clients.append(client)
    yield clients[0], clients[1]
    for client in clients:
        with contextlib.suppress(Exception):
            client.logout()


THREADS = [
    b"THREAD REFERENCES UTF-8 ALL",
    b"THREAD ORDEREDSUBJECT UTF-8 ALL",
    b"THREAD REFERENCES UTF-8 NOT SUBJECT lost",
    b"THREAD ORDEREDSUBJECT UTF-8 7:*",
    b"THREAD REFERENCES UTF-8 SUBJECT nothing-matches",
]


@pytest.mark.parametrize("line", THREADS, ids=[t.decode() for t in THREADS])
def test_thread_matches_dovecot(threads: tuple[imaplib.IMAP4, imaplib.IMAP4], line: bytes) -> None:
    answers = [
        next(x for x in command(client, line).split(b"\r\n") if x.startswith(b"* THREAD"))
        for client in threads
    ]
    assert answers[1] == answers[0]

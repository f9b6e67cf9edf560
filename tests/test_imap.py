"""The IMAP server with stdlib imaplib: commands, notifications, isolation, hostile input."""

from __future__ import annotations

import asyncio
import imaplib
import re
import shutil
import socket
import time
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from argon2 import PasswordHasher
from sqlalchemy import select

from gateway.auth import Authenticator
from gateway.config import Config, parse_config
from gateway.daemon import open_store
from gateway.imap.server import IMAPServer
from gateway.ingest import Delivery, Pipeline
from gateway.notify import Changes
from storage.blobs.fs import FsBlobStore
from storage.db import Database
from storage.models import Event
from tests.conftest import config_dict, on_every_blob_backend

T = TypeVar("T")
PASSWORD = "agent-password"
HASH = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash(PASSWORD)


def message(n: int, subject: str = "hello") -> bytes:
    return (
        f"From: Customer {n} <c{n}@example.org>\r\nTo: biuro@acme.test\r\nSubject: {subject} {n}\r\n"
        f"Message-ID: <m{n}@example.org>\r\nDate: Mon, 1 Jan 2024 10:00:00 +0000\r\n\r\nBody {n}.\r\n"
    ).encode()


class Server:
    def __init__(self, config: Config, db: Database, server: IMAPServer, pipeline: Pipeline) -> None:
        self.config, self.db, self.server, self.pipeline = config, db, server, pipeline

    def connect(self, login: str = "anna@acme.test", password: str = PASSWORD) -> imaplib.IMAP4:
        c = imaplib.IMAP4("127.0.0.1", self.server.port, timeout=10)
        c.login(login, password)
        return c

    async def deliver(self, raw: bytes, tenant: str = "acme") -> None:
        await self.pipeline.deliver(self.config.tenant(tenant), raw, Delivery(source="smtp"))


async def run(fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.to_thread(fn, *args)


@pytest.fixture
async def imap(tmp_path: Path, db_url: str, blobs_section: dict[str, Any]) -> AsyncIterator[Server]:
    data = {**config_dict(tmp_path, db_url), "blobs": blobs_section}
    acme, beta = data["tenants"]
    acme["agents"] = [
        {"login": "anna@acme.test", "password_hash": HASH},
        {"login": "piotr@acme.test", "password_hash": HASH, "folders": ["INBOX", "Orders"]},
    ]
    acme["quota"] = "10 MB"
    beta["agents"] = [{"login": "bob@beta.test", "password_hash": HASH}]
    config = parse_config(data)
    db, blobs = await open_store(config)
    changes = Changes()
    pipeline = Pipeline(db, blobs, changes=changes)
    auth = Authenticator(lambda: config, db, failure_delay=0.05)
    server = IMAPServer(lambda: config, db, blobs, auth, changes)
    await server.start("127.0.0.1", 0)
    s = Server(config, db, server, pipeline)
    for n in range(1, 4):
        await s.deliver(message(n))
    await s.deliver(message(9, "beta only"), "beta")
    yield s
    await server.stop()
    await blobs.close()
    await db.close()


def ok(response: tuple[str, list[Any]]) -> list[Any]:
    typ, data = response
    assert typ == "OK", data
    return data


@on_every_blob_backend
async def test_login_list_select_fetch_store_expunge(imap: Server) -> None:
    def scenario() -> None:
        c = imap.connect()
        listing = b"\n".join(ok(c.list()))
        assert b'(\\HasNoChildren \\Junk) "/" Spam' in listing
        assert b'(\\HasNoChildren \\Sent) "/" Sent' in listing
        assert ok(c.select("INBOX")) == [b"3"]
        fetched = ok(c.fetch("1:*", "(UID FLAGS RFC822.SIZE)"))
        assert len(fetched) == 3
        assert b"UID 1 " in fetched[0]
        body = ok(c.uid("FETCH", "2", "(BODY.PEEK[])"))
        assert body[0][1] == message(2)
        ok(c.store("1", "+FLAGS", "(\\Deleted)"))
        ok(c.expunge())
        assert ok(c.select("INBOX", readonly=True)) == [b"2"]
        c.logout()

    await run(scenario)


@on_every_blob_backend
async def test_append_copy_move_with_uidplus(imap: Server) -> None:
    def scenario() -> None:
        c = imap.connect()
        typ, data = c.append("Orders", "(\\Seen)", None, message(20))
        assert typ == "OK"
        assert b"APPENDUID" in data[0]
        ok(c.select("INBOX"))
        # imaplib's uid() returns untagged data; COPYUID is in the tagged reply.
        typ, data = c._simple_command("UID", "COPY", "1:2", "Archive")  # type: ignore[attr-defined]
        assert typ == "OK"
        assert b"COPYUID" in data[0]
        typ, data = c._simple_command("UID", "MOVE", "3", "Orders")  # type: ignore[attr-defined]
        assert typ == "OK"
        assert b"[COPYUID" in b"".join(c.untagged_responses.get("OK", []))
        assert ok(c.select("Orders")) == [b"2"]
        assert ok(c.status("Archive", "(MESSAGES UIDNEXT)"))[0].endswith(b"(MESSAGES 2 UIDNEXT 3)")
        c.logout()

    await run(scenario)


async def test_implicit_seen_marks_read_once(imap: Server) -> None:
    def scenario() -> None:
        c = imap.connect()
        ok(c.select("INBOX"))
        for _ in range(3):
            data = ok(c.fetch("1", "(BODY[])"))
            assert b"\\Seen" in data[0][0] or b"\\Seen" in b"".join(x for x in data if isinstance(x, bytes))
        ok(c.fetch("2", "(BODY.PEEK[])"))
        flags = ok(c.fetch("1:2", "(FLAGS)"))
        assert b"\\Seen" in flags[0]
        assert b"\\Seen" not in flags[1]
        c.logout()

    await run(scenario)
    async with imap.db.read() as s:
        reads = (await s.scalars(select(Event.message_id).where(Event.kind == "read"))).all()
    assert len(reads) == 1


async def test_quota_and_condstore(imap: Server) -> None:
    def scenario() -> None:
        c = imap.connect()
        typ, data = c.getquotaroot("INBOX")
        assert typ == "OK"
        flat = b" ".join(d if isinstance(d, bytes) else b" ".join(d) for d in data)
        assert b'"" (STORAGE 1 9765)' in flat
        typ, data = c._simple_command("ENABLE", "CONDSTORE")  # type: ignore[attr-defined]
        assert typ == "OK"
        ok(c.select("INBOX"))
        # A FETCH names MODSEQ to get it; STORE replies carry it unasked (RFC 7162 3.1.4, as Dovecot).
        assert b"MODSEQ" not in ok(c.fetch("1", "(FLAGS)"))[0]
        assert b"MODSEQ" in ok(c.store("1", "+FLAGS", "(\\Flagged)"))[0]
        c.logout()

    await run(scenario)


async def test_two_sessions_see_each_others_changes(imap: Server) -> None:
    def scenario() -> None:
        a, b = imap.connect(), imap.connect()
        ok(a.select("INBOX"))
        ok(b.select("INBOX"))
        ok(a.store("2", "+FLAGS", "(\\Flagged)"))
        ok(a.store("1", "+FLAGS", "(\\Deleted)"))
        ok(a.expunge())
        typ, _ = b.noop()
        assert typ == "OK"
        untagged = b.untagged_responses
        assert untagged.get("EXPUNGE") == [b"1"]
        assert any(b"\\Flagged" in f for f in untagged.get("FETCH", []))
        a.logout()
        b.logout()

    await run(scenario)


async def test_idle_hears_new_mail_and_expunges_within_a_second(imap: Server) -> None:
    sock = socket.create_connection(("127.0.0.1", imap.server.port), timeout=10)
    f = sock.makefile("rb")

    def send(line: bytes) -> None:
        sock.sendall(line + b"\r\n")

    def until(prefix: bytes) -> list[bytes]:
        lines = []
        while True:
            line = f.readline()
            lines.append(line)
            if line.startswith(prefix):
                return lines

    await run(f.readline)
    send(b"a LOGIN anna@acme.test " + PASSWORD.encode())
    await run(until, b"a OK")
    send(b"b SELECT INBOX")
    await run(until, b"b OK")
    send(b"c IDLE")
    await run(until, b"+")
    start = time.monotonic()
    await imap.deliver(message(30))
    lines = await run(until, b"* 4 EXISTS")
    assert time.monotonic() - start < 1.0, lines

    def expunge_elsewhere() -> None:
        other = imap.connect()
        ok(other.select("INBOX"))
        ok(other.store("1", "+FLAGS", "(\\Deleted)"))
        ok(other.expunge())
        other.logout()

    start = time.monotonic()
    await run(expunge_elsewhere)
    await run(until, b"* 1 EXPUNGE")
    assert time.monotonic() - start < 1.0
    send(b"DONE")
    await run(until, b"c OK")
    sock.close()


async def test_agents_see_only_their_tenant_and_their_folders(imap: Server) -> None:
    def scenario() -> None:
        bob = imap.connect("bob@beta.test")
        assert b"Orders" not in b"".join(ok(bob.list()))
        assert bob.select("Orders")[0] == "NO"
        assert bob.status("Orders", "(MESSAGES)")[0] == "NO"
        assert bob.append("Orders", None, None, message(40))[0] == "NO"
        ok(bob.select("INBOX"))
        assert b"beta only" in ok(bob.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])"))[0][1]
        bob.logout()
        piotr = imap.connect("piotr@acme.test")
        names = b"".join(ok(piotr.list()))
        assert b"Orders" in names
        assert b"Sent" not in names
        assert piotr.select("Sent")[0] == "NO"
        piotr.logout()

    await run(scenario)


async def test_wrong_password_is_refused(imap: Server) -> None:
    def scenario() -> None:
        c = imaplib.IMAP4("127.0.0.1", imap.server.port, timeout=10)
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            c.login("anna@acme.test", "wrong")
        c.shutdown()

    await run(scenario)


def raw_exchange(port: int, payload: bytes, read_for: float = 1.0) -> bytes:
    """Send bytes after LOGIN, return what the server answered (until it closes or goes quiet)."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_for) as sock:
        sock.recv(4096)
        sock.sendall(b"a LOGIN anna@acme.test " + PASSWORD.encode() + b"\r\n")
        time.sleep(0.3)
        sock.recv(65536)
        out = b""
        try:
            sock.sendall(payload)
            while chunk := sock.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionError):
            pass
        return out


@pytest.mark.parametrize(
    ("name", "payload", "expect"),
    [
        ("10 MB line", b"b NOOP " + b"x" * 10_000_000 + b"\r\n", b"BAD"),
        ("literal over the limit", b"b APPEND INBOX {999999999}\r\n", b"BAD"),
        ("4294967296 literal", b"b APPEND INBOX {4294967296}\r\n", b"BAD"),
        ("nested parentheses", b"b FETCH 1 " + b"(" * 10_000 + b"\r\n", b"BAD"),
        (
            "million-element sequence set",
            b"b FETCH " + b",".join(b"%d" % i for i in range(1, 1_000_001)) + b" FLAGS\r\n",
            b"BAD",
        ),
        ("garbage", bytes(range(256)) * 50 + b"\r\n", b"BAD"),
    ],
)
async def test_hostile_input_is_refused_and_others_are_served(
    imap: Server, name: str, payload: bytes, expect: bytes
) -> None:
    answer = await run(raw_exchange, imap.server.port, payload)
    assert expect in answer or answer.startswith(b"* BYE"), (name, answer[:200])

    def still_serving() -> None:
        c = imap.connect()
        ok(c.select("INBOX"))
        c.logout()

    await run(still_serving)


# --------------------------------------------------------------------------- COMPRESS=DEFLATE (RFC 4978)


imaplib.Commands.setdefault("COMPRESS", ("AUTH", "SELECTED"))


class DeflateIMAP4(imaplib.IMAP4):
    """imaplib with COMPRESS DEFLATE: after :meth:`compress`, both directions go through raw deflate."""

    deflating = False

    def compress(self) -> tuple[str, list[Any]]:
        typ, data = self._simple_command("COMPRESS", "DEFLATE")
        if typ == "OK":
            self.deflating = True
            self._deflater = zlib.compressobj(6, zlib.DEFLATED, -15)
            self._inflater = zlib.decompressobj(-15)
            self._inbuf = b""
        return typ, data

    def send(self, data: bytes) -> None:
        if self.deflating:
            data = self._deflater.compress(data) + self._deflater.flush(zlib.Z_SYNC_FLUSH)
        self.sock.sendall(data)

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise imaplib.IMAP4.abort("the server closed the connection")
        self._inbuf += self._inflater.decompress(chunk)

    def readline(self) -> bytes:
        if not self.deflating:
            return super().readline()
        while b"\n" not in self._inbuf:
            self._fill()
        end = self._inbuf.index(b"\n") + 1
        line, self._inbuf = self._inbuf[:end], self._inbuf[end:]
        return line

    def read(self, size: int) -> bytes:
        if not self.deflating:
            return super().read(size)
        while len(self._inbuf) < size:
            self._fill()
        data, self._inbuf = self._inbuf[:size], self._inbuf[size:]
        return data


def _sync(c: imaplib.IMAP4) -> list[Any]:
    ok(c.select("INBOX"))
    return ok(c.fetch("1:*", "(UID BODY.PEEK[])"))  # FLAGS differ: the first session has \\Recent


async def test_compress_deflate_syncs_a_folder_as_without(imap: Server) -> None:
    def dialogue() -> tuple[list[Any], list[Any], bytes, tuple[str, list[Any]]]:
        plain = imap.connect()
        expected = _sync(plain)
        plain.logout()
        c = DeflateIMAP4("127.0.0.1", imap.server.port, timeout=10)
        assert "COMPRESS=DEFLATE" not in c.capabilities  # only after login
        c.login("anna@acme.test", PASSWORD)
        assert ok(c.compress()) == [b"DEFLATE active"]
        got = _sync(c)
        ok(c.append("INBOX", None, None, message(7, "compressed")))  # a literal, compressed
        ok(c.noop())
        caps = ok(c.capability())[0]
        again = c._simple_command("COMPRESS", "DEFLATE")
        c.logout()
        return expected, got, caps, again

    expected, got, caps, (typ, data) = await run(dialogue)
    assert got == expected
    assert b"COMPRESS=DEFLATE" not in caps
    assert (typ, data) == ("NO", [b"[COMPRESSIONACTIVE] DEFLATE is active already"])


async def test_compress_is_refused_before_login_and_for_other_mechanisms(imap: Server) -> None:
    def dialogue() -> tuple[bytes, bytes]:
        with socket.create_connection(("127.0.0.1", imap.server.port), timeout=5) as sock:
            sock.recv(4096)
            sock.sendall(b"a COMPRESS DEFLATE\r\n")
            before = sock.recv(4096)
        c = imap.connect()
        typ, data = c._simple_command("COMPRESS", "LZMA")
        c.logout()
        return before, typ.encode() + b" " + data[0]

    before, other = await run(dialogue)
    assert b"a BAD COMPRESS is not allowed" in before
    assert other.startswith(b"NO unknown compression mechanism")


async def test_compress_bomb_is_bounded_and_a_corrupt_stream_closes(imap: Server) -> None:
    """20 KiB of deflate expanding to 20 MiB without a line end: a BAD, never 20 MiB buffered."""

    def bomb() -> bytes:
        c = imap.connect()
        ok(c._simple_command("COMPRESS", "DEFLATE"))
        deflater = zlib.compressobj(9, zlib.DEFLATED, -15)
        payload = deflater.compress(b"a" * (20 << 20)) + deflater.flush(zlib.Z_SYNC_FLUSH)
        assert len(payload) < 64 * 1024
        c.sock.sendall(payload)
        inflater = zlib.decompressobj(-15)
        got = b""
        c.sock.settimeout(10)
        while b"too long" not in got and b"BYE" not in got:
            chunk = c.sock.recv(65536)
            if not chunk:
                break
            got += inflater.decompress(chunk)
        c.sock.close()
        return got

    def corrupt() -> bytes:
        c = imap.connect()
        ok(c._simple_command("COMPRESS", "DEFLATE"))
        c.sock.sendall(b"\xff" * 64)  # not a deflate stream
        c.sock.settimeout(10)
        return c.sock.recv(65536)

    got = await run(bomb)
    assert b"BAD request too long" in got or b"BYE" in got, got[:200]
    assert await run(corrupt) == b""  # closed

    def others() -> None:  # and everyone else is served
        check = imap.connect()
        ok(check.noop())
        check.logout()

    await run(others)


# --------------------------------------------------------------------------- BINARY (RFC 3516)


async def test_binary_append_literal8_and_unknown_encoding(imap: Server) -> None:
    """Decoding against Dovecot is in tests/test_imap_differential.py; here what it cannot show."""
    uuencoded = (
        b"From: c@example.org\r\nSubject: old\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\n"
        b"begin 644 x\r\n#86)C\r\n`\r\nend\r\n"
    )
    with_nul = b"From: c@example.org\r\nSubject: nul\r\n\r\nA\x00B\r\n"

    def dialogue() -> tuple[bytes, bytes, bytes]:
        with socket.create_connection(("127.0.0.1", imap.server.port), timeout=10) as sock:
            sock.recv(4096)
            sock.sendall(b"a LOGIN anna@acme.test " + PASSWORD.encode() + b"\r\n")
            appended = b""
            for n, raw in enumerate((uuencoded, with_nul)):
                sock.sendall(b"b%d APPEND INBOX ~{%d+}\r\n" % (n, len(raw)) + raw + b"\r\n")
                while b"b%d " % n not in appended:
                    appended += sock.recv(65536)
            sock.sendall(b"c SELECT INBOX\r\nd FETCH 4 (BINARY.PEEK[1])\r\ne FETCH 5 (BINARY.PEEK[1])\r\n")
            out = b""
            while b"e OK" not in out and b"e NO" not in out:
                out += sock.recv(65536)
        return appended, out, out[out.index(b"* 5 FETCH") :]

    appended, unknown, nul = await run(dialogue)
    assert b"b0 OK [APPENDUID" in appended
    assert b"b1 OK [APPENDUID" in appended
    assert b"d NO [UNKNOWN-CTE]" in unknown
    assert nul.startswith(b"* 5 FETCH (BINARY[1] {4}\r\nAB\r\n)")  # NUL dropped at APPEND, as Dovecot


# --------------------------------------------------------------------------- MULTIAPPEND and CATENATE


def _exchange(port: int, lines: list[bytes]) -> list[bytes]:
    """Log in, send each command (LITERAL+ literals inline), return each one's tagged reply."""
    replies = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        buf = sock.recv(4096)
        sock.sendall(b"a LOGIN anna@acme.test " + PASSWORD.encode() + b"\r\n")
        for n, line in enumerate([b"", *lines]):
            tag = b"t%d" % n
            if line:
                sock.sendall(tag + b" " + line + b"\r\n")
            want = tag + b" " if line else b"a "
            buf = b""
            while not any(x.startswith(want) for x in buf.split(b"\r\n")):
                buf += sock.recv(1 << 20)
            if line:
                replies.append(next(x for x in buf.split(b"\r\n") if x.startswith(want)))
    return replies


def _plus(data: bytes) -> bytes:
    return b"{%d+}\r\n" % len(data) + data


async def _inbox(imap: Server) -> list[bytes]:
    def read() -> list[bytes]:
        c = imap.connect()
        ok(c.select("INBOX", readonly=True))
        data = ok(c.fetch("1:*", "(BODY.PEEK[])"))
        c.logout()
        return [part[1] for part in data if isinstance(part, tuple)]

    return await run(read)


async def test_multiappend_stores_all_or_nothing(imap: Server) -> None:
    three = b" ".join(_plus(message(n)) for n in (11, 12, 13))
    (stored,) = await run(_exchange, imap.server.port, [b"APPEND INBOX " + three])
    assert re.fullmatch(rb"t1 OK \[APPENDUID \d+ 4:6\] APPEND completed", stored), stored
    assert len(await _inbox(imap)) == 6
    big = message(16) + b"x" * 11_000_000  # the tenant's quota is 10 MB
    (refused,) = await run(
        _exchange,
        imap.server.port,
        [b"APPEND INBOX " + _plus(message(14)) + b" " + _plus(message(15)) + b" " + _plus(big)],
    )
    assert refused.startswith(b"t1 NO [OVERQUOTA]"), refused
    assert len(await _inbox(imap)) == 6  # not the first two either


async def test_append_whose_blob_cannot_be_written_stores_nothing(imap: Server) -> None:
    """Regression guard for the overlapped APPEND (2026-12-04, issue #13): the blob is written
    while the transaction runs, and the transaction names it only once it is durable. A blob
    that cannot be written fails the APPEND with a NO, stores no row, and the session goes on."""
    store = imap.server.blobs
    assert isinstance(store, FsBlobStore)
    spool = store.root / "tmp"
    shutil.rmtree(spool, ignore_errors=True)
    spool.write_bytes(b"")  # where the blob's temporary file goes: not a directory now
    replies = await run(
        _exchange, imap.server.port, [b"APPEND INBOX " + _plus(message(21)), b"STATUS INBOX (MESSAGES)"]
    )
    assert replies[0].startswith(b"t1 NO [UNAVAILABLE]"), replies
    assert replies[1].startswith(b"t2 OK"), replies
    assert len(await _inbox(imap)) == 3
    spool.unlink()
    (stored,) = await run(_exchange, imap.server.port, [b"APPEND INBOX " + _plus(message(21))])
    assert stored.startswith(b"t1 OK [APPENDUID"), stored
    assert (await _inbox(imap))[-1] == message(21)


async def test_catenate_builds_from_text_and_this_agents_messages(imap: Server) -> None:
    head = b"From: biuro@acme.test\r\nSubject: forwarded\r\n\r\nSee below:\r\n"
    url = b'"/INBOX/;UID=2/;SECTION=TEXT"'
    replies = await run(
        _exchange,
        imap.server.port,
        [
            b"APPEND INBOX CATENATE (TEXT " + _plus(head) + b" URL " + url + b")",
            b'APPEND INBOX CATENATE (URL "/INBOX/;UID=99")',  # no such message
            b'APPEND INBOX CATENATE (URL "imap://elsewhere.test/INBOX/;UID=1")',  # another server
            b'APPEND INBOX CATENATE (URL "/INBOX;UIDVALIDITY=1/;UID=1")',  # a stale UIDVALIDITY
            b'APPEND INBOX CATENATE (URL "/Other/;UID=1")',  # not a folder of this tenant
        ],
    )
    assert replies[0].startswith(b"t1 OK [APPENDUID"), replies[0]
    assert all(r.split(b" ", 3)[1:3] == [b"NO", b"[BADURL"] for r in replies[1:]), replies[1:]
    inbox = await _inbox(imap)
    assert len(inbox) == 4  # only the first was stored
    assert inbox[-1] == head + b"Body 2.\r\n"


async def test_names_that_are_not_modified_utf7_get_no_or_an_empty_list(imap: Server) -> None:
    """As Dovecot answers (tests/test_imap_differential.py has no such names): not BAD."""
    replies = await run(
        _exchange,
        imap.server.port,
        [
            b'SELECT "&Jjo"',
            b'CREATE "a&AGE-"',
            b'STATUS "&Jjo" (MESSAGES)',
            b'LIST "" "&Jjo*"',
            b'LSUB "&Jjo" "*"',
        ],
    )
    assert replies[:3] == [b"t%d NO Mailbox name is not valid mUTF-7" % n for n in (1, 2, 3)]
    assert replies[3:] == [b"t4 OK List completed", b"t5 OK Lsub completed"]


async def test_create_does_not_subscribe_and_lsub_flags_unsubscribed_parents(imap: Server) -> None:
    """As Dovecot answers (RFC 3501 6.3.3 and 6.3.9)."""

    def dialogue() -> list[list[bytes]]:
        c = imap.connect()
        ok(c.create("parent/child"))
        answers = [ok(c.lsub('""', "parent*"))]
        ok(c.subscribe("parent/child"))
        answers += [ok(c.lsub('""', "%")), ok(c.lsub('""', "parent/%")), ok(c.lsub('""', "*"))]
        ok(c.unsubscribe("parent/child"))
        answers.append(ok(c.lsub('""', "parent*")))
        c.logout()
        return answers

    created, top, below, everything, after = await run(dialogue)
    assert created == [None]
    assert b'(\\Noselect) "/" parent' in top
    assert below == [b'() "/" parent/child']
    assert b'() "/" parent/child' in everything
    assert not any(line.endswith(b'"/" parent') for line in everything)
    assert after == [None]


async def test_list_extended_and_list_status_answer_as_dovecot_does(imap: Server) -> None:
    """RFC 5258 and 5819, in the forms Dovecot 2.3 answers (its delimiter is "." where ours is "/")."""
    replies = await run(
        _exchange_untagged,
        imap.server.port,
        [
            b'CREATE "parent/child"',
            b'CREATE "solo"',
            b'SUBSCRIBE "parent/child"',
            b'SUBSCRIBE "solo"',
            b'LIST (SUBSCRIBED RECURSIVEMATCH) "" "%"',
            b'LIST "" "solo" RETURN (STATUS (MESSAGES UNSEEN))',
            b'LIST "" ("solo" "parent") RETURN (CHILDREN SUBSCRIBED)',
            b'LIST (SPECIAL-USE) "" "*"',
            b'LIST "" "Spam"',
        ],
    )
    recursive, status, children, special, basic = replies[4:]
    assert b'* LIST () "/" parent (CHILDINFO ("SUBSCRIBED"))' in recursive
    assert b'* LIST (\\Subscribed) "/" solo' in recursive
    assert status == [b'* LIST () "/" solo', b"* STATUS solo (MESSAGES 0 UNSEEN 0)"]
    assert sorted(children) == [
        b'* LIST (\\HasChildren) "/" parent',
        b'* LIST (\\Subscribed \\HasNoChildren) "/" solo',
    ]
    assert all(b"\\Has" not in line for line in special)
    assert b'* LIST (\\Junk) "/" Spam' in special
    assert basic == [b'* LIST (\\HasNoChildren \\Junk) "/" Spam']


def _exchange_untagged(port: int, lines: list[bytes]) -> list[list[bytes]]:
    """Log in, send each command, return each one's untagged responses (it must end OK)."""
    out = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.recv(4096)
        sock.sendall(b"a LOGIN anna@acme.test " + PASSWORD.encode() + b"\r\n")
        buf = b""
        while b"a OK" not in buf:
            buf += sock.recv(65536)
        for n, line in enumerate(lines):
            tag = b"u%d " % n
            sock.sendall(tag + line + b"\r\n")
            buf = b""
            while not any(x.startswith(tag) for x in buf.split(b"\r\n")):
                buf += sock.recv(65536)
            answer = buf.split(b"\r\n")
            assert any(x.startswith(tag + b"OK") for x in answer), answer
            out.append([x for x in answer if x.startswith(b"* ")])
    return out


async def test_sort_on_an_empty_folder_and_in_order(imap: Server) -> None:
    """The order itself is compared with Dovecot's in tests/test_imap_differential.py."""
    answers = await run(
        _exchange_untagged,
        imap.server.port,
        [
            b"SELECT Drafts",
            b"SORT (DATE) UTF-8 ALL",
            b"SELECT INBOX",
            b"SORT (REVERSE SUBJECT) UTF-8 ALL",
            b"UID SORT (SUBJECT) UTF-8 NOT DELETED",
        ],
    )
    empty, inbox, by_uid = answers[1], answers[3], answers[4]
    assert empty == [b"* SORT"]
    assert inbox[-1] == b"* SORT 3 2 1"
    assert by_uid[-1] == b"* SORT 1 2 3"


def _raw_session(port: int, lines: list[bytes]) -> list[bytes]:
    """Log in and select INBOX, send each line (its own tag first), return everything answered to each."""
    out = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.recv(4096)
        for line in [b"a LOGIN anna@acme.test " + PASSWORD.encode(), b"b SELECT INBOX", *lines]:
            tag = line.split(b" ", 1)[0] + b" "
            sock.sendall(line + b"\r\n")
            buf = b""
            while not any(x.startswith(tag) for x in buf.split(b"\r\n")):
                buf += sock.recv(65536)
            out.append(buf)
    return out[2:]


async def test_updating_search_tag_in_use_is_refused(imap: Server) -> None:
    """RFC 5267 4.3: an updating search's tag names it until CANCELUPDATE; reusing it is BAD, and
    the first search keeps its updates."""
    first, again, store, cancel, reuse = await run(
        _raw_session,
        imap.server.port,
        [
            b"d1 SEARCH RETURN (UPDATE) UNSEEN",
            b"d1 SEARCH RETURN (UPDATE) ALL",
            b"d2 STORE 2 +FLAGS (\\Seen)",
            b'd3 CANCELUPDATE "d1"',
            b"d1 SEARCH RETURN (UPDATE COUNT) UNSEEN",
        ],
    )
    assert first.startswith(b'* ESEARCH (TAG "d1")\r\nd1 OK')
    assert again == b"d1 BAD Duplicate search update tag\r\n"
    assert b'* ESEARCH (TAG "d1") REMOVEFROM (0 2)\r\nd2 OK' in store
    assert cancel == b"d3 OK Updates cancelled.\r\n"
    assert reuse.startswith(b'* ESEARCH (TAG "d1") COUNT 2\r\nd1 OK')

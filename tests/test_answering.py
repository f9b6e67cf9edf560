"""The shared inbox in any mail client (issue #19): "answering" marks from drafts, collision warnings,
answered-by marks. Real listeners in-process (the submission and IMAP servers), imaplib, smtplib and a
raw IDLE socket as the clients.
"""

from __future__ import annotations

import imaplib
import smtplib
import socket
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from gateway.answering import Sweeper, keyword_name
from gateway.config import OutboundLimits, parse_config
from gateway.metrics import DatabaseCollector
from gateway.smtp.hourly import HourlyLimits
from storage import events
from storage.models import AnsweringMark, Event, Message
from tests.conftest import config_dict
from tests.test_relay import HASH, PASSWORD, SENDER, Gateway, asend
from tests.test_sent_copies import gateway_with_imap, run, submit

pytestmark = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning")

CUSTOMER = (
    b"From: Customer <customer@example.org>\r\nTo: biuro@acme.test\r\nSubject: order 17\r\n"
    b"Date: Wed, 02 Dec 2026 09:00:00 +0100\r\nMessage-ID: <order-17@example.org>\r\n\r\nWhere is it?\r\n"
)
DRAFT = (
    b"From: Anna <anna@acme.test>\r\nTo: customer@example.org\r\nSubject: Re: order 17\r\n"
    b"In-Reply-To: <order-17@example.org>\r\nReferences: <order-17@example.org>\r\n"
    b"Message-ID: <draft-1@acme.test>\r\n\r\nIt ships\r\n"
)
REPLY = DRAFT.replace(b"<draft-1@acme.test>", b"<reply-1@acme.test>")


def config(tmp_path: Path, db_url: str, **tenant: object) -> object:
    """Agents Anna Nowak and Piotr; ``tenant``: more tenant keys."""
    data = config_dict(tmp_path, db_url)
    data["tenants"][0].update(tenant)
    data["tenants"][0]["agents"] = [
        {"login": "anna@acme.test", "name": "Anna Nowak", "password_hash": HASH},
        {"login": "piotr@acme.test", "name": "Piotr", "password_hash": HASH},
    ]
    data["tenants"][0]["smtp"] = {"host": "127.0.0.1", "port": 9, "security": "none", "from": SENDER}
    return parse_config(data)


def client(port: int, login: str) -> imaplib.IMAP4:
    c = imaplib.IMAP4("127.0.0.1", port, timeout=10)
    c.login(login, PASSWORD)
    return c


def append(port: int, login: str, folder: str, data: bytes) -> None:
    c = client(port, login)
    typ, answer = c.append(folder, "", None, data)
    assert typ == "OK", answer
    c.logout()


def flags(port: int, folder: str = "INBOX") -> str:
    c = client(port, "piotr@acme.test")
    c.select(folder, readonly=True)
    _typ, data = c.fetch("1", "(FLAGS)")
    c.logout()
    return str(data[0])


class Idler:
    """Agent B's raw IMAP session, idling in INBOX."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.buf = b""
        self.read_until(b"* OK")
        self.command(b"a1 LOGIN piotr@acme.test " + PASSWORD.encode(), b"a1 OK")
        self.command(b"a2 SELECT INBOX", b"a2 OK")
        self.sock.sendall(b"a3 IDLE\r\n")
        self.read_until(b"+ ")

    def command(self, line: bytes, until: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.read_until(until)

    def read_until(self, marker: bytes, seconds: float = 5.0) -> bytes:
        deadline = time.monotonic() + seconds
        while marker not in self.buf:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.sock.recv(65536)
            assert chunk, self.buf
            self.buf += chunk
        out, _, self.buf = self.buf.partition(marker)
        rest, _, self.buf = self.buf.partition(b"\r\n")
        return out + marker + rest


def test_keyword_names(tmp_path: Path) -> None:
    data = config_dict(tmp_path, "")
    data["tenants"][0]["agents"] = [
        {"login": "anna@acme.test", "name": "Anna Nowak", "password_hash": HASH},
        {"login": "ak@acme.test", "name": "Anna Kowalska", "password_hash": HASH},
        {"login": "lukasz@acme.test", "name": "Łukasz Żółw", "password_hash": HASH},
        {"login": "jan.k@acme.test", "password_hash": HASH},
    ]
    tenant = parse_config(data).tenant("acme")
    assert keyword_name(tenant, "anna@acme.test") == "AnnaNowak"  # two agents named Anna
    assert keyword_name(tenant, "ak@acme.test") == "AnnaKowalska"
    assert keyword_name(tenant, "lukasz@acme.test") == "Lukasz"
    assert keyword_name(tenant, "jan.k@acme.test") == "Jank"


async def collisions(g: Gateway) -> int:
    async with g.db.read() as s:
        return int(await s.scalar(select(func.count()).where(Event.kind == "collision")) or 0)


async def test_draft_marks_reach_idle_then_the_reply_answered_by(tmp_path: Path, db_url: str) -> None:
    async with gateway_with_imap(config(tmp_path, db_url)) as (g, port):  # type: ignore[arg-type]
        await run(append, port, "piotr@acme.test", "INBOX", CUSTOMER)
        idler = await run(Idler, port)
        start = time.monotonic()
        await run(append, port, "anna@acme.test", "Drafts", DRAFT)
        line = (await run(idler.read_until, b"FETCH", 1.0)).rpartition(b"\r\n")[2]
        took = time.monotonic() - start
        assert b"$AnsweringAnna" in line, line
        assert b"$Answering " in line, line
        assert took < 1.0
        # B opens the message (a non-PEEK body fetch): one collision warning, once.
        await run(idler.command, b"DONE", b"a3 OK")
        await run(idler.command, b"a4 FETCH 1 BODY[]", b"a4 OK")
        await run(idler.command, b"a5 FETCH 1 BODY[]", b"a5 OK")
        assert await collisions(g) == 1
        collector = DatabaseCollector(g.current, g.db)  # what /metrics serves
        await collector.refresh()
        family = next(f for f in collector.collect() if f.name == "mailgate_agent_collisions")
        counted = {s.labels["agent"]: s.value for s in family.samples if s.name.endswith("_total")}
        assert counted == {"anna@acme.test": 0, "piotr@acme.test": 1}
        # A sends the reply: the marks go, \Answered and A's answered-by come, and B sees them.
        await run(idler.command, b"a6 IDLE", b"+ ")
        await run(submit, g.submission.port, "anna@acme.test", REPLY)
        line = (await run(idler.read_until, b"FETCH", 2.0)).rpartition(b"\r\n")[2]
        assert b"$AnsweredByAnna" in line, line
        assert b"\\Answered" in line, line
        final = await run(flags, port)
        assert "\\Answered" in final, final
        assert "$AnsweredByAnna" in final, final
        assert "$Answering" not in final, final
        async with g.db.read() as s:
            assert await s.scalar(select(func.count()).select_from(AnsweringMark)) == 0
            stats = {
                a.login: a for a in await events.agent_stats(s, "acme", datetime(2000, 1, 1, tzinfo=UTC))
            }
        # `stats agents`: B's collision warning; A's reply and its first-response time.
        assert stats["piotr@acme.test"].collisions == 1
        assert stats["anna@acme.test"].replies == 1
        assert len(stats["anna@acme.test"].first_responses) == 1
        idler.sock.close()


async def test_marks_end_when_the_draft_is_deleted_or_abandoned(tmp_path: Path, db_url: str) -> None:
    async with gateway_with_imap(config(tmp_path, db_url)) as (g, port):  # type: ignore[arg-type]
        now = datetime.now(UTC)
        clock = [now]
        sweeper = Sweeper(g.current, g.db, g.changes, clock=lambda: clock[0])
        await run(append, port, "piotr@acme.test", "INBOX", CUSTOMER)
        await run(append, port, "piotr@acme.test", "Archive", CUSTOMER)  # a copy: marked too
        await run(append, port, "anna@acme.test", "Drafts", DRAFT)
        assert "$AnsweringAnna" in await run(flags, port, "Archive")
        # Abandoned: nothing before the expiry (2 h), everything after it.
        clock[0] = now + timedelta(hours=1, minutes=59)
        assert await sweeper.sweep() == 0
        clock[0] = now + timedelta(hours=2, minutes=1)
        assert await sweeper.sweep() == 1
        for folder in ("INBOX", "Archive"):
            assert "$Answering" not in await run(flags, port, folder)
        # Deleted: a new draft marks again; expunging it ends the marks at the next sweep.
        clock[0] = datetime.now(UTC)
        await run(append, port, "anna@acme.test", "Drafts", DRAFT)
        assert "$AnsweringAnna" in await run(flags, port)

        def delete_drafts() -> None:
            c = client(port, "anna@acme.test")
            c.select("Drafts")
            c.store("1:*", "+FLAGS", "\\Deleted")
            c.expunge()
            c.logout()

        await run(delete_drafts)
        assert await sweeper.sweep() == 1
        assert "$Answering" not in await run(flags, port)
        async with g.db.read() as s:
            query = select(Message.keywords).where(Message.message_id == "<order-17@example.org>")
            kw = await s.scalars(query)
            assert all("$Answering" not in k for k in kw.all())


NOTE = (
    b"From: Piotr <piotr@acme.test>\r\nTo: notes@acme.test\r\nSubject: Re: order 17\r\n"
    b"In-Reply-To: <order-17@example.org>\r\nReferences: <order-17@example.org>\r\n"
    b"Message-ID: <note-1@acme.test>\r\n\r\nVIP customer, ship first\r\n"
)


def send_as(port: int, login: str, rcpts: list[str], data: bytes) -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
        c.login(login, PASSWORD)
        c.sendmail(SENDER, rcpts, data)
        return "ok"


def thread_and_notes(port: int) -> tuple[bytes, list[str]]:
    c = client(port, "anna@acme.test")
    c.select("INBOX", readonly=True)
    _typ, threads = c.uid("THREAD", "REFERENCES", "UTF-8", "ALL")
    _typ, found = c.uid("SEARCH", "KEYWORD", "$Note")
    subjects = []
    for uid in found[0].split():
        _typ, data = c.uid("FETCH", uid, "(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        subjects.append(str(data[0]))
    c.logout()
    return threads[0], subjects


async def test_notes_are_filed_in_the_thread_and_never_relayed(tmp_path: Path, db_url: str) -> None:
    async with gateway_with_imap(config(tmp_path, db_url)) as (g, port):  # type: ignore[arg-type]
        await run(append, port, "piotr@acme.test", "INBOX", CUSTOMER)
        await run(send_as, g.submission.port, "piotr@acme.test", ["notes@acme.test"], NOTE)
        threads, notes = await run(thread_and_notes, port)
        assert threads == b"(1 2)", threads  # the note (UID 2) under the customer's message
        assert len(notes) == 1
        assert "[Note] Re: order 17" in notes[0], notes
        assert "$Note" in notes[0], notes
        assert await g.queued() == []  # nothing for the smarthost
        assert await g.folder("Sent") == []  # and no \Sent copy
        # A reply-all: the customer gets the reply without the notes address, the note is filed.
        both = NOTE.replace(b"<note-1@acme.test>", b"<reply-2@acme.test>")
        await run(
            send_as, g.submission.port, "piotr@acme.test", ["customer@example.org", "notes@acme.test"], both
        )
        queued = await g.queued()
        assert [list(rcpts) for _row, rcpts in queued] == [["customer@example.org"]]
        _threads, notes = await run(thread_and_notes, port)
        assert len(notes) == 2


async def test_mail_to_the_notes_address_from_outside_is_refused(tmp_path: Path, db_url: str) -> None:
    async with gateway_with_imap(config(tmp_path, db_url)) as (g, _port):  # type: ignore[arg-type]
        reply = await asend(g.smtp.port, "customer@example.org", ["notes@acme.test"], CUSTOMER)
        assert reply.startswith("550 5.7.1 <notes@acme.test>"), reply
        assert await g.folder("INBOX") == []


async def test_a_note_takes_no_place_in_the_hourly_outbound_limits(tmp_path: Path, db_url: str) -> None:
    async with gateway_with_imap(config(tmp_path, db_url)) as (g, port):  # type: ignore[arg-type]
        one = OutboundLimits(agent_messages_per_hour=1, agent_recipients_per_hour=1)
        g.outbox.hourly = HourlyLimits(lambda: one, time.monotonic)
        await run(append, port, "piotr@acme.test", "INBOX", CUSTOMER)
        sub = g.submission.port
        assert await run(send_as, sub, "piotr@acme.test", ["notes@acme.test"], NOTE) == "ok"
        # The reply-all: one message, one recipient outside (the notes address is not one).
        both = NOTE.replace(b"<note-1@acme.test>", b"<reply-2@acme.test>")
        assert await run(send_as, sub, "piotr@acme.test", ["customer@example.org", "notes@acme.test"], both)
        assert await run(send_as, sub, "piotr@acme.test", ["notes@acme.test"], NOTE) == "ok"
        with pytest.raises(smtplib.SMTPDataError, match="Hourly sending limit reached: 1 messages per hour"):
            await run(send_as, sub, "piotr@acme.test", ["customer@example.org"], REPLY)
        _threads, notes = await run(thread_and_notes, port)
        assert len(notes) == 3


async def test_a_note_alone_over_the_quota_is_refused(tmp_path: Path, db_url: str) -> None:
    quota = len(CUSTOMER) + len(NOTE) // 2  # the customer's message fits, a note after it does not
    async with gateway_with_imap(config(tmp_path, db_url, quota=quota)) as (g, port):  # type: ignore[arg-type]
        await run(append, port, "piotr@acme.test", "INBOX", CUSTOMER)
        with pytest.raises(smtplib.SMTPDataError) as refused:
            await run(send_as, g.submission.port, "piotr@acme.test", ["notes@acme.test"], NOTE)
        assert (refused.value.smtp_code, refused.value.smtp_error) == (
            452,
            b"4.2.2 Mailbox full, try again later",
        )
        assert len(await g.folder("INBOX")) == 1
        # A reply-all's note copy is kept whatever the quota, as the \Sent copy is: the reply goes.
        both = NOTE.replace(b"<note-1@acme.test>", b"<reply-2@acme.test>")
        await run(
            send_as, g.submission.port, "piotr@acme.test", ["customer@example.org", "notes@acme.test"], both
        )
        assert len(await g.queued()) == 1
        assert len(await g.folder("INBOX")) == 2


async def test_opening_in_an_examine_session_counts_a_collision(tmp_path: Path, db_url: str) -> None:
    async with gateway_with_imap(config(tmp_path, db_url)) as (g, port):  # type: ignore[arg-type]
        await run(append, port, "piotr@acme.test", "INBOX", CUSTOMER)
        await run(append, port, "anna@acme.test", "Drafts", DRAFT)

        def examine_and_fetch(item: str) -> str:
            c = client(port, "piotr@acme.test")
            assert c.select("INBOX", readonly=True)[0] == "OK"  # EXAMINE
            typ, data = c.fetch("1", f"({item} FLAGS)")
            assert typ == "OK", data
            c.logout()
            return str(data[0])

        await run(examine_and_fetch, "BODY.PEEK[]")
        assert await collisions(g) == 0  # a peek is not opening
        fetched = await run(examine_and_fetch, "BODY[]")
        assert await collisions(g) == 1
        await run(examine_and_fetch, "RFC822")
        assert await collisions(g) == 1  # once per agent and message
        assert "\\Seen" not in fetched  # read-only: not \Seen
        assert "\\Seen" not in await run(flags, port)

"""The IMAP command framer and parser: real clients' commands, hostile input, bounds."""

from __future__ import annotations

import contextlib
import re
import time
from datetime import UTC, date, datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import mutf7
from gateway.imap import imapurl, sort
from gateway.imap import wire as imap_wire
from gateway.imap.commands import (
    Append,
    AppendMessage,
    Authenticate,
    CancelUpdate,
    CatenatePart,
    Command,
    Copy,
    Enable,
    Fetch,
    FetchAtt,
    GetQuota,
    Id,
    List,
    Login,
    MailboxCommand,
    QResync,
    Rename,
    Returns,
    Search,
    SearchKey,
    Section,
    Select,
    SeqSet,
    Simple,
    Sort,
    Status,
    Store,
    UidExpunge,
)
from gateway.imap.parser import (
    MAX_LINE,
    Event,
    Framer,
    Line,
    LiteralTooLarge,
    NeedContinuation,
    ParseError,
    TooLong,
    is_done,
    parse,
)

# --------------------------------------------------------------------------- helpers

RFC3501_MESSAGE = (
    b"Date: Mon, 7 Feb 1994 21:52:25 -0800 (PST)\r\n"
    b"From: Fred Foobar <foobar@Blurdybloop.COM>\r\n"
    b"Subject: afternoon meeting\r\n"
    b"To: mooch@owatagu.siam.edu\r\n"
    b"Message-Id: <B27397-0100000@Blurdybloop.COM>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: TEXT/PLAIN; CHARSET=US-ASCII\r\n"
    b"\r\n"
    b"Hello Joe, do you think we can meet at 3:30 tomorrow?\r\n"
)
THUNDERBIRD_HEADERS = (
    "From To Cc Bcc Subject Date Message-ID Priority X-Priority References Newsgroups "
    "In-Reply-To Content-Type Reply-To"
)
MUTT_HEADERS = (
    "DATE FROM SENDER SUBJECT TO CC MESSAGE-ID REFERENCES CONTENT-TYPE CONTENT-DESCRIPTION "
    "IN-REPLY-TO REPLY-TO LINES LIST-POST X-LABEL X-ORIGINAL-TO"
)


def append1(
    tag: str, name: str, mailbox: str, flags: tuple[str, ...], date: datetime | None, message: bytes
) -> Append:
    """An APPEND of one message."""
    return Append(tag, name, mailbox, (AppendMessage(flags, date, message),))


def lit(data: bytes, *, plus: bool = False) -> bytes:
    """A literal as a client sends it (announcement, CRLF, data)."""
    return b"{%d%s}\r\n" % (len(data), b"+" if plus else b"") + data


def wire(data: str | bytes) -> bytes:
    """A command as sent: text as UTF-8, then CRLF (unless the text ends with its own LF)."""
    if isinstance(data, str):
        return data.encode() if data.endswith("\n") else data.encode() + b"\r\n"
    return data + b"\r\n"


def drain(framer: Framer) -> list[Event]:
    out: list[Event] = []
    while (event := framer.next_event()) is not None:
        out.append(event)
    return out


def events(chunks: bytes | list[bytes], **limits: int) -> list[Event]:
    """Every event of a stream fed in ``chunks``, pulling events after each feed."""
    framer = Framer(**limits)
    out: list[Event] = []
    for chunk in [chunks] if isinstance(chunks, bytes) else chunks:
        framer.feed(chunk)
        out += drain(framer)
    return out


def lines(stream: bytes, **limits: int) -> list[Line]:
    return [e for e in events(stream, **limits) if isinstance(e, Line)]


def one(data: str | bytes) -> Command:
    """The one command in ``data`` (a command as sent, literals included)."""
    (line,) = lines(wire(data))
    return parse(line)


def seq(*ranges: tuple[int | None, int | None] | int) -> SeqSet:
    return SeqSet(tuple((r, r) if isinstance(r, int) else r for r in ranges))


ALL_UIDS = seq((1, None))


def k(op: str, *args: str | int | date | SeqSet | SearchKey) -> SearchKey:
    return SearchKey(op, args)


def and_(*keys: SearchKey) -> SearchKey:
    return SearchKey("AND", keys)


def att(name: str) -> FetchAtt:
    return FetchAtt(name)


def body(
    part: tuple[int, ...] = (),
    text: str | None = None,
    fields: str = "",
    *,
    peek: bool = False,
    partial: tuple[int, int] | None = None,
) -> FetchAtt:
    section = Section(part, text, tuple(fields.upper().split()))  # type: ignore[arg-type]
    return FetchAtt("BODY", section, partial, peek)


def fetch(tag: str, sequence: SeqSet, *atts: FetchAtt, uid: bool = True, since: int | None = None) -> Fetch:
    return Fetch(tag, "FETCH", uid, sequence, atts, since)


# --------------------------------------------------------------------------- parsing: accepted

RFC3501: list[tuple[str | bytes, Command]] = [
    ("a001 CAPABILITY", Simple("a001", "CAPABILITY")),
    ("a002 NOOP", Simple("a002", "NOOP")),
    ("A023 LOGOUT", Simple("A023", "LOGOUT")),
    ("a002 STARTTLS", Simple("a002", "STARTTLS")),
    ("A001 AUTHENTICATE GSSAPI", Authenticate("A001", "AUTHENTICATE", "GSSAPI")),
    ("a001 LOGIN SMITH SESAME", Login("a001", "LOGIN", "SMITH", "SESAME")),
    ("A142 SELECT INBOX", Select("A142", "SELECT", "INBOX")),
    ("A932 EXAMINE blurdybloop", Select("A932", "EXAMINE", "blurdybloop")),
    ("A003 CREATE owatagusiam/", MailboxCommand("A003", "CREATE", "owatagusiam/")),
    ("A683 DELETE blurdybloop", MailboxCommand("A683", "DELETE", "blurdybloop")),
    ("A683 RENAME blurdybloop sarasoop", Rename("A683", "RENAME", "blurdybloop", "sarasoop")),
    ("A002 SUBSCRIBE #news.comp.mail.mime", MailboxCommand("A002", "SUBSCRIBE", "#news.comp.mail.mime")),
    ("A002 UNSUBSCRIBE #news.comp.mail.mime", MailboxCommand("A002", "UNSUBSCRIBE", "#news.comp.mail.mime")),
    ('A101 LIST "" ""', List("A101", "LIST", "", ("",))),
    ('A102 LIST #news.comp.mail.misc ""', List("A102", "LIST", "#news.comp.mail.misc", ("",))),
    ('A103 LIST /usr/staff/jones ""', List("A103", "LIST", "/usr/staff/jones", ("",))),
    ("A202 LIST ~/Mail/ %", List("A202", "LIST", "~/Mail/", ("%",))),
    ('A002 LSUB "#news." "comp.mail.*"', List("A002", "LSUB", "#news.", ("comp.mail.*",))),
    (
        "A042 STATUS blurdybloop (UIDNEXT MESSAGES)",
        Status("A042", "STATUS", "blurdybloop", ("UIDNEXT", "MESSAGES")),
    ),
    (
        b"A003 APPEND saved-messages (\\Seen) " + lit(RFC3501_MESSAGE),
        append1("A003", "APPEND", "saved-messages", ("\\Seen",), None, RFC3501_MESSAGE),
    ),
    ("FXXZ CHECK", Simple("FXXZ", "CHECK")),
    ("A341 CLOSE", Simple("A341", "CLOSE")),
    ("A202 EXPUNGE", Simple("A202", "EXPUNGE")),
    (
        'A282 SEARCH FLAGGED SINCE 1-Feb-1994 NOT FROM "Smith"',
        Search(
            "A282",
            "SEARCH",
            False,
            None,
            and_(k("FLAGGED"), k("SINCE", date(1994, 2, 1)), k("NOT", k("FROM", "Smith"))),
        ),
    ),
    (
        'A283 SEARCH TEXT "string not in mailbox"',
        Search("A283", "SEARCH", False, None, and_(k("TEXT", "string not in mailbox"))),
    ),
    (
        b"A284 SEARCH CHARSET UTF-8 TEXT " + lit("résumé".encode()),
        Search("A284", "SEARCH", False, "UTF-8", and_(k("TEXT", "résumé"))),
    ),
    (
        "A654 FETCH 2:4 (FLAGS BODY[HEADER.FIELDS (DATE FROM)])",
        fetch("A654", seq((2, 4)), att("FLAGS"), body(text="HEADER.FIELDS", fields="DATE FROM"), uid=False),
    ),
    (
        "A003 STORE 2:4 +FLAGS (\\Deleted)",
        Store("A003", "STORE", False, seq((2, 4)), "add", False, ("\\Deleted",)),
    ),
    ("A003 COPY 2:4 MEETING", Copy("A003", "COPY", False, seq((2, 4)), "MEETING")),
    ("A999 UID FETCH 4827313:4828442 FLAGS", fetch("A999", seq((4827313, 4828442)), att("FLAGS"))),
    (b"A001 LOGIN {11}\r\nFRED FOOBAR {7}\r\nfat man", Login("A001", "LOGIN", "FRED FOOBAR", "fat man")),
]

THUNDERBIRD: list[tuple[str | bytes, Command]] = [
    ("1 capability", Simple("1", "CAPABILITY")),
    (
        '3 ID ("name" "Thunderbird" "version" "115.5.0")',
        Id("3", "ID", (("name", "Thunderbird"), ("version", "115.5.0"))),
    ),
    ('4 select "INBOX" (CONDSTORE)', Select("4", "SELECT", "INBOX", condstore=True)),
    # RFC 7162 3.2.5's examples: QRESYNC with known UIDs and sequence match data.
    (
        "A03 SELECT INBOX (QRESYNC (67890007 20050715194045000 41,43:211,214:541))",
        Select(
            "A03",
            "SELECT",
            "INBOX",
            qresync=QResync(67890007, 20050715194045000, SeqSet(((41, 41), (43, 211), (214, 541)))),
        ),
    ),
    (
        "B04 examine INBOX (CONDSTORE QRESYNC (67890007 90060115194045000 41:211,214:541 (1:2 41:42)))",
        Select(
            "B04",
            "EXAMINE",
            "INBOX",
            condstore=True,
            qresync=QResync(
                67890007,
                90060115194045000,
                SeqSet(((41, 211), (214, 541))),
                (SeqSet(((1, 2),)), SeqSet(((41, 42),))),
            ),
        ),
    ),
    ("A04 SELECT INBOX (QRESYNC (1 2))", Select("A04", "SELECT", "INBOX", qresync=QResync(1, 2))),
    ("A07 SELECT INBOX ()", Select("A07", "SELECT", "INBOX")),
    (
        "A05 UID FETCH 300:500 (FLAGS) (CHANGEDSINCE 12345 VANISHED)",
        Fetch("A05", "FETCH", True, SeqSet(((300, 500),)), (att("FLAGS"),), 12345, True),
    ),
    (
        "A06 UID FETCH 300:500 (FLAGS) (VANISHED CHANGEDSINCE 12345)",
        Fetch("A06", "FETCH", True, SeqSet(((300, 500),)), (att("FLAGS"),), 12345, True),
    ),
    ("5 UID fetch 1:* (FLAGS)", fetch("5", ALL_UIDS, att("FLAGS"))),
    ("6 UID fetch 1:* (FLAGS) (CHANGEDSINCE 12345)", fetch("6", ALL_UIDS, att("FLAGS"), since=12345)),
    (
        f"7 UID fetch 42 (UID RFC822.SIZE FLAGS BODY.PEEK[HEADER.FIELDS ({THUNDERBIRD_HEADERS})])",
        fetch(
            "7",
            seq(42),
            att("UID"),
            att("RFC822.SIZE"),
            att("FLAGS"),
            body(text="HEADER.FIELDS", fields=THUNDERBIRD_HEADERS, peek=True),
        ),
    ),
    (
        "8 UID fetch 42 (UID RFC822.SIZE BODY.PEEK[]<0.16384>)",
        fetch("8", seq(42), att("UID"), att("RFC822.SIZE"), body(peek=True, partial=(0, 16384))),
    ),
    (
        "9 UID fetch 42 (UID RFC822.SIZE BODY.PEEK[1.MIME] BODY.PEEK[1.2])",
        fetch(
            "9",
            seq(42),
            att("UID"),
            att("RFC822.SIZE"),
            body((1,), "MIME", peek=True),
            body((1, 2), peek=True),
        ),
    ),
    ("10 IDLE", Simple("10", "IDLE")),
    (
        '11 list (SUBSCRIBED) "" "*" RETURN (SPECIAL-USE)',
        List("11", "LIST", "", ("*",), ("SUBSCRIBED",), ("SPECIAL-USE",)),
    ),
    ('12 lsub "" "*"', List("12", "LSUB", "", ("*",))),
    ("13 UID store 42 +Flags (\\Seen)", Store("13", "STORE", True, seq(42), "add", False, ("\\Seen",))),
    ('14 getquotaroot "INBOX"', MailboxCommand("14", "GETQUOTAROOT", "INBOX")),
    ("15 namespace", Simple("15", "NAMESPACE")),
    ('16 UID move 42 "Trash"', Copy("16", "MOVE", True, seq(42), "Trash")),
    (
        "17a FETCH 1 (BINARY.PEEK[1.2]<0.10> BINARY[] BINARY.SIZE[2])",
        fetch(
            "17a",
            seq(1),
            FetchAtt("BINARY", Section((1, 2)), (0, 10), True),
            FetchAtt("BINARY", Section(()), None, False),
            FetchAtt("BINARY.SIZE", Section((2,)), None, True),
            uid=False,
        ),
    ),
    (  # MULTIAPPEND (RFC 3502)
        b"17c APPEND INBOX (\\Seen) "
        + lit(b"one")
        + b" "
        + lit(b"two", plus=True)
        + b' "1-Feb-2024 10:00:00 +0000" ~'
        + lit(b"three"),
        Append(
            "17c",
            "APPEND",
            "INBOX",
            (
                AppendMessage(("\\Seen",), None, b"one"),
                AppendMessage((), None, b"two"),
                AppendMessage((), datetime(2024, 2, 1, 10, tzinfo=UTC), b"three"),
            ),
        ),
    ),
    (  # CATENATE (RFC 4469)
        b"17d APPEND Drafts CATENATE (TEXT "
        + lit(b"Subject: x\r\n\r\n")
        + b' URL "/INBOX;UIDVALIDITY=9/;UID=3/;SECTION=1")',
        Append(
            "17d",
            "APPEND",
            "Drafts",
            (
                AppendMessage(
                    (),
                    None,
                    catenate=(
                        CatenatePart(text=b"Subject: x\r\n\r\n"),
                        CatenatePart(url="/INBOX;UIDVALIDITY=9/;UID=3/;SECTION=1"),
                    ),
                ),
            ),
        ),
    ),
    (  # literal8 (RFC 3516)
        b'17b append "Sent" ~' + lit(b"Subject: x\r\n\r\nh\x00i\r\n"),
        append1("17b", "APPEND", "Sent", (), None, b"Subject: x\r\n\r\nh\x00i\r\n"),
    ),
    (
        b'17 append "Sent" (\\Seen) ' + lit(b"Subject: x\r\n\r\nhi\r\n"),
        append1("17", "APPEND", "Sent", ("\\Seen",), None, b"Subject: x\r\n\r\nhi\r\n"),
    ),
    (
        '18 STATUS "Sent" (UIDNEXT MESSAGES UNSEEN RECENT)',
        Status("18", "STATUS", "Sent", ("UIDNEXT", "MESSAGES", "UNSEEN", "RECENT")),
    ),
    ("19 authenticate PLAIN AHVzZXIAcGFzcw==", Authenticate("19", "AUTHENTICATE", "PLAIN", b"\0user\0pass")),
    ("20 UID expunge 42:44", UidExpunge("20", "EXPUNGE", seq((42, 44)))),
    ("21 enable CONDSTORE", Enable("21", "ENABLE", ("CONDSTORE",))),
    ("22 logout", Simple("22", "LOGOUT")),
]

OUTLOOK: list[tuple[str | bytes, Command]] = [
    ('sv4r LOGIN user@example.com "p@ss w0rd"', Login("sv4r", "LOGIN", "user@example.com", "p@ss w0rd")),
    ("sv4s ID NIL", Id("sv4s", "ID", None)),
    ('A3 LIST "" "*"', List("A3", "LIST", "", ("*",))),
    (
        "A4 UID FETCH 1:* (UID FLAGS INTERNALDATE RFC822.SIZE)",
        fetch("A4", ALL_UIDS, att("UID"), att("FLAGS"), att("INTERNALDATE"), att("RFC822.SIZE")),
    ),
    ("A5 UID FETCH 7 (UID BODY.PEEK[])", fetch("A5", seq(7), att("UID"), body(peek=True))),
    (
        "A6 UID SEARCH SINCE 1-Feb-2024",
        Search("A6", "SEARCH", True, None, and_(k("SINCE", date(2024, 2, 1)))),
    ),
    (
        "A7 UID STORE 7 -FLAGS.SILENT (\\Seen)",
        Store("A7", "STORE", True, seq(7), "remove", True, ("\\Seen",)),
    ),
    ('A8 EXAMINE "Sent Items"', Select("A8", "EXAMINE", "Sent Items")),
]

MUTT: list[tuple[str | bytes, Command]] = [
    ('a0003 SELECT "INBOX"', Select("a0003", "SELECT", "INBOX")),
    (
        f"a0005 FETCH 1:5 (UID FLAGS INTERNALDATE RFC822.SIZE BODY.PEEK[HEADER.FIELDS ({MUTT_HEADERS})])",
        fetch(
            "a0005",
            seq((1, 5)),
            att("UID"),
            att("FLAGS"),
            att("INTERNALDATE"),
            att("RFC822.SIZE"),
            body(text="HEADER.FIELDS", fields=MUTT_HEADERS, peek=True),
            uid=False,
        ),
    ),
    ("a0006 UID FETCH 5 BODY.PEEK[]", fetch("a0006", seq(5), body(peek=True))),
    (
        "a0007 UID STORE 5 +FLAGS.SILENT (\\Seen)",
        Store("a0007", "STORE", True, seq(5), "add", True, ("\\Seen",)),
    ),
    (
        'a0008 STATUS "INBOX" (MESSAGES RECENT UNSEEN)',
        Status("a0008", "STATUS", "INBOX", ("MESSAGES", "RECENT", "UNSEEN")),
    ),
    ("a0009 UID SEARCH UNSEEN", Search("a0009", "SEARCH", True, None, and_(k("UNSEEN")))),
    ('a0010 UID COPY 5 "Archive"', Copy("a0010", "COPY", True, seq(5), "Archive")),
    ("a0011 ENABLE CONDSTORE", Enable("a0011", "ENABLE", ("CONDSTORE",))),
    (
        "a0012 UID FETCH 1:* (UID FLAGS) (CHANGEDSINCE 1234)",
        fetch("a0012", ALL_UIDS, att("UID"), att("FLAGS"), since=1234),
    ),
]

MBSYNC: list[tuple[str | bytes, Command]] = [
    ('2 LOGIN "user" "pass"', Login("2", "LOGIN", "user", "pass")),
    ("5 UID FETCH 1:* (UID FLAGS)", fetch("5", ALL_UIDS, att("UID"), att("FLAGS"))),
    (
        "6 UID FETCH 1:* (UID FLAGS RFC822.SIZE BODY.PEEK[HEADER.FIELDS (X-TUID)])",
        fetch(
            "6",
            ALL_UIDS,
            att("UID"),
            att("FLAGS"),
            att("RFC822.SIZE"),
            body(text="HEADER.FIELDS", fields="X-TUID", peek=True),
        ),
    ),
    ("7 UID FETCH 5 (BODY.PEEK[])", fetch("7", seq(5), body(peek=True))),
    (
        "8 UID STORE 5 +FLAGS.SILENT (\\Deleted)",
        Store("8", "STORE", True, seq(5), "add", True, ("\\Deleted",)),
    ),
    (
        b'9 APPEND "INBOX" (\\Seen) "12-Feb-2024 10:00:00 +0100" ' + lit(b"hello", plus=True),
        append1(
            "9",
            "APPEND",
            "INBOX",
            ("\\Seen",),
            datetime(2024, 2, 12, 10, tzinfo=timezone(timedelta(hours=1))),
            b"hello",
        ),
    ),
    (
        "10 UID SEARCH HEADER X-TUID abc123def",
        Search("10", "SEARCH", True, None, and_(k("HEADER", "X-TUID", "abc123def"))),
    ),
    ("11 UID EXPUNGE 5", UidExpunge("11", "EXPUNGE", seq(5))),
    ("12 UID FETCH *:* (UID)", fetch("12", seq((None, None)), att("UID"))),
]

IMAPLIB: list[tuple[str | bytes, Command]] = [
    ('JDDC1 LOGIN user "secret \\"pass\\" \\\\"', Login("JDDC1", "LOGIN", "user", 'secret "pass" \\')),
    ("JDDC2 SELECT INBOX", Select("JDDC2", "SELECT", "INBOX")),
    ("JDDC3 SEARCH ALL", Search("JDDC3", "SEARCH", False, None, and_(k("ALL")))),
    ("JDDC4 FETCH 1 (RFC822)", fetch("JDDC4", seq(1), att("RFC822"), uid=False)),
    ("JDDC5 STORE 1 +FLAGS \\Deleted", Store("JDDC5", "STORE", False, seq(1), "add", False, ("\\Deleted",))),
    (
        b'JDDC6 APPEND INBOX () "07-Feb-2024 10:00:00 +0000" ' + lit(b"Subject: x\r\n\r\n"),
        append1(
            "JDDC6",
            "APPEND",
            "INBOX",
            (),
            datetime(2024, 2, 7, 10, tzinfo=UTC),
            b"Subject: x\r\n\r\n",
        ),
    ),
    ('JDDC7 GETQUOTA ""', GetQuota("JDDC7", "GETQUOTA", "")),
    ("JDDC8 MOVE 1:3 Archive", Copy("JDDC8", "MOVE", False, seq((1, 3)), "Archive")),
    ("JDDC9 UNSELECT", Simple("JDDC9", "UNSELECT")),
    (
        'JDDC10 UID SEARCH CHARSET utf-8 SUBJECT "Zażółć"',
        Search("JDDC10", "SEARCH", True, "UTF-8", and_(k("SUBJECT", "Zażółć"))),
    ),
]

EXTENSIONS: list[tuple[str | bytes, Command]] = [
    (
        "A1 UID SEARCH RETURN (MIN MAX COUNT ALL SAVE) UNSEEN",
        Search(
            "A1", "SEARCH", True, None, and_(k("UNSEEN")), Returns(("MIN", "MAX", "COUNT", "ALL", "SAVE"))
        ),
    ),
    ("A2 SEARCH RETURN () ALL", Search("A2", "SEARCH", False, None, and_(k("ALL")), Returns(()))),
    (
        "A2 SEARCH RETURN (save) CHARSET US-ASCII DELETED",
        Search("A2", "SEARCH", False, "US-ASCII", and_(k("DELETED")), Returns(("SAVE",))),
    ),
    # CONTEXT=SEARCH (RFC 5267): CONTEXT is a hint and dropped; PARTIAL's range comes out ordered.
    (
        "A2 SEARCH RETURN (UPDATE CONTEXT COUNT PARTIAL 9:3) SEEN",
        Search("A2", "SEARCH", False, None, and_(k("SEEN")), Returns(("UPDATE", "COUNT", "PARTIAL"), (3, 9))),
    ),
    ("A2 SEARCH RETURN (CONTEXT) SEEN", Search("A2", "SEARCH", False, None, and_(k("SEEN")), Returns(()))),
    ('A3 CANCELUPDATE "A1" "A2"', CancelUpdate("A3", "CANCELUPDATE", ("A1", "A2"))),
    ("A3 FETCH $ (FLAGS)", fetch("A3", SeqSet(saved=True), att("FLAGS"), uid=False)),
    ("A4 SEARCH $ SEEN", Search("A4", "SEARCH", False, None, and_(k("SEQ", SeqSet(saved=True)), k("SEEN")))),
    ("A4 UID SEARCH UID $", Search("A4", "SEARCH", True, None, and_(k("UID", SeqSet(saved=True))))),
    (
        "A5 SEARCH OR OR FROM a TO a CC a",
        Search(
            "A5", "SEARCH", False, None, and_(k("OR", k("OR", k("FROM", "a"), k("TO", "a")), k("CC", "a")))
        ),
    ),
    (
        "A6 SEARCH (OR SEEN FLAGGED) (NOT DELETED) KEYWORD $Forwarded UNKEYWORD $Junk "
        "LARGER 100 SMALLER 5000",
        Search(
            "A6",
            "SEARCH",
            False,
            None,
            and_(
                and_(k("OR", k("SEEN"), k("FLAGGED"))),
                and_(k("NOT", k("DELETED"))),
                k("KEYWORD", "$Forwarded"),
                k("UNKEYWORD", "$Junk"),
                k("LARGER", 100),
                k("SMALLER", 5000),
            ),
        ),
    ),
    (
        'A7 SEARCH SENTBEFORE "1-Jan-2024" SENTON 31-Dec-2023 SENTSINCE 02-Jan-2000 '
        "BEFORE 1-FEB-2024 ON 1-feb-2024",
        Search(
            "A7",
            "SEARCH",
            False,
            None,
            and_(
                k("SENTBEFORE", date(2024, 1, 1)),
                k("SENTON", date(2023, 12, 31)),
                k("SENTSINCE", date(2000, 1, 2)),
                k("BEFORE", date(2024, 2, 1)),
                k("ON", date(2024, 2, 1)),
            ),
        ),
    ),
    (
        "A8 search answered draft new old recent unanswered undeleted undraft unflagged "
        'bcc x body y cc z subject "s s" text t to u',
        Search(
            "A8",
            "SEARCH",
            False,
            None,
            and_(
                *(k(op) for op in ("ANSWERED", "DRAFT", "NEW", "OLD", "RECENT", "UNANSWERED")),
                *(k(op) for op in ("UNDELETED", "UNDRAFT", "UNFLAGGED")),
                k("BCC", "x"),
                k("BODY", "y"),
                k("CC", "z"),
                k("SUBJECT", "s s"),
                k("TEXT", "t"),
                k("TO", "u"),
            ),
        ),
    ),
    (
        "A9 SEARCH (SEEN FLAGGED (DRAFT))",
        Search("A9", "SEARCH", False, None, and_(and_(k("SEEN"), k("FLAGGED"), and_(k("DRAFT"))))),
    ),
    ("A9 SEARCH MODSEQ 620162338", Search("A9", "SEARCH", False, None, and_(k("MODSEQ", 620162338)))),
    (
        'A9 SEARCH MODSEQ "/flags/\\\\draft" all 620162338',
        Search("A9", "SEARCH", False, None, and_(k("MODSEQ", 620162338, "/flags/\\draft", "all"))),
    ),
    (
        "A10 SEARCH UID 1:5,9,20:* 2,4:* NOT 3",
        Search(
            "A10",
            "SEARCH",
            False,
            None,
            and_(
                k("UID", seq((1, 5), 9, (20, None))), k("SEQ", seq(2, (4, None))), k("NOT", k("SEQ", seq(3)))
            ),
        ),
    ),
    (
        "A11 FETCH 1 FAST",
        fetch("A11", seq(1), att("FLAGS"), att("INTERNALDATE"), att("RFC822.SIZE"), uid=False),
    ),
    (
        "A11 FETCH 1 all",
        fetch(
            "A11", seq(1), att("FLAGS"), att("INTERNALDATE"), att("RFC822.SIZE"), att("ENVELOPE"), uid=False
        ),
    ),
    (
        "A11 UID FETCH 1 FULL",
        fetch("A11", seq(1), *map(att, ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"))),
    ),
    (
        "A12 FETCH 1:* (BODY BODYSTRUCTURE ENVELOPE INTERNALDATE RFC822.HEADER RFC822.TEXT MODSEQ)",
        fetch(
            "A12",
            ALL_UIDS,
            *map(att, ("BODY", "BODYSTRUCTURE", "ENVELOPE", "INTERNALDATE", "RFC822.HEADER", "RFC822.TEXT")),
            att("MODSEQ"),
            uid=False,
        ),
    ),
    (
        "A13 FETCH 1 (BODY[1.2.HEADER.FIELDS (From Subject)]<0.100> BODY[1.MIME] BODY[TEXT] BODY[HEADER] "
        "BODY[HEADER.FIELDS.NOT (Received)] BODY[3.1.TEXT] BODY[2.HEADER] BODY[])",
        fetch(
            "A13",
            seq(1),
            body((1, 2), "HEADER.FIELDS", "From Subject", partial=(0, 100)),
            body((1,), "MIME"),
            body(text="TEXT"),
            body(text="HEADER"),
            body(text="HEADER.FIELDS.NOT", fields="Received"),
            body((3, 1), "TEXT"),
            body((2,), "HEADER"),
            body(),
            uid=False,
        ),
    ),
    (
        "A13 uid fetch 1 body.peek[header.fields (subject)]",
        fetch("A13", seq(1), body(text="HEADER.FIELDS", fields="SUBJECT", peek=True)),
    ),
    (
        b"A13 FETCH 1 BODY[HEADER.FIELDS (" + lit(b"Subject") + b" DATE)]",
        fetch("A13", seq(1), body(text="HEADER.FIELDS", fields="SUBJECT DATE"), uid=False),
    ),
    (
        "A14 STORE 3 (UNCHANGEDSINCE 12345) FLAGS ()",
        Store("A14", "STORE", False, seq(3), "set", False, (), unchanged_since=12345),
    ),
    (
        "A15 STORE 3,5:7 -FLAGS (\\flagged $Important \\SEEN)",
        Store("A15", "STORE", False, seq(3, (5, 7)), "remove", False, ("\\Flagged", "$Important", "\\Seen")),
    ),
    ('A16 SELECT "&ZeVnLIqe-"', Select("A16", "SELECT", "日本語")),
    ('A17 CREATE "Entw&APw-rfe"', MailboxCommand("A17", "CREATE", "Entwürfe")),
    ('A17 CREATE "R&-D"', MailboxCommand("A17", "CREATE", "R&D")),
    ("A18 SELECT inbox", Select("A18", "SELECT", "INBOX")),
    ('A18 SELECT "iNbOx"', Select("A18", "SELECT", "INBOX")),
    ('A19 SELECT "InBox/child"', Select("A19", "SELECT", "InBox/child")),
    ('A20 LIST "" ("INBOX" "Sent")', List("A20", "LIST", "", ("INBOX", "Sent"))),
    (
        'A21 LIST (SUBSCRIBED RECURSIVEMATCH) "" "%"',
        List("A21", "LIST", "", ("%",), ("SUBSCRIBED", "RECURSIVEMATCH")),
    ),
    (
        'A21 LIST (SPECIAL-USE SUBSCRIBED) "" "*" RETURN (SPECIAL-USE CHILDREN SUBSCRIBED)',
        List(
            "A21",
            "LIST",
            "",
            ("*",),
            ("SPECIAL-USE", "SUBSCRIBED"),
            ("SPECIAL-USE", "CHILDREN", "SUBSCRIBED"),
        ),
    ),
    (
        'A21 LIST () "" % RETURN (CHILDREN STATUS (MESSAGES UNSEEN HIGHESTMODSEQ))',
        List("A21", "LIST", "", ("%",), (), ("CHILDREN", "STATUS"), ("MESSAGES", "UNSEEN", "HIGHESTMODSEQ")),
    ),
    ('A21 LIST "" * RETURN ()', List("A21", "LIST", "", ("*",))),
    ('A21 LIST "" inbox', List("A21", "LIST", "", ("INBOX",))),
    ("A22 AUTHENTICATE EXTERNAL =", Authenticate("A22", "AUTHENTICATE", "EXTERNAL", b"")),
    ("A22 AUTHENTICATE xoauth2 dXNlcj0=", Authenticate("A22", "AUTHENTICATE", "XOAUTH2", b"user=")),
    ("A23 ENABLE CONDSTORE UTF8=ACCEPT", Enable("A23", "ENABLE", ("CONDSTORE", "UTF8=ACCEPT"))),
    (b'A24 ID ("name" NIL "x" ' + lit(b"abc") + b")", Id("A24", "ID", (("name", None), ("x", "abc")))),
    ("A24 ID ()", Id("A24", "ID", ())),
    ("A25 GETQUOTAROOT INBOX", MailboxCommand("A25", "GETQUOTAROOT", "INBOX")),
    ("A26 UID MOVE 1:* Archive", Copy("A26", "MOVE", True, ALL_UIDS, "Archive")),
    ("A28 FETCH 5:3,*:1 UID", fetch("A28", seq((5, 3), (None, 1)), att("UID"), uid=False)),
    ("a]1 NOOP", Simple("a]1", "NOOP")),
    ("A29 noop", Simple("A29", "NOOP")),
    ("A30 CHECK\n", Simple("A30", "CHECK")),
    (b"A31 APPEND Drafts " + lit(b""), append1("A31", "APPEND", "Drafts", (), None, b"")),
    (
        b"A32 APPEND " + lit(b"Sent Items") + b" (\\Draft) " + lit(b"x", plus=True),
        append1("A32", "APPEND", "Sent Items", ("\\Draft",), None, b"x"),
    ),
    (
        b'A33 APPEND INBOX "1-Feb-2024 23:59:59 -0830" ' + lit(b"x"),
        append1(
            "A33",
            "APPEND",
            "INBOX",
            (),
            datetime(2024, 2, 1, 23, 59, 59, tzinfo=timezone(-timedelta(hours=8, minutes=30))),
            b"x",
        ),
    ),
    (
        'A34 SEARCH CHARSET ISO-8859-1 SUBJECT "caf\xe9"',
        Search("A34", "SEARCH", False, "ISO-8859-1", and_(k("SUBJECT", "café"))),
    ),
]

ACCEPTED: list[tuple[str | bytes, Command]] = (
    RFC3501 + THUNDERBIRD + OUTLOOK + MUTT + MBSYNC + IMAPLIB + EXTENSIONS
)


@pytest.mark.parametrize(("data", "expected"), ACCEPTED)
def test_parse(data: str | bytes, expected: Command) -> None:
    assert one(data) == expected


def test_parse_non_utf8_charset_string_is_decoded_leniently() -> None:
    cmd = one(b"A1 SEARCH CHARSET ISO-8859-1 SUBJECT " + lit(b"caf\xe9"))
    assert isinstance(cmd, Search)
    assert cmd.charset == "ISO-8859-1"  # the session answers NO [BADCHARSET]
    assert cmd.key == and_(k("SUBJECT", "caf\ufffd"))


def test_login_password_is_not_in_repr() -> None:
    assert "SESAME" not in repr(one("a001 LOGIN SMITH SESAME"))


# --------------------------------------------------------------------------- parsing: refused


def deep(n: int) -> str:
    return "(" * n + "SEEN" + ")" * n


REFUSED: list[tuple[str | bytes, str | None, str | None]] = [
    # (command as sent, tag in the ParseError, part of its message)
    ("", None, "empty command line"),
    ("+ NOOP", None, "invalid tag"),
    ("* NOOP", None, "invalid tag"),
    ("(A1 NOOP", None, "invalid tag"),
    ("A+1 NOOP", None, "invalid tag"),
    ('A"1 NOOP', None, "invalid tag"),
    (b"A1\x00 NOOP", None, "invalid tag"),
    (b"\x00\xff\xfe garbage", None, "invalid tag"),
    ("A1", "A1", "missing command"),
    ("DONE", "DONE", "missing command"),
    ("A1 FOO", "A1", "unknown command FOO"),
    ("A1 NOOP extra", "A1", "unexpected characters"),
    ("A1 NOOP ", "A1", "unexpected characters"),
    ("A1  NOOP", "A1", "expected a command name"),
    (b"A1 NOOP " + lit(b"abc"), "A1", "unexpected characters"),
    (b"A1 NOOP" + lit(b"abc"), "A1", "unexpected literal"),
    ("A1 LOGIN user", "A1", "unexpected end of command, expected a space"),
    ("A1 LOGIN user pass extra", "A1", "unexpected characters"),
    ('A1 LOGIN "us\\er" x', "A1", "invalid escape"),
    ('A1 LOGIN "unterminated', "A1", "unterminated quoted string"),
    (b'A1 LOGIN "us\x00er" x', "A1", "invalid character"),
    (b'A1 LOGIN "us\rer" x', "A1", "invalid character"),
    (b"A1 LOGIN " + lit(b"us\xffr") + b" x", "A1", "invalid UTF-8"),
    (b"A1 LOGIN " + lit(b"us\x00r") + b" x", "A1", "NUL"),
    ("A1 FETCH 0 FLAGS", "A1", "invalid sequence set"),
    ("A1 FETCH 1:4294967296 FLAGS", "A1", "invalid sequence set"),
    ("A1 FETCH 1,$ FLAGS", "A1", "invalid sequence set"),
    ("A1 FETCH 1:2:3 FLAGS", "A1", "invalid sequence set"),
    ("A1 FETCH 1,,2 FLAGS", "A1", "invalid sequence set"),
    ("A1 FETCH 1, FLAGS", "A1", "invalid sequence set"),
    ("A1 FETCH FLAGS", "A1", "expected a sequence set"),
    ("A1 FETCH 1 BINARY", "A1", "BINARY needs a section"),
    ("A1 FETCH 1 (BINARY.SIZE UID)", "A1", "BINARY.SIZE needs a section"),
    ("A1 FETCH 1 BINARY[1.TEXT]", "A1", "BINARY takes part numbers only"),
    ("A1 FETCH 1 BINARY[0]", "A1", "BINARY takes part numbers only"),
    ("A1 FETCH 1 BINARY.SIZE[1]<0.10>", "A1", "expected a space"),
    ("A1 FETCH 1 (FAST)", "A1", "FAST cannot be used in a list"),
    ("A1 FETCH 1 (XYZZY)", "A1", "unknown FETCH item XYZZY"),
    ("A1 FETCH 1 ()", "A1", "expected a FETCH item"),
    ("A1 FETCH 1 (UID", "A1", "')' ending the FETCH items"),
    ("A1 FETCH 1 BODY.PEEK", "A1", "BODY.PEEK needs a section"),
    ("A1 FETCH 1 BODY[MIME]", "A1", "invalid section"),
    ("A1 FETCH 1 BODY[0]", "A1", "invalid section part"),
    ("A1 FETCH 1 BODY[1.]", "A1", "invalid section"),
    ("A1 FETCH 1 BODY[HEADER.1]", "A1", "invalid section"),
    ("A1 FETCH 1 BODY[HEADER.FIELDS]", "A1", "expected a space"),
    ("A1 FETCH 1 BODY[HEADER.FIELDS ()]", "A1", "expected a header field name"),
    ('A1 FETCH 1 BODY[HEADER.FIELDS ("Sub:ject")]', "A1", "invalid header field name"),
    ("A1 FETCH 1 BODY[1.2", "A1", "']' ending the section"),
    ("A1 FETCH 1 BODY[]<0.0>", "A1", "partial length out of range"),
    ("A1 FETCH 1 BODY[]<0>", "A1", "expected '.'"),
    ("A1 FETCH 1 RFC822.SIZE[]", "A1", "expected a space"),
    ("A1 FETCH 1 (FLAGS) (VANISHED)", "A1", "unsupported modifier VANISHED"),
    ("A1 FETCH 1 (FLAGS) (CHANGEDSINCE 5 VANISHED)", "A1", "unsupported modifier VANISHED"),
    ("A1 UID FETCH 1 (FLAGS) (VANISHED)", "A1", "VANISHED used without CHANGEDSINCE"),
    ("A1 UID FETCH 1 (FLAGS) (VANISHED VANISHED CHANGEDSINCE 1)", "A1", "unsupported modifier VANISHED"),
    ("A1 UID FETCH 1 (FLAGS) (CHANGEDSINCE 1 CHANGEDSINCE 2)", "A1", "unsupported modifier CHANGEDSINCE"),
    ("A1 UID FETCH 1 (FLAGS) (CHANGEDSINCE 1 VANISHED", "A1", "')' ending the modifiers"),
    ("A1 SELECT INBOX (QRESYNC (1))", "A1", "expected a space"),
    ("A1 SELECT INBOX (QRESYNC (0 1))", "A1", "UIDVALIDITY out of range"),
    ("A1 SELECT INBOX (QRESYNC (1 9223372036854775808))", "A1", "mod-sequence out of range"),
    ("A1 SELECT INBOX (QRESYNC (1 2 $))", "A1", "not allowed here"),
    ("A1 SELECT INBOX (QRESYNC (1 2 1:4 (1:*)))", "A1", "not allowed here"),
    ("A1 SELECT INBOX (QRESYNC (1 2 1:4 (1:4)))", "A1", "expected a space"),
    ("A1 SELECT INBOX (QRESYNC (1 2) QRESYNC (1 2))", "A1", "unsupported SELECT parameter QRESYNC"),
    ("A1 SELECT INBOX (QRESYNC (1 2) CONDSTORE", "A1", "')' ending the SELECT parameters"),
    ("A1 FETCH 1 (FLAGS) (CHANGEDSINCE 0)", "A1", "out of range"),
    ("A1 FETCH 1 (FLAGS) (CHANGEDSINCE 9223372036854775808)", "A1", "out of range"),
    ("A1 SEARCH", "A1", "unexpected end of command"),
    ("A1 SEARCH FOO", "A1", "unknown search key FOO"),
    ("A1 SEARCH YOUNGER 3600", "A1", "unknown search key"),
    ("A1 SEARCH SINCE 30-Feb-2024", "A1", "invalid date"),
    ("A1 SEARCH SINCE 1-Foo-2024", "A1", "invalid date"),
    ("A1 SEARCH SINCE 2024-02-01", "A1", "invalid date"),
    ("A1 SEARCH (SEEN", "A1", "')' ending the search keys"),
    ("A1 SEARCH ()", "A1", "expected a search key"),
    ("A1 SEARCH OR SEEN", "A1", "unexpected end"),
    ("A1 SEARCH LARGER 99999999999999999999", "A1", "out of range"),
    ("A1 SEARCH LARGER x", "A1", "expected a size"),
    ("A1 SEARCH HEADER Sub:ject x", "A1", "invalid header field name"),
    ('A1 SEARCH MODSEQ "/other/x" all 5', "A1", "invalid MODSEQ entry name"),
    ('A1 SEARCH MODSEQ "/flags/\\\\seen" mine 5', "A1", "expected priv, shared or all"),
    ("A1 SEARCH RETURN (PARTIAL 1:10 ALL) ALL", "A1", "PARTIAL conflicts with ALL"),
    ("A1 SEARCH RETURN (PARTIAL 0:10) ALL", "A1", "PARTIAL range broken"),
    ("A1 SEARCH RETURN (PARTIAL -1:10) ALL", "A1", "PARTIAL range broken"),
    ("A1 SEARCH RETURN (PARTIAL 1:4294967296) ALL", "A1", "PARTIAL range broken"),
    ("A1 SEARCH RETURN (PARTIAL 1:99999999999999) ALL", "A1", "PARTIAL range broken"),
    ("A1 SEARCH RETURN (PARTIAL) ALL", "A1", "expected a space"),
    ("A1 SEARCH RETURN (PARTIAL 1:2 PARTIAL 3:4) ALL", "A1", "PARTIAL can be used only once"),
    ("A1 SEARCH RETURN (UPDATE UPDATE) ALL", "A1", "UPDATE can be used only once"),
    ("A1 SEARCH RETURN (RELEVANCY) ALL", "A1", "unsupported SEARCH return option RELEVANCY"),
    ("A1 CANCELUPDATE", "A1", "expected a space"),
    ("A1 CANCELUPDATE A1", "A1", "expected a quoted tag"),
    ("A1 CANCELUPDATE " + '"x" ' * 1001 + '"x"', "A1", "too many tags"),
    (b"A1 SEARCH TEXT " + lit(b"\xff"), "A1", "invalid UTF-8"),
    (f"A1 SEARCH {deep(32)}", None, None),  # 32 levels are fine
    (f"A1 SEARCH {deep(33)}", "A1", "parentheses nested too deeply"),
    (f"A1 SEARCH {deep(10_000)}", "A1", "parentheses nested too deeply"),
    ("A1 SEARCH " + "NOT " * 100 + "SEEN", None, None),
    ("A1 SEARCH " + "NOT " * 101 + "SEEN", "A1", "nested too deeply"),
    ("A1 SEARCH " + "OR SEEN " * 5000 + "SEEN", "A1", "nested too deeply"),
    ("A1 SEARCH " + " ".join(["SEEN"] * 1000), None, None),
    ("A1 SEARCH " + " ".join(["SEEN"] * 1001), "A1", "more than 1000 search keys"),
    ("A1 SELECT", "A1", "unexpected end of command"),
    ('A1 SELECT "&Jjo"', "A1", "not valid mUTF-7"),
    ('A1 SELECT "&Jjo!-"', "A1", "not valid mUTF-7"),
    ('A1 SELECT "&2D0-"', "A1", "not valid mUTF-7"),  # a lone surrogate
    ('A1 SELECT "&AAA-"', "A1", "control character"),
    (b'A1 SELECT "a\x01b"', "A1", "control character"),
    (b"A1 SELECT " + lit(b"a\r\nb"), "A1", "control character"),
    ("A1 SELECT INBOX (QRESYNC (1 2 1:*))", "A1", "not allowed here"),
    ("A1 SELECT INBOX CONDSTORE", "A1", "expected '(' starting the SELECT parameters"),
    ("A1 CREATE foo (USE (\\Sent))", "A1", "unexpected characters"),
    ("A1 STORE 1 +FLAGS (\\Recent)", "A1", "unsupported flag"),
    ("A1 STORE 1 +FLAGS (\\*)", "A1", "expected a flag"),
    ("A1 STORE 1 +FLAGS (\\Foo)", "A1", "unsupported flag"),
    ("A1 STORE 1 FLAGZ (\\Seen)", "A1", "expected FLAGS, +FLAGS or -FLAGS"),
    ("A1 STORE 1 +FLAGS", "A1", "unexpected end"),
    ("A1 STORE 1 +FLAGS (\\Seen", "A1", "')' ending the flag list"),
    ("A1 STORE 1 (UNCHANGEDSINCE x) FLAGS ()", "A1", "expected a mod-sequence"),
    ("A1 STORE 1 (CHANGEDSINCE 5) FLAGS ()", "A1", "unsupported modifier"),
    (b'A1 APPEND INBOX (\\Seen) "bad date" ' + lit(b"abc"), "A1", "invalid date-time"),
    (b'A1 APPEND INBOX "1-Feb-2024 24:00:00 +0000" ' + lit(b"abc"), "A1", "invalid date-time"),
    (b'A1 APPEND INBOX "1-Feb-2024 10:00:00 +2400" ' + lit(b"abc"), "A1", "invalid date-time"),
    (b'A1 APPEND INBOX "1-Feb-2024 10:00:00 +0060" ' + lit(b"abc"), "A1", "invalid date-time"),
    ("A1 APPEND INBOX hello", "A1", "expected the message as a literal"),
    ('A1 APPEND INBOX "hello"', "A1", "invalid date-time"),
    ("A1 APPEND INBOX", "A1", "unexpected end"),
    (b"A1 APPEND INBOX " + lit(b"abc") + b" x", "A1", "expected the message as a literal"),
    (b"A1 APPEND INBOX " + lit(b"abc") + b" " * 2 + lit(b"d"), "A1", "expected the message as a literal"),
    (b"A1 APPEND INBOX " + (lit(b"x") + b" ") * 100 + lit(b"y"), "A1", "more than 100 messages"),
    ("A1 APPEND INBOX CATENATE ()", "A1", "expected TEXT or URL"),
    ("A1 APPEND INBOX CATENATE (URL)", "A1", "expected a space"),
    ('A1 APPEND INBOX CATENATE (FILE "/etc/passwd")', "A1", "expected TEXT or URL, not FILE"),
    ("A1 APPEND INBOX CATENATE " + "(" + " ".join(['URL "/a/;UID=1"'] * 101) + ")", "A1", "more than 100"),
    (b"A1 APPEND INBOX ~~" + lit(b"abc"), "A1", "expected the message as a literal"),
    ("A1 AUTHENTICATE PLAIN !!!", "A1", "expected a base64 initial response"),
    ("A1 AUTHENTICATE PLAIN AAA", "A1", "invalid base64"),
    ("A1 AUTHENTICATE PLAIN AA==AA==", "A1", "unexpected characters"),
    ("A1 STATUS INBOX (FOO)", "A1", "unsupported STATUS item FOO"),
    ("A1 STATUS INBOX ()", "A1", "no STATUS items"),
    ("A1 STATUS INBOX MESSAGES", "A1", "expected '('"),
    ('A1 LIST (BOGUS) "" "*"', "A1", "unsupported LIST selection option BOGUS"),
    ('A1 LIST (RECURSIVEMATCH) "" "*"', "A1", "RECURSIVEMATCH needs another selection option"),
    ('A1 LIST "" "*" RETURN (MYRIGHTS)', "A1", "unsupported return option MYRIGHTS"),
    ('A1 LIST "" "*" RETURN (STATUS ())', "A1", "no STATUS items"),
    ('A1 LIST "" "*" (SUBSCRIBED)', "A1", "expected RETURN"),
    ('A1 LIST "" ()', "A1", "expected a mailbox pattern"),
    ("A1 UID FOO 1", "A1", "unknown UID command FOO"),
    ("A1 UID EXPUNGE", "A1", "unexpected end"),
    ('A1 ID ("a")', "A1", "expected a space"),
    ("A1 ID (name x)", "A1", "expected a field name"),
    ('A1 ID ("' + "n" * 31 + '" NIL)', "A1", "ID field or value too long"),
    ("A1 ID (" + " ".join(f'"k{i}" "v"' for i in range(31)) + ")", "A1", "more than 30 ID fields"),
    ("A1 ID FOO", "A1", "expected a parameter list or NIL"),
    ("A1 ENABLE", "A1", "unexpected end"),
    ("A1 STORE 1 FLAGS (" + " ".join(["k"] * 1000) + ")", None, None),
    ("A1 STORE 1 FLAGS (" + " ".join(["k"] * 1001) + ")", "A1", "too many flags"),
    ("A1 FETCH 1 (" + " ".join(["UID"] * 100) + ")", None, None),
    ("A1 FETCH 1 (" + " ".join(["UID"] * 101) + ")", "A1", "more than 100 FETCH items"),
    ("A1 FETCH " + ",".join(["1"] * 10_000) + " UID", None, None),
    ("A1 FETCH " + ",".join(["1"] * 10_001) + " UID", "A1", "sequence set too long"),
]


@pytest.mark.parametrize(("data", "tag", "message"), REFUSED)
def test_refused(data: str | bytes, tag: str | None, message: str | None) -> None:
    (line,) = lines(wire(data), max_line=1 << 20)
    if message is None:  # just within a bound
        parse(line)
        return
    with pytest.raises(ParseError) as info:
        parse(line)
    assert info.value.tag == tag
    assert message in info.value.message
    assert info.value.message.isprintable()
    assert info.value.message.isascii()


def test_unknown_command_name_is_not_echoed_raw() -> None:
    with pytest.raises(ParseError) as info:
        parse(Line((b"A1 X" + b"Y" * 1000 + b"<script>",)))
    assert len(info.value.message) < 100


def test_malformed_line_object() -> None:
    with pytest.raises(ParseError, match="malformed"):
        parse(Line((b"A1 NOOP", b""), ()))


def test_million_element_sequence_set_fails_fast() -> None:
    line = Line((b"A1 UID FETCH " + b",".join(b"%d" % i for i in range(1, 1_000_001)) + b" (FLAGS)",))
    started = time.perf_counter()
    with pytest.raises(ParseError, match="sequence set too long"):
        parse(line)
    assert time.perf_counter() - started < 1


def test_pathological_quoted_string_is_linear() -> None:
    line = Line((b'A1 LOGIN "' + b"\\\\" * 32_000 + b'" x',))  # as many escapes as fit in a line
    started = time.perf_counter()
    cmd = parse(line)
    assert isinstance(cmd, Login)
    assert cmd.user == "\\" * 32_000
    assert time.perf_counter() - started < 1


def test_parse_is_fast() -> None:
    line = Line(
        (
            b"A001 UID FETCH 1:* (UID RFC822.SIZE FLAGS BODY.PEEK[HEADER.FIELDS ("
            + THUNDERBIRD_HEADERS.encode()
            + b")])",
        )
    )
    n = 2000
    started = time.perf_counter()
    for _ in range(n):
        parse(line)
    per_parse = (time.perf_counter() - started) / n
    assert per_parse < 1e-3  # tens of microseconds on a normal machine; generous for slow CI or tracing


# --------------------------------------------------------------------------- framing


def test_pipelined_commands_crlf_and_bare_lf() -> None:
    assert events(b"A1 NOOP\r\nA2 NOOP\nA3 NOOP\r\n") == [
        Line((b"A1 NOOP",)),
        Line((b"A2 NOOP",)),
        Line((b"A3 NOOP",)),
    ]


def test_incomplete_line_waits() -> None:
    framer = Framer()
    framer.feed(b"A1 NO")
    assert framer.next_event() is None
    framer.feed(b"OP\r")
    assert framer.next_event() is None
    framer.feed(b"\n")
    assert drain(framer) == [Line((b"A1 NOOP",))]


def test_empty_line_is_a_line_the_parser_refuses() -> None:
    (line,) = lines(b"\r\n")
    assert line == Line((b"",))
    with pytest.raises(ParseError, match="empty") as info:
        parse(line)
    assert info.value.tag is None


def test_synchronising_literals_need_continuations() -> None:
    framer = Framer()
    framer.feed(b"A001 LOGIN {11}\r\n")
    assert drain(framer) == [NeedContinuation(11)]
    framer.feed(b"FRED FOOBAR {7}\r\n")
    assert drain(framer) == [NeedContinuation(7)]
    framer.feed(b"fat man\r\n")
    assert drain(framer) == [Line((b"A001 LOGIN ", b" ", b""), (b"FRED FOOBAR", b"fat man"))]


def test_non_synchronising_literals_need_no_continuation() -> None:
    assert events(b"A001 LOGIN {11+}\r\nFRED FOOBAR {7+}\r\nfat man\r\n") == [
        Line((b"A001 LOGIN ", b" ", b""), (b"FRED FOOBAR", b"fat man"))
    ]


def test_append_flow_with_a_message_that_looks_like_commands() -> None:
    message = b"Subject: hi\r\n\r\nA2 DELETE INBOX\r\nA3 LOGOUT\r\n{5}\r\n"
    stream = b'A1 APPEND "INBOX" (\\Seen) ' + lit(message) + b"\r\nA4 NOOP\r\n"
    assert events(stream) == [
        NeedContinuation(len(message)),
        Line((b'A1 APPEND "INBOX" (\\Seen) ', b""), (message,)),
        Line((b"A4 NOOP",)),
    ]


def test_zero_length_literal() -> None:
    assert events(b"A1 LOGIN {0}\r\n {0+}\r\n\r\n") == [
        NeedContinuation(0),
        Line((b"A1 LOGIN ", b" ", b""), (b"", b"")),
    ]
    assert one(b"A1 LOGIN {0}\r\n {0+}\r\n") == Login("A1", "LOGIN", "", "")


def test_literal_marker_must_end_the_line() -> None:
    assert events(b"A1 LOGIN {5} x\r\n") == [Line((b"A1 LOGIN {5} x",))]
    assert events(b"A1 LOGIN {}\r\n") == [Line((b"A1 LOGIN {}",))]
    assert events(b"A1 LOGIN {+}\r\n") == [Line((b"A1 LOGIN {+}",))]
    assert events(b"A1 LOGIN 5}\r\n") == [Line((b"A1 LOGIN 5}",))]


STREAMS = [
    b"A1 NOOP\r\nA2 NOOP\nA3 LOGIN {3}\r\nabc {4+}\r\nd\r\nf\r\n",
    b'A1 APPEND "INBOX" (\\Seen) ' + lit(RFC3501_MESSAGE) + b"\r\nA2 LOGOUT\r\n",
    b"A1 APPEND INBOX " + lit(b"x" * 1000, plus=True) + b"\r\n\r\nA2 NOOP\r\n",
    b"A1 " + b"x" * 200 + b"\r\nA2 NOOP\r\n",
    b"A1 " + b"x" * 200 + b" {10+}\r\n0123456789\r\nA2 NOOP\r\n",
    b"A1 APPEND INBOX {4294967296}\r\nA2 NOOP\r\n",
    b"A1 LOGIN {3}\r\nabc {3}\r\ndef {3}\r\nghi\r\nA2 NOOP\r\n",
]


@pytest.mark.parametrize("stream", STREAMS)
def test_byte_by_byte_feeding_gives_the_same_events(stream: bytes) -> None:
    limits = {"max_line": 100, "max_literal": 2000, "max_literals": 2}
    assert events([stream[i : i + 1] for i in range(len(stream))], **limits) == events(stream, **limits)


def test_overlong_line_is_refused_and_the_next_command_runs() -> None:
    stream = b"A1 NOOP " + b"x" * 100 + b"\r\nA2 NOOP\r\n"
    assert events(stream, max_line=64) == [TooLong("line longer than 64 bytes", "A1"), Line((b"A2 NOOP",))]


def test_line_of_exactly_max_line_is_fine() -> None:
    text = b"A1 NOOP".ljust(64, b"x")
    assert events(text + b"\r\n", max_line=64) == [Line((text,))]
    assert events([text, b"\r", b"\n"], max_line=64) == [Line((text,))]
    assert events(text + b"y\r\n", max_line=64)[0] == TooLong("line longer than 64 bytes", "A1")


def test_overlong_line_is_reported_before_it_ends() -> None:
    framer = Framer(max_line=64)
    framer.feed(b"A1 SEARCH " + b"x" * 1000)
    assert drain(framer) == [TooLong("line longer than 64 bytes", "A1")]
    assert framer.buffered <= 100
    framer.feed(b"y" * 1000 + b"\r\nA2 NOOP\r\n")
    assert drain(framer) == [Line((b"A2 NOOP",))]


def test_ten_megabyte_line_in_chunks_stays_bounded() -> None:
    framer = Framer()
    chunk = b"A1 SEARCH TEXT " + b"x" * (64 * 1024 - 15)
    seen: list[Event] = []
    for _ in range(160):
        framer.feed(chunk)
        seen += drain(framer)
        assert framer.buffered <= MAX_LINE + 1 + 65
    framer.feed(b"\r\nA2 NOOP\r\n")
    seen += drain(framer)
    assert seen == [TooLong(f"line longer than {MAX_LINE} bytes", "A1"), Line((b"A2 NOOP",))]


def test_ten_megabyte_line_in_one_feed() -> None:
    stream = b"A1 " + b"x" * 10_000_000 + b"\r\nA2 NOOP\r\n"
    assert events(stream) == [TooLong(f"line longer than {MAX_LINE} bytes", "A1"), Line((b"A2 NOOP",))]


def test_overlong_line_ending_with_a_non_synchronising_literal_skips_it() -> None:
    smuggled = b"\r\nA2 DELETE INBOX\r\n"
    stream = b"A1 APPEND INBOX " + b"x" * 100 + b" " + lit(smuggled, plus=True) + b" more\r\nA3 NOOP\r\n"
    assert events(stream, max_line=64) == [TooLong("line longer than 64 bytes", "A1"), Line((b"A3 NOOP",))]
    chunks = [stream[i : i + 7] for i in range(0, len(stream), 7)]
    assert events(chunks, max_line=64) == [TooLong("line longer than 64 bytes", "A1"), Line((b"A3 NOOP",))]


def test_overlong_line_ending_with_a_synchronising_literal_ends_the_command() -> None:
    # The client gets BAD instead of "+", so what it sends next is a new command.
    stream = b"A1 APPEND INBOX " + b"x" * 100 + b" {5}\r\nA2 NOOP\r\n"
    assert events(stream, max_line=64) == [TooLong("line longer than 64 bytes", "A1"), Line((b"A2 NOOP",))]


def test_overlong_line_whose_literal_size_was_cut_off_closes() -> None:
    # Whole, the line shows a literal of 2**64 bytes or more; in pieces, only its last 64 bytes
    # are kept while it is discarded: digits and "+}" without a "{" could be any size.
    stream = b"A1 " + b"x" * 100 + b" {" + b"1" * 100 + b"+}\r\nA2 DELETE INBOX\r\n"
    for chunks in ([stream], [stream[:150], stream[150:]], [stream[i : i + 1] for i in range(len(stream))]):
        framer = Framer(max_line=64)
        got: list[Event] = []
        for chunk in chunks:
            framer.feed(chunk)
            got += drain(framer)
        assert got == [TooLong("line longer than 64 bytes", "A1"), LiteralTooLarge(2**64, False, "A1")]
        assert framer.closed


def test_literal_of_4294967296_bytes_is_refused() -> None:
    stream = b"A1 APPEND INBOX {4294967296}\r\nA2 NOOP\r\n"
    assert events(stream) == [LiteralTooLarge(4294967296, True, "A1"), Line((b"A2 NOOP",))]


def test_literal_with_a_hundred_digit_size_is_refused() -> None:
    stream = b"A1 APPEND INBOX {" + b"9" * 100 + b"}\r\nA2 NOOP\r\n"
    assert events(stream) == [LiteralTooLarge(2**64, True, "A1"), Line((b"A2 NOOP",))]
    stream = b"A1 APPEND INBOX {" + b"0" * 100 + b"3}\r\nabc\r\n"
    assert events(stream) == [NeedContinuation(3), Line((b"A1 APPEND INBOX ", b""), (b"abc",))]


def test_synchronising_literal_over_the_limit_is_refused_without_continuation() -> None:
    framer = Framer(max_literal=10)
    framer.feed(b"A1 APPEND INBOX {11}\r\n")
    assert drain(framer) == [LiteralTooLarge(11, True, "A1")]
    assert not framer.closed
    framer.feed(b"A2 APPEND INBOX {10}\r\n0123456789\r\n")
    assert drain(framer) == [NeedContinuation(10), Line((b"A2 APPEND INBOX ", b""), (b"0123456789",))]


def test_non_synchronising_literal_over_the_limit_closes() -> None:
    framer = Framer(max_literal=10)
    framer.feed(b"A0 NOOP\r\nA1 APPEND INBOX {11+}\r\n" + b"x" * 11 + b"\r\nA2 NOOP\r\n")
    assert drain(framer) == [Line((b"A0 NOOP",)), LiteralTooLarge(11, False, "A1")]
    assert framer.closed
    framer.feed(b"A3 NOOP\r\n")
    assert framer.next_event() is None
    assert framer.buffered == 0


def test_command_budget_counts_all_literals() -> None:
    framer = Framer(max_literal=10, max_command=45)
    framer.feed(b"A1 LOGIN {10}\r\n")  # 13 bytes of text + 10
    assert drain(framer) == [NeedContinuation(10)]
    framer.feed(b"0123456789 {10}\r\n")  # + 5 + 10 = 38
    assert drain(framer) == [NeedContinuation(10)]
    framer.feed(b"0123456789 {10}\r\n")  # + 5 + 10 = 53 > 45
    assert drain(framer) == [LiteralTooLarge(10, True, "A1")]
    framer.feed(b"A2 NOOP\r\n")
    assert drain(framer) == [Line((b"A2 NOOP",))]
    framer = Framer(max_literal=10, max_command=40)
    framer.feed(b"A1 LOGIN {10}\r\n0123456789 {10}\r\n0123456789 {10}\r\n")  # the text reaches 43
    assert drain(framer) == [
        NeedContinuation(10),
        NeedContinuation(10),
        TooLong("command longer than 40 bytes", "A1"),
    ]
    framer.feed(b"A2 NOOP\r\n")
    assert drain(framer) == [Line((b"A2 NOOP",))]


def test_too_many_literals() -> None:
    stream = b"A1 X {1}\r\na {1}\r\nb {1}\r\nc\r\nA2 NOOP\r\n"
    assert events(stream, max_literals=2) == [
        NeedContinuation(1),
        NeedContinuation(1),
        TooLong("more than 2 literals", "A1"),
        Line((b"c",)),  # a client that sends it anyway gets BAD for "c"
        Line((b"A2 NOOP",)),
    ]
    stream = b"A1 X {1+}\r\na {1+}\r\nb {1+}\r\nc {1+}\r\nd\r\nA2 NOOP\r\n"
    assert events(stream, max_literals=2) == [TooLong("more than 2 literals", "A1"), Line((b"A2 NOOP",))]


def test_literal_data_split_across_feeds() -> None:
    framer = Framer()
    for piece in (b"A1 APPEND INBOX {1", b"0+", b"}\r", b"\n01234", b"", b"56789", b"\r\n"):
        framer.feed(piece)
        if piece != b"\r\n":
            assert framer.next_event() is None
    assert drain(framer) == [Line((b"A1 APPEND INBOX ", b""), (b"0123456789",))]


def test_garbage_bytes() -> None:
    stream = bytes(range(256)) * 300 + b"\r\nA1 NOOP\r\n"
    got = events(stream)
    assert got[-1] == Line((b"A1 NOOP",))
    for event in got[:-1]:
        if isinstance(event, Line):
            with pytest.raises(ParseError):
                parse(event)


def test_deeply_nested_parentheses_through_the_framer() -> None:
    (line,) = lines(b"A1 SEARCH " + b"(" * 30_000 + b"SEEN" + b")" * 30_000 + b"\r\n")
    with pytest.raises(ParseError, match="nested too deeply"):
        parse(line)


def test_reset_forgets_input_sent_before_starttls() -> None:
    framer = Framer()
    framer.feed(b"A1 STARTTLS\r\nA2 LOGIN injected {5}\r\n")
    assert framer.next_event() == Line((b"A1 STARTTLS",))
    framer.reset()
    assert framer.next_event() is None
    framer.feed(b"A3 NOOP\r\n")
    assert drain(framer) == [Line((b"A3 NOOP",))]


def test_idle_done() -> None:
    framer = Framer()
    framer.feed(b"A1 IDLE\r\n")
    (idle,) = drain(framer)
    assert isinstance(idle, Line)
    assert parse(idle) == Simple("A1", "IDLE")
    framer.feed(b"DO")
    assert framer.next_event() is None
    framer.feed(b"NE\r\nA2 NOOP\r\n")
    done, noop = drain(framer)
    assert isinstance(done, Line)
    assert is_done(done)
    assert isinstance(noop, Line)
    assert not is_done(noop)
    assert is_done(Line((b"done",)))
    assert not is_done(Line((b"DONE x",)))
    assert not is_done(Line((b"DONE ", b""), (b"x",)))


def test_invalid_limits() -> None:
    with pytest.raises(ValueError, match="positive"):
        Framer(max_line=0)


# --------------------------------------------------------------------------- properties

TOKENS = [
    b"A1 ", b"* ", b"+ ", b"{3}\r\n", b"{2+}\r\n", b"{0}\r\n", b"{99999999999}\r\n", b"{1", b"+}", b"}",
    b"\r\n", b"\n", b"\r", b" ", b"(", b")", b"[", b"]", b"<0.10>", b'"', b"\\", b"\x00", b"\xff",
    b"FETCH ", b"UID ", b"SEARCH ", b"STORE ", b"APPEND ", b"LOGIN ", b"LIST ", b"SELECT ", b"ID ",
    b"OR ", b"NOT ", b"1:*", b",", b"$", b"*", b"BODY.PEEK[", b"HEADER.FIELDS (", b"1.2.MIME",
    b"FLAGS", b"+FLAGS.SILENT ", b"\\Seen", b"INBOX", b'"&ZeVnLIqe-"', b"&", b"-", b"CHARSET UTF-8 ",
    b"RETURN (", b"MODSEQ ", b'"/flags/\\\\seen" ', b"1-Feb-2024", b"NIL", b"abc", b"x" * 70,
]  # fmt: skip
LIMITS = {"max_line": 64, "max_literal": 100, "max_command": 300, "max_literals": 3}


def error_of(line: Line) -> str | None:
    """The message of the ParseError for ``line``, None if it parses (any other exception fails)."""
    try:
        parse(line)
    except ParseError as exc:
        return exc.message
    return None


def _check_stream(stream: bytes, cuts: list[int]) -> None:
    framer = Framer(**LIMITS)
    bound = LIMITS["max_command"] + LIMITS["max_line"] + 1 + 65
    pos = 0
    for cut in [*sorted(cuts), len(stream)]:
        framer.feed(stream[pos:cut])
        pos = max(pos, cut)
        for event in drain(framer):
            if isinstance(event, Line):
                message = error_of(event)
                assert message is None or (message.isascii() and message.isprintable())
        assert framer.buffered <= bound


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=3000), st.lists(st.integers(0, 3000), max_size=40))
def test_random_bytes_in_random_chunks(stream: bytes, cuts: list[int]) -> None:
    _check_stream(stream, cuts)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.sampled_from(TOKENS), max_size=80).map(b"".join), st.lists(st.integers(0, 4000), max_size=20)
)
def test_random_token_streams_in_random_chunks(stream: bytes, cuts: list[int]) -> None:
    _check_stream(stream, cuts)


SAMPLES = [wire(data) for data, _ in ACCEPTED]


@settings(max_examples=1000, deadline=None)
@given(
    st.sampled_from(SAMPLES),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 4), st.binary(max_size=4)), max_size=6),
)
def test_mutated_real_commands_raise_only_parse_errors(
    sample: bytes, edits: list[tuple[int, int, bytes]]
) -> None:
    data = bytearray(sample)
    for at, cut, insert in edits:
        at %= len(data) + 1
        data[at : at + cut] = insert
    _check_stream(bytes(data), [])


@settings(max_examples=500, deadline=None)
@given(st.lists(st.binary(max_size=60), min_size=1, max_size=5), st.data())
def test_arbitrary_line_objects(parts: list[bytes], data: st.DataObject) -> None:
    literals = data.draw(st.lists(st.binary(max_size=20), min_size=len(parts) - 1, max_size=len(parts) - 1))
    message = error_of(Line(tuple(parts), tuple(literals)))
    assert message is None or (message.isascii() and message.isprintable())


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(STREAMS + SAMPLES), min_size=1, max_size=6).map(b"".join), st.data())
def test_chunking_never_changes_the_events(stream: bytes, data: st.DataObject) -> None:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=30)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    limits = {"max_line": 100, "max_literal": 2000, "max_literals": 2}
    assert events(chunks, **limits) == events(stream, **limits)


number = st.integers(1, 2**32 - 1)
bound = st.one_of(st.none(), number)


@given(st.lists(st.tuples(bound, bound), min_size=1, max_size=50))
def test_sequence_set_round_trip(ranges: list[tuple[int | None, int | None]]) -> None:
    def text(n: int | None) -> str:
        return "*" if n is None else str(n)

    wire_set = ",".join(text(a) if a == b else f"{text(a)}:{text(b)}" for a, b in ranges)
    cmd = one(f"A1 UID FETCH {wire_set} (UID)")
    assert isinstance(cmd, Fetch)
    assert cmd.sequence == SeqSet(tuple(ranges))


@given(st.text(max_size=40))
def test_mailbox_names_round_trip_through_modified_utf7(name: str) -> None:
    if any(ord(c) < 0x20 or ord(c) == 0x7F or 0xD800 <= ord(c) <= 0xDFFF for c in name):
        return
    cmd = one(b"A1 SELECT " + imap_wire.mailbox(name))
    assert isinstance(cmd, Select)
    expected = "INBOX" if name.isascii() and name.upper() == "INBOX" else name
    assert cmd.mailbox == expected
    assert mutf7.decode(mutf7.encode(name)) == name


# --------------------------------------------------------------------------- IMAP URLs (CATENATE)


TEXT, MIME_2 = Section((), "TEXT"), Section((2,), "MIME")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("/INBOX/;UID=5", imapurl.Ref("INBOX", None, 5, None, None)),
        ("/inbox;UIDVALIDITY=7/;UID=5", imapurl.Ref("INBOX", 7, 5, None, None)),
        ("/Sent%20Items/;UID=1/;SECTION=1.2", imapurl.Ref("Sent Items", None, 1, Section((1, 2)), None)),
        (
            "/Zam%C3%B3wienia/;UID=3/;SECTION=TEXT",
            imapurl.Ref("Zamówienia", None, 3, Section((), "TEXT"), None),
        ),
        (
            "/a/b/;UID=3/;SECTION=2.MIME/;PARTIAL=10.20",
            imapurl.Ref("a/b", None, 3, Section((2,), "MIME"), (10, 20)),
        ),
        ("imap://anna@mx.test:143/INBOX/;UID=2/;PARTIAL=5", imapurl.Ref("INBOX", None, 2, None, (5, 0))),
    ],
)
def test_imap_url(url: str, expected: imapurl.Ref) -> None:
    assert imapurl.parse(url, "mx.test") == expected


@pytest.mark.parametrize(
    "url",
    [
        "imap://other.test/INBOX/;UID=1",  # another server
        "/INBOX",  # no UID
        "/INBOX/;UID=0",
        "/INBOX/;UID=1/;SECTION=HEADER.FIELDS%20(FROM)",
        "/INBOX/;UID=1/;SECTION=MIME",
        "/INBOX/;UID=1;EXPIRE=2030-01-01T00:00:00Z;URLAUTH=anonymous:internal:x",  # URLAUTH
        "/INBOX?SUBJECT%20x",  # a search
        "/%FF/;UID=1",  # not UTF-8
        "/" + "a" * 5000 + "/;UID=1",
    ],
)
def test_imap_url_refused(url: str) -> None:
    with pytest.raises(imapurl.BadURL):
        imapurl.parse(url, "mx.test")


@given(st.text(max_size=200))
def test_imap_url_never_crashes(url: str) -> None:
    with contextlib.suppress(imapurl.BadURL):
        imapurl.parse(url, "mx.test")


# --------------------------------------------------------------------------- SORT (RFC 5256)


@pytest.mark.parametrize(
    ("subject", "base"),
    [
        ("Re: order 17", "order 17"),
        ("RE: Re: re:order 17", "order 17"),
        ("Fwd: Re: [ACME] order 17", "order 17"),
        ("[ACME] Re: order 17 (fwd)", "order 17"),
        ("Fw: order 17 (fwd) (FWD)", "order 17"),
        ("[fwd: Re: order 17]", "order 17"),
        ("[ACME]", "[ACME]"),  # a blob that is all there is stays
        ("Re [tag]: x", "x"),
        ("  spaced \t out  ", "spaced out"),
        ("Zamówienie", "Zamówienie"),
        ("", ""),
    ],
)
def test_base_subject(subject: str, base: str) -> None:
    assert sort.base_subject(subject) == base


@given(st.text(max_size=200))
def test_base_subject_never_grows(subject: str) -> None:
    assert len(sort.base_subject(subject)) <= len(subject)


def test_sort_parses_and_bounds_its_criteria() -> None:
    (line,) = lines(wire("A1 UID SORT RETURN (MIN COUNT) (REVERSE DATE SUBJECT) UTF-8 SEEN"))
    cmd = parse(line)
    assert isinstance(cmd, Sort)
    assert (cmd.uid, cmd.criteria, cmd.charset, cmd.returns) == (
        True,
        (("DATE", True), ("SUBJECT", False)),
        "UTF-8",
        Returns(("MIN", "COUNT")),
    )
    for bad, message in (
        ("A1 SORT (" + " ".join(["DATE"] * 10_000) + ") UTF-8 ALL", "too many sort criteria"),
        ("A1 SORT (DISPLAYNAME) UTF-8 ALL", "unknown sort criterion DISPLAYNAME"),
        ("A1 SORT (DATE) ALL", "expected a space"),
        ("A1 SORT () UTF-8 ALL", "expected a sort criterion"),
        ("A1 THREAD REFS UTF-8 ALL", "unknown threading algorithm REFS"),
        ("A1 THREAD REFERENCES UTF-8", "expected a space"),
    ):
        (line,) = lines(wire(bad), max_line=1 << 20)
        with pytest.raises(ParseError, match=re.escape(message)):
            parse(line)

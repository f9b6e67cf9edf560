"""SORT, SORT=DISPLAY, ESORT and THREAD against a live Dovecot 2.3, on a corpus built for them.

The corpus (:func:`corpus`) is what sorting and threading get wrong: one
conversation under Re:/RE:/Fwd:/[tag] prefixes and (fwd) trailers, subjects
that are RFC 2047-encoded, Polish, all-blob or empty, two Subject fields,
equal, missing and broken Date headers, From/To/Cc with and without display
names, encoded and quoted names, groups, missing addresses, and References
that are missing, broken, looping or self-referring. It is APPENDed in the
same order, with the same internal dates, to a private Dovecot and to
mailgate (on SQLite and on PostgreSQL), so sequence numbers and UIDs align,
and every ``* SORT``, ``* ESEARCH`` and ``* THREAD`` line must be Dovecot's
byte for byte (only the ESEARCH tag differs, and is normalised).

The pure parts (base subjects, i;unicode-casemap, the stored keys, the
order, threading) are table-driven below; a hypothesis test feeds the parser
SORT and THREAD syntax; hostile commands get the RFC's answer; and a
10,000-message folder whose blobs do not exist is sorted from its columns
alone, which shows that SORT never reads a message.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import imaplib
import itertools
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import select, update

from gateway.auth import Authenticator
from gateway.config import Config, parse_config
from gateway.daemon import open_store
from gateway.imap import mime, sort, thread
from gateway.imap import wire as imap_wire
from gateway.imap.commands import Sort, Thread
from gateway.imap.parser import ParseError, parse
from gateway.imap.server import IMAPServer
from gateway.ingest import Delivery, Pipeline
from gateway.message import parse_headers
from gateway.notify import Changes
from storage import mailstore
from storage.db import Database
from storage.mailstore import SORT_COLUMNS, SortKeys
from storage.models import Folder, Message
from tests.conftest import config_dict
from tests.dovecot import running_dovecot
from tests.test_imap_differential import LOGIN, PASSWORD, Mailgate, append, connect, read_response
from tests.test_imap_parser import lines, wire

# --------------------------------------------------------------------------- the corpus


def _m(headers: str, body: str = "Treść.\r\n") -> bytes:
    return (headers.replace("\n", "\r\n") + "\r\n" + body).encode("utf-8")


def corpus() -> list[bytes]:
    """The messages, in APPEND order (sequence number = index + 1)."""
    d = "Date: Mon, 04 Mar 2024 10:{:02d}:00 +0000\n"
    return [
        _m(
            "From: Jan Kowalski <jan@example.org>\nTo: Biuro <biuro@acme.test>\n"
            "Subject: Zamówienie 17\n" + d.format(1) + "Message-ID: <z1@x>\n"
        ),
        _m(
            "From: =?UTF-8?Q?=C5=81ukasz_Nowak?= <lukasz@example.org>\nTo: jan@example.org\n"
            "Subject: Re: Zamówienie 17\n" + d.format(2) + "Message-ID: <z2@x>\nReferences: <z1@x>\n"
        ),
        _m(
            'From: "Kowalski, Jan" <jan@example.org>\nTo: =?UTF-8?B?xYF1a2Fzeg==?= <lukasz@example.org>\n'
            "Cc: Biuro <biuro@acme.test>\nSubject: RE: Re: Zamówienie 17\n"
            + d.format(3)
            + "Message-ID: <z3@x>\nReferences: <z1@x> <z2@x>\n"
        ),
        _m(
            "From: anna@acme.test\nTo: zenon@example.org\nSubject: Fwd: Zamówienie 17\n"
            + d.format(4)
            + "Message-ID: <z4@x>\n"
        ),
        _m(
            "From: Anna <anna@acme.test>\nSubject: [ACME] Re: Zamówienie 17 (fwd)\n"
            + d.format(4)  # the same Date as the one before
            + "Message-ID: <z5@x>\nIn-Reply-To: <z2@x>\n"
        ),
        _m(
            "From: =?UTF-8?Q?=C5=BBaneta?= <zaneta@example.org>\nTo: Biuro <biuro@acme.test>\n"
            "Subject: =?UTF-8?Q?Re=3A_Faktura_=C5=82=C3=B3d=C5=BA?=\n" + d.format(6) + "Message-ID: <f1@x>\n"
        ),
        _m(
            'From: Zbigniew <zbyszek@example.org>\nTo: "" <empty-name@example.org>\n'
            "Subject: Faktura łódź\n" + d.format(5) + "Message-ID: <f2@x>\nReferences: <f1@x> <f2@x>\n"
        ),
        _m("From: ewa@example.org\nSubject: [fwd: Faktura łódź]\nMessage-ID: <f3@x>\n"),  # no Date
        _m(
            "From: Ewa <ewa@example.org>\nSubject: faktura ŁÓDŹ\nDate: not a date at all\n"
            "Message-ID: <f4@x>\nReferences: <missing@x>\n"
        ),
        _m(
            "From: Grupa: a@b.c, d@e.f;\nTo: undisclosed-recipients:;\nSubject: [ACME]\n"
            + d.format(9)
            + "Message-ID: <g1@x>\n"
        ),
        _m("From: <_under@example.org>\nTo: ~tilde@example.org\nSubject: _underscore\n" + d.format(10)),
        _m("From: Adam@example.org\nTo: adam@example.org\nSubject: adam\n" + d.format(11)),
        _m("From: adam@example.org\nTo: Adam@example.org\nSubject: Adam\n" + d.format(11)),
        _m("From: (comment only) c@example.org\nSubject: \nCc: x@y.z, a@b.c\n" + d.format(12)),
        _m(
            "Subject: no addresses at all\n" + d.format(13) + "Message-ID: <loop1@x>\nReferences: <loop2@x>\n"
        ),
        _m(
            "Subject: Re: no addresses at all\n"
            + d.format(14)
            + "Message-ID: <loop2@x>\nReferences: <loop1@x>\n"
        ),
        _m(
            "From: Ąnna <anna@acme.test>\nSubject: Zażółć gęślą jaźń\nSubject: second subject field\n"
            "Date: Mon, 04 Mar 2024 12:13:00 +0200\n"  # the same instant as the one before
        ),
        _m("From: Zofia <zofia@example.org>\nSubject: zażółć gęślą jaźń\n" + d.format(15)),
        _m("From: ząb <zab@example.org>\nSubject: Ząb\n" + d.format(16)),
        _m("From: zab <zab@example.org>\nSubject: Zab\n" + d.format(16)),
        _m(
            "From: =?ISO-8859-2?Q?Pawe=B3?= <pawel@example.org>\nSubject: Re: Fwd: Re: ostatni\n"
            + d.format(17)
        ),
        _m("From: ostatni@example.org\nSubject: re:ostatni\nDate: Mon, 04 Mar 2024 10:17:00 +0000\n"),
        _m('From: "=?UTF-8?Q?Zofia_W=C3=B3jcik?=" <zw@example.org>\nSubject: Fw: Ząb\n' + d.format(18)),
        _m("From: Re Tag <re@example.org>\nSubject: [a] [b] Re: [c] ostatni\n" + d.format(19)),
        _m("From: =?UTF-8?Q?broken?= <b@example.org>\nSubject: =?UTF-8?B?!!!?= zepsuty\n" + d.format(20)),
    ]


CORPUS = corpus()
INTERNAL = "04-Mar-2024 09:{:02d}:00 +0000"  # some equal internal dates too (ARRIVAL ties)

SORTS = [
    b"(ARRIVAL)",
    b"(REVERSE ARRIVAL)",
    b"(DATE)",
    b"(REVERSE DATE)",
    b"(SIZE)",
    b"(SUBJECT)",
    b"(REVERSE SUBJECT)",
    b"(SUBJECT DATE)",
    b"(SUBJECT REVERSE DATE)",
    b"(FROM)",
    b"(REVERSE FROM)",
    b"(TO)",
    b"(CC)",
    b"(DISPLAYFROM)",
    b"(REVERSE DISPLAYFROM)",
    b"(DISPLAYTO)",
    b"(DISPLAYFROM SUBJECT)",
    b"(CC REVERSE TO SUBJECT)",
    b"(FROM TO CC DATE ARRIVAL SIZE SUBJECT DISPLAYFROM DISPLAYTO)",
]
SEARCHES = [
    b"UTF-8 ALL",
    "UTF-8 SUBJECT {11+}\r\nzamówienie".encode(),
    b"US-ASCII NOT FROM anna",
    b"UTF-8 5:12",
]
ESORTS = [
    b"SORT RETURN (MIN MAX COUNT) (DATE) UTF-8 ALL",
    b"SORT RETURN () (SUBJECT) UTF-8 ALL",
    b"SORT RETURN (ALL) (REVERSE DISPLAYFROM) UTF-8 ALL",
    b"UID SORT RETURN (MIN MAX ALL COUNT) (SUBJECT FROM) UTF-8 NOT SUBJECT faktura",
    b"SORT RETURN (COUNT ALL) (DATE) UTF-8 SUBJECT nothing-matches",
    b"UID SORT RETURN (MIN) (ARRIVAL) UTF-8 ALL",
]
THREADS = [
    b"THREAD REFERENCES UTF-8 ALL",
    b"THREAD ORDEREDSUBJECT UTF-8 ALL",
    b"UID THREAD REFERENCES UTF-8 ALL",
    b"THREAD REFERENCES UTF-8 NOT SUBJECT faktura",
    b"THREAD ORDEREDSUBJECT US-ASCII 3:20",
]

# --------------------------------------------------------------------------- the two servers

_tags = itertools.count()


def raw_command(client: imaplib.IMAP4, line: bytes) -> tuple[list[bytes], bytes]:
    """Send one command; its untagged lines (tag normalised to T) and its tagged line's status word."""
    tag = b"S%d" % next(_tags)
    client.send(tag + b" " + line + b"\r\n")
    response = read_response(client, tag).replace(b'(TAG "' + tag + b'")', b'(TAG "T")')
    lines = response.split(b"\r\n")[:-1]
    return [x for x in lines if x.startswith(b"* ")], lines[-1].split(b" ")[1]


def loaded(port: int, user: str, password: str) -> imaplib.IMAP4:
    client = connect(port, user, password)
    for i, raw in enumerate(CORPUS):
        append(client, raw, "", INTERNAL.format(i // 2))
    raw_command(client, b'CREATE "Empty"')
    raw_command(client, b"SELECT INBOX")
    return client


@pytest.fixture(scope="module")
def dovecot() -> Iterator[imaplib.IMAP4]:
    user, password = "sort@acme.test", "dovecot-secret"
    with running_dovecot({user: password}) as server:
        client = loaded(server.port, user, password)
        yield client
        with contextlib.suppress(Exception):
            client.logout()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def mailgate(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[imaplib.IMAP4]:
    with Mailgate(request.param, tmp_path_factory.mktemp(request.param)) as server:
        client = loaded(server.port, LOGIN, PASSWORD)
        yield client
        with contextlib.suppress(Exception):
            client.logout()


def both(dovecot: imaplib.IMAP4, mailgate: imaplib.IMAP4, line: bytes) -> tuple[object, object]:
    return raw_command(dovecot, line), raw_command(mailgate, line)


@pytest.mark.peers
@pytest.mark.parametrize("search", SEARCHES, ids=["ALL", "SUBJECT", "NOT FROM", "5:12"])
@pytest.mark.parametrize("criteria", SORTS, ids=[c.decode() for c in SORTS])
def test_sort_matches_dovecot(
    dovecot: imaplib.IMAP4, mailgate: imaplib.IMAP4, criteria: bytes, search: bytes
) -> None:
    for prefix in (b"SORT ", b"UID SORT "):
        theirs, ours = both(dovecot, mailgate, prefix + criteria + b" " + search)
        assert ours == theirs


@pytest.mark.peers
@pytest.mark.parametrize("line", ESORTS + THREADS, ids=[x.decode() for x in ESORTS + THREADS])
def test_esort_and_thread_match_dovecot(dovecot: imaplib.IMAP4, mailgate: imaplib.IMAP4, line: bytes) -> None:
    theirs, ours = both(dovecot, mailgate, line)
    assert ours == theirs


HOSTILE = [
    b"SORT (DATE) KOI8-X ALL",  # NO [BADCHARSET]
    b"THREAD REFERENCES KOI8-X ALL",
    b"SORT (REVERSE) UTF-8 ALL",  # BAD: REVERSE of nothing
    b"SORT () UTF-8 ALL",
    b"SORT (NAME) UTF-8 ALL",
    b"SORT DATE UTF-8 ALL",
    b"SORT (DATE) UTF-8",
    b"SORT RETURN (MIN) (DATE)",
    b"THREAD REFERENCES UTF-8",
    b"THREAD (REFERENCES) UTF-8 ALL",
    b"SORT (DATE) UTF-8 SUBJECT {3+}\r\nab)",
    b'SORT (DATE) "UTF-8" ALL',
    b"SORT (DATE) {5+}\r\nUTF-8 ALL",
    b"SORT (DATE) \xc5\x81-8 ALL",
    b"SORT RETURN (SAVE SAVE) (DATE) UTF-8 ALL",
    b"UID SORT (DATE) UTF-8 UID 1:*",
]


@pytest.mark.peers
@pytest.mark.parametrize("line", HOSTILE, ids=[x.decode("latin-1") for x in HOSTILE])
def test_hostile_sort_and_thread_get_dovecots_status(
    dovecot: imaplib.IMAP4, mailgate: imaplib.IMAP4, line: bytes
) -> None:
    """OK, NO or BAD as Dovecot answers (the untagged data too when the answer is OK)."""
    (their_data, their_status), (our_data, our_status) = both(dovecot, mailgate, line)
    assert our_status == their_status
    if their_status == b"OK":
        assert our_data == their_data


@pytest.mark.peers
def test_unsupported_charsets_get_badcharset(mailgate: imaplib.IMAP4) -> None:
    """Dovecot hands any name to iconv (it takes 'UTF-8"'); mailgate names the two it takes.

    The defect (SEARCH): a SEARCH under another CHARSET was answered OK, its strings decoded
    as UTF-8 with replacement characters, so it silently found nothing or the wrong messages."""
    for line in (
        b'SORT (DATE) "UTF-8\\"" ALL',
        b"THREAD REFERENCES ISO-8859-2 ALL",
        b"UID SORT (DATE) KOI8-R ALL",
        b"SEARCH CHARSET FOO SUBJECT x",
        b"UID SEARCH RETURN (COUNT) CHARSET ISO-8859-2 SUBJECT x",
    ):
        tag = b"S%d" % next(_tags)
        mailgate.send(tag + b" " + line + b"\r\n")
        assert read_response(mailgate, tag).startswith(tag + b" NO [BADCHARSET (US-ASCII UTF-8)] ")


@pytest.mark.peers
def test_esort_save_then_dollar_matches_dovecot(dovecot: imaplib.IMAP4, mailgate: imaplib.IMAP4) -> None:
    """RETURN (SAVE) keeps the set for ``$`` (RFC 5182 with RFC 5267); alone it answers nothing."""
    for line in (
        b"SORT RETURN (SAVE) (SUBJECT) UTF-8 SUBJECT faktura",
        b"SORT (REVERSE DATE) UTF-8 $",
        b"UID SORT RETURN (SAVE MIN COUNT) (FROM) UTF-8 NOT SUBJECT faktura",
        b"SORT (SIZE) UTF-8 $",
        b"THREAD REFERENCES UTF-8 $",
    ):
        theirs, ours = both(dovecot, mailgate, line)
        assert ours == theirs, line


@pytest.mark.peers
def test_sort_with_10000_criteria_is_bad_and_the_session_lives(mailgate: imaplib.IMAP4) -> None:
    """Dovecot takes any number; mailgate stops at twice the number of keys (RFC 5256 allows BAD)."""
    data, status = raw_command(mailgate, b"SORT (" + b" ".join([b"DATE"] * 10_000) + b") UTF-8 ALL")
    assert (data, status) == ([], b"BAD")
    data, status = raw_command(mailgate, b"SORT (" + b" ".join([b"DATE"] * 18) + b") UTF-8 ALL")
    assert status == b"OK"


@pytest.mark.peers
def test_sort_and_thread_on_an_empty_folder(dovecot: imaplib.IMAP4, mailgate: imaplib.IMAP4) -> None:
    for client in (dovecot, mailgate):
        raw_command(client, b'SELECT "Empty"')
    try:
        for line in (
            b"SORT (DATE) UTF-8 ALL",
            b"UID SORT (REVERSE SUBJECT) UTF-8 ALL",
            b"SORT RETURN (MIN MAX COUNT ALL) (DATE) UTF-8 ALL",
            b"THREAD REFERENCES UTF-8 ALL",
            b"THREAD ORDEREDSUBJECT UTF-8 ALL",
        ):
            theirs, ours = both(dovecot, mailgate, line)
            assert ours == theirs
        assert raw_command(mailgate, b"THREAD REFERENCES UTF-8 ALL") == ([b"* THREAD "], b"OK")
    finally:
        for client in (dovecot, mailgate):
            raw_command(client, b"SELECT INBOX")


@pytest.mark.peers
def test_capabilities_offer_sort_display_and_esort(mailgate: imaplib.IMAP4) -> None:
    (line,), _ = raw_command(mailgate, b"CAPABILITY")
    assert {b"SORT", b"SORT=DISPLAY", b"ESORT", b"THREAD=REFERENCES", b"THREAD=ORDEREDSUBJECT"} <= set(
        line.split()
    )


# --------------------------------------------------------------------------- pure: base subject, keys, order


@pytest.mark.parametrize(
    ("subject", "base"),
    [
        ("Re: Zamówienie 17", "Zamówienie 17"),
        ("RE: Re: re:Zamówienie 17", "Zamówienie 17"),
        ("Fwd: Fw: FWD: x", "x"),
        ("Re[2]: x", "x"),  # a blob between "re" and ":"
        ("Re [ACME] : x", "x"),
        ("[ACME] [list] Re: x", "x"),
        ("[ACME] x", "x"),
        ("[ACME]", "[ACME]"),  # a blob that is all there is stays
        ("[ACME] [list]", "[list]"),
        ("x (fwd)", "x"),
        ("x (FWD) (fwd)  ", "x"),
        ("x(fwd)", "x"),
        ("[fwd: x]", "x"),
        ("[Fwd: Re: [fwd: x (fwd)]]", "x"),
        ("Re: [fwd: x]", "x"),
        ("[fwd: x] (fwd)", "x"),
        ("Re:", ""),
        ("Re", "Re"),
        ("Reply: x", "Reply: x"),
        ("Fwx: x", "Fwx: x"),
        ("a\t\r\n  b", "a b"),
        ("", ""),
    ],
)
def test_base_subject_rfc5256(subject: str, base: str) -> None:
    assert sort.base_subject(subject) == base


@pytest.mark.parametrize(
    "hostile",
    [
        "re:" * 30_000,
        "(fwd)" * 20_000,
        "[x]" * 30_000 + "a",
        "Re: " * 20_000 + "x" + " (fwd)" * 10_000,
        "[fwd: " * 10_000 + "x" + "]" * 10_000,
        "[a][b]re [" + "x" * 100_000,
    ],
    ids=["re", "fwd-trailers", "blobs", "both-ends", "fwd-wraps", "open-blob"],
)
def test_base_subject_is_linear_on_hostile_subjects(hostile: str) -> None:
    """A 100 KB subject built against the rules costs milliseconds, not the 10-30 s of a rescan per step."""
    started = time.perf_counter()
    sort.base_subject(sort.casemap(hostile))
    assert time.perf_counter() - started < 0.5


@given(
    st.lists(st.sampled_from(["re", "Fwd", ":", " ", "[", "]", "[x]", "(fwd)", "[fwd:", "a"]), max_size=30)
)
def test_base_subject_is_idempotent_and_never_grows(parts: list[str]) -> None:
    subject = "".join(parts)
    base = sort.base_subject(subject)
    assert len(base) <= len(subject)
    assert sort.base_subject(base) == base


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("żółw", "ŻÓŁW"),
        ("Zażółć", "ZAŻÓŁĆ"),
        ("ǆ", "ǅ"),  # a titlecase digraph
        ("\uff46\uff55\uff4c\uff4c", "FULL"),  # fullwidth letters: NFKD
    ],
)
def test_casemap_equates(a: str, b: str) -> None:
    assert sort.casemap(a) == sort.casemap(b)


def test_casemap_orders_as_dovecot() -> None:
    """Titlecase, not casefold: '_' (0x5F) sorts after every letter, as in Dovecot; ß keeps its place."""
    assert sorted(["_x", "a", "Z"], key=sort.casemap) == ["a", "Z", "_x"]
    assert sort.casemap("ß") == "ß"
    assert sort.casemap("ząb") > sort.casemap("zab")


def _keys(raw: str) -> SortKeys:
    data = raw.replace("\n", "\r\n").encode() + b"\r\n\r\nx\r\n"
    subject = next((v for n, v in parse_headers(data).fields if n.lower() == "subject"), b"")
    return sort.keys(sort.subject_text(subject), mime.envelope(data))


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (
            "From: Jan Kowalski <jan@x.pl>\nTo: Biuro <biuro@acme.test>\nCc: c@x\nSubject: Re: Zamówienie",
            SortKeys(sort.casemap("Zamówienie"), "JAN", "BIURO", "C", "JAN KOWALSKI", "BIURO"),
        ),
        (
            'From: =?UTF-8?Q?=C5=81ukasz?= <l@x.pl>\nTo: "" <empty@x.pl>\n'
            "Subject: =?UTF-8?Q?Re=3A_=C5=82=C3=B3d=C5=BA?=",
            SortKeys(sort.casemap("łódź"), "L", "EMPTY", "", sort.casemap("Łukasz"), "EMPTY@X.PL"),
        ),
        (
            "From: Grupa: a@b.c;\nTo: <only@addr.pl>\nSubject: [tag]",
            SortKeys("[TAG]", "GRUPA", "ONLY", "", "GRUPA", "ONLY@ADDR.PL"),
        ),
        ("Subject: R\xe9sum\xe9", SortKeys(sort.casemap("Résumé"), "", "", "", "", "")),
        ("X-Nothing: here", SortKeys("", "", "", "", "", "")),
    ],
    ids=["plain", "encoded", "group", "utf8", "empty"],
)
def test_sort_keys_of_a_message(headers: str, expected: SortKeys) -> None:
    assert _keys(headers) == expected


@given(st.lists(st.one_of(st.none(), st.binary(max_size=40)), max_size=6))
def test_stored_envelope_values_read_back_as_written(values: list[bytes | None]) -> None:
    """The sort keys read the stored ENVELOPE back (2026-12-04: its quoted strings are now scanned
    a run at a time, not byte by byte: a quarter of an APPEND's parsing went there)."""
    wire = b"(" + b" ".join(imap_wire.nstring(v) for v in values) + b")"
    assert sort._value(wire, 0) == (values, len(wire))


def test_a_truncated_stored_envelope_string_is_an_error_not_an_endless_loop() -> None:
    with pytest.raises(ValueError, match="unterminated"):
        sort._value(b'"no end \\" here', 0)


def test_sort_keys_read_a_latin1_subject_as_dovecot_does() -> None:
    """Invalid UTF-8 is U+FFFD, so 'R\\xe9sum\\xe9' sorts after 'ROOT' (Dovecot), not before it."""
    data = b"Subject: R\xe9sum\xe9\r\n\r\nx\r\n"
    subject = next(v for n, v in parse_headers(data).fields if n.lower() == "subject")
    assert sort.keys(sort.subject_text(subject), None).subject == "R\ufffdSUM\ufffd"
    assert sort.casemap("root") < "R\ufffdSUM\ufffd"


@pytest.mark.parametrize(
    ("numbers", "wire"),
    [
        ([], b""),
        ([5], b"5"),
        ([1, 2, 3], b"1:3"),
        ([3, 2, 1], b"3,2,1"),
        ([14, 12, 13, 6, 7, 8, 20], b"14,12:13,6:8,20"),
    ],
)
def test_esort_all_runs(numbers: list[int], wire: bytes) -> None:
    assert imap_wire.sequence(numbers) == wire


def test_order_breaks_ties_by_sequence_number_even_reversed() -> None:
    when = datetime(2024, 3, 4, tzinfo=UTC)
    empty = SortKeys("", "", "", "", "", "")
    rows = [
        sort.Row(
            10 + n, n, when, when + timedelta(minutes=n // 2), 100 - n, dataclasses.replace(empty, subject=s)
        )
        for n, s in enumerate(["B", "A", "B", "A"], 1)
    ]
    by = lambda criteria: [r.seq for r in sort.order(rows, criteria)]  # noqa: E731
    assert by([("SUBJECT", False)]) == [2, 4, 1, 3]
    assert by([("SUBJECT", True)]) == [1, 3, 2, 4]  # ties stay ascending
    assert by([("DATE", True)]) == [4, 2, 3, 1]
    assert by([("SUBJECT", False), ("SIZE", False)]) == [4, 2, 3, 1]
    assert by([("ARRIVAL", True)]) == [1, 2, 3, 4]  # all equal: sequence order


def test_dates_within_one_second_are_equal_for_sort() -> None:
    """The defect: ``SORT (REVERSE ARRIVAL)`` of messages appended within one second followed the
    microseconds the database kept (4,3 where Dovecot said 1:2); INTERNALDATE shows whole seconds."""
    when = datetime(2024, 3, 4, 10, 0, 0, 900_000, tzinfo=UTC)
    keys = SortKeys("", "", "", "", "", "")
    rows = [sort.Row(n, n, when + timedelta(microseconds=n * 10_000), None, 10, keys) for n in (1, 2, 3)]
    assert [r.seq for r in sort.order(rows, [("ARRIVAL", True)])] == [1, 2, 3]
    assert [r.seq for r in sort.order(rows, [("DATE", True)])] == [1, 2, 3]


# --------------------------------------------------------------------------- pure: threading


def _msg(n: int, subject: str, minute: int, msgid: str | None, refs: str = "", irt: str = "") -> thread.Msg:
    sent = datetime(2024, 3, 4, 10, minute, tzinfo=UTC)
    return thread.Msg(n, n, sent, subject, msgid, refs or None, irt or None)


THREAD_CASES = [
    (
        "chain",
        [_msg(1, "a", 1, "<1>"), _msg(2, "Re: a", 2, "<2>", "<1>"), _msg(3, "Re: a", 3, "<3>", "<1> <2>")],
        "(1 2 3)",
        "(1 (2)(3))",
    ),
    (
        "two replies",
        [_msg(1, "a", 1, "<1>"), _msg(2, "Re: a", 2, "<2>", "<1>"), _msg(3, "Re: a", 3, "<3>", "<1>")],
        "(1 (2)(3))",
        "(1 (2)(3))",
    ),
    ("in-reply-to only", [_msg(1, "a", 1, "<1>"), _msg(2, "b", 2, "<2>", irt="<1>")], "(1 2)", "(1)(2)"),
    (
        "absent parent",
        [_msg(1, "x", 1, "<1>", "<gone>"), _msg(2, "y", 2, "<2>", "<gone>")],
        "((1)(2))",
        "(1)(2)",
    ),
    ("loop", [_msg(1, "p", 1, "<1>", "<2>"), _msg(2, "q", 2, "<2>", "<1>")], "(2 1)", "(1)(2)"),
    (
        "same subject, no references",
        [_msg(1, "Faktura", 1, "<1>"), _msg(2, "Re: faktura", 2, "<2>")],
        "(1 2)",
        "(1 2)",
    ),
    ("by date, not by number", [_msg(1, "late", 9, "<1>"), _msg(2, "early", 1, "<2>")], "(2)(1)", "(2)(1)"),
    ("empty", [], "", ""),
]


@pytest.mark.parametrize(
    ("messages", "by_references", "by_subject"),
    [case[1:] for case in THREAD_CASES],
    ids=[case[0] for case in THREAD_CASES],
)
def test_threading(messages: list[thread.Msg], by_references: str, by_subject: str) -> None:
    assert thread.references(messages) == by_references
    assert thread.ordered_subject(messages) == by_subject


def test_threading_a_long_reference_chain_does_not_recurse() -> None:
    """5,000 messages each replying to the one before: no RecursionError, one thread."""
    messages = [_msg(n, "Re: x", 0, f"<{n}>", " ".join(f"<{i}>" for i in range(max(1, n - 20), n)))
                for n in range(1, 5001)]  # fmt: skip
    answer = thread.references(messages)
    assert answer.startswith("(1 2 3 ")
    assert answer.endswith(" 5000)")


# --------------------------------------------------------------------------- the parser


_TOKENS = [
    "SORT", "UID", "THREAD", "RETURN", "(", ")", " ", "MIN", "MAX", "ALL", "COUNT", "SAVE", "PARTIAL",
    "REVERSE", "DATE", "ARRIVAL", "SUBJECT", "DISPLAYFROM", "DISPLAYTO", "FROM", "CC", "TO", "SIZE",
    "REFERENCES", "ORDEREDSUBJECT", "UTF-8", "US-ASCII", '"UTF-8"', "KOI8-R", "1:*", "$", "NOT", "x",
    "{1+}\r\nx", '"', "\\", "\xff",
]  # fmt: skip


@given(st.lists(st.sampled_from(_TOKENS), max_size=24))
@settings(max_examples=400)
def test_sort_and_thread_syntax_never_crashes_the_parser(tokens: list[str]) -> None:
    for verb in ("SORT ", "UID SORT ", "THREAD ", "UID THREAD "):
        for line in lines(wire("A1 " + verb + "".join(tokens)), max_line=1 << 20):
            try:
                command = parse(line)
            except ParseError:
                continue
            assert isinstance(command, Sort | Thread)
            if isinstance(command, Sort):
                assert 1 <= len(command.criteria) <= 18


# --------------------------------------------------------------------------- in process: old rows, 10,000

_HASH = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash("agent-password")


@contextlib.asynccontextmanager
async def _server(tmp_path: Path, db_url: str) -> AsyncIterator[tuple[Database, Pipeline, Config, int]]:
    data = config_dict(tmp_path, db_url)
    data["tenants"][0]["agents"] = [{"login": "anna@acme.test", "password_hash": _HASH}]
    config = parse_config(data)
    db, blobs = await open_store(config)
    changes = Changes()
    server = IMAPServer(
        lambda: config, db, blobs, Authenticator(lambda: config, db, failure_delay=0.05), changes
    )
    await server.start("127.0.0.1", 0)
    try:
        yield db, Pipeline(db, blobs, changes=changes), config, server.port
    finally:
        await server.stop()
        await db.close()


def _session(port: int, *lines: bytes) -> list[tuple[list[bytes], bytes]]:
    client = imaplib.IMAP4("127.0.0.1", port, timeout=60)
    client.login("anna@acme.test", "agent-password")
    try:
        return [raw_command(client, line) for line in lines]
    finally:
        client.logout()


async def test_rows_stored_before_the_sort_columns_get_their_keys_once(tmp_path: Path, db_url: str) -> None:
    """Regression for rows of migration 0009's era: NULL keys are computed from the stored
    Subject and ENVELOPE, written back, and sort as fresh rows do."""
    async with _server(tmp_path, db_url) as (db, pipeline, config, port):
        for raw in CORPUS[:12]:
            await pipeline.deliver(config.tenant("acme"), raw, Delivery(source="smtp"))
        lines = (b"SELECT INBOX", b"SORT (SUBJECT DISPLAYFROM) UTF-8 ALL", b"SORT (REVERSE CC TO) UTF-8 ALL")
        fresh = await asyncio.to_thread(_session, port, *lines)
        async with db.write() as s:
            await s.execute(update(Message).values(dict.fromkeys(SORT_COLUMNS)))
        old = await asyncio.to_thread(_session, port, *lines)
        assert old[1:] == fresh[1:]  # SELECT differs: the first session took \\Recent
        async with db.read() as s:
            inbox = select(Folder.id).where(Folder.tenant_id == "acme", Folder.name == "INBOX")
            subjects = (
                await s.scalars(select(Message.sort_subject).where(Message.folder_id.in_(inbox)))
            ).all()
        assert len(subjects) == int(fresh[0][0][2].split()[1])  # "* n EXISTS"
        assert None not in subjects


async def test_copy_and_move_keep_the_sort_keys(tmp_path: Path, db_url: str) -> None:
    def scenario(port: int) -> list[tuple[list[bytes], bytes]]:
        client = imaplib.IMAP4("127.0.0.1", port, timeout=60)
        client.login("anna@acme.test", "agent-password")
        try:
            for raw in CORPUS[:4]:
                append(client, raw, "", INTERNAL.format(0))
            lines = (b"SELECT INBOX", b"COPY 1:* Archive", b"MOVE 1 Drafts")
            return [raw_command(client, line) for line in lines]
        finally:
            client.logout()

    async with _server(tmp_path, db_url) as (db, _, _config, port):
        answers = await asyncio.to_thread(scenario, port)
        async with db.read() as s:
            rows = (
                await s.execute(select(Message.message_id, *(getattr(Message, c) for c in SORT_COLUMNS)))
            ).all()
    assert [status for _, status in answers] == [b"OK"] * 3
    by_id: dict[str | None, set[tuple[object, ...]]] = {}
    for row in rows:
        by_id.setdefault(row[0], set()).add(tuple(row[1:]))
    assert len(rows) == 8  # 4 in INBOX (less the one moved), 4 copies in Archive, 1 in Drafts
    assert all(len(keys) == 1 and None not in next(iter(keys)) for keys in by_id.values())


async def test_sorting_10000_messages_reads_no_message(tmp_path: Path, db_url: str) -> None:
    """10,000 rows whose blobs do not exist: SORT and THREAD answer from the columns alone (a blob
    read would fail the command), in a few seconds at most."""
    count = 10_000
    async with _server(tmp_path, db_url) as (db, _, _config, port):
        when = datetime(2024, 3, 4, tzinfo=UTC)
        async with db.write() as s:
            inbox = await mailstore.require_folder(s, "acme", "INBOX")
            words = ["Faktura", "Zamówienie", "Pytanie", "Łódź", "oferta", "[ACME] termin"]
            await mailstore.append(
                s,
                inbox,
                [
                    mailstore.NewMessage(
                        blob=f"{n:064x}",  # no such blob
                        size=1000 + n % 997,
                        received_at=when + timedelta(seconds=n % 613),
                        sent_date=None if n % 7 == 0 else when + timedelta(minutes=n % 1009),
                        subject=f"Re: {words[n % 6]} {n % 101}",
                        message_id=f"<m{n}@x>",
                        references=" ".join(f"<m{r}@x>" for r in range(n - n % 5, n)) or None,
                        sort_keys=sort.keys(
                            f"Re: {words[n % 6]} {n % 101}",
                            b'(NIL "s" (("Nadawca %d" NIL "user%d" "example.org")) NIL NIL '
                            b'((NIL NIL "to%d" "acme.test")) NIL NIL NIL NIL)' % (n % 89, n % 83, n % 79),
                        ),
                    )
                    for n in range(count)
                ],
            )
        started = time.perf_counter()
        answers = await asyncio.to_thread(
            _session,
            port,
            b"EXAMINE INBOX",
            b"SORT (SUBJECT) UTF-8 ALL",
            b"SORT (REVERSE DATE) UTF-8 ALL",
            b"UID SORT (DISPLAYFROM TO ARRIVAL) UTF-8 ALL",
            b"SORT RETURN (MIN MAX COUNT) (SIZE) UTF-8 ALL",
        )
        sorted_in = time.perf_counter() - started
        threads = await asyncio.to_thread(
            _session,
            port,
            b"EXAMINE INBOX",
            b"THREAD REFERENCES UTF-8 ALL",
            b"THREAD ORDEREDSUBJECT UTF-8 ALL",
        )
        threaded_in = time.perf_counter() - started - sorted_in
    for data, status in answers[1:4]:
        assert status == b"OK"
        assert len(data[-1].split()) == 2 + count
    assert answers[4][0][-1].endswith(b"COUNT %d" % count)
    for data, status in threads[1:]:
        assert status == b"OK"
        assert data[-1].startswith(b"* THREAD (")
    engine = db_url.split(":")[0]
    print(f"\n{count} messages ({engine}): 4 SORTs {sorted_in:.2f} s, 2 THREADs {threaded_in:.2f} s")
    assert sorted_in < 20

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

import contextlib
import imaplib
import itertools
from collections.abc import Iterator

import pytest

from tests.dovecot import running_dovecot
from tests.test_imap_differential import LOGIN, PASSWORD, Mailgate, append, connect, read_response

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

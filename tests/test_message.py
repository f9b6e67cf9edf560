"""Tests for gateway.message: header block split, unfolding, decoding, derived fields."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.message import Headers, parse_headers

# --- header block split and unfolding ---------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "fields", "body"),
    [
        pytest.param(
            b"From: a@x.pl\r\nSubject: Hi\r\n\r\nbody",
            (("From", b"a@x.pl"), ("Subject", b"Hi")),
            b"body",
            id="crlf",
        ),
        pytest.param(
            b"From: a@x.pl\nSubject: Hi\n\nbody",
            (("From", b"a@x.pl"), ("Subject", b"Hi")),
            b"body",
            id="lf",
        ),
        pytest.param(
            b"Subject: a\r\n b\r\n\tc\r\nX: y\r\n\r\nbody",
            (("Subject", b"a b\tc"), ("X", b"y")),
            b"body",
            id="folded-crlf",
        ),
        pytest.param(
            b"Subject: a\n  b\nX: y\n\nbody",
            (("Subject", b"a  b"), ("X", b"y")),
            b"body",
            id="folded-lf",
        ),
        pytest.param(
            b"Subject:\r\n  starts on the next line\r\n\r\n",
            (("Subject", b"starts on the next line"),),
            b"",
            id="value-on-continuation-line",
        ),
        pytest.param(b"Subject:   \t x \r\n\r\n", (("Subject", b"x "),), b"", id="whitespace"),
        pytest.param(b"Empty:\r\nX:\r\n\r\n", (("Empty", b""), ("X", b"")), b"", id="empty"),
        pytest.param(
            b"A: 1\nB: 2\r\nC: 3\n\r\nbody",
            (("A", b"1"), ("B", b"2"), ("C", b"3")),
            b"body",
            id="mixed-line-ends",
        ),
        pytest.param(b"A: 1\r\n\nbody", (("A", b"1"),), b"body", id="crlf-then-lf-blank"),
        pytest.param(b"A: x\ry\r\n\r\n", (("A", b"x\ry"),), b"", id="bare-cr-kept"),
        pytest.param(
            b"From MAILER-DAEMON Fri Jul  8 12:08:34 2011\nFrom: a@x.pl\n\nbody",
            (("From", b"a@x.pl"),),
            b"body",
            id="mbox-from-line",
        ),
        pytest.param(
            b"A: 1\r\nnot a header\r\n continuation of junk\r\nB: 2\r\n\r\nbody",
            (("A", b"1"), ("B", b"2")),
            b"body",
            id="junk-line-and-its-continuation-skipped",
        ),
        pytest.param(b" orphan\r\nA: 1\r\n\r\n", (("A", b"1"),), b"", id="leading-continuation"),
        pytest.param(b"Subject : x\r\nA: 1\r\n\r\n", (("A", b"1"),), b"", id="space-before-colon"),
        pytest.param(b": x\r\nA: 1\r\n\r\n", (("A", b"1"),), b"", id="empty-name"),
        pytest.param(
            b"X-Odd!#$%&'*+-.^_`{|}~: v\r\n\r\n",
            (("X-Odd!#$%&'*+-.^_`{|}~", b"v"),),
            b"",
            id="name-charset",
        ),
        pytest.param(b"A: 1\r\nB: 2", (("A", b"1"), ("B", b"2")), b"", id="no-blank-line"),
        pytest.param(b"A: 1\r\nB: 2\r\n", (("A", b"1"), ("B", b"2")), b"", id="no-blank-no-body"),
        pytest.param(b"\r\nA: 1\r\n", (), b"A: 1\r\n", id="starts-with-crlf-blank"),
        pytest.param(b"\nA: 1\n", (), b"A: 1\n", id="starts-with-lf-blank"),
        pytest.param(b"", (), b"", id="empty-input"),
        pytest.param(
            b"A: 1\r\n\r\nSubject: in the body\r\n\r\n",
            (("A", b"1"),),
            b"Subject: in the body\r\n\r\n",
            id="body-not-parsed",
        ),
    ],
)
def test_fields_and_body_offset(raw: bytes, fields: tuple[tuple[str, bytes], ...], body: bytes) -> None:
    headers = parse_headers(raw)
    assert headers.fields == fields
    assert headers.body_offset == len(raw) - len(body)
    assert raw[headers.body_offset :] == body


@pytest.mark.parametrize(
    ("head", "blank"),
    [
        pytest.param(b"A: 1\r\nB: 2\r\n", b"\r\n", id="crlf"),
        pytest.param(b"A: 1\nB: 2\n", b"\n", id="lf"),
        pytest.param(b"A: 1\nB: 2\n", b"\r\n", id="lf-then-crlf"),
        pytest.param(b"A: 1\r\nB: 2\r\n", b"\n", id="crlf-then-lf"),
    ],
)
@pytest.mark.parametrize("body", [b"", b"hello\r\n", b"\r\n\r\nstarts blank\r\n", b"X: not a header\n\n"])
def test_body_is_exactly_what_follows_the_blank_line(head: bytes, blank: bytes, body: bytes) -> None:
    raw = head + blank + body
    headers = parse_headers(raw)
    assert raw[headers.body_offset :] == body
    assert headers.fields == (("A", b"1"), ("B", b"2"))


def test_long_header_line() -> None:
    value = b"x" * 10_000 + b" " + b"y" * 5_000
    headers = parse_headers(b"X-Long: " + value + b"\r\n\r\nbody")
    assert headers.fields == (("X-Long", value),)
    assert headers.get("x-long") == value.decode()


@pytest.mark.parametrize(
    ("max_fields", "names"),
    [(0, ()), (2, ("A", "B")), (3, ("A", "B", "C")), (5, ("A", "B", "C")), (-1, ())],
)
def test_max_fields(max_fields: int, names: tuple[str, ...]) -> None:
    raw = b"A: 1\r\nB: 2\r\nC: 3\r\n\r\nbody"
    headers = parse_headers(raw, max_fields=max_fields)
    assert tuple(name for name, _ in headers.fields) == names
    assert raw[headers.body_offset :] == b"body"


def test_max_fields_default_bounds_huge_header() -> None:
    raw = b"X: y\r\n" * 5_000 + b"\r\nbody"
    headers = parse_headers(raw)
    assert len(headers.fields) == 2000
    assert raw[headers.body_offset :] == b"body"


def test_large_body_only_header_is_read() -> None:
    body = b"0123456789abcdef" * (20 * 1024 * 1024 // 16)
    raw = b"Subject: big\r\nFrom: a@x.pl\r\n\r\n" + body
    headers = parse_headers(raw)
    assert headers.body_offset == len(raw) - len(body)
    assert headers.fields == (("Subject", b"big"), ("From", b"a@x.pl"))


# --- decoding ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(b"plain ascii", "plain ascii", id="ascii"),
        pytest.param(b"=?UTF-8?Q?zam=C3=B3wienie?=", "zamówienie", id="q-utf8-polish"),
        pytest.param(b"=?utf-8?q?Zam=C3=B3wienie_nr_5?=", "Zamówienie nr 5", id="q-underscore"),
        pytest.param(
            b"=?ISO-8859-2?Q?Za=BF=F3=B3=E6_g=EA=B6l=B1_ja=BC=F1?=",
            "Zażółć gęślą jaźń",
            id="q-iso-8859-2",
        ),
        pytest.param(b"=?UTF-8?B?xbvDs8WCdw==?=", "Żółw", id="b-utf8"),
        pytest.param(b"=?utf-8?b?xbvDs8WCdw?=", "Żółw", id="b-missing-padding"),
        pytest.param(b"Re: =?utf-8?q?zam=C3=B3wienie?= nr 5", "Re: zamówienie nr 5", id="text-around-word"),
        pytest.param(b"=?utf-8?q?a?= =?utf-8?q?b?=", "ab", id="adjacent-words-space-dropped"),
        pytest.param(b"=?utf-8?q?a?=\r\n =?utf-8?q?b?=", "ab", id="adjacent-words-folded"),
        pytest.param(b"=?utf-8?q?a_?= =?utf-8?q?b?=", "a b", id="encoded-space-kept"),
        pytest.param(b"=?UTF-8?B?xQ==?= =?UTF-8?B?mg==?=", "Ś", id="char-split-across-words"),
        pytest.param(b"=?iso-8859-2?q?=B1?= =?utf-8?q?=C4=99?=", "ąę", id="adjacent-charsets"),
        pytest.param(b"=?x-unknown?q?abc?= def", "=?x-unknown?q?abc?= def", id="unknown-charset"),
        pytest.param(
            b"=?utf-8?q?a?= =?x-unknown?q?b?= =?utf-8?q?c?=",
            "a =?x-unknown?q?b?= c",
            id="unknown-charset-between-words",
        ),
        pytest.param(b"=?base64?q?abc?=", "=?base64?q?abc?=", id="bytes-codec-refused"),
        pytest.param(b"=?punycode?q?abc?=", "=?punycode?q?abc?=", id="punycode-refused"),
        pytest.param(b"x =?utf-8?b?Q?= y", "x =?utf-8?b?Q?= y", id="bad-base64"),
        pytest.param(b"=?utf-8?q?zam=F3wienie?=", "zamówienie", id="mislabelled-charset"),
        pytest.param(b"=?utf-8*pl?q?=C5=BC?=", "ż", id="rfc2231-language"),
        pytest.param(b"=?utf-8?q?a?=b", "ab", id="word-glued-to-text"),
        pytest.param("Zażółć gęślą".encode(), "Zażółć gęślą", id="raw-utf8"),
        pytest.param("Café".encode("latin-1"), "Café", id="raw-latin1"),
        pytest.param(b"\x93quoted\x94", "\u201cquoted\u201d", id="raw-cp1252"),
        pytest.param(b"\x81\xe9", "\x81é", id="raw-not-cp1252-is-latin1"),
        pytest.param(
            "zażółć =?utf-8?q?g=C4=99=C5=9Bl=C4=85?=".encode(),
            "zażółć gęślą",
            id="raw-utf8-and-encoded-word",
        ),
    ],
)
def test_subject_decoding(value: bytes, expected: str) -> None:
    headers = parse_headers(b"Subject: " + value + b"\r\n\r\n")
    assert headers.subject == expected
    assert headers.get_all("subject") == (expected,)


def test_get_and_get_all() -> None:
    headers = parse_headers(
        b"Received: one\r\nSubject: s\r\nRECEIVED: two\r\n\tfolded\r\nreceived: three\r\n\r\n"
    )
    assert headers.get_all("Received") == ("one", "two\tfolded", "three")
    assert headers.get("received") == "one"
    assert headers.get("X-Missing") is None
    assert headers.get_all("X-Missing") == ()


def test_missing_headers() -> None:
    headers = parse_headers(b"X-Only: 1\r\n\r\nbody")
    assert headers.subject == ""
    assert headers.message_id is None
    assert headers.in_reply_to == ()
    assert headers.references == ()
    assert headers.from_addrs == headers.to_addrs == headers.cc_addrs == ()
    assert headers.date is None


# --- msg-ids ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(b"<abc@example.com>", "<abc@example.com>", id="plain"),
        pytest.param(b"\t <abc@example.com>  ", "<abc@example.com>", id="whitespace"),
        pytest.param(b"<abc@example.com> (added by x)", "<abc@example.com>", id="comment"),
        pytest.param(b"junk <a@x> <b@y>", "<a@x>", id="first-of-several"),
        pytest.param(b"abc@example.com", "abc@example.com", id="no-brackets"),
        pytest.param(b"<=?utf-8?q?a?=@x>", "<=?utf-8?q?a?=@x>", id="not-rfc2047-decoded"),
        pytest.param(b"", None, id="empty"),
        pytest.param(b"   ", None, id="blank"),
        pytest.param(b"<>", "<>", id="empty-brackets"),
    ],
)
def test_message_id(value: bytes, expected: str | None) -> None:
    headers = parse_headers(b"Message-ID: " + value + b"\r\nMessage-ID: <second@x>\r\n\r\n")
    assert headers.message_id == expected


def test_references_and_in_reply_to() -> None:
    headers = parse_headers(
        b"In-Reply-To: Your message of Monday <parent@x.pl>\r\n"
        b"References: <root@x.pl>\r\n <mid@x.pl>\r\n\t<parent@x.pl> garbage <not-an id>\r\n\r\n"
    )
    assert headers.in_reply_to == ("<parent@x.pl>",)
    assert headers.references == ("<root@x.pl>", "<mid@x.pl>", "<parent@x.pl>")


def test_references_without_ids() -> None:
    assert parse_headers(b"References: none here\r\n\r\n").references == ()


# --- addresses --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(b"Jan.Kowalski@Example.PL", ("jan.kowalski@example.pl",), id="bare"),
        pytest.param(b"Jan Kowalski <Jan@X.pl>", ("jan@x.pl",), id="display-name"),
        pytest.param(b'"Kowalski, Jan" <jan@x.pl>', ("jan@x.pl",), id="quoted-comma"),
        pytest.param(
            b"=?UTF-8?Q?Kowalski=2C_Pawe=C5=82?= <pawel@x.pl>, b@y.pl",
            ("pawel@x.pl", "b@y.pl"),
            id="encoded-name-with-comma",
        ),
        pytest.param(
            b'a@x.pl, B <b@y.pl>,\r\n\t"C" <c@z.pl>',
            ("a@x.pl", "b@y.pl", "c@z.pl"),
            id="several-folded",
        ),
        pytest.param("Łukasz <ł@x.pl>".encode(), ("ł@x.pl",), id="raw-utf8"),
        pytest.param(b"undisclosed-recipients:;", (), id="empty-group"),
        pytest.param(b"team: a@x.pl, b@x.pl;", ("a@x.pl", "b@x.pl"), id="group"),
        pytest.param(b"", (), id="empty"),
        pytest.param(b"(" * 5000, (), id="nested-comments"),
        pytest.param(b":" * 5000, (), id="nested-groups"),
    ],
)
def test_addresses(value: bytes, expected: tuple[str, ...]) -> None:
    raw = b"From: " + value + b"\r\nTo: " + value + b"\r\nCc: " + value + b"\r\n\r\n"
    headers = parse_headers(raw)
    assert headers.from_addrs == headers.to_addrs == headers.cc_addrs == expected


def test_addresses_from_several_fields() -> None:
    headers = parse_headers(b"To: a@x.pl\r\nCc: c@x.pl\r\nTo: b@x.pl\r\n\r\n")
    assert headers.to_addrs == ("a@x.pl", "b@x.pl")
    assert headers.cc_addrs == ("c@x.pl",)


def test_huge_address_list_is_bounded() -> None:
    headers = parse_headers(b"To: " + b"someone@example.com, " * 100_000 + b"\r\n\r\n")
    addrs = headers.to_addrs
    assert 1000 < len(addrs) < 100_000
    assert set(addrs) == {"someone@example.com"}


# --- date -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(
            b"Mon, 1 Jan 2024 10:00:00 +0100",
            datetime(2024, 1, 1, 10, tzinfo=timezone(timedelta(hours=1))),
            id="rfc5322",
        ),
        pytest.param(b"1 Jan 2024 10:00:00 GMT", datetime(2024, 1, 1, 10, tzinfo=UTC), id="gmt"),
        pytest.param(b"1 Jan 2024 10:00:00 -0000", datetime(2024, 1, 1, 10, tzinfo=UTC), id="no-zone-is-utc"),
        pytest.param(b"1 Jan 2024 10:00", datetime(2024, 1, 1, 10, tzinfo=UTC), id="no-seconds"),
        pytest.param(b"yesterday", None, id="garbage"),
        pytest.param(b"", None, id="empty"),
        pytest.param(b"1 Jan 2024 10:00:00 +9999", None, id="offset-out-of-range"),
        pytest.param(b"1 Jan 99999999999999999999 10:00:00 +0100", None, id="overflow"),
        pytest.param(b"31 Feb 2024 10:00:00 +0000", None, id="no-such-day"),
    ],
)
def test_date(value: bytes, expected: datetime | None) -> None:
    date = parse_headers(b"Date: " + value + b"\r\n\r\n").date
    assert date == expected
    if date is not None:
        assert date.tzinfo is not None


# --- properties -------------------------------------------------------------------------

_FRAGMENTS = [
    b"\r\n",
    b"\n",
    b"\r",
    b" ",
    b"\t",
    b":",
    b"From ",
    b"Subject: ",
    b"From: ",
    b"To: ",
    b"Cc: ",
    b"Date: ",
    b"Message-ID: ",
    b"References: ",
    b"In-Reply-To: ",
    b"=?",
    b"?=",
    b"?q?",
    b"?B?",
    b"utf-8",
    b"x-bad",
    b"punycode",
    b"=C3",
    b"=B3",
    b"_",
    b"<",
    b">",
    b"@",
    b"(",
    b")",
    b'"',
    b",",
    b";",
    b"\\",
    b"a",
    b"Mon, 1 Jan 2024 10:00:00 +0100",
    b"\xc5",
    b"\xbc",
    b"\xff",
    b"\x00",
    b"99999999999999999999",
]
_ALL_NAMES = ("Subject", "From", "To", "Cc", "Date", "Message-ID", "References", "In-Reply-To")


def _exercise(headers: Headers) -> None:
    """Compute every derived value (they must not raise)."""
    for name in _ALL_NAMES:
        headers.get_all(name)
    for name, _ in headers.fields:
        headers.get(name)
    _ = (
        headers.subject,
        headers.message_id,
        headers.in_reply_to,
        headers.references,
        headers.from_addrs,
        headers.to_addrs,
        headers.cc_addrs,
        headers.date,
    )


@given(st.one_of(st.binary(), st.lists(st.sampled_from(_FRAGMENTS)).map(b"".join)))
def test_arbitrary_bytes_never_raise(raw: bytes) -> None:
    headers = parse_headers(raw)
    assert 0 <= headers.body_offset <= len(raw)
    _exercise(headers)


_NAMES = st.text(alphabet=[chr(c) for c in range(33, 127) if c != ord(":")], min_size=1)
_VALUES = st.text(alphabet=[chr(c) for c in range(32, 127)]).map(str.lstrip)


@given(
    st.lists(st.tuples(_NAMES, _VALUES), max_size=30),
    st.sampled_from(["\r\n", "\n"]),
    st.binary(),
)
def test_well_formed_fields_round_trip(fields: list[tuple[str, str]], eol: str, body: bytes) -> None:
    head = "".join(f"{name}: {value}{eol}" for name, value in fields).encode()
    raw = head + eol.encode() + body
    headers = parse_headers(raw)
    assert headers.fields == tuple((name, value.encode()) for name, value in fields)
    assert raw[headers.body_offset :] == body
    _exercise(headers)


@given(st.lists(st.text(alphabet="abcXYZ=?<>@.", min_size=1), min_size=1), st.data())
def test_folding_round_trip(words: list[str], data: st.DataObject) -> None:
    separator = st.sampled_from([" ", "\r\n ", "\n\t", "\r\n  "])
    folded = words[0] + "".join(data.draw(separator) + word for word in words[1:])
    headers = parse_headers(f"X-Folded: {folded}\r\n\r\n".encode())
    unfolded = folded.replace("\r\n", "").replace("\n", "")
    assert headers.fields == (("X-Folded", unfolded.encode()),)

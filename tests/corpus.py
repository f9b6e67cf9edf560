"""A deterministic test corpus: every function returns the same bytes on every run.

All messages are valid as stored mail (no NUL bytes, never empty) and use CRLF
line endings unless their name says otherwise. An IMAP server may normalise
line endings, so compare what it serves, not these inputs.
"""

from __future__ import annotations

import base64
import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

_BASE_DATE = datetime(2024, 3, 1, 9, 0, 0, tzinfo=UTC)

_WORDS = (
    "order",
    "invoice",
    "delivery",
    "parcel",
    "refund",
    "customer",
    "account",
    "payment",
    "address",
    "shipping",
    "tracking",
    "number",
    "question",
    "answer",
    "thanks",
    "please",
    "kindly",
    "regards",
    "hello",
    "morning",
    "evening",
    "week",
    "month",
    "price",
    "offer",
    "discount",
    "product",
    "warranty",
    "return",
    "replacement",
    "zamówienie",
    "faktura",
    "dostawa",
    "paczka",
    "zwrot",
    "klient",
    "konto",
    "płatność",
    "adres",
    "wysyłka",
    "numer",
    "pytanie",
    "odpowiedź",
    "dziękuję",
    "proszę",
    "pozdrawiam",
    "dzień",
    "dobry",
    "cena",
    "oferta",
)
_NAMES = (
    "Anna Nowak",
    "Jan Kowalski",
    "Maria Wiśniewska",
    "Piotr Zieliński",
    "Ewa Lewandowska",
    "John Smith",
)


_ASCII = str.maketrans("ąćęłńóśźżĄĆĘŁŃÓŚŹŻ", "acelnoszzACELNOSZZ")


def _line_pool(rng: random.Random, count: int = 400) -> list[str]:
    """Random text lines, Polish letters transliterated: bodies are us-ascii."""
    ascii_words = [w.translate(_ASCII) for w in _WORDS]
    pool = []
    for _ in range(count):
        words = rng.choices(ascii_words, k=rng.randint(6, 12))
        pool.append(" ".join(words).capitalize() + ".")
    return pool


def _address(name: str) -> str:
    return name.lower().replace(" ", ".") + "@example.org"


def normal(n: int, size: int = 10_000, seed: int = 0) -> list[bytes]:
    """``n`` distinct plain-text messages of about ``size`` bytes each.

    Each has a unique Message-ID (``<corpus.{seed}.{i}@example.org>``), From,
    To, Subject, Date (one minute apart) and an us-ascii body.
    """
    rng = random.Random(seed)
    pool = _line_pool(rng)
    per_line = sum(len(line) + 2 for line in pool) / len(pool)
    out = []
    for i in range(n):
        name = rng.choice(_NAMES).translate(_ASCII)
        head = (
            f"From: {name} <{_address(name)}>\r\n"
            f"To: biuro@acme.test\r\n"
            f"Subject: Corpus {seed}/{i}: {rng.choice(pool)[:40]}\r\n"
            f"Date: {format_datetime(_BASE_DATE + timedelta(minutes=i))}\r\n"
            f"Message-ID: <corpus.{seed}.{i}@example.org>\r\n"
            f"MIME-Version: 1.0\r\n"
            f"Content-Type: text/plain; charset=us-ascii\r\n"
            f"Content-Transfer-Encoding: 7bit\r\n"
            f"\r\n"
            f"Message {i} of corpus seed {seed}.\r\n"
        ).encode("ascii")
        lines = rng.choices(pool, k=max(1, int((size - len(head)) * 1.3 / per_line) + 2))
        body = "\r\n".join(lines).encode("ascii")[: size - len(head) - 2].rstrip(b"\r")
        out.append(head + (body + b"\r\n" if body else b""))
    return out


def _wrap_base64(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", b"\r\n")


def large(n: int = 2, size: int = 1_000_000, seed: int = 0) -> list[bytes]:
    """``n`` multipart messages of about ``size`` bytes: a text part and a base64 attachment."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        boundary = f"=_large_{seed}_{i}_{rng.getrandbits(32):08x}"
        head = (
            f"From: Jan Kowalski <jan.kowalski@example.org>\r\n"
            f"To: biuro@acme.test\r\n"
            f"Subject: Large attachment {seed}/{i}\r\n"
            f"Date: {format_datetime(_BASE_DATE + timedelta(hours=i))}\r\n"
            f"Message-ID: <large.{seed}.{i}@example.org>\r\n"
            f"MIME-Version: 1.0\r\n"
            f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n'
            f"\r\n"
            f"--{boundary}\r\n"
            f"Content-Type: text/plain; charset=us-ascii\r\n"
            f"\r\n"
            f"The scan is attached.\r\n"
            f"--{boundary}\r\n"
            f'Content-Type: application/octet-stream; name="scan{i}.bin"\r\n'
            f'Content-Disposition: attachment; filename="scan{i}.bin"\r\n'
            f"Content-Transfer-Encoding: base64\r\n"
            f"\r\n"
        ).encode("ascii")
        tail = f"--{boundary}--\r\n".encode("ascii")
        raw = max(0, size - len(head) - len(tail)) * 57 // 78  # 57 bytes -> 76 chars + CRLF
        out.append(head + _wrap_base64(rng.randbytes(raw)) + tail)
    return out


def _msg(*headers: str, body: str = "Body.\r\n") -> bytes:
    return ("".join(h + "\r\n" for h in headers) + "\r\n" + body).encode("utf-8")


def malformed_named() -> dict[str, bytes]:
    """The malformed and unusual messages of :func:`malformed`, by name."""
    frm, to = "From: Klient <klient@example.org>", "To: biuro@acme.test"
    date = f"Date: {format_datetime(_BASE_DATE)}"
    return {
        "no_message_id": _msg(frm, to, date, "Subject: no message id"),
        "bare_lf": (
            "From: Klient <klient@example.org>\nTo: biuro@acme.test\n"
            "Subject: bare LF line endings\nMessage-ID: <bare-lf@example.org>\n\n"
            "First line.\nSecond line.\n"
        ).encode("ascii"),
        "utf8_headers": _msg(
            "From: Łukasz Żółć <lukasz@example.org>",
            to,
            date,
            "Subject: Zamówienie nr 12 \u2013 pilne",
            "Message-ID: <utf8-headers@example.org>",
            body="Treść wiadomości: zażółć gęślą jaźń.\r\n",
        ),
        "latin1_headers": (
            b"From: Fran\xe7ois M\xfcller <francois@example.org>\r\nTo: biuro@acme.test\r\n"
            b"Subject: R\xe9sum\xe9 \xfcber caf\xe9\r\nMessage-ID: <latin1-headers@example.org>\r\n"
            b"\r\nCaf\xe9 cr\xe8me.\r\n"
        ),
        "long_header_line": _msg(
            frm,
            to,
            "Subject: a 10 KB header line",
            "Message-ID: <long-header@example.org>",
            "X-Long: " + "a" * 10_240,
        ),
        "multipart_unclosed": _msg(
            frm,
            to,
            "Subject: multipart, boundary never closed",
            "Message-ID: <multipart-unclosed@example.org>",
            "MIME-Version: 1.0",
            'Content-Type: multipart/mixed; boundary="never-closed"',
            body=(
                "Preamble.\r\n--never-closed\r\nContent-Type: text/plain\r\n\r\nFirst part.\r\n"
                "--never-closed\r\nContent-Type: text/html\r\n\r\n<p>Second part, the last.</p>\r\n"
            ),
        ),
        "multipart_headerless_parts": _msg(
            frm,
            to,
            "Subject: multipart parts without headers",
            "Message-ID: <multipart-headerless@example.org>",
            "MIME-Version: 1.0",
            'Content-Type: multipart/alternative; boundary="b1"',
            body=(
                "--b1\r\n\r\nPart with an empty header block.\r\n"
                "--b1\r\nPart with no header block at all.\r\n"
                "--b1\r\nContent-Type: text/plain\r\n"  # headers, then the closing boundary
                "--b1--\r\n"
            ),
        ),
        "headers_only": (
            "From: Klient <klient@example.org>\r\nTo: biuro@acme.test\r\n"
            "Subject: only headers, no body\r\nMessage-ID: <headers-only@example.org>\r\n"
        ).encode("ascii"),
        "no_headers": b"\r\nA message without any header at all.\r\n",
        "odd_bytes": (
            b"From: Odd \x01\x7f <odd@example.org>\r\nTo: biuro@acme.test\r\n"
            b"Subject: odd \x1b[31mbytes\x1b[0m \xff\xfe \xc3(\r\nMessage-ID: <odd-bytes@example.org>\r\n"
            b"X-Trailing-Space: value   \r\n"
            b"\r\n"
            b".\r\n..\r\nFrom the start of a line\r\n"
            b"lone CR\rinside a line\r\n"
            b"controls \x02\x03\x04\x08\x0b\x0c\x1f and DEL \x7f\r\n"
            b"invalid UTF-8 \xc3\x28 \xa0\xa1 \xed\xa0\x80 \xf8\x88\x80\x80\x80\r\n"
            b"   \r\n\t\r\n"
            b"Last line.\r\n"
        ),
        "rfc2047_polish": _msg(
            "From: =?UTF-8?Q?=C5=81ukasz_=C5=BB=C3=B3=C5=82=C4=87?= <lukasz@example.org>",
            to,
            date,
            "Subject: =?UTF-8?B?WmFtw7N3aWVuaWUgbnIgMTIgLSBwaWxuZQ==?=",
            "Message-ID: <rfc2047-polish@example.org>",
            "X-Subject-Latin2: =?ISO-8859-2?Q?Za=BF=F3=B3=E6_g=EA=B6l=B1_ja=BC=F1?=",
        ),
        "spam_flag": _msg(
            frm,
            to,
            date,
            "Subject: CHEAP PILLS",
            "Message-ID: <spam-flag@example.org>",
            "X-Spam-Flag: YES",
            "X-Spam-Status: Yes, score=12.3 required=5.0",
        ),
    }


def malformed() -> list[bytes]:
    """Malformed and unusual messages (see :func:`malformed_named` for which is which)."""
    return list(malformed_named().values())

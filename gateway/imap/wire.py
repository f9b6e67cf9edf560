"""IMAP response values as bytes: strings, literals, NIL, lists, dates, mailbox names.

Quoted strings carry only 7-bit text without CR, LF, NUL; anything else is
sent as a literal, so a value can never break the response framing. The
choice between the two follows Dovecot's (the reference our IMAP answers are
diffed against): a literal also when more than four characters would need a
backslash, whatever the length.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import UTC, datetime

from gateway import mutf7

NIL = b"NIL"
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_NEEDS_LITERAL = re.compile(rb"[\x00\r\n\x80-\xff]")
_MAX_ESCAPES = 4
_ATOM_SPECIALS = frozenset(b'(){ %*"\\]') | frozenset(range(0x00, 0x21)) | {0x7F}


def literal(data: bytes) -> bytes:
    """``{n}\\r\\n`` followed by the bytes."""
    return b"{%d}\r\n" % len(data) + data


def string(value: bytes | str) -> bytes:
    """A quoted string when safe and short, else a literal."""
    data = value.encode("utf-8") if isinstance(value, str) else value
    if _NEEDS_LITERAL.search(data) or data.count(b'"') + data.count(b"\\") > _MAX_ESCAPES:
        return literal(data)
    return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def nstring(value: bytes | str | None) -> bytes:
    """NIL for None, else :func:`string`."""
    return NIL if value is None else string(value)


def astring(value: str) -> bytes:
    """An atom when it is one, else :func:`string`."""
    data = value.encode("utf-8")
    if data and data.upper() != NIL and not any(b in _ATOM_SPECIALS or b > 0x7E for b in data):
        return data
    return string(data)


def mailbox(name: str) -> bytes:
    """A mailbox name on the wire (modified UTF-7)."""
    return astring(mutf7.encode(name))


def paren(items: Iterable[bytes]) -> bytes:
    """A parenthesised list."""
    return b"(" + b" ".join(items) + b")"


def flags(names: Iterable[str]) -> bytes:
    """A flag list: ``(\\Seen Orders)``."""
    return paren(n.encode("ascii", "replace") for n in names)


def date_time(value: datetime) -> bytes:
    """An INTERNALDATE: ``"17-Jul-1996 02:44:25 -0700"``."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    offset = value.utcoffset()
    minutes = int(offset.total_seconds() // 60) if offset else 0
    sign = "-" if minutes < 0 else "+"
    minutes = abs(minutes)
    text = (
        f"{value.day:02d}-{_MONTHS[value.month - 1]}-{value.year:04d} "
        f"{value.hour:02d}:{value.minute:02d}:{value.second:02d} {sign}{minutes // 60:02d}{minutes % 60:02d}"
    )
    return b'"' + text.encode("ascii") + b'"'


def runs(numbers: Iterable[int]) -> list[tuple[int, int]]:
    """``numbers`` in their order, each ascending run of consecutive ones as one ``(first, last)``."""
    out: list[tuple[int, int]] = []
    for n in numbers:
        if out and out[-1][1] == n - 1:
            out[-1] = (out[-1][0], n)
        else:
            out.append((n, n))
    return out


def sequence(numbers: Iterable[int]) -> bytes:
    """``numbers`` in their order as a sequence set, runs as ranges (``5,2:4,9``): how Dovecot writes
    ESORT's ALL and the ESEARCH items."""
    return b",".join(b"%d" % a if a == b else b"%d:%d" % (a, b) for a, b in runs(numbers))


def uid_set(numbers: Iterable[int]) -> bytes:
    """Numbers as a sequence set of ascending runs (``1:3,5``), as UIDPLUS and VANISHED send them."""
    return sequence(sorted(set(numbers)))

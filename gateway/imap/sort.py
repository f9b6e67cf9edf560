"""SORT (RFC 5256) and SORT=DISPLAY (RFC 5957): the stored sort keys and the order, pure.

Theory of operation
-------------------
Every string key is computed once, when a message is stored (:func:`keys`,
called by ``gateway.ingest.with_structures``), and kept in the ``sort_*``
columns of ``messages``: the base subject of the first Subject field, the
first From/To/Cc mailbox (the local part, from the stored ENVELOPE, whose
addresses are parsed as Dovecot parses them) and the first From/To display
name (RFC 2047-decoded, or the addr-spec when there is none), each already
in ``i;unicode-casemap`` form (RFC 5051: simple titlecase, then NFKD), so
that comparing two keys is comparing two strings by code point, as Dovecot
compares its UTF-8 keys byte by byte. Dates and sizes are columns already:
DATE is the Date header as an instant (a missing or unusable one is the
internal date), ARRIVAL the internal date.

A SORT therefore reads a few columns per message and never a message: a
row stored before the columns existed (migration 0010) has NULL keys, and
the session computes them from its stored ENVELOPE and Subject and writes
them back, once. Ties go by sequence number and REVERSE never reverses a
tie (Dovecot's order); :func:`order` is CPU work that the caller runs in a
worker thread.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

from gateway.message import decode_rfc2047
from storage.mailstore import SortKeys

_WSP = re.compile(r"[ \t\r\n]+")
_BLOB = r"\[[^\[\]]*\]\s*"
_LEADER = re.compile(rf"(?:{_BLOB})*(?:re|fwd?)\s*(?:{_BLOB})?:\s*", re.IGNORECASE)
_ONE_BLOB = re.compile(_BLOB)


@lru_cache(maxsize=4096)
def _title(char: str) -> str:
    """The simple titlecase mapping of one character (itself when it has none or a longer one)."""
    mapped = char.title()
    return mapped if len(mapped) == 1 else char


def casemap(text: str) -> str:
    """The i;unicode-casemap form of ``text`` (RFC 5051 section 2: simple titlecase, then NFKD)."""
    if text.isascii():
        return text.upper()  # the titlecase of an ASCII letter is its capital; NFKD changes nothing
    return unicodedata.normalize("NFKD", "".join(map(_title, text)))


def base_subject(subject: str) -> str:
    """RFC 5256 section 2.1: the subject without Re:, Fwd:, [blob] leaders and (fwd) trailers.

    Linear in the subject's length, however it is built: the text is never
    copied while it shrinks (``start``/``end`` move instead), and when no
    leader matches, the blobs the attempt ran over are dropped together (one
    at a time, no leader could start after any of them but the last).
    """
    text = _WSP.sub(" ", subject).strip()
    start, end = 0, len(text)
    while True:
        while end > start:  # (2) trailers: white space and "(fwd)"
            if text[end - 1].isspace():
                end -= 1
            elif end - start >= 5 and text[end - 5 : end].lower() == "(fwd)":
                end -= 5
            else:
                break
        while True:  # (3)-(5) leaders, and a blob when something remains after it
            match = _LEADER.match(text, start, end)
            if match is not None:
                start = match.end()
                continue
            moved = False
            while (blob := _ONE_BLOB.match(text, start, end)) is not None and blob.end() < end:
                start, moved = blob.end(), True
            if not moved:
                break
        # (6) "[fwd: ...]": unwrapped, and again from (2)
        if end - start < 6 or text[start : start + 5].lower() != "[fwd:" or text[end - 1] != "]":
            return text[start:end]
        start, end = start + 5, end - 1
        while start < end and text[start].isspace():
            start += 1


@dataclass(frozen=True, slots=True)
class Row:
    """What sorting needs of one message."""

    uid: int
    seq: int
    internal_date: datetime
    sent_date: datetime | None
    size: int
    keys: SortKeys


def _key(name: str, row: Row) -> Any:
    # Whole seconds, as INTERNALDATE shows them: messages appended within one second are equal
    # (and ordered by sequence number), as in Dovecot, whatever fraction the database kept.
    if name == "ARRIVAL":
        return math.floor(row.internal_date.timestamp())
    if name == "DATE":
        return math.floor((row.sent_date or row.internal_date).timestamp())
    if name == "SIZE":
        return row.size
    k = row.keys
    return {
        "SUBJECT": k.subject, "FROM": k.from_, "TO": k.to, "CC": k.cc,
        "DISPLAYFROM": k.display_from, "DISPLAYTO": k.display_to,
    }[name]  # fmt: skip


def order(rows: Sequence[Row], criteria: Sequence[tuple[str, bool]]) -> list[Row]:
    """``rows`` sorted by ``criteria`` ((key, reversed) pairs), ties by sequence number."""
    out = sorted(rows, key=lambda r: r.seq)
    for name, reverse in reversed(criteria):  # stable sorts: the last criterion first

        def key(row: Row, name: str = name) -> Any:
            return _key(name, row)

        out.sort(key=key, reverse=reverse)
    return out


def subject_text(raw: bytes) -> str:
    """A raw Subject as Dovecot reads it for sorting: UTF-8 (an invalid byte is U+FFFD), encoded-words
    decoded."""
    return decode_rfc2047(raw.decode("utf-8", "replace"))


# --------------------------------------------------------------------------- the stored ENVELOPE

_ATOM_END = re.compile(rb"[ ()\r\n]")
_QUOTED_STOP = re.compile(rb'["\\]')


def _value(data: bytes, i: int) -> tuple[object, int]:
    """One IMAP value at ``data[i]``: bytes (string, literal, atom), None (NIL) or a list."""
    c = data[i : i + 1]
    if c == b"(":
        items: list[object] = []
        i += 1
        while data[i : i + 1] != b")":
            if data[i : i + 1] == b" ":
                i += 1
                continue
            item, i = _value(data, i)
            items.append(item)
        return items, i + 1
    if c == b'"':
        out = bytearray()
        i += 1
        while (stop := _QUOTED_STOP.search(data, i)) is not None:  # the closing quote or a backslash
            out += data[i : stop.start()]
            if stop.group() == b'"':
                return bytes(out), stop.end()
            out += data[stop.end() : stop.end() + 1]  # the escaped character
            i = stop.end() + 1
        raise ValueError("an unterminated quoted string")
    if c == b"{":
        close = data.index(b"}", i)
        size = int(data[i + 1 : close])
        start = close + 3  # "}\r\n"
        return data[start : start + size], start + size
    m = _ATOM_END.search(data, i)
    end = m.start() if m else len(data)
    atom = data[i:end]
    return (None if atom.upper() == b"NIL" else atom), end


def keys(subject: str, envelope: bytes | None) -> SortKeys:
    """The stored sort keys of a message: ``subject`` is its first Subject (:func:`subject_text`);
    the addresses come from its stored ENVELOPE.

    A mailbox is the first address's local part, or a group's name when the
    list starts with a group; a display name is the first address's phrase,
    RFC 2047-decoded, else ``local@domain`` (RFC 5957 section 3, as Dovecot
    builds it); ``""`` when there is no address.
    """
    fields: object = None
    if envelope:
        fields, _ = _value(envelope, 0)
    if not isinstance(fields, list) or len(fields) < 7:
        fields = [None] * 7

    def first(addresses: object) -> list[str | None]:
        """(name, adl, mailbox, host) of the first address; Nones when there is none."""
        if isinstance(addresses, list) and addresses and isinstance(addresses[0], list):
            parts = (addresses[0] + [None] * 4)[:4]
            return [p.decode("utf-8", "replace") if isinstance(p, bytes) else None for p in parts]
        return [None] * 4

    def display(address: list[str | None]) -> str:
        name, _, mailbox, host = address
        decoded = decode_rfc2047(name) if name else ""
        if decoded:
            return decoded
        if mailbox is not None and host is not None:
            return f"{mailbox}@{host}"
        return mailbox or ""

    from_, to, cc = first(fields[2]), first(fields[5]), first(fields[6])
    return SortKeys(
        subject=base_subject(casemap(subject)),
        from_=casemap(from_[2] or ""),
        to=casemap(to[2] or ""),
        cc=casemap(cc[2] or ""),
        display_from=casemap(display(from_)),
        display_to=casemap(display(to)),
    )

"""SORT (RFC 5256): base subjects and the order of messages, pure (rows in, UIDs out).

Theory of operation
-------------------
Every key is computed from what the store keeps per message (its stored
ENVELOPE, parsed as Dovecot parses addresses, for the Subject and the first
From/To/Cc mailbox; the Date header as sent; the internal date; the size),
never from the message: a 10,000-message folder is sorted without reading
one blob. A Subject's encoded-words are decoded and other bytes read as
UTF-8 (an invalid byte is U+FFFD), as Dovecot reads them. Strings compare by
``i;unicode-casemap`` (RFC 5051: NFKD, then case-folded), missing values sort
first as the empty string, dates as instants in UTC (a missing or unusable
Date is the internal date), and ties go by sequence number, as RFC 5256
says. The caller runs :func:`order` in a worker thread.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from gateway.message import decode_rfc2047

_WSP = re.compile(r"[ \t\r\n]+")
_TRAILER = re.compile(r"(?:\s*\(fwd\)|\s+)$", re.IGNORECASE)
_BLOB = r"\[[^\[\]]*\]\s*"
_LEADER = re.compile(rf"^(?:{_BLOB})*(?:re|fwd?)\s*(?:{_BLOB})?:\s*", re.IGNORECASE)
_BLOB_LEADER = re.compile(rf"^{_BLOB}")
_FWD_WRAP = re.compile(r"^\[fwd:\s*(.*)\]$", re.IGNORECASE | re.DOTALL)


def casemap(text: str) -> str:
    """The i;unicode-casemap form of ``text`` (RFC 5051)."""
    return unicodedata.normalize("NFKD", text).casefold()


def base_subject(subject: str) -> str:
    """RFC 5256 section 2.1: the subject without Re:, Fwd:, [blob] leaders and (fwd) trailers."""
    text = _WSP.sub(" ", subject).strip()
    while True:
        while True:  # (2) trailers
            stripped = _TRAILER.sub("", text)
            if stripped == text:
                break
            text = stripped
        while True:  # (3)-(5) leaders, and a blob when something remains after it
            match = _LEADER.match(text)
            if match is not None:
                text = text[match.end() :]
                continue
            blob = _BLOB_LEADER.match(text)
            if blob is not None and text[blob.end() :]:
                text = text[blob.end() :]
                continue
            break
        wrapped = _FWD_WRAP.match(text)  # (6) "[fwd: ...]"
        if wrapped is None:
            return text
        text = wrapped.group(1).strip()


@dataclass(frozen=True, slots=True)
class Row:
    """What sorting needs of one message."""

    uid: int
    seq: int
    internal_date: datetime
    sent_date: datetime | None
    size: int
    subject: str
    from_mailbox: str  # the local part of the first From address
    to_mailbox: str
    cc_mailbox: str


def _key(name: str, row: Row) -> Any:
    if name == "ARRIVAL":
        return row.internal_date.timestamp()
    if name == "DATE":
        return (row.sent_date or row.internal_date).timestamp()
    if name == "SIZE":
        return row.size
    if name == "SUBJECT":
        return casemap(base_subject(row.subject))
    return casemap({"FROM": row.from_mailbox, "TO": row.to_mailbox, "CC": row.cc_mailbox}[name])


def order(rows: Sequence[Row], criteria: Sequence[tuple[str, bool]]) -> list[Row]:
    """``rows`` sorted by ``criteria`` ((key, reversed) pairs), ties by sequence number."""
    out = sorted(rows, key=lambda r: r.seq)
    for name, reverse in reversed(criteria):  # stable sorts: the last criterion first

        def key(row: Row, name: str = name) -> Any:
            return _key(name, row)

        out.sort(key=key, reverse=reverse)
    return out


def subject_text(raw: bytes) -> str:
    """A raw Subject as Dovecot reads it for sorting."""
    return decode_rfc2047(raw.decode("utf-8", "replace"))


# --------------------------------------------------------------------------- the stored ENVELOPE

_ATOM_END = re.compile(rb"[ ()\r\n]")


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
        while data[i : i + 1] != b'"':
            if data[i : i + 1] == b"\\":
                i += 1
            out += data[i : i + 1]
            i += 1
        return bytes(out), i + 1
    if c == b"{":
        close = data.index(b"}", i)
        size = int(data[i + 1 : close])
        start = close + 3  # "}\r\n"
        return data[start : start + size], start + size
    m = _ATOM_END.search(data, i)
    end = m.start() if m else len(data)
    atom = data[i:end]
    return (None if atom.upper() == b"NIL" else atom), end


def envelope_keys(envelope: bytes | None) -> tuple[bytes, str, str, str]:
    """(raw Subject, first From, To and Cc mailbox) of a stored ENVELOPE, as Dovecot sorts by them.

    The mailbox is the first address's local part, or a group's name when
    the list starts with a group; ``""`` when there is none.
    """
    if not envelope:
        return b"", "", "", ""
    fields, _ = _value(envelope, 0)
    if not isinstance(fields, list) or len(fields) < 7:
        return b"", "", "", ""

    def first(addresses: object) -> str:
        if isinstance(addresses, list) and addresses and isinstance(addresses[0], list):
            mailbox = addresses[0][2] if len(addresses[0]) > 2 else None
            if isinstance(mailbox, bytes):
                return mailbox.decode("utf-8", "replace")
        return ""

    subject = fields[1] if isinstance(fields[1], bytes) else b""
    return subject, first(fields[2]), first(fields[5]), first(fields[6])

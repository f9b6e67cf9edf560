"""SEARCH: metadata keys in SQL, text keys in Python on what SQL let through.

Theory of operation
-------------------
The top-level keys are ANDed. Those that only look at stored columns (system
flags, UIDs, sizes, internal dates, MODSEQ) become a SQL WHERE clause, so a
search over a large folder reads only candidate rows. Every candidate is then
checked against the whole key in Python (which also handles OR, NOT, sequence
numbers and header/body text); only keys that need the message's text read
its blob. Text matching is a case-insensitive substring test on decoded text
(RFC 2047 headers, base64/quoted-printable parts), as RFC 3501 6.4.4 asks.

What a client controls is bounded: the parser allows 1000 keys nested 100
deep, so one candidate costs at most the key's size times the message's
length (a substring test is linear; the needles are casefolded once per
SEARCH, and a message's decoded texts once per message). That work never runs
on the event loop: candidates are matched in worker threads, in batches of
:data:`_BATCH` messages or :data:`_BATCH_BYTES` of message text.

BODY and TEXT see what Dovecot's message-search.c sees (our answers are
diffed against it): the MIME tree as :mod:`gateway.imap.mime` parses it,
and the bodies of leaf parts whose last Content-Type is ``text/*`` or
``message/*`` (or absent), transfer-decoded (the last
Content-Transfer-Encoding; an unknown one hides the part) and charset-decoded
(the first Content-Type's charset). Never a multipart's preamble or epilogue,
nor an attachment's encoded bytes. BODY matches no header field (RFC 9051
6.4.4), not even those of MIME parts or embedded messages; TEXT matches every
header block as well.
"""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.imap import mime
from gateway.imap.commands import SearchKey, SeqSet
from gateway.imap.view import View
from gateway.message import Headers, parse_headers
from storage.blobs import BlobStore
from storage.flags import ANSWERED, DELETED, DRAFT, FLAGGED, SEEN
from storage.models import Message

_FLAG_KEYS = {
    "ANSWERED": (ANSWERED, True), "UNANSWERED": (ANSWERED, False),
    "DELETED": (DELETED, True), "UNDELETED": (DELETED, False),
    "DRAFT": (DRAFT, True), "UNDRAFT": (DRAFT, False),
    "FLAGGED": (FLAGGED, True), "UNFLAGGED": (FLAGGED, False),
    "SEEN": (SEEN, True), "UNSEEN": (SEEN, False),
}  # fmt: skip
_HEADER_KEYS = {"FROM", "TO", "CC", "BCC", "SUBJECT"}
_EPOCH = date(1970, 1, 1)
_ADDRESS_KEYS = {"FROM", "TO", "CC", "BCC"}  # HEADER From etc. search the field's text instead
_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/]")
_TEXT_KEYS = {"HEADER", "BODY", "TEXT", *_HEADER_KEYS, "SENTBEFORE", "SENTON", "SENTSINCE"}
_BATCH = 500  # candidates matched in one worker-thread call
_BATCH_BYTES = 16 * 2**20  # message text matched in one worker-thread call


async def search(
    s: AsyncSession, blobs: BlobStore, view: View, key: SearchKey, saved: list[int]
) -> list[int]:
    """The UIDs in the view matching ``key``, ascending."""
    query = select(
        Message.uid, Message.sysflags, Message.keywords, Message.size, Message.internal_date,
        Message.modseq, Message.blob,
    ).where(Message.folder_id == view.folder_id, Message.uid <= view.max_uid)  # fmt: skip
    for clause in _sql(key, view):
        query = query.where(clause)
    rows = (await s.execute(query.order_by(Message.uid))).all()
    key = _folded(key)
    needs_text = uses(key, _TEXT_KEYS)
    out: list[int] = []
    batch: list[_Candidate] = []
    size = 0
    for row in rows:
        if view.seq(row.uid) is None:
            continue
        message = _Candidate(row, view, saved)
        if needs_text:
            message.raw = await blobs.get(row.blob)
            size += len(message.raw)
        batch.append(message)
        if len(batch) >= _BATCH or size >= _BATCH_BYTES:
            out += await asyncio.to_thread(_matching, key, batch)
            batch, size = [], 0
    if batch:
        out += await asyncio.to_thread(_matching, key, batch)
    return out


def _folded(key: SearchKey) -> SearchKey:
    """``key`` with the strings that are matched as substrings casefolded."""
    op, args = key.op, key.args
    if op in _HEADER_KEYS or op in ("BODY", "TEXT"):
        return SearchKey(op, (str(args[0]).casefold(),))
    if op == "HEADER":
        return SearchKey(op, (args[0], str(args[1]).casefold()))
    if any(isinstance(a, SearchKey) for a in args):
        return SearchKey(op, tuple(_folded(a) if isinstance(a, SearchKey) else a for a in args))
    return key


def _matching(key: SearchKey, batch: list[_Candidate]) -> list[int]:
    """The UIDs of the candidates that match ``key`` (run in a worker thread)."""
    return [m.row.uid for m in batch if _match(key, m)]


def uses(key: SearchKey, ops: set[str]) -> bool:
    """Whether ``key`` or any key nested in it is one of ``ops``."""
    return key.op in ops or any(isinstance(a, SearchKey) and uses(a, ops) for a in key.args)


# ---------------------------------------------------------------------- SQL


def _ranges(seqset: SeqSet, top: int) -> ColumnElement[bool]:
    parts = []
    for lo, hi in seqset.ranges:
        a, b = top if lo is None else lo, top if hi is None else hi
        parts.append(Message.uid.between(min(a, b), max(a, b)))
    return or_(*parts) if parts else Message.uid < 0


def _sql(key: SearchKey, view: View) -> list[ColumnElement[bool]]:
    """SQL clauses implied by ``key`` (a conservative prefilter: never too narrow)."""
    op, args = key.op, key.args
    if op == "AND":
        return [c for a in args if isinstance(a, SearchKey) for c in _sql(a, view)]
    if op in _FLAG_KEYS:
        bit, present = _FLAG_KEYS[op]
        return [Message.sysflags.op("&")(bit) != 0 if present else Message.sysflags.op("&")(bit) == 0]
    if op == "UID" and isinstance(args[0], SeqSet) and not args[0].saved:
        return [_ranges(args[0], view.max_uid)]
    if op == "LARGER" and isinstance(args[0], int):
        return [Message.size > args[0]]
    if op == "SMALLER" and isinstance(args[0], int):
        return [Message.size < args[0]]
    if op == "MODSEQ" and isinstance(args[0], int):
        return [Message.modseq >= args[0]]
    if op in ("BEFORE", "ON", "SINCE") and isinstance(args[0], date):
        # Internal dates are stored in UTC and compared by their UTC day.
        start = datetime(args[0].year, args[0].month, args[0].day, tzinfo=UTC)
        if op == "BEFORE":
            return [Message.internal_date < start]
        if op == "SINCE":
            return [Message.internal_date >= start]
        return [and_(Message.internal_date >= start, Message.internal_date < start + timedelta(days=1))]
    return []


# ---------------------------------------------------------------------- Python


class _Candidate:
    """A row being matched, with its text decoded only when a key needs it."""

    def __init__(self, row: Any, view: View, saved: list[int]) -> None:
        self.row = row
        self.view = view
        self.saved = saved
        self.raw: bytes = b""
        self._headers: Headers | None = None
        self._body: str | None = None
        self._inner_headers: str | None = None
        self._header_text: str | None = None
        self._all_text: str | None = None
        self._values: dict[str, list[str]] = {}

    @property
    def headers(self) -> Headers:
        if self._headers is None:
            self._headers = parse_headers(self.raw)
        return self._headers

    def _decode(self) -> tuple[str, str]:
        if self._body is None or self._inner_headers is None:
            body, headers = mime.search_texts(self.raw)
            self._body, self._inner_headers = body.casefold(), headers.casefold()
        return self._body, self._inner_headers

    def body_text(self) -> str:
        return self._decode()[0]

    def header_text(self) -> str:
        if self._header_text is None:
            self._header_text = _fields_text(self.headers).casefold()
        return self._header_text

    def all_text(self) -> str:
        """TEXT: every header block (the message's and its parts') and the body text."""
        if self._all_text is None:
            body, inner_headers = self._decode()
            self._all_text = self.header_text() + "\n" + inner_headers + "\n" + body
        return self._all_text

    def values(self, name: str) -> list[str]:
        """The casefolded values of a header field; for SEARCH FROM/TO/CC/BCC (``name`` in upper case)
        the addresses as Dovecot writes them (:func:`gateway.imap.mime.address_search_text`), so
        comments and folding do not hide them."""
        key = name if name in _ADDRESS_KEYS else name.lower()
        if key not in self._values:
            if key in _ADDRESS_KEYS:
                raw = [value for field, value in self.headers.fields if field.lower() == key.lower()]
                self._values[key] = [mime.address_search_text(raw).casefold()] if raw else []
            else:
                self._values[key] = [v.casefold() for v in self.headers.get_all(name)]
        return self._values[key]


def _fields_text(headers: Headers) -> str:
    return "\n".join(
        f"{name}: {' '.join(headers.get_all(name))}" for name in dict.fromkeys(n for n, _ in headers.fields)
    )


def _day(value: datetime | None) -> date | None:
    return value.date() if value is not None else None


def _match(key: SearchKey, m: _Candidate) -> bool:
    op, args, row = key.op, key.args, m.row
    if op == "AND":
        return all(_match(a, m) for a in args if isinstance(a, SearchKey))
    if op == "OR":
        return any(_match(a, m) for a in args if isinstance(a, SearchKey))
    if op == "NOT":
        return not _match(args[0], m) if isinstance(args[0], SearchKey) else True
    if op == "ALL":
        return True
    if op in ("NEW", "OLD", "RECENT"):  # \Recent is the session's: the view knows
        recent = row.uid in m.view.recent
        return not recent if op == "OLD" else recent and (op == "RECENT" or not row.sysflags & SEEN)
    if op in _FLAG_KEYS:
        bit, present = _FLAG_KEYS[op]
        return bool(row.sysflags & bit) is present
    if op in ("KEYWORD", "UNKEYWORD"):
        has = str(args[0]).casefold() in {k.casefold() for k in row.keywords.split(" ") if k}
        return has is (op == "KEYWORD")
    if op == "LARGER":
        return bool(row.size > int(str(args[0])))
    if op == "SMALLER":
        return bool(row.size < int(str(args[0])))
    if op == "MODSEQ":
        return bool(row.modseq >= int(str(args[0])))
    if op == "UID" and isinstance(args[0], SeqSet):
        if args[0].saved:
            return row.uid in m.saved
        return args[0].contains(row.uid, m.view.max_uid)
    if op == "SEQ" and isinstance(args[0], SeqSet):
        if args[0].saved:
            return row.uid in m.saved
        seq = m.view.seq(row.uid)
        return seq is not None and args[0].contains(seq, m.view.exists)
    if op in ("BEFORE", "ON", "SINCE", "SENTBEFORE", "SENTON", "SENTSINCE") and isinstance(args[0], date):
        day = _day(m.headers.date) if op.startswith("SENT") else _day(row.internal_date)
        if day is None:  # no usable Date: as Dovecot, the message was sent on 1 January 1970
            day = _EPOCH
        kind = op.removeprefix("SENT")
        return day < args[0] if kind == "BEFORE" else day == args[0] if kind == "ON" else day >= args[0]
    if op in _HEADER_KEYS:
        return _header_has(m, op, str(args[0]))
    if op == "HEADER":
        return _header_has(m, str(args[0]).lower(), str(args[1]))
    if op == "BODY":
        return str(args[0]) in m.body_text()
    if op == "TEXT":
        return str(args[0]) in m.all_text()
    return False


def _header_has(m: _Candidate, name: str, folded: str) -> bool:
    """Whether a value of the field contains ``folded`` (casefolded by :func:`_folded`)."""
    return any(folded in v for v in m.values(name))

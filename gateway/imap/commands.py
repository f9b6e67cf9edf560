"""IMAP commands as data: what the parser produces and the session consumes.

Pure values, no behaviour. Names follow RFC 3501/9051 and the extensions we
offer (UIDPLUS, MOVE, CONDSTORE, ENABLE, ID, NAMESPACE, QUOTA, SPECIAL-USE,
SASL-IR, LITERAL+, UNSELECT, IDLE).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Literal

# --------------------------------------------------------------------------- sequence sets

STAR = None  # "*" in a sequence set: the largest number in use


@dataclass(frozen=True, slots=True)
class SeqSet:
    """A sequence set: ranges of numbers, ``None`` standing for ``*``.

    ``saved`` is ``$`` (RFC 5182): the result of the last SEARCH SAVE.
    """

    ranges: tuple[tuple[int | None, int | None], ...] = ()
    saved: bool = False

    def contains(self, n: int, largest: int) -> bool:
        """Whether ``n`` is in the set, ``*`` meaning ``largest``."""
        for lo, hi in self.ranges:
            a = largest if lo is None else lo
            b = largest if hi is None else hi
            if min(a, b) <= n <= max(a, b):
                return True
        return False


# --------------------------------------------------------------------------- FETCH


@dataclass(frozen=True, slots=True)
class Section:
    """A BODY[...] section: part path, then HEADER, HEADER.FIELDS[.NOT], TEXT or MIME."""

    part: tuple[int, ...] = ()
    text: Literal["HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT", "MIME"] | None = None
    fields: tuple[str, ...] = ()  # upper-case field names, for HEADER.FIELDS[.NOT]


@dataclass(frozen=True, slots=True)
class FetchAtt:
    """One FETCH data item.

    ``name`` is one of UID, FLAGS, INTERNALDATE, RFC822.SIZE, ENVELOPE,
    BODYSTRUCTURE, BODY (no section: the non-extensible structure), RFC822,
    RFC822.HEADER, RFC822.TEXT, MODSEQ, BODY[...] as ``name="BODY"`` with
    ``section`` set, BINARY[...] (RFC 3516, part numbers only) as
    ``name="BINARY"`` and BINARY.SIZE[...] (``peek`` always set). Macros
    (ALL, FAST, FULL) are expanded by the parser.
    """

    name: str
    section: Section | None = None
    partial: tuple[int, int] | None = None  # <start.length>
    peek: bool = False


# --------------------------------------------------------------------------- SEARCH


@dataclass(frozen=True, slots=True)
class SearchKey:
    """One SEARCH key; ``And``/``Or``/``Not`` nest them.

    ``op`` is the upper-case key name (ALL, ANSWERED, BCC, BEFORE, BODY, CC,
    DELETED, DRAFT, FLAGGED, FROM, HEADER, KEYWORD, LARGER, NEW, NOT, OLD, ON,
    OR, RECENT, SEEN, SENTBEFORE, SENTON, SENTSINCE, SINCE, SMALLER, SUBJECT,
    TEXT, TO, UID, UNANSWERED, UNDELETED, UNDRAFT, UNFLAGGED, UNKEYWORD,
    UNSEEN, MODSEQ, AND (a parenthesised list), SEQ (a bare sequence set)).
    """

    op: str
    args: tuple[str | int | date | SeqSet | SearchKey, ...] = ()


# --------------------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True)
class Command:
    """A parsed command: its tag, upper-case name, and arguments."""

    tag: str
    name: str


@dataclass(frozen=True, slots=True)
class Simple(Command):
    """CAPABILITY, NOOP, LOGOUT, STARTTLS, CHECK, CLOSE, UNSELECT, EXPUNGE, NAMESPACE, IDLE."""


@dataclass(frozen=True, slots=True)
class Login(Command):
    user: str
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class Authenticate(Command):
    mechanism: str  # upper-case
    initial: bytes | None = field(default=None, repr=False)  # SASL-IR, already base64-decoded; b"" for "="


@dataclass(frozen=True, slots=True)
class Compress(Command):
    mechanism: str  # upper-case


@dataclass(frozen=True, slots=True)
class Enable(Command):
    capabilities: tuple[str, ...]  # upper-case


@dataclass(frozen=True, slots=True)
class QResync:
    """SELECT's QRESYNC parameter (RFC 7162 3.2.5): what the client knew when it last synced."""

    uidvalidity: int
    modseq: int
    known_uids: SeqSet | None = None  # no "*" (the parser refuses it)
    seq_match: tuple[SeqSet, SeqSet] | None = None  # known sequence numbers, their UIDs


@dataclass(frozen=True, slots=True)
class Select(Command):
    """SELECT or EXAMINE."""

    mailbox: str  # decoded from modified UTF-7; INBOX in any case as "INBOX"
    condstore: bool = False
    qresync: QResync | None = None


@dataclass(frozen=True, slots=True)
class MailboxCommand(Command):
    """CREATE, DELETE, SUBSCRIBE, UNSUBSCRIBE, GETQUOTAROOT."""

    mailbox: str


@dataclass(frozen=True, slots=True)
class Rename(Command):
    old: str
    new: str


@dataclass(frozen=True, slots=True)
class List(Command):
    """LIST (RFC 5258 basic forms) or LSUB."""

    reference: str
    patterns: tuple[str, ...]
    select_options: tuple[str, ...] = ()  # e.g. SUBSCRIBED, SPECIAL-USE (upper-case)
    return_options: tuple[str, ...] = ()  # e.g. SPECIAL-USE, SUBSCRIBED, CHILDREN, STATUS
    status_items: tuple[str, ...] = ()  # with RETURN (STATUS (...)), RFC 5819


@dataclass(frozen=True, slots=True)
class Status(Command):
    mailbox: str
    items: tuple[str, ...]  # upper-case: MESSAGES RECENT UIDNEXT UIDVALIDITY UNSEEN HIGHESTMODSEQ SIZE


@dataclass(frozen=True, slots=True)
class CatenatePart:
    """One part of a CATENATE (RFC 4469): literal ``text``, or a ``url`` to a message or section here."""

    text: bytes | None = field(default=None, repr=False)
    url: str | None = None


@dataclass(frozen=True, slots=True)
class AppendMessage:
    """One message of an APPEND: the literal's bytes, or the parts to CATENATE."""

    flags: tuple[str, ...]
    internal_date: datetime | None
    message: bytes = field(default=b"", repr=False)
    catenate: tuple[CatenatePart, ...] = ()


@dataclass(frozen=True, slots=True)
class Append(Command):
    """APPEND of one message, or of several (MULTIAPPEND, RFC 3502: stored all or none)."""

    mailbox: str
    messages: tuple[AppendMessage, ...]


@dataclass(frozen=True, slots=True)
class Returns:
    """``RETURN (...)`` of SEARCH or SORT: ESEARCH (RFC 4731), SEARCHRES, ESORT and CONTEXT=SEARCH
    (RFC 5267): ``options`` among MIN MAX ALL COUNT SAVE UPDATE PARTIAL (none: ALL), ``partial``
    the range PARTIAL asks for (low <= high, 1-based positions in the result)."""

    options: tuple[str, ...]
    partial: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class Search(Command):
    uid: bool
    charset: str | None
    key: SearchKey  # an AND of the top-level keys
    returns: Returns | None = None  # None: a plain SEARCH, answered with ``* SEARCH``


@dataclass(frozen=True, slots=True)
class CancelUpdate(Command):
    """CANCELUPDATE (RFC 5267 4.3): the tags of updating searches to stop."""

    tags: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Sort(Command):
    """SORT (RFC 5256), and ESORT's ``RETURN (...)`` (RFC 5267; None: a plain SORT)."""

    uid: bool
    criteria: tuple[tuple[str, bool], ...]  # (key, reversed), e.g. ("DATE", True)
    charset: str
    key: SearchKey
    returns: Returns | None = None


@dataclass(frozen=True, slots=True)
class Thread(Command):
    """THREAD (RFC 5256): ``algorithm`` is ORDEREDSUBJECT or REFERENCES."""

    uid: bool
    algorithm: str
    charset: str
    key: SearchKey


@dataclass(frozen=True, slots=True)
class Fetch(Command):
    uid: bool
    sequence: SeqSet
    atts: tuple[FetchAtt, ...]
    changed_since: int | None = None
    vanished: bool = False  # UID FETCH's VANISHED modifier (RFC 7162 3.2.6), always with changed_since


@dataclass(frozen=True, slots=True)
class Store(Command):
    uid: bool
    sequence: SeqSet
    mode: Literal["set", "add", "remove"]
    silent: bool
    flags: tuple[str, ...]
    unchanged_since: int | None = None


@dataclass(frozen=True, slots=True)
class Copy(Command):
    """COPY or MOVE."""

    uid: bool
    sequence: SeqSet
    mailbox: str


@dataclass(frozen=True, slots=True)
class UidExpunge(Command):
    sequence: SeqSet


@dataclass(frozen=True, slots=True)
class Id(Command):
    params: tuple[tuple[str, str | None], ...] | None


@dataclass(frozen=True, slots=True)
class GetQuota(Command):
    root: str

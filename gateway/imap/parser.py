"""IMAP command input: framing of the client's byte stream, then the command grammar.

Theory of operation
-------------------
Two pure layers, no sockets and no I/O.

**Framing** (:class:`Framer`). The I/O class feeds whatever it read and then
pulls events until :meth:`Framer.next_event` returns ``None``. A command is a
line, possibly interrupted by literals: a line ending with ``{n}`` or ``{n+}``
announces ``n`` bytes of literal data, after which the command goes on with
more text. A complete command comes out as :class:`Line`: the text around the
literals (the ``{n}`` markers and the line ends removed) and the literals'
bytes. A synchronising literal ``{n}`` first produces :class:`NeedContinuation`
(the server answers ``+``); a non-synchronising one (LITERAL+) does not. Bare
LF ends a line as CRLF does.

Everything the framer holds is bounded: a line (the text between two line
ends or literals) by ``max_line``, one literal by ``max_literal``, a whole
command (text and literals) by ``max_command``, and the literals of a command
by ``max_literals``. A command over a bound is *rejected*: the framer emits
:class:`TooLong` or :class:`LiteralTooLarge`, frees what it held of the
command, and discards input up to the end of the command:

* A line over ``max_line`` is reported as soon as it is known (not when its
  line end arrives) and then skipped, keeping only its last bytes to see
  whether it ends with a literal announcement.
* A rejected synchronising literal ends the command: the client gets a tagged
  BAD or NO instead of ``+``, so it will not send the literal (RFC 3501 7.5).
* A non-synchronising literal is sent by the client whatever we answer, so
  its bytes must never be read as commands (that is how a message body, say
  an APPEND'ed mail, would smuggle commands). In a rejected command such a
  literal of at most ``max_literal`` bytes is read and dropped, and the rest
  of the command is discarded. A non-synchronising literal over
  ``max_literal`` (or over the command's budget, or too long to even read its
  size) gives ``LiteralTooLarge(synchronising=False)`` and the framer
  *closes*: it ignores all further input and the server must say ``BYE`` and
  close. We chose closing over skipping because the size is chosen by the
  client and unbounded (``{99999999999999999999+}``): skipping would tie the
  connection up reading junk, and RFC 7888 leaves the server the choice.

Literal sizes are compared as Python ints, never converted from more than 19
significant digits, so ``{4294967296}`` and longer numbers are just "too
large". Input is consumed only by :meth:`Framer.next_event`, so the server
must pull events until ``None`` after each feed; what the framer then holds
is at most one partial command. Lines between IDLE and ``DONE``, or SASL
responses, are framed the same way; :func:`is_done` recognises ``DONE``.
:meth:`Framer.reset` forgets everything buffered (after STARTTLS, so that
nothing sent in clear text is run as if it came over TLS).

**Parsing** (:func:`parse`). A recursive-descent parser over one
:class:`Line`, for the grammar of RFC 3501/9051 and the extensions we offer
(UIDPLUS, MOVE, CONDSTORE, QRESYNC, ENABLE, ID, NAMESPACE, QUOTA, SPECIAL-USE,
LIST-EXTENDED/LIST-STATUS syntax, ESEARCH, SEARCHRES, CONTEXT=SEARCH, SASL-IR,
LITERAL+, UNSELECT, IDLE). It produces the values of :mod:`gateway.imap.commands` and
raises only :class:`ParseError`, whose message never contains raw client
bytes (safe to echo in ``BAD``) and whose tag is set once the tag was read.
Bounds: parenthesised nesting (32), search key nesting (NOT/OR/parentheses,
100, which also bounds the recursion), search keys (1000), FETCH items (100),
sequence-set ranges (10,000), items in any other list (1000), the patterns
of a LIST or LSUB (1024 characters, the reference counted with each pattern,
which bounds :mod:`gateway.imap.wildcard`'s work a folder). Tokens are
matched with simple character-class regexes (no backtracking), quoted
strings are scanned with ``find``, so parsing is linear in the line length.

Conventions of the result: command names and keywords upper-case; ``UID
FETCH`` etc. keep the command's own name with ``uid=True`` (``UID EXPUNGE``
is :class:`~gateway.imap.commands.UidExpunge` named ``EXPUNGE``); mailbox
names decoded from modified UTF-7, ``INBOX`` in any ASCII case (the whole
name only, RFC 3501 5.1) as ``INBOX``; system flags in their canonical case
(``\\Seen``), keywords as sent; strings decoded as UTF-8 (invalid UTF-8 is a
ParseError), except SEARCH strings under a CHARSET other than UTF-8 or
US-ASCII, which are decoded leniently: the session must answer those with
``NO [BADCHARSET]``.
"""

from __future__ import annotations

import binascii
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Final, Literal, NoReturn, TypeAlias

from gateway import mutf7
from gateway.imap.commands import (
    Append,
    AppendMessage,
    Authenticate,
    CancelUpdate,
    CatenatePart,
    Command,
    Compress,
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
    Thread,
    UidExpunge,
)

__all__ = [
    "MAX_COMMAND_TEXT",
    "MAX_FETCH_ATTS",
    "MAX_ITEMS",
    "MAX_LINE",
    "MAX_LIST_PATTERN",
    "MAX_LITERAL",
    "MAX_LITERALS",
    "MAX_PAREN_DEPTH",
    "MAX_SEARCH_KEYS",
    "MAX_SEARCH_NESTING",
    "MAX_SEQ_RANGES",
    "STATUS_ITEMS",
    "Event",
    "Framer",
    "Line",
    "LiteralTooLarge",
    "NeedContinuation",
    "NotMUTF7",
    "ParseError",
    "TooLong",
    "is_done",
    "parse",
]

MAX_LINE: Final = 64 * 1024  # one line of command text
MAX_LITERAL: Final = 50 * 1024 * 1024  # one literal (the server passes its APPENDLIMIT)
MAX_COMMAND_TEXT: Final = 64 * 1024  # default max_command = max_literal + this
MAX_LITERALS: Final = 1000  # literals in one command
MAX_PAREN_DEPTH: Final = 32
MAX_SEARCH_NESTING: Final = 100
MAX_SEARCH_KEYS: Final = 1000
MAX_FETCH_ATTS: Final = 100
MAX_SEQ_RANGES: Final = 10_000
MAX_ITEMS: Final = 1000  # flags, patterns, header fields, capabilities, ...
MAX_APPEND_MESSAGES: Final = 100  # messages in one MULTIAPPEND
MAX_CATENATE_PARTS: Final = 100  # parts of one CATENATE
MAX_LIST_PATTERN: Final = 1024  # characters in a LIST's patterns, the reference counted with each

_HUGE: Final = 2**64  # a literal size too long to convert is reported as this
_TAIL: Final = 64  # bytes kept of a line being discarded, to see a literal announcement at its end
_TAG_PEEK: Final = 512  # bytes looked at to find the tag of a rejected command
_COMPACT: Final = 64 * 1024  # consumed input kept before the buffer is compacted

# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Line:
    """A complete command: ``parts[i]`` is the text before literal ``i``, the last part follows the last.

    The ``{n}``/``{n+}`` markers and the line ends are not in the parts, so
    ``len(parts) == len(literals) + 1``.
    """

    parts: tuple[bytes, ...]
    literals: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class NeedContinuation:
    """A synchronising literal of ``size`` bytes was announced: send ``+`` before the client sends it."""

    size: int


@dataclass(frozen=True, slots=True)
class TooLong:
    """A command was rejected (line or command too long, too many literals): answer BAD.

    The framer discards the rest of the command by itself. ``tag`` is the
    command's tag when it could be read, for a tagged BAD (which a client
    waiting for ``+`` needs to give up its command).
    """

    reason: str
    tag: str | None = None


@dataclass(frozen=True, slots=True)
class LiteralTooLarge:
    """An announced literal is over ``max_literal`` or the command's budget.

    Synchronising: answer ``BAD``/``NO [TOOBIG]`` (no ``+``); the command is
    over. Not synchronising: the framer is closed (it ignores further input),
    answer ``BYE`` and close the connection. ``size`` is clamped to 2**64.
    """

    size: int
    synchronising: bool
    tag: str | None = None


Event: TypeAlias = Line | NeedContinuation | TooLong | LiteralTooLarge


def is_done(line: Line) -> bool:
    """Whether a line is the ``DONE`` that ends IDLE."""
    return not line.literals and line.parts[0].upper() == b"DONE"


# --------------------------------------------------------------------------- framing

_LINE_STATE: Final = 0
_LITERAL_STATE: Final = 1
_CLOSED_STATE: Final = 2
_DIGITS_SET: Final = b"0123456789"


def _literal_marker(text: bytes) -> tuple[int, int, bool] | None:
    """``(index of "{", size, synchronising)`` when ``text`` ends with ``{n}`` or ``{n+}``."""
    if not text.endswith(b"}"):
        return None
    end = len(text) - 1
    sync = True
    if text.endswith(b"+}"):
        end -= 1
        sync = False
    start = len(text[:end].rstrip(_DIGITS_SET))
    if start == end or start == 0 or text[start - 1] != 0x7B:  # "{"
        return None
    return start - 1, _size(text[start:end]), sync


def _size(digits: bytes) -> int:
    significant = digits.lstrip(b"0")
    if len(significant) > 19:
        return _HUGE
    return int(significant or b"0")


def _chop_cr(text: bytes) -> bytes:
    return text[:-1] if text.endswith(b"\r") else text


class Framer:
    """Splits the client's byte stream into commands (see the module docstring).

    Call :meth:`next_event` until it returns ``None`` after every
    :meth:`feed`: input is only consumed by :meth:`next_event`, so what the
    framer holds is then at most one partial command (``max_command`` plus a
    line) however the input was chunked.
    """

    __slots__ = (
        "_buf",
        "_discard",
        "_dropped",
        "_events",
        "_lit",
        "_literals",
        "_parts",
        "_pos",
        "_rejected_tag",
        "_remaining",
        "_scan",
        "_size",
        "_state",
        "_tail",
        "max_command",
        "max_line",
        "max_literal",
        "max_literals",
    )

    def __init__(
        self,
        *,
        max_line: int = MAX_LINE,
        max_literal: int = MAX_LITERAL,
        max_command: int | None = None,
        max_literals: int = MAX_LITERALS,
    ) -> None:
        if min(max_line, max_literal + 1, max_literals + 1, 1 if max_command is None else max_command) < 1:
            raise ValueError("framer limits must be positive")
        self.max_line = max_line
        self.max_literal = max_literal
        self.max_command = max_literal + MAX_COMMAND_TEXT if max_command is None else max_command
        self.max_literals = max_literals
        self._buf = bytearray()  # input not consumed yet, from _pos
        self._pos = 0
        self._scan = 0  # where to look for the next LF (bytes before it have none)
        self._state = _LINE_STATE
        self._events: deque[Event] = deque()
        self._parts: list[bytes] = []
        self._literals: list[bytes] = []
        self._size = 0  # bytes of the current command so far
        self._lit = bytearray()  # the literal being read
        self._remaining = 0  # bytes of the literal still to come
        self._discard = False  # the current command was rejected: drop its input
        self._dropped = False  # bytes of the line being discarded were dropped before _tail
        self._tail = b""  # last bytes of the line being discarded
        self._rejected_tag: str | None = None

    # ------------------------------------------------------------------ public

    @property
    def closed(self) -> bool:
        """True after a non-synchronising literal that could not be accepted: close the connection."""
        return self._state == _CLOSED_STATE

    @property
    def buffered(self) -> int:
        """Bytes held: unconsumed input plus the partial command."""
        return (
            len(self._buf)
            - self._pos
            + len(self._lit)
            + len(self._tail)
            + sum(map(len, self._parts))
            + sum(map(len, self._literals))
        )

    def feed(self, data: bytes) -> None:
        """Add input (ignored once :attr:`closed`)."""
        if self._state != _CLOSED_STATE:
            self._buf += data

    def next_event(self) -> Event | None:
        """The next event, or ``None`` when more input is needed."""
        if not self._events and self._state != _CLOSED_STATE:
            self._advance()
        pos = self._pos
        if pos and (not self._events or pos > _COMPACT):
            del self._buf[:pos]
            self._scan -= pos
            self._pos = 0
        return self._events.popleft() if self._events else None

    def reset(self) -> None:
        """Forget all input and any partial command (after STARTTLS: nothing sent in clear may count)."""
        self._buf.clear()
        self._pos = self._scan = 0
        self._events.clear()
        if self._state != _CLOSED_STATE:
            self._state = _LINE_STATE
        self._new_command()

    # ------------------------------------------------------------------ internals

    def _new_command(self) -> None:
        self._parts = []
        self._literals = []
        self._size = 0
        self._lit = bytearray()
        self._remaining = 0
        self._discard = False
        self._dropped = False
        self._tail = b""
        self._rejected_tag = None

    def _close(self) -> None:
        self._state = _CLOSED_STATE
        self._buf.clear()
        self._pos = self._scan = 0
        self._new_command()

    def _tag(self, head: bytes) -> str | None:
        first = self._parts[0] if self._parts else head
        m = _TAG.match(first)
        if m is None or (m.end() < len(first) and first[m.end()] != 0x20):
            return None
        return m.group().decode("ascii")

    def _advance(self) -> None:
        """Consume input until there is an event or more input is needed."""
        buf = self._buf
        while not self._events and self._state != _CLOSED_STATE:
            if self._state == _LITERAL_STATE:
                if not self._read_literal():
                    return
                continue
            nl = buf.find(b"\n", self._scan)
            if nl < 0:
                self._scan = len(buf)
                self._partial_line()
                return
            pos = self._pos
            self._pos = self._scan = nl + 1
            if self._discard:
                start = max(pos, nl - _TAIL - 1)
                text = self._tail + bytes(buf[start:nl])
                truncated = self._dropped or start > pos or len(text) > _TAIL + 1
                self._tail = b""
                self._dropped = False
                self._rejected_line_end(_chop_cr(text[-_TAIL - 1 :]), truncated=truncated)
            else:
                self._line(_chop_cr(bytes(buf[pos:nl])))

    def _partial_line(self) -> None:
        """No line end in the buffer: wait, or reject a line that is already too long."""
        buf = self._buf
        pending = len(buf) - self._pos
        if not self._discard:
            if pending <= self.max_line + 1:  # +1: the CR of the CRLF
                return
            tag = self._tag(bytes(buf[self._pos : self._pos + _TAG_PEEK]))
            self._events.append(TooLong(f"line longer than {self.max_line} bytes", tag))
            self._parts, self._literals, self._lit = [], [], bytearray()
            self._discard = True
            self._rejected_tag = tag
        # Discarding: keep only the last bytes (a literal announcement may end the line).
        start = max(self._pos, len(buf) - _TAIL - 1)
        text = self._tail + bytes(buf[start:])
        if start > self._pos or len(text) > _TAIL + 1:
            self._dropped = True
        self._tail = text[-_TAIL - 1 :]
        buf.clear()
        self._pos = self._scan = 0

    def _line(self, text: bytes) -> None:
        """One complete line of a command that is not being discarded."""
        if len(text) > self.max_line:
            self._reject(
                TooLong(f"line longer than {self.max_line} bytes", self._tag(text[:_TAG_PEEK])), text
            )
            return
        self._size += len(text)
        if self._size > self.max_command:
            self._reject(TooLong(f"command longer than {self.max_command} bytes", self._tag(text)), text)
            return
        marker = _literal_marker(text)
        if marker is None:
            self._parts.append(text)
            self._events.append(Line(tuple(self._parts), tuple(self._literals)))
            self._new_command()
            return
        start, size, sync = marker
        tag = self._tag(text[:_TAG_PEEK])
        if len(self._literals) >= self.max_literals:
            self._reject(TooLong(f"more than {self.max_literals} literals", tag), text)
            return
        if size > self.max_literal or self._size + size > self.max_command:
            self._events.append(LiteralTooLarge(min(size, _HUGE), sync, tag))
            if sync:
                self._new_command()
            else:
                self._close()
            return
        self._parts.append(text[:start])
        self._size += size
        self._remaining = size
        self._state = _LITERAL_STATE
        if sync:
            self._events.append(NeedContinuation(size))

    def _reject(self, event: TooLong, text: bytes) -> None:
        self._events.append(event)
        self._parts, self._literals, self._lit = [], [], bytearray()
        self._rejected_tag = event.tag
        self._rejected_line_end(text, truncated=False)

    def _rejected_line_end(self, text: bytes, *, truncated: bool) -> None:
        """The end of a line of a rejected command: is there a literal the client will send anyway?"""
        marker = _literal_marker(text)
        if marker is None:
            if truncated and text.endswith(b"+}") and not text[:-2].rstrip(_DIGITS_SET):
                # Only digits kept: the "{" (and the size) were dropped with the rest of the line.
                self._events.append(LiteralTooLarge(_HUGE, False, self._rejected_tag))
                self._close()
            else:
                self._new_command()
            return
        _, size, sync = marker
        if sync:  # the client gets BAD instead of "+": the command is over
            self._new_command()
        elif size > self.max_literal:
            self._events.append(LiteralTooLarge(size, False, self._rejected_tag))
            self._close()
        else:  # read and drop the literal, then the rest of the command
            self._discard = True
            self._remaining = size
            self._state = _LITERAL_STATE

    def _read_literal(self) -> bool:
        """Move literal bytes from the input; True once the literal is complete."""
        buf = self._buf
        pos = self._pos
        take = min(self._remaining, len(buf) - pos)
        if take:
            if not self._discard:
                if not self._lit and take == self._remaining:
                    self._literals.append(bytes(buf[pos : pos + take]))
                    self._pos += take
                    self._remaining = 0
                    self._state = _LINE_STATE
                    self._scan = self._pos
                    return True
                self._lit += buf[pos : pos + take]
            self._pos += take
            self._remaining -= take
        if self._remaining:
            buf.clear()  # all input was taken
            self._pos = self._scan = 0
            return False
        if not self._discard:
            self._literals.append(bytes(self._lit))
            self._lit = bytearray()
        self._state = _LINE_STATE
        self._scan = self._pos
        return True


# --------------------------------------------------------------------------- parsing


class ParseError(Exception):
    """A command that does not parse: answer ``<tag or *> BAD <message>``."""

    def __init__(self, tag: str | None, message: str) -> None:
        super().__init__(message)
        self.tag = tag
        self.message = message


class NotMUTF7(ParseError):
    """A well-formed command naming a mailbox that is not valid modified UTF-7.

    Not a BAD: as Dovecot, a command on such a mailbox answers ``NO``, and a
    LIST or LSUB whose reference or pattern is one lists nothing (``OK``).
    ``command`` is the command's name.
    """

    def __init__(self, tag: str | None, command: str) -> None:
        super().__init__(tag, "Mailbox name is not valid mUTF-7")
        self.command = command


def _char_class(chars: set[int]) -> bytes:
    return b"[" + b"".join(re.escape(bytes([c])) for c in sorted(chars)) + b"]"


_CHAR: Final = set(range(0x01, 0x80))
_CTL: Final = set(range(0x00, 0x20)) | {0x7F}
_ATOM_SPECIALS: Final = set(b'(){ %*"\\]') | _CTL
_ATOM_CHARS: Final = _CHAR - _ATOM_SPECIALS
_ATOM: Final = re.compile(_char_class(_ATOM_CHARS) + b"+")
_ASTRING: Final = re.compile(_char_class(_ATOM_CHARS | {0x5D}) + b"+")
_TAG: Final = re.compile(_char_class((_ATOM_CHARS | {0x5D}) - {0x2B}) + b"+")
_LIST_MAILBOX: Final = re.compile(_char_class(_ATOM_CHARS | set(b"%*]")) + b"+")
_DIGITS: Final = re.compile(rb"[0-9]+")
_SEQ_SET: Final = re.compile(rb"[0-9:,*$]+")
_FETCH_NAME: Final = re.compile(rb"[A-Za-z0-9.]+")
_SECTION_SPEC: Final = re.compile(rb"[A-Za-z0-9.]*")
_BASE64: Final = re.compile(rb"[A-Za-z0-9+/]*={0,2}")
_DATE: Final = re.compile(rb"([0-9]{1,2})-([A-Za-z]{3})-([0-9]{4})")
_DATE_TIME: Final = re.compile(
    rb" ?([0-9]{1,2})-([A-Za-z]{3})-([0-9]{4}) ([0-9]{2}):([0-9]{2}):([0-9]{2}) ([+-])([0-9]{2})([0-9]{2})"
)
_CONTROL: Final = re.compile("[\x00-\x1f\x7f]")
_UNSAFE: Final = re.compile(r"[^A-Za-z0-9._\-]")

_SP: Final = 0x20
_DQUOTE: Final = 0x22
_LPAREN: Final = 0x28
_RPAREN: Final = 0x29
_BACKSLASH: Final = 0x5C
_LBRACKET: Final = 0x5B
_RBRACKET: Final = 0x5D
_LT: Final = 0x3C
_SEQ_START: Final = frozenset(b"0123456789*$")

_MONTHS: Final = {
    m.encode(): i
    for i, m in enumerate(
        ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"), 1
    )
}
_SYSTEM_FLAGS: Final = {f.upper(): f for f in ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")}
_MAX_UINT32: Final = 2**32 - 1
_MAX_INT63: Final = 2**63 - 1

_FETCH_MACROS: Final = {
    "ALL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"),
    "FAST": ("FLAGS", "INTERNALDATE", "RFC822.SIZE"),
    "FULL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"),
}
_FETCH_SIMPLE: Final = frozenset(
    {
        "UID", "FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODYSTRUCTURE", "RFC822",
        "RFC822.HEADER", "RFC822.TEXT", "MODSEQ",
    }
)  # fmt: skip
_SectionText: TypeAlias = Literal["HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT", "MIME"]
_SECTION_TEXTS: Final[dict[str, _SectionText]] = {
    "HEADER": "HEADER",
    "HEADER.FIELDS": "HEADER.FIELDS",
    "HEADER.FIELDS.NOT": "HEADER.FIELDS.NOT",
    "TEXT": "TEXT",
    "MIME": "MIME",
}
_STORE_MODES: Final[dict[str, Literal["set", "add", "remove"]]] = {"": "set", "+": "add", "-": "remove"}

STATUS_ITEMS: Final = frozenset(
    {"MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN", "HIGHESTMODSEQ", "SIZE"}
)
_LIST_SELECT: Final = frozenset({"SUBSCRIBED", "REMOTE", "RECURSIVEMATCH", "SPECIAL-USE"})
_LIST_RETURN: Final = frozenset({"SUBSCRIBED", "CHILDREN", "SPECIAL-USE"})
# ESEARCH/ESORT result options (RFC 4731, 5182, 5267); PARTIAL takes a range after it.
_SEARCH_RETURN: Final = frozenset({"MIN", "MAX", "ALL", "COUNT", "SAVE", "CONTEXT", "UPDATE", "PARTIAL"})
_PARTIAL: Final = re.compile(rb"([0-9]{1,10}):([0-9]{1,10})(?=[ )])")
_SORT_KEYS: Final = frozenset(
    {"ARRIVAL", "CC", "DATE", "FROM", "SIZE", "SUBJECT", "TO", "DISPLAYFROM", "DISPLAYTO"}
)

# Search keys by the kind of their arguments.
_K_NONE, _K_STRING, _K_DATE, _K_NUMBER, _K_KEYWORD, _K_HEADER, _K_UID, _K_NOT, _K_OR, _K_MODSEQ = range(10)
_SEARCH_KEYS: Final = {
    **dict.fromkeys(
        (
            "ALL", "ANSWERED", "DELETED", "DRAFT", "FLAGGED", "NEW", "OLD", "RECENT", "SEEN",
            "UNANSWERED", "UNDELETED", "UNDRAFT", "UNFLAGGED", "UNSEEN",
        ),
        _K_NONE,
    ),
    **dict.fromkeys(("BCC", "BODY", "CC", "FROM", "SUBJECT", "TEXT", "TO"), _K_STRING),
    **dict.fromkeys(("BEFORE", "ON", "SINCE", "SENTBEFORE", "SENTON", "SENTSINCE"), _K_DATE),
    **dict.fromkeys(("LARGER", "SMALLER"), _K_NUMBER),
    **dict.fromkeys(("KEYWORD", "UNKEYWORD"), _K_KEYWORD),
    "HEADER": _K_HEADER,
    "UID": _K_UID,
    "NOT": _K_NOT,
    "OR": _K_OR,
    "MODSEQ": _K_MODSEQ,
}  # fmt: skip
_SIMPLE: Final = frozenset(
    {"CAPABILITY", "NOOP", "LOGOUT", "STARTTLS", "CHECK", "CLOSE", "UNSELECT", "EXPUNGE", "NAMESPACE", "IDLE"}
)
_MAILBOX_COMMANDS: Final = frozenset({"CREATE", "DELETE", "SUBSCRIBE", "UNSUBSCRIBE", "GETQUOTAROOT"})


def _safe(text: str) -> str:
    """A client-supplied word made safe to echo: short, only letters, digits and ``._-``."""
    return _UNSAFE.sub("?", text[:32]) + ("..." if len(text) > 32 else "")


def parse(line: Line) -> Command:
    """The command a framed line holds; :class:`ParseError` if it is not one we accept."""
    if len(line.parts) != len(line.literals) + 1:
        raise ParseError(None, "malformed command line")
    return _Parser(line).command()


class _Parser:
    """A cursor over one line: ``s[i:]`` of part ``k``, then literal ``k``, then part ``k + 1``..."""

    __slots__ = ("_lits", "_parts", "i", "k", "keys", "lenient", "name", "s", "tag")

    def __init__(self, line: Line) -> None:
        self._parts = line.parts
        self._lits = line.literals
        self.k = 0
        self.s = line.parts[0]
        self.i = 0
        self.tag: str | None = None
        self.name = ""  # the command's name, once read
        self.keys = 0  # search keys seen
        self.lenient = False  # decode search strings leniently (unsupported CHARSET)

    # ------------------------------------------------------------------ tokens

    def fail(self, message: str) -> NoReturn:
        raise ParseError(self.tag, message)

    def expected(self, what: str) -> NoReturn:
        if self.at_end():
            self.fail(f"unexpected end of command, expected {what}")
        if self.at_literal():
            self.fail(f"unexpected literal, expected {what}")
        self.fail(f"expected {what}")

    def peek(self) -> int:
        """The next byte of the current part; -1 at its end (a literal or the end of the line)."""
        i = self.i
        return self.s[i] if i < len(self.s) else -1

    def at_end(self) -> bool:
        return self.i >= len(self.s) and self.k >= len(self._lits)

    def at_literal(self) -> bool:
        return self.i >= len(self.s) and self.k < len(self._lits)

    def end(self) -> None:
        if not self.at_end():
            if self.at_literal():
                self.fail("unexpected literal")
            self.fail("unexpected characters at the end of the command")

    def sp(self) -> None:
        if self.peek() != _SP:
            self.expected("a space")
        self.i += 1

    def byte(self, c: int, what: str) -> None:
        if self.peek() != c:
            self.expected(what)
        self.i += 1

    def match(self, pattern: re.Pattern[bytes], what: str) -> bytes:
        m = pattern.match(self.s, self.i)
        if m is None:
            self.expected(what)
        self.i = m.end()
        return m.group()

    def keyword(self, what: str = "a keyword") -> str:
        return self.match(_ATOM, what).decode("ascii").upper()

    def peek_keyword(self) -> str | None:
        m = _ATOM.match(self.s, self.i)
        return m.group().decode("ascii").upper() if m else None

    def number(self, what: str, maximum: int, *, minimum: int = 0) -> int:
        digits = self.match(_DIGITS, what)
        if len(digits) > 19:
            self.fail(f"{what} out of range")
        n = int(digits)
        if not minimum <= n <= maximum:
            self.fail(f"{what} out of range")
        return n

    def literal(self) -> bytes:
        data = self._lits[self.k]
        self.k += 1
        self.s = self._parts[self.k]
        self.i = 0
        return data

    def quoted(self) -> bytes:
        """A quoted string (at its opening quote), unescaped."""
        s = self.s
        i = self.i + 1
        chunks: list[bytes] = []
        q = s.find(b'"', i)
        while True:
            if q < 0:
                self.fail("unterminated quoted string")
            b = s.find(b"\\", i, q)
            if b < 0:
                chunks.append(s[i:q])
                break
            chunks.append(s[i:b])
            c = s[b + 1 : b + 2]
            if c != b'"' and c != b"\\":
                self.fail("invalid escape in quoted string")
            chunks.append(c)
            i = b + 2
            if i > q:
                q = s.find(b'"', i)
        self.i = q + 1
        data = b"".join(chunks)
        if b"\x00" in data or b"\r" in data:
            self.fail("invalid character in quoted string")
        return data

    def astring(self, what: str = "a string") -> bytes:
        if self.at_literal():
            return self.literal()
        if self.peek() == _DQUOTE:
            return self.quoted()
        return self.match(_ASTRING, what)

    def string(self, what: str = "a string") -> bytes:
        if self.at_literal():
            return self.literal()
        if self.peek() == _DQUOTE:
            return self.quoted()
        self.expected(what)

    def nstring(self, what: str = "a string or NIL") -> bytes | None:
        if self.at_literal() or self.peek() == _DQUOTE:
            return self.string(what)
        if self.keyword(what) != "NIL":
            self.fail(f"expected {what}")
        return None

    def text(self, data: bytes, what: str = "string") -> str:
        """A string's bytes as text: UTF-8, no NUL."""
        if b"\x00" in data:
            self.fail(f"NUL in {what}")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"invalid UTF-8 in {what}")

    def mailbox_name(self, data: bytes) -> str:
        name = self.text(data, "mailbox name")
        if "&" in name:
            try:
                name = mutf7.decode(name)
            except ValueError:
                raise NotMUTF7(self.tag, self.name) from None
        if _CONTROL.search(name):
            self.fail("control character in mailbox name")
        if len(name) == 5 and name.isascii() and name.upper() == "INBOX":
            return "INBOX"
        return name

    def mailbox(self) -> str:
        return self.mailbox_name(self.astring("a mailbox name"))

    def list_mailbox(self) -> str:
        if self.at_literal() or self.peek() == _DQUOTE:
            return self.mailbox_name(self.string())
        return self.mailbox_name(self.match(_LIST_MAILBOX, "a mailbox pattern"))

    def open_list(self, what: str) -> bool:
        """Consume "(" ; True if the list is empty (and its ")" consumed too)."""
        self.byte(_LPAREN, what)
        if self.peek() == _RPAREN:
            self.i += 1
            return True
        return False

    def keyword_list(self, item: str, allowed: frozenset[str], *, empty: bool = True) -> tuple[str, ...]:
        """``"(" [keyword *(SP keyword)] ")"``, each keyword one of ``allowed``; ``item`` names them."""
        if self.open_list(f"'(' starting the {item}s"):
            if not empty:
                self.fail(f"no {item}s in the list")
            return ()
        items: list[str] = []
        while True:
            word = self.keyword(f"a {item}")
            if word not in allowed:
                self.fail(f"unsupported {item} {_safe(word)}")
            items.append(word)
            if len(items) > MAX_ITEMS:
                self.fail(f"too many {item}s")
            if self.peek() != _SP:
                break
            self.i += 1
        self.byte(_RPAREN, f"')' ending the {item}s")
        return tuple(items)

    def seqset(self) -> SeqSet:
        token = self.match(_SEQ_SET, "a sequence set")
        if token == b"$":
            return SeqSet(saved=True)
        if token.count(b",") >= MAX_SEQ_RANGES:
            self.fail("sequence set too long")
        ranges: list[tuple[int | None, int | None]] = []
        for item in token.split(b","):
            lo, colon, hi = item.partition(b":")
            a = self.seq_number(lo)
            ranges.append((a, self.seq_number(hi) if colon else a))
        return SeqSet(tuple(ranges))

    def seq_number(self, token: bytes) -> int | None:
        if token == b"*":
            return None
        if not token.isdigit() or len(token) > 10:
            self.fail("invalid sequence set")
        n = int(token)
        if not 1 <= n <= _MAX_UINT32:
            self.fail("invalid sequence set")
        return n

    def date(self) -> date:
        raw = self.quoted() if self.peek() == _DQUOTE else self.match(_ATOM, "a date")
        m = _DATE.fullmatch(raw)
        month = _MONTHS.get(m.group(2).upper(), 0) if m else 0
        if m is None or not month:
            self.fail("invalid date")
        try:
            return date(int(m.group(3)), month, int(m.group(1)))
        except ValueError:
            self.fail("invalid date")

    def date_time(self) -> datetime:
        m = _DATE_TIME.fullmatch(self.quoted())
        month = _MONTHS.get(m.group(2).upper(), 0) if m else 0
        if m is None or not month or int(m.group(9)) > 59:
            self.fail("invalid date-time")
        d, _, y, hh, mm, ss, sign, zh, zm = m.groups()
        offset = timedelta(hours=int(zh), minutes=int(zm))
        try:
            zone = timezone(-offset if sign == b"-" else offset)
            return datetime(int(y), month, int(d), int(hh), int(mm), int(ss), tzinfo=zone)
        except ValueError:
            self.fail("invalid date-time")

    def flag(self) -> str:
        if self.peek() == _BACKSLASH:
            self.i += 1
            name = "\\" + self.match(_ATOM, "a flag").decode("ascii")
            canonical = _SYSTEM_FLAGS.get(name.upper())
            if canonical is None:
                self.fail(f"unsupported flag {_safe(name)}")
            return canonical
        return self.match(_ATOM, "a flag").decode("ascii")

    def flag_list(self) -> tuple[str, ...]:
        """``"(" [flag *(SP flag)] ")"``"""
        if self.open_list("'(' starting the flag list"):
            return ()
        flags = self.flags()
        self.byte(_RPAREN, "')' ending the flag list")
        return flags

    def flags(self) -> tuple[str, ...]:
        """``flag *(SP flag)``"""
        flags = [self.flag()]
        while self.peek() == _SP:
            self.i += 1
            flags.append(self.flag())
            if len(flags) > MAX_ITEMS:
                self.fail("too many flags")
        return tuple(flags)

    # ------------------------------------------------------------------ commands

    def command(self) -> Command:
        if not self.s and not self._lits:
            self.fail("empty command line")
        m = _TAG.match(self.s)
        if m is None or (m.end() < len(self.s) and self.s[m.end()] != _SP):
            self.fail("invalid tag")  # a wrong tag is worse than none: "* BAD"
        tag = m.group().decode("ascii")
        self.tag = tag
        self.i = m.end()
        if self.at_end():
            self.fail("missing command")
        self.sp()
        name = self.name = self.keyword("a command name")
        handler = _COMMANDS.get(name)
        if handler is None:
            if name in _SIMPLE:
                self.end()
                return Simple(tag, name)
            self.fail(f"unknown command {_safe(name)}")
        return handler(self, tag, name)

    def cmd_login(self, tag: str, name: str) -> Command:
        self.sp()
        user = self.text(self.astring("a user name"), "user name")
        self.sp()
        password = self.text(self.astring("a password"), "password")
        self.end()
        return Login(tag, name, user, password)

    def cmd_authenticate(self, tag: str, name: str) -> Command:
        self.sp()
        mechanism = self.keyword("a SASL mechanism")
        initial = None
        if not self.at_end():
            self.sp()
            token = self.match(_BASE64, "a base64 initial response")
            if not token:
                self.expected("a base64 initial response")
            if token == b"=":
                initial = b""
            else:
                try:
                    initial = binascii.a2b_base64(token, strict_mode=True)
                except binascii.Error:
                    self.fail("invalid base64 in the initial response")
            self.end()
        return Authenticate(tag, name, mechanism, initial)

    def cmd_enable(self, tag: str, name: str) -> Command:
        caps: list[str] = []
        while not caps or not self.at_end():
            self.sp()
            caps.append(self.keyword("a capability"))
            if len(caps) > MAX_ITEMS:
                self.fail("too many capabilities")
        return Enable(tag, name, tuple(caps))

    def cmd_cancelupdate(self, tag: str, name: str) -> Command:
        """RFC 5267 4.3: ``CANCELUPDATE 1*(SP quoted)``, the tags of updating searches."""
        tags: list[str] = []
        while not tags or not self.at_end():
            self.sp()
            if self.peek() != _DQUOTE:
                self.expected("a quoted tag")
            tags.append(self.text(self.quoted(), "tag"))
            if len(tags) > MAX_ITEMS:
                self.fail("too many tags")
        return CancelUpdate(tag, name, tuple(tags))

    def cmd_compress(self, tag: str, name: str) -> Command:
        self.sp()
        mechanism = self.keyword("a compression mechanism")
        self.end()
        return Compress(tag, name, mechanism)

    def cmd_select(self, tag: str, name: str) -> Command:
        self.sp()
        mailbox = self.mailbox()
        condstore = False
        qresync = None
        if not self.at_end():
            self.sp()
            empty = self.open_list("'(' starting the SELECT parameters")
            while not empty:
                param = self.keyword("a SELECT parameter")
                if param == "CONDSTORE":
                    condstore = True
                elif param == "QRESYNC" and qresync is None:
                    self.sp()
                    qresync = self.qresync()
                else:
                    self.fail(f"unsupported SELECT parameter {_safe(param)}")
                if self.peek() != _SP:
                    self.byte(_RPAREN, "')' ending the SELECT parameters")
                    break
                self.i += 1
        self.end()
        return Select(tag, name, mailbox, condstore, qresync)

    def qresync(self) -> QResync:
        """``"(" uidvalidity SP mod-sequence-value [SP known-uids [SP seq-match-data]] ")"`` (RFC 7162)."""
        self.byte(_LPAREN, "'(' starting the QRESYNC parameters")
        uidvalidity = self.number("a UIDVALIDITY", _MAX_UINT32, minimum=1)
        self.sp()
        modseq = self.number("a mod-sequence", _MAX_INT63, minimum=1)
        known_uids = seq_match = None
        if self.peek() == _SP:
            self.i += 1
            known_uids = self.uid_set("known UIDs")
            if self.peek() == _SP:
                self.i += 1
                self.byte(_LPAREN, "'(' starting the sequence match data")
                seqs = self.uid_set("known sequence numbers")
                self.sp()
                seq_match = (seqs, self.uid_set("known UIDs"))
                self.byte(_RPAREN, "')' ending the sequence match data")
        self.byte(_RPAREN, "')' ending the QRESYNC parameters")
        return QResync(uidvalidity, modseq, known_uids, seq_match)

    def uid_set(self, what: str) -> SeqSet:
        """A sequence set without ``*`` or ``$`` (QRESYNC's known-uids and seq-match-data)."""
        found = self.seqset()
        if found.saved or any(n is None for r in found.ranges for n in r):
            self.fail(f"{what}: '*' and '$' are not allowed here")
        return found

    def cmd_mailbox(self, tag: str, name: str) -> Command:
        self.sp()
        mailbox = self.mailbox()
        self.end()
        return MailboxCommand(tag, name, mailbox)

    def cmd_rename(self, tag: str, name: str) -> Command:
        self.sp()
        old = self.mailbox()
        self.sp()
        new = self.mailbox()
        self.end()
        return Rename(tag, name, old, new)

    def cmd_list(self, tag: str, name: str) -> Command:
        self.sp()
        select: tuple[str, ...] = ()
        if self.peek() == _LPAREN:
            select = self.keyword_list("LIST selection option", _LIST_SELECT)
            if select and all(o == "RECURSIVEMATCH" for o in select):
                self.fail("RECURSIVEMATCH needs another selection option")
            self.sp()
        reference = self.mailbox()
        self.sp()
        if self.peek() == _LPAREN:
            self.i += 1
            patterns = [self.list_mailbox()]
            while self.peek() == _SP:
                self.i += 1
                patterns.append(self.list_mailbox())
                if len(patterns) > MAX_ITEMS:
                    self.fail("too many patterns")
            self.byte(_RPAREN, "')' ending the patterns")
        else:
            patterns = [self.list_mailbox()]
        returns: list[str] = []
        status: tuple[str, ...] | None = None
        if not self.at_end():
            self.sp()
            if self.keyword("RETURN") != "RETURN":
                self.fail("expected RETURN")
            self.sp()
            if not self.open_list("'(' starting the return options"):
                while True:
                    option = self.keyword("a return option")
                    if option == "STATUS":
                        self.sp()
                        status = self.keyword_list("STATUS item", STATUS_ITEMS, empty=False)
                    elif option not in _LIST_RETURN:
                        self.fail(f"unsupported return option {_safe(option)}")
                    returns.append(option)
                    if self.peek() != _SP:
                        break
                    self.i += 1
                    if len(returns) > MAX_ITEMS:
                        self.fail("too many return options")
                self.byte(_RPAREN, "')' ending the return options")
        self.end()
        self.check_patterns(reference, patterns)
        if status is not None:
            return List(tag, name, reference, tuple(patterns), select, tuple(returns), status)
        return List(tag, name, reference, tuple(patterns), select, tuple(returns))

    def cmd_lsub(self, tag: str, name: str) -> Command:
        self.sp()
        reference = self.mailbox()
        self.sp()
        pattern = self.list_mailbox()
        self.end()
        self.check_patterns(reference, [pattern])
        return List(tag, name, reference, (pattern,))

    def check_patterns(self, reference: str, patterns: list[str]) -> None:
        if sum(len(reference) + len(p) for p in patterns) > MAX_LIST_PATTERN:
            self.fail(f"mailbox patterns longer than {MAX_LIST_PATTERN} characters")

    def cmd_status(self, tag: str, name: str) -> Command:
        self.sp()
        mailbox = self.mailbox()
        self.sp()
        items = self.keyword_list("STATUS item", STATUS_ITEMS, empty=False)
        self.end()
        return Status(tag, name, mailbox, items)

    def cmd_append(self, tag: str, name: str) -> Command:
        self.sp()
        mailbox = self.mailbox()
        messages = [self.append_message()]
        while not self.at_end():  # MULTIAPPEND (RFC 3502)
            messages.append(self.append_message())
            if len(messages) > MAX_APPEND_MESSAGES:
                self.fail(f"more than {MAX_APPEND_MESSAGES} messages in one APPEND")
        return Append(tag, name, mailbox, tuple(messages))

    def append_message(self) -> AppendMessage:
        """SP [flag-list SP] [date-time SP] (literal | literal8 | CATENATE (...))."""
        self.sp()
        flags: tuple[str, ...] = ()
        internal_date = None
        if self.peek() == _LPAREN:
            flags = self.flag_list()
            self.sp()
        if self.peek() == _DQUOTE:
            internal_date = self.date_time()
            self.sp()
        if self.peek_keyword() == "CATENATE":
            self.keyword()
            self.sp()
            return AppendMessage(flags, internal_date, catenate=self.catenate_parts())
        return AppendMessage(flags, internal_date, self.append_literal())

    def append_literal(self) -> bytes:
        if self.s[self.i :] == b"~":  # literal8 (RFC 3516): the message may hold NUL bytes
            self.i += 1
        if not self.at_literal():
            self.expected("the message as a literal")
        return self.literal()

    def catenate_parts(self) -> tuple[CatenatePart, ...]:
        """RFC 4469: ( cat-part *(SP cat-part) ), cat-part = TEXT SP literal / URL SP astring."""
        self.byte(_LPAREN, "'(' starting the CATENATE parts")
        parts: list[CatenatePart] = []
        while True:
            kind = self.keyword("TEXT or URL")
            self.sp()
            if kind == "TEXT":
                parts.append(CatenatePart(text=self.append_literal()))
            elif kind == "URL":
                parts.append(CatenatePart(url=self.text(self.astring("a URL"), "URL")))
            else:
                self.fail(f"expected TEXT or URL, not {_safe(kind)}")
            if len(parts) > MAX_CATENATE_PARTS:
                self.fail(f"more than {MAX_CATENATE_PARTS} CATENATE parts")
            if self.peek() != _SP:
                break
            self.i += 1
        self.byte(_RPAREN, "')' ending the CATENATE parts")
        return tuple(parts)

    def cmd_search(self, tag: str, name: str, uid: bool = False) -> Command:
        self.sp()
        returns = self.search_returns("SEARCH")
        charset = None
        if self.peek_keyword() == "CHARSET":
            self.keyword()
            self.sp()
            charset = self.text(self.astring("a charset"), "charset").upper()
            self.lenient = charset not in ("UTF-8", "US-ASCII")
            self.sp()
        keys = [self.search_key(0, 0)]
        while not self.at_end():
            self.sp()
            keys.append(self.search_key(0, 0))
        return Search(tag, name, uid, charset, SearchKey("AND", tuple(keys)), returns)

    def search_returns(self, command: str) -> Returns | None:
        """``RETURN (...) SP`` before SEARCH keys or SORT criteria (ESEARCH, ESORT, CONTEXT=SEARCH:
        RFC 4731, 5267), if there; checked as Dovecot checks it."""
        if self.peek_keyword() != "RETURN":
            return None
        self.keyword()
        self.sp()
        options: dict[str, None] = {}
        partial: tuple[int, int] | None = None
        if not self.open_list(f"'(' starting the {command} return options"):
            for _ in range(MAX_ITEMS):
                word = self.keyword(f"a {command} return option")
                if word not in _SEARCH_RETURN:
                    self.fail(f"unsupported {command} return option {_safe(word)}")
                if word in ("UPDATE", "PARTIAL") and word in options:
                    self.fail(f"{word} can be used only once")
                options[word] = None
                if word == "PARTIAL":
                    self.sp()
                    m = _PARTIAL.match(self.s, self.i)
                    if m is None or int(m[1]) == 0 or int(m[2]) == 0 or max(map(int, m.groups())) >= 2**32:
                        self.fail("PARTIAL range broken")
                    self.i = m.end()
                    low, high = sorted((int(m[1]), int(m[2])))
                    partial = (low, high)
                if self.peek() != _SP:
                    break
                self.i += 1
            self.byte(_RPAREN, f"')' ending the {command} return options")
        if partial is not None and "ALL" in options:
            self.fail("PARTIAL conflicts with ALL")
        options.pop("CONTEXT", None)  # a hint (RFC 5267 4.2): nothing to do
        self.sp()
        return Returns(tuple(options), partial)

    def cmd_sort(self, tag: str, name: str, uid: bool = False) -> Command:
        """RFC 5256 SORT, with RFC 5267's RETURN (ESORT)."""
        self.sp()
        returns = self.search_returns("SORT")
        self.byte(_LPAREN, "'(' starting the sort criteria")
        criteria: list[tuple[str, bool]] = []
        while True:
            word = self.keyword("a sort criterion")
            reverse = word == "REVERSE"
            if reverse:
                self.sp()
                word = self.keyword("a sort criterion")
            if word not in _SORT_KEYS:
                self.fail(f"unknown sort criterion {_safe(word)}")
            criteria.append((word, reverse))
            if len(criteria) > len(_SORT_KEYS) * 2:
                self.fail("too many sort criteria")
            if self.peek() != _SP:
                break
            self.i += 1
        self.byte(_RPAREN, "')' ending the sort criteria")
        self.sp()
        charset = self.text(self.astring("a charset"), "charset").upper()
        self.lenient = charset not in ("UTF-8", "US-ASCII")
        keys: list[SearchKey] = []
        while not keys or not self.at_end():
            self.sp()
            keys.append(self.search_key(0, 0))
        return Sort(tag, name, uid, tuple(criteria), charset, SearchKey("AND", tuple(keys)), returns)

    def cmd_thread(self, tag: str, name: str, uid: bool = False) -> Command:
        """RFC 5256 THREAD algorithm charset search-keys."""
        self.sp()
        algorithm = self.keyword("a threading algorithm")
        if algorithm not in ("ORDEREDSUBJECT", "REFERENCES"):
            self.fail(f"unknown threading algorithm {_safe(algorithm)}")
        self.sp()
        charset = self.text(self.astring("a charset"), "charset").upper()
        self.lenient = charset not in ("UTF-8", "US-ASCII")
        keys: list[SearchKey] = []
        while not keys or not self.at_end():
            self.sp()
            keys.append(self.search_key(0, 0))
        return Thread(tag, name, uid, algorithm, charset, SearchKey("AND", tuple(keys)))

    def search_string(self) -> str:
        data = self.astring()
        if self.lenient:
            return data.decode("utf-8", "replace")
        return self.text(data, "search string")

    def search_key(self, parens: int, nesting: int) -> SearchKey:
        self.keys += 1
        if self.keys > MAX_SEARCH_KEYS:
            self.fail(f"more than {MAX_SEARCH_KEYS} search keys")
        if nesting > MAX_SEARCH_NESTING:
            self.fail("search keys nested too deeply")
        c = self.peek()
        if c == _LPAREN:
            if parens >= MAX_PAREN_DEPTH:
                self.fail("parentheses nested too deeply")
            self.i += 1
            keys = [self.search_key(parens + 1, nesting + 1)]
            while self.peek() == _SP:
                self.i += 1
                keys.append(self.search_key(parens + 1, nesting + 1))
            self.byte(_RPAREN, "')' ending the search keys")
            return SearchKey("AND", tuple(keys))
        if c in _SEQ_START:
            return SearchKey("SEQ", (self.seqset(),))
        op = self.keyword("a search key")
        kind = _SEARCH_KEYS.get(op)
        if kind is None:
            self.fail(f"unknown search key {_safe(op)}")
        if kind == _K_NONE:
            return SearchKey(op)
        self.sp()
        if kind == _K_STRING:
            return SearchKey(op, (self.search_string(),))
        if kind == _K_DATE:
            return SearchKey(op, (self.date(),))
        if kind == _K_NUMBER:
            return SearchKey(op, (self.number("a size", _MAX_INT63),))
        if kind == _K_KEYWORD:
            return SearchKey(op, (self.match(_ATOM, "a keyword").decode("ascii"),))
        if kind == _K_HEADER:
            field = self.header_field_name()
            self.sp()
            return SearchKey(op, (field, self.search_string()))
        if kind == _K_UID:
            return SearchKey(op, (self.seqset(),))
        if kind == _K_NOT:
            return SearchKey(op, (self.search_key(parens, nesting + 1),))
        if kind == _K_OR:
            first = self.search_key(parens, nesting + 1)
            self.sp()
            return SearchKey(op, (first, self.search_key(parens, nesting + 1)))
        # MODSEQ [entry-name SP entry-type-req SP] mod-sequence-valzer: the number comes first in args.
        if self.peek() == _DQUOTE:
            entry = self.text(self.quoted(), "entry name")
            if not entry.startswith("/flags/") or len(entry) == 7:
                self.fail("invalid MODSEQ entry name")
            self.sp()
            kind_word = self.keyword("priv, shared or all")
            if kind_word not in ("PRIV", "SHARED", "ALL"):
                self.fail("expected priv, shared or all")
            self.sp()
            return SearchKey(op, (self.number("a mod-sequence", _MAX_INT63), entry, kind_word.lower()))
        return SearchKey(op, (self.number("a mod-sequence", _MAX_INT63),))

    def header_field_name(self) -> str:
        data = self.astring("a header field name")
        if not data or any(b < 0x21 or b > 0x7E or b == 0x3A for b in data):
            self.fail("invalid header field name")
        return data.decode("ascii")

    def cmd_fetch(self, tag: str, name: str, uid: bool = False) -> Command:
        self.sp()
        sequence = self.seqset()
        self.sp()
        atts: list[FetchAtt] = []
        if self.peek() == _LPAREN:
            self.i += 1
            atts.append(self.fetch_att())
            while self.peek() == _SP:
                self.i += 1
                atts.append(self.fetch_att())
                if len(atts) > MAX_FETCH_ATTS:
                    self.fail(f"more than {MAX_FETCH_ATTS} FETCH items")
            self.byte(_RPAREN, "')' ending the FETCH items")
        else:
            m = _FETCH_NAME.match(self.s, self.i)
            macro = _FETCH_MACROS.get(m.group().upper().decode("ascii")) if m else None
            if m is not None and macro is not None:
                self.i = m.end()
                atts.extend(FetchAtt(n) for n in macro)
            else:
                atts.append(self.fetch_att())
        changed_since = None
        vanished = False
        if not self.at_end():
            self.sp()
            if not uid:
                changed_since = self.modifier("CHANGEDSINCE", minimum=1)
            else:  # (CHANGEDSINCE n [VANISHED]) in either order (RFC 7162 3.2.6)
                self.byte(_LPAREN, "'(' starting the modifiers")
                while True:
                    word = self.keyword("a modifier")
                    if word == "CHANGEDSINCE" and changed_since is None:
                        self.sp()
                        changed_since = self.number("a mod-sequence", _MAX_INT63, minimum=1)
                    elif word == "VANISHED" and not vanished:
                        vanished = True
                    else:
                        self.fail(f"unsupported modifier {_safe(word)}")
                    if self.peek() != _SP:
                        break
                    self.i += 1
                self.byte(_RPAREN, "')' ending the modifiers")
                if vanished and changed_since is None:
                    self.fail("VANISHED used without CHANGEDSINCE")
        self.end()
        return Fetch(tag, name, uid, sequence, tuple(atts), changed_since, vanished)

    def modifier(self, expected: str, *, minimum: int) -> int:
        """``"(" <expected> SP mod-sequence ")"``: the one modifier we support, its value."""
        self.byte(_LPAREN, "'(' starting the modifiers")
        word = self.keyword("a modifier")
        if word != expected:
            self.fail(f"unsupported modifier {_safe(word)}")
        self.sp()
        value = self.number("a mod-sequence", _MAX_INT63, minimum=minimum)
        if self.peek() == _SP:
            self.i += 1
            word = self.keyword("a modifier")
            self.fail(f"unsupported modifier {_safe(word)}" if word != expected else f"repeated {expected}")
        self.byte(_RPAREN, "')' ending the modifiers")
        return value

    def fetch_att(self) -> FetchAtt:
        raw = self.match(_FETCH_NAME, "a FETCH item")
        att = raw.decode("ascii").upper()
        if att in ("BODY", "BODY.PEEK") and self.peek() == _LBRACKET:
            section = self.section()
            return FetchAtt("BODY", section, self.partial(), att == "BODY.PEEK")
        if att in ("BINARY", "BINARY.PEEK", "BINARY.SIZE") and self.peek() == _LBRACKET:
            section = Section(self.section_binary())
            if att == "BINARY.SIZE":  # never sets \Seen
                return FetchAtt(att, section, None, True)
            return FetchAtt("BINARY", section, self.partial(), att == "BINARY.PEEK")
        if att in _FETCH_SIMPLE or att == "BODY":
            return FetchAtt(att)
        if att == "BODY.PEEK":
            self.fail("BODY.PEEK needs a section")
        if att.startswith("BINARY"):
            self.fail(f"{att} needs a section")
        if att in _FETCH_MACROS:
            self.fail(f"{att} cannot be used in a list")
        self.fail(f"unknown FETCH item {_safe(att)}")

    def partial(self) -> tuple[int, int] | None:
        """``<start.length>`` after a section, if there is one."""
        if self.peek() != _LT:
            return None
        self.i += 1
        start = self.number("a partial start", _MAX_INT63)
        self.byte(0x2E, "'.'")
        length = self.number("a partial length", _MAX_INT63, minimum=1)
        self.byte(0x3E, "'>'")
        return (start, length)

    def section_binary(self) -> tuple[int, ...]:
        """RFC 3516 section-binary: ``[`` part numbers ``]``, nothing else."""
        self.i += 1  # "["
        spec = self.match(_SECTION_SPEC, "a section").decode("ascii")
        words = spec.split(".") if spec else []
        if not all(w.isdigit() and len(w) <= 10 and 1 <= int(w) <= _MAX_UINT32 for w in words):
            self.fail("invalid section: BINARY takes part numbers only")
        self.byte(_RBRACKET, "']' ending the section")
        return tuple(int(w) for w in words)

    def section(self) -> Section:
        self.i += 1  # "["
        spec = self.match(_SECTION_SPEC, "a section").decode("ascii").upper()
        part: list[int] = []
        text: _SectionText | None = None
        fields: tuple[str, ...] = ()
        if spec:
            words = spec.split(".")
            n = 0
            while n < len(words) and words[n].isdigit():
                if len(words[n]) > 10 or not 1 <= int(words[n]) <= _MAX_UINT32:
                    self.fail("invalid section part")
                part.append(int(words[n]))
                n += 1
            rest = ".".join(words[n:])
            if rest:
                text = _SECTION_TEXTS.get(rest)
                if text is None or (text == "MIME" and not part):
                    self.fail("invalid section")
                if text in ("HEADER.FIELDS", "HEADER.FIELDS.NOT"):
                    self.sp()
                    fields = self.header_list()
            elif n < len(words) or not part:
                self.fail("invalid section")
        self.byte(_RBRACKET, "']' ending the section")
        return Section(tuple(part), text, fields)

    def header_list(self) -> tuple[str, ...]:
        self.byte(_LPAREN, "'(' starting the header list")
        names = [self.header_field_name().upper()]
        while self.peek() == _SP:
            self.i += 1
            names.append(self.header_field_name().upper())
            if len(names) > MAX_ITEMS:
                self.fail("too many header fields")
        self.byte(_RPAREN, "')' ending the header list")
        return tuple(names)

    def cmd_store(self, tag: str, name: str, uid: bool = False) -> Command:
        self.sp()
        sequence = self.seqset()
        self.sp()
        unchanged_since = None
        if self.peek() == _LPAREN:
            unchanged_since = self.modifier("UNCHANGEDSINCE", minimum=0)
            self.sp()
        item = self.keyword("FLAGS, +FLAGS or -FLAGS")
        sign = item[:1] if item[:1] in ("+", "-") else ""
        base = item[len(sign) :]
        if base not in ("FLAGS", "FLAGS.SILENT"):
            self.fail("expected FLAGS, +FLAGS or -FLAGS")
        self.sp()
        flags = self.flag_list() if self.peek() == _LPAREN else self.flags()
        self.end()
        return Store(
            tag, name, uid, sequence, _STORE_MODES[sign], base == "FLAGS.SILENT", flags, unchanged_since
        )

    def cmd_copy(self, tag: str, name: str, uid: bool = False) -> Command:
        self.sp()
        sequence = self.seqset()
        self.sp()
        mailbox = self.mailbox()
        self.end()
        return Copy(tag, name, uid, sequence, mailbox)

    def cmd_uid(self, tag: str, name: str) -> Command:
        self.sp()
        sub = self.keyword("a UID command")
        if sub == "EXPUNGE":
            self.sp()
            sequence = self.seqset()
            self.end()
            return UidExpunge(tag, sub, sequence)
        handler = _UID_COMMANDS.get(sub)
        if handler is None:
            self.fail(f"unknown UID command {_safe(sub)}")
        return handler(self, tag, sub, True)

    def cmd_id(self, tag: str, name: str) -> Command:
        self.sp()
        if self.peek() != _LPAREN:
            if self.keyword("a parameter list or NIL") != "NIL":
                self.fail("expected a parameter list or NIL")
            self.end()
            return Id(tag, name, None)
        params: list[tuple[str, str | None]] = []
        if not self.open_list("'('"):
            while True:
                key = self.string("a field name")
                self.sp()
                value = self.nstring("a value or NIL")
                if len(key) > 30 or (value is not None and len(value) > 1024):
                    self.fail("ID field or value too long")
                field = self.text(key, "ID field")
                params.append((field, None if value is None else self.text(value, "ID value")))
                if len(params) > 30:
                    self.fail("more than 30 ID fields")
                if self.peek() != _SP:
                    break
                self.i += 1
            self.byte(_RPAREN, "')' ending the parameter list")
        self.end()
        return Id(tag, name, tuple(params))

    def cmd_getquota(self, tag: str, name: str) -> Command:
        self.sp()
        root = self.text(self.astring("a quota root"), "quota root")
        self.end()
        return GetQuota(tag, name, root)


_Handler: TypeAlias = Callable[[_Parser, str, str], Command]
_UidHandler: TypeAlias = Callable[[_Parser, str, str, bool], Command]

_COMMANDS: Final[dict[str, _Handler]] = {
    "LOGIN": _Parser.cmd_login,
    "AUTHENTICATE": _Parser.cmd_authenticate,
    "ENABLE": _Parser.cmd_enable,
    "COMPRESS": _Parser.cmd_compress,
    "CANCELUPDATE": _Parser.cmd_cancelupdate,
    "SELECT": _Parser.cmd_select,
    "EXAMINE": _Parser.cmd_select,
    **dict.fromkeys(_MAILBOX_COMMANDS, _Parser.cmd_mailbox),
    "RENAME": _Parser.cmd_rename,
    "LIST": _Parser.cmd_list,
    "LSUB": _Parser.cmd_lsub,
    "STATUS": _Parser.cmd_status,
    "APPEND": _Parser.cmd_append,
    "SEARCH": _Parser.cmd_search,
    "SORT": _Parser.cmd_sort,
    "THREAD": _Parser.cmd_thread,
    "FETCH": _Parser.cmd_fetch,
    "STORE": _Parser.cmd_store,
    "COPY": _Parser.cmd_copy,
    "MOVE": _Parser.cmd_copy,
    "UID": _Parser.cmd_uid,
    "ID": _Parser.cmd_id,
    "GETQUOTA": _Parser.cmd_getquota,
}
_UID_COMMANDS: Final[dict[str, _UidHandler]] = {
    "FETCH": _Parser.cmd_fetch,
    "STORE": _Parser.cmd_store,
    "COPY": _Parser.cmd_copy,
    "MOVE": _Parser.cmd_copy,
    "SEARCH": _Parser.cmd_search,
    "SORT": _Parser.cmd_sort,
    "THREAD": _Parser.cmd_thread,
}

"""ENVELOPE, BODYSTRUCTURE, BODY and BODY[section] values exactly as Dovecot 2.3 sends them.

Pure functions of a message's raw bytes: no I/O, never raise, one parse per call.

Theory of operation
-------------------
Dovecot serves every message with CRLF line ends (its maildir stores LF and
``BODY[]`` converts), and all sizes it reports are of that CRLF form. So the
input is first normalised: NULs dropped, every bare LF made CRLF (lone CRs
stay). For a message in Dovecot's stored form (see :func:`stored_form`) that
changes nothing: what we parse is byte for byte what its ``BODY[]`` returns.

:class:`_Parser` is a whole-buffer port of Dovecot's streaming
``message-parser.c``: header lines as ``message-header-parser.c`` splits them
(with the SKIP_INITIAL_LWSP flag index-mail uses), MIME boundaries matched as
*prefixes* of ``--`` lines (newest boundary first, longest match wins), the
[CR]LF before a boundary belonging to the multipart rather than to the part
it ends, a header block cut short by a boundary line, ``multipart/digest``
defaulting children to ``message/rfc822``, and the nesting limit. It yields a
tree of :class:`_Part` with physical header/body offsets, sizes and line counts.

Each part's ``Content-*`` headers are then read like ``message-part-data.c``
(tokens via a port of ``rfc822-parser.c``, parameters via ``rfc2231-parser.c``:
RFC 2231 continuations are merged but their values stay percent-encoded), and
envelopes like ``imap-envelope.c`` with addresses from ``message-address.c``.
Strings are written with Dovecot's own quoting rules (``imap-quote.c``),
which differ from :mod:`gateway.imap.wire` (see :func:`_string`).

Dovecot 2.3.19 quirks mirrored here (each one observed on a live server)
-------------------------------------------------------------------------
Input and strings

* APPEND stores a message in the form :func:`stored_form` computes (NULs
  dropped, line ends as CRLF, one CR of a run before LF lost, a final CR
  lost); the other functions accept raw or stored bytes alike, except for
  runs of CRs before a line end. Compute from ``stored_form(raw)`` and serve
  those bytes to match Dovecot everywhere.
* Strings are quoted unless they contain CR, LF, a byte >= 0x80 or more than
  four ``"``/``\\`` (then a literal); length alone never makes a literal.
* ENVELOPE date, message-id, in-reply-to and BODYSTRUCTURE id, description,
  md5, location are the raw header text with each run of CR/LF replaced by a
  space, or removed when whitespace (a fold) or the end follows.
* Subject and display names are "for humans": TAB, CR, LF count as blanks,
  blanks are collapsed and trimmed, and whenever that changed anything, or on
  8-bit, ``"`` or ``\\``, a literal is sent; all blanks give ``""``.
* A fold line consisting of a single blank joins without its newline (this
  only shows in unterminated comments and quoted strings of addresses).

Headers

* A line without a colon is no field at all (but is copied verbatim).
* The LAST Date/Subject/Message-ID/In-Reply-To wins; address headers that
  occur several times are concatenated; Sender and Reply-To default to From.
* The FIRST Content-Type, Content-ID, Content-Description, Content-MD5,
  Content-Language, Content-Location wins, and the first *valid*
  Content-Transfer-Encoding (one token, nothing after it); a later
  Content-Disposition replaces one that had no parameters.
* Content-* headers count only on a part with MIME-Version or Content-Type
  (parts of a multipart always count; the root and embedded messages may not).
* Addresses (message-address.c with FILL_MISSING): ``MISSING_MAILBOX``,
  ``MISSING_DOMAIN``, ``SYNTAX_ERROR`` (broken ``<>``), ``INVALID_ROUTE``;
  a group is ``(NIL NIL "name" NIL) ... (NIL NIL NIL NIL)``; a trailing
  ``(comment)`` names an address that has no phrase; encoded words stay raw.

BODYSTRUCTURE

* Types, subtypes, parameter names and encodings keep their case; only the
  default encoding is written ``"7bit"``. text/* and the default text/plain
  get ``("charset" "us-ascii")`` appended unless a charset is given; other
  types without parameters get NIL. message/rfc822 is always written
  ``"message" "rfc822"``.
* ``type`` alone gives ``"type" ""``; anything else not of the form
  ``type/subtype`` followed by nothing or ``;`` gives ``"" ""`` and no
  parameters (and is not text, so no line count).
* RFC 2231: ``name*N[*]`` pieces are merged into ``name`` or ``name*``
  (values stay encoded, plain pieces %-escaped); a missing or repeated index
  keeps them apart; a bare ``name*`` reuses the index of the previous
  starred parameter (a Dovecot bug).
* ``multipart/*`` without a usable boundary has no children: it is written
  with one empty text/plain child, and its sections are empty.
* A multipart or message/rfc822 part not descended into (too deep) is written
  ``"application" "octet-stream"`` with its own parameters; so is a digest
  child without Content-Type at that depth.
* Content-Language is always a list; a Content-Disposition type may be ``""``.
* A boundary line right after a part's empty header line takes that empty
  line's newline: the part's header then ends without it.

Limits

* A multipart or message/rfc822 part at depth ``MAX_NESTED_PARTS - 1`` (99)
  or deeper, the message itself being depth 0, is a leaf.
* Once the message has :data:`MAX_TOTAL_PARTS` parts (the root included), no
  boundary is recognised any more: the rest belongs to the last part.

Sections

* A nonexistent section is the empty string (``{0}``), not NIL. For a
  non-multipart message ``1`` is its body and ``1.MIME`` its header;
  ``N.HEADER``/``N.TEXT``/``N.HEADER.FIELDS`` exist only for message/rfc822.
* HEADER.FIELDS of the message itself: the matching fields (all
  occurrences, continuation lines included) and always an empty line.
  Otherwise HEADER.FIELDS[.NOT] read from the part's start up to its empty
  line, even past a boundary that cut the header short, and end with an
  empty line only if there is one.
* Not mirrored: once Dovecot caches a header field, HEADER.FIELDS turns a
  line ending "CR CR LF" into "CR LF"; a fresh mailbox answers as we do.
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass, field

from gateway.imap import wire
from gateway.message import codec_name, decode_8bit, decode_rfc2047, parse_headers

__all__ = ["MAX_NESTED_PARTS", "MAX_TOTAL_PARTS", "bodystructure", "envelope", "section", "stored_form"]

MAX_NESTED_PARTS = 100
"""Dovecot's ``max_nested_mime_parts``: deeper parts are leaves."""
MAX_TOTAL_PARTS = 10_000
"""Dovecot's ``max_total_mime_parts``."""

_BOUNDARY_STRING_MAX_LEN = 70 + 10
_BOUNDARY_END_MAX_LEN = _BOUNDARY_STRING_MAX_LEN + 2 + 2
_NIL = wire.NIL
_NEWLINES = re.compile(rb"[\r\n]+")
_BARE_LF = re.compile(rb"(?<!\r)\n")
_EXTRA_CR = re.compile(rb"\r(\r+\n)")
_NOT_FOR_HUMANS = re.compile(rb'["\\\x80-\xff]')
_WS_TO_SPACE = bytes.maketrans(b"\t\r\n", b"   ")

# --------------------------------------------------------------------------- character classes

# rfc822-parser.c: 1 = atext, 2 = alpha/digit/8-bit, 4 = atext but MIME tspecial ("/", "=", "?").
_ATEXT = bytearray(256)
for _c in b"!#$%&'*+-^_`{|}~":
    _ATEXT[_c] = 1
for _c in b"/=?":
    _ATEXT[_c] = 4
for _c in b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz":
    _ATEXT[_c] = 2
for _c in range(128, 256):
    _ATEXT[_c] = 2
_IS_ATEXT = bytes(1 if v else 0 for v in _ATEXT)
_IS_TOKEN = bytes(1 if (v & 3) or i == 0x2E else 0 for i, v in enumerate(_ATEXT))  # + "."
del _c


# --------------------------------------------------------------------------- IMAP strings


def _cstr(data: bytes) -> bytes:
    """Dovecot keeps header values in C strings: a NUL ends them."""
    nul = data.find(b"\0")
    return data if nul < 0 else data[:nul]


def _string(value: bytes) -> bytes:
    """A header value as Dovecot sends it: up to its first NUL, quoted or a literal."""
    return wire.string(_cstr(value))


def _nstring(value: bytes | None) -> bytes:
    return _NIL if value is None else _string(value)


def _nolf(value: bytes) -> bytes:
    """remove_newlines(): each run of CR/LF becomes a space, or nothing before whitespace or the end."""

    def repl(m: re.Match[bytes]) -> bytes:
        return b"" if value[m.end() : m.end() + 1] in (b"", b" ", b"\t") else b" "

    return _NEWLINES.sub(repl, value)


def _nstring_nolf(value: bytes | None) -> bytes:
    """imap_append_nstring_nolf()."""
    return _NIL if value is None else _string(_nolf(_cstr(value)))


def _human(value: bytes) -> bytes:
    """imap_append_string_for_humans(): whitespace (CR, LF, TAB too) folded, quoted only if untouched."""
    value = _cstr(value)
    text = b" ".join(w for w in value.translate(_WS_TO_SPACE).split(b" ") if w)
    if text == value and not _NOT_FOR_HUMANS.search(value):
        return b'"' + value + b'"'
    if not text:
        return b'""'
    return wire.literal(text)


# --------------------------------------------------------------------------- rfc822-parser.c


class _Tok:
    """A port of Dovecot's rfc822_parser_context: a cursor over one header value."""

    __slots__ = ("d", "end", "last_comment", "p")

    def __init__(self, data: bytes, last_comment: bytearray | None = None) -> None:
        self.d = data
        self.p = 0
        self.end = len(data)
        self.last_comment = last_comment

    def cur(self) -> int:
        """The current byte, or -1 at the end."""
        return self.d[self.p] if self.p < self.end else -1

    def skip_comment(self) -> int:
        d, lc = self.d, self.last_comment
        if lc is not None:
            del lc[:]
        level = 1
        self.p += 1
        start = self.p
        while self.p < self.end:
            c = d[self.p]
            if c == 0x28:
                level += 1
            elif c == 0x29:
                level -= 1
                if level == 0:
                    if lc is not None:
                        lc += d[start : self.p]
                    self.p += 1
                    return 1 if self.p < self.end else 0
            elif c == 0x0A:
                if lc is not None:
                    n = self.p
                    if n > start and d[n - 1] == 0x0D:
                        n -= 1
                    lc += d[start:n]
                    start = self.p + 1
            elif c == 0x5C:
                self.p += 1
                if self.p >= self.end:
                    return -1
                if d[self.p] in (0x0D, 0x0A, 0x00):
                    self.p -= 1
                else:
                    if lc is not None:
                        lc += d[start : self.p - 1]
                    start = self.p
            self.p += 1
        return -1

    def skip_lwsp(self) -> int:
        d = self.d
        while self.p < self.end:
            c = d[self.p]
            if c in (0x20, 0x09, 0x0D, 0x0A):
                self.p += 1
                continue
            if c != 0x28:
                break
            if self.skip_comment() < 0:
                return -1
        return 1 if self.p < self.end else 0

    def atom(self, out: bytearray) -> int:
        d = self.d
        if self.p >= self.end or not _IS_ATEXT[d[self.p]]:
            return -1
        start = self.p
        self.p += 1
        while self.p < self.end and _IS_ATEXT[d[self.p]]:
            self.p += 1
        out += d[start : self.p]
        return self.skip_lwsp() if self.p < self.end else 0

    def dot_atom(self, out: bytearray) -> int:
        d = self.d
        if self.p >= self.end or not _IS_ATEXT[d[self.p]]:
            return -1
        start = self.p
        self.p += 1
        while self.p < self.end:
            if _IS_ATEXT[d[self.p]]:
                self.p += 1
                continue
            if start == self.p:
                return -1
            out += d[start : self.p]
            ret = self.skip_lwsp()
            if ret <= 0:
                return ret
            if d[self.p] != 0x2E:
                return 1
            self.p += 1
            out.append(0x2E)
            if self.skip_lwsp() <= 0:
                return -1
            start = self.p
        out += d[start : self.p]
        return 0

    def mime_token(self, out: bytearray) -> int:
        d = self.d
        start = self.p
        while self.p < self.end and _IS_TOKEN[d[self.p]]:
            self.p += 1
        out += d[start : self.p]
        return self.skip_lwsp() if self.p < self.end else 0

    def quoted_string(self, out: bytearray) -> int:
        d = self.d
        self.p += 1
        start = self.p
        while self.p < self.end:
            c = d[self.p]
            if c == 0x22:
                out += d[start : self.p]
                self.p += 1
                return self.skip_lwsp()
            if c == 0x0A:
                n = self.p
                if n > start and d[n - 1] == 0x0D:
                    n -= 1
                out += d[start:n]
                start = self.p + 1
            elif c == 0x5C:
                self.p += 1
                if self.p >= self.end:
                    return -1
                if d[self.p] in (0x0D, 0x0A, 0x00):
                    self.p -= 1
                else:
                    out += d[start : self.p - 1]
                    start = self.p
            self.p += 1
        return -1

    def atom_or_dot(self, out: bytearray) -> int:
        d = self.d
        start = self.p
        while self.p < self.end and (_IS_ATEXT[d[self.p]] or d[self.p] == 0x2E):
            self.p += 1
        out += d[start : self.p]
        return self.skip_lwsp() if self.p < self.end else 0

    def phrase(self, out: bytearray) -> int:
        if self.p >= self.end:
            return 0
        if self.d[self.p] == 0x2E:
            return -1
        while True:
            ret = self.quoted_string(out) if self.d[self.p] == 0x22 else self.atom_or_dot(out)
            if ret <= 0:
                return ret
            c = self.d[self.p]
            if not _IS_ATEXT[c] and c != 0x22 and c != 0x2E:
                break
            out.append(0x20)
        return self.skip_lwsp()

    def domain_literal(self, out: bytearray) -> int:
        d = self.d
        start = self.p
        self.p += 1
        while self.p < self.end:
            c = d[self.p]
            if c == 0x5B:
                return -1
            if c == 0x5D:
                out += d[start : self.p + 1]
                self.p += 1
                return self.skip_lwsp()
            if c == 0x0A:
                n = self.p
                if n > start and d[n - 1] == 0x0D:
                    n -= 1
                out += d[start:n]
                start = self.p + 1
            elif c == 0x5C:
                self.p += 1
                if self.p >= self.end:
                    return -1
                if d[self.p] in (0x0D, 0x0A, 0x00):
                    out += d[start : self.p]
                    start = self.p
                    self.p -= 1
            self.p += 1
        return -1

    def domain(self, out: bytearray) -> int:
        self.p += 1  # "@"
        if self.skip_lwsp() <= 0:
            return -1
        if self.d[self.p] == 0x5B:
            return self.domain_literal(out)
        return self.dot_atom(out)

    def content_type(self, out: bytearray) -> int:
        """rfc822_parse_content_type(): ``type/subtype`` into ``out``; on error only a lone type stays."""
        start = len(out)
        if self.skip_lwsp() <= 0:
            return -1
        if self.mime_token(out) <= 0 or len(out) == start:
            return -1
        if self.d[self.p] != 0x2F:
            del out[start:]
            return -1
        self.p += 1
        if self.skip_lwsp() <= 0:
            del out[start:]
            return -1
        out.append(0x2F)
        sub = len(out)
        ret = self.mime_token(out)
        if ret < 0 or len(out) == sub or (self.p < self.end and self.d[self.p] != 0x3B):
            del out[start:]
            return -1
        return ret

    def content_param(self) -> tuple[int, bytes, bytes]:
        """rfc822_parse_content_param(): (ret, key, value); ret 0 at the end, -1 broken."""
        if self.p >= self.end:
            return 0, b"", b""
        if self.d[self.p] != 0x3B:
            return -1, b"", b""
        self.p += 1
        if self.skip_lwsp() <= 0:
            return -1, b"", b""
        key = bytearray()
        if self.mime_token(key) <= 0:
            return -1, b"", b""
        if self.d[self.p] != 0x3D:
            return -1, b"", b""
        self.p += 1
        value = bytearray()
        ret = self.skip_lwsp()
        if ret <= 0:
            pass
        elif self.d[self.p] == 0x22:
            ret = self.quoted_string(value)
        elif self.d[self.p] == 0x3D:
            while self.p < self.end and self.d[self.p] not in b"; \t\r\n":
                value.append(self.d[self.p])
                self.p += 1
        else:
            ret = self.mime_token(value)
        return (-1 if ret < 0 else 1), bytes(key), bytes(value)


def _rfc2231(tok: _Tok) -> list[tuple[bytes, bytes]]:
    """rfc2231_parse(): parameters; ``key*N[*]`` continuations merged, values left encoded."""
    result: list[tuple[bytes, bytes]] = []
    cont: list[tuple[bytes, int, bool, bytes]] = []
    idx = 0  # not reset per parameter: a bare "key*" reuses the previous index (as Dovecot does)
    while True:
        ret, key, value = tok.content_param()
        if ret == 0:
            break
        if ret < 0:
            if tok.p >= tok.end:
                break
            tok.p += 1
            continue
        star = key.find(b"*")
        if star >= 0:
            p = star
            if p + 1 < len(key):
                idx = 0
                p += 1
                while p < len(key) and 0x30 <= key[p] <= 0x39:
                    idx = (idx * 10 + key[p] - 0x30) & 0xFFFFFFFF
                    p += 1
            extended = p < len(key) and key[p] == 0x2A
            if extended:
                p += 1
            if p >= len(key):
                cont.append((key[:star], idx, extended, value))
                continue
        result.append((key, value))
    if not cont:
        return result
    cont.sort(key=lambda c: (c[0], c[1]))
    i = 0
    while i < len(cont):
        name = cont[i][0].lower()
        j = i
        ok, have_extended, next_idx = True, False, 0
        while j < len(cont) and cont[j][0].lower() == name:
            if cont[j][1] != next_idx:
                ok = False
            have_extended = have_extended or cont[j][2]
            next_idx += 1
            j += 1
        if not ok:
            for k in range(i, j):
                key, idx, ext, value = cont[k]
                result.append((b"%s*%d%s" % (key, idx, b"*" if ext else b""), value))
        else:
            merged = bytearray(b"''" if have_extended and not cont[i][2] else b"")
            for k in range(i, j):
                value = cont[k][3]
                merged += value.replace(b"%", b"%25") if have_extended and not cont[k][2] else value
            result.append((cont[i][0] + (b"*" if have_extended else b""), bytes(merged)))
        i = j
    return result


# --------------------------------------------------------------------------- message-address.c


@dataclass(slots=True)
class _Addr:
    name: bytes | None = None
    route: bytes | None = None
    mailbox: bytes | None = None
    domain: bytes | None = None
    invalid: bool = False


class _AddrParser:
    """message_address_parse() with FILL_MISSING, as Dovecot's envelope uses it."""

    def __init__(self, value: bytes) -> None:
        self.comment = bytearray()
        self.t = _Tok(value, self.comment)
        self.addrs: list[_Addr] = []
        self.a = _Addr()
        self.s = bytearray()

    def add(self) -> None:
        self.addrs.append(self.a)
        self.a = _Addr()

    def local_part(self) -> int:
        t = self.t
        self.s = bytearray()
        ret = t.quoted_string(self.s) if t.cur() == 0x22 else self.nonstrict_dot_atom()
        if ret < 0:
            return -1
        self.a.mailbox = bytes(self.s)
        return ret

    def nonstrict_dot_atom(self) -> int:
        t = self.t
        ret = -1
        while True:
            while t.cur() == 0x2E:
                self.s.append(0x2E)
                t.p += 1
                if t.p == t.end:
                    return 0
                ret = 1
            if t.cur() == 0x40:
                break
            ret = t.atom(self.s)
            if not (ret > 0 and t.cur() == 0x2E):
                break
        return ret

    def domain(self) -> int:
        self.s = bytearray()
        ret = self.t.domain(self.s)
        if ret < 0:
            return -1
        self.a.domain = bytes(self.s)
        return ret

    def domain_list(self) -> int:
        t = self.t
        self.s = bytearray()
        while True:
            if t.p >= t.end:
                return 0
            if t.cur() != 0x40:
                break
            if self.s:
                self.s.append(0x2C)
            self.s.append(0x40)
            ret = t.domain(self.s)
            if ret <= 0:
                return ret
            while t.skip_lwsp() > 0 and t.cur() == 0x2C:
                t.p += 1
        self.a.route = bytes(self.s)
        return 1

    def angle_addr(self) -> int:
        t = self.t
        t.p += 1  # "<"
        if t.skip_lwsp() <= 0:
            return -1
        if t.cur() == 0x40:
            if self.domain_list() > 0 and t.cur() == 0x3A:
                t.p += 1
            else:
                self.a.route = b"INVALID_ROUTE"
                if t.p >= t.end:
                    return -1
            if t.skip_lwsp() <= 0:
                return -1
        if t.cur() != 0x3E:
            if self.local_part() <= 0:
                return -1
            if t.cur() == 0x40 and self.domain() <= 0:
                return -1
        if t.cur() != 0x3E:
            return -1
        t.p += 1
        return t.skip_lwsp()

    def name_addr(self) -> int:
        t = self.t
        self.s = bytearray()
        if t.phrase(self.s) <= 0 or t.cur() != 0x3C:
            return -1
        self.a.name = bytes(self.s) or None
        if self.angle_addr() < 0:
            self.a.domain = b"SYNTAX_ERROR"
            self.a.invalid = True
        return 1 if t.p < t.end else 0

    def addr_spec(self) -> int:
        t = self.t
        del self.comment[:]
        quoted = t.cur() == 0x22
        ret2 = -2
        ret = self.local_part()
        if ret <= 0:
            self.a.invalid = True
        if ret != 0 and t.p < t.end and t.cur() == 0x40:
            ret2 = self.domain()
            if ret2 <= 0:
                ret = ret2
        if self.comment:
            self.a.name = bytes(self.comment)
        elif ret2 == -2:
            self.s.append(0x20)
            before = len(self.s)
            t.phrase(self.s)
            if len(self.s) != before:
                self.a.mailbox = None
                self.a.name = bytes(self.s)
            elif not quoted:
                self.a.domain = b""
            self.a.invalid = True
            ret = -1
        return ret

    def fixed(self) -> None:
        if self.a.mailbox is None:
            self.a.mailbox = b"MISSING_MAILBOX"
            self.a.invalid = True
        if not self.a.domain:
            self.a.domain = b"MISSING_DOMAIN"
            self.a.invalid = True
        self.add()

    def mailbox(self) -> int:
        t = self.t
        start = t.p
        ret = self.name_addr()
        if ret < 0:
            t.p = start
            self.a = _Addr()
            ret = self.addr_spec()
            a = self.a
            if a.invalid and a.name is None and a.mailbox is not None and a.domain is None:
                a.name, a.mailbox = a.mailbox, None
        if ret < 0:
            self.a.invalid = True
        self.fixed()
        return ret

    def group(self) -> int:
        t = self.t
        self.s = bytearray()
        if t.phrase(self.s) <= 0 or t.cur() != 0x3A:
            return -1
        t.p += 1
        ret = t.skip_lwsp()
        if ret <= 0:
            self.a.invalid = True
        self.a.mailbox = bytes(self.s)
        self.add()
        if ret > 0 and t.cur() != 0x3B:
            while True:
                self.mailbox()
                if t.p >= t.end or t.cur() != 0x2C:
                    break
                t.p += 1
                if t.skip_lwsp() <= 0:
                    ret = -1
                    break
        if ret >= 0:
            if t.p >= t.end or t.cur() != 0x3B:
                ret = -1
            else:
                t.p += 1
                ret = t.skip_lwsp()
        if ret < 0:
            self.a.invalid = True
        self.add()
        return 0 if ret == 0 else 1

    def address(self) -> int:
        t = self.t
        start = t.p
        saved = len(self.addrs)
        ret = self.group()
        if ret < 0:
            t.p = start
            del self.addrs[saved:]
            self.a = _Addr()
            ret = self.mailbox()
        return ret

    def parse(self) -> list[_Addr]:
        t = self.t
        if t.skip_lwsp() <= 0:
            return []
        while True:
            if self.address() == 0:
                break
            if t.p >= t.end or t.cur() != 0x2C:
                break
            t.p += 1
            ret = t.skip_lwsp()
            if ret <= 0:
                if ret < 0:
                    self.fixed()
                break
        return self.addrs


def _addresses(values: list[bytes]) -> bytes:
    """The address list of all headers of one kind (Dovecot concatenates repeated headers)."""
    addrs: list[_Addr] = []
    for value in values:
        addrs += _AddrParser(value).parse()
    if not addrs:
        return _NIL
    out = [
        b"(%s %s %s %s)"
        % (
            _NIL if a.name is None else _human(a.name),
            _nstring(a.route),
            _nstring(a.mailbox),
            _nstring(a.domain),
        )
        for a in addrs
    ]
    return b"(" + b"".join(out) + b")"


_QUOTE_NAME = re.compile(rb'[\x00-\x1f"\\()<>@,;:.\[\]]')


def _phrase(name: bytes) -> bytes:
    """str_append_maybe_escape(): a display name, quoted when it needs it (not encoded-words)."""
    if b"=?" in name or not _QUOTE_NAME.search(name):
        return name
    return b'"' + name.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def address_search_text(values: list[bytes]) -> str:
    """An address field as Dovecot's SEARCH FROM/TO/CC/BCC sees it (message_address_write()).

    The field is parsed as for ENVELOPE (comments, groups, FILL_MISSING), each
    address written back as ``local@domain`` or ``name <@route:local@domain>``,
    groups as ``name: ...;``, then encoded-words decoded: so
    ``<user-from (comment)@ (comment) domain.org>`` is found as
    ``user-from@domain.org``.
    """
    addrs: list[_Addr] = []
    for value in values:
        addrs += _AddrParser(value).parse()
    out = bytearray()
    first, in_group = True, False
    for a in addrs:
        if not first:
            out += b", "
        first = False
        if a.domain is None:
            if not in_group:  # a group's start: its name in mailbox
                out += _phrase(a.mailbox or b"") + b": "
                first = True
            else:  # its end
                del out[-2:]
                out += b";"
            in_group = not in_group
        elif not a.name and a.route is None:
            out += (a.mailbox or b"") + b"@" + a.domain
        else:
            if a.name:
                out += _phrase(a.name) + b" "
            out += b"<" + (b"@" + a.route + b":" if a.route is not None else b"")
            out += (a.mailbox or b"") + b"@" + a.domain + b">"
    return decode_rfc2047(decode_8bit(bytes(out)))


# --------------------------------------------------------------------------- headers and parts

_ENVELOPE_FIELDS = {
    b"date": 0,
    b"subject": 1,
    b"from": 2,
    b"sender": 3,
    b"reply-to": 4,
    b"to": 5,
    b"cc": 6,
    b"bcc": 7,
    b"in-reply-to": 8,
    b"message-id": 9,
}


@dataclass(slots=True)
class _Header:
    """One header field: name, full value (folds kept), raw span in the message."""

    name: bytes
    value: bytes
    start: int
    end: int


@dataclass(eq=False, slots=True)
class _Part:
    """A MIME part: offsets, sizes, line counts and what its headers said."""

    parent: _Part | None
    pos: int
    hdr_size: int = 0
    hdr_lines: int = 0
    body_size: int = 0
    body_lines: int = 0
    eoh: bool = False
    is_mime: bool = False
    multipart: bool = False
    rfc822: bool = False
    digest: bool = False
    headers: list[_Header] = field(default_factory=list)
    children: list[_Part] = field(default_factory=list)

    @property
    def body_pos(self) -> int:
        return self.pos + self.hdr_size


@dataclass(slots=True)
class _Boundary:
    part: _Part
    text: bytes


class _Parser:
    """message-parser.c over a whole buffer (see the module docstring)."""

    def __init__(self, data: bytes) -> None:
        self.d = data
        self.n = len(data)
        self.boundaries: list[_Boundary] = []  # newest last
        self.nested = 0
        self.total = 1  # the root counts

    # -- helpers

    def _find_boundary(self, pos: int) -> tuple[_Boundary, bool] | None:
        """boundary_line_find() for the line at ``pos``: (boundary, closing) or None."""
        d = self.d
        if not self.boundaries or pos + 2 > self.n or d[pos] != 0x2D or d[pos + 1] != 0x2D:
            return None
        if self.total >= MAX_TOTAL_PARTS:  # no more parts: stop looking for boundaries
            return None
        pos += 2
        lf = d.find(b"\n", pos)
        if lf >= 0:
            find_size = lf - pos
            if find_size > 0 and d[pos + find_size - 1] == 0x0D:
                find_size -= 1
            if find_size > 2 and d[pos + find_size - 1] == 0x2D and d[pos + find_size - 2] == 0x2D:
                find_size -= 2
        else:
            find_size = min(self.n - pos, _BOUNDARY_END_MAX_LEN)
        line = d[pos : pos + find_size]
        best: _Boundary | None = None
        for b in reversed(self.boundaries):
            blen = len(b.text)
            if blen <= find_size and line.startswith(b.text) and (best is None or len(best.text) < blen):
                best = b
                if blen == find_size:
                    break
        if best is None:
            return None
        end = pos + len(best.text)
        return best, d[end : end + 2] == b"--"

    def _scanner(self) -> re.Pattern[bytes]:
        """A regex finding lines that start with ``--`` and one of the open boundaries."""
        alternatives = b"|".join(re.escape(b.text) for b in self.boundaries)
        return re.compile(b"\n--(?:" + alternatives + b")")

    def _add_body(self, part: _Part, start: int, end: int) -> None:
        if end > start:
            part.body_size += end - start
            part.body_lines += self.d.count(b"\n", start, end)

    def _append(self, parent: _Part) -> _Part:
        # Dovecot's physical_pos: normally where we are, but for a message/rfc822 part
        # whose header's final newline went to the boundary, the child starts on it.
        part = _Part(parent=parent, pos=parent.pos + parent.hdr_size + parent.body_size)
        parent.children.append(part)
        self.nested += 1
        self.total += 1
        return part

    def _finish(self, part: _Part) -> _Part:
        parent = part.parent
        if parent is None:  # the root is never finished
            return part
        parent.body_size += part.body_size + part.hdr_size
        parent.body_lines += part.body_lines + part.hdr_lines
        self.nested -= 1
        return parent

    def _too_deep(self) -> bool:
        return self.nested + 1 >= MAX_NESTED_PARTS

    # -- headers

    def _headers(self, part: _Part, pos: int) -> tuple[int, bool]:
        """Parse a part's header block from ``pos``: (body start, multipart boundary pushed)."""
        d, n = self.d, self.n
        seen_ct = False
        last_boundary: bytes | None = None
        multipart = False
        prev_nl = 0
        while True:
            if (
                last_boundary is not None
                and part.is_mime
                and (d[pos : pos + 1] == b"\n" or d[pos : pos + 2] == b"\r\n")
            ):
                if not self._too_deep():
                    self.boundaries.append(_Boundary(part, last_boundary))
                    multipart = True
                else:
                    part.multipart = False
                last_boundary = None
            if pos >= n:
                break
            found = self._find_boundary(pos)
            if found is not None and found[0].part is not part:
                # a boundary line ends the header early; even right after the empty
                # line, the newline before it belongs to the boundary, not the header
                if prev_nl and part.parent is not None:
                    part.hdr_size -= prev_nl
                    part.hdr_lines -= 1
                    part.parent.body_size += prev_nl
                    part.parent.body_lines += 1
                    part.eoh = False
                break
            if part.eoh:
                break
            # one header field, with its continuation lines
            lf = d.find(b"\n", pos)
            if lf < 0:
                line_end = content_end = n
            else:
                line_end = lf + 1
                content_end = lf - 1 if lf > pos and d[lf - 1] == 0x0D else lf
                if content_end == pos:  # empty line: end of headers
                    part.hdr_size += line_end - pos
                    part.hdr_lines += 1
                    part.eoh = True
                    prev_nl = line_end - pos
                    pos = line_end
                    continue
                part.hdr_lines += 1
            start = pos
            colon = d.find(b":", pos, content_end)
            first_end = content_end
            folds: list[tuple[int, int]] = []  # (start, content end) of continuation lines
            pos = line_end
            while lf >= 0 and pos < n and (d[pos] == 0x20 or d[pos] == 0x09):
                lf = d.find(b"\n", pos)
                if lf < 0:
                    line_end = content_end = n
                else:
                    line_end = lf + 1
                    content_end = lf - 1 if lf > pos and d[lf - 1] == 0x0D else lf
                    part.hdr_lines += 1
                folds.append((pos, content_end))
                pos = line_end
            part.hdr_size += pos - start
            prev_nl = line_end - content_end
            if colon < 0:  # no colon: a field without a name, only ever copied verbatim
                name, value = b"", b""
            else:
                name = d[start:colon].rstrip(b" \t")
                v = colon + 1
                while v < first_end and (d[v] == 0x20 or d[v] == 0x09):
                    v += 1
                if v == first_end and first_end > colon + 1:  # all LWSP: skip only one
                    v = colon + 2
                value = d[v:first_end]
                for f_start, f_end in folds:  # DROP_CR: folds joined with a bare LF ...
                    # ... except before a fold line of a single blank (observed, not explained)
                    value += (b"" if f_end - f_start == 1 else b"\n") + d[f_start:f_end]
            hdr = _Header(name, value, start, pos)
            part.headers.append(hdr)
            lname = name.lower()
            if lname == b"mime-version":
                part.is_mime = True
            elif lname == b"content-type":
                part.is_mime = True
                if not seen_ct:
                    seen_ct = True
                    last_boundary = self._content_type(part, value, last_boundary)
        # end of headers
        if not part.is_mime:
            part.multipart = part.rfc822 = part.digest = False
        if (not seen_ct or not part.is_mime) and part.parent is not None and part.parent.digest:
            part.rfc822 = True  # (elsewhere the default is text/plain)
        return pos, multipart

    def _content_type(self, part: _Part, value: bytes, last_boundary: bytes | None) -> bytes | None:
        tok = _Tok(value)
        tok.skip_lwsp()
        ctype = bytearray()
        ret = tok.content_type(ctype)
        lower = bytes(ctype).lower()
        if lower == b"message/rfc822":
            part.rfc822 = True
        elif lower[:10] == b"multipart/":
            part.multipart = True
            if lower[10:] == b"digest":
                part.digest = True
        if ret < 0 or not part.multipart or last_boundary is not None:
            return last_boundary
        for key, val in _rfc2231(tok):
            if key.lower() == b"boundary":
                return val[:_BOUNDARY_STRING_MAX_LEN]
        return None

    # -- bodies

    def parse(self) -> _Part:
        root = _Part(parent=None, pos=0)
        part = root
        pos, opened = self._headers(part, 0)
        state = self._after_headers(part, opened)
        while True:
            if state == "rfc822":
                part = self._append(part)
                pos, opened = self._headers(part, pos)
                state = self._after_headers(part, opened)
                continue
            if state == "eof":
                self._add_body(part, pos, self.n)
                break
            # to boundary: a boundary line at pos (always a line start) or after any LF
            if self.total >= MAX_TOTAL_PARTS:  # no boundary can be found any more
                self._add_body(part, pos, self.n)
                break
            line = pos
            found = self._find_boundary(line)
            scan = self._scanner()
            while found is None:
                m = scan.search(self.d, line)
                if m is None:
                    break
                line = m.start() + 1
                found = self._find_boundary(line)
            if found is None:
                self._add_body(part, pos, self.n)
                break
            boundary, closing = found
            # the [CR]LF before the boundary line belongs to the multipart
            cut = line
            if line > pos:
                cut = line - 1
                if cut > pos and self.d[cut - 1] == 0x0D:
                    cut -= 1
            self._add_body(part, pos, cut)
            while part is not boundary.part:
                part = self._finish(part)
            idx = self.boundaries.index(boundary)
            del self.boundaries[idx + 1 :]
            if closing:
                self.boundaries.pop()
            lf = self.d.find(b"\n", line)
            end = self.n if lf < 0 else lf + 1
            self._add_body(part, cut, end)
            pos = end
            if lf < 0:
                break
            if not self.boundaries or self.boundaries[-1].part is not part:
                state = "boundary" if self.boundaries else "eof"
                continue
            part = self._append(part)
            part.is_mime = True
            pos, opened = self._headers(part, pos)
            state = self._after_headers(part, opened)
        while part.parent is not None:
            part = self._finish(part)
        return root

    def _after_headers(self, part: _Part, opened: bool) -> str:
        if opened:
            return "boundary"
        if part.rfc822:
            if not self._too_deep() and self.total < MAX_TOTAL_PARTS:
                return "rfc822"
            part.rfc822 = False
        return "boundary" if self.boundaries else "eof"


# --------------------------------------------------------------------------- part data


@dataclass(slots=True)
class _Data:
    """message_part_data: what the Content-* headers of a part say."""

    ctype: bytes | None = None
    subtype: bytes = b""
    params: list[tuple[bytes, bytes]] = field(default_factory=list)
    cid: bytes | None = None
    description: bytes | None = None
    encoding: bytes | None = None
    md5: bytes | None = None
    disposition: bytes | None = None
    disp_params: list[tuple[bytes, bytes]] = field(default_factory=list)
    language: list[bytes] | None = None
    location: bytes | None = None


def _part_data(part: _Part) -> _Data:
    data = _Data()
    if not part.is_mime:
        return data
    for hdr in part.headers:
        name = hdr.name.lower()
        if not name.startswith(b"content-"):
            continue
        sub, value = name[8:], hdr.value
        if sub == b"id" and data.cid is None:
            data.cid = _cstr(value)
        elif sub == b"md5" and data.md5 is None:
            data.md5 = _cstr(value)
        elif sub == b"type" and data.ctype is None:
            tok = _Tok(value)
            tok.skip_lwsp()
            ctype = bytearray()
            ret = tok.content_type(ctype)
            main, _slash, data.subtype = bytes(ctype).partition(b"/")
            data.ctype = main
            if ret >= 0:
                data.params = _rfc2231(tok)
        elif sub == b"transfer-encoding" and data.encoding is None:
            tok = _Tok(value)
            tok.skip_lwsp()
            enc = bytearray()
            if tok.mime_token(enc) >= 0 and tok.skip_lwsp() == 0 and enc:
                data.encoding = bytes(enc)
        elif sub == b"language" and data.language is None:
            tok = _Tok(value)
            langs: list[bytes] = []
            tok.skip_lwsp()
            lang = bytearray()
            while tok.atom(lang) >= 0:
                langs.append(bytes(lang))
                lang = bytearray()
                if tok.p >= tok.end or tok.d[tok.p] != 0x2C:
                    break
                tok.p += 1
                tok.skip_lwsp()
            if langs:
                data.language = langs
        elif sub == b"location" and data.location is None:
            data.location = _cstr(value)
        elif sub == b"description" and data.description is None:
            data.description = _cstr(value)
        elif sub == b"disposition" and not data.disp_params:
            tok = _Tok(value)
            tok.skip_lwsp()
            disp = bytearray()
            if tok.mime_token(disp) >= 0:
                data.disposition = bytes(disp)
                data.disp_params = _rfc2231(tok)
    return data


def _envelope(headers: list[_Header]) -> bytes:
    """The ENVELOPE fields (without the parentheses) of a header block."""
    strings: dict[int, bytes] = {}
    addresses: dict[int, list[bytes]] = {2: [], 3: [], 4: [], 5: [], 6: [], 7: []}
    for hdr in headers:
        idx = _ENVELOPE_FIELDS.get(hdr.name.lower())
        if idx in addresses:
            addresses[idx].append(hdr.value)
        elif idx is not None:
            strings[idx] = hdr.value  # the last one wins
    frm = _addresses(addresses[2])
    sender, reply_to = _addresses(addresses[3]), _addresses(addresses[4])
    subject = strings.get(1)
    return b" ".join(
        (
            _nstring_nolf(strings.get(0)),
            _NIL if subject is None else _human(subject),
            frm,
            frm if sender == _NIL else sender,
            frm if reply_to == _NIL else reply_to,
            _addresses(addresses[5]),
            _addresses(addresses[6]),
            _addresses(addresses[7]),
            _nstring_nolf(strings.get(8)),
            _nstring_nolf(strings.get(9)),
        )
    )


# --------------------------------------------------------------------------- BODYSTRUCTURE

_EMPTY_BODY = b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0)'
_EMPTY_BODYSTRUCTURE = b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0 NIL NIL NIL NIL)'


def _params(params: list[tuple[bytes, bytes]], default_charset: bool) -> bytes:
    if not params and not default_charset:
        return _NIL
    out = [_string(k) + b" " + _string(v) for k, v in params]
    if default_charset and not any(k.lower() == b"charset" for k, _v in params):
        out.append(b'"charset" "us-ascii"')
    return b"(" + b" ".join(out) + b")"


def _extension(data: _Data) -> bytes:
    if data.disposition is None:
        disp = _NIL
    else:
        disp = b"(%s %s)" % (_string(data.disposition), _params(data.disp_params, False))
    lang = _NIL if data.language is None else b"(" + b" ".join(_string(x) for x in data.language) + b")"
    return b"%s %s %s" % (disp, lang, _nstring_nolf(data.location))


def _truncated(part: _Part, data: _Data) -> bool:
    """part_is_truncated(): a multipart or message/rfc822 the parser did not descend into."""
    if data.ctype is None:
        return part.parent is not None and part.parent.digest
    ctype = data.ctype.lower()
    return ctype == b"multipart" or (ctype == b"message" and data.subtype.lower() == b"rfc822")


def _write(part: _Part, extended: bool, out: list[bytes]) -> None:
    data = _part_data(part)
    if part.multipart:
        if part.children:
            for child in part.children:
                out.append(b"(")
                _write(child, extended, out)
                out.append(b")")
        else:
            out.append(_EMPTY_BODYSTRUCTURE if extended else _EMPTY_BODY)
        out.append(b" " + _string(data.subtype))
        if extended:
            out.append(b" %s %s" % (_params(data.params, False), _extension(data)))
        return
    if part.rfc822:
        out.append(b'"message" "rfc822"')
        text = False
    elif _truncated(part, data):
        out.append(b'"application" "octet-stream"')
        text = False
    elif data.ctype is None:
        out.append(b'"text" "plain"')
        text = True
    else:
        text = data.ctype.lower() == b"text"
        out.append(_string(data.ctype) + b" " + _string(data.subtype))
    out.append(
        b" %s %s %s %s %d"
        % (
            _params(data.params, text),
            _nstring_nolf(data.cid),
            _nstring_nolf(data.description),
            b'"7bit"' if data.encoding is None else _string(data.encoding),
            part.body_size,
        )
    )
    if text:
        out.append(b" %d" % part.body_lines)
    elif part.rfc822 and part.children:
        child = part.children[0]
        out.append(b" (" + _envelope(child.headers) + b") (")
        _write(child, extended, out)
        out.append(b") %d" % part.body_lines)
    if extended:
        out.append(b" %s %s" % (_nstring_nolf(data.md5), _extension(data)))


# --------------------------------------------------------------------------- public API


def _normalise(raw: bytes) -> bytes:
    """What Dovecot serves: NULs dropped (APPEND does that), bare LF turned into CRLF."""
    if b"\0" in raw:
        raw = raw.replace(b"\0", b"")
    if raw.count(b"\n") == raw.count(b"\r\n"):
        return raw
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def stored_form(raw: bytes) -> bytes:
    """The message as Dovecot stores and serves it after APPEND (its ``BODY[]``).

    NULs are dropped, and each line end loses one CR (stored as LF) and is
    served as CRLF: bare LF and CRLF become CRLF, CR CR LF becomes CRLF,
    CR CR CR LF becomes CR CR LF; a CR at the very end is dropped too. The
    other functions take either form: they only differ in such CR runs.
    """
    data = bytes(raw).replace(b"\0", b"")
    if data.endswith(b"\r"):
        data = data[:-1]
    if b"\r\r" not in data and data.count(b"\n") == data.count(b"\r\n"):
        return data  # CRLF throughout, no CR runs: what nearly every client APPENDs (2 us, not 50)
    return _BARE_LF.sub(b"\r\n", _EXTRA_CR.sub(rb"\1", data))


def _parse(raw: bytes) -> tuple[bytes, _Part]:
    data = _normalise(bytes(raw))
    return data, _Parser(data).parse()


def envelope(raw: bytes) -> bytes:
    """The ENVELOPE value, parenthesised, as Dovecot sends it."""
    data = _normalise(bytes(raw))
    parser = _Parser(data)
    root = _Part(parent=None, pos=0)
    parser._headers(root, 0)
    return b"(" + _envelope(root.headers) + b")"


def bodystructure(raw: bytes, *, extensible: bool = True) -> bytes:
    """The BODYSTRUCTURE value (``extensible``) or the BODY value, parenthesised."""
    _data, root = _parse(raw)
    return _structure(root, extensible)


def structures(raw: bytes) -> tuple[bytes, bytes, bytes]:
    """:func:`envelope`, :func:`bodystructure` and its BODY form from one parse (what a stored
    message keeps: parsing three times was a third of storing a 5 KB message)."""
    _data, root = _parse(raw)
    return b"(" + _envelope(root.headers) + b")", _structure(root, True), _structure(root, False)


def _structure(root: _Part, extensible: bool) -> bytes:
    out = [b"("]
    _write(root, extensible, out)
    out.append(b")")
    return b"".join(out)


def _find(root: _Part, path: tuple[int, ...]) -> _Part | None:
    """imap_msgpart_find(): the part a section number names, or None."""
    part: _Part | None = root
    for i, num in enumerate(path):
        if part is None:
            return None
        more = i + 1 < len(path)
        if part.multipart:
            part = part.children[num - 1] if 0 < num <= len(part.children) else None
        elif num != 1 or (more and not part.rfc822):
            part = None
        if part is not None and part.rfc822 and more:
            part = part.children[0] if part.children else None
    return part


def _scan_fields(data: bytes, pos: int) -> tuple[list[tuple[bytes, int, int]], bool]:
    """A header block read from ``pos`` up to its empty line, boundaries ignored.

    Returns the fields as (name, start, end) and whether the empty line was found.
    """
    n = len(data)
    out: list[tuple[bytes, int, int]] = []
    while pos < n:
        lf = data.find(b"\n", pos)
        if lf < 0:
            end = n
        elif lf == pos or (lf == pos + 1 and data[pos] == 0x0D):
            return out, True
        else:
            end = lf + 1
        start = pos
        colon = data.find(b":", pos, end)
        pos = end
        while lf >= 0 and pos < n and (data[pos] == 0x20 or data[pos] == 0x09):
            lf = data.find(b"\n", pos)
            pos = n if lf < 0 else lf + 1
        out.append((data[start:colon].rstrip(b" \t") if colon >= 0 else b"", start, pos))
    return out, False


def _header_fields(data: bytes, part: _Part, fields: tuple[str, ...], exclude: bool) -> bytes:
    """HEADER.FIELDS[.NOT]: the (non-)matching fields, then the empty line.

    For the message itself Dovecot answers HEADER.FIELDS from its header cache:
    the matching fields and always an empty line. Otherwise its header filter
    reads from the part's start up to the empty line, whatever boundaries
    there are, and copies the empty line only if there is one.
    """
    names = {f.upper().encode("ascii", "replace") for f in fields}
    if part.parent is None and not exclude:
        return b"".join(data[h.start : h.end] for h in part.headers if h.name.upper() in names) + b"\r\n"
    found, eoh = _scan_fields(data, part.pos)
    out = [data[start:end] for name, start, end in found if (name.upper() in names) != exclude]
    return b"".join(out) + (b"\r\n" if eoh else b"")


def section(raw: bytes, part: tuple[int, ...], text: str | None, fields: tuple[str, ...] = ()) -> bytes:
    """The bytes of ``BODY[<part>.<text>]``; ``b""`` for a part that does not exist."""
    if not part and text is None:  # BODY[]: the whole message, no structure needed
        return _normalise(bytes(raw))
    data, root = _parse(raw)
    target = _find(root, part) if part else root
    if target is None:
        return b""
    if text in ("HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT") and part:
        if not target.rfc822 or not target.children:
            return b""
        target = target.children[0]
    if text in ("HEADER", "MIME"):
        return data[target.pos : target.pos + target.hdr_size]
    if text == "TEXT" or (text is None and part):
        return data[target.body_pos : target.body_pos + target.body_size]
    if text == "HEADER.FIELDS":
        return _header_fields(data, target, fields, exclude=False)
    if text == "HEADER.FIELDS.NOT":
        return _header_fields(data, target, fields, exclude=True)
    return data


class UnknownEncoding(ValueError):
    """BINARY of a part whose Content-Transfer-Encoding mailgate cannot decode (``[UNKNOWN-CTE]``)."""


class InvalidEncoding(ValueError):
    """BINARY of a base64 part holding characters outside base64 (``[PARSE]``, as Dovecot answers)."""


_BASE64_STRICT = re.compile(rb"[A-Za-z0-9+/\s]*(?:=[\s=]*)?")


def _encoding(part: _Part) -> bytes | None:
    """A part's Content-Transfer-Encoding token, lower case; None when it has none."""
    cte = _last(part, b"content-transfer-encoding")
    if cte is None:
        return None
    tok, out = _Tok(cte), bytearray()
    tok.skip_lwsp()
    tok.mime_token(out)
    return bytes(out).lower()


@dataclass(slots=True)
class Binary:
    """A ``BINARY[...]`` answer: the bytes, and whether any of them were decoded (then a literal8)."""

    data: bytes
    decoded: bool


def _decoded_leaf(data: bytes, part: _Part) -> bytes | None:
    """A leaf's body with base64 or quoted-printable undone; None when it needs no decoding."""
    body = data[part.body_pos : part.body_pos + part.body_size]
    encoding = _encoding(part)
    if encoding == b"base64":
        if _BASE64_STRICT.fullmatch(body) is None:
            raise InvalidEncoding("invalid data in a base64 part")
        return _base64(body)
    if encoding == b"quoted-printable":
        return binascii.a2b_qp(body)
    if encoding in (None, b"7bit", b"8bit", b"binary"):
        return None
    raise UnknownEncoding(encoding.decode("ascii", "replace"))


def _binary_whole(data: bytes, part: _Part, out: list[bytes]) -> bool:
    """The part, header and body, with every leaf below it decoded; True if any was.

    As Dovecot converts a message for ``BINARY[]``: a decoded leaf loses its
    Content-Transfer-Encoding field and gets ``Content-Transfer-Encoding:
    binary`` as the last field of its header.
    """
    end = part.body_pos + part.body_size
    if part.multipart or part.rfc822:
        out.append(data[part.pos : part.body_pos])
        pos, decoded = part.body_pos, False
        for child in part.children:
            out.append(data[pos : child.pos])
            decoded |= _binary_whole(data, child, out)
            pos = child.body_pos + child.body_size
        out.append(data[pos:end])
        return decoded
    body = _decoded_leaf(data, part)
    if body is None:
        out.append(data[part.pos : end])
        return False
    kept = [data[h.start : h.end] for h in part.headers if h.name.lower() != b"content-transfer-encoding"]
    out.append(b"".join(kept) + b"Content-Transfer-Encoding: binary\r\n\r\n" + body)
    return True


def binary(raw: bytes, part: tuple[int, ...]) -> Binary:
    """``BINARY[<part>]`` (RFC 3516): the part's body with its transfer encoding undone.

    ``BINARY[]`` (and a multipart or message part) is converted whole, each
    leaf decoded as :func:`_binary_whole` says; a part that does not exist is
    empty (as Dovecot answers). :class:`UnknownEncoding` for an encoding other
    than 7bit, 8bit, binary, base64 and quoted-printable;
    :class:`InvalidEncoding` for base64 holding other characters than its
    alphabet, white space and final padding.
    """
    data, root = _parse(raw)
    target = _find(root, part) if part else root
    if target is None:
        return Binary(b"", False)
    if not part or target.multipart or target.rfc822:
        out: list[bytes] = []
        decoded = _binary_whole(data, target, out)
        whole = b"".join(out)
        return Binary(whole if not part else whole[target.body_pos - target.pos :], decoded)
    body = _decoded_leaf(data, target)
    if body is None:
        return Binary(data[target.body_pos : target.body_pos + target.body_size], False)
    return Binary(body, True)


# --------------------------------------------------------------------------- SEARCH text

_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/]")


def _last(part: _Part, name: bytes) -> bytes | None:
    values = [h.value for h in part.headers if h.name.lower() == name]
    return values[-1] if values else None


def _leaf_text(data: bytes, part: _Part) -> str | None:
    """A leaf part's body as text (see the module docstring), None if it is not searched."""
    ctype = _last(part, b"content-type")
    if ctype is not None:
        tok, out = _Tok(ctype), bytearray()
        tok.skip_lwsp()
        tok.content_type(out)
        if not out.lower().startswith((b"text/", b"message/")):
            return None
    body = data[part.body_pos : part.body_pos + part.body_size]
    encoding = _encoding(part)
    if encoding is not None:
        if encoding == b"base64":
            body = _base64(body)
        elif encoding == b"quoted-printable":
            body = binascii.a2b_qp(body)
        elif encoding not in (b"7bit", b"8bit", b"binary"):
            return None
    codec = None
    first = next((h.value for h in part.headers if h.name.lower() == b"content-type"), None)
    if first is not None:
        tok, out = _Tok(first), bytearray()
        tok.skip_lwsp()
        if tok.content_type(out) >= 0:
            for key, value in _rfc2231(tok):
                if key.lower() == b"charset":
                    codec = codec_name(value.decode("ascii", "replace"))
                    break
    try:
        return body.decode(codec or "utf-8", "replace")
    except (LookupError, ValueError):  # a codec that cannot decode bytes: as Dovecot, take UTF-8
        return body.decode("utf-8", "replace")


def _base64(data: bytes) -> bytes:
    """Base64 decoded up to the padding, other bytes skipped (never raises)."""
    chars = _NOT_BASE64.sub(b"", data.split(b"=", 1)[0])
    chars = chars[: len(chars) - (len(chars) % 4 == 1)]
    return binascii.a2b_base64(chars + b"=" * (-len(chars) % 4))


def search_texts(raw: bytes) -> tuple[str, str]:
    """(the body text BODY searches, the header blocks of the MIME parts and embedded messages)."""
    data, root = _parse(raw)
    bodies: list[str] = []
    headers: list[str] = []
    stack = [root]
    while stack:
        part = stack.pop()
        if part is not root:
            part_headers = parse_headers(data[part.pos : part.body_pos])
            headers.append(
                "\n".join(
                    f"{n}: {' '.join(part_headers.get_all(n))}"
                    for n in dict.fromkeys(name for name, _ in part_headers.fields)
                )
            )
        if part.children or part.multipart:  # its own text is a preamble/epilogue: never searched
            stack.extend(reversed(part.children))
            continue
        text = _leaf_text(data, part)
        if text is not None:
            bodies.append(text)
    return "\n".join(bodies), "\n".join(headers)

"""Agent footers: the submitting agent's footer added to a message's body text, MIME-correctly (pure).

Theory of operation
-------------------
:func:`add_footer` takes a submitted message and the agent's footer and
returns the message with the footer in its body text, and every other byte
as it was. Nothing is re-serialised: a byte-level walk finds each MIME
entity's header block and body (a multipart body split at its boundary
delimiters, RFC 2046), and only the bodies of the parts that take the footer
are replaced in place; their ``Content-Type`` charset and
``Content-Transfer-Encoding`` fields change only when the footer needs it.

Which parts: the body text a reader sees. A ``text/plain`` or ``text/html``
entity that is not an attachment (``Content-Disposition: attachment`` or a
file name); in ``multipart/alternative`` each alternative; in
``multipart/related`` its root; in any other multipart (``mixed``) the last
part that is body text rather than an attachment: in Thunderbird's reply
with a PDF, the alternative. Never anything else: no other text types, no
``message/*`` content (forwarded mail), no ``multipart/signed`` or
``encrypted`` (the footer would break the signature), no ``digest``.

How: ``text/plain`` gets a ``-- `` signature separator line and the
footer's lines at its end (RFC 3676; space-stuffed under ``format=flowed``);
``text/html`` gets them HTML-escaped, with ``<br>`` line breaks, in a
``<div class="mailgate-footer">`` before the last ``</body>`` (at the end if
there is none). The footer is encoded in the part's charset and transfer
encoding and spliced into the encoded body as it stands: 7bit, 8bit and
quoted-printable bodies keep every original byte, base64 bodies are
re-encoded whole. When the part's charset cannot carry the footer (or 7bit
cannot carry its bytes, or the charset is not ASCII-transparent) the part is
re-encoded as UTF-8, quoted-printable (base64 if it was). A part whose
charset or transfer encoding is unknown, or whose text does not decode, is
left alone.

Never twice: a part that already has the footer is left alone: its lines
as whole lines of the text, outside ``<blockquote>`` in HTML (so a customer's
quote of an earlier footer does not count, ``> `` lines never match), or
the very block this module inserts. The client's own copy of the footer
and a second submission of the same message both stay as they are, and
``add_footer`` is idempotent.

Bounds: the caller passes only messages within the tenant's size limit;
every scan is linear in the message's size, nesting is followed
:data:`MAX_DEPTH` levels deep, and being CPU work it runs in a thread.
"""

from __future__ import annotations

import binascii
import codecs
import email.message
import email.parser
import email.policy
import html
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import AnyStr

MAX_DEPTH = 20

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_LINE = re.compile(r"\r\n|\r|\n")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_BODY_END = re.compile(r"</body\s*>", re.IGNORECASE)
_BODY_END_BYTES = re.compile(rb"</body\s*>", re.IGNORECASE)
# A tag (not crossing another "<", so scanning stays linear) or the start of a comment.
_TAG = re.compile(r"<!--|<(/?)([A-Za-z][A-Za-z0-9]*)[^<>]*>")
_BREAKS = frozenset(
    {"br", "p", "div", "tr", "li", "ul", "ol", "table", "pre", "hr", "dt", "dd", "address", "section"}
    | {"article", "header", "footer", "h1", "h2", "h3", "h4", "h5", "h6"}
)
_HIDDEN = frozenset({"script", "style", "title"})
_TEXT = frozenset({"text/plain", "text/html"})
_OPAQUE = frozenset({"multipart/signed", "multipart/encrypted", "multipart/digest"})
_CTES = frozenset({"7bit", "8bit", "binary", "quoted-printable", "base64"})
# Charsets in which an ASCII byte may stand for something else (shift states, escapes).
_STATEFUL = ("iso2022", "hz", "utf_7")
_ASCII_PROBE = "".join(chr(c) for c in range(32, 127)) + "\r\n\t"
_MAX_LINE = 998  # octets, RFC 5322, for bytes that go out as they are (7bit, 8bit)


@dataclass(frozen=True, slots=True)
class _Footer:
    lines: tuple[str, ...]  # as written: control characters and trailing blanks removed
    key: tuple[str, ...]  # what recognises it: the non-empty lines, whitespace collapsed

    def plain(self, nl: str, flowed: bool) -> str:
        lines = self.lines
        if flowed:  # RFC 3676 section 4.4: space-stuffing
            lines = tuple(" " + x if x.startswith((" ", ">", "From ")) else x for x in lines)
        return nl.join(("-- ", *lines)) + nl

    def html(self, nl: str) -> str:
        body = ("<br>" + nl).join(html.escape(x) for x in self.lines)
        return f'<div class="mailgate-footer">-- <br>{nl}{body}</div>'


@dataclass(frozen=True, slots=True)
class _Entity:
    head: bytes  # the header fields and the blank line after them
    body: bytes
    fields_end: int  # where a new field goes in ``head``
    fields: email.message.Message

    @classmethod
    def parse(cls, raw: bytes) -> _Entity | None:
        """Split an entity at its blank line; None when it has none (a header without a body)."""
        if raw.startswith((b"\r\n", b"\n")):
            n = 2 if raw.startswith(b"\r") else 1
            return cls(raw[:n], raw[n:], 0, email.message.Message())
        m = _HEADER_END.search(raw)
        if m is None:
            return None
        head = raw[: m.end()]
        parser = email.parser.BytesHeaderParser(policy=email.policy.compat32)
        return cls(
            head, raw[m.end() :], m.start() + (2 if raw[m.start()] == 13 else 1), parser.parsebytes(head)
        )

    @property
    def type(self) -> str:
        return self.fields.get_content_type()

    def is_body_text(self) -> bool:
        """Body text (or a multipart holding it), not an attachment: a candidate for the footer."""
        f = self.fields
        if f.get_content_disposition() == "attachment" or f.get_filename() or f.get_param("name"):
            return False
        return self.type in _TEXT or (f.get_content_maintype() == "multipart" and self.type not in _OPAQUE)


def add_footer(message: bytes, footer: str) -> bytes:
    """``message`` with ``footer`` in its body text (see the module's docstring); idempotent."""
    normalised = _normalise(footer)
    if not normalised.key:
        return message
    nl = b"\n" if b"\n" in message and b"\r\n" not in message else b"\r\n"
    return _entity(message, normalised, nl, 0) or message


def _normalise(footer: str) -> _Footer:
    text = footer.encode("utf-8", "replace").decode("utf-8")  # no lone surrogates
    lines = [_CONTROL.sub("", line).rstrip() for line in _LINE.split(text)]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    return _Footer(tuple(lines), _key(lines))


def _key(lines: Sequence[str]) -> tuple[str, ...]:
    return tuple(k for k in (" ".join(x.split()) for x in lines) if k)


def _entity(raw: bytes, footer: _Footer, nl: bytes, depth: int) -> bytes | None:
    """The entity with the footer added, or None when it takes none."""
    entity = _Entity.parse(raw)
    if entity is None or depth > MAX_DEPTH or not entity.is_body_text():
        return None
    if entity.type in _TEXT:
        return _text(entity, footer, nl, top=depth == 0)
    body = entity.body
    spans = _parts(body, entity.fields.get_boundary())
    changed = False
    for start, end in reversed(_chosen(entity, [body[s:e] for s, e in spans], spans)):
        new = _entity(body[start:end], footer, nl, depth + 1)
        if new is not None:
            body, changed = body[:start] + new + body[end:], True
    return entity.head + body if changed else None


def _parts(body: bytes, boundary: str | None) -> list[tuple[int, int]]:
    """Where each body part of a multipart body starts and ends (its delimiters' line breaks excluded)."""
    if not boundary:
        return []
    try:
        marker = boundary.encode("ascii", "surrogateescape")
    except UnicodeEncodeError:
        return []
    delimiter = re.compile(rb"(?:\A|\r?\n)--" + re.escape(marker) + rb"(--)?[ \t]*(?=\r?\n|\Z)")
    spans: list[tuple[int, int]] = []
    start: int | None = None
    for m in delimiter.finditer(body):
        if start is not None and m.start() > start:
            spans.append((start, m.start()))
        if m[1]:  # the close delimiter
            return spans
        newline = body.find(b"\n", m.end())
        start = len(body) if newline < 0 else newline + 1
    if start is not None and start < len(body):  # no close delimiter: the last part runs to the end
        spans.append((start, len(body)))
    return spans


def _chosen(entity: _Entity, raws: list[bytes], spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The body parts of a multipart that take the footer."""
    if entity.type == "multipart/alternative":
        return spans
    if entity.type == "multipart/related":
        start = entity.fields.get_param("start")
        for raw, span in zip(raws, spans, strict=True):
            part = _Entity.parse(raw)
            if start is None or (
                part is not None and str(part.fields.get("Content-ID", "")).strip() == start
            ):
                return [span]
        return spans[:1]
    candidates = [span for raw, span in zip(raws, spans, strict=True) if _body_text(raw)]
    return candidates[-1:]


def _body_text(raw: bytes) -> bool:
    part = _Entity.parse(raw)
    return part is not None and part.is_body_text()


# --------------------------------------------------------------------------- a text part


def _text(entity: _Entity, footer: _Footer, nl: bytes, *, top: bool) -> bytes | None:
    fields = entity.fields
    is_html = entity.type == "text/html"
    codec = _codec(fields.get_content_charset("us-ascii"))
    cte = str(fields.get("Content-Transfer-Encoding", "7bit")).strip().lower()
    if codec is None or cte not in _CTES:
        return None
    try:
        decoded = _decode(entity.body, cte)
        text = decoded.decode(codec, "replace")
    except ValueError:  # binascii.Error, and codecs that fail even so (punycode)
        return None
    flowed = not is_html and str(fields.get_param("format", "")).lower() == "flowed"
    nl_s = nl.decode()
    addition = footer.html(nl_s) if is_html else footer.plain(nl_s, flowed)
    if (is_html and addition in text) or _contains(
        _html_lines(text) if is_html else _plain_lines(text, flowed), footer.key
    ):
        return None
    if is_html:
        addition += nl_s
    in_place = _in_place(entity, codec, cte, decoded, addition, nl, is_html)
    if in_place is not None:
        return entity.head + in_place
    # Re-encode the part as UTF-8: its charset cannot carry the footer, or 7bit cannot.
    try:
        text = decoded.decode(codec)
    except UnicodeDecodeError:
        return None
    at = _insertion(text, _BODY_END, is_html)
    if at == len(text) and text and not text.endswith("\n"):
        addition = nl_s + addition
    new_cte = "base64" if cte == "base64" else "quoted-printable"
    body = _encode((text[:at] + addition + text[at:]).encode("utf-8"), new_cte, nl, entity.body)
    return _set_charset(entity, new_cte.encode(), nl, top) + body


def _codec(charset: str) -> str | None:
    """Python's name for a text charset, or None when it is unknown (or not a text encoding)."""
    try:
        name = codecs.lookup(charset).name
        b"\xff x\r\n".decode(name, "replace")  # LookupError: not a text encoding
        "\xff x\r\n".encode(name, "replace")  # UnicodeError: no error handling (idna)
    except (LookupError, ValueError):
        return None
    return name


def _decode(body: bytes, cte: str) -> bytes:
    if cte == "quoted-printable":
        return binascii.a2b_qp(body)
    if cte == "base64":
        return binascii.a2b_base64(body, strict_mode=False)
    return body


def _insertion(text: AnyStr, body_end: re.Pattern[AnyStr], is_html: bool) -> int:
    """Where the footer goes: before the last ``</body>`` of HTML, else at the end."""
    ends = [m.start() for m in body_end.finditer(text)] if is_html else []
    return ends[-1] if ends else len(text)


def _in_place(
    entity: _Entity, codec: str, cte: str, decoded: bytes, addition: str, nl: bytes, is_html: bool
) -> bytes | None:
    """The body with the footer spliced in, in the part's own charset and encoding; None if it cannot be."""
    if codec.startswith(_STATEFUL) or _ASCII_PROBE.encode(codec, "replace") != _ASCII_PROBE.encode():
        return None
    try:
        added = addition.encode(codec)
    except UnicodeEncodeError:
        return None
    at = _insertion(decoded, _BODY_END_BYTES, is_html)
    if at == len(decoded) and decoded and not decoded.endswith(b"\n"):
        added = nl + added
    if cte in ("7bit", "8bit", "binary"):
        if (cte == "7bit" and not added.isascii()) or max(len(x) for x in added.split(nl)) > _MAX_LINE:
            return None
        return decoded[:at] + added + decoded[at:]
    new = decoded[:at] + added + decoded[at:]
    if cte == "base64":
        return _encode(new, cte, nl, entity.body)
    raw = entity.body
    if at == len(decoded):
        q = len(raw)
    else:
        ends = list(_BODY_END_BYTES.finditer(raw))
        q = ends[-1].start() if ends else -1
        if q < 0 or binascii.a2b_qp(raw[:q]) != decoded[:at]:
            return _encode(new, cte, nl, raw)  # "</body>" is itself encoded: encode the whole part afresh
    before, after = raw[:q], raw[q:]
    if not before or before.endswith(b"\n"):
        glue = b""
    elif before.endswith(b"="):  # a soft line break without its line break
        glue = nl
    else:  # mid-line: a soft line break, unless the footer starts with a hard one
        glue = b"" if added.startswith(nl) else b"=" + nl
    tail = b"" if not after or added.endswith(nl) else b"=" + nl
    spliced = before + glue + _qp(added, nl) + tail + after
    return spliced if binascii.a2b_qp(spliced) == new else _encode(new, cte, nl, raw)


def _qp(data: bytes, nl: bytes) -> bytes:
    """Quoted-printable, line breaks ``nl`` kept as hard breaks, soft breaks as ``=`` + ``nl``."""
    return nl.join(
        nl.join(binascii.b2a_qp(line, quotetabs=False, istext=False).split(b"\n")) for line in data.split(nl)
    )


def _encode(data: bytes, cte: str, nl: bytes, original: bytes) -> bytes:
    if cte == "quoted-printable":
        return _qp(data, nl)
    encoded = binascii.b2a_base64(data, newline=False)
    lines = nl.join(encoded[i : i + 76] for i in range(0, len(encoded), 76))
    return lines + nl if original.endswith(b"\n") or not original else lines


def _set_charset(entity: _Entity, cte: bytes, nl: bytes, top: bool) -> bytes:
    """The part's header with ``charset=utf-8`` and transfer encoding ``cte``, other fields as they were."""
    head = entity.head
    added = b""
    field = _field(head, b"Content-Type")
    if field is None:
        added += b"Content-Type: " + entity.type.encode() + b"; charset=utf-8" + nl
    else:
        start, end = field
        value = head[start:end]
        param = re.compile(rb"""(;\s*charset\s*=\s*)(?:"[^"]*"|[^;\s]*)""", re.IGNORECASE)
        value = (
            param.sub(rb"\g<1>utf-8", value, count=1) if param.search(value) else value + b"; charset=utf-8"
        )
        head = head[:start] + value + head[end:]
    field = _field(head, b"Content-Transfer-Encoding")
    if field is None:
        added += b"Content-Transfer-Encoding: " + cte + nl
    else:
        head = head[: field[0]] + b"Content-Transfer-Encoding: " + cte + head[field[1] :]
    if top and _field(head, b"MIME-Version") is None:
        added += b"MIME-Version: 1.0" + nl
    end = entity.fields_end + len(head) - len(entity.head)
    return head[:end] + added + head[end:]


def _field(head: bytes, name: bytes) -> tuple[int, int] | None:
    """Where the first ``name`` field is in a header block (from its name to its last line's end)."""
    m = re.search(rb"(?im)^" + name + rb"[ \t]*:[^\r\n]*(?:\r?\n[ \t][^\r\n]*)*", head)
    return None if m is None else (m.start(), m.end())


# --------------------------------------------------------------------------- is it there already


def _contains(lines: tuple[str, ...], key: tuple[str, ...]) -> bool:
    """True when ``key`` is a run of consecutive ``lines``."""
    n = len(key)
    return any(lines[i : i + n] == key for i in range(len(lines) - n + 1))


def _plain_lines(text: str, flowed: bool) -> tuple[str, ...]:
    lines = _LINE.split(text)
    if flowed:
        lines = [x[1:] if x.startswith(" ") else x for x in lines]
    return _key(lines)


def _html_lines(text: str) -> tuple[str, ...]:
    """The lines of text an HTML part shows outside quotes (blockquote), roughly; linear in its size."""
    out: list[str] = []
    quoted, hidden, pos = 0, "", 0
    while (m := _TAG.search(text, pos)) is not None:
        if not quoted and not hidden:
            out.append(text[pos : m.start()])
        pos = m.end()
        if m[0] == "<!--":
            end = text.find("-->", pos)
            pos = len(text) if end < 0 else end + 3
            continue
        closing, name = m[1] == "/", m[2].lower()
        if hidden:
            hidden = "" if closing and name == hidden else hidden
        elif name in _HIDDEN and not closing:
            hidden = name
        elif name == "blockquote":
            quoted = max(quoted - 1, 0) if closing else quoted + 1
        elif not quoted and name in _BREAKS:
            out.append("\n")
    if not quoted and not hidden:
        out.append(text[pos:])
    return _key(_LINE.split(html.unescape("".join(out)).replace("\xa0", " ")))

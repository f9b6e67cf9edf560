"""Fast, tolerant RFC 5322 header parsing for the ingest pipeline.

Only the header block of a raw message is read; the body is never scanned or copied.
Nothing here raises on malformed input: bad lines are skipped, encoded-words that cannot
be decoded are kept as written, and unparsable dates come back as ``None``.
"""

from __future__ import annotations

import binascii
import codecs
import contextlib
import functools
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import getaddresses, parsedate_to_datetime
from itertools import islice

__all__ = ["Headers", "parse_headers"]

# First empty line: "\n\n", "\r\n\r\n" or the mixed "\n\r\n" (the first "\n" ends a header line).
_BLANK_LINE = re.compile(rb"\n\r?\n")
# A field: "name:" at the start of a line, then the rest of the line and any continuation
# lines (starting with SP/HTAB). Possessive quantifiers keep this linear on long lines.
_FIELD = re.compile(rb"^([!-9;-~]++):([^\n]*+(?:\n[ \t][^\n]*+)*+)", re.MULTILINE)
# RFC 2047 encoded-word; like email.header.ecre, tolerant of spaces in the encoded text.
_ENCODED_WORD = re.compile(r"=\?([^?\s]++)\?([QqBb])\?([^?]*+)\?=")
_MSG_ID = re.compile(r"<[^<>\s]+>")
# Codecs that are not MIME charsets and whose decoders are quadratic on long input.
_REFUSED_CODECS = frozenset({"idna", "punycode"})
# Address fields are parsed from at most this many characters (about 2000 addresses).
_MAX_ADDRESS_TEXT = 64 * 1024


def decode_8bit(raw: bytes) -> str:
    """Decode raw header bytes as UTF-8, else cp1252, else latin-1 (which cannot fail)."""
    for encoding in ("utf-8", "cp1252"):
        with contextlib.suppress(UnicodeDecodeError):
            return raw.decode(encoding)
    return raw.decode("latin-1")


def _decode_payload(encoding: str, text: str) -> bytes | None:
    """Undo the Q or B transfer encoding of an encoded-word, None if it is malformed."""
    data = text.encode()
    if encoding in "Qq":
        return binascii.a2b_qp(data, header=True)
    data = b"".join(data.split())
    try:
        return binascii.a2b_base64(data + b"=" * (-len(data) % 4))
    except binascii.Error:
        return None


@functools.lru_cache(maxsize=256)
def codec_name(charset: str) -> str | None:
    """The canonical text codec for a MIME ``charset`` label, None if unknown or refused."""
    try:
        name = codecs.lookup(charset.partition("*")[0]).name  # drop an RFC 2231 language tag
    except (LookupError, ValueError):  # ValueError: e.g. an embedded NUL
        return None
    try:
        b"a".decode(name)  # bytes-to-bytes codecs such as "base64" raise LookupError here
    except LookupError:
        return None
    except ValueError:  # a real charset that merely rejects the probe byte, e.g. UTF-16
        pass
    return None if name in _REFUSED_CODECS else name


def _decode_charset(data: bytes, codec: str) -> str:
    """Decode ``data`` with ``codec``, or as raw 8-bit text if it does not fit (mislabelled)."""
    try:
        return data.decode(codec)
    except ValueError:
        return decode_8bit(data)


def decode_rfc2047(text: str) -> str:
    """Decode RFC 2047 encoded-words like ``str(make_header(decode_header(text)))``, tolerantly.

    Whitespace between adjacent encoded-words is dropped and consecutive words in the
    same charset are joined before decoding (so a character split across words survives).
    A word with bad base64 or an unknown charset is kept as raw text.
    """
    if "=?" not in text:
        return text
    parts: list[str] = []
    codec: str | None = None  # charset of the pending run of encoded-words
    data = bytearray()
    pos = 0
    for match in _ENCODED_WORD.finditer(text):
        word_codec = codec_name(match[1])
        payload = _decode_payload(match[2], match[3])
        if word_codec is None or payload is None:
            continue  # stays in the text before the next decoded word, i.e. raw
        gap = text[pos : match.start()]
        adjacent = codec is not None and not gap.strip(" \t")
        if codec is not None and not (adjacent and word_codec == codec):
            parts.append(_decode_charset(bytes(data), codec))
            data.clear()
        if not adjacent:
            parts.append(gap)
        codec = word_codec
        data += payload
        pos = match.end()
    if codec is not None:
        parts.append(_decode_charset(bytes(data), codec))
    parts.append(text[pos:])
    return "".join(parts)


@dataclass(frozen=True, slots=True)
class Headers:
    """The parsed header block of a raw message.

    ``fields`` holds ``(name as written, raw unfolded value)`` pairs in order; the
    value has folding line breaks, leading whitespace and trailing CR/LF removed.
    ``body_offset`` is where the body starts in the raw bytes (``len(raw)`` if none).
    """

    fields: tuple[tuple[str, bytes], ...]
    body_offset: int

    def _raw_texts(self, name: str) -> list[str]:
        """Values of ``name`` as text, encoded-words left alone.

        Structured fields (addresses, msg-ids, dates) are parsed from these: decoding
        encoded-words first could inject ``,``, ``<`` or ``>`` from display names.
        """
        key = name.lower()
        return [decode_8bit(value) for field, value in self.fields if field.lower() == key]

    def get_all(self, name: str) -> tuple[str, ...]:
        """All values of field ``name`` (case-insensitive), decoded, in message order."""
        return tuple(decode_rfc2047(text) for text in self._raw_texts(name))

    def get(self, name: str) -> str | None:
        """The first decoded value of field ``name`` (case-insensitive), or None."""
        values = self.get_all(name)
        return values[0] if values else None

    @property
    def subject(self) -> str:
        """The decoded Subject, ``""`` if missing."""
        return self.get("Subject") or ""

    @property
    def message_id(self) -> str | None:
        """The first ``<...>`` token of the first Message-ID, else its stripped value."""
        values = self._raw_texts("Message-ID")
        if not values:
            return None
        match = _MSG_ID.search(values[0])
        return match[0] if match else values[0].strip() or None

    @property
    def in_reply_to(self) -> tuple[str, ...]:
        """The ``<...>`` msg-ids of In-Reply-To."""
        return self._msg_ids("In-Reply-To")

    @property
    def references(self) -> tuple[str, ...]:
        """The ``<...>`` msg-ids of References, in order."""
        return self._msg_ids("References")

    def _msg_ids(self, name: str) -> tuple[str, ...]:
        return tuple(match[0] for text in self._raw_texts(name) for match in _MSG_ID.finditer(text))

    @property
    def from_addrs(self) -> tuple[str, ...]:
        """Lower-cased addr-specs of From."""
        return self._addrs("From")

    @property
    def to_addrs(self) -> tuple[str, ...]:
        """Lower-cased addr-specs of To."""
        return self._addrs("To")

    @property
    def sender_addrs(self) -> tuple[str, ...]:
        """Lower-cased addr-specs of Sender."""
        return self._addrs("Sender")

    @property
    def cc_addrs(self) -> tuple[str, ...]:
        """Lower-cased addr-specs of Cc."""
        return self._addrs("Cc")

    def _addrs(self, name: str) -> tuple[str, ...]:
        text = ", ".join(self._raw_texts(name))
        if len(text) > _MAX_ADDRESS_TEXT:  # getaddresses is slow: keep whole leading entries
            text = text[: max(text.rfind(",", 0, _MAX_ADDRESS_TEXT), 0)]
        try:
            pairs = getaddresses([text])
        except RecursionError:  # deeply nested comments or groups
            return ()
        return tuple(addr.lower() for _, addr in pairs if addr)

    @property
    def date(self) -> datetime | None:
        """The first Date as an aware datetime (UTC if it has no zone), None if unparsable."""
        values = self._raw_texts("Date")
        if not values:
            return None
        try:
            parsed = parsedate_to_datetime(values[0])
        except (ValueError, OverflowError):  # OverflowError: absurdly large numbers
            return None
        return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def parse_headers(raw: bytes, *, max_fields: int = 2000) -> Headers:
    """Parse the header block of ``raw`` (keeping at most ``max_fields`` fields); never raises.

    The block ends at the first empty line (CRLF, LF or mixed). Lines that are neither
    ``name:`` fields nor continuations (e.g. an mbox ``From `` line) are skipped, together
    with their own continuation lines.
    """
    if raw.startswith(b"\n"):
        end, body_offset = 0, 1
    elif raw.startswith(b"\r\n"):
        end, body_offset = 0, 2
    elif blank := _BLANK_LINE.search(raw):
        end, body_offset = blank.start(), blank.end()
    else:
        end = body_offset = len(raw)
    fields = tuple(
        (
            match[1].decode("ascii"),
            match[2].replace(b"\r\n", b"").replace(b"\n", b"").lstrip(b" \t").rstrip(b"\r"),
        )
        for match in islice(_FIELD.finditer(raw, 0, end), max(max_fields, 0))
    )
    return Headers(fields, body_offset)

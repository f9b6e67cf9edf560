"""Forwarding that survives SPF and DMARC: the copy's envelope sender and From.

A rule's ``forward`` sends a copy through the tenant's own smarthost. Sent
unchanged, it would claim to come from the customer's domain through a
server that domain never authorised, and receivers that check DMARC would
refuse it. So, as mailing lists do (RFC 7960, section 4.1.3):

* the envelope sender is the original one rewritten by SRS
  (:mod:`gateway.srs`) at the tenant's SRS domain (:func:`srs_domain`), so
  SPF is checked against the tenant's domain and a bounce comes back to us,
  to be reversed and relayed to the original sender; a bounce (null
  sender) is forwarded with the null sender;
* ``From:`` becomes the tenant's ``smtp.from`` with the original display
  name and `` via <tenant name>`` (:func:`rewrite_from`), and the original
  ``From:`` goes to ``Reply-To:`` unless the message has one already (the
  author chose where replies go); every other byte is kept. A rule's
  ``rewrite_from = false`` keeps the original ``From:``.

:func:`rewrite_from` and :func:`srs_domain` are pure; :func:`load_signer`
reads (or makes, once) the SRS keys.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from email.errors import HeaderParseError
from email.header import decode_header, make_header
from email.utils import formataddr, getaddresses
from pathlib import Path

from gateway import srs
from gateway.config import Config, ConfigError, TenantSection
from gateway.message import parse_headers

SECRET_FILE = "srs.secret"  # noqa: S105 (a file name): in data_dir, when no secret is configured
MIN_KEY_CHARS = 16
_NAME_CHARS = 64  # of the original display name kept in the new From
_FIELD = re.compile(rb"([!-9;-~]+)[ \t]*:")


def srs_domain(tenant: TenantSection) -> str:
    """The domain of the tenant's SRS addresses: its ``smtp.from`` domain when that is one of its domains.

    Bounces to SRS addresses come back only if that domain's MX is this gateway.
    """
    domain = tenant.smtp.from_.rpartition("@")[2] if tenant.smtp and tenant.smtp.from_ else ""
    return domain if domain in tenant.domains else tenant.domains[0]


def _display_name(value: bytes) -> tuple[str, str]:
    """The decoded display name and the address of a From field's (unfolded) value."""
    pairs = getaddresses([value.decode("utf-8", "replace")])
    name, address = pairs[0] if pairs else ("", "")
    with contextlib.suppress(HeaderParseError, LookupError, UnicodeError, ValueError):
        name = str(make_header(decode_header(name)))  # an undecodable encoded-word stays as written
    return _printable(name)[:_NAME_CHARS], address


def _printable(text: str) -> str:
    """``text`` on one line: control and other unprintable characters become spaces, runs of them one."""
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


def _fields(raw: bytes, end: int) -> list[tuple[bytes, int, int]]:
    """(lower-case name, start, stop) of each header field in ``raw[:end]``, continuation lines included."""
    fields: list[tuple[bytes, int, int]] = []
    pos = 0
    for line in raw[:end].splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields and fields[-1][2] == pos:
            name, start, _ = fields[-1]
            fields[-1] = (name, start, pos + len(line))
        elif match := _FIELD.match(line):
            fields.append((match[1].lower(), pos, pos + len(line)))
        pos += len(line)
    return fields


def rewrite_from(raw: bytes, *, address: str, via: str) -> bytes:
    """``raw`` with ``From: "<name> via <via>" <address>`` and the original From in Reply-To.

    The new From takes the place of the first From field (any others go);
    ``Reply-To:`` gets the original field's value byte for byte, unless the
    message already has a Reply-To, which is kept. A message without From is
    returned as it is. Every other byte is unchanged.
    """
    headers = parse_headers(raw)
    fields = _fields(raw, headers.body_offset)
    froms = [(start, stop) for name, start, stop in fields if name == b"from"]
    if not froms:
        return raw
    start, stop = froms[0]
    original = raw[start:stop]
    eol = b"\r\n" if original.endswith(b"\r\n") else b"\n"
    value = next(v for n, v in headers.fields if n.lower() == "from")
    name, sender = _display_name(value)
    shown = _printable(f"{name or sender} via {via}" if name or sender else via)
    new = b"From: " + formataddr((shown, address), charset="utf-8").encode("ascii") + eol
    if not any(n == b"reply-to" for n, _, _ in fields):
        colon = original.index(b":")
        new += b"Reply-To:" + original[colon + 1 :]
        if not original.endswith(b"\n"):  # the header block's last line had no line break
            new += eol
    out = bytearray(raw[:start]) + new
    pos = stop
    for other_start, other_stop in froms[1:]:
        out += raw[pos:other_start]
        pos = other_stop
    out += raw[pos:]
    return bytes(out)


def load_signer(config: Config) -> srs.Signer:
    """The SRS keys of ``[srs]``, else of ``data_dir/srs.secret`` (made with a random key on first use)."""
    secret = config.srs.secret()
    if secret is not None:
        text, where = (
            secret.get_secret_value(),
            "srs.secret_file" if config.srs.secret_file else "srs.secret_env",
        )
    else:
        text, where = _generated(config.gateway.data_dir / SECRET_FILE), "gateway.data_dir"
    keys = tuple(line.strip().encode() for line in text.splitlines() if line.strip())
    if not keys:
        raise ConfigError([f"{where}: no SRS key in it"])
    if any(len(k) < MIN_KEY_CHARS for k in keys):
        raise ConfigError([f"{where}: an SRS key must have at least {MIN_KEY_CHARS} characters"])
    return srs.Signer(keys, max_age_days=config.srs.max_age.days)


def _generated(path: Path) -> str:
    """The key in ``path``; a new random one (mode 0600, fsynced) if there is no such file yet."""
    try:
        return path.read_text(encoding="ascii")
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(32) + "\n"
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, key.encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(temp, path)  # never replaces a key another process made meanwhile
    except FileExistsError:
        return path.read_text(encoding="ascii")
    finally:
        temp.unlink()
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return key

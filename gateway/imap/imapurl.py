"""IMAP URLs (RFC 5092) as CATENATE (RFC 4469) uses them: one message, or a section of it, here.

Pure: text in, a :class:`Ref` out. Accepted: a relative URL
``/mailbox;UIDVALIDITY=n/;UID=n[/;SECTION=s][/;PARTIAL=o[.l]]`` or the same
after ``imap://[user@]host[:port]`` when ``host`` is this server's hostname.
The mailbox is percent-encoded UTF-8 (RFC 5092 section 3.4). Anything else
(another server, URLAUTH, a search, a HEADER.FIELDS section) is a
:class:`BadURL`, which the session answers with ``NO [BADURL ...]``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote

from gateway.imap.commands import Section

MAX_URL: Final = 4096
_MESSAGE: Final = re.compile(
    r"/(?P<mailbox>[^;/?#]+(?:/[^;/?#]+)*)"
    r"(?:;UIDVALIDITY=(?P<uidvalidity>[1-9][0-9]{0,9}))?"
    r"/;UID=(?P<uid>[1-9][0-9]{0,9})"
    r"(?:/;SECTION=(?P<section>[^/;?#]+))?"
    r"(?:/;PARTIAL=(?P<start>[0-9]{1,10})(?:\.(?P<length>[1-9][0-9]{0,9}))?)?",
    re.IGNORECASE,
)
_SERVER: Final = re.compile(r"imap://(?:[^@/]*@)?(?P<host>[^:/]+)(?::[0-9]{1,5})?(?=/)", re.IGNORECASE)
_TEXTS: Final = {"HEADER", "TEXT", "MIME"}


class BadURL(ValueError):
    """Not a URL of a message on this server that CATENATE can use."""


@dataclass(frozen=True, slots=True)
class Ref:
    """What a URL names: a message by folder and UID, optionally a section and a byte range."""

    mailbox: str
    uidvalidity: int | None
    uid: int
    section: Section | None
    partial: tuple[int, int] | None  # (start, length); length 0: to the end


def _section(text: str) -> Section:
    words = unquote(text).upper().split(".")
    part: list[int] = []
    while words and words[0].isdigit():
        number = int(words.pop(0))
        if not 0 < number < 2**32:
            raise BadURL(f"invalid section part {number}")
        part.append(number)
    rest = ".".join(words)
    if not rest:
        return Section(tuple(part))
    if rest not in _TEXTS or (rest == "MIME" and not part):
        raise BadURL(f"unsupported section {text!r}")
    return Section(tuple(part), rest)  # type: ignore[arg-type]


def parse(url: str, hostname: str) -> Ref:
    """The message ``url`` names on this server (``hostname``); :class:`BadURL` otherwise."""
    if len(url) > MAX_URL:
        raise BadURL("URL too long")
    path = url
    if url[:7].lower() == "imap://":
        server = _SERVER.match(url)
        if server is None:
            raise BadURL("not an IMAP URL")
        if server["host"].lower() != hostname.lower():
            raise BadURL("a URL of another server")
        path = url[server.end() :]
    m = _MESSAGE.fullmatch(path)
    if m is None:
        raise BadURL("not a URL of one message (mailbox;UIDVALIDITY=n/;UID=n)")
    try:
        mailbox = unquote(m["mailbox"], errors="strict")
    except UnicodeDecodeError:
        raise BadURL("the mailbox name is not UTF-8") from None
    start, length = m["start"], m["length"]
    return Ref(
        mailbox="INBOX" if mailbox.upper() == "INBOX" else mailbox,
        uidvalidity=int(m["uidvalidity"]) if m["uidvalidity"] else None,
        uid=int(m["uid"]),
        section=_section(m["section"]) if m["section"] else None,
        partial=(int(start), int(length or 0)) if start is not None else None,
    )

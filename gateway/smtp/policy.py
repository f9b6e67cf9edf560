"""Pure SMTP policy: who we take mail for, the replies we give, the trace header.

No sockets here: the server module calls these and sends what they return.
Replies are the contract strings of DESIGN.md section 6.
"""

from __future__ import annotations

import email
import email.policy
import re
from datetime import datetime
from email.utils import format_datetime

from gateway.config import Config, TenantSection
from gateway.message import Headers

OK = "250 2.0.0 OK"
RELAY_DENIED = "554 5.7.1 <{addr}>: Relay access denied"
NOTES_ONLY_AGENTS = "550 5.7.1 <{addr}>: Internal notes address: only the tenant's agents write to it"
NO_SUCH_USER = "550 5.1.1 <{addr}>: Recipient address rejected: no such user here"
BAD_ADDRESS = "501 5.1.3 Bad recipient address syntax"
BAD_SENDER = "501 5.1.7 Bad sender address syntax"
AUTH_BUSY = "454 4.7.0 Temporary authentication failure: too many logins at once, try again later"
TOO_BIG = "552 5.3.4 Message size exceeds fixed limit of {limit} bytes ({human})"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
BARE_NEWLINE = "550 5.5.2 Message contains a bare CR or LF; refused"
TEMPFAIL = "451 4.3.0 Temporary failure, please try again later"
TOO_MANY_CONNECTIONS = "421 4.7.0 {host} Too many connections, try again later"
EVICTED = "421 4.7.0 {host} Idle too long while the server is busy, closing connection"

_ADDRESS = re.compile(r"^[^@\s<>]{1,64}@[a-z0-9.-]{1,253}$")


def route_recipient(config: Config, address: str, declared_size: int | None) -> TenantSection | str:
    """The tenant that takes mail for ``address``, or the reply refusing it."""
    address = address.lower()
    if not _ADDRESS.match(address):
        return BAD_ADDRESS
    tenant = config.tenant_for_domain(address.rpartition("@")[2])
    if tenant is None:
        return RELAY_DENIED.format(addr=address)
    if address == tenant.effective_notes_address:  # agents' internal notes come by submission only
        return NOTES_ONLY_AGENTS.format(addr=address)
    if not tenant.accepts(address):
        return NO_SUCH_USER.format(addr=address)
    if declared_size is not None and declared_size > tenant.max_message_size:
        return too_big(tenant.max_message_size)
    return tenant


_SIZE_UNITS = (("GB", 10**9), ("GiB", 2**30), ("MB", 10**6), ("MiB", 2**20), ("KB", 10**3), ("KiB", 2**10))


def human_size(n: int) -> str:
    """A size as the configuration would write it: ``"20 MB"``, ``"1.5 GiB"``, else ``"N bytes"``."""
    for unit, factor in _SIZE_UNITS:
        if n >= factor and n * 100 % factor == 0:
            return f"{n / factor:g} {unit}"
    return f"{n} bytes"


def too_big(limit: int) -> str:
    """The refusal of a message over ``limit`` bytes, naming the limit in bytes and for humans."""
    return TOO_BIG.format(limit=limit, human=human_size(limit))


def declared_size(mail_options: list[str]) -> int | None:
    """The ``SIZE=`` a client declared on ``MAIL FROM``, if any."""
    for option in mail_options:
        key, _, value = option.partition("=")
        if key.upper() == "SIZE" and value.isdigit():
            return int(value)
    return None


def has_bare_newline(data: bytes) -> bool:
    """True when ``data`` holds a CR or LF that is not part of a CRLF pair.

    Such bytes are how SMTP smuggling hides a second message (``<LF>.<LF>``)
    from one server and shows it to the next; we refuse them outright.
    """
    crlf = data.count(b"\r\n")
    return data.count(b"\n") != crlf or data.count(b"\r") != crlf


def _clean(text: str, limit: int = 100) -> str:
    """Printable ASCII only: client-supplied words never break a header."""
    return "".join(c if 33 <= ord(c) < 127 else "?" for c in text[:limit]) or "unknown"


def received_header(
    *,
    helo: str | None,
    peer_ip: str,
    hostname: str,
    protocol: str,
    queue_id: str,
    recipients: list[str],
    now: datetime,
) -> bytes:
    """The RFC 5321 ``Received:`` trace line we prepend to a message."""
    for_clause = f"\r\n\tfor <{_clean(recipients[0], 320)}>" if len(recipients) == 1 else ""
    return (
        f"Received: from {_clean(helo or 'unknown')} ([{_clean(peer_ip, 64)}])\r\n"
        f"\tby {_clean(hostname)} (mailgate) with {protocol} id {queue_id}"
        f"{for_clause}; {format_datetime(now)}\r\n"
    ).encode("ascii")


SENDER_NOT_OWNED = "553 5.7.1 <{addr}>: Sender address not owned by your account"
HEADER_SENDER_NOT_OWNED = "553 5.7.1 {field}: <{addr}> is not an address of your account"
NO_HEADER_FROM = "553 5.7.1 The message has no From: address; it must name an address of your account"
TOO_MANY_ATTACHMENTS = "552 5.3.4 Too many attachments: {count}, the limit is {limit}"
COLLISION = "450 4.7.1 Collision: {who} already answered this customer at {when}; your reply was not sent"
INVALID_SRS = "550 5.1.1 <{addr}>: invalid or expired SRS address"
READ_ONLY = "554 5.7.1 {why}"
READ_ONLY_DEFERRED = "450 4.2.1 {why}"  # relay-in: the sender retries until the tenant is renewed
MONTHLY_LIMIT = "554 5.7.0 Monthly sending limit reached: limit of {limit} messages this month on plan {plan}"


def _printable(text: str) -> str:
    """Printable ASCII and spaces only: configured names never break a reply line."""
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in text)


def read_only(why: str) -> str:
    """The refusal of a message to relay from a read-only tenant; ``why`` is its standing's."""
    return READ_ONLY.format(why=_printable(why))


def read_only_deferred(why: str) -> str:
    """The deferral of mail for a read-only tenant (relay-in); ``why`` is its standing's."""
    return READ_ONLY_DEFERRED.format(why=_printable(why))


def monthly_limit(limit: int, plan: str) -> str:
    """The refusal of the first message over the plan's monthly sending limit."""
    return MONTHLY_LIMIT.format(limit=limit, plan=_printable(plan))


def count_attachments(raw: bytes) -> int:
    """MIME parts with a file name or ``Content-Disposition: attachment``."""
    message = email.message_from_bytes(raw, policy=email.policy.compat32)
    count = 0
    for part in message.walk():
        if part.is_multipart():
            continue
        disposition = (part.get("Content-Disposition") or "").split(";", 1)[0].strip().lower()
        if disposition == "attachment" or part.get_filename() or part.get_param("name"):
            count += 1
    return count


def has_control(address: str) -> bool:
    """True when an envelope address holds a NUL or another control character."""
    return any(ord(c) < 32 or ord(c) == 127 for c in address)


def foreign_header_sender(tenant: TenantSection, headers: Headers) -> str | None:
    """The reply refusing a message to relay whose From: or Sender: is not the tenant's, else None."""
    if not headers.from_addrs:
        return NO_HEADER_FROM
    for field, addresses in (("From", headers.from_addrs), ("Sender", headers.sender_addrs)):
        for address in addresses:
            if not tenant.owns(address):
                return HEADER_SENDER_NOT_OWNED.format(field=field, addr=_clean(address, 320))
    return None

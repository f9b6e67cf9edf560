"""RFC 3464 delivery status notifications (pure: bytes in, bytes out).

A notice names the message's queue id (the one its sender got in ``250 ...
queued as ID``) in its text, in an ``X-Mailgate-Queue-ID`` header and in
the per-message fields of the delivery-status part.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from email.utils import format_datetime, make_msgid

from gateway.message import parse_headers


@dataclass(frozen=True, slots=True)
class RecipientStatus:
    """One recipient's outcome: RFC 3464 action (failed or delayed), status and the server's reply."""

    address: str
    action: str  # "failed" | "delayed"
    status: str  # e.g. "5.1.1", "4.4.7"
    diagnostic: str  # the remote reply, or our reason


def _clean(text: str) -> str:
    """One header-safe line."""
    return " ".join(text.replace("\r", " ").replace("\n", " ").split())[:900]


def build(
    *,
    reporting_mta: str,
    to: str,
    original: bytes,
    recipients: Sequence[RecipientStatus],
    arrival: datetime,
    now: datetime,
    queue_id: str | None,
) -> bytes:
    """A multipart/report message telling ``to`` what happened to ``original``."""
    boundary = f"mailgate-dsn-{secrets.token_hex(8)}"
    failed = any(r.action == "failed" for r in recipients)
    subject = "Undelivered Mail Returned to Sender" if failed else "Delayed Mail (still being retried)"
    original_headers = original[: parse_headers(original).body_offset].rstrip(b"\r\n") + b"\r\n"
    human = [
        f"This is the mail system at {reporting_mta}.",
        "",
        "Your message could not be delivered to the following recipients:"
        if failed
        else "Your message has not been delivered yet to the following recipients; it will be retried:",
        "",
        *(f"  <{r.address}>: {_clean(r.diagnostic)}" for r in recipients),
        "",
        *([f"Queue ID: {_clean(queue_id)} (mailgate queue show {_clean(queue_id)})", ""] if queue_id else []),
    ]
    queue_field = f"X-Mailgate-Queue-ID: {_clean(queue_id)}\r\n" if queue_id else ""
    per_recipient = "".join(
        f"\r\nFinal-Recipient: rfc822; {_clean(r.address)}\r\n"
        f"Action: {r.action}\r\nStatus: {r.status}\r\n"
        f"Diagnostic-Code: smtp; {_clean(r.diagnostic)}\r\n"
        for r in recipients
    )
    return (
        (
            f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>\r\n"
            f"To: <{_clean(to)}>\r\n"
            f"Subject: {subject}\r\n"
            f"Date: {format_datetime(now)}\r\n"
            f"Message-ID: {make_msgid(domain=reporting_mta)}\r\n"
            "Auto-Submitted: auto-replied\r\n" + queue_field + "MIME-Version: 1.0\r\n"
            f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"\r\n'
            "\r\n"
            f"--{boundary}\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n\r\n" + "\r\n".join(human) + "\r\n"
            f"--{boundary}\r\n"
            "Content-Type: message/delivery-status\r\n\r\n"
            f"Reporting-MTA: dns; {reporting_mta}\r\n"
            + queue_field
            + f"Arrival-Date: {format_datetime(arrival)}\r\n"
            + per_recipient
            + "\r\n"
            f"--{boundary}\r\n"
            "Content-Type: text/rfc822-headers\r\n\r\n"
        ).encode("utf-8")
        + original_headers
        + f"\r\n--{boundary}--\r\n".encode()
    )

"""One identifier per outgoing message, from the SMTP reply to the DSN (issue #11).

``mailgate run`` relays an agent's reply to Postfix ``smtp-sink``, which
first defers it (``451``) and then refuses it (``550``). The id in the
client's ``250 ... queued as ID`` must be the one of ``queue list``, ``queue
show``, ``queue retry``, every log line about the message and the DSN; the
deferred attempt's log line must hold the smarthost's reply text.
"""

from __future__ import annotations

import imaplib
import json
import re
import smtplib
from email import message_from_bytes
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher

from tests.conftest import Sink, free_port
from tests.daemon import Daemon

PASSWORD = "agent-password"
HASH = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash(PASSWORD)
MESSAGE_ID = "<trace-1@acme.test>"
DEFERRED = "451 4.3.0 sink says try later"
REFUSED = "550 5.7.1 sink refuses this message"


def submit(port: int) -> str:
    """Anna's reply over submission; the reply to the end of DATA."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
        c.login("anna@acme.test", PASSWORD)
        assert c.mail("biuro@acme.test")[0] == 250
        assert c.rcpt("customer@example.org")[0] == 250
        code, text = c.data(
            f"From: biuro@acme.test\r\nTo: customer@example.org\r\nSubject: Re: order\r\n"
            f"Message-ID: {MESSAGE_ID}\r\n\r\nYour order ships today.\r\n"
        )
    return f"{code} {text.decode()}"


def log_lines(d: Daemon) -> list[dict[str, Any]]:
    return [json.loads(line) for line in d.log.read_text().splitlines() if line.startswith("{")]


def inbox(port: int) -> list[bytes]:
    client = imaplib.IMAP4("127.0.0.1", port, timeout=10)
    client.login("anna@acme.test", PASSWORD)
    client.select("INBOX")
    _, data = client.fetch("1:*", "(BODY.PEEK[])")
    client.logout()
    return [part[1] for part in data if isinstance(part, tuple)]


@pytest.mark.peers
def test_one_id_from_the_smtp_reply_to_the_dsn(tmp_path: Path, db_url: str, sink: Sink) -> None:
    submission, imap = free_port(), free_port()
    config = tmp_path / "mailgate.toml"
    config.write_text(
        f"""
[gateway]
hostname = "mx.test"
data_dir = "{tmp_path / "var"}"
database_url = "{db_url}"

[listen]
smtp = ""
submission = "127.0.0.1:{submission}"
imap = "127.0.0.1:{imap}"

[queue]
retry = ["1s"]

[[tenants]]
id = "acme"
domains = ["acme.test"]

[tenants.smtp]
host = "127.0.0.1"
port = {sink.port}
from = "biuro@acme.test"

[[tenants.agents]]
login = "anna@acme.test"
password_hash = "{HASH}"
""",
        encoding="utf-8",
    )
    sink.start("-r", "RCPT", "-b", DEFERRED)
    d = Daemon(config, submission, tmp_path)
    d.start()
    try:
        reply = submit(submission)
        match = re.fullmatch(r"250 2\.0\.0 .*queued as ([0-9a-f]{12})", reply)
        assert match, reply
        queue_id = match[1]

        def deferred() -> bool:
            return any(e.get("event") == "relay.attempt" for e in log_lines(d))

        d.wait_for("a deferred attempt", deferred, 30)
        (row,) = json.loads(d.cli("queue", "list", "--format", "json"))
        assert row["id"] == queue_id
        assert row["last_error"] == DEFERRED

        # The smarthost now refuses it for good: a DSN into the sender's INBOX.
        sink.stop()
        sink.start("-f", ".", "-B", REFUSED)
        assert "due now" in d.cli("queue", "retry", queue_id)
        d.wait_for("the DSN", lambda: any(e.get("event") == "relay.notified" for e in log_lines(d)), 30)
        assert json.loads(d.cli("queue", "list", "--format", "json")) == []
        (dsn,) = inbox(imap)
    finally:
        d.stop()

    shown = json.loads(d.cli("queue", "show", queue_id, "--format", "json"))
    assert (shown["id"], shown["state"], shown["agent"]) == (queue_id, "done", "anna@acme.test")
    assert shown["message_id"] == MESSAGE_ID
    events = [(e["event"], e["attempt"], e["reply"]) for e in shown["history"]]
    assert events[0][0] == "queued"
    assert ("deferred", 1, DEFERRED) in events
    assert "retry" in [e for e, _, _ in events]
    assert any(e == "failed" and r == REFUSED for e, _, r in events)
    assert events[-1][0] == "notified"
    assert {e["smarthost"] for e in shown["history"] if e["recipient"]} == {f"127.0.0.1:{sink.port}"}
    assert queue_id in d.cli("queue", "show", queue_id)  # the table form names it too

    report = message_from_bytes(dsn)
    assert report["X-Mailgate-Queue-ID"] == queue_id
    assert queue_id in dsn.decode()

    # Every log line about the message carries the same id, the tenant, the agent and the Message-ID.
    about = [e for e in log_lines(d) if queue_id in json.dumps(e) or MESSAGE_ID in json.dumps(e)]
    kinds = {e["event"] for e in about}
    assert {"smtp.transaction", "outbox.queued", "relay.attempt", "relay.notified"} <= kinds, kinds
    for e in about:
        assert (e.get("queue_id"), e.get("agent"), e.get("tenant")) == (queue_id, "anna@acme.test", "acme"), e
        assert e.get("message_id") == MESSAGE_ID, e
    first, *_ = [e for e in about if e["event"] == "relay.attempt"]
    assert first["smarthost"] == f"127.0.0.1:{sink.port}"
    assert first["attempt"] == 1
    assert first["recipients"] == [{"domain": "example.org", "result": "deferred", "reply": DEFERRED}]

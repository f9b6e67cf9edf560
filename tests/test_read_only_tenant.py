"""Read-only tenants and disabled agents (issue #14), against the running daemon.

A tenant whose plan ended (here: ``paid_until`` five days ago on plan
``3gb``, which then stays read-only for 30 days) keeps reading its mail, but
every IMAP write answers ``NO [CANNOT]`` naming the plan and the date the
read-only time ends, a SELECT is an EXAMINE, relay-in defers its mail with
``450 4.2.1``, and its upstream mailboxes are not pulled until it is renewed.
The other tenant is untouched. The IMAP session is opened before the tenant
turns read-only (a reload): each command asks anew.
"""

from __future__ import annotations

import imaplib
import signal
import smtplib
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests import corpus
from tests.conftest import free_port
from tests.daemon import Daemon, write_config
from tests.dovecot import Dovecot
from tests.test_auth_cache import (
    HASH,
    PASSWORD,
    Counted,
    counted,  # noqa: F401 (fixture: an Authenticator with a swappable config)
)
from tests.test_pull_daemon import ENV, mailbox_toml
from tests.test_pull_daemon import PASSWORD as UPSTREAM_PASSWORD

TODAY = datetime.now(UTC).date()
ENDED = TODAY - timedelta(days=5)
RENEWED = TODAY + timedelta(days=365)
WHY = f"plan 3gb ended on {ENDED.isoformat()}; read-only until {(ENDED + timedelta(days=30)).isoformat()}"


def message(n: int, to: str = "biuro@acme.test") -> bytes:
    return (
        f"From: Customer <c{n}@example.org>\r\nTo: {to}\r\nSubject: question {n}\r\n"
        f"Message-ID: <ro{n}@example.org>\r\nDate: Mon, 1 Jan 2024 10:00:00 +0000\r\n\r\nBody {n}.\r\n"
    ).encode()


def tenants(acme_until: date, acme_extra: str = "") -> str:
    """acme (on plan 3gb until ``acme_until``) with agent anna; beta, paid up, with bob and a disabled ewa."""
    return f"""plan = "3gb"
paid_until = {acme_until.isoformat()}
{acme_extra}
[[tenants.agents]]
login = "anna@acme.test"
password_hash = "{HASH}"

[[tenants]]
id = "beta"
domains = ["beta.test"]
plan = "3gb"
paid_until = {RENEWED.isoformat()}

[[tenants.agents]]
login = "bob@beta.test"
password_hash = "{HASH}"

[[tenants.agents]]
login = "ewa@beta.test"
password_hash = "{HASH}"
disabled = true
"""


@dataclass
class Gateway:
    """The daemon of :func:`tests.daemon.write_config` (tenant acme), with an ``imap`` listener too."""

    daemon: Daemon
    tmp_path: Path
    db_url: str
    imap_port: int

    @classmethod
    def start(cls, tmp_path: Path, db_url: str, extra: str) -> Gateway:
        """Write the file (``extra`` continues acme's table) and start the daemon."""
        g = cls(
            Daemon(tmp_path / "mailgate.toml", free_port(), tmp_path, env=ENV), tmp_path, db_url, free_port()
        )
        g.write(extra)
        g.daemon.start()  # until the smtp listener is up; the imap listener starts after it
        g.daemon.wait_for("the imap listener", g.listening, 10)
        return g

    def listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.imap_port), timeout=1).close()
        except OSError:
            return False
        return True

    def write(self, extra: str) -> None:
        path = write_config(self.tmp_path, self.db_url, self.daemon.port, extra)
        text = path.read_text(encoding="utf-8")
        path.write_text(text.replace("[listen]\n", f'[listen]\nimap = "127.0.0.1:{self.imap_port}"\n'))

    def reload(self, extra: str) -> None:
        """Rewrite the file and SIGHUP the daemon; wait until it reloaded."""
        done = self.daemon.log.read_text().count("config.reloaded")
        self.write(extra)
        assert self.daemon.proc is not None
        self.daemon.proc.send_signal(signal.SIGHUP)
        self.daemon.wait_for(
            "the reload", lambda: self.daemon.log.read_text().count("config.reloaded") > done, 20
        )

    def imap(self, login: str = "anna@acme.test") -> imaplib.IMAP4:
        c = imaplib.IMAP4("127.0.0.1", self.imap_port, timeout=10)
        c.login(login, PASSWORD)
        return c

    def send(self, rcpt: str, data: bytes) -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", self.daemon.port, timeout=10) as c:
            return c.sendmail("customer@example.org", [rcpt], data)


@pytest.fixture
def gateway(tmp_path: Path, db_url: str) -> Iterator[Gateway]:
    """The daemon with acme paid up and two messages in its INBOX (the test makes it read-only)."""
    g = Gateway.start(tmp_path, db_url, tenants(RENEWED))
    try:
        for n in (1, 2):
            assert g.send("biuro@acme.test", message(n)) == {}
        g.daemon.wait_for("two messages", lambda: g.daemon.folders("acme").get("INBOX") == 2, 10)
        yield g
    finally:
        g.daemon.stop()


def answer(response: tuple[str, list[Any]], status: str = "OK") -> bytes:
    """The first line of an answer with ``status`` (a FETCH's: its first literal)."""
    typ, data = response
    assert typ == status, data
    first = data[0]
    return bytes(first[1] if isinstance(first, tuple) else first or b"")


def test_read_only_tenant_refuses_imap_writes_with_cannot_and_keeps_reading(gateway: Gateway) -> None:
    c = gateway.imap()
    answer(c.select("INBOX"))  # read-write, before the plan is seen to have ended
    gateway.reload(tenants(ENDED))
    cannot = b"[CANNOT] " + WHY.encode()
    # The selected folder: each command asks where the tenant stands now.
    assert answer(c.store("1", "+FLAGS", "(\\Flagged)"), "NO") == cannot
    assert answer(c.expunge(), "NO") == cannot
    assert answer(c._simple_command("MOVE", "1", "Archive"), "NO") == cannot  # type: ignore[attr-defined]
    assert answer(c.copy("1", "Archive"), "NO") == cannot
    assert b"Body 1." in answer(c.fetch("1", "(BODY[])"))  # read, and not marked \Seen
    assert b"\\Seen" not in answer(c.fetch("1", "(FLAGS)"))
    # A new SELECT is an EXAMINE.
    with pytest.raises(c.readonly, match="not writable"):
        c.select("INBOX")
    c.is_readonly = True  # imaplib goes on in a folder it got read-only only when told
    assert answer(c.fetch("2", "(BODY[TEXT])")) == b"Body 2.\r\n"
    assert b"\\Seen" not in answer(c.fetch("2", "(FLAGS)"))
    assert answer(c.search(None, "ALL")) == b"1 2"
    assert answer(c.store("2", "+FLAGS", "(\\Seen)"), "NO") == cannot
    assert answer(c.append("INBOX", None, None, message(3)), "NO") == cannot
    assert answer(c.create("Projects"), "NO") == cannot
    assert answer(c.delete("Archive"), "NO") == cannot
    assert answer(c.rename("Archive", "Old"), "NO") == cannot
    assert b"INBOX" in b" ".join(c.list()[1])
    assert answer(c.status("INBOX", "(MESSAGES UNSEEN)")).endswith(b"(MESSAGES 2 UNSEEN 2)")
    c.logout()
    # Renewed: writable again, in a new session and without a restart.
    gateway.reload(tenants(RENEWED))
    c = gateway.imap()
    answer(c.select("INBOX"))
    answer(c.store("1", "+FLAGS", "(\\Flagged)"))
    answer(c.append("INBOX", None, None, message(3)))
    c.logout()


def test_relay_in_defers_mail_for_a_read_only_tenant_and_takes_the_others(gateway: Gateway) -> None:
    gateway.reload(tenants(ENDED))
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        gateway.send("biuro@acme.test", message(4))
    ((code, text),) = refused.value.recipients.values()
    assert (code, text.decode()) == (450, f"4.2.1 {WHY}")
    assert gateway.send("office@beta.test", message(5, "office@beta.test")) == {}
    gateway.daemon.wait_for("beta's message", lambda: gateway.daemon.folders("beta").get("INBOX") == 1, 10)
    assert gateway.daemon.folders("acme")["INBOX"] == 2
    # The other tenant's agent writes as before.
    c = gateway.imap("bob@beta.test")
    answer(c.select("INBOX"))
    answer(c.store("1", "+FLAGS", "(\\Seen)"))
    c.logout()


def test_a_disabled_agent_cannot_log_in_over_imap_or_smtp(gateway: Gateway) -> None:
    c = imaplib.IMAP4("127.0.0.1", gateway.imap_port, timeout=10)
    with pytest.raises(c.error, match="AUTHENTICATIONFAILED"):
        c.login("ewa@beta.test", PASSWORD)
    c.logout()
    with smtplib.SMTP("127.0.0.1", gateway.daemon.port, timeout=10) as s:
        s.ehlo()
        with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
            s.login("ewa@beta.test", PASSWORD)
        assert failed.value.smtp_code == 535
    gateway.imap("bob@beta.test").logout()  # the tenant's other agent logs in


async def test_a_disabled_agent_is_not_let_in_by_the_login_cache(counted: Counted) -> None:  # noqa: F811
    enabled = counted.config
    assert await counted.login()  # verified and remembered
    acme, *others = enabled.tenants
    agent = acme.agents[0].model_copy(update={"disabled": True})
    # No reload (which forgets every login): the cache still holds anna's.
    counted.config = enabled.with_tenants((acme.model_copy(update={"agents": (agent,)}), *others))
    assert not await counted.login()
    counted.config = enabled
    assert await counted.login()
    assert counted.checks == 3  # the refused attempt ran a (dummy) check, and dropped the entry


@pytest.mark.peers
def test_upstream_pulls_pause_while_read_only_and_resume_on_renewal(
    tmp_path: Path, db_url: str, dovecot: Dovecot
) -> None:
    dovecot.add_user("biuro", UPSTREAM_PASSWORD)
    dovecot.append("biuro", "INBOX", corpus.normal(1)[0])
    box = mailbox_toml("biuro", dovecot.port, idle=True)
    g = Gateway.start(tmp_path, db_url, tenants(ENDED, box))
    try:
        g.daemon.wait_for(
            "the pause", lambda: g.daemon.mailboxes().get("biuro", {}).get("state") == "paused", 20
        )
        assert WHY in str(g.daemon.mailboxes()["biuro"]["last_error"])
        assert g.daemon.folders("acme").get("INBOX", 0) == 0
        assert dovecot.exists("biuro") == 1  # the mail waits upstream
        g.reload(tenants(RENEWED, box))
        g.daemon.wait_for("the pulled message", lambda: g.daemon.folders("acme").get("INBOX", 0) == 1, 20)
    finally:
        g.daemon.stop()

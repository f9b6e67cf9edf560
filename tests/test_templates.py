"""The tenant's shared Templates folder (issue #14), against the running daemon.

Every tenant has ``Templates`` (Thunderbird finds it by that name). Every
agent sees and reads it, an agent whose ``folders`` limit what it sees too;
only the tenant's admins (``role = "admin"``) change it: an agent's writes
answer ``NO [NOPERM]`` and its SELECT is an EXAMINE. A template counts toward
the tenant's quota like any message.
"""

from __future__ import annotations

import imaplib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_read_only_tenant import HASH, Gateway, answer, message

TEMPLATE = (
    b"From: Biuro <biuro@acme.test>\r\nSubject: Thank you for your order\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nYour order ships today.\r\n"
)
AGENTS = f"""quota = "10 MB"

[[tenants.agents]]
login = "anna@acme.test"
password_hash = "{HASH}"
folders = ["INBOX"]

[[tenants.agents]]
login = "piotr@acme.test"
password_hash = "{HASH}"

[[tenants.agents]]
login = "ola@acme.test"
password_hash = "{HASH}"
role = "admin"
"""
ADMIN, AGENT, LIMITED = "ola@acme.test", "piotr@acme.test", "anna@acme.test"
NOPERM = b"[NOPERM] only the tenant's admins change Templates"


@pytest.fixture
def gateway(tmp_path: Path, db_url: str) -> Iterator[Gateway]:
    g = Gateway.start(tmp_path, db_url, AGENTS)
    try:
        yield g
    finally:
        g.daemon.stop()


def names(c: imaplib.IMAP4) -> set[str]:
    return {re.sub(rb'^\(.*?\) "/" ', b"", line).decode().strip('"') for line in answer_all(c.list())}


def answer_all(response: tuple[str, list[bytes]]) -> list[bytes]:
    typ, data = response
    assert typ == "OK", data
    return data


def used_kib(c: imaplib.IMAP4) -> int:
    """The tenant's usage, as GETQUOTAROOT of Templates tells it (units of 1024 octets)."""
    _, (_, quotas) = c.getquotaroot("Templates")
    found = re.search(rb'^"" \(STORAGE (\d+) \d+\)', quotas[0])
    assert found is not None, quotas
    return int(found.group(1))


def test_templates_is_listed_for_every_agent(gateway: Gateway) -> None:
    for login in (ADMIN, AGENT, LIMITED):
        c = gateway.imap(login)
        assert "Templates" in names(c), login
        c.logout()
    c = gateway.imap(LIMITED)
    assert names(c) == {"INBOX", "Templates"}  # its folders list, and the tenant's templates
    c.logout()


def test_an_admins_template_is_read_by_every_agent_and_counts_toward_the_quota(gateway: Gateway) -> None:
    c = gateway.imap(ADMIN)
    before = used_kib(c)
    assert re.match(
        rb"\[APPENDUID \d+ 1\] APPEND completed", answer(c.append("Templates", None, None, TEMPLATE))
    )
    assert used_kib(c) == before + -(-len(TEMPLATE) // 1024)
    answer(c.select("Templates"))  # read-write for an admin
    c.logout()
    for login in (AGENT, LIMITED):
        c = gateway.imap(login)
        with pytest.raises(c.readonly, match="not writable"):
            c.select("Templates")  # an agent's SELECT is an EXAMINE
        c.is_readonly = True
        assert answer(c.fetch("1", "(BODY[])")) == TEMPLATE
        assert b"\\Seen" not in answer(c.fetch("1", "(FLAGS)"))  # shared: reading does not mark it
        c.logout()


def test_an_agents_writes_to_templates_answer_noperm(gateway: Gateway) -> None:
    c = gateway.imap(ADMIN)
    answer(c.append("Templates", None, None, TEMPLATE))
    answer(c.append("INBOX", None, None, message(1)))
    c.logout()
    for login in (AGENT, LIMITED):
        c = gateway.imap(login)
        assert answer(c.append("Templates", None, None, TEMPLATE), "NO") == NOPERM
        assert answer(c.create("Templates/Offers"), "NO") == NOPERM
        assert answer(c.delete("Templates"), "NO") == NOPERM
        assert answer(c.rename("Templates", "Old"), "NO") == NOPERM
        answer(c.select("INBOX"))
        assert answer(c.copy("1", "Templates"), "NO") == NOPERM
        assert answer(c._simple_command("MOVE", "1", "Templates"), "NO") == NOPERM  # type: ignore[attr-defined]
        with pytest.raises(c.readonly):
            c.select("Templates")
        c.is_readonly = True
        assert answer(c.store("1", "+FLAGS", "(\\Deleted)"), "NO") == NOPERM
        assert answer(c.expunge(), "NO") == NOPERM
        assert answer(c._simple_command("MOVE", "1", "INBOX"), "NO") == NOPERM  # type: ignore[attr-defined]
        c.logout()
    c = gateway.imap(AGENT)
    assert answer(c.rename("Archive", "Templates/Archive"), "NO") == NOPERM
    assert answer(c.status("Templates", "(MESSAGES)")).endswith(b"(MESSAGES 1)")
    c.logout()


def test_templates_is_made_again_for_an_existing_tenant(gateway: Gateway) -> None:
    c = gateway.imap(ADMIN)
    answer(c.delete("Templates"))  # an admin may; the tenant is then as one made before Templates was
    assert "Templates" not in names(c)
    gateway.reload(AGENTS)
    assert "Templates" in names(c)
    c.logout()

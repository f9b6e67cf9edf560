"""Self-tests of the private Dovecot helper (tests/dovecot.py) and the corpus (tests/corpus.py)."""

from __future__ import annotations

import email
import imaplib
import os
import socket
import ssl
import subprocess
from collections.abc import Iterator

import pytest

from tests import corpus
from tests.dovecot import Dovecot, dropping_proxy, imap_utf7, running_dovecot

ANNA, BOB = "anna@acme.test", "bob@beta.test"


@pytest.fixture
def server() -> Iterator[Dovecot]:
    """What the ``dovecot`` fixture gives, with two users."""
    with running_dovecot({ANNA: "anna-secret", BOB: "bob secret"}) as d:
        yield d


def crlf(message: bytes) -> bytes:
    """What Dovecot serves for a message: every bare LF becomes CRLF."""
    return message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def login(server: Dovecot, user: str, password: str) -> None:
    with imaplib.IMAP4(server.host, server.port, timeout=10) as c:
        c.login(user, password)


# --------------------------------------------------------------------------- corpus


def test_corpus_is_deterministic_and_well_formed() -> None:
    msgs = corpus.normal(50, size=2000, seed=3)
    assert msgs == corpus.normal(50, size=2000, seed=3)
    assert msgs != corpus.normal(50, size=2000, seed=4)
    ids = {email.message_from_bytes(m)["Message-ID"] for m in msgs}
    assert len(ids) == 50
    assert all(1900 <= len(m) <= 2000 and m.endswith(b"\r\n") for m in msgs)
    assert all(b"\n" not in m.replace(b"\r\n", b"") for m in msgs)
    first = email.message_from_bytes(msgs[0])
    assert all(first[h] for h in ("From", "To", "Subject", "Date"))


def test_corpus_large_and_malformed() -> None:
    big = corpus.large()
    assert len(big) == 2
    assert all(950_000 <= len(m) <= 1_000_100 for m in big)
    assert email.message_from_bytes(big[0]).get_payload()[1].get_payload(decode=True)  # type: ignore[index]
    named = corpus.malformed_named()
    assert corpus.malformed() == list(named.values())
    assert all(m and b"\0" not in m for m in named.values())
    assert b"\r" not in named["bare_lf"]
    assert b"Message-ID" not in named["no_message_id"]
    assert named["no_headers"].startswith(b"\r\n")
    assert b"\r\n\r\n" not in named["headers_only"]
    assert max(len(line) for line in named["long_header_line"].split(b"\r\n")) > 10_000
    assert b"X-Spam-Flag: YES\r\n" in named["spam_flag"]


def test_imap_utf7() -> None:
    assert imap_utf7("Zamówienia") == "Zam&APM-wienia"
    assert imap_utf7("A&B") == "A&-B"
    assert imap_utf7("日本語") == "&ZeVnLIqe-"


# --------------------------------------------------------------------------- Dovecot


@pytest.mark.peers
def test_append_reads_back_byte_exact_per_user(server: Dovecot) -> None:
    mine, theirs = corpus.normal(2, size=3000, seed=1)
    assert server.append(ANNA, "INBOX", mine) == 1
    assert server.append(BOB, "Zamówienia", theirs, flags="\\Seen", date="01-Jan-2024 10:00:00 +0000") == 1
    assert server.messages(ANNA) == [mine]
    assert server.messages(BOB) == []
    [got] = server.fetch(BOB, "Zamówienia")
    assert got.body == theirs
    assert "\\Seen" in got.flags
    assert got.internaldate == "01-Jan-2024 10:00:00 +0000"  # maildir keeps no zone
    # Unusual messages: byte-exact except that bare LFs are served as CRLF.
    odd = corpus.malformed()
    for message in odd:
        server.append(ANNA, "Odd", message)
    assert server.messages(ANNA, "Odd") == [crlf(m) for m in odd]


@pytest.mark.peers
def test_users_can_be_added_without_restart(server: Dovecot) -> None:
    with pytest.raises(imaplib.IMAP4.error):
        login(server, "carol@acme.test", "pw")
    server.add_user("carol@acme.test", "pw")
    with server.connect("carol@acme.test") as c:
        assert c.select("INBOX")[0] == "OK"
    server.add_user("carol@acme.test", "new")  # same length: the mtime bump makes Dovecot reread
    with pytest.raises(imaplib.IMAP4.error):
        login(server, "carol@acme.test", "pw")
    with server.connect("carol@acme.test") as c:
        typ, data = c.list()
    assert typ == "OK"
    assert any(b"\\Junk" in d and d.endswith(b"Junk") for d in data if isinstance(d, bytes))


@pytest.mark.peers
def test_deliver_files_are_seen_by_select(server: Dovecot) -> None:
    msgs = corpus.normal(200, size=2000)
    server.deliver_files(ANNA, "Orders", msgs)
    server.deliver_files(ANNA, "INBOX", msgs[:3], flags="S")
    with server.connect(ANNA) as c:
        typ, data = c.select("Orders")
        assert (typ, data) == ("OK", [b"200"])
    assert server.messages(ANNA, "Orders") == msgs  # UIDs follow the list order
    inbox = server.fetch(ANNA)
    assert [m.body for m in inbox] == msgs[:3]
    assert all("\\Seen" in m.flags for m in inbox)
    server.deliver_files(ANNA, "Orders", msgs[:1])  # later files get later UIDs
    assert server.exists(ANNA, "Orders") == 201
    assert server.messages(ANNA, "Orders")[-1] == msgs[0]


@pytest.mark.peers
def test_imaps_port_with_trustme_ca(server: Dovecot) -> None:
    with server.connect(BOB, tls=True) as c:
        assert isinstance(c.sock, ssl.SSLSocket)
        assert c.select("INBOX")[0] == "OK"
    ctx = ssl.create_default_context(cafile=str(server.cafile))
    with imaplib.IMAP4_SSL("localhost", server.tls_port, ssl_context=ctx) as c:
        c.login(BOB, "bob secret")
    with pytest.raises(ssl.SSLCertVerificationError):
        imaplib.IMAP4_SSL(server.host, server.tls_port, ssl_context=ssl.create_default_context())


@pytest.mark.peers
@pytest.mark.parametrize("folder", ["Orders", "INBOX"])
def test_recreate_folder_changes_uidvalidity(server: Dovecot, folder: str) -> None:
    msgs = corpus.normal(5, size=1000)
    server.deliver_files(ANNA, folder, msgs[:3], flags="S")
    for m in msgs[3:]:
        server.append(ANNA, folder, m)
    before = server.fetch(ANNA, folder)
    old = server.uidvalidity(ANNA, folder)
    new = server.recreate_folder(ANNA, folder)
    assert new != old
    assert server.uidvalidity(ANNA, folder) == new
    after = server.fetch(ANNA, folder)
    assert [m.body for m in after] == [m.body for m in before] == msgs
    assert [set(m.flags) - {"\\Recent"} for m in after] == [set(m.flags) - {"\\Recent"} for m in before]
    assert [m.internaldate for m in after] == [m.internaldate for m in before]
    assert server.recreate_folder(ANNA, folder) not in (old, new)


@pytest.mark.peers
def test_dropping_proxy_drops_mid_fetch(server: Dovecot) -> None:
    [big] = corpus.large(1, size=300_000)
    server.append(ANNA, "INBOX", big)
    with dropping_proxy(server.port, 50_000, max_drops=1) as proxy:
        c = imaplib.IMAP4(proxy.host, proxy.port, timeout=10)
        c.login(ANNA, "anna-secret")
        c.select("INBOX")
        with pytest.raises((imaplib.IMAP4.abort, OSError)):
            c.uid("FETCH", "1", "(BODY.PEEK[])")
        c.shutdown()
        assert proxy.dropped == 1
        with imaplib.IMAP4(proxy.host, proxy.port, timeout=10) as again:  # only the first is dropped
            again.login(ANNA, "anna-secret")
            again.select("INBOX")
            _typ, data = again.uid("FETCH", "1", "(BODY.PEEK[])")
            assert data[0][1] == big  # type: ignore[index]
        assert proxy.connections == 2
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((proxy.host, proxy.port), timeout=1).close()


@pytest.mark.peers
def test_stop_leaves_no_process() -> None:
    d = Dovecot()
    d.start()
    d.add_user(ANNA, "pw")
    session = d.connect(ANNA)  # a live imap process at stop time
    session.select("INBOX")
    name, root = d.name, d.root
    assert subprocess.run(["pgrep", "-f", str(d.conf_path)], capture_output=True, check=False).returncode == 0
    assert len(subprocess.run(["pgrep", "-f", name], capture_output=True, check=False).stdout.split()) > 3
    d.stop()
    session.shutdown()
    for pattern in (str(d.conf_path), name):
        found = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True, check=False)
        assert found.returncode == 1, found.stdout
    assert not root.exists()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((d.host, d.port), timeout=1).close()


def test_dovecot_started_under_the_daemons_umask_still_authenticates() -> None:
    """CI defect: a test that ran mailgate's CLI in-process left the process umask at 0027, and every
    Dovecot started after it answered logins with "Temporary authentication failure"."""
    old = os.umask(0o027)
    try:
        with running_dovecot({ANNA: "anna-secret"}) as d:
            login(d, ANNA, "anna-secret")
    finally:
        os.umask(old)

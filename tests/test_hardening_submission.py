"""Issue #10, defects 8 and 9: envelope and header checks on submission; private files.

Each test is named for the defect it guards against and failed on the code
before the fix.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.test_submission import PASSWORD, Gateway, start_gateway

SMARTHOST = {"host": "127.0.0.1", "port": 9, "security": "none", "from": "biuro@acme.test"}


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """SQLite only: SMTP policy does not depend on the storage engine."""
    return f"sqlite+aiosqlite:///{tmp_path / 'mailgate.db'}"


@pytest.fixture
async def gateway(tmp_path: Path, db_url: str) -> AsyncIterator[Gateway]:
    g = await start_gateway(tmp_path, db_url, SMARTHOST)
    yield g
    await g.submission.stop()
    await g.db.close()


def _session(port: int, commands: list[bytes], data: bytes | None = None) -> list[bytes]:
    """One reply line (the last of a multi-line reply) per command, after AUTH as anna."""
    token = base64.b64encode(f"\0anna@acme.test\0{PASSWORD}".encode())
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        f = sock.makefile("rb")

        def reply() -> bytes:
            while (line := f.readline())[3:4] == b"-":
                pass
            return line

        replies = [reply()]
        for command in [b"EHLO client.test", b"AUTH PLAIN " + token, *commands]:
            sock.sendall(command + b"\r\n")
            replies.append(reply())
        if data is not None:
            sock.sendall(data + b".\r\n")
            replies.append(reply())
        return replies[3:]


def _message(head: str) -> bytes:
    return (head + "To: customer@example.org\r\nSubject: Re: order\r\n\r\nThanks.\r\n").encode()


async def test_defect8_nul_in_envelope_is_refused(gateway: Gateway) -> None:
    port = gateway.submission.port
    (mail,) = await asyncio.to_thread(_session, port, [b"MAIL FROM:<biuro\x00x@acme.test>"])
    assert mail.startswith(b"501 5.1.7"), mail
    _, rcpt = await asyncio.to_thread(
        _session, port, [b"MAIL FROM:<biuro@acme.test>", b"RCPT TO:<customer\x00@example.org>"]
    )
    assert rcpt.startswith(b"501 5.1.3"), rcpt


@pytest.mark.parametrize(
    "sender",
    [b'"office@beta.test"@acme.test', b"office%beta.test@acme.test", b"beta.test!office@acme.test"],
)
async def test_defect8_deceptive_owned_senders_are_refused(gateway: Gateway, sender: bytes) -> None:
    (mail,) = await asyncio.to_thread(_session, gateway.submission.port, [b"MAIL FROM:<" + sender + b">"])
    assert mail.startswith(b"553 5.7.1"), mail


@pytest.mark.parametrize(
    ("head", "refused"),
    [
        ("From: CEO <ceo@beta.test>\r\n", b"553 5.7.1 From: <ceo@beta.test>"),
        ("From: Biuro <biuro@acme.test>\r\nSender: office@beta.test\r\n", b"553 5.7.1 Sender:"),
        ('From: "office@beta.test"@acme.test\r\n', b"553 5.7.1 From:"),
        ("From: biuro@acme.test, ceo@beta.test\r\n", b"553 5.7.1 From: <ceo@beta.test>"),
        ("", b"553 5.7.1 The message has no From:"),
        ("From: Biuro <biuro@acme.test>\r\n", b"250 "),
    ],
)
async def test_defect8_header_sender_must_be_the_tenants(gateway: Gateway, head: str, refused: bytes) -> None:
    commands = [b"MAIL FROM:<biuro@acme.test>", b"RCPT TO:<customer@example.org>", b"DATA"]
    *_, data = await asyncio.to_thread(_session, gateway.submission.port, commands, _message(head))
    assert data.startswith(refused), data
    sent = await gateway.folder("Sent")
    assert len(sent) == (1 if refused == b"250 " else 0)


def test_defect9_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    config = tmp_path / "mailgate.toml"
    config.write_text(
        f'[gateway]\ndata_dir = "{tmp_path / "var"}"\n'
        f'[listen]\nsmtp = "127.0.0.1:{free_port()}"\n'
        f'[snapshots]\ndir = "{tmp_path / "snapshots"}"\n'
        '[[tenants]]\nid = "acme"\ndomains = ["acme.test"]\n'
    )
    for command in (["migrate"], ["snapshot", "create"]):
        subprocess.run(
            [sys.executable, "-m", "gateway", "-c", str(config), *command],
            cwd=tmp_path,
            check=True,
            capture_output=True,
            preexec_fn=lambda: os.umask(0o022),
        )
    made = [p for p in (tmp_path / "var").rglob("*") if "blobs" not in p.parts]
    made += list((tmp_path / "snapshots").rglob("*"))
    assert any(p.name == "mailgate.db" for p in made)
    assert any(p.is_file() for p in (tmp_path / "snapshots").rglob("*"))
    loose = {
        str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode))
        for p in made
        if p.stat().st_mode & 0o027
    }
    assert loose == {}

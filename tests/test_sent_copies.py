"""Sent copies once (issue #11): a client's own copy of a reply mailgate already filed is not stored again.

Thunderbird submits a reply, then APPENDs the very bytes it sent to Sent with
``\\Seen``; Outlook APPENDs its own rendering (other headers, a Bcc line, the
same Message-ID). With ``save_sent = "auto"`` (the default) both leave one
copy: mailgate's, whose UID the APPEND's APPENDUID names. ``always`` keeps
both, ``never`` leaves the client's only. Real listeners in-process: the
submission server of tests/test_relay.py and the IMAP server, with smtplib
and imaplib as the clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import imaplib
import re
import smtplib
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from gateway.config import Config, parse_config
from gateway.imap.server import IMAPServer
from storage.models import Message
from tests.conftest import config_dict
from tests.test_relay import HASH, PASSWORD, SENDER, Gateway, running

pytestmark = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning")

REPLY = (
    b"From: Biuro <biuro@acme.test>\r\nTo: customer@example.org\r\nSubject: Re: order 17\r\n"
    b"Date: Wed, 02 Dec 2026 10:00:00 +0100\r\nMessage-ID: <reply-1@acme.test>\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nIt ships today.\r\n"
)
# What Outlook files: its own headers, a Bcc the SMTP copy never carried, the same Message-ID.
OUTLOOK = REPLY.replace(b"Subject:", b"Bcc: boss@acme.test\r\nX-MS-Exchange-Organization: x\r\nSubject:")


def config(tmp_path: Path, db_url: str, save_sent: dict[str, str] | None = None) -> Config:
    data = config_dict(tmp_path, db_url)
    agents = [
        {"login": "anna@acme.test", "password_hash": HASH},
        {"login": "piotr@acme.test", "password_hash": HASH},
    ]
    for agent in agents:
        if save_sent and agent["login"] in save_sent:
            agent["save_sent"] = save_sent[agent["login"]]
    data["tenants"][0]["agents"] = agents
    data["tenants"][0]["smtp"] = {"host": "127.0.0.1", "port": 9, "security": "none", "from": SENDER}
    return parse_config(data)


@contextlib.asynccontextmanager
async def gateway_with_imap(cfg: Config) -> AsyncIterator[tuple[Gateway, int]]:
    async with running(cfg) as g:
        imap = IMAPServer(g.current, g.db, g.blobs, g.auth, g.changes)
        await imap.start("127.0.0.1", 0)
        try:
            yield g, imap.port
        finally:
            await imap.stop()


def submit(port: int, login: str, data: bytes = REPLY) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
        c.login(login, PASSWORD)
        assert c.sendmail(SENDER, ["customer@example.org"], data) == {}


def append(port: int, login: str, data: bytes, folder: str = "Sent") -> tuple[int, int]:
    """The client's APPEND (with \\Seen, as Thunderbird and Outlook do); (APPENDUID uid, messages in it)."""
    c = imaplib.IMAP4("127.0.0.1", port, timeout=10)
    c.login(login, PASSWORD)
    typ, answer = c.append(folder, "\\Seen", None, data)
    assert typ == "OK", answer
    match = re.search(rb"APPENDUID \d+ (\d+)", answer[0])
    assert match, answer
    typ, count = c.select(folder, readonly=True)
    c.logout()
    return int(match[1]), int(count[0])


async def run(fn: Any, *args: Any) -> Any:
    return await asyncio.to_thread(fn, *args)


@pytest.mark.parametrize("client_copy", [REPLY, OUTLOOK], ids=["thunderbird", "outlook"])
async def test_clients_own_sent_copy_is_not_stored_twice(
    tmp_path: Path, db_url: str, client_copy: bytes
) -> None:
    async with gateway_with_imap(config(tmp_path, db_url)) as (g, imap_port):
        await run(submit, g.submission.port, "anna@acme.test")
        (mailgate_copy,) = await g.folder("Sent")
        uid, count = await run(append, imap_port, "anna@acme.test", client_copy)
        assert (uid, count) == (1, 1)  # the APPENDUID names mailgate's copy; nothing new stored
        assert await g.folder("Sent") == [mailgate_copy]


async def test_other_agents_other_folders_and_old_copies_are_stored(tmp_path: Path, db_url: str) -> None:
    async with gateway_with_imap(config(tmp_path, db_url)) as (g, imap_port):
        await run(submit, g.submission.port, "anna@acme.test")
        # Another agent's APPEND of a message with that Message-ID is theirs to keep.
        assert await run(append, imap_port, "piotr@acme.test", REPLY) == (2, 2)
        # Another folder than Sent stores it.
        assert (await run(append, imap_port, "anna@acme.test", REPLY, "INBOX"))[1] == 1
        # After 24 hours it is a new copy too.
        async with g.db.write() as s:
            for message in (await s.scalars(select(Message))).all():
                message.received_at -= timedelta(hours=25)
        assert await run(append, imap_port, "anna@acme.test", REPLY) == (3, 3)


@pytest.mark.parametrize(("save_sent", "copies"), [("always", 2), ("never", 1)])
async def test_save_sent_always_and_never(tmp_path: Path, db_url: str, save_sent: str, copies: int) -> None:
    cfg = config(tmp_path, db_url, {"anna@acme.test": save_sent})
    async with gateway_with_imap(cfg) as (g, imap_port):
        await run(submit, g.submission.port, "anna@acme.test")
        assert len(await g.folder("Sent")) == copies - 1  # never: mailgate files nothing
        _, count = await run(append, imap_port, "anna@acme.test", REPLY)
        assert count == copies
        assert len(await g.queued()) == 1  # the reply is relayed either way

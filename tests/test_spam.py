"""The spam filter on every inbound path, against a private rspamd (tests/rspamd.py).

Relay-in: GTUBE is refused with ``550 5.7.1`` and rspamd's message; a message
rspamd scores as ``add header`` lands in ``\\Junk`` with its score and an
``Authentication-Results:`` header, and the score in the database. Pull: the
same message from an upstream Dovecot lands in ``\\Junk``. rspamd down:
``on_error`` decides (``451`` and nothing stored, or stored unscanned with a
header saying so), the error metric counts, and a restarted rspamd is used
again without restarting anything.
"""

from __future__ import annotations

import asyncio
import imaplib
import smtplib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from gateway import metrics
from gateway.auth import Authenticator
from gateway.config import Config, TenantSpamSection, parse_config
from gateway.daemon import open_store
from gateway.imap.server import IMAPServer
from gateway.ingest import Delivery, Pipeline
from gateway.message import parse_headers
from gateway.notify import Changes
from gateway.pull.puller import FolderPuller, HostLimits, jobs
from gateway.smtp.server import RelayServer
from gateway.spam import Filter, Learner, Result
from storage import mailstore
from storage.blobs import BlobStore
from storage.db import Database
from storage.models import Message, SpamVerdict
from tests.conftest import config_dict
from tests.dovecot import Dovecot
from tests.rspamd import ADD_HEADER_SUBJECT, GTUBE, Rspamd

pytestmark = pytest.mark.peers

PASSWORD = "upstream-secret"


def message(subject: str, body: str = "Hello there.", mid: str = "m1") -> bytes:
    return (
        f"From: Customer <customer@example.org>\r\nTo: biuro@acme.test\r\nSubject: {subject}\r\n"
        f"Message-ID: <{mid}@example.org>\r\nDate: Fri, 04 Dec 2026 10:00:00 +0000\r\n\r\n{body}\r\n"
    ).encode()


class Env:
    """A relay-in listener and a puller on one store, with the spam filter on."""

    def __init__(self, config: Config, db: Database, blobs: BlobStore) -> None:
        self.config, self.db, self.blobs = config, db, blobs
        self.data: dict[str, Any] = {}  # what config was parsed from
        self.filter = Filter(lambda: self.config)
        self.pipeline = Pipeline(db, blobs, spam_filter=self.filter)
        self.server = RelayServer(lambda: self.config, self.pipeline)

    def set_spam(self, **spam: Any) -> None:
        self.config = self.config.model_copy(update={"spam": self.config.spam.model_copy(update=spam)})

    def send(self, data: bytes, rcpt: str = "biuro@acme.test") -> str:
        """The reply to DATA, e.g. ``250 2.0.0 OK ...``, ``550 5.7.1 ...``."""
        with smtplib.SMTP("127.0.0.1", self.server.port, timeout=30) as c:
            try:
                c.sendmail("customer@example.org", [rcpt], data)
            except smtplib.SMTPDataError as exc:
                return f"{exc.smtp_code} {exc.smtp_error.decode()}"
        return "250"

    async def stored(self, folder: str) -> list[bytes]:
        async with self.db.read() as s:
            f = await mailstore.get_folder(s, "acme", folder)
            if f is None:
                return []
            blobs = (await s.scalars(select(Message.blob).where(Message.folder_id == f.id))).all()
        return [await self.blobs.get(b) for b in blobs]

    async def verdicts(self) -> list[SpamVerdict]:
        async with self.db.read() as s:
            return list((await s.scalars(select(SpamVerdict))).all())

    async def pull(self, mailbox: str) -> int:
        (job,) = [j for j in jobs(self.config) if j.mailbox.name == mailbox and j.folder == "INBOX"]
        puller = FolderPuller(job, lambda: self.config, self.pipeline, self.db, HostLimits())
        client = await puller.connect()
        try:
            return await puller.sync(client)
        finally:
            await client.logout()


@pytest.fixture
async def env(
    tmp_path: Path, db_url: str, rspamd: Rspamd, dovecot: Dovecot, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Env]:
    monkeypatch.setenv("MAILGATE_TEST_UPSTREAM", PASSWORD)
    dovecot.add_user("biuro", PASSWORD)
    box = dovecot.mailbox("biuro")
    data = config_dict(tmp_path, db_url, mailboxes=[box])
    data["spam"] = {"engine": "rspamd", "url": rspamd.url, "timeout": "5s", "on_error": "tempfail"}
    config = parse_config(data)
    db, blobs = await open_store(config)
    e = Env(config, db, blobs)
    e.data = data
    await e.server.start("127.0.0.1", 0)
    yield e
    await e.server.stop()
    await e.filter.aclose()
    await db.close()


async def test_gtube_over_relay_in_is_refused_with_rspamds_message(env: Env) -> None:
    reply = await asyncio.to_thread(env.send, message("offer", GTUBE))
    assert reply.startswith("550 5.7.1 ")
    assert "Gtube pattern" in reply
    assert await env.stored("INBOX") == []
    assert await env.stored("Spam") == []


async def test_add_header_lands_in_junk_with_score_and_authentication_results(env: Env) -> None:
    assert await asyncio.to_thread(env.send, message(f"cheap {ADD_HEADER_SUBJECT}")) == "250"
    (stored,) = await env.stored("Spam")
    headers = parse_headers(stored)
    assert headers.get_all("x-spam-action") == ("add header",)
    (score,) = headers.get_all("x-spam-score")
    assert float(score.split("/")[0]) >= 6
    (auth,) = headers.get_all("authentication-results")
    assert auth.startswith("mx.test; ")
    assert "spf=" in auth
    assert "dkim=" in auth
    assert "dmarc=" in auth
    assert headers.get_all("x-spam-flag") == ("YES",)
    assert stored.endswith(message(f"cheap {ADD_HEADER_SUBJECT}"))
    (verdict,) = await env.verdicts()
    assert verdict.action == "add header"
    assert verdict.score is not None
    assert verdict.score >= 6
    assert verdict.reason.startswith("rspamd: add header, score ")


async def test_ham_goes_to_the_inbox_with_its_score(env: Env) -> None:
    assert await asyncio.to_thread(env.send, message("hello")) == "250"
    (stored,) = await env.stored("INBOX")
    headers = parse_headers(stored)
    assert headers.get_all("x-spam-action") == ("no action",)
    assert headers.get_all("x-spam-flag") == ()
    (verdict,) = await env.verdicts()
    assert verdict.reason == ""
    assert verdict.score is not None


async def test_a_rule_still_says_spam_and_is_the_reason(env: Env) -> None:
    rule = {
        "name": "spam-words",
        "conditions": [{"field": "subject", "op": "contains", "value": "lottery"}],
        "actions": [{"spam": True}],
    }
    env.data["tenants"][0]["rules"] = [rule]
    env.config = parse_config(env.data)
    assert await asyncio.to_thread(env.send, message("lottery win")) == "250"
    assert len(await env.stored("Spam")) == 1
    (verdict,) = await env.verdicts()
    assert verdict.reason == "a rule says so"
    assert verdict.action == "no action"


async def test_pulled_add_header_message_lands_in_junk(env: Env, dovecot: Dovecot) -> None:
    dovecot.append("biuro", "INBOX", message(f"cheap {ADD_HEADER_SUBJECT}", mid="pulled"))
    dovecot.append("biuro", "INBOX", message("hello", mid="pulled-ham"))
    assert await env.pull("biuro") == 2
    (junk,) = await env.stored("Spam")
    assert parse_headers(junk).get_all("x-spam-action") == ("add header",)
    assert parse_headers(junk).get_all("authentication-results")
    (ham,) = await env.stored("INBOX")
    assert parse_headers(ham).get_all("x-spam-action") == ("no action",)


async def test_rspamd_down_tempfail_then_accept_then_restarted(env: Env, rspamd: Rspamd) -> None:
    errors = metrics.SPAM_CHECK_ERRORS._value.get()
    rspamd.stop()
    try:
        reply = await asyncio.to_thread(env.send, message("hello", mid="down1"))
        assert reply.startswith("451 4.7.1 ")
        assert await env.stored("INBOX") == []
        assert await env.stored("Spam") == []
        assert metrics.SPAM_CHECK_ERRORS._value.get() == errors + 1

        env.set_spam(on_error="accept")
        assert await asyncio.to_thread(env.send, message("hello", mid="down2")) == "250"
        (stored,) = await env.stored("INBOX")
        (action,) = parse_headers(stored).get_all("x-spam-action")
        assert action.startswith("unscanned (rspamd unreachable")
        assert metrics.SPAM_CHECK_ERRORS._value.get() == errors + 2
    finally:
        rspamd.start()
    # The same filter (its pool) scans again: no mailgate restart.
    assert await asyncio.to_thread(env.send, message("hello", mid="up")) == "250"
    assert any(parse_headers(m).get_all("x-spam-action") == ("no action",) for m in await env.stored("INBOX"))
    assert metrics.SPAM_CHECK_ERRORS._value.get() == errors + 2


# -------------------------------------------------------------------- pure: rspamd's answer


def test_result_parses_rspamds_answer_and_maps_auth_symbols() -> None:
    body = (
        b'{"action": "add header", "score": 7.5, "required_score": 15.0, "messages": {},'
        b' "symbols": {"R_SPF_ALLOW": {}, "R_DKIM_REJECT": {}, "DMARC_POLICY_REJECT": {}}}'
    )
    r = Result.parse(body)
    assert r.auth == (("spf", "pass"), ("dkim", "fail"), ("dmarc", "fail"))
    block = r.header_block("mx.test", TenantSpamSection(), "a@example.org").decode()
    expected = "Authentication-Results: mx.test; spf=pass smtp.mailfrom=a@example.org; dkim=fail; dmarc=fail"
    assert expected in block
    with pytest.raises(ValueError, match="rspamd"):
        Result.parse(b'{"action": "explode"}')


def test_tenant_thresholds_override_rspamds_actions() -> None:
    r = Result(action="no action", score=5.0, required=15.0)
    assert not r.junk(TenantSpamSection())
    assert r.junk(TenantSpamSection(junk_score=4.0))
    assert r.refusal(TenantSpamSection(reject_score=5.0)) == "550 5.7.1 Message refused as spam"
    spam = Result(action="reject", score=20.0, required=15.0, message="bad\r\nline")
    assert spam.refusal(TenantSpamSection()) == "550 5.7.1 bad line"
    assert spam.refusal(TenantSpamSection(reject_score=30.0)) is None
    assert Result(action="greylist", score=4.0, required=15.0).refusal(TenantSpamSection()) == (
        "451 4.7.1 Try again later"
    )
    assert Result.unscanned("x").refusal(TenantSpamSection()) is None


# -------------------------------------------------------------------- learning from agents' moves

AGENT_PASSWORD = "agent-password"


def words(n: int) -> str:
    """A body of distinct words per message, enough tokens for rspamd's Bayes."""
    return " ".join(f"word{n}x{i} offer{i * n} item{n}y{i}" for i in range(30))


@pytest.fixture
async def imap_env(
    tmp_path: Path, db_url: str, rspamd: Rspamd
) -> AsyncIterator[tuple[Env, IMAPServer, Learner]]:
    from argon2 import PasswordHasher

    data = config_dict(tmp_path, db_url)
    data["tenants"][0]["agents"] = [
        {
            "login": "anna@acme.test",
            "password_hash": PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash(
                AGENT_PASSWORD
            ),
        }
    ]
    data["spam"] = {"engine": "rspamd", "url": rspamd.url, "controller_url": rspamd.controller}
    config = parse_config(data)
    db, blobs = await open_store(config)
    e = Env(config, db, blobs)
    learner = Learner(e.filter, db, blobs)
    changes = Changes()
    server = IMAPServer(
        lambda: e.config, db, blobs, Authenticator(lambda: e.config, db), changes, learner=learner
    )
    await server.start("127.0.0.1", 0)
    yield e, server, learner
    await server.stop()
    await learner.drain()
    await e.filter.aclose()
    await db.close()


def move_all(port: int, source: str, target: str) -> str:
    c = imaplib.IMAP4("127.0.0.1", port, timeout=30)
    try:
        c.login("anna@acme.test", AGENT_PASSWORD)
        c.select(source)
        typ, data = c.uid("MOVE", "1:*", target)
        assert typ == "OK", data
        return (data[-1] or b"").decode()
    finally:
        c.logout()


async def wait_learned(rspamd: Rspamd, expected: int) -> int:
    """rspamd's ``stat`` count of learned messages, once it reaches ``expected`` (or after 30 s)."""
    for _ in range(300):
        if (learned := await asyncio.to_thread(rspamd.learned)) >= expected:
            return learned
        await asyncio.sleep(0.1)
    return await asyncio.to_thread(rspamd.learned)


async def test_agents_moves_teach_spam_and_ham_once_per_direction(
    imap_env: tuple[Env, IMAPServer, Learner], rspamd: Rspamd
) -> None:
    env, server, learner = imap_env
    tenant = env.config.tenant("acme")
    for n in range(20):
        raw = message(f"learn {n}", words(n), mid=f"learn{n}")
        await env.pipeline.deliver(tenant, raw, Delivery(source="smtp"))
    before = await asyncio.to_thread(rspamd.learned)
    spam0 = metrics.SPAM_LEARNED.labels("acme", "spam")._value.get()
    ham0 = metrics.SPAM_LEARNED.labels("acme", "ham")._value.get()

    await asyncio.to_thread(move_all, server.port, "INBOX", "Spam")
    await learner.drain()
    assert await wait_learned(rspamd, before + 20) == before + 20
    assert metrics.SPAM_LEARNED.labels("acme", "spam")._value.get() == spam0 + 20

    await asyncio.to_thread(move_all, server.port, "Spam", "INBOX")
    await learner.drain()
    assert await wait_learned(rspamd, before + 40) == before + 40
    assert metrics.SPAM_LEARNED.labels("acme", "ham")._value.get() == ham0 + 20

    # Back and forth again: each message was taught both classes already.
    await asyncio.to_thread(move_all, server.port, "INBOX", "Spam")
    await asyncio.to_thread(move_all, server.port, "Spam", "INBOX")
    await learner.drain()
    assert metrics.SPAM_LEARNED.labels("acme", "spam")._value.get() == spam0 + 20
    assert metrics.SPAM_LEARNED.labels("acme", "ham")._value.get() == ham0 + 20
    assert await asyncio.to_thread(rspamd.learned) == before + 40
    learned = {v.learned for v in await env.verdicts()}
    assert learned == {"ham,spam"}


async def test_private_rspamd_asks_the_loopback_dns_stub(env: Env, rspamd: Rspamd) -> None:
    """Regression (issue #18): the private rspamd's DNS options sat after Debian's options.inc and
    were ignored, so it asked the machine's resolver and some scans waited out its 1 s timeout."""
    answered = rspamd.dns.answered
    tenant = env.config.tenant("acme")
    for n in range(5):
        raw = message("hello", mid=f"dns{n}")
        scan = await env.filter.check(tenant, raw, mail_from="customer@example.org")
        assert scan is not None
        assert scan.action == "no action"
    assert rspamd.dns.answered >= answered + 5  # SPF and DMARC asked the stub

"""Forwarding that survives DMARC (issue #11): SRS envelope senders, From rewriting, bounces.

The pure parts (:mod:`gateway.srs`, :func:`gateway.forward.rewrite_from`) are
tested by tables and hypothesis; the whole path against the real relay-in
listener, the relay worker and the capture smarthost (``tests.smarthost``).
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import smtplib
import stat
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parseaddr
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import select

from gateway import srs
from gateway.config import Config, ConfigError, parse_config
from gateway.daemon import open_store
from gateway.forward import load_signer, rewrite_from, srs_domain
from gateway.ingest import Delivery, Pipeline
from gateway.notify import Changes
from gateway.relay.worker import RelayWorker
from gateway.smtp.outbox import Outbox
from gateway.smtp.server import RelayServer
from storage import mailstore, queue
from storage.blobs import BlobStore
from storage.db import Database
from storage.models import Message
from tests.conftest import config_dict
from tests.smarthost import Received, Smarthost

NOW = datetime(2025, 3, 14, 12, 0, tzinfo=UTC)
KEY = b"k" * 32
SIGNER = srs.Signer((KEY,))


# --------------------------------------------------------------------------- SRS, pure


def test_srs_forward_has_the_srs0_form() -> None:
    address = SIGNER.forward("Jan.Kowalski@Example.org", "acme.test", NOW)
    local, _, domain = address.partition("@")
    tag, mac, stamp, orig_domain, orig_local = local.split("=")
    assert (tag, orig_domain, orig_local, domain) == ("SRS0", "Example.org", "Jan.Kowalski", "acme.test")
    assert len(mac) == srs.HASH_CHARS
    assert mac.isupper()
    days = int(NOW.timestamp() // 86400) % 1024
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
    assert stamp == alphabet[days >> 5] + alphabet[days & 31]


def test_srs_null_sender_stays_null() -> None:
    assert SIGNER.forward("", "acme.test", NOW) == ""


def _valid() -> str:
    return SIGNER.forward("customer@example.org", "acme.test", NOW)


def _replace_hash(address: str, mac: str) -> str:
    parts = address.split("=")
    parts[1] = mac
    return "=".join(parts)


def _flipped(address: str) -> str:
    mac = address.split("=")[1]
    return _replace_hash(address, ("B" if mac[0] == "A" else "A") + mac[1:])


REVERSE_CASES: list[tuple[str, Callable[[], str], datetime, type[srs.SRSError] | str]] = [
    ("valid", _valid, NOW, "customer@example.org"),
    ("lower-cased by a server", lambda: _valid().lower(), NOW, "customer@example.org"),
    ("upper-cased by a server", lambda: _valid().upper(), NOW, "CUSTOMER@EXAMPLE.ORG"),
    ("at the maximum age", _valid, NOW + timedelta(days=21), "customer@example.org"),
    ("one day too old", _valid, NOW + timedelta(days=22), srs.Expired),
    ("from the future", _valid, NOW - timedelta(days=1), srs.Expired),
    ("a changed hash", lambda: _flipped(_valid()), NOW, srs.Forged),
    ("a short hash", lambda: _replace_hash(_valid(), "ABCD"), NOW, srs.Forged),
    ("a non-base32 hash", lambda: _replace_hash(_valid(), "ABCDEFG1"), NOW, srs.Forged),
    ("a non-ASCII hash", lambda: _replace_hash(_valid(), "ABCDEFGÄ"), NOW, srs.Forged),
    (
        "another key",
        lambda: srs.Signer((b"x" * 32,)).forward("c@example.org", "acme.test", NOW),
        NOW,
        srs.Forged,
    ),
    ("another SRS domain", lambda: _valid().replace("@acme.test", "@beta.test"), NOW, srs.Forged),
    ("another original", lambda: _valid().replace("=customer@", "=ceo@"), NOW, srs.Forged),
    ("no SRS0 tag", lambda: _valid().replace("SRS0=", "SRS1="), NOW, srs.Malformed),
    ("too few parts", lambda: "SRS0=ABCDEFGH=AA=example.org@acme.test", NOW, srs.Malformed),
    ("an empty part", lambda: "SRS0=ABCDEFGH=AA==x@acme.test", NOW, srs.Malformed),
    ("a bad timestamp", lambda: "SRS0=ABCDEFGH=A1=example.org=x@acme.test", NOW, srs.Malformed),
    ("a long timestamp", lambda: "SRS0=ABCDEFGH=AAA=example.org=x@acme.test", NOW, srs.Malformed),
    ("no domain", lambda: "SRS0=ABCDEFGH=AA=example.org=x", NOW, srs.Malformed),
]


@pytest.mark.parametrize(
    ("address", "now", "expected"), [c[1:] for c in REVERSE_CASES], ids=[c[0] for c in REVERSE_CASES]
)
def test_srs_reverse(address: Callable[[], str], now: datetime, expected: type[srs.SRSError] | str) -> None:
    if isinstance(expected, str):
        assert SIGNER.reverse(address(), now) == expected
    else:
        with pytest.raises(expected):
            SIGNER.reverse(address(), now)


def test_srs_timestamp_wraps_every_1024_days() -> None:
    # Signed on the last day of a 1024-day period, reversed in the next one.
    last = datetime.fromtimestamp((1024 * 20 - 1) * 86400 + 3600, UTC)
    address = SIGNER.forward("a@b.test", "acme.test", last)
    assert SIGNER.reverse(address, last + timedelta(days=2)) == "a@b.test"
    with pytest.raises(srs.Expired):
        SIGNER.reverse(address, last + timedelta(days=30))


def test_srs_rotation_old_keys_verify_the_first_signs() -> None:
    old = srs.Signer((b"old-key-old-key-old-key",))
    rotated = srs.Signer((b"new-key-new-key-new-key", b"old-key-old-key-old-key"))
    before = old.forward("a@b.test", "acme.test", NOW)
    assert rotated.reverse(before, NOW) == "a@b.test"
    after = rotated.forward("a@b.test", "acme.test", NOW)
    assert after != before
    with pytest.raises(srs.Forged):
        old.reverse(after, NOW)


def test_srs_signer_keeps_its_keys_out_of_its_repr() -> None:
    assert "k" * 8 not in repr(SIGNER)
    with pytest.raises(ValueError, match="non-empty key"):
        srs.Signer(())
    with pytest.raises(ValueError, match="max_age_days"):
        srs.Signer((KEY,), max_age_days=1024)


_LOCAL = st.text(st.sampled_from("abcXYZ019.+-_=!#$%&'*/?^`{|}~"), min_size=1, max_size=40)
_LABEL = st.text(st.sampled_from("abcxyz019-"), min_size=1, max_size=12).filter(
    lambda s: not s.startswith("-")
)
_DOMAIN = st.lists(_LABEL, min_size=1, max_size=3).map(".".join)
_WHEN = st.datetimes(min_value=datetime(1990, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC))


@given(local=_LOCAL, domain=_DOMAIN, srs_dom=_DOMAIN, when=_WHEN, age=st.integers(0, 21), upper=st.booleans())
def test_srs_round_trip(local: str, domain: str, srs_dom: str, when: datetime, age: int, upper: bool) -> None:
    address = SIGNER.forward(f"{local}@{domain}", srs_dom, when)
    assert srs.is_srs(address)
    seen = address.upper() if upper else address
    original = SIGNER.reverse(seen, when + timedelta(days=age))
    assert original == (f"{local}@{domain}".upper() if upper else f"{local}@{domain}")


@given(text=st.text(max_size=80), when=_WHEN)
def test_srs_reverse_only_raises_srs_errors(text: str, when: datetime) -> None:
    with contextlib.suppress(srs.SRSError):
        SIGNER.reverse(text, when)
        SIGNER.reverse("SRS0=" + text, when)


# --------------------------------------------------------------------------- From rewriting, pure

ORIGINAL = (
    b"Received: from mx.example.org\r\n\tby mx.test; Fri, 14 Mar 2025 12:00:00 +0000\r\n"
    b"From: =?UTF-8?Q?Jan_Kowalski_=C5=81=C3=B3d=C5=BA?=\r\n <jan@example.org>\r\n"
    b"To: biuro@acme.test\r\n"
    b"Subject: =?UTF-8?Q?Zam=C3=B3wienie?= 12\r\n"
    b"Message-ID: <m1@example.org>\r\n"
    b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org; h=from:to:subject; b=abc\r\n"
    b"\r\n"
    b"From the body: not a header.\r\n"
)


def _without(raw: bytes, *names: bytes) -> bytes:
    """``raw`` without the header fields ``names`` (with their continuation lines)."""
    out, skipping, in_header = [], False, True
    for line in raw.splitlines(keepends=True):
        if in_header and line in (b"\r\n", b"\n"):
            in_header = False
        elif in_header and line[:1] in b" \t" and line[:1]:
            if skipping:
                continue
        elif in_header:
            skipping = line.split(b":", 1)[0].lower() in names
            if skipping:
                continue
        out.append(line)
    return b"".join(out)


def _parsed(raw: bytes) -> email.message.Message:
    return email.message_from_bytes(raw, policy=email.policy.default)


def test_rewrite_from_keeps_the_name_adds_via_and_reply_to() -> None:
    out = rewrite_from(ORIGINAL, address="biuro@acme.test", via="ACME")
    message = _parsed(out)
    assert parseaddr(str(message["From"])) == ("Jan Kowalski Łódź via ACME", "biuro@acme.test")
    assert (
        out.count(b"\r\nReply-To: =?UTF-8?Q?Jan_Kowalski_=C5=81=C3=B3d=C5=BA?=\r\n <jan@example.org>\r\n")
        == 1
    )
    # Everything else byte for byte, the body's "From" line included.
    assert _without(out, b"from", b"reply-to") == _without(ORIGINAL, b"from")
    assert out.index(b"\r\nFrom: ") < out.index(b"\r\nReply-To: ") < out.index(b"\r\nTo: ")


@pytest.mark.parametrize(
    ("from_field", "new_from"),
    [
        (b"From: jan@example.org", b'From: "jan@example.org via ACME" <biuro@acme.test>'),
        (b"From: <jan@example.org>", b'From: "jan@example.org via ACME" <biuro@acme.test>'),
        (b'From: "Kowalski, Jan" <jan@example.org>', b'From: "Kowalski, Jan via ACME" <biuro@acme.test>'),
        (b"From: jan@example.org (Jan K)", b"From: Jan K via ACME <biuro@acme.test>"),
        (b"From: =?bogus?Q?Jan?= <jan@example.org>", b"From: =?bogus?Q?Jan?= via ACME <biuro@acme.test>"),
        (b"From:", b"From: ACME <biuro@acme.test>"),
    ],
)
def test_rewrite_from_display_names(from_field: bytes, new_from: bytes) -> None:
    raw = from_field + b"\r\nTo: biuro@acme.test\r\n\r\nbody\r\n"
    out = rewrite_from(raw, address="biuro@acme.test", via="ACME")
    assert out == new_from + b"\r\nReply-To:" + from_field[5:] + b"\r\nTo: biuro@acme.test\r\n\r\nbody\r\n"


def test_rewrite_from_keeps_an_existing_reply_to() -> None:
    raw = b"From: Jan <jan@example.org>\nReply-To: orders@example.org\nSubject: x\n\nbody\n"
    out = rewrite_from(raw, address="biuro@acme.test", via="ACME")
    assert out == b"From: Jan via ACME <biuro@acme.test>\nReply-To: orders@example.org\nSubject: x\n\nbody\n"


def test_rewrite_from_replaces_every_from_field_once() -> None:
    raw = b"From: a@example.org\r\nTo: x@acme.test\r\nFROM: b@example.org\r\n\r\n"
    out = rewrite_from(raw, address="biuro@acme.test", via="ACME")
    assert out == (
        b'From: "a@example.org via ACME" <biuro@acme.test>\r\n'
        b"Reply-To: a@example.org\r\nTo: x@acme.test\r\n\r\n"
    )


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"To: x@acme.test\r\n\r\nFrom: in the body\r\n", b"To: x@acme.test\r\n\r\nFrom: in the body\r\n"),
        (
            b"From: a@example.org",
            b'From: "a@example.org via ACME" <biuro@acme.test>\nReply-To: a@example.org\n',
        ),
        (
            b"From: a@example.org\r\n",
            b'From: "a@example.org via ACME" <biuro@acme.test>\r\nReply-To: a@example.org\r\n',
        ),
    ],
    ids=["no From", "header only, no line end", "header only"],
)
def test_rewrite_from_edge_cases(raw: bytes, expected: bytes) -> None:
    assert rewrite_from(raw, address="biuro@acme.test", via="ACME") == expected


@given(name=st.text(min_size=0, max_size=100), via=st.text(min_size=1, max_size=30))
def test_rewrite_from_makes_one_parsable_from(name: str, via: str) -> None:
    quoted = name.replace("\\", "\\\\").replace('"', '\\"').replace("\r", " ").replace("\n", " ")
    raw = f'From: "{quoted}" <jan@example.org>\r\nSubject: s\r\n\r\nbody\r\n'.encode()
    out = rewrite_from(raw, address="biuro@acme.test", via=via)
    assert out.isascii() or not raw.isascii()
    header_end = out.index(b"\r\n\r\n")
    fields = [line for line in out[:header_end].split(b"\r\n") if not line[:1].isspace()]
    assert [f.split(b":")[0] for f in fields] == [b"From", b"Reply-To", b"Subject"]
    assert parseaddr(str(_parsed(out)["From"]))[1] == "biuro@acme.test"
    assert out.endswith(b"\r\nSubject: s\r\n\r\nbody\r\n")


def test_srs_domain_is_the_smtp_from_domain_when_the_tenants() -> None:
    data: dict[str, Any] = {
        "tenants": [
            {
                "id": "a",
                "domains": ["a.test", "mail.a.test"],
                "smtp": {"preset": "gmail", "from": "x@mail.a.test"},
            },
            {"id": "b", "domains": ["b.test"], "smtp": {"preset": "gmail", "from": "b@gmail.com"}},
            {"id": "c", "domains": ["c.test"]},
        ]
    }
    config = parse_config(data)
    assert [srs_domain(t) for t in config.tenants] == ["mail.a.test", "b.test", "c.test"]


# --------------------------------------------------------------------------- the SRS keys


def test_srs_key_is_made_once_in_data_dir_0600(tmp_path: Path) -> None:
    config = parse_config({"gateway": {"data_dir": str(tmp_path / "var")}})
    first = load_signer(config)
    path = tmp_path / "var" / "srs.secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(path.read_text().strip()) == 64
    again = load_signer(config)
    address = first.forward("a@b.test", "acme.test", NOW)
    assert again.reverse(address, NOW) == "a@b.test"
    assert [p.name for p in path.parent.iterdir()] == ["srs.secret"]


def test_srs_keys_from_a_file_rotate_and_max_age(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "srs"
    secret.write_text("new-key-0123456789\nold-key-0123456789\n")
    config = parse_config({"srs": {"secret_file": str(secret), "max_age": "3d"}})
    signer = load_signer(config)
    assert signer.max_age_days == 3
    old = srs.Signer((b"old-key-0123456789",)).forward("a@b.test", "acme.test", NOW)
    assert signer.reverse(old, NOW) == "a@b.test"
    monkeypatch.setenv("MAILGATE_TEST_SRS", "env-key-0123456789")
    from_env = load_signer(parse_config({"srs": {"secret_env": "MAILGATE_TEST_SRS"}}))
    assert from_env.keys == (b"env-key-0123456789",)


@pytest.mark.parametrize(
    ("content", "error"),
    [
        ("short\n", "srs.secret_file: an SRS key must have at least 16 characters"),
        ("\n\n", "srs.secret_file: no SRS key in it"),
        (None, "srs.secret_file: cannot read"),
    ],
)
def test_bad_srs_keys_are_configuration_errors(tmp_path: Path, content: str | None, error: str) -> None:
    secret = tmp_path / "srs"
    if content is not None:
        secret.write_text(content)
    with pytest.raises(ConfigError) as exc:
        load_signer(parse_config({"srs": {"secret_file": str(secret)}}))
    assert exc.value.errors[0].startswith(error)


def test_srs_config_refuses_two_secrets_and_odd_ages() -> None:
    for srs_section, message in (
        (
            {"secret_file": "a", "secret_env": "B"},
            "srs: Value error, give secret_file or secret_env, not both",
        ),
        ({"max_age": "12h"}, "srs.max_age: "),
        ({"max_age": "1001d"}, "srs.max_age: "),
    ):
        with pytest.raises(ConfigError) as exc:
            parse_config({"srs": srs_section})
        assert exc.value.errors[0].startswith(message.replace("Value error, ", "")), exc.value.errors


# --------------------------------------------------------------------------- end to end

CUSTOMER_MESSAGE = (
    b'From: "Jan Kowalski" <customer@example.org>\r\n'
    b"To: biuro@acme.test\r\n"
    b"Subject: please forward\r\n"
    b"Message-ID: <fwd-1@example.org>\r\n"
    b"\r\n"
    b"Hello.\r\n"
)


@dataclass
class Gateway:
    """The relay-in listener with its Outbox, the relay worker, and the capture smarthost."""

    config: Config
    db: Database
    blobs: BlobStore
    pipeline: Pipeline
    worker: RelayWorker
    smtp: RelayServer
    sink: Smarthost

    async def send(self, mail_from: str, rcpts: list[str], data: bytes) -> dict[str, tuple[int, bytes]]:
        def go() -> dict[str, tuple[int, bytes]]:
            with smtplib.SMTP("127.0.0.1", self.smtp.port, timeout=10) as c:
                return c.sendmail(mail_from, rcpts, data)

        return await asyncio.to_thread(go)

    async def relay(self) -> list[Received]:
        """One relay pass; what the smarthost received in it."""
        before = len(self.sink.received)
        await self.worker.run_once()
        await self.worker.drain()
        return self.sink.received[before:]

    async def stored(self, folder: str = "INBOX") -> list[bytes]:
        async with self.db.read() as s:
            f = await mailstore.require_folder(s, "acme", folder)
            rows = (await s.scalars(select(Message.blob).where(Message.folder_id == f.id))).all()
        return [await self.blobs.get(b) for b in rows]


RULES = [
    {
        "name": "keep-from",
        "conditions": [{"field": "subject", "op": "contains", "value": "as it is"}],
        "actions": [{"forward": "boss@else.test", "rewrite_from": False}],
        "stop": True,
    },
    {"name": "forward-all", "actions": [{"forward": "boss@else.test"}]},
]


@contextlib.asynccontextmanager
async def gateway(tmp_path: Path, db_url: str) -> AsyncIterator[Gateway]:
    sink = await Smarthost().start()
    data = config_dict(tmp_path, db_url, rules=RULES)
    data["tenants"][0]["smtp"] = {
        "host": "127.0.0.1",
        "port": sink.port,
        "security": "none",
        "from": "biuro@acme.test",
    }
    config = parse_config(data)
    db, blobs = await open_store(config)
    changes = Changes()
    pipeline = Pipeline(db, blobs, changes=changes, srs_signer=load_signer(config))
    worker = RelayWorker(lambda: config, db, blobs, pipeline)
    outbox = Outbox(db, blobs, changes, worker.wake.set)
    smtp = RelayServer(lambda: config, pipeline, outbox=outbox)
    await smtp.start("127.0.0.1", 0)
    try:
        yield Gateway(config, db, blobs, pipeline, worker, smtp, sink)
    finally:
        await smtp.stop(grace=5)
        await worker.drain()
        await db.close()
        await sink.stop()


async def test_forward_uses_srs_and_rewrites_from(tmp_path: Path, db_url: str) -> None:
    async with gateway(tmp_path, db_url) as g:
        assert await g.send("customer@example.org", ["biuro@acme.test"], CUSTOMER_MESSAGE) == {}
        (stored,) = await g.stored()
        (sent,) = await g.relay()
    assert sent.rcpts == ["boss@else.test"]
    assert sent.mail_from.startswith("SRS0=")
    assert sent.mail_from.endswith("=example.org=customer@acme.test")
    assert g.pipeline.srs.reverse(sent.mail_from, datetime.now(UTC)) == "customer@example.org"
    message = _parsed(sent.data)
    assert parseaddr(str(message["From"])) == ("Jan Kowalski via ACME", "biuro@acme.test")
    assert b'\r\nReply-To: "Jan Kowalski" <customer@example.org>\r\n' in sent.data
    assert _without(sent.data, b"from", b"reply-to") == _without(stored, b"from")


async def test_forward_rewrite_from_false_keeps_from(tmp_path: Path, db_url: str) -> None:
    original = CUSTOMER_MESSAGE.replace(b"please forward", b"forward as it is")
    async with gateway(tmp_path, db_url) as g:
        await g.send("customer@example.org", ["biuro@acme.test"], original)
        (stored,) = await g.stored()
        (sent,) = await g.relay()
    assert sent.data == stored  # byte for byte: the From is the customer's
    assert g.pipeline.srs.reverse(sent.mail_from, datetime.now(UTC)) == "customer@example.org"


async def test_forward_of_a_bounce_keeps_the_null_sender_and_pulled_mail_uses_from(
    tmp_path: Path, db_url: str
) -> None:
    async with gateway(tmp_path, db_url) as g:
        await g.send("", ["biuro@acme.test"], CUSTOMER_MESSAGE)
        pulled = CUSTOMER_MESSAGE.replace(b"fwd-1@", b"fwd-2@")
        await g.pipeline.deliver(g.config.tenant("acme"), pulled, Delivery(source="imap"))
        sent = await g.relay()
    by_id = {_parsed(r.data)["Message-ID"]: r.mail_from for r in sent}
    assert by_id["<fwd-1@example.org>"] == "<>"  # MAIL FROM:<> (aiosmtpd records it so)
    assert g.pipeline.srs.reverse(by_id["<fwd-2@example.org>"], datetime.now(UTC)) == "customer@example.org"


BOUNCE = (
    b"From: Mail Delivery System <MAILER-DAEMON@else.test>\r\n"
    b"To: {rcpt}\r\n"
    b"Subject: Undelivered Mail Returned to Sender\r\n"
    b"Message-ID: <bounce-1@else.test>\r\n"
    b"\r\n"
    b"boss@else.test: mailbox full\r\n"
)


async def test_bounce_to_srs_address_is_reversed_and_relayed(tmp_path: Path, db_url: str) -> None:
    async with gateway(tmp_path, db_url) as g:
        await g.send("customer@example.org", ["biuro@acme.test"], CUSTOMER_MESSAGE)
        (forwarded,) = await g.relay()
        srs_address = forwarded.mail_from
        bounce = BOUNCE.replace(b"{rcpt}", srs_address.encode())
        # As the receiving server sends it: null sender, to the SRS address, over relay-in.
        assert await g.send("", [srs_address], bounce) == {}
        (relayed,) = await g.relay()
        assert len(await g.stored()) == 1  # the bounce is relayed, not stored
    assert (relayed.mail_from, relayed.rcpts) == ("<>", ["customer@example.org"])  # MAIL FROM:<>
    assert relayed.data == bounce


def _forged(s: srs.Signer) -> str:
    return _flipped(s.forward("customer@example.org", "acme.test", datetime.now(UTC)))


REFUSED: list[tuple[str, Callable[[srs.Signer], str], str]] = [
    ("bad hash", _forged, "550 5.1.1 <{addr}>: invalid or expired SRS address"),
    (
        "expired timestamp",
        lambda s: s.forward("customer@example.org", "acme.test", datetime.now(UTC) - timedelta(days=22)),
        "550 5.1.1 <{addr}>: invalid or expired SRS address",
    ),
    (
        "signed by another key",
        lambda s: srs.Signer((b"x" * 32,)).forward("customer@example.org", "acme.test", datetime.now(UTC)),
        "550 5.1.1 <{addr}>: invalid or expired SRS address",
    ),
    (
        "signed for another tenant's domain",
        lambda s: s.forward("customer@example.org", "acme.test", datetime.now(UTC)).replace(
            "acme.test", "beta.test"
        ),
        "550 5.1.1 <{addr}>: invalid or expired SRS address",
    ),
    ("malformed", lambda s: "SRS0=nothing@acme.test", "550 5.1.1 <{addr}>: invalid or expired SRS address"),
    (
        "unknown domain",
        lambda s: s.forward("customer@example.org", "nowhere.test", datetime.now(UTC)),
        "554 5.7.1 <{addr}>: Relay access denied",
    ),
]


@pytest.mark.parametrize(("make", "reply"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
async def test_forged_or_expired_srs_address_is_refused_550(
    tmp_path: Path, db_url: str, make: Callable[[srs.Signer], str], reply: str
) -> None:
    async with gateway(tmp_path, db_url) as g:
        address = make(g.pipeline.srs)
        with pytest.raises(smtplib.SMTPRecipientsRefused) as exc:
            await g.send("", [address], BOUNCE.replace(b"{rcpt}", address.encode()))
        ((code, text),) = exc.value.recipients.values()
        assert f"{code} {text.decode()}".lower() == reply.format(addr=address).lower()
        assert await g.relay() == []
        async with g.db.read() as s:
            assert await queue.listing(s) == []

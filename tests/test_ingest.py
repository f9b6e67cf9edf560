"""The ingest pipeline: spam verdict, rules, dedupe, byte-exact storage."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from gateway.config import Config
from gateway.daemon import open_store
from gateway.ingest import Delivery, Outcome, Pipeline, label_keyword, mime_worker
from storage import mailstore
from storage.flags import join_flags
from storage.models import Message, Outbound, OutboundRecipient
from tests import corpus
from tests.conftest import on_every_blob_backend

BASE = (
    b"From: c@example.org\r\nTo: biuro@acme.test\r\nSubject: %s\r\n"
    b"Message-ID: <%s@example.org>\r\n\r\nbody\r\n"
)


def mail(subject: bytes = b"hello", mid: bytes = b"m1", extra: bytes = b"") -> bytes:
    return extra + BASE % (subject, mid)


@pytest.fixture
async def pipeline(config: Config) -> AsyncIterator[Pipeline]:
    db, blobs = await open_store(config)
    yield Pipeline(db, blobs)
    await db.close()


async def stored(pipeline: Pipeline, outcome: Outcome) -> tuple[bytes, tuple[str, ...]]:
    async with pipeline.db.read() as s:
        folder = await mailstore.require_folder(s, outcome.tenant, outcome.folder)
        row = await s.scalar(
            select(Message).where(Message.folder_id == folder.id, Message.uid == outcome.uid)
        )
    assert row is not None
    return await pipeline.blobs.get(row.blob), join_flags(row.sysflags, row.keywords)


SMTP = Delivery(source="smtp", recipients=("biuro@acme.test",))


@pytest.mark.parametrize(
    ("header", "spam"),
    [
        (b"X-Spam-Flag: YES\r\n", True),
        (b"X-Spam-Flag: yes\r\n", True),
        (b"X-Spam: Yes\r\n", True),
        (b"X-Spam-Status: Yes, score=7.1 required=5.0\r\n", True),
        (b"X-Spam-Status: No, score=0.1 required=5.0\r\n", False),
        (b"X-Spam-Flag: NO\r\n", False),
        (b"", False),
    ],
)
async def test_spam_verdict_from_upstream_headers(
    config: Config, pipeline: Pipeline, header: bytes, spam: bool
) -> None:
    out = await pipeline.deliver(config.tenant("acme"), mail(extra=header), SMTP)
    assert out.folder == ("Spam" if spam else "INBOX")
    assert out.verdict.spam is spam


async def test_source_spam_wins_over_rules(config: Config, pipeline: Pipeline) -> None:
    out = await pipeline.deliver(
        config.tenant("acme"), mail(b"zam\xc3\xb3wienie"), Delivery(source="imap", spam=True)
    )
    assert out.folder == "Spam"


async def test_rule_folder_and_labels(config: Config, pipeline: Pipeline) -> None:
    out = await pipeline.deliver(config.tenant("acme"), mail(b"=?UTF-8?Q?Zam=C3=B3wienie?= nr 5"), SMTP)
    assert out.folder == "Orders"
    raw, flags = await stored(pipeline, out)
    assert flags == ("Orders",)
    assert raw == mail(b"=?UTF-8?Q?Zam=C3=B3wienie?= nr 5")


@pytest.mark.parametrize(
    ("label", "keyword"),
    [
        ("Invoice", "Invoice"),  # already an atom: as written
        ("R&D-2024", "R&D-2024"),
        ("Pilne \u2013 księgowość", "pilne_&ibm-_ksi&ark-gowo&avsbbw-"),  # as Thunderbird keys the tag
        ("VIP (ważne)", "vip__wa&axw-ne_"),
        ("a]b c", "a_b_c"),
        ("tab\there", "tab_here"),
    ],
)
def test_non_ascii_labels_become_thunderbird_keywords(label: str, keyword: str) -> None:
    assert label_keyword(label) == keyword


@given(st.text(min_size=1, max_size=40))
def test_every_label_becomes_an_imap_atom(label: str) -> None:
    keyword = label_keyword(label)
    assert keyword
    assert keyword.isascii()
    assert not any(c in ' (){%*"\\]' or not c.isprintable() for c in keyword)


async def test_default_folder_of_the_source(config: Config, pipeline: Pipeline) -> None:
    out = await pipeline.deliver(
        config.tenant("acme"), mail(), Delivery(source="imap", default_folder="Archive")
    )
    assert out.folder == "Archive"


async def test_rule_creates_a_missing_folder_and_queues_forwards(tmp_path: object, db_url: str) -> None:
    from gateway.config import parse_config
    from tests.conftest import config_dict

    rules = [
        {
            "name": "vip",
            "conditions": [{"field": "sender", "op": "glob", "value": "*@vip.test"}],
            "actions": [
                {"folder": "Clients/VIP"},
                {"seen": True},
                {"flag": True},
                {"forward": "boss@else.test"},
            ],
        }
    ]
    config = parse_config(
        config_dict(tmp_path, db_url, rules=rules, smtp={"preset": "gmail", "from": "b@acme.test"})
    )  # type: ignore[arg-type]
    db, blobs = await open_store(config)
    try:
        pipeline = Pipeline(db, blobs)
        out = await pipeline.deliver(
            config.tenant("acme"),
            mail().replace(b"c@example.org", b"ceo@vip.test"),
            Delivery(source="smtp", mail_from="ceo@vip.test", recipients=("biuro@acme.test",)),
        )
        assert out.folder == "Clients/VIP"
        _, flags = await stored(pipeline, out)
        assert set(flags) == {"\\Seen", "\\Flagged"}
        async with db.read() as s:
            queued = (await s.scalars(select(Outbound))).all()
            rcpts = (await s.scalars(select(OutboundRecipient.address))).all()
        # SRS at the tenant's domain (tests/test_forwarding.py has the rest of forwarding).
        (q,) = queued
        assert q.mail_from.endswith("=vip.test=ceo@acme.test")
        assert pipeline.srs.reverse(q.mail_from, datetime.now(UTC)) == "ceo@vip.test"
        assert rcpts == ["boss@else.test"]
    finally:
        await db.close()


@on_every_blob_backend
async def test_dedupe_by_source_key_and_by_content(config: Config, pipeline: Pipeline) -> None:
    tenant = config.tenant("acme")
    key = Delivery(source="imap", dedupe_key="imap:acct/INBOX/7/1")
    first = await pipeline.deliver(tenant, mail(), key)
    again = await pipeline.deliver(tenant, mail(), key)
    # The same bytes under another upstream UID (a UIDVALIDITY change): the content key catches it.
    moved = await pipeline.deliver(tenant, mail(), Delivery(source="imap", dedupe_key="imap:acct/INBOX/8/1"))
    other = await pipeline.deliver(
        tenant, mail(mid=b"m2"), Delivery(source="imap", dedupe_key="imap:acct/INBOX/7/2")
    )
    assert (first.duplicate, again.duplicate, moved.duplicate, other.duplicate) == (False, True, True, False)


@on_every_blob_backend
async def test_batch_dedupes_within_itself_and_runs_within(config: Config, pipeline: Pipeline) -> None:
    ran: list[bool] = []

    async def within(_s: object, outcomes: list[object]) -> None:
        ran.append(len(outcomes) == 3)

    items = [(mail(mid=b"a"), SMTP), (mail(mid=b"b"), SMTP), (mail(mid=b"a"), SMTP)]
    outcomes = await pipeline.deliver_many(config.tenant("acme"), items, within=within)  # type: ignore[arg-type]
    assert [o.duplicate for o in outcomes] == [False, False, True]
    assert [o.uid for o in outcomes] == [1, 2, None]
    assert ran == [True]


@on_every_blob_backend
async def test_fallback_dedupe_is_message_id_plus_body(config: Config, pipeline: Pipeline) -> None:
    tenant = config.tenant("acme")
    assert not (await pipeline.deliver(tenant, mail(), SMTP)).duplicate
    # The same message with another trace header is the same message.
    assert (await pipeline.deliver(tenant, b"Received: from x\r\n" + mail(), SMTP)).duplicate
    # The same Message-ID with another body is not.
    assert not (await pipeline.deliver(tenant, mail().replace(b"body", b"other"), SMTP)).duplicate
    # Without a Message-ID, origin fields and body decide.
    no_id = b"From: a@b.test\r\nSubject: x\r\n\r\nsame\r\n"
    assert not (await pipeline.deliver(tenant, no_id, SMTP)).duplicate
    assert (await pipeline.deliver(tenant, no_id, SMTP)).duplicate
    assert not (await pipeline.deliver(tenant, no_id.replace(b"Subject: x", b"Subject: y"), SMTP)).duplicate


# --------------------------------------------------------------------------- hostile input

_header_name = st.sampled_from(
    [b"Subject", b"From", b"To", b"Message-ID", b"Content-Type", b"X-Spam-Flag", b"Date"]
)
_header_value = st.one_of(
    st.binary(max_size=200),
    st.just(b"x" * 10_240),  # a 10 KB header line
    st.sampled_from([b"=?UTF-8?B?////?=", b"=?bogus?Q?x?=", b"\xff\xfe 8-bit \xe9", b"<unclosed", b"YES"]),
)
_multipart = st.builds(
    lambda boundary, parts, close: (
        b'Content-Type: multipart/mixed; boundary="'
        + boundary
        + b'"\r\n\r\n'
        + b"".join(b"--" + boundary + b"\r\n" + p + b"\r\n" for p in parts)
        + (b"--" + boundary + b"--\r\n" if close else b"")
    ),
    st.binary(min_size=1, max_size=20).filter(lambda b: b"\r" not in b and b"\n" not in b),
    st.lists(st.binary(max_size=300), max_size=4),
    st.booleans(),
)
_structured = st.builds(
    lambda headers, sep, body: b"".join(n + b": " + v + sep for n, v in headers) + sep + body,
    st.lists(st.tuples(_header_name, _header_value), max_size=8),
    st.sampled_from([b"\r\n", b"\n"]),
    st.one_of(st.binary(max_size=2000), _multipart),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.one_of(st.binary(max_size=3000), _structured))
async def test_any_bytes_are_stored_byte_exact(config: Config, pipeline: Pipeline, raw: bytes) -> None:
    out = await pipeline.deliver(config.tenant("acme"), raw, Delivery(source="smtp"))
    if out.duplicate:
        return
    blob, _ = await stored(pipeline, out)
    assert blob == raw


async def test_the_mime_process_prepares_what_threads_prepare_and_a_thread_takes_over_if_it_dies(
    config: Config, pipeline: Pipeline
) -> None:
    """Regression (2026-12-05, issue #13): the MIME process was a ProcessPoolExecutor, whose results
    came back through two threads sharing the event loop's GIL, so batches under 8 messages and
    APPENDs were parsed on the loop or a thread. It is now a child the loop talks to over a pipe;
    a killed child fails only the work it had not answered (done on a thread), and the next call
    starts another."""
    tenant = config.tenant("acme")
    pipeline.clock = lambda: datetime(2026, 12, 4, tzinfo=UTC)
    items = [(m, Delivery(source="imap", dedupe_key=f"imap:k/{i}")) for i, m in enumerate(corpus.normal(12))]
    items.append((mail(b"=?utf-8?q?Za=C5=BC=C3=B3=C5=82=C4=87?=", b"mime1"), SMTP))
    by_threads = await pipeline.prepare(tenant, items)
    workers = await mime_worker()
    assert workers.child is not None  # this machine has two cores
    pipeline.workers = workers
    try:
        assert await pipeline.prepare(tenant, items) == by_threads
        assert await pipeline.prepare(tenant, items[:1]) == by_threads[:1]
        running = workers.child._running
        assert running is not None
        running.process.kill()  # the process dies (say, the OOM killer)
        await running.process.wait()
        assert await pipeline.prepare(tenant, items) == by_threads  # a thread takes over
        assert await pipeline.prepare(tenant, items) == by_threads  # and a new child after it
        assert workers.child._running is not running
    finally:
        await workers.close()

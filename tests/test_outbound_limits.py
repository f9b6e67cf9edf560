"""The plan's limits on sending (issue #14): the monthly outbound limit and read-only tenants.

Through the in-process gateway of tests/test_relay.py (submission listener,
Outbox) with smtplib as the client, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from gateway import metrics
from gateway.config import Config, parse_config
from gateway.plans import today
from storage.models import OutboundLog
from tests.conftest import config_dict
from tests.test_relay import CUSTOMER, HASH, SENDER, asend, message, reply_as, running, send

pytestmark = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning")

LIMITED = "554 5.7.0 Monthly sending limit reached: limit of 3 messages this month on plan small"


def plan_config(tmp_path: Path, db_url: str, **tenant: Any) -> Config:
    data = config_dict(tmp_path, db_url, plan="small", **tenant)
    data["plans"] = {"small": {"max_outbound_per_month": 3}}
    data["tenants"][0]["smtp"] = {"host": "127.0.0.1", "port": 9, "security": "none", "from": SENDER}
    data["tenants"][0]["agents"] = [
        {"login": "anna@acme.test", "password_hash": HASH},
        {"login": "piotr@acme.test", "password_hash": HASH},
    ]
    return parse_config(data)


def limited(agent: str) -> float:
    return (
        metrics.REGISTRY.get_sample_value(
            "mailgate_outbound_limited_total", {"tenant": "acme", "agent": agent}
        )
        or 0.0
    )


async def test_fourth_message_of_the_month_is_refused_on_a_plan_of_three(tmp_path: Path, db_url: str) -> None:
    async with running(plan_config(tmp_path, db_url)) as g:
        before = limited("piotr@acme.test")
        # Last month's messages do not count.
        async with g.db.write() as s:
            month = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
            s.add(
                OutboundLog(queue_id="old", tenant_id="acme", at=month - timedelta(seconds=1), event="queued")
            )
        # Counted per message, not per recipient.
        many = [CUSTOMER, "two@example.org", "three@example.org", "four@example.org"]
        reply = await asend(
            g.submission.port, SENDER, many, message("<m1@acme.test>"), login="anna@acme.test"
        )
        assert reply.startswith("250 "), reply
        for n in (2, 3):
            assert (await reply_as(g, "anna@acme.test", message(f"<m{n}@acme.test>"))).startswith("250 ")
        assert await reply_as(g, "piotr@acme.test", message("<m4@acme.test>")) == LIMITED
        assert await reply_as(g, "anna@acme.test", message("<m5@acme.test>")) == LIMITED
        assert len(await g.queued()) == 3
        assert len(await g.folder("Sent")) == 3
        assert limited("piotr@acme.test") == before + 1


async def test_concurrent_submissions_never_pass_the_limit(tmp_path: Path, db_url: str) -> None:
    async with running(plan_config(tmp_path, db_url)) as g:
        loop = asyncio.get_running_loop()
        # The clients' own threads: the default pool is the server's (argon2), which they must not fill.
        with ThreadPoolExecutor(6) as clients:
            replies = await asyncio.gather(
                *(
                    loop.run_in_executor(
                        clients,
                        partial(send, g.submission.port, SENDER, [CUSTOMER], msg, login="anna@acme.test"),
                    )
                    for msg in (message(f"<c{n}@acme.test>") for n in range(6))
                )
            )
        assert sorted(r[:3] for r in replies) == ["250"] * 3 + ["554"] * 3
        assert len(await g.queued()) == 3


async def test_plan_without_a_limit_sends_on(tmp_path: Path, db_url: str) -> None:
    config = plan_config(tmp_path, db_url)
    config.plans["small"] = config.plans["small"].model_copy(update={"max_outbound_per_month": 0})
    async with running(config.with_tenants(config.tenants)) as g:
        for n in range(5):
            assert (await reply_as(g, "anna@acme.test", message(f"<u{n}@acme.test>"))).startswith("250 ")


async def test_read_only_tenant_refuses_submission_naming_the_plans_end(tmp_path: Path, db_url: str) -> None:
    ended = today() - timedelta(days=3)
    async with running(plan_config(tmp_path, db_url, paid_until=ended.isoformat())) as g:
        reply = await reply_as(g, "anna@acme.test", message("<ro@acme.test>"))
        last = ended + timedelta(days=30)
        assert (
            reply == f"554 5.7.1 plan small ended on {ended.isoformat()}; read-only until {last.isoformat()}"
        )
        assert await g.queued() == []
        assert await g.folder("Sent") == []


async def test_tenant_told_its_plan_ends_still_sends(tmp_path: Path, db_url: str) -> None:
    ends = today() + timedelta(days=5)
    async with running(plan_config(tmp_path, db_url, paid_until=ends.isoformat())) as g:
        assert (await reply_as(g, "anna@acme.test", message("<n@acme.test>"))).startswith("250 ")

"""Outbound abuse limits (issue #18): messages and recipients per hour, per agent and per tenant.

Through the in-process gateway of tests/test_relay.py (submission listener,
Outbox) with smtplib as the client, on SQLite and PostgreSQL; the hour is a
fake monotonic clock.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from gateway import metrics
from gateway.config import Config, OutboundLimits, parse_config
from gateway.smtp.hourly import HOUR, HourlyLimits
from tests.conftest import REPO, config_dict, peer
from tests.test_relay import CUSTOMER, HASH, SENDER, asend, message, reply_as, running

ALERTS = REPO / "config" / "prometheus" / "mailgate-alerts.yml"
DESCRIPTION = (
    'Submissions of tenant acme (agent "anna@acme.test"; "": a trusted server) were refused at a sending'
    " limit in the last 10 minutes. The log's outbox.hourly_limit or outbox.monthly_limit line names it."
    " If the agent did not send that much, change its password (`mailgate agent passwd`); otherwise"
    " raise [limits.outbound] or the plan."
)
pytestmark = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limits_config(tmp_path: Path, db_url: str, **outbound: int) -> Config:
    data = config_dict(tmp_path, db_url)
    data["tenants"][0]["smtp"] = {"host": "127.0.0.1", "port": 9, "security": "none", "from": SENDER}
    data["tenants"][0]["agents"] = [
        {"login": "anna@acme.test", "password_hash": HASH},
        {"login": "piotr@acme.test", "password_hash": HASH},
    ]
    data["limits"] = {"outbound": outbound}
    return parse_config(data)


def limited(agent: str) -> float:
    sample = metrics.REGISTRY.get_sample_value(
        "mailgate_outbound_limited_total", {"tenant": "acme", "agent": agent}
    )
    return sample or 0.0


def alert_fires(tmp_path: Path, before: float, after: float) -> None:
    """promtool: the counter going from ``before`` to ``after`` fires MailgateOutboundLimited."""
    labels = 'job="mailgate", instance="gw1:9464", tenant="acme", agent="anna@acme.test"'
    rules = tmp_path / "mailgate-alerts.yml"
    rules.write_text(ALERTS.read_text(encoding="utf-8"), encoding="utf-8")
    test = {
        "interval": "1m",
        "input_series": [
            {"series": f"mailgate_outbound_limited_total{{{labels}}}", "values": f"{before:g} {after:g}x10"}
        ],
        "alert_rule_test": [
            {
                "eval_time": "2m",
                "alertname": "MailgateOutboundLimited",
                "exp_alerts": [
                    {
                        "exp_labels": {
                            "severity": "warning",
                            "job": "mailgate",
                            "instance": "gw1:9464",
                            "tenant": "acme",
                            "agent": "anna@acme.test",
                        },
                        "exp_annotations": {
                            "summary": "Sending limit reached by acme/anna@acme.test",
                            "description": DESCRIPTION,
                        },
                    }
                ],
            }
        ],
    }
    path = tmp_path / "limited.test.yml"
    path.write_text(
        json.dumps({"rule_files": [rules.name], "evaluation_interval": "1m", "tests": [test]}),
        encoding="utf-8",
    )
    out = subprocess.run(
        [peer("promtool"), "test", "rules", path.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


async def test_the_first_message_over_an_agents_hourly_limit_gets_450(tmp_path: Path, db_url: str) -> None:
    config = limits_config(tmp_path, db_url, agent_messages_per_hour=3)
    async with running(config) as g:
        clock = Clock()
        g.outbox.hourly = HourlyLimits(lambda: g.config.limits.outbound, clock)
        before = limited("anna@acme.test")
        for n in range(3):
            assert (await reply_as(g, "anna@acme.test", message(f"<a{n}@acme.test>"))).startswith("250 ")
        over = await reply_as(g, "anna@acme.test", message("<a3@acme.test>"))
        assert over == "450 4.7.1 Hourly sending limit reached: 3 messages per hour for agent anna@acme.test"
        assert limited("anna@acme.test") == before + 1
        alert_fires(tmp_path, before, before + 1)
        assert len(await g.queued()) == 3
        # Another agent of the tenant is not held back by anna's limit.
        assert (await reply_as(g, "piotr@acme.test", message("<p0@acme.test>"))).startswith("250 ")
        # An hour after the first, a place is free again.
        clock.now += HOUR
        assert (await reply_as(g, "anna@acme.test", message("<a4@acme.test>"))).startswith("250 ")


async def test_tenant_recipients_per_hour_count_every_agent(tmp_path: Path, db_url: str) -> None:
    config = limits_config(tmp_path, db_url, tenant_recipients_per_hour=5)
    async with running(config) as g:
        g.outbox.hourly = HourlyLimits(lambda: g.config.limits.outbound, Clock())
        before = limited("piotr@acme.test")
        many = [CUSTOMER, "two@example.org", "three@example.org", "four@example.org"]
        reply = await asend(
            g.submission.port, SENDER, many, message("<m1@acme.test>"), login="anna@acme.test"
        )
        assert reply.startswith("250 "), reply
        two = [CUSTOMER, "two@example.org"]
        reply = await asend(
            g.submission.port, SENDER, two, message("<m2@acme.test>"), login="piotr@acme.test"
        )
        assert reply == "450 4.7.1 Hourly sending limit reached: 5 recipients per hour for tenant acme"
        assert limited("piotr@acme.test") == before + 1
        # One recipient still fits.
        assert (await reply_as(g, "piotr@acme.test", message("<m3@acme.test>"))).startswith("250 ")


def test_a_refused_submission_gives_its_place_back() -> None:
    hourly = HourlyLimits(lambda: OutboundLimits(agent_messages_per_hour=1), Clock())
    first = hourly.reserve("acme", "anna@acme.test", 1)
    assert not isinstance(first, str)
    assert isinstance(hourly.reserve("acme", "anna@acme.test", 1), str)
    hourly.release(first)
    assert not isinstance(hourly.reserve("acme", "anna@acme.test", 1), str)


def test_default_limits_never_hinder_a_normal_office() -> None:
    defaults: dict[str, Any] = OutboundLimits().model_dump()
    assert defaults["agent_messages_per_hour"] >= 200
    assert defaults["tenant_recipients_per_hour"] >= 5000

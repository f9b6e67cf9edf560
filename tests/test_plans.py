"""A tenant's standing in its plan's lifecycle (gateway.plans), table-driven."""

from __future__ import annotations

from datetime import date
from typing import Any

import pytest

from gateway.config import ConfigError, parse_config
from gateway.plans import standing

BASE: dict[str, Any] = {"id": "acme", "domains": ["acme.test"]}


def tenant(**fields: Any) -> Any:
    return parse_config({"tenants": [{**BASE, **fields}]}).tenants[0]


PAID = {"plan": "3gb", "paid_until": "2027-01-31"}
TRIAL = {"plan": "trial", "trial_until": "2027-01-31"}


@pytest.mark.parametrize(
    ("fields", "today", "state"),
    [
        ({}, "2027-01-01", "active"),
        (PAID, "2026-12-31", "active"),  # 31 days before: not yet
        (PAID, "2027-01-01", "notice"),  # 30 days before the end
        (PAID, "2027-01-31", "notice"),  # the last paid day
        (PAID, "2027-02-01", "read_only"),
        (PAID, "2027-03-02", "read_only"),  # the 30th read-only day
        (PAID, "2027-03-03", "deleted"),
        (TRIAL, "2027-02-01", "read_only"),
        (TRIAL, "2027-02-14", "read_only"),  # convert_days = 14
        (TRIAL, "2027-02-15", "deleted"),
        ({**PAID, "suspended": True}, "2026-06-01", "read_only"),
        ({**PAID, "suspended": True}, "2030-06-01", "read_only"),  # suspension never deletes
    ],
)
def test_standing(fields: dict[str, Any], today: str, state: str) -> None:
    assert standing(tenant(**fields), date.fromisoformat(today)).state == state


def test_read_only_reply_names_the_plan_and_dates() -> None:
    why = standing(tenant(**PAID), date(2027, 2, 10)).why
    assert why == "plan 3gb ended on 2027-01-31; read-only until 2027-03-02"


def test_plan_gives_the_quota_unless_the_tenant_sets_one() -> None:
    assert tenant(plan="3gb").effective_quota == 3 * 10**9
    assert tenant(plan="3gb", quota="10 GB").effective_quota == 10 * 10**9
    assert tenant().effective_quota is None


def test_file_plans_extend_and_replace_the_builtin_tiers() -> None:
    config = parse_config({"plans": {"3gb": {"quota": "3.5 GB", "seats": 2}, "big": {"quota": "50 GB"}}})
    assert config.plans["3gb"].seats == 2
    assert config.plans["big"].quota == 50 * 10**9
    assert config.plans["12gb"].quota == 12 * 10**9


def test_unknown_plan_is_an_error_at_its_field() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config({"tenants": [{**BASE, "plan": "gold"}]})
    assert e.value.errors[0].startswith("tenants[0].plan: unknown plan 'gold'")


def test_a_plan_ending_on_the_calendars_last_day_does_not_overflow() -> None:
    st = standing(tenant(plan="3gb", paid_until="9999-12-31"), date(9999, 12, 31))
    assert st.state == "notice"
    assert st.deleted_on == date(9999, 12, 31)

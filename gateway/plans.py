"""Where a tenant stands in its plan's lifecycle, on a given day (pure).

Theory of operation: a tenant's service ends on ``paid_until`` (or, for a
trial, ``trial_until``). ``notice_days`` before that it is told so; from the
day after the end it works read-only for ``read_only_days`` (a trial:
``convert_days``), then it is deleted with its data. Renewing moves the end
and so restores full service at once. An operator's ``suspended`` makes it
read-only until resumed, and never deletes it. The scheduler acts on the
transitions (:mod:`gateway.lifecycle`); the protocol front-ends ask
:func:`standing` whether writes are allowed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Literal

from gateway.config import PlanSection, TenantSection

State = Literal["active", "notice", "read_only", "deleted"]


@dataclass(frozen=True, slots=True)
class Standing:
    state: State
    ends: date | None  # the last day of full service
    deleted_on: date | None  # the day the tenant is deleted, unless renewed
    why: str  # for replies and logs, naming the plan and the dates

    @property
    def writable(self) -> bool:
        """True unless the tenant is read-only (or due for deletion)."""
        return self.state in ("active", "notice")


def today() -> date:
    """The day (UTC) that plan dates are compared with; the one clock every front-end asks."""
    return datetime.now(UTC).date()


def standing(tenant: TenantSection, on: date | None = None) -> Standing:
    """The tenant's state on a day (default: :func:`today`)."""
    today_ = on or today()
    plan = tenant.plan_section or PlanSection()
    name = tenant.plan or "no plan"
    if tenant.paid_until is not None:
        end, grace, what = tenant.paid_until, plan.read_only_days, f"plan {name}"
    elif tenant.trial_until is not None:
        end, grace, what = tenant.trial_until, plan.convert_days, f"the trial of plan {name}"
    else:
        end, grace, what = None, 0, f"plan {name}"
    if tenant.suspended:
        return Standing("read_only", end, None, "the account is suspended by the operator")
    if end is None:
        return Standing("active", None, None, f"{what} has no end date")
    # The days after the end stop at the calendar's last day rather than overflow it.
    deleted_on = end + timedelta(days=min(grace + 1, (date.max - end).days))
    if today_ <= end:
        state: State = "notice" if (end - today_).days <= plan.notice_days else "active"
        return Standing(state, end, deleted_on, f"{what} ends on {end.isoformat()}")
    if today_ < deleted_on:
        last = deleted_on - timedelta(days=1)
        why = f"{what} ended on {end.isoformat()}; read-only until {last.isoformat()}"
        return Standing("read_only", end, deleted_on, why)
    return Standing("deleted", end, deleted_on, f"{what} ended on {end.isoformat()}; the account is deleted")

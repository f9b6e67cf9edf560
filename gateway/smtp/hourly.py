"""Hourly outbound limits per agent and per tenant: messages and recipients (abuse of a stolen login).

Each limit is a sliding hour over the submissions this process accepted
(``[limits.outbound]``; the defaults never hinder a normal office). A
submission that would take a count past its limit is refused with
``450 4.7.1`` naming the limit, so the first message over it is the one
refused and the client may retry after the hour. The check and the
reservation are one synchronous step on the event loop, so concurrent
submissions cannot both take the last place; a submission that is then
refused for another reason gives its place back (:meth:`HourlyLimits.release`).

The counts live in this process's memory: with several instances each
counts its own submissions, and a restart starts the hour afresh.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from gateway.config import OutboundLimits

HOUR = 3600.0


@dataclass(frozen=True, slots=True)
class Reservation:
    """Places taken by one submission, to give back if it is not queued after all."""

    keys: tuple[tuple[str, str], ...]
    at: float
    recipients: int


class HourlyLimits:
    """Sliding-hour counts of submitted messages and recipients, by ``(tenant, agent)`` and tenant."""

    def __init__(self, limits: Callable[[], OutboundLimits], clock: Callable[[], float]) -> None:
        self.limits = limits
        self.clock = clock
        self._sent: dict[tuple[str, str], deque[tuple[float, int]]] = {}

    def _window(self, key: tuple[str, str], now: float) -> deque[tuple[float, int]]:
        window = self._sent.setdefault(key, deque())
        while window and window[0][0] <= now - HOUR:
            window.popleft()
        return window

    def reserve(self, tenant: str, agent: str, recipients: int) -> Reservation | str:
        """Take one message and ``recipients`` places, or the ``450`` reply naming the limit."""
        now, limits = self.clock(), self.limits()
        checks = [
            (
                (tenant, ""),
                f"tenant {tenant}",
                limits.tenant_messages_per_hour,
                limits.tenant_recipients_per_hour,
            )
        ]
        if agent:
            checks.insert(
                0,
                (
                    (tenant, agent),
                    f"agent {agent}",
                    limits.agent_messages_per_hour,
                    limits.agent_recipients_per_hour,
                ),
            )
        for key, who, max_messages, max_recipients in checks:
            window = self._window(key, now)
            if max_messages and len(window) + 1 > max_messages:
                return f"450 4.7.1 Hourly sending limit reached: {max_messages} messages per hour for {who}"
            if max_recipients and sum(n for _, n in window) + recipients > max_recipients:
                return (
                    f"450 4.7.1 Hourly sending limit reached: {max_recipients} recipients per hour for {who}"
                )
        for key, *_ in checks:
            self._sent[key].append((now, recipients))
        return Reservation(tuple(key for key, *_ in checks), now, recipients)

    def release(self, reservation: Reservation) -> None:
        """Give back the places of a submission that was not queued."""
        for key in reservation.keys:
            window = self._sent.get(key)
            if window is not None and (reservation.at, reservation.recipients) in window:
                window.remove((reservation.at, reservation.recipients))

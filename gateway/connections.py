"""Admission of client connections, shared by every SMTP and IMAP listener.

Theory of operation
-------------------
Each listener owns one :class:`ConnectionGate` and registers every connection
it accepts. A newcomer is admitted while the listener, its client address and
its network (the /24 of an IPv4 address, the /64 of an IPv6 one) are under
their caps (``[limits.smtp]`` / ``[limits.imap]``).

When the listener or the newcomer's network is full, the gate closes a
session that is *idle early* (it has not started anything: SMTP before
``MAIL``, IMAP before login, and it has been silent for at least
:data:`MIN_IDLE` seconds) to make room, choosing in the full scope the one
whose address holds the most connections, then the longest idle. Only when
there is none is the newcomer refused with a "too many connections" reply. So
a handful of addresses holding idle connections cannot lock a listener. A
newcomer over its own address's cap is always refused: that cap protects
everyone else from that address.

Once a listener holds ``stress_at`` of its cap it is *under stress*, as
Postfix's stress-adaptive behaviour: early sessions may stay idle only
``stress_timeout`` instead of ``timeout``, and sessions idle at that moment
have their timers shortened at once.

The gate is pure bookkeeping: the I/O classes implement :class:`Tracked`
(how long a session has been idle, how to close it, how to re-arm its timer).
"""

from __future__ import annotations

import ipaddress
import time
from collections import Counter
from collections.abc import Callable
from typing import Protocol

import structlog

from gateway import metrics
from gateway.config import ListenerLimits

log = structlog.get_logger(__name__)

MIN_IDLE = 1.0  # a session silent for less than this is never closed to make room
STRESS_HYSTERESIS = 0.9


class Tracked(Protocol):
    """A connection as the gate sees it."""

    client_ip: str

    def idle_early_since(self) -> float | None:
        """Monotonic time since which it has been idle without starting anything; None if not."""

    def evict(self) -> None:
        """Say goodbye and close (to make room for a newcomer)."""

    def stress_changed(self) -> None:
        """Re-arm the idle timer: the listener's stress state changed."""


def network(ip: str) -> str:
    """The network a client address is counted in: its /24 (IPv4) or /64 (IPv6)."""
    try:
        address = ipaddress.ip_address(ip.split("%")[0])
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = 24 if address.version == 4 else 64
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


class ConnectionGate:
    """Counts one listener's connections; admits, evicts and declares stress."""

    def __init__(
        self, limits: Callable[[], ListenerLimits], listener: str, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limits = limits
        self.listener = listener
        self.clock = clock
        self._connections: dict[Tracked, str] = {}  # connection -> its network
        self.per_ip: Counter[str] = Counter()
        self.per_network: Counter[str] = Counter()
        self.stressed = False

    def __len__(self) -> int:
        return len(self._connections)

    def admit(self, conn: Tracked) -> bool:
        """Count a new connection, closing an idle one to make room if need be; False: refuse it."""
        limits = self.limits()
        ip, net = conn.client_ip, network(conn.client_ip)
        if self.per_ip[ip] >= limits.per_ip:
            return self._refuse(ip, "per_ip")
        listener_full = len(self._connections) >= limits.connections
        network_full = self.per_network[net] >= limits.per_network
        if listener_full or network_full:
            victim = self._victim(None if listener_full else net)
            if victim is None:
                return self._refuse(ip, "listener" if listener_full else "per_network")
            log.warning("connection.evicted", listener=self.listener, peer=victim.client_ip, newcomer=ip)
            metrics.CONNECTIONS_CLOSED.labels(self.listener, "evicted").inc()
            self.release(victim)
            victim.evict()
        self._connections[conn] = net
        self.per_ip[ip] += 1
        self.per_network[net] += 1
        self._update_stress(limits)
        return True

    def release(self, conn: Tracked) -> None:
        """Forget a connection (again: no effect)."""
        net = self._connections.pop(conn, None)
        if net is None:
            return
        for counter, key in ((self.per_ip, conn.client_ip), (self.per_network, net)):
            counter[key] -= 1
            if counter[key] <= 0:
                del counter[key]
        self._update_stress(self.limits())

    def timeout(self, early: bool) -> float:
        """Seconds a session may stay idle: shorter for early sessions under stress."""
        limits = self.limits()
        if early and self.stressed:
            return limits.stress_timeout.total_seconds()
        return limits.timeout.total_seconds()

    def _victim(self, net: str | None) -> Tracked | None:
        now = self.clock()
        best: Tracked | None = None
        best_key = (0, 0.0)
        for conn, conn_net in self._connections.items():
            if net is not None and conn_net != net:
                continue
            since = conn.idle_early_since()
            if since is None or now - since < MIN_IDLE:
                continue
            key = (self.per_ip[conn.client_ip], now - since)
            if best is None or key > best_key:
                best, best_key = conn, key
        return best

    def _refuse(self, ip: str, reason: str) -> bool:
        log.warning("connection.refused", listener=self.listener, peer=ip, limit=reason)
        metrics.CONNECTIONS_CLOSED.labels(self.listener, f"limit_{reason}").inc()
        return False

    def _update_stress(self, limits: ListenerLimits) -> None:
        # Stress ends a little below where it began, so a listener at the edge does not flap.
        threshold = limits.stress_at * limits.connections * (STRESS_HYSTERESIS if self.stressed else 1)
        stressed = len(self._connections) >= threshold
        if stressed == self.stressed:
            return
        self.stressed = stressed
        log.info("connection.stress", listener=self.listener, stressed=stressed, connections=len(self))
        for conn in list(self._connections):
            conn.stress_changed()

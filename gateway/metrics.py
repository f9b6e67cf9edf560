"""Prometheus metrics, ``/healthz`` and ``/readyz`` on the ``metrics`` listener.

Theory of operation
-------------------
Agent statistics come from the database (events), so they survive restarts
and agree between instances; so do queue, storage, upstream, quota
deferral and snapshot gauges, and each tenant's plan end (from the served
configuration). A refresh task reads them every :data:`REFRESH` seconds into a
snapshot that the collector serves: a scrape never waits on the database
and never blocks the event loop. Counters of things this process did
(messages received by source, relay results, messages refused at the
monthly sending limit, spam purged, SMTP/IMAP sessions and auth failures, database statements and
commits) live in memory. Labels are only tenant, agent
(the configured login), folder, mailbox, source, result and listener: never
a message or an address.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

import quotas
from gateway.config import Config
from gateway.plans import standing
from storage import events, snapshots
from storage.db import Database
from storage.models import Agent, Event, Folder, Outbound, QuotaDeferral, Tenant, UpstreamMailbox

if TYPE_CHECKING:  # gateway.connections counts its refusals in this module's registry
    from gateway.connections import ConnectionGate

log = structlog.get_logger(__name__)

REFRESH = 15.0
FIRST_RESPONSE_BUCKETS = (60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400, 172800)

REGISTRY = CollectorRegistry(auto_describe=True)
MESSAGES_RECEIVED = Counter(
    "mailgate_messages_received", "Messages stored, by source", ["tenant", "source"], registry=REGISTRY
)
RELAY_MESSAGES = Counter(
    "mailgate_relay_messages", "Relay attempts by outcome (sent, deferred, bounced)", ["tenant", "result"],
    registry=REGISTRY,
)  # fmt: skip
OUTBOUND_LIMITED = Counter(
    "mailgate_outbound_limited",
    "Messages to relay refused at the plan's monthly sending limit (agent \"\": a trusted server's)",
    ["tenant", "agent"],
    registry=REGISTRY,
)
SPAM_CHECK_ERRORS = Counter(
    "mailgate_spam_check_errors",
    "Spam filter (rspamd) requests that failed: refused, timed out, an HTTP error (checks and learns)",
    registry=REGISTRY,
)
SPAM_LEARNED = Counter(
    "mailgate_spam_learned",
    "Messages taught to the spam filter from agents' moves (class spam: into Junk; ham: out of it)",
    ["tenant", "class"],
    registry=REGISTRY,
)
SPAM_PURGED = Counter("mailgate_spam_purged_messages", "Spam messages purged", ["tenant"], registry=REGISTRY)
SESSIONS = Counter("mailgate_sessions", "Client sessions by listener", ["listener"], registry=REGISTRY)
CONNECTIONS_CLOSED = Counter(
    "mailgate_connections_closed",
    "Connections refused at a limit (reason limit_per_ip, limit_per_network, limit_listener)"
    " or closed to make room for a newcomer (evicted)",
    ["listener", "reason"],
    registry=REGISTRY,
)
AUTH_CHECKS = Counter(
    "mailgate_auth_checks", "Password verifications run (argon2), all listeners", registry=REGISTRY
)
AUTH_CACHE_HITS = Counter(
    "mailgate_auth_cache_hits",
    "Logins accepted from the verified-login cache, without a password verification",
    registry=REGISTRY,
)
AUTH_FAILURES = Counter(
    "mailgate_auth_failures", "Failed logins by listener", ["listener"], registry=REGISTRY
)
OAUTH2_TOKEN_ERRORS = Counter(
    "mailgate_oauth2_token_errors",
    'Failed requests for an OAuth2 access token (mailbox "[smtp]": the tenant\'s smarthost)',
    ["tenant", "mailbox"],
    registry=REGISTRY,
)
LOOP_LAG = Gauge(
    "mailgate_event_loop_lag_seconds", "How late the event loop ran a 1 s timer", registry=REGISTRY
)
UP = Gauge("mailgate_up", "1 while the daemon runs", registry=REGISTRY)


@dataclass
class _Snapshot:
    """What the last refresh read from the database."""

    at: float = 0.0
    reads: dict[tuple[str, str], int] = field(default_factory=dict)
    replies: dict[tuple[str, str], int] = field(default_factory=dict)
    collisions: dict[tuple[str, str], int] = field(default_factory=dict)
    first_response: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    queue: dict[str, tuple[int, float]] = field(default_factory=dict)
    storage: list[tuple[str, str, int, int | None]] = field(default_factory=list)
    upstream: dict[tuple[str, str], float] = field(default_factory=dict)
    deferred: dict[tuple[str, str], int] = field(default_factory=dict)
    expiry: dict[str, float] = field(default_factory=dict)
    snapshot: float | None = None


class DatabaseCollector(Collector):
    """Serves the metrics read from the database by :meth:`refresh`."""

    def __init__(self, config: Callable[[], Config], db: Database) -> None:
        self.config = config
        self.db = db
        self.data = _Snapshot()

    async def refresh(self) -> None:
        """Read the database-backed metrics (called by the refresh task)."""
        data = _Snapshot(at=time.time())
        async with self.db.read() as s:
            logins = dict((await s.execute(select(Agent.id, Agent.login))).all())
            counts = await s.execute(
                select(Event.tenant_id, Event.agent_id, Event.kind, func.count()).group_by(
                    Event.tenant_id, Event.agent_id, Event.kind
                )
            )
            target = {"read": data.reads, "answered": data.replies, "collision": data.collisions}
            for tenant, agent, kind, n in counts:
                if kind in target and agent in logins:
                    target[kind][(tenant, logins[agent])] = n
            for (tenant, agent), times in (await events.first_responses(s)).items():
                if agent in logins:
                    data.first_response[(tenant, logins[agent])] = times
            now = datetime.now(UTC)
            for tenant, n, oldest in await s.execute(
                select(Outbound.tenant_id, func.count(), func.min(Outbound.created_at)).group_by(
                    Outbound.tenant_id
                )
            ):
                age = (now - oldest).total_seconds() if oldest is not None else 0.0
                data.queue[tenant] = (n, max(age, 0.0))
            for t in (await s.scalars(select(Tenant).where(Tenant.active))).all():
                data.storage.append((t.id, "", t.used_bytes, t.quota_bytes))
            for f in (await s.scalars(select(Folder))).all():
                data.storage.append((f.tenant_id, f.name, f.used_bytes, f.quota_bytes))
            for m in (await s.scalars(select(UpstreamMailbox))).all():
                if m.last_success_at is not None:
                    data.upstream[(m.tenant_id, m.name)] = m.last_success_at.timestamp()
            for d in (await s.scalars(select(QuotaDeferral))).all():
                data.deferred[(d.tenant_id, d.source)] = d.messages
        # Configured agents and mailboxes appear at 0 before their first event, so that
        # increase() sees their first one and an upstream never pulled can alert.
        config = self.config()
        for section in config.tenants:
            for configured in section.agents:
                for values in (data.reads, data.replies, data.collisions):
                    values.setdefault((section.id, configured.login), 0)
                data.first_response.setdefault((section.id, configured.login), [])
                OUTBOUND_LIMITED.labels(section.id, configured.login)
            for mailbox in section.mailboxes:
                data.upstream.setdefault((section.id, mailbox.name), 0.0)
            for source in quotas.SOURCES:
                data.deferred.setdefault((section.id, source), 0)
            for source in ("smtp", "imap", "append"):
                MESSAGES_RECEIVED.labels(section.id, source)
            for result in ("sent", "deferred", "bounced"):
                RELAY_MESSAGES.labels(section.id, result)
            ends = standing(section).ends
            if ends is not None:  # full service ends with that day: read-only from the next (UTC)
                first = ends + timedelta(days=1)
                data.expiry[section.id] = datetime(first.year, first.month, first.day, tzinfo=UTC).timestamp()
        newest = await asyncio.to_thread(snapshots.listing, config.snapshots.dir)
        data.snapshot = newest[0].created_at.timestamp() if newest else None
        self.data = data

    def collect(self) -> Iterator[Metric]:
        d = self.data
        for name, doc, values in (
            ("mailgate_agent_messages_read", "Customer messages an agent read (first read)", d.reads),
            ("mailgate_agent_replies", "Replies an agent sent to customer messages", d.replies),
            (
                "mailgate_agent_collisions",
                "Customer messages an agent replied to after a colleague, or opened while one was answering",
                d.collisions,
            ),
        ):
            counter = CounterMetricFamily(name, doc, labels=["tenant", "agent"])
            for (tenant, agent), n in sorted(values.items()):
                counter.add_metric([tenant, agent], n)
            yield counter
        hist = HistogramMetricFamily(
            "mailgate_agent_first_response_seconds",
            "Time from a customer message's arrival to its first answer",
            labels=["tenant", "agent"],
        )
        for (tenant, agent), seconds in sorted(d.first_response.items()):
            buckets = [(str(b), sum(1 for x in seconds if x <= b)) for b in FIRST_RESPONSE_BUCKETS]
            buckets.append(("+Inf", len(seconds)))
            hist.add_metric([tenant, agent], buckets, sum(seconds))
        yield hist
        queued = GaugeMetricFamily(
            "mailgate_relay_queue_messages", "Messages in the relay queue", labels=["tenant"]
        )
        oldest = GaugeMetricFamily(
            "mailgate_relay_queue_oldest_age_seconds", "Age of the oldest queued message", labels=["tenant"]
        )
        for tenant, (n, age) in sorted(d.queue.items()):
            queued.add_metric([tenant], n)
            oldest.add_metric([tenant], age)
        yield queued
        yield oldest
        used = GaugeMetricFamily(
            "mailgate_storage_used_bytes",
            'Bytes stored (folder "" is the tenant, Spam excluded)',
            labels=["tenant", "folder"],
        )
        limit = GaugeMetricFamily(
            "mailgate_storage_limit_bytes", "Quota in bytes", labels=["tenant", "folder"]
        )
        for tenant, folder, n, quota in d.storage:
            used.add_metric([tenant, folder], n)
            if quota is not None:
                limit.add_metric([tenant, folder], quota)
        yield used
        yield limit
        upstream = GaugeMetricFamily(
            "mailgate_upstream_last_success_timestamp_seconds",
            "When an upstream mailbox was last pulled successfully",
            labels=["tenant", "mailbox"],
        )
        for (tenant, mailbox), ts in sorted(d.upstream.items()):
            upstream.add_metric([tenant, mailbox], ts)
        yield upstream
        deferred = GaugeMetricFamily(
            "mailgate_quota_deferred_messages",
            "Mail waiting because it does not fit the quota: upstream messages (imap),"
            " relay-in refusals since the deferral began (smtp)",
            labels=["tenant", "source"],
        )
        for (tenant, source), n in sorted(d.deferred.items()):
            deferred.add_metric([tenant, source], n)
        yield deferred
        expiry = GaugeMetricFamily(
            "mailgate_tenant_expiry_timestamp_seconds",
            "When the tenant's paid plan or trial ends: the start (UTC) of its first read-only day",
            labels=["tenant"],
        )
        for tenant, ts in sorted(d.expiry.items()):
            expiry.add_metric([tenant], ts)
        yield expiry
        snap = GaugeMetricFamily(
            "mailgate_snapshot_last_success_timestamp_seconds", "When the newest snapshot was taken"
        )
        if d.snapshot is not None:
            snap.add_metric([], d.snapshot)
        yield snap
        activity = self.db.activity  # this process's, read at the scrape
        yield CounterMetricFamily(
            "mailgate_db_statements", "SQL statements this process sent to the database", activity.statements
        )
        yield CounterMetricFamily(
            "mailgate_db_commits", "Transactions this process committed", activity.commits
        )


MAX_HEADER_LINES = 100


class _HTTPClient:
    """One connection as the listener's gate sees it: idle until its request is read."""

    def __init__(self, ip: str, writer: asyncio.StreamWriter) -> None:
        self.client_ip = ip
        self.writer = writer
        self.since: float | None = time.monotonic()

    def idle_early_since(self) -> float | None:
        return self.since

    def evict(self) -> None:
        self.writer.close()

    def stress_changed(self) -> None:
        pass  # a whole request has one short deadline anyway


class MetricsServer:
    """A minimal HTTP listener: ``/metrics``, ``/healthz``, ``/readyz``.

    Bounded like every listener: its gate caps connections, and a request
    (at most :data:`MAX_HEADER_LINES` lines) must arrive within the gate's timeout.
    """

    def __init__(
        self,
        collector: DatabaseCollector,
        gate: ConnectionGate,
        ready: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        self.collector = collector
        self.gate = gate
        self.ready = ready
        self._server: asyncio.Server | None = None
        REGISTRY.register(collector)

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._client, host, port, reuse_address=True)

    async def start_on_socket(self, sock: socket.socket) -> None:
        self._server = await asyncio.start_server(self._client, sock=sock)

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the listener is not started")
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        REGISTRY.unregister(self.collector)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        client = _HTTPClient(str(peer[0]) if isinstance(peer, tuple) else "unknown", writer)
        if not self.gate.admit(client):
            writer.close()
            return
        try:
            async with asyncio.timeout(self.gate.timeout(True)):
                request = await reader.readline()
                for _ in range(MAX_HEADER_LINES):
                    if await reader.readline() in (b"\r\n", b"\n", b""):
                        break
                else:
                    return
            client.since = None
            parts = request.split()
            path = parts[1].decode("ascii", "replace") if len(parts) >= 2 else ""
            if path == "/metrics":
                status, body, kind = (
                    "200 OK",
                    generate_latest(REGISTRY),
                    "text/plain; version=0.0.4; charset=utf-8",
                )
            elif path == "/healthz":
                status, body, kind = "200 OK", b"ok\n", "text/plain"
            elif path == "/readyz":
                ok = await self.ready() if self.ready is not None else True
                status = "200 OK" if ok else "503 Service Unavailable"
                body, kind = (b"ready\n" if ok else b"not ready\n"), "text/plain"
            else:
                status, body, kind = "404 Not Found", b"not found\n", "text/plain"
            head = f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
            writer.write(head.encode() + b"Connection: close\r\n\r\n" + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, ValueError):  # ValueError: a line over the reader's limit
            pass
        finally:
            self.gate.release(client)
            writer.close()


async def refresh_forever(collector: DatabaseCollector) -> None:
    """Refresh the database-backed metrics, and measure event-loop lag, until cancelled."""
    UP.set(1)
    loop = asyncio.get_running_loop()
    while True:
        try:
            await collector.refresh()
        except Exception:
            log.exception("metrics.refresh_failed")
        for _ in range(int(REFRESH)):
            start = loop.time()
            await asyncio.sleep(1.0)
            LOOP_LAG.set(max(loop.time() - start - 1.0, 0.0))

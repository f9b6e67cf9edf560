"""SMTP connections to the tenants' smarthosts, kept open from one message to the next.

Theory of operation
-------------------
After a transaction the server completed (``250`` to the end of DATA), the
relay worker gives its connection back here instead of saying QUIT, under
the key of its tenant and settings (:func:`key`): the next message for the
same tenant and server takes it and starts with ``MAIL`` at once, saving the
connection, greeting, EHLO, STARTTLS and AUTH. A connection is kept for
:data:`IDLE` seconds at most and carries :data:`MAX_MESSAGES` messages at
most; one found closed or stale when taken is dropped, and the worker sends
the message on a fresh connection (:func:`gateway.relay.worker.send`). A
connection whose transaction failed in any way is never kept. Each key keeps
at most as many connections as deliveries ran at once (the tenant's
``queue.concurrency``), so the pool is bounded by the configuration.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiosmtplib

from gateway.config import SMTPRelaySection

IDLE = 5.0  # seconds a kept connection may wait for its next message
MAX_MESSAGES = 100  # messages one connection carries before it is closed

Key = tuple[str, str, int, str, str | None, bool]


def key(tenant_id: str, relay: SMTPRelaySection) -> Key:
    """Connections are shared only by one tenant's messages to one server with one identity."""
    host, port, security = relay.effective
    return (tenant_id, host, port, security, relay.username, relay.security_pinned)


@dataclass
class Kept:
    """An open connection, ready for ``MAIL``, and what it carried so far."""

    client: aiosmtplib.SMTP
    messages: int
    since: float


class Smarthosts:
    """The kept connections, by :func:`key`."""

    def __init__(self) -> None:
        self._idle: dict[Key, list[Kept]] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def take(self, k: Key) -> Kept | None:
        """The most recently kept live connection for ``k``, if any (stale ones are closed)."""
        self.expire()
        idle = self._idle.get(k, [])
        while idle:
            kept = idle.pop()
            if kept.client.is_connected:
                return kept
        return None

    def keep(self, k: Key, client: aiosmtplib.SMTP, messages: int) -> None:
        """Keep ``client`` (its transaction completed) for the next message, or close it if it did enough."""
        if messages >= MAX_MESSAGES or not client.is_connected:
            self._quit(client)
            return
        self._idle.setdefault(k, []).append(Kept(client, messages, time.monotonic()))

    def expire(self) -> None:
        """Close the connections idle for longer than :data:`IDLE`."""
        limit = time.monotonic() - IDLE
        for k, idle in list(self._idle.items()):
            for kept in [kept for kept in idle if kept.since < limit]:
                idle.remove(kept)
                self._quit(kept.client)
            if not idle:
                del self._idle[k]

    async def close(self) -> None:
        """Say QUIT on every kept connection (shutdown) and wait for it."""
        for idle in self._idle.values():
            for kept in idle:
                self._quit(kept.client)
        self._idle.clear()
        while self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)

    def _quit(self, client: aiosmtplib.SMTP) -> None:
        task = asyncio.create_task(quit_politely(client))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)


async def quit_politely(client: aiosmtplib.SMTP) -> None:
    """Say QUIT if the connection is open; close it whatever the answer."""
    if not client.is_connected:
        return
    try:
        await client.quit()
    except (aiosmtplib.SMTPException, OSError):
        client.close()

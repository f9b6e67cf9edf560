"""Agent authentication for the IMAP server and SMTP submission.

Passwords are checked with argon2 in a worker thread (it is CPU-heavy by
design). An unknown login still costs one verification against a dummy hash,
so timing does not reveal which logins exist. Every failure is answered after
a delay, and a client address with too many recent failures is refused
without checking anything until its window passes.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select

from gateway import metrics
from gateway.config import Config
from storage.db import Database
from storage.models import Agent

log = structlog.get_logger(__name__)

CONCURRENT_CHECKS = 2


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated agent."""

    agent_id: int
    tenant_id: str
    login: str
    folders: tuple[str, ...]  # visible folders; empty: all of the tenant's


class Authenticator:
    """Checks agents' passwords, with a failure delay and a per-address limit."""

    def __init__(
        self,
        config: Callable[[], Config],
        db: Database,
        *,
        failure_delay: float = 1.0,
        max_failures: int = 10,
        window: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.db = db
        self.failure_delay = failure_delay
        self.max_failures = max_failures
        self.window = window
        self.clock = clock
        self._hasher = PasswordHasher()
        # argon2 takes 64 MiB per check: a burst of logins must not multiply that.
        self._checks = asyncio.Semaphore(CONCURRENT_CHECKS)
        self._dummy: str | None = None  # made on first use, in a thread: argon2 is slow on purpose
        self._failures: defaultdict[str, deque[float]] = defaultdict(deque)

    def blocked(self, address: str) -> bool:
        """True when ``address`` has failed too often recently."""
        failures = self._failures[address]
        while failures and failures[0] < self.clock() - self.window:
            failures.popleft()
        if not failures:
            del self._failures[address]
            return False
        return len(failures) >= self.max_failures

    async def verify(self, login: str, password: str, address: str, listener: str = "") -> Identity | None:
        """The agent, when ``login`` and ``password`` match; None (after a delay) otherwise."""
        if self.blocked(address):
            log.warning("auth.blocked", peer=address)
            await asyncio.sleep(self.failure_delay)
            return None
        login = login.strip().lower()
        found = next(((t, a) for t in self.config().tenants for a in t.agents if a.login == login), None)
        if found is None and self._dummy is None:
            self._dummy = await asyncio.to_thread(self._hasher.hash, secrets.token_hex(16))
        hashed = found[1].password_hash if found else (self._dummy or "")
        async with self._checks:
            ok = await asyncio.to_thread(self._check, hashed, password)
        if ok and found is not None:
            tenant, agent = found
            async with self.db.read() as s:
                agent_id = await s.scalar(select(Agent.id).where(Agent.login == login, Agent.active))
            if agent_id is not None:
                return Identity(agent_id, tenant.id, login, agent.folders)
        self._failures[address].append(self.clock())
        metrics.AUTH_FAILURES.labels(listener or "unknown").inc()
        log.warning("auth.failed", login=login, peer=address, listener=listener)
        await asyncio.sleep(self.failure_delay)
        return None

    def _check(self, hashed: str, password: str) -> bool:
        try:
            return self._hasher.verify(hashed, password)
        except (VerificationError, InvalidHashError):
            return False

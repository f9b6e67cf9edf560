"""Agent authentication for the IMAP server and SMTP submission.

Theory of operation
-------------------
Passwords are checked with argon2 in a worker thread (it is CPU-heavy by
design). An unknown login still costs one verification against a dummy hash,
so timing does not reveal which logins exist. Every failure is answered after
a delay.

Two budgets bound what clients can make the daemon hash (``[limits.auth]``):

* per client address: ``max_failures`` within ``window``. The decision is
  taken when a check is about to run, counting the address's recent failures
  *plus its checks running at that moment*, so parallel attempts cannot
  overshoot the limit: of 40 simultaneous wrong passwords from one address,
  at most ``max_failures`` are verified; the rest are refused unchecked.
* for the whole daemon: at most ``concurrent_checks`` verifications run at
  once and at most ``queue`` attempts wait for one; beyond that an attempt is
  refused at once as temporarily unavailable (:class:`AuthUnavailable`), so
  clients rotating source addresses cannot keep every core hashing.

Verified logins are remembered, as Dovecot's ``auth_cache`` does: after a
successful check, the login maps to an HMAC of the password under a key that
exists only in this process's memory (never the password), the stored hash
it was checked against, and an expiry ``cache_ttl`` later (``[limits.auth]``,
at most ``cache_size`` logins, the oldest dropped first). A login with the
same password within that time skips argon2. An entry goes when it expires,
when the agent's hash changes (a new password), on reload, and on any
failed attempt for that login. A disabled agent (``disabled = true``) is
refused as an unknown login is, whatever the cache holds. The trade: for
``cache_ttl`` after a login, someone who can read the daemon's memory can
test guesses of that password at HMAC speed instead of argon2 speed.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from collections import Counter, OrderedDict, defaultdict, deque
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


class AuthUnavailable(Exception):
    """Too many password checks are waiting: the client should try again later."""


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated agent."""

    agent_id: int
    tenant_id: str
    login: str
    folders: tuple[str, ...]  # visible folders; empty: all of the tenant's


@dataclass(frozen=True, slots=True)
class _Verified:
    """A remembered successful check (see the module docstring)."""

    mac: bytes  # HMAC-SHA256 of the password under the process's key
    hashed: str  # the agent's password hash it was checked against
    until: float  # clock time it expires


class Authenticator:
    """Checks agents' passwords within a per-address failure limit and a global check budget."""

    def __init__(
        self,
        config: Callable[[], Config],
        db: Database,
        *,
        failure_delay: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.db = db
        self.failure_delay = failure_delay
        self.clock = clock
        self._hasher = PasswordHasher()
        # argon2 takes 64 MiB and a core per check: a burst of logins must not multiply that.
        self._checks = asyncio.Semaphore(config().limits.auth.concurrent_checks)
        self._waiting = 0
        self._dummy: str | None = None  # made on first use, in a thread: argon2 is slow on purpose
        self._failures: defaultdict[str, deque[float]] = defaultdict(deque)
        self._running: Counter[str] = Counter()  # checks in progress, per client address
        self._key = secrets.token_bytes(32)  # for the verified-login cache; never leaves memory
        self._verified: OrderedDict[str, _Verified] = OrderedDict()

    def forget(self) -> None:
        """Drop every remembered login (the configuration was reloaded)."""
        self._verified.clear()

    def _mac(self, login: str, password: str) -> bytes:
        text = login.encode() + b"\0" + password.encode("utf-8", "surrogatepass")
        return hmac.new(self._key, text, hashlib.sha256).digest()

    def _remembered(self, login: str, hashed: str, password: str) -> bool:
        """Whether ``password`` is the one verified for ``login`` (against ``hashed``) within the TTL."""
        entry = self._verified.get(login)
        if entry is None:
            return False
        if entry.until <= self.clock() or entry.hashed != hashed:
            del self._verified[login]
            return False
        return hmac.compare_digest(entry.mac, self._mac(login, password))

    def _remember(self, login: str, hashed: str, password: str) -> None:
        limits = self.config().limits.auth
        ttl = limits.cache_ttl.total_seconds()
        if ttl <= 0 or limits.cache_size == 0:
            return
        self._verified.pop(login, None)
        self._verified[login] = _Verified(self._mac(login, password), hashed, self.clock() + ttl)
        while len(self._verified) > limits.cache_size:
            self._verified.popitem(last=False)

    def _recent_failures(self, address: str) -> int:
        failures = self._failures.get(address)
        if failures is None:
            return 0
        horizon = self.clock() - self.config().limits.auth.window.total_seconds()
        while failures and failures[0] < horizon:
            failures.popleft()
        if not failures:
            del self._failures[address]
        return len(failures)

    def blocked(self, address: str) -> bool:
        """True when ``address`` may not have another password checked now."""
        used = self._recent_failures(address) + self._running[address]
        return used >= self.config().limits.auth.max_failures

    async def verify(self, login: str, password: str, address: str, listener: str = "") -> Identity | None:
        """The agent, when ``login`` and ``password`` match; None (after a delay) otherwise.

        Raises :class:`AuthUnavailable` when the daemon's check budget is exhausted.
        """
        login = login.strip().lower()
        # A disabled agent is refused as an unknown login is: a dummy check, never the cache.
        agents = ((t, a) for t in self.config().tenants for a in t.agents if not a.disabled)
        found = next(((t, a) for t, a in agents if a.login == login), None) if login else None
        ok = False
        hashed = found[1].password_hash if found else None
        if self.blocked(address):
            log.warning("auth.blocked", peer=address)
        elif hashed is not None and self._remembered(login, hashed, password):
            metrics.AUTH_CACHE_HITS.inc()
            ok = True
        else:
            ok = await self._verify_in_budget(login, hashed, password, address)
            if ok and hashed is not None:
                self._remember(login, hashed, password)
        if not ok:
            self._verified.pop(login, None)
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

    async def _verify_in_budget(self, login: str, hashed: str | None, password: str, address: str) -> bool:
        """Run one check within the global budget; False, unchecked, if the address is blocked by then.

        True, unchecked, when the login was verified with this password while this one waited for
        its turn: a client opening several sessions at once (all logging in with the same password)
        costs one argon2 check, not one per session one after another."""
        if self._waiting >= self.config().limits.auth.queue and self._checks.locked():
            log.warning("auth.busy", peer=address, waiting=self._waiting)
            raise AuthUnavailable("too many logins at once, try again later")
        self._waiting += 1
        try:
            await self._checks.acquire()
        finally:
            self._waiting -= 1
        try:
            if self.blocked(address):  # failures from this address while it waited
                log.warning("auth.blocked", peer=address)
                return False
            if hashed is not None and self._remembered(login, hashed, password):
                metrics.AUTH_CACHE_HITS.inc()
                return True
            self._running[address] += 1
            try:
                if hashed is None:
                    if self._dummy is None:
                        self._dummy = await asyncio.to_thread(self._hasher.hash, secrets.token_hex(16))
                    hashed = self._dummy
                metrics.AUTH_CHECKS.inc()
                return await asyncio.to_thread(self._check, hashed, password)
            finally:
                self._running[address] -= 1
                if self._running[address] <= 0:
                    del self._running[address]
        finally:
            self._checks.release()

    def _check(self, hashed: str, password: str) -> bool:
        try:
            return self._hasher.verify(hashed, password)
        except (VerificationError, InvalidHashError):
            return False

"""Runs one puller task per watched upstream folder whose lease this instance holds.

Theory of operation
-------------------
The configuration names the upstream folders to watch (:func:`jobs
<gateway.pull.puller.jobs>`); several instances on one database share them
out through leases (:mod:`storage.leases`). A keeper task takes a *turn*
every :data:`~storage.leases.TICK` and at once after :meth:`PullManager.apply`:
:func:`~storage.leases.balance` renews this instance's leases, releases those
beyond its share or no longer configured, and takes free or expired ones up
to its share. A puller runs for each folder whose lease is held, and only
then, under that lease's tenure. A lease lost (not renewed in time, or taken
over, even if it came back since) or released cancels its puller at once;
the puller's storing transactions check the tenure, so a batch it had in
flight is rolled back rather than stored, and a puller that meets the loss
there ends by itself (the next turn takes the lease again if it is free). A
failed turn (the database unreachable) is logged and tried again at the next
tick; meanwhile the pullers store only while their leases last. On one
instance (SQLite) the share is every folder.

A clean stop cancels the pullers, then releases every lease of this instance
so the others take its folders at their next turn instead of after the TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import structlog
from sqlalchemy.exc import SQLAlchemyError

from gateway.config import Config
from gateway.ingest import Pipeline
from gateway.oauth2 import Tokens
from gateway.pull.puller import FolderJob, FolderPuller, HostLimits, jobs
from storage import leases
from storage.db import Database, uninterrupted
from storage.leases import Key, Lease

log = structlog.get_logger(__name__)


class PullManager:
    """Starts, stops and restarts pullers so they match the configuration and the leases held."""

    def __init__(
        self,
        config: Callable[[], Config],
        pipeline: Pipeline,
        db: Database,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        *,
        instance: str | None = None,
        clock: Callable[[], datetime] | None = None,
        ttl: timedelta = leases.TTL,
        tick: timedelta = leases.TICK,
        rng: random.Random | None = None,
        tokens: Tokens | None = None,
    ) -> None:
        self.config = config
        self.tokens = tokens or Tokens()  # OAuth2 access tokens, shared with the relay
        self.pipeline = pipeline
        self.db = db
        self.sleep = sleep  # the pullers' (tests pass a virtual clock's); turns keep real time
        self.instance = instance or config().gateway.effective_instance
        self.clock = clock or (lambda: datetime.now(UTC))  # judges the leases' expiry
        self.ttl, self.tick = ttl, tick
        self.rng = rng or random.Random()
        self.limits = HostLimits()
        self.held: dict[Key, datetime] = {}  # leases held after the last turn, with their tenures
        self._wanted: dict[Key, tuple[str, FolderJob]] = {}
        self._tasks: dict[Key, tuple[str, FolderPuller, asyncio.Task[None]]] = {}
        self._keeper: asyncio.Task[None] | None = None
        self._turn = asyncio.Event()

    def apply(self, config: Config) -> None:
        """Make the watched folders those of ``config`` (on start and on reload).

        Pullers kept are woken: one waiting for room looks whether a quota was raised, a paused
        one whether its tenant is writable again (see :mod:`gateway.pull.puller`). Leases are
        taken and given up by the turn this starts.
        """
        self._wanted = {job.key: (job.mailbox.model_dump_json() + job.target, job) for job in jobs(config)}
        for key, (fingerprint, puller, task) in list(self._tasks.items()):
            if key not in self._wanted or self._wanted[key][0] != fingerprint:
                task.cancel()
                del self._tasks[key]
            else:
                puller.wake()
        self._start_pullers()  # a changed folder whose lease is held restarts at once
        if self._keeper is None:
            self._keeper = asyncio.create_task(self._keep(), name="pull:leases")
        self._turn.set()
        log.info("pull.watching", folders=len(self._wanted), instance=self.instance)

    async def _keep(self) -> None:
        """Take a turn every tick, or sooner when :meth:`apply` asks."""
        while True:
            self._turn.clear()
            try:
                await uninterrupted(self._take_turn())
            except (SQLAlchemyError, OSError) as exc:
                log.warning("pull.leases_failed", error=str(exc).splitlines()[0])
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.tick.total_seconds()):  # not wait_for (3.11 swallows cancels)
                    await self._turn.wait()

    async def _take_turn(self) -> None:
        turn = await leases.balance(
            self.db, self.instance, list(self._wanted), self.held, self.clock(), self.ttl, self.rng
        )
        for key in turn.lost | set(turn.released):
            if key in self._tasks:
                self._tasks.pop(key)[2].cancel()
        self.held = turn.held
        self._start_pullers()
        if turn.lost:
            log.warning("pull.leases_lost", folders=sorted("/".join(k) for k in turn.lost))
        if turn.acquired or turn.released:
            log.info(
                "pull.leases",
                held=len(turn.held),
                acquired=len(turn.acquired),
                released=len(turn.released),
                share=turn.share,
                live=turn.live,
            )

    def _start_pullers(self) -> None:
        """A puller for every configured folder whose lease is held and that has none running."""
        for key, since in self.held.items():
            if key not in self._wanted or (key in self._tasks and not self._tasks[key][2].done()):
                continue
            fingerprint, job = self._wanted[key]
            lease = Lease(key, self.instance, since, self.clock)
            puller = FolderPuller(
                job,
                self.config,
                self.pipeline,
                self.db,
                self.limits,
                sleep=self.sleep,
                lease=lease,
                tokens=self.tokens,
            )
            task = asyncio.create_task(puller.run(), name=f"pull:{'/'.join(key)}")
            self._tasks[key] = (fingerprint, puller, task)

    async def stop(self) -> None:
        """Cancel every puller and wait for them, then release this instance's leases.

        A batch interrupted before its commit rolls back; its messages are still
        upstream, untouched, and are pulled again next time (here or elsewhere).
        """
        if self._keeper is not None:  # first: a turn ending now may still start pullers
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
            self._keeper = None
        tasks = [task for _, _, task in self._tasks.values()]
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.limits.close()
        try:
            await self.db.transaction(lambda s: leases.release(s, self.instance))
        except (SQLAlchemyError, OSError) as exc:  # they expire by themselves
            log.warning("pull.leases_not_released", error=str(exc).splitlines()[0])
        self.held = {}

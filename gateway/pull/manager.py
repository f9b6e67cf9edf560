"""Runs one puller task per watched upstream folder, following the configuration."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import structlog

from gateway.config import Config
from gateway.ingest import Pipeline
from gateway.pull.puller import FolderJob, FolderPuller, HostLimits, jobs
from storage.db import Database

log = structlog.get_logger(__name__)


class PullManager:
    """Starts, stops and restarts pullers so they match the configuration."""

    def __init__(
        self,
        config: Callable[[], Config],
        pipeline: Pipeline,
        db: Database,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.config = config
        self.pipeline = pipeline
        self.db = db
        self.sleep = sleep  # the pullers' (tests pass a virtual clock's)
        self.limits = HostLimits()
        self._tasks: dict[tuple[str, str, str], tuple[str, FolderPuller, asyncio.Task[None]]] = {}

    def apply(self, config: Config) -> None:
        """Make the running pullers those of ``config`` (on start and on reload).

        Pullers kept are woken: one waiting for room looks whether a quota was raised, a paused
        one whether its tenant is writable again (see :mod:`gateway.pull.puller`).
        """
        wanted: dict[tuple[str, str, str], tuple[str, FolderJob]] = {
            job.key: (job.mailbox.model_dump_json() + job.target, job) for job in jobs(config)
        }
        for key, (fingerprint, puller, task) in list(self._tasks.items()):
            if key not in wanted or wanted[key][0] != fingerprint:
                task.cancel()
                del self._tasks[key]
            else:
                puller.wake()
        for key, (fingerprint, job) in wanted.items():
            if key not in self._tasks:
                puller = FolderPuller(job, self.config, self.pipeline, self.db, self.limits, sleep=self.sleep)
                task = asyncio.create_task(puller.run(), name=f"pull:{'/'.join(key)}")
                self._tasks[key] = (fingerprint, puller, task)
        log.info("pull.watching", folders=len(self._tasks))

    async def stop(self) -> None:
        """Cancel every puller and wait for them.

        A batch interrupted before its commit rolls back; its messages are still
        upstream, untouched, and are pulled again next time.
        """
        tasks = [task for _, _, task in self._tasks.values()]
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

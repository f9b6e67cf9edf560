"""The daemon's lifecycle: one function owns start-up and shutdown order.

Start-up: this instance's lock (a second process with its id, on SQLite
any second instance, exits 1 naming the first, see :mod:`storage.instances`),
migrations and the file's tenants and plans applied to the catalog (under
the cluster's start-up lock), this instance registered and its old relay
claims released, blob store, ingest pipeline and, on PostgreSQL, change
notices shared with the other instances (:mod:`gateway.notify`), then the
listeners. The daemon serves the file's settings with the catalog's tenants
and plans (:mod:`gateway.tenants`), and switches to a new such configuration
whenever the catalog changes, wherever the change was made. Shutdown
(SIGTERM/SIGINT): listeners stop accepting, in-flight transactions commit,
sessions close, the instance's row and lock go, the database closes, exit 0
(1 if the lock was lost). SIGHUP re-reads the file and applies it; an
invalid one is refused and the old one stays in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import ssl
import time
from datetime import UTC, datetime
from pathlib import Path

import structlog
from sqlalchemy.exc import SQLAlchemyError

from gateway import systemd
from gateway.admin.api import AdminServer, Context, build_app
from gateway.answering import Sweeper
from gateway.auth import Authenticator
from gateway.blobs import open_blobs
from gateway.config import Config, ConfigError, load_config
from gateway.connections import ConnectionGate
from gateway.forward import load_signer
from gateway.imap.index import FolderIndex
from gateway.imap.server import IMAPServer
from gateway.ingest import Pipeline, mime_worker
from gateway.metrics import DatabaseCollector, MetricsServer, refresh_forever
from gateway.notify import Changes, ClusterNotices
from gateway.oauth2 import Tokens
from gateway.pull.manager import PullManager
from gateway.relay.worker import RelayWorker
from gateway.scheduler import Scheduler
from gateway.smtp.hourly import HourlyLimits
from gateway.smtp.outbox import Outbox
from gateway.smtp.server import RelayServer
from gateway.spam import Filter as SpamFilter
from gateway.spam import Learner as SpamLearner
from gateway.tenants import Watcher, apply
from gateway.tls import server_context
from storage import instances, queue
from storage.blobs import BlobStore
from storage.db import Database, uninterrupted
from storage.migrate import migrate
from storage.models import Heartbeat

log = structlog.get_logger(__name__)

READY_TIMEOUT = 5.0


async def open_store(config: Config, db: Database | None = None) -> tuple[Database, BlobStore]:
    """Open (unless given) and migrate the database, apply the file's tenants and plans, open the blobs."""
    db = db or Database(config.gateway.effective_database_url)
    await migrate(db)
    await apply(db, config)
    return db, await open_blobs(config, db)


def split_hostport(address: str) -> tuple[str, int]:
    """``"127.0.0.1:2525"`` -> ("127.0.0.1", 2525); IPv6 hosts may be bracketed."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


class Daemon:
    """The running gateway."""

    def __init__(self, config: Config, config_path: Path | None = None) -> None:
        self.file_config = config  # the file's settings, tenants and plans
        self.config = config  # what is served: the file's settings, the database's tenants and plans
        self.config_path = config_path
        self.stopping = asyncio.Event()
        self.smtp: list[RelayServer] = []
        self.imap: list[IMAPServer] = []
        self.relay: RelayWorker | None = None
        self.spam: SpamFilter | None = None
        self.learner: SpamLearner | None = None
        self.scheduler: Scheduler | None = None
        self.metrics: MetricsServer | None = None
        self.admin: AdminServer | None = None
        self.tls: ssl.SSLContext | None = None
        self._beat: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.pull: PullManager | None = None
        self.pipeline: Pipeline | None = None
        self.catalog: Watcher | None = None
        self.auth: Authenticator | None = None
        self.db: Database | None = None
        self.blobs: BlobStore | None = None
        self.lock: instances.Lock | None = None
        self.exit_code = 0

    def current_config(self) -> Config:
        """The configuration in force (replaced on reload)."""
        return self.config

    async def start(self) -> None:
        """Open storage and start the listeners."""
        inherited = systemd.inherited_sockets()
        for name in ("submissions", "imaps"):
            if name in inherited and self.config.tls.cert_file is None:
                # Never serve an implicit-TLS port in clear, however the socket arrived.
                raise ConfigError(
                    [f"listen.{name}: socket-activated implicit TLS needs [tls] cert_file and key_file"]
                )
        self.db = Database(self.config.gateway.effective_database_url)
        try:
            self.lock = await instances.lock(self.db, self.config.gateway.effective_instance)
        except instances.InstanceConflict as exc:
            log.error("instance.conflict", error=str(exc))
            raise
        async with self.lock.starting():
            _, blobs = await open_store(self.file_config, self.db)
        self.blobs = blobs
        self.catalog = Watcher(self.db, lambda: self.file_config, self._serve)
        await self.catalog.refresh()
        instance = self.config.gateway.effective_instance
        await self.lock.register(instance, os.uname().nodename, datetime.now(UTC))
        async with self.db.write() as s:
            # Holding its id's lock, no other process is this instance: its claims are a dead run's.
            released = await queue.release(s, instance)
        log.info("instance.registered", instance=instance, pid=os.getpid(), released_claims=released)
        changes = Changes()
        self.spam = SpamFilter(self.current_config)  # asked only while [spam] engine is set
        self.learner = SpamLearner(self.spam, self.db, blobs)
        pipeline = self.pipeline = Pipeline(
            self.db,
            blobs,
            changes=changes,
            srs_signer=load_signer(self.config),
            spam_filter=self.spam,
            workers=await mime_worker(),
        )
        auth = self.auth = Authenticator(self.current_config, self.db)
        tls = self.tls = server_context(self.config.tls)
        tokens = Tokens()  # OAuth2 access tokens: one source per credential, for pullers and relays
        self.pull = PullManager(self.current_config, pipeline, self.db, tokens=tokens)
        self.pull.apply(self.config)
        listen = self.config.listen
        self.relay = RelayWorker(self.current_config, self.db, blobs, pipeline, tokens=tokens)
        self.scheduler = Scheduler(self.current_config, self.db, blobs, pipeline)
        self._tasks = [
            asyncio.create_task(self.relay.run(), name="relay"),
            asyncio.create_task(self.scheduler.run(), name="scheduler"),
            asyncio.create_task(self._instance_heartbeat(self.lock), name="instance"),
            asyncio.create_task(self.catalog.run(), name="catalog"),
            # Ends the "answering" marks of deleted and abandoned drafts.
            asyncio.create_task(Sweeper(self.current_config, self.db, changes).run(), name="answering"),
        ]
        if not self.db.is_sqlite:  # the other instances' writes reach this one's sessions and index
            self._tasks.append(asyncio.create_task(ClusterNotices(self.db.url, changes).run(), name="notify"))
        hourly = HourlyLimits(lambda: self.config.limits.outbound, time.monotonic)
        outbox = Outbox(self.db, blobs, changes, self.relay.wake.set, hourly=hourly, mime=pipeline.workers)
        for name, submission, implicit in (
            ("smtp", False, False),
            ("submission", True, False),
            ("submissions", True, True),
        ):
            address = getattr(listen, name)
            if not address and name not in inherited:
                continue
            smtp = RelayServer(
                self.current_config,
                pipeline,
                tls=tls,
                outbox=outbox,
                auth=auth,
                submission=submission,
                implicit_tls=implicit,
            )
            if name in inherited:
                await smtp.start_on_socket(inherited.pop(name))
            else:
                await smtp.start(*split_hostport(address))
            self.smtp.append(smtp)
            log.info("listener.started", listener=name, address=address, port=smtp.port)
        index = FolderIndex(self.db, changes)  # shared by the IMAP listeners
        for name, implicit in (("imap", False), ("imaps", True)):
            address = getattr(listen, name)
            if not address and name not in inherited:
                continue
            server = IMAPServer(
                self.current_config, self.db, blobs, auth, changes, tls=tls, implicit_tls=implicit, name=name,
                index=index, learner=self.learner, mime=pipeline.workers,
            )  # fmt: skip
            if name in inherited:
                await server.start_on_socket(inherited.pop(name))
            else:
                await server.start(*split_hostport(address))
            self.imap.append(server)
            log.info("listener.started", listener=name, address=address, port=server.port)
        if listen.metrics or "metrics" in inherited:
            collector = DatabaseCollector(self.current_config, self.db)
            await collector.refresh()
            gate = ConnectionGate(lambda: self.config.limits.http, "metrics")
            self.metrics = MetricsServer(collector, gate, self.ready)
            if "metrics" in inherited:
                await self.metrics.start_on_socket(inherited.pop("metrics"))
            else:
                await self.metrics.start(*split_hostport(listen.metrics))
            self._tasks.append(asyncio.create_task(refresh_forever(collector), name="metrics"))
            log.info("listener.started", listener="metrics", address=listen.metrics, port=self.metrics.port)
        if listen.admin or "admin" in inherited:
            context = Context(self.db, self.current_config, lambda: self.file_config, auth, blobs, changes)
            limits = self.config.limits.http
            self.admin = AdminServer(
                build_app(context), limits.connections, limits.timeout.total_seconds(), self.config.tls
            )
            if "admin" in inherited:
                await self.admin.start_on_socket(inherited.pop("admin"))
            else:
                await self.admin.start(*split_hostport(listen.admin))
            log.info("listener.started", listener="admin", address=listen.admin, port=self.admin.port)
        for name in inherited:
            log.warning("listener.unknown_socket", name=name, reason="no [listen] key of that name")

    async def ready(self) -> bool:
        """Ready: the database takes writes, the listeners are up, the background jobs run."""
        if self.db is None or not self._tasks or any(t.done() for t in self._tasks):
            return False
        # The heartbeat runs as its own task: a probe never waits for a write
        # stuck behind a lock, and a stuck one keeps the daemon not ready.
        if self._beat is None or self._beat.done():
            self._beat = asyncio.create_task(uninterrupted(self._heartbeat()))
        done, _ = await asyncio.wait({self._beat}, timeout=READY_TIMEOUT)
        if not done or self._beat.exception() is not None:
            log.warning("readiness.database_unwritable")
            return False
        return True

    async def _watchdog(self, interval: float) -> None:
        """Ping systemd's watchdog only while the daemon is ready: a stuck one gets restarted."""
        while True:
            if await self.ready():
                systemd.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def _heartbeat(self) -> None:
        if self.db is None:
            raise RuntimeError("not started")
        async with self.db.write() as s:
            row = await s.get(Heartbeat, 1)
            if row is None:
                s.add(Heartbeat(id=1, at=datetime.now(UTC)))
            else:
                row.at = datetime.now(UTC)

    async def _instance_heartbeat(self, lock: instances.Lock) -> None:
        """Refresh this instance's heartbeat; stop the daemon (exit 1) if its database lock is lost."""
        while True:
            await asyncio.sleep(instances.HEARTBEAT)
            try:
                await uninterrupted(lock.beat(datetime.now(UTC)))
            except instances.LockLost as exc:
                log.error("instance.lock_lost", error=str(exc))
                self.exit_code = 1
                self.stopping.set()
                return
            except (SQLAlchemyError, OSError) as exc:
                log.warning("instance.heartbeat_failed", error=str(exc))

    async def reload(self) -> None:
        """Re-read the configuration file and apply its tenants; an invalid one is refused."""
        if self.config_path is None or self.db is None or self.catalog is None:
            return
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("config.reload_refused", errors=exc.errors)
            return
        if self.tls is not None and new.tls.cert_file is not None and new.tls.key_file is not None:
            # Every listener holds this context: new handshakes use the new certificate.
            try:
                self.tls.load_cert_chain(new.tls.cert_file, new.tls.key_file)
            except (OSError, ssl.SSLError) as exc:
                log.error("config.reload_refused", errors=[f"tls: {exc}"])
                return
        await apply(self.db, new)
        self.file_config = new
        if self.auth is not None:
            self.auth.forget()
        self.catalog.seen = None  # the file's settings changed even if no tenant did
        await self.catalog.refresh()
        log.info("config.reloaded", tenants=len(self.config.tenants))

    async def _serve(self, config: Config) -> None:
        """Serve a new configuration: the file's, or tenants and plans changed in the database."""
        self.config = config
        if self.pull is not None:
            self.pull.apply(config)
        if self.scheduler is not None:
            self.scheduler.reschedule()

    async def stop(self) -> None:
        """Drain and close everything, in reverse order of start."""
        if self.metrics is not None:
            await self.metrics.stop()
        if self.admin is not None:
            await self.admin.stop()
        for smtp in self.smtp:
            await smtp.stop()
        for server in self.imap:
            await server.stop()
        if self.pull is not None:
            await self.pull.stop()
        if self._beat is not None:
            self._tasks.append(self._beat)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.relay is not None:
            await self.relay.drain()
        if self.learner is not None:
            await self.learner.drain()
        if self.spam is not None:
            await self.spam.aclose()
        if self.pipeline is not None:
            await self.pipeline.close()
        if self.lock is not None:
            await self.lock.release()
        if self.blobs is not None:
            await self.blobs.close()
        if self.db is not None:
            await self.db.close()

    async def run(self) -> int:
        """Run until SIGTERM or SIGINT; returns the exit status."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        reloads: set[asyncio.Task[None]] = set()

        def on_hup() -> None:
            systemd.notify("RELOADING=1")
            task = loop.create_task(self.reload())
            task.add_done_callback(lambda _: systemd.notify("READY=1"))
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, on_hup)
        try:
            await self.start()
            log.info("daemon.ready", hostname=self.config.gateway.hostname)
            systemd.notify("READY=1")
            interval = systemd.watchdog_interval()
            if interval is not None:
                self._tasks.append(asyncio.create_task(self._watchdog(interval), name="watchdog"))
            await self.stopping.wait()
            log.info("daemon.stopping")
            systemd.notify("STOPPING=1")
        finally:
            await self.stop()
        log.info("daemon.stopped", exit_code=self.exit_code)
        return self.exit_code

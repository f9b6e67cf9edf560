"""Pull mail from upstream IMAP folders into the ingest pipeline.

Theory of operation
-------------------
One task watches one upstream folder (a mailbox pulling INBOX and Junk has
two), over one connection. A *pass*:

1. SELECT the folder. If its UIDVALIDITY differs from the one stored, the
   UIDs we remember mean nothing any more: start again from UID 1. Nothing is
   imported twice, because every message's Message-ID plus body hash is a
   dedupe key (see :mod:`gateway.ingest`).
2. ``UID SEARCH UID n:*`` (one response line) learns the UIDs above the last
   one stored; ``n:*`` also matches the highest UID when there is none above,
   so the result is filtered.
3. Bodies come with ``BODY.PEEK[]`` (never marks upstream mail read), in
   batches of at most :data:`BATCH` messages and :data:`BATCH_BYTES` bytes
   (aioimaplib cannot read long responses). Each batch is committed in one
   transaction together with the folder's new last UID. Batches are
   pipelined: while one is prepared (parsed, its blobs written and fsynced:
   :meth:`Pipeline.prepare <gateway.ingest.Pipeline.prepare>`) and the one
   before it commits, the next is fetched; up to :data:`PIPELINE` are in
   hand at once. Commits keep UID order: a batch commits only after the
   batch before it did, so the last UID never passes a message that is not
   committed, and a failed commit stores nothing after it.
4. Only after that commit is the after-fetch policy applied upstream (seen,
   delete, move). A crash in between leaves stored messages upstream at UIDs
   up to the last stored one; the next pass finds them there and applies the
   policy again. It never fetches them again.
5. A message that does not fit the quota *waits*: its UID, size and
   UIDVALIDITY go into the folder's waiting list (``upstream_waiting``) in the
   transaction that advances the last UID past it, and the pass goes on with
   the later messages, so one big message never holds back smaller ones.
   Each pass first retries, in UID order, the waiting messages that may fit
   now (no bigger than the tenant's room); storing one deletes its row in the
   storing transaction. So every message is stored exactly once: above the
   last UID, or from the waiting list. A waiting message stays upstream
   untouched (the after-fetch policy is for stored mail only); a UIDVALIDITY
   change drops the list (the pass starts from UID 1, and dedupe keeps out
   what is stored). The list is the ``imap`` source of the tenant's quota
   deferral (:mod:`quotas`).

Between passes the task IDLEs (re-issued every :data:`IDLE_SECONDS`) when the
server offers it and the mailbox allows it, or sleeps ``poll_interval``.

While the tenant is read-only (:func:`gateway.plans.standing`: its plan ended,
or it is suspended) the folder is *paused*: asked before connecting and after
every wait, it logs out and stays away from the server, its mail waiting
upstream untouched, until a configuration change wakes it
(:meth:`FolderPuller.wake`, from :meth:`PullManager.apply
<gateway.pull.manager.PullManager.apply>`) or :data:`PAUSED_RECHECK` passes;
then it asks again, and pulls once the tenant is writable. The pause is
recorded as the state ``paused`` with the reason, for ``mailgate mailboxes``.

Every failure of a folder (connection, refused login, a refused command such
as SELECT of a missing folder, a message that cannot be stored now) backs
that folder off, with jitter, from :data:`BACKOFF_FIRST` doubling up to
:data:`BACKOFF_MAX`; only a pass that completes resets it, never a mere
login. A refused login waits the cap at once (providers lock accounts that
retry). A mailbox with ``auth = "oauth2"`` gets its access token from the
process's :class:`~gateway.oauth2.Tokens` before connecting; while that
cannot have one, the folder waits as long as the token source backs off
(state ``oauth2_failed``), so the token endpoint is never asked more often
than the source allows, whatever the number of folders. A folder whose
pass stored nothing while mail waits for room (all of it is too big for the
quota) waits the cap too: it tries again when the cap elapses or, sooner,
when the quota root that refused has room for the smallest waiting message;
room is looked at (locally, no login) when one of the tenant's
folders changes in this process or the configuration is reloaded. A pass that
stored something while other mail waits is a success; the folder then polls
every ``poll_interval`` (instead of IDLE, which room cannot interrupt) and
looks again at once when room appears. The reason and the next attempt are
recorded for ``mailgate mailboxes``; a refused login is logged once per
change, not on every retry.

Run by :class:`~gateway.pull.manager.PullManager`, a puller holds the
folder's lease (:mod:`storage.leases`), so exactly one instance of a cluster
pulls a folder at a time. Every transaction that stores messages or moves the
folder's state (its last UID, its waiting list) first checks the lease
(:meth:`Lease.check <storage.leases.Lease.check>`) and is rolled back with
:class:`~storage.leases.LeaseLost` unless the puller's tenure of it still holds;
the puller then ends, storing nothing more. The batch in flight is pulled again by
the new holder, which reads the last UID after this transaction ended; a
message stored twice is impossible anyway: its dedupe key (account, folder,
UIDVALIDITY, UID) and the last-UID advance commit with it. A puller made
without a lease (tests, tools) stores unfenced.

Two caps protect upstream servers: at most :data:`LOGINS_PER_HOST`
connections being opened to one server at a time (hundreds of tenants on one
provider start without a thundering herd, and an idling connection never
holds a slot), and at most ``max_connections`` open connections per account
(providers limit those: Gmail to about 15, Microsoft 365 to about 20; the
defaults are 10, 15 and otherwise 5). A mailbox with more folders than that
gives its first ``max_connections - 1`` folders a connection each (they
IDLE); the others (:func:`polled`) take turns, one pass at a time, on one
shared connection, each every ``poll_interval``. Every connection, the
shared one included, holds a slot of the account's semaphore while open, so
the budget holds across reconnects; leases change only which instance runs
a folder. A failing mailbox only delays its own tasks.
"""

from __future__ import annotations

import asyncio
import random
import ssl
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import structlog
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession

import quotas
from gateway import plans
from gateway import spam as spam_filter
from gateway.config import Config, MailboxSection
from gateway.ingest import Delivery, Outcome, Pipeline, Prepared
from gateway.oauth2 import TokenError, Tokens
from gateway.pull.imap_client import AuthFailed, UpstreamError, UpstreamIMAP
from quotas import QuotaExceeded
from storage import mailstore, upstream
from storage.db import Database, uninterrupted
from storage.errors import StoreError
from storage.leases import Lease, LeaseLost
from storage.models import Tenant

log = structlog.get_logger(__name__)

BATCH = 50
PIPELINE = 2  # fetched batches of a folder being prepared or committed while the next is fetched
BATCH_BYTES = 16 * 2**20
SEARCH_SIZES_CHUNK = 200
IDLE_SECONDS = 28 * 60
BACKOFF_FIRST, BACKOFF_MAX = 5.0, 15 * 60.0  # seconds; each delay is jittered down to half
PAUSED_RECHECK = 3600.0  # seconds a paused folder waits, unless woken, before it asks again
LOGINS_PER_HOST = 10


@dataclass(frozen=True, slots=True)
class FolderJob:
    """One upstream folder to watch, and where its mail goes by default."""

    tenant_id: str
    mailbox: MailboxSection
    folder: str  # upstream name
    target: str  # our folder

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.tenant_id, self.mailbox.name, self.folder)


def jobs(config: Config) -> Iterator[FolderJob]:
    """Every upstream folder the configuration asks us to watch."""
    for tenant in config.tenants:
        for mailbox in tenant.mailboxes:
            for folder, target in mailbox.folders.items():
                yield FolderJob(tenant.id, mailbox, folder, target)


def batches(uids: Sequence[int], sizes: dict[int, int]) -> Iterator[list[int]]:
    """Split UIDs into fetch batches bounded in count and bytes."""
    batch: list[int] = []
    total = 0
    for uid in uids:
        size = sizes.get(uid, 0)
        if batch and (len(batch) >= BATCH or total + size > BATCH_BYTES):
            yield batch
            batch, total = [], 0
        batch.append(uid)
        total += size
    if batch:
        yield batch


async def _each(items: Iterable[list[int]]) -> AsyncIterator[list[int]]:
    for item in items:
        yield item


class Paused(Exception):
    """The tenant is read-only: its upstream mail waits there until the tenant is writable again."""


class MailWaits(Exception):
    """A pass stored nothing while mail waits for room: the folder backs off until there is some."""

    def __init__(self, reason: str, folder_id: int | None, size: int) -> None:
        super().__init__(reason)
        self.folder_id = folder_id  # the quota root to wait on (None: the tenant)
        self.size = size  # bytes that must fit there


@dataclass(slots=True)
class Pass:
    """What one pass over a folder did."""

    stored: int = 0
    waiting: dict[int, int] = field(default_factory=dict)  # UID: size, waiting for room after the pass
    full: QuotaExceeded | None = None  # the last refusal of the pass

    def room_wanted(self) -> tuple[int | None, int]:
        """The quota root and bytes to wait for: the last refusal's, else the smallest waiting message's."""
        if self.full is not None:
            return self.full.folder_id, self.full.adding
        return None, min(self.waiting.values())


class SharedConnection:
    """One connection of an account, lent to its polled folders one pass at a time."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()  # held for a pass
        self.client: UpstreamIMAP | None = None
        self.slot: asyncio.Semaphore | None = None  # the account's, held while the client is open

    async def close(self) -> None:
        """Log out (if open) and give the account's slot back."""
        client, slot, self.client, self.slot = self.client, self.slot, None, None
        if client is not None:
            await client.logout()
        if slot is not None:
            slot.release()


class HostLimits:
    """Caps on concurrent logins per server and open connections per account (``max_connections``)."""

    def __init__(self, logins: int = LOGINS_PER_HOST) -> None:
        self._logins: defaultdict[str, asyncio.Semaphore] = defaultdict(lambda: asyncio.Semaphore(logins))
        self._accounts: dict[tuple[str, str, int], asyncio.Semaphore] = {}
        self._shared: defaultdict[tuple[str, str], SharedConnection] = defaultdict(SharedConnection)

    def login(self, host: str) -> asyncio.Semaphore:
        """Held while a connection to ``host`` is being opened and authenticated."""
        return self._logins[host.lower()]

    def account(self, box: MailboxSection) -> asyncio.Semaphore:
        """Held for the lifetime of a connection to this account: ``max_connections`` at most."""
        budget = box.effective_max_connections
        return self._accounts.setdefault((box.host.lower(), box.username, budget), asyncio.Semaphore(budget))

    def shared(self, box: MailboxSection) -> SharedConnection:
        """The connection the account's polled folders share (see :func:`polled`)."""
        return self._shared[(box.host.lower(), box.username)]

    async def close(self) -> None:
        """Log out of the shared connections (the pullers are stopped)."""
        for shared in self._shared.values():
            await shared.close()


def polled(job: FolderJob) -> bool:
    """True for a folder beyond its mailbox's connection budget: it has no connection of its own,
    but is polled over the shared one. The first ``max_connections - 1`` folders (in the order of
    ``folders``) have their own and IDLE; the last connection is the shared one."""
    box = job.mailbox
    budget = box.effective_max_connections
    return len(box.folders) > budget and list(box.folders).index(job.folder) >= budget - 1


class FolderPuller:
    """Watches one upstream folder until cancelled."""

    def __init__(
        self,
        job: FolderJob,
        config: Callable[[], Config],
        pipeline: Pipeline,
        db: Database,
        limits: HostLimits,
        clock: Callable[[], datetime] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
        lease: Lease | None = None,
        tokens: Tokens | None = None,
    ) -> None:
        self.job = job
        self.tokens = tokens or Tokens()  # the process's, shared by all pullers and relays
        self.lease = lease  # checked by every storing transaction (None: unfenced)
        self.config = config
        self.pipeline = pipeline
        self.db = db
        self.limits = limits
        self.clock = clock or (lambda: datetime.now(UTC))
        self.sleep = sleep  # every wait of this task goes through it (tests pass a virtual clock's)
        self.rng = rng or random.Random()
        self.log = log.bind(tenant=job.tenant_id, mailbox=job.mailbox.name, folder=job.folder)
        self._last_error: str | None = None
        self._backoff = BACKOFF_FIRST
        self._wakeup: asyncio.Event | None = None  # set while waiting for room

    async def run(self) -> None:
        """Connect, pull, wait for more; on failure back off and start again; end when the lease is lost."""
        while True:
            box = self.job.mailbox
            try:
                self._check_writable()
                if polled(self.job):
                    await self._poll_shared()
                else:
                    async with self.limits.account(box):
                        async with self.limits.login(box.host):
                            client = await self.connect()
                        try:
                            await self._watch(client)
                        finally:
                            await client.logout()
            except LeaseLost as exc:
                self.log.info("pull.lease_lost", reason=str(exc))
                return
            except Paused as exc:
                await self._pause(str(exc))
            except AuthFailed as exc:
                await self._back_off("auth_failed", str(exc), BACKOFF_MAX)
            except TokenError as exc:  # the token source backs off the endpoint; this follows it
                await self._back_off("oauth2_failed", f"OAuth2: {exc}", max(exc.retry_in, BACKOFF_FIRST))
            except UpstreamError as exc:
                await self._back_off("error", str(exc))
            except MailWaits as exc:
                # Upstream mail stays where it is until there is room for it.
                await self._back_off(
                    "over_quota", f"over quota ({exc})", BACKOFF_MAX, (exc.folder_id, exc.size)
                )
            except spam_filter.Unavailable:  # on_error = "tempfail": the mail stays upstream
                await self._back_off("spam_filter_failed", "the spam filter did not answer")
            except (StoreError, SQLAlchemyError, OSError) as exc:  # e.g. a conflict, a full disk
                await self._back_off("store_failed", f"cannot store now ({exc})")

    def wake(self) -> None:
        """Look again whether a folder waiting for room has it now (e.g. a quota was raised), or a
        paused one's tenant is writable again."""
        if self._wakeup is not None:
            self._wakeup.set()

    def _check_writable(self) -> None:
        """Raise :class:`Paused` while the tenant is read-only."""
        standing = plans.standing(self.config().tenant(self.job.tenant_id))
        if not standing.writable:
            raise Paused(standing.why)

    async def connect(self) -> UpstreamIMAP:
        """Connect and authenticate with the mailbox's credentials (an OAuth2 token is had first)."""
        box = self.job.mailbox
        source = None
        if box.oauth2 is not None:
            source = self.tokens.source(self.job.tenant_id, box.name, box.oauth2)
            token = await source.token()
        tls = ssl.create_default_context(cafile=box.ca_file) if box.security != "none" else None
        client = await UpstreamIMAP.connect(box.host, box.port, security=box.security, tls=tls)
        try:
            if source is not None:
                try:
                    await client.authenticate_oauth2(box.username, box.host, box.port, token)
                except AuthFailed:
                    source.refused(token)  # maybe revoked early: the next attempt asks for a new one
                    raise
            else:
                password = box.password()
                await client.login(box.username, password.get_secret_value() if password else "")
        except BaseException:
            await client.logout()
            raise
        return client

    async def _watch(self, client: UpstreamIMAP) -> None:
        use_idle = self.job.mailbox.idle and "IDLE" in client.capabilities
        while True:
            done = await self._pass(client)
            if done.waiting and not done.stored:
                raise MailWaits(self._waits(done), *done.room_wanted())
            await self._succeeded("idle" if use_idle else "ok")
            poll = self.job.mailbox.poll_interval.total_seconds()
            if done.waiting:
                await self._wait_for_room(poll, *done.room_wanted())
            elif use_idle:
                await client.idle(IDLE_SECONDS)
            else:
                await self.sleep(poll)
            self._check_writable()

    async def _poll_shared(self) -> None:
        """Pass over the folder on the account's shared connection every ``poll_interval``."""
        box = self.job.mailbox
        shared = self.limits.shared(box)
        while True:
            async with shared.lock:
                try:
                    if shared.client is None:
                        slot = self.limits.account(box)
                        await slot.acquire()
                        shared.slot = slot
                        async with self.limits.login(box.host):
                            shared.client = await self.connect()
                    done = await self._pass(shared.client)
                except BaseException:
                    await shared.close()  # a failed pass may leave the connection in any state
                    raise
            if done.waiting and not done.stored:
                raise MailWaits(self._waits(done), *done.room_wanted())
            await self._succeeded("polled")
            poll = box.poll_interval.total_seconds()
            if done.waiting:
                await self._wait_for_room(poll, *done.room_wanted())
            else:
                await self.sleep(poll)
            self._check_writable()

    @staticmethod
    def _waits(done: Pass) -> str:
        n = len(done.waiting)
        what = f"{n} message{'s' if n != 1 else ''} waiting"
        return f"{done.full}; {what}" if done.full is not None else what

    async def sync(self, client: UpstreamIMAP) -> int:
        """One pass over the folder; returns how many messages were stored."""
        return (await self._pass(client)).stored

    async def _pass(self, client: UpstreamIMAP) -> Pass:
        """One pass over the folder: waiting messages that fit now, then new ones."""
        job = self.job
        selected = await client.select(job.folder)
        async with self.db.read() as s:
            state = await upstream.folder_state(s, job.tenant_id, job.mailbox.name, job.folder)
            junk = await mailstore.special_folder(s, job.tenant_id, mailstore.JUNK)
            rows = await upstream.waiting(s, job.tenant_id, job.mailbox.name, job.folder)
            tenant = await s.get(Tenant, job.tenant_id)
        last_uid = 0
        if state is not None and state.uidvalidity == selected.uidvalidity:
            last_uid = state.last_uid
        elif state is not None:
            self.log.warning("pull.uidvalidity_changed", old=state.uidvalidity, new=selected.uidvalidity)
        if any(r.uidvalidity != selected.uidvalidity for r in rows):

            async def forget_all(s: AsyncSession) -> None:  # those UIDs mean nothing now; start over
                await self._fence(s)
                await upstream.drop_waiting(
                    s, job.tenant_id, job.mailbox.name, job.folder, except_uidvalidity=selected.uidvalidity
                )
                await quotas.sync_waiting(s, job.tenant_id, self.clock())

            await self.db.transaction(forget_all)
        done = Pass(waiting={r.uid: r.size for r in rows if r.uidvalidity == selected.uidvalidity})
        spam = junk is not None and mailstore.canonical_name(job.target) == junk.name
        if last_uid:
            await self._reapply_policy(client, last_uid, done.waiting)
        # Only what may fit the tenant now is fetched again (a folder's quota is known after routing).
        limit = None if tenant is None else tenant.quota_bytes
        used = 0 if tenant is None else tenant.used_bytes
        retry = [uid for uid, size in done.waiting.items() if limit is None or used + size <= limit]
        if done.waiting and not retry and limit is not None:
            smallest = min(done.waiting.values())
            done.full = QuotaExceeded(f"tenant {job.tenant_id!r}", used, limit, smallest, folder_id=None)
        await self._pull_batches(
            client, _each(batches(retry, done.waiting)), selected.uidvalidity, spam, done
        )
        await self._pull_batches(
            client, self._new(client, last_uid), selected.uidvalidity, spam, done, new=True
        )
        return done

    @staticmethod
    async def _new(client: UpstreamIMAP, last_uid: int) -> AsyncIterator[list[int]]:
        """The fetch batches of the UIDs above ``last_uid`` (their sizes asked a chunk at a time)."""
        new = [u for u in await client.search(f"UID {last_uid + 1}:*") if u > last_uid]
        for chunk_start in range(0, len(new), SEARCH_SIZES_CHUNK):
            chunk = new[chunk_start : chunk_start + SEARCH_SIZES_CHUNK]
            for batch in batches(chunk, await client.sizes(chunk)):
                yield batch

    async def _pull_batches(
        self,
        client: UpstreamIMAP,
        uid_batches: AsyncIterator[list[int]],
        uidvalidity: int,
        spam: bool,
        done: Pass,
        *,
        new: bool = False,
    ) -> None:
        """Fetch and store batches (``new`` UIDs, else ones from the waiting list), pipelined.

        Every IMAP command is sent from here, one after another; each fetched batch is settled
        (:meth:`_settle`: prepared, then committed) by a task of its own, so the next FETCH, the
        preparation of a batch and the commit of the one before overlap, with up to
        :data:`PIPELINE` batches settling. A batch commits only after the one before it did:
        the last UID advances only over committed messages. The after-fetch policy is applied
        to a batch only once its task returned, so after its commit. A failure (say, of the
        connection) lets the batches already fetched settle, and the next pass applies the
        policy they missed; a cancellation cancels them, and one whose commit has begun sees it
        to its end (:func:`~storage.db.uninterrupted`).
        """
        settling: deque[asyncio.Task[list[int]]] = deque()
        try:
            async for uids in uid_batches:
                bodies = await client.fetch(uids)
                previous = settling[-1] if settling else None
                settling.append(
                    asyncio.create_task(self._settle(uids, bodies, uidvalidity, spam, done, new, previous))
                )
                while settling and (len(settling) > PIPELINE or settling[0].done()):
                    await self._apply_policy(client, await settling.popleft())
            while settling:
                await self._apply_policy(client, await settling.popleft())
        except Exception:
            # Say the connection dropped: what was fetched before is still stored (in order),
            # and the next pass applies the policy to it.
            await asyncio.gather(*settling, return_exceptions=True)
            raise
        finally:
            for task in settling:
                task.cancel()
            await asyncio.gather(*settling, return_exceptions=True)

    async def _settle(
        self,
        uids: list[int],
        bodies: dict[int, bytes],
        uidvalidity: int,
        spam: bool,
        done: Pass,
        new: bool,
        previous: asyncio.Task[list[int]] | None,
    ) -> list[int]:
        """Prepare a fetched batch; once ``previous`` (the batch before) is stored, commit it.
        The UIDs stored."""
        job = self.job
        present = [u for u in uids if u in bodies]  # one expunged upstream meanwhile is simply gone
        scans = {} if spam else await self._scan(bodies)  # upstream Junk: spam already
        items = [
            (
                bodies[uid],
                Delivery(
                    source="imap",
                    dedupe_key=f"imap:{job.mailbox.name}/{job.folder}/{uidvalidity}/{uid}",
                    default_folder=job.target,
                    spam=spam,
                    scan=scans.get(uid),
                ),
            )
            for uid in present
        ]
        tenant = self.config().tenant(job.tenant_id)
        prepared = dict(zip(present, await self.pipeline.prepare(tenant, items), strict=True))
        if previous is not None:
            await previous  # raises if it failed: then nothing of this batch is stored
        if not new and len(present) < len(uids):
            await self._forget([u for u in uids if u not in bodies], done)
        try:
            done.stored += await self._store(prepared, present, max(uids) if new else None, uidvalidity)
            stored = present
        except QuotaExceeded:
            # Not all of the batch fits: store what does, in order; the rest waits.
            stored = []
            for uid in present:
                try:
                    done.stored += await self._store(prepared, [uid], uid if new else None, uidvalidity)
                except QuotaExceeded as exc:
                    done.full = exc
                    if new:
                        await self._wait(uid, len(bodies[uid]), uidvalidity, exc)
                    done.waiting[uid] = len(bodies[uid])
                else:
                    stored.append(uid)
        for uid in stored:
            done.waiting.pop(uid, None)
        return stored

    async def _wait(self, uid: int, size: int, uidvalidity: int, exc: QuotaExceeded) -> None:
        """Put a new message that does not fit on the waiting list, advancing past it."""
        job, now = self.job, self.clock()

        async def wait(s: AsyncSession) -> bool:
            await self._fence(s)
            await upstream.advance(s, job.tenant_id, job.mailbox.name, job.folder, uidvalidity, uid)
            await upstream.add_waiting(
                s, job.tenant_id, job.mailbox.name, job.folder, uidvalidity, uid, size, now
            )
            return await quotas.sync_waiting(s, job.tenant_id, now)

        began = await self.db.transaction(wait)
        self.log.info("pull.waiting", uid=uid, size=size, reason=str(exc), deferral_began=began)
        self.pipeline.deferrals.set()

    async def _forget(self, uids: list[int], done: Pass) -> None:
        """Waiting messages that are gone upstream (expunged by someone) wait no more."""
        job = self.job

        async def forget(s: AsyncSession) -> None:
            await self._fence(s)
            await upstream.drop_waiting(s, job.tenant_id, job.mailbox.name, job.folder, uids)
            await quotas.sync_waiting(s, job.tenant_id, self.clock())

        await self.db.transaction(forget)
        for uid in uids:
            done.waiting.pop(uid, None)

    async def _scan(self, bodies: dict[int, bytes]) -> dict[int, spam_filter.Result]:
        """The spam filter's verdicts; each scanned body gets its header block prepended."""
        tenant = self.config().tenant(self.job.tenant_id)
        hostname = self.config().gateway.hostname
        scans: dict[int, spam_filter.Result] = {}
        if self.pipeline.spam is None:
            return scans
        for uid, raw in bodies.items():
            scan = await self.pipeline.spam.check(tenant, raw)
            if scan is not None:
                scans[uid] = scan
                bodies[uid] = scan.header_block(hostname, tenant.spam) + raw
        return scans

    async def _store(
        self, prepared: Mapping[int, Prepared], uids: list[int], last_uid: int | None, uidvalidity: int
    ) -> int:
        """Commit these UIDs in one transaction that also records ``last_uid`` (new UIDs)
        or takes them off the waiting list (``last_uid`` None)."""
        job = self.job
        tenant = self.config().tenant(job.tenant_id)

        async def within(s: AsyncSession, outcomes: list[Outcome]) -> None:
            await self._fence(s)
            if last_uid is None:
                await upstream.drop_waiting(s, job.tenant_id, job.mailbox.name, job.folder, uids)
                await quotas.sync_waiting(s, job.tenant_id, self.clock())
            else:
                await upstream.advance(s, job.tenant_id, job.mailbox.name, job.folder, uidvalidity, last_uid)
            await upstream.record_pulled(
                s, job.tenant_id, job.mailbox.name, sum(not o.duplicate for o in outcomes)
            )

        # Seen to its end even if the puller is stopped meanwhile (say, its lease lost): the
        # transaction commits, or is refused by the lease check, before the puller ends.
        outcomes = await uninterrupted(self.pipeline.commit(tenant, [prepared[u] for u in uids], within))
        return sum(not o.duplicate for o in outcomes)

    async def _fence(self, s: AsyncSession) -> None:
        """Inside a storing transaction: :class:`LeaseLost` unless the puller's tenure still holds."""
        if self.lease is not None:
            await self.lease.check(s)

    async def _apply_policy(self, client: UpstreamIMAP, uids: list[int]) -> None:
        policy = self.job.mailbox.after_fetch
        if not uids:
            return
        if policy == "seen":
            await client.add_flags(uids, "\\Seen")
        elif policy == "delete":
            await client.delete(uids)
        elif policy.startswith("move:"):
            await client.move(uids, policy.removeprefix("move:"))

    async def _reapply_policy(self, client: UpstreamIMAP, last_uid: int, waiting: dict[int, int]) -> None:
        """Apply the policy to stored messages still upstream (after a crash); never to waiting ones."""
        policy = self.job.mailbox.after_fetch
        if policy == "keep":
            return
        criteria = ("UNSEEN", f"UID 1:{last_uid}") if policy == "seen" else (f"UID 1:{last_uid}",)
        left = [u for u in await client.search(*criteria) if u <= last_uid and u not in waiting]
        for start in range(0, len(left), SEARCH_SIZES_CHUNK):
            await self._apply_policy(client, left[start : start + SEARCH_SIZES_CHUNK])

    async def _succeeded(self, state: str) -> None:
        """A pass completed: the folder is caught up, and its backoff starts over."""
        self._backoff = BACKOFF_FIRST
        if self._last_error is not None:
            self.log.info("pull.recovered")
            self._last_error = None
        job = self.job
        await self.db.transaction(
            lambda s: upstream.record_success(
                s, job.tenant_id, job.mailbox.name, job.folder, state, self.clock()
            )
        )

    async def _back_off(
        self, state: str, error: str, backoff: float | None = None, full: tuple[int | None, int] | None = None
    ) -> None:
        """Record the failure, then wait a jittered ``backoff`` (default: the next step).

        With ``full`` (a quota root and a size), the wait ends early once that root has room for it.
        """
        backoff = backoff or self._backoff
        self._backoff = min(backoff * 2, BACKOFF_MAX)
        delay = self.rng.uniform(backoff / 2, backoff)
        job = self.job
        if error != self._last_error:
            self.log.warning("pull.failed", state=state, error=error, retry_in=round(delay))
            self._last_error = error
        at = self.clock()
        retry_at = at + timedelta(seconds=delay)
        await self.db.transaction(
            lambda s: upstream.record_error(
                s, job.tenant_id, job.mailbox.name, job.folder, state, error, at, retry_at
            )
        )
        if full is None:
            await self.sleep(delay)
        else:
            await self._wait_for_room(delay, *full)

    async def _pause(self, why: str) -> None:
        """Record that the folder is paused, then wait until woken or :data:`PAUSED_RECHECK` passes."""
        if why != self._last_error:
            self.log.info("pull.paused", reason=why)
            self._last_error = why
        self._backoff = BACKOFF_FIRST  # a pause is no failure of the upstream server
        job, at = self.job, self.clock()
        retry_at = at + timedelta(seconds=PAUSED_RECHECK)
        await self.db.transaction(
            lambda s: upstream.record_error(
                s, job.tenant_id, job.mailbox.name, job.folder, "paused", why, at, retry_at
            )
        )
        woken = asyncio.Event()
        sleeping = asyncio.ensure_future(self.sleep(PAUSED_RECHECK))
        waiting = asyncio.ensure_future(woken.wait())
        self._wakeup = woken
        try:
            await asyncio.wait({sleeping, waiting}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._wakeup = None
            sleeping.cancel()
            waiting.cancel()

    async def _wait_for_room(self, delay: float, root: int | None, size: int) -> None:
        """Sleep ``delay``, or less: until ``root`` (a folder; None: the tenant) has room for ``size``."""
        tenant_id = self.job.tenant_id
        async with self.db.read() as s:
            folders = [f.id for f in await mailstore.list_folders(s, tenant_id)] if root is None else [root]
        sleeping = asyncio.ensure_future(self.sleep(delay))
        try:
            with self.pipeline.changes.watch(*folders) as changed:
                self._wakeup = changed
                while True:
                    # Looked at after the watch began: space freed meanwhile is not missed.
                    changed.clear()
                    async with self.db.read() as s:
                        room = await quotas.room(s, tenant_id, root)
                    if room is None or room >= size:
                        self.log.info("pull.room_for_more", room=room)
                        return
                    woken = asyncio.ensure_future(changed.wait())
                    try:
                        await asyncio.wait({sleeping, woken}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        woken.cancel()
                    if sleeping.done():
                        return
        finally:
            self._wakeup = None
            sleeping.cancel()

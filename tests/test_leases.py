"""Leases on upstream folders (issue #15): one instance pulls a folder at a time, work spread evenly.

Storage-level semantics run on SQLite and PostgreSQL with simulated instance
ids (rows in ``instances`` and a clock of the test's); the handover tests pull
from a real Dovecot with two simulated instances, each with its own database
connections and ingest pipeline, on one database; Done means 1 runs three
``mailgate run`` daemons on one PostgreSQL (:func:`cluster_pull`, which
bench/cluster_pull.py runs at any size).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
import signal
import string
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, func, select, update

from gateway.config import Config, parse_config
from gateway.daemon import open_store
from gateway.ingest import Pipeline
from gateway.pull.manager import PullManager
from gateway.pull.puller import BATCH, FolderPuller, HostLimits, jobs
from storage import leases
from storage.blobs import BlobStore
from storage.db import Database
from storage.leases import TTL, Key, Lease, LeaseLost
from storage.models import Instance, Message, UpstreamFolder, UpstreamLease
from tests import corpus
from tests.conftest import config_dict
from tests.dovecot import Dovecot
from tests.test_cluster import Instance as ClusterInstance
from tests.test_pull import PASSWORD, mailbox

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
FOLDERS: list[Key] = [("acme", f"box{i:02}", "INBOX") for i in range(12)]


async def holders(db: Database, now: datetime) -> dict[Key, str]:
    """Who holds each unexpired lease at ``now``."""
    async with db.read() as s:
        return {
            (r.tenant_id, r.mailbox, r.folder): r.holder for r in await leases.leases(s) if r.expires_at > now
        }


async def acquire(db: Database, key: Key, holder: str, now: datetime) -> bool:
    async with db.write() as s:
        return await leases.acquire(s, key, holder, now) is not None


async def tenure(db: Database, key: Key) -> datetime:
    """When the lease's current holder took it (what the manager hands its puller)."""
    async with db.read() as s:
        row = await s.get(UpstreamLease, key)
    assert row is not None
    return row.acquired_at


# --------------------------------------------------------------------------- storage semantics


def test_share_is_the_ceiling_of_folders_over_live_instances() -> None:
    assert [leases.share(12, n) for n in (1, 2, 3, 5)] == [12, 6, 4, 3]
    assert leases.share(10, 3) == 4
    assert leases.share(1, 3) == 1
    assert leases.share(0, 3) == 0
    assert leases.share(5, 0) == 5  # the instance asking is always live


async def test_acquire_renew_release_and_takeover_after_expiry(store: tuple[Database, BlobStore]) -> None:
    db, _ = store
    key = FOLDERS[0]
    assert await acquire(db, key, "a", T0)
    assert not await acquire(db, key, "b", T0 + timedelta(seconds=1))  # a's lease runs
    assert not await acquire(db, key, "a", T0 + timedelta(seconds=2))  # a running one is renewed, not taken
    async with db.write() as s:
        assert await leases.renew(s, "a", T0 + timedelta(seconds=10)) == {key: T0}  # now until +40 s
    assert not await acquire(db, key, "b", T0 + timedelta(seconds=39))
    assert await holders(db, T0 + timedelta(seconds=39)) == {key: "a"}
    # a stops renewing: at expiry b takes over, and a's renewal finds nothing.
    assert await acquire(db, key, "b", T0 + timedelta(seconds=40))
    async with db.write() as s:
        assert await leases.renew(s, "a", T0 + timedelta(seconds=41)) == {}
        assert await leases.release(s, "a", [key]) == 0  # not a's to give up
    assert await holders(db, T0 + timedelta(seconds=41)) == {key: "b"}
    async with db.write() as s:
        assert await leases.release(s, "b", [key]) == 1
    assert await holders(db, T0 + timedelta(seconds=41)) == {}
    assert await acquire(db, key, "a", T0 + timedelta(seconds=41))  # released: free at once


async def test_fence_refuses_a_store_once_the_lease_is_lost(store: tuple[Database, BlobStore]) -> None:
    db, _ = store
    key = FOLDERS[0]
    now = T0
    fence = Lease(key, "a", T0, lambda: now)
    assert await acquire(db, key, "a", T0)
    async with db.write() as s:
        await fence.check(s)  # held
    now = T0 + TTL  # expired, not taken yet: lost all the same
    with pytest.raises(LeaseLost):
        async with db.write() as s:
            await fence.check(s)
    assert await acquire(db, key, "b", now)
    now = T0 + timedelta(seconds=1)  # even by a's slower clock, b holds it now
    with pytest.raises(LeaseLost):
        async with db.write() as s:
            await fence.check(s)
    # Back to a, in a new tenure: the old tenure's puller still stores nothing.
    now = T0 + 2 * TTL
    assert await acquire(db, key, "a", now)
    with pytest.raises(LeaseLost):
        async with db.write() as s:
            await fence.check(s)
    async with db.write() as s:
        await Lease(key, "a", now, lambda: now).check(s)


async def test_no_two_holders_under_concurrent_acquire(db_url: str, config: Config) -> None:
    """Eight instances, each with its own connections, race for one expired lease twenty times."""
    first, blobs = await open_store(config)
    await blobs.close()
    dbs = [first] + [Database(db_url) for _ in range(7)]
    key = FOLDERS[0]
    try:
        for round_ in range(20):
            now = T0 + round_ * TTL  # every earlier lease has expired by now
            start = asyncio.Event()

            async def race(n: int, now: datetime = now, start: asyncio.Event = start) -> bool:
                await start.wait()
                return await acquire(dbs[n], key, f"i{n}", now)

            tasks = [asyncio.create_task(race(n)) for n in range(len(dbs))]
            await asyncio.sleep(0)
            start.set()
            won = [n for n, ok in enumerate(await asyncio.gather(*tasks)) if ok]
            assert len(won) == 1, won
            assert await holders(first, now) == {key: f"i{won[0]}"}
    finally:
        for db in dbs:
            await db.close()


@pytest.mark.parametrize("first", [0, 1])
async def test_renewal_never_deadlocks_with_a_store_locking_several_leases(
    store: tuple[Database, BlobStore], first: int
) -> None:
    """A group commit fences two leases one after the other while the instance renews them all."""
    db, _ = store
    done = await leases.balance(db, "a", FOLDERS[:2], {}, T0)
    order = [FOLDERS[first], FOLDERS[1 - first]]
    locked = asyncio.Event()

    async def store_two() -> None:
        async with db.write() as s:
            await Lease(order[0], "a", T0, lambda: T0).check(s)
            locked.set()
            await asyncio.sleep(0.3)  # the renewal runs meanwhile
            await Lease(order[1], "a", T0, lambda: T0).check(s)

    async def turn() -> leases.Balance:
        await locked.wait()
        return await leases.balance(db, "a", FOLDERS[:2], done.held, T0 + leases.TICK)

    _, after = await asyncio.wait_for(asyncio.gather(store_two(), turn()), 10)
    assert (after.held, after.lost) == (done.held, set())
    assert await holders(db, T0 + TTL) == dict.fromkeys(FOLDERS[:2], "a")  # both renewed


@dataclass
class Cluster:
    """Simulated instances taking turns on one database, on the test's clock."""

    db: Database
    now: datetime = T0
    held: dict[str, dict[Key, datetime]] = field(default_factory=dict)
    rng: random.Random = field(default_factory=lambda: random.Random(15))

    async def beat(self, *names: str) -> None:
        async with self.db.write() as s:
            for name in names:
                row = await s.get(Instance, name)
                if row is None:
                    s.add(Instance(id=name, hostname="h", pid=1, started_at=self.now, heartbeat_at=self.now))
                else:
                    row.heartbeat_at = self.now

    async def turn(self, *names: str) -> None:
        for name in names:
            done = await leases.balance(
                self.db, name, FOLDERS, self.held.get(name, {}), self.now, rng=self.rng
            )
            self.held[name] = done.held

    async def run(self, names: tuple[str, ...], seconds: float) -> None:
        """The live ``names`` beat and take turns every tick for ``seconds``."""
        end = self.now + timedelta(seconds=seconds)
        while self.now < end:
            self.now += leases.TICK
            await self.beat(*names)
            await self.turn(*names)

    async def spread(self) -> dict[str, int]:
        found = await holders(self.db, self.now)
        for name, keys in self.held.items():  # what each believes it holds is what the table says
            assert {k for k, h in found.items() if h == name} == keys.keys(), name
        return dict(Counter(found.values()))

    async def stop(self, name: str) -> None:
        """A clean stop: leases released, the instance's row deleted."""
        async with self.db.write() as s:
            await leases.release(s, name)
            await s.execute(delete(Instance).where(Instance.id == name))
        self.held.pop(name)


async def test_rebalancing_with_one_two_and_three_live_instances(store: tuple[Database, BlobStore]) -> None:
    c = Cluster(store[0])
    await c.beat("a")
    await c.turn("a")
    assert await c.spread() == {"a": 12}
    # b joins: it finds nothing free; a gives up its surplus at its next turn, b takes it.
    await c.beat("b")
    await c.turn("b")
    assert await c.spread() == {"a": 12}
    await c.turn("a", "b")
    assert await c.spread() == {"a": 6, "b": 6}
    # c joins: four each.
    await c.beat("c")
    await c.turn("c", "a", "b", "c")
    assert await c.spread() == {"a": 4, "b": 4, "c": 4}
    await c.run(("a", "b", "c"), 60)  # steady: nothing moves
    assert await c.spread() == {"a": 4, "b": 4, "c": 4}
    # c dies (no heartbeat, no renewal): its four folders are taken within TTL and a tick or two.
    died = c.now
    c.held.pop("c")
    while (await c.spread()).get("c"):
        await c.run(("a", "b"), leases.TICK.total_seconds())
        assert c.now - died <= TTL + 2 * leases.TICK
    await c.run(("a", "b"), leases.TICK.total_seconds())
    assert await c.spread() == {"a": 6, "b": 6}
    # b stops cleanly: a takes everything at its next turn, without waiting for an expiry.
    await c.stop("b")
    await c.run(("a",), leases.TICK.total_seconds())
    assert await c.spread() == {"a": 12}


async def test_a_folder_no_longer_configured_is_released(store: tuple[Database, BlobStore]) -> None:
    db, _ = store
    done = await leases.balance(db, "a", FOLDERS[:2], {}, T0)
    assert done.held == dict.fromkeys(FOLDERS[:2], T0)
    done = await leases.balance(db, "a", FOLDERS[1:2], done.held, T0 + leases.TICK)
    assert (done.held, done.released, done.lost) == ({FOLDERS[1]: T0}, [FOLDERS[0]], set())
    assert await holders(db, T0 + leases.TICK) == {FOLDERS[1]: "a"}


# --------------------------------------------------------------------------- handover mid-pull


@dataclass
class Node:
    """A simulated instance pulling from Dovecot: its own connections, pipeline and id."""

    name: str
    config: Config
    db: Database
    blobs: BlobStore
    pipeline: Pipeline

    async def puller(self, now: Callable[[], datetime]) -> FolderPuller:
        """A puller under this instance's current tenure of the folder's lease."""
        (job,) = jobs(self.config)
        lease = Lease(job.key, self.name, await tenure(self.db, job.key), now)
        return FolderPuller(job, lambda: self.config, self.pipeline, self.db, HostLimits(), lease=lease)

    async def sync(self, now: Callable[[], datetime]) -> int:
        puller = await self.puller(now)
        client = await puller.connect()
        try:
            return await puller.sync(client)
        finally:
            await client.logout()


@pytest.fixture
async def nodes(
    tmp_path: Path, db_url: str, dovecot: Dovecot, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Callable[[int], Awaitable[list[Node]]]]:
    monkeypatch.setenv("MAILGATE_TEST_UPSTREAM", PASSWORD)
    dovecot.add_user("biuro", PASSWORD)
    made: list[Node] = []

    async def make(n: int) -> list[Node]:
        box = mailbox(dovecot, "biuro", folders={"INBOX": "INBOX"})
        config = parse_config(config_dict(tmp_path, db_url, mailboxes=[box]))
        for name in "ab"[:n]:
            db, blobs = await open_store(config)
            made.append(Node(name, config, db, blobs, Pipeline(db, blobs)))
        return made

    yield make
    for node in made:
        await node.blobs.close()
        await node.db.close()


def message_id(raw: bytes) -> str:
    found = re.search(rb"^Message-I[dD]: (<[^>]+>)", raw, re.MULTILINE)
    assert found is not None
    return found.group(1).decode()


async def assert_stored_exactly_once(node: Node, upstream: list[bytes]) -> None:
    """Every upstream message is stored once: by Message-ID and by sha256 of its bytes."""
    async with node.db.read() as s:
        rows = (
            await s.execute(select(Message.message_id, Message.blob).where(Message.tenant_id == "acme"))
        ).all()
    assert Counter(m for m, _ in rows) == Counter(message_id(raw) for raw in upstream)
    assert Counter(b for _, b in rows) == Counter(hashlib.sha256(raw).hexdigest() for raw in upstream)


async def move(db: Database, key: Key, to: str, now: datetime) -> None:
    """Hand the lease to ``to`` by force (as a takeover would, without waiting for the expiry)."""
    async with db.write() as s:
        await s.execute(
            update(UpstreamLease)
            .where(UpstreamLease.tenant_id == key[0], UpstreamLease.mailbox == key[1])
            .where(UpstreamLease.folder == key[2])
            .values(holder=to, acquired_at=now, expires_at=now + TTL)
        )


@pytest.mark.peers
@pytest.mark.parametrize("first", ["new_holder_pulls_first", "old_holder_commits_first"])
async def test_lease_moved_mid_batch_stores_every_message_exactly_once(
    nodes: Callable[[int], Awaitable[list[Node]]], dovecot: Dovecot, first: str
) -> None:
    """a has fetched its third batch when the lease moves to b: a's batch is refused, b pulls the rest.

    Either b's pass runs before a's commit reaches the database (and stores that batch first), or
    a's commit comes first (refused by its lease check) and b's pass after it.
    """
    total = 6 * BATCH
    dovecot.deliver_files("biuro", "INBOX", corpus.normal(total, size=2000, seed=15))
    upstream = dovecot.messages("biuro", "INBOX")
    a, b = await nodes(2)
    (job,) = jobs(a.config)
    clock = lambda: T0  # noqa: E731 (both instances' clock: only the holder changes)
    assert await acquire(a.db, job.key, "a", T0)
    batches = 0
    b_stored: list[int] = []
    deliver = a.pipeline.commit

    async def deliver_after_the_move(*args: Any, **kwargs: Any) -> Any:
        nonlocal batches
        batches += 1
        if batches != 3:
            return await deliver(*args, **kwargs)
        await move(a.db, job.key, "b", T0)  # fetched, not stored yet: the lease changes hands now
        if first == "new_holder_pulls_first":
            b_stored.append(await b.sync(clock))
        try:
            return await deliver(*args, **kwargs)
        finally:
            if first == "old_holder_commits_first":
                b_stored.append(await b.sync(clock))

    a.pipeline.commit = deliver_after_the_move  # type: ignore[method-assign]
    with pytest.raises(LeaseLost):
        await a.sync(clock)
    assert batches == 3  # a stopped at the loss
    assert b_stored == [total - 2 * BATCH]  # b started after a's last committed batch
    assert await b.sync(clock) == 0
    await assert_stored_exactly_once(a, upstream)


@pytest.mark.peers
async def test_unfenced_pullers_racing_on_one_folder_store_each_message_once(
    nodes: Callable[[int], Awaitable[list[Node]]], dovecot: Dovecot
) -> None:
    """Without leases at all, the dedupe key and the last-UID advance alone keep it exactly once."""
    total = 8 * BATCH
    dovecot.deliver_files("biuro", "INBOX", corpus.normal(total, size=2000, seed=16))
    upstream = dovecot.messages("biuro", "INBOX")
    a, b = await nodes(2)
    pullers = [
        FolderPuller(job, lambda n=n: n.config, n.pipeline, n.db, HostLimits())  # type: ignore[misc]
        for n in (a, b)
        for job in jobs(n.config)
    ]

    async def sync(p: FolderPuller) -> int:
        client = await p.connect()
        try:
            return await p.sync(client)
        finally:
            await client.logout()

    counts = await asyncio.gather(*(sync(p) for p in pullers))
    assert sum(counts) == total  # each stored some, none stored one the other did
    await assert_stored_exactly_once(a, upstream)


@pytest.mark.peers
async def test_lease_flipping_between_two_instances_during_a_pull_stores_each_message_once(
    nodes: Callable[[int], Awaitable[list[Node]]], dovecot: Dovecot
) -> None:
    """Two PullManagers; the lease is moved by force between them every 100-300 ms while they pull."""
    total = 20 * BATCH
    dovecot.deliver_files("biuro", "INBOX", corpus.normal(total, size=2000, seed=17))
    upstream = dovecot.messages("biuro", "INBOX")
    a, b = await nodes(2)
    (job,) = jobs(a.config)
    tick, ttl = timedelta(seconds=0.02), timedelta(seconds=2)
    managers = {
        n.name: PullManager(lambda n=n: n.config, n.pipeline, n.db, instance=n.name, tick=tick, ttl=ttl)  # type: ignore[misc]
        for n in (a, b)
    }
    rng = random.Random(17)

    async def count() -> int:
        async with a.db.read() as s:
            return len((await s.execute(select(Message.id))).all())

    moves = 0
    try:
        for n in (a, b):
            managers[n.name].apply(n.config)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while (stored := await count()) < total:
            assert loop.time() < deadline, f"{stored} of {total} stored"
            await asyncio.sleep(rng.uniform(0.1, 0.3))
            found = await holders(a.db, datetime.now(UTC))
            if job.key in found:
                await move(a.db, job.key, "b" if found[job.key] == "a" else "a", datetime.now(UTC))
                moves += 1
        assert moves >= 5  # the lease changed hands many times in the middle of the pull
        await asyncio.sleep(0.5)  # whatever was in flight has ended: nothing more arrives
        assert await count() == total
    finally:
        for m in managers.values():
            await m.stop()
    await assert_stored_exactly_once(a, upstream)
    assert await holders(a.db, datetime.now(UTC)) == {}  # a clean stop releases


# --------------------------------------------------------------------------- three daemons (Done means 1)


@dataclass
class ClusterPull:
    """What :func:`cluster_pull` measured (seconds from the daemons' spawn unless said otherwise)."""

    mailboxes: int
    messages: int
    spread_at: float = 0.0  # leases spread evenly over the instances (before any mail arrives)
    spread: dict[str, int] = field(default_factory=dict)  # ``cluster status``: leases per instance
    delivered_at: float = 0.0  # every message is upstream (delivered while the pull runs)
    victim: str = ""  # none when nothing was killed
    victim_folders: dict[str, int] = field(default_factory=dict)  # its mailboxes: messages pulled at the kill
    stored_at_kill: int = 0
    killed_at: float = 0.0
    taken_over_after: float = 0.0  # from the kill until its folders have live holders
    done_at: float = 0.0  # every message stored
    pull_seconds: float = 0.0  # from the first delivery until every message was stored
    stored: int = 0
    log: list[str] = field(default_factory=list)


async def cluster_pull(
    root: Path,
    pg_url: str,
    dovecot: Dovecot,
    mailboxes: int = 12,
    messages: int = 500,
    size: int = 3000,
    kill_at: float | None = 0.2,
    say: Callable[[str], None] = lambda _: None,
    instances: int = 3,
    mark: Callable[[str, dict[str, ClusterInstance]], Awaitable[None]] | None = None,
    blobs: str = "postgresql",
) -> ClusterPull:
    """Done means 1: ``instances`` instances a, b, c, ... (blobs in PostgreSQL) pull ``mailboxes``
    x ``messages``; the one holding the most leases is killed with SIGKILL once ``kill_at`` of the
    mail is stored (``None``: no kill). ``blobs`` is the ``[blobs] backend`` ("fs": each its
    own ``data_dir``, which only a single instance may use in production).

    Leases are spread before the mail arrives, so the pull runs spread. ``mark``, if given, is
    awaited with "pull" just before the first delivery and with "stored" once every message is
    stored (the instances still running, each with a metrics listener): bench/cluster_scale.py
    measures between the two. Returns the timings; the caller checks the end state with
    :func:`assert_cluster_stored_exactly_once`.
    """
    from tests.test_pull_daemon import mailbox_toml

    out = ClusterPull(mailboxes, messages)
    users = [f"box{i:02}" for i in range(mailboxes)]
    for user in users:
        dovecot.add_user(user, PASSWORD)
    boxes = "".join(mailbox_toml(u, dovecot.port, idle=False, poll_interval="1s") for u in users)
    nodes: dict[str, ClusterInstance] = {}
    for name in string.ascii_lowercase[:instances]:
        node = ClusterInstance.configure(root / name, pg_url, name, blobs, metrics=mark is not None)
        config = node.daemon.config
        config.write_text(config.read_text(encoding="utf-8") + boxes, encoding="utf-8")
        node.daemon.env["MAILGATE_TEST_UPSTREAM"] = PASSWORD
        nodes[name] = node
    db = Database(pg_url)
    loop = asyncio.get_running_loop()
    t0 = loop.time()

    async def wait_for(what: str, check: Callable[[], Awaitable[bool]], seconds: float) -> float:
        start = loop.time()
        while not await check():
            if loop.time() - start > seconds:
                logs = "\n".join(n.daemon.log.read_text()[-2000:] for n in nodes.values())
                pytest.fail(f"{what} not within {seconds}s:\n{logs}")
            await asyncio.sleep(0.02)
        return loop.time() - t0

    async def held() -> dict[str, list[str]]:
        now = datetime.now(UTC)
        by: dict[str, list[str]] = {}
        async with db.read() as s:
            for r in await leases.leases(s):
                if r.expires_at > now:
                    by.setdefault(r.holder, []).append(r.mailbox)
        return by

    async def stored() -> int:
        async with db.read() as s:
            return int(await s.scalar(select(func.count()).select_from(Message)) or 0)

    share = leases.share(mailboxes, instances)
    try:
        await asyncio.gather(*(asyncio.to_thread(n.daemon.start) for n in nodes.values()))

        async def spread_evenly() -> bool:  # each its share (or what remains), nothing unheld
            counts = [len(v) for v in (await held()).values()]
            return len(counts) == instances and sum(counts) == mailboxes and max(counts) <= share

        out.spread_at = await wait_for(f"leases spread over {', '.join(nodes)}", spread_evenly, 60)
        status = await asyncio.to_thread(nodes["a"].daemon.cli, "cluster", "status", "--format", "json")
        out.spread = {r["id"]: r["upstream_leases"] for r in json.loads(status)}
        say(f"leases spread after {out.spread_at:.1f}s: {out.spread}")

        mail = {user: corpus.normal(messages, size=size, seed=1500 + i) for i, user in enumerate(users)}

        def deliver() -> None:  # a batch to each mailbox in turn: every folder fills up while pulled
            for start in range(0, messages, BATCH):
                for user in users:
                    dovecot.deliver_files(user, "INBOX", mail[user][start : start + BATCH])
            out.delivered_at = loop.time() - t0

        if mark is not None:
            await mark("pull", nodes)
        start = loop.time()
        delivering = asyncio.create_task(asyncio.to_thread(deliver))
        total = mailboxes * messages
        if kill_at is not None:
            await wait_for(f"{kill_at:.0%} stored", lambda: _at_least(stored, int(total * kill_at)), 120)
            by = await held()
            out.victim = max(sorted(by), key=lambda name: len(by[name]))
            nodes[out.victim].daemon.stop()  # SIGKILL
            out.killed_at = loop.time() - t0
            out.stored_at_kill = await stored()
            async with db.read() as s:
                pulled = {r.mailbox: r.last_uid for r in (await s.scalars(select(UpstreamFolder))).all()}
            out.victim_folders = {m: pulled.get(m, 0) for m in sorted(by[out.victim])}
            say(f"killed {out.victim} at {out.killed_at:.1f}s, {out.stored_at_kill} stored")
            say(f"its folders, messages pulled: {out.victim_folders}")

            async def taken_over() -> bool:
                holders = await held()
                taken = {m for name, folders in holders.items() if name != out.victim for m in folders}
                return taken.issuperset(out.victim_folders)

            out.taken_over_after = await wait_for("the takeover", taken_over, 90) - out.killed_at
            say(f"its folders taken over {out.taken_over_after:.1f}s after the kill")
        await delivering
        out.done_at = await wait_for("every message stored", lambda: _at_least(stored, total), 180)
        out.pull_seconds = loop.time() - start
        if mark is not None:
            await mark("stored", nodes)
        await asyncio.sleep(2)  # a second look: nothing more arrives (a duplicate would)
        out.stored = await stored()
        for name, node in nodes.items():
            if name != out.victim:
                assert await asyncio.to_thread(node.daemon.signal, signal.SIGTERM) == 0
        return out
    finally:
        for node in nodes.values():
            node.daemon.stop()
        await db.close()


async def _at_least(count: Callable[[], Awaitable[int]], n: int) -> bool:
    return await count() >= n


async def assert_cluster_stored_exactly_once(pg_url: str, dovecot: Dovecot, mailboxes: int) -> None:
    """Every upstream message of every mailbox is stored once, by Message-ID and by sha256."""
    upstream = [
        raw
        for i in range(mailboxes)
        for raw in await asyncio.to_thread(dovecot.messages, f"box{i:02}", "INBOX")
    ]
    db = Database(pg_url)
    try:
        async with db.read() as s:
            rows = (await s.execute(select(Message.message_id, Message.blob))).all()
    finally:
        await db.close()
    assert Counter(m for m, _ in rows) == Counter(message_id(raw) for raw in upstream)
    assert Counter(b for _, b in rows) == Counter(hashlib.sha256(raw).hexdigest() for raw in upstream)


CLUSTER_MAILBOXES, CLUSTER_MESSAGES = 12, 500  # bench/cluster_pull.py runs the same with any size


@pytest.mark.peers
@pytest.mark.timeout(300)
async def test_three_instances_pull_every_message_once_and_take_over_a_killed_ones_folders(
    tmp_path: Path, db_url: str, dovecot: Dovecot
) -> None:
    """Done means 1: three daemons on one PostgreSQL, kill -9 of the busiest mid-pull."""
    if db_url.startswith("sqlite"):
        pytest.skip("several instances run on PostgreSQL only (SQLite refuses a second one)")
    run = await cluster_pull(tmp_path, db_url, dovecot, CLUSTER_MAILBOXES, CLUSTER_MESSAGES)
    share = leases.share(CLUSTER_MAILBOXES, 3)
    assert run.spread == {"a": share, "b": share, "c": share}
    # Killed in the middle of the pull: some of its folders were partly pulled.
    assert any(0 < n < CLUSTER_MESSAGES for n in run.victim_folders.values()), run
    assert run.stored_at_kill < CLUSTER_MAILBOXES * CLUSTER_MESSAGES
    assert run.taken_over_after <= 45
    assert run.stored == CLUSTER_MAILBOXES * CLUSTER_MESSAGES
    await assert_cluster_stored_exactly_once(db_url, dovecot, CLUSTER_MAILBOXES)

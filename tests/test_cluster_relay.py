"""The relay queue shared by three instances on one PostgreSQL (issue #15, Done means 2).

Three ``mailgate run`` subprocesses (instances "a", "b", "c", blobs in
PostgreSQL) share one fresh database and one tenant whose ``[tenants.smtp]``
is a smarthost on loopback. Replies are submitted (authenticated) round-robin
to the three; the smarthost tells which Message-IDs it received, how often,
and (the slow one) how many sessions carried each at once.
"""

from __future__ import annotations

import asyncio
import smtplib
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email import message_from_bytes
from pathlib import Path

import pytest

from tests.conftest import Sink, free_port
from tests.smarthost import Slow
from tests.test_auth_cache import PASSWORD
from tests.test_cluster import Instance
from tests.test_relay import SENDER, message

pytestmark = pytest.mark.peers


@pytest.fixture
def pg_url(db_url: str) -> str:
    if db_url.startswith("sqlite"):
        pytest.skip("several instances share a relay queue on PostgreSQL only; SQLite runs one instance")
    return db_url


@dataclass
class Node:
    instance: Instance
    submission: int


def configure(root: Path, pg_url: str, name: str, smarthost_port: int) -> Node:
    """Instance ``name`` of tenant acme relaying through 127.0.0.1:``smarthost_port``, retrying each 1 s."""
    node = Instance.configure(root / name, pg_url, name)
    submission = free_port()
    path = node.daemon.config
    body = path.read_text(encoding="utf-8")
    body = body.replace("[listen]\n", f'[listen]\nsubmission = "127.0.0.1:{submission}"\n', 1)
    body += (
        f'\n[tenants.smtp]\nhost = "127.0.0.1"\nport = {smarthost_port}\nfrom = "{SENDER}"\n'
        '\n[queue]\nretry = ["1s"]\n'
    )
    path.write_text(body, encoding="utf-8")
    return Node(node, submission)


@pytest.fixture
def cluster(tmp_path: Path, pg_url: str) -> Iterator[Callable[[int], list[Node]]]:
    """Makes instances a, b, c relaying through a smarthost on a port; stopped (SIGKILL) afterwards."""
    nodes: list[Node] = []

    def make(port: int) -> list[Node]:
        nodes.extend(configure(tmp_path, pg_url, name, port) for name in "abc")
        return nodes

    try:
        yield make
    finally:
        for n in nodes:
            n.instance.daemon.stop()


async def start(nodes: list[Node]) -> None:
    await asyncio.gather(*(asyncio.to_thread(n.instance.start) for n in nodes))


def submit(nodes: list[Node], count: int, prefix: str) -> list[str]:
    """``count`` replies, round-robin over ``nodes``, one authenticated session per instance."""
    ids = [f"<{prefix}-{i}@acme.test>" for i in range(count)]
    clients = []
    try:
        for n in nodes:
            c = smtplib.SMTP("127.0.0.1", n.submission, timeout=30)
            c.login("anna@acme.test", PASSWORD)
            clients.append(c)
        for i, msgid in enumerate(ids):
            assert clients[i % len(clients)].sendmail(SENDER, ["customer@example.org"], message(msgid)) == {}
    finally:
        for c in clients:
            c.quit()
    return ids


async def wait_until(what: str, check: Callable[[], bool], seconds: float, nodes: list[Node]) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            logs = "\n".join(n.instance.daemon.log.read_text()[-1500:] for n in nodes)
            pytest.fail(f"{what} not within {seconds}s:\n{logs}")
        await asyncio.sleep(0.1)


async def test_300_replies_reach_the_smarthost_once_through_a_kill_9(
    cluster: Callable[[int], list[Node]], sink: Sink
) -> None:
    """Smarthost down, 300 replies round-robin to a, b, c; smarthost up; b killed mid-drain: each
    arrives once.

    Also the regression test for claims a killed instance held: they waited the full 15-minute
    claim (the drain never finished) until :func:`storage.queue.due` took over the claims of a
    registered instance whose id lock is free. And for the duplicates it made: a reply b's
    smarthost had accepted (250) before b recorded it was sent again by its taker (0 to 3 of the
    300 in a run) until the end of DATA was recorded first (:func:`storage.queue.ending`).
    """
    nodes = cluster(sink.port)
    await start(nodes)
    ids = await asyncio.to_thread(submit, nodes, 300, "drain")
    await asyncio.sleep(1.5)  # every instance tried at least once and deferred: the smarthost is down
    sink.start()
    await wait_until("a tenth delivered", lambda: sum(sink.message_ids().values()) >= 30, 30, nodes)
    nodes[1].instance.daemon.stop()  # SIGKILL, holding claims
    await wait_until("every reply delivered", lambda: set(sink.message_ids()) >= set(ids), 45, nodes)
    await asyncio.sleep(1.5)  # a second look: a duplicate would arrive now
    got = sink.message_ids()
    assert set(got) == set(ids)
    # What b had sent the end of DATA of when it died is held as uncertain, not sent again.
    assert [m for m, n in got.items() if n > 1] == []


async def test_a_slow_smarthost_never_gets_one_message_from_two_instances_at_once(
    cluster: Callable[[int], list[Node]],
) -> None:
    slow = await Slow().start()
    try:
        nodes = cluster(slow.port)
        await start(nodes)
        ids = await asyncio.to_thread(submit, nodes, 30, "slow")
        deadline = time.monotonic() + 40
        while {str(message_from_bytes(r.data).get("Message-ID", "")).strip() for r in slow.received} < set(
            ids
        ):
            assert time.monotonic() < deadline, f"{len(slow.received)} of {len(ids)} received"
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.5)
    finally:
        await slow.stop()
    assert {m: n for m, n in slow.most.items() if n > 1} == {}
    assert slow.peak <= 4  # queue.concurrency, for the three instances together
    got = Counter(str(message_from_bytes(r.data).get("Message-ID", "")).strip() for r in slow.received)
    assert [m for m, n in got.items() if n > 1] == []

"""Submissions share write transactions (group commit, issue #16) without losing a guarantee."""

from __future__ import annotations

import asyncio
from pathlib import Path

from sqlalchemy import event, select
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.auth import Identity
from gateway.ingest import Delivery
from gateway.smtp.outbox import Submitted
from storage.models import Agent
from tests.test_relay import CUSTOMER, SENDER, Gateway, gateway_config, message, running


async def identities(g: Gateway) -> dict[str, Identity]:
    async with g.db.read() as s:
        rows = (await s.execute(select(Agent.id, Agent.login).where(Agent.tenant_id == "acme"))).all()
    return {login: Identity(agent_id, "acme", login, ()) for agent_id, login in rows}


async def submit_together(
    g: Gateway, submissions: list[tuple[Identity, bytes]]
) -> tuple[list[Submitted], int]:
    """Submit all at once while the writer is held, so that they queue for one group; their replies
    and the write transactions committed after the writer was let go."""
    commits: list[int] = []
    release = asyncio.Event()

    async def hold(_: AsyncSession) -> None:
        await release.wait()

    holding = asyncio.create_task(g.db.grouped(hold))
    await asyncio.sleep(0.05)
    tasks = [
        asyncio.create_task(g.outbox.submit(g.tenant(), who, SENDER, [CUSTOMER], data))
        for who, data in submissions
    ]
    for _ in range(500):  # each submission's work before its transaction: parsing, its blob, its Sent copy
        await asyncio.sleep(0.01)
        if len(g.db._queued) == len(submissions):
            break
    assert len(g.db._queued) == len(submissions)
    event.listen(g.db.writer.sync_engine, "commit", lambda _conn: commits.append(1))
    release.set()
    await holding
    replies = await asyncio.gather(*tasks)
    return replies, len(commits)


async def test_eight_submissions_at_once_share_one_commit(tmp_path: Path, db_url: str) -> None:
    async with running(gateway_config(tmp_path, db_url)) as g:
        anna = (await identities(g))["anna@acme.test"]
        replies, commits = await submit_together(g, [(anna, message(f"<m{i}@acme.test>")) for i in range(8)])
        assert all(r.reply.startswith("250 ") for r in replies), replies
        assert len({r.queue_id for r in replies}) == 8
        assert commits == 1
        assert len(await g.queued()) == 8
        assert len(await g.folder("Sent")) == 8


async def test_two_replies_in_one_group_collide_once(tmp_path: Path, db_url: str) -> None:
    """Group commit keeps the collision check: of two agents' replies to one customer message in the same
    transaction, the second sees the first queued and is held."""
    async with running(gateway_config(tmp_path, db_url, collision="hold")) as g:
        customer = message("<c1@example.org>", sender=CUSTOMER, to=SENDER, subject="order 17")
        await g.pipeline.deliver(g.tenant(), customer, Delivery(source="smtp", recipients=(SENDER,)))
        agents = await identities(g)
        replies, _ = await submit_together(
            g,
            [
                (agents["anna@acme.test"], message("<a1@acme.test>", in_reply_to="<c1@example.org>")),
                (agents["piotr@acme.test"], message("<b1@acme.test>", in_reply_to="<c1@example.org>")),
            ],
        )
        assert sorted(r.reply[:3] for r in replies) == ["250", "450"], replies
        assert len(await g.queued()) == 1
        assert [kind for kind, _, _ in await g.events()] == ["answered", "collision"]

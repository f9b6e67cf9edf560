"""The shared inbox in any mail client: "answering" and answered-by marks (issue #19).

Theory of operation
-------------------
Every mark is an ordinary IMAP keyword, written through
:func:`storage.mailstore.store_flags` and announced with
:meth:`gateway.notify.Changes.publish` after the commit, as a STORE is: the
folder index and every idling session (in every instance) see it.

* **Answering.** An agent's client saves a draft (APPEND to the ``\\Drafts``
  folder) whose In-Reply-To/References name a stored customer message of the
  tenant (:func:`find_original`: the most recent one named, outside ``\\Sent``
  and ``\\Drafts``): a row in ``answering_marks`` names the agent, the
  customer message's Message-ID and the draft (folder and UID), and every
  copy of the customer message gets ``$Answering`` and the agent's
  ``$Answering<Name>`` (:func:`drafted`). A row ends when the agent's reply
  is queued (:func:`answered`), when its draft is expunged, or
  ``answering_expiry`` (default 2 h) after the draft was saved (the
  :class:`Sweeper`, at once when a ``\\Drafts`` folder changes, else every
  minute). A client saving a draft again stores a new one and deletes the old
  one: the marks stay while any of the agent's drafts to that message does.
  When the agent's last row for a message ends, ``$Answering<Name>`` goes;
  when the message's last row ends, ``$Answering`` goes.
* **Collision warnings.** An agent opening (a non-PEEK body FETCH) a message
  another agent's ``$Answering<Name>`` marks counts one ``collision`` event
  (:func:`opened`: in the transaction that sets ``\\Seen``, or, in a
  read-only EXAMINE session, in a transaction of its own), as a reply after a
  colleague's does: once per agent and message, in ``stats agents`` and
  ``mailgate_agent_collisions_total``.
* **Answered-by.** The transaction that queues an agent's reply
  (:mod:`gateway.smtp.outbox`) sets ``\\Answered`` and ``$AnsweredBy<Name>``
  on every copy of the customer message (every folder but ``\\Sent`` and
  ``\\Drafts``) and ends the agent's answering marks on it.

* **Internal notes.** An agent's submission to the tenant's ``notes_address``
  (:mod:`gateway.smtp.outbox`) is filed by :func:`file_note` in the folder of
  the conversation it replies to (else INBOX) with ``$Note`` and its subject
  prefixed ``[Note]`` (:func:`note_form`), never relayed and with no
  ``\\Sent`` copy; the other recipients of a reply-all get the message without
  the notes address in the envelope. A note takes no place in the hourly
  outbound limits (:func:`gateway.smtp.outbox.going_out`); a note alone that
  does not fit the quota is refused ``452 4.2.2`` (the client keeps it), the
  note copy of a reply-all is kept whatever the quota, as the ``\\Sent`` copy
  is. Relay-in refuses the notes address
  (:func:`gateway.smtp.policy.route_recipient`, ``550 5.7.1``).

``<Name>`` (:func:`keyword_name`) is made of the agent's configured ``name``:
its first word, in ASCII letters only (accents dropped: "Łukasz" gives
``Lukasz``), first letter upper case, at most 32 letters. When another agent of
the tenant has the same first word, all the words joined (``AnnaNowak``); a
name without letters gives the login's local part the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import structlog
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

import quotas
from gateway.auth import Identity
from gateway.config import Config, TenantSection
from gateway.message import Headers
from gateway.notify import Changes
from storage import events, mailstore
from storage.db import Database
from storage.models import Agent, AnsweringMark, Folder, Message

log = structlog.get_logger(__name__)

ANSWERING = "$Answering"
ANSWERED_BY = "$AnsweredBy"
NOTE = "$Note"
NAME_MAX = 32
SWEEP_EVERY = 60.0  # seconds between sweeps when no \\Drafts folder changes
_UNMARKED = ("\\Sent", "\\Drafts")  # folders whose messages are never customer messages
_LATIN = str.maketrans({"ł": "l", "Ł": "L", "ø": "o", "Ø": "O", "đ": "d", "Đ": "D", "ß": "ss", "æ": "ae"})


def _letters(word: str) -> str:
    decomposed = unicodedata.normalize("NFKD", word.translate(_LATIN))
    return "".join(c for c in decomposed if c.isascii() and c.isalpha())


def _cap(word: str) -> str:
    return word[:1].upper() + word[1:]


def _names(name: str, login: str) -> tuple[str, str]:
    """An agent's short and long keyword names (see the module docstring)."""
    words = [w for w in (_letters(w) for w in name.split()) if w]
    if not words:
        words = [_letters(login.partition("@")[0]) or "Agent"]
    return _cap(words[0])[:NAME_MAX], "".join(map(_cap, words))[:NAME_MAX]


def keyword_name(tenant: TenantSection, login: str) -> str:
    """The ``<Name>`` of an agent's ``$Answering<Name>`` and ``$AnsweredBy<Name>`` keywords."""
    agent = tenant.agent(login)
    short, long = _names(agent.name if agent is not None else "", login)
    shared = any(
        _names(other.name, other.login)[0].lower() == short.lower()
        for other in tenant.agents
        if other.login != login
    )
    return long if shared else short


def answering_keyword(tenant: TenantSection, login: str) -> str:
    return ANSWERING + keyword_name(tenant, login)


def answered_by_keyword(tenant: TenantSection, login: str) -> str:
    return ANSWERED_BY + keyword_name(tenant, login)


@dataclass(frozen=True, slots=True)
class Original:
    """The customer message a reply (or a draft, or a note) answers."""

    id: int
    folder_id: int
    uid: int
    received_at: datetime
    message_id: str


async def find_original(s: AsyncSession, tenant_id: str, headers: Headers) -> Original | None:
    """The most recent stored message of the tenant, outside ``\\Sent`` and ``\\Drafts``, that
    ``headers``' In-Reply-To or References name; None if none."""
    ids = [*headers.in_reply_to, *headers.references]
    if not ids:
        return None
    row = (
        await s.execute(
            select(Message.id, Message.folder_id, Message.uid, Message.received_at, Message.message_id)
            .join(Folder, Folder.id == Message.folder_id)
            .where(
                Message.tenant_id == tenant_id,
                Message.message_id.in_(ids),
                Folder.special_use.is_(None) | Folder.special_use.not_in(_UNMARKED),
            )
            .order_by(Message.received_at.desc(), Message.id.desc())
            .limit(1)
        )
    ).first()
    return None if row is None else Original(row[0], row[1], row[2], row[3], row[4] or "")


async def _flag(
    s: AsyncSession, tenant_id: str, message_id: str, flags: Sequence[str], mode: Literal["add", "remove"]
) -> set[int]:
    """Add or remove flags on every copy of a customer message; the folders that changed."""
    rows = (
        await s.execute(
            select(Folder, Message.uid)
            .join(Message, Message.folder_id == Folder.id)
            .where(
                Message.tenant_id == tenant_id,
                Message.message_id == message_id,
                Folder.special_use.is_(None) | Folder.special_use.not_in(_UNMARKED),
            )
            .order_by(Folder.id, Message.uid)
        )
    ).all()
    by_folder: dict[int, tuple[Folder, list[int]]] = {}
    for folder, uid in rows:
        by_folder.setdefault(folder.id, (folder, []))[1].append(uid)
    changed = set()
    for folder, uids in by_folder.values():
        if await mailstore.store_flags(s, folder, uids, flags, mode):
            changed.add(folder.id)
    return changed


async def _unmark(s: AsyncSession, tenant: TenantSection, target: str, ended: dict[int, str]) -> set[int]:
    """After the rows of these agents (id: login) on ``target`` ended: take off what no row holds."""
    remaining = set(
        (
            await s.scalars(
                select(AnsweringMark.agent_id).where(
                    AnsweringMark.tenant_id == tenant.id, AnsweringMark.target == target
                )
            )
        ).all()
    )
    remove = [answering_keyword(tenant, who) for agent_id, who in ended.items() if agent_id not in remaining]
    if not remaining:
        remove.append(ANSWERING)
    return await _flag(s, tenant.id, target, remove, "remove") if remove else set()


async def drafted(
    db: Database,
    changes: Changes,
    tenant: TenantSection,
    identity: Identity,
    folder: Folder,
    stored: Sequence[mailstore.Stored],
    headers: Sequence[Headers],
    now: datetime,
) -> None:
    """Drafts an agent APPENDed (committed): mark the customer messages they reply to."""
    if folder.special_use != "\\Drafts":
        return
    drafts = [(st, h) for st, h in zip(stored, headers, strict=True) if h.in_reply_to or h.references]
    if not drafts:
        return
    keyword = answering_keyword(tenant, identity.login)

    async def mark(s: AsyncSession) -> set[int]:
        changed: set[int] = set()
        for st, h in drafts:
            original = await find_original(s, tenant.id, h)
            if original is None:
                continue
            s.add(
                AnsweringMark(
                    tenant_id=tenant.id,
                    agent_id=identity.agent_id,
                    target=original.message_id,
                    draft_folder_id=st.folder_id,
                    draft_uid=st.uid,
                    created_at=now,
                )
            )
            changed |= await _flag(s, tenant.id, original.message_id, [ANSWERING, keyword], "add")
        return changed

    changed = await db.grouped(mark)
    if changed:
        log.info("answering.marked", tenant=tenant.id, agent=identity.login, keyword=keyword)
    changes.publish(changed)


async def opened(
    s: AsyncSession,
    tenant: TenantSection,
    identity: Identity,
    folder_id: int,
    uids: Sequence[int],
    now: datetime,
) -> int:
    """An agent opened these messages (in the transaction setting ``\\Seen``): count a collision
    warning for each one another agent is answering; how many were new."""
    own = answering_keyword(tenant, identity.login)
    rows = await s.execute(
        select(Message.id, Message.keywords).where(
            Message.folder_id == folder_id, Message.uid.in_(list(uids)), Message.keywords.contains(ANSWERING)
        )
    )
    counted = 0
    for id_, keywords in rows.all():
        others = [k for k in keywords.split(" ") if k.startswith(ANSWERING) and k not in (ANSWERING, own)]
        if others and await events.record_collision(s, tenant.id, identity.agent_id, id_, now):
            log.info("answering.collision_warning", tenant=tenant.id, agent=identity.login, answering=others)
            counted += 1
    return counted


async def answered(s: AsyncSession, tenant: TenantSection, identity: Identity, target: str) -> set[int]:
    """An agent's reply to ``target`` is queued (in its transaction): ``\\Answered`` and
    ``$AnsweredBy<Name>`` on every copy, the agent's answering marks ended; the folders changed."""
    await s.execute(
        delete(AnsweringMark).where(
            AnsweringMark.tenant_id == tenant.id,
            AnsweringMark.agent_id == identity.agent_id,
            AnsweringMark.target == target,
        )
    )
    changed = await _unmark(s, tenant, target, {identity.agent_id: identity.login})
    return changed | await _flag(
        s, tenant.id, target, ["\\Answered", answered_by_keyword(tenant, identity.login)], "add"
    )


class Sweeper:
    """Ends the answering marks of expunged drafts and of drafts older than ``answering_expiry``."""

    def __init__(
        self,
        config: Callable[[], Config],
        db: Database,
        changes: Changes,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.config = config
        self.db = db
        self.changes = changes
        self.clock = clock or (lambda: datetime.now(UTC))
        self._drafts: set[int] = set()  # the \\Drafts folders, as of the last sweep
        self._wake = asyncio.Event()
        changes.subscribe(self._changed)

    def _changed(self, folder_ids: set[int] | None) -> None:
        if folder_ids is None or not self._drafts.isdisjoint(folder_ids):
            self._wake.set()

    async def run(self) -> None:
        """Sweep at once when a \\Drafts folder changes, else every :data:`SWEEP_EVERY` seconds."""
        while True:
            self._wake.clear()
            try:
                await self.sweep()
            except Exception:
                log.exception("answering.sweep_failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SWEEP_EVERY):  # not wait_for: it can swallow a cancel (3.11)
                    await self._wake.wait()

    async def sweep(self) -> int:
        """End the marks whose draft is gone or expired; how many rows ended."""
        now = self.clock()
        config = self.config()
        tenants = {t.id: t for t in config.tenants}

        async def run(s: AsyncSession) -> tuple[int, set[int]]:
            drafts = await s.scalars(select(Folder.id).where(Folder.special_use == "\\Drafts"))
            self._drafts = set(drafts.all())
            rows = (
                await s.execute(
                    select(AnsweringMark, Agent.login, Message.id)
                    .join(Agent, Agent.id == AnsweringMark.agent_id)
                    .outerjoin(
                        Message,
                        (Message.folder_id == AnsweringMark.draft_folder_id)
                        & (Message.uid == AnsweringMark.draft_uid),
                    )
                )
            ).all()
            ended: dict[tuple[str, str], dict[int, str]] = {}
            gone = []
            for mark, login, draft in rows:
                tenant = tenants.get(mark.tenant_id)
                if draft is None or tenant is None or mark.created_at + tenant.answering_expiry <= now:
                    gone.append(mark.id)
                    ended.setdefault((mark.tenant_id, mark.target), {})[mark.agent_id] = login
            if not gone:
                return 0, set()
            await s.execute(delete(AnsweringMark).where(AnsweringMark.id.in_(gone)))
            changed: set[int] = set()
            for (tenant_id, target), agents in ended.items():
                if tenant_id in tenants:
                    changed |= await _unmark(s, tenants[tenant_id], target, agents)
            return len(gone), changed

        count, changed = await self.db.grouped(run)
        if count:
            log.info("answering.swept", marks=count, folders=len(changed))
        self.changes.publish(changed)
        return count


_SUBJECT = re.compile(rb"(?im)^subject:[ \t]*")


def note_form(raw: bytes, headers: Headers) -> bytes:
    """An internal note as stored: its subject prefixed ``[Note]`` (once)."""
    head, body = raw[: headers.body_offset], raw[headers.body_offset :]
    if (headers.get("Subject") or "").startswith("[Note]"):
        return raw
    match = _SUBJECT.search(head)
    if match is None:
        return b"Subject: [Note]\r\n" + raw
    return head[: match.end()] + b"[Note] " + head[match.end() :] + body


async def file_note(
    s: AsyncSession, tenant_id: str, headers: Headers, note: mailstore.NewMessage, *, check_quota: bool
) -> int:
    """Store an agent's internal note in the folder of the conversation it replies to (else INBOX),
    with ``$Note``; the folder's id. With ``check_quota``, a note that does not fit the folder's or
    the tenant's quota raises :class:`quotas.QuotaExceeded`."""
    original = await find_original(s, tenant_id, headers)
    folder = await s.get(Folder, original.folder_id) if original is not None else None
    if folder is None:
        folder = await mailstore.require_folder(s, tenant_id, mailstore.INBOX)
    if check_quota:
        await quotas.check(s, folder, note.size)
    await mailstore.append(s, folder, [note])
    return folder.id

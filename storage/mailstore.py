"""The mail store: folders and messages, IMAP-shaped.

Every function works inside the caller's write transaction (a session from
:meth:`storage.db.Database.write`), so a caller can combine, say, a dedupe key
and an append into one atomic commit.

Theory of operation
-------------------
* UIDs and MODSEQs are allocated by one ``UPDATE folders ... RETURNING``
  per operation. The row update locks the folder row until commit (SQLite
  serialises writers anyway), so per folder UIDs and MODSEQs are strictly
  increasing and never reused, even across concurrent writers.
* Usage counters (``folders.used_*`` and ``tenants.used_*``) change in the same
  statement batch as the rows they count. The tenant counters skip the
  ``\\Junk`` folder, so the tenant quota never counts spam and a quota check
  is a single row read.
* Expunged UIDs are recorded with the MODSEQ and time of their removal, so IMAP
  sessions can learn what vanished since a given MODSEQ (QRESYNC's VANISHED).
  :func:`prune_expunges` drops records older than :data:`EXPUNGE_HISTORY`
  and raises ``folders.expunges_pruned`` to the highest MODSEQ it dropped:
  the history is complete above it.
* ``folders.recent_uid`` is the first UID no IMAP session has taken
  ``\\Recent`` for; :func:`claim_recent` advances it by compare-and-set.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final, Literal

from sqlalchemy import bindparam, case, delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from storage.db import Prepared, rows_changed
from storage.errors import FolderExists, NoSuchFolder, StoreError
from storage.flags import join_flags, keywords_text, split_flags
from storage.models import Base, Expunge, Folder, Message, Tenant

INBOX = "INBOX"
DELIMITER = "/"
JUNK = "\\Junk"

# The tenant's shared message templates (Thunderbird finds them by this name): every agent sees
# and reads them, only the tenant's admins change them.
TEMPLATES = "Templates"

# Folders every tenant has: name and special-use (None: found by its name).
DEFAULT_FOLDERS: tuple[tuple[str, str | None], ...] = (
    (INBOX, "\\Inbox"),
    ("Sent", "\\Sent"),
    ("Drafts", "\\Drafts"),
    ("Trash", "\\Trash"),
    ("Spam", JUNK),
    ("Archive", "\\Archive"),
    (TEMPLATES, None),
)


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A message to append: its blob and the metadata parsed from it."""

    blob: str
    size: int
    received_at: datetime
    internal_date: datetime | None = None  # defaults to received_at
    message_id: str | None = None
    in_reply_to: str | None = None
    references: str | None = None
    subject: str = ""
    from_addr: str = ""
    to_addr: str = ""
    sent_date: datetime | None = None
    flags: frozenset[str] = field(default_factory=frozenset)
    envelope: bytes | None = None  # IMAP wire forms, see gateway.imap.mime
    bodystructure: bytes | None = None
    body: bytes | None = None
    sort_keys: SortKeys | None = None  # IMAP SORT keys, see gateway.imap.sort
    submitted_by: int | None = None  # the agent whose submission this is mailgate's Sent copy of


@dataclass(frozen=True, slots=True)
class SortKeys:
    """A message's IMAP SORT keys, as ``gateway.imap.sort.keys`` computes them (the ``sort_*`` columns)."""

    subject: str
    from_: str
    to: str
    cc: str
    display_from: str
    display_to: str


SORT_COLUMNS: Final = (
    "sort_subject",
    "sort_from",
    "sort_to",
    "sort_cc",
    "sort_display_from",
    "sort_display_to",
)


def sort_columns(keys: SortKeys | None) -> dict[str, str | None]:
    """The ``sort_*`` column values of ``keys`` (all NULL for None: computed later)."""
    values = (None,) * len(SORT_COLUMNS) if keys is None else dataclasses.astuple(keys)
    return {c: _text(v) for c, v in zip(SORT_COLUMNS, values, strict=True)}


@dataclass(frozen=True, slots=True)
class Stored:
    """Where an appended or copied message landed."""

    id: int
    folder_id: int
    uid: int
    modseq: int


@dataclass(frozen=True, slots=True)
class FlagChange:
    """A message whose flags a STORE changed: its new flags, as names and as stored."""

    uid: int
    modseq: int
    flags: tuple[str, ...]
    id: int = 0
    sysflags: int = 0
    keywords: str = ""


def _text(value: str | None) -> str | None:
    """Header-derived text as every engine can store it: no NUL, no lone surrogates.

    Only the searchable copies are cleaned; the blob keeps the original bytes.
    """
    if value is None:
        return None
    return value.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")


def canonical_name(name: str) -> str:
    """Folder name with ``INBOX`` matched case-insensitively, as IMAP requires."""
    return INBOX if name.upper() == INBOX else name


def in_templates(name: str) -> bool:
    """Whether ``name`` is the Templates folder or one below it."""
    return name == TEMPLATES or name.startswith(TEMPLATES + DELIMITER)


# --------------------------------------------------------------------------- folders


# Built once: building the expression costs more than running it (an APPEND looks a folder up).
_FOLDER_BY_NAME = select(Folder).where(Folder.tenant_id == bindparam("tid"), Folder.name == bindparam("name"))


async def get_folder(s: AsyncSession, tenant_id: str, name: str) -> Folder | None:
    """The tenant's folder with this name, if any."""
    return await s.scalar(_FOLDER_BY_NAME, {"tid": tenant_id, "name": canonical_name(name)})


async def require_folder(s: AsyncSession, tenant_id: str, name: str) -> Folder:
    """The tenant's folder with this name; :class:`NoSuchFolder` otherwise."""
    folder = await get_folder(s, tenant_id, name)
    if folder is None:
        raise NoSuchFolder(name)
    return folder


async def special_folder(s: AsyncSession, tenant_id: str, special_use: str) -> Folder | None:
    """The tenant's folder with this special-use (e.g. ``\\Junk``), if any."""
    return await s.scalar(
        select(Folder)
        .where(Folder.tenant_id == tenant_id, Folder.special_use == special_use)
        .order_by(Folder.id)
        .limit(1)
    )


async def list_folders(s: AsyncSession, tenant_id: str) -> Sequence[Folder]:
    """All folders of a tenant, by name."""
    return (await s.scalars(select(Folder).where(Folder.tenant_id == tenant_id).order_by(Folder.name))).all()


async def create_folder(
    s: AsyncSession,
    tenant_id: str,
    name: str,
    *,
    special_use: str | None = None,
    quota_bytes: int | None = None,
    subscribed: bool = True,
) -> Folder:
    """Create a folder with a fresh UIDVALIDITY; :class:`FolderExists` if taken.

    Folders the operator and the rules make are ``subscribed`` (clients that
    show only subscribed folders show them); an agent's IMAP CREATE is not.
    """
    name = canonical_name(name)
    if not name or len(name) > 255 or name.startswith(DELIMITER) or f"{DELIMITER}{DELIMITER}" in name:
        raise StoreError(f"invalid folder name {name!r}")
    if await get_folder(s, tenant_id, name) is not None:
        raise FolderExists(name)
    # A folder created again after a delete must never reuse a UIDVALIDITY.
    now = int(time.time())
    uidvalidity = await s.scalar(
        update(Tenant)
        .where(Tenant.id == tenant_id)
        .values(
            last_uidvalidity=case((Tenant.last_uidvalidity + 1 > now, Tenant.last_uidvalidity + 1), else_=now)
        )
        .returning(Tenant.last_uidvalidity)
    )
    if uidvalidity is None:
        raise StoreError(f"no tenant {tenant_id!r}")
    folder = Folder(
        tenant_id=tenant_id,
        name=name,
        special_use=special_use,
        uidvalidity=uidvalidity % 2**32 or 1,
        uidnext=1,
        highestmodseq=1,
        quota_bytes=quota_bytes,
        used_bytes=0,
        used_messages=0,
        subscribed=subscribed or special_use is not None,
        recent_uid=1,
    )
    s.add(folder)
    await s.flush()
    return folder


async def rename_folder(s: AsyncSession, tenant_id: str, old: str, new: str) -> None:
    """Rename a folder and its subfolders (``old/...``)."""
    folder = await require_folder(s, tenant_id, old)
    if folder.name == INBOX:
        raise StoreError("INBOX cannot be renamed")
    new = canonical_name(new)
    if await get_folder(s, tenant_id, new) is not None:
        raise FolderExists(new)
    children = await s.scalars(
        select(Folder).where(
            Folder.tenant_id == tenant_id, Folder.name.startswith(folder.name + DELIMITER, autoescape=True)
        )
    )
    for child in children:
        child.name = new + child.name[len(folder.name) :]
    folder.name = new
    await s.flush()


async def delete_folder(s: AsyncSession, tenant_id: str, name: str) -> None:
    """Delete a folder with its messages, releasing their usage."""
    folder = await require_folder(s, tenant_id, name)
    if folder.name == INBOX:
        raise StoreError("INBOX cannot be deleted")
    used = (
        await s.execute(select(Folder.used_bytes, Folder.used_messages).where(Folder.id == folder.id))
    ).one()
    await _account_tenant(s, folder, -used.used_bytes, -used.used_messages)
    await s.execute(delete(Message).where(Message.folder_id == folder.id))
    await s.execute(delete(Expunge).where(Expunge.folder_id == folder.id))
    await s.delete(folder)
    await s.flush()


# --------------------------------------------------------------------------- messages


async def append(s: AsyncSession, folder: Folder, messages: Sequence[NewMessage]) -> list[Stored]:
    """Append messages to a folder, allocating consecutive UIDs and one MODSEQ."""
    if not messages:
        return []
    first_uid, modseq = await reserve(s, folder, len(messages), sum(m.size for m in messages))
    return await insert_reserved(s, folder, first_uid, modseq, messages)


async def reserve(s: AsyncSession, folder: Folder, count: int, nbytes: int) -> tuple[int, int]:
    """The half of :func:`append` that needs no message's metadata: ``count`` consecutive UIDs and
    a MODSEQ in ``folder``, and ``nbytes`` more usage for it and its tenant; returns (first UID,
    MODSEQ). An APPEND runs it while the MIME worker parses the message."""
    first_uid, modseq = await _allocate(s, folder.id, count, nbytes, count)
    await _account_tenant(s, folder, nbytes, count)
    return first_uid, modseq


async def insert_reserved(
    s: AsyncSession, folder: Folder, first_uid: int, modseq: int, messages: Sequence[NewMessage]
) -> list[Stored]:
    """The rows of ``messages``, at the UIDs from ``first_uid`` and the MODSEQ :func:`reserve` gave."""
    rows = []
    for i, m in enumerate(messages):
        bits, keywords = split_flags(m.flags)
        rows.append(
            {
                "tenant_id": folder.tenant_id,
                "folder_id": folder.id,
                "uid": first_uid + i,
                "modseq": modseq,
                "sysflags": bits,
                "keywords": keywords_text(keywords),
                "size": m.size,
                "internal_date": m.internal_date or m.received_at,
                "received_at": m.received_at,
                "blob": m.blob,
                "message_id": _text(m.message_id),
                "in_reply_to": _text(m.in_reply_to),
                "references": _text(m.references),
                "subject": _text(m.subject),
                "from_addr": _text(m.from_addr),
                "to_addr": _text(m.to_addr),
                "sent_date": m.sent_date,
                "envelope": m.envelope,
                "bodystructure": m.bodystructure,
                "body": m.body,
                **sort_columns(m.sort_keys),
                "submitted_by": m.submitted_by,
            }
        )
    ids = (await _INSERT_MESSAGES.run(s, rows)).rows
    return [Stored(id_, folder.id, first_uid + i, modseq) for i, (id_,) in enumerate(ids)]


async def submitted_copy(
    s: AsyncSession, folder: Folder, agent_id: int, message_id: str, since: datetime
) -> int | None:
    """The UID of mailgate's copy, in ``folder``, of ``agent_id``'s submission with ``message_id``
    received at ``since`` or later; None if there is none."""
    uid = await s.scalar(
        select(Message.uid)
        .where(
            Message.tenant_id == folder.tenant_id,
            Message.message_id == _text(message_id),
            Message.folder_id == folder.id,
            Message.submitted_by == agent_id,
            Message.received_at >= since,
        )
        .order_by(Message.uid.desc())
        .limit(1)
    )
    return None if uid is None else int(uid)


async def store_flags(
    s: AsyncSession,
    folder: Folder,
    uids: Iterable[int],
    flags: Iterable[str],
    mode: Literal["set", "add", "remove"],
) -> list[FlagChange]:
    """Change flags of the messages with these UIDs; unchanged messages keep their MODSEQ."""
    bits, keywords = split_flags(flags)
    rows = (
        await s.execute(
            select(Message.id, Message.uid, Message.sysflags, Message.keywords)
            .where(Message.folder_id == folder.id, Message.uid.in_(list(uids)))
            .order_by(Message.uid)
        )
    ).all()
    pending: list[tuple[int, int, int, str]] = []
    for id_, uid, old_bits, old_text in rows:
        kw = frozenset(k for k in old_text.split(" ") if k)
        if mode == "set":
            new_bits, new_kw = bits, keywords
        elif mode == "add":
            new_bits, new_kw = old_bits | bits, kw | keywords
        else:
            new_bits, new_kw = old_bits & ~bits, kw - keywords
        if (new_bits, new_kw) != (old_bits, kw):
            pending.append((id_, uid, new_bits, keywords_text(new_kw)))
    if not pending:
        return []
    _, modseq = await _allocate(s, folder.id, 0)
    await s.execute(  # one executemany, by primary key
        update(Message),
        [{"id": id_, "sysflags": b, "keywords": k, "modseq": modseq} for id_, _uid, b, k in pending],
    )
    return [FlagChange(uid, modseq, join_flags(b, k), id_, b, k) for id_, uid, b, k in pending]


async def copy(
    s: AsyncSession, source: Folder, uids: Iterable[int], target: Folder
) -> list[tuple[int, Stored]]:
    """Copy messages to another folder; returns (source UID, new location) pairs."""
    rows = (
        await s.scalars(
            select(Message)
            .where(Message.folder_id == source.id, Message.uid.in_(list(uids)))
            .order_by(Message.uid)
        )
    ).all()
    if not rows:
        return []
    copies = [
        NewMessage(
            blob=m.blob,
            size=m.size,
            received_at=m.received_at,
            internal_date=m.internal_date,
            message_id=m.message_id,
            in_reply_to=m.in_reply_to,
            references=m.references,
            subject=m.subject,
            from_addr=m.from_addr,
            to_addr=m.to_addr,
            sent_date=m.sent_date,
            flags=frozenset(join_flags(m.sysflags, m.keywords)),
            envelope=m.envelope,
            bodystructure=m.bodystructure,
            body=m.body,
            sort_keys=None if m.sort_subject is None else SortKeys(*(getattr(m, c) for c in SORT_COLUMNS)),
        )
        for m in rows
    ]
    stored = await append(s, target, copies)
    return [(m.uid, st) for m, st in zip(rows, stored, strict=True)]


async def move(
    s: AsyncSession, source: Folder, uids: Iterable[int], target: Folder
) -> list[tuple[int, Stored]]:
    """Move messages: copy, then expunge the originals, in one transaction."""
    moved = await copy(s, source, uids, target)
    await expunge(s, source, [uid for uid, _ in moved])
    return moved


async def expunge(s: AsyncSession, folder: Folder, uids: Iterable[int] | None = None) -> list[int]:
    """Remove messages: the given UIDs, or (None) every message flagged ``\\Deleted``."""
    query = select(Message.uid, Message.size).where(Message.folder_id == folder.id)
    if uids is None:
        query = query.where(Message.sysflags.op("&")(8) != 0)
    else:
        query = query.where(Message.uid.in_(list(uids)))
    rows = (await s.execute(query.order_by(Message.uid))).all()
    if not rows:
        return []
    removed = [uid for uid, _ in rows]
    _, modseq = await _allocate(s, folder.id, 0, -sum(size for _, size in rows), -len(rows))
    await s.execute(delete(Message).where(Message.folder_id == folder.id, Message.uid.in_(removed)))
    now = datetime.now(UTC)
    await s.execute(
        insert(Expunge),
        [{"folder_id": folder.id, "uid": u, "modseq": modseq, "expunged_at": now} for u in removed],
    )
    await _account_tenant(s, folder, -sum(size for _, size in rows), -len(rows))
    return removed


EXPUNGE_HISTORY = timedelta(days=30)  # how long expunged UIDs are remembered (IMAP QRESYNC)


async def prune_expunges(s: AsyncSession, now: datetime, keep: timedelta = EXPUNGE_HISTORY) -> int:
    """Forget expunges older than ``keep``; the number forgotten.

    Each folder's ``expunges_pruned`` first rises to the highest MODSEQ forgotten,
    so a resync from below it knows the history is incomplete there.
    """
    cutoff = now - keep
    pruned = (
        await s.execute(
            select(Expunge.folder_id, func.max(Expunge.modseq))
            .where(Expunge.expunged_at < cutoff)
            .group_by(Expunge.folder_id)
        )
    ).all()
    if not pruned:
        return 0
    for folder_id, modseq in pruned:
        await s.execute(
            update(Folder)
            .where(Folder.id == folder_id, Folder.expunges_pruned < modseq)
            .values(expunges_pruned=modseq)
        )
    return await rows_changed(s, delete(Expunge).where(Expunge.expunged_at < cutoff))


async def claim_recent(s: AsyncSession, folder_id: int, upto: int) -> int:
    """Take ``\\Recent`` for the folder's UIDs below ``upto`` that no session took yet.

    Returns the first UID taken: the caller holds ``\\Recent`` for the UIDs in
    ``[returned, upto)`` (none if it returns ``upto``). ``folders.recent_uid``
    only grows, by a compare-and-set, so two sessions never take the same UID.
    """
    while True:
        ((first,),) = (await _RECENT_FROM.run(s, {"fid": folder_id})).rows or [(None,)]
        if first is None or first >= upto:
            return upto
        taken = await _TAKE_RECENT.run(s, {"fid": folder_id, "first": first, "upto": upto})
        if taken.rowcount == 1:
            return int(first)


# --------------------------------------------------------------------------- internals


# The hot statements, built once and run as storage.db.Prepared: Core on tables, so the
# ORM neither rebuilds nor synchronises them on every delivery. Identity-map
# copies of Folder/Tenant counters may therefore be stale; code that needs
# them reads them with a query (see delete_folder).
_folders, _tenants, _messages = (Base.metadata.tables[n] for n in ("folders", "tenants", "messages"))
_ALLOCATE = Prepared(  # one write of the folder's row per change: UIDs, MODSEQ and usage together
    update(_folders)
    .where(_folders.c.id == bindparam("fid"))
    .values(
        uidnext=_folders.c.uidnext + bindparam("n"),
        highestmodseq=_folders.c.highestmodseq + 1,
        used_bytes=_folders.c.used_bytes + bindparam("nbytes"),
        used_messages=_folders.c.used_messages + bindparam("nmessages"),
    )
    .returning(_folders.c.uidnext, _folders.c.highestmodseq)
)
_ACCOUNT_TENANT = Prepared(
    update(_tenants)
    .where(_tenants.c.id == bindparam("tid"))
    .values(
        used_bytes=_tenants.c.used_bytes + bindparam("nbytes"),
        used_messages=_tenants.c.used_messages + bindparam("nmessages"),
    )
)
_RECENT_FROM = Prepared(select(_folders.c.recent_uid).where(_folders.c.id == bindparam("fid")))
_TAKE_RECENT = Prepared(
    update(_folders)
    .where(_folders.c.id == bindparam("fid"), _folders.c.recent_uid == bindparam("first"))
    .values(recent_uid=bindparam("upto"))
)
_INSERT_MESSAGES = Prepared(insert(_messages).returning(_messages.c.id, sort_by_parameter_order=True))


async def _allocate(
    s: AsyncSession, folder_id: int, count: int, nbytes: int = 0, nmessages: int = 0
) -> tuple[int, int]:
    """Reserve ``count`` UIDs and a new MODSEQ, and add ``nbytes`` and ``nmessages`` to the folder's
    usage (the tenant's is :func:`_account_tenant`'s); returns (first UID, MODSEQ)."""
    params = {"fid": folder_id, "n": count, "nbytes": nbytes, "nmessages": nmessages}
    ((uidnext, modseq),) = (await _ALLOCATE.run(s, params)).rows
    return int(uidnext) - count, int(modseq)


async def _account_tenant(s: AsyncSession, folder: Folder, nbytes: int, nmessages: int) -> None:
    """Add to the tenant's usage what ``folder`` gained (negative: lost); Spam never counts."""
    if folder.special_use != JUNK:
        await _ACCOUNT_TENANT.run(s, {"tid": folder.tenant_id, "nbytes": nbytes, "nmessages": nmessages})

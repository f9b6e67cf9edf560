"""One IMAP connection's state and command semantics (no sockets).

Theory of operation
-------------------
The state machine is the table :data:`ALLOWED`: which commands each state
(not authenticated, authenticated, selected) accepts; anything else is
``BAD``. A command runs against the database and writes its responses into
:attr:`Session.out`; the I/O class sends the buffer once per command, so a
FETCH over a folder is a few large writes, not one per line.

Before the tagged reply of every command (and of IDLE after its ``+``),
:meth:`Session.sync` reads what changed in the selected folder since the
session last looked and :meth:`View.report <gateway.imap.view.View.report>`,
the one owner of the session's view, decides what to tell (new keywords as
FLAGS, flag changes as FETCH, expunges as EXPUNGE, new messages as EXISTS,
RECENT), holding EXPUNGE back during FETCH, STORE and SEARCH (RFC 3501 7.4.1,
RFC 2180). Commands that show flags themselves (STORE, a FETCH that sets
``\\Seen``) tell the view, so the report does not repeat them; nothing else
moves the view's MODSEQ. The cheap check is one row (the folder's
HIGHESTMODSEQ and UIDNEXT); only when it moved does the session query the
changes.

QRESYNC (RFC 7162 3.2), once enabled: the view tells expunges as VANISHED
and the tagged reply may carry ``[HIGHESTMODSEQ]``; SELECT (QRESYNC ...) and
UID FETCH (CHANGEDSINCE ... VANISHED) answer ``VANISHED (EARLIER)`` from the
store's expunge history (:meth:`Session._vanished`), or, for a MODSEQ older
than the history kept, from the UIDs the folder lacks, range by range.

Who may change what is one question, :meth:`Session.refusal`, asked per
command (the configuration can change under a running session): nothing
while the tenant is read-only (its plan ended, or it is suspended: ``NO
[CANNOT]`` with the reason), and the shared ``Templates`` folder only for the
tenant's admins (``NO [NOPERM]``). A SELECT the answer refuses is an EXAMINE
(``[READ-ONLY]``), so reading never sets ``\\Seen`` there; the commands that
write ask it before anything else.

Domain errors carry their wire reply (``StoreError.imap_code``); this module
is the one place where they become ``NO [CODE] text``.
"""

from __future__ import annotations

import asyncio
import dataclasses
from bisect import bisect_left, bisect_right
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any

import structlog
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

import quotas
from gateway import answering, plans
from gateway.auth import Authenticator, AuthUnavailable, Identity
from gateway.config import Config
from gateway.imap import commands as c
from gateway.imap import imapurl, mime, sort, thread, wire
from gateway.imap.index import ENTRY_COLUMNS, Entry, FolderIndex
from gateway.imap.search import search, uses
from gateway.imap.view import FlagRow, FolderChanges, Update, View, keywords_of
from gateway.imap.wildcard import Matcher
from gateway.ingest import MimeWorker
from gateway.message import Headers, parse_headers
from gateway.notify import Changes
from gateway.spam import Learner
from storage import events, mailstore
from storage.blobs import BlobStore
from storage.blobs.interface import sha256
from storage.db import Database
from storage.errors import StoreError
from storage.flags import DELETED, SEEN
from storage.models import Expunge, Folder, Message, Tenant

log = structlog.get_logger(__name__)


class State(Enum):
    NOT_AUTHENTICATED = "not authenticated"
    AUTHENTICATED = "authenticated"
    SELECTED = "selected"
    LOGOUT = "logout"


_ANY = {"CAPABILITY", "NOOP", "LOGOUT", "ID"}
_AUTH = {
    "SELECT", "EXAMINE", "CREATE", "DELETE", "RENAME", "SUBSCRIBE", "UNSUBSCRIBE", "LIST", "LSUB",
    "STATUS", "APPEND", "NAMESPACE", "ENABLE", "GETQUOTAROOT", "GETQUOTA", "IDLE", "COMPRESS",
    "CANCELUPDATE",  # Dovecot answers it with no folder selected too (NO Unknown tag)
}  # fmt: skip
_SELECTED = {
    "CHECK", "CLOSE", "UNSELECT", "EXPUNGE", "SEARCH", "SORT", "THREAD", "FETCH", "STORE", "COPY", "MOVE",
}  # fmt: skip

ALLOWED: dict[State, set[str]] = {
    State.NOT_AUTHENTICATED: _ANY | {"STARTTLS", "LOGIN", "AUTHENTICATE"},
    State.AUTHENTICATED: _ANY | _AUTH,
    State.SELECTED: _ANY | _AUTH | _SELECTED,
    State.LOGOUT: set(),
}
# Commands during which EXPUNGE responses must not be sent (by sequence number; RFC 3501 7.4.1).
_NO_EXPUNGE = {"FETCH", "STORE", "SEARCH", "SORT", "THREAD"}
# By UID, these send none either when their key names messages by number or UID (RFC 2180 4.3
# allows it; Dovecot 2.3 holds them back then only).
_NO_UID_EXPUNGE = {"SEARCH", "SORT", "THREAD"}
_SPECIAL_USE_ATTRS = {"\\Archive", "\\Drafts", "\\Junk", "\\Sent", "\\Trash"}
CHUNK = 1000
STREAM = 256 * 1024  # a FETCH's responses are sent on once this much is waiting
BLOB_BATCH = 4 * 2**20  # message bytes a FETCH reads per thread hop
_META = frozenset({"UID", "FLAGS", "INTERNALDATE", "RFC822.SIZE", "MODSEQ"})  # FETCH items in the index
APPEND_LIMIT = 50 * 10**6
MAX_UPDATES = 10  # updating searches per session (CONTEXT=SEARCH), as Dovecot's CLIENT_MAX_SEARCH_UPDATES
INLINE_PARSE = 64 * 1024  # APPENDs up to this size get their stored form and headers on the event loop
SENT_COPY_WINDOW = timedelta(hours=24)  # how long a client's own copy of a sent message is recognised
MAX_NAME = 255  # characters in a folder name: the folders.name column, as mailstore.create_folder checks


class Bad(Exception):
    """A command refused with ``BAD text`` after parsing (the state it needs is missing)."""


def _supported(charset: str) -> None:
    """SEARCH, SORT and THREAD name a charset; search strings are UTF-8 only (RFC 3501 6.4.4 and
    RFC 5256: NO [BADCHARSET], not BAD)."""
    if charset not in ("UTF-8", "US-ASCII"):
        raise No("unsupported charset", "BADCHARSET (US-ASCII UTF-8)")


class No(Exception):
    """A command refused with ``NO [code] text``."""

    def __init__(self, text: str, code: str | None = None) -> None:
        super().__init__(text)
        self.code = code


class Session:
    """The state and commands of one IMAP connection."""

    def __init__(
        self,
        *,
        config: Callable[[], Config],
        db: Database,
        blobs: BlobStore,
        auth: Authenticator,
        changes: Changes,
        index: FolderIndex,
        peer: str,
        tls: bool,
        starttls_available: bool,
        loopback: bool,
        listener: str = "imap",
        learner: Learner | None = None,
        mime: MimeWorker | None = None,
    ) -> None:
        self.config = config
        self.mime = mime or MimeWorker()  # examines APPENDed messages
        self.learner = learner  # agents' moves into and out of \\Junk teach the spam filter
        self.db = db
        self.blobs = blobs
        self.auth = auth
        self.changes = changes
        self.peer = peer
        self.tls = tls
        self.starttls_available = starttls_available
        self.loopback = loopback
        self.listener = listener
        self.state = State.NOT_AUTHENTICATED
        self.identity: Identity | None = None
        self.index = index
        self._view: View | None = None
        self._view_key = 0  # the view's registration with the folder index
        self.condstore = False
        self.qresync = False  # ENABLE QRESYNC (RFC 7162 3.2.3): VANISHED instead of EXPUNGE from now on
        self.compressed = False  # COMPRESS DEFLATE is on: the I/O class switches after the OK
        self.saved: list[int] = []
        self.out = bytearray()
        # Set by the I/O class: sends what :meth:`take` gives, waiting while the client is slow.
        self.flush: Callable[[bytes], Awaitable[None]] | None = None
        self.log = log.bind(peer=peer)

    @property
    def view(self) -> View | None:
        """The selected folder as this session knows it (None when none is selected)."""
        return self._view

    @view.setter
    def view(self, view: View | None) -> None:
        """Select or close: the folder index serves the selected folder while the view lives."""
        if self._view is not None:
            self.index.close(self._view.folder_id, self._view_key)
        self._view = view
        if view is not None:
            self._view_key = self.index.open(view.folder_id, view.modseq)

    def close(self) -> None:
        """The connection ended."""
        self.view = None

    @property
    def closing(self) -> bool:
        """True once the client logged out: the connection is to be closed."""
        return self.state is State.LOGOUT

    # ------------------------------------------------------------------ output

    def untagged(self, data: bytes) -> None:
        self.out += b"* " + data + b"\r\n"

    def tagged(self, tag: str, status: str, text: str) -> None:
        self.out += tag.encode() + b" " + status.encode() + b" " + text.encode() + b"\r\n"

    def take(self) -> bytes:
        """The responses written so far, emptying the buffer."""
        data = bytes(self.out)
        self.out.clear()
        return data

    def greeting(self) -> None:
        self.out += b"* OK [CAPABILITY " + self.capabilities().encode() + b"] mailgate IMAP ready\r\n"

    def capabilities(self) -> str:
        caps = ["IMAP4rev1", "LITERAL+", "SASL-IR", "ID", "ENABLE", "IDLE"]
        if self.state is State.NOT_AUTHENTICATED:
            if self.starttls_available and not self.tls:
                caps.append("STARTTLS")
            if self.tls or self.loopback:
                caps.append("AUTH=PLAIN")
            else:
                caps.append("LOGINDISABLED")
            return " ".join(caps)
        caps += [
            "NAMESPACE", "UNSELECT", "UIDPLUS", "MOVE", "CHILDREN", "SPECIAL-USE", "CONDSTORE",
            "QRESYNC", "ESEARCH", "SEARCHRES", "QUOTA", "QUOTA=RES-STORAGE", f"APPENDLIMIT={APPEND_LIMIT}",
        ]  # fmt: skip
        caps += ["BINARY", "MULTIAPPEND", "CATENATE", "LIST-EXTENDED", "LIST-STATUS", "SORT", "SORT=DISPLAY"]
        caps += ["ESORT", "CONTEXT=SEARCH"]
        caps += ["THREAD=ORDEREDSUBJECT", "THREAD=REFERENCES"]
        if not self.compressed:
            caps.append("COMPRESS=DEFLATE")
        return " ".join(caps)

    # ------------------------------------------------------------------ dispatch

    async def handle(self, cmd: c.Command) -> None:
        """Run one command, writing its responses (untagged and tagged) to :attr:`out`."""
        name = cmd.name
        if name not in ALLOWED[self.state]:
            self.tagged(cmd.tag, "BAD", f"{name} is not allowed in the {self.state.value} state")
            return
        try:
            text = await getattr(self, "cmd_" + name.lower().replace(" ", "_"))(cmd)
        except Bad as exc:
            self.tagged(cmd.tag, "BAD", str(exc))
            return
        except No as exc:
            if self.view is not None:
                await self._sync_after(cmd, tagged=False)
            code = f"[{exc.code}] " if exc.code else ""
            self.tagged(cmd.tag, "NO", code + str(exc))
            return
        except StoreError as exc:
            self.tagged(cmd.tag, "NO", f"[{exc.imap_code}] {exc}")
            return
        # IDLE reports after its continuation (the I/O class syncs then, as Dovecot does); ENABLE
        # reports nothing (as Dovecot: the next command tells what changed, under the new rules).
        highest = None
        if self.view is not None and name not in ("LOGOUT", "IDLE", "ENABLE"):
            # QRESYNC's HIGHESTMODSEQ goes in the tagged OK unless that has a code already (as Dovecot)
            highest = await self._sync_after(cmd, tagged=text is not None and not text.startswith("["))
        if text is not None:
            if highest is not None:
                text = f"[HIGHESTMODSEQ {highest}] {text}"
            self.tagged(cmd.tag, "OK", text)

    async def _sync_after(self, cmd: c.Command, *, tagged: bool) -> int | None:
        """The report before a command's tagged reply, under RFC 3501 7.4.1's rules for EXPUNGE;
        with ``tagged``, the HIGHESTMODSEQ the tagged reply is to carry (QRESYNC), if any."""
        uid = bool(getattr(cmd, "uid", False))
        key = getattr(cmd, "key", None)
        by_set = isinstance(key, c.SearchKey) and uses(key, {"SEQ", "UID"})
        allow = cmd.name not in _NO_EXPUNGE or (uid and not (cmd.name in _NO_UID_EXPUNGE and by_set))
        return await self.sync(allow_expunge=allow, send_uid=uid and cmd.name == "STORE", tagged=tagged)

    # ------------------------------------------------------------------ any state

    async def cmd_capability(self, cmd: c.Command) -> str:
        self.untagged(b"CAPABILITY " + self.capabilities().encode())
        return "CAPABILITY completed"

    async def cmd_noop(self, cmd: c.Command) -> str:
        return "NOOP completed"

    async def cmd_logout(self, cmd: c.Command) -> str:
        self.untagged(b"BYE mailgate logging out")
        self.state = State.LOGOUT
        return "LOGOUT completed"

    async def cmd_id(self, cmd: c.Command) -> str:
        self.untagged(b'ID ("name" "mailgate")')
        return "ID completed"

    # ------------------------------------------------------------------ not authenticated

    async def cmd_starttls(self, cmd: c.Command) -> str | None:
        if not self.starttls_available or self.tls:
            raise No("TLS is not available" if not self.starttls_available else "TLS is already active")
        # The I/O class upgrades the connection after this reply.
        return "Begin TLS negotiation now"

    async def cmd_login(self, cmd: c.Login) -> str:
        return await self._authenticate(cmd.user, cmd.password)

    async def cmd_authenticate(self, cmd: c.Authenticate) -> str:
        if cmd.mechanism != "PLAIN":
            raise No(f"unsupported mechanism {cmd.mechanism}", "CANNOT")
        if cmd.initial is None:
            raise No("send the PLAIN response with the command (SASL-IR)", "CANNOT")
        parts = cmd.initial.split(b"\0")
        if len(parts) != 3:
            raise No("malformed PLAIN response", "AUTHENTICATIONFAILED")
        authz, user, password = (p.decode("utf-8", "replace") for p in parts)
        if authz and authz.lower() != user.lower():
            raise No("authorization identity must equal the login", "AUTHORIZATIONFAILED")
        return await self._authenticate(user, password)

    async def _authenticate(self, user: str, password: str) -> str:
        if not (self.tls or self.loopback):
            raise No("log in over TLS (STARTTLS) first", "PRIVACYREQUIRED")
        try:
            identity = await self.auth.verify(user, password, self.peer, self.listener)
        except AuthUnavailable as exc:
            raise No(str(exc), "UNAVAILABLE") from None
        if identity is None:
            raise No("invalid credentials", "AUTHENTICATIONFAILED")
        self.identity = identity
        self.state = State.AUTHENTICATED
        self.log = self.log.bind(tenant=identity.tenant_id, agent=identity.login)
        self.log.info("imap.login")
        return f"[CAPABILITY {self.capabilities()}] logged in"

    # ------------------------------------------------------------------ folders

    @property
    def me(self) -> Identity:
        """The logged-in agent (the state table guarantees there is one)."""
        if self.identity is None:
            raise No("not logged in")
        return self.identity

    @property
    def tenant_id(self) -> str:
        return self.me.tenant_id

    def visible(self, name: str) -> bool:
        """Whether the agent may see a folder (its ``folders`` list, or all; Templates always)."""
        allowed = self.me.folders
        return (
            not allowed
            or mailstore.in_templates(name)
            or any(name == f or name.startswith(f + mailstore.DELIMITER) for f in allowed)
        )

    def refusal(self, *names: str) -> No | None:
        """Why the agent may not change these folders now (None: it may); see the module docstring."""
        tenant = next((t for t in self.config().tenants if t.id == self.tenant_id), None)
        if tenant is None:
            return No("the account is no longer served here", "CANNOT")
        standing = plans.standing(tenant)
        if not standing.writable:
            return No(standing.why, "CANNOT")
        if any(mailstore.in_templates(mailstore.canonical_name(n)) for n in names):
            agent = tenant.agent(self.me.login)
            if agent is None or agent.role != "admin":
                return No("only the tenant's admins change Templates", "NOPERM")
        return None

    def may_change(self, *names: str) -> None:
        """Raise :meth:`refusal`'s answer, if any."""
        if (no := self.refusal(*names)) is not None:
            raise no

    def writable_view(self) -> View:
        """The selected folder, for a command that changes it: refused as :meth:`refusal` says,
        or as EXAMINE'd (``[READ-ONLY]``)."""
        view = self.selected
        self.may_change(view.name)
        if view.readonly:
            raise No("the folder is read-only", "READ-ONLY")
        return view

    async def folder(self, s: AsyncSession, name: str) -> Folder:
        """A visible folder of the agent's tenant; NO [NONEXISTENT] otherwise."""
        folder = await mailstore.get_folder(s, self.tenant_id, name)
        if folder is None or not self.visible(folder.name):
            raise No(f"no folder {name}", "NONEXISTENT")
        return folder

    async def cmd_select(self, cmd: c.Select) -> str:
        if self.view is not None:  # RFC 7162 3.2.11, RFC 9051 7.1 (Dovecot sends it too)
            self.untagged(b"OK [CLOSED] previous folder closed")
        self.view = None
        self.state = State.AUTHENTICATED
        if cmd.qresync is not None and not self.qresync:  # RFC 7162 3.2.5 (closed first, as Dovecot)
            raise Bad("QRESYNC is not enabled (ENABLE QRESYNC first)")
        if cmd.condstore:
            self.condstore = True
        resync, vanished, changed, known = None, b"", [], c.SeqSet()
        async with self.db.read() as s:
            folder = await self.folder(s, cmd.mailbox)
            # A folder the agent may not change now is EXAMINEd, whatever was asked.
            readonly = cmd.name == "EXAMINE" or self.refusal(folder.name) is not None
            state = self.index.loaded(folder.id)
            if state is not None and state.highest == folder.highestmodseq:
                # Another session has it open and the index is exactly this snapshot: no scan.
                uids = sorted(state.messages)
                unseen = min((e.uid for e in state.messages.values() if not e.sysflags & SEEN), default=None)
                keywords: Sequence[str] = [" ".join(state.keywords)]
            else:
                uids = list(
                    (
                        await s.scalars(
                            select(Message.uid).where(Message.folder_id == folder.id).order_by(Message.uid)
                        )
                    ).all()
                )
                unseen = await s.scalar(
                    select(func.min(Message.uid)).where(
                        Message.folder_id == folder.id, Message.sysflags.op("&")(SEEN) == 0
                    )
                )
                keywords = (
                    await s.scalars(select(Message.keywords).where(Message.folder_id == folder.id).distinct())
                ).all()
            resync = cmd.qresync if cmd.qresync and cmd.qresync.uidvalidity == folder.uidvalidity else None
            if resync is not None:  # RFC 7162 3.2.5.1: what changed since the client's last sync
                known = resync.known_uids or c.SeqSet(((1, max(folder.uidnext - 1, 1)),))
                vanished = await self._vanished(s, folder, resync.modseq, known, uids)
                changed = list(
                    await s.execute(
                        select(Message.uid, Message.sysflags, Message.keywords, Message.modseq)
                        .where(Message.folder_id == folder.id, Message.modseq > resync.modseq)
                        .order_by(Message.uid)
                    )
                )
        # The first session to see a message holds its \Recent (RFC 3501 2.3.2); EXAMINE claims none.
        # A write only when some are unclaimed (the claim is a compare-and-set: no race).
        first_recent = folder.recent_uid
        if not readonly and folder.recent_uid < folder.uidnext:
            upto = folder.uidnext
            first_recent = await self.db.grouped(lambda s: mailstore.claim_recent(s, folder.id, upto))
        view = View(folder.id, folder.name, readonly, folder.uidvalidity, uids, folder.highestmodseq)
        view.told = folder.highestmodseq
        view.keywords = {k for text in keywords for k in keywords_of(text)}
        view.recent = {u for u in uids if first_recent <= u < folder.uidnext}
        self.view = view
        for line in view.flags_responses():
            self.untagged(line)
        self.untagged(b"%d EXISTS" % len(uids))
        for line in view.recent_changed() or [b"0 RECENT"]:
            self.untagged(line)
        if unseen is not None:
            self.untagged(b"OK [UNSEEN %d] first unseen" % (view.seq(unseen) or 1))
        self.untagged(b"OK [UIDVALIDITY %d] UIDs valid" % folder.uidvalidity)
        self.untagged(b"OK [UIDNEXT %d] predicted next UID" % folder.uidnext)
        self.untagged(b"OK [HIGHESTMODSEQ %d] highest" % folder.highestmodseq)
        if resync is not None:
            if vanished:
                self.untagged(b"VANISHED (EARLIER) " + vanished)
            wanted = _Ranges(known)
            for r in changed:
                seq = view.seq(r.uid)
                if seq is not None and r.uid in wanted:
                    view.showed_modseq(r.modseq)
                    flags = view.flag_list(r.uid, r.sysflags, r.keywords)
                    self.untagged(b"%d FETCH (UID %d FLAGS %s MODSEQ (%d))" % (seq, r.uid, flags, r.modseq))
        self.state = State.SELECTED
        return f"[{'READ-ONLY' if readonly else 'READ-WRITE'}] {cmd.name} completed"

    cmd_examine = cmd_select

    async def cmd_create(self, cmd: c.MailboxCommand) -> str:
        name = cmd.mailbox.rstrip(mailstore.DELIMITER)
        self.may_change(name)
        if not self.visible(name):
            raise No("not allowed here", "NOPERM")
        if len(name) > MAX_NAME:
            raise No(f"folder names are at most {MAX_NAME} characters", "CANNOT")
        async with self.db.write() as s:
            # Create missing parents too, as RFC 3501 6.3.3 suggests.
            parts = name.split(mailstore.DELIMITER)
            for i in range(1, len(parts) + 1):
                path = mailstore.DELIMITER.join(parts[:i])
                if await mailstore.get_folder(s, self.tenant_id, path) is None:
                    # Not subscribed (RFC 3501 6.3.3: the client subscribes if it wants).
                    await mailstore.create_folder(s, self.tenant_id, path, subscribed=False)
                elif i == len(parts):
                    raise No(f"{name} exists already", "ALREADYEXISTS")
        return "CREATE completed"

    async def cmd_delete(self, cmd: c.MailboxCommand) -> str:
        self.may_change(cmd.mailbox)
        async with self.db.write() as s:
            folder = await self.folder(s, cmd.mailbox)
            if folder.special_use:
                raise No(f"{folder.name} is a {folder.special_use} folder", "CANNOT")
            await mailstore.delete_folder(s, self.tenant_id, folder.name)
        self.changes.publish([folder.id])  # sessions that have it selected learn it is gone
        if self.view is not None and self.view.folder_id == folder.id:
            self.view = None
            self.state = State.AUTHENTICATED
        return "DELETE completed"

    async def cmd_rename(self, cmd: c.Rename) -> str:
        self.may_change(cmd.old, cmd.new)
        if not self.visible(cmd.new):
            raise No("not allowed here", "NOPERM")
        async with self.db.write() as s:
            folder = await self.folder(s, cmd.old)
            # The folder's and its subfolders' names all change by the same length.
            under = folder.name + mailstore.DELIMITER
            longest = max(
                len(f.name)
                for f in await mailstore.list_folders(s, self.tenant_id)
                if f.name == folder.name or f.name.startswith(under)
            )
            if longest - len(folder.name) + len(cmd.new) > MAX_NAME:
                raise No(f"folder names are at most {MAX_NAME} characters", "CANNOT")
            await mailstore.rename_folder(s, self.tenant_id, folder.name, cmd.new)
        return "RENAME completed"

    async def _subscribe(self, cmd: c.MailboxCommand, on: bool) -> str:
        async with self.db.write() as s:
            folder = await self.folder(s, cmd.mailbox)
            folder.subscribed = on
        return f"{cmd.name} completed"

    async def cmd_subscribe(self, cmd: c.MailboxCommand) -> str:
        return await self._subscribe(cmd, True)

    async def cmd_unsubscribe(self, cmd: c.MailboxCommand) -> str:
        return await self._subscribe(cmd, False)

    async def cmd_list(self, cmd: c.List) -> str:
        async with self.db.read() as s:
            folders = [f for f in await mailstore.list_folders(s, self.tenant_id) if self.visible(f.name)]
        names = {f.name for f in folders}
        lsub = cmd.name == "LSUB"
        subscribed_only = lsub or "SUBSCRIBED" in cmd.select_options
        special_only = "SPECIAL-USE" in cmd.select_options
        if cmd.patterns == ("",):
            self.untagged(b'%s (\\Noselect) "/" ""' % cmd.name.encode())
            return f"{cmd.name} completed"
        matches = Matcher(cmd.reference + p for p in cmd.patterns)
        parents = {n[:i] for n in names for i in _delimiters(n)} if not lsub else set()
        if lsub:
            # RFC 3501 6.3.9: a "%" that stops above a subscribed folder lists its unsubscribed
            # ancestor, flagged \Noselect ("foo" for a subscribed "foo/bar").
            subscribed = {f.name for f in folders if f.subscribed}
            above = {
                n[:i] for n in subscribed if not matches(n) for i in _delimiters(n) if n[:i] not in subscribed
            }
            for name in sorted(a for a in above if matches(a)):
                self.untagged(b'LSUB (\\Noselect) "/" ' + wire.mailbox(name))
        # RFC 5258: an extended LIST (options, RETURN, several patterns) shows the children and
        # special-use attributes only when asked for, as Dovecot does; a basic one always.
        options = {*cmd.select_options, *cmd.return_options}
        extended = bool(options or cmd.status_items or len(cmd.patterns) > 1)
        # RFC 5258 RECURSIVEMATCH: a folder with a subscribed descendant is listed (when it
        # matches) with CHILDINFO ("SUBSCRIBED"), subscribed itself or not.
        recursive = subscribed_only and not lsub and "RECURSIVEMATCH" in cmd.select_options
        with_subscribed_child = (
            {f.name[:i] for f in folders if f.subscribed for i in _delimiters(f.name)} if recursive else set()
        )
        for f in folders:
            if not matches(f.name):
                continue
            childinfo = f.name in with_subscribed_child
            if subscribed_only and not f.subscribed and not childinfo:
                continue
            if special_only and f.special_use not in _SPECIAL_USE_ATTRS:
                continue
            attrs = []
            if f.subscribed and "SUBSCRIBED" in options:
                attrs.append("\\Subscribed")
            if not lsub and (not extended or "CHILDREN" in cmd.return_options):
                attrs.append("\\HasChildren" if f.name in parents else "\\HasNoChildren")
            if (
                not lsub
                and (not extended or "SPECIAL-USE" in options)
                and f.special_use in _SPECIAL_USE_ATTRS
            ):
                attrs.append(f.special_use)
            childinfo_data = b' (CHILDINFO ("SUBSCRIBED"))' if childinfo else b""
            line = (
                cmd.name.encode()
                + b" "
                + wire.flags(attrs)
                + b' "/" '
                + wire.mailbox(f.name)
                + childinfo_data
            )
            self.untagged(line)
            if cmd.status_items:  # RFC 5819 LIST-STATUS: right after the folder's LIST response
                async with self.db.read() as s:
                    self.untagged(await self._status(s, f, cmd.status_items))
        return f"{cmd.name} completed"

    cmd_lsub = cmd_list

    async def cmd_namespace(self, cmd: c.Command) -> str:
        self.untagged(b'NAMESPACE (("" "/")) NIL NIL')
        return "NAMESPACE completed"

    async def cmd_compress(self, cmd: c.Compress) -> str:
        """RFC 4978: the tagged OK goes out in clear, then the I/O class compresses both ways."""
        if self.compressed:
            raise No("DEFLATE is active already", "COMPRESSIONACTIVE")
        if cmd.mechanism != "DEFLATE":
            raise No(f"unknown compression mechanism {cmd.mechanism}")
        self.compressed = True
        return "DEFLATE active"

    async def cmd_enable(self, cmd: c.Enable) -> str:
        enabled = list(dict.fromkeys(cap for cap in cmd.capabilities if cap in ("CONDSTORE", "QRESYNC")))
        if enabled:
            self._enable_condstore()  # QRESYNC implies CONDSTORE (RFC 7162 3.2.3)
        if "QRESYNC" in enabled:
            self.qresync = True
        self.untagged(b"ENABLED" + b"".join(b" " + e.encode() for e in enabled))
        return "ENABLE completed"

    def _enable_condstore(self) -> None:
        """CONDSTORE from now on; in a selected folder, say how far the session is (RFC 7162 3.1)."""
        if not self.condstore and self.view is not None:
            self.untagged(b"OK [HIGHESTMODSEQ %d] highest" % self.view.modseq)
            self.view.told = self.view.modseq
        self.condstore = True

    async def cmd_status(self, cmd: c.Status) -> str:
        async with self.db.read() as s:
            folder = await self.folder(s, cmd.mailbox)
            self.untagged(await self._status(s, folder, cmd.items))
        return "STATUS completed"

    async def _status(self, s: AsyncSession, folder: Folder, items: Sequence[str]) -> bytes:
        """A ``STATUS`` response for ``folder`` (STATUS, and LIST's RETURN (STATUS ...))."""
        recent = unseen = 0
        if "RECENT" in items:
            recent = (
                await s.scalar(
                    select(func.count()).where(
                        Message.folder_id == folder.id, Message.uid >= folder.recent_uid
                    )
                )
                or 0
            )
        state = self.index.loaded(folder.id)  # a folder some session has open: counted already
        if "UNSEEN" in items and state is not None and state.highest == folder.highestmodseq:
            unseen = state.unseen
        elif "UNSEEN" in items:
            unseen = (
                await s.scalar(
                    select(func.count()).where(
                        Message.folder_id == folder.id, Message.sysflags.op("&")(SEEN) == 0
                    )
                )
                or 0
            )
        values = {
            "MESSAGES": folder.used_messages,
            "RECENT": recent,
            "UIDNEXT": folder.uidnext,
            "UIDVALIDITY": folder.uidvalidity,
            "UNSEEN": unseen,
            "HIGHESTMODSEQ": folder.highestmodseq,
            "SIZE": folder.used_bytes,
        }
        text = b" ".join(b"%s %d" % (i.encode(), values[i]) for i in items if i in values)
        return b"STATUS " + wire.mailbox(folder.name) + b" (" + text + b")"

    async def cmd_getquotaroot(self, cmd: c.MailboxCommand) -> str:
        async with self.db.read() as s:
            folder = await self.folder(s, cmd.mailbox)
            tenant = await self._tenant(s)
        roots = [b'""'] + ([wire.mailbox(folder.name)] if folder.quota_bytes is not None else [])
        self.untagged(b"QUOTAROOT " + wire.mailbox(folder.name) + b" " + b" ".join(roots))
        self._quota(b'""', tenant.used_bytes, tenant.quota_bytes)
        if folder.quota_bytes is not None:
            self._quota(wire.mailbox(folder.name), folder.used_bytes, folder.quota_bytes)
        return "GETQUOTAROOT completed"

    async def cmd_getquota(self, cmd: c.GetQuota) -> str:
        async with self.db.read() as s:
            if cmd.root == "":
                tenant = await self._tenant(s)
                self._quota(b'""', tenant.used_bytes, tenant.quota_bytes)
                return "GETQUOTA completed"
            folder = await self.folder(s, cmd.root)
        if folder.quota_bytes is None:
            raise No(f"{cmd.root} is not a quota root", "NONEXISTENT")
        self._quota(wire.mailbox(folder.name), folder.used_bytes, folder.quota_bytes)
        return "GETQUOTA completed"

    async def _tenant(self, s: AsyncSession) -> Tenant:
        tenant = await s.get(Tenant, self.tenant_id)
        if tenant is None:
            raise No("the tenant is gone")
        return tenant

    def _quota(self, root: bytes, used: int, limit: int | None) -> None:
        # RFC 9208 STORAGE is in units of 1024 octets; Spam never counts (see storage).
        if limit is None:
            self.untagged(b"QUOTA " + root + b" ()")
            return
        self.untagged(b"QUOTA %s (STORAGE %d %d)" % (root, -(-used // 1024), limit // 1024))

    async def cmd_append(self, cmd: c.Append) -> str:
        """APPEND of one message or several (MULTIAPPEND, RFC 3502: one transaction, all or none),
        each a literal or CATENATEd (RFC 4469) from text and URLs of messages the agent may read.

        The blob writer writes and fsyncs the blobs, and the MIME worker parses the messages'
        structures (:class:`gateway.ingest.MimeWorker`; child processes both), while the
        transaction finds the folder, checks the quota and reserves the UIDs. It awaits the
        structures before it inserts the rows (a blob's name is its sha256, known before it is
        written), and the blobs before it ends, so they are durable before the commit that
        references them.
        """
        self.may_change(cmd.mailbox)
        now = datetime.now(UTC)
        raws = [m.message if not m.catenate else await self._catenate(m.catenate) for m in cmd.messages]
        size = sum(map(len, raws))
        if size > APPEND_LIMIT:
            raise No("message too large", "TOOBIG")

        # Stored as an IMAP server stores it: CRLF line ends, no NUL (as Dovecot does).
        def stored_forms() -> list[tuple[bytes, Headers]]:
            return [(form, parse_headers(form)) for form in map(mime.stored_form, raws)]

        async def append(s: AsyncSession) -> tuple[Folder, list[mailstore.Stored] | int]:
            """The new messages' places, or the UID of mailgate's own copy in Sent (see _sent_copy_of)."""
            target = await quotas.target(s, self.tenant_id, cmd.mailbox)
            if target is None or not self.visible(target.folder.name):
                raise No(f"no folder {cmd.mailbox}", "TRYCREATE")
            folder = target.folder
            if sent is not None and folder.special_use == "\\Sent":
                uid = await mailstore.submitted_copy(
                    s, folder, self.me.agent_id, sent, now - SENT_COPY_WINDOW
                )
                if uid is not None:
                    if flags:
                        await mailstore.store_flags(s, folder, [uid], flags, "add")
                    return folder, uid
            target.check(size)
            nbytes = sum(len(raw) for raw in stored_raws)
            first_uid, modseq = await mailstore.reserve(s, folder, len(stored_raws), nbytes)
            new = [  # the MIME worker's answer, awaited only now
                dataclasses.replace(one, blob=digest, flags=frozenset(m.flags), internal_date=m.internal_date)
                for (_, _, one), digest, m in zip(await examined, digests, cmd.messages, strict=True)
            ]
            stored = await mailstore.insert_reserved(s, folder, first_uid, modseq, new)
            await self._claim_recent(s, folder.id, stored[-1].uid + 1)
            try:
                await asyncio.shield(written)  # durable before this transaction commits
            except OSError as exc:
                self.log.error("imap.append_unwritten", error=repr(exc))
                raise No("the message could not be written, try again later", "UNAVAILABLE") from None
            return folder, stored

        forms = stored_forms() if size <= INLINE_PARSE else await asyncio.to_thread(stored_forms)
        sent = self._sent_copy_of(forms[0][1].message_id) if len(forms) == 1 else None
        flags = cmd.messages[0].flags
        stored_raws = [raw for raw, _ in forms]
        written = asyncio.create_task(self.blobs.put_many(stored_raws))
        examined = asyncio.create_task(self.mime.examine(stored_raws, [now] * len(stored_raws)))
        try:
            digests = [await sha256(raw) for raw in stored_raws]  # the names put_many gives them
            folder, outcome = await self.db.grouped(append)
        finally:
            await asyncio.wait([written, examined])  # a blob nothing names is collected later (retention)
        if isinstance(outcome, int):
            if flags:
                self.changes.publish([folder.id])
            self.log.info("imap.sent_copy_kept", uid=outcome, message_id=sent)
            return (
                f"[APPENDUID {folder.uidvalidity} {outcome}] APPEND completed (mailgate filed it on sending)"
            )
        self.changes.publish([folder.id])
        tenant, drafts = self.config().tenant(self.tenant_id), [h for _, h in forms]
        await answering.drafted(self.db, self.changes, tenant, self.me, folder, outcome, drafts, now)
        uids = f"{outcome[0].uid}:{outcome[-1].uid}" if len(outcome) > 1 else str(outcome[0].uid)
        return f"[APPENDUID {folder.uidvalidity} {uids}] APPEND completed"

    def _sent_copy_of(self, message_id: str | None) -> str | None:
        """The Message-ID to look for in ``\\Sent`` when this agent APPENDs one message there.

        Thunderbird and Outlook save each sent message to Sent themselves. When
        the agent's ``save_sent`` is ``auto`` (the default) and the target is
        the tenant's ``\\Sent`` folder, a message whose Message-ID is that of
        mailgate's copy of this agent's submission in the last 24 hours is not
        stored again: its flags are added to that copy and the answer names the
        copy's UID.
        """
        agent = self.config().tenant(self.tenant_id).agent(self.me.login)
        return None if message_id is None or agent is None or agent.save_sent != "auto" else message_id

    async def _catenate(self, parts: Sequence[c.CatenatePart]) -> bytes:
        """The message a CATENATE builds; NO [BADURL url] for a URL that names nothing this agent may read
        (another tenant's folder, a stale UIDVALIDITY, a missing UID, another server)."""
        out = bytearray()
        for part in parts:
            if part.text is not None:
                out += part.text
            elif part.url is not None:
                out += await self._url_bytes(part.url)
            if len(out) > APPEND_LIMIT:
                raise No("message too large", "TOOBIG")
        return bytes(out)

    async def _url_bytes(self, url: str) -> bytes:
        try:
            ref = imapurl.parse(url, self.config().gateway.hostname)
        except imapurl.BadURL as exc:
            raise No(str(exc), f"BADURL {url}") from None
        async with self.db.read() as s:
            folder = await mailstore.get_folder(s, self.tenant_id, ref.mailbox)
            if folder is None or not self.visible(folder.name):
                raise No("no such folder", f"BADURL {url}")
            if ref.uidvalidity is not None and ref.uidvalidity != folder.uidvalidity:
                raise No("the folder's UIDVALIDITY changed", f"BADURL {url}")
            blob = await s.scalar(
                select(Message.blob).where(Message.folder_id == folder.id, Message.uid == ref.uid)
            )
        if blob is None:
            raise No("no such message", f"BADURL {url}")
        raw = await self.blobs.get(blob)
        data = raw if ref.section is None else mime.section(raw, ref.section.part, ref.section.text)
        if ref.partial is not None:
            start, length = ref.partial
            data = data[start : start + length] if length else data[start:]
        return data

    # ------------------------------------------------------------------ selected

    @property
    def selected(self) -> View:
        if self.view is None:
            raise No("no folder is selected")
        return self.view

    async def cmd_check(self, cmd: c.Command) -> str:
        return "CHECK completed"

    async def cmd_close(self, cmd: c.Command) -> str:
        view = self.selected
        if not view.readonly and self.refusal(view.name) is None:
            async with self.db.write() as s:
                folder = await s.get(Folder, view.folder_id)
                if folder is not None:
                    await mailstore.expunge(s, folder)
            self.changes.publish([view.folder_id])
        self.view = None
        self.state = State.AUTHENTICATED
        return "CLOSE completed"

    async def cmd_unselect(self, cmd: c.Command) -> str:
        self.view = None
        self.state = State.AUTHENTICATED
        return "UNSELECT completed"

    async def cmd_expunge(self, cmd: c.Command) -> str:
        view = self.writable_view()
        named = (
            view.resolve(cmd.sequence, uid=True, saved=self.saved) if isinstance(cmd, c.UidExpunge) else None
        )

        async def expunge(s: AsyncSession) -> tuple[list[int], int]:
            folder = await self._selected_folder(s)
            uids = named
            if uids is not None:
                rows = await s.scalars(
                    select(Message.uid).where(
                        Message.folder_id == folder.id,
                        Message.uid.in_(uids),
                        Message.sysflags.op("&")(DELETED) != 0,
                    )
                )
                uids = list(rows.all())
            removed = await mailstore.expunge(s, folder, uids)
            modseq = (
                await s.scalar(select(Folder.highestmodseq).where(Folder.id == folder.id)) if removed else 0
            )
            return removed, int(modseq or 0)

        removed, modseq = await self.db.grouped(expunge)
        if removed:
            self.changes.publish([view.folder_id])
            self.index.wrote(view.folder_id, modseq, expunged=removed)
        return "EXPUNGE completed"

    def _resolve(self, sequence: c.SeqSet, *, uid: bool) -> list[int]:
        """The UIDs a FETCH, STORE, COPY or MOVE names. By sequence number, a number past the last
        message (``*`` in an empty folder too) is BAD (RFC 3501 9, seq-number; as Dovecot answers)."""
        view = self.selected
        if not uid and not sequence.saved:
            for n in (n for r in sequence.ranges for n in r):
                if (n if n is not None else view.exists) > view.exists or view.exists == 0:
                    raise Bad("Invalid messageset")
        return view.resolve(sequence, uid=uid, saved=self.saved)

    async def _selected_folder(self, s: AsyncSession) -> Folder:
        folder = await s.get(Folder, self.selected.folder_id)
        if folder is None:
            raise No("the selected folder was deleted", "NONEXISTENT")
        return folder

    async def _matching(self, key: c.SearchKey, *columns: Any) -> list[Any]:
        """The selected folder's messages matching ``key`` (SORT, THREAD): their UID and ``columns``."""
        view = self.selected
        async with self.db.read() as s:
            found = set(await search(s, self.blobs, view, key, self.saved)) - view.gone
            rows = (
                await s.execute(
                    select(Message.uid, *columns).where(
                        Message.folder_id == view.folder_id, Message.uid <= view.max_uid
                    )
                )
            ).all()
        return [r for r in rows if r.uid in found]

    async def cmd_sort(self, cmd: c.Sort) -> str:
        """RFC 5256 SORT, RFC 5957 SORT=DISPLAY and RFC 5267 ESORT: the search, then
        :func:`gateway.imap.sort.order` over the stored keys, in a worker thread."""
        _supported(cmd.charset)
        self._new_update_tag(cmd)
        view = self.selected
        columns = [getattr(Message, name) for name in mailstore.SORT_COLUMNS]
        rows = await self._matching(
            cmd.key, Message.id, Message.internal_date, Message.sent_date, Message.size, *columns
        )
        filled = await self._fill_sort_keys([r.id for r in rows if r.sort_subject is None])
        seqs = [view.seq(r.uid) or 0 for r in rows]

        def ordered() -> list[int]:
            sortable = [
                sort.Row(
                    r.uid, seq, r.internal_date, r.sent_date, r.size,
                    filled.get(r.id) or mailstore.SortKeys(*r[-len(columns) :]),
                )
                for r, seq in zip(rows, seqs, strict=True)
            ]  # fmt: skip
            return [r.uid if cmd.uid else r.seq for r in sort.order(sortable, cmd.criteria)]

        numbers = await asyncio.to_thread(ordered)
        if cmd.returns is None:
            self.untagged(b"SORT" + b"".join(b" %d" % n for n in numbers))
        else:
            # SAVE (RFC 5182 with RFC 5267): the set, its order forgotten
            self._esearch(cmd, cmd.returns, [r.uid for r in rows], numbers)
        return "SORT completed"

    async def _fill_sort_keys(self, ids: Sequence[int]) -> dict[int, mailstore.SortKeys]:
        """SORT keys of messages stored before migration 0010, from their stored Subject and
        ENVELOPE (from the message only when it predates the ENVELOPE column too), written
        back so that each message is done once."""
        filled: dict[int, mailstore.SortKeys] = {}
        for start in range(0, len(ids), CHUNK):
            async with self.db.read() as s:
                rows = (
                    await s.execute(
                        select(Message.id, Message.subject, Message.envelope, Message.blob).where(
                            Message.id.in_(ids[start : start + CHUNK])
                        )
                    )
                ).all()
            envelopes = {r.id: r.envelope for r in rows}
            for r in rows:
                if r.envelope is None:
                    envelopes[r.id] = await asyncio.to_thread(mime.envelope, await self.blobs.get(r.blob))

            def compute(rows: Sequence[Any], envelopes: dict[int, bytes]) -> dict[int, mailstore.SortKeys]:
                return {r.id: sort.keys(r.subject or "", envelopes[r.id]) for r in rows}

            chunk = await asyncio.to_thread(compute, rows, envelopes)
            async with self.db.write() as s:
                await s.execute(
                    update(Message),
                    [{"id": id_} | mailstore.sort_columns(keys) for id_, keys in chunk.items()],
                )
            filled |= chunk
        return filled

    async def cmd_thread(self, cmd: c.Thread) -> str:
        """RFC 5256 THREAD: the search, then :mod:`gateway.imap.thread` on stored columns."""
        _supported(cmd.charset)
        view = self.selected
        rows = await self._matching(
            cmd.key, Message.internal_date, Message.sent_date, Message.subject, Message.message_id,
            Message.references, Message.in_reply_to,
        )  # fmt: skip
        messages = [
            thread.Msg(
                r.uid if cmd.uid else view.seq(r.uid) or 0, view.seq(r.uid) or 0,
                # whole seconds, as for SORT (see gateway.imap.sort)
                (r.sent_date or r.internal_date).replace(microsecond=0), r.subject or "", r.message_id,
                r.references, r.in_reply_to,
            )
            for r in rows
        ]  # fmt: skip
        algorithm = thread.references if cmd.algorithm == "REFERENCES" else thread.ordered_subject
        threads = await asyncio.to_thread(algorithm, messages)
        self.untagged(b"THREAD " + threads.encode())  # "THREAD " when empty, as Dovecot sends it
        return "THREAD completed"

    async def cmd_search(self, cmd: c.Search) -> str:
        if cmd.charset is not None:  # strings in another charset were decoded leniently: refuse them
            _supported(cmd.charset)
        self._new_update_tag(cmd)
        view = self.selected
        by_modseq = uses(cmd.key, {"MODSEQ"})
        if by_modseq:
            self._enable_condstore()
        async with self.db.read() as s:
            uids = await search(s, self.blobs, view, cmd.key, self.saved)
            uids = [u for u in uids if u not in view.gone]
            # RFC 7162 3.1.5: a search by MODSEQ also answers the highest MODSEQ it found.
            highest = await self._highest_modseq(s, uids) if by_modseq and uids else None
        numbers = uids if cmd.uid else [view.seq(u) or 0 for u in uids]
        if cmd.returns is None:
            modseq = b" (MODSEQ %d)" % highest if highest is not None else b""
            self.untagged(b"SEARCH" + b"".join(b" %d" % n for n in numbers) + modseq)
        else:
            self._esearch(cmd, cmd.returns, uids, numbers, highest)
        return "SEARCH completed"

    def _esearch(
        self, cmd: c.Search | c.Sort, returns: c.Returns, uids: list[int], numbers: list[int],
        modseq: int | None = None,
    ) -> None:  # fmt: skip
        """SEARCH or SORT with ``RETURN (...)``: SAVE, UPDATE and the ESEARCH response, its items in
        Dovecot's order (MIN MAX ALL PARTIAL COUNT MODSEQ). ``numbers`` are the results as the
        client gets them (in sort order for SORT: MIN is the first, RFC 5267 3.1); ``uids`` the same
        messages' UIDs."""
        options = set(returns.options) or {"ALL"}
        if "UPDATE" in options:
            self._register_update(cmd, uids)
        if "SAVE" in options:
            self.saved = sorted(uids)
        if options == {"SAVE"}:
            return
        parts = [b'(TAG "' + cmd.tag.encode() + b'")'] + ([b"UID"] if cmd.uid else [])
        if numbers and "MIN" in options:
            parts.append(b"MIN %d" % numbers[0])
        if numbers and "MAX" in options:
            parts.append(b"MAX %d" % numbers[-1])
        if numbers and "ALL" in options:
            parts.append(b"ALL " + wire.sequence(numbers))
        if returns.partial is not None:  # RFC 5267 4.4: positions low..high of the result
            low, high = returns.partial
            window = wire.sequence(numbers[low - 1 : high]) or b"NIL"
            parts.append(b"PARTIAL (%d:%d %s)" % (low, high, window))
        if "COUNT" in options:
            parts.append(b"COUNT %d" % len(numbers))
        if modseq is not None:
            parts.append(b"MODSEQ %d" % modseq)
        self.untagged(b"ESEARCH " + b" ".join(parts))

    def _new_update_tag(self, cmd: c.Search | c.Sort) -> None:
        """An updating search's tag names it until CANCELUPDATE: BAD if one already has it."""
        if cmd.returns is not None and "UPDATE" in cmd.returns.options and cmd.tag in self.selected.updates:
            raise Bad("Duplicate search update tag")

    def _register_update(self, cmd: c.Search | c.Sort, uids: list[int]) -> None:
        """Keep an updating search (RFC 5267 4.3) in the view; past :data:`MAX_UPDATES` the search is
        answered without updates and the client told so (``NO [NOUPDATE]``, as Dovecot does)."""
        view = self.selected
        if len(view.updates) >= MAX_UPDATES:
            self.untagged(b'NO [NOUPDATE "' + cmd.tag.encode() + b'"] Too many updating searches')
            return
        view.updates[cmd.tag] = Update(cmd.tag, cmd.uid, cmd.key, set(uids))

    async def cmd_cancelupdate(self, cmd: c.CancelUpdate) -> str:
        """RFC 5267 4.3: stop updating searches, in order; an unknown tag stops there (as Dovecot)."""
        for tag in cmd.tags:
            if self.view is None or self.view.updates.pop(tag, None) is None:
                raise No("Unknown tag.")
        return "Updates cancelled."

    async def _claim_recent(self, s: AsyncSession, folder_id: int, upto: int) -> None:
        """Messages this session adds to its own selected folder are its \\Recent ones (as in Dovecot):
        taken in the transaction that adds them, before another session can see them."""
        view = self.view
        if view is not None and view.folder_id == folder_id and not view.readonly:
            view.claimed.append((await mailstore.claim_recent(s, folder_id, upto), upto))

    async def _highest_modseq(self, s: AsyncSession, uids: list[int]) -> int:
        """The highest MODSEQ of these messages of the selected folder."""
        highest = 0
        for start in range(0, len(uids), CHUNK):
            chunk = uids[start : start + CHUNK]
            found = await s.scalar(
                select(func.max(Message.modseq)).where(
                    Message.folder_id == self.selected.folder_id, Message.uid.in_(chunk)
                )
            )
            highest = max(highest, found or 0)
        return highest

    async def cmd_fetch(self, cmd: c.Fetch) -> str:
        view = self.selected
        uids = self._resolve(cmd.sequence, uid=cmd.uid)
        atts = list(dict.fromkeys(cmd.atts))  # an item named twice is answered once
        names = {a.name for a in atts}
        if cmd.vanished and not self.qresync:  # RFC 7162 3.2.6
            raise Bad("VANISHED needs QRESYNC (ENABLE QRESYNC first)")
        if "MODSEQ" in names or cmd.changed_since is not None:
            self._enable_condstore()
        if cmd.vanished and cmd.changed_since is not None:
            async with self.db.read() as s:
                vanished = await self._vanished(
                    s, await self._selected_folder(s), cmd.changed_since, cmd.sequence, view.uids, view
                )
            if vanished:
                self.untagged(b"VANISHED (EARLIER) " + vanished)
        if "FLAGS" in names:
            await self._announce_keywords(view)
        if cmd.uid and "UID" not in names:
            atts.insert(0, c.FetchAtt("UID"))
        if cmd.changed_since is not None and "MODSEQ" not in names:  # RFC 7162 3.1.4.1
            atts.append(c.FetchAtt("MODSEQ"))
        opens = (
            any(a.name in ("RFC822", "RFC822.TEXT") or (a.section is not None and not a.peek) for a in atts)
            and self.refusal(view.name) is None
        )
        if opens and uids and not view.readonly:
            await self._mark_seen(uids)
            if "FLAGS" not in names:
                atts.append(c.FetchAtt("FLAGS"))
        elif opens and uids:
            await self._opened_read_only(view, uids)
        if not any(map(_stored, atts)):
            state = await self.index.current(view.folder_id)
            since = cmd.changed_since
            found = [
                e
                for e in map(state.messages.get, uids)
                if e is not None and (since is None or e.modseq > since)
            ]
            if all(a.name in _META for a in atts):
                for entry in found:
                    await self._fetch_one(view, entry, atts)
                return "FETCH completed"
            # Bodies: read a batch of blobs per thread hop (bounded in count and bytes).
            start = 0
            while start < len(found):
                end, size = start, 0
                while end < len(found) and end - start < 256 and (size < BLOB_BATCH or end == start):
                    size += found[end].size
                    end += 1
                batch = found[start:end]
                raws = await self.blobs.get_many([e.blob for e in batch], size)
                for entry, raw in zip(batch, raws, strict=True):
                    await self._fetch_one(view, entry, atts, raw)
                start = end
            return "FETCH completed"
        for start in range(0, len(uids), CHUNK):
            chunk = uids[start : start + CHUNK]
            async with self.db.read() as s:
                query = select(*ENTRY_COLUMNS, Message.envelope, Message.bodystructure, Message.body).where(
                    Message.folder_id == view.folder_id, Message.uid.between(chunk[0], chunk[-1])
                )
                if cmd.changed_since is not None:
                    query = query.where(Message.modseq > cmd.changed_since)
                rows = (await s.execute(query.order_by(Message.uid))).all()
            wanted = set(chunk)
            for row in rows:
                if row.uid in wanted:
                    stored = {"ENVELOPE": row.envelope, "BODYSTRUCTURE": row.bodystructure, "BODY": row.body}
                    entry = Entry(
                        row.uid, row.sysflags, row.keywords, row.modseq, row.size, row.internal_date, row.blob
                    )
                    await self._fetch_one(view, entry, atts, stored=stored)
        return "FETCH completed"

    async def _mark_seen(self, uids: list[int]) -> None:
        async def mark(s: AsyncSession) -> list[Any]:
            folder = await self._selected_folder(s)
            changed = await mailstore.store_flags(s, folder, uids, ["\\Seen"], "add")
            ids = (
                await s.scalars(
                    select(Message.id).where(Message.folder_id == folder.id, Message.uid.in_(uids))
                )
            ).all()
            now, tenant = datetime.now(UTC), self.config().tenant(self.tenant_id)
            await events.record_reads(s, self.tenant_id, self.me.agent_id, ids, now)
            await answering.opened(s, tenant, self.me, folder.id, uids, now)  # a colleague's draft: a warning
            return changed

        changed = await self.db.grouped(mark)
        for change in changed:  # the FETCH shows the new flags: the next report need not
            self.selected.answered(change.uid, change.modseq)
        if changed:
            self._wrote(changed)

    async def _opened_read_only(self, view: View, uids: list[int]) -> None:
        """Messages opened in an EXAMINE session: no ``\\Seen``, but one a colleague is answering
        counts a collision warning as in a SELECT session (a write only for such messages)."""
        state = await self.index.current(view.folder_id)
        marked = [
            uid
            for uid in uids
            if (entry := state.messages.get(uid)) is not None
            and answering.ANSWERING in entry.keywords.split(" ")
        ]
        if not marked:
            return
        tenant = self.config().tenant(self.tenant_id)
        await self.db.grouped(
            lambda s: answering.opened(s, tenant, self.me, view.folder_id, marked, datetime.now(UTC))
        )

    async def _fetch_one(
        self,
        view: View,
        row: Entry,
        atts: Sequence[c.FetchAtt],
        raw: bytes | None = None,
        stored: dict[str, bytes | None] | None = None,
    ) -> None:
        """One FETCH response: ``row`` as the folder index has it, ``raw`` the message if read already,
        ``stored`` its ENVELOPE, BODYSTRUCTURE and BODY columns (when one of them is asked for)."""
        seq = view.seq(row.uid)
        if seq is None:
            return
        items: list[bytes] = []
        for att in atts:
            name = att.name
            if name == "UID":
                items.append(b"UID %d" % row.uid)
            elif name == "FLAGS":
                for line in view.learn_keywords(await self._folder_keywords(view, keywords_of(row.keywords))):
                    self.untagged(line)  # before the response that shows a new keyword
                items.append(b"FLAGS " + view.flag_list(row.uid, row.sysflags, row.keywords))
            elif name == "INTERNALDATE":
                items.append(b"INTERNALDATE " + wire.date_time(row.internal_date))
            elif name == "RFC822.SIZE":
                items.append(b"RFC822.SIZE %d" % row.size)
            elif name == "MODSEQ":
                items.append(b"MODSEQ (%d)" % row.modseq)
                view.showed_modseq(row.modseq)
            elif _stored(att):
                structure = (stored or {}).get(name)
                if structure is None:  # a message stored before the column existed
                    raw = raw if raw is not None else await self.blobs.get(row.blob)
                    structure = _structure(name, raw)
                items.append(name.encode() + b" " + structure)
            elif name in ("BINARY", "BINARY.SIZE"):
                raw = raw if raw is not None else await self.blobs.get(row.blob)
                items.append(_binary_item(att, raw))
            else:
                raw = raw if raw is not None else await self.blobs.get(row.blob)
                items.append(_body_item(att, raw))
        self.out += b"* %d FETCH (" % seq + b" ".join(items) + b")\r\n"
        if len(self.out) >= STREAM and self.flush is not None:  # a long FETCH streams, back-pressured
            await self.flush(self.take())

    async def cmd_store(self, cmd: c.Store) -> str:
        view = self.writable_view()
        uids = self._resolve(cmd.sequence, uid=cmd.uid)
        if cmd.unchanged_since is not None:
            self._enable_condstore()

        async def store(s: AsyncSession) -> tuple[list[int], list[mailstore.FlagChange]]:
            folder = await self._selected_folder(s)
            targets, modified = uids, []
            if cmd.unchanged_since is not None and uids:
                too_new = await s.scalars(
                    select(Message.uid).where(
                        Message.folder_id == folder.id,
                        Message.uid.in_(uids),
                        Message.modseq > cmd.unchanged_since,
                    )
                )
                modified = list(too_new.all())
                targets = [u for u in uids if u not in set(modified)]
            stored = await mailstore.store_flags(s, folder, targets, cmd.flags, cmd.mode)
            seen = cmd.mode != "remove" and any(f.lower() == "\\seen" for f in cmd.flags)
            if seen and stored:
                await events.record_reads(
                    s, self.tenant_id, self.me.agent_id, [r.id for r in stored], datetime.now(UTC)
                )
            return modified, stored

        modified, rows = await self.db.grouped(store)
        if rows:
            self._wrote(rows)
        await self._announce_keywords(view)
        # Only messages whose flags changed are answered (as Dovecot does); the
        # change is the session's own, so the next report does not tell it again.
        for r in sorted(rows, key=lambda r: r.uid):
            view.answered(r.uid, r.modseq)
            seq = view.seq(r.uid)
            if seq is None or (cmd.silent and not self.condstore):
                continue
            parts = [b"UID %d" % r.uid] if cmd.uid or self.qresync else []  # always under QRESYNC
            if self.condstore:
                parts.append(b"MODSEQ (%d)" % r.modseq)
                view.showed_modseq(r.modseq)
            if not cmd.silent:
                parts.append(b"FLAGS " + view.flag_list(r.uid, r.sysflags, r.keywords))
            self.untagged(b"%d FETCH (" % seq + b" ".join(parts) + b")")
        if modified:
            numbers = modified if cmd.uid else [view.seq(u) or 0 for u in modified]
            return f"[MODIFIED {_seqset(numbers).decode()}] conditional STORE failed for some"
        return "STORE completed"

    def _wrote(self, changes: Sequence[mailstore.FlagChange]) -> None:
        """Committed flag changes of the selected folder: announced, and handed to the folder index
        (which then need not read them back)."""
        folder_id = self.selected.folder_id
        self.changes.publish([folder_id])
        self.index.wrote(folder_id, changes[0].modseq, [(c.uid, c.sysflags, c.keywords) for c in changes])

    async def _announce_keywords(self, view: View) -> None:
        """FLAGS first if messages changed since the session last looked carry a new keyword
        (its own STORE's included), as Dovecot announces them before a FETCH or STORE answers."""
        state = await self.index.current(view.folder_id)
        keywords = {k for e in state.changed_since(view.modseq) for k in keywords_of(e.keywords)}
        for line in view.learn_keywords(await self._folder_keywords(view, keywords)):
            self.untagged(line)

    async def _folder_keywords(self, view: View, keywords: Iterable[str]) -> frozenset[str]:
        """Every keyword of the folder if ``keywords`` has one the session has not announced, else none:
        its FLAGS are then announced again with every keyword it holds, other sessions' new ones
        included (as Dovecot does; like Dovecot's, the folder index forgets no keyword)."""
        if all(k in view.keywords for k in keywords):
            return frozenset()
        state = await self.index.current(view.folder_id)
        return frozenset({*keywords, *state.keywords})

    async def cmd_copy(self, cmd: c.Copy) -> str:
        move = cmd.name == "MOVE"
        view = self.writable_view() if move else self.selected
        self.may_change(cmd.mailbox)
        uids = self._resolve(cmd.sequence, uid=cmd.uid)
        async with self.db.write() as s:
            target = await mailstore.get_folder(s, self.tenant_id, cmd.mailbox)
            if target is None or not self.visible(target.name):
                raise No(f"no folder {cmd.mailbox}", "TRYCREATE")
            source = await self._selected_folder(s)
            size = await s.scalar(
                select(func.coalesce(func.sum(Message.size), 0)).where(
                    Message.folder_id == source.id, Message.uid.in_(uids)
                )
            )
            # A move between two counted folders does not grow the tenant's usage;
            # a move out of Spam does.
            counted_before = move and source.special_use != quotas.JUNK
            await quotas.check(
                s, target, int(size or 0), tenant_adding=0 if counted_before else int(size or 0)
            )
            pairs = await (mailstore.move if move else mailstore.copy)(s, source, uids, target)
            if pairs:
                await self._claim_recent(s, target.id, max(st.uid for _, st in pairs) + 1)
        self.changes.publish([view.folder_id, target.id])
        if not pairs:
            return f"{cmd.name} completed (nothing matched)"
        into_junk = target.special_use == quotas.JUNK
        if self.learner is not None and (source.special_use == quotas.JUNK) != into_junk:
            cls = "spam" if into_junk else "ham"
            self.learner.teach(self.tenant_id, target.id, [st.uid for _, st in pairs], cls)
        code = b"COPYUID %d %s %s" % (
            target.uidvalidity,
            _seqset([src for src, _ in pairs]),
            _seqset([st.uid for _, st in pairs]),
        )
        if not move:
            return f"[{code.decode()}] COPY completed"
        self.untagged(b"OK [" + code + b"] moved")
        # The moved messages are told gone by the report before the tagged reply, in one batch with
        # other sessions' expunges (one VANISHED under QRESYNC), as Dovecot tells them.
        view.gone.update(src for src, _ in pairs)
        return "MOVE completed"

    cmd_move = cmd_copy

    async def cmd_idle(self, cmd: c.Command) -> str | None:
        # The I/O class runs the idle loop (it must read DONE while waiting).
        return None

    # ------------------------------------------------------------------ changes

    async def sync(self, *, allow_expunge: bool, send_uid: bool = False, tagged: bool = False) -> int | None:
        """Report what changed in the selected folder since the session last looked (see :mod:`view`).

        Under QRESYNC, the HIGHESTMODSEQ to tell (RFC 7162 3.2.10, :meth:`View.highest_to_tell`) is
        returned for the tagged reply with ``tagged``, else sent as an untagged OK (IDLE).
        """
        highest = await self._report(allow_expunge=allow_expunge, send_uid=send_uid)
        tell = self.selected.highest_to_tell(highest) if self.qresync and highest is not None else None
        if tell is not None and not tagged:
            self.untagged(b"OK [HIGHESTMODSEQ %d] Highest" % tell)
            return None
        return tell

    async def _report(self, *, allow_expunge: bool, send_uid: bool) -> int | None:
        """The report of :meth:`sync`; the folder's HIGHESTMODSEQ (None if it is gone).

        Read from the folder index: no statement unless the folder changed (or its recheck is due).
        """
        view = self.selected
        state = await self.index.current(view.folder_id)
        if state.gone:
            return None
        highest, uidnext, recent_uid = state.highest, state.uidnext, state.recent_uid
        if highest <= view.modseq and uidnext - 1 <= view.max_uid and not (allow_expunge and view.gone):
            return highest
        new: list[FlagRow] = []
        changed: list[FlagRow] = []
        for e in state.changed_since(view.modseq):
            row = FlagRow(e.uid, e.sysflags, e.keywords, e.modseq)
            (new if e.uid > view.max_uid else changed).append(row)
        expunged = state.expunged_since(view.modseq)
        if expunged is None:  # older than the index remembers: the database's expunge history
            async with self.db.read() as s:
                expunged = list(
                    (
                        await s.scalars(
                            select(Expunge.uid).where(
                                Expunge.folder_id == view.folder_id,
                                Expunge.modseq > view.modseq,
                                Expunge.modseq <= highest,
                            )
                        )
                    ).all()
                )
        recent: frozenset[int] = frozenset()
        if new:
            upto = max(r.uid for r in new) + 1
            if not view.readonly and recent_uid < upto:  # a write only if some are still unclaimed
                recent_uid = await self.db.grouped(lambda s: mailstore.claim_recent(s, view.folder_id, upto))
            recent = frozenset(r.uid for r in new if r.uid >= recent_uid)
        keywords = await self._folder_keywords(
            view, [k for r in (*new, *changed) for k in keywords_of(r.keywords)]
        )
        changes = FolderChanges(highest, new, changed, expunged, recent, keywords)
        for line in view.report(
            changes,
            allow_expunge=allow_expunge,
            condstore=self.condstore,
            send_uid=send_uid,
            qresync=self.qresync,
        ):
            self.untagged(line)
        if view.updates and (new or changed):
            await self._search_updates([r.uid for r in (*changed, *new)])
        self.index.seen(view.folder_id, self._view_key, view.modseq)
        return highest

    async def _search_updates(self, uids: list[int]) -> None:
        """After a report: each updating search checked again on the messages that changed or
        arrived (``uids``), and told what entered or left its result."""
        view = self.selected
        ranges: list[tuple[int | None, int | None]] = list(wire.runs(sorted(uids)))
        for searching in list(view.updates.values()):
            # bounded: a few ranges as a UID key, else the whole folder searched again
            only = c.SearchKey("UID", (c.SeqSet(tuple(ranges)),))
            key = c.SearchKey("AND", (searching.key, only)) if len(ranges) <= CHUNK else searching.key
            async with self.db.read() as s:
                found = await search(s, self.blobs, view, key, self.saved)
            line = view.search_updated(searching, uids, found)
            if line:
                self.untagged(line)

    async def _vanished(
        self,
        s: AsyncSession,
        folder: Folder,
        modseq: int,
        known: c.SeqSet,
        existing: Sequence[int],
        view: View | None = None,
    ) -> bytes:
        """``VANISHED (EARLIER)``'s UID set: the UIDs of ``known`` expunged after ``modseq``
        (RFC 7162 3.2.5.1, 3.2.6); ``existing`` are the folder's UIDs, ascending.

        The history of expunges is kept for :data:`storage.mailstore.EXPUNGE_HISTORY`; for a
        MODSEQ older than that, every UID of ``known`` below UIDNEXT that is not in the folder
        (always correct, if longer), computed range by range, never UID by UID.
        """
        top = folder.uidnext - 1
        wanted = _Ranges(known, top)
        if modseq >= folder.expunges_pruned:
            rows = await s.scalars(
                select(Expunge.uid).where(Expunge.folder_id == folder.id, Expunge.modseq > modseq)
            )
            # An expunge not yet reported to ``view`` is not told early: the UID keeps its number.
            return wire.uid_set(u for u in rows if u in wanted and (view is None or view.seq(u) is None))
        runs: list[bytes] = []
        for lo, hi in wanted.ranges:
            hi = min(hi, top)
            i = bisect_left(existing, lo)
            while lo <= hi:
                nxt = existing[i] if i < len(existing) else hi + 1
                if nxt > lo:
                    end = min(nxt - 1, hi)
                    runs.append(b"%d:%d" % (lo, end) if end > lo else b"%d" % lo)
                lo, i = nxt + 1, i + 1
        return b",".join(runs)


# ---------------------------------------------------------------------- helpers


def _delimiters(name: str) -> list[int]:
    """Where the hierarchy delimiters are in ``name`` (so ``name[:i]`` are its ancestors)."""
    out = []
    i = name.find(mailstore.DELIMITER)
    while i >= 0:
        out.append(i)
        i = name.find(mailstore.DELIMITER, i + 1)
    return out


_seqset = wire.uid_set


class _Ranges:
    """A sequence set as sorted, merged ranges: membership by bisection (sets of 10,000 ranges)."""

    def __init__(self, sequence: c.SeqSet, star: int = 0) -> None:
        ends = ((star if lo is None else lo, star if hi is None else hi) for lo, hi in sequence.ranges)
        pairs = sorted((min(a, b), max(a, b)) for a, b in ends)
        merged: list[tuple[int, int]] = []
        for lo, hi in pairs:
            if merged and lo <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
            else:
                merged.append((lo, hi))
        self.ranges = merged
        self._starts = [lo for lo, _ in merged]

    def __contains__(self, n: int) -> bool:
        i = bisect_right(self._starts, n) - 1
        return i >= 0 and n <= self.ranges[i][1]


def _stored(att: c.FetchAtt) -> bool:
    """ENVELOPE, BODYSTRUCTURE, BODY: answered from stored columns; the folder index and the blob
    store answer every other FETCH item."""
    return att.name in ("ENVELOPE", "BODYSTRUCTURE") or (att.name == "BODY" and att.section is None)


def _structure(name: str, raw: bytes) -> bytes:
    if name == "ENVELOPE":
        return mime.envelope(raw)
    return mime.bodystructure(raw, extensible=name == "BODYSTRUCTURE")


def _section_name(att: c.FetchAtt) -> bytes:
    sec = att.section or c.Section()
    parts = [".".join(str(p) for p in sec.part)] if sec.part else []
    if sec.text:
        fields = " (" + " ".join(sec.fields) + ")" if sec.fields else ""
        parts.append(sec.text + fields)
    return b"BODY[" + ".".join(parts).encode() + b"]"


def _binary_item(att: c.FetchAtt, raw: bytes) -> bytes:
    """``BINARY[p]<o>`` or ``BINARY.SIZE[p]`` (RFC 3516); a literal8 when anything was decoded
    or the bytes hold NUL, as Dovecot sends it."""
    part = att.section.part if att.section is not None else ()
    try:
        answer = mime.binary(raw, part)
    except mime.UnknownEncoding as exc:
        raise No(f"unknown Content-Transfer-Encoding {exc}", "UNKNOWN-CTE") from None
    except mime.InvalidEncoding:
        raise No("Invalid data in MIME part", "PARSE") from None
    section = b"[" + ".".join(str(p) for p in part).encode() + b"]"
    data = answer.data
    if att.name == "BINARY.SIZE":
        return b"BINARY.SIZE" + section + b" %d" % len(data)
    name = b"BINARY" + section
    if att.partial is not None:
        start, length = att.partial
        name += b"<%d>" % start
        data = data[start : start + length]
    literal8 = answer.decoded or b"\0" in data
    return name + b" " + (b"~" if literal8 else b"") + wire.literal(data)


def _body_item(att: c.FetchAtt, raw: bytes) -> bytes:
    if att.name == "RFC822":
        return b"RFC822 " + wire.literal(raw)
    if att.name == "RFC822.HEADER":
        return b"RFC822.HEADER " + wire.literal(mime.section(raw, (), "HEADER") or b"")
    if att.name == "RFC822.TEXT":
        return b"RFC822.TEXT " + wire.literal(mime.section(raw, (), "TEXT") or b"")
    sec = att.section or c.Section()
    data = mime.section(raw, sec.part, sec.text, sec.fields)
    name = _section_name(att)
    if att.partial is not None:
        start, length = att.partial
        name += b"<%d>" % start
        data = data[start : start + length] if data is not None else None
    return name + b" " + (wire.literal(data) if data is not None else wire.NIL)

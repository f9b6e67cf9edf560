"""Real IMAP clients against mailgate's IMAP server: mbsync (isync) and mutt (driven in tmux).

The server runs in-process (as in ``tests/test_imap.py``); the clients run as
subprocesses through ``asyncio.create_subprocess_exec`` so the event loop
keeps serving them. What the clients did is checked in mailgate's database
and blob store, not in the clients' own view. When a client fails, the test
shows its IMAP exchange: ``mbsync -Dn`` output, or mutt's ``-d 2`` debug log.

mbsync 1.4 by design: it converts CRLF to LF in a maildir, tags every copy
with an ``X-TUID`` header, keeps no keywords in a maildir, keeps modified
UTF-7 folder names as they are, and never uses EXAMINE.
"""

from __future__ import annotations

import asyncio
import imaplib
import os
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from sqlalchemy import select

from gateway import mutf7
from gateway.auth import Authenticator
from gateway.config import Config, parse_config
from gateway.daemon import open_store
from gateway.imap.server import IMAPServer
from gateway.ingest import Delivery, Pipeline
from gateway.notify import Changes
from storage.blobs import BlobStore
from storage.db import Database
from storage.flags import join_flags
from storage.models import Folder, Message
from tests.conftest import config_dict, peer

pytestmark = pytest.mark.peers

PASSWORD = "agent-password"
HASH = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash(PASSWORD)


def message(n: int, subject: str = "hello", extra: str = "") -> bytes:
    return (
        f"From: Customer {n} <c{n}@example.org>\r\nTo: biuro@acme.test\r\nSubject: {subject} {n}\r\n"
        f"Message-ID: <m{n}@example.org>\r\nDate: Mon, {n % 28 + 1} Jan 2024 10:00:00 +0000\r\n"
        f"{extra}MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        f"Body number {n}.\r\nSecond line of {n}.\r\n"
    ).encode()


# --------------------------------------------------------------------------- the server


@dataclass
class Stored:
    """One message as mailgate stores it."""

    folder: str
    uid: int
    flags: tuple[str, ...]
    raw: bytes

    @property
    def system_flags(self) -> tuple[str, ...]:
        return tuple(f for f in self.flags if f.startswith("\\"))


class Gateway:
    """mailgate's IMAP server in this process, and ways to look into its store."""

    def __init__(
        self, config: Config, db: Database, blobs: BlobStore, server: IMAPServer, pipeline: Pipeline
    ) -> None:
        self.config, self.db, self.blobs, self.server, self.pipeline = config, db, blobs, server, pipeline

    @property
    def port(self) -> int:
        return self.server.port

    async def deliver(self, raw: bytes, tenant: str = "acme") -> None:
        await self.pipeline.deliver(self.config.tenant(tenant), raw, Delivery(source="smtp"))

    async def messages(self, tenant: str = "acme") -> dict[str, list[Stored]]:
        """Every folder of a tenant (also empty ones) with its messages, by UID."""
        async with self.db.read() as s:
            folders = (await s.scalars(select(Folder).where(Folder.tenant_id == tenant))).all()
            out: dict[str, list[Stored]] = {f.name: [] for f in folders}
            names = {f.id: f.name for f in folders}
            rows = (
                await s.scalars(
                    select(Message)
                    .where(Message.folder_id.in_(names))
                    .order_by(Message.folder_id, Message.uid)
                )
            ).all()
        for r in rows:
            flags = tuple(sorted(join_flags(r.sysflags, r.keywords)))
            out[names[r.folder_id]].append(
                Stored(names[r.folder_id], r.uid, flags, await self.blobs.get(r.blob))
            )
        return out

    async def state(self, tenant: str = "acme") -> list[tuple[str, int, int, int, int]]:
        """Per folder: name, UIDVALIDITY, UIDNEXT, HIGHESTMODSEQ, messages (what changes on any write)."""
        async with self.db.read() as s:
            rows = (
                await s.execute(
                    select(
                        Folder.name,
                        Folder.uidvalidity,
                        Folder.uidnext,
                        Folder.highestmodseq,
                        Folder.used_messages,
                    )
                    .where(Folder.tenant_id == tenant)
                    .order_by(Folder.name)
                )
            ).all()
        return [tuple(r) for r in rows]  # type: ignore[misc]


@pytest.fixture
async def gateway(tmp_path: Path, db_url: str) -> AsyncIterator[Gateway]:
    data = config_dict(tmp_path, db_url)
    acme, beta = data["tenants"]
    acme["agents"] = [
        {"login": "anna@acme.test", "password_hash": HASH},
        {"login": "piotr@acme.test", "password_hash": HASH, "folders": ["INBOX", "Orders"]},
    ]
    beta["agents"] = [{"login": "bob@beta.test", "password_hash": HASH}]
    config = parse_config(data)
    db, blobs = await open_store(config)
    changes = Changes()
    pipeline = Pipeline(db, blobs, changes=changes)
    auth = Authenticator(lambda: config, db, failure_delay=0.05)
    server = IMAPServer(lambda: config, db, blobs, auth, changes)
    await server.start("127.0.0.1", 0)
    gw = Gateway(config, db, blobs, server, pipeline)
    for n in range(1, 4):
        await gw.deliver(message(n))
    await gw.deliver(message(4, "zamówienie"))  # the "orders" rule: to Orders
    await gw.deliver(message(5, "cheap pills", "X-Spam-Flag: YES\r\n"))  # to Spam
    await gw.deliver(message(9, "beta only"), "beta")
    yield gw
    await server.stop()
    await db.close()


def big_message(n: int) -> bytes:
    """A 300 KB message: literals far larger than one read or one line."""
    return message(n, "big")[:-2] + (b"0123456789abcdef" * 64 + b"\r\n") * 300


def imap(gw: Gateway, login: str = "anna@acme.test") -> imaplib.IMAP4:
    c = imaplib.IMAP4("127.0.0.1", gw.port, timeout=10)
    c.login(login, PASSWORD)
    return c


async def populate(gw: Gateway) -> None:
    """A sent message, a flagged one, and folders with a child, a space, non-ASCII, a big message."""

    def scenario() -> None:
        c = imap(gw)
        assert c.append("Sent", "(\\Seen)", None, message(6, "our reply"))[0] == "OK"
        assert c.create("Projects/2024")[0] == "OK"
        assert c.append("Projects/2024", "(\\Flagged \\Answered)", None, message(7, "plan"))[0] == "OK"
        assert c.create('"Klient A"')[0] == "OK"
        assert c.append('"Klient A"', None, None, big_message(15))[0] == "OK"
        assert c.create(mutf7.encode("Zamówienia"))[0] == "OK"
        assert c.select("INBOX")[0] == "OK"
        assert c.store("2", "+FLAGS", "(\\Seen)")[0] == "OK"
        c.logout()

    await asyncio.to_thread(scenario)


async def execute(*argv: str, env: dict[str, str], timeout: float = 15) -> tuple[int, str]:
    """Run a client without blocking the event loop (the server in this process must keep serving)."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        out, _ = await proc.communicate()
        return -1, out.decode("utf-8", "replace") + "\n[timed out]"
    assert proc.returncode is not None
    return proc.returncode, out.decode("utf-8", "replace")


# --------------------------------------------------------------------------- mbsync


class Mbsync:
    """An mbsync set-up in a temporary directory: rc file, maildir, state."""

    def __init__(
        self,
        tmp: Path,
        port: int,
        *,
        user: str = "anna@acme.test",
        sync: str = "All",
        create: str = "Both",
        expunge: str = "Both",
    ) -> None:
        self.binary = peer("mbsync")
        self.home = tmp / "mbsync-home"
        self.maildir = self.home / "mail"
        self.inbox = self.home / "inbox"
        self.home.mkdir()
        self.maildir.mkdir()
        self.rc = self.home / ".mbsyncrc"
        self.rc.write_text(
            f"""\
IMAPAccount mailgate
Host 127.0.0.1
Port {port}
User {user}
Pass {PASSWORD}
SSLType None
AuthMechs LOGIN
Timeout 10

IMAPStore far
Account mailgate

MaildirStore near
Path {self.maildir}/
Inbox {self.inbox}
SubFolders Verbatim

Channel mailgate
Far :far:
Near :near:
Patterns *
Create {create}
Expunge {expunge}
Sync {sync}
SyncState *
""",
            encoding="utf-8",
        )

    async def run(self, *args: str) -> str:
        """``mbsync -a``; fails the test, showing the IMAP exchange, unless it exits 0."""
        settle(self.home)
        env = {"HOME": str(self.home), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
        argv = [self.binary, "-c", str(self.rc), "-Dn", *args, "-a"]
        code, out = await execute(*argv, env=env)
        assert code == 0, f"mbsync exited with {code}:\n{out}"
        return out

    def box(self, name: str) -> Path:
        return self.inbox if name == "INBOX" else self.maildir / mutf7.encode(name)

    def files(self, name: str) -> list[Path]:
        box = self.box(name)
        return sorted(p for sub in ("cur", "new") for p in (box / sub).iterdir())

    def pairs(self, name: str) -> dict[int, int]:
        """mbsync's pairing of near (maildir) UIDs to far (mailgate) UIDs, from its sync state."""
        state = (self.box(name) / ".mbsyncstate").read_text(encoding="utf-8")
        out = {}
        for line in state.split("\n\n", 1)[1].splitlines():
            far, near = (int(x) for x in line.split()[:2])
            if far > 0 and near > 0:
                out[near] = far
        return out

    def local(self, name: str) -> dict[int, tuple[str, bytes]]:
        """A local mailbox's synchronised messages: far UID -> maildir flags, content."""
        pairs = self.pairs(name)
        out = {}
        for p in self.files(name):
            m = re.search(r",U=(\d+)", p.name)
            if m is None or int(m.group(1)) not in pairs:
                continue
            flags = p.name.split(":2,", 1)[1] if ":2," in p.name else ""
            out[pairs[int(m.group(1))]] = (flags, p.read_bytes())
        return out

    def mailboxes(self) -> set[str]:
        names = {"INBOX"} if (self.inbox / "cur").is_dir() else set()
        for cur in self.maildir.rglob("cur"):
            # mbsync 1.4 keeps IMAP's modified UTF-7 names as they are on the wire.
            names.add(mutf7.decode(str(cur.parent.relative_to(self.maildir))))
        return names


def settle(root: Path) -> None:
    """Age the maildirs' mtimes: mbsync sleeps a second after a directory changed this very second."""
    past = time.time() - 5
    for d in [root, *root.rglob("*")]:
        if d.is_dir():
            os.utime(d, (past, past))


WRITES = re.compile(
    r'>>> \d+ ((?:UID )?(?:STORE|EXPUNGE|MOVE) [^\r\n]*|(?:APPEND|CREATE|DELETE|RENAME) "[^"]*")'
)


def writes(out: str) -> list[str]:
    """The commands in an mbsync debug log (``-Dn``) that change the far side."""
    return WRITES.findall(out)


MAILDIR_FLAGS = {"D": "\\Draft", "F": "\\Flagged", "R": "\\Answered", "S": "\\Seen", "T": "\\Deleted"}


def imap_flags(maildir_flags: str) -> tuple[str, ...]:
    return tuple(sorted(MAILDIR_FLAGS[c] for c in maildir_flags))


TUID = re.compile(rb"\r?\nX-TUID: [A-Za-z0-9+/]{12}(?=\r?\n\r?\n)")


def canonical(raw: bytes) -> bytes:
    """A message without what mbsync changes by design.

    mbsync converts CRLF to LF for a maildir (and back for IMAP), and adds an
    ``X-TUID`` header (its own tracking id) at the end of the header of every
    message it copies, either way. Both are undone here; nothing else may differ.
    """
    return TUID.sub(b"", raw, count=1).replace(b"\r\n", b"\n")


def assert_same(local: bytes, far: bytes) -> None:
    assert TUID.search(local) or TUID.search(far), "mbsync tags every copy with X-TUID"
    assert canonical(local) == canonical(far)
    assert b"\r" not in local
    assert b"\n" not in far.replace(b"\r\n", b"")  # what IMAP serves has CRLF line ends


async def assert_mirrors(gw: Gateway, mb: Mbsync) -> dict[str, list[Stored]]:
    """Every folder of the tenant is a local mailbox with the same messages, bytes and flags."""
    far = await gw.messages()
    assert mb.mailboxes() == set(far)
    for name, stored in far.items():
        near = mb.local(name)
        assert sorted(near) == [m.uid for m in stored], name
        assert len(mb.files(name)) == len(near), name  # and nothing local is left unsynchronised
        for m in stored:
            flags, content = near[m.uid]
            assert_same(content, m.raw)
            # Keywords (e.g. the rule's label "Orders") have no maildir form in mbsync 1.4.
            assert imap_flags(flags) == m.system_flags, (name, m.uid)
    return far


async def test_mbsync_pulls_every_folder_byte_exact(gateway: Gateway, tmp_path: Path) -> None:
    await populate(gateway)
    mb = Mbsync(tmp_path, gateway.port)
    await mb.run()
    far = await assert_mirrors(gateway, mb)
    assert set(far) == {
        *("INBOX", "Orders", "Sent", "Spam", "Drafts", "Trash", "Archive", "Templates"),
        *("Projects", "Projects/2024", "Klient A", "Zamówienia"),
    }
    assert [len(far[n]) for n in ("INBOX", "Orders", "Spam", "Sent", "Projects/2024", "Klient A")] == [
        *(3, 1, 1, 1, 1, 1)
    ]
    assert far["Klient A"][0].raw == big_message(15)


async def test_mbsync_pushes_new_messages_and_flag_changes(gateway: Gateway, tmp_path: Path) -> None:
    await populate(gateway)
    mb = Mbsync(tmp_path, gateway.port)
    await mb.run()
    # Local changes, as a maildir mail client makes them.
    new = message(8, "written offline").replace(b"\r\n", b"\n")
    (mb.inbox / "new" / "1700000000.M1P1.laptop").write_bytes(new)
    (seen,) = [p for p in mb.files("INBOX") if ",U=2:" in p.name]
    assert seen.name.endswith(":2,S")
    seen.rename(seen.with_name(seen.name.replace(":2,S", ":2,FS")))  # flag it
    (unseen,) = [p for p in mb.files("INBOX") if ",U=1:" in p.name]
    unseen.rename(mb.inbox / "cur" / (unseen.name.split(":2,")[0] + ":2,S"))  # read it
    (answered,) = mb.files("Projects/2024")
    answered.rename(answered.with_name(answered.name.replace(":2,FR", ":2,R")))  # unflag it
    local = mb.maildir / "Local notes"
    for sub in ("cur", "new", "tmp"):
        (local / sub).mkdir(parents=True)
    (local / "cur" / "1700000001.M2P1.laptop:2,S").write_bytes(big_message(10).replace(b"\r\n", b"\n"))

    out = await mb.run()
    assert writes(out) == [
        "UID STORE 1 +FLAGS.SILENT (\\Seen)",
        "UID STORE 2 +FLAGS.SILENT (\\Flagged)",
        'APPEND "INBOX"',
        'CREATE "Local notes"',
        'APPEND "Local notes"',
        "UID STORE 1 -FLAGS.SILENT (\\Flagged)",
    ], out
    far = await assert_mirrors(gateway, mb)
    inbox = {m.uid: m for m in far["INBOX"]}
    assert sorted(inbox) == [1, 2, 3, 4]
    assert_same(new, inbox[4].raw)
    assert inbox[4].flags == ()
    assert inbox[2].flags == ("\\Flagged", "\\Seen")
    assert inbox[1].flags == ("\\Seen",)
    assert far["Projects/2024"][0].flags == ("\\Answered",)
    assert [m.flags for m in far["Local notes"]] == [("\\Seen",)]
    assert canonical(far["Local notes"][0].raw) == canonical(big_message(10))

    # Nothing changed on either side: a second sync changes nothing.
    before, files = (
        await gateway.state(),
        sorted(p.name for p in mb.home.rglob("*") if p.parent.name in ("cur", "new")),
    )
    out = await mb.run()
    assert writes(out) == [], out
    assert await gateway.state() == before
    assert sorted(p.name for p in mb.home.rglob("*") if p.parent.name in ("cur", "new")) == files


async def test_mbsync_propagates_expunges_both_ways(gateway: Gateway, tmp_path: Path) -> None:
    mb = Mbsync(tmp_path, gateway.port)
    await mb.run()

    def far_side_changes() -> None:
        c = imap(gateway)
        assert c.select("INBOX")[0] == "OK"
        assert c.store("1", "+FLAGS", "(\\Deleted)")[0] == "OK"
        assert c.expunge()[0] == "OK"
        assert c.uid("STORE", "2", "+FLAGS", "(\\Answered)")[0] == "OK"
        c.logout()

    await asyncio.to_thread(far_side_changes)
    await gateway.deliver(message(11, "arrived meanwhile"))
    (spam,) = mb.files("Spam")
    spam.unlink()  # deleted locally

    out = await mb.run()
    assert "UID STORE 1 +FLAGS.SILENT (\\Deleted)" in writes(out), out
    far = await assert_mirrors(gateway, mb)
    assert [m.uid for m in far["INBOX"]] == [2, 3, 4]
    assert far["INBOX"][0].flags == ("\\Answered",)
    assert far["Spam"] == []
    assert sorted(mb.local("INBOX")) == [2, 3, 4]


async def test_mbsync_pull_only_reads_and_never_writes(gateway: Gateway, tmp_path: Path) -> None:
    """A read-only mirror (``Sync Pull``): far-side changes arrive, local ones stay local.

    mbsync has no read-only store option and never uses EXAMINE (it always
    SELECTs); a pull-only channel is how it treats folders as read-only.
    Mailgate must not change at all: no command that writes, the same UIDs,
    UIDNEXT and HIGHESTMODSEQ everywhere, and nothing marked \\Seen.
    """
    await populate(gateway)
    mb = Mbsync(tmp_path, gateway.port, sync="Pull", create="Near", expunge="Near")
    out = await mb.run()
    assert writes(out) == [], out
    await assert_mirrors(gateway, mb)

    await gateway.deliver(message(12, "new on the server"))

    def flag_an_order() -> None:
        c = imap(gateway)
        assert c.select("Orders")[0] == "OK"
        assert c.store("1", "+FLAGS", "(\\Flagged)")[0] == "OK"
        c.logout()

    await asyncio.to_thread(flag_an_order)
    for p in mb.files("INBOX"):
        p.rename(mb.inbox / "cur" / (p.name.split(":2,")[0] + ":2,FS"))
    (mb.inbox / "new" / "1700000002.M3P1.laptop").write_bytes(message(13).replace(b"\r\n", b"\n"))
    (sent,) = mb.files("Sent")
    sent.unlink()
    before = await gateway.state()

    out = await mb.run()
    assert writes(out) == [], out
    assert await gateway.state() == before
    far = await gateway.messages()
    assert [m.uid for m in far["INBOX"]] == [1, 2, 3, 4]
    assert [m.flags for m in far["INBOX"]] == [(), ("\\Seen",), (), ()]
    assert len(far["Sent"]) == 1
    assert mb.local("Orders")[1][0] == "F"
    near = mb.local("INBOX")
    assert sorted(near) == [1, 2, 3, 4]
    assert_same(near[4][1], far["INBOX"][3].raw)
    assert [f for f, _ in near.values()].count("FS") == 3  # local flags stay local
    assert len(mb.files("INBOX")) == 5  # the local message was never uploaded


async def test_mbsync_sees_only_the_agents_folders(gateway: Gateway, tmp_path: Path) -> None:
    await populate(gateway)
    mb = Mbsync(tmp_path, gateway.port, user="piotr@acme.test", sync="Pull", create="Near", expunge="Near")
    await mb.run()
    assert mb.mailboxes() == {"INBOX", "Orders", "Templates"}  # the tenant's templates: every agent's
    far = await gateway.messages()
    for name in ("INBOX", "Orders"):
        near = mb.local(name)
        assert sorted(near) == [m.uid for m in far[name]]
        for m in far[name]:
            assert_same(near[m.uid][1], m.raw)


# --------------------------------------------------------------------------- mutt in tmux


class Tmux:
    """One detached tmux session on a private server (its own socket), for a full-screen client."""

    def __init__(self, home: Path) -> None:
        self.binary = peer("tmux")
        self.socket = f"mailgate-test-{uuid.uuid4().hex[:12]}"
        self.name = "mutt"
        self.log: Path | None = None  # the client's debug log, shown when a wait fails
        self.env = {
            "HOME": str(home),
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "TERM": "xterm-256color",
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "TZ": "UTC",
            "TMUX_TMPDIR": str(home),  # the server's socket stays in the test's directory
        }

    async def tmux(self, *args: str) -> str:
        code, out = await execute(self.binary, "-L", self.socket, "-f", "/dev/null", *args, env=self.env)
        assert code == 0, f"tmux {' '.join(args)}: {out}"
        return out

    async def start(self, command: str) -> None:
        await self.tmux("new-session", "-d", "-s", self.name, "-x", "200", "-y", "50", command)

    async def keys(self, *keys: str, literal: bool = False) -> None:
        await self.tmux("send-keys", "-t", self.name, *(["-l"] if literal else []), *keys)

    async def type(self, text: str) -> None:
        await self.keys(text, literal=True)

    async def screen(self) -> str:
        return await self.tmux("capture-pane", "-p", "-t", self.name)

    async def wait_for(self, pattern: str, timeout: float = 10) -> str:
        """The screen, once it matches ``pattern`` (a regex); fails with the last screen after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            screen = await self.screen()
            if re.search(pattern, screen, re.M):
                return screen
            if time.monotonic() > deadline:
                pytest.fail(f"waited {timeout} s for {pattern!r}; the screen:\n{screen}\n{self.tail()}")
            await asyncio.sleep(0.1)

    async def wait_gone(self, timeout: float = 10) -> None:
        """Wait until the client exited (its session ended)."""
        deadline = time.monotonic() + timeout
        while True:
            code, _ = await execute(
                self.binary, "-L", self.socket, "has-session", "-t", self.name, env=self.env
            )
            if code != 0:
                return
            if time.monotonic() > deadline:
                pytest.fail(f"the client did not exit in {timeout} s; the screen:\n{await self.screen()}")
            await asyncio.sleep(0.1)

    def log_text(self) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return self.log.read_text(encoding="utf-8", errors="replace")

    def tail(self, lines: int = 80) -> str:
        """The last lines of the client's IMAP exchange (from its debug log)."""
        text = self.log_text().splitlines()
        imap = [line for line in text if re.match(r"(\[[^]]*\] \d+[<>] |a\d{4} )", line)]
        return "the client's IMAP exchange, last lines:\n" + "\n".join(imap[-lines:])

    async def close(self) -> None:
        for args in (("kill-session", "-t", self.name), ("kill-server",)):
            await execute(self.binary, "-L", self.socket, *args, env=self.env)


def muttrc(home: Path, port: int, extra: str = "") -> Path:
    rc = home / "muttrc"
    rc.write_text(
        f"""\
set imap_user="anna@acme.test"
set imap_pass="{PASSWORD}"
set folder="imap://127.0.0.1:{port}/"
set spoolfile="+INBOX"
set ssl_starttls=no
set ssl_force_tls=no
set imap_check_subscribed
unset imap_passive
set mail_check=1
set timeout=1
set move=no
set header_cache=""
set message_cachedir=""
set sort=date
unset resolve
set delete=yes
set quit=yes
set confirmappend=no
set confirmcreate=no
set wait_key=no
set pager_stop=yes
set mark_old=no
set help=no
set editor="true"
set tmpdir="{home}"
set index_format="%4C %Z %s"
{extra}""",
        encoding="utf-8",
    )
    return rc


@pytest.fixture
async def tmux(tmp_path: Path) -> AsyncIterator[Tmux]:
    session = Tmux(tmp_path)
    try:
        yield session
    finally:
        await session.close()


async def start_mutt(gw: Gateway, home: Path, tmux: Tmux, extra: str = "") -> None:
    """mutt on the agent's INBOX, with a debug log (its IMAP exchange) shown when a wait fails."""
    rc = muttrc(home, gw.port, extra)
    tmux.log = home / ".muttdebug0"
    await tmux.start(f"{peer('mutt')} -n -d 2 -F {rc}")


async def test_mutt_lists_opens_flags_and_moves(gateway: Gateway, tmp_path: Path, tmux: Tmux) -> None:
    await start_mutt(gateway, tmp_path, tmux)
    screen = await tmux.wait_for(r"Msgs:3 New:3")
    assert re.findall(r"^ +(\d) N +(hello \d)$", screen, re.M) == [
        ("1", "hello 1"),
        ("2", "hello 2"),
        ("3", "hello 3"),
    ]
    # New mail while mutt runs (it polls: NOOP every $mail_check seconds, as $imap_passive is unset).
    await gateway.deliver(message(14, "arrived while reading"))
    await tmux.wait_for(r"^ +4 N +arrived while reading 14$")

    await tmux.type("1")  # jump to message 1 ...
    await tmux.wait_for("Jump to message: 1")
    await tmux.keys("Enter")
    await tmux.keys("Enter")  # ... and open it
    screen = await tmux.wait_for(r"^Body number 1\.$")
    assert "Subject: hello 1" in screen
    assert "Second line of 1." in screen
    await tmux.type("F")  # flag it, from the pager
    await tmux.wait_for(r"^-.*!.* 1/4: Customer 1 ")
    await tmux.type("i")  # back to the index
    await tmux.wait_for(r"^ +1 +! +hello 1$")  # read and flagged
    await tmux.type("s")  # save it to Orders (mutt copies, then deletes the original)
    await tmux.wait_for(r"Save to mailbox")
    await tmux.keys("C-u")
    await tmux.type("=Orders")
    await tmux.keys("Enter")
    await tmux.wait_for(r"^ +1 +D! +hello 1$")
    await tmux.type("$")  # synchronise: flags, then the expunge
    await tmux.wait_for(r"Msgs:3 ")
    await tmux.type("q")
    await tmux.wait_gone()

    far = await gateway.messages()
    assert [m.raw for m in far["INBOX"]] == [message(2), message(3), message(14, "arrived while reading")]
    assert [m.flags for m in far["INBOX"]] == [(), (), ()]
    (moved,) = [m for m in far["Orders"] if m.raw == message(1)]
    assert moved.flags == ("\\Flagged", "\\Seen")
    assert len(far["Orders"]) == 2


async def test_mutt_opens_a_folder_read_only(gateway: Gateway, tmp_path: Path, tmux: Tmux) -> None:
    """mutt's change-folder-readonly uses EXAMINE: reading and trying to flag change nothing."""
    await start_mutt(gateway, tmp_path, tmux)
    await tmux.wait_for(r"Msgs:3 New:3")
    before = await gateway.state()
    await tmux.keys("Escape", "c")  # <change-folder-readonly>
    await tmux.wait_for(r"Open mailbox in read-only mode")
    await tmux.keys("C-u")
    await tmux.type("=Orders")
    await tmux.keys("Enter")
    await tmux.wait_for(r"^ +1 N +zamówienie 4$")
    await tmux.wait_for(r"-%-Mutt: =Orders")  # % : read-only
    await tmux.keys("Enter")
    await tmux.wait_for(r"^Body number 4\.$")
    await tmux.type("F")
    await tmux.wait_for(r"Mailbox is read-only")
    await tmux.type("q")  # the pager
    await tmux.wait_for(r"-%-Mutt: =Orders")
    await tmux.type("q")
    await tmux.wait_gone()

    assert 'EXAMINE "Orders"' in tmux.log_text(), tmux.tail()
    assert await gateway.state() == before
    far = await gateway.messages()
    assert [m.flags for m in far["Orders"]] == [("Orders",)]  # not \\Seen


async def test_mutt_idles_and_resyncs_its_header_cache_with_condstore(
    gateway: Gateway, tmp_path: Path, tmux: Tmux
) -> None:
    """With $imap_idle mutt hears news at once; with a header cache it resyncs flags by CHANGEDSINCE."""
    (tmp_path / "hcache").mkdir()
    extra = f'set imap_idle\nset imap_condstore\nset header_cache="{tmp_path}/hcache/"\n'

    def flag(seq: str) -> None:
        c = imap(gateway)
        assert c.select("INBOX")[0] == "OK"
        assert c.store(seq, "+FLAGS", "(\\Flagged)")[0] == "OK"
        c.logout()

    await start_mutt(gateway, tmp_path, tmux, extra)
    await tmux.wait_for(r"Msgs:3 New:3")
    await gateway.deliver(message(17, "arrived while idling"))
    await tmux.wait_for(r"^ +4 N +arrived while idling 17$")
    await asyncio.to_thread(flag, "1")
    await tmux.wait_for(r"^ +1 N +! +hello 1$")
    await tmux.type("q")
    await tmux.wait_gone()
    assert re.search(r"> a\d+ IDLE", tmux.log_text()), tmux.tail()

    await asyncio.to_thread(flag, "2")  # while mutt is away
    await start_mutt(gateway, tmp_path, tmux, extra)
    screen = await tmux.wait_for(r"Msgs:4 New:4 Flag:2")
    assert re.search(r"^ +2 N +! +hello 2$", screen, re.M)
    await tmux.type("q")
    await tmux.wait_gone()
    second = tmux.log_text()
    assert 'SELECT "INBOX" (CONDSTORE)' in second, tmux.tail()
    assert re.search(r"UID FETCH 1:4 \(FLAGS\) \(CHANGEDSINCE \d+\)", second), tmux.tail()

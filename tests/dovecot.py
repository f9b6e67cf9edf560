"""A private Dovecot (IMAP only, 127.0.0.1) started by tests, and a dropping TCP proxy.

Written for Dovecot 2.3 (Debian's 2.3.19). The server runs from a temporary
directory with its own configuration, sockets, state, log, passwd-files and
maildirs; nothing under /etc/dovecot is read and nothing but 127.0.0.1 is bound.

Every helper is synchronous (stdlib ``imaplib`` and plain files); from async
tests call them directly (Dovecot is another process, so blocking briefly is
harmless) or through ``asyncio.to_thread`` when the code under test must run
meanwhile on the same loop.

Dovecot 2.3 quirks this module works around:

* ``imap-login`` refuses to run as root and the mail processes refuse uid 0
  whatever ``first_valid_uid`` says ("userdb returned 0 as uid"): as root the
  login/internal services run as ``dovenull``/``dovecot`` and mail belongs to
  ``nobody``; as any other user everything runs as that user.
* those users must traverse the temporary directory, so it is ``0755`` in
  ``/tmp`` (not pytest's ``tmp_path``, whose parents are ``0700``) and short,
  since unix socket paths are limited to 108 bytes.
* maildir stores bare LF (``mail_save_crlf = no``) and ``BODY[]`` serves CRLF:
  compare against :meth:`Dovecot.messages`, never against the maildir files.
* ``imaplib.IMAP4.append`` rewrites every line ending to CRLF, so
  :meth:`Dovecot.append` sends the bytes unchanged itself.
"""

from __future__ import annotations

import contextlib
import grp
import imaplib
import itertools
import os
import pwd
import re
import selectors
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
import trustme

from gateway import mutf7
from tests import procfs

INBOX = "INBOX"
HOST = "127.0.0.1"
_FETCH_BATCH = 500
_seq = itertools.count()
_last_usec = 0


@dataclass(frozen=True, slots=True)
class Fetched:
    """One message as Dovecot serves it."""

    uid: int
    flags: tuple[str, ...]
    internaldate: str
    body: bytes


def imap_utf7(name: str) -> str:
    """A folder name in modified UTF-7 (RFC 3501 5.1.3), as IMAP commands carry it."""
    return mutf7.encode(name)


def quote_mailbox(name: str) -> str:
    """A mailbox name as an IMAP quoted string (modified UTF-7 inside)."""
    encoded = imap_utf7(name).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{encoded}"'


def _is_inbox(folder: str) -> bool:
    return folder.upper() == INBOX


def _check(result: tuple[str, list[object]], what: str) -> list[object]:
    typ, data = result
    if typ != "OK":
        raise RuntimeError(f"IMAP {what} failed: {typ} {data!r}")
    return data


def _pgroup_members(pgid: int) -> list[int]:
    """Live processes of a process group (Linux /proc)."""
    return [pid for pid, fields in procfs.stats() if int(fields[2]) == pgid and fields[0] != "Z"]


class Dovecot:
    """A private Dovecot IMAP server: plain ``port`` and implicit-TLS ``tls_port``.

    Use as a context manager or call :meth:`start` and :meth:`stop`.
    """

    def __init__(self, binary: str | None = None, *, keep: bool = False) -> None:
        if binary is None:
            from tests.conftest import peer  # lazily: conftest imports this module

            binary = peer("dovecot")
        self.binary = binary
        self.keep = keep
        self.host = HOST
        self.port = 0
        self.tls_port = 0
        self.ca = trustme.CA()
        self.users: dict[str, str] = {}
        self.root = Path(tempfile.mkdtemp(prefix="mgdc-", dir="/tmp" if os.path.isdir("/tmp") else None))
        self.root.chmod(0o755)
        self.name = self.root.name  # instance_name: every process title contains it
        self.conf_path = self.root / "dovecot.conf"
        self.log_path = self.root / "dovecot.log"
        self.passwd_dir = self.root / "passwd"
        self.cafile = self.root / "tls" / "ca.pem"
        self._proc: subprocess.Popen[bytes] | None = None
        self.auth_mechanisms = "plain login"
        self.extra_config = ""  # appended to dovecot.conf (see use_oauth2)
        self._mail_uid, self._mail_gid, self._login_user, self._internal_user = self._accounts()
        self._setup_files()

    # ------------------------------------------------------------------ lifecycle

    @staticmethod
    def _accounts() -> tuple[int, int, str, str]:
        """(mail uid, mail gid, login user, internal user) for this euid."""
        if os.geteuid() != 0:
            me = pwd.getpwuid(os.geteuid()).pw_name
            return os.geteuid(), os.getegid(), me, me

        def user(*names: str) -> pwd.struct_passwd:
            for name in names:
                with contextlib.suppress(KeyError):
                    return pwd.getpwnam(name)
            raise RuntimeError(f"none of the users {names} exists to run Dovecot's services as")

        mail = user("nobody", "dovecot")
        return mail.pw_uid, mail.pw_gid, user("dovenull", "nobody").pw_name, user("dovecot", "nobody").pw_name

    def _setup_files(self) -> None:
        # Modes are explicit: Dovecot's unprivileged processes must traverse these whatever the
        # process's umask (mailgate's CLI, run in-process by a test, sets 0027 for good).
        for sub in ("run", "state", "tls", "mail"):
            (self.root / sub).mkdir(mode=0o755)
            (self.root / sub).chmod(0o755)
        self._chown(self.root / "mail")
        self.ca.cert_pem.write_to_path(str(self.cafile))
        cert = self.ca.issue_cert("localhost", HOST)
        cert.private_key_pem.write_to_path(str(self.root / "tls" / "key.pem"))
        (self.root / "tls" / "cert.pem").write_bytes(b"".join(p.bytes() for p in cert.cert_chain_pems))
        (self.root / "tls" / "key.pem").chmod(0o600)
        self.passwd_dir.mkdir()
        self.passwd_dir.chmod(0o755)

    def _chown(self, path: Path) -> None:
        if os.geteuid() == 0:
            os.chown(path, self._mail_uid, self._mail_gid)

    def config(self) -> str:
        """The dovecot.conf text for the current ports."""
        r = self.root
        return f"""\
# Private test Dovecot written by tests/dovecot.py (Dovecot 2.3 syntax).
base_dir = {r}/run
state_dir = {r}/state
instance_name = {self.name}
login_greeting = {self.name} ready.
log_path = {self.log_path}
protocols = imap
listen = {HOST}
ssl = yes
ssl_cert = <{r}/tls/cert.pem
ssl_key = <{r}/tls/key.pem
disable_plaintext_auth = no
auth_mechanisms = {self.auth_mechanisms}
auth_failure_delay = 0
default_login_user = {self._login_user}
default_internal_user = {self._internal_user}
default_internal_group = {grp.getgrgid(pwd.getpwnam(self._internal_user).pw_gid).gr_name}
first_valid_uid = 0
first_valid_gid = 0
mail_location = maildir:{r}/mail/%u
mail_fsync = never
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {self.passwd_dir}/%u
}}
userdb {{
  driver = static
  args = uid={self._mail_uid} gid={self._mail_gid}
}}
namespace inbox {{
  inbox = yes
  mailbox Junk {{
    special_use = \\Junk
    auto = create
  }}
}}
protocol imap {{
  mail_max_userip_connections = 100
}}
service anvil {{
  chroot =
  # No auth penalty (Dovecot's documented switch): a failed login must not delay the next one.
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service imap-urlauth-login {{
  chroot =
}}
service imap-login {{
  chroot =
  inet_listener imap {{
    address = {HOST}
    port = {self.port}
  }}
  inet_listener imaps {{
    address = {HOST}
    port = {self.tls_port}
    ssl = yes
  }}
}}
{self.extra_config}"""

    def use_oauth2(self, introspection_url: str, mechanisms: str = "xoauth2 oauthbearer") -> None:
        """Before :meth:`start`: also accept OAuth2 bearer tokens (SASL ``mechanisms``), which an
        ``oauth2`` passdb introspects at ``introspection_url`` (RFC 7662, POST)."""
        ext = self.root / "dovecot-oauth2.conf.ext"
        ext.write_text(
            f"introspection_mode = post\nintrospection_url = {introspection_url}\n"
            "username_attribute = username\nactive_attribute = active\nactive_value = true\n"
        )
        ext.chmod(0o644)
        self.auth_mechanisms = f"plain login {mechanisms}"
        self.extra_config = f"passdb {{\n  driver = oauth2\n  mechanisms = {mechanisms}\n  args = {ext}\n}}\n"

    def start(self, timeout: float = 15.0) -> Dovecot:
        """Start the server and wait until the plain port greets; retried if a port races away."""
        from tests.conftest import free_port  # lazily: conftest imports this module

        if self._proc is not None:
            return self
        for _attempt in range(3):
            self.port = free_port()
            self.tls_port = free_port()
            if self.port == self.tls_port:
                continue
            self.conf_path.write_text(self.config())
            with (self.root / "stderr.log").open("ab") as err:
                self._proc = subprocess.Popen(
                    [self.binary, "-F", "-c", str(self.conf_path)],
                    stdin=subprocess.DEVNULL,
                    stdout=err,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            if self._wait_ready(timeout):
                return self
            self._terminate()
            if "in use" not in self.log():  # a port raced away: retry, anything else is fatal
                break
        log = self.log()
        self.stop()
        raise RuntimeError(f"Dovecot did not start; its log:\n{log}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                return False
            try:
                with socket.create_connection((HOST, self.port), timeout=2) as s:
                    greeting = s.makefile("rb").readline()
                    if greeting.startswith(b"* OK") and self.name.encode() in greeting:
                        return True
            except OSError:
                pass
            time.sleep(0.05)
        return False

    def _terminate(self) -> None:
        """SIGTERM the master, then SIGKILL what is left of its process group.

        On SIGTERM Dovecot's master stops its services within milliseconds but
        then waits about a second before exiting itself; after a short grace
        period the master and any straggler are killed (a stop takes ~0.3 s).
        """
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(0.3)
            except subprocess.TimeoutExpired:
                self._kill_group(proc.pid)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:  # cannot really happen; the documented way then
                    stop = [self.binary, "-c", str(self.conf_path), "stop"]
                    subprocess.run(stop, capture_output=True, timeout=10, check=False)
                    proc.wait(5)
        # The master is gone; children it left (same process group) get killed too.
        deadline = time.monotonic() + 5
        while _pgroup_members(proc.pid) and time.monotonic() < deadline:
            self._kill_group(proc.pid)
            time.sleep(0.02)

    @staticmethod
    def _kill_group(pgid: int) -> None:
        for pid in _pgroup_members(pgid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def stop(self) -> None:
        """Stop Dovecot, leave no process behind, remove the directory (unless ``keep``)."""
        self._terminate()
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Dovecot:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def log(self) -> str:
        """Dovecot's log and the master's stderr so far (for failure messages)."""
        parts = [
            p.read_text(errors="replace") for p in (self.root / "stderr.log", self.log_path) if p.exists()
        ]
        return "\n".join(parts)

    # ------------------------------------------------------------------ users and sessions

    def mailbox(self, user: str, **fields: Any) -> dict[str, Any]:
        """A ``[[tenants.mailboxes]]`` table pulling ``user``'s mail from here over plain IMAP, the
        password in ``MAILGATE_TEST_UPSTREAM``, no IDLE; ``fields`` add keys or replace these."""
        return {
            "name": user,
            "host": self.host,
            "port": self.port,
            "security": "none",
            "username": user,
            "password_env": "MAILGATE_TEST_UPSTREAM",
            "idle": False,
            **fields,
        }

    def add_user(self, name: str, password: str) -> None:
        """Add (or change the password of) a user; usable at once, no restart.

        Each user has a one-line passwd-file of their own (``passwd/<name>``):
        Dovecot stats a passwd-file at most once a second, but opens a file it
        has not seen (or found missing) at once. A changed password is only
        reread in a later second, so changing one waits for the next second.
        """
        if not name or name.startswith(".") or any(c in name for c in ':/" \\\r\n\t\0'):
            raise ValueError(f"unusable user name: {name!r}")
        if not password or any(c in password for c in ":\r\n\0"):
            raise ValueError(f"unusable password: {password!r}")
        changed = name in self.users and self.users[name] != password
        self.users[name] = password
        path = self.passwd_dir / name
        tmp = self.passwd_dir / f".{name}.tmp"
        tmp.write_text(f"{name}:{{PLAIN}}{password}::::::\n")
        tmp.chmod(0o644)
        if changed:  # Dovecot rereads when the mtime (or size) differs
            stamp = max(time.time(), path.stat().st_mtime + 1)
            os.utime(tmp, (stamp, stamp))
        tmp.replace(path)
        if changed:
            time.sleep(1.05 - time.time() % 1)

    def connect(self, user: str, *, tls: bool = False, timeout: float = 10) -> imaplib.IMAP4:
        """A logged-in imaplib session (use it as a context manager: it logs out)."""
        if tls:
            ctx = ssl.create_default_context()
            self.ca.configure_trust(ctx)
            client: imaplib.IMAP4 = imaplib.IMAP4_SSL(HOST, self.tls_port, ssl_context=ctx, timeout=timeout)
        else:
            client = imaplib.IMAP4(HOST, self.port, timeout=timeout)
        try:
            client.login(user, self.users[user])
        except BaseException:
            with contextlib.suppress(Exception):
                client.shutdown()
            raise
        return client

    # ------------------------------------------------------------------ folders

    def maildir(self, user: str, folder: str = INBOX) -> Path:
        """The maildir of a folder (maildir++: ``.Folder`` below the user's root)."""
        base = self.root / "mail" / user
        return base if _is_inbox(folder) else base / ("." + imap_utf7(folder))

    def create_folder(self, user: str, folder: str) -> None:
        """CREATE the folder (or just open INBOX) so that its maildir exists."""
        with self.connect(user) as c:
            self._create(c, folder)

    @staticmethod
    def _create(c: imaplib.IMAP4, folder: str) -> None:
        if _is_inbox(folder):
            _check(c.select(INBOX, readonly=True), "EXAMINE INBOX")
            return
        typ, data = c.create(quote_mailbox(folder))
        if typ != "OK" and b"ALREADYEXISTS" not in b" ".join(d for d in data if isinstance(d, bytes)):
            raise RuntimeError(f"IMAP CREATE {folder!r} failed: {data!r}")

    @staticmethod
    def _uidvalidity(c: imaplib.IMAP4, folder: str) -> int:
        data = _check(c.status(quote_mailbox(folder), "(UIDVALIDITY)"), f"STATUS {folder!r}")
        m = re.search(rb"UIDVALIDITY (\d+)", b" ".join(d for d in data if isinstance(d, bytes)))
        if m is None:
            raise RuntimeError(f"no UIDVALIDITY in {data!r}")
        return int(m.group(1))

    def uidvalidity(self, user: str, folder: str = INBOX) -> int:
        with self.connect(user) as c:
            return self._uidvalidity(c, folder)

    def exists(self, user: str, folder: str = INBOX) -> int:
        """The message count SELECT (EXAMINE) reports."""
        with self.connect(user) as c:
            data = _check(c.select(quote_mailbox(folder), readonly=True), f"EXAMINE {folder!r}")
            return int(data[0])  # type: ignore[call-overload]

    def recreate_folder(self, user: str, folder: str) -> int:
        """Delete and re-create a folder with the same messages; returns the new UIDVALIDITY.

        Other folders: the message files (with their maildir flags and mtimes,
        i.e. INTERNALDATE) are moved aside, the folder is deleted and created
        again over IMAP, and the files are moved back. INBOX cannot be deleted:
        its uidlist and index are removed instead. Either way: same messages,
        new UIDs, new UIDVALIDITY. Sessions that have the folder selected
        meanwhile see it deleted (for INBOX, keep none open).
        """
        old = self.uidvalidity(user, folder)
        box = self.maildir(user, folder)
        if _is_inbox(folder):
            for f in box.iterdir():
                if f.name == "dovecot-uidlist" or f.name.startswith("dovecot.index"):
                    f.unlink()
        else:
            aside = self.root / "aside" / uuid.uuid4().hex
            moved = []
            for sub in ("new", "cur"):
                (aside / sub).mkdir(parents=True)
                for f in (box / sub).iterdir():
                    f.rename(aside / sub / f.name)
                    moved.append((sub, f.name))
            with self.connect(user) as c:
                _check(c.delete(quote_mailbox(folder)), f"DELETE {folder!r}")
                self._create(c, folder)
            for sub, name in moved:
                (aside / sub / name).rename(box / sub / name)
            shutil.rmtree(aside, ignore_errors=True)
        new = self.uidvalidity(user, folder)
        if new == old:
            raise RuntimeError(f"UIDVALIDITY of {folder!r} stayed {old}")
        return new

    # ------------------------------------------------------------------ messages

    def deliver_files(
        self, user: str, folder: str, messages: list[bytes], *, flags: str = "", sync: bool = True
    ) -> None:
        """Write messages straight into the folder's maildir ``cur/`` (fast; no IMAP per message).

        ``flags`` are maildir flag letters (``S`` seen, ``F`` flagged, ...).
        The file names carry strictly increasing timestamps, which Dovecot sorts
        new files by, so UIDs follow the list order. With ``sync`` (the default)
        one EXAMINE makes Dovecot assign the UIDs now, as for a real delivery;
        without it they are assigned by the next session that opens the folder
        (after messages APPENDed meanwhile).
        """
        global _last_usec
        box = self.maildir(user, folder)
        if not (box / "cur").is_dir():
            self.create_folder(user, folder)
        pid = os.getpid()
        suffix = ":2," + "".join(sorted(flags))
        for message in messages:
            _last_usec = max(time.time_ns() // 1000, _last_usec + 1)
            secs, usecs = divmod(_last_usec, 1_000_000)
            name = f"{secs}.M{usecs}P{pid}Q{next(_seq)}R{uuid.uuid4().hex[:8]}.mailgate-test"
            tmp = box / "tmp" / name
            tmp.write_bytes(message)
            self._chown(tmp)
            tmp.rename(box / "cur" / (name + suffix))
        if sync:
            self.exists(user, folder)

    def append(
        self, user: str, folder: str, message: bytes, *, flags: str = "", date: str | None = None
    ) -> int:
        """APPEND one message (bytes sent unchanged); creates the folder if needed; returns its UID.

        ``flags`` like ``"\\Seen \\Flagged"``; ``date`` an IMAP date-time such as
        ``"01-Jan-2024 10:00:00 +0000"``.
        """
        with self.connect(user) as c:
            if not _is_inbox(folder):
                self._create(c, folder)
            return self._append(c, folder, message, flags, date)

    @staticmethod
    def _append(c: imaplib.IMAP4, folder: str, message: bytes, flags: str, date: str | None) -> int:
        args = [quote_mailbox(folder)]
        if flags:
            args.append(f"({flags})")
        if date:
            args.append(f'"{date}"')
        # imaplib.IMAP4.append() would rewrite every line ending to CRLF.
        c.literal = message  # type: ignore[attr-defined]
        data = _check(c._simple_command("APPEND", *args), f"APPEND to {folder!r}")  # type: ignore[attr-defined]
        m = re.search(rb"APPENDUID \d+ (\d+)", b" ".join(d for d in data if isinstance(d, bytes)))
        return int(m.group(1)) if m else 0

    def fetch(self, user: str, folder: str = INBOX) -> list[Fetched]:
        """Every message in the folder with UID, flags and INTERNALDATE, in UID order."""
        with self.connect(user) as c:
            return self._fetch_all(c, folder)

    def messages(self, user: str, folder: str = INBOX) -> list[bytes]:
        """The raw bytes (``BODY.PEEK[]``) of every message in the folder, in UID order."""
        return [m.body for m in self.fetch(user, folder)]

    @staticmethod
    def _fetch_all(c: imaplib.IMAP4, folder: str) -> list[Fetched]:
        _check(c.select(quote_mailbox(folder), readonly=True), f"EXAMINE {folder!r}")
        data = _check(c.uid("SEARCH", "ALL"), "UID SEARCH")
        uids = sorted(int(u) for u in (data[0] or b"").split())  # type: ignore[union-attr]
        found: dict[int, Fetched] = {}
        for i in range(0, len(uids), _FETCH_BATCH):
            chunk = uids[i : i + _FETCH_BATCH]
            data = _check(
                c.uid("FETCH", f"{chunk[0]}:{chunk[-1]}", "(UID FLAGS INTERNALDATE BODY.PEEK[])"), "UID FETCH"
            )
            for j, item in enumerate(data):
                if not isinstance(item, tuple):
                    continue
                meta = item[0]
                if j + 1 < len(data) and isinstance(data[j + 1], bytes):
                    meta += b" " + data[j + 1]  # items Dovecot put after the literal
                uid = re.search(rb"UID (\d+)", meta)
                if uid is None:
                    continue
                fl = re.search(rb"FLAGS \(([^)]*)\)", meta)
                date = re.search(rb'INTERNALDATE "([^"]+)"', meta)
                found[int(uid.group(1))] = Fetched(
                    uid=int(uid.group(1)),
                    flags=tuple(fl.group(1).decode().split()) if fl else (),
                    internaldate=date.group(1).decode() if date else "",
                    body=bytes(item[1]),
                )
        return [found[u] for u in sorted(found)]


@contextlib.contextmanager
def running_dovecot(users: dict[str, str] | None = None) -> Iterator[Dovecot]:
    """A started private Dovecot (skips or fails via ``peer()`` if it is not installed)."""
    with Dovecot() as server:
        for name, password in (users or {}).items():
            server.add_user(name, password)
        yield server


@pytest.fixture
def dovecot() -> Iterator[Dovecot]:
    """A fresh private Dovecot per test, no users yet."""
    with running_dovecot() as server:
        yield server


# ---------------------------------------------------------------------- dropping proxy


class DroppingProxy:
    """A TCP proxy on 127.0.0.1 that closes both sides of a connection after it has
    forwarded ``drop_after_bytes`` bytes from the server to the client.

    Only the first ``max_drops`` connections are dropped (all when ``None``);
    later ones are passed through untouched, so a client's reconnect succeeds.
    """

    def __init__(
        self,
        target_port: int,
        drop_after_bytes: int,
        *,
        target_host: str = HOST,
        max_drops: int | None = None,
    ) -> None:
        self.target = (target_host, target_port)
        self.drop_after_bytes = drop_after_bytes
        self.max_drops = max_drops
        self.connections = 0
        self.dropped = 0
        self._listener = socket.create_server((HOST, 0))
        self._listener.settimeout(0.1)
        self.host = HOST
        self.port: int = self._listener.getsockname()[1]
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept_loop, name="dropping-proxy", daemon=True)
        self._acceptor.start()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                drop = self.max_drops is None or self.connections < self.max_drops
                self.connections += 1
            t = threading.Thread(target=self._serve, args=(client, drop), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, client: socket.socket, drop: bool) -> None:
        try:
            server = socket.create_connection(self.target, timeout=10)
        except OSError:
            client.close()
            return
        pair = (client, server)
        with self._lock:
            self._sockets.update(pair)
        sent = 0
        try:
            for s in pair:
                s.settimeout(10)
            with selectors.DefaultSelector() as sel:
                sel.register(client, selectors.EVENT_READ, server)
                sel.register(server, selectors.EVENT_READ, client)
                while not self._stopping.is_set():
                    for key, _ in sel.select(0.1):
                        src: socket.socket = key.fileobj  # type: ignore[assignment]
                        data = src.recv(65536)
                        if not data:
                            return
                        if drop and src is server and sent + len(data) >= self.drop_after_bytes:
                            client.sendall(data[: self.drop_after_bytes - sent])
                            with self._lock:
                                self.dropped += 1
                            return
                        key.data.sendall(data)
                        if src is server:
                            sent += len(data)
        except OSError:
            pass
        finally:
            for s in pair:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            with self._lock:
                self._sockets.difference_update(pair)

    def stop(self) -> None:
        self._stopping.set()
        self._listener.close()
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
        self._acceptor.join(5)
        for t in self._threads:
            t.join(5)

    def __enter__(self) -> DroppingProxy:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def dropping_proxy(
    target_port: int, drop_after_bytes: int, *, target_host: str = HOST, max_drops: int | None = None
) -> DroppingProxy:
    """Start a :class:`DroppingProxy` (use it as a context manager, or call ``stop()``)."""
    return DroppingProxy(target_port, drop_after_bytes, target_host=target_host, max_drops=max_drops)

"""IMAP server benchmark: mailgate's IMAP server against Dovecot, same corpus, same run.

Both servers hold the same N messages in INBOX (``tests/corpus.py``:
``normal(N, size)``, every ``--multipart-every``-th one rebuilt as a
multipart/mixed message with a small base64 attachment):

* **Dovecot** (``tests/dovecot.py``, private instance on 127.0.0.1, maildir):
  the messages are written straight into the maildir (``deliver_files``). Two
  settings differ from the test fixture: ``mail_fsync`` is Dovecot's default
  ``optimized`` (the fixture has ``never``; ``--dovecot-fsync never`` restores
  it) and the connection limits are raised so that ``--idle`` sessions of one
  user from one address are allowed.
* **mailgate**: ``mailgate migrate`` on a generated config (temp ``data_dir``,
  embedded SQLite, ``[listen] imap`` only, one tenant with one agent whose
  argon2 hash uses argon2-cffi's default parameters), then the bench process
  itself stores the corpus with ``Pipeline.deliver_many`` (batches of 500, four
  at a time: blobs fsynced, group commits) before ``mailgate run`` starts as a
  subprocess. Nothing is loaded over IMAP.

Timed per server, over one logged-in connection that has EXAMINEd INBOX (the
raw client below sends one command and reads until its tagged OK, skipping
literals by their announced length, so it never parses message bytes):

1. ``UID FETCH 1:* (UID FLAGS RFC822.SIZE INTERNALDATE)``
2. ``UID FETCH 1:* (ENVELOPE BODYSTRUCTURE)``
3. ``UID FETCH 1:* (BODY.PEEK[])``
4. ``mbsync`` full sync of INBOX into an empty maildir (Far = the server, Near =
   maildir, ``Sync Pull``, ``FSync no``: the client should not be the bound),
   a fresh maildir and sync state each time; the files are counted.
5. ``--appends`` APPENDs of distinct ~5 KB messages over one imaplib connection
   into a folder ``Bench`` (so INBOX stays the same for the next round);
   imaplib sends each literal and its final CRLF in separate writes.

Plus ``EXAMINE INBOX`` (a per-session cost that every client pays). Every
operation runs ``--repeat`` rounds, the two servers alternating who goes first;
the table shows the best round, the first round (cold: Dovecot builds its cache
file on first use, mailgate computed ENVELOPE/BODYSTRUCTURE at delivery), the
ratio mailgate/Dovecot of the best times (> 1: mailgate is slower), and the
server's CPU seconds in its best round (mailgate: the daemon; Dovecot: its
process group, reaped children included).

Then memory: mailgate's VmHWM over the timed operations; a fresh ``mailgate
run`` on the same data with ``--idle`` connections, each LOGIN + SELECT INBOX,
held open (logins ``--login-parallel`` at a time): VmRSS before and after,
VmHWM. The same for Dovecot, which forks one ``imap`` process per session:
the sum of their RSS (shared pages counted in every process) and of their PSS.

Checks: every FETCH returns N responses, BODY.PEEK[] returns the corpus' bytes
exactly, mbsync stores N files, the APPEND folder grows by ``--appends``, every
idle session's SELECT reports N messages, and mailgate exits 0 on SIGTERM.
Exits non-zero when one fails. Only 127.0.0.1 is used; every wait is bounded.

    .venv/bin/python bench/imap.py [--messages 10000] [--size 6000] [--appends 300]
        [--idle 500] [--repeat 3] [--profile mailgate.prof]

``--profile FILE`` runs the timed-phase daemon under cProfile (stopped with
SIGINT); its times are then inflated and not comparable.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import imaplib
import json
import logging
import os
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import structlog  # noqa: E402
from argon2 import PasswordHasher  # noqa: E402

from tests import corpus, procfs  # noqa: E402
from tests.dovecot import Dovecot, _pgroup_members  # noqa: E402

# `python -m gateway` (= the `mailgate` command) with this checkout first on the path, so that the
# daemon runs the same code as the in-process loading even from a copy of the tree.
MAILGATE = [sys.executable, "-m", "gateway"]
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
}
HOST = "127.0.0.1"
TENANT = "bench"
LOGIN = "agent@bench.test"
DOVECOT_USER = "bench"
PASSWORD = "bench-password"  # noqa: S105 (a throw-away password on 127.0.0.1)
APPEND_FOLDER = "Bench"
LOAD_BATCH = 500
LOAD_PARALLEL = 4
BODY_OP = "UID FETCH 1:* (BODY.PEEK[])"


class BenchError(Exception):
    """The benchmark could not run or a check failed."""


# --------------------------------------------------------------------------- corpus


def multipart(message: bytes, i: int, rng: random.Random) -> bytes:
    """``message`` (a corpus.normal one) as multipart/mixed: its text and a small attachment."""
    head, _, body = message.partition(b"\r\n\r\n")
    lines = [
        ln
        for ln in head.split(b"\r\n")
        if not ln.lower().startswith((b"content-type:", b"content-transfer-encoding:"))
    ]
    boundary = b"=_bench_%d_%08x" % (i, rng.getrandbits(32))
    text = body[: max(200, len(body) - 1600)]  # keep the size close to the plain message's
    blob = base64.encodebytes(rng.randbytes(1100)).replace(b"\n", b"\r\n")
    return b"\r\n".join(
        [
            *lines,
            b'Content-Type: multipart/mixed; boundary="' + boundary + b'"',
            b"",
            b"This is a multi-part message in MIME format.",
            b"--" + boundary,
            b"Content-Type: text/plain; charset=us-ascii",
            b"Content-Transfer-Encoding: 7bit",
            b"",
            text.rstrip(b"\r\n"),
            b"--" + boundary,
            b'Content-Type: application/pdf; name="invoice%d.pdf"' % i,
            b'Content-Disposition: attachment; filename="invoice%d.pdf"' % i,
            b"Content-Transfer-Encoding: base64",
            b"",
            blob.rstrip(b"\r\n"),
            b"--" + boundary + b"--",
            b"",
        ]
    )


def make_corpus(n: int, size: int, every: int) -> list[bytes]:
    rng = random.Random(7)
    messages = corpus.normal(n, size=size, seed=0)
    if every > 0:
        for i in range(0, n, every):
            messages[i] = multipart(messages[i], i, rng)
    return messages


# --------------------------------------------------------------------------- processes


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (KiB) of a live process; {} if it is gone."""
    out = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def pss_kib(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    m = re.search(r"^Pss:\s+(\d+)", text, re.MULTILINE)
    return int(m.group(1)) if m else 0


def _stat_fields(pid: int) -> list[str]:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2 :].split()  # fields from "state" on: utime is [11]


def cpu_seconds(pid: int, *, reaped: bool = False) -> float:
    """User + system CPU of a live process (with ``reaped``: plus its waited-for children)."""
    try:
        f = _stat_fields(pid)
    except OSError:
        return 0.0
    ticks = int(f[11]) + int(f[12]) + ((int(f[13]) + int(f[14])) if reaped else 0)
    return ticks / os.sysconf("SC_CLK_TCK")


def reset_peak(pid: int) -> None:
    """Reset VmHWM to the current RSS (``clear_refs`` 5, Linux 4.0+), so a later VmHWM is a peak since."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"mailgate exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((HOST, port), timeout=1.0) as s:
                s.settimeout(5.0)
                if s.recv(64).startswith(b"* OK"):
                    return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"nothing greets on {HOST}:{port} after {timeout:.0f}s")


def run_bounded(
    cmd: list[str], timeout: float, cwd: Path | None = None
) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=timeout, check=False, cwd=cwd, env=ENV)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{Path(cmd[0]).name} did not finish within {timeout:.0f}s") from None


# --------------------------------------------------------------------------- raw IMAP client


@dataclass
class Reply:
    status: bytes
    fetches: int = 0  # untagged "* n FETCH" responses
    literal_bytes: int = 0  # bytes inside literals
    untagged: list[bytes] = field(default_factory=list)  # only when collected


class Client:
    """A minimal IMAP client: one command at a time, literals skipped by length, never parsed."""

    def __init__(self, port: int, timeout: float) -> None:
        self.timeout = timeout
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.pos = 0
        self.tags = 0
        self.deadline = time.monotonic() + timeout
        greeting = self.readline()
        if not greeting.startswith(b"* OK"):
            raise BenchError(f"greeting: {greeting[:200]!r}")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def _recv(self) -> bytes:
        if time.monotonic() > self.deadline:
            raise BenchError(f"the server did not answer within {self.timeout:.0f}s")
        data = self.sock.recv(1 << 20)
        if not data:
            raise BenchError("the server closed the connection")
        return data

    def readline(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n", self.pos)
            if i >= 0:
                line = bytes(self.buf[self.pos : i])
                self.pos = i + 2
                return line
            if self.pos:
                del self.buf[: self.pos]
                self.pos = 0
            self.buf += self._recv()

    def skip(self, n: int) -> None:
        avail = len(self.buf) - self.pos
        if avail >= n:
            self.pos += n
            return
        n -= avail
        self.buf.clear()
        self.pos = 0
        while n > 0:
            data = self._recv()
            if len(data) > n:
                self.buf += data[n:]
            n -= len(data)

    def command(self, text: str, *, collect: bool = False, literal: bytes | None = None) -> Reply:
        """Send one command; read to its tagged reply (must be OK).

        ``literal``: ``text`` ends with its synchronising ``{n}``; it is sent after the server's ``+``.
        """
        self.tags += 1
        tag = b"b%d" % self.tags
        self.deadline = time.monotonic() + self.timeout
        self.sock.sendall(tag + b" " + text.encode() + b"\r\n")
        if literal is not None:
            line = self.readline()
            if not line.startswith(b"+"):
                raise BenchError(f"{text[:60]!r}: {line[:300]!r} instead of a continuation")
            self.sock.sendall(literal + b"\r\n")
        reply = Reply(b"")
        prefix = tag + b" "
        continued = False  # the line continues a response after a literal
        while True:
            line = self.readline()
            if not continued:
                if line.startswith(prefix):
                    reply.status = line[len(prefix) :]
                    if not reply.status.startswith(b"OK"):
                        raise BenchError(f"{text[:60]!r}: {reply.status[:300]!r}")
                    return reply
                if line.startswith(b"* ") and b" FETCH (" in line[:24]:
                    reply.fetches += 1
                if collect:
                    reply.untagged.append(line)
            elif collect:
                reply.untagged[-1] += b" " + line
            continued = False
            if line.endswith(b"}"):
                j = line.rfind(b"{")
                if j >= 0 and line[j + 1 : -1].rstrip(b"+").isdigit():
                    n = int(line[j + 1 : -1].rstrip(b"+"))
                    self.skip(n)
                    reply.literal_bytes += n
                    continued = True

    def login(self, user: str, password: str) -> None:
        self.command(f'LOGIN "{user}" "{password}"')

    def open_folder(self, name: str, *, readonly: bool) -> int:
        """SELECT or EXAMINE; returns EXISTS."""
        reply = self.command(f'{"EXAMINE" if readonly else "SELECT"} "{name}"', collect=True)
        for line in reply.untagged:
            m = re.match(rb"\* (\d+) EXISTS", line)
            if m:
                return int(m.group(1))
        raise BenchError(f"no EXISTS in the reply to SELECT {name}")


# --------------------------------------------------------------------------- servers


HASHED = PasswordHasher().hash(PASSWORD)  # argon2-cffi defaults, as `mailgate hash-password`; both servers


class BenchDovecot(Dovecot):
    """The test fixture's Dovecot with Dovecot's default fsync, room for many sessions and COMPRESS."""

    def argon2id_user(self, name: str, hashed: str) -> None:
        """Give ``name`` the same argon2id hash mailgate has (Dovecot's passwd-file ``{ARGON2ID}``)."""
        (self.passwd_dir / name).write_text(f"{name}:{{ARGON2ID}}{hashed}::::::\n")

    def __init__(self, fsync: str) -> None:
        self.fsync = fsync
        super().__init__()

    def config(self) -> str:
        text = super().config()
        for old, new in (
            ("mail_fsync = never", f"mail_fsync = {self.fsync}"),
            # COMPRESS=DEFLATE, as mailgate offers it: mbsync 1.4 uses it whenever offered, so both
            # servers must do that work for its sync to be compared.
            (
                "mail_max_userip_connections = 100",
                "mail_max_userip_connections = 5000\n  mail_plugins = $mail_plugins imap_zlib",
            ),
        ):
            if old not in text:
                raise BenchError(f"tests/dovecot.py changed: no {old!r} in its config")
            text = text.replace(old, new)
        return text + "default_process_limit = 2000\ndefault_client_limit = 6000\n"


@dataclass
class Server:
    """One server under test, as the operations see it."""

    name: str
    port: int
    user: str
    cpu: Callable[[], float]  # the server's CPU seconds so far
    pid: int = 0  # a single-process server (mailgate): its peak RSS is tracked per operation


def dovecot_cpu(dc: Dovecot) -> float:
    """CPU seconds of Dovecot's process group (live members, and children the master reaped)."""
    master = dc.pid
    if master is None:
        return 0.0
    return sum(cpu_seconds(p, reaped=p == master) for p in _pgroup_members(master))


def write_mailgate_config(tmp: Path, port: int) -> Path:
    hashed = HASHED
    config = tmp / "mailgate.toml"
    config.write_text(
        "[gateway]\n"
        'hostname = "bench.test"\n'
        f"data_dir = {json.dumps(str(tmp / 'var'))}\n"
        "[listen]\n"
        'smtp = ""\n'
        f'imap = "{HOST}:{port}"\n'
        "[[tenants]]\n"
        f'id = "{TENANT}"\n'
        'domains = ["bench.test"]\n'
        "[[tenants.agents]]\n"
        f'login = "{LOGIN}"\n'
        'name = "Bench Agent"\n'
        f'password_hash = "{hashed}"\n'
        # Every bench client comes from 127.0.0.1: lift the per-address and per-network caps.
        "[limits.imap]\n"
        "connections = 10000\n"
        "per_ip = 10000\n"
        "per_network = 10000\n",
        encoding="utf-8",
    )
    return config


async def _load_mailgate(config_path: Path, messages: list[bytes]) -> int:
    from gateway.config import load_config
    from gateway.daemon import open_store
    from gateway.ingest import Delivery, Pipeline

    config = load_config(config_path)
    tenant = config.tenant(TENANT)
    db, blobs = await open_store(config)
    try:
        pipeline = Pipeline(db, blobs)
        gate = asyncio.Semaphore(LOAD_PARALLEL)

        async def batch(chunk: list[bytes]) -> int:
            async with gate:
                outcomes = await pipeline.deliver_many(tenant, [(m, Delivery(source="bench")) for m in chunk])
            return sum(1 for o in outcomes if not o.duplicate)

        counts = await asyncio.gather(
            *(batch(messages[i : i + LOAD_BATCH]) for i in range(0, len(messages), LOAD_BATCH))
        )
    finally:
        await db.close()
    return sum(counts)


def load_mailgate(config: Path, tmp: Path, messages: list[bytes], timeout: float) -> float:
    """Migrate, then deliver the corpus in-process; returns seconds."""
    done = run_bounded([*MAILGATE, "-c", str(config), "migrate"], timeout, cwd=tmp)
    if done.returncode != 0:
        raise BenchError(f"mailgate migrate: {(done.stderr or done.stdout).decode(errors='replace')[-1500:]}")
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    started = time.perf_counter()
    stored = asyncio.run(asyncio.wait_for(_load_mailgate(config, messages), timeout))
    if stored != len(messages):
        raise BenchError(f"mailgate stored {stored} of {len(messages)} corpus messages")
    return time.perf_counter() - started


class Mailgate:
    """``mailgate run`` as a subprocess (optionally under cProfile)."""

    def __init__(self, config: Path, tmp: Path, port: int, profile: Path | None = None) -> None:
        self.port = port
        self.profile = profile
        if profile is not None:
            cmd = [sys.executable, "-m", "cProfile", "-o", str(profile), "-m", "gateway"]
        else:
            cmd = MAILGATE
        self.log = tmp / "mailgate.log"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [*cmd, "-c", str(config), "run"], cwd=tmp, env=ENV, stdout=out, stderr=subprocess.STDOUT
            )
        try:
            wait_port(port, self.proc, 60.0)
        except BenchError:
            self.kill()
            sys.stderr.write(self.log.read_text(errors="replace")[-2000:])
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (SIGINT under cProfile) and wait; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT if self.profile else signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise BenchError(f"mailgate did not exit within {timeout:.0f}s of SIGTERM") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


# --------------------------------------------------------------------------- operations


@dataclass
class Sample:
    seconds: float
    server_cpu: float
    client_cpu: float
    peak_kib: int = 0  # mailgate: VmHWM during the operation


@dataclass
class Context:
    args: argparse.Namespace
    tmp: Path
    expected_bytes: int
    appends: list[bytes]
    problems: list[str] = field(default_factory=list)
    runs: int = 0

    def check(self, ok: bool, what: str) -> None:
        if not ok and what not in self.problems:
            self.problems.append(what)


def connect(server: Server, args: argparse.Namespace) -> Client:
    client = Client(server.port, args.timeout)
    try:
        client.login(server.user, PASSWORD)
    except BaseException:
        client.close()
        raise
    return client


@dataclass
class Step:
    """One prepared operation: ``run`` is timed, ``finish`` (checks, clean-up) is not."""

    run: Callable[[], object]
    finish: Callable[[object], None]


def op_examine(server: Server, ctx: Context) -> Step:
    client = connect(server, ctx.args)

    def finish(exists: object) -> None:
        client.close()
        ctx.check(exists == ctx.args.messages, f"{server.name}: EXAMINE INBOX says {exists} messages")

    return Step(lambda: client.open_folder("INBOX", readonly=True), finish)


def fetch_op(items: str, check_bytes: bool) -> Callable[[Server, Context], Step]:
    def prepare(server: Server, ctx: Context) -> Step:
        client = connect(server, ctx.args)
        try:
            exists = client.open_folder("INBOX", readonly=True)
        except BaseException:
            client.close()
            raise
        ctx.check(exists == ctx.args.messages, f"{server.name}: EXAMINE INBOX says {exists} messages")

        def finish(reply: object) -> None:
            client.close()
            assert isinstance(reply, Reply)
            n = ctx.args.messages
            ctx.check(reply.fetches == n, f"{server.name}: FETCH ({items}) gave {reply.fetches} of {n}")
            if check_bytes:
                ctx.check(
                    reply.literal_bytes == ctx.expected_bytes,
                    f"{server.name}: BODY.PEEK[] served {reply.literal_bytes} bytes, "
                    f"the corpus has {ctx.expected_bytes}",
                )

        return Step(lambda: client.command(f"UID FETCH 1:* ({items})"), finish)

    return prepare


def op_mbsync(server: Server, ctx: Context) -> Step:
    ctx.runs += 1
    work = ctx.tmp / f"mbsync-{server.name}-{ctx.runs}"
    near = work / "maildir"
    near.mkdir(parents=True)
    (work / "state").mkdir()
    rc = work / "mbsyncrc"
    rc.write_text(
        "FSync no\n"
        "\n"
        "IMAPAccount far\n"
        f"Host {HOST}\n"
        f"Port {server.port}\n"
        f"User {server.user}\n"
        f'Pass "{PASSWORD}"\n'
        "SSLType None\n"
        "AuthMechs LOGIN\n"
        "\n"
        "IMAPStore far\n"
        "Account far\n"
        "\n"
        "MaildirStore near\n"
        f"Path {near}/\n"
        f"Inbox {near}/INBOX\n"
        "\n"
        "Channel bench\n"
        "Far :far:\n"
        "Near :near:\n"
        "Patterns INBOX\n"
        "Sync Pull\n"
        "Create Near\n"
        f"SyncState {work}/state/\n"
    )
    rc.chmod(0o600)

    def finish(done: object) -> None:
        assert isinstance(done, subprocess.CompletedProcess)
        if done.returncode != 0:
            err = (done.stderr or done.stdout).decode(errors="replace").strip()[-1500:]
            raise BenchError(f"mbsync against {server.name} exited {done.returncode}: {err}")
        box = near / "INBOX"
        count = sum(len(os.listdir(box / sub)) for sub in ("cur", "new") if (box / sub).is_dir())
        ctx.check(count == ctx.args.messages, f"{server.name}: mbsync stored {count} of {ctx.args.messages}")
        shutil.rmtree(work, ignore_errors=True)

    return Step(
        lambda: run_bounded(["mbsync", "-q", "-c", str(rc), "bench"], ctx.args.timeout, cwd=work), finish
    )


def _status_messages(c: imaplib.IMAP4, folder: str) -> int:
    typ, data = c.status(folder, "(MESSAGES)")
    m = re.search(rb"MESSAGES (\d+)", b" ".join(d for d in data if isinstance(d, bytes)))
    if typ != "OK" or m is None:
        raise BenchError(f"STATUS {folder}: {typ} {data!r}")
    return int(m.group(1))


def op_append(server: Server, ctx: Context) -> Step:
    c = imaplib.IMAP4(HOST, server.port, timeout=ctx.args.timeout)
    c.login(server.user, PASSWORD)
    before = _status_messages(c, APPEND_FOLDER)

    def run() -> list[str]:
        """imaplib.append: the literal, then its CRLF, in two writes (each message is CRLF already)."""
        return [c.append(APPEND_FOLDER, "", "", message)[0] for message in ctx.appends]

    def finish(answers: object) -> None:
        try:
            assert isinstance(answers, list)
            ok = answers.count("OK")
            ctx.check(ok == len(ctx.appends), f"{server.name}: {ok} of {len(ctx.appends)} APPENDs were OK")
            grew = _status_messages(c, APPEND_FOLDER) - before
            ctx.check(grew == len(ctx.appends), f"{server.name}: {APPEND_FOLDER} grew by {grew} on APPEND")
            c.logout()
        finally:
            with contextlib.suppress(Exception):
                c.shutdown()

    return Step(run, finish)


@dataclass(frozen=True)
class Operation:
    label: str
    prepare: Callable[[Server, Context], Step]


def operations(args: argparse.Namespace) -> list[Operation]:
    meta = "UID FLAGS RFC822.SIZE INTERNALDATE"
    return [
        Operation("EXAMINE INBOX", op_examine),
        Operation(f"UID FETCH 1:* ({meta})", fetch_op(meta, False)),
        Operation("UID FETCH 1:* (ENVELOPE BODYSTRUCTURE)", fetch_op("ENVELOPE BODYSTRUCTURE", False)),
        Operation(BODY_OP, fetch_op("BODY.PEEK[]", True)),
        Operation("mbsync full sync (Sync Pull, FSync no)", op_mbsync),
        Operation(append_label(args), op_append),
    ]


def append_label(args: argparse.Namespace) -> str:
    return f"{args.appends} APPENDs (imaplib, one connection)"


def timed(op: Operation, server: Server, ctx: Context) -> Sample:
    """Prepare (connect, log in: untimed), time the operation alone, then check it."""
    step = op.prepare(server, ctx)
    if server.pid:
        reset_peak(server.pid)
    cpu0, client0 = server.cpu(), time.process_time()
    started = time.perf_counter()
    result = step.run()
    seconds = time.perf_counter() - started
    sample = Sample(seconds, server.cpu() - cpu0, time.process_time() - client0)
    if server.pid:
        sample.peak_kib = proc_status(server.pid).get("VmHWM", 0)
    step.finish(result)
    return sample


# --------------------------------------------------------------------------- idle sessions


def open_idle(server: Server, ctx: Context) -> tuple[list[Client], float]:
    """``--idle`` sessions, each LOGIN + SELECT INBOX; (clients, seconds to open them)."""
    args = ctx.args

    def one(_: int) -> Client:
        client = connect(server, args)
        try:
            exists = client.open_folder("INBOX", readonly=False)
        except BaseException:
            client.close()
            raise
        ctx.check(exists >= args.messages, f"{server.name}: an idle SELECT says {exists} messages")
        return client

    started = time.perf_counter()
    clients = open_many(
        one, args.idle, args.login_parallel, args.timeout, f"{server.name}: opening idle sessions"
    )
    return clients, time.perf_counter() - started


def open_many(
    open_one: Callable[[int], Client], n: int, parallel: int, timeout: float, what: str
) -> list[Client]:
    """``n`` sessions opened by ``open_one``, ``parallel`` at a time; on any failure every opened one
    is closed and the first error raised as a BenchError naming ``what``."""
    clients: list[Client] = []
    error: BaseException | None = None
    with ThreadPoolExecutor(max(1, min(n, parallel))) as pool:
        futures = [pool.submit(open_one, i) for i in range(n)]
        for f in futures:
            try:
                clients.append(f.result(timeout=timeout))
            except Exception as exc:  # noqa: BLE001 (reported after closing the others)
                error = error or exc
    if error is not None:
        for c in clients:
            c.close()
        raise BenchError(f"{what}: {error}")
    return clients


def raise_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < need:
            raise BenchError(f"RLIMIT_NOFILE hard limit {hard} is below the {need} descriptors needed")


def dovecot_imap_memory(dc: Dovecot) -> tuple[int, int, int, int]:
    """(imap processes, their RSS sum, their PSS sum, RSS sum of the whole tree) in KiB."""
    master = dc.pid
    if master is None:
        return 0, 0, 0, 0
    members = _pgroup_members(master)
    imap = [p for p in members if comm(p) == "imap"]
    rss = sum(proc_status(p).get("VmRSS", 0) for p in imap)
    tree = sum(proc_status(p).get("VmRSS", 0) for p in members)
    return len(imap), rss, sum(pss_kib(p) for p in imap), tree


# --------------------------------------------------------------------------- main


def mib(kib: int) -> str:
    return f"{kib / 1024:.0f} MiB"


def print_table(ops: list[Operation], results: dict[str, dict[str, list[Sample]]]) -> None:
    width = max(len(op.label) for op in ops) + 2
    print()
    print(
        f"{'operation':<{width}}{'dovecot s':>10}{'mailgate s':>11}{'ratio':>8}"
        f"{'first: dovecot':>16}{'mailgate':>10}{'CPU s: dovecot':>16}{'mailgate':>10}{'client':>8}"
        f"{'mailgate peak RSS':>19}"
    )
    for op in ops:
        d, m = results[op.label]["dovecot"], results[op.label]["mailgate"]
        bd, bm = min(d, key=lambda s: s.seconds), min(m, key=lambda s: s.seconds)
        ratio = bm.seconds / bd.seconds if bd.seconds > 0 else float("inf")
        print(
            f"{op.label:<{width}}{bd.seconds:>10.3f}{bm.seconds:>11.3f}{ratio:>8.1f}"
            f"{d[0].seconds:>16.3f}{m[0].seconds:>10.3f}"
            f"{bd.server_cpu:>16.2f}{bm.server_cpu:>10.2f}{max(bd.client_cpu, bm.client_cpu):>8.2f}"
            f"{mib(max(s.peak_kib for s in m)):>19}"
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=10_000, help="messages in INBOX (10000)")
    p.add_argument("--size", type=int, default=6000, help="bytes per corpus message (6000)")
    p.add_argument(
        "--multipart-every", type=int, default=10, help="every k-th message multipart/mixed (10; 0: none)"
    )
    p.add_argument("--appends", type=int, default=300, help="APPENDs of ~5 KB messages (300)")
    p.add_argument("--idle", type=int, default=500, help="idle authenticated connections (500)")
    p.add_argument("--login-parallel", type=int, default=8, help="idle sessions opened at a time (8)")
    p.add_argument("--repeat", type=int, default=3, help="rounds of the timed operations (3)")
    p.add_argument(
        "--dovecot-fsync", choices=("optimized", "always", "never"), default="optimized", help="(optimized)"
    )
    p.add_argument("--profile", type=Path, help="run the timed-phase mailgate under cProfile into this file")
    p.add_argument("--timeout", type=float, default=900.0, help="limit per operation, seconds (900)")
    args = p.parse_args()
    if (
        min(args.messages, args.size, args.repeat, args.login_parallel) < 1
        or min(args.appends, args.idle) < 0
    ):
        p.error("--messages, --size, --repeat, --login-parallel must be positive")
    for tool in ("mbsync", "/usr/sbin/dovecot"):
        if shutil.which(tool) is None:
            print(f"imap: {tool} is missing (apt-get install isync dovecot-imapd)", file=sys.stderr)
            return 2
    raise_nofile(2 * args.idle + 256)

    messages = make_corpus(args.messages, args.size, args.multipart_every)
    appends = corpus.normal(args.appends, size=5000, seed=1)
    total = sum(len(m) for m in messages)
    print(
        f"imap: {args.messages} messages, {total / args.messages:.0f} bytes average "
        f"({total / 2**20:.1f} MiB), every {args.multipart_every or 'no'}-th multipart; "
        f"{args.appends} APPENDs; {args.idle} idle sessions; best of {args.repeat} rounds"
    )
    print(
        "load average 1/5/15 min at the start: {:.1f} {:.1f} {:.1f} ({} CPUs)".format(
            *os.getloadavg(), os.cpu_count()
        )
    )
    try:
        with tempfile.TemporaryDirectory(prefix="mailgate-bench-imap-") as tmpdir:
            tmp = Path(tmpdir)
            tmp.chmod(0o755)
            return run(args, tmp, messages, appends)
    except BenchError as exc:
        print(f"imap: error: {exc}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace, tmp: Path, messages: list[bytes], appends: list[bytes]) -> int:
    ctx = Context(args, tmp, sum(len(m) for m in messages), appends)
    ops = operations(args)
    with BenchDovecot(args.dovecot_fsync) as dc:
        dc.add_user(DOVECOT_USER, PASSWORD)
        dc.argon2id_user(DOVECOT_USER, HASHED)
        started = time.perf_counter()
        dc.deliver_files(DOVECOT_USER, "INBOX", messages)
        dc.create_folder(DOVECOT_USER, APPEND_FOLDER)
        print(f"loaded Dovecot: {time.perf_counter() - started:.1f} s (maildir files + first EXAMINE)")

        port = free_port()
        config = write_mailgate_config(tmp, port)
        seconds = load_mailgate(config, tmp, messages, args.timeout)
        print(
            f"loaded mailgate: {seconds:.1f} s ({args.messages / seconds:.0f} msg/s, "
            f"Pipeline.deliver_many in-process, batches of {LOAD_BATCH}, {LOAD_PARALLEL} at a time)"
        )

        dovecot = Server("dovecot", dc.port, DOVECOT_USER, lambda: dovecot_cpu(dc))
        results: dict[str, dict[str, list[Sample]]] = {
            op.label: {"dovecot": [], "mailgate": []} for op in ops
        }
        mg = Mailgate(config, tmp, port, args.profile)
        try:
            mailgate = Server("mailgate", port, LOGIN, lambda: procfs.tree_cpu_seconds(mg.pid), mg.pid)
            client = connect(mailgate, args)
            try:
                client.command(f'CREATE "{APPEND_FOLDER}"')
            finally:
                client.close()
            for r in range(args.repeat):
                order = (dovecot, mailgate) if r % 2 == 0 else (mailgate, dovecot)
                for op in ops:
                    for server in order:
                        results[op.label][server.name].append(timed(op, server, ctx))
                print(f"round {r + 1}/{args.repeat} done", flush=True)
            timed_mem = proc_status(mg.pid)
            status = mg.stop()
        finally:
            mg.kill()
        ctx.check(status == 0, f"mailgate exited {status}, not 0, on SIGTERM (timed phase)")
        print_table(ops, results)
        print_rates(args, ctx, results)
        peak = max(s.peak_kib for by in results.values() for s in by["mailgate"])
        print(
            f"mailgate after the timed operations: VmRSS {mib(timed_mem.get('VmRSS', 0))}; "
            f"highest peak during one (VmHWM, reset before each): {mib(peak)}"
        )
        if args.idle:
            idle_memory(args, ctx, config, tmp, port, dc, dovecot)
    print("load average 1/5/15 min at the end: {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))
    for problem in ctx.problems:
        print(f"imap: FAIL: {problem}", file=sys.stderr)
    return 1 if ctx.problems else 0


def print_rates(args: argparse.Namespace, ctx: Context, results: dict[str, dict[str, list[Sample]]]) -> None:
    def best(label: str, name: str) -> float:
        return min(s.seconds for s in results[label][name])

    body, appends = BODY_OP, append_label(args)
    mb = ctx.expected_bytes / 2**20
    print(
        f"BODY.PEEK[]: Dovecot {mb / best(body, 'dovecot'):.0f} MiB/s, "
        f"mailgate {mb / best(body, 'mailgate'):.0f} MiB/s "
        f"({args.messages / best(body, 'mailgate'):.0f} msg/s)"
    )
    if args.appends:
        print(
            f"APPEND: Dovecot {args.appends / best(appends, 'dovecot'):.0f}/s, "
            f"mailgate {args.appends / best(appends, 'mailgate'):.0f}/s"
        )


def idle_memory(
    args: argparse.Namespace, ctx: Context, config: Path, tmp: Path, port: int, dc: Dovecot, dovecot: Server
) -> None:
    """Memory with ``--idle`` LOGIN + SELECT sessions, and the time to open them twice (the second
    round after all disconnected: mailgate's verified-login cache at work): a fresh mailgate, then Dovecot
    (same argon2id hash, no auth cache: Dovecot's default)."""
    mg = Mailgate(config, tmp, port)
    try:
        mailgate = Server("mailgate", port, LOGIN, lambda: procfs.tree_cpu_seconds(mg.pid))
        time.sleep(0.5)
        base = proc_status(mg.pid)
        reset_peak(mg.pid)
        clients, first = open_idle(mailgate, ctx)
        for c in clients:
            c.close()
        time.sleep(1.0)
        clients, seconds = open_idle(mailgate, ctx)
        try:
            time.sleep(1.0)
            held = proc_status(mg.pid)
            pss = pss_kib(mg.pid)
        finally:
            for c in clients:
                c.close()
        status = mg.stop()
    finally:
        mg.kill()
    ctx.check(status == 0, f"mailgate exited {status}, not 0, on SIGTERM (idle phase)")
    per = (held.get("VmRSS", 0) - base.get("VmRSS", 0)) / max(1, args.idle)
    print(
        f"\nmailgate, fresh daemon: VmRSS {mib(base.get('VmRSS', 0))}; {args.idle} idle sessions "
        f"(LOGIN + SELECT INBOX, {args.login_parallel} at a time) opened in {first:.1f} s, then again "
        f"after a disconnect in {seconds:.1f} s: VmRSS {mib(held.get('VmRSS', 0))} (PSS {mib(pss)}), "
        f"{per:.0f} KiB per session; VmHWM {mib(held.get('VmHWM', 0))}"
    )
    n0, _, _, tree0 = dovecot_imap_memory(dc)
    clients, their_first = open_idle(dovecot, ctx)
    for c in clients:
        c.close()
    time.sleep(1.0)
    clients, their_seconds = open_idle(dovecot, ctx)
    try:
        time.sleep(1.0)
        n, rss, pss, tree = dovecot_imap_memory(dc)
    finally:
        for c in clients:
            c.close()
    print(
        f"Dovecot: before, {n0} imap processes, whole tree RSS {mib(tree0)}; {args.idle} idle "
        f"sessions opened in {their_first:.1f} s, then again in {their_seconds:.1f} s: {n} imap processes, "
        f"RSS sum {mib(rss)} ({rss / max(1, n):.0f} KiB each; shared pages counted in each), PSS sum "
        f"{mib(pss)}; whole tree RSS sum {mib(tree)}"
    )
    print(
        f"logins, second round: mailgate {seconds:.1f} s / Dovecot {their_seconds:.1f} s = "
        f"{seconds / max(their_seconds, 1e-9):.1f}x (first round {first / max(their_first, 1e-9):.1f}x)"
    )


if __name__ == "__main__":
    sys.exit(main())

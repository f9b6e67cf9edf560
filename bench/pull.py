"""IMAP pull benchmark: mailgate against mbsync, getmail6 and fetchmail, in one run.

One private Dovecot (``tests/dovecot.py``, 127.0.0.1 only) serves K mailboxes
of M messages (``tests/corpus.py``: ``normal(M, size, seed=i)`` for mailbox i,
so no message is a duplicate of another mailbox's). Every tool gets its own
K Dovecot users holding identical copies of that corpus (``mg0..``, ``mb0..``,
``gm0..``, ``fm0..``), so nothing one tool does upstream (fetchmail marks what
it fetched ``\\Seen``) can change what the next one sees. Each tool starts from
empty local state and pulls all K x M messages; the bench times it and counts
what it stored:

* **mailgate**: ``mailgate run`` on a generated config (temp ``data_dir``, no
  listener, one tenant with K ``[[tenants.mailboxes]]``, ``idle = false``,
  ``poll_interval = "1h"``, ``after_fetch = "keep"``). The time runs from
  spawning the daemon (start-up and database migration included) until the
  K x M-th ``ingest.stored`` line of its log, which is written after the
  message's transaction committed; the log is read in-process every 50 ms, so
  no helper process competes for the CPU meanwhile. Afterwards: peak RSS
  (VmHWM), CPU, SIGTERM (it must exit 0), and the stored count from
  ``mailgate folders`` and ``mailgate mailboxes`` (``messages_pulled``).
* **mbsync** (isync): one ``.mbsyncrc`` with K accounts/channels (Far IMAP ->
  Near Maildir, ``Sync Pull``, ``Create Near``), ``mbsync -a``: the K mailboxes
  one after another in one process; FSync left at its default (yes).
* **getmail6**: one rc per mailbox (SimpleIMAPRetriever -> Maildir,
  ``read_all``, no delete), all passed to one ``getmail`` process, which
  retrieves them one after another. getmail6 before 6.19.09 (Debian 12 has
  6.18.11) sometimes loses a delivery child (it installs its SIGCHLD handler
  after the fork; getmail6 issue #245), then waits 60 s and abandons the
  mailbox: so unless ``--system-getmail`` is given, an older ``getmail`` on
  PATH is not used and getmail6 6.20.2 is installed from PyPI (``pip install
  --target``) into the run's temporary directory instead, as it is when
  getmail is not installed at all. getmail refuses Maildir delivery as root,
  so as root the maildirs belong to ``nobody`` and the destination says
  ``user = nobody``.
* **fetchmail**: one rc with K ``user`` entries under one ``poll`` (IMAP,
  ``keep fetchall``, ``sslproto ''`` against Dovecot's STARTTLS), each
  delivered by an MDA shell script into a Maildir (``mktemp`` in ``tmp/``,
  ``dd conv=fsync``, ``mv`` to ``new/``): one MDA process per message.

Peer counts are the files in each Maildir's ``new/`` and ``cur/``. Printed: a
table of seconds, msgs/s, mailgate's rate divided by the tool's, CPU seconds
(mailgate: the daemon's; a peer: all its processes, children included) in all
and per 1000 messages, Dovecot's CPU seconds meanwhile, and the count.

Exits non-zero when a tool fails or stores a wrong count, or mailgate does not
exit 0 on SIGTERM. A peer that is not installed is skipped (and named). Every
wait is bounded; nothing but 127.0.0.1 is contacted.

    .venv/bin/python bench/pull.py [--mailboxes 4] [--messages 2000] [--size 10000]
        [--tools mailgate,mbsync,getmail,fetchmail] [--system-getmail]
        [--database-url postgresql+asyncpg://postgres@127.0.0.1:5432/mailgate_bench]

With a PostgreSQL URL the named database is created (it must not exist) and
dropped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import re
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from tests import corpus, procfs
from tests.dovecot import Dovecot

ROOT = Path(__file__).resolve().parent.parent
MAILGATE = ROOT / ".venv" / "bin" / "mailgate"
DOVECOT = "/usr/sbin/dovecot"
HOST = "127.0.0.1"
TENANT = "bench"
LOGIN_ENV = "MAILGATE_BENCH_PASSWORD"  # the environment variable mailgate reads it from
POLL = 0.05  # seconds between looks at mailgate's log
PACKAGES = {"mbsync": "isync", "getmail": "getmail6", "fetchmail": "fetchmail"}  # peer -> Debian package
GETMAIL_FIXED = (6, 19, 9)  # the first getmail6 that does not lose delivery children (issue #245)
GETMAIL_PYPI = "getmail6==6.20.2"
PREFIX = {"mailgate": "mg", "mbsync": "mb", "getmail": "gm", "fetchmail": "fm"}  # Dovecot user prefix
TOOLS = tuple(PREFIX)


class BenchError(Exception):
    """The benchmark could not run."""


@dataclass
class Result:
    """What one tool's run measured."""

    tool: str
    seconds: float = 0.0
    stored: int = 0
    cpu: float = 0.0
    upstream_cpu: float = 0.0  # Dovecot's CPU seconds meanwhile
    error: str = ""
    note: str = ""


@dataclass
class Setup:
    """The upstream side shared by every tool."""

    dovecot: Dovecot
    password: str
    mailboxes: int
    messages: int

    @property
    def expected(self) -> int:
        return self.mailboxes * self.messages

    def users(self, tool: str) -> list[str]:
        return [f"{PREFIX[tool]}{i}" for i in range(self.mailboxes)]


def run_bounded(
    cmd: list[str], timeout: float, *, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run ``cmd`` to completion, capturing its output; killed after ``timeout`` seconds."""
    try:
        return subprocess.run(cmd, capture_output=True, timeout=timeout, check=False, cwd=cwd, env=env)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{Path(cmd[0]).name} did not finish within {timeout:.0f}s") from None


def children_cpu() -> float:
    """User + system CPU seconds of every waited-for child process so far."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def group_cpu(pgid: int) -> float:
    """CPU seconds of a process group's live members and the children they reaped (Linux /proc)."""
    return sum(procfs.cpu_seconds(fields) for _, fields in procfs.stats() if int(fields[2]) == pgid)


def maildir_count(box: Path) -> int:
    return sum(1 for sub in ("new", "cur") if (box / sub).is_dir() for _ in (box / sub).iterdir())


def make_maildir(box: Path, owner: int | None = None) -> Path:
    for sub in ("cur", "new", "tmp"):
        (box / sub).mkdir(parents=True, exist_ok=True)
    if owner is not None:
        for path in (box, box / "cur", box / "new", box / "tmp"):
            os.chown(path, owner, -1)
    return box


def tail(path: Path, chars: int = 2000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


# --------------------------------------------------------------------------- PostgreSQL scratch database


def psql(url: str, sql: str) -> None:
    parts = urlsplit(url)
    env = dict(os.environ)
    if parts.password:
        env["PGPASSWORD"] = unquote(parts.password)
    cmd = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", "postgres", "-c", sql]
    cmd += ["-h", parts.hostname or HOST, "-p", str(parts.port or 5432)]
    if parts.username:
        cmd += ["-U", unquote(parts.username)]
    done = run_bounded(cmd, 60, env=env)
    if done.returncode != 0:
        raise BenchError(f"psql {sql!r}: {done.stderr.decode(errors='replace').strip()}")


def pg_database(url: str) -> str:
    """The database name in a PostgreSQL URL (a plain identifier, checked)."""
    parts = urlsplit(url)
    if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise BenchError("--database-url: the benchmark only talks to a local PostgreSQL")
    name = parts.path.lstrip("/")
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
        raise BenchError("--database-url must name a scratch database, e.g. .../mailgate_bench")
    return name


# --------------------------------------------------------------------------- mailgate


def mailgate_config(setup: Setup, tmp: Path, database_url: str) -> Path:
    lines = [
        "[gateway]",
        'hostname = "bench.test"',
        f"data_dir = {json.dumps(str(tmp / 'var'))}",
        f"database_url = {json.dumps(database_url)}",
        "[listen]",
        'smtp = ""',
        "[[tenants]]",
        f'id = "{TENANT}"',
        'domains = ["bench.test"]',
    ]
    for i, user in enumerate(setup.users("mailgate")):
        lines += [
            "[[tenants.mailboxes]]",
            f'name = "box{i}"',
            f'host = "{HOST}"',
            f"port = {setup.dovecot.port}",
            'security = "none"',
            f'username = "{user}"',
            f'password_env = "{LOGIN_ENV}"',
            'folders = { "INBOX" = "INBOX" }',
            'after_fetch = "keep"',
            "idle = false",
            'poll_interval = "1h"',
        ]
    config = tmp / "mailgate.toml"
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return config


def peak_rss_kib(pid: int) -> int:
    """VmHWM (peak resident set size) of a live process, in KiB; 0 if it already exited."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def mailgate_cli(config: Path, env: dict[str, str], *args: str) -> list[dict[str, object]]:
    done = run_bounded([str(MAILGATE), "-c", str(config), *args, "--format", "json"], 120, env=env)
    if done.returncode != 0:
        raise BenchError(f"mailgate {args[0]}: {done.stderr.decode(errors='replace').strip()}")
    rows: list[dict[str, object]] = json.loads(done.stdout)
    return rows


@dataclass
class MailgateRun(Result):
    startup: float = 0.0  # spawn -> "pull.watching" logged
    rss_kib: int = 0
    status: int = -1
    pulled: int = 0  # sum of messages_pulled


def watch_log(
    log: Path, proc: subprocess.Popen[bytes], run: MailgateRun, expected: int, timeout: float
) -> None:
    """Follow the daemon's log until ``expected`` messages are stored; fills seconds and startup."""
    started = time.perf_counter()
    deadline = started + timeout
    stored = 0
    pending = b""
    with log.open("rb") as f:
        while True:
            chunk = f.read()
            now = time.perf_counter()
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()
            for line in lines:
                if b'"ingest.stored"' in line:
                    stored += 1
                elif b'"pull.watching"' in line and not run.startup:
                    run.startup = now - started
                elif b'"pull.failed"' in line:
                    raise BenchError(f"mailgate could not pull: {line.decode(errors='replace')}")
            if stored >= expected:
                run.seconds = now - started
                return
            if proc.poll() is not None:
                raise BenchError(f"mailgate exited {proc.returncode} after storing {stored} messages")
            if now > deadline:
                raise BenchError(f"mailgate stored {stored}/{expected} messages in {timeout:.0f}s")
            time.sleep(POLL)


def bench_mailgate(setup: Setup, tmp: Path, args: argparse.Namespace) -> MailgateRun:
    """Start mailgate, wait until it stored everything, stop it, count what it stored."""
    run = MailgateRun("mailgate")
    config = mailgate_config(setup, tmp, args.database_url)
    env = dict(os.environ, **{LOGIN_ENV: setup.password})
    log = tmp / "mailgate.log"
    log.touch()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(MAILGATE), "-c", str(config), "run"], cwd=tmp, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        try:
            watch_log(log, proc, run, setup.expected, args.timeout)
            run.cpu = procfs.tree_cpu_seconds(proc.pid)
            run.rss_kib = peak_rss_kib(proc.pid)
        except BenchError as exc:
            run.error = str(exc)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            run.status = proc.wait(60)
        except subprocess.TimeoutExpired:
            run.error = run.error or "mailgate did not exit within 60s of SIGTERM"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    if run.error or run.status != 0:
        sys.stderr.write(tail(log))
    try:
        run.stored = sum(
            int(str(f["messages"])) for f in mailgate_cli(config, env, "folders", "--tenant", TENANT)
        )
        run.pulled = sum(int(str(m["messages_pulled"])) for m in mailgate_cli(config, env, "mailboxes"))
    except BenchError as exc:
        run.error = run.error or str(exc)
    run.note = f"startup {run.startup:.1f}s, messages_pulled {run.pulled}"
    return run


# --------------------------------------------------------------------------- peers


def timed(result: Result, action: Callable[[], None]) -> None:
    """Run ``action`` and store its wall time and its child processes' CPU in ``result``."""
    cpu = children_cpu()
    started = time.perf_counter()
    try:
        action()
    except BenchError as exc:
        result.error = str(exc)
    result.seconds = time.perf_counter() - started
    result.cpu = children_cpu() - cpu


def check_exit(name: str, done: subprocess.CompletedProcess[bytes]) -> None:
    if done.returncode != 0:
        err = (done.stderr or done.stdout).decode(errors="replace").strip()[-1500:]
        raise BenchError(f"{name} exited {done.returncode}: {err}")


def bench_mbsync(setup: Setup, tmp: Path, args: argparse.Namespace) -> Result:
    result = Result("mbsync", note="sequential, one process, FSync yes")
    blocks = []
    for i, user in enumerate(setup.users("mbsync")):
        near = tmp / f"box{i}"
        near.mkdir()
        blocks.append(
            f"IMAPAccount a{i}\n"
            f"Host {HOST}\n"
            f"Port {setup.dovecot.port}\n"
            f"User {user}\n"
            f'Pass "{setup.password}"\n'
            "SSLType None\n"
            "AuthMechs LOGIN\n"
            "\n"
            f"IMAPStore far{i}\n"
            f"Account a{i}\n"
            "\n"
            f"MaildirStore near{i}\n"
            f"Path {near}/\n"
            f"Inbox {near}/INBOX\n"
            "\n"
            f"Channel box{i}\n"
            f"Far :far{i}:\n"
            f"Near :near{i}:\n"
            "Patterns INBOX\n"
            "Sync Pull\n"
            "Create Near\n"
            "SyncState *\n"
        )
    rc = tmp / "mbsyncrc"
    rc.write_text("\n".join(blocks))
    rc.chmod(0o600)
    cmd = ["mbsync", "-q", "-c", str(rc), "-a"]
    timed(result, lambda: check_exit("mbsync", run_bounded(cmd, args.timeout, cwd=tmp)))
    result.stored = sum(maildir_count(tmp / f"box{i}" / "INBOX") for i in range(setup.mailboxes))
    return result


@dataclass
class Getmail:
    """How to run getmail."""

    cmd: list[str]
    env: dict[str, str]
    label: str


def getmail_version(cmd: list[str], env: dict[str, str]) -> tuple[int, ...]:
    done = run_bounded([*cmd, "--version"], 60, env=env)
    found = re.search(rb"getmail (\d+)\.(\d+)\.(\d+)", done.stdout + done.stderr)
    if done.returncode != 0 or found is None:
        raise BenchError(
            f"{cmd[-1]} --version: {(done.stdout + done.stderr).decode(errors='replace')[-300:]}"
        )
    return tuple(int(n) for n in found.groups())


def find_getmail(target: Path, system: bool) -> Getmail:
    """The getmail on PATH if it is recent enough (or ``system``), else getmail6 from PyPI in ``target``."""
    env = dict(os.environ)
    if shutil.which("getmail"):
        version = getmail_version(["getmail"], env)
        label = "getmail " + ".".join(map(str, version))
        if system or version >= GETMAIL_FIXED:
            return Getmail(["getmail"], env, label)
        print(f"pull: {label} predates 6.19.09 (getmail6 issue #245): using {GETMAIL_PYPI} from PyPI instead")
    elif system:
        raise BenchError("getmail is not installed (package getmail6)")
    pip = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps"]
    done = run_bounded([*pip, "--target", str(target), GETMAIL_PYPI], 300)
    if done.returncode != 0:
        raise BenchError(f"pip install {GETMAIL_PYPI} failed: {done.stderr.decode(errors='replace')[-500:]}")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(target / "bin" / "getmail")]
    version = getmail_version(cmd, env)
    return Getmail(cmd, env, "getmail " + ".".join(map(str, version)) + " (PyPI)")


def bench_getmail(setup: Setup, tmp: Path, args: argparse.Namespace) -> Result:
    result = Result("getmail", note="sequential, one process")
    owner = None
    if os.geteuid() == 0:  # getmail refuses to deliver to a Maildir as root
        owner = pwd.getpwnam("nobody").pw_uid
        tmp.chmod(0o755)
        result.note += ", delivering as nobody"
    state = tmp / "getmail"
    state.mkdir()
    getmail: Getmail = args.getmail
    result.note = f"{getmail.label}, {result.note}"
    cmd = [*getmail.cmd, "--quiet", f"--getmaildir={state}"]
    for i, user in enumerate(setup.users("getmail")):
        box = make_maildir(tmp / f"box{i}", owner)
        rc = state / f"getmailrc{i}"
        rc.write_text(
            "[retriever]\n"
            "type = SimpleIMAPRetriever\n"
            f"server = {HOST}\n"
            f"port = {setup.dovecot.port}\n"
            f"username = {user}\n"
            f"password = {setup.password}\n"
            'mailboxes = ("INBOX",)\n'
            "\n"
            "[destination]\n"
            "type = Maildir\n"
            f"path = {box}/\n" + ("user = nobody\n" if owner is not None else "") + "\n"
            "[options]\n"
            "read_all = true\n"
            "delete = false\n"
            "verbose = 0\n"
        )
        rc.chmod(0o600)
        cmd.append(f"--rcfile={rc}")

    def go() -> None:
        done = run_bounded(cmd, args.timeout, cwd=tmp, env=getmail.env)
        if b"waiting child pid" in done.stdout + done.stderr:
            # A race between fork and installing the SIGCHLD handler (getmail6 < 6.19.09).
            done.stderr += b" (getmail lost a delivery child: getmail6 issue #245)"
        check_exit("getmail", done)

    timed(result, go)
    result.stored = sum(maildir_count(tmp / f"box{i}") for i in range(setup.mailboxes))
    return result


FETCHMAIL_MDA = """\
#!/bin/sh
# One message on stdin -> Maildir "$1" (written to tmp/, fsynced, moved to new/).
f=$(mktemp "$1/tmp/fm.XXXXXXXXXX") || exit 75
dd of="$f" bs=64k conv=fsync status=none || exit 75
exec mv "$f" "$1/new/"
"""


def bench_fetchmail(setup: Setup, tmp: Path, args: argparse.Namespace) -> Result:
    result = Result("fetchmail", note="sequential, one process, an MDA process per message")
    mda = tmp / "deliver.sh"
    mda.write_text(FETCHMAIL_MDA)
    mda.chmod(0o755)
    lines = [
        "set no syslog",
        "set no bouncemail",
        f"poll {HOST} service {setup.dovecot.port} protocol IMAP auth password",
    ]
    for i, user in enumerate(setup.users("fetchmail")):
        box = make_maildir(tmp / f"box{i}")
        lines.append(
            f'  user "{user}" with password "{setup.password}" sslproto \'\' keep fetchall mda "{mda} {box}"'
        )
    home = tmp / "home"
    home.mkdir(mode=0o700)
    rc = home / "fetchmailrc"
    rc.write_text("\n".join(lines) + "\n")
    rc.chmod(0o600)
    cmd = ["fetchmail", "--nodetach", "-f", str(rc), "--pidfile", str(home / "pid")]
    env = dict(os.environ, FETCHMAILHOME=str(home))
    # fetchmail exits 0 when it fetched mail (1: there was none).
    timed(result, lambda: check_exit("fetchmail", run_bounded(cmd, args.timeout, cwd=tmp, env=env)))
    result.stored = sum(maildir_count(tmp / f"box{i}") for i in range(setup.mailboxes))
    return result


BENCHES: dict[str, Callable[[Setup, Path, argparse.Namespace], Result]] = {
    "mailgate": bench_mailgate,
    "mbsync": bench_mbsync,
    "getmail": bench_getmail,
    "fetchmail": bench_fetchmail,
}


# --------------------------------------------------------------------------- main


def fill_dovecot(setup: Setup, tools: list[str], size: int) -> None:
    """Give every tool's users identical copies of the corpus."""
    for i in range(setup.mailboxes):
        messages = corpus.normal(setup.messages, size=size, seed=i)
        for tool in tools:
            user = setup.users(tool)[i]
            setup.dovecot.add_user(user, setup.password)
            setup.dovecot.deliver_files(user, "INBOX", messages)


def print_table(results: list[Result], expected: int) -> None:
    """One row per tool; the ratio is mailgate's rate divided by the tool's."""
    mg = next((r for r in results if r.tool == "mailgate" and not r.error), None)
    mg_rate = expected / mg.seconds if mg else 0.0
    columns: list[tuple[str, int]] = [("seconds", 9), ("msgs/s", 8), ("mailgate/tool", 15), ("CPU s", 7)]
    columns += [("CPU s/1000", 12), ("Dovecot CPU s", 15), ("stored", 13)]
    print(f"{'tool':<10}" + "".join(f"{h:>{w}}" for h, w in columns) + "  notes")
    for r in results:
        if r.error:
            cells: tuple[str, ...] = ("FAILED", "", "")
        else:
            rate = expected / r.seconds
            cells = (f"{r.seconds:.2f}", f"{rate:.0f}", f"{mg_rate / rate:.2f}" if mg else "-")
        cells += (f"{r.cpu:.1f}", f"{r.cpu / expected * 1000:.2f}", f"{r.upstream_cpu:.1f}")
        cells += (f"{r.stored}/{expected}",)
        row = "".join(f"{c:>{w}}" for c, (_, w) in zip(cells, columns, strict=True))
        print(f"{r.tool:<10}{row}  {r.note}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mailboxes", type=int, default=4, help="upstream mailboxes K (default 4)")
    p.add_argument("--messages", type=int, default=2000, help="messages per mailbox M (default 2000)")
    p.add_argument("--size", type=int, default=10_000, help="bytes per message (default 10000)")
    p.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated subset of {','.join(TOOLS)}")
    p.add_argument(
        "--database-url",
        default="",
        help="mailgate's database; default: embedded SQLite; or postgresql+asyncpg://...@127.0.0.1/SCRATCH_DB",
    )
    p.add_argument(
        "--system-getmail",
        action="store_true",
        help="use the getmail on PATH even when it predates 6.19.09 (default: then getmail6 from PyPI)",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="limit per tool, seconds (default 600)")
    args = p.parse_args()
    if args.mailboxes < 1 or args.messages < 1 or args.size < 200:
        p.error("--mailboxes and --messages must be positive, --size at least 200")
    pg = args.database_url.startswith("postgresql")
    if args.database_url and not pg:
        p.error("--database-url: only postgresql+asyncpg://... (SQLite is the default)")
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    if not tools or any(t not in TOOLS for t in tools):
        p.error(f"--tools: choose from {','.join(TOOLS)}")
    for path, hint in ((DOVECOT, "apt-get install dovecot-imapd"), (str(MAILGATE), "make .venv")):
        if ("mailgate" in tools or path == DOVECOT) and not os.access(path, os.X_OK):
            print(f"pull: {path} is missing ({hint})", file=sys.stderr)
            return 2
    missing = [t for t in tools if t in PACKAGES and t != "getmail" and shutil.which(t) is None]
    for tool in missing:
        print(f"pull: {tool} is not installed (package {PACKAGES[tool]}): skipping it", file=sys.stderr)
    tools = [t for t in tools if t not in missing]

    k, m = args.mailboxes, args.messages
    print(f"pull: {k} mailboxes x {m} messages x ~{args.size} bytes from one Dovecot on {HOST}")
    results: list[Result] = []
    try:
        dbname = pg_database(args.database_url) if pg else ""
        with tempfile.TemporaryDirectory(prefix="mailgate-bench-pull-") as workdir:
            work = Path(workdir)
            work.chmod(0o755)  # getmail's maildirs below it belong to nobody when run as root
            if "getmail" in tools:
                try:
                    args.getmail = find_getmail(work / "getmail6", args.system_getmail)
                except BenchError as exc:
                    print(f"pull: {exc}: skipping getmail", file=sys.stderr)
                    tools.remove("getmail")
                    missing.append("getmail")
            with Dovecot(DOVECOT) as dovecot:
                setup = Setup(dovecot, secrets.token_hex(12), k, m)
                fill_dovecot(setup, tools, args.size)
                for tool in tools:
                    tmp = work / tool
                    tmp.mkdir()
                    if tool == "mailgate" and pg:
                        psql(args.database_url, f"CREATE DATABASE {dbname}")
                    try:
                        upstream_cpu = group_cpu(dovecot.pid or 0)
                        results.append(BENCHES[tool](setup, tmp, args))
                        results[-1].upstream_cpu = group_cpu(dovecot.pid or 0) - upstream_cpu
                    finally:
                        if tool == "mailgate" and pg:
                            psql(args.database_url, f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")
    except (BenchError, RuntimeError) as exc:  # RuntimeError: Dovecot did not start
        print(f"pull: error: {exc}", file=sys.stderr)
        return 1

    expected = k * m
    print_table(results, expected)
    failed = False
    for r in results:
        if isinstance(r, MailgateRun):
            backend = "PostgreSQL" if pg else "SQLite"
            rss = f"{r.rss_kib / 1024:.0f} MiB (VmHWM)" if r.rss_kib else "unknown"
            print(f"mailgate ({backend}): peak RSS {rss}, exit status after SIGTERM {r.status}")
            if r.status != 0:
                print(f"pull: FAIL: mailgate exited {r.status}, not 0, after SIGTERM", file=sys.stderr)
                failed = True
            if r.pulled != expected and not r.error:
                print(f"pull: FAIL: mailgate messages_pulled {r.pulled}, not {expected}", file=sys.stderr)
                failed = True
        if r.error:
            print(f"pull: FAIL: {r.tool}: {r.error}", file=sys.stderr)
            failed = True
        elif r.stored != expected:
            print(f"pull: FAIL: {r.tool} stored {r.stored} messages, not {expected}", file=sys.stderr)
            failed = True
    if missing:
        print(f"pull: skipped (not installed): {', '.join(missing)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Relay benchmark: submission -> queue -> tenant's SMTP server, against the wire ceiling, in one run.

mailgate: a small asyncio client (aiosmtplib) submits N messages over C
parallel submission sessions (AUTH PLAIN as one agent, each session sending
many messages) to a freshly started ``mailgate run``; the relay worker takes
them from the queue and sends them to Postfix ``smtp-sink`` (the tenant's
``[tenants.smtp]``, ``security = "none"`` pinned, no AUTH). Measured from the
first connection until smtp-sink has received the N-th message (its ``-c``
counters, read live from its stdout), and, separately, until every
submission got its ``250`` (the acceptance rate).

Ceiling: ``smtp-source -d -s C -m N -l SIZE`` straight to smtp-sink (each
session keeps its connection), and, for reference, the same without ``-d``
(a new connection per message, as the relay worker does); best of 3 runs each.

Printed: the rates, the ratio end-to-end/ceiling, how long the sessions'
AUTH took (argon2) and the acceptance rate after it, mailgate's peak RSS
(VmHWM) and its RSS at the end, its CPU time (and the client's), the queue
backlog (accepted but not yet at the sink: its peak, and how fast the worker
drained what was left after the last ``250``) and how many SMTP sessions the
worker opened at the sink.

Exits non-zero when a submission is refused, the sink does not get all N
messages within ``--timeout``, the queue is not empty afterwards, or mailgate
does not exit 0 on SIGTERM. Everything stays on 127.0.0.1; every wait is
bounded.

    .venv/bin/python bench/relay.py [--messages 1000] [--connections 8] [--size 4096]
        [--concurrency 4[,16,...]] [--database-url postgresql+asyncpg://postgres@127.0.0.1:5432/mailgate_bench]

``--concurrency`` writes ``[queue] concurrency``; a comma-separated list runs
mailgate once per value (the ceiling is measured once). With a PostgreSQL URL
the named database is created for each run (it must not exist) and dropped
afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from urllib.parse import unquote, urlsplit

import aiosmtplib
from argon2 import PasswordHasher

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from bench.smtp_ingest import bench_bare  # noqa: E402 (after the path is set)
from tests import procfs  # noqa: E402

MAILGATE = ROOT / ".venv" / "bin" / "mailgate"
SMTP_SOURCE = "/usr/sbin/smtp-source"
SMTP_SINK = "/usr/sbin/smtp-sink"
HOST = "127.0.0.1"
AGENT = "agent@bench.test"  # the submitting agent, and the envelope sender (the tenant owns it)
RECIPIENT = "rcpt@remote.test"  # not a tenant's domain: relayed
PER_SESSION = 400  # messages per submission session before reconnecting (aiosmtpd allows 1000 MAILs)


class BenchError(Exception):
    """The benchmark could not run."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait until ``port`` accepts connections; fail if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{proc.args[0]} exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((HOST, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"nothing listens on {HOST}:{port} after {timeout:.0f}s")


def stop(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """SIGTERM ``proc`` and wait; SIGKILL it if it does not exit in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise BenchError(f"{proc.args[0]} did not exit within {timeout:.0f}s of SIGTERM") from None


def rss_kib(pid: int, field: str = "VmHWM") -> int:
    """VmHWM (peak resident set size) or VmRSS (now) of a live process, in KiB; 0 if it already exited."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0  # a zombie: mailgate died during the run, and its exit status says so


# --------------------------------------------------------------------------- smtp-sink


class Sink:
    """smtp-sink with ``-c``: its running counters, read live by a thread.

    smtp-sink rewrites ``sess=S quit=Q mesg=M`` (ending in ``\\r``) whenever a
    session ends, QUIT arrives or a final "." is received; ``mesg`` is the
    number of messages it got, ``sess`` the number of sessions that ended.
    """

    _COUNTERS = re.compile(rb"sess=(\d+) quit=(\d+) mesg=(\d+)")

    def __init__(self, target: int = 0) -> None:
        self.port = free_port()
        self.target = target  # when mesg reaches this, reached_at is set
        self.mesg = 0
        self.sess = 0
        self.reached_at: float | None = None  # time.perf_counter() when mesg >= target
        self.reached = threading.Event()
        cmd = [SMTP_SINK, "-c"]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]  # smtp-sink refuses to run as root without it
        cmd += [f"{HOST}:{self.port}", "256"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self._reader = threading.Thread(target=self._read, name="smtp-sink-counters", daemon=True)
        self._reader.start()
        try:
            wait_port(self.port, self.proc, 10.0)
        except BenchError:
            self.close()
            raise
        time.sleep(0.2)  # wait_port's probe counts as a session: leave it out
        self.base_sess = self.sess

    @property
    def sessions(self) -> int:
        """SMTP sessions that ended since the sink started listening."""
        return self.sess - self.base_sess

    def _read(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        tail = b""
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return
            tail = (tail + chunk)[-256:]
            found = self._COUNTERS.findall(tail)
            if not found:
                continue
            sess, _, mesg = found[-1]
            self.sess, self.mesg = int(sess), int(mesg)
            if self.target and self.reached_at is None and self.mesg >= self.target:
                self.reached_at = time.perf_counter()
                self.reached.set()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._reader.join(5)


def run_source(port: int, args: argparse.Namespace, keep_connection: bool) -> float:
    """Seconds smtp-source takes to send the messages to ``port`` (it must succeed)."""
    cmd = [SMTP_SOURCE]
    if keep_connection:
        cmd.append("-d")  # keep each session's connection for its next message
    cmd += ["-s", str(args.connections), "-m", str(args.messages), "-l", str(args.size)]
    cmd += ["-f", AGENT, "-t", RECIPIENT, f"{HOST}:{port}"]
    started = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, timeout=args.timeout, check=False)
    except subprocess.TimeoutExpired:
        raise BenchError(f"smtp-source did not finish within {args.timeout:.0f}s") from None
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip()
        raise BenchError(f"smtp-source to smtp-sink exited {done.returncode}: {err}")
    return seconds


def bench_ceiling(args: argparse.Namespace, keep_connection: bool) -> tuple[float, int]:
    """smtp-source straight to a fresh smtp-sink, best of 3: (seconds, sessions the sink saw).

    A run lasts a fraction of a second, so one run is mostly noise (process start, scheduling).
    """
    best: tuple[float, int] | None = None
    for _ in range(3):
        sink = Sink()
        try:
            seconds = run_source(sink.port, args, keep_connection)
            time.sleep(0.2)  # let the last counters line arrive
            if best is None or seconds < best[0]:
                best = (seconds, sink.sessions)
        finally:
            sink.close()
    assert best is not None
    return best


# --------------------------------------------------------------------------- submission client


def message(i: int, size: int, tag: str) -> bytes:
    """Message ``i``: a distinct Message-ID, a body of ``size`` bytes in 78-column lines."""
    head = (
        f"From: <{AGENT}>\r\n"
        f"To: <{RECIPIENT}>\r\n"
        f"Subject: relay bench {i}\r\n"
        f"Date: {formatdate(localtime=False)}\r\n"
        f"Message-ID: <{i}.{tag}@bench.test>\r\n"
        "\r\n"
    ).encode()
    line = b"x" * 78 + b"\r\n"
    body = line * (size // len(line)) + b"y" * (size % len(line))
    return head + body + (b"\r\n" if size % len(line) else b"")


@dataclass
class Submitted:
    """What the submission client saw."""

    acked: int = 0  # messages that got 250
    seconds: float = 0.0  # from the first connect until the last 250
    errors: list[str] = field(default_factory=list)
    backlog_peak: int = 0  # max(acked - sink's mesg), sampled every 20 ms
    backlog_last: int = 0  # acked - sink's mesg when the last 250 came
    auth_seconds: float = 0.0  # from the first connect until every session's first AUTH succeeded
    acked_at_auth: int = 0  # messages accepted by then


async def submit(
    port: int, password: str, args: argparse.Namespace, sink: Sink, mailgate: subprocess.Popen[bytes]
) -> Submitted:
    """Send the N messages over C submission sessions; each session sends its share in turn."""
    out = Submitted()
    tag = secrets.token_hex(4)
    shares = [range(k, args.messages, args.connections) for k in range(args.connections)]

    async def session(mine: range) -> None:
        todo = list(mine)
        first = True
        while todo:
            batch, todo = todo[:PER_SESSION], todo[PER_SESSION:]
            client = aiosmtplib.SMTP(
                hostname=HOST, port=port, start_tls=False, timeout=60, local_hostname="client.bench.test"
            )
            await client.connect()
            try:
                await client.ehlo()
                await client.auth_plain(AGENT, password)
                if first:
                    out.auth_seconds = max(out.auth_seconds, time.perf_counter() - started)
                    out.acked_at_auth = out.acked
                    first = False
                for i in batch:
                    try:
                        await client.sendmail(AGENT, [RECIPIENT], message(i, args.size, tag))
                    except aiosmtplib.SMTPException as exc:
                        out.errors.append(f"message {i}: {exc}")
                        return
                    out.acked += 1
            finally:
                if client.is_connected:
                    try:
                        await client.quit()
                    except (aiosmtplib.SMTPException, OSError):
                        client.close()

    async def sample() -> None:
        while True:
            out.backlog_peak = max(out.backlog_peak, out.acked - sink.mesg)
            await asyncio.sleep(0.02)

    started = time.perf_counter()
    sampler = asyncio.create_task(sample())
    results = await asyncio.gather(*(session(s) for s in shares), return_exceptions=True)
    out.seconds = time.perf_counter() - started
    out.backlog_last = out.acked - sink.mesg
    out.errors += [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]
    # Until the sink has everything: keep sampling the backlog.
    deadline = time.monotonic() + args.timeout
    while sink.reached_at is None and time.monotonic() < deadline:
        if out.errors and sink.mesg >= out.acked:
            break  # some were refused: the sink will never get N
        if sink.proc.poll() is not None or mailgate.poll() is not None:
            break
        await asyncio.sleep(0.02)
    sampler.cancel()
    return out


# --------------------------------------------------------------------------- PostgreSQL scratch database


def _psql(url: str, sql: str) -> None:
    parts = urlsplit(url)
    env = dict(os.environ)
    if parts.password:
        env["PGPASSWORD"] = unquote(parts.password)
    cmd = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", "postgres", "-c", sql]
    cmd += ["-h", parts.hostname or HOST, "-p", str(parts.port or 5432)]
    if parts.username:
        cmd += ["-U", unquote(parts.username)]
    done = subprocess.run(cmd, capture_output=True, env=env, timeout=60, check=False)
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


def write_config(
    tmp: Path, port: int, sink_port: int, database_url: str, concurrency: int, password_hash: str
) -> Path:
    config = tmp / "mailgate.toml"
    config.write_text(
        "[gateway]\n"
        'hostname = "bench.test"\n'
        f"data_dir = {json.dumps(str(tmp / 'var'))}\n"
        f"database_url = {json.dumps(database_url)}\n"
        "[listen]\n"
        'smtp = ""\n'
        f'submission = "{HOST}:{port}"\n'
        "[queue]\n"
        f"concurrency = {concurrency}\n"
        "[limits.outbound]\n"  # the hourly sending limits (300/agent by default) would stop the load
        "agent_messages_per_hour = 0\n"
        "agent_recipients_per_hour = 0\n"
        "tenant_messages_per_hour = 0\n"
        "tenant_recipients_per_hour = 0\n"
        "[[tenants]]\n"
        'id = "bench"\n'
        'domains = ["bench.test"]\n'
        "[tenants.smtp]\n"
        f'host = "{HOST}"\n'
        f"port = {sink_port}\n"
        'security = "none"\n'  # pinned: no STARTTLS attempt; no username: no AUTH
        f'from = "{AGENT}"\n'
        "[[tenants.agents]]\n"
        f'login = "{AGENT}"\n'
        f"password_hash = {json.dumps(password_hash)}\n",
        encoding="utf-8",
    )
    return config


def queue_left(config: Path, cwd: Path) -> int:
    """Messages still in mailgate's outbound queue (``mailgate queue list``)."""
    cmd = [str(MAILGATE), "-c", str(config), "queue", "list", "--format", "json"]
    done = subprocess.run(cmd, capture_output=True, cwd=cwd, timeout=120, check=False)
    if done.returncode != 0:
        raise BenchError(f"mailgate queue list: {done.stderr.decode(errors='replace').strip()}")
    return len(json.loads(done.stdout))


@dataclass
class RelayRun:
    """What one mailgate run measured."""

    concurrency: int
    submitted: Submitted = field(default_factory=Submitted)
    end_to_end: float = 0.0  # first connect until the sink had all N (0: it never did)
    delivered: int = 0  # messages the sink received
    sessions: int = 0  # SMTP sessions the relay worker opened at the sink
    queue_left: int = -1  # queued messages once the sink had all N (after up to 30 s)
    cpu: float = 0.0  # mailgate's CPU seconds, first connect until the sink had all N
    client_cpu: float = 0.0  # this process's CPU seconds meanwhile (the submission client)
    rss_start_kib: int = 0  # peak RSS (VmHWM) once listening, before the first submission
    rss_kib: int = 0  # peak RSS (VmHWM) just before SIGTERM
    rss_end_kib: int = 0  # RSS (VmRSS) just before SIGTERM
    status: int = -1  # exit status after SIGTERM


def bench_mailgate(
    args: argparse.Namespace, tmp: Path, concurrency: int, password: str, hashed: str
) -> RelayRun:
    """Start mailgate and a sink, submit the messages, wait for the sink to get them all."""
    run = RelayRun(concurrency)
    sink = Sink(target=args.messages)
    try:
        port = free_port()
        config = write_config(tmp, port, sink.port, args.database_url, concurrency, hashed)
        log = tmp / "mailgate.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [str(MAILGATE), "-c", str(config), "run"], cwd=tmp, stdout=out, stderr=subprocess.STDOUT
            )
        try:
            try:
                wait_port(port, proc, 60.0)
            except BenchError:
                sys.stderr.write(log.read_text(errors="replace")[-2000:])
                raise
            cpu_before = procfs.tree_cpu_seconds(proc.pid)
            run.rss_start_kib = rss_kib(proc.pid)
            client_before = os.times()
            started = time.perf_counter()
            run.submitted = asyncio.run(submit(port, password, args, sink, proc))
            if sink.reached_at is not None:
                run.end_to_end = sink.reached_at - started
                run.cpu = procfs.tree_cpu_seconds(proc.pid) - cpu_before
                client_after = os.times()
                run.client_cpu = (client_after.user - client_before.user) + (
                    client_after.system - client_before.system
                )
            time.sleep(0.2)  # the last counters line
            run.delivered, run.sessions = sink.mesg, sink.sessions
            deadline = time.monotonic() + 30.0
            while True:  # the worker commits each result right after the sink's 250
                run.queue_left = queue_left(config, tmp)
                if run.queue_left == 0 or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            run.rss_kib, run.rss_end_kib = rss_kib(proc.pid), rss_kib(proc.pid, "VmRSS")
            run.status = stop(proc, 60.0)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        if run.status != 0 or run.submitted.errors:
            sys.stderr.write(log.read_text(errors="replace")[-2000:])
    finally:
        sink.close()
    return run


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=1000, help="messages to relay (default 1000)")
    p.add_argument(
        "--connections",
        type=int,
        default=8,
        help="parallel submission sessions, and smtp-source -s (default 8; mailgate allows 50/IP)",
    )
    p.add_argument("--size", type=int, default=4096, help="body bytes per message, smtp-source -l (4096)")
    p.add_argument(
        "--concurrency",
        default="4",
        help="[queue] concurrency (mailgate default 4); comma-separated: one mailgate run per value",
    )
    p.add_argument(
        "--database-url",
        default="",
        help="default: embedded SQLite; or postgresql+asyncpg://postgres@127.0.0.1:5432/SCRATCH_DB",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="limit per run and per wait, seconds")
    args = p.parse_args()
    try:
        concurrencies = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        p.error("--concurrency: an integer, or integers separated by commas")
    if args.messages < 1 or args.connections < 1 or args.size < 1:
        p.error("--messages, --connections and --size must be positive")
    if not all(1 <= c <= 100 for c in concurrencies):
        p.error("--concurrency: 1 to 100 (mailgate's limit)")
    if args.connections > 50:
        p.error("--connections: at most 50 (mailgate admits 50 sessions per client address)")
    pg = args.database_url.startswith("postgresql")
    if args.database_url and not pg:
        p.error("--database-url: only postgresql+asyncpg://... (SQLite is the default)")
    for tool in (SMTP_SOURCE, SMTP_SINK, str(MAILGATE)):
        if not os.access(tool, os.X_OK):
            print(f"relay: {tool} is missing (apt-get install postfix; make .venv)", file=sys.stderr)
            return 2

    print(
        f"relay: {args.messages} messages x {args.size} bytes, {args.connections} submission sessions, "
        f"[queue] concurrency {args.concurrency}"
    )
    password = secrets.token_hex(12)
    hashed = PasswordHasher().hash(password)
    runs: list[RelayRun] = []
    try:
        dbname = pg_database(args.database_url) if pg else ""
        ceiling_s, ceiling_sess = bench_ceiling(args, keep_connection=True)
        fresh_s, fresh_sess = bench_ceiling(args, keep_connection=False)
        bare = bench_bare(args)  # issue #16's peer: aiosmtpd writing fsynced files, same messages
        for concurrency in concurrencies:
            with tempfile.TemporaryDirectory(prefix="mailgate-bench-") as tmpdir:
                if pg:
                    _psql(args.database_url, f"CREATE DATABASE {dbname}")
                try:
                    runs.append(bench_mailgate(args, Path(tmpdir), concurrency, password, hashed))
                finally:
                    if pg:
                        _psql(args.database_url, f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")
    except BenchError as exc:
        print(f"relay: error: {exc}", file=sys.stderr)
        return 1

    n = args.messages
    ceiling = n / ceiling_s
    backend = "PostgreSQL" if pg else "SQLite"
    print(f"{'path':<40}{'msgs/s':>9}{'seconds':>10}{'sessions':>10}")
    print(f"{'smtp-source -d -> smtp-sink (ceiling)':<40}{ceiling:>9.0f}{ceiling_s:>10.2f}{ceiling_sess:>10}")
    print(f"{'smtp-source -> smtp-sink (conn/msg)':<40}{n / fresh_s:>9.0f}{fresh_s:>10.2f}{fresh_sess:>10}")
    bare_rate = bare.acked / bare.seconds
    print(
        f"{'smtp-source -d -> bare aiosmtpd sink':<40}{bare_rate:>9.0f}"
        f"{bare.seconds:>10.2f}{args.connections:>10}"
    )
    print(
        f"  bare sink: CPU {1000 * bare.cpu / n:.2f} s per 1000 messages,"
        f" peak RSS {bare.rss_kib / 1024:.0f} MiB"
    )
    failed = False
    for run in runs:
        sub = run.submitted
        accept = sub.acked / sub.seconds if sub.seconds else 0.0
        e2e = n / run.end_to_end if run.end_to_end else 0.0
        label = f"mailgate c={run.concurrency}"
        print(f"{label + ' submission (250s)':<40}{accept:>9.0f}{sub.seconds:>10.2f}{args.connections:>10}")
        if sub.seconds > sub.auth_seconds > 0:
            after = (sub.acked - sub.acked_at_auth) / (sub.seconds - sub.auth_seconds)
            print(
                f"  AUTH of all sessions took {sub.auth_seconds:.2f} s; {after:.0f} msgs/s accepted after it"
            )
        e2e_s = f"{run.end_to_end:.2f}" if run.end_to_end else "never"
        print(f"{label + ' end to end (at sink)':<40}{e2e:>9.0f}{e2e_s:>10}{run.sessions:>10}")
        print(f"  ratio end-to-end/ceiling: {e2e / ceiling:.4f}; delivered {run.delivered}/{n}, {backend}")
        print(f"  ratio end-to-end/bare sink: {e2e / bare_rate:.3f} (issue #16 target >= 0.8)")
        if run.rss_kib:
            rss = (
                f"{run.rss_kib / 1024:.0f} MiB (once listening: {run.rss_start_kib / 1024:.0f} MiB;"
                f" VmRSS at the end: {run.rss_end_kib / 1024:.0f} MiB)"
            )
        else:
            rss = "unknown (mailgate died)"
        print(f"  peak RSS (VmHWM): {rss}")
        if run.end_to_end:
            share = 100 * run.cpu / run.end_to_end
            print(
                f"  CPU: {run.cpu:.1f} s ({share:.0f}% of one core,"
                f" {1000 * run.cpu / n:.2f} s per 1000 messages);"
                f" the submission client: {run.client_cpu:.1f} s"
            )
            drain = run.end_to_end - sub.seconds
            alone = f", {sub.backlog_last / drain:.0f} msgs/s with no submissions" if drain > 0.5 else ""
            print(f"  drain after the last 250: {sub.backlog_last} messages in {drain:.2f} s{alone}")
        print(f"  peak backlog (accepted, not yet at the sink): {sub.backlog_peak}")
        problems = []
        if sub.errors:
            problems.append(f"{len(sub.errors)} submission errors, first: {sub.errors[0]}")
        if not run.end_to_end:
            problems.append(f"the sink got {run.delivered}/{n}")
        if run.delivered > n:
            problems.append(f"the sink got {run.delivered} messages for {n}: duplicates")
        if run.queue_left != 0:
            problems.append(f"{run.queue_left} messages left in the queue")
        if run.status != 0:
            problems.append(f"mailgate exited {run.status}, not 0, after SIGTERM")
        for problem in problems:
            print(f"relay: FAIL: c={run.concurrency}: {problem}", file=sys.stderr)
        failed = failed or bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

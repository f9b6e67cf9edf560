"""SMTP ingest benchmark: mailgate relay-in against Postfix smtp-sink, in one run.

Postfix ``smtp-source`` sends the same N messages over C parallel sessions
(``-d``: each session keeps its connection) first to ``smtp-sink`` (accepts
and discards: the wire ceiling on this machine), then to the bare aiosmtpd
sink (bench/bare_sink.py: one fsynced file per message, 250 after the fsync:
the framework ceiling, issue #16's peer), then to a freshly started mailgate.
Printed: the rates, the ratios mailgate/smtp-sink and mailgate/bare sink
(issue #16 target >= 1.2), CPU per 1000 messages and peak RSS (VmHWM) of
mailgate and the bare sink, and how many messages mailgate really stored
(``mailgate folders``).

smtp-source gives every message a distinct Message-ID (pid.fd.counter), so
mailgate's dedupe (Message-ID + body hash) keeps them all.

Exits non-zero when smtp-source fails, mailgate stores fewer messages than it
acknowledged, or mailgate does not exit 0 on SIGTERM. Everything stays on
127.0.0.1; every wait is bounded.

    .venv/bin/python bench/smtp_ingest.py [--messages 2000] [--connections 8] [--size 4096]
        [--database-url postgresql+asyncpg://postgres@127.0.0.1:5432/mailgate_bench]

With a PostgreSQL URL the named database is created (it must not exist) and
dropped at the end.

With ``--rspamd`` a private rspamd (tests/rspamd.py: Debian's rspamd from a
temporary configuration on loopback ports, DNS answered at once by a loopback
stub, ``--rspamd-workers`` normal workers) is started, its hyperscan database
compiled and loaded and 50 scans made before the timing, and mailgate runs
twice, without and then with ``[spam] engine = "rspamd"``; both rows are
printed with the time spam filtering adds, rspamd's CPU per message and the
scan times it logged. A third run asks a stub in the bench's own process that
answers every scan at once ("+ stub"): mailgate's own cost of asking.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from tests import procfs  # noqa: E402 (after the path is set)

MAILGATE = ROOT / ".venv" / "bin" / "mailgate"
SMTP_SOURCE = "/usr/sbin/smtp-source"
SMTP_SINK = "/usr/sbin/smtp-sink"
BARE_SINK = Path(__file__).resolve().parent / "bare_sink.py"
HOST = "127.0.0.1"
SENDER = "sender@example.org"
RECIPIENT = "rcpt@bench.test"


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


def run_source(port: int, args: argparse.Namespace) -> tuple[float, int, str]:
    """Send the messages with smtp-source: (seconds, messages acknowledged, error or "").

    smtp-source exits 0 only when every message got a 2xx reply to its final
    ".", so then all were acknowledged. When it fails, its ``-c`` counter
    says how many final dots it *sent* (it counts before reading the reply),
    so up to one per session may be unanswered: the count returned is then
    the lower bound ``counter - sessions``.
    """
    cmd = [
        SMTP_SOURCE,
        "-c",  # print a running count of messages sent (the final "." written)
        "-d",  # keep each session's connection for its next message
        "-s",
        str(args.connections),
        "-m",
        str(args.messages),
        "-l",
        str(args.size),
        "-f",
        SENDER,
        "-t",
        RECIPIENT,
        f"{HOST}:{port}",
    ]
    started = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, timeout=args.timeout, check=False)
    except subprocess.TimeoutExpired:
        raise BenchError(f"smtp-source did not finish within {args.timeout:.0f}s") from None
    seconds = time.perf_counter() - started
    if done.returncode == 0:
        return seconds, args.messages, ""
    counters = re.findall(rb"\d+", done.stdout)
    sent = int(counters[-1]) if counters else 0
    err = done.stderr.decode(errors="replace").strip()
    error = f"smtp-source exited {done.returncode} after sending {sent} messages: {err}"
    return seconds, max(0, sent - args.connections), error


def bench_sink(args: argparse.Namespace) -> float:
    """Seconds smtp-sink takes to accept the messages."""
    port = free_port()
    cmd = [SMTP_SINK]
    if os.geteuid() == 0:
        cmd += ["-u", "nobody"]  # smtp-sink refuses to run as root without it
    cmd += [f"{HOST}:{port}", "256"]
    sink = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_port(port, sink, 10.0)
        seconds, _, error = run_source(port, args)
        if error:
            raise BenchError(f"against smtp-sink: {error}")
    finally:
        if sink.poll() is None:
            sink.kill()
        sink.wait(10)
    return seconds


def measure(
    run: MailgateRun, proc: subprocess.Popen[bytes], port: int, args: argparse.Namespace, grace: float
) -> None:
    """smtp-source against the server ``proc`` listening on ``port``: its time, CPU and peak RSS,
    then its exit status after SIGTERM (``grace`` seconds at most)."""
    cpu_before = procfs.tree_cpu_seconds(proc.pid)
    run.seconds, run.acked, run.error = run_source(port, args)
    run.cpu = procfs.tree_cpu_seconds(proc.pid) - cpu_before
    run.rss_kib = peak_rss_kib(proc.pid)
    run.status = stop(proc, grace)


def bench_bare(args: argparse.Namespace) -> MailgateRun:
    """The same smtp-source run against the bare aiosmtpd sink (bench/bare_sink.py)."""
    run = MailgateRun()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="mailgate-bench-bare-") as tmpdir:
        cmd = [sys.executable, str(BARE_SINK), "--port", str(port), "--dir", tmpdir]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_port(port, proc, 30.0)
            measure(run, proc, port, args, 30.0)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
        run.stored = len(list(Path(tmpdir).iterdir()))
    if run.error:
        raise BenchError(f"against the bare sink: {run.error}")
    return run


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


def write_config(tmp: Path, port: int, database_url: str, spam_url: str = "") -> Path:
    config = tmp / "mailgate.toml"
    spam = f'[spam]\nengine = "rspamd"\nurl = "{spam_url}"\non_error = "tempfail"\n' if spam_url else ""
    config.write_text(
        spam + "[gateway]\n"
        'hostname = "bench.test"\n'
        f"data_dir = {json.dumps(str(tmp / 'var'))}\n"
        f"database_url = {json.dumps(database_url)}\n"
        "[listen]\n"
        f'smtp = "{HOST}:{port}"\n'
        "[[tenants]]\n"
        'id = "bench"\n'
        'domains = ["bench.test"]\n',
        encoding="utf-8",
    )
    return config


def peak_rss_kib(pid: int) -> int:
    """VmHWM (peak resident set size) of a live process, in KiB; 0 if it already exited."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0  # a zombie: mailgate died during the run, and its exit status says so


def stored_messages(config: Path, cwd: Path) -> int:
    cmd = [str(MAILGATE), "-c", str(config), "folders", "--tenant", "bench", "--format", "json"]
    done = subprocess.run(cmd, capture_output=True, cwd=cwd, timeout=120, check=False)
    if done.returncode != 0:
        raise BenchError(f"mailgate folders: {done.stderr.decode(errors='replace').strip()}")
    return sum(int(f["messages"]) for f in json.loads(done.stdout))


@dataclass
class MailgateRun:
    """What one mailgate run measured."""

    seconds: float = 0.0  # smtp-source's wall time
    acked: int = 0  # messages smtp-source saw a 250 for (a lower bound if it failed)
    cpu: float = 0.0  # CPU seconds mailgate used while smtp-source ran
    rss_kib: int = 0  # peak RSS (VmHWM) just before SIGTERM
    status: int = -1  # exit status after SIGTERM
    stored: int = 0  # messages in the tenant's folders afterwards
    error: str = ""  # smtp-source's complaint, if it failed


def bench_mailgate(args: argparse.Namespace, tmp: Path, spam_url: str = "") -> MailgateRun:
    """Start mailgate in ``tmp``, send the messages, stop it, count what it stored."""
    run = MailgateRun()
    port = free_port()
    config = write_config(tmp, port, args.database_url, spam_url)
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
        measure(run, proc, port, args, 60.0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    if run.status != 0:
        sys.stderr.write(log.read_text(errors="replace")[-2000:])
    run.stored = stored_messages(config, tmp)
    return run


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=2000, help="messages to send (default 2000)")
    p.add_argument(
        "--connections", type=int, default=8, help="parallel SMTP sessions (default 8; mailgate allows 50/IP)"
    )
    p.add_argument("--size", type=int, default=4096, help="body bytes per message, smtp-source -l (4096)")
    p.add_argument(
        "--database-url",
        default="",
        help="default: embedded SQLite; or postgresql+asyncpg://postgres@127.0.0.1:5432/SCRATCH_DB",
    )
    p.add_argument("--timeout", type=float, default=900.0, help="limit per smtp-source run, seconds")
    p.add_argument(
        "--rspamd", action="store_true", help="run mailgate again with a private rspamd as its filter"
    )
    p.add_argument(
        "--rspamd-workers", type=int, default=1, help="rspamd's normal workers with --rspamd (default 1)"
    )
    args = p.parse_args()
    if args.messages < 1 or args.connections < 1 or args.size < 1:
        p.error("--messages, --connections and --size must be positive")
    pg = args.database_url.startswith("postgresql")
    if args.database_url and not pg:
        p.error("--database-url: only postgresql+asyncpg://... (SQLite is the default)")
    for tool in (SMTP_SOURCE, SMTP_SINK, str(MAILGATE)):
        if not os.access(tool, os.X_OK):
            print(f"smtp_ingest: {tool} is missing (apt-get install postfix; make .venv)", file=sys.stderr)
            return 2

    print(f"smtp_ingest: {args.messages} messages x {args.size} bytes over {args.connections} connections")
    try:
        dbname = pg_database(args.database_url) if pg else ""
        sink_s = bench_sink(args)
        bare = bench_bare(args)
        runs = {"mailgate": run_once(args, pg, dbname, "")}
        if args.rspamd:
            runs["+ rspamd"] = bench_rspamd(args, pg, dbname)
            with StubRspamd() as stub:
                runs["+ stub"] = run_once(args, pg, dbname, stub.url)
    except (BenchError, RuntimeError) as exc:
        print(f"smtp_ingest: error: {exc}", file=sys.stderr)
        return 1

    sink_rate = args.messages / sink_s
    backend = "PostgreSQL" if pg else "SQLite"
    print(f"{'peer':<12}{'msgs/s':>9}{'seconds':>10}")
    print(f"{'smtp-sink':<12}{sink_rate:>9.0f}{sink_s:>10.2f}")
    print(f"{'bare sink':<12}{bare.acked / bare.seconds:>9.0f}{bare.seconds:>10.2f}   (files: {bare.stored})")
    for name, run in runs.items():
        mg_rate = run.acked / run.seconds  # acked == N unless it failed
        stored = f"(stored: {run.stored}/{run.acked}, {backend})"
        print(f"{name:<12}{mg_rate:>9.0f}{run.seconds:>10.2f}   {stored}")
    run = runs["mailgate"]
    print(f"ratio mailgate/smtp-sink: {run.acked / run.seconds / sink_rate:.3f}")
    bare_rate = bare.acked / bare.seconds
    print(f"ratio mailgate/bare sink: {run.acked / run.seconds / bare_rate:.3f} (issue #16 target >= 1.2)")
    if "+ rspamd" in runs:
        spam, stub = runs["+ rspamd"], runs["+ stub"]
        print(f"spam filtering adds: {100 * (spam.seconds / run.seconds - 1):+.0f}% to mailgate's time")
        print(f"asking a stub that answers at once adds: {100 * (stub.seconds / run.seconds - 1):+.0f}%")
    rss = f"{run.rss_kib / 1024:.0f} MiB (VmHWM)" if run.rss_kib else "unknown (mailgate died during the run)"
    print(f"mailgate peak RSS: {rss}")
    print(f"mailgate CPU while sending: {run.cpu:.1f} s ({100 * run.cpu / run.seconds:.0f}% of one core)")
    for name, r in (
        ("mailgate", run),
        *((n, r) for n, r in runs.items() if n != "mailgate"),
        ("bare sink", bare),
    ):
        per_k = 1000 * r.cpu / r.acked if r.acked else 0.0
        print(f"{name}: CPU {per_k:.2f} s per 1000 messages, peak RSS {r.rss_kib / 1024:.0f} MiB")
    return 1 if any(failed_run(r) for r in runs.values()) else 0


def bench_rspamd(args: argparse.Namespace, pg: bool, dbname: str) -> MailgateRun:
    """mailgate with a private rspamd as its filter, started, compiled and warmed before the timing.

    rspamd is Debian's with its own rules (tests/rspamd.py: loopback ports, DNS answered at once
    by a loopback stub, as a local caching resolver would) and ``--rspamd-workers`` normal workers.
    Timing starts once its hyperscan database is loaded and ``WARM_SCANS`` scans are done; its CPU
    and the scan times it logged during the run are printed.
    """
    from tests.rspamd import Rspamd

    with tempfile.TemporaryDirectory(prefix="mailgate-bench-rspamd-", dir="/tmp") as root:
        Path(root).chmod(0o755)
        rspamd = Rspamd(Path(root), learning=False, workers=args.rspamd_workers, log_level="info")
        try:
            rspamd.start()
            regexps = rspamd.wait_hyperscan()
            warm_rspamd(rspamd.url, args.size)
            scanned = len(SCAN_TIME.findall(rspamd.log()))
            print(
                f"rspamd: {args.rspamd_workers} worker(s), hyperscan database of {regexps} regexps"
                f" loaded, warmed with {WARM_SCANS} scans before timing"
            )
            cpu_before = procfs.tree_cpu_seconds(rspamd.pid)
            run = run_once(args, pg, dbname, rspamd.url)
            cpu = procfs.tree_cpu_seconds(rspamd.pid) - cpu_before
            times = sorted(float(t) for t in SCAN_TIME.findall(rspamd.log())[scanned:])
        finally:
            rspamd.close()
    if times and run.acked:
        print(
            f"rspamd during the run: CPU {1000 * cpu / run.acked:.2f} ms per message, {len(times)} scans,"
            f" scan time median {times[len(times) // 2]:.1f} ms, 90th percentile"
            f" {times[len(times) * 9 // 10]:.1f} ms (its log)"
        )
    return run


class StubRspamd:
    """A loopback HTTP server (a thread of the bench) that answers every ``/checkv2`` at once with
    a fixed "no action" verdict, closing the connection as rspamd does: mailgate's own cost of
    asking, without rspamd's."""

    ANSWER = json.dumps(
        {
            "action": "no action",
            "score": 3.4,
            "required_score": 15.0,
            "symbols": {s: {"name": s, "score": 0.0} for s in ("R_SPF_NA", "R_DKIM_NA", "DMARC_NA")},
            "messages": {},
        }
    ).encode()

    def __init__(self) -> None:
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="stub-rspamd", daemon=True)

    def __enter__(self) -> StubRspamd:
        self._thread.start()
        server = asyncio.run_coroutine_threadsafe(asyncio.start_server(self._answer, HOST, 0), self._loop)
        self._server = server.result(10)
        self.url = f"http://{HOST}:{self._server.sockets[0].getsockname()[1]}"
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            await reader.readexactly(int(length.group(1)) if length else 0)
            writer.write(
                b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(self.ANSWER), self.ANSWER)
            )
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()


WARM_SCANS = 50
SCAN_TIME = re.compile(r"rspamd_task_write_log: .*, time: ([\d.]+)ms")


def warm_rspamd(url: str, size: int) -> None:
    """``WARM_SCANS`` scans of a message shaped like smtp-source's, one at a time."""
    body = b"".join(b"%dX\r\n" % i for i in range(size // 80 + 1))
    for i in range(WARM_SCANS):
        message = b"From: <%s>\r\nTo: <%s>\r\nMessage-Id: <warm.%d@bench>\r\n\r\n" % (
            SENDER.encode(),
            RECIPIENT.encode(),
            i,
        )
        request = urllib.request.Request(f"{url}/checkv2", data=message + body, method="POST")  # noqa: S310
        with urllib.request.urlopen(request, timeout=30) as reply:  # noqa: S310 (loopback only)
            reply.read()


def run_once(args: argparse.Namespace, pg: bool, dbname: str, spam_url: str) -> MailgateRun:
    """One mailgate run in a fresh data directory (and scratch PostgreSQL database)."""
    with tempfile.TemporaryDirectory(prefix="mailgate-bench-") as tmpdir:
        if pg:
            _psql(args.database_url, f"CREATE DATABASE {dbname}")
        try:
            return bench_mailgate(args, Path(tmpdir), spam_url)
        finally:
            if pg:
                _psql(args.database_url, f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")


def failed_run(run: MailgateRun) -> bool:
    """Report what went wrong in ``run``; True if anything did."""
    failed = False
    if run.error:
        print(f"smtp_ingest: FAIL: against mailgate: {run.error}", file=sys.stderr)
        failed = True
    if run.stored < run.acked:
        print(
            f"smtp_ingest: FAIL: mailgate acknowledged {run.acked} but stored {run.stored}", file=sys.stderr
        )
        failed = True
    if run.status != 0:
        print(f"smtp_ingest: FAIL: mailgate exited {run.status}, not 0, after SIGTERM", file=sys.stderr)
        failed = True
    return failed


if __name__ == "__main__":
    sys.exit(main())

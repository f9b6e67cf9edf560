"""IMAP mixed-command stress: N logged-in clients looping a mail client's commands, mailgate vs Dovecot.

Both servers hold the same ``--messages`` in INBOX, set up as bench/imap.py
does (Dovecot: maildir files, the same argon2id hash; mailgate: ``migrate``,
``Pipeline.deliver_many`` in-process, then one ``mailgate run`` subprocess for
the whole bench). Each client gets a folder of its own (``Stress<i>``, created
before any timed phase), so INBOX is shared and EXPUNGE only touches the
client's own folder.

A phase: ``n`` clients (threads, each with bench/imap.py's raw client, one
command at a time) log in, untimed, then for ``--seconds`` each loops

1. ``SELECT INBOX``
2. ``UID FETCH a:b (FLAGS)``, a random run of 20 UIDs
3. ``UID FETCH u (BODY.PEEK[])``, a random message
4. ``UID STORE u +FLAGS (\\Seen)`` or ``-FLAGS``, a random message, either at random
5. ``APPEND "Stress<i>" (\\Seen) {n}`` of a fresh ~4 KB message (synchronising literal)
6. ``SELECT "Stress<i>"``, 7. ``UID STORE <its APPENDUID> +FLAGS (\\Deleted)``, 8. ``EXPUNGE``
9. ``LIST "" "*"``, 10. ``STATUS INBOX (MESSAGES UNSEEN UIDNEXT)``, 11. ``NOOP``

and times every command alone. Clients use seeded random generators, so both
servers get the same script. Phases run for each ``--clients`` count, against
both servers, who goes first alternating. A client stops at the first command
after the phase's end (an interrupted loop is finished untimed afterwards) or
after ``--max-ops`` commands; the phase's time runs until the last client
stopped.

Printed per client count: per command ops/s and p50/p99 latency (ms) on each
server, the total, the ratio mailgate/Dovecot of the totals (< 1: mailgate
does fewer), the server's CPU seconds (mailgate: the daemon; Dovecot: its
process group) and the bench process' own (the clients: with Python threads
on a small machine it can be the bound, mostly for Dovecot). Then whether
mailgate's total at the largest count is at least its total at the smallest.

Checks: every FETCH answers its messages (other sessions' flag changes may
add some), each body is one of the corpus' sizes, every APPEND answers an
APPENDUID, INBOX still holds ``--messages`` and every ``Stress<i>`` is empty at
the end, mailgate exits 0 on SIGTERM. A failing command is reported with the
server, client and command; the bench then exits 1. Only 127.0.0.1 is used;
every wait is bounded (``--timeout`` per command, the phase, ``--max-ops``).

    .venv/bin/python bench/imap_stress.py [--messages 2000] [--seconds 20] [--clients 10,50]

The corpus, the servers, the raw client and the /proc readers are bench/imap.py's.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.imap import (  # noqa: E402
    DOVECOT_USER,
    HASHED,
    LOGIN,
    PASSWORD,
    BenchDovecot,
    BenchError,
    Client,
    Mailgate,
    Reply,
    Server,
    connect,
    dovecot_cpu,
    free_port,
    load_mailgate,
    make_corpus,
    open_many,
    raise_nofile,
    write_mailgate_config,
)
from tests import corpus, procfs  # noqa: E402

COMMANDS = (
    "SELECT INBOX",
    "UID FETCH (FLAGS)",
    "UID FETCH (BODY.PEEK[])",
    "UID STORE +/-\\Seen",
    "APPEND",
    "SELECT own folder",
    "UID STORE +\\Deleted",
    "EXPUNGE",
    'LIST "" "*"',
    "STATUS INBOX",
    "NOOP",
)
FLAGS_RUN = 20  # UIDs per FLAGS fetch
APPEND_POOL = 256  # distinct ~4 KB bodies; each APPEND gets its own Message-ID
APPEND_SEED = 3


def folder_of(i: int) -> str:
    return f"Stress{i}"


@dataclass
class Phase:
    """What one server did with ``clients`` clients."""

    clients: int
    seconds: float = 0.0
    server_cpu: float = 0.0
    client_cpu: float = 0.0
    load: float = 0.0  # 1-minute load average at the end
    latencies: dict[str, list[float]] = field(default_factory=lambda: {c: [] for c in COMMANDS})

    @property
    def ops(self) -> int:
        return sum(len(v) for v in self.latencies.values())


class PhaseOver(Exception):
    """The client's time or command budget is spent."""


@dataclass
class Worker:
    """One client of one phase: its session, its script's generator, what it measured."""

    index: int
    client: Client
    rng: random.Random
    max_ops: int
    stop_at: float = math.inf
    timed: bool = True  # False: commands are neither bounded by the phase nor recorded
    latencies: dict[str, list[float]] = field(default_factory=lambda: {c: [] for c in COMMANDS})
    pending: int = 0  # UID appended to the own folder and not yet expunged
    current: str = ""  # the command being sent (for an error report)
    error: str = ""

    def send(self, label: str, text: str, literal: bytes | None = None) -> Reply:
        if self.timed and (time.monotonic() >= self.stop_at or len(self) >= self.max_ops):
            raise PhaseOver
        self.current = text
        started = time.perf_counter()
        reply = self.client.command(text, literal=literal)
        if self.timed:
            self.latencies[label].append(time.perf_counter() - started)
        return reply

    def __len__(self) -> int:
        return sum(len(v) for v in self.latencies.values())


class Script:
    """The loop every client runs, and the checks on its answers."""

    def __init__(self, messages: int, sizes: set[int]) -> None:
        self.messages = messages
        self.sizes = sizes
        self.pool = corpus.normal(APPEND_POOL, size=4000, seed=APPEND_SEED)
        self.serial = 0
        self.serial_lock = threading.Lock()

    def fresh_message(self, rng: random.Random) -> bytes:
        """A pool body with a Message-ID no other APPEND of the run has."""
        k = rng.randrange(APPEND_POOL)
        with self.serial_lock:
            self.serial += 1
            serial = self.serial
        return self.pool[k].replace(
            b"<corpus.%d.%d@example.org>" % (APPEND_SEED, k), b"<stress.%d@bench.test>" % serial
        )

    def loop(self, w: Worker) -> None:
        """Until the phase is over for ``w``."""
        n = self.messages
        try:
            while True:
                w.send("SELECT INBOX", "SELECT INBOX")
                a = w.rng.randint(1, n - FLAGS_RUN + 1)
                reply = w.send("UID FETCH (FLAGS)", f"UID FETCH {a}:{a + FLAGS_RUN - 1} (FLAGS)")
                if reply.fetches < FLAGS_RUN:  # other sessions' flag changes may come with it
                    raise BenchError(f"{w.current!r}: {reply.fetches} FETCH responses")
                reply = w.send("UID FETCH (BODY.PEEK[])", f"UID FETCH {w.rng.randint(1, n)} (BODY.PEEK[])")
                if reply.literal_bytes not in self.sizes:
                    raise BenchError(f"{w.current!r}: a body of {reply.literal_bytes} bytes")
                sign = w.rng.choice("+-")
                w.send("UID STORE +/-\\Seen", f"UID STORE {w.rng.randint(1, n)} {sign}FLAGS (\\Seen)")
                message = self.fresh_message(w.rng)
                folder = folder_of(w.index)
                reply = w.send("APPEND", f'APPEND "{folder}" (\\Seen) {{{len(message)}}}', message)
                m = re.search(rb"\[APPENDUID \d+ (\d+)\]", reply.status)
                if m is None:
                    raise BenchError(f"APPEND: no APPENDUID in {reply.status[:200]!r}")
                w.pending = int(m.group(1))
                self.expunge_own(w)
                w.send('LIST "" "*"', 'LIST "" "*"')
                w.send("STATUS INBOX", "STATUS INBOX (MESSAGES UNSEEN UIDNEXT)")
                w.send("NOOP", "NOOP")
        except PhaseOver:
            return

    @staticmethod
    def expunge_own(w: Worker) -> None:
        """Steps 6-8 (after the phase, untimed: the end of an interrupted loop)."""
        if w.pending:
            w.send("SELECT own folder", f'SELECT "{folder_of(w.index)}"')
            w.send("UID STORE +\\Deleted", f"UID STORE {w.pending} +FLAGS (\\Deleted)")
            w.send("EXPUNGE", "EXPUNGE")
            w.pending = 0


# --------------------------------------------------------------------------- phases


def log_in(server: Server, n: int, args: argparse.Namespace) -> list[Client]:
    """``n`` logged-in sessions (argon2 on both servers: 8 logins at a time)."""
    return open_many(
        lambda _: connect(server, args), n, 8, args.timeout, f"{server.name}: logging in {n} clients"
    )


def run_phase(server: Server, n: int, script: Script, args: argparse.Namespace) -> tuple[Phase, list[str]]:
    """``n`` clients loop for ``--seconds``; (what was measured, the clients' errors)."""
    workers = [
        Worker(i + 1, c, random.Random(1000 * n + i), args.max_ops)
        for i, c in enumerate(log_in(server, n, args))
    ]
    start, stop = threading.Barrier(n + 1, timeout=args.timeout), threading.Barrier(n + 1)

    def client(w: Worker) -> None:
        try:
            start.wait()
            w.stop_at = time.monotonic() + args.seconds
            script.loop(w)
        except Exception as exc:  # noqa: BLE001 (reported by the phase)
            w.error = f"{w.current!r}: {type(exc).__name__}: {exc}"
        finally:
            with contextlib.suppress(threading.BrokenBarrierError):
                stop.wait(args.seconds + 2 * args.timeout)
        w.timed = False
        if not w.error:
            try:
                script.expunge_own(w)
            except Exception as exc:  # noqa: BLE001 (reported by the phase)
                w.error = f"{w.current!r} (after the phase): {type(exc).__name__}: {exc}"

    threads = [threading.Thread(target=client, args=(w,), daemon=True) for w in workers]
    phase = Phase(n)
    try:
        for t in threads:
            t.start()
        cpu0, client0 = server.cpu(), time.process_time()
        start.wait()
        started = time.perf_counter()
        with contextlib.suppress(threading.BrokenBarrierError):  # a client stuck: reported below
            stop.wait(args.seconds + 2 * args.timeout)
        phase.seconds = time.perf_counter() - started
        phase.server_cpu = server.cpu() - cpu0
        phase.client_cpu = time.process_time() - client0
        phase.load = os.getloadavg()[0]
        for t in threads:
            t.join(2 * args.timeout)
    except threading.BrokenBarrierError:
        raise BenchError(f"{server.name}: {n} clients did not all start") from None
    finally:
        start.abort()  # (after they passed: no effect) let no client wait for the others
        stop.abort()
        for w in workers:
            w.client.close()  # also ends a thread still waiting for its server
    errors = [f"{server.name}, {n} clients, client {w.index}: {w.error}" for w in workers if w.error]
    errors += [f"{server.name}, {n} clients: a client thread did not end" for t in threads if t.is_alive()]
    for w in workers:
        for label, values in w.latencies.items():
            phase.latencies[label] += values
    return phase, errors


def prepare(server: Server, args: argparse.Namespace, folders: int) -> None:
    """Untimed: INBOX holds UIDs 1..N; every client's folder exists; the FLAGS of all read once."""
    c = connect(server, args)
    try:
        reply = c.command("SELECT INBOX", collect=True)
        text = b"\n".join(reply.untagged)
        found = [re.search(pattern, text) for pattern in (rb"\* (\d+) EXISTS", rb"\[UIDNEXT (\d+)\]")]
        if [m and int(m[1]) for m in found] != [args.messages, args.messages + 1]:
            raise BenchError(f"{server.name}: INBOX is not UIDs 1..{args.messages}: {text[:300]!r}")
        reply = c.command("UID FETCH 1:* (FLAGS)")
        if reply.fetches != args.messages:
            raise BenchError(f"{server.name}: FETCH 1:* gave {reply.fetches} of {args.messages}")
        for i in range(1, folders + 1):
            c.command(f'CREATE "{folder_of(i)}"')
    finally:
        c.close()


def verify(server: Server, args: argparse.Namespace, folders: int) -> list[str]:
    """After the phases: INBOX holds N, every client's folder is empty."""
    problems = []
    c = connect(server, args)
    try:
        for name, want in [("INBOX", args.messages), *((folder_of(i), 0) for i in range(1, folders + 1))]:
            reply = c.command(f'STATUS "{name}" (MESSAGES)', collect=True)
            m = re.search(rb"MESSAGES (\d+)", b" ".join(reply.untagged))
            if m is None or int(m[1]) != want:
                problems.append(f"{server.name}: {name} holds {m and int(m[1])} messages, not {want}")
    finally:
        c.close()
    return problems


# --------------------------------------------------------------------------- report


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (0 for none)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def print_phase(n: int, d: Phase, m: Phase) -> None:
    print(
        f"\n{n} clients, {d.seconds:.1f} s Dovecot / {m.seconds:.1f} s mailgate; latencies in ms"
        f"\n{'command':<26}{'dovecot ops/s':>14}{'p50':>8}{'p99':>8}"
        f"{'mailgate ops/s':>16}{'p50':>8}{'p99':>8}"
    )
    rows = [(label, d.latencies[label], m.latencies[label]) for label in COMMANDS]
    rows.append(
        ("total", [x for v in d.latencies.values() for x in v], [x for v in m.latencies.values() for x in v])
    )
    for label, dl, ml in rows:
        drate, mrate = len(dl) / d.seconds, len(ml) / m.seconds
        print(
            f"{label:<26}{drate:>14.1f}{percentile(dl, 50) * 1e3:>8.2f}{percentile(dl, 99) * 1e3:>8.2f}"
            f"{mrate:>16.1f}{percentile(ml, 50) * 1e3:>8.2f}{percentile(ml, 99) * 1e3:>8.2f}"
        )
    print(
        f"server CPU s: Dovecot {d.server_cpu:.1f}, mailgate {m.server_cpu:.1f}; bench (clients) CPU s: "
        f"with Dovecot {d.client_cpu:.1f}, with mailgate {m.client_cpu:.1f}; "
        f"load average (1 min) at the end: {d.load:.1f} / {m.load:.1f}"
    )


def print_summary(counts: list[int], results: dict[str, dict[int, Phase]]) -> None:
    def total(name: str, n: int) -> float:
        phase = results[name][n]
        return phase.ops / phase.seconds

    print()
    for n in counts:
        ratio = total("mailgate", n) / total("dovecot", n)
        print(
            f"{n} clients: total ops/s Dovecot {total('dovecot', n):.0f}, "
            f"mailgate {total('mailgate', n):.0f}, "
            f"mailgate/Dovecot {ratio:.2f} ({'>=' if ratio >= 0.33 else '<'} 0.33)"
        )
    lo, hi = min(counts), max(counts)
    if lo != hi:
        kept = total("mailgate", hi) >= total("mailgate", lo)
        print(
            f"mailgate total at {hi} clients {'>=' if kept else '<'} at {lo}: "
            f"{total('mailgate', hi):.0f} vs {total('mailgate', lo):.0f} ops/s "
            f"(Dovecot: {total('dovecot', hi):.0f} vs {total('dovecot', lo):.0f})"
        )


# --------------------------------------------------------------------------- main


def uptime() -> str:
    done = subprocess.run(["uptime"], capture_output=True, timeout=10, check=False)
    return done.stdout.decode(errors="replace").strip()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=2000, help="messages in INBOX (2000)")
    p.add_argument("--size", type=int, default=6000, help="bytes per corpus message (6000)")
    p.add_argument(
        "--multipart-every", type=int, default=10, help="every k-th message multipart/mixed (10; 0: none)"
    )
    p.add_argument("--clients", default="10,50", help="client counts, one phase each (10,50)")
    p.add_argument("--seconds", type=float, default=20.0, help="duration of a phase per server (20)")
    p.add_argument("--max-ops", type=int, default=200_000, help="commands per client and phase at most")
    p.add_argument(
        "--dovecot-fsync", choices=("optimized", "always", "never"), default="optimized", help="(optimized)"
    )
    p.add_argument("--timeout", type=float, default=60.0, help="limit per command and per login, s (60)")
    args = p.parse_args()
    try:
        counts = [int(x) for x in args.clients.split(",")]
    except ValueError:
        p.error("--clients: comma-separated numbers")
    if min(counts) < 1 or args.messages < FLAGS_RUN or min(args.size, args.seconds, args.max_ops) <= 0:
        p.error(f"--clients must be positive, --messages at least {FLAGS_RUN}, the rest positive")
    if shutil.which("/usr/sbin/dovecot") is None:
        print("imap_stress: /usr/sbin/dovecot is missing (apt-get install dovecot-imapd)", file=sys.stderr)
        return 2
    raise_nofile(4 * max(counts) + 256)

    messages = make_corpus(args.messages, args.size, args.multipart_every)
    print(
        f"imap_stress: {args.messages} messages in INBOX ({sum(map(len, messages)) / 2**20:.1f} MiB), "
        f"clients {counts}, {args.seconds:g} s per phase and server; {os.cpu_count()} CPUs"
    )
    print(f"uptime at the start: {uptime()}", flush=True)
    try:
        with tempfile.TemporaryDirectory(prefix="mailgate-bench-stress-") as tmpdir:
            tmp = Path(tmpdir)
            tmp.chmod(0o755)
            status = run(args, tmp, messages, counts)
    except (BenchError, OSError) as exc:
        print(f"imap_stress: error: {exc}", file=sys.stderr)
        status = 1
    print(f"uptime at the end: {uptime()}")
    return status


def run(args: argparse.Namespace, tmp: Path, messages: list[bytes], counts: list[int]) -> int:
    script = Script(args.messages, {len(m) for m in messages})
    folders = max(counts)
    problems: list[str] = []
    dc = BenchDovecot(args.dovecot_fsync)
    with dc:
        dc.add_user(DOVECOT_USER, PASSWORD)
        dc.argon2id_user(DOVECOT_USER, HASHED)
        dc.deliver_files(DOVECOT_USER, "INBOX", messages)
        port = free_port()
        config = write_mailgate_config(tmp, port)
        seconds = load_mailgate(config, tmp, messages, 900.0)
        print(f"loaded both; mailgate in {seconds:.1f} s", flush=True)
        mg = Mailgate(config, tmp, port)
        try:
            dovecot = Server("dovecot", dc.port, DOVECOT_USER, lambda: dovecot_cpu(dc))
            mailgate = Server("mailgate", port, LOGIN, lambda: procfs.tree_cpu_seconds(mg.pid), mg.pid)
            for server in (dovecot, mailgate):
                prepare(server, args, folders)
            results: dict[str, dict[int, Phase]] = {"dovecot": {}, "mailgate": {}}
            for i, n in enumerate(counts):
                for server in (dovecot, mailgate) if i % 2 == 0 else (mailgate, dovecot):
                    phase, errors = run_phase(server, n, script, args)
                    results[server.name][n] = phase
                    problems += errors
                    print(
                        f"{server.name}, {n} clients: {phase.ops / phase.seconds:.0f} ops/s, "
                        f"{len(errors)} failed clients",
                        flush=True,
                    )
                    for error in errors:
                        print(f"imap_stress: {error}", file=sys.stderr, flush=True)
                    if mg.proc.poll() is not None:
                        tail = mg.log.read_text(errors="replace")[-2000:]
                        raise BenchError(
                            f"mailgate exited {mg.proc.returncode} in the phase; its log ends:\n{tail}"
                        )
                    time.sleep(1.0)  # let the sessions end (Dovecot: their imap processes)
                print_phase(n, results["dovecot"][n], results["mailgate"][n])
            for server in (dovecot, mailgate):
                problems += verify(server, args, folders)
            status = mg.stop()
        finally:
            mg.kill()
        problems += [] if status == 0 else [f"mailgate exited {status}, not 0, on SIGTERM"]
        print_summary(counts, results)
        log = mg.log.read_text(errors="replace").splitlines()
        marks = ("Traceback", *(f'"level": "{level}"' for level in ("warning", "error", "critical")))
        noted = [line for line in log if any(mark in line for mark in marks)]
        if noted:
            print(f"mailgate's log has {len(noted)} warnings, errors or tracebacks; the last ones:")
            print("\n".join(noted[-10:]))
    for problem in problems:
        print(f"imap_stress: FAIL: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

"""Capacity figures of issue #15: pull throughput and cost with 1, 2 and 3 instances, the cost
of the other paths, and the commit rate of this machine's PostgreSQL.

Theory of operation. Three sections, each optional (``--sections``):

``cluster``: for each n of ``--instances`` (1,2,3), and of ``--fs-instances`` (1) with
``[blobs] backend = "fs"`` (a blob costs no database transaction), a fresh PostgreSQL database
and a private Dovecot; :func:`tests.test_leases.cluster_pull` starts n ``mailgate
run`` instances (a metrics listener each), waits until
the upstream leases are spread, then delivers ``--mailboxes`` x ``--messages``
messages upstream while the instances pull, no kill. Its ``mark`` hook samples
everything just before the first delivery and again once every message is
stored: each instance's CPU (``/proc/<pid>/stat``), its
``mailgate_db_statements_total`` and ``mailgate_db_commits_total`` (scraped
from its metrics listener), PostgreSQL's WAL position
(``pg_current_wal_lsn()``), the CPU of PostgreSQL's and Dovecot's process
trees and of the whole machine (``/proc/stat``). Printed per n: msgs/s, CPU
seconds per 1000 messages (mailgate summed over instances, PostgreSQL, Dovecot),
statements, commits and WAL bytes per stored message, peak RSS per instance;
then :func:`tests.test_leases.assert_cluster_stored_exactly_once`.

``paths``: one instance on a fresh PostgreSQL database (bench/relay.py's
configuration plus SMTP, IMAP and metrics listeners), three paths one after
the other, each sampled the same way: SMTP relay-in (``smtp-source`` as in
bench/smtp_ingest.py), submission -> relay queue -> Postfix ``smtp-sink``
(bench/relay.py's client and sink; measured until the queue is empty) and
IMAP APPEND (one session).

``commits``: ``pgbench`` on a scratch database, one single-row INSERT per
transaction, 1 and 8 clients, 5 s each: the small-transaction commit rate
PostgreSQL sustains here, against which commits per message give the ceiling.

Caveats, printed as measured: the WAL position and PostgreSQL's process tree
are the whole server's (other databases' work counts too), and the counters
include what an idle instance does meanwhile (heartbeats, lease turns, the
quota job): a few statements a second. Everything is on 127.0.0.1; every wait
is bounded (cluster_pull's own bounds, ``--timeout`` for the paths).

    .venv/bin/python bench/cluster_scale.py [--instances 1,2,3] [--mailboxes 12] [--messages 500]
        [--size 3000] [--sections cluster,paths,commits] [--path-messages 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import imaplib
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
from argon2 import PasswordHasher

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import relay, smtp_ingest  # noqa: E402 (after the path is set)
from tests import procfs  # noqa: E402
from tests.conftest import PG_DSN, free_port, new_database  # noqa: E402
from tests.dovecot import running_dovecot  # noqa: E402
from tests.test_cluster import Instance  # noqa: E402
from tests.test_leases import assert_cluster_stored_exactly_once, cluster_pull  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
HOST = "127.0.0.1"


# --------------------------------------------------------------------------- what a sample holds


def _stat(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after "pid (comm)": state is [0], ppid [1], utime [11] ... cstime [14]."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2 :].split()


def tree_cpu(parent: int) -> float:
    """CPU seconds of ``parent`` and its children, live or already reaped (their cutime/cstime)."""
    # A child that exited meanwhile is missing: its time is in the parent's cutime once reaped.
    return sum(procfs.cpu_seconds(f) for pid, f in procfs.stats() if parent in (pid, int(f[1])))


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (all but idle and iowait), from /proc/stat."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = (
        int(v) for v in Path("/proc/stat").read_text().split()[1:9]
    )
    return (user + nice + system + irq + softirq + steal) / TICK


def scrape(port: int) -> dict[str, float]:
    """The database activity counters of one instance's /metrics."""
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as r:
        body = r.read().decode()
    found = dict(re.findall(r"^(mailgate_db_(?:statements|commits)_total) (\S+)$", body, re.MULTILINE))
    return {k: float(v) for k, v in found.items()}


@dataclass
class Sample:
    at: float
    cpu: dict[str, float]  # per instance
    db: dict[str, dict[str, float]]  # per instance: its counters
    wal: int
    postgres: float
    dovecot: float
    machine: float


@dataclass
class Cost:
    """What one measured stretch cost, per message."""

    label: str
    messages: int
    seconds: float
    mailgate_cpu: float  # seconds, all instances
    postgres_cpu: float
    dovecot_cpu: float
    machine: float  # busy CPU seconds of the whole machine
    statements: float
    commits: float
    wal: int
    rss_mib: list[float] = field(default_factory=list)
    connections: int = 0  # to the database, at the end (the bench's own included)
    note: str = ""

    def row(self) -> str:
        n = self.messages
        rss = "/".join(f"{r:.0f}" for r in self.rss_mib)
        return (
            f"{self.label:<28}{n / self.seconds:>8.0f}{self.seconds:>8.1f}"
            f"{1000 * self.mailgate_cpu / n:>9.2f}"
            f"{1000 * self.postgres_cpu / n:>8.2f}{1000 * self.dovecot_cpu / n:>8.2f}"
            f"{self.machine / self.seconds:>7.2f}{self.statements / n:>8.2f}{self.commits / n:>8.2f}"
            f"{self.wal / n:>8.0f}{self.connections:>7}  {rss}"
        )


HEADER = (
    f"{'':<28}{'msgs/s':>8}{'s':>8}{'mg cpu':>9}{'pg cpu':>8}{'dc cpu':>8}{'busy':>7}"
    f"{'stmt':>8}{'commit':>8}{'WAL B':>8}{'conns':>7}  peak RSS MiB\n"
    f"{'':<28}{'':>8}{'':>8}{'s/1000 messages':>25}{'cores':>7}{'per stored message':>24}"
)


class Probe:
    """Samples the instances (pid, metrics port), PostgreSQL and Dovecot."""

    def __init__(self, admin: asyncpg.Connection, postmaster: int, dovecot: int) -> None:
        self.admin, self.postmaster, self.dovecot = admin, postmaster, dovecot

    @classmethod
    async def open(cls, dovecot: int) -> Probe:
        admin = await asyncpg.connect(PG_DSN, timeout=5)
        backend = int(await admin.fetchval("SELECT pg_backend_pid()"))
        return cls(admin, int(_stat(backend)[1]), dovecot)  # a backend's parent is the postmaster

    async def sample(self, instances: dict[str, tuple[int, int]]) -> Sample:
        db = {n: await asyncio.to_thread(scrape, port) for n, (_, port) in instances.items()}
        wal = int(await self.admin.fetchval("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint"))
        return Sample(
            time.perf_counter(),
            {n: procfs.tree_cpu_seconds(pid) for n, (pid, _) in instances.items()},
            db,
            wal,
            tree_cpu(self.postmaster),
            tree_cpu(self.dovecot) if self.dovecot else 0.0,
            machine_busy(),
        )

    async def connections(self, url: str) -> int:
        """Connections open to ``url``'s database now."""
        name = url.rsplit("/", 1)[1]
        return int(
            await self.admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE datname = $1", name)
        )

    @staticmethod
    def cost(label: str, messages: int, a: Sample, b: Sample) -> Cost:
        def counter(name: str) -> float:
            return sum(b.db[n][name] - a.db[n][name] for n in b.db)

        return Cost(
            label,
            messages,
            b.at - a.at,
            sum(b.cpu[n] - a.cpu[n] for n in b.cpu),
            b.postgres - a.postgres,
            b.dovecot - a.dovecot,
            b.machine - a.machine,
            counter("mailgate_db_statements_total"),
            counter("mailgate_db_commits_total"),
            b.wal - a.wal,
        )


# --------------------------------------------------------------------------- cluster pull


async def pull_with(n: int, args: argparse.Namespace, blobs: str = "postgresql") -> Cost:
    """n instances pull the mailboxes from a fresh Dovecot into a fresh database, sampled."""
    with tempfile.TemporaryDirectory(prefix="mailgate-scale-") as tmp, running_dovecot() as dovecot:
        root = Path(tmp)
        assert dovecot._proc is not None  # started
        probe = await Probe.open(dovecot._proc.pid)
        samples: list[Sample] = []
        rss: list[float] = []
        connections = 0
        try:
            async with new_database("postgresql", root / "unused.db") as url:

                async def mark(what: str, nodes: dict[str, Instance]) -> None:
                    nonlocal connections
                    assert all(node.daemon.proc is not None for node in nodes.values())
                    running = {n: (i.daemon.proc.pid, i.metrics_port) for n, i in nodes.items()}  # type: ignore[union-attr]
                    samples.append(await probe.sample(running))
                    if what == "stored":
                        rss.extend(relay.rss_kib(pid) / 1024 for pid, _ in running.values())
                        connections = await probe.connections(url)

                run = await cluster_pull(
                    root,
                    url,
                    dovecot,
                    args.mailboxes,
                    args.messages,
                    args.size,
                    kill_at=None,
                    instances=n,
                    mark=mark,
                    blobs=blobs,
                )
                await assert_cluster_stored_exactly_once(url, dovecot, args.mailboxes)
        finally:
            await probe.admin.close()
        label = f"pull, {n} instance{'s' if n > 1 else ''}{', blobs fs' if blobs == 'fs' else ''}"
        cost = Probe.cost(label, run.stored, *samples)
        cost.rss_mib = rss
        cost.connections = connections
        delivering = run.delivered_at - (run.done_at - run.pull_seconds)
        cost.note = f"upstream delivery took {delivering:.1f}s of the pull's {run.pull_seconds:.1f}s"
        return cost


# --------------------------------------------------------------------------- the other paths


def append_all(port: int, password: str, messages: int, size: int) -> None:
    """APPEND ``messages`` messages to INBOX over one IMAP session."""
    tag = secrets.token_hex(4)
    c = imaplib.IMAP4(HOST, port, timeout=60)
    try:
        c.login(relay.AGENT, password)
        for i in range(messages):
            typ, data = c.append("INBOX", None, None, relay.message(i, size, tag))
            if typ != "OK":
                raise relay.BenchError(f"APPEND {i}: {data!r}")
    finally:
        c.logout()


async def paths(args: argparse.Namespace) -> list[Cost]:
    """Relay-in, submission to a sink, IMAP APPEND: one instance, a fresh database, sampled."""
    password = secrets.token_hex(12)
    hashed = PasswordHasher().hash(password)
    ports = {k: free_port() for k in ("smtp", "submission", "imap", "metrics")}
    n = args.path_messages
    source = argparse.Namespace(messages=n, connections=8, size=args.size, timeout=args.timeout)
    costs: list[Cost] = []
    with tempfile.TemporaryDirectory(prefix="mailgate-paths-") as tmpdir:
        tmp = Path(tmpdir)
        sink = relay.Sink(target=n)
        try:
            async with new_database("postgresql", tmp / "unused.db") as url:
                config = relay.write_config(tmp, ports["submission"], sink.port, url, 4, hashed)
                listen = "".join(f'{k} = "{HOST}:{ports[k]}"\n' for k in ("smtp", "imap", "metrics"))
                body = config.read_text(encoding="utf-8").replace('smtp = ""\n', listen, 1)
                config.write_text(body + '[blobs]\nbackend = "postgresql"\n', encoding="utf-8")
                with (tmp / "mailgate.log").open("wb") as log:
                    proc = subprocess.Popen(
                        [str(relay.MAILGATE), "-c", str(config), "run"], cwd=tmp, stdout=log, stderr=log
                    )
                probe = await Probe.open(0)
                try:
                    for port in ports.values():
                        await asyncio.to_thread(relay.wait_port, port, proc, 60.0)
                    me = {"a": (proc.pid, ports["metrics"])}

                    before = await probe.sample(me)
                    _, acked, error = await asyncio.to_thread(smtp_ingest.run_source, ports["smtp"], source)
                    if error:
                        raise relay.BenchError(f"relay-in: {error}")
                    costs.append(Probe.cost("SMTP relay-in", acked, before, await probe.sample(me)))

                    before = await probe.sample(me)
                    sub = await relay.submit(ports["submission"], password, source, sink, proc)
                    if sub.errors or sink.reached_at is None:
                        raise relay.BenchError(f"submission: {sub.errors[:1]}, {sink.mesg}/{n} at the sink")
                    deadline = time.monotonic() + args.timeout
                    while await asyncio.to_thread(relay.queue_left, config, tmp):  # outcomes recorded
                        if time.monotonic() > deadline:
                            raise relay.BenchError("the relay queue did not empty")
                        await asyncio.sleep(0.2)
                    costs.append(Probe.cost("submission -> sink", n, before, await probe.sample(me)))

                    before = await probe.sample(me)
                    await asyncio.to_thread(append_all, ports["imap"], password, n, args.size)
                    costs.append(Probe.cost("IMAP APPEND (1 sess)", n, before, await probe.sample(me)))
                    connections = await probe.connections(url)
                    for cost in costs:
                        cost.rss_mib = [relay.rss_kib(proc.pid) / 1024]
                        cost.connections = connections
                    if relay.stop(proc, 60.0) != 0:
                        raise relay.BenchError("mailgate did not exit 0 on SIGTERM")
                finally:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait(10)
                    await probe.admin.close()
        finally:
            sink.close()
    return costs


# --------------------------------------------------------------------------- PostgreSQL's commit rate


async def commit_rate(seconds: int) -> list[tuple[int, float]]:
    """pgbench, one single-row INSERT per transaction: (clients, commits/s) for 1 and 8 clients."""
    out = []
    with tempfile.TemporaryDirectory(prefix="mailgate-pgbench-") as tmpdir:
        script = Path(tmpdir) / "insert.sql"
        script.write_text("INSERT INTO commits (pad) VALUES (repeat('x', 100));\n", encoding="utf-8")
        async with new_database("postgresql", Path(tmpdir) / "unused.db") as url:
            dsn = url.replace("postgresql+asyncpg://", "postgresql://")
            conn = await asyncpg.connect(dsn, timeout=5)
            try:
                await conn.execute("CREATE TABLE commits (id bigserial PRIMARY KEY, pad text)")
            finally:
                await conn.close()
            for clients in (1, 8):
                cmd = ["pgbench", "-n", "-f", str(script), "-c", str(clients), "-j", "2", "-T", str(seconds)]
                done = await asyncio.to_thread(
                    subprocess.run, [*cmd, dsn], capture_output=True, text=True, timeout=seconds + 60
                )
                found = re.search(r"tps = ([\d.]+)", done.stdout)
                if done.returncode != 0 or found is None:
                    raise relay.BenchError(f"pgbench: {done.stderr.strip()[-500:]}")
                out.append((clients, float(found.group(1))))
    return out


async def settings() -> str:
    conn = await asyncpg.connect(PG_DSN, timeout=5)
    try:
        names = (
            "server_version",
            "max_connections",
            "shared_buffers",
            "synchronous_commit",
            "wal_sync_method",
        )
        return ", ".join([f"{n}={await conn.fetchval(f'SHOW {n}')}" for n in names])
    finally:
        await conn.close()


async def main(args: argparse.Namespace) -> int:
    sections = set(args.sections.split(","))
    print(f"cluster_scale: {os.cpu_count()} CPUs; PostgreSQL {await settings()}")
    costs: list[Cost] = []
    if "cluster" in sections:
        total = args.mailboxes * args.messages
        print(f"pull: {args.mailboxes} mailboxes x {args.messages} messages x ~{args.size} B = {total}")
        runs = [(int(v), "postgresql") for v in args.instances.split(",")]
        runs += [(int(v), "fs") for v in args.fs_instances.split(",") if v]
        for n, blobs in runs:
            costs.append(await pull_with(n, args, blobs))
            print(f"  {costs[-1].label}: every message stored exactly once (Message-ID and sha256)")
            print(f"  {costs[-1].note}")
    if "paths" in sections:
        print(f"paths: {args.path_messages} messages x ~{args.size} B each, one instance")
        costs += await paths(args)
    if costs:
        print(HEADER)
        for cost in costs:
            print(cost.row())
    if "commits" in sections:
        for clients, tps in await commit_rate(5):
            print(f"pgbench, single-row INSERT per transaction, {clients} client(s): {tps:.0f} commits/s")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", default="1,2,3", help="instance counts, comma-separated")
    parser.add_argument(
        "--fs-instances", default="1", help="instance counts to run again with blobs on the file system"
    )
    parser.add_argument("--mailboxes", type=int, default=12)
    parser.add_argument("--messages", type=int, default=500, help="per mailbox")
    parser.add_argument("--size", type=int, default=3000, help="bytes per message, about")
    parser.add_argument("--sections", default="cluster,paths,commits")
    parser.add_argument("--path-messages", type=int, default=1000, help="messages per path (paths)")
    parser.add_argument("--timeout", type=float, default=300.0, help="bound of each paths wait, seconds")
    sys.exit(asyncio.run(main(parser.parse_args())))

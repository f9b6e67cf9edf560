"""Hostile LIST patterns (issue #10, defect 1): the daemon's CPU per LIST, and whether SMTP waits.

A ``mailgate run`` (SQLite, IMAP and SMTP listeners, one tenant) gets
``--folders`` folders of 255-character names over IMAP, ``a`` * 251 and a
number: the text a ``*a*a...ab`` pattern finds everywhere and matches nowhere,
which made the old regex translation backtrack about ``255 ** 9`` times a name.
Then, per pattern (a plain name as the baseline: loading the folders, no
wildcard work; ten ``*``; ten ``%``; the longest mix the parser allows), over
one logged-in connection:

1. ``--rounds`` LISTs alone: the daemon's CPU seconds per LIST (user + system
   from ``/proc/<pid>/stat``, clock ticks: read it as +-10 ms a round; mean,
   median and worst round) and the mean wall time per LIST;
2. the same LISTs again while a second thread opens SMTP connections one after
   another and times each banner (connect to ``220`` line): the median and the
   worst banner latency, against the same probe with the daemon idle.

Every LIST must answer ``OK`` with the expected number of folders, within
``--timeout`` seconds (the old code would take hours: the bench then fails
instead of hanging). Only 127.0.0.1 is used.

    .venv/bin/python bench/hostile_list.py [--folders 1000] [--rounds 10]

The IMAP client, the daemon wrapper and the /proc readers are bench/imap.py's.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.imap import (  # noqa: E402
    HOST,
    LOGIN,
    PASSWORD,
    BenchError,
    Client,
    Mailgate,
    cpu_seconds,
    free_port,
    write_mailgate_config,
)

NAME_LENGTH = 255
PATTERNS = {
    "a name (baseline)": "no-such-folder",
    "10 x *": "*a*a*a*a*a*a*a*a*a*ab",
    "10 x %": "%a%a%a%a%a%a%a%a%a%ab",
    "1024 chars, * and %": ("*a%" * 342)[:1023] + "b",
}


def banner_latency(port: int, timeout: float) -> float:
    """Seconds from connect to the SMTP banner's last line."""
    started = time.perf_counter()
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        data = b""
        while not any(line.startswith(b"220 ") for line in data.split(b"\r\n")):
            chunk = s.recv(4096)
            if not chunk:
                raise BenchError("the SMTP server closed before its banner")
            data += chunk
        latency = time.perf_counter() - started
        s.sendall(b"QUIT\r\n")
    return latency


class Prober(threading.Thread):
    """Times SMTP banners back to back until stopped."""

    def __init__(self, port: int, timeout: float) -> None:
        super().__init__(daemon=True)
        self.port, self.timeout = port, timeout
        self.latencies: list[float] = []
        self.error: BaseException | None = None
        self.halt = threading.Event()

    def run(self) -> None:
        try:
            while not self.halt.is_set():
                self.latencies.append(banner_latency(self.port, self.timeout))
                time.sleep(0.005)
        except (OSError, BenchError) as exc:
            self.error = exc

    def stop(self) -> list[float]:
        self.halt.set()
        self.join(self.timeout + 5)
        if self.error is not None:
            raise BenchError(f"SMTP probe: {self.error}")
        if not self.latencies:
            raise BenchError("the SMTP probe measured nothing")
        return self.latencies


def idle_latencies(port: int, seconds: float, timeout: float) -> list[float]:
    prober = Prober(port, timeout)
    prober.start()
    time.sleep(seconds)
    return prober.stop()


def list_rounds(client: Client, pid: int, pattern: str, rounds: int) -> tuple[list[float], list[float]]:
    """CPU seconds and wall seconds of each LIST."""
    cpu, wall = [], []
    for _ in range(rounds):
        c0, t0 = cpu_seconds(pid), time.perf_counter()
        reply = client.command(f'LIST "" "{pattern}"', collect=True)
        wall.append(time.perf_counter() - t0)
        cpu.append(cpu_seconds(pid) - c0)
        if reply.untagged:
            raise BenchError(f"LIST {pattern[:30]!r} listed {len(reply.untagged)} folders, expected none")
    return cpu, wall


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folders", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds any one answer may take")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="mailgate-hostile-list-") as name:
        tmp = Path(name)
        imap_port, smtp_port = free_port(), free_port()
        config = write_mailgate_config(tmp, imap_port)
        text = config.read_text(encoding="utf-8")
        if 'smtp = ""' not in text:
            raise BenchError('bench/imap.py\'s config changed: no smtp = ""')
        config.write_text(text.replace('smtp = ""', f'smtp = "{HOST}:{smtp_port}"'), encoding="utf-8")
        mailgate = Mailgate(config, tmp, imap_port)
        try:
            client = Client(imap_port, args.timeout)
            client.login(LOGIN, PASSWORD)
            started = time.perf_counter()
            for i in range(args.folders):
                folder = "a" * (NAME_LENGTH - 4) + f"{i:04d}"
                client.command(f'CREATE "{folder}"')
            print(
                f"{args.folders} folders of {NAME_LENGTH} characters created in "
                f"{time.perf_counter() - started:.1f} s"
            )
            idle = idle_latencies(smtp_port, 2.0, args.timeout)
            print(
                f"SMTP banner, daemon idle: median {ms(statistics.median(idle))} ms, "
                f"max {ms(max(idle))} ms ({len(idle)} connections)"
            )
            print()
            print(
                f"{'pattern':<22}{'CPU ms/LIST':>12}{'p50':>6}{'max':>7}{'wall ms':>9}"
                f"{'banner p50':>12}{'banner max':>12}{'probes':>8}"
            )
            for label, pattern in PATTERNS.items():
                cpu, wall = list_rounds(client, mailgate.pid, pattern, args.rounds)
                prober = Prober(smtp_port, args.timeout)
                prober.start()
                list_rounds(client, mailgate.pid, pattern, args.rounds)
                latencies = prober.stop()
                print(
                    f"{label:<22}{ms(statistics.mean(cpu)):>12}{ms(statistics.median(cpu)):>6}"
                    f"{ms(max(cpu)):>7}"
                    f"{ms(statistics.mean(wall)):>9}{ms(statistics.median(latencies)):>12}"
                    f"{ms(max(latencies)):>12}{len(latencies):>8}"
                )
            client.command("LOGOUT")
            client.close()
        finally:
            status = mailgate.stop()
        if status != 0:
            raise BenchError(f"mailgate exited with {status} on SIGTERM")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"hostile_list: {exc}", file=sys.stderr)
        sys.exit(1)

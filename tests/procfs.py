"""Linux /proc, for the fixtures and the benches: every process's stat fields."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path


def stats() -> Iterator[tuple[int, list[str]]]:
    """(pid, the fields of /proc/PID/stat after the command name) of every live process: [0] state,
    [1] ppid, [2] process group, [11:15] utime stime cutime cstime in clock ticks."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # gone meanwhile
        yield int(entry), stat[stat.rfind(")") + 2 :].split()


def cpu_seconds(fields: list[str]) -> float:
    """A process's own CPU time and its reaped children's, from its :func:`stats` fields."""
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a live process, its live descendants (mailgate's blob writer and MIME worker
    processes) and the children they reaped."""
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for p, fields in stats():
        parents[p] = int(fields[1])
        cpu[p] = cpu_seconds(fields)

    def descends(p: int) -> bool:
        while p > 1:
            if p == pid:
                return True
            p = parents.get(p, 0)
        return False

    return sum(c for p, c in cpu.items() if descends(p))

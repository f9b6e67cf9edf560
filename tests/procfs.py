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

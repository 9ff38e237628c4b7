"""What every scenario measures with: percentiles, /proc readings, the machine, background load.

CPU and memory of other processes come from /proc (Linux only); CPU seconds have the
kernel's tick resolution (10 ms), so they are only quoted over loads of seconds.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import resource
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass

TICK = os.sysconf("SC_CLK_TCK")


def percentile(values: Iterable[float], fraction: float) -> float:
    """The `fraction` quantile (0.5 = median), linearly interpolated; NaN for no values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = fraction * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _stat_fields(pid: int) -> list[bytes]:
    with open(f"/proc/{pid}/stat", "rb") as stat:
        return stat.read().rsplit(b")", 1)[1].split()


def cpu_seconds(pid: int, children: bool = False) -> float:
    """User + system CPU of a live process (plus its reaped children's, if asked)."""
    fields = _stat_fields(pid)
    used = int(fields[11]) + int(fields[12])
    if children:
        used += int(fields[13]) + int(fields[14])
    return used / TICK


def own_cpu_seconds() -> float:
    """This process's CPU, every thread included (fine resolution)."""
    return time.process_time()


def waited_for_cpu(pid: int) -> float:
    """Seconds a process has spent runnable but waiting for a CPU (/proc/<pid>/schedstat)."""
    with open(f"/proc/{pid}/schedstat", encoding="ascii") as schedstat:
        return int(schedstat.read().split()[1]) / 1e9


def rss_mb(pid: int) -> float:
    """Resident memory of one process, in MB (MiB)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def children_of(pid: int) -> list[int]:
    """Every live descendant of `pid`."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(_stat_fields(int(entry))[1])
            except (OSError, IndexError):
                continue
            parents.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _busy_seconds() -> float:
    """CPU time all cores spent busy since boot (everything but idle and iowait)."""
    with open("/proc/stat", encoding="ascii") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / TICK


def _tree_cpu() -> float:
    """CPU used by this process and everything it started, reaped or alive."""
    used = own_cpu_seconds()
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    used += reaped.ru_utime + reaped.ru_stime
    for pid in children_of(os.getpid()):
        with contextlib.suppress(OSError, IndexError):  # it ended meanwhile
            used += cpu_seconds(pid, children=True)
    return used


@dataclass
class Background:
    """How busy the machine was with other work while a scenario ran (cores, 0 to nproc)."""

    started: float = 0.0
    busy: float = 0.0
    ours: float = 0.0

    def start(self) -> Background:
        self.started, self.busy, self.ours = time.monotonic(), _busy_seconds(), _tree_cpu()
        return self

    def cores(self) -> float:
        """Average cores other processes kept busy since `start`."""
        elapsed = time.monotonic() - self.started
        others = (_busy_seconds() - self.busy) - (_tree_cpu() - self.ours)
        cores = os.cpu_count() or 1
        return round(min(cores, max(0.0, others) / elapsed), 2) if elapsed > 0 else 0.0


def machine() -> dict[str, object]:
    """Where and when the figures were taken."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        total_kb = int(meminfo.readline().split()[1])
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu_model": model,
        "cores": os.cpu_count(),
        "memory_gb": round(total_kb / (1 << 20), 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": sys.version.split()[0],
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }

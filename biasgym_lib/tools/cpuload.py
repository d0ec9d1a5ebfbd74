"""How busy the machine is when a book build starts, and what the chapters' kernels should do
about it (issue 21): PyTorch's threads spin while they wait, which costs dearly beside a busy
process; from half a CPU busy elsewhere the kernels wait passively instead."""

from __future__ import annotations

import os
from pathlib import Path


def cpu_snapshot() -> tuple[float, float, float]:
    """(busy, total) jiffies of every CPU together (``/proc/stat``) and this process's own CPU
    jiffies (``/proc/self/stat``, its children's included); zeros where /proc is absent."""
    try:
        fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        mine = sum(float(x) for x in own[11:15])  # utime, stime, cutime, cstime
    except (OSError, ValueError, IndexError):
        return 0.0, 0.0, 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8]), mine


def other_load(before, after, n_cpus: int) -> float:
    """How many CPUs' worth of work *other* processes did between two :func:`cpu_snapshot`\ s."""
    total = after[1] - before[1]
    if total <= 0:
        return 0.0
    return max(0.0, (after[0] - before[0]) - (after[2] - before[2])) / total * n_cpus


def kernel_wait_policy(load: float, env=None) -> str | None:
    """The OpenMP wait policy the chapters' kernels get. PyTorch's threads spin while they wait
    for each other: on an idle machine that is fastest, but when another process holds a core
    a spinning thread burns the time slice its partner needs (measured here with one busy
    process beside: a batch of scoring 3.2-3.8x slower than idle when spinning, 1.9x when
    passive). So with at least half a CPU busy elsewhere when the build starts, the kernels
    wait passively (``OMP_WAIT_POLICY=PASSIVE``, about 15% slower when idle, which is why it is
    not the default). It changes no number: the threads and their split of the work are the
    same. A policy the user set is kept; None: leave the default."""
    env = os.environ if env is None else env
    if "OMP_WAIT_POLICY" in env:
        return None
    return "PASSIVE" if load >= 0.5 else None

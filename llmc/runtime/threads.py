"""How many threads a native step may use: all it was given while the machine is quiet, fewer while
other processes keep cores busy.

OpenMP threads meet at a barrier after every parallel loop, about ten times per layer. When another
process holds one of the cores, the thread that waits for it spins through its whole time slice, and
a step that takes 12 ms on a quiet machine took 200 ms beside two busy loops (measured on 2 cores).
Waiting passively instead costs a wake-up per barrier on a quiet machine. So the policy looks at the
machine instead: every `interval` seconds it reads how many cores the other processes used since the
last look (/proc/stat's busy time, less this process's own from os.times(); time the
hypervisor stole counts as used) and runs the next steps on the cores left, at least one. On a quiet
machine that is every thread; the cost is two small file reads per interval.
"""
from __future__ import annotations

import os
import time


def _machine_busy_s() -> float | None:
    """Seconds of CPU time all processes (and the hypervisor's steal) have used, over every core."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_busy_s() -> float:
    t = os.times()
    return t.user + t.system


class ThreadPolicy:
    """`threads(max_threads)`: how many of `max_threads` threads to use now (see the module docstring)."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self._free = float(self.cores)
        self._last: tuple[float, float, float] | None = None
        self.reduced_steps = 0                   # steps run on fewer threads than asked, for the report

    def threads(self, max_threads: int) -> int:
        n = max(1, min(max_threads, int(self._look() + 0.5)))
        self.reduced_steps += n < max_threads
        return n

    def _look(self) -> float:
        """Cores the other processes left free, as of the last look (at most `interval` ago)."""
        now = time.monotonic()
        if self._last is not None and now - self._last[0] < self.interval:
            return self._free
        busy, own = _machine_busy_s(), _own_busy_s()
        if busy is None:                         # no /proc: every core counts as free
            return self._free
        if self._last is not None:
            t0, busy0, own0 = self._last
            self._free = self.cores - max(0.0, (busy - busy0) - (own - own0)) / (now - t0)
        self._last = (now, busy, own)
        return self._free

"""CPU interference checks for the benchmarks (Linux ``/proc``).

On a small machine every other process disturbs a measurement. ``wait_quiet`` waits for the
cores to go idle before a benchmark starts; ``CpuMonitor`` tells, after a measured stretch, how
much of the machine's CPU went to processes outside this benchmark's process tree (plus time
stolen by the hypervisor), so a disturbed stretch can be measured again instead of averaged in.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from pathlib import Path


def _system_ticks() -> tuple[int, int, int]:
    """(busy, stolen, total) jiffies of all CPUs since boot."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (f + [0] * 8)[:8]
    return user + nice + system + irq + softirq, steal, sum(f[:8])


def _tree_ticks(root: int) -> int:
    """CPU jiffies used so far by ``root`` and every live descendant (all their threads)."""
    children: dict[int, list[int]] = defaultdict(list)
    ticks: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        rest = stat[stat.rfind(")") + 2:].split()  # the command may contain spaces
        children[int(rest[1])].append(int(name))
        ticks[int(name)] = int(rest[11]) + int(rest[12])  # utime + stime
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += ticks.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


class CpuMonitor:
    """``start()``, run something, then ``foreign()``: the share (0..1) of all cores' time
    used meanwhile by processes that are not this one or its descendants, or stolen.

    Resolution is one jiffy (10 ms) per process, so stretches under ~1 s read noisy."""

    def __init__(self) -> None:
        self._root = os.getpid()
        self._start: tuple[int, int, int, int] | None = None

    def start(self) -> None:
        self._start = (*_system_ticks(), _tree_ticks(self._root))

    def foreign(self) -> float:
        if self._start is None:
            raise RuntimeError("start() first")
        busy0, steal0, total0, own0 = self._start
        busy1, steal1, total1 = _system_ticks()
        own1 = _tree_ticks(self._root)
        other = (busy1 - busy0) - (own1 - own0) + (steal1 - steal0)
        return max(0.0, other / max(1, total1 - total0))


def cpu_busy(seconds: float = 1.0) -> float:
    """Share of all cores busy (or stolen) over ``seconds``, 0..1; -1 if unknown."""
    try:
        busy0, steal0, total0 = _system_ticks()
        time.sleep(seconds)
        busy1, steal1, total1 = _system_ticks()
    except (OSError, ValueError):
        return -1.0
    return ((busy1 - busy0) + (steal1 - steal0)) / max(1, total1 - total0)


def wait_quiet(max_wait: float, threshold: float = 0.10) -> float:
    """Wait up to ``max_wait`` seconds until other processes leave the cores idle; returns the
    last busy share seen (it warns when the machine never went quiet)."""
    deadline = time.monotonic() + max_wait
    busy = cpu_busy()
    while busy > threshold and time.monotonic() < deadline:
        print(f"  waiting for a quiet machine: {busy:.0%} of the cores busy", flush=True)
        busy = cpu_busy(2.0)
    if busy > threshold:
        print(f"  WARNING: the machine is still busy ({busy:.0%} of the cores); figures will "
              "be disturbed", flush=True)
    return busy


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.machine()

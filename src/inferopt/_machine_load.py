"""How busy the machine was while a run measured: timings are only comparable on a quiet one.

OpenMP kernels lose unequally when other processes compete for the cores (an MLP's int8 at
batch 1 measured 0.17x fp32 under load and above 1x on an idle machine), so a run records the
load around its measurements and warns when others used the cores. On Linux the CPU time the
whole machine spent, minus this process's own, over the wall time, is how many cores other
processes kept busy during the measurements (exact, not lagging like the load average).
"""

from __future__ import annotations

import os
import time
from typing import Any

# other processes keeping at least this share of a core busy on average is worth a warning
WARN_CORES = 0.25


def _busy_seconds() -> float | None:
    """CPU seconds the whole machine has spent not idle since boot (Linux), else None."""
    try:
        with open("/proc/stat", encoding="ascii") as handle:
            fields = [int(v) for v in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    return (sum(fields[:8]) - idle) / ticks


def _own_seconds() -> float:
    times = os.times()
    return times.user + times.system


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


class LoadMonitor:
    """``start()`` before the measurements, ``stop()`` after: what else ran meanwhile."""

    def __init__(self) -> None:
        self._wall = time.monotonic()
        self._busy = _busy_seconds()
        self._own = _own_seconds()
        self._load_before = _load_average()

    def stop(self) -> tuple[dict[str, Any], str | None]:
        """(facts for the report's environment, a warning or None)."""
        wall = max(time.monotonic() - self._wall, 1e-9)
        cores = os.cpu_count() or 1
        facts: dict[str, Any] = {"load_average_before": self._load_before,
                                 "load_average_after": _load_average(), "cores": cores}
        busy = _busy_seconds()
        warning = None
        if busy is not None and self._busy is not None:
            others = max(0.0, (busy - self._busy) - (_own_seconds() - self._own)) / wall
            facts["other_processes_cores"] = round(others, 2)
            if others >= WARN_CORES:
                warning = (
                    f"other processes kept {others:.2f} of this machine's {cores} cores busy "
                    f"on average while this run measured ({wall:.0f} s); timings, int8 ones "
                    "most of all, are distorted by such competition. Re-measure on an idle "
                    "machine, or set OMP_WAIT_POLICY=PASSIVE")
        else:
            after = facts["load_average_after"]
            if after and after[0] > cores:
                warning = (f"the load average was {after[0]:.2f} on {cores} cores while this "
                           "run measured; timings may be distorted by other processes")
        return facts, warning

"""CPU threads on a busy machine: `alignfast train` / `alignfast eval` check for oversubscription before loading
any model.

torch starts one intra-op thread per core it sees. When other jobs already keep those cores busy, or a
container's CPU quota allows fewer cores than the machine has, every parallel region waits for threads that
are not running: a 32-token greedy generation of SmolLM2-135M took 64.5 s with torch's 2 threads and 5.2 s
with 1 on a 2-core machine under a load average of 9-17 (README). The free cores are estimated as

    usable = min(CPUs this process may run on, cgroup CPU quota)        (the quota rounded down, at least 1)
    others = max(0, load average over 1 min - 1)                         (this process counts in it)
    free   = max(1, floor(min(usable, CPUs - others)))

and when torch would use more threads than that:

    OMP_NUM_THREADS unset   torch is set to `free` threads, with one warning that says so and how to choose
    OMP_NUM_THREADS set     the user's choice stays; one warning names the free cores and the fix
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

_log = logging.getLogger("alignfast.cli")

# cgroup v2 (the process's own group, then the root) and v1 locations of the CPU quota.
_CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class CpuBudget:
    cpus: int               # CPUs this process may run on (affinity)
    quota: float | None     # cgroup CPU quota in cores, None when unlimited or unknown
    load: float | None      # 1-minute load average (this process included), None where the platform has none

    @property
    def free(self) -> int:
        usable = float(self.cpus) if self.quota is None else min(float(self.cpus), max(1.0, self.quota))
        if self.load is not None:  # this command, busy importing and loading, is about 1 of the load
            usable = min(usable, self.cpus - max(0.0, self.load - 1.0))
        return max(1, math.floor(usable))

    def describe(self) -> str:
        parts = [f"{self.cpus} CPU{'s' if self.cpus != 1 else ''}"]
        if self.quota is not None:
            parts.append(f"a cgroup quota of {self.quota:g} cores")
        if self.load is not None:
            parts.append(f"load average {self.load:.1f}")
        return ", ".join(parts)


def cgroup_quota(root: Path = _CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The CPU quota in cores from cgroup v2's cpu.max ('200000 100000' = 2 cores, 'max ...' = none) or v1's
    cpu.cfs_quota_us / cpu.cfs_period_us (-1 = none); None when unlimited or unreadable."""
    candidates = []
    try:
        for line in proc_cgroup.read_text().splitlines():
            if line.startswith("0::"):
                candidates.append(root / line[3:].lstrip("/") / "cpu.max")
    except OSError:
        pass
    candidates.append(root / "cpu.max")
    for path in candidates:
        try:
            quota, period = path.read_text().split()[:2]
        except (OSError, ValueError):
            continue
        if quota == "max":
            return None
        try:
            return int(quota) / int(period)
        except (ValueError, ZeroDivisionError):
            return None
    for folder in (root / "cpu", root / "cpu,cpuacct"):
        try:
            quota = int((folder / "cpu.cfs_quota_us").read_text())
            period = int((folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return quota / period if quota > 0 and period > 0 else None
    return None


def cpu_budget() -> CpuBudget:
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = None
    return CpuBudget(cpus=cpus, quota=cgroup_quota(), load=load)


def plan_threads(current: int, budget: CpuBudget, *, user_set: bool) -> tuple[int | None, str | None]:
    """(thread count to set or None, warning or None) for torch using `current` threads under `budget`."""
    free = budget.free
    if current <= free:
        return None, None
    if user_set:
        return None, (f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} gives torch {current} threads but only "
                      f"about {free} core{'s are' if free != 1 else ' is'} free ({budget.describe()}): threads that "
                      f"wait for each other make every step slower; OMP_NUM_THREADS={free} fits")
    return free, (f"the machine is busy ({budget.describe()}): using {free} CPU thread{'s' if free != 1 else ''} "
                  f"instead of torch's {current}, which would wait for each other; set OMP_NUM_THREADS to choose")


def fit_threads_to_machine(budget: CpuBudget | None = None) -> int | None:
    """Check for oversubscription now and act on it (see the module docstring); the thread count set, or None."""
    import torch

    user_set = bool(os.environ.get("OMP_NUM_THREADS", "").strip())
    threads, warning = plan_threads(torch.get_num_threads(), budget or cpu_budget(), user_set=user_set)
    if warning:
        _log.warning(warning)
    if threads is not None:
        torch.set_num_threads(threads)
    return threads

"""How many cores this process may use: what `workers: auto` starts.

Not os.cpu_count(), which counts the machine's: a container limited to two CPUs on a
64-core host would start 64 processes competing for two cores. The count is the
smaller of the CPUs the process may be scheduled on (its affinity: taskset, cpusets)
and its cgroup's CPU quota (cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us`, rounded up:
a limit of 1.5 CPUs is served best by two processes), and at least 1.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

_CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable_cores() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    quota = cgroup_quota()
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(cores, 1)


def cgroup_quota(root: Path = _CGROUP_ROOT) -> float | None:
    """The CPUs this process's cgroup may use (quota over period), or None: no limit, or
    no cgroup file to read it from."""
    v2 = _read(root / _own_cgroup(root) / "cpu.max")
    if v2 is not None:
        quota, _, period = v2.partition(" ")
        return _ratio(quota, period)
    return _ratio(
        _read(root / "cpu" / "cpu.cfs_quota_us") or "", _read(root / "cpu" / "cpu.cfs_period_us")
    )


def _own_cgroup(root: Path) -> str:
    """This process's cgroup v2 path, relative to root (a container sees its own as /)."""
    membership = _read(Path("/proc/self/cgroup")) or ""
    for line in membership.splitlines():
        if line.startswith("0::"):
            return line[3:].lstrip("/")
    return ""


def _ratio(quota: str, period: str | None) -> float | None:
    try:
        quota_us, period_us = int(quota), int(period or "")
    except ValueError:
        return None  # "max", -1, or nothing read: no limit
    if quota_us <= 0 or period_us <= 0:
        return None
    return quota_us / period_us


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, ValueError):
        return None

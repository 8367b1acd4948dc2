"""One rule for picking the compute device, and one for how many CPU threads to use."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from atric.errors import ConfigError

# cgroup v2 (containers, CI runners, systemd slices) and v1 CPU quotas.
CGROUP_V2_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` takes CUDA when present (respecting CUDA_VISIBLE_DEVICES), else CPU."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise ConfigError(f"device: {spec!r} is not a valid torch device ({exc})") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {spec!r} asked for CUDA but no CUDA device is available")
    return device


def _cgroup_cpu_limit() -> int | None:
    """The CPU quota of this process's cgroup in whole cores (rounded up), or None if unlimited."""
    try:
        if CGROUP_V2_CPU_MAX.exists():
            quota, period = CGROUP_V2_CPU_MAX.read_text().split()[:2]
            if quota == "max":
                return None
            return max(1, math.ceil(int(quota) / int(period)))
        if CGROUP_V1_QUOTA.exists() and CGROUP_V1_PERIOD.exists():
            quota_us = int(CGROUP_V1_QUOTA.read_text())
            if quota_us <= 0:
                return None
            return max(1, math.ceil(quota_us / int(CGROUP_V1_PERIOD.read_text())))
    except (OSError, ValueError):
        return None
    return None


def available_cpus() -> int:
    """Cores this process may actually run on: its CPU affinity, capped by a cgroup quota.

    torch's default counts the machine's physical cores, which inside a container limited to
    2 CPUs of a 64-core host means 32 threads fighting for 2 cores."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    return max(1, min(cores, limit) if limit is not None else cores)


def default_threads() -> int:
    """torch's intra-op threads when neither ``train.threads`` nor OMP_NUM_THREADS sets them: one
    fewer than the cores this process may use, at least one. The spare core runs the DataLoader
    workers, the tracking thread and whatever else shares the machine, so the intra-op team does not
    wait at every parallel region for a peer that was descheduled or asleep. On a 2-vCPU VM one
    thread trained the default corpus 1.0-2.7x faster than two passive threads and stayed within
    1.8x of its idle speed beside a 2-core load; large features (31 x 2048) on idle cores trained
    at 0.7-0.9x (README, Performance: ``train.threads`` sets the count)."""
    return max(1, available_cpus() - 1)


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op thread count: ``threads`` when given; else, where OMP_NUM_THREADS pins
    it, torch's count capped at ``available_cpus()`` (a quota-limited container does not run a
    thread per host core); else ``default_threads()``. Returns the count in effect."""
    if threads is not None:
        count = threads
    elif os.environ.get("OMP_NUM_THREADS"):
        count = min(torch.get_num_threads(), available_cpus())
    else:
        count = default_threads()
    if count < 1:
        raise ConfigError(f"threads must be >= 1, got {count}")
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count

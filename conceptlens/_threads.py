"""Thread pools sized to the CPUs this process may use, not the machine's.

A container or batch job often runs on a large machine with a CPU affinity mask or a cgroup CPU
quota of a few cores; thread pools sized to the machine then oversubscribe those cores and every
analysis slows several-fold. :func:`usable_cpus` is the affinity mask capped by the quota (cgroup v2
``cpu.max``, or v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``); :func:`thread_limits` sizes
OpenMP/BLAS (torch's intra-op pool, numpy, scipy, scikit-learn) and numba (UMAP) to it. The CLI runs
each command inside it; the library never changes thread settings on import.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from pathlib import Path

__all__ = ["usable_cpus", "thread_limits", "THREAD_VARIABLES"]

logger = logging.getLogger(__name__)

#: Environment variables that size the thread pools of libraries when they load.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _cgroup_quota(root):
    """CPUs allowed by the cgroup quota under ``root`` (rounded up), or None when unlimited or unknown."""
    root = Path(root)
    try:
        if (root / "cpu.max").is_file():  # cgroup v2: "max 100000" or "<quota> <period>"
            quota, period = (root / "cpu.max").read_text().split()[:2]
            if quota == "max":
                return None
            quota, period = int(quota), int(period)
        else:  # cgroup v1
            v1 = next((d for d in (root / "cpu", root / "cpu,cpuacct") if (d / "cpu.cfs_quota_us").is_file()), None)
            if v1 is None:
                return None
            quota = int((v1 / "cpu.cfs_quota_us").read_text())
            period = int((v1 / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    if quota <= 0 or period <= 0:  # v1 writes -1 for "no quota"
        return None
    return max(1, math.ceil(quota / period))


def usable_cpus(cgroup_root=CGROUP_ROOT):
    """The number of CPUs this process may use: its affinity mask, capped by the cgroup CPU quota.

    Parameters
    ----------
    cgroup_root : path
        Where the cgroup files are mounted (tests pass a folder of fake files).

    Returns
    -------
    int
        At least 1.
    """
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        affinity = os.cpu_count() or 1
    quota = _cgroup_quota(cgroup_root)
    return max(1, min(affinity, quota) if quota else affinity)


@contextlib.contextmanager
def thread_limits(n=None, environ=os.environ):
    """Within the block, libraries that load size their thread pools to ``n`` threads.

    Sets each of :data:`THREAD_VARIABLES` that the user has not set (theirs win) and restores them
    on exit. OpenMP, BLAS, torch's intra-op pool and numba read them when they load, so this acts
    on libraries imported inside the block (and on worker processes started there), not on loaded
    ones: the CLI runs each command in it, before any heavy library is imported.

    Parameters
    ----------
    n : int, optional
        Threads per pool (default: :func:`usable_cpus`).
    environ : mapping
        The environment to update (tests pass a dict).

    Yields
    ------
    dict
        The thread variables in force, ``{name: value}``.
    """
    n = usable_cpus() if n is None else int(n)
    added = [name for name in THREAD_VARIABLES if name not in environ]
    for name in added:
        environ[name] = str(n)
    in_force = {name: environ[name] for name in THREAD_VARIABLES}
    logger.info("thread pools: %s (%d usable CPUs: affinity capped by the cgroup CPU quota; set values are kept)",
                ", ".join(f"{k}={v}" for k, v in in_force.items()), n)
    try:
        yield in_force
    finally:
        for name in added:
            environ.pop(name, None)

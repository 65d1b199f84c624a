"""Thread pools sized to the CPUs the process may use: affinity capped by the cgroup quota (v2 and v1,
read from fake cgroup folders), applied by the CLI before libraries load, and restored afterwards."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import conceptlens
from conceptlens import _threads
from conceptlens._threads import THREAD_VARIABLES, thread_limits, usable_cpus


@pytest.fixture
def eight_cpus(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)


def _cgroup(root, files):
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


@pytest.mark.parametrize(
    "files, expected",
    [
        ({}, 8),                                                                   # no cgroup files: affinity
        ({"cpu.max": "max 100000\n"}, 8),                                          # v2, no quota
        ({"cpu.max": "250000 100000\n"}, 3),                                       # v2: 2.5 CPUs, rounded up
        ({"cpu.max": "50000 100000\n"}, 1),                                        # v2: half a CPU is still one
        ({"cpu.max": "2000000 100000\n"}, 8),                                      # a quota above affinity
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, 8),  # v1, no quota
        ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2),
        ({"cpu,cpuacct/cpu.cfs_quota_us": "400000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, 4),
        ({"cpu.max": "garbage\n"}, 8),                                             # unreadable: affinity
    ],
)
def test_usable_cpus_reads_affinity_and_cgroup_quota(tmp_path, eight_cpus, files, expected):
    assert usable_cpus(_cgroup(tmp_path, files)) == expected


def test_thread_limits_fill_unset_variables_and_restore_them():
    env = {"OMP_NUM_THREADS": "5"}
    with thread_limits(3, environ=env) as in_force:
        assert in_force == {name: "5" if name == "OMP_NUM_THREADS" else "3" for name in THREAD_VARIABLES}
        assert env == in_force
    assert env == {"OMP_NUM_THREADS": "5"}  # the user's value is kept, ours are removed


def test_torch_loaded_inside_the_limits_uses_them():
    code = ("from conceptlens._threads import thread_limits\n"
            "with thread_limits(1):\n    import torch\n    import numpy\n"
            "print(torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    env["PYTHONPATH"] = str(Path(conceptlens.__file__).parents[1])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "1"


def test_cli_applies_and_logs_them(monkeypatch, capsys):
    from conceptlens import cli

    seen = {}
    monkeypatch.setattr(_threads, "usable_cpus", lambda: 3)
    for name in THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cli, "_cmd_layers", lambda args: seen.update({n: os.environ.get(n) for n in THREAD_VARIABLES}))
    assert cli.main(["-v", "layers", "demo:x.pt"]) == 0
    assert seen == {name: "3" for name in THREAD_VARIABLES}
    assert "thread pools: OMP_NUM_THREADS=3" in capsys.readouterr().err
    assert not any(name in os.environ for name in THREAD_VARIABLES)

"""CLI startup: what a user waits for before a command starts working.

Every figure is the wall-clock time of a fresh ``python`` process (interpreter start, imports,
the command, exit), measured with ``time.perf_counter`` around ``subprocess.run``; each is the
median of ``--repeats`` runs, and all runs are made in this one invocation, interleaved, so
machine load affects both sides of a ratio alike. Figures:

* ``cli_help_seconds``: ``python -m conceptlens --help``.
* ``cli_layers_over_import_torch``: ``python -m conceptlens layers demo:W.pt --input-size 64``
  (parse, load the demo CNN and its sidecar, trace a 1x3x64x64 input, print the table) divided by
  ``python -c "import torch"`` (target <= 1.5: the command costs little beyond the torch import
  it cannot avoid). ``W.pt`` is built first in a temp dir: a 48-image 16 px world and
  ``train_demo(..., epochs=1)``, not timed.
* ``import_concepts_seconds``: ``python -c "import conceptlens.concepts.tcav"`` (the TCAV analyzer
  and everything it imports: torch, scipy.stats, scikit-learn's linear models; never UMAP,
  openTSNE or FAISS, which ``tests/test_import_boundaries.py`` checks), printed with its ratio to
  ``import torch`` (``import_concepts_over_import_torch``).

The package measured is this checkout's (the processes run in the repository root, which is also
their ``PYTHONPATH``), not an installed copy. Usage: python benchmarks/startup.py [--repeats 7]
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _seconds(argv, env):
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as tmp:
        build = ("import sys\nfrom conceptlens.world import generate_world\nfrom conceptlens.demo_model import train_demo\n"
                 "w = generate_world(sys.argv[1] + '/world', n=48, size=16, seed=0, progress=False)\n"
                 "train_demo(w.root, sys.argv[1] + '/demo.pt', epochs=1, progress=False)")
        subprocess.run([sys.executable, "-c", build, tmp], check=True, env=env, cwd=ROOT)
        commands = {
            "help": [sys.executable, "-m", "conceptlens", "--help"],
            "layers": [sys.executable, "-m", "conceptlens", "layers", f"demo:{tmp}/demo.pt", "--input-size", "64"],
            "torch": [sys.executable, "-c", "import torch"],
            "concepts": [sys.executable, "-c", "import conceptlens.concepts.tcav"],
        }
        for argv in commands.values():  # warm the file cache: the first run of each is not timed
            _seconds(argv, env)
        times = {name: [] for name in commands}
        for _ in range(args.repeats):
            for name, argv in commands.items():
                times[name].append(_seconds(argv, env))
    median = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"# {name}: median {median[name]:.3f} s of {', '.join(f'{s:.2f}' for s in t)}")
    print(f"BENCH cli_help_seconds {median['help']:.3f}")
    print(f"BENCH cli_layers_over_import_torch {median['layers'] / median['torch']:.3f}")
    print(f"BENCH import_concepts_seconds {median['concepts']:.3f}")
    print(f"BENCH import_concepts_over_import_torch {median['concepts'] / median['torch']:.3f}")


if __name__ == "__main__":
    main()

"""Decision modes: the cost of the tree over the one gradient pass it needs; SmoothTaylor's AOPC.

1. Trains the demo CNN on a small tag world (1,200 images) and draws a second world of the same
   preset with ``4 x images`` images, so that ``images`` of them are circles.
2. ``decision_tree_over_gradient_pass``: wall time of ``decision_tree`` on those circles at
   ``relu3`` (the gradient pass that keeps each image's gradient and map, the unit contributions on
   a 2 x 2 grid, Ward merging, node fidelities, prototypes), divided by the floor measured in the
   same run: one bare ``core.iter_gradients`` pass over the same rows, layer and class with the
   same loader and batch size, which only reads the images and computes the gradients. Each side
   is timed best of ``--repeat`` (the first call of each pays for page faults). Target <= 1.3.
3. ``smoothtaylor_aopc_vs_ig``: ``benchmarks/smoothtaylor_aopc.py``'s figure (see its docstring:
   MoRF AOPC of default SmoothTaylor maps over integrated gradients', same images, targets and
   perturbation call) on the first 32 test images of the small world, with the same trained model.

    python benchmarks/decision_tree.py [--images 5000] [--repeat 3]
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from smoothtaylor_aopc import smoothtaylor_aopc_vs_ig, test_images  # the script's folder is on sys.path

from conceptlens.core.extract import iter_gradients
from conceptlens.data import Manifest, make_loader
from conceptlens.decision import decision_tree
from conceptlens.demo_model import train_demo
from conceptlens.models import load_model
from conceptlens.world import generate_world

LAYER = "relu3"
BATCH = 64


def _best(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def tree_over_gradient_pass(model, manifest, repeat):
    rows = np.flatnonzero((manifest.frame["label"] == "circle").to_numpy())
    target = model.class_index("circle")
    prep = model.preprocessing_for(manifest)

    def floor():
        for _ in iter_gradients(model, make_loader(manifest, prep, batch_size=BATCH, rows=rows), [LAYER], [target]):
            pass

    def tree():
        decision_tree(model, manifest, LAYER, "circle", batch_size=BATCH, progress=False)

    floor()  # warm-up: first-batch checks, allocator, file cache
    t_floor, t_tree = _best(floor, repeat), _best(tree, repeat)
    print(f"{len(rows)} circles at {LAYER}: gradient pass {t_floor:.2f} s, decision tree {t_tree:.2f} s")
    return t_tree / t_floor


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=5000, help="circles in the tree (default 5000)")
    ap.add_argument("--repeat", type=int, default=3, help="best of N timings per side (default 3)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        small = generate_world(tmp / "train", n=1200, size=64, seed=3, n_concept=40, n_random=240, progress=False)
        train_demo(small.root, tmp / "demo.pt", epochs=12, seed=0, progress=False)
        model = load_model(f"demo:{tmp / 'demo.pt'}", device="cpu")
        big = generate_world(tmp / "big", n=4 * args.images, size=64, seed=4, n_concept=1, n_random=1, progress=False)
        ratio = tree_over_gradient_pass(model, Manifest.read(big.root / "manifest.csv"), args.repeat)
        x, y = test_images(small.root, model, 32)
        aopc = smoothtaylor_aopc_vs_ig(model, x, y, verbose=True)
    print(f"BENCH decision_tree_over_gradient_pass {ratio:.3f}")
    print(f"BENCH smoothtaylor_aopc_vs_ig {aopc:.3f}")


if __name__ == "__main__":
    main()

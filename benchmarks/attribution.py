"""Attribution: batched region perturbation vs the same computation one image at a time, and the
time per image of every attribution method, on the demo CNN, in one run.

A concept world (600 images, 64 px, tag-biased) and the demo CNN trained on it (8 epochs) are built
into a temporary folder first (~20-40 s on 2 cores), unless ``--world`` and ``--model`` are given.

Figures:

* ``aopc_batched_speedup``: wall time of :func:`region_perturbation` run one image at a time (a
  loop of calls, one per image, method and order, so every perturbation step is a batch-1 forward)
  divided by one call over all images, methods and orders (target >= 5); same maps, patches and
  steps; the curves must agree (checked). On a CPU the ratio is bounded by how much better the
  demo CNN runs per image at batch 32 (the default chunk; channels-last images on both sides)
  than at batch 1: about 3x for the forward alone on 2 cores, plus the per-call work the loop
  repeats; it is large on a GPU and swings with other load on a shared CPU (load average printed).
* ``attribution_ms_per_image_<method>``: milliseconds per image of :func:`attribute` for each method
  at its default settings (batch 32).

Usage: python benchmarks/attribution.py [--images 32] [--steps 16] [--repeats 3] [--method-images 8] [--world W --model M]
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from conceptlens.attribution import METHODS, attribute, region_perturbation
from conceptlens.data import Manifest, load_images
from conceptlens.models import load_model


def _setup(work, world, model):
    if world is None or model is None:
        from conceptlens.demo_model import train_demo
        from conceptlens.world import generate_world

        world = generate_world(Path(work) / "world", n=600, size=64, seed=1, n_concept=4, n_random=8).root
        train_demo(world, Path(work) / "demo.pt", epochs=8, seed=0, progress=False)
        model = f"demo:{Path(work) / 'demo.pt'}"
    return Path(world), load_model(model, device="cpu")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=32, help="images of the region-perturbation comparison")
    ap.add_argument("--steps", type=int, default=16, help="perturbation steps (of 64 regions of 8 px)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats of each side (best is kept)")
    ap.add_argument("--method-images", type=int, default=8, help="images per method for the timing table")
    ap.add_argument("--world", default=None, help="an existing concept world (with --model)")
    ap.add_argument("--model", default=None, help="a model spec trained on --world")
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as work:
        t0 = time.perf_counter()
        world, model = _setup(work, args.world, args.model)
        print(f"setup (world + demo CNN) {time.perf_counter() - t0:.1f} s; torch threads {torch.get_num_threads()}, "
              f"CPU load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        manifest = Manifest.read(world / "manifest.csv")
        test = manifest.subset(manifest.frame["split"] == "test")
        test = test.subset(np.arange(len(test)) < max(args.images, args.method_images))
        x = load_images(test, model.preprocessing)
        y = torch.tensor([model.class_index(c) for c in test.frame["label"]])

        xs, ys = x[: args.images], y[: args.images]
        maps = {m: attribute(model, xs, ys, m) for m in ("saliency", "lrp-epsilon-plus-flat")}
        kw = dict(patch=8, steps=args.steps, baseline="blur")
        print(f"region perturbation: {len(xs)} images x {len(maps)} methods x 2 orders x {args.steps + 1} steps, "
              f"{xs.shape[-1]} px, patch 8")

        def run_batched():
            return region_perturbation(model, xs, ys, maps, **kw)

        def run_single():
            # The peer: every (method, order, image) on its own, so each step is a batch-1 forward.
            return np.stack([np.stack([np.concatenate([
                region_perturbation(model, xs[i:i + 1], ys[i:i + 1], {m: maps[m][i:i + 1]}, orders=[o], **kw).curves[0, 0]
                for i in range(len(xs))]) for o in batched.orders]) for m in batched.methods])

        batched = run_batched()  # also the warm-up
        t_batched, t_single = [], []
        for _ in range(args.repeats):  # interleaved, best of each: the 2-core machine is shared and noisy
            t0 = time.perf_counter()
            batched = run_batched()
            t_batched.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            single = run_single()
            t_single.append(time.perf_counter() - t0)
        t_batched, t_single = min(t_batched), min(t_single)
        same = np.allclose(batched.curves, single, rtol=1e-4, atol=1e-4)
        print(f"  batched {t_batched:.2f} s, one image at a time {t_single:.2f} s (best of {args.repeats}), "
              f"curves identical: {same}")
        print(batched.aopc().to_string(index=False))

        xm, ym = x[: args.method_images], y[: args.method_images]
        times = {}
        for name in METHODS:
            attribute(model, xm[:1], ym[:1], name)  # warm-up (lazy imports, first-call overheads)
            t0 = time.perf_counter()
            attribute(model, xm, ym, name)
            times[name] = 1000 * (time.perf_counter() - t0) / len(xm)
        print(f"time per image, {len(xm)} images of {xm.shape[-1]} px, default settings:")
        for name, ms in times.items():
            print(f"  {name:<32} {ms:9.1f} ms")

    print(f"BENCH aopc_batched_speedup {t_single / t_batched:.2f}")
    for name, ms in times.items():
        print(f"BENCH attribution_ms_per_image_{name.replace('-', '_')} {ms:.1f}")
    if not same:
        raise SystemExit("batched and per-image curves differ")


if __name__ == "__main__":
    main()

"""Attribution: batched region perturbation vs a plain per-image loop (the peer), and the time per
image of every attribution method, on the demo CNN, in one run.

A concept world (600 images, 64 px, tag-biased) and the demo CNN trained on it (8 epochs) are built
into a temporary folder first (~20-40 s on 2 cores), unless ``--world`` and ``--model`` are given.

Figures:

* ``aopc_batched_speedup``: wall time of the peer divided by one call of :func:`region_perturbation`
  over all images, methods and orders (target >= 5). The peer is written here, the obvious way (as
  Quantus does region perturbation): for each image, one forward of the clean image and one blur
  of it; then for each method and order, rank its patches by summed relevance, and for each step
  copy the next patch from the blurred image into the perturbed copy, forward that one image
  (batch 1, NCHW) and record the target logit. Both sides get the same images, targets, maps
  (computed once, outside both timings), 8-px patches, steps, ranking (summed relevance, MoRF
  descending / LeRF ascending, ties to the lower patch index — row-major), baseline fill (torchvision
  ``gaussian_blur``, sigma 4, kernel 17, of the clean image) and number of forwards (N clean
  + N x methods x orders x steps); each side's timing covers its blur, ranking, perturbation and
  forwards. AOPC (mean over images of the mean over steps 0..L of f(x_0) - f(x_k)) of both sides is
  checked equal (the maximum difference is printed; the script fails beyond 1e-4). On a CPU the
  ratio is bounded by how much better the demo CNN runs per image at batch 32 (channels-last) than
  at batch 1, plus the per-image Python work the loop repeats; it is large on a GPU and swings with
  other load on a shared CPU (load average printed).
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


def peer_region_perturbation(module, x, target, maps, orders, patch, steps):
    """The peer: region perturbation one image at a time, written the obvious way.

    Returns curves ``[methods, orders, N, steps + 1]`` of the target logit (step 0: clean image).
    """
    from torchvision.transforms.v2.functional import gaussian_blur

    n, _, h, w = x.shape
    sigma = patch / 2
    k = int(2 * round(2 * sigma) + 1)
    slices = [(slice(r, r + patch), slice(c, c + patch)) for r in range(0, h, patch) for c in range(0, w, patch)]
    curves = np.empty((len(maps), len(orders), n, steps + 1))
    module.eval()
    with torch.inference_mode():
        for i in range(n):
            image, t = x[i:i + 1], int(target[i])
            blurred = gaussian_blur(image, kernel_size=[k, k], sigma=[sigma, sigma])
            clean = module(image)[0, t].item()
            for a, attribution in enumerate(maps.values()):
                sums = np.array([float(attribution[i][sy, sx].sum()) for sy, sx in slices])
                for o, order in enumerate(orders):
                    ranking = np.argsort(-sums if order == "morf" else sums, kind="stable")
                    perturbed = image.clone()
                    curves[a, o, i, 0] = clean
                    for step in range(1, steps + 1):
                        sy, sx = slices[ranking[step - 1]]
                        perturbed[..., sy, sx] = blurred[..., sy, sx]
                        curves[a, o, i, step] = module(perturbed)[0, t].item()
    return curves


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
        orders = ("morf", "lerf")
        kw = dict(patch=8, steps=args.steps, baseline="blur", orders=orders)
        print(f"region perturbation: {len(xs)} images x {len(maps)} methods x 2 orders x {args.steps + 1} steps, "
              f"{xs.shape[-1]} px, patch 8")

        def run_batched():
            return region_perturbation(model, xs, ys, maps, **kw)

        def run_peer():
            return peer_region_perturbation(model.module, xs, ys, maps, orders, kw["patch"], args.steps)

        batched = run_batched()  # also the warm-up
        t_batched, t_peer = [], []
        for _ in range(args.repeats):  # interleaved, best of each: the 2-core machine is shared and noisy
            t0 = time.perf_counter()
            batched = run_batched()
            t_batched.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            peer = run_peer()
            t_peer.append(time.perf_counter() - t0)
        t_batched, t_peer = min(t_batched), min(t_peer)
        table = batched.aopc()
        table["aopc_peer"] = [float((peer[i, j, :, :1] - peer[i, j]).mean()) for i in range(len(batched.methods))
                              for j in range(len(orders))]
        aopc_diff = float((table["aopc"] - table["aopc_peer"]).abs().max())
        curve_diff = float(np.abs(batched.curves - peer).max())
        print(f"  batched {t_batched:.2f} s, per-image loop {t_peer:.2f} s (best of {args.repeats}); "
              f"max |AOPC difference| {aopc_diff:.2e}, max |curve difference| {curve_diff:.2e} (logits)")
        print(table.to_string(index=False))
        if aopc_diff > 1e-4:
            raise SystemExit(f"batched and per-image AOPC differ by {aopc_diff:.2e} (> 1e-4): not the same work")

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

    print(f"BENCH aopc_batched_speedup {t_peer / t_batched:.2f}")
    for name, ms in times.items():
        print(f"BENCH attribution_ms_per_image_{name.replace('-', '_')} {ms:.1f}")


if __name__ == "__main__":
    main()

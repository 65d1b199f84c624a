"""SmoothTaylor vs integrated gradients: region-perturbation AOPC on the demo CNN.

Figure ``smoothtaylor_aopc_vs_ig``: the MoRF AOPC of ``smooth-taylor`` divided by the MoRF AOPC of
``integrated-gradients``, both at their defaults (SmoothTaylor: 32 roots centred at the input, noise
0.15 of each image's value range, seed 0; IG: zero baseline, 32 Gauss-Legendre steps), both maps
reduced to ``[N, H, W]`` by their default channel sum (signed). Nothing is timed for the figure.
Both sides get the same images (the first ``--images`` test images of the world), the same targets
(their labels) and one call of :func:`region_perturbation` over both maps together: 8-px patches,
``--steps`` steps, blur baseline (sigma 4), target logit, AOPC = mean over images of the mean over
steps 0..L of f(x_0) - f(x_k). Above 1: SmoothTaylor's most relevant regions hurt the logit more.

Also printed, not part of the figure: both orders (MoRF, LeRF) of each map, the wall time of the
two default ``attribute`` calls, and diagnostic maps of the same images in the same perturbation
call: the magnitude ``|sum over channels|`` of the default SmoothTaylor map (the heatmap the paper
ranks regions by), the ``random`` control and, with ``--adaptive``, SmoothTaylor with adaptive noise.

The world (600 images, 64 px) and demo CNN (8 epochs) come from ``benchmarks/attribution.py``'s
setup (~20-40 s on 2 cores), unless ``--world`` and ``--model`` are given.

Usage: python benchmarks/smoothtaylor_aopc.py [--images 32] [--steps 16] [--adaptive] [--world W --model M]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from conceptlens.attribution import attribute, region_perturbation
from conceptlens.data import Manifest, load_images

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attribution import _setup  # noqa: E402  (the shared world + demo CNN setup of the attribution benchmark)

PERTURBATION = dict(patch=8, baseline="blur", orders=("morf", "lerf"))


def smoothtaylor_aopc_vs_ig(model, x, target, steps=16, extra_maps=None, verbose=False):
    """MoRF AOPC of default SmoothTaylor maps over that of default integrated-gradients maps.

    Parameters
    ----------
    model : LoadedModel
    x : Tensor ``[N, C, H, W]``
        Preprocessed images.
    target : Tensor ``[N]``
        Class per image.
    steps : int
        Region-perturbation steps (of 8-px patches, blur baseline).
    extra_maps : dict, optional
        More ``{name: maps [N, H, W]}`` perturbed in the same call, for the printed table only.
    verbose : bool
        Print the attribution times and the AOPC table of every map (both orders).

    Returns
    -------
    float
    """
    t0 = time.perf_counter()
    st, raw = attribute(model, x, target, "smooth-taylor", raw=True)
    t_st = time.perf_counter() - t0
    t0 = time.perf_counter()
    ig = attribute(model, x, target, "integrated-gradients")
    t_ig = time.perf_counter() - t0
    maps = {"smooth-taylor": st, "integrated-gradients": ig, "|smooth-taylor|": raw.sum(1).abs(), **(extra_maps or {})}
    table = region_perturbation(model, x, target, maps, steps=steps, **PERTURBATION).aopc()
    if verbose:
        print(f"attribute: smooth-taylor {t_st:.2f} s, integrated-gradients {t_ig:.2f} s for {len(x)} images")
        print(f"region perturbation AOPC: {len(x)} images, {x.shape[-1]} px, patch 8, {steps} steps, blur baseline")
        print(table.pivot(index="method", columns="order", values="aopc").loc[list(maps)].to_string())
    morf = table[table["order"] == "morf"].set_index("method")["aopc"]
    return float(morf["smooth-taylor"] / morf["integrated-gradients"])


def test_images(world, model, n):
    """The first ``n`` test images of a world's manifest, preprocessed, and their labels as class indices."""
    manifest = Manifest.read(Path(world) / "manifest.csv")
    test = manifest.subset(manifest.frame["split"] == "test")
    test = test.subset(np.arange(len(test)) < n)
    return load_images(test, model.preprocessing), torch.tensor([model.class_index(c) for c in test.frame["label"]])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=32, help="test images")
    ap.add_argument("--steps", type=int, default=16, help="perturbation steps (of 64 regions of 8 px)")
    ap.add_argument("--adaptive", action="store_true", help="also SmoothTaylor with adaptive noise (8x its cost)")
    ap.add_argument("--world", default=None, help="an existing concept world (with --model)")
    ap.add_argument("--model", default=None, help="a model spec trained on --world")
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as work:
        t0 = time.perf_counter()
        world, model = _setup(work, args.world, args.model)
        print(f"setup (world + demo CNN) {time.perf_counter() - t0:.1f} s; torch threads {torch.get_num_threads()}")
        x, y = test_images(world, model, args.images)
        extra = {"random": attribute(model, x, y, "random")}
        if args.adaptive:
            extra["smooth-taylor adaptive"] = attribute(model, x, y, "smooth-taylor", noise_scale="adaptive")
        ratio = smoothtaylor_aopc_vs_ig(model, x, y, steps=args.steps, extra_maps=extra, verbose=True)
    print(f"BENCH smoothtaylor_aopc_vs_ig {ratio:.3f}")


if __name__ == "__main__":
    main()

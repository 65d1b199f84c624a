"""Feature visualisation: batched against one at a time, against torch-lucent, and how far it drives units.

Trains the demo CNN on a small concept world (1,200 images, 64 px), then, for the channels of its
last conv layer ``conv4``:

1. ``featurevis_batched_speedup``: wall time of ``visualize`` of ``--channels`` channels one at a
   time (``batch_size=1``) over the time of the same call batched (``batch_size`` = all channels).
   Both sides: the same objectives (channel means), ``--steps`` Adam steps at lr 0.05, the Fourier
   parameterisation, the default transforms, 64 px, the same seeds. Target >= 3.
2. ``featurevis_vs_lucent``: seconds per visualisation of torch-lucent's ``render_vis`` (its
   defaults: Fourier, decorrelated colour, Adam lr 0.05, its standard transforms; one objective per
   call, ``--steps`` steps, a 64-px image, on ``--lucent-channels`` channels) over ours (the batched
   run of item 1). Printed when torch-lucent imports (``pip install --no-deps torch-lucent
   kornia==0.4.1 decorator ipython``: its own pins would downgrade nothing here but drag in test
   tools); otherwise the reason is printed and the figure is ``nan``.
3. ``featurevis_activation_ratio``: the median over channels of the achieved objective (the
   channel's mean activation on its visualisation, no transforms) over that channel's largest mean
   activation on the world's 1,200 images. Above 1: the image drives the unit harder than any
   dataset image.

    python benchmarks/featurevis.py [--channels 64] [--steps 128] [--lucent-channels 8]
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from conceptlens.core.extract import iter_activations
from conceptlens.data import Manifest, make_loader
from conceptlens.demo_model import train_demo
from conceptlens.featurevis import channel, visualize
from conceptlens.models import load_model
from conceptlens.world import generate_world

LAYER, SIZE = "conv4", 64


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def lucent_seconds_per_image(module, channels, steps):
    try:
        from lucent.optvis import param, render
    except Exception as exc:  # noqa: BLE001 - any import failure is the answer we print
        print(f"torch-lucent unavailable ({type(exc).__name__}: {exc}); featurevis_vs_lucent not measured")
        return float("nan")
    module.eval()
    t0 = time.perf_counter()
    for c in channels:
        render.render_vis(module, f"{LAYER}:{c}", param_f=lambda: param.image(SIZE), thresholds=(steps,),
                          show_image=False, progress=False)
    return (time.perf_counter() - t0) / len(channels)


def dataset_maxima(model, manifest):
    prep = model.preprocessing_for(manifest)
    means = torch.cat([p[LAYER] for _, p, _ in iter_activations(model, make_loader(manifest, prep), [LAYER], pool="mean")])
    return means.amax(0).numpy()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--channels", type=int, default=64, help="channels of conv4 visualised (default all 64)")
    ap.add_argument("--steps", type=int, default=128, help="Adam steps on every side (default 128)")
    ap.add_argument("--lucent-channels", type=int, default=8, help="channels torch-lucent renders, one call each")
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        world = generate_world(tmp / "world", n=1200, size=SIZE, seed=3, n_concept=4, n_random=8, progress=False)
        train_demo(world.root, tmp / "demo.pt", epochs=12, seed=0, progress=False)
        model = load_model(f"demo:{tmp / 'demo.pt'}", device="cpu")
        objectives = [channel(LAYER, c) for c in range(args.channels)]
        run = dict(size=SIZE, steps=args.steps, progress=False)
        visualize(model, objectives[:2], **{**run, "steps": 2})  # warm-up: kernels, allocator
        batched, t_batched = _timed(lambda: visualize(model, objectives, batch_size=len(objectives), **run))
        _, t_single = _timed(lambda: visualize(model, objectives, batch_size=1, **run))
        lucent = lucent_seconds_per_image(model.module, range(args.lucent_channels), args.steps)
        ratio = np.median(batched.objective_values / dataset_maxima(model, Manifest.read(world.root / "manifest.csv"))[: args.channels])
    ours = t_batched / len(objectives)
    print(f"{len(objectives)} channels of {LAYER}, {args.steps} steps, {SIZE} px: batched {t_batched:.2f} s, "
          f"one at a time {t_single:.2f} s; ours {ours:.3f} s per image, torch-lucent {lucent:.3f} s per image")
    print(f"BENCH featurevis_batched_speedup {t_single / t_batched:.3f}")
    print(f"BENCH featurevis_vs_lucent {lucent / ours:.3f}")
    print(f"BENCH featurevis_activation_ratio {ratio:.3f}")


if __name__ == "__main__":
    main()

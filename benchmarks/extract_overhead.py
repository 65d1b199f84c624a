"""Extraction overhead: pooled capture into an ActivationStore vs a plain forward pass, and RSS.

torchvision resnet18 (random init), 128 px inputs, 512 images in batches of 64, all in memory so
both paths see the same batches. Figures:

* ``extract_over_forward_throughput``: images/s of pooled (mean) capture of layer1..layer4 into a
  store divided by images/s of ``model(x)`` under ``inference_mode`` (target >= 0.9); best of 3.
* ``extract_spatial_rss_growth``: peak RSS of a spatial (``pool=none``) capture of the same layers
  at 4x the images divided by peak RSS at 1x, each in a fresh process (target ~1: flat).

Usage: python benchmarks/extract_overhead.py [--images 512] [--repeats 3]
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from conceptlens.models import load_model
from conceptlens.core.extract import write_batches
from conceptlens.core.store import StoreWriter

LAYERS = ["layer1", "layer2", "layer3", "layer4"]
SIZE, BATCH = 128, 64


def _model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model("torchvision:resnet18", num_classes=10, device="cpu")


def _batches(n, seed=0):
    """Seeded random batches generated on the fly (memory does not grow with n)."""
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, n, BATCH):
        b = min(BATCH, n - start)
        yield torch.arange(start, start + b), torch.randn(b, 3, SIZE, SIZE, generator=gen)


def _extract(model, batches, n, out, pool, dtype):
    writer = StoreWriter(out, {"benchmark": pool, "n": n}, n)
    write_batches(model, batches, LAYERS, writer, pool, dtype, progress=False)


def throughput(n, repeats):
    model = _model()
    batches = list(_batches(n))
    with torch.inference_mode():  # warm-up
        model.module(batches[0][1])
    fwd, ext = [], []
    for r in range(repeats):
        t0 = time.perf_counter()
        with torch.inference_mode():
            for _, x in batches:
                model.module(x)
        fwd.append(n / (time.perf_counter() - t0))
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            _extract(model, batches, n, Path(d) / "store", "mean", "float32")
            ext.append(n / (time.perf_counter() - t0))
    return max(fwd), max(ext)


def rss_child(n):
    """Run in a fresh process: spatial capture of n images; print peak RSS in MiB."""
    model = _model()
    with tempfile.TemporaryDirectory() as d:
        _extract(model, _batches(n), n, Path(d) / "store", "none", "float16")
        size = sum(f.stat().st_size for f in (Path(d) / "store").glob("*.npy"))
    print(json.dumps({"rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "store_mib": size / 2**20}))


def peak_rss(n):
    out = subprocess.run([sys.executable, __file__, "--rss-child", str(n)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child is not None:
        rss_child(args.rss_child)
        return
    torch.manual_seed(0)
    print(f"resnet18 random init, {SIZE} px, {args.images} images, batch {BATCH}, torch threads {torch.get_num_threads()}")
    fwd, ext = throughput(args.images, args.repeats)
    ratio = ext / fwd
    print(f"plain forward: {fwd:.1f} img/s   pooled extraction of {','.join(LAYERS)} into a store: {ext:.1f} img/s")
    small, large = peak_rss(args.images), peak_rss(4 * args.images)
    growth = large["rss_mib"] / small["rss_mib"]
    print(f"spatial capture peak RSS: {small['rss_mib']:.0f} MiB for {args.images} images "
          f"(store {small['store_mib']:.0f} MiB), {large['rss_mib']:.0f} MiB for {4 * args.images} "
          f"(store {large['store_mib']:.0f} MiB)")
    print(f"BENCH extract_over_forward_throughput {ratio:.3f}")
    print(f"BENCH extract_spatial_rss_growth {growth:.3f}")


if __name__ == "__main__":
    main()

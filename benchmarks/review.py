"""The dataset review: its cost over the one extraction it needs, the necrosis slice, the leakage audit.

1. Builds a biased ``histo`` world (N images, 64 px; site and pen shortcuts, leaking patients,
   near-duplicates, label noise) and trains the demo CNN on it.
2. ``review_over_extract``: wall time of ``build_review`` from an empty folder (the capture pass,
   probes with their random-init and pixel baselines, k-NN label votes, near-duplicates, shortcut
   tests, Domino slices with the k-means baseline, leakage, confident-learning label issues, the
   page), divided by the time of the one capture it needs, timed alone in the same run: one
   ``core.capture`` of the same manifest with the same requests (mean-pooled store of the spec's
   layers, the layout store of the near-duplicate layer) and the logits. Target ≤ 1.3.
3. ``slice_precision_at_10``: precision@10 against the planted ``subclass == necrosis`` of the
   review's best Domino slice (Domino's criterion, target ≥ 0.8); ``slice_ap_vs_kmeans``: the best
   Domino slice's average precision over the best k-means cluster's, on the same features
   (target ≥ 1.2).
4. ``leakage_audit_rows_per_s``: ``group_leakage`` on a synthetic manifest of 10⁶ rows (200,000
   patients, 3 splits, 0.5 % of patients leaking), rows per second (target: 10⁶ rows in < 10 s).

    python benchmarks/review.py [--n 5000] [--epochs 6]
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from conceptlens.core import StoreRequest, capture
from conceptlens.data import Manifest
from conceptlens.demo_model import train_demo
from conceptlens.models import load_model
from conceptlens.report import build_review, load_spec
from conceptlens.report.sections import LAYOUT_POOL
from conceptlens.review import average_precision, group_leakage, precision_at_k
from conceptlens.world import generate_world

SPEC = """
title = "review benchmark"
[model]
spec = "demo:{weights}"
device = "cpu"
[data]
manifest = "{manifest}"
[layers]
names = ["relu1", "conv3", "conv4"]
[dataset]
layer = "relu1"
duplicate_threshold = 0.99
[review]
group = "patient"
sensitive = ["site", "pen"]
group_attributes = ["site"]
layer = "conv4"
"""


def leakage_rows_per_s(n=1_000_000, seed=0):
    rng = np.random.default_rng(seed)
    patients = rng.integers(0, 200_000, n)
    split = np.array(["train", "val", "test"])[rng.choice(3, n, p=[0.7, 0.1, 0.2])]
    leaking = rng.random(200_000) < 0.005
    # Non-leaking patients keep one split: their first row's.
    first = pd.Series(split).groupby(patients).transform("first").to_numpy()
    split = np.where(leaking[patients], split, first)
    frame = pd.DataFrame({"patient": [f"P{p:06d}" for p in patients], "split": split})
    t0 = time.perf_counter()
    res = group_leakage(frame, "patient")
    seconds = time.perf_counter() - t0
    print(f"leakage audit: {n} rows, {res.totals['leaking_groups']} leaking patients in {seconds:.2f} s")
    return n / seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--epochs", type=int, default=6)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-review-"))
    t0 = time.perf_counter()
    world = generate_world(tmp / "world", preset="histo", n=args.n, size=64, seed=0, leak_patients=10, near_duplicates=20,
                           label_noise=0.03, n_concept=10, n_random=20, n_broden=10, progress=False)
    print(f"histo world: {args.n} images in {time.perf_counter() - t0:.1f} s")
    side = train_demo(world.root, tmp / "demo.pt", epochs=args.epochs, seed=0, device="cpu", progress=False)
    print(f"demo CNN: test accuracy {side['test_accuracy']:.3f} in {side['train_seconds']:.0f} s")
    spec_path = tmp / "review.toml"
    spec_path.write_text(SPEC.format(weights=tmp / "demo.pt", manifest=world.manifest))
    spec = load_spec(spec_path)

    # The floor: the one capture the review needs, alone (same requests, logits), into its own folder.
    model = load_model(spec.model, device="cpu")
    manifest = Manifest.read(world.manifest)
    t0 = time.perf_counter()
    capture(model, manifest, [StoreRequest(tmp / "floor" / "store", list(spec.layers), "mean"),
                              StoreRequest(tmp / "floor" / "layout", [spec.duplicate_layer], LAYOUT_POOL)],
            logits=True, batch_size=spec.batch_size, progress=False)
    extract_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    built = build_review(spec, tmp / "out", progress=False)
    review_s = time.perf_counter() - t0
    print(f"capture alone {extract_s:.1f} s; whole review {review_s:.1f} s")
    for st in built.stages:
        print(f"  {st['name']:<12} {st['seconds']:6.1f} s")

    frame = pd.read_csv(world.manifest, dtype=str, keep_default_na=False)
    scores = built.result.tables["slice_scores"]
    truth = (frame.loc[scores["manifest_row"], "subclass"] == "necrosis").to_numpy()
    ours = [c for c in scores if c.startswith("domino_")]
    base = [c for c in scores if c.startswith("kmeans_")]
    p10 = max(precision_at_k(scores[c].to_numpy(), truth, k=10) for c in ours)
    ap = max(average_precision(scores[c].to_numpy(), truth) for c in ours)
    ap_km = max(average_precision(scores[c].to_numpy(), truth) for c in base)
    print(f"necrosis ({int(truth.sum())} of {len(truth)} evaluation images): best Domino slice precision@10 {p10:.2f}, "
          f"AP {ap:.3f}; best k-means cluster AP {ap_km:.3f}")
    rows_per_s = leakage_rows_per_s()

    print(f"BENCH review_over_extract {review_s / extract_s:.3f}")
    print(f"BENCH slice_precision_at_10 {p10:.3f}")
    print(f"BENCH slice_ap_vs_kmeans {ap / ap_km:.3f}")
    print(f"BENCH leakage_audit_rows_per_s {rows_per_s:.0f}")


if __name__ == "__main__":
    main()

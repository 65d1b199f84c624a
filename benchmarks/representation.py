"""Representation analyzers against their peers, in one run (ratios, same machine, same inputs).

* ``knn_speedup_vs_sklearn``: time of scikit-learn ``NearestNeighbors(algorithm="brute",
  metric="cosine").fit(x).kneighbors()`` over time of
  :func:`conceptlens.representation.neighbors.knn` (exact, L2-normalised float32: the blocked
  symmetric self-join), both finding the 10 neighbours of every row of a 50 000 x 512 set among
  the others - the dataset-review query (target >= 3); the fraction of rows with identical
  neighbour sets is printed (target 1.0 for flat). ``knn_faiss_flat_speedup_vs_sklearn`` is the
  same ratio for a FAISS ``IndexFlatIP`` search of every row (the self-join's peer).
* ``tsne_speedup_vs_sklearn``: scikit-learn ``TSNE`` (Barnes-Hut, PCA init, perplexity 30) over
  :func:`conceptlens.representation.embed.embed_features` (openTSNE) on the same PCA-50 input of a
  20 000-point Gaussian mixture (target >= 2); both trustworthiness values are printed.
* ``probe_acc_diff_vs_sklearn``: test accuracy of :func:`~conceptlens.representation.probes.probe`
  minus that of ``LogisticRegression()`` with scikit-learn defaults fitted to the same
  standardized features, in points (target within +-1), on mean-pooled ``layer3`` features of
  resnet18 (random init) over a 6000-image concept world at 64 px (1500 test rows: at fewer, one
  point is below the test-set noise), same split. ``probe_acc_diff_vs_sklearn_raw`` is the same
  against the defaults on the raw features, where L-BFGS stops at ``max_iter=100`` before
  converging; ``probe_speedup_vs_sklearn`` is the time ratio sklearn defaults / our probe (no
  control, no CI; ours standardizes and fits to convergence).
* ``topk_extract_overhead``: extra time of pooled extraction into a store with a
  :class:`~conceptlens.representation.topk.TopK` observer over extraction without it (fraction,
  target <= 0.05); best of ``--repeats``.

Usage: python benchmarks/representation.py [--knn-n 50000] [--tsne-n 20000]
"""

import argparse
import logging
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.manifold import TSNE
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import StandardScaler

from conceptlens.data import Manifest, Preprocessing, make_loader
from conceptlens.models import load_model
from conceptlens.representation.embed import _trust, embed_features
from conceptlens.representation.extract import write_batches
from conceptlens.representation.neighbors import knn
from conceptlens.representation.probes import probe
from conceptlens.representation.store import StoreWriter
from conceptlens.representation.topk import TopK
from conceptlens.world import generate_world

LAYERS = ["layer1", "layer2", "layer3", "layer4"]


def _timed(fn, *a, **kw):
    t0 = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t0


def bench_knn(n, dim, k=10):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(100, dim)).astype(np.float32)
    x = centres[rng.integers(0, 100, n)] + rng.normal(scale=0.7, size=(n, dim)).astype(np.float32)
    (ours, sims), t_ours = _timed(knn, x, k)
    (faiss_inds, _), t_faiss = _timed(knn, x, k + 1, queries=x)  # FAISS IndexFlatIP search of every row (self included)
    sk = NearestNeighbors(n_neighbors=k, algorithm="brute", metric="cosine", n_jobs=-1)
    (dist, ref), t_sk = _timed(lambda: sk.fit(x).kneighbors())  # no X: every row, itself excluded
    differ = np.flatnonzero([set(a) != set(b) for a, b in zip(ours, ref)])
    # A differing row is a tie when both k-th similarities agree to float32 precision.
    ties = [i for i in differ if abs(sims[i, -1] - (1 - dist[i, -1])) < 1e-5]
    same = 1 - len(differ) / n
    faiss_same = np.mean([set(a) == set(b[b != i][:k]) for i, (a, b) in enumerate(zip(ours, faiss_inds))])
    print(f"kNN of all {n} x {dim} rows among themselves, k={k}: ours (blocked symmetric self-join) {t_ours:.2f} s, "
          f"FAISS IndexFlatIP search {t_faiss:.2f} s, sklearn brute {t_sk:.2f} s; identical neighbour sets vs sklearn "
          f"{same:.4f} ({len(differ)} rows differ, {len(ties)} of them float32 ties at rank k), vs FAISS {faiss_same:.4f}")
    return t_sk / t_ours, t_sk / t_faiss, same


def bench_tsne(n, dim=50):
    rng = np.random.default_rng(1)
    centres = rng.normal(scale=4, size=(20, dim))
    x = (centres[rng.integers(0, 20, n)] + rng.normal(size=(n, dim))).astype(np.float32)
    (ours, desc, trust_ours), t_ours = _timed(embed_features, x, "tsne", pca_components=None, n_jobs=2, seed=0)
    sk = TSNE(n_components=2, perplexity=30, init="pca", random_state=0, n_jobs=2)
    ref, t_sk = _timed(sk.fit_transform, x)
    trust_sk = _trust(x, ref, 10, 4000, 0)
    print(f"t-SNE {n} x {dim}: {desc} {t_ours:.1f} s (trustworthiness {trust_ours:.3f}); "
          f"sklearn TSNE(barnes_hut) {t_sk:.1f} s (trustworthiness {trust_sk:.3f})")
    return t_sk / t_ours


def _world_batches(root, n, size):
    world = generate_world(root / "world", n=n, size=64, seed=0, progress=False)
    manifest = Manifest.read(world.manifest)
    prep = Preprocessing(resize=size, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    return manifest, list(make_loader(manifest, prep, batch_size=64))


def _extract(model, batches, n, out, observers):
    writer = StoreWriter(out, {"benchmark": "topk", "n": n}, n)
    write_batches(model, batches, LAYERS, writer, "mean", "float32", observers=observers, progress=False)
    return writer


def bench_topk_and_probe(root, n, size, repeats):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model("torchvision:resnet18", num_classes=10, device="cpu")
    manifest, batches = _world_batches(root, n, size)
    plain, with_topk = [], []
    _extract(model, batches[:2], 128, root / "warm", [])
    for r in range(repeats):
        _, t = _timed(_extract, model, batches, n, root / f"plain{r}", [])
        plain.append(t)
        _, t = _timed(_extract, model, batches, n, root / f"topk{r}", [TopK(k=16, score="max")])
        with_topk.append(t)
    overhead = min(with_topk) / min(plain) - 1
    print(f"extraction of {','.join(LAYERS)} (resnet18, {size} px, {n} images): {min(plain):.2f} s plain, "
          f"{min(with_topk):.2f} s with a TopK(k=16) observer (best of {repeats})")

    writer = _extract(model, batches, n, root / "store", [])
    store = writer.finish(manifest.frame)
    res, t_ours = _timed(probe, store, ["label"], ["layer3"], n_controls=0, n_bootstrap=0, progress=False)
    ours = res.get("layer3", "label")["accuracy"]
    x, rows = store.load("layer3"), store.rows
    train = (rows["split"] == "train").to_numpy()
    y = rows["label"].to_numpy()
    scaler = StandardScaler().fit(x[train])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn's defaults stop at max_iter=100 before converging
        scaled, t_sk = _timed(LogisticRegression().fit, scaler.transform(x[train]), y[train])
        raw = LogisticRegression().fit(x[train], y[train])
    ref = float(np.mean(scaled.predict(scaler.transform(x[~train])) == y[~train]))
    ref_raw = float(np.mean(raw.predict(x[~train]) == y[~train]))
    full, t_full = _timed(probe, store, ["label"], ["layer3"], progress=False)
    print(f"probe of layer3 ({x.shape[1]} features, {train.sum()} train / {(~train).sum()} test): ours {ours:.4f} in "
          f"{t_ours:.2f} s, sklearn LogisticRegression() defaults on the same standardized features {ref:.4f} in "
          f"{t_sk:.2f} s, on the raw features {ref_raw:.4f}; ours with 3 controls and 1000 bootstrap resamples {t_full:.2f} s")
    return overhead, 100 * (ours - ref), 100 * (ours - ref_raw), t_sk / t_ours


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--knn-n", type=int, default=50_000)
    parser.add_argument("--knn-dim", type=int, default=512)
    parser.add_argument("--tsne-n", type=int, default=20_000)
    parser.add_argument("--world-n", type=int, default=6000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    print(f"torch threads {torch.get_num_threads()}")
    knn_speedup, faiss_speedup, same = bench_knn(args.knn_n, args.knn_dim)
    tsne_speedup = bench_tsne(args.tsne_n)
    with tempfile.TemporaryDirectory() as d:
        overhead, acc_diff, acc_diff_raw, probe_speedup = bench_topk_and_probe(Path(d), args.world_n, args.size, args.repeats)
    print(f"BENCH knn_speedup_vs_sklearn {knn_speedup:.2f}")
    print(f"BENCH knn_faiss_flat_speedup_vs_sklearn {faiss_speedup:.2f}")
    print(f"BENCH knn_identical_fraction {same:.4f}")
    print(f"BENCH tsne_speedup_vs_sklearn {tsne_speedup:.2f}")
    print(f"BENCH probe_acc_diff_vs_sklearn {acc_diff:.2f}")
    print(f"BENCH probe_acc_diff_vs_sklearn_raw {acc_diff_raw:.2f}")
    print(f"BENCH probe_speedup_vs_sklearn {probe_speedup:.2f}")
    print(f"BENCH topk_extract_overhead {overhead:.3f}")


if __name__ == "__main__":
    main()

"""Representation analyzers against their peers, in one run (ratios, same machine, same inputs).

What each side times, exactly:

* ``knn_speedup_vs_sklearn``: time of scikit-learn ``NearestNeighbors(algorithm="brute",
  metric="cosine", n_jobs=-1).fit(x).kneighbors()`` over time of
  :func:`conceptlens.representation.neighbors.knn` (exact, L2-normalised float32: the blocked
  symmetric self-join), both finding the 10 neighbours of every row of a 50 000 x 512 set among
  the others - the dataset-review query (target >= 3); both timings include normalisation and the
  whole search. The fraction of rows with identical neighbour sets is printed (target 1.0 for
  flat). ``knn_faiss_flat_speedup_vs_sklearn`` is the same ratio for a FAISS ``IndexFlatIP``
  search of every row (the self-join's peer).
* ``tsne_speedup_vs_sklearn``: scikit-learn ``TSNE`` (Barnes-Hut, PCA init, perplexity 30,
  ``max_iter=750`` with early stopping disabled) over openTSNE as
  :func:`conceptlens.representation.embed.embed_features` runs it (PCA init, perplexity 30, FFT
  gradients from 10 000 points, 250 early-exaggeration + 500 iterations = 750), on the same
  50-D input of a 20 000-point Gaussian mixture, both with 2 threads (target >= 2). Each side
  times only its fit (affinities + optimisation); trustworthiness of both maps is computed
  afterwards, outside the timings, on the same seeded 4000-row subsample, and printed.
* ``probe_acc_diff_vs_sklearn``: test accuracy of :func:`~conceptlens.representation.probes.probe`
  minus that of ``LogisticRegression(C=1, max_iter=1000)`` (lbfgs, sklearn's ``tol=1e-4``: the
  probe's own settings) fitted to the same standardized features, in points (target within
  +-1), on mean-pooled ``layer3`` features of resnet18 (random init) over a 6000-image concept
  world at 64 px (1500 test rows: at fewer, one point is below the test-set noise), same split.
  ``probe_speedup_vs_sklearn`` is sklearn's fit time over the probe's fit time (best of ``--repeats``,
  alternating) on those same
  standardized arrays with the same convergence criterion (the probe *is* that fit, so the
  target is ~1: it shows the probe adds no cost; neither side times standardization, baselines,
  null or bootstrap). ``probe_acc_diff_vs_sklearn_raw`` is not like for like: the difference to
  ``LogisticRegression()`` with sklearn's defaults on the *raw* features (``max_iter=100``, which
  stops before converging) - what standardizing and converging buy.
* ``topk_extract_overhead``: extra time of pooled extraction into a store with a
  :class:`~conceptlens.representation.topk.TopK` observer over extraction without it (fraction,
  target <= 0.05); best of ``--repeats``.
* ``label_issue_precision_at_cut`` / ``label_issue_recall_at_cut``: on ``--review-seeds`` concept
  worlds (``generate_world(n=2000, label_noise=0.05, near_duplicates=10)``, a demo CNN trained on
  each), the planted flipped labels among the rows :func:`~conceptlens.representation.neighbors.
  neighbors` flags at its default cut (``p_label <= 0.1``, ``relu4``, k=10), pooled over worlds.
  ``duplicate_precision_at_cut`` / ``duplicate_recall_at_cut``: the planted near-duplicate pairs
  among the candidates at the default cut (distance <= 0.3 x the median nearest-neighbour
  distance, ``relu1`` pooled to 4x4). The 0.3 ratio was chosen on a world of seed 7, which the
  default seeds exclude. No timing.

Usage: python benchmarks/representation.py [--knn-n 50000] [--tsne-n 20000] [--world-n 6000]
       [--review-seeds 11,12,13]
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
from conceptlens.demo_model import train_demo
from conceptlens.models import load_model, random_init_copy
from conceptlens.representation.embed import _trust, _tsne
from conceptlens.core.extract import extract, write_batches
from conceptlens.representation.neighbors import knn
from conceptlens.representation.neighbors import neighbors
from conceptlens.representation.probes import _fit_scaled, _standardize, probe
from conceptlens.core.store import StoreWriter
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


def bench_tsne(n, dim=50, iters=750):
    rng = np.random.default_rng(1)
    centres = rng.normal(scale=4, size=(20, dim))
    x = (centres[rng.integers(0, 20, n)] + rng.normal(size=(n, dim))).astype(np.float32)
    # Ours: the openTSNE call embed_features makes (pca_components=None: the input is already 50-D).
    (ours, desc), t_ours = _timed(_tsne, x, 2, 30.0, 0, 2)
    sk = TSNE(n_components=2, perplexity=30, init="pca", random_state=0, n_jobs=2, max_iter=iters,
              n_iter_without_progress=iters, min_grad_norm=0.0)
    ref, t_sk = _timed(sk.fit_transform, x)
    trust_ours, trust_sk = _trust(x, ours, 10, 4000, 0), _trust(x, ref, 10, 4000, 0)  # outside the timings
    print(f"t-SNE {n} x {dim}, {iters} iterations each: {desc} {t_ours:.1f} s (trustworthiness {trust_ours:.3f}); "
          f"sklearn TSNE(barnes_hut, max_iter={iters}, ran {sk.n_iter_ + 1}) {t_sk:.1f} s (trustworthiness {trust_sk:.3f})")
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


def bench_topk_and_probe(root, n, size, repeats, permutations=19):
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
    res = probe(store, ["label"], ["layer3"], n_permutations=0, n_bootstrap=0, progress=False)  # accuracy only (logs: no baseline)
    ours = res.get("layer3", "label")["accuracy"]
    x, rows = store.load("layer3"), store.rows
    train = (rows["split"] == "train").to_numpy()
    y = rows["label"].to_numpy()
    z_tr, z_te = _standardize(x[train], x[~train])  # the same standardized arrays for both fits
    t_ours, t_sk = [], []
    for _ in range(repeats):  # alternating, best of `repeats`: the machine may be shared
        t_ours.append(_timed(_fit_scaled, z_tr, y[train], z_te, 1.0, 1000)[1])
        sk, t = _timed(LogisticRegression(C=1.0, max_iter=1000).fit, z_tr, y[train])
        t_sk.append(t)
    t_ours, t_sk = min(t_ours), min(t_sk)
    ref = float(np.mean(sk.predict(z_te) == y[~train]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn's defaults stop at max_iter=100 before converging
        raw = LogisticRegression().fit(x[train], y[train])
    ref_raw = float(np.mean(raw.predict(x[~train]) == y[~train]))
    base = _extract(random_init_copy(model, seed=1), batches, n, root / "baseline", []).finish(manifest.frame)
    full, t_full = _timed(probe, store, ["label"], ["layer3"], baseline=base, n_permutations=permutations, progress=False)
    r = full.get("layer3", "label")
    print(f"probe of layer3 ({x.shape[1]} features, {train.sum()} train / {(~train).sum()} test): ours {ours:.4f}, fit "
          f"{t_ours:.2f} s; sklearn LogisticRegression(C=1, max_iter=1000) on the same standardized features {ref:.4f}, "
          f"fit {t_sk:.2f} s (n_iter {int(np.max(sk.n_iter_))}); sklearn defaults on the raw features {ref_raw:.4f}. "
          f"Full probe with a random-init baseline (another seed of the same random resnet18), {permutations} permutations and "
          f"1000 bootstrap resamples: {t_full:.2f} s, selectivity {r['selectivity']:+.3f}")
    return overhead, 100 * (ours - ref), 100 * (ours - ref_raw), t_sk / t_ours


def bench_review(root, seeds, n=2000, epochs=12):
    """Precision and recall of the default label-issue and near-duplicate cuts on planted worlds."""
    tallies = np.zeros((2, 3), dtype=np.int64)  # [label, duplicate] x [flagged, true positives, planted]
    for seed in seeds:
        world = generate_world(root / f"review{seed}", n=n, size=64, seed=seed, label_noise=0.05, near_duplicates=10,
                               progress=False)
        weights = root / f"review{seed}.pt"
        train_demo(world.root, weights, epochs=epochs, seed=0,
                   device="cpu", progress=False)
        model = load_model(f"demo:{weights}", device="cpu")
        manifest = Manifest.read(world.manifest)
        sem = extract(model, manifest, ["relu4"], root / f"sem{seed}", pool="mean", progress=False)
        lay = extract(model, manifest, ["relu1"], root / f"lay{seed}", pool="adaptive:4", progress=False)
        res = neighbors(sem, "relu4", k=10)
        rows = res.rows
        noisy = set(np.flatnonzero(rows["label_noise"].to_numpy() == 1))
        flagged = set(res.label_issues["row"])
        dup = neighbors(lay, "relu1", label_column=None)
        pos = {im: i for i, im in enumerate(rows["image"])}
        truth = {tuple(sorted((pos[a], pos[b]))) for a, b in zip(rows["duplicate_of"], rows["image"]) if a}
        found = {tuple(sorted(p)) for p in zip(dup.duplicates["row_a"], dup.duplicates["row_b"])}
        counts = np.array([[len(flagged), len(flagged & noisy), len(noisy)], [len(found), len(found & truth), len(truth)]])
        tallies += counts
        print(f"review world seed {seed} (n={n}): {counts[0, 0]} label-issue candidates, {counts[0, 1]} of the {counts[0, 2]} "
              f"planted flips; {counts[1, 0]} near-duplicate candidates ({len(dup.leaks)} across splits), {counts[1, 1]} of "
              f"the {counts[1, 2]} planted pairs")
    with np.errstate(invalid="ignore", divide="ignore"):
        precision, recall = tallies[:, 1] / tallies[:, 0], tallies[:, 1] / tallies[:, 2]
    return precision, recall


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--knn-n", type=int, default=50_000)
    parser.add_argument("--knn-dim", type=int, default=512)
    parser.add_argument("--tsne-n", type=int, default=20_000)
    parser.add_argument("--world-n", type=int, default=6000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--review-seeds", default="11,12,13", help="seeds of the planted review worlds ('' to skip)")
    parser.add_argument("--review-n", type=int, default=2000)
    parser.add_argument("--probe-permutations", type=int, default=19, help="permutations of the (informational) full-probe timing")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    print(f"torch threads {torch.get_num_threads()}")
    knn_speedup, faiss_speedup, same = bench_knn(args.knn_n, args.knn_dim)
    tsne_speedup = bench_tsne(args.tsne_n)
    with tempfile.TemporaryDirectory() as d:
        overhead, acc_diff, acc_diff_raw, probe_speedup = bench_topk_and_probe(Path(d), args.world_n, args.size, args.repeats,
                                                                               args.probe_permutations)
        seeds = [int(v) for v in args.review_seeds.split(",") if v]
        review = bench_review(Path(d), seeds, args.review_n) if seeds else None
    print(f"BENCH knn_speedup_vs_sklearn {knn_speedup:.2f}")
    print(f"BENCH knn_faiss_flat_speedup_vs_sklearn {faiss_speedup:.2f}")
    print(f"BENCH knn_identical_fraction {same:.4f}")
    print(f"BENCH tsne_speedup_vs_sklearn {tsne_speedup:.2f}")
    print(f"BENCH probe_acc_diff_vs_sklearn {acc_diff:.2f}")
    print(f"BENCH probe_acc_diff_vs_sklearn_raw {acc_diff_raw:.2f}")
    print(f"BENCH probe_speedup_vs_sklearn {probe_speedup:.2f}")
    print(f"BENCH topk_extract_overhead {overhead:.3f}")
    if review is not None:
        (label_p, dup_p), (label_r, dup_r) = review
        print(f"BENCH label_issue_precision_at_cut {label_p:.3f}")
        print(f"BENCH label_issue_recall_at_cut {label_r:.3f}")
        print(f"BENCH duplicate_precision_at_cut {dup_p:.3f}")
        print(f"BENCH duplicate_recall_at_cut {dup_r:.3f}")


if __name__ == "__main__":
    main()

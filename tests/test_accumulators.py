"""Every mergeable accumulator: a world split into 2 and 3 shards, accumulated apart and merged,
equals one pass over the whole."""

import numpy as np
import pytest
import torch

from conceptlens.core import Accumulator, RunningMoments, TopK, extract, merge_all, read_broden
from conceptlens.dissection.iou import IoUTally, label_batch, label_columns
from conceptlens.dissection.quantiles import GridQuantileSketch
from conceptlens.errors import ConceptLensError

N_IMAGES = 120
LAYERS = ["relu2", "conv4"]  # non-negative maps and signed maps


@pytest.fixture(scope="module")
def broden_maps(world_dir, demo_model, tmp_path_factory):
    """The world's Broden set and the demo model's spatial maps of its first images."""
    broden = read_broden(world_dir / "broden")
    manifest = broden.manifest()
    manifest = manifest.subset(np.arange(len(manifest)) < N_IMAGES)
    store = extract(demo_model, manifest, LAYERS, tmp_path_factory.mktemp("acc") / "maps", pool="none",
                    dtype="float32", batch_size=40, progress=False)
    return broden, {layer: np.asarray(store.load(layer)) for layer in LAYERS}


def _shards(n_shards, batch=16):
    """Row batches of each shard: contiguous shards cut at uneven points, each read in batches."""
    cuts = (np.linspace(0, N_IMAGES, n_shards + 1) + np.r_[0, [7] * (n_shards - 1), 0]).astype(int)
    return [[np.arange(a, b)[i:i + batch] for i in range(0, b - a, batch)] for a, b in zip(cuts[:-1], cuts[1:])]


def _run(make, feed, n_shards):
    """Accumulate each shard in a fresh accumulator, then merge them (last shard first, to show
    that order does not matter for these accumulators)."""
    accs = []
    for shard in _shards(n_shards):
        acc = make()
        for rows in shard:
            feed(acc, rows)
        accs.append(acc)
    return merge_all(accs[::-1])


@pytest.mark.parametrize("n_shards", [2, 3])
def test_topk_shards_merge_to_one_pass(broden_maps, n_shards):
    _, maps = broden_maps

    def feed(acc, rows):
        acc.update(rows, {layer: torch.from_numpy(maps[layer][rows]) for layer in LAYERS})

    for score in ("max", "mean"):
        one = _run(lambda: TopK(5, score), feed, 1).result()
        merged = _run(lambda: TopK(5, score), feed, n_shards)
        assert isinstance(merged, Accumulator) and merged.n_seen == N_IMAGES
        for layer in LAYERS:
            for a, b in zip(merged.result()[layer], one[layer]):
                np.testing.assert_array_equal(a, b)
        # and one pass is the brute-force ranking
        flat = maps["conv4"].reshape(N_IMAGES, maps["conv4"].shape[1], -1)
        s = flat.max(axis=2) if score == "max" else np.maximum(flat, 0).mean(axis=2)
        np.testing.assert_array_equal(one["conv4"][1][3], np.lexsort((np.arange(N_IMAGES), -s[:, 3]))[:5])


@pytest.mark.parametrize("n_shards", [2, 3])
def test_quantile_sketch_shards_merge_to_one_pass(broden_maps, n_shards):
    _, maps = broden_maps
    m = maps["conv4"]

    def passes(n):
        sketch = None
        for stage in ("range", "start_coarse", "start_fine"):
            if sketch is None:
                make = lambda: GridQuantileSketch(m.shape[1], 0.99, bins=16)  # noqa: E731
            else:
                getattr(sketch, stage)()
                make = sketch.spawn
            sketch = _run(make, lambda acc, rows: acc.update(m[rows]), n)
        return sketch.result()

    np.testing.assert_array_equal(passes(n_shards), passes(1))


@pytest.mark.parametrize("n_shards", [2, 3])
@pytest.mark.parametrize("rule", ["paper", "netdissect-lite"])
def test_iou_tally_shards_merge_to_one_pass(broden_maps, n_shards, rule):
    broden, maps = broden_maps
    columns = label_columns(broden, rule)
    m = maps["relu2"]
    thr = np.quantile(m.transpose(1, 0, 2, 3).reshape(m.shape[1], -1), 0.9, axis=1)

    def feed(acc, rows):
        acc.update(torch.from_numpy(m[rows]), thr, label_batch(broden, rows, columns))

    one = _run(lambda: IoUTally(m.shape[1], columns), feed, 1)
    merged = _run(lambda: IoUTally(m.shape[1], columns), feed, n_shards)
    assert merged.n_images == one.n_images == N_IMAGES
    for name in IoUTally._ARRAYS:
        np.testing.assert_array_equal(getattr(merged, name), getattr(one, name))
    np.testing.assert_array_equal(merged.result(), one.result())
    assert one.intersection.sum() > 0  # the world's masks overlap the units somewhere


@pytest.mark.parametrize("n_shards", [2, 3])
def test_running_moments_shards_merge_to_one_pass(broden_maps, n_shards):
    _, maps = broden_maps
    pooled = maps["conv4"].mean(axis=(2, 3)).astype(np.float64) + 1e4  # a large mean: no cancellation
    one = _run(lambda: RunningMoments(pooled.shape[1]), lambda acc, rows: acc.update(pooled[rows]), 1).result(ddof=1)
    merged = _run(lambda: RunningMoments(pooled.shape[1]), lambda acc, rows: acc.update(pooled[rows]), n_shards).result(ddof=1)
    assert merged.n == one.n == N_IMAGES
    # floating-point sums in another order: equal to the last few ulps, and both equal NumPy's
    np.testing.assert_allclose(merged.mean, one.mean, rtol=1e-14)
    np.testing.assert_allclose(merged.var, one.var, rtol=1e-9)
    np.testing.assert_allclose(one.mean, pooled.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(one.var, pooled.var(axis=0, ddof=1), rtol=1e-9)


def test_merge_refuses_mismatched_accumulators():
    with pytest.raises(ConceptLensError, match="cannot merge TopK"):
        TopK(3).merge(TopK(4))
    with pytest.raises(ConceptLensError, match="cannot merge RunningMoments"):
        RunningMoments(3).merge(RunningMoments(4))
    with pytest.raises(ConceptLensError, match=r"needs \[rows, 3\] batches"):
        RunningMoments(3).update(np.zeros((2, 4)))
    with pytest.raises(ConceptLensError, match="at least one"):
        merge_all([])
    a = GridQuantileSketch(2, 0.5, 4)
    a.update(np.zeros((3, 2)))
    a.start_coarse()
    with pytest.raises(ConceptLensError, match="same units, quantile, bins and stage"):
        a.merge(GridQuantileSketch(2, 0.5, 4))


def test_merge_leaves_its_inputs_unchanged():
    a, b = RunningMoments(2), RunningMoments(2)
    a.update([[1.0, 2.0], [3.0, 4.0]])
    b.update([[5.0, 6.0]])
    before = (a.n, a.mean.copy(), a.m2.copy())
    a.merge(b)
    assert a.n == before[0] and np.array_equal(a.mean, before[1]) and np.array_equal(a.m2, before[2])

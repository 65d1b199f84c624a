"""Streaming top-k during extraction equals a brute-force NumPy ranking; merging shards is exact."""

import numpy as np
import pandas as pd
import pytest
import torch

from conceptlens.data import Manifest
from conceptlens.errors import ConceptLensError
from conceptlens.core.extract import extract
from conceptlens.core.topk import TopK
from conceptlens.representation.topk import TopKResult, topk, topk_from_store

LAYERS = ["relu2", "conv4", "fc"]  # post-ReLU maps, signed maps, and vector outputs


@pytest.fixture(scope="module")
def small(world_dir, tmp_path_factory):
    manifest = Manifest.read(world_dir / "manifest.csv")
    return manifest.subset(np.arange(len(manifest)) < 150)


@pytest.fixture(scope="module")
def spatial(small, demo_model, tmp_path_factory):
    """Spatial float32 maps of the same images (the brute-force reference), and the top-k seen in that pass."""
    acc = {s: TopK(k=5, score=s) for s in ("max", "mean")}
    store = extract(demo_model, small, LAYERS, tmp_path_factory.mktemp("topk") / "maps", pool="none", dtype="float32",
                    batch_size=32, observers=list(acc.values()), progress=False)
    return store, {s: TopKResult.from_accumulator(a, small) for s, a in acc.items()}


def _brute(maps, score, k):
    """Per channel: rows sorted by descending score, ties by row; argmax cell (first maximum)."""
    flat = maps.reshape(len(maps), maps.shape[1], -1)
    s = flat.max(axis=2) if score == "max" else np.maximum(flat, 0).mean(axis=2)
    arg = flat.argmax(axis=2)
    out = {}
    for c in range(s.shape[1]):
        order = np.lexsort((np.arange(len(s)), -s[:, c]))[:k]
        out[c] = (order, s[order, c], arg[order, c])
    return out


@pytest.mark.parametrize("score", ["max", "mean"])
def test_streamed_topk_equals_brute_force(spatial, score):
    store, results = spatial
    res = results[score]
    assert res.params["n_seen"] == 150
    for layer in LAYERS:
        maps = store.load(layer)
        if maps.ndim == 2:
            maps = maps[:, :, None, None]
        ref = _brute(maps, score, 5)
        h, w = maps.shape[2:]
        for c, (rows, scores, arg) in ref.items():
            got = res.top(layer, c)
            np.testing.assert_array_equal(got["manifest_row"], rows)
            np.testing.assert_allclose(got["score"], scores, rtol=1e-6)
            if h * w > 1:
                np.testing.assert_array_equal(got["y"] * w + got["x"], arg)
            else:
                assert (got["y"] == -1).all()


def test_merged_shards_equal_one_pass(spatial, small, demo_model, tmp_path):
    _, results = spatial
    halves = [small.subset(np.arange(len(small)) < 70), small.subset(np.arange(len(small)) >= 70)]
    accs = []
    for i, part in enumerate(halves):
        acc = TopK(k=5, score="max")
        offset = 0 if i == 0 else 70

        def observer(rows, raw, acc=acc, offset=offset):  # shard rows -> rows of the whole manifest
            acc(rows + offset, raw)

        extract(demo_model, part, LAYERS, tmp_path / f"shard{i}", batch_size=32, observers=[observer], progress=False)
        accs.append(acc)
    merged = TopKResult.from_accumulator(accs[1].merge(accs[0]), small)  # merge order does not matter
    pd.testing.assert_frame_equal(merged.table, results["max"].table)


def test_from_store_equals_streamed(spatial):
    store, results = spatial
    pd.testing.assert_frame_equal(topk_from_store(store, k=5, score="mean").table, results["mean"].table)


def test_topk_api_reuses_extraction_and_handles_a_reused_store(small, demo_model, spatial, tmp_path):
    ref = spatial[1]["max"].table
    first = topk(demo_model, small, LAYERS, k=5, store=tmp_path / "s", batch_size=32, progress=False)
    assert first.params["source"] == "extraction"
    again = topk(demo_model, small, LAYERS, k=5, store=tmp_path / "s", batch_size=32, progress=False)  # store complete
    assert again.params["source"] == "forward pass"
    for r in (first, again):
        pd.testing.assert_frame_equal(r.table, ref)


def test_crops_around_argmax(spatial, small, demo_model):
    res = spatial[1]["max"]
    prep = demo_model.preprocessing_for(small)
    crops = res.crops("relu2", 3, small, prep, size=0.25)
    assert len(crops) == 5 and all(c.shape == (16, 16, 3) and c.dtype == np.uint8 for c in crops)
    whole = res.crops("relu2", 3, small, prep, size=1.0)
    top = res.top("relu2", 3).iloc[0]
    cy, cx = int((top["y"] + 0.5) / top["height"] * 64), int((top["x"] + 0.5) / top["width"] * 64)
    y0, x0 = np.clip(cy - 8, 0, 48), np.clip(cx - 8, 0, 48)
    np.testing.assert_array_equal(crops[0], whole[0][y0:y0 + 16, x0:x0 + 16])


def test_roundtrip_and_bad_input(spatial, tmp_path, world_dir, demo_model):
    res = spatial[1]["max"]
    res.save(tmp_path)
    back = TopKResult.load(tmp_path)
    pd.testing.assert_frame_equal(back.table, res.table, check_dtype=False)
    assert back.params == res.params
    with pytest.raises(ConceptLensError, match="score parameter of TopK must be 'max' or 'mean'"):
        TopK(score="median")
    with pytest.raises(ConceptLensError, match="k parameter of TopK must be a positive integer"):
        TopK(k=0)
    pooled = extract(demo_model, Manifest.read(world_dir / "manifest.csv").subset(np.arange(1200) < 40), ["relu4"],
                     tmp_path / "pooled", progress=False)
    with pytest.raises(ConceptLensError, match="mean-pooled 'relu4'; top-k by max needs spatial maps"):
        topk_from_store(pooled)


def test_ties_rank_lower_row_first():
    acc = TopK(k=3)
    acc(torch.tensor([0, 1, 2]), {"l": torch.tensor([[1.0], [2.0], [2.0]])})
    acc(torch.tensor([3, 4]), {"l": torch.tensor([[2.0], [5.0]])})
    t = TopKResult.from_accumulator(acc).top("l", 0)
    assert list(t["manifest_row"]) == [4, 1, 2]


def test_order_key_matches_stable_sorts_on_negatives_zeros_and_ties():
    from conceptlens.core.topk import _top_indices

    rng = np.random.default_rng(0)
    values = np.array([-np.inf, -3.5, -1.0, -1e-30, -0.0, 0.0, 1e-30, 1.0, 2.5, np.inf], dtype=np.float32)
    scores = torch.from_numpy(rng.choice(values, size=(60, 7)))
    rows = torch.from_numpy(np.stack([rng.permutation(1000)[:60] for _ in range(7)], axis=1))
    got = _top_indices(scores, rows, 9)
    for c in range(7):
        # Reference: descending score (-0.0 == 0.0), ties by ascending row.
        ref = sorted(range(60), key=lambda i: (-float(scores[i, c]), int(rows[i, c])))[:9]
        assert got[:, c].tolist() == ref

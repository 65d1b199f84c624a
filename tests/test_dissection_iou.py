"""Thresholds and IoU tallies against straightforward loop references (tests/dissection_reference.py)."""

import numpy as np
import pytest
import scipy.sparse as sp

from conceptlens.core.broden import read_broden
from conceptlens.dissection.iou import IoUTally, label_batch, label_columns, unit_masks
from conceptlens.dissection.quantiles import GridQuantileSketch, exact_quantiles, load_thresholds, unit_quantiles
from conceptlens.errors import ConceptLensError
from dissection_reference import bilinear, reference_iou, reference_quantiles, tiny_broden


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return read_broden(tiny_broden(tmp_path_factory.mktemp("broden") / "b"))


def _maps(n, c=7, h=4, w=5, seed=1):
    rng = np.random.default_rng(seed)
    maps = np.maximum(rng.normal(size=(n, c, h, w)), 0).astype(np.float16).astype(np.float32)
    maps[:, 2] = 0.0  # a dead unit: never above its threshold 0
    maps[:, 4] = np.round(maps[:, 4])  # heavy ties
    return maps


def _chunks(maps, size):
    return lambda: (maps[i:i + size] for i in range(0, len(maps), size))


def test_exact_quantiles_equal_numpy():
    maps = _maps(40)
    for q in (0.5, 0.9, 0.995, 1.0, 0.0):
        ref = reference_quantiles(maps, q)
        got = exact_quantiles(_chunks(maps, 7)(), q, 7, 40 * 20)
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("bins", [4, 16, 1024])
def test_sketch_error_within_documented_bound(bins):
    maps = _maps(60, seed=bins)
    maps[:, 0] *= 1000.0  # wide range
    maps[:, 1] = np.exp(maps[:, 1] * 3)  # skewed
    for q in (0.995, 0.5, 0.9):
        res = unit_quantiles(_chunks(maps, 9), q, 7, 60 * 20, method="sketch", bins=bins)
        ref = reference_quantiles(maps, q)
        bound = (maps.max(axis=(0, 2, 3)) - maps.min(axis=(0, 2, 3))) / (2 * bins**2)
        np.testing.assert_allclose(res.error_bound, bound, rtol=1e-12)
        assert np.all(np.abs(res.values - ref) <= bound * (1 + 1e-9) + 1e-12), (q, res.values - ref, bound)
        assert res.error_bound[2] == 0 and res.values[2] == 0  # constant unit: exact
        assert "grid-sketch" in res.method


def test_sketch_shards_merge_to_whole():
    maps = _maps(30)
    whole = unit_quantiles(_chunks(maps, 30), 0.99, 7, 600, method="sketch", bins=8)
    shard_a, shard_b = maps[:12], maps[12:]
    a, b = GridQuantileSketch(7, 0.99, 8), GridQuantileSketch(7, 0.99, 8)
    a.update(shard_a)
    b.update(shard_b)
    a = a.merge(b)
    for start in ("start_coarse", "start_fine"):
        getattr(a, start)()
        b = a.spawn()
        a.update(shard_a)
        b.update(shard_b)
        a = a.merge(b)
    np.testing.assert_array_equal(a.result(), whole.values)
    with pytest.raises(ConceptLensError, match="same units, quantile, bins and stage"):
        a.merge(GridQuantileSketch(7, 0.99, 8))


def test_auto_method_follows_budget(caplog):
    maps = _maps(10)
    with caplog.at_level("INFO", logger="conceptlens.dissection.quantiles"):
        exact = unit_quantiles(_chunks(maps, 4), 0.9, 7, 200, memory_budget=10**6, name="L")
        sketch = unit_quantiles(_chunks(maps, 4), 0.9, 7, 200, memory_budget=100, name="L")
    assert "exact" in exact.method and "grid-sketch" in sketch.method
    assert "thresholds of L: exact" in caplog.text and "thresholds of L: sketch" in caplog.text
    with pytest.raises(ConceptLensError, match="quantile must be a number in"):
        unit_quantiles(_chunks(maps, 4), 1.5, 7, 200)


def test_load_thresholds_npy_npz_and_errors(tmp_path):
    np.save(tmp_path / "t.npy", np.arange(5.0))
    got = load_thresholds(tmp_path / "t.npy", ["a", "b"], {"a": 2, "b": 3})
    np.testing.assert_array_equal(got["b"], [2, 3, 4])
    np.savez(tmp_path / "t.npz", a=np.ones(2), b=np.zeros(3))
    assert load_thresholds(tmp_path / "t.npz", ["a", "b"], {"a": 2, "b": 3})["a"].tolist() == [1, 1]
    with pytest.raises(ConceptLensError, match=r"holds 5 values; expected 4 \(units of a=2, b=2"):
        load_thresholds(tmp_path / "t.npy", ["a", "b"], {"a": 2, "b": 2})
    with pytest.raises(ConceptLensError, match=r"no array for layer\(s\) \['c'\]"):
        load_thresholds(tmp_path / "t.npz", ["c"], {"c": 2})
    with pytest.raises(ConceptLensError, match="does not exist"):
        load_thresholds(tmp_path / "nope.npy", ["a"], {"a": 2})


def test_bilinear_reference_matches_torch_upsampling():
    # the two implementations used on either side of the IoU comparison agree
    import torch
    import torch.nn.functional as F

    f = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(f)[None, None], size=(9, 13), mode="bilinear", align_corners=False)[0, 0]
    np.testing.assert_allclose(bilinear(f, 9, 13), ref.numpy(), rtol=1e-5, atol=1e-6)


def _tally(broden, maps, thr, rule, rows):
    columns = label_columns(broden, rule)
    tally = IoUTally(maps.shape[1], columns)
    tally.update(maps[rows], thr, label_batch(broden, rows, columns))
    return tally


@pytest.mark.parametrize("rule", ["paper", "netdissect-lite"])
def test_iou_equals_loop_reference(tiny, rule):
    maps = _maps(len(tiny))
    thr = reference_quantiles(maps, 0.8)
    columns = label_columns(tiny, rule)
    tally = IoUTally(maps.shape[1], columns)
    for start in range(0, len(tiny), 5):  # shards of 5 images
        rows = list(range(start, min(start + 5, len(tiny))))
        tally.update(maps[rows], thr, label_batch(tiny, rows, columns))
    labels = {"number": columns.number, "category": [columns.categories[c] for c in columns.category]}
    ref = reference_iou(maps, thr, tiny, rule, labels)
    got = tally.result()
    assert np.isfinite(got).all() and got.max() > 0.1
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-12)
    assert tally.unit_area[2] == 0 and not got[2].any()  # dead unit: IoU 0, not NaN
    # shards merge to the whole
    a = _tally(tiny, maps, thr, rule, list(range(0, 6)))
    b = _tally(tiny, maps, thr, rule, list(range(6, len(tiny))))
    np.testing.assert_array_equal(a.merge(b).intersection, tally.intersection)
    np.testing.assert_array_equal(a.merge(b).result(), got)


def test_rules_differ_where_they_should(tiny):
    # "wheel" (3) is both object and part: the paper rule scores it per category, Lite once (main category)
    paper, lite = label_columns(tiny, "paper"), label_columns(tiny, "netdissect-lite")
    assert sorted(paper.number[paper.number == 3].tolist()) == [3, 3] and (lite.number == 3).sum() == 1
    assert len(paper) > len(lite) == len(tiny.labels)


def test_unit_masks_are_thresholded_upsampled_maps(tiny):
    maps = _maps(4)
    thr = reference_quantiles(maps, 0.7)
    lb = label_batch(tiny, [0, 1, 2, 3], label_columns(tiny))
    pair_image, pair_unit, masks = unit_masks(maps, thr, lb.shapes, lb.offsets)
    assert sp.issparse(masks) and masks.shape == (len(pair_unit), lb.offsets[-1])
    dense = masks.toarray()
    for p, (b, u) in enumerate(zip(pair_image, pair_unit)):
        sh, sw = lb.shapes[b]
        want = np.zeros(lb.offsets[-1], dtype=bool)
        want[lb.offsets[b]:lb.offsets[b + 1]] = (bilinear(maps[b, u], sh, sw) > thr[u]).ravel()
        np.testing.assert_array_equal(dense[p].astype(bool), want)
    skipped = maps.max(axis=(2, 3)) <= thr[None]
    assert len(pair_unit) == (~skipped).sum() and skipped.any()


def test_unknown_label_in_mask_is_an_error(tiny, tmp_path):
    import shutil

    root = tmp_path / "b"
    shutil.copytree(tiny.root, root)
    lines = (root / "c_part.csv").read_text().splitlines()
    (root / "c_part.csv").write_text("\n".join(l for l in lines if ",300," not in l) + "\n")
    broken = read_broden(root)
    with pytest.raises(ConceptLensError, match=r"line 2, column 'part': a mask holds label\(s\) \[300\] not listed in c_part.csv"):
        label_batch(broken, [0], label_columns(broken, "paper"))


@pytest.mark.parametrize("h, w, sh, sw", [(7, 7, 112, 112), (4, 5, 9, 13), (5, 3, 16, 10), (9, 11, 5, 7), (6, 6, 6, 6)])
def test_unit_hits_equal_dense_torch_upsampling(h, w, sh, sw):
    # the pruned path (pairs, cells, columns skipped by convexity) against upsampling every map
    # densely with torch; float16-valued maps and thresholds equal to map values make ties at T
    import torch
    import torch.nn.functional as F

    from conceptlens.dissection.iou import unit_hits

    rng = np.random.default_rng(h * 100 + sw)
    maps = rng.normal(size=(6, 9, h, w)).astype(np.float16).astype(np.float32)
    maps[:, 3] = np.round(maps[:, 3])  # plateaus at the threshold
    maps[1, 5] = maps[1, 5].max()  # a constant map
    thr = np.sort(maps.transpose(1, 0, 2, 3).reshape(9, -1), axis=1)[:, int(0.9 * 6 * h * w)]  # T = a map value
    thr[0] = -0.5  # a negative threshold
    shapes = np.full((6, 2), (sh, sw))
    shapes[2] = (sh + 3, sw + 1)  # another mask size in the batch
    offsets = np.concatenate([[0], np.cumsum(shapes[:, 0] * shapes[:, 1])])
    pair_image, pair_unit, hit_pair, hit_pixel = unit_hits(torch.from_numpy(maps), thr, shapes, offsets)
    assert len(np.unique(hit_pair * offsets[-1] + hit_pixel)) == len(hit_pair)  # each pixel once
    got = np.zeros((6, 9, offsets[-1]), dtype=bool)
    got[pair_image[hit_pair], pair_unit[hit_pair], hit_pixel] = True
    want = np.zeros_like(got)
    for b in range(6):
        up = F.interpolate(torch.from_numpy(maps[b:b + 1]), size=tuple(shapes[b]), mode="bilinear", align_corners=False)[0]
        keep = maps[b].max(axis=(1, 2)) > thr  # maps never above T are skipped, as in NetDissect-Lite
        want[b, :, offsets[b]:offsets[b + 1]] = (up.numpy() > thr[:, None, None]).reshape(9, -1) & keep[:, None]
    np.testing.assert_array_equal(got, want)
    assert (maps.max(axis=(2, 3)) > thr).sum() == len(pair_unit) < maps.shape[0] * maps.shape[1] and got.any()

"""Region perturbation (MoRF/LeRF, AOPC) against a one-region-at-a-time loop reference, the batched
run against per-image runs, AOPC of gradients beating a random map on the demo model, and the
localisation scores against brute-force numpy."""

import numpy as np
import pytest
import torch
from attribution_helpers import world_images

from conceptlens.attribution import LocalizationResult, PerturbationResult, attribute, localization, region_perturbation
from conceptlens.errors import ConceptLensError


@pytest.fixture(scope="module")
def test_set(demo_model, world_dir):
    x, frame = world_images(world_dir, demo_model, lambda f: f["split"] == "test", limit=24)
    y = torch.tensor([demo_model.classes.index(c) for c in frame["label"]])
    return x, y


def _reference_curve(module, x, target, amap, patch, steps, order, baseline):
    """One image, plain loops: sum relevance per region, sort, blank regions one by one, forward each."""
    h, w = amap.shape
    regions = [(i, j) for i in range(0, h, patch) for j in range(0, w, patch)]
    sums = np.array([amap[i:i + patch, j:j + patch].sum() for i, j in regions])
    order_idx = sorted(range(len(regions)), key=lambda r: (-sums[r] if order == "morf" else sums[r], r))
    xk = x.clone()
    scores = []
    with torch.no_grad():
        scores.append(float(module(xk[None])[0, target]))
        for r in order_idx[:steps]:
            i, j = regions[r]
            xk[:, i:i + patch, j:j + patch] = baseline[:, i:i + patch, j:j + patch]
            scores.append(float(module(xk[None])[0, target]))
    return np.array(scores)


def test_region_perturbation_matches_a_loop_reference(demo_model, test_set):
    x, y = test_set[0][:2], test_set[1][:2]
    maps = {"ixg": attribute(demo_model, x, y, "input-x-gradient"), "random": attribute(demo_model, x, y, "random")}
    res = region_perturbation(demo_model, x, y, maps, patch=16, steps=6, baseline="mean")
    assert res.curves.shape == (2, 2, 2, 7)
    np.testing.assert_allclose(res.fractions, np.arange(7) / 16)
    for mi, name in enumerate(maps):
        for oi, order in enumerate(("morf", "lerf")):
            for i in range(2):
                base = x[i].mean(dim=(1, 2), keepdim=True).expand_as(x[i])
                ref = _reference_curve(demo_model.module, x[i], int(y[i]), maps[name][i].numpy(), 16, 6, order, base)
                np.testing.assert_allclose(res.curves[mi, oi, i], ref, rtol=1e-4, atol=1e-4)
    aopc = res.aopc().set_index(["method", "order"])["aopc"]
    np.testing.assert_allclose(aopc["ixg", "morf"], (res.curves[0, 0, :, :1] - res.curves[0, 0]).mean(), rtol=1e-6)


def test_batched_run_equals_image_by_image_runs(demo_model, test_set):
    x, y = test_set[0][:4], test_set[1][:4]
    maps = attribute(demo_model, x, y, "saliency")
    together = region_perturbation(demo_model, x, y, maps, patch=8, steps=12, baseline="blur", batch_size=3)
    alone = [region_perturbation(demo_model, x[i:i + 1], y[i:i + 1], maps[i:i + 1], patch=8, steps=12, baseline="blur")
             for i in range(4)]
    np.testing.assert_allclose(together.curves, np.concatenate([r.curves for r in alone], axis=2), rtol=1e-4, atol=1e-4)


def test_gradient_aopc_beats_a_random_map(demo_model, test_set, tmp_path):
    x, y = test_set
    maps = {m: attribute(demo_model, x, y, m) for m in ("saliency", "input-x-gradient", "random")}
    res = region_perturbation(demo_model, x, y, maps, patch=8, steps=16, baseline="blur")
    a = res.aopc().set_index(["method", "order"])
    for m in ("saliency", "input-x-gradient"):
        # Most-relevant-first destroys the logit much faster than a random order; least-relevant-first barely.
        assert a.loc[(m, "morf"), "aopc"] > 1.5 * a.loc[("random", "morf"), "aopc"]
        assert a.loc[(m, "morf"), "aopc"] - a.loc[(m, "morf"), "aopc_sem"] * 3 > a.loc[("random", "morf"), "aopc"]
        assert a.loc[(m, "lerf"), "aopc"] < a.loc[("random", "lerf"), "aopc"]
    # A random order has no preferred direction: MoRF and LeRF agree within noise.
    assert abs(a.loc[("random", "morf"), "aopc"] - a.loc[("random", "lerf"), "aopc"]) < 0.5 * a.loc[("random", "morf"), "aopc"]
    back = PerturbationResult.load(res.save(tmp_path / "rp"))
    np.testing.assert_array_equal(back.curves, res.curves)
    assert back.methods == res.methods and back.params == res.params
    assert back.provenance["weights_hash"] == demo_model.weights_hash
    assert set(res.to_frame().columns) == {"method", "order", "step", "fraction", "score", "drop"}


def test_a_model_without_convolutions_gets_contiguous_images():
    # Conv nets get channels-last images; a model that .view()s its input must still get NCHW ones.
    torch.manual_seed(0)
    fc = torch.nn.Linear(3 * 20 * 20, 3)

    class ViewNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = fc

        def forward(self, x):
            return self.fc(x.view(len(x), -1))

    x, maps = torch.randn(3, 3, 20, 20), torch.randn(3, 20, 20)
    res = region_perturbation(ViewNet(), x, 1, maps, patch=8, steps=5, baseline="mean", orders=["morf"], batch_size=2)
    for i in range(3):
        base = x[i].mean(dim=(1, 2), keepdim=True).expand_as(x[i])
        ref = _reference_curve(ViewNet(), x[i], 1, maps[i].numpy(), 8, 5, "morf", base)
        np.testing.assert_allclose(res.curves[0, 0, i], ref, rtol=1e-5, atol=1e-5)


def test_uniform_baseline_is_seeded(demo_model, test_set):
    x, y = test_set[0][:2], test_set[1][:2]
    maps = attribute(demo_model, x, y, "saliency")
    a = region_perturbation(demo_model, x, y, maps, patch=16, steps=4, baseline="uniform", seed=1, orders=["morf"])
    b = region_perturbation(demo_model, x, y, maps, patch=16, steps=4, baseline="uniform", seed=1, orders=["morf"])
    c = region_perturbation(demo_model, x, y, maps, patch=16, steps=4, baseline="uniform", seed=2, orders=["morf"])
    np.testing.assert_array_equal(a.curves, b.curves)
    assert not np.array_equal(a.curves[..., 1:], c.curves[..., 1:])


def test_region_perturbation_rejects_bad_input(demo_model, test_set):
    x, y = test_set[0][:2], test_set[1][:2]
    maps = torch.zeros(2, 64, 64)
    with pytest.raises(ConceptLensError, match="baseline parameter must be one of mean, blur, uniform"):
        region_perturbation(demo_model, x, y, maps, baseline="gray")
    with pytest.raises(ConceptLensError, match=r"expected \[N, H, W\]"):
        region_perturbation(demo_model, x, y, torch.zeros(2, 32, 32))
    with pytest.raises(ConceptLensError, match="steps must lie in 1..16"):
        region_perturbation(demo_model, x, y, maps, patch=16, steps=40)
    with pytest.raises(ConceptLensError, match="morf and/or lerf"):
        region_perturbation(demo_model, x, y, maps, orders=["most"])


def test_localization_scores_match_brute_force(tmp_path):
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(5, 12, 10)).astype(np.float32)
    masks = np.zeros((5, 12, 10), dtype=bool)
    for i in range(5):
        y0, x0 = rng.integers(0, 8, size=2)
        masks[i, y0:y0 + 3, x0:x0 + 2 + i] = True
    maps[1, 11, 0] = 50.0  # maximum far outside the mask: a miss unless tolerance reaches it
    res = localization({"a": maps}, masks, tolerance=1)
    f = res.to_frame()
    for i in range(5):
        a, m = maps[i], masks[i]
        pos = np.clip(a, 0, None)
        assert f.loc[i, "relevance_mass"] == pytest.approx(pos[m].sum() / pos.sum(), rel=1e-5)
        k = m.sum()
        top = np.argsort(-a.ravel(), kind="stable")[:k]
        assert f.loc[i, "rank_accuracy"] == pytest.approx(m.ravel()[top].mean())
        yy, xx = np.unravel_index(a.argmax(), a.shape)
        near = m[max(0, yy - 1):yy + 2, max(0, xx - 1):xx + 2].any()
        assert f.loc[i, "pointing_hit"] == near
        assert f.loc[i, "mask_fraction"] == pytest.approx(m.mean())
    assert not f.loc[1, "pointing_hit"]
    back = LocalizationResult.load(res.save(tmp_path / "loc"))
    assert back.frame.equals(res.frame) or np.allclose(back.frame["relevance_mass"], res.frame["relevance_mass"])
    with pytest.raises(ConceptLensError, match="empty"):
        localization(maps, np.zeros((12, 10), dtype=bool))

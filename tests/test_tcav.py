"""TCAV on the concept world: planted tag sensitivity, calibration, autograd agreement, determinism, errors, CLI."""

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch

from conceptlens.concepts import TCAV, TCAVResult, load_image_pool
from conceptlens.data import Manifest, make_loader
from conceptlens.errors import ConceptLensError
from conceptlens.representation.extract import iter_activations, iter_gradients

ALPHA = 0.05


@pytest.fixture(scope="module")
def tag_result(demo_model, world_dir):
    # 20 runs: with 40 images per concept the split design gives each run 2 concept images.
    return TCAV(demo_model, ["conv3", "conv4"], runs=20, seed=1, progress=False, n_bootstrap=500).run(
        world_dir / "concepts", world_dir / "random", ["circle", "square"], world_dir / "manifest.csv"
    )


def _small(demo_model, world_dir, seed=0, **kw):
    return TCAV(demo_model, ["conv4"], seed=seed, progress=False, n_bootstrap=200, **kw).run(
        world_dir / "concepts", world_dir / "random", ["circle"], world_dir / "manifest.csv",
        split="test", max_inputs=12, concept_names=["tag", "red"],
    )


def test_tag_is_significant_for_circle_at_the_last_conv_layers(tag_result):
    t = tag_result.to_frame()
    assert len(t) == 9 * 2 * 2 and set(t.columns) >= {
        "concept", "layer", "class", "score_mean", "score_ci_low", "score_ci_high", "p_value", "p_adjusted",
        "significant", "cav_accuracy", "cav_stability", "n_runs"}
    tag = t[(t.concept == "tag") & (t["class"] == "circle")]
    assert tag.significant.any(), tag.to_string()
    best = tag.sort_values("p_adjusted").iloc[0]
    assert best.score_mean > best.null_mean  # the tag pushes towards "circle", the planted direction
    assert best.score_ci_low <= best.score_mean <= best.score_ci_high
    # Holm over the whole experiment: the adjusted p is at least the raw p times the survivors' count rank.
    assert (t.p_adjusted.dropna() >= t.loc[t.p_adjusted.notna(), "p_value"]).all()
    verdict = tag_result.audit([("tag", "circle")]).iloc[0]
    assert verdict.verdict == "fail" and best.layer in verdict.significant_layers


def test_audit_rejects_untested_pairs(tag_result):
    with pytest.raises(ConceptLensError, match="did you mean 'circle'"):
        tag_result.audit(["tag:circel"])


@pytest.fixture(scope="module")
def null_world(demo_model, world_dir):
    """Flattened conv4 activations of the random pool and class-logit gradients, computed once."""
    pool = load_image_pool(world_dir / "random")
    prep = demo_model.preprocessing
    x = torch.cat([m["conv4"].flatten(1) for _, m, _ in iter_activations(demo_model, make_loader(Manifest.from_images(pool), prep), ["conv4"], pool="none")])
    man = Manifest.read(world_dir / "manifest.csv")
    grads = {}
    for c in ("circle", "square"):
        sub = man.subset(((man.frame.label == c) & (man.frame.split == "test")).to_numpy())
        gb = list(iter_gradients(demo_model, make_loader(sub, prep), ["conv4"], (demo_model.class_index(c),)))
        grads[c] = {"conv4": torch.cat([g.gradients["conv4"][0].flatten(1) for g in gb]).numpy()}
    return x.numpy(), grads


def _null_pvalues(null_world, design, trials):
    x, grads = null_world
    p = []
    for trial in range(trials):
        perm = np.random.default_rng(1000 + trial).permutation(len(x))
        fake, rest = perm[:40], perm[40:]  # a "concept" drawn from the random pool: no signal
        res = TCAV(None, ["conv4"], design=design, correction="none", seed=trial, n_bootstrap=50).run_arrays(
            {"fake": {"conv4": x[fake]}}, {"conv4": x[rest]}, grads)
        p += list(res.table.p_value)
    return np.array(p)


def test_null_concepts_are_significant_at_the_nominal_rate(null_world):
    p = _null_pvalues(null_world, "split", trials=150)
    n = len(p)
    rate = (p < ALPHA).mean()
    # At most nominal (one-sided binomial bound at 0.1 %), and not trivially zero (a broken test would be).
    assert rate <= scipy.stats.binom.ppf(0.999, n, ALPHA) / n, rate
    assert rate >= scipy.stats.binom.ppf(0.001, n, ALPHA) / n, rate
    assert scipy.stats.kstest(p, "uniform").pvalue > 1e-3  # p-values are uniform under the null


def test_standard_design_is_anti_conservative(null_world):
    """Why ``split`` is the default: tf/tcav's shared-concept design rejects true nulls far too often."""
    p = _null_pvalues(null_world, "standard", trials=60)
    assert (p < ALPHA).mean() > scipy.stats.binom.ppf(0.999, len(p), ALPHA) / len(p)


@pytest.mark.parametrize("pool", ["none", "mean"])
def test_directional_derivatives_equal_autograd(demo_model, world_dir, pool):
    """Flattened CAVs perturb the whole map; pooled ones perturb every position by the channel vector."""
    res = _small(demo_model, world_dir, pool=pool)
    s = res.derivatives[("conv4", "circle")]
    v = torch.from_numpy(res.cav_vectors["conv4"][[0, -1]])  # a tag CAV and a null CAV
    used = res.inputs[res.inputs["class"] == "circle"].sort_values("position")
    man = Manifest.read(world_dir / "manifest.csv")
    assert (man.frame.loc[used.row, "label"] == "circle").all() and len(used) == 12
    x = torch.cat([b for _, b in make_loader(man.subset(np.isin(np.arange(len(man)), used.row)), demo_model.preprocessing)])
    # Independent reference: d logit_circle(f + eps v) / d eps at eps = 0, by autograd through a perturbed layer.
    module = demo_model.module
    for j, col in enumerate([0, s.shape[1] - 1]):
        eps = torch.zeros(len(x), requires_grad=True)
        shape = lambda o: o.shape[1:] if pool == "none" else (o.shape[1], 1, 1)  # noqa: E731
        h = module.conv4.register_forward_hook(lambda m, i, o: o + eps[:, None, None, None] * v[j].view(shape(o)))
        try:
            logit = module(x)[:, demo_model.class_index("circle")]
            (d,) = torch.autograd.grad(logit.sum(), eps)
        finally:
            h.remove()
        torch.testing.assert_close(torch.from_numpy(s[:, col]), d, rtol=1e-4, atol=1e-5)


def test_same_seed_same_table_and_roundtrip(demo_model, world_dir, tmp_path):
    a, b = _small(demo_model, world_dir, seed=4), _small(demo_model, world_dir, seed=4)
    pd.testing.assert_frame_equal(a.to_frame(), b.to_frame())
    c = _small(demo_model, world_dir, seed=5)
    assert not np.allclose(a.to_frame().score_mean, c.to_frame().score_mean)
    # The split design's sets: every pseudo-concept, counter-example and concept part is disjoint from all others.
    sets = a.sets
    assert not sets.image.duplicated().any() and sets.set.nunique() == 10 * 4
    assert (sets.groupby("set").size().filter(like="counter") >= 2).all()
    loaded = TCAVResult.load(a.save(tmp_path / "res"))
    pd.testing.assert_frame_equal(loaded.to_frame(), a.to_frame(), check_dtype=False)
    np.testing.assert_array_equal(loaded.derivatives[("conv4", "circle")], a.derivatives[("conv4", "circle")])
    pd.testing.assert_frame_equal(loaded.sets, a.sets)
    pd.testing.assert_frame_equal(loaded.cavs, a.cavs, check_dtype=False)
    assert loaded.provenance["weights_hash"] == demo_model.weights_hash
    assert loaded.provenance["parameters"]["design"] == "split"


@pytest.mark.parametrize("kw, match", [
    (dict(concept_names=["tga"]), "concept 'tga' is not in .*did you mean 'tag'"),
    (dict(classes=["circel"]), "class 'circel' is not a class"),
    (dict(runs=30), "concept '(tag|red)' has 40 images; design split with 30 runs .* needs 60"),
    (dict(concepts="nowhere"), "concepts nowhere does not exist"),
    (dict(split="val"), "no rows with split 'val'"),
    (dict(random_pool="few"), "the random pool has 12 images"),
])
def test_bad_inputs_raise_clear_errors(demo_model, world_dir, kw, match):
    args = dict(concepts=world_dir / "concepts", random_pool=world_dir / "random", classes=["circle"],
                data=world_dir / "manifest.csv", concept_names=["tag", "red"], runs=10, split="test")
    if kw.get("random_pool") == "few":
        kw = dict(random_pool=load_image_pool(world_dir / "random")[:12])
    args.update(kw)
    runs = args.pop("runs")
    with pytest.raises(ConceptLensError, match=match):
        TCAV(demo_model, ["conv4"], runs=runs, progress=False).run(**args)
    with pytest.raises(ConceptLensError, match="design parameter of TCAV"):
        TCAV(demo_model, ["conv4"], design="paired").run(**{**args, **dict(concept_names=["tag"])})


def test_cli_writes_table_and_audit(demo_weights, world_dir, tmp_path, capsys):
    from conceptlens.cli import main

    base = ["tcav", "-q", "--model", f"demo:{demo_weights}", "--data", str(world_dir / "manifest.csv"),
            "--concepts", str(world_dir / "concepts"), "--random-pool", str(world_dir / "random"),
            "--classes", "circle", "--layers", "conv4", "--split", "test", "--max-inputs", "10",
            "--concept-names", "tag,red"]
    assert main(base + ["--audit", "tag:circle,red:circle", "--out", str(tmp_path / "o")]) == 0
    table, audit = pd.read_csv(tmp_path / "o" / "tcav.csv"), pd.read_csv(tmp_path / "o" / "audit.csv")
    assert len(table) == 2 and list(audit.concept) == ["tag", "red"]
    assert set(audit.verdict) <= {"pass", "fail", "inconclusive"}
    assert main(base + ["--concept-names", "tga", "--out", str(tmp_path / "x")]) == 2
    assert "did you mean 'tag'" in capsys.readouterr().err


def test_audit_verdicts_follow_significance_and_the_accuracy_gate():
    rows = [  # concept, layer, significant, cav_ok, p_adjusted
        ("a", "l1", False, True, 0.4), ("a", "l2", True, True, 0.01),    # significant somewhere -> fail
        ("b", "l1", False, True, 0.3), ("b", "l2", False, True, 0.9),    # never significant -> pass
        ("c", "l1", False, False, np.nan), ("c", "l2", False, False, np.nan),  # no usable CAV -> inconclusive
    ]
    table = pd.DataFrame([{"concept": c, "layer": layer, "class": "k", "significant": s, "cav_ok": ok, "p_adjusted": p,
                           "score_mean": 0.7, "null_mean": 0.5, "cav_accuracy": 0.8 if ok else 0.5} for c, layer, s, ok, p in rows])
    res = TCAVResult(table=table, runs=pd.DataFrame(), derivatives={}, cavs=pd.DataFrame(), cav_vectors={},
                     sets=pd.DataFrame(), inputs=pd.DataFrame(), provenance={"parameters": {"alpha": 0.05}})
    verdicts = res.audit(["a:k", ("b", "k"), "c:k"]).set_index("concept")
    assert verdicts.verdict.to_dict() == {"a": "fail", "b": "pass", "c": "inconclusive"}
    assert verdicts.loc["a", "significant_layers"] == "l2" and verdicts.loc["b", "min_p_adjusted"] == 0.3

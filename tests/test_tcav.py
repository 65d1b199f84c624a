"""TCAV on the concept world: planted tag sensitivity, calibration, autograd agreement, determinism, errors, CLI."""

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch

from conceptlens.concepts import TCAV, TCAVResult, load_image_pool
from conceptlens.data import Manifest, make_loader
from conceptlens.errors import ConceptLensError
from conceptlens.core.extract import iter_activations, iter_gradients

ALPHA = 0.05


@pytest.fixture(scope="module")
def tag_result(demo_model, world_dir):
    # Default plan: 40 images per concept give 20 runs of 2 concept against 2 random images.
    return TCAV(demo_model, ["conv3", "conv4"], seed=1, progress=False, n_bootstrap=500).run(
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
    assert best.score_mean > best.null_mean and best.direction == "more"  # the planted direction: tag -> circle
    assert best.score_ci_low <= best.score_mean <= best.score_ci_high
    assert tag_result.provenance["parameters"]["runs"] == 20 and tag_result.provenance["parameters"]["concept_size"] == 2
    # Holm over the gated tests of the whole experiment, against the step-down rule written out:
    # the i-th smallest p times (m - i + 1), made monotone, capped at 1.
    gated = t[t.cav_ok].sort_values("p_value", kind="stable")
    m = len(gated)
    expected, running = [], 0.0
    for i, p in enumerate(gated.p_value):
        running = max(running, min(1.0, (m - i) * p))
        expected.append(running)
    np.testing.assert_allclose(gated.p_adjusted, expected)
    assert t.loc[~t.cav_ok, "p_adjusted"].isna().all() and (t.loc[~t.cav_ok, "gate"] != "").all()
    verdict = tag_result.audit([("tag", "circle")]).iloc[0]
    assert verdict.verdict == "fail" and verdict.direction.startswith("more")
    assert "more sensitive than random" in verdict.evidence


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


def _null_results(null_world, trials, n_fake=40, **kw):
    x, grads = null_world
    for trial in range(trials):
        perm = np.random.default_rng(1000 + trial).permutation(len(x))
        fake, rest = perm[:n_fake], perm[n_fake:]  # a "concept" drawn from the random pool: no signal
        yield TCAV(None, ["conv4"], correction="none", seed=trial, n_bootstrap=50, **kw).run_arrays(
            {"fake": {"conv4": x[fake]}}, {"conv4": x[rest]}, grads)


@pytest.fixture(scope="module")
def null_results(null_world):
    return list(_null_results(null_world, trials=100))


def test_null_concepts_are_significant_at_the_nominal_rate(null_results):
    p = np.concatenate([r.table.p_value.to_numpy() for r in null_results])
    n = len(p)
    rate = (p < ALPHA).mean()
    # At most nominal (one-sided binomial bound at 0.1 %), and not trivially zero (a broken test would be).
    assert rate <= scipy.stats.binom.ppf(0.999, n, ALPHA) / n, rate
    assert rate >= scipy.stats.binom.ppf(0.001, n, ALPHA) / n, rate


def test_gate_rejects_random_concepts_and_fake_audits_never_fail(null_results):
    """Random-vs-random "concepts" pass the CAV gate at about 1 - gate_quantile, never more; a fake
    audit fails only when the gate and the test both err (about 0.05 x 0.05), and passes rarely."""
    ok = np.concatenate([r.table.cav_ok.to_numpy() for r in null_results])
    assert ok.mean() <= scipy.stats.binom.ppf(0.999, len(ok), 0.05) / len(ok), ok.mean()
    verdicts = [r.audit(["fake:circle"]).iloc[0].verdict for r in null_results]
    n = len(verdicts)
    assert verdicts.count("fail") <= scipy.stats.binom.ppf(0.999, n, 0.05 * 0.05), verdicts.count("fail")
    assert verdicts.count("pass") <= scipy.stats.binom.ppf(0.999, n, 0.05), verdicts.count("pass")
    assert verdicts.count("inconclusive") >= n // 2


def test_a_true_null_with_few_images_is_inconclusive_not_pass(null_world):
    """12 images: 6 runs cannot show insensitivity within the margin, whatever they score."""
    for res in _null_results(null_world, trials=10, n_fake=12):
        row = res.audit(["fake:circle"]).iloc[0]
        assert row.verdict == "inconclusive", row.evidence
        assert row.fix  # says what would decide it


def test_standard_design_is_anti_conservative(null_world):
    """Why ``split`` is the default: tf/tcav's shared-concept design rejects true nulls far too often."""
    res = list(_null_results(null_world, trials=40, design="standard", concept_size=10))
    p = np.concatenate([r.table.p_value.to_numpy() for r in res])
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
    # The split design's sets: concept parts and their counter-examples are disjoint from all others,
    # every set has the concept parts' size, and each null run's two sets are disjoint.
    sets, runs = a.sets, a.provenance["parameters"]["runs"]
    concept_sets = sets[~sets.set.str.startswith("null")]
    assert not concept_sets.image.duplicated().any() and concept_sets.set.nunique() == 3 * runs
    assert sets.set.nunique() == 3 * runs + 2 * 200 and (sets.groupby("set").size() == 2).all()
    for r in range(200):
        pos, neg = (set(sets.image[sets.set == f"{k}/run{r}"]) for k in ("null", "null-counter"))
        assert pos and neg and not pos & neg
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
    table, audit = pd.read_csv(tmp_path / "o" / "tcav.csv"), pd.read_csv(tmp_path / "o" / "audit.csv", keep_default_na=False)
    assert len(table) == 2 and list(audit.concept) == ["tag", "red"]
    # Each verdict follows from the table by the audit's rule (Holm over the audit's gated tests).
    gated = table[table.cav_ok]
    order = gated.set_index("concept").p_value.sort_values()
    p_audit = dict(zip(order.index, np.maximum.accumulate(np.minimum(1, order.to_numpy() * (len(order) - np.arange(len(order)))))))
    for r in audit.itertuples():
        row = table[table.concept == r.concept].iloc[0]
        expected = ("fail" if row.cav_ok and p_audit[r.concept] < ALPHA else
                    "pass" if row.cav_ok and row.equivalent else "inconclusive")
        assert r.verdict == expected, (r, row)
    out = capsys.readouterr().out
    assert "margin ±0.1" in out and "audit tag:circle:" in out
    assert main(base + ["--concept-names", "tga", "--out", str(tmp_path / "x")]) == 2
    assert "did you mean 'tag'" in capsys.readouterr().err


def test_audit_verdicts_follow_significance_equivalence_and_the_gate():
    rows = [  # concept, layer, p_value, cav_ok, equivalent
        ("a", "l1", 0.4, True, False), ("a", "l2", 0.001, True, False),  # significant after the audit's Holm -> fail
        ("b", "l1", 0.3, True, True), ("b", "l2", 0.9, True, True),      # equivalent at every gated layer -> pass
        ("c", "l1", 0.02, False, True), ("c", "l2", 0.5, False, True),   # no layer passes the gate -> inconclusive
        ("d", "l1", 0.5, True, True), ("d", "l2", 0.6, True, False),     # not significant, not shown equivalent
        ("e", "l1", 0.2, True, True), ("e", "l2", 0.01, False, False),   # l2 gated out: pass on l1 alone
    ]
    table = pd.DataFrame([{"concept": c, "layer": layer, "class": "k", "p_value": p, "cav_ok": ok, "equivalent": eq,
                           "p_equivalence": 0.01 if eq else 0.4, "diff_ci_low": -0.05, "diff_ci_high": 0.05 if eq else 0.2,
                           "score_mean": 0.52, "score_sd": 0.3, "null_mean": 0.5, "null_sd": 0.3, "n_runs": 20, "n_null_runs": 200,
                           "cav_accuracy": 0.8 if ok else 0.5, "accuracy_gate": 0.6} for c, layer, p, ok, eq in rows])
    res = TCAVResult(table=table, runs=pd.DataFrame(), derivatives={}, cavs=pd.DataFrame(), cav_vectors={},
                     sets=pd.DataFrame(), inputs=pd.DataFrame(),
                     provenance={"parameters": {"alpha": 0.05, "margin": 0.1, "concept_size": 2}})
    verdicts = res.audit(["a:k", ("b", "k"), "c:k", "d:k", "e:k"]).set_index("concept")
    assert verdicts.verdict.to_dict() == {"a": "fail", "b": "pass", "c": "inconclusive", "d": "inconclusive", "e": "pass"}
    # The audit's family: the 7 gated tests of the audited pairs; Holm's smallest adjusted p = 7 x 0.001.
    assert verdicts.loc["a", "min_p_adjusted"] == pytest.approx(0.007) and verdicts.loc["a", "significant_layers"] == "l2"
    assert verdicts.loc["a", "direction"].startswith("more")
    assert "±0.1" in verdicts.loc["b", "evidence"] and "l2 not tested" in verdicts.loc["e", "evidence"]
    assert "concept runs" in verdicts.loc["d", "fix"] and "add concept images" in verdicts.loc["c", "fix"]
    # Auditing fewer pairs is a smaller family: a alone gets 2 x 0.001.
    assert res.audit(["a:k"]).iloc[0].min_p_adjusted == pytest.approx(0.002)


def test_top_inputs_rank_by_the_concepts_mean_derivative(tag_result):
    top = tag_result.top_inputs("tag", "circle", "conv4", k=5)
    cols = tag_result.cavs[(tag_result.cavs.layer == "conv4") & (tag_result.cavs.concept == "tag")].cav.to_numpy()
    s = tag_result.derivatives[("conv4", "circle")][:, cols]
    order = np.argsort(-s.mean(axis=1), kind="stable")[:5]
    inputs = tag_result.inputs[tag_result.inputs["class"] == "circle"].sort_values("position")
    np.testing.assert_array_equal(top.position, inputs.position.to_numpy()[order])
    np.testing.assert_allclose(top.derivative, s.mean(axis=1)[order], rtol=1e-6)
    np.testing.assert_allclose(top.positive_runs, (s > 0).mean(axis=1)[order])
    with pytest.raises(ConceptLensError, match="no derivatives for layer 'conv9'"):
        tag_result.top_inputs("tag", "circle", "conv9")


def test_concept_directions_are_the_normalised_mean_of_each_concepts_cavs(tag_result):
    dirs = tag_result.concept_directions("conv4")
    cavs = tag_result.cavs
    assert set(dirs) == set(cavs.loc[cavs["role"] == "concept", "concept"])
    cols = cavs[(cavs["layer"] == "conv4") & (cavs["concept"] == "tag") & (cavs["role"] == "concept")]["cav"].to_numpy()
    assert len(cols) == 20
    mean = tag_result.cav_vectors["conv4"][cols].mean(axis=0)
    np.testing.assert_allclose(dirs["tag"], mean / np.linalg.norm(mean), rtol=1e-6)
    with pytest.raises(ConceptLensError, match="concept 'tga' has no CAVs at layer 'conv4'.*did you mean 'tag'"):
        tag_result.concept_directions("conv4", ["tga"])
    with pytest.raises(ConceptLensError, match="no concept CAVs at layer 'relu1'"):
        tag_result.concept_directions("relu1")

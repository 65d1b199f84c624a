"""Linear probes: planted decodability recovered against a random-init baseline, permutation null,
audit verdicts, CIs match scipy's bootstrap."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from conceptlens.errors import ConceptLensError
from conceptlens.models import random_init_copy
from conceptlens.representation.baselines import pixel_layers, pixel_model
from conceptlens.representation.probes import ProbeResult, fit_probe, probe
from representation_helpers import cached_store, synthetic_store


N_COINS = 5


@pytest.fixture(scope="module")
def coin_manifest(world_dir, tmp_path_factory):
    """The shared world's manifest plus ``coin0..coin4``: attributes drawn by a seeded RNG, not in the pixels."""
    frame = pd.read_csv(world_dir / "manifest.csv", keep_default_na=False)
    frame["image"] = [str(Path(world_dir).resolve() / p) for p in frame["image"]]
    rng = np.random.default_rng(0)
    for i in range(N_COINS):
        frame[f"coin{i}"] = rng.integers(0, 2, len(frame))
    out = tmp_path_factory.mktemp("coins") / "manifest.csv"
    frame.to_csv(out, index=False)
    return out


@pytest.fixture(scope="module")
def world_stores(coin_manifest, demo_model):
    layers = ["conv1", "relu3", "relu4"]
    real = cached_store("probe-world", demo_model, coin_manifest, layers)
    rand = cached_store("probe-world-random-init", random_init_copy(demo_model, seed=0), coin_manifest, layers)
    pix = cached_store("probe-world-pixels", pixel_model(demo_model), coin_manifest, pixel_layers())
    return real, rand, pix


@pytest.fixture(scope="module")
def world_probes(world_stores):
    real, rand, pix = world_stores
    return probe(real, ["label", "has_tag"], baseline=rand, pixels=pix, n_permutations=9, n_bootstrap=500, progress=False)


def test_label_decodable_beyond_random_init_baseline(world_probes):
    t = world_probes.table
    assert (t["baseline"] == "random-init copy").all() and t["baseline_accuracy"].notna().all()
    # The trained last layers encode the class far beyond the same layers of a random-init copy.
    for layer in ("relu3", "relu4"):
        r = world_probes.get(layer, "label")
        assert r["decodable"] and r["selectivity_ci_low"] > 0.2, r
        assert r["accuracy"] > 0.9 and r["baseline_accuracy"] < r["accuracy"] - 0.2
        assert r["p_permutation"] == pytest.approx(0.1)  # above all 9 permutations: the smallest p attainable
    # The first conv's channel means carry no class, trained or not.
    assert not world_probes.get("conv1", "label")["decodable"]
    assert world_probes.get("conv1", "label")["accuracy"] < 0.5
    # The permutation null is scored on the true test labels: about the majority rate, not the probe's.
    for r in t.itertuples():
        assert abs(r.null_accuracy - r.majority_accuracy) < 0.1
    # The tag is drawn in the pixels: a random-init copy decodes it too, so accuracy alone overstates it.
    assert world_probes.get("relu4", "has_tag")["baseline_accuracy"] > world_probes.get("relu4", "has_tag")["majority_accuracy"] + 0.1
    assert world_probes.get("relu4", "label")["pixel_layer"] == "pixels4"  # 48 pixel features for 64 channels
    assert world_probes.params["split_used"]["label"].startswith("column 'split'")
    assert world_probes.provenance["baseline"]["model"].endswith("#random-init:seed=0")


def test_attribute_drawn_at_random_is_not_decodable(world_stores):
    real, rand, _ = world_stores
    coins = [f"coin{i}" for i in range(N_COINS)]
    res = probe(real, coins, baseline=rand, n_permutations=0, n_bootstrap=1000, progress=False)
    # Each row is a one-sided 2.5 % test of a true null: of 15, at most 2 may come out decodable
    # (P(>= 3) < 0.01 under the null); each coin's audit is a 5 % test after Holm's correction over
    # layers, so of the coins' audits at most one may fail (P(>= 2 of 5) < 0.03 under the null).
    assert res.table["decodable"].sum() <= 2, res.table[["layer", "target", "selectivity_ci_low"]]
    assert not res.get("relu4", "coin0")["decodable"]
    audit = res.audit(coins)
    assert (audit["verdict"] == "fail").sum() <= 1, audit
    assert audit.loc[audit["verdict"] != "fail", "evidence"].str.contains("margin ±0.05").all()


def test_random_init_copy_is_seeded_and_leaves_the_model_alone(demo_model):
    before = {k: v.clone() for k, v in demo_model.module.state_dict().items()}
    rng_state = torch.random.get_rng_state()
    a, b, c = random_init_copy(demo_model, 0), random_init_copy(demo_model, 0), random_init_copy(demo_model, 1)
    assert torch.equal(torch.random.get_rng_state(), rng_state)
    for k, v in demo_model.module.state_dict().items():
        assert torch.equal(v, before[k])
    assert a.weights_hash == b.weights_hash != c.weights_hash != demo_model.weights_hash
    assert not torch.equal(a.module.conv1.weight, demo_model.module.conv1.weight)
    assert torch.equal(a.module.bn1.running_mean, torch.zeros_like(a.module.bn1.running_mean))
    assert a.preprocessing == demo_model.preprocessing and a.spec == f"{demo_model.spec}#random-init:seed=0"
    assert not a.module.training


def test_random_init_copy_refuses_modules_it_cannot_reset():
    class Scale(torch.nn.Module):  # owns a parameter, no reset_parameters (like a torch.export module)
        def __init__(self):
            super().__init__()
            self.gain = torch.nn.Parameter(torch.ones(3))

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), Scale())
    with pytest.raises(ConceptLensError, match=r"module '1' \(Scale\) owns parameters but has no reset_parameters"):
        random_init_copy(model)
    assert isinstance(random_init_copy(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.ReLU())), torch.nn.Sequential)


def _planted(n, seed):
    """Features of a "model" and of its "random-init copy" with planted, known decodability.

    ``signal`` is in the model's features only; ``shared`` is in both (equally); ``noise_target``
    and ``coin`` are in neither.
    """
    rng = np.random.default_rng(seed)
    signal, shared = rng.integers(0, 2, n), rng.integers(0, 2, n)
    x = rng.normal(size=(n, 12)).astype(np.float32)
    xb = rng.normal(size=(n, 12)).astype(np.float32)
    x[:, 0] += 2.5 * (2 * signal - 1)
    x[:, 1] += 2.0 * (2 * shared - 1)
    xb[:, 1] = x[:, 1]  # the same evidence for `shared`: no selectivity
    frame = pd.DataFrame({"signal": signal, "shared": shared, "noise_target": rng.integers(0, 3, n), "coin": rng.integers(0, 2, n),
                          "site": [""] * 10 + ["a"] * (n - 10)})
    return x, xb, frame


@pytest.fixture(scope="module")
def planted_store(tmp_path_factory):
    x, xb, frame = _planted(400, 0)
    root = tmp_path_factory.mktemp("planted")
    return synthetic_store(root / "store", {"feat": x}, frame), synthetic_store(root / "baseline", {"feat": xb}, frame)


def test_planted_signal_decodable_and_pure_noise_not(planted_store):
    store, base = planted_store
    res = probe(store, ["signal", "noise_target"], baseline=base, seed=1, progress=False)
    sig, noise = res.get("feat", "signal"), res.get("feat", "noise_target")
    assert sig["decodable"] and sig["accuracy"] > 0.9 and sig["baseline_accuracy"] < 0.65
    assert sig["p_permutation"] == pytest.approx(1 / 20)
    assert not noise["decodable"] and noise["selectivity_ci_low"] < 0 < noise["selectivity_ci_high"]
    assert "random split" in res.params["split_used"]["signal"]  # no split column: seeded split
    assert sig["n_train"] + sig["n_test"] == 400


def test_without_baseline_nothing_is_called_decodable(planted_store, caplog):
    store, _ = planted_store
    with caplog.at_level("WARNING"):
        res = probe(store, ["signal"], n_permutations=3, progress=False)
    r = res.get("feat", "signal")
    assert r["baseline"] == "none" and np.isnan(r["selectivity"]) and not r["decodable"]
    assert r["accuracy"] > 0.9 and "without a random-init baseline" in caplog.text
    audit = res.audit(["signal"])
    assert audit["verdict"].tolist() == ["inconclusive"] and "no random-init baseline" in audit["evidence"][0]


@pytest.fixture(scope="module")
def big_planted(tmp_path_factory):
    x, xb, frame = _planted(4000, 1)
    root = tmp_path_factory.mktemp("big")
    return synthetic_store(root / "store", {"feat": x}, frame), synthetic_store(root / "baseline", {"feat": xb}, frame)


def test_audit_fail_pass_inconclusive_on_planted_truth(planted_store, big_planted):
    big = probe(big_planted[0], ["signal", "shared", "coin"], baseline=big_planted[1], test_size=0.5,
                n_permutations=0, progress=False)
    audit = big.audit(["signal", "shared", "coin:feat"]).set_index("target")
    # In the model only: decodable -> fail.
    assert audit.loc["signal", "verdict"] == "fail" and audit.loc["signal", "decodable_layers"] == "feat"
    # As decodable from the random-init copy (shared), or from neither (coin), with 2000 test rows:
    # the selectivity CI lies inside +-0.05, so equivalence is shown -> pass.
    for t in ("shared", "coin"):
        assert audit.loc[t, "verdict"] == "pass", audit.loc[t, "evidence"]
        assert -0.05 <= audit.loc[t, "selectivity_ci_low"] and audit.loc[t, "selectivity_ci_high"] <= 0.05
        assert "margin ±0.05" in audit.loc[t, "evidence"]
    # The same true null on 120 test rows is too uncertain to pass: inconclusive, saying what to add.
    small = probe(planted_store[0], ["coin"], baseline=planted_store[1], n_permutations=0, progress=False).audit(["coin"])
    assert small["verdict"][0] == "inconclusive" and "test rows" in small["evidence"][0]
    # A wider margin can pass it, and says so.
    wide = probe(planted_store[0], ["coin"], baseline=planted_store[1], n_permutations=0, progress=False).audit(["coin"], margin=0.3)
    assert wide["verdict"][0] == "pass" and "±0.3" in wide["evidence"][0]
    with pytest.raises(ConceptLensError, match="audit target 'coni' was not probed.*did you mean 'coin'"):
        big.audit(["coni"])
    with pytest.raises(ConceptLensError, match="margin parameter"):
        big.audit(["coin"], margin=0)


def test_baseline_store_must_match(planted_store, tmp_path):
    store, base = planted_store
    with pytest.raises(ConceptLensError, match="holds other rows"):
        other = synthetic_store(tmp_path / "short", {"feat": np.zeros((10, 12))}, pd.DataFrame({"signal": [0, 1] * 5}))
        probe(store, ["signal"], baseline=other, progress=False)
    with pytest.raises(ConceptLensError, match="lacks layer"):
        other = synthetic_store(tmp_path / "other", {"g": np.zeros((400, 12))}, store.rows.drop(columns=["manifest_row", "image"]))
        probe(store, ["signal"], baseline=other, progress=False)


def test_bootstrap_ci_matches_scipy(planted_store):
    planted_store = planted_store[0]
    res = probe(planted_store, ["signal"], n_bootstrap=4000, n_permutations=0, seed=3, progress=False).get("feat", "signal")
    # Rebuild the same split and predictions with sklearn directly, then bootstrap with scipy.
    from sklearn.model_selection import train_test_split

    x = planted_store.load("feat")
    y = planted_store.rows["signal"].astype(str).to_numpy()
    tr, te = train_test_split(np.arange(len(y)), test_size=0.3, random_state=3, stratify=y)
    correct = (fit_probe(x[tr], y[tr], x[te]) == y[te]).astype(float)
    assert res["accuracy"] == pytest.approx(correct.mean())
    ref = stats.bootstrap((correct,), np.mean, n_resamples=4000, method="percentile", random_state=0).confidence_interval
    assert res["ci_low"] == pytest.approx(ref.low, abs=0.012)
    assert res["ci_high"] == pytest.approx(ref.high, abs=0.012)


def test_seeded_and_roundtrip(planted_store, tmp_path):
    planted_store, base = planted_store
    a = probe(planted_store, ["signal", "noise_target"], baseline=base, seed=5, progress=False)
    b = probe(planted_store, ["signal", "noise_target"], baseline=base, seed=5, progress=False)
    pd.testing.assert_frame_equal(a.table, b.table)
    c = probe(planted_store, ["signal", "noise_target"], baseline=base, seed=6, progress=False)
    assert not a.table["null_accuracy"].equals(c.table["null_accuracy"])
    a.save(tmp_path)
    back = ProbeResult.load(tmp_path)
    pd.testing.assert_frame_equal(back.table, a.table, check_dtype=False)
    assert back.params == a.params and back.provenance["store"]["hash"] == planted_store.meta["hash"]


def test_empty_cells_left_out(planted_store):
    planted_store = planted_store[0]
    # `site` has 10 empty cells and a single other value: after dropping the empty rows it is constant.
    with pytest.raises(ConceptLensError, match="fewer than two distinct values"):
        probe(planted_store, ["site"], progress=False)


def test_bad_input(planted_store):
    planted_store = planted_store[0]
    with pytest.raises(ConceptLensError, match="column 'signl'.*did you mean 'signal'"):
        probe(planted_store, ["signl"], progress=False)
    with pytest.raises(ConceptLensError, match="layer 'fet' is not in store"):
        probe(planted_store, ["signal"], layers=["fet"], progress=False)
    with pytest.raises(ConceptLensError, match="split='column' needs"):
        probe(planted_store, ["signal"], split="column", progress=False)
    with pytest.raises(ConceptLensError, match="split parameter must be"):
        probe(planted_store, ["signal"], split="half", progress=False)

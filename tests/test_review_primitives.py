"""Dataset-review primitives recover planted truth and agree with independent references:
brute-force sets for leakage and splits, scikit-learn's GaussianMixture for the EM, a per-example
loop for confident learning, scipy's chi-square for the stratified test, sklearn's ARI/NMI for the
vectorised permutation null."""

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats

import conceptlens.review as review
from conceptlens.errors import ConceptLensError
from conceptlens.review import (LabelIssueResult, LeakageResult, SliceResult, SplitResult, accuracy_by_group,
                                average_precision, best_slice, check_nested, cluster_alignment, confident_label_issues,
                                confident_label_issues_from_probabilities, discover_slices, group_gap_test, group_leakage,
                                group_split, kmeans_slices, newcombe_interval, precision_at_k, wilson_interval, write_split)
from conceptlens.review.shortcuts import _contingency_scores
from test_import_boundaries import _boundary_violations


# ---------------------------------------------------------------- package


def test_public_names_exist_and_review_imports_only_the_core():
    for name in review.__all__:
        assert not name.startswith("_") and hasattr(review, name), name
    assert _boundary_violations("review") == []
    code = ("import sys, json; import conceptlens.review as r; "
            "[getattr(r, n) for n in r.__all__]; print(json.dumps([m for m in ('torch', 'faiss') if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(review.__file__).parents[2])
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


# ---------------------------------------------------------------- leakage


def _leaky_frame(seed=0):
    """300 patients, each in one split, except 25 planted in two or three splits."""
    rng = np.random.default_rng(seed)
    splits = np.array(["test", "train", "val"])
    rows, planted = [], set()
    for g in range(300):
        home = rng.choice(3, p=[0.2, 0.6, 0.2])
        n = int(rng.integers(1, 8))
        where = np.full(n, home)
        if g % 12 == 5:  # planted leak: rows in other splits as well
            extra = rng.choice([s for s in range(3) if s != home], size=int(rng.integers(1, 3)), replace=False)
            where = np.concatenate([where, extra])
            planted.add(f"P{g}")
        rows += [(f"P{g}", splits[s], f"site{g % 4}") for s in where]
    order = rng.permutation(len(rows))
    frame = pd.DataFrame([rows[i] for i in order], columns=["patient", "split", "site"])
    return frame, planted


def test_group_leakage_recovers_planted_groups_and_pair_counts(tmp_path):
    frame, planted = _leaky_frame()
    result = group_leakage(frame, "patient")
    assert set(result.groups["group"]) == planted
    # Brute force: the set of splits of each group, in plain Python.
    splits_of = {}
    for g, s in zip(frame["patient"], frame["split"]):
        splits_of.setdefault(g, set()).add(s)
    names = sorted(frame["split"].unique())
    for a, b in itertools.combinations(names, 2):
        expected = sum(1 for s in splits_of.values() if a in s and b in s)
        got = result.counts.query("split_a == @a and split_b == @b")["groups"]
        assert got.tolist() == [expected]
    assert len(result.counts) == 3
    row = result.groups.set_index("group").loc[sorted(planted)[0]]
    sub = frame[frame["patient"] == sorted(planted)[0]]
    assert row["splits"] == ";".join(sorted(set(sub["split"])))
    assert row["n_splits"] == len(set(sub["split"])) and row["rows"] == len(sub)
    for s in names:
        assert row[f"rows_{s}"] == (sub["split"] == s).sum()
    assert (np.diff(result.groups["n_splits"]) <= 0).all()
    assert result.totals == {"rows": len(frame), "groups": 300, "splits": 3, "leaking_groups": len(planted),
                             "leaking_rows": int(frame["patient"].isin(planted).sum())}
    per_split = result.splits.set_index("split")
    for s in names:
        in_s = frame[frame["split"] == s]
        assert per_split.loc[s, "groups"] == in_s["patient"].nunique()
        assert per_split.loc[s, "leaking_rows"] == in_s["patient"].isin(planted).sum()
    back = LeakageResult.load(result.save(tmp_path / "leak"))
    pd.testing.assert_frame_equal(back.groups, result.groups.astype({"group": str}))
    assert back.totals == result.totals and back.provenance["data_hash"] == result.provenance["data_hash"]


def test_group_leakage_counts_pairs_without_shared_groups_as_zero():
    frame = pd.DataFrame({"g": ["a", "a", "b", "c"], "split": ["train", "val", "val", "test"]})
    counts = group_leakage(frame, "g").counts
    assert counts.to_dict("records") == [{"split_a": "test", "split_b": "train", "groups": 0},
                                         {"split_a": "test", "split_b": "val", "groups": 0},
                                         {"split_a": "train", "split_b": "val", "groups": 1}]


def test_group_leakage_errors_name_the_problem():
    frame, _ = _leaky_frame()
    with pytest.raises(ConceptLensError, match=r"column 'patiant'.*did you mean 'patient'.*columns: patient, split, site"):
        group_leakage(frame, "patiant")
    with pytest.raises(ConceptLensError, match=r"names column 'fold'.*columns: patient, split, site"):
        group_leakage(frame, "patient", split="fold")
    holes = frame.copy()
    holes.loc[[3, 7], "patient"] = [np.nan, ""]
    with pytest.raises(ConceptLensError, match=rf"column 'patient' has no group in 2 of {len(frame)} rows"):
        group_leakage(holes, "patient")
    holes = frame.copy()
    holes.loc[4, "split"] = " "
    with pytest.raises(ConceptLensError, match=r"column 'split' has no split in 1 of"):
        group_leakage(holes, "patient")
    with pytest.raises(ConceptLensError, match=r"single split \('train'\)"):
        group_leakage(frame.assign(split="train"), "patient")


def test_check_nested():
    frame = pd.DataFrame({"patient": ["P1", "P1", "P3", "P3", "P2"], "site": ["site1", "site1", "site0", "site1", "site0"]})
    with pytest.raises(ConceptLensError, match=r"^group 'P3' spans 2 values of column 'site' \(site0, site1\); .*1 of 3 groups"):
        check_nested(frame, "patient", "site")
    assert check_nested(frame.iloc[[0, 1, 4]], "patient", "site") is None


# ---------------------------------------------------------------- split


def _patients(n_groups=200, seed=1):
    rng = np.random.default_rng(seed)
    rows = []
    for g in range(n_groups):
        label = "tumour" if rng.random() < 0.3 else "normal"
        old = rng.choice(["train", "val", "test"])
        for _ in range(int(rng.integers(2, 9))):
            # old split leaks: a few rows of a patient sit elsewhere
            rows.append((f"img/{len(rows)}.png", f"P{g}", label, old if rng.random() < 0.8 else "train"))
    return pd.DataFrame(rows, columns=["image", "patient", "label", "split"])


def test_group_split_separates_groups_stratifies_and_is_deterministic(tmp_path):
    frame = _patients()
    result = group_split(frame, "patient", test=0.2, seed=3)
    new = result.frame
    train = set(new.loc[new["split"] == "train", "patient"])
    test = set(new.loc[new["split"] == "test", "patient"])
    assert train and test and not train & test and train | test == set(frame["patient"])
    assert set(new["split"]) == {"train", "test"}
    assert new.drop(columns="split").equals(frame.drop(columns="split"))
    assert abs(result.params["test_fraction"] - 0.2) < 0.03
    overall = (frame["label"] == "tumour").mean()
    for split in ("train", "test"):
        assert abs((new.loc[new["split"] == split, "label"] == "tumour").mean() - overall) < 0.03
    cls = result.classes.set_index(["split", "class"])
    assert cls.loc[("test", "tumour"), "rows"] == ((new["split"] == "test") & (new["label"] == "tumour")).sum()
    sizes = result.sizes.set_index("split")
    assert sizes.loc["test", "groups"] == len(test) and sizes.loc["train", "rows"] == (new["split"] == "train").sum()
    # What moved, by brute force.
    moved = pd.crosstab(frame["split"], new["split"]).stack()
    got = result.moved.set_index(["old_split", "new_split"])["rows"]
    assert {k: v for k, v in moved.items() if v} == got.to_dict()
    moved_groups = {g for g, o, n in zip(frame["patient"], frame["split"], new["split"]) if o != n}
    assert set(result.moved_groups["group"]) == moved_groups
    again = group_split(frame, "patient", test=0.2, seed=3)
    assert again.frame.equals(new)
    assert not group_split(frame, "patient", test=0.2, seed=4).frame["split"].equals(new["split"])
    plain = group_split(frame, "patient", stratify=None, test=0.25)
    assert not set(plain.frame.loc[plain.frame["split"] == "test", "patient"]) & set(
        plain.frame.loc[plain.frame["split"] == "train", "patient"])
    assert plain.classes.empty and "GroupShuffleSplit" in plain.params["method"]
    assert result.summary_text().splitlines()[0] == (f"train: {sizes.loc['train', 'rows']} rows "
                                                     f"({sizes.loc['train', 'row_fraction']:.1%}), {len(train)} groups")
    back = SplitResult.load(result.save(tmp_path / "split"))
    assert back.frame.equals(new) and back.params == result.params


def test_group_split_errors():
    frame = _patients(40)
    for bad in (0, 1.0, 1.5, "0.2"):
        with pytest.raises(ConceptLensError, match="the test parameter must be a number strictly between 0 and 1"):
            group_split(frame, "patient", test=bad)
    with pytest.raises(ConceptLensError, match="at most 2/3"):
        group_split(frame, "patient", test=0.8)
    rare = frame.copy()
    rare.loc[rare["patient"].isin(["P0", "P1"]), "label"] = "necrosis"
    with pytest.raises(ConceptLensError, match=r"class 'necrosis' of column 'label' is in 2 group\(s\).*needs at least 5"):
        group_split(rare, "patient", test=0.2)
    with pytest.raises(ConceptLensError, match=r"names column 'lable'.*did you mean 'label'"):
        group_split(frame, "patient", stratify="lable")
    with pytest.raises(ConceptLensError, match="single group"):
        group_split(frame.assign(patient="P"), "patient")


def test_write_split_keeps_image_paths_resolvable(tmp_path):
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    frame = _patients(30)
    for p in frame["image"]:
        (data / p).write_bytes(b"png")
    absolute = tmp_path / "elsewhere.png"
    absolute.write_bytes(b"png")
    frame.loc[0, "image"] = str(absolute)
    frame.to_csv(data / "manifest.csv", index=False)
    (data / "manifest.toml").write_text("[preprocessing]\nsize = 32\n")
    out = tmp_path / "splits" / "v2" / "new.csv"
    result = write_split(data / "manifest.csv", out, group="patient", test=0.25, seed=0)
    written = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert written.equals(result.frame)
    assert written.loc[0, "image"] == str(absolute)
    assert all((out.parent / p).is_file() for p in written["image"])
    assert written["image"].iloc[1].startswith("../../data/img/")
    assert (out.parent / "new.toml").read_text() == (data / "manifest.toml").read_text()
    assert result.provenance["data"] == str(data / "manifest.csv") and result.provenance["data_hash"]
    same_folder = write_split(data / "manifest.csv", data / "resplit.csv", group="patient", test=0.25, seed=0)
    assert same_folder.frame["image"].equals(frame["image"])
    with pytest.raises(ConceptLensError, match="would overwrite its manifest"):
        write_split(data / "manifest.csv", data / "manifest.csv", group="patient")


# ---------------------------------------------------------------- slices


def _planted_slice(n=2000, d=64, seed=0):
    """Two Gaussian classes in 64-D; inside class 0 a sub-population (about 10 %) shifted along one
    direction on which the model predicts class 1; elsewhere 5 % random errors."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(0, 1, (2, d))[y] + rng.normal(0, 1, (n, d))
    truth = (y == 0) & (rng.random(n) < 0.2)
    direction = rng.normal(0, 1, d)
    x[truth] += 4.5 * direction / np.linalg.norm(direction)
    p1 = np.where(y == 1, rng.uniform(0.6, 0.95, n), rng.uniform(0.05, 0.4, n))
    p1 = np.where(rng.random(n) < 0.05, 1 - p1, p1)
    p1 = np.where(truth, rng.uniform(0.6, 0.95, n), p1)
    return x, y, np.stack([1 - p1, p1], axis=1), truth


def test_domino_finds_the_planted_error_slice_better_than_kmeans(tmp_path):
    x, y, p, truth = _planted_slice()
    result = discover_slices(x, y, p)
    slice_, prec, ap = best_slice(result, truth)
    _, _, ap_kmeans = best_slice(kmeans_slices(x, labels=y, pred_probs=p), truth)
    assert prec >= 0.8 and ap > ap_kmeans, (prec, ap, ap_kmeans)
    table = result.slices
    assert list(table["slice"]) == list(range(5)) and result.scores.shape == (len(x), 5)
    assert (np.diff(table["error_gap"]) <= 1e-12).all()
    assert table.loc[slice_, "label"] == 0 and table.loc[slice_, "prediction"] == 1
    overall = (p.argmax(1) == y).mean()
    m = result.scores[:, slice_]
    assert np.isclose(table.loc[slice_, "accuracy"], (m * (p.argmax(1) == y)).sum() / m.sum())
    assert np.isclose(table.loc[slice_, "error_gap"], overall - table.loc[slice_, "accuracy"])
    proto = result.prototypes(slice_, 10)
    assert len(proto) == 10 and (np.diff(result.scores[proto, slice_]) <= 0).all()
    assert truth[proto].mean() == prec
    assert result.scores[:, slice_].max() == result.scores[proto[0], slice_]
    back = SliceResult.load(result.save(tmp_path / "slices"))
    np.testing.assert_array_equal(back.scores, result.scores)
    assert back.rows["correct"].tolist() == result.rows["correct"].tolist()


def test_domino_em_without_label_terms_is_sklearn_gaussian_mixture():
    from sklearn.mixture import GaussianMixture

    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(m, 1, (300, 8)) for m in (0, 3, 6)])
    y = rng.integers(0, 2, len(x))
    p = np.eye(2)[y] * 0.8 + 0.1
    result = discover_slices(x, y, p, n_pca_components=None, init="kmeans", n_mixture_components=4, n_slices=4,
                           y_log_likelihood_weight=0, y_hat_log_likelihood_weight=0)
    gmm = GaussianMixture(4, covariance_type="diag", init_params="kmeans", random_state=0).fit(x)
    np.testing.assert_allclose(result.scores, gmm.predict_proba(x)[:, result.slices["component"]], atol=1e-8)
    assert result.params["converged"] and result.params["n_iter"] == gmm.n_iter_


def test_slice_inputs_and_metrics():
    x, y, p, truth = _planted_slice(n=200, d=8)
    with pytest.raises(ConceptLensError, match="at least 3² = 9 for 3 classes"):
        discover_slices(x, y, np.full((200, 3), 1 / 3), n_mixture_components=5, n_slices=2)
    with pytest.raises(ConceptLensError, match="softmax"):
        discover_slices(x, y, p * 3)
    with pytest.raises(ConceptLensError, match="pass classes="):
        discover_slices(x, np.where(y == 1, "b", "a"), np.tile(p, (1, 2)) / 2)
    named = discover_slices(x, np.where(y == 1, "tumour", "normal"), p[:, 1], n_mixture_components=8, n_slices=2)
    assert set(named.rows["label"]) == {"normal", "tumour"}
    again = discover_slices(x, np.where(y == 1, "tumour", "normal"), p[:, 1], n_mixture_components=8, n_slices=2)
    np.testing.assert_array_equal(again.scores, named.scores)  # seeded: the same slices
    plain = kmeans_slices(x, n_slices=3)
    assert plain.slices["accuracy"].isna().all() and (np.diff(plain.slices["size"]) <= 0).all()
    assert plain.slices["size"].sum() == len(x) and list(plain.rows.columns) == ["row"]
    with pytest.raises(ConceptLensError, match="pass both or neither"):
        kmeans_slices(x, labels=y)
    scores = np.array([0.9, 0.8, 0.8, 0.1, 0.5])
    hits = np.array([True, False, True, False, True])
    assert precision_at_k(scores, hits, k=2) == 0.5  # tie at 0.8 broken by row order
    assert precision_at_k(scores, hits, k=3) == pytest.approx(2 / 3)
    # AP by hand: ranked hits T F T T F -> (1/1 + 2/3 + 3/4) / 3
    assert average_precision(scores, hits) == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)


# ---------------------------------------------------------------- label issues


def _noisy_labels(n=2000, d=16, k=3, noise=0.05, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    x = rng.normal(0, 3.0, (k, d))[y] + rng.normal(0, 1, (n, d))
    flip = rng.random(n) < noise
    return x, np.where(flip, (y + rng.integers(1, k, n)) % k, y), flip


def test_label_issues_recover_planted_flips(tmp_path):
    x, given, flip = _noisy_labels()
    result = confident_label_issues(x, given)
    found = np.zeros(len(x), dtype=bool)
    found[result.issues["row"]] = True
    precision, recall = (found & flip).sum() / found.sum(), (found & flip).sum() / flip.sum()
    assert precision >= 0.8 and recall >= 0.8, (precision, recall)
    assert abs(result.estimated_noise_rate - flip.mean()) < 0.02
    assert (np.diff(result.issues["p_given"]) >= 0).all()
    assert (result.issues["suggested_label"] != result.issues["given_label"]).all()
    back = LabelIssueResult.load(result.save(tmp_path / "labels"))
    assert back.issues["row"].tolist() == result.issues["row"].tolist()
    assert back.confident_joint.to_numpy().tolist() == result.confident_joint.to_numpy().tolist()


def test_confident_joint_matches_a_per_example_loop():
    rng = np.random.default_rng(5)
    p = rng.dirichlet(np.ones(4) * 0.7, size=500)
    labels = np.array(list("abcd"))[rng.integers(0, 4, 500)]
    result = confident_label_issues_from_probabilities(p, labels)
    classes = sorted(set(labels))
    t = [np.mean([p[i, j] for i in range(500) if labels[i] == c]) for j, c in enumerate(classes)]
    joint = np.zeros((4, 4), dtype=int)
    flagged = []
    for i in range(500):  # the paper's definition, one example at a time
        above = [j for j in range(4) if p[i, j] >= t[j]]
        if above:
            j = max(above, key=lambda c: p[i, c])
            g = classes.index(labels[i])
            joint[g, j] += 1
            if j != g:
                flagged.append((p[i, g], i))
    np.testing.assert_allclose(result.thresholds, t)
    np.testing.assert_array_equal(result.confident_joint.to_numpy(), joint)
    assert result.issues["row"].tolist() == [i for _, i in sorted(flagged)]


# ---------------------------------------------------------------- shortcut statistics


def test_wilson_and_newcombe_intervals_match_references():
    z = scipy.stats.norm.ppf(0.975)
    for k, n in [(81, 263), (3, 10), (10, 10), (0, 25)]:
        # The Wilson bounds solve (p_hat - p)^2 = z^2 p (1 - p) / n for p.
        ph = k / n
        roots = np.sort(np.roots([1 + z ** 2 / n, -(2 * ph + z ** 2 / n), ph ** 2]).real)
        np.testing.assert_allclose(wilson_interval(k, n), roots, atol=1e-12)
    low, high = wilson_interval(0, 10)
    assert low == 0 and high == pytest.approx(0.2775, abs=1e-4)  # z^2 / (n + z^2)
    # Newcombe (1998), Table II, example (a): 56/70 - 48/80, method 10: 0.0524 to 0.3339.
    delta, low, high = newcombe_interval(56, 70, 48, 80)
    assert delta == pytest.approx(0.2) and low == pytest.approx(0.0524, abs=1e-4) and high == pytest.approx(0.3339, abs=1e-4)
    assert np.isnan(newcombe_interval(1, 0, 1, 2)[0])
    frame = pd.DataFrame({"label": ["a"] * 10 + ["b"] * 5, "site": ["s0"] * 15, "correct": [1] * 3 + [0] * 7 + [1] * 5})
    table = accuracy_by_group(frame, by=("label", "site"))
    assert table[["label", "site", "n", "correct"]].values.tolist() == [["a", "s0", 10, 3], ["b", "s0", 5, 5]]
    np.testing.assert_allclose(table[["ci_low", "ci_high"]].iloc[0], wilson_interval(3, 10))
    assert accuracy_by_group(frame, by="site")[["n", "correct"]].values.tolist() == [[15, 8]]


def _gap_frame(effect, n=3000, seed=0):
    rng = np.random.default_rng(seed)
    label, site = rng.integers(0, 2, n), rng.integers(0, 3, n)
    acc = np.full(n, 0.85)
    if effect:  # a shortcut: site 2 helps class 0 and hurts class 1
        acc = np.where(site == 2, np.where(label == 0, 0.97, 0.6), acc)
    return pd.DataFrame({"label": label, "site": site, "correct": rng.random(n) < acc})


def test_group_gap_test():
    frame = _gap_frame(True)
    gap = group_gap_test(frame, "site")
    reference = sum(scipy.stats.chi2_contingency(pd.crosstab(sub["site"], sub["correct"]), correction=False)[0]
                    for _, sub in frame.groupby("label"))
    assert gap["statistic"] == pytest.approx(reference) and gap["dof"] == 4
    assert gap["p_chi2"] < 1e-10 and gap["p_value"] == 1 / 10_000  # no permutation reaches the planted gap
    cell = frame[(frame["label"] == 1)].groupby("site")["correct"].mean()
    assert (gap["gap_class"], gap["best_value"], gap["worst_value"]) == (1, cell.idxmax(), 2)
    assert gap["gap"] == pytest.approx(cell.max() - cell.min()) and gap["worst_accuracy"] == pytest.approx(cell.min())
    assert group_gap_test(_gap_frame(False), "site")["p_value"] > 0.01
    with pytest.raises(ConceptLensError, match="must hold True/False or 1/0"):
        group_gap_test(frame.assign(correct="yes"), "site")


def test_group_gap_permutation_p_matches_a_plain_shuffle_loop():
    # Few images per cell, where the chi-square distribution is off: the batched within-class
    # permutation p against a loop that shuffles correctness per class and sums scipy's statistics.
    rng = np.random.default_rng(5)
    frame = pd.DataFrame({"label": rng.choice(["a", "b"], 60), "pen": rng.choice([0, 1], 60, p=[0.8, 0.2])})
    frame["correct"] = (rng.random(60) < np.where(frame["pen"] == 1, 0.75, 0.95)).astype(int)
    got = group_gap_test(frame, "pen", n_permutations=4000, seed=1)

    def stat(f):
        return sum(scipy.stats.chi2_contingency(pd.crosstab(g["pen"], g["correct"]), correction=False)[0]
                   if g["correct"].nunique() > 1 and g["pen"].nunique() > 1 else 0.0 for _, g in f.groupby("label"))

    loop = np.random.default_rng(2)
    null = [stat(frame.assign(correct=frame.groupby("label")["correct"].transform(lambda c: loop.permutation(c.to_numpy()))))
            for _ in range(1000)]
    expected = (1 + sum(v >= got["statistic"] - 1e-9 for v in null)) / 1001
    assert got["p_value"] == pytest.approx(expected, abs=0.03)
    assert abs(got["p_value"] - got["p_chi2"]) > 1e-3  # the two p-values differ here: the test is not the formula


def test_cluster_alignment():
    rng = np.random.default_rng(0)
    attribute = rng.choice(["s0", "s1", "s2"], 1000)
    clusters = np.where(rng.random(1000) < 0.3, rng.integers(0, 4, 1000), pd.factorize(attribute, sort=True)[0])
    aligned = cluster_alignment(clusters, attribute, n_permutations=199)
    assert aligned["p_ari"] == aligned["p_nmi"] == 1 / 200 and aligned["ari"] > 0.3
    unrelated = cluster_alignment(rng.integers(0, 4, 1000), attribute, n_permutations=199)
    assert unrelated["p_ari"] > 0.05 and unrelated["p_nmi"] > 0.05
    assert unrelated["n_permutations"] == 199 and abs(unrelated["null_ari_mean"]) < 0.01
    # The batched null against sklearn, permutation by permutation.
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    a = pd.factorize(clusters, sort=True)[0]
    b = pd.factorize(attribute, sort=True)[0]
    perms = np.stack([rng.permutation(b) for _ in range(5)] + [b])
    ari, nmi = _contingency_scores(a, perms, a.max() + 1, b.max() + 1)
    np.testing.assert_allclose(ari, [adjusted_rand_score(q, a) for q in perms], atol=1e-12)
    np.testing.assert_allclose(nmi, [normalized_mutual_info_score(q, a) for q in perms], atol=1e-12)

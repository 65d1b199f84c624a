"""The dataset review on the ``histo`` world: planted shortcuts, the hidden necrosis slice, leaking
patients, the patient-level re-split, before/after comparison, the page in a browser, bad input."""

import json
from pathlib import Path

import pandas as pd
import pytest
from browser import inspect_page, require_chromium
from conftest import _cached, _source_hash

from conceptlens.cli import main
from conceptlens.report import build_review, compare_results, load_spec, write_compare_page
from conceptlens.review import average_precision, group_leakage, precision_at_k, write_split

XSS = "<script>alert(1)</script>"
# Small enough to train in ~15 s; the planted effects are strong enough that any model trained on the
# biased world keys on them (the world's design, measured in tests/test_world_histo.py's notes).
HISTO = dict(preset="histo", n=1200, size=64, n_concept=20, n_random=60, n_broden=20, label_noise=0.03,
             near_duplicates=4, leak_patients=3)
BALANCED = dict(site_bias=0.0, pen_bias=0.0)
TRAIN = dict(epochs=12, seed=0)

SPEC = """
title = "review {title}"
seed = 0
[model]
spec = "demo:{weights}"
device = "cpu"
[data]
manifest = "{manifest}"
[layers]
names = ["relu1", "conv3", "conv4"]
[concepts]
dir = "{world}/concepts"
random_pool = "{world}/random"
layers = ["conv4"]
[dataset]
layer = "relu1"
duplicate_threshold = 0.99
[review]
group = "patient"
sensitive = ["site", "pen"]
group_attributes = ["site"]
layer = "conv4"
"""


def _world_and_model(name, seed, fixed=False, **kw):
    """A histo world and the demo CNN trained on it; ``fixed``: re-split by patient first (the fix)."""
    from conceptlens.demo_model import train_demo
    from conceptlens.world import generate_world

    def build(d):
        world = generate_world(d / "world", progress=False, seed=seed, **HISTO, **kw)
        manifest = world.manifest
        if fixed:
            manifest = d / "world" / "manifest-resplit.csv"
            write_split(world.manifest, manifest, group="patient", stratify="label", test=0.25, seed=0)
        train_demo(world.root, d / "demo.pt", progress=False, manifest=manifest, **TRAIN)
        (d / "manifest.txt").write_text(str(Path(manifest).relative_to(d)))  # d is renamed once built

    root = _cached(f"histo-{name}", _source_hash(HISTO, kw, seed, fixed, TRAIN, "review-1"), build)
    return root, root / "demo.pt", root / (root / "manifest.txt").read_text()


def _review(tmp, name, weights, manifest, title=None):
    spec_path = tmp / f"{name}.toml"
    world = Path(weights).parent / "world"
    spec_path.write_text(SPEC.format(title=title or name, weights=weights, manifest=manifest, world=world))
    return build_review(load_spec(spec_path), tmp / name, progress=False)


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("review")
    out = {}
    for name, seed, fixed, kw in (("biased", 0, False, {}), ("fixed", 1, True, BALANCED), ("balanced1", 1, False, BALANCED),
                                  ("balanced2", 2, False, BALANCED), ("balanced3", 3, False, BALANCED)):
        root, weights, manifest = _world_and_model(name, seed, fixed, **kw)
        out[name] = (root, _review(tmp, name, weights, manifest))
    return tmp, out


def _finding(built, fid):
    f = built.result.findings.set_index("id")
    return f.loc[fid]


def test_site_and_pen_shortcuts_fail_for_the_biased_model_only(reviews):
    _, r = reviews
    for fid in ("shortcut:site", "shortcut:pen"):
        biased = _finding(r["biased"][1], fid)
        assert biased["verdict"] == "fail" and biased["p_adj"] < 0.01, (fid, biased.to_dict())
        assert _finding(r["fixed"][1], fid)["verdict"] != "fail", fid
    # The evidence tables are written, one row per (attribute, class, value) cell with its CI.
    gm = r["biased"][1].result.tables["group_metrics"]
    cells = gm[(gm["attribute"] == "site") & (gm["class"] != "(all)")]
    assert len(cells) == 9 and (cells["ci_low"] <= cells["accuracy"]).all() and (cells["accuracy"] <= cells["ci_high"]).all()
    # TCAV of the attributes' concept folders (pen; one per site) is part of the evidence.
    tcav = r["biased"][1].result.tables["shortcut_tcav"]
    assert set(tcav["concept"]) == {"pen", "site0", "site1", "site2"}
    assert set(tcav.groupby("attribute")["concept"].unique().explode()) == {"pen", "site0", "site1", "site2"}
    assert {"shortcut_decodability", "shortcut_alignment"} <= set(r["biased"][1].result.tables)


def test_every_leaking_patient_is_listed_and_none_after_the_split(reviews, tmp_path):
    _, r = reviews
    root, built = r["biased"]
    planted = set(json.loads((root / "world" / "world.json").read_text())["planted"]["leak_patients"])
    assert len(planted) == HISTO["leak_patients"]
    # A planted near-duplicate is a copy of a training patch of the same patient: that patient leaks too.
    frame = pd.read_csv(root / "world" / "manifest.csv", dtype=str, keep_default_na=False)
    planted |= set(frame.loc[frame["duplicate_of"] != "", "patient"])
    listed = set(built.result.tables["leaking_groups"]["group"].astype(str))
    assert listed == planted
    assert _finding(built, "leakage:patient")["verdict"] == "fail"
    # The fix: a patient-level split of the same manifest leaks no patient.
    new = tmp_path / "resplit.csv"
    assert main(["split", str(root / "world" / "manifest.csv"), "--group", "patient", "--out", str(new), "-q"]) == 0
    frame = pd.read_csv(new, dtype=str, keep_default_na=False)
    assert group_leakage(frame, "patient").totals["leaking_groups"] == 0
    assert all((new.parent / p).is_file() for p in frame["image"].head(20))
    assert _finding(r["fixed"][1], "leakage:patient")["verdict"] == "pass"


def test_the_necrosis_slice_is_found_on_three_seeds(reviews):
    # On site- and pen-balanced worlds with the world's split, where necrosis never occurs in training
    # (hidden stratification) and is the model's main failure. (On the biased worlds the shortcut's errors
    # swamp it; a patient re-split moves necrotic test patches into training.)
    _, r = reviews
    for name in ("balanced1", "balanced2", "balanced3"):
        root, built = r[name]
        manifest = pd.read_csv(built.result.info["manifest"], dtype=str, keep_default_na=False)
        members = built.result.tables["slice_scores"]
        truth = (manifest.loc[members["manifest_row"], "subclass"] == "necrosis").to_numpy()
        assert truth.sum() >= 10
        ours = [c for c in members if c.startswith("domino_")]
        base = [c for c in members if c.startswith("kmeans_")]
        best = max(ours, key=lambda c: precision_at_k(members[c].to_numpy(), truth, k=10))
        assert precision_at_k(members[best].to_numpy(), truth, k=10) >= 0.8, name
        ap = max(average_precision(members[c].to_numpy(), truth) for c in ours)
        ap_km = max(average_precision(members[c].to_numpy(), truth) for c in base)
        print(f"{name}: necrosis slice AP {ap:.3f}, k-means {ap_km:.3f}")


def test_compare_marks_the_site_and_leakage_findings_resolved(reviews):
    tmp, r = reviews
    comparison = compare_results(tmp / "biased", tmp / "fixed")
    status = comparison.findings.set_index("id")["status"]
    assert status["shortcut:site"] == "resolved" and status["leakage:patient"] == "resolved"
    index = write_compare_page(comparison, tmp / "compare")
    assert "resolved" in index.read_text()


def test_review_page_passes_the_browser_checks(reviews, tmp_path):
    require_chromium()
    _, r = reviews
    root, built = r["biased"]
    # A site named like a script: shown as text everywhere it appears.
    frame = _absolute(built.result.info["manifest"])
    frame["site"] = frame["site"].str.replace("site0", f"site0{XSS}", regex=False)
    manifest = tmp_path / "manifest-xss.csv"
    frame.to_csv(manifest, index=False)
    page = _review(tmp_path, "xss", root / "demo.pt", manifest, title=XSS)
    seen = inspect_page(page.index, tmp_path / "screenshot.png")
    assert [m for m in seen["console"] if m[0] in ("error", "pageerror")] == []
    assert all(u.startswith("file://") for u in seen["requests"])
    assert seen["failed"] == [] and len(seen["images"]) >= 5 and all(i["ok"] for i in seen["images"])
    assert {"findings", "shortcuts", "slices", "leakage", "labels"} <= set(seen["sections"])
    assert XSS in seen["text"] and seen["dialogs"] == [] and seen["scripts"] == 0
    for table in ("findings", "class_metrics", "slices", "slices_kmeans", "leakage_counts", "leaking_groups", "label_issues"):
        assert (page.index.parent / "tables" / f"{table}.csv").is_file(), table


def _absolute(manifest):
    """A manifest's rows with absolute image paths, so a variant can be written anywhere."""
    frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    frame["image"] = [str((Path(manifest).parent / p).resolve()) for p in frame["image"]]
    return frame


def _bad_spec(tmp_path, manifest, **review):
    lines = [f'{k} = {json.dumps(v)}' for k, v in review.items()]
    text = SPEC.split("[concepts]")[0].format(title="bad", weights=tmp_path / "missing.pt", manifest=manifest)
    path = tmp_path / "bad.toml"
    path.write_text(text + "[review]\n" + "\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("change, review, message", [
    (None, {"group": "patient_id", "sensitive": ["site"]}, "column 'patient_id', which the manifest lacks.*did you mean 'patient'"),
    (None, {"group": "patient", "sensitive": ["scanner"]}, "column 'scanner', which the manifest lacks"),
    ("one_site", {"group": "patient", "sensitive": ["site"]}, "'site' has one value"),
    ("spanning", {"group": "patient", "sensitive": ["site"], "group_attributes": ["site"]}, "spans 2 values of column 'site'"),
    ("no_test", {"group": "patient", "sensitive": ["site"]}, "evaluation split 'test'.*has no rows"),
])
def test_bad_review_input_is_one_line(reviews, tmp_path, capsys, change, review, message):
    import re

    _, r = reviews
    root = r["biased"][0]
    frame = _absolute(root / "world" / "manifest.csv")
    if change == "one_site":
        frame["site"] = "site0"
    elif change == "spanning":
        frame.loc[frame.index[0], "site"] = next(s for s in ("site0", "site1") if s != frame.loc[frame.index[0], "site"])
    elif change == "no_test":
        frame["split"] = "train"
    manifest = tmp_path / "manifest.csv"
    frame.to_csv(manifest, index=False)
    assert main(["review", str(_bad_spec(tmp_path, manifest, **review)), "--out", str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert "Traceback" not in err

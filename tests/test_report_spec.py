"""Report spec parsing and the result cache: validation messages, relative paths, cache keys."""

from pathlib import Path

import pytest

from conceptlens.errors import ConceptLensError
from conceptlens.core.hashing import hash_files, hash_json, hash_tree
from conceptlens.report.cache import ResultCache
from conceptlens.report.demo import DEMO_SPEC
from conceptlens.report.spec import SECTIONS, load_spec

ROOT = Path(__file__).resolve().parents[1]


def _spec(tmp_path, text):
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "data" / "manifest.csv").write_text("image,label\na.png,x\n")
    (tmp_path / "w.pt").write_bytes(b"")
    path = tmp_path / "spec.toml"
    path.write_text(text)
    return path


BASE = """
[model]
spec = "torchvision:resnet18:w.pt"
[data]
manifest = "data/manifest.csv"
[layers]
names = ["layer3", "layer4"]
"""


def test_paths_are_relative_to_the_spec_file(tmp_path):
    spec = load_spec(_spec(tmp_path, BASE))
    assert spec.manifest == tmp_path / "data" / "manifest.csv"
    assert spec.model == f"torchvision:resnet18:{tmp_path / 'w.pt'}"
    assert spec.layers == ("layer3", "layer4") and spec.sections == SECTIONS
    py = load_spec(_spec(tmp_path, BASE.replace("torchvision:resnet18:w.pt", "python:m.py:build:w.pt")))
    assert py.model == f"python:{tmp_path / 'm.py'}:build:{tmp_path / 'w.pt'}"
    mod = load_spec(_spec(tmp_path, BASE.replace("torchvision:resnet18:w.pt", "python:my.models:build")))
    assert mod.model == "python:my.models:build"  # an importable module name is not a path


@pytest.mark.parametrize(
    "extra, message",
    [
        ('[audit]\ninsensitive = ["tag:circle"]\n', "unknown key 'audit' in the top level; did you mean 'audits'?"),
        ('[concepts]\nrun = 10\n', "unknown key 'run' in table [concepts]; did you mean 'runs'?"),
        ('sections = ["overview", "unit"]\n', "unknown section 'unit'"),
        ('[audits]\ninsensitive = ["tag"]\n', "'tag' is not a concept:class pair"),
        ('[concepts]\ndir = "nowhere"\n', "does not exist; paths are relative to the spec file"),
        ('[audits]\ninsensitive = ["tag:circle"]\n', "[audits] insensitive needs [concepts] dir and random_pool"),
        ('[embedding]\nmethod = "mds"\n', "[embedding] method must be one of tsne, umap, pca"),
        ('[concepts]\nruns = "ten"\n', "[concepts] runs must be a non-negative integer"),
        ('[dissection]\nvisualize = "yes"\n', "[dissection] visualize must be true or false; got 'yes'"),
        ('[dissection]\nvisualize_steps = 0\n', "[dissection] visualize_steps must be at least 1; got 0"),
        ('[dissection]\nvisualise = true\n', "unknown key 'visualise' in table [dissection]; did you mean 'visualize'?"),
    ],
)
def test_bad_specs_name_the_key(tmp_path, extra, message):
    text = BASE + extra if extra.startswith("[") else extra + BASE
    with pytest.raises(ConceptLensError) as exc:
        load_spec(_spec(tmp_path, text))
    assert message in str(exc.value)


def test_bad_value_is_one_line_naming_file_and_key(tmp_path):
    path = _spec(tmp_path, BASE + "[dissection]\nvisualize_steps = -3\n")
    with pytest.raises(ConceptLensError) as exc:
        load_spec(path)
    assert str(exc.value) == f"{path}: [dissection] visualize_steps must be a non-negative integer; got -3"


def test_dissection_visualize_is_off_by_default_and_cheap(tmp_path):
    spec = load_spec(_spec(tmp_path, BASE))
    assert spec.dissect_visualize is False and spec.dissect_visualize_steps == 128
    on = load_spec(_spec(tmp_path, BASE + "[dissection]\nvisualize = true\nvisualize_steps = 8\n"))
    assert on.dissect_visualize is True and on.dissect_visualize_steps == 8


def test_missing_required_and_invalid_toml(tmp_path):
    with pytest.raises(ConceptLensError, match=r"\[layers\] names is required"):
        load_spec(_spec(tmp_path, BASE.replace('[layers]\nnames = ["layer3", "layer4"]\n', "")))
    with pytest.raises(ConceptLensError, match="is not valid TOML"):
        load_spec(_spec(tmp_path, "[model\n"))
    with pytest.raises(ConceptLensError, match="does not exist"):
        load_spec(tmp_path / "missing.toml")


def test_example_specs_load(tmp_path):
    """The demo example is exactly what `conceptlens demo` writes, and it parses."""
    example = (ROOT / "data_manifests" / "report-demo.toml").read_text()
    assert example == DEMO_SPEC.format(seed=0, device="auto", runs=20)
    for rel in ("world/manifest.csv", "world/concepts", "world/random", "world/broden", "model/demo.pt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).mkdir() if "." not in rel else (tmp_path / rel).write_text("image\na.png\n")
    (tmp_path / "report.toml").write_text(example)
    spec = load_spec(tmp_path / "report.toml")
    assert spec.audit_insensitive == (("tag", "circle"),) and spec.audit_not_decodable == ()


def test_cache_reuses_same_key_and_replaces_other_key(tmp_path):
    cache = ResultCache(tmp_path)
    calls = []

    def compute(d):
        calls.append(d)
        (d / "x.txt").write_text(str(len(calls)))
        return None

    load = lambda d: (d / "x.txt").read_text()  # noqa: E731
    k1, k2 = cache.key(a=1), cache.key(a=2)
    assert k1 != k2 and cache.key(a=1) == k1
    assert cache.get("stage", k1, compute, load) == ("1", False)
    assert cache.get("stage", k1, compute, load) == ("1", True)
    assert cache.get("stage", k2, compute, load) == ("2", False)
    assert [p.name for p in tmp_path.iterdir()] == [f"stage-{k2}"]

    def boom(d):
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        cache.get("stage", cache.key(a=3), boom, load)
    assert [p.name for p in tmp_path.iterdir()] == [f"stage-{k2}"]  # no half result left


def test_content_hash_follows_contents_not_stat(tmp_path):
    import hashlib
    import os

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "1.png").write_bytes(b"x")
    f1 = hash_tree(tmp_path / "a")
    # independent reference: SHA-256 over "name\0" + SHA-256(contents) per file, in name order
    ref = hashlib.sha256(b"1.png\0" + hashlib.sha256(b"x").digest()).hexdigest()
    assert f1 == ref
    st = os.stat(tmp_path / "a" / "1.png")
    os.utime(tmp_path / "a" / "1.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: same hash
    assert hash_tree(tmp_path / "a") == f1
    (tmp_path / "a" / "1.png").write_bytes(b"z")  # same size, new bytes: another hash
    assert hash_tree(tmp_path / "a") != f1
    (tmp_path / "a" / "2.png").write_bytes(b"y")  # a new file: another hash
    f3 = hash_tree(tmp_path / "a")
    assert f3 not in (f1, hash_tree(tmp_path / "a", exclude={"2.png"}))
    # the same tree elsewhere hashes the same; a missing file is not an error, but counts
    (tmp_path / "b").mkdir()
    for name in ("1.png", "2.png"):
        (tmp_path / "b" / name).write_bytes((tmp_path / "a" / name).read_bytes())
    assert hash_tree(tmp_path / "b") == f3
    assert hash_files([tmp_path / "nope.png"]) != hash_files([])
    assert hash_json({"b": 1, "a": [1, 2]}) == hash_json({"a": [1, 2], "b": 1})


def test_overview_accuracy_and_confusion_match_sklearn():
    import numpy as np
    import pandas as pd
    from sklearn.metrics import accuracy_score, confusion_matrix

    from conceptlens.report.overview import Overview

    rng = np.random.default_rng(0)
    classes = ["a", "b", "c"]
    label = rng.choice(classes, 200)
    pred = np.where(rng.random(200) < 0.7, label, rng.choice(classes, 200))
    split = rng.choice(["train", "test"], 200)
    frame = pd.DataFrame({"manifest_row": range(200), "image": [f"{i}.png" for i in range(200)], "label": label,
                          "split": split, "predicted": pred, "confidence": 1.0})
    ov = Overview(predictions=frame, classes=classes, provenance={})
    acc = ov.accuracy().set_index(["split", "class"])
    for s in ("train", "test"):
        m = split == s
        assert acc.loc[(s, "(all)"), "accuracy"] == pytest.approx(accuracy_score(label[m], pred[m]))
        for c in classes:
            mc = m & (label == c)
            assert acc.loc[(s, c), "accuracy"] == pytest.approx(accuracy_score(label[mc], pred[mc]))
        np.testing.assert_array_equal(ov.confusion(s).to_numpy(), confusion_matrix(label[m], pred[m], labels=classes))

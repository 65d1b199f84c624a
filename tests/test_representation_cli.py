"""`conceptlens probe | embed | neighbors | topk` over a store or a model + manifest."""

import numpy as np
import pandas as pd
import pytest

from conceptlens.cli import main
from conceptlens.data import Manifest
from representation_helpers import cached_store


@pytest.fixture(scope="module")
def small_manifest(world_dir, tmp_path_factory):
    """The first 160 rows of the shared world as a manifest CSV beside its images."""
    frame = pd.read_csv(world_dir / "manifest.csv", keep_default_na=False).iloc[:160]
    path = world_dir / "manifest.csv"
    out = tmp_path_factory.mktemp("cli") / "manifest.csv"
    frame["image"] = [str(world_dir / p) for p in frame["image"]]
    frame.to_csv(out, index=False)
    assert len(Manifest.read(out)) == 160 and path.is_file()
    return out


@pytest.fixture(scope="module")
def store(small_manifest, demo_model):
    return cached_store("cli-small", demo_model, small_manifest, ["relu3", "relu4"])


def test_probe_embed_neighbors_over_a_store(store, tmp_path, capsys):
    assert main(["probe", "-q", "--store", str(store.path), "--targets", "label,has_tag", "--n-bootstrap", "100",
                 "--out", str(tmp_path / "p")]) == 0
    probes = pd.read_csv(tmp_path / "p" / "probes.csv")
    assert len(probes) == 4 and {"accuracy", "baseline_accuracy", "selectivity", "ci_low"} <= set(probes.columns)
    assert (probes["baseline"] == "none").all()  # --store without --baseline-store: said so, never compared with chance
    assert main(["embed", "-q", "--store", str(store.path), "--method", "pca", "--out", str(tmp_path / "e")]) == 0
    emb = pd.read_csv(tmp_path / "e" / "embedding.csv")
    assert len(emb) == 160 and {"x", "y", "label"} <= set(emb.columns)
    assert main(["neighbors", "-q", "--store", str(store.path), "--layer", "relu3", "--k", "5",
                 "--out", str(tmp_path / "n")]) == 0
    for name in ("duplicates.csv", "label_issues.csv"):
        assert (tmp_path / "n" / name).is_file()
    out = capsys.readouterr().out
    assert "probes (4)" in out and "trustworthiness" in out and "exact blocked symmetric self-join" in out


def test_topk_and_probe_from_model_and_manifest(small_manifest, demo_weights, tmp_path):
    model = ["--model", f"demo:{demo_weights}", "--device", "cpu", "--data", str(small_manifest)]
    assert main(["topk", "-q", *model, "--layers", "relu2,fc", "--k", "3", "--out", str(tmp_path / "t")]) == 0
    t = pd.read_csv(tmp_path / "t" / "topk.csv")
    assert set(t["layer"]) == {"relu2", "fc"} and t["rank"].max() == 3
    assert (tmp_path / "t" / "activations" / "meta.json").is_file()  # the same pass wrote a store
    assert main(["probe", "-q", *model, "--layers", "relu4", "--n-bootstrap", "50", "--out", str(tmp_path / "p")]) == 0
    probes = pd.read_csv(tmp_path / "p" / "probes.csv")
    assert np.isfinite(probes["accuracy"]).all() and (probes["baseline"] == "random-init copy").all()
    assert np.isfinite(probes["baseline_accuracy"]).all() and (tmp_path / "p" / "baseline-store" / "meta.json").is_file()


def test_errors_are_one_line(store, tmp_path, capsys):
    assert main(["probe", "--store", str(store.path), "--targets", "colour", "--out", str(tmp_path)]) == 2
    assert "did you mean 'color'" in capsys.readouterr().err
    assert main(["neighbors", "--out", str(tmp_path)]) == 2
    assert "give --store DIR, or all of --model, --data and --layers" in capsys.readouterr().err
    assert main(["topk", "--store", str(store.path), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "needs spatial maps" in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["probe", "embed", "neighbors", "topk"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: conceptlens {command}" in text and "--store" in text and "--model" in text

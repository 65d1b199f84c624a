"""SpRAy: planted clusters of synthetic maps recovered with the eigengap, the tag shortcut of the demo
model separated from untagged circles (adjusted Rand index measured), save/load, and the CLI commands."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import adjusted_rand_score

from conceptlens.attribution import SprayResult, attribute, spray, spray_class
from conceptlens.cli import main
from conceptlens.data import Manifest, load_images
from conceptlens.errors import ConceptLensError


def _blob_maps(seed=0):
    """Three planted strategies: relevance blobs at three places (40/30/20 maps), with noise and jitter."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32]
    centres = [(8, 8), (8, 24), (24, 16)]
    maps, truth = [], []
    for c, n in enumerate((40, 30, 20)):
        for _ in range(n):
            cy, cx = np.array(centres[c]) + rng.normal(0, 1.0, 2)
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 3.0 ** 2))
            maps.append(blob + 0.1 * rng.random((32, 32)))
            truth.append(c)
    order = rng.permutation(len(maps))
    return np.array(maps, dtype=np.float32)[order], np.array(truth)[order], centres


def test_spray_recovers_planted_strategies(tmp_path):
    maps, truth, centres = _blob_maps()
    res = spray(maps, size=16, rows=[f"img{i}" for i in range(len(maps))])
    assert res.n_clusters == 3  # chosen by the eigengap
    assert adjusted_rand_score(truth, res.labels) > 0.95
    assert list(res.clusters()["size"]) == [40, 30, 20]  # numbered by size
    # Each prototype peaks where its strategy's blob is (16 px grid = half the resolution).
    for c in range(3):
        members_truth = np.bincount(truth[res.labels == c]).argmax()
        peak = np.unravel_index(res.prototypes[c].argmax(), res.prototypes[c].shape)
        assert np.abs(np.array(peak) * 2 + 1 - np.array(centres[members_truth])).max() <= 3
        assert res.labels[res.medoids[c]] == c
    assert res.members(2) == [f"img{i}" for i in np.flatnonzero(res.labels == 2)]
    again = spray(maps, size=16)
    np.testing.assert_array_equal(again.labels, res.labels)
    back = SprayResult.load(res.save(tmp_path / "spray"))
    np.testing.assert_array_equal(back.labels, res.labels)
    np.testing.assert_allclose(back.prototypes, res.prototypes)
    assert back.n_clusters == 3 and back.members(0) == res.members(0)
    assert {"index", "cluster", "x", "y", "is_medoid"} <= set(back.to_frame().columns)
    with pytest.raises(ConceptLensError, match="n_clusters must be 'auto' or an integer"):
        spray(maps, n_clusters=0)


def test_spray_separates_tagged_from_untagged_circles(demo_model, world_dir):
    """The tag co-occurs with 'circle' in training; SpRAy on circle's LRP maps isolates the tag strategy,
    and does not on a random-init copy of the architecture (so the split is what the model learned,
    not merely that tagged inputs look different)."""
    import torch

    from conceptlens.demo_model import DemoCNN

    res = spray_class(demo_model, world_dir / "manifest.csv", "circle", method="lrp-epsilon-plus-flat", split="test")
    frame = res.to_frame()
    tag = frame["has_tag"].to_numpy()
    labels = frame["cluster"].to_numpy()
    purity = sum(np.bincount(tag[labels == c]).max() for c in range(res.n_clusters)) / len(tag)
    ari = adjusted_rand_score(tag, labels)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        untrained = DemoCNN(len(demo_model.classes)).eval()
    manifest = Manifest.read(world_dir / "manifest.csv")
    circles = manifest.subset((manifest.frame["label"] == "circle") & (manifest.frame["split"] == "test"))
    control = spray(attribute(untrained, load_images(circles, demo_model.preprocessing), 0, "lrp-epsilon-plus-flat"))
    ari_control = adjusted_rand_score(tag, control.labels)
    print(f"SpRAy circle: k={res.n_clusters} purity={purity:.3f} (majority {max(tag.mean(), 1 - tag.mean()):.3f}) "
          f"ARI={ari:.3f}; random-init control ARI={ari_control:.3f}")
    # Measured (test split, 75 circles, ~21 tagged): k=2 by the eigengap, purity 1.00, ARI 1.00;
    # random-init control ARI 0.08.
    assert ari > 0.8 and purity > 0.95
    assert ari_control < 0.2
    assert res.provenance["weights_hash"] == demo_model.weights_hash
    with pytest.raises(ConceptLensError, match="no images of class 'hexagon'"):
        spray_class(demo_model, world_dir / "manifest.csv", "hexagon")


@pytest.fixture(scope="module")
def small_manifest(world_dir, tmp_path_factory):
    src = Manifest.read(world_dir / "manifest.csv")
    frame = src.frame[(src.frame["split"] == "test")].head(12).copy()
    frame["image"] = [str(src.root / p) for p in frame["image"]]
    path = tmp_path_factory.mktemp("attr") / "small.csv"
    frame.to_csv(path, index=False)
    return path


def test_cli_attribute_writes_heatmaps_overlays_and_an_index(demo_weights, small_manifest, tmp_path, capsys):
    out = tmp_path / "attr"
    rc = main(["attribute", "--model", f"demo:{demo_weights}", "--data", str(small_manifest), "--limit", "3",
               "--methods", "saliency,lrp-epsilon-plus-flat", "--out", str(out), "-q"])
    assert rc == 0
    index = json.loads((out / "index.json").read_text())
    assert [m["name"] for m in index["methods"]] == ["saliency", "lrp-epsilon-plus-flat"]
    assert len(index["images"]) == 3
    for entry in index["images"]:
        for kind in ("heatmaps", "overlays"):
            with Image.open(out / entry[kind]["saliency"]) as im:
                assert im.size == (64, 64) and im.mode == "RGB"
    assert np.load(out / "maps" / "lrp-epsilon-plus-flat.npy").shape == (3, 64, 64)
    one = Manifest.read(small_manifest).image_paths()[0]
    rc = main(["attribute", "--model", f"demo:{demo_weights}", "--image", str(one), "--methods", "gradcam",
               "--target", "circle", "--out", str(tmp_path / "one"), "-q"])
    assert rc == 0
    assert json.loads((tmp_path / "one" / "index.json").read_text())["images"][0]["target_name"] == "circle"
    capsys.readouterr()
    assert main(["attribute", "--model", f"demo:{demo_weights}", "--data", str(small_manifest),
                 "--methods", "gradcm", "--out", str(tmp_path / "bad")]) == 2
    assert "did you mean 'gradcam'" in capsys.readouterr().err


def test_cli_spray(demo_weights, small_manifest, tmp_path):
    out = tmp_path / "spray"
    label = pd.read_csv(small_manifest)["label"].value_counts().index[0]
    rc = main(["spray", "--model", f"demo:{demo_weights}", "--data", str(small_manifest), "--class", label,
               "--method", "input-x-gradient", "--max-clusters", "3", "--out", str(out), "-q"])
    assert rc == 0
    res = SprayResult.load(out)
    assert len(res.labels) == (pd.read_csv(small_manifest)["label"] == label).sum()
    assert (out / "clusters.csv").is_file() and (out / "assignments.csv").is_file()

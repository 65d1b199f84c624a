"""Activation atlas on a hand-built colour model: cells, icons, bookkeeping, determinism, files, CLI."""

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conceptlens.errors import ConceptLensError
from conceptlens.featurevis import ActivationAtlas, activation_atlas
from conceptlens.featurevis.atlas import EMPTY_GREY
from conceptlens.models import load_model

COLOUR_OF_CHANNEL = (0, 2, 1)  # channel 0 fires on red, 1 on blue, 2 on green
NAMES = ("red", "green", "blue")  # label of colour index 0, 1, 2
MODEL_CODE = f'''
from collections import OrderedDict
import torch
from torch import nn


def colour_model():
    """1x1 conv: channel k = relu(colour c_k - (other two colours) / 2), c = {COLOUR_OF_CHANNEL}."""
    conv = nn.Conv2d(3, 3, 1)
    w = torch.full((3, 3), -0.5)
    for k, c in enumerate({COLOUR_OF_CHANNEL}):
        w[k, c] = 1.0
    with torch.no_grad():
        conv.weight.copy_(w[..., None, None])
        conv.bias.zero_()
    return nn.Sequential(OrderedDict(conv=conv, relu=nn.ReLU(), gap=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(),
                                     fc=nn.Linear(3, 3)))
'''
N_PER_COLOUR, SIDE = 20, 12
RUN = dict(grid=4, min_count=2, samples_per_image=2, size=24, steps=64, lr=0.1, progress=False)


@pytest.fixture(scope="module")
def colour_world(tmp_path_factory):
    """Colour-dominated 12 px images (one dominant colour each, noisy), a manifest with a
    preprocessing sidecar (no normalisation), and the colour model's spec."""
    root = tmp_path_factory.mktemp("colour-atlas")
    (root / "colour_model.py").write_text(MODEL_CODE)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(3 * N_PER_COLOUR):
        c = i % 3
        rgb = rng.uniform(0, 0.25, 3)
        rgb[c] = rng.uniform(0.6, 1.0)
        pixels = np.clip(rgb + rng.normal(0, 0.03, (SIDE, SIDE, 3)), 0, 1)
        Image.fromarray((pixels * 255).round().astype(np.uint8)).save(root / f"{i:03d}.png")
        rows.append({"image": f"{i:03d}.png", "label": NAMES[c]})
    pd.DataFrame(rows).to_csv(root / "colours.csv", index=False)
    (root / "colours.toml").write_text("[preprocessing]\nmean = [0.0, 0.0, 0.0]\nstd = [1.0, 1.0, 1.0]\n")
    return root / "colours.csv", f"python:{root / 'colour_model.py'}:colour_model"


@pytest.fixture(scope="module")
def colour_model(colour_world):
    return load_model(colour_world[1], device="cpu")


@pytest.fixture(scope="module")
def atlas(colour_world, colour_model):
    return activation_atlas(colour_model, colour_world[0], "relu", **RUN)


def _activation(manifest, sample):
    """The reference: the colour model's relu output at the sample's position, from the image file."""
    pixel = np.asarray(Image.open(manifest.parent / sample.image), dtype=np.float64)[sample.map_y, sample.map_x] / 255
    w = np.full((3, 3), -0.5)
    w[np.arange(3), COLOUR_OF_CHANNEL] = 1.0
    return np.maximum(w @ pixel, 0)


def test_each_icon_shows_the_colour_of_its_cells_dominant_channel(atlas, colour_world):
    assert len(atlas.cells) >= 3 and atlas.icons.shape == (len(atlas.cells), 24, 24, 3)
    for cell, icon, vector in zip(atlas.cells.itertuples(), atlas.icons, atlas.vectors):
        rgb = icon.reshape(-1, 3).astype(float).mean(0)
        colour = COLOUR_OF_CHANNEL[int(np.argmax(vector))]
        others = [c for c in range(3) if c != colour]
        assert rgb[colour] > rgb[others].max() + 20, (cell, rgb, vector)
        assert cell.top_label == NAMES[colour] and cell.value > 0
    # each cell's vector is the mean of its samples' activations, read back from the images
    manifest = colour_world[0]
    for i, vector in enumerate(atlas.vectors):
        members = atlas.samples[atlas.samples["cell"] == i]
        expected = np.mean([_activation(manifest, s) for s in members.itertuples()], axis=0)
        np.testing.assert_allclose(vector, expected, atol=1e-5)


def test_counts_add_up_and_the_grid_follows_the_layout(atlas):
    samples, cells = atlas.samples, atlas.cells
    assert len(samples) == 3 * N_PER_COLOUR * RUN["samples_per_image"]
    kept, dropped = samples[samples["cell"] >= 0], samples[samples["cell"] < 0]
    assert len(kept) + len(dropped) == len(samples) == atlas.provenance["n_samples"]
    assert cells["count"].sum() == len(kept) and len(dropped) == atlas.provenance["n_dropped"]
    assert (cells["count"] >= RUN["min_count"]).all()
    per_grid_cell = samples.groupby(["grid_row", "grid_col"]).size()
    for cell in cells.itertuples():
        members = samples[samples["cell"] == cell.cell]
        assert len(members) == cell.count == per_grid_cell[(cell.grid_row, cell.grid_col)]
        assert (members["grid_row"] == cell.grid_row).all() and (members["grid_col"] == cell.grid_col).all()
    for (r, c), n in per_grid_cell.items():  # a grid cell is kept exactly when it holds min_count samples
        assert (n >= RUN["min_count"]) == (((cells["grid_row"] == r) & (cells["grid_col"] == c)).sum() == 1)
    # the grid cuts the UMAP layout: x grows with the column, y shrinks with the row (row 0 at the top)
    by_x, by_y = samples.sort_values("umap_x"), samples.sort_values("umap_y")
    assert (np.diff(by_x["grid_col"]) >= 0).all() and (np.diff(by_y["grid_row"]) <= 0).all()
    assert samples["grid_col"].min() == 0 and samples["grid_col"].max() == RUN["grid"] - 1
    # two positions per image, drawn without replacement
    assert (samples.groupby("manifest_row").apply(lambda g: len(set(zip(g.map_y, g.map_x)))) == 2).all()


def test_the_atlas_stitches_the_icons_at_their_cells(atlas):
    s, g = 24, RUN["grid"]
    assert atlas.atlas.shape == (g * s, g * s, 3) and atlas.atlas.dtype == np.uint8
    drawn = set()
    for cell, icon in zip(atlas.cells.itertuples(), atlas.icons):
        tile = atlas.atlas[cell.grid_row * s:(cell.grid_row + 1) * s, cell.grid_col * s:(cell.grid_col + 1) * s]
        np.testing.assert_array_equal(tile[s // 2:], icon[s // 2:])  # the count is drawn in the top-left corner
        assert (tile[:4, 0] == 0).all() and (tile[:s // 2] != icon[:s // 2]).any()
        drawn.add((cell.grid_row, cell.grid_col))
    for r in range(g):
        for c in range(g):
            if (r, c) not in drawn:
                assert (atlas.atlas[r * s:(r + 1) * s, c * s:(c + 1) * s] == EMPTY_GREY).all()


def test_same_seed_same_atlas_and_the_class_filter(atlas, colour_world, colour_model):
    quick = {**RUN, "steps": 4}  # identical bytes or not, whatever the number of steps
    first = activation_atlas(colour_model, colour_world[0], "relu", **quick)
    again = activation_atlas(colour_model, colour_world[0], "relu", **quick)
    pd.testing.assert_frame_equal(again.cells, first.cells)
    pd.testing.assert_frame_equal(again.samples, first.samples)
    pd.testing.assert_frame_equal(first.samples, atlas.samples)  # positions and layout do not depend on the steps
    assert again.atlas.tobytes() == first.atlas.tobytes()
    other = activation_atlas(colour_model, colour_world[0], "relu", **{**quick, "seed": 1})
    assert not (other.samples[["map_y", "map_x"]].to_numpy() == atlas.samples[["map_y", "map_x"]].to_numpy()).all()
    assert other.atlas.tobytes() != first.atlas.tobytes()

    some = activation_atlas(colour_model, colour_world[0], "relu", classes=["red", "blue"], **{**RUN, "steps": 2})
    frame = pd.read_csv(colour_world[0])
    assert set(some.samples["label"]) == {"red", "blue"}
    assert sorted(some.samples["manifest_row"].unique()) == list(np.flatnonzero(frame["label"].isin(["red", "blue"])))
    assert set(some.cells["top_label"]) <= {"red", "blue"}
    assert some.provenance["parameters"]["classes"] == ["red", "blue"]
    with pytest.raises(ConceptLensError, match=r"unknown class 'purple' in classes; the manifest's labels are: "
                                                r"blue, green, red$"):
        activation_atlas(colour_model, colour_world[0], "relu", classes=["red", "purple"], **RUN)


def test_save_and_load_round_trip(atlas, tmp_path):
    out = atlas.save(tmp_path / "atlas")
    assert {p.name for p in out.iterdir()} >= {"atlas.png", "cells.csv", "samples.csv", "atlas.json"}
    back = ActivationAtlas.load(out)
    np.testing.assert_array_equal(back.atlas, atlas.atlas)
    np.testing.assert_array_equal(back.icons, atlas.icons)
    np.testing.assert_array_equal(back.vectors, atlas.vectors)
    pd.testing.assert_frame_equal(back.cells, atlas.cells, check_exact=False, rtol=1e-12)
    pd.testing.assert_frame_equal(back.samples, atlas.samples, check_exact=False, rtol=1e-12, check_dtype=False)
    assert back.layer == "relu" and back.grid == RUN["grid"] and back.provenance == atlas.provenance
    assert back.to_frame() is back.cells
    assert np.asarray(Image.open(out / "atlas.png")).shape == atlas.atlas.shape


def test_bad_input_is_one_clear_error(colour_world, colour_model, tmp_path):
    csv = colour_world[0]
    run = {**RUN, "steps": 1}
    with pytest.raises(ConceptLensError, match=r"layer 'rellu' is not a module of the model.*did you mean 'relu'"):
        activation_atlas(colour_model, csv, "rellu", **run)
    for name in ("grid", "min_count", "samples_per_image"):
        with pytest.raises(ConceptLensError, match=rf"^{name} must be a positive integer; got 0$"):
            activation_atlas(colour_model, csv, "relu", **{**run, name: 0})
    with pytest.raises(ConceptLensError, match=r"layer 'fc' gives \[3\] per image, not a spatial map \[C, H, W\].*"
                                                r"pick a convolutional layer"):
        activation_atlas(colour_model, csv, "fc", **run)
    with pytest.raises(ConceptLensError, match=r"samples_per_image=145 exceeds the 12x12 = 144 positions"):
        activation_atlas(colour_model, csv, "relu", **{**run, "samples_per_image": 145})
    few = tmp_path / "few.csv"
    pd.read_csv(csv).head(3).assign(image=lambda f: [str(csv.parent / p) for p in f["image"]]).to_csv(few, index=False)
    with pytest.raises(ConceptLensError, match=r"at least 4 activation samples for UMAP; got 3 \(3 images x 1"):
        activation_atlas(colour_model, few, "relu", **{**run, "samples_per_image": 1},
                         preprocessing=colour_model.preprocessing_for(None, mean=(0, 0, 0), std=(1, 1, 1)))
    with pytest.raises(ConceptLensError, match=r"no cell of the 4x4 grid holds min_count=1000"):
        activation_atlas(colour_model, csv, "relu", **{**run, "min_count": 1000})
    with pytest.raises(ConceptLensError, match=r"needs a LoadedModel or a model spec"):
        activation_atlas(torch.nn.Conv2d(3, 3, 1), csv, "relu", **run)


def test_cli_atlas_writes_the_atlas_and_tables(colour_world, tmp_path, capsys):
    from conceptlens.cli import main

    csv, spec = colour_world
    base = ["atlas", "--model", spec, "--data", str(csv), "--grid", "3", "--min-count", "2", "--steps", "8",
            "--size", "24", "--device", "cpu", "-q"]
    assert main(base + ["--layer", "relu", "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("atlas of relu: ") and "samples from 60 images" in out and "atlas.png, cells.csv" in out
    cells = pd.read_csv(tmp_path / "a" / "cells.csv")
    samples = pd.read_csv(tmp_path / "a" / "samples.csv")
    assert {"grid_row", "grid_col", "count", "x", "y", "objective", "value", "top_label"} <= set(cells.columns)
    assert np.isfinite(cells["value"]).all() and len(samples) == 60 and cells["count"].sum() == (samples["cell"] >= 0).sum()
    assert Image.open(tmp_path / "a" / "atlas.png").size == (3 * 24, 3 * 24)
    assert ActivationAtlas.load(tmp_path / "a").provenance["parameters"]["steps"] == 8

    assert main(base + ["--layer", "conv9", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("conceptlens: error: layer 'conv9' is not a module")
    assert main(base + ["--layer", "relu", "--classes", "red,teal", "--out", str(tmp_path / "bad")]) == 2
    assert "unknown class 'teal'" in capsys.readouterr().err
    assert main(base + ["--layer", "relu", "--grid", "0", "--out", str(tmp_path / "bad")]) == 2
    assert "grid must be a positive integer; got 0" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()

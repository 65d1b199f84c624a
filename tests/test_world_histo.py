"""The ``histo`` world preset: determinism, planted truth (sites, pen, necrosis, patients, leaks, noise), formats, CLI."""

import json
import logging

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conceptlens.cli import main
from conceptlens.core.broden import read_broden
from conceptlens.errors import ConceptLensError
from conceptlens.world import PRESETS, HistoConfig, World, WorldConfig, generate_world
from conceptlens.world.histo_world import MANIFEST_COLUMNS

# 120 patches per class: 90 train (84 at the class's site, 3 at each other), 30 test (10 per site).
BASE = dict(preset="histo", n=360, size=32, seed=3, patches_per_patient=6, n_broden=40, n_concept=3, n_random=4)


def _read(path):
    return pd.read_csv(path, dtype=str, keep_default_na=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(tmp_path_factory.mktemp("histo") / "w", progress=False, leak_patients=2, label_noise=0.1,
                          **BASE)


@pytest.fixture(scope="module")
def manifest(world):
    return _read(world.manifest)


@pytest.fixture(scope="module")
def planted(world):
    return json.loads((world.root / "world.json").read_text())["planted"]


def test_preset_is_listed_and_config_round_trips(world):
    assert PRESETS["histo"]["classes"] == ("tumour", "stroma", "normal")
    assert world.classes == ("tumour", "stroma", "normal")
    loaded = World.load(world.root)
    assert isinstance(loaded.config, HistoConfig) and loaded == world
    assert loaded.config == HistoConfig(leak_patients=2, label_noise=0.1, **BASE)


def test_same_config_same_bytes_other_seed_other_bytes(tmp_path, caplog):
    cfg = dict(BASE, n=60, n_broden=6, n_concept=1, n_random=2, near_duplicates=2, label_noise=0.2)
    a = generate_world(tmp_path / "a", progress=False, **cfg)
    b = generate_world(tmp_path / "b", HistoConfig(**cfg), progress=False)
    c = generate_world(tmp_path / "c", progress=False, **dict(cfg, seed=4))
    assert a.content_hash == b.content_hash  # a hash of every file but world.json
    assert (a.root / "world.json").read_text() == (b.root / "world.json").read_text()
    assert a.content_hash != c.content_hash
    for name in ("manifest.csv", "random/00000.png", "images/train/00000.png"):
        assert (a.root / name).read_bytes() != (c.root / name).read_bytes()
    with caplog.at_level(logging.INFO, logger="conceptlens.world"):
        again = generate_world(tmp_path / "a", progress=False, **cfg)
    assert "reusing" in caplog.text and again.content_hash == a.content_hash
    with pytest.raises(ConceptLensError, match=r"another configuration \(site_bias: 0.9 -> 0.0\)"):
        generate_world(tmp_path / "a", progress=False, **dict(cfg, site_bias=0.0))


def test_an_image_depends_on_its_role_and_index_only(tmp_path):
    cfg = dict(BASE, n=60, n_broden=3, n_concept=2, n_random=2)
    a = generate_world(tmp_path / "a", progress=False, **cfg)
    b = generate_world(tmp_path / "b", progress=False, **dict(cfg, n_random=3, n_concept=1))
    for name in ("manifest.csv", "images/train/00000.png", "broden/images/00002.png", "concepts/pen/00000.png",
                 "random/00001.png"):
        assert (a.root / name).read_bytes() == (b.root / name).read_bytes(), name


def test_manifest_layout(world, manifest):
    assert tuple(manifest.columns) == MANIFEST_COLUMNS == (
        "image", "split", "label", "site", "patient", "pen", "subclass", "true_label", "noisy", "duplicate_of")
    assert len(manifest) == 360 and (manifest.split == "test").sum() == 90
    assert all((world.root / p).is_file() and p.startswith(f"images/{s}/") for p, s in zip(manifest.image, manifest.split))
    assert set(manifest.site) == {"site0", "site1", "site2"} and set(manifest.pen) == {"0", "1"}
    with Image.open(world.root / manifest.image[0]) as im:
        assert im.mode == "RGB" and im.size == (32, 32)


def test_site_mix_follows_site_bias_in_train_and_is_balanced_in_test(manifest, planted):
    counts = pd.crosstab([manifest.split, manifest.true_label], manifest.site)
    for i, c in enumerate(("tumour", "stroma", "normal")):
        # P(site | class) = 0.1/3 + 0.9·[site = class]: 84 of 90 at the class's own site.
        assert counts.loc[("train", c)].tolist() == [84 if s == i else 3 for s in range(3)]
        assert counts.loc[("test", c)].tolist() == [10, 10, 10]
        assert planted["site_of_class"][c] == f"site{i}"
        assert planted["p_site_train"][c][f"site{i}"] == pytest.approx(0.1 / 3 + 0.9)


def test_patients_sit_at_one_site_and_only_planted_ones_leak(manifest, planted):
    per_patient = manifest.groupby("patient")
    assert (per_patient.site.nunique() == 1).all()
    in_both = sorted(p for p, s in per_patient.split.nunique().items() if s == 2)
    assert len(planted["leak_patients"]) == 2
    assert in_both == planted["leak_patients"] == planted["patients_in_both_splits"]
    sizes = per_patient.size()
    assert sizes.drop(in_both).max() <= 6 and (sizes[in_both] > 6).all()  # a leak merges two patients
    assert manifest.groupby("patient").true_label.nunique().max() > 1  # a patient's slides show several tissues


def test_pen_rates(manifest, planted):
    pen = manifest.pen.astype(int)
    train, test = manifest.split == "train", manifest.split == "test"
    tumour = manifest.true_label == "tumour"
    # Training: P(pen | tumour) = 0.2 + 0.9·0.8 = 0.92, P(pen | other) = 0.2·0.1 = 0.02.
    assert pen[train & tumour].mean() > 0.8 and pen[train & ~tumour].mean() < 0.08
    assert abs(pen[test].mean() - 0.2) < 0.12  # 90 test patches: 3 sd ≈ 0.13
    assert planted["pen_class"] == "tumour" and planted["p_pen_test"] == 0.2


def test_necrosis_only_in_tumour_at_the_set_rate(manifest, planted, tmp_path):
    sub = manifest.set_index("true_label").subclass
    assert set(sub.loc["tumour"]) == {"necrosis", "viable"}
    assert set(sub.drop("tumour")) == {"none"}
    # The default plants hidden stratification: no necrosis in training, 25 % of test tumour.
    tumour = manifest[manifest.true_label == "tumour"]
    assert (tumour.loc[tumour.split == "train", "subclass"] == "viable").all()
    test_rate = (tumour.loc[tumour.split == "test", "subclass"] == "necrosis").mean()
    assert abs(test_rate - 0.25) < 0.24  # 30 test tumour patches: 3 sd ≈ 0.24
    assert planted["subclass_of"] == "tumour" and planted["necrosis_train_rate"] == 0.0
    other = generate_world(tmp_path / "w", progress=False, **dict(BASE, n=240, necrosis_train_rate=0.5, n_broden=2,
                                                                   n_concept=1, n_random=1))
    frame = _read(other.manifest)
    train = frame[(frame.true_label == "tumour") & (frame.split == "train")]
    assert abs((train.subclass == "necrosis").mean() - 0.5) < 0.25  # 60 patches: 3 sd ≈ 0.19


def test_label_noise_rows(manifest, planted):
    noisy = manifest[manifest.noisy == "1"]
    assert len(noisy) == round(0.1 * 270) == planted["label_noise_rows"] and (noisy.split == "train").all()
    assert (noisy.label != noisy.true_label).all()
    clean = manifest[manifest.noisy == "0"]
    assert (clean.label == clean.true_label).all()


def test_near_duplicates_copy_a_train_patch_with_its_patient(tmp_path):
    w = generate_world(tmp_path / "w", progress=False, **dict(BASE, n=120, near_duplicates=3, leak_patients=1,
                                                              n_broden=2, n_concept=1, n_random=1))
    m = _read(w.manifest).set_index("image")
    planted = json.loads((w.root / "world.json").read_text())["planted"]
    dups = m[m.duplicate_of != ""]
    assert len(dups) == 3 and (dups.split == "test").all() and (m.loc[dups.duplicate_of].split == "train").all()
    for col in ("site", "patient", "pen", "subclass", "true_label"):
        assert (dups[col].to_numpy() == m.loc[dups.duplicate_of, col].to_numpy()).all()
    in_both = sorted(p for p, s in m.groupby("patient").split.nunique().items() if s == 2)
    assert in_both == planted["patients_in_both_splits"] == sorted(set(planted["leak_patients"]) | set(dups.patient))
    for img, src in zip(dups.index, dups.duplicate_of):
        a = np.asarray(Image.open(w.root / img)).astype(float)
        b = np.asarray(Image.open(w.root / src)).astype(float)
        assert min(np.abs(np.roll(a, (dy, dx), (0, 1))[2:-2, 2:-2] - b[2:-2, 2:-2]).mean()
                   for dy in (-1, 0, 1) for dx in (-1, 0, 1)) <= 3.0


def test_broden_set_has_masks_that_agree_with_pixels(world):
    bs = read_broden(world.broden)
    assert bs.categories == ("object", "scene") and len(bs) == 40
    names = bs.label_names()
    assert set(bs.labels.name) == {"nuclei", "necrosis", "pen", "tumour", "stroma", "normal"}
    seen = set()
    for i in range(len(bs)):
        ann = bs.annotations(i)
        (scene,) = ann["scene"]
        assert names[scene] in world.classes
        (obj,) = ann["object"]
        img = np.asarray(Image.open(bs.image_path(i))).astype(float)
        labelled = {n: obj == k for k, n in enumerate(names) if n and (obj == k).any()}
        seen |= set(labelled)
        rgb = {n: img[mask].mean(0) for n, mask in labelled.items()}
        rest = img[obj == 0].mean(0)  # unlabelled tissue: stroma, cytoplasm, lumens
        if "pen" in labelled:  # the inks absorb red strongly, eosin hardly
            assert rgb["pen"][0] < rest[0] - 100
        if "nuclei" in labelled:  # haematoxylin absorbs red, eosin hardly
            assert rgb["nuclei"][0] < rest[0] - 40
        if "necrosis" in labelled:  # bright eosin absorbs green
            assert names[scene] == "tumour" and rgb["necrosis"][1] < rest[1] - 40
    assert seen == {"nuclei", "necrosis", "pen"}


def test_concept_folders_and_random_pool(world):
    assert world.concept_names == ("pen", "necrosis", "site0", "site1", "site2")
    assert sorted(p.name for p in world.concepts.iterdir()) == sorted(world.concept_names)
    assert all(len(list((world.concepts / c).glob("*.png"))) == 3 for c in world.concept_names)
    assert len(list(world.random.glob("*.png"))) == 4


def test_site_concepts_differ_in_colour(world):
    mean = {s: np.mean([np.asarray(Image.open(p)).reshape(-1, 3).mean(0) for p in (world.concepts / s).glob("*.png")], 0)
            for s in ("site0", "site1", "site2")}
    assert min(np.abs(mean[a] - mean[b]).max() for a, b in [("site0", "site1"), ("site1", "site2"), ("site0", "site2")]) > 10


@pytest.mark.parametrize(
    "override, message",
    [
        (dict(size=16), r"the `size` parameter of generate_world must be an integer in \[32, 128\]; got 16"),
        (dict(size=256), r"`size` .* \[32, 128\]"),
        (dict(n_sites=2), r"`n_sites` .* integer in \[3, 8\]; got 2"),
        (dict(site_bias=1.5), r"`site_bias` .* a number in \[0, 1\]; got 1.5"),
        (dict(pen_class="tumor"), r"`pen_class` .* did you mean 'tumour'"),
        (dict(necrosis_rate=-0.1), r"`necrosis_rate`"),
        (dict(patches_per_patient=0), r"`patches_per_patient` .* integer >= 1"),
        (dict(leak_patients=500), r"`leak_patients` .* at most \d+ \(pairs of a train and a test patient"),
        (dict(tag_bias=0.5), r"unknown parameter 'tag_bias' for the 'histo' preset"),
        (dict(near_duplicates=100), r"`near_duplicates` .* at most min\(train, test\)"),
    ],
)
def test_invalid_parameters_name_the_parameter(tmp_path, override, message):
    cfg = dict(BASE, n=60, **override)
    with pytest.raises(ConceptLensError, match=message) as exc:
        generate_world(tmp_path / "w", progress=False, **cfg)
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "w").exists() and not list(tmp_path.glob(".*partial*"))


def test_config_class_must_match_the_preset(tmp_path):
    with pytest.raises(ConceptLensError, match=r"must be a HistoConfig for the 'histo' preset; got WorldConfig"):
        generate_world(tmp_path / "w", WorldConfig(), preset="histo")
    with pytest.raises(ConceptLensError, match=r"must be a WorldConfig for the 'shapes' preset; got HistoConfig"):
        generate_world(tmp_path / "w", HistoConfig(), preset="shapes")


def test_cli_world_histo(tmp_path, capsys):
    out = tmp_path / "w"
    args = ["-q", "world", "--preset", "histo", "--n", "48", "--size", "32", "--seed", "1", "--site-bias", "0.5",
            "--pen-bias", "0.0", "--sites", "4", "--leak-patients", "1", "--patches-per-patient", "4", "--out", str(out)]
    assert main(args) == 0
    assert "concept world (histo" in capsys.readouterr().out
    cfg = World.load(out).config
    assert (cfg.site_bias, cfg.pen_bias, cfg.n_sites, cfg.leak_patients, cfg.patches_per_patient) == (0.5, 0.0, 4, 1, 4)
    assert set(_read(out / "manifest.csv").site) == {"site0", "site1", "site2", "site3"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "histo", "--tag-bias", "0.5"], "--tag-bias applies to the shapes preset, not histo"),
        (["--preset", "histo", "--no-subclass"], "--no-subclass applies to the shapes preset"),
        (["--site-bias", "0.5"], "--site-bias applies to the histo preset, not shapes"),
        (["--leak-patients", "1"], "--leak-patients applies to the histo preset"),
        (["--preset", "histo", "--sites", "2"], "`n_sites` parameter of generate_world must be an integer in [3, 8]"),
    ],
)
def test_cli_world_errors_are_one_line(tmp_path, capsys, args, message):
    assert main(["-q", "world", "--n", "48", "--size", "32", *args, "--out", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("conceptlens: error:") and message in err[0], err
    assert not (tmp_path / "w").exists()

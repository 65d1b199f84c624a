"""Concept world generator and Broden writer: determinism, format integrity, planted truth."""

import hashlib
import json
import logging
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import conceptlens.world as world_pkg
from conceptlens.core.broden import BrodenRecord, decode_mask, encode_mask, write_broden
from conceptlens.errors import ConceptLensError
from conceptlens.world import PRESETS, World, WorldConfig, generate_world
from conceptlens.world.shapes import COLOR_RGB, tag_box, tag_masks

TINY = dict(n=80, size=32, seed=1, n_concept=4, n_random=6)


def _tree(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _read(path):
    return pd.read_csv(path, dtype=str, keep_default_na=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny world with every planted effect switched on, and the same with half-size masks."""
    base = tmp_path_factory.mktemp("worlds")
    cfg = dict(TINY, label_noise=0.1, near_duplicates=4)
    return {
        1: generate_world(base / "w1", progress=False, **cfg),
        2: generate_world(base / "w2", progress=False, mask_scale=2, **cfg),
    }


def test_public_api():
    assert sorted(world_pkg.__all__) == ["HistoConfig", "PRESETS", "World", "WorldConfig", "generate_world"]
    assert "shapes" in PRESETS and PRESETS["shapes"]["classes"] == ("circle", "square", "triangle", "cross")


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    cfg = dict(n=24, size=16, n_concept=2, n_random=3, near_duplicates=2, label_noise=0.2)
    a = generate_world(tmp_path / "a", progress=False, **cfg)
    b = generate_world(tmp_path / "b", progress=False, **cfg)
    c = generate_world(tmp_path / "c", progress=False, seed=5, **cfg)
    ta, tb, tc = _tree(a.root), _tree(b.root), _tree(c.root)
    assert ta == tb and a.content_hash == b.content_hash
    assert a.content_hash != c.content_hash
    assert ta["random/00000.png"] != tc["random/00000.png"]
    assert ta["manifest.csv"] != tc["manifest.csv"]


def test_reuse_same_config_refuse_other(tmp_path, caplog):
    w = generate_world(tmp_path / "w", progress=False, n=16, size=16, n_concept=1, n_random=1)
    stamp = (w.manifest.stat().st_mtime_ns, w.content_hash)
    with caplog.at_level(logging.INFO, logger="conceptlens.world"):
        again = generate_world(tmp_path / "w", WorldConfig(n=16, size=16, n_concept=1, n_random=1))
    assert "reusing" in caplog.text and again == World.load(w.root)
    assert (again.manifest.stat().st_mtime_ns, again.content_hash) == stamp
    with pytest.raises(ConceptLensError, match=r"another configuration \(seed: 0 -> 1\)"):
        generate_world(tmp_path / "w", n=16, size=16, n_concept=1, n_random=1, seed=1)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(ConceptLensError, match="not empty and holds no concept world"):
        generate_world(tmp_path / "junk", n=16, size=16)
    with pytest.raises(ConceptLensError, match="not a concept world"):
        World.load(tmp_path / "junk")
    assert not list(tmp_path.glob(".*partial*"))


@pytest.mark.parametrize(
    "override, message",
    [
        (dict(size=8), r"the `size` parameter of generate_world must be an integer in \[16, 1024\]; got 8"),
        (dict(tag_bias=1.5), r"`tag_bias` parameter .* must be a number in \[0, 1\]; got 1.5"),
        (dict(tag_base_rate=-0.1), r"`tag_base_rate`"),
        (dict(test_fraction=1.0), r"`test_fraction` .* in \(0, 1\)"),
        (dict(n=True), r"`n` parameter"),
        (dict(tag_class="circel"), r"`tag_class` .* did you mean 'circle'"),
        (dict(preset="shape"), r"`preset` .* did you mean 'shapes'"),
        (dict(n=40, near_duplicates=20), r"`near_duplicates` .* at most min\(train, test\) = 8"),
        (dict(size=32, mask_scale=16), r"`mask_scale`"),
        (dict(n_broden=0), r"`n_broden`"),
        (dict(nn=3), r"unknown parameter 'nn'.* did you mean 'n'"),
    ],
)
def test_invalid_config_names_the_parameter(tmp_path, override, message):
    with pytest.raises(ConceptLensError, match=message):
        generate_world(tmp_path / "w", **override)
    assert not (tmp_path / "w").exists()


def test_layout_and_manifest(tiny):
    w = tiny[1]
    for p in (w.manifest, w.broden / "index.csv", w.root / "world.json"):
        assert p.is_file()
    m = _read(w.manifest)
    assert list(m.columns) == ["image", "split", "label", "color", "texture", "scene", "has_tag", "subclass",
                               "true_label", "label_noise", "duplicate_of"]
    assert len(m) == 80 and set(m.split) == {"train", "test"}
    assert (m.split == "test").sum() == 20  # stratified: 5 of 20 per class
    assert set(m.true_label) == set(w.classes) and set(m.has_tag) <= {"0", "1"}
    assert all((w.root / p).is_file() and p == f"images/{s}/{p[-9:]}" for p, s in zip(m.image, m.split))
    sub = m.set_index("true_label").subclass
    assert set(sub.loc["square"]) == {"hollow", "solid"} and set(sub.drop("square")) == {"none"}
    assert sorted(p.name for p in w.concepts.iterdir()) == sorted(w.concept_names)
    assert all(len(list((w.concepts / c).glob("*.png"))) == 4 for c in w.concept_names)
    assert len(list(w.random.glob("*.png"))) == 6
    meta = json.loads((w.root / "world.json").read_text())
    assert meta["config"]["tag_class"] == "circle" and meta["classes"] == list(w.classes)
    assert meta["counts"]["broden"] == 20  # n_broden=None: as many as test images
    with Image.open(w.root / m.image[0]) as im:
        assert im.mode == "RGB" and im.size == (32, 32)


@pytest.mark.parametrize("scale", [1, 2])
def test_broden_format_integrity(tiny, scale):
    root = tiny[scale].broden
    texts = [p.read_text() for p in root.glob("*.csv")]
    assert not any(re.search(r"\d[eE][-+]?\d", t) for t in texts), "exponent notation in a CSV"
    index, labels, cats = _read(root / "index.csv"), _read(root / "label.csv"), _read(root / "category.csv")
    assert list(index.columns[:6]) == ["image", "split", "ih", "iw", "sh", "sw"]
    assert list(index.columns[6:]) == list(cats.name) == ["color", "object", "texture", "scene"]

    numbers = labels.number.astype(int)
    assert numbers.min() == 1 and list(numbers) == list(range(1, len(labels) + 1))
    cat_of = {}  # label number -> {category: frequency}
    for n, c in zip(numbers, labels.category):
        assert re.fullmatch(r"\w+\(\d+\)(;\w+\(\d+\))*", c)
        cat_of[n] = {k: int(v) for k, v in re.findall(r"(\w+)\((\d+)\)", c)}
    assert all(re.fullmatch(r"\d+\.\d+", v) for v in labels.coverage)

    seen = {}  # (number, category) -> images
    for row in index.itertuples(index=False):
        ih, iw, sh, sw = int(row.ih), int(row.iw), int(row.sh), int(row.sw)
        assert (ih, iw) == (32, 32) and (sh, sw) == (ih // scale, iw // scale)
        with Image.open(root / "images" / row.image) as im:
            assert im.size == (iw, ih)
        for cat in cats.name:
            cell = getattr(row, cat)
            assert cell, f"{row.image} has no {cat} annotation"
            found = set()
            for entry in cell.split(";"):
                if entry.isdigit():
                    found.add(int(entry))
                else:
                    lab = decode_mask(root / "images" / entry)
                    assert lab.dtype == np.int32 and lab.shape == (sh, sw)
                    found |= set(np.unique(lab).tolist()) - {0}
            for n in found:
                assert cat in cat_of[n], f"label {n} in column {cat} but label.csv says {cat_of[n]}"
                seen[(n, cat)] = seen.get((n, cat), 0) + 1
    for n, per_cat in cat_of.items():
        for cat, f in per_cat.items():
            assert seen[(n, cat)] == f

    for c in cats.itertuples(index=False):
        members = sorted(n for n, pc in cat_of.items() if c.name in pc)
        assert (int(c.first), int(c.last), int(c.count)) == (members[0], members[-1], len(members))
        cfile = _read(root / f"c_{c.name}.csv")
        assert list(cfile.columns) == ["code", "number", "name", "frequency", "coverage"] and len(cfile) > 0
        assert list(cfile.code.astype(int)) == list(range(1, len(cfile) + 1))
        assert sorted(cfile.number.astype(int)) == members
        assert cfile.frequency.astype(int).sum() == int(c.frequency)
        names = dict(zip(labels.number.astype(int), labels.name))
        assert all(names[int(n)] == nm for n, nm in zip(cfile.number, cfile.name))
    scene = _read(root / "c_scene.csv")
    assert (scene.frequency.astype(float) == scene.coverage.astype(float)).all()  # image-level: 1.0 per image


def test_masks_agree_with_pixels(tiny):
    root = tiny[1].broden
    index, labels = _read(root / "index.csv"), _read(root / "label.csv")
    name = dict(zip(labels.number.astype(int), labels.name))
    y0, x0, side = tag_box(32)
    tag_full, dark = tag_masks(32)
    for row in index.itertuples(index=False):
        img = np.asarray(Image.open(root / "images" / row.image)).astype(int)
        obj, color = decode_mask(root / "images" / row.object), decode_mask(root / "images" / row.color)
        shape_px = (obj > 0) & (np.vectorize(name.get)(obj) != "tag")
        colors = {name[n] for n in np.unique(color[shape_px])}
        assert len(colors) == 1 and colors <= set(COLOR_RGB)
        r, g, b = img[shape_px].mean(0)
        expected = {"red": r > g + 40 and r > b + 40, "green": g > r + 40 and g > b + 40,
                    "blue": b > r + 40 and b > g + 40, "yellow": min(r, g) > b + 60}
        assert expected[colors.pop()], row.image
        tag_px = np.vectorize(name.get)(obj) == "tag"
        if tag_px.any():
            assert (tag_px == tag_full).all()
            assert (img[dark] < 60).all() and (img[tag_full & ~dark] > 200).all()
        else:
            assert not (np.abs(img[tag_full] - 245).max(axis=1) < 15).all()


def test_mask_scale_downsamples_nearest(tiny):
    a, b = tiny[1].broden, tiny[2].broden  # same seed and draws, masks at 32 and 16 px
    idx = np.arange(16) * 2 + 1  # centres of the 2x2 cells

    def names(root, j):  # label numbers may differ (white can vanish at 16 px): compare names
        table = _read(root / "label.csv")
        lookup = dict(zip(table.number.astype(int), table.name)) | {0: ""}
        return np.vectorize(lookup.get)(decode_mask(root / "images" / f"{j:05d}_object.png"))

    for j in range(0, 20, 5):
        assert (a / "images" / f"{j:05d}.png").read_bytes() == (b / "images" / f"{j:05d}.png").read_bytes()
        assert (names(b, j) == names(a, j)[np.ix_(idx, idx)]).all()


def test_unbiased_world_and_tag_class(tmp_path):
    w = generate_world(tmp_path / "w", n=16, size=16, n_concept=1, n_random=1, tag_bias=0.0, tag_class="cross")
    planted = json.loads((w.root / "world.json").read_text())["planted"]
    assert planted["tag_class"] == "cross"
    assert set(planted["p_tag_train"].values()) == {0.3} and planted["p_tag_test"] == 0.3


def test_has_tag_matches_pixels(tiny):
    w = tiny[1]
    m = _read(w.manifest)
    tag_full, dark = tag_masks(32)
    for p, has in zip(m.image, m.has_tag):
        img = np.asarray(Image.open(w.root / p)).astype(int)
        is_tag = (img[dark] < 60).all() and (img[tag_full & ~dark] > 200).all()
        assert is_tag == (has == "1"), p


def test_label_noise_and_near_duplicates(tiny):
    w = tiny[1]
    m = _read(w.manifest)
    train = m[m.split == "train"]
    noisy = m[m.label_noise == "1"]
    assert len(noisy) == round(0.1 * len(train)) and (noisy.split == "train").all()
    assert (noisy.label != noisy.true_label).all()
    assert (m[m.label_noise == "0"].label == m[m.label_noise == "0"].true_label).all()

    dups = m[m.duplicate_of != ""]
    assert len(dups) == 4 and (dups.split == "test").all()
    assert dups.duplicate_of.is_unique and set(dups.duplicate_of) <= set(train.image)

    def load(p):
        return np.asarray(Image.open(w.root / p)).astype(float)

    def dist(a, b):  # best alignment over 1-px shifts, on the interior
        return min(np.abs(np.roll(a, (dy, dx), (0, 1))[2:-2, 2:-2] - b[2:-2, 2:-2]).mean()
                   for dy in (-1, 0, 1) for dx in (-1, 0, 1))

    others = [load(p) for p in train.image[:30]]
    for test_img, src in zip(dups.image, dups.duplicate_of):
        a, b = load(test_img), load(src)
        assert dist(a, b) <= 3.0
        assert min(dist(a, o) for o, p in zip(others, train.image[:30]) if p != src) > 10.0
        assert m.set_index("image").loc[test_img, "true_label"] == m.set_index("image").loc[src, "true_label"]


def test_tag_statistics(tmp_path):
    w = generate_world(tmp_path / "w", n=2000, size=16, n_broden=1, n_concept=1, n_random=1, progress=False)
    m = _read(w.manifest)
    m["has_tag"] = m.has_tag.astype(int)
    rate = m.groupby(["split", "true_label"]).has_tag.mean()
    # Training: P(tag | circle) = 0.3 + 0.9·0.7 = 0.93, P(tag | other) = 0.3·0.1 = 0.03.
    assert rate["train", "circle"] > 0.85
    assert all(rate["train", c] < 0.08 for c in ("square", "triangle", "cross"))
    # Test: 0.3 for every class (125 images per class: 3 sd ≈ 0.12).
    assert all(abs(rate["test", c] - 0.3) < 0.12 for c in w.classes)


def test_encode_decode_roundtrip(tmp_path):
    labels = np.array([[0, 1, 255], [256, 300, 65535]], dtype=np.int64)
    enc = encode_mask(labels)
    assert enc.dtype == np.uint8 and enc.shape == (2, 3, 3) and (enc[..., 2] == 0).all()
    Image.fromarray(enc).save(tmp_path / "m.png")
    for src in (enc, tmp_path / "m.png", str(tmp_path / "m.png")):
        out = decode_mask(src)
        assert out.dtype == np.int32 and (out == labels).all()
    with pytest.raises(ConceptLensError, match=r"\[0, 65535\]"):
        encode_mask(np.array([[70000]]))


def test_write_broden_generic_cells(tmp_path):
    a = np.zeros((4, 6), dtype=np.int16)
    a[:2] = 1
    b = np.zeros((4, 6), dtype=np.int16)
    b[:, :3] = 2
    px = np.zeros((8, 12, 3), dtype=np.uint8)
    recs = [
        BrodenRecord("d/x.jpg", "train", 8, 12, 4, 6, {"part": [a, b], "scene": [3]}, pixels=px),
        BrodenRecord("d/y.jpg", "val", 8, 12, 4, 6, {"part": [b], "material": [a, 0]}, pixels=px),
    ]
    write_broden(tmp_path, iter(recs), ["door", "wood", "kitchen", "unused"])
    index = _read(tmp_path / "index.csv")
    assert list(index.columns) == ["image", "split", "ih", "iw", "sh", "sw", "part", "material", "scene"]
    assert index.part[0] == "d/x_part_1.png;d/x_part_2.png" and index.part[1] == "d/y_part.png"
    assert index.scene[0] == "3" and index.scene[1] == "" and index.material[0] == ""
    assert (decode_mask(tmp_path / "images" / "d/x_part_2.png") == b).all()
    labels = _read(tmp_path / "label.csv")
    assert list(labels.name) == ["door", "wood", "kitchen"]  # "unused" occurs nowhere: no row
    assert labels.category[0] == "part(1);material(1)" and labels.frequency[0] == "2"
    assert labels.coverage[0] == "1.000000"  # 0.5 of the image in each of 2 images
    assert labels.coverage[2] == "1.000000" and labels.category[2] == "scene(1)"
    cats = _read(tmp_path / "category.csv")
    assert [tuple(r) for r in cats.itertuples(index=False)] == [
        ("part", "1", "2", "2", "3"), ("material", "1", "1", "1", "1"), ("scene", "3", "3", "1", "1")]
    with pytest.raises(ConceptLensError, match="already holds"):
        write_broden(tmp_path, recs, ["door", "wood", "kitchen"])
    bad = [BrodenRecord("z.png", "train", 8, 12, 4, 6, {"part": [np.zeros((8, 12), dtype=int)]})]
    with pytest.raises(ConceptLensError, match=r"shape \(sh, sw\) = \(4, 6\)"):
        write_broden(tmp_path / "b", bad, ["door"])
    bad = [BrodenRecord("z.png", "train", 8, 12, 4, 6, {"part": [np.full((4, 6), 9)]})]
    with pytest.raises(ConceptLensError, match=r"label numbers \[9\]"):
        write_broden(tmp_path / "c", bad, ["door"])

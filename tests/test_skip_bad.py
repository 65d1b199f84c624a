"""``--skip-bad`` in extract, attribute, spray and tcav: bad images are skipped, counted and listed in the
results under one row numbering (the 0-based ``manifest_row``), and errors name the row and the CSV
line; images of an in-memory list are named by their file."""

import json
import shutil

import pytest

from conceptlens.attribution import explain, spray_class
from conceptlens.cli import main
from conceptlens.data import Manifest, Preprocessing, make_loader
from conceptlens.errors import ConceptLensError
from conceptlens.models import load_model
from conceptlens.core.extract import extract
from conceptlens.plotting import write_explanation_gallery

from tiny_demo import build_tiny_demo


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_demo(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def broken(tmp_path, tiny):
    """A copy of the tiny world's manifest and images with one corrupt and one missing image of the
    same class, at rows that are not the class's first rows (so a position within the class differs
    from the manifest row)."""
    world, weights = tiny
    shutil.copytree(world / "images", tmp_path / "images")
    shutil.copy(world / "manifest.csv", tmp_path / "manifest.csv")
    manifest = Manifest.read(tmp_path / "manifest.csv")
    rows = manifest.frame.index[manifest.frame["label"] == "circle"][[1, 3]].tolist()
    (manifest.root / manifest.frame["image"][rows[0]]).write_bytes(b"not a png")
    (manifest.root / manifest.frame["image"][rows[1]]).unlink()
    return load_model(f"demo:{weights}", device="cpu"), manifest, rows


def test_error_names_manifest_row_and_csv_line(broken):
    model, manifest, (bad, _) = broken
    image = manifest.frame["image"][bad]
    message = rf"image {image} at manifest row {bad} \(line {bad + 2} of .*manifest.csv\): cannot decode.*--skip-bad"
    with pytest.raises(ConceptLensError, match=message):
        explain(model, manifest, "saliency")
    with pytest.raises(ConceptLensError, match=message):  # a class's rows keep their manifest numbers
        spray_class(model, manifest, "circle", method="saliency")


def test_extract_attribute_and_spray_list_the_same_rows(tmp_path, broken):
    model, manifest, rows = broken
    store = extract(model, manifest, ["conv4"], tmp_path / "store", skip_bad=True, progress=False)
    expl = explain(model, manifest, "saliency", skip_bad=True)
    sp = spray_class(model, manifest, "circle", method="saliency", skip_bad=True)
    for skipped in (store.skipped, list(expl.skipped), list(sp.skipped)):
        assert [s["manifest_row"] for s in skipped] == rows
        assert "cannot decode" in skipped[0]["error"] and skipped[1]["error"] == "file not found"
    assert len(expl.rows) == len(manifest) - 2 and not set(rows) & set(expl.rows["manifest_row"])
    circles = set(manifest.frame.index[manifest.frame["label"] == "circle"]) - set(rows)
    assert set(sp.rows["manifest_row"]) == circles and len(sp.labels) == len(circles)

    d = expl.save(tmp_path / "expl")
    write_explanation_gallery(expl, d)  # index.json, as `conceptlens attribute` writes it
    for name in ("index.json", "meta.json"):
        assert [s["manifest_row"] for s in json.loads((d / name).read_text())["skipped"]] == rows
    assert [s["manifest_row"] for s in type(expl).load(d).skipped] == rows
    d = sp.save(tmp_path / "spray")
    assert [s["manifest_row"] for s in json.loads((d / "meta.json").read_text())["skipped"]] == rows
    assert [s["manifest_row"] for s in type(sp).load(d).skipped] == rows


@pytest.mark.parametrize("command", ["attribute", "spray"])
def test_skip_bad_from_the_cli(tmp_path, broken, command, capsys):
    model, manifest, rows = broken
    common = ["-q", command, "--model", model.spec, "--data", str(manifest.path), "--out", str(tmp_path / "out")]
    extra = ["--methods", "saliency", "--limit", str(rows[1] + 1)] if command == "attribute" else \
        ["--class", "circle", "--method", "saliency"]
    assert main(common + extra) == 2
    assert f"at manifest row {rows[0]} (line {rows[0] + 2} of" in capsys.readouterr().err
    assert main(common + extra + ["--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert "skipped 2 unreadable images" in out and f"manifest row {rows[1]}:" in out
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert [s["manifest_row"] for s in meta["skipped"]] == rows


def test_in_memory_images_are_named_by_their_file(tmp_path):
    good, bad = tmp_path / "red" / "a.png", tmp_path / "red" / "b.png"
    bad.parent.mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(good)
    bad.write_bytes(b"not a png")
    concepts = Manifest.from_images([good, bad], kind="concept image")
    with pytest.raises(ConceptLensError, match=rf"^concept image {bad}: cannot decode image"):
        list(make_loader(concepts, Preprocessing()))
    with pytest.raises(ConceptLensError, match=rf"^image {bad}: cannot decode image"):  # the default kind
        list(make_loader(Manifest.from_images([good, bad]), Preprocessing()))


def test_tcav_skips_bad_concept_pool_and_class_images(tmp_path, broken, tiny, capsys):
    """Concept and random-pool images are named by their file, class inputs by manifest row; the plan
    is drawn from the images that could be read."""
    model, manifest, rows = broken
    world, _ = tiny
    shutil.copytree(world / "concepts" / "tag", tmp_path / "concepts" / "tag")
    shutil.copytree(world / "random", tmp_path / "random")
    bad_concept = sorted((tmp_path / "concepts" / "tag").iterdir())[2]
    bad_concept.write_bytes(b"not a png")
    bad_pool = sorted((tmp_path / "random").iterdir())[5]
    bad_pool.write_bytes(b"not a png either")
    common = ["-q", "tcav", "--model", model.spec, "--data", str(manifest.path), "--concepts", str(tmp_path / "concepts"),
              "--random-pool", str(tmp_path / "random"), "--classes", "circle", "--layers", "conv4", "--runs", "10",
              "--null-runs", "100", "--out", str(tmp_path / "out")]
    assert main(common) == 2
    err = capsys.readouterr().err
    assert f"image {bad_concept.resolve()}: cannot decode" in err and "--skip-bad" in err and "manifest row" not in err
    assert main(common + ["--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert "skipped 4 unreadable images" in out
    assert f"concept tag: {bad_concept.resolve()}" in out and f"random pool: {bad_pool.resolve()}" in out
    assert f"manifest row {rows[0]}:" in out and f"manifest row {rows[1]}:" in out
    from conceptlens.concepts import TCAVResult

    res = TCAVResult.load(tmp_path / "out")
    assert [s["source"] for s in res.skipped] == ["concept tag", "random pool", "class circle", "class circle"]
    assert not set(rows) & set(res.inputs["row"]) and str(bad_concept.resolve()) not in set(res.sets["image"])
    assert res.provenance["concepts"]["tag"]["n_read"] == res.provenance["concepts"]["tag"]["n_images"] - 1


def test_decision_tree_skips_and_lists_bad_images(tmp_path, broken):
    from conceptlens.decision import DecisionTreeResult, decision_tree

    model, manifest, rows = broken
    with pytest.raises(ConceptLensError, match="--skip-bad"):
        decision_tree(model, manifest, "conv3", "circle", n_modes=2, progress=False)
    tree = decision_tree(model, manifest, "conv3", "circle", n_modes=2, skip_bad=True, progress=False)
    assert [s["manifest_row"] for s in tree.skipped] == rows
    circles = set(manifest.frame.index[manifest.frame["label"] == "circle"]) - set(rows)
    assert set(tree.images["manifest_row"]) == circles
    assert DecisionTreeResult.load(tree.save(tmp_path / "tree")).skipped == tree.skipped
    routed = tree.route(model, manifest, skip_bad=True)
    assert len(routed) == len(manifest) - 2 and not set(rows) & set(routed["manifest_row"])

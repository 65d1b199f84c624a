"""The Broden reader: files from our writer, hand-written real-Broden corners, malformed files."""

import numpy as np
import pytest
from PIL import Image

from conceptlens.core.broden import decode_mask, read_broden
from conceptlens.errors import ConceptLensError
from dissection_reference import TINY_LABELS, tiny_broden


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    return tiny_broden(tmp_path_factory.mktemp("w") / "b")


def test_reads_what_the_writer_wrote(written):
    b = read_broden(written)
    assert b.categories == ("color", "object", "part", "scene", "texture") and len(b) == 14
    assert dict(zip(b.labels["number"], b.labels["name"])) == TINY_LABELS
    # ih/iw and sh/sw differ; image 3 has larger masks
    assert (b.index["ih"] == 16).all() and b.index["sh"].tolist()[2:5] == [8, 10, 8]
    # two masks in one color cell, a scene cell with two labels, mixed texture cell, part missing on odd rows
    assert len(b.entries["color"][0]) == 2 and b.entries["scene"][0] == (5, 6)
    assert b.entries["texture"][1][0] == 7 and isinstance(b.entries["texture"][1][1], str)
    assert b.entries["part"][1] == () and b.annotated()[:, 2].tolist() == [i % 2 == 0 for i in range(14)]
    ann = b.annotations(3)
    assert ann["object"][0].shape == (10, 10) and ann["object"][0].dtype == np.int32
    # label 300 survives the R + 256 G round trip
    assert any((a["object"][0] == 300).any() for a in map(b.annotations, range(14)))
    # the manifest resolves the images
    assert all(p.is_file() for p in b.manifest().image_paths())
    assert b.content_hash() == read_broden(written).content_hash()


def test_main_category_is_highest_coverage(written):
    b = read_broden(written)
    cov = {cat: dict(zip(b.codes[cat]["number"], b.codes[cat]["coverage"])) for cat in b.categories}
    for number, main in zip(b.labels["number"], b.labels["category"]):
        listed = {c: cov[c][number] for c in b.categories if number in cov[c]}
        assert listed[main] == max(listed.values())
    subset = read_broden(written, categories=["scene", "color"])
    assert subset.categories == ("color", "scene") and set(subset.labels["name"]) == {"red", "green", "street", "lake"}


def _write(root, files):
    root.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (root / name).write_text(text)


def _hand_written(root):
    """Real-Broden corners by hand: no label row 0, labels not numbered by row, exponent-free and
    exponent numbers, multi-entry cells, image-level scene labels, a category tie."""
    (root / "images" / "ade").mkdir(parents=True)
    Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(root / "images" / "ade" / "a.jpg")
    Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(root / "images" / "ade" / "b.jpg")
    m = np.zeros((3, 3, 3), np.uint8)
    m[0, 0] = (44, 1, 0)  # label 300: R=44 + 256*G — uint8 arithmetic would give 44
    m[1, :] = (7, 0, 0)
    Image.fromarray(m).save(root / "images" / "ade" / "a_object.png")
    m2 = np.zeros((3, 3, 3), np.uint8)
    m2[2, 2] = (9, 0, 0)
    Image.fromarray(m2).save(root / "images" / "ade" / "a_object_2.png")
    _write(root, {
        "index.csv": "image,split,ih,iw,sh,sw,color,object,part,material,scene,texture\n"
                     "ade/a.jpg,train,6,6,3,3,,ade/a_object.png;ade/a_object_2.png,,,12;13,\n"
                     "ade/b.jpg,val,6,6,3,3,,,,,13,\n",
        "label.csv": "number,name,category,frequency,coverage,syns\n"
                     "7,wall,object(1),1,0.333333,wall;partition\n"
                     "9,door,object(1),1,0.111111,\n"
                     "12,street,scene(1),1,1.000000,\n"
                     "13,park,scene(2),2,2.0,\n"
                     "300,window,object(1),1,1.11e-01,\n",
        "category.csv": "name,first,last,count,frequency\nobject,7,300,3,3\nscene,12,13,2,3\n",
        "c_object.csv": "code,number,name,frequency,coverage\n1,7,wall,1,0.333333\n2,300,window,1,0.111111\n3,9,door,1,0.111111\n",
        "c_scene.csv": "code,number,name,frequency,coverage\n1,12,street,1,1.0\n2,13,park,2,2\n3,9,door,1,0.111111\n",
    })
    return root


def test_hand_written_real_broden_corners(tmp_path):
    b = read_broden(_hand_written(tmp_path / "b"))
    assert b.categories == ("object", "scene")  # part/material/... columns exist but are not categories here
    assert b.labels["number"].tolist() == [7, 9, 12, 13, 300] and b.max_label == 300
    names = b.label_names()
    assert names[300] == "window" and names[0] == "" and names[8] == ""
    main = dict(zip(b.labels["name"], b.labels["category"]))
    assert main == {"wall": "object", "door": "scene", "street": "scene", "park": "scene", "window": "object"}  # tie → later
    assert b.labels.set_index("name").at["window", "coverage"] == pytest.approx(0.111)
    assert b.entries["scene"] == ((12, 13), (13,)) and b.entries["object"][1] == ()
    ann = b.annotations(0)
    assert ann["object"][0][0, 0] == 300 and ann["object"][0][1].tolist() == [7, 7, 7] and ann["object"][1][2, 2] == 9
    assert ann["scene"] == [12, 13]
    raw = np.asarray(Image.open(tmp_path / "b" / "images" / "ade" / "a_object.png"))
    assert raw.dtype == np.uint8 and (raw[..., 0] + raw[..., 1] * np.uint8(128) * np.uint8(2))[0, 0] == 44  # uint8 wraps
    assert decode_mask(raw)[0, 0] == 300


@pytest.mark.parametrize("file, old, new, message", [
    ("index.csv", "ade/b.jpg,val,6,6,3,3", "ade/b.jpg,val,6,6,x,3",
     r"index.csv line 3, column 'sh': expected a non-negative integer; got 'x'"),
    ("index.csv", "ade/b.jpg,val,6,6,3,3", "ade/b.jpg,val,6,6,0,3", r"index.csv line 3, column 'sh': expected a value >= 1"),
    ("index.csv", ",,,,13,\n", ",,,,-4,\n", r"index.csv line 3, column 'scene': entry '-4' is neither a label number"),
    ("index.csv", ",,,,13,\n", ",,,,70000,\n", r"index.csv line 3, column 'scene': label 70000 exceeds 65535"),
    ("index.csv", ",scene,texture\n", ",scen,texture\n", r"has no column for the category\(ies\) scene"),
    ("label.csv", "9,door", "nine,door", r"label.csv line 3, column 'number': expected a non-negative integer; got 'nine'"),
    ("label.csv", "13,park,scene(2),2,2.0", "13,park,scene(2),2,lots", r"label.csv line 5, column 'coverage': expected a number"),
    ("c_scene.csv", "3,9,door", "3,99,door", r"c_scene.csv line 4, column 'number': label 99 is not in .*label.csv"),
    ("c_object.csv", "code,number", "kode,number", r"c_object.csv lacks the column\(s\) code"),
    ("category.csv", "scene,12,13,2,3\n", "scene,12,13,2,3\nmaterial,1,2,3,4\n", r"c_material.csv does not exist"),
])
def test_malformed_files_name_file_line_and_column(tmp_path, file, old, new, message):
    root = _hand_written(tmp_path / "b")
    text = (root / file).read_text()
    assert old in text
    (root / file).write_text(text.replace(old, new))
    with pytest.raises(ConceptLensError, match=message):
        read_broden(root)


def test_bad_masks_and_categories(tmp_path):
    root = _hand_written(tmp_path / "b")
    with pytest.raises(ConceptLensError, match=r"category 'scenes' is not in .*; did you mean 'scene'\?"):
        read_broden(root, categories=["scenes"])
    (root / "c_scene.csv").write_text("code,number,name,frequency,coverage\n")
    with pytest.raises(ConceptLensError, match="lists no labels; every category present needs a non-empty c_scene.csv"):
        read_broden(root)
    assert read_broden(root, categories=["object"]).categories == ("object",)
    Image.fromarray(np.zeros((4, 3, 3), np.uint8)).save(root / "images" / "ade" / "a_object_2.png")
    with pytest.raises(ConceptLensError, match=r"line 2, column 'object': mask .*a_object_2.png is 4x3, but sh x sw of the row is 3x3"):
        read_broden(root, categories=["object"]).annotations(0)
    (root / "images" / "ade" / "a_object_2.png").unlink()
    with pytest.raises(ConceptLensError, match=r"a_object_2.png does not exist"):
        read_broden(root, categories=["object"]).annotations(0)


def test_decode_mask_png_kinds(tmp_path):
    # every PNG kind decodes to R + 256·G (palette: of its colours; greyscale: the values themselves)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    want = rgb[..., 0].astype(np.int32) + 256 * rgb[..., 1].astype(np.int32)
    grey16 = rng.integers(0, 65536, size=(5, 7)).astype(np.uint16)
    images = {"rgb": (Image.fromarray(rgb), want),
              "rgba": (Image.fromarray(np.dstack([rgb, np.full((5, 7), 9, np.uint8)])), want),
              "palette": (Image.fromarray(rgb).quantize(8), None),
              "grey": (Image.fromarray(rgb[..., 0]), rgb[..., 0].astype(np.int32)),
              "grey16": (Image.fromarray(grey16), grey16.astype(np.int32))}
    for name, (im, expected) in images.items():
        im.save(tmp_path / f"{name}.png")
        if expected is None:
            p = np.asarray(im.convert("RGB"))
            expected = p[..., 0].astype(np.int32) + 256 * p[..., 1].astype(np.int32)
        got = decode_mask(tmp_path / f"{name}.png")
        assert got.dtype == np.int32 and (got == expected).all(), name
    Image.fromarray(rgb).save(tmp_path / "jpeg.png", format="JPEG")  # not a PNG despite its name
    with pytest.raises(ConceptLensError, match=r"cannot read Broden mask .*jpeg.png"):
        decode_mask(tmp_path / "jpeg.png")

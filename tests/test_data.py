import pytest
import torch

from conceptlens.data import Manifest, Preprocessing, load_images, make_loader
from conceptlens.errors import ConceptLensError


def test_manifest_columns_attributes_and_hash(image_manifest):
    m = Manifest.read(image_manifest)
    assert len(m) == 20 and m.attributes == ["site"]
    assert m.image_paths()[0] == image_manifest.parent / "img" / "000.png"
    h = m.content_hash()
    assert h == Manifest.read(image_manifest).content_hash()
    image_manifest.write_text(image_manifest.read_text().replace("s0", "s9"))
    assert Manifest.read(image_manifest).content_hash() != h


@pytest.mark.parametrize(
    "content, message",
    [
        ("path,label\na.png,x\n", "has no 'image' column"),
        ("image,label\n", "has no rows"),
        ("image,label\na.png,x\n,y\n", r"manifest row 1 \(line 3 of .*m.csv\) has an empty 'image' cell"),
    ],
)
def test_bad_manifests_name_the_problem(tmp_path, content, message):
    p = tmp_path / "m.csv"
    p.write_text(content)
    with pytest.raises(ConceptLensError, match=message):
        Manifest.read(p)


def test_missing_manifest(tmp_path):
    with pytest.raises(ConceptLensError, match="nope.csv does not exist"):
        Manifest.read(tmp_path / "nope.csv")


def test_sidecar_preprocessing_is_validated(image_manifest):
    image_manifest.with_suffix(".toml").write_text("[preprocessing]\nresize = 20\ncrop = \"none\"\n")
    assert Manifest.read(image_manifest).preprocessing == {"resize": 20, "crop": "none"}
    image_manifest.with_suffix(".toml").write_text("[preprocessing]\nsize = 20\n")
    with pytest.raises(ConceptLensError, match=r"manifest.toml: unknown preprocessing keys \['size'\]"):
        Manifest.read(image_manifest)
    image_manifest.with_suffix(".toml").write_text("[preprocessing]\ncrop = -3\n")
    with pytest.raises(ConceptLensError, match=r"manifest.toml: preprocessing crop must be a positive integer, or 0"):
        Manifest.read(image_manifest)


def test_transform_resizes_crops_and_normalises(image_manifest):
    prep = Preprocessing(resize=20, crop=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    x = load_images(Manifest.read(image_manifest), prep)
    assert x.shape == (20, 3, 16, 16)
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    with pytest.raises(ConceptLensError, match="std values must be positive"):
        Preprocessing(std=(1, 0, 1))


def test_loader_with_workers_matches_in_process(image_manifest):
    prep = Preprocessing(resize=16, crop=16)
    m = Manifest.read(image_manifest)
    a = [(r, x) for r, x in make_loader(m, prep, batch_size=6)]
    b = [(r, x) for r, x in make_loader(m, prep, batch_size=6, num_workers=2)]
    assert [r.tolist() for r, _ in a] == [r.tolist() for r, _ in b]
    assert all(torch.equal(x1, x2) for (_, x1), (_, x2) in zip(a, b))


def test_corrupt_image_error_or_counted_skip_with_workers(image_manifest):
    (image_manifest.parent / "img" / "003.png").write_bytes(b"\x89PNG broken")
    m = Manifest.read(image_manifest)
    prep = Preprocessing(resize=16, crop=16)
    with pytest.raises(ConceptLensError, match=r"image img/003.png at manifest row 3 \(line 5 of .*manifest.csv\): cannot decode image"):
        list(make_loader(m, prep, batch_size=4, num_workers=2))
    loader = make_loader(m, prep, batch_size=4, num_workers=2, skip_bad=True)
    rows = torch.cat([r for r, _ in loader]).tolist()
    assert rows == [i for i in range(20) if i != 3]
    assert [(s.manifest_row, s.image) for s in loader.skipped] == [(3, "img/003.png")]

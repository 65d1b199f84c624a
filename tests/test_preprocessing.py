"""Preprocessing is never guessed: the user's own model (a ``python:`` spec, an ``export:`` program
fixed at 48 px) states it through a sidecar, the manifest's TOML or flags, or the command stops."""

import json
import logging
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conceptlens.cli import main
from conceptlens.data import Manifest, Preprocessing, load_images
from conceptlens.errors import ConceptLensError
from conceptlens.models import list_layers, load_model
from conceptlens.core.extract import extract, predict_tensor

SIZE = 48
CODE = textwrap.dedent(
    """
    from torch import nn

    def build():
        # Layers named '0'..'8', as in any nn.Sequential.
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(16, 3))
    """
)


@pytest.fixture
def user_model(tmp_path):
    """The same seeded network as ``python:`` code + state dict and as a static 48 px export, with a
    manifest of 48 px images and no preprocessing anywhere."""
    code = tmp_path / "net.py"
    code.write_text(CODE)
    namespace = {}
    exec(CODE, namespace)  # noqa: S102 - our own test code
    torch.manual_seed(0)
    net = namespace["build"]().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        net[1].running_mean.uniform_(-0.2, 0.2)
        net[1].running_var.uniform_(0.5, 2.0)
    torch.save(net.state_dict(), tmp_path / "net.pt")
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(net, (torch.zeros(2, 3, SIZE, SIZE),), dynamic_shapes=({0: batch},))
    torch.export.save(program, tmp_path / "net.pt2")
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    lines = ["image,label"]
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
        lines.append(f"img/{i}.png,{i % 3}")
    (tmp_path / "data.csv").write_text("\n".join(lines) + "\n")
    return {"net": net, "python": f"python:{code}:build:{tmp_path / 'net.pt'}", "export": f"export:{tmp_path / 'net.pt2'}",
            "weights": tmp_path / "net.pt", "program": tmp_path / "net.pt2", "manifest": tmp_path / "data.csv"}


def _raw_pixels(manifest):
    return load_images(Manifest.read(manifest), Preprocessing())


@pytest.mark.parametrize("kind", ["python", "export"])
def test_user_model_without_preprocessing_stops_with_one_line(user_model, kind, capsys):
    model = load_model(user_model[kind], device="cpu")
    assert model.preprocessing is None
    with pytest.raises(ConceptLensError, match=r"does not say how its inputs are preprocessed: pass --mean R,G,B and --std"):
        model.preprocessing_for(Manifest.read(user_model["manifest"]))
    code = main(["extract", "--model", user_model[kind], "--data", str(user_model["manifest"]), "--layers", "4",
                 "--out", str(user_model["manifest"].parent / "acts"), "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--mean R,G,B" in err
    if kind == "export":
        assert "its input size 48x48 comes from the exported program" in err
    assert not (user_model["manifest"].parent / "acts").exists()  # stopped before any work


@pytest.mark.parametrize("kind", ["python", "export"])
def test_user_model_with_sidecar_predicts_as_a_direct_forward(user_model, kind):
    side = (user_model["weights"] if kind == "python" else user_model["program"]).with_suffix(".json")
    side.write_text(json.dumps({"preprocessing": {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}}))
    model = load_model(user_model[kind], device="cpu")
    prep = model.preprocessing_for(Manifest.read(user_model["manifest"]))
    # The export's fixed size is its own resize and crop; the python: model keeps the images as they are.
    assert (prep.resize, prep.crop) == ((SIZE, SIZE) if kind == "export" else (None, None))
    x = _raw_pixels(user_model["manifest"])
    normalised = (x - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = user_model["net"](normalised)
    got = predict_tensor(model, load_images(Manifest.read(user_model["manifest"]), prep))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_flags_and_manifest_toml_give_preprocessing(user_model, caplog):
    manifest = user_model["manifest"]
    manifest.with_suffix(".toml").write_text("[preprocessing]\nmean = [0, 0, 0]\nstd = [1, 1, 1]\nresize = 0\ncrop = \"none\"\n")
    model = load_model(user_model["python"], device="cpu")
    with caplog.at_level(logging.INFO, logger="conceptlens.models"):
        prep = model.preprocessing_for(Manifest.read(manifest), std=(0.5, 0.5, 0.5), crop=40)
    assert (prep.resize, prep.crop, prep.mean, prep.std) == (None, 40, (0.0,) * 3, (0.5,) * 3)
    assert "preprocessing in force: resize none, crop 40" in caplog.text and "data.toml" in caplog.text
    store = extract(model, Manifest.read(manifest), ["4"], manifest.parent / "acts", preprocessing=prep, progress=False)
    assert store.meta["request"]["preprocessing"]["crop"] == 40 and store.meta["request"]["preprocessing"]["std"] == [0.5] * 3


def test_fixed_size_export_refuses_other_sizes_before_work(user_model, capsys):
    user_model["program"].with_suffix(".json").write_text(json.dumps({"preprocessing": {"mean": [0] * 3, "std": [1] * 3}}))
    model = load_model(user_model["export"], device="cpu")
    assert model.input_size == (SIZE, SIZE)
    with pytest.raises(ConceptLensError, match=r"takes 48x48 inputs .* gives 64x64 .*pass --resize 48 --crop 48"):
        model.preprocessing_for(Manifest.read(user_model["manifest"]), resize=64, crop=0)
    out = user_model["manifest"].parent / "acts"
    code = main(["extract", "--model", user_model["export"], "--data", str(user_model["manifest"]), "--layers", "4",
                 "--crop", "32", "--out", str(out), "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "takes 48x48 inputs" in err and not out.exists()
    # `layers` traces at the program's own size by default, and names it when asked for another.
    assert "4" in list_layers(model)["name"].tolist()
    with pytest.raises(ConceptLensError, match="takes 48x48 inputs"):
        list_layers(model, input_size=224)


def test_export_with_fixed_batch_is_refused_at_load(tmp_path):
    net = nn.Sequential(nn.Conv2d(3, 2, 1), nn.Flatten()).eval()
    torch.export.save(torch.export.export(net, (torch.zeros(2, 3, 8, 8),)), tmp_path / "fixed.pt2")
    with pytest.raises(ConceptLensError, match="fixes the batch size to 2; re-export it with a dynamic batch"):
        load_model(f"export:{tmp_path / 'fixed.pt2'}", device="cpu")


def test_partial_model_sidecar_needs_mean_and_std(user_model):
    user_model["weights"].with_suffix(".json").write_text(json.dumps({"preprocessing": {"resize": 48}}))
    with pytest.raises(ConceptLensError, match=r"net.json: preprocessing gives no mean or std"):
        load_model(user_model["python"], device="cpu")


def test_torchvision_keeps_its_documented_default(resnet18, image_manifest):
    prep = resnet18.preprocessing_for(Manifest.read(image_manifest))
    assert (prep.resize, prep.crop) == (256, 224) and "torchvision's ImageNet default" in prep.source
    image_manifest.with_suffix(".toml").write_text("[preprocessing]\nresize = 20\nmean = [0.5, 0.5, 0.5]\n")
    prep = resnet18.preprocessing_for(Manifest.read(image_manifest), crop=0, std=(0.5, 0.5, 0.5))
    assert (prep.resize, prep.crop, prep.mean, prep.std) == (20, None, (0.5,) * 3, (0.5,) * 3)

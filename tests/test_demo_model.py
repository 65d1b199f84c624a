"""The demo CNN: reaches its accuracy on the concept world, is reproducible, and loads as a model spec."""

import json

import numpy as np
import torch

from conceptlens.data import Manifest, load_images
from conceptlens.demo_model import DEMO_ARCHITECTURE, train_demo
from conceptlens.models import layer_names, load_model
from conceptlens.world import generate_world


def test_demo_reaches_accuracy_and_sidecar_matches_a_fresh_evaluation(demo_weights, world_dir):
    side = json.loads(demo_weights.with_suffix(".json").read_text())
    assert side["architecture"] == DEMO_ARCHITECTURE
    assert side["classes"] == ["circle", "square", "triangle", "cross"]
    assert side["test_accuracy"] >= 0.90
    # Recompute the test accuracy independently: load through the model spec, preprocess through the
    # sidecar's preprocessing, and compare with the recorded figure.
    model = load_model(f"demo:{demo_weights}", device="cpu")
    manifest = Manifest.read(world_dir / "manifest.csv")
    test = manifest.subset(manifest.frame["split"] == "test")
    x = load_images(test, model.preprocessing)
    with torch.inference_mode():
        pred = model.module(x).argmax(1).numpy()
    truth = np.array([side["classes"].index(c) for c in test.frame["label"]])
    assert abs((pred == truth).mean() - side["test_accuracy"]) < 1e-6
    assert {"conv1", "conv4", "fc"} <= set(layer_names(model))


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    world = generate_world(tmp_path / "w", n=48, size=16, seed=0, n_concept=1, n_random=1, progress=False)
    a = train_demo(world.root, tmp_path / "a.pt", epochs=1, seed=0, progress=False)
    b = train_demo(world.root, tmp_path / "b.pt", epochs=1, seed=0, progress=False)
    train_demo(world.root, tmp_path / "c.pt", epochs=1, seed=1, progress=False)
    sa, sb, sc = (torch.load(tmp_path / f"{k}.pt", weights_only=True) for k in "abc")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["conv1.weight"], sc["conv1.weight"])
    assert a["test_accuracy"] == b["test_accuracy"]

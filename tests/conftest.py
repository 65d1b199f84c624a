"""Shared fixtures: a tiny concept world and the demo CNN trained on it, built once per session.

Both are cached under ``.cache/test-fixtures`` keyed by a hash of their configuration and of the
source files that produce them, so a re-run reuses them and a code change rebuilds them.
"""

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "test-fixtures"

# Tag-biased (the default tag_bias 0.9), hidden sub-class, no label noise: the demo model trained on
# it reaches about 98 % test accuracy in ~15 s. Analyzers needing other planted effects make their own.
WORLD_CONFIG = dict(n=1200, size=64, seed=3, n_concept=40, n_random=240)
TRAIN_CONFIG = dict(epochs=12, seed=0)


def _source_hash(*parts):
    import conceptlens

    package = Path(conceptlens.__file__).parent  # the package under test (installed, or the checkout)
    h = hashlib.sha256(json.dumps(parts, sort_keys=True).encode())
    for rel in ("world", "demo_model.py", "data.py", "core/broden.py"):
        p = package / rel
        for f in sorted(p.rglob("*.py")) if p.is_dir() else [p]:
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _cached(name, key, build):
    """Build into a private temp dir and rename, so an interrupted build is never mistaken for a
    cache hit and two test processes building at once do not trample each other."""
    target = CACHE / f"{name}-{key}"
    if not (target / ".done").exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{name}-{key}.partial-", dir=CACHE))
        build(tmp)
        (tmp / ".done").write_text("ok")
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: keep its copy
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def pytest_report_header(config):
    import conceptlens

    return f"conceptlens under test: {Path(conceptlens.__file__).parent}"


@pytest.fixture(scope="session")
def world_dir():
    from conceptlens.world import generate_world

    key = _source_hash(WORLD_CONFIG)
    return _cached("world", key, lambda d: generate_world(d / "world", **WORLD_CONFIG)) / "world"


@pytest.fixture(scope="session")
def demo_weights(world_dir):
    from conceptlens.demo_model import train_demo

    key = _source_hash(WORLD_CONFIG, TRAIN_CONFIG)
    root = _cached("demo", key, lambda d: train_demo(world_dir, d / "demo.pt", progress=False, **TRAIN_CONFIG))
    return root / "demo.pt"


@pytest.fixture(scope="session")
def unbiased_world_dir():
    """The same world without the planted shortcut (tag_bias 0), with enough concept images for a
    powered TCAV audit."""
    from conceptlens.world import generate_world

    config = dict(WORLD_CONFIG, tag_bias=0.0, n_concept=100)
    return _cached("world-unbiased", _source_hash(config), lambda d: generate_world(d / "world", progress=False, **config)) / "world"


@pytest.fixture(scope="session")
def unbiased_demo_weights(unbiased_world_dir):
    from conceptlens.demo_model import train_demo

    key = _source_hash(WORLD_CONFIG, TRAIN_CONFIG, "unbiased")
    root = _cached("demo-unbiased", key, lambda d: train_demo(unbiased_world_dir, d / "demo.pt", progress=False, **TRAIN_CONFIG))
    return root / "demo.pt"


@pytest.fixture(scope="session")
def demo_model(demo_weights):
    from conceptlens.models import load_model

    return load_model(f"demo:{demo_weights}", device="cpu")


@pytest.fixture
def image_manifest(tmp_path):
    """A manifest of 20 random 40x48 RGB images with labels and an attribute column."""
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    lines = ["image,label,split,site"]
    for i in range(20):
        arr = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
        Image.fromarray(arr).save(tmp_path / "img" / f"{i:03d}.png")
        lines.append(f"img/{i:03d}.png,{'ab'[i % 2]},{'train' if i < 14 else 'test'},s{i % 3}")
    (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "manifest.csv"


@pytest.fixture(scope="session")
def resnet18():
    """Random-init resnet18 with 10 classes (seeded), on CPU."""
    import warnings

    from conceptlens.models import load_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model("torchvision:resnet18", num_classes=10, device="cpu")


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)

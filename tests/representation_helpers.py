"""Helpers for the representation analyzer tests: stores of the shared world and synthetic stores.

Stores extracted from the shared fixtures live under ``.cache/test-fixtures/representation``;
``extract`` keys each by a hash of model weights, manifest, layers and pooling, so a stale one is
rebuilt, never reused.
"""

from pathlib import Path

import numpy as np
import pandas as pd

from conceptlens.data import Manifest
from conceptlens.core.extract import extract
from conceptlens.core.store import StoreWriter

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "test-fixtures" / "representation"


def cached_store(name, model, manifest, layers, pool="mean", dtype="auto", batch_size=64):
    """Extract ``layers`` of ``manifest`` into a cached store (rebuilt when its inputs change)."""
    return extract(model, Manifest.read(manifest), layers, CACHE / name, pool=pool, dtype=dtype, batch_size=batch_size, progress=False)


def synthetic_store(path, features, frame):
    """A complete ActivationStore holding ``features`` (``{layer: array [N, ...]}``) for ``frame`` rows."""
    n = len(frame)
    writer = StoreWriter(Path(path), {"synthetic": sorted(features), "n": n}, n)
    writer.existing()
    writer.create({k: v.shape[1:] for k, v in features.items()}, "float32")
    writer.write({k: np.asarray(v, dtype=np.float32) for k, v in features.items()}, n)
    frame = frame.copy()
    if "image" not in frame:
        frame.insert(0, "image", [f"img/{i:05d}.png" for i in range(n)])
    return writer.finish(pd.DataFrame(frame).reset_index(drop=True))


def world_with_duplicates(root, n=400, seed=31):
    """A small world with 20 near-duplicates across splits and 10 % training-label noise."""
    from conceptlens.world import generate_world

    return generate_world(root, n=n, size=64, seed=seed, near_duplicates=20, label_noise=0.1, progress=False)

"""Shared data of the attribution tests (not a test module): world images as model inputs."""

import numpy as np

from conceptlens.data import Manifest, load_images


def world_images(world_dir, model, mask=None, limit=None):
    """``(x, frame)``: preprocessed images of the manifest rows where ``mask(frame)`` holds, in order."""
    manifest = Manifest.read(world_dir / "manifest.csv")
    if mask is not None:
        manifest = manifest.subset(mask(manifest.frame))
    if limit is not None:
        manifest = manifest.subset(np.arange(len(manifest)) < limit)
    return load_images(manifest, model.preprocessing), manifest.frame

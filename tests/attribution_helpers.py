"""Shared data of the attribution tests (not a test module): world images as model inputs."""

import numpy as np
import torch

from conceptlens.data import Manifest, load_images


def world_images(world_dir, model, mask=None, limit=None):
    """``(x, frame)``: preprocessed images of the manifest rows where ``mask(frame)`` holds, in order."""
    manifest = Manifest.read(world_dir / "manifest.csv")
    if mask is not None:
        manifest = manifest.subset(mask(manifest.frame))
    if limit is not None:
        manifest = manifest.subset(np.arange(len(manifest)) < limit)
    return load_images(manifest, model.preprocessing), manifest.frame


def assert_close_but_at_kinks(ours, ref):
    """Equal to float tolerance except at a few pixels: a batch of another size rounds differently
    (oneDNN) and breaks max-pool ties differently, which moves a ReLU or max-pool gradient at a
    kink; measured 0.2-0.3 % of the pixels of a trained demo CNN. Each image's total stays equal."""
    off = ~torch.isclose(ours, ref, rtol=1e-4, atol=1e-6)
    assert off.float().mean() < 0.01, f"{off.float().mean():.2%} of the pixels differ"
    torch.testing.assert_close(ours.sum(dim=(1, 2, 3)), ref.sum(dim=(1, 2, 3)), rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(ours.abs().sum(dim=(1, 2, 3)), ref.abs().sum(dim=(1, 2, 3)), rtol=1e-2, atol=1e-3)

"""Shared helper of the attribution results."""

from __future__ import annotations

import numpy as np
import torch


def as_numpy(maps):
    """Attribution maps (tensor or array) as a float32 numpy array."""
    if isinstance(maps, torch.Tensor):
        maps = maps.detach().cpu().numpy()
    return np.asarray(maps, dtype=np.float32)

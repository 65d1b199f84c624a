"""Baselines for linear probes: what a probe could read from features that learned nothing.

Hewitt & Liang's question - is it the representation or the probe? - needs inputs a probe could
exploit as well as the trained layer: the same layer of a seeded random-init copy of the network
(:func:`conceptlens.models.random_init_copy`) and the input pixels pooled to about the layer's
size. Both are extracted through the core's capture path (:func:`~conceptlens.representation.
extract.extract`) into stores of their own, which :func:`~conceptlens.representation.probes.probe`
reads beside the real one.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from torch import nn

from ..errors import ConceptLensError

__all__ = ["PixelPool", "pixel_model", "pixel_layers", "extract_baselines", "PIXEL_GRIDS"]

logger = logging.getLogger(__name__)

PIXEL_GRIDS = (1, 2, 3, 4, 6, 8, 11, 16)


class PixelPool(nn.Module):
    """The input image average-pooled to ``k x k`` grids, one submodule ``pixels{k}`` per grid.

    Each submodule outputs ``[N, 3 k^2]`` (flattened, channel-major), so a store extracted with
    any pooling keeps the grid.
    """

    def __init__(self, grids=PIXEL_GRIDS):
        super().__init__()
        self.grids = tuple(int(k) for k in grids)
        for k in self.grids:
            self.add_module(f"pixels{k}", nn.Sequential(nn.AdaptiveAvgPool2d(k), nn.Flatten(1)))

    def forward(self, x):
        return torch.cat([getattr(self, f"pixels{k}")(x) for k in self.grids], dim=1)


def pixel_model(model, grids=PIXEL_GRIDS):
    """A :class:`~conceptlens.models.LoadedModel` that pools the input pixels, with ``model``'s preprocessing.

    Parameters
    ----------
    model : LoadedModel
        The model under study: its preprocessing (and fixed input size) are kept, so the pixels are
        exactly what the model sees.
    grids : sequence of int
        Grid sides; layer ``pixels{k}`` holds ``3 k^2`` features.

    Returns
    -------
    LoadedModel
        Extract its layers (``[f"pixels{k}" for k in grids]``) into a store for ``probe(pixels=...)``.
    """
    from ..models import LoadedModel, _state_hash

    if not isinstance(model, LoadedModel):
        raise ConceptLensError(f"pixel_model needs a LoadedModel (load_model(spec)) for its preprocessing; got {type(model).__name__}")
    if not grids or any(int(k) < 1 for k in grids):
        raise ConceptLensError(f"the grids parameter must be positive grid sides; got {grids!r}")
    module = PixelPool(grids).to(model.device).eval()
    return dataclasses.replace(model, module=module, spec=f"pixels({','.join(map(str, module.grids))})<-{model.spec}",
                               weights_hash=_state_hash(module), classes=None)


def pixel_layers(grids=PIXEL_GRIDS):
    """Layer names of :class:`PixelPool` for ``grids``."""
    return [f"pixels{int(k)}" for k in grids]


def extract_baselines(model, manifest, layers, directory, seed=0, pool="mean", required=True, **extract_kw):
    """Extract both probe baselines of ``layers`` into ``directory``: ``baseline-store`` (the same
    layers of a random-init copy seeded with ``seed``) and ``pixel-store`` (:func:`pixel_model`).

    Parameters
    ----------
    model : LoadedModel
    manifest : Manifest or path
    layers : list of str
    directory : path
    seed : int
    pool : str
        Pooling of the random-init copy's layers (the real store's); pixels are always mean-pooled grids.
    required : bool
        A model without initialisers has no random-init copy: raise (True) or log a warning and
        return ``None`` for it (False), so that its probes and audits say they lack the baseline.
    **extract_kw
        Passed to :func:`~conceptlens.core.extract.extract` (batch_size, preprocessing, ...).

    Returns
    -------
    (ActivationStore or None, ActivationStore)
    """
    from ..models import random_init_copy
    from ..core.extract import extract

    directory = Path(directory)
    try:
        copy = random_init_copy(model, seed=seed)
    except ConceptLensError as exc:
        if required:
            raise
        logger.warning("probes without a random-init baseline: %s", exc)
        baseline = None
    else:
        baseline = extract(copy, manifest, layers, directory / "baseline-store", pool=pool, **extract_kw)
    pixels = extract(pixel_model(model), manifest, pixel_layers(), directory / "pixel-store", pool="mean", **extract_kw)
    return baseline, pixels

"""Small utilities shared by the representation analyzers (probes, embed, neighbors, topk).

Reading features from an :class:`~conceptlens.core.store.ActivationStore`, validating layer and
column names, reading result tables back with their text columns intact.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from ..errors import ConceptLensError, did_you_mean
from ..core.store import ActivationStore

logger = logging.getLogger(__name__)

# Columns read as text so that labels like "1" or "NA" survive a CSV round trip unchanged.
# Read back as text whatever they hold: layer names of an nn.Sequential are '0', '1', ... and labels
# or targets may be numbers too; pandas would turn them into integers.
TEXT_COLUMNS = {name: str for name in ("image", "label", "split", "layer", "target", "suggested_label",
                                       "train_image", "test_image", "train_split", "test_split")}


def open_store(store):
    """An :class:`ActivationStore` from a store or a store directory."""
    return store if isinstance(store, ActivationStore) else ActivationStore.open(store)


def check_layers(store, layers, param="layers"):
    """Validate ``layers`` against the store's layers (``None``: all of them)."""
    if layers is None:
        return store.layers
    layers = [layers] if isinstance(layers, str) else list(layers)
    if not layers:
        raise ConceptLensError(f"the {param} parameter must name at least one layer of store {store.path} ({', '.join(store.layers)})")
    for layer in layers:
        if layer not in store.layers:
            raise ConceptLensError(f"layer {layer!r} is not in store {store.path}{did_you_mean(layer, store.layers)} "
                                   f"(it holds {', '.join(store.layers)})")
    return layers


def check_column(frame, column, param, where):
    """Raise unless ``column`` is a column of ``frame``."""
    if column not in frame.columns:
        raise ConceptLensError(f"the {param} parameter names column {column!r}, which {where} does not have"
                               f"{did_you_mean(column, frame.columns)} (columns: {', '.join(frame.columns)})")


def layer_features(store, layer):
    """A layer's activations as float32 ``[N, D]``, one feature vector per row.

    Maps pooled to a grid (``pool="adaptive:K"``) are flattened, keeping the layout; full spatial
    maps (``pool="none"``) are mean-pooled over space.
    """
    x = store.load(layer)
    if x.ndim == 4 and not str(store.pool).startswith("adaptive:"):
        logger.info("layer %s holds spatial maps %s: mean-pooling them over space for a feature vector", layer, x.shape[1:])
        x = x.mean(axis=(2, 3))
    elif x.ndim > 2:
        logger.info("layer %s holds %s per row: flattening to one feature vector", layer, x.shape[1:])
    return np.ascontiguousarray(x.reshape(len(x), -1), dtype=np.float32)


def read_csv(path):
    return pd.read_csv(path, keep_default_na=False, dtype=TEXT_COLUMNS)

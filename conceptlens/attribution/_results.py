"""Shared helpers of the attribution results: provenance and JSON metadata files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..errors import ConceptLensError


def provenance(model=None, manifest=None, **extra):
    """Model spec and weights hash (of a LoadedModel), manifest path and content hash, library version."""
    out = {"library_version": __version__}
    if model is not None:
        out["model_spec"] = getattr(model, "spec", type(getattr(model, "module", model)).__name__)
        out["weights_hash"] = getattr(model, "weights_hash", None)
    if manifest is not None:
        out["manifest"] = str(manifest.path)
        out["manifest_hash"] = manifest.content_hash()
    out.update(extra)
    return out


def as_numpy(maps):
    """Attribution maps (tensor or array) as a float32 numpy array."""
    if isinstance(maps, torch.Tensor):
        maps = maps.detach().cpu().numpy()
    return np.asarray(maps, dtype=np.float32)


def write_meta(directory, kind, meta):
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "meta.json").write_text(json.dumps({"kind": kind, **meta}, indent=2, default=_jsonable) + "\n")
    return directory


def read_meta(directory, kind):
    path = Path(directory) / "meta.json"
    if not path.is_file():
        raise ConceptLensError(f"{directory} holds no {kind} result (no meta.json); write one with .save(dir)")
    meta = json.loads(path.read_text())
    if meta.get("kind") != kind:
        raise ConceptLensError(f"{directory} holds a {meta.get('kind')!r} result, not a {kind!r} result")
    return meta


def _jsonable(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return f"<{type(obj).__name__} {tuple(obj.shape)}>"
    return str(obj)

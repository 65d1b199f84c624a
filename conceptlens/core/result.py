"""One result convention for every analyzer: the :class:`Result` base and the provenance schema.

A result is a frozen dataclass deriving from :class:`Result`. ``save(dir)`` writes its data files
(CSV tables, ``.npy`` arrays; never pickle) and then one JSON file holding its kind, its own
metadata and its provenance; ``load(dir)`` reads them back and checks the kind. The JSON file is
written last, so an interrupted save is never mistaken for a result.

:func:`provenance` is the one schema of what a result came from:

``schema``, ``library_version``
    ``conceptlens-provenance-1`` and the conceptlens version that computed it.
``model``, ``weights_hash``
    The model spec and the SHA-256 of its state dict.
``data``, ``data_hash``
    What was analysed (manifest, Broden set, folder) and the hash of the file contents it depends
    on (:mod:`conceptlens.core.hashing`).
``parameters``, ``preprocessing``, ``timings``
    The analyzer's parameters, the preprocessing applied to the images, seconds per phase.
``store``
    For results computed from an activation store: its path, request hash, pooling, dtype, rows.

Analyzer-specific entries (concept sets, baselines, methods) follow these keys.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import numpy as np

from .. import __version__
from ..errors import ConceptLensError
from .hashing import hash_tree

__all__ = ["Result", "provenance", "PROVENANCE_SCHEMA", "write_json", "read_json"]

PROVENANCE_SCHEMA = "conceptlens-provenance-1"


def _model_fields(model):
    module = getattr(model, "module", model)
    return {"model": getattr(model, "spec", type(module).__name__), "weights_hash": getattr(model, "weights_hash", None)}


def _store_fields(store):
    req = store.meta["request"]
    return {"path": str(store.path), "hash": store.meta.get("hash"), "pool": req.get("pool"),
            "dtype": store.meta.get("dtype"), "n_rows": store.n_rows, "layers": list(store.layers)}


def provenance(model=None, data=None, *, store=None, parameters=None, preprocessing=None, timings=None, **details):
    """A result's provenance in the one schema (see the module notes).

    Parameters
    ----------
    model : LoadedModel or nn.Module, optional
    data : Manifest, BrodenSet, path, optional
        What was analysed; hashed by content. Defaults to the store's manifest.
    store : ActivationStore, optional
        For results computed from a store: model, weights, data and preprocessing default to the
        store's request, and the store itself is recorded.
    parameters, preprocessing, timings : dict, optional
    **details
        Analyzer-specific entries (JSON-serialisable).
    """
    out = {"schema": PROVENANCE_SCHEMA, "library_version": __version__, "model": None, "weights_hash": None,
           "data": None, "data_hash": None, "parameters": dict(parameters or {}), "preprocessing": preprocessing,
           "timings": {k: round(float(v), 6) for k, v in (timings or {}).items()}}
    if store is not None:
        req = store.meta["request"]
        out.update(model=req.get("model"), weights_hash=req.get("weights_hash"), data=req.get("manifest"),
                   data_hash=req.get("manifest_hash"), store=_store_fields(store))
        if preprocessing is None:
            out["preprocessing"] = req.get("preprocessing")
    if model is not None:
        out.update(_model_fields(model))
    if data is not None:
        if hasattr(data, "content_hash"):  # a Manifest or a BrodenSet
            out["data"] = str(getattr(data, "path", None) or Path(data.root).resolve())
            out["data_hash"] = data.content_hash()
        else:
            out["data"], out["data_hash"] = str(data), hash_tree(data)
    out.update(details)
    return out


def _jsonable(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json(path, payload):
    """Write ``payload`` as indented JSON (NumPy scalars and arrays, paths as plain values)."""
    Path(path).write_text(json.dumps(payload, indent=1, default=_jsonable) + "\n", encoding="utf-8")


def read_json(path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


class Result:
    """Base of every analyzer result.

    Subclasses are frozen dataclasses with a ``provenance`` field; they set ``KIND`` (named in
    messages and in the JSON) and ``META`` (the JSON file's name) and implement ``to_frame``,
    ``_write(directory) -> dict`` (data files; returns the metadata for the JSON) and
    ``_read(directory, meta)``.
    """

    KIND: ClassVar[str]
    META: ClassVar[str] = "meta.json"

    def to_frame(self):
        """The result as one tidy table."""
        raise NotImplementedError

    def _write(self, directory):
        raise NotImplementedError

    @classmethod
    def _read(cls, directory, meta):
        raise NotImplementedError

    def save(self, directory):
        """Write the result into ``directory`` (created); returns it as a Path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = self._write(directory) or {}
        write_json(directory / self.META, {"kind": self.KIND, **meta, "provenance": self.provenance})
        return directory

    @classmethod
    def load(cls, directory):
        """Read a result written by :meth:`save`."""
        directory = Path(directory)
        path = directory / cls.META
        if not path.is_file():
            raise ConceptLensError(f"{directory} holds no {cls.KIND} result (no {cls.META}); write one with .save(dir)")
        try:
            meta = read_json(path)
        except json.JSONDecodeError as exc:
            raise ConceptLensError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno}); save the result again") from None
        if meta.get("kind") != cls.KIND:
            raise ConceptLensError(f"{directory} holds a {meta.get('kind')!r} result, not a {cls.KIND!r} result")
        return cls._read(directory, meta)

"""The ActivationStore: layer activations on disk, one ``.npy`` per layer, resumable and hash-checked.

Layout of a store directory::

    meta.json      request (model spec, weights hash, manifest hash, layers, pooling, dtype,
                   preprocessing, library version), its hash, per-layer shapes, rows completed,
                   skipped images, and whether the store is complete
    <layer>.npy    [N, C] pooled or [N, C, H, W] spatial, float16 or float32
    rows.csv       one line per store row: ``manifest_row`` plus the manifest's columns

Rows are written with plain file writes (not through a memory map) so a long extraction does not
grow the process's resident memory; reads for analysis go through :meth:`ActivationStore.iter_chunks`
for the same reason, or :meth:`ActivationStore.array` for random access.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .. import __version__
from .hashing import hash_json
from ..errors import ConceptLensError

__all__ = ["ActivationStore", "StoreWriter", "request_hash", "layer_filename"]

logger = logging.getLogger(__name__)

META = "meta.json"
ROWS = "rows.csv"
#: Layout of ``meta.json``; part of every store's hash, so a store of an older layout is rebuilt, not misread.
#: 2: skipped images are listed as ``{manifest_row, image, error}`` (1 had ``row``).
FORMAT = "conceptlens-activation-store-2"


def request_hash(request):
    """Stable hash of a JSON-serialisable request description."""
    return hash_json(request)


def layer_filename(layer):
    """File name of a layer's array; dots in module names are kept (they are valid in file names)."""
    return layer.replace("/", "_") + ".npy"


def _write_json(path, obj):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


@dataclass(frozen=True)
class ActivationStore:
    """A completed store, opened read-only.

    Attributes
    ----------
    path : Path
    meta : dict
        Contents of ``meta.json``.
    """

    path: Path
    meta: dict = field(repr=False)

    @classmethod
    def open(cls, path):
        """Open a complete store; raise if it is missing, unfinished or from an unknown version."""
        path = Path(path)
        meta_path = path / META
        if not meta_path.is_file():
            raise ConceptLensError(f"{path} is not an activation store (no {META}); build one with `conceptlens extract`")
        meta = json.loads(meta_path.read_text())
        if not meta.get("complete"):
            raise ConceptLensError(
                f"activation store {path} is unfinished ({meta.get('rows_completed', 0)} of {meta.get('n_manifest_rows')} "
                "rows); run the same extraction again to resume it"
            )
        return cls(path=path, meta=meta)

    @property
    def layers(self):
        return list(self.meta["layers"])

    @property
    def n_rows(self):
        return int(self.meta["n_rows"])

    @property
    def pool(self):
        return self.meta["request"]["pool"]

    def shape(self, layer):
        """Per-row shape of a layer's activations (``(C,)`` pooled, ``(C, H, W)`` spatial)."""
        self._check_layer(layer)
        return tuple(self.meta["shapes"][layer])

    @property
    def rows(self):
        """Store rows as a DataFrame: ``manifest_row`` and the manifest's columns."""
        return pd.read_csv(self.path / ROWS, keep_default_na=False, dtype={"image": str, "label": str, "split": str})

    @property
    def skipped(self):
        """Images skipped as unreadable (``--skip-bad``): list of ``{manifest_row, image, error}``."""
        return list(self.meta.get("skipped", []))

    def _check_layer(self, layer):
        if layer not in self.meta["shapes"]:
            raise ConceptLensError(f"layer {layer!r} is not in store {self.path}; it holds {', '.join(self.layers)}")

    def array(self, layer):
        """Read-only memory map ``[n_rows, ...]`` of a layer (random access)."""
        self._check_layer(layer)
        return np.load(self.path / layer_filename(layer), mmap_mode="r")

    def load(self, layer, rows=None, dtype=np.float32):
        """A layer's activations as an in-memory array, optionally only ``rows`` (store row indices)."""
        arr = self.array(layer)
        out = arr[np.asarray(rows)] if rows is not None else arr[:]
        return np.array(out, dtype=dtype)

    def iter_chunks(self, layer, chunk_rows=512, dtype=np.float32):
        """Yield ``(start_row, array)`` chunks read with file reads, keeping resident memory flat."""
        self._check_layer(layer)
        file = self.path / layer_filename(layer)
        header = np.load(file, mmap_mode="r")
        store_dtype, offset, row_shape = header.dtype, header.offset, header.shape[1:]
        del header
        row_items = int(np.prod(row_shape))
        with open(file, "rb") as f:
            for start in range(0, self.n_rows, chunk_rows):
                count = min(chunk_rows, self.n_rows - start)
                f.seek(offset + start * row_items * store_dtype.itemsize)
                data = np.fromfile(f, dtype=store_dtype, count=count * row_items)
                yield start, data.reshape((count,) + row_shape).astype(dtype, copy=False)


class StoreWriter:
    """Writes rows into a store directory, resuming a matching unfinished store.

    Used by :mod:`conceptlens.core.extract`; analyzers only read stores.
    """

    def __init__(self, path, request, n_manifest_rows):
        self.path = Path(path)
        self.request = request
        self.hash = request_hash({"format": FORMAT, **request})
        self.n_manifest_rows = n_manifest_rows
        self.meta = None
        self._offsets = {}

    def existing(self):
        """``"complete"``, ``"resume"`` or ``None`` (nothing usable; stale files are removed)."""
        meta_path = self.path / META
        if not meta_path.is_file():
            if self.path.exists() and any(self.path.iterdir()):
                raise ConceptLensError(
                    f"{self.path} exists, is not empty and is not an activation store; choose another --out"
                )
            return None
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            meta = {}
        if meta.get("hash") != self.hash:
            changed = sorted(k for k in self.request if meta.get("request", {}).get(k) != self.request[k])
            logger.warning("store %s was built for other inputs (%s differ): rebuilding it", self.path, ", ".join(changed) or "format")
            self._remove_own_files(meta)
            return None
        self.meta = meta
        if meta.get("complete"):
            return "complete"
        self._offsets = {layer: self._data_offset(layer) for layer in meta["layers"]}
        logger.info("resuming store %s at manifest row %d", self.path, meta["rows_completed"])
        return "resume"

    def restart(self):
        """Drop what an unfinished store holds, to rewrite it from the first row."""
        self._remove_own_files(self.meta or {})
        self.meta, self._offsets = None, {}

    def _remove_own_files(self, meta):
        for layer in meta.get("layers", []):
            (self.path / layer_filename(layer)).unlink(missing_ok=True)
        for name in (ROWS, META):
            (self.path / name).unlink(missing_ok=True)

    def _data_offset(self, layer):
        return np.load(self.path / layer_filename(layer), mmap_mode="r").offset

    @property
    def rows_completed(self):
        return self.meta["rows_completed"] if self.meta else 0

    def create(self, shapes, dtype):
        """Allocate one array per layer with room for every manifest row."""
        self.path.mkdir(parents=True, exist_ok=True)
        for layer, shape in shapes.items():
            arr = np.lib.format.open_memmap(
                self.path / layer_filename(layer), mode="w+", dtype=dtype, shape=(self.n_manifest_rows,) + tuple(shape)
            )
            self._offsets[layer] = arr.offset
            del arr
        self.meta = {
            "format": FORMAT,
            "version": __version__,
            "request": self.request,
            "hash": self.hash,
            "layers": list(shapes),
            "shapes": {k: list(v) for k, v in shapes.items()},
            "dtype": np.dtype(dtype).name,
            "n_manifest_rows": self.n_manifest_rows,
            "rows_completed": 0,
            "n_rows": 0,
            "skipped": [],
            "complete": False,
        }
        _write_json(self.path / META, self.meta)

    def write(self, arrays, rows_completed, skipped=()):
        """Append a batch (``{layer: ndarray [B, ...]}``) and record progress up to ``rows_completed``."""
        n = None
        for layer, arr in arrays.items():
            arr = np.ascontiguousarray(arr, dtype=self.meta["dtype"])
            n = len(arr)
            row_bytes = arr[0].nbytes if n else 0
            with open(self.path / layer_filename(layer), "r+b") as f:
                os.pwrite(f.fileno(), arr.tobytes(), self._offsets[layer] + self.meta["n_rows"] * row_bytes)
        self.meta["n_rows"] += n or 0
        self.meta["rows_completed"] = rows_completed
        self.meta["skipped"].extend(s if isinstance(s, dict) else s.to_dict() for s in skipped)
        _write_json(self.path / META, self.meta)

    def finish(self, manifest_frame, rows=None):
        """Trim arrays to the rows written, write ``rows.csv`` and mark the store complete.

        ``rows``: the manifest rows this store covers (default all; a shard of a sharded
        extraction covers one range)."""
        n = self.meta["n_rows"]
        if n < self.n_manifest_rows:
            # Skipped images left unused capacity: rewrite each array at its true length so the
            # .npy files are exact for anyone who opens them directly.
            for layer in self.meta["layers"]:
                file = self.path / layer_filename(layer)
                src = np.load(file, mmap_mode="r")
                tmp = file.with_suffix(".tmp.npy")
                dst = np.lib.format.open_memmap(tmp, mode="w+", dtype=src.dtype, shape=(n,) + src.shape[1:])
                for start in range(0, n, 1024):
                    stop = min(start + 1024, n)
                    dst[start:stop] = src[start:stop]
                dst.flush()
                del src, dst
                os.replace(tmp, file)
        skipped_rows = {s["manifest_row"] for s in self.meta["skipped"]}
        keep = [i for i in (range(self.n_manifest_rows) if rows is None else rows) if i not in skipped_rows]
        rows = manifest_frame.iloc[keep].copy()
        rows.insert(0, "manifest_row", keep)
        rows.to_csv(self.path / ROWS, index=False)
        self.meta["complete"] = True
        _write_json(self.path / META, self.meta)
        return ActivationStore.open(self.path)

"""Max-activating images: the top-k images of every channel, streamed during extraction.

The ranking is the core's :class:`~conceptlens.core.topk.TopK` accumulator, run as an observer of
:func:`~conceptlens.core.extract.extract` (no second forward pass) or over a stored layer;
:class:`TopKResult` names the images, crops them around the maximum and saves the table.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torchvision.transforms.v2 as T
from PIL import Image
from tqdm.auto import tqdm

from ..data import Manifest, make_loader
from ..errors import ConceptLensError
from ..models import load_model
from ..core.engine import check_engine
from ..core.extract import extract, iter_activations
from ..core.topk import TopK
from ..core.result import Result, provenance
from ._common import check_layers, open_store, read_csv

__all__ = ["TopK", "TopKResult", "topk", "topk_from_store"]

logger = logging.getLogger(__name__)

COLUMNS = ["layer", "channel", "rank", "manifest_row", "image", "label", "score", "y", "x", "height", "width"]


@dataclass(frozen=True)
class TopKResult(Result):
    """Per layer and channel, the top-k images with score and argmax location.

    Attributes
    ----------
    table : DataFrame
        ``layer, channel, rank`` (from 1), ``manifest_row, image, label, score, y, x`` (argmax
        cell of the map; -1 for vector outputs), ``height, width`` (map size).
    params : dict
        ``k``, ``score`` (method), layers, rows seen.
    provenance : dict
    """

    table: pd.DataFrame = field(repr=False)
    params: dict
    provenance: dict = field(repr=False)

    KIND, META = "top-k", "topk.json"

    @classmethod
    def from_accumulator(cls, acc, frame=None, params=None, provenance=None):
        """The result of a :class:`~conceptlens.core.topk.TopK`; ``frame`` (a Manifest, a manifest
        frame or store rows with ``manifest_row``) names the images."""
        frame = frame.frame if isinstance(frame, Manifest) else frame
        params = {"k": acc.k, "score": acc.score, "n_seen": acc.n_seen, **(params or {})}
        parts = []
        for layer, (s, r, loc) in acc.result().items():  # [C, k]
            c, k = s.shape
            h, w = acc.shapes[layer]
            part = pd.DataFrame({
                "layer": layer, "channel": np.repeat(np.arange(c), k), "rank": np.tile(np.arange(1, k + 1), c),
                "manifest_row": r.ravel(), "score": s.ravel(),
                "y": np.where(loc.ravel() >= 0, loc.ravel() // w, -1), "x": np.where(loc.ravel() >= 0, loc.ravel() % w, -1),
                "height": h, "width": w,
            })
            parts.append(part)
        table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=COLUMNS)
        # ``frame`` is a manifest (row i = manifest row i) or store rows (with a manifest_row column).
        if frame is not None and "manifest_row" in frame.columns:
            frame = frame.set_index("manifest_row")
        for col in ("image", "label"):
            if frame is not None and col in frame.columns:
                table[col] = frame[col].reindex(table["manifest_row"].to_numpy()).to_numpy()
            else:
                table[col] = ""
        return cls(table=table[COLUMNS], params=params, provenance=provenance or {})

    def to_frame(self):
        """The top-k table (a copy)."""
        return self.table.copy()

    def top(self, layer, channel):
        """The rows of one channel, best first."""
        t = self.table
        return t[(t["layer"] == layer) & (t["channel"] == channel)].sort_values("rank").reset_index(drop=True)

    def crops(self, layer, channel, manifest, preprocessing, size=0.5):
        """Image crops around each top image's argmax location, as ``uint8 [h, w, 3]`` arrays.

        Parameters
        ----------
        layer : str
        channel : int
        manifest : Manifest or path
            The manifest the rows refer to.
        preprocessing : Preprocessing
            The resize/crop the model saw (normalisation is not applied), so that map cells map
            onto the image as the model saw it.
        size : float
            Crop side as a fraction of the model input side (1 = the whole image).

        Returns
        -------
        list of ndarray
        """
        manifest = manifest if isinstance(manifest, Manifest) else Manifest.read(manifest)
        if not 0 < size <= 1:
            raise ConceptLensError(f"the size parameter of crops must be in (0, 1]; got {size!r}")
        steps = [T.ToImage()]
        if preprocessing.resize is not None:
            steps.append(T.Resize(preprocessing.resize, antialias=True))
        if preprocessing.crop is not None:
            steps.append(T.CenterCrop(preprocessing.crop))
        geometry = T.Compose(steps)
        out = []
        for _, row in self.top(layer, channel).iterrows():
            with Image.open(manifest.root / manifest.frame["image"].iloc[int(row["manifest_row"])]) as im:
                img = geometry(im.convert("RGB")).permute(1, 2, 0).numpy()
            ih, iw = img.shape[:2]
            if row["y"] < 0:
                out.append(img)
                continue
            cy, cx = (row["y"] + 0.5) / row["height"] * ih, (row["x"] + 0.5) / row["width"] * iw
            sh, sw = max(1, round(size * ih)), max(1, round(size * iw))
            y0 = int(np.clip(round(cy - sh / 2), 0, ih - sh))
            x0 = int(np.clip(round(cx - sw / 2), 0, iw - sw))
            out.append(img[y0:y0 + sh, x0:x0 + sw])
        return out

    def _write(self, directory):  # topk.csv; topk.json holds params and provenance
        self.table.to_csv(directory / "topk.csv", index=False)
        return {"params": self.params}

    @classmethod
    def _read(cls, directory, meta):
        return cls(table=read_csv(directory / "topk.csv"), params=meta["params"], provenance=meta["provenance"])


def topk_from_store(store, layers=None, k=16, score="max", chunk_rows=256):
    """Top-k images per channel from an existing store (no forward pass).

    Spatial stores (``pool="none"``) give both scores and locations; a max-pooled store gives
    ``score="max"`` without locations. Other pooled stores cannot give these scores.

    Parameters
    ----------
    store : ActivationStore or path
    layers : sequence of str, optional
        Default: all layers of the store.
    k : int
    score : {"max", "mean"}
    chunk_rows : int
        Rows read at a time.

    Returns
    -------
    TopKResult
    """
    t0 = time.perf_counter()
    store = open_store(store)
    layers = check_layers(store, layers)
    acc = TopK(k, score)
    mrow = store.rows["manifest_row"].to_numpy()
    for layer in layers:
        dims = len(store.shape(layer))
        if dims == 1 and store.pool != "none" and not (store.pool == "max" and score == "max"):
            raise ConceptLensError(
                f"store {store.path} holds {store.pool}-pooled {layer!r}; top-k by {score} needs spatial maps: "
                "extract with --pool none, or pass --model/--data so top-k runs during extraction"
            )
    for parts in zip(*(store.iter_chunks(layer, chunk_rows) for layer in layers)):
        start, n = parts[0][0], len(parts[0][1])
        acc.update(mrow[start:start + n], {layer: torch.from_numpy(arr) for layer, (_, arr) in zip(layers, parts)})
    return TopKResult.from_accumulator(acc, store.rows, {"layers": layers, "source": "store"},
                                       provenance(store=store, parameters={"k": k, "score": score, "layers": layers},
                                                  timings={"total": time.perf_counter() - t0}))


def topk(model, data, layers, k=16, score="max", *, store=None, pool="mean", batch_size=64, num_workers=0,
         preprocessing=None, skip_bad=False, progress=True, engine="local"):
    """Top-k images per channel of ``layers``, computed in the extraction forward pass.

    Parameters
    ----------
    model : LoadedModel or str
    data : Manifest or path
    layers : sequence of str
    k : int
    score : {"max", "mean"}
        See :class:`TopK`.
    store : path, optional
        Also write an ActivationStore (``pool``) in the same pass. If that store is already
        complete for this request, its forward pass is skipped by :func:`extract`, and the top-k
        is computed with one plain pass instead (logged).
    pool, batch_size, num_workers, preprocessing, skip_bad, progress, engine
        As for :func:`~conceptlens.core.extract.extract`; ``engine="ray"`` (with ``store``) ranks
        each shard in its actor and merges the shards' top-k.

    Returns
    -------
    TopKResult
    """
    if check_engine(engine) != "local" and store is None:
        raise ConceptLensError(f"top-k with engine={engine!r} ranks during the extraction of a store: pass store=")
    model = load_model(model) if isinstance(model, str) else model
    manifest = data if isinstance(data, Manifest) else Manifest.read(data)
    acc = TopK(k, score)
    prep = model.preprocessing_for(manifest, preprocessing)
    t0 = time.perf_counter()
    parameters = {"k": k, "score": score, "layers": list(layers)}

    def prov(st=None):
        return provenance(model, manifest, store=st, parameters=parameters, preprocessing=prep.to_dict(),
                          timings={"total": time.perf_counter() - t0})

    if store is not None:
        st = extract(model, manifest, layers, store, pool=pool, batch_size=batch_size, num_workers=num_workers,
                     skip_bad=skip_bad, preprocessing=prep, observers=[acc], progress=progress, engine=engine)
        if acc.n_seen == st.n_rows:
            return TopKResult.from_accumulator(acc, manifest, {"layers": list(layers), "source": "extraction"}, prov(st))
        logger.info("store %s was (partly) reused, so extraction did not see every image: one plain pass for top-k", store)
        acc = TopK(k, score)
    batches = make_loader(manifest, prep, batch_size=batch_size, num_workers=num_workers, skip_bad=skip_bad)
    batches = tqdm(batches, desc="topk", unit="batch", disable=not progress)
    for rows, _, raw in iter_activations(model, batches, layers, pool="mean", keep_raw=acc.reduce):
        acc.update(rows, raw)
    return TopKResult.from_accumulator(acc, manifest, {"layers": list(layers), "source": "forward pass"}, prov(st if store is not None else None))

"""Max-activation ranking: the top-k images of every channel, streamed during extraction.

:class:`TopK` is an observer for :func:`~conceptlens.representation.extract.extract`: it sees each
batch's unpooled layer outputs, scores every (image, channel) - the spatial **max** of the map, or
the spatial **mean of its ReLU** - and keeps, per channel, the k best images with the location of
the maximum, so no second forward pass is needed. Accumulators are mergeable (shards of a dataset
processed apart give the same result as one pass). Ties rank the lower manifest row first.
"""

from __future__ import annotations

import logging
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
from ._common import check_layers, open_store, read_csv, read_json, store_provenance, write_result
from .extract import extract, iter_activations

__all__ = ["TopK", "TopKResult", "topk", "topk_from_store"]

logger = logging.getLogger(__name__)

SCORES = ("max", "mean")
COLUMNS = ["layer", "channel", "rank", "manifest_row", "image", "label", "score", "y", "x", "height", "width"]


def _score_maps(out, score):
    """``[B, C]`` scores, the ``[B, C, H*W]`` maps (None for vector outputs) and the map size."""
    out = out.float()
    if out.dim() == 2:
        return (out if score == "max" else out.clamp_min(0)), None, (1, 1)
    if out.dim() != 4:
        raise ConceptLensError(f"top-k needs [B, C] or [B, C, H, W] outputs; got shape {tuple(out.shape)}")
    flat = out.flatten(2)
    s = flat.amax(dim=2) if score == "max" else flat.clamp_min(0).mean(dim=2)
    return s, flat, tuple(out.shape[2:])


def _top_indices(scores, rows, k):
    """Per column, the indices of the k best entries: descending score, ties by ascending row.

    One ``topk`` over an exact int64 key (order-preserving integer image of the float32 score in
    the high half, ``2**31 - 1 - row`` in the low half) instead of two stable sorts.
    """
    bits = (scores.float() + 0.0).contiguous().view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()  # negative floats: flip magnitude bits
    key = ordered * (1 << 32) + ((1 << 31) - 1 - rows.long())
    return key.topk(min(k, len(key)), dim=0).indices


class TopK:
    """Streaming top-k images per channel; use as ``extract(..., observers=[TopK(...)])``.

    Parameters
    ----------
    k : int
        Images kept per channel.
    score : {"max", "mean"}
        ``max``: spatial maximum of the map; ``mean``: spatial mean of ``relu(map)``.
    layers : sequence of str, optional
        Layers to rank (default: every layer the observer is given).
    """

    def __init__(self, k=16, score="max", layers=None):
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ConceptLensError(f"the k parameter of TopK must be a positive integer; got {k!r}")
        if score not in SCORES:
            raise ConceptLensError(f"the score parameter of TopK must be 'max' or 'mean'; got {score!r}")
        self.k, self.score = int(k), score
        self.layers = None if layers is None else list(layers)
        self.state = {}  # layer -> (scores [k', C], rows [k', C], locs [k', C])
        self.shapes = {}  # layer -> (H, W)
        self.n_seen = 0

    def reduce(self, layer, out):
        """What one batch's output of ``layer`` contributes: ``(scores, locations, map size)``.

        Called by :func:`~conceptlens.representation.extract.extract` inside the forward hook, so
        the maps need no copy. Locations (argmax) are computed only where the score can still
        enter the top-k (at or above the channel's current k-th best); the rest are -1.
        """
        if self.layers is not None and layer not in self.layers:
            return None
        s, maps, hw = _score_maps(out.detach(), self.score)
        loc = torch.full_like(s, -1, dtype=torch.long)
        if maps is not None:
            old = self.state.get(layer)
            live = s >= old[0][-1] if old is not None and len(old[0]) == self.k else torch.ones_like(s, dtype=torch.bool)
            loc[live] = maps[live].argmax(dim=1)
        return s, loc, hw

    def __call__(self, rows, raw):
        """Update with one batch: ``rows`` (manifest row indices) and ``raw``, ``{layer: Tensor}``
        unpooled outputs or ``{layer: reduce(layer, output)}``."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        for layer, out in raw.items():
            reduced = self.reduce(layer, out) if torch.is_tensor(out) else out
            if reduced is None:
                continue
            s, loc, hw = reduced
            self._push(layer, s, rows.to(s.device)[:, None].expand_as(s), hw, loc=loc)
        self.n_seen += len(rows)

    def _push(self, layer, s, r, hw, loc):
        """Fold scores ``s``, rows ``r`` and locations ``loc`` (``[n, C]``) into the state."""
        if layer in self.shapes and self.shapes[layer] != tuple(hw):
            raise ConceptLensError(f"layer {layer!r} changed its map size from {self.shapes[layer]} to {tuple(hw)} between batches")
        self.shapes[layer] = tuple(hw)
        if layer in self.state:
            s, r, loc = (torch.cat([a.to(b.device), b]) for a, b in zip(self.state[layer], (s, r, loc)))
        idx = _top_indices(s, r, self.k)
        self.state[layer] = (s.gather(0, idx), r.gather(0, idx), loc.gather(0, idx))

    def merge(self, other):
        """A new accumulator holding the top-k of both (same ``k`` and ``score``)."""
        if (other.k, other.score) != (self.k, self.score):
            raise ConceptLensError(f"cannot merge TopK(k={other.k}, score={other.score}) into TopK(k={self.k}, score={self.score})")
        out = TopK(self.k, self.score, self.layers)
        for acc in (self, other):
            for layer, (s, r, loc) in acc.state.items():
                out._push(layer, s, r, acc.shapes[layer], loc=loc)
        out.n_seen = self.n_seen + other.n_seen
        return out

    def result(self, manifest=None, provenance=None, params=None):
        """A :class:`TopKResult`; ``manifest`` (Manifest or DataFrame) names the images."""
        frame = manifest.frame if isinstance(manifest, Manifest) else manifest
        scores, rows, locs = {}, {}, {}
        for layer, (s, r, loc) in self.state.items():
            scores[layer], rows[layer], locs[layer] = s.cpu().numpy().T, r.cpu().numpy().T, loc.cpu().numpy().T
        info = {"k": self.k, "score": self.score, "n_seen": self.n_seen, **(params or {})}
        return TopKResult.from_arrays(scores, rows, locs, dict(self.shapes), frame, info, provenance or {})


@dataclass(frozen=True)
class TopKResult:
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

    @classmethod
    def from_arrays(cls, scores, rows, locs, shapes, frame, params, provenance):
        parts = []
        for layer in scores:
            s, r, loc = scores[layer], rows[layer], locs[layer]  # [C, k]
            c, k = s.shape
            h, w = shapes[layer]
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
        return cls(table=table[COLUMNS], params=params, provenance=provenance)

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

    def save(self, directory):
        """Write ``topk.csv`` and ``topk.json`` into ``directory``."""
        return write_result(directory, {"topk.csv": self.table}, ("topk.json", {"params": self.params, "provenance": self.provenance}))

    @classmethod
    def load(cls, directory):
        """Read a result written by :meth:`save`."""
        meta = read_json(directory, "topk.json", "top-k")
        return cls(table=read_csv(f"{directory}/topk.csv"), params=meta["params"], provenance=meta["provenance"])


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
        for start, arr in store.iter_chunks(layer, chunk_rows):
            s, loc, hw = acc.reduce(layer, torch.from_numpy(arr))
            r = torch.from_numpy(mrow[start:start + len(arr)].copy())[:, None].expand_as(s)
            acc._push(layer, s, r, hw, loc)
    acc.n_seen = store.n_rows
    prov = store_provenance(store)
    return acc.result(store.rows, prov, {"layers": layers, "source": "store"})


def topk(model, data, layers, k=16, score="max", *, store=None, pool="mean", batch_size=64, num_workers=0,
         preprocessing=None, skip_bad=False, progress=True):
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
    pool, batch_size, num_workers, preprocessing, skip_bad, progress
        As for :func:`~conceptlens.representation.extract.extract`.

    Returns
    -------
    TopKResult
    """
    model = load_model(model) if isinstance(model, str) else model
    manifest = data if isinstance(data, Manifest) else Manifest.read(data)
    acc = TopK(k, score)
    prep = model.preprocessing_for(manifest, preprocessing)
    prov = {"model": model.spec, "weights_hash": model.weights_hash, "manifest": str(manifest.path),
            "manifest_hash": manifest.content_hash(), "preprocessing": prep.to_dict()}
    if store is not None:
        st = extract(model, manifest, layers, store, pool=pool, batch_size=batch_size, num_workers=num_workers,
                     skip_bad=skip_bad, preprocessing=prep, observers=[acc], progress=progress)
        prov = {**store_provenance(st), "preprocessing": prep.to_dict()}
        if acc.n_seen == st.n_rows:
            return acc.result(manifest, prov, {"layers": list(layers), "source": "extraction"})
        logger.info("store %s was (partly) reused, so extraction did not see every image: one plain pass for top-k", store)
        acc = TopK(k, score)
    batches = make_loader(manifest, prep, batch_size=batch_size, num_workers=num_workers, skip_bad=skip_bad)
    batches = tqdm(batches, desc="topk", unit="batch", disable=not progress)
    for rows, _, raw in iter_activations(model, batches, layers, pool="mean", keep_raw=acc.reduce):
        acc(rows, raw)
    return acc.result(manifest, prov, {"layers": list(layers), "source": "forward pass"})

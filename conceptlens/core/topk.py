"""Streaming top-k per channel: the one mergeable top-k accumulator of every analyzer.

:class:`TopK` is an observer for :func:`~conceptlens.core.extract.extract` (max-activating images in
the extraction pass) and a plain accumulator for stored maps (dissection's top images per unit). It
scores every (image, channel) - the spatial **max** of the map, or the spatial **mean of its ReLU** -
and keeps, per channel, the k best images (and, optionally, where the maximum lies). Shards of a
dataset accumulated apart and merged give the same result as one pass. Ties rank the lower row first.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ConceptLensError

__all__ = ["TopK", "SCORES"]

SCORES = ("max", "mean")


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
    """Streaming top-k images per channel: ``update(rows, {layer: maps})``, ``merge``, ``result``
    (the interface of :mod:`conceptlens.core.accumulate`).

    Also an extraction observer: ``extract(..., observers=[TopK(...)])``.

    Parameters
    ----------
    k : int
        Images kept per channel.
    score : {"max", "mean"}
        ``max``: spatial maximum of the map; ``mean``: spatial mean of ``relu(map)``.
    layers : sequence of str, optional
        Layers to rank (default: every layer the observer is given).
    locations : bool
        Track where each kept image's maximum lies (an argmax per candidate; off where only the
        ranking is needed).
    """

    def __init__(self, k=16, score="max", layers=None, locations=True):
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ConceptLensError(f"the k parameter of TopK must be a positive integer; got {k!r}")
        if score not in SCORES:
            raise ConceptLensError(f"the score parameter of TopK must be 'max' or 'mean'; got {score!r}")
        self.k, self.score, self.locations = int(k), score, bool(locations)
        self.layers = None if layers is None else list(layers)
        self.state = {}  # layer -> (scores [k', C], rows [k', C], locs [k', C])
        self.shapes = {}  # layer -> (H, W)
        self.n_seen = 0

    def reduce(self, layer, out):
        """What one batch's output of ``layer`` contributes: ``(scores, locations, map size)``.

        Called by :func:`~conceptlens.core.extract.extract` inside the forward hook, so
        the maps need no copy. Locations (argmax) are computed only where the score can still
        enter the top-k (at or above the channel's current k-th best); the rest are -1.
        """
        if self.layers is not None and layer not in self.layers:
            return None
        s, maps, hw = _score_maps(out.detach(), self.score)
        loc = torch.full_like(s, -1, dtype=torch.long)
        if maps is not None and self.locations:
            old = self.state.get(layer)
            live = s >= old[0][-1] if old is not None and len(old[0]) == self.k else torch.ones_like(s, dtype=torch.bool)
            loc[live] = maps[live].argmax(dim=1)
        return s, loc, hw

    def update(self, rows, raw):
        """Add one batch: ``rows`` (row indices, e.g. manifest rows) and ``raw``, ``{layer: Tensor}``
        unpooled ``[B, C, H, W]`` (or ``[B, C]``) outputs or ``{layer: reduce(layer, output)}``."""
        # a copy: rows read from a store are a read-only memory map, which torch will not wrap
        rows = rows.long() if torch.is_tensor(rows) else torch.from_numpy(np.array(rows, dtype=np.int64))
        for layer, out in raw.items():
            reduced = self.reduce(layer, out) if torch.is_tensor(out) else out
            if reduced is None:
                continue
            s, loc, hw = reduced
            self._push(layer, s, rows.to(s.device)[:, None].expand_as(s), hw, loc=loc)
        self.n_seen += len(rows)

    __call__ = update  # the extraction observer protocol

    def _push(self, layer, s, r, hw, loc):
        """Fold scores ``s``, rows ``r`` and locations ``loc`` (``[n, C]``) into the state."""
        if layer in self.shapes and self.shapes[layer] != tuple(hw):
            raise ConceptLensError(f"layer {layer!r} changed its map size from {self.shapes[layer]} to {tuple(hw)} between batches")
        self.shapes[layer] = tuple(hw)
        if layer in self.state:
            s, r, loc = (torch.cat([a.to(b.device), b]) for a, b in zip(self.state[layer], (s, r, loc)))
        idx = _top_indices(s, r, self.k)
        self.state[layer] = (s.gather(0, idx), r.gather(0, idx), loc.gather(0, idx))

    def empty(self):
        """A fresh accumulator with the same parameters (what each shard of a Ray extraction fills)."""
        return TopK(self.k, self.score, self.layers, self.locations)

    def merge(self, other):
        """A new accumulator holding the top-k of both (same ``k`` and ``score``)."""
        if (other.k, other.score, other.locations) != (self.k, self.score, self.locations):
            raise ConceptLensError(f"cannot merge TopK(k={other.k}, score={other.score}, locations={other.locations}) into "
                                   f"TopK(k={self.k}, score={self.score}, locations={self.locations})")
        out = self.empty()
        for acc in (self, other):
            for layer, (s, r, loc) in acc.state.items():
                out._push(layer, s, r, acc.shapes[layer], loc=loc)
        out.n_seen = self.n_seen + other.n_seen
        return out

    def result(self):
        """``{layer: (scores, rows, locations)}``, each ``[C, k']`` numpy (``k' = min(k, rows seen)``),
        best first; locations are flat argmax cells of the map (-1 for vector outputs or when not
        tracked). The map sizes are in ``shapes``."""
        return {layer: tuple(a.cpu().numpy().T for a in arrays) for layer, arrays in self.state.items()}

"""Per-unit activation thresholds: exact quantiles when they fit in memory, else a grid sketch.

A unit's threshold is a quantile (default 0.995) of its activations over all spatial positions
of all images, with numpy's default ("linear") interpolation between order statistics.

* **exact**: every value of the layer is gathered in one ``[units, values]`` float32 buffer and
  the two order statistics around the quantile are found with ``np.partition`` — used when the
  buffer fits ``memory_budget``.
* **grid sketch** (:class:`GridQuantileSketch`): a mergeable two-level fixed-grid histogram per
  unit. Pass 1 takes each unit's ``[lo, hi]`` range; pass 2 counts values in ``bins`` coarse
  cells; pass 3 counts, within the coarse cells holding the two order statistics, ``bins`` fine
  cells. Each order statistic is estimated by the centre of its fine cell, so the estimate lies
  within **(hi − lo) / (2·bins²)** of the exact quantile (the bound is returned per unit). Memory
  is ``O(units · bins)`` whatever the number of images; counts of shards add (``merge``).

Both read activations from chunks (the ActivationStore), never from the model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..errors import ConceptLensError

__all__ = ["Thresholds", "GridQuantileSketch", "unit_quantiles", "exact_quantiles", "load_thresholds"]

logger = logging.getLogger(__name__)

DEFAULT_BUDGET = 512 * 2**20  # bytes for the exact buffer


@dataclass(frozen=True)
class Thresholds:
    """Per-unit thresholds of one layer.

    Attributes
    ----------
    values : numpy.ndarray of float64, shape (units,)
    method : str
        How they were obtained, e.g. ``"exact quantile 0.995 (numpy linear)"``.
    error_bound : numpy.ndarray of float64, shape (units,)
        Largest possible ``|values - exact quantile|`` (0 for exact and given thresholds).
    """

    values: np.ndarray
    method: str
    error_bound: np.ndarray


def _check_q(q):
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0.0 <= float(q) <= 1.0:
        raise ConceptLensError(f"the quantile must be a number in [0, 1] (default 0.995); got {q!r}")
    return float(q)


def _as_units(chunk):
    """``[n, C, ...]`` chunk → ``[C, n·positions]`` view/copy."""
    chunk = np.asarray(chunk)
    if chunk.ndim < 2:
        raise ConceptLensError(f"activation chunks must be [rows, units, ...]; got shape {chunk.shape}")
    n, c = chunk.shape[:2]
    return np.moveaxis(chunk.reshape(n, c, -1), 1, 0).reshape(c, -1)


def _ranks(q, m):
    h = (m - 1) * q
    k = int(np.floor(h))
    return k, min(k + 1, m - 1), h - k


def _lerp(a, b, t):
    # numpy's quantile lerp: a + (b - a)·t, computed from the nearer end for t >= 0.5
    diff = b - a
    return np.where(t >= 0.5, b - diff * (1 - t), a + diff * t)


def exact_quantiles(chunks, q, n_units, n_values):
    """Exact per-unit quantile over ``n_values`` values per unit gathered from ``chunks``.

    Parameters
    ----------
    chunks : iterable of numpy.ndarray
        ``[rows, units, ...]`` arrays; together ``n_values`` values per unit.
    q : float
        Quantile in ``[0, 1]``.
    n_units, n_values : int
        Size of the buffer to allocate (``4 · n_units · n_values`` bytes).

    Returns
    -------
    numpy.ndarray of float64, shape (n_units,)
        Equal to ``np.quantile(values, q, axis=1)`` of the float32 values.
    """
    q = _check_q(q)
    buf = np.empty((n_units, n_values), dtype=np.float32)
    pos = 0
    for chunk in chunks:
        part = _as_units(chunk)
        buf[:, pos:pos + part.shape[1]] = part
        pos += part.shape[1]
    if pos != n_values:
        raise ConceptLensError(f"expected {n_values} values per unit, got {pos}")
    k, k1, t = _ranks(q, n_values)
    buf.partition(sorted({k, k1}), axis=1)
    a, b = buf[:, k].astype(np.float64), buf[:, k1].astype(np.float64)
    return _lerp(a, b, t).astype(np.float32).astype(np.float64)


class GridQuantileSketch:
    """Mergeable two-level fixed-grid histogram per unit for one quantile (see module notes).

    Feed the same data three times through :meth:`update`: pass 1 collects each unit's range, pass
    2 (after :meth:`start_coarse`) counts the coarse grid, pass 3 (after :meth:`start_fine`) refines
    the two cells holding the quantile's order statistics; then :meth:`result`. Sketches of shards
    in the same stage (and, after pass 1, on the same grid) combine with :meth:`merge`; the
    interface is :mod:`conceptlens.core.accumulate`'s.

    Parameters
    ----------
    n_units : int
    q : float
        The quantile.
    bins : int, default 1024
        Cells per level; the error bound is ``(hi - lo) / (2 · bins²)``.
    """

    def __init__(self, n_units, q, bins=1024):
        self.n_units, self.q, self.bins = int(n_units), _check_q(q), int(bins)
        if self.bins < 2:
            raise ConceptLensError(f"the sketch needs at least 2 bins per level; got {bins}")
        self.lo = np.full(self.n_units, np.inf)
        self.hi = np.full(self.n_units, -np.inf)
        self.n = 0
        self.stage = "range"
        self.coarse = None
        self.fine = None
        self._targets = None

    def _fine_index(self, part):
        width = self.hi - self.lo
        scale = np.where(width > 0, self.bins * self.bins / np.where(width > 0, width, 1.0), 0.0)
        idx = np.floor((part.astype(np.float64) - self.lo[:, None]) * scale[:, None])
        return np.clip(idx, 0, self.bins * self.bins - 1).astype(np.int64)

    def start_coarse(self):
        """End pass 1; counts of pass 2 go to the coarse grid."""
        if self.n == 0:
            raise ConceptLensError("the quantile sketch saw no values")
        self.coarse = np.zeros((self.n_units, self.bins), dtype=np.int64)
        self.stage = "coarse"

    def start_fine(self):
        """End pass 2; locate the coarse cells of the two order statistics, refine them in pass 3."""
        k, k1, _ = _ranks(self.q, self.n)
        cum = np.cumsum(self.coarse, axis=1)
        targets = []
        for r in (k, k1):
            cell = (cum <= r).sum(axis=1)  # first cell whose cumulative count exceeds rank r
            below = np.where(cell > 0, cum[np.arange(self.n_units), np.maximum(cell - 1, 0)], 0)
            targets.append((cell, r - below))
        self._targets = targets
        self.fine = np.zeros((2, self.n_units, self.bins), dtype=np.int64)
        self.stage = "fine"

    def update(self, chunk):
        """Fold a ``[rows, units, ...]`` chunk into the current pass: the range, or counts on the grid."""
        part = _as_units(chunk)
        if self.stage == "range":
            if part.shape[1]:
                self.lo = np.minimum(self.lo, part.min(axis=1))
                self.hi = np.maximum(self.hi, part.max(axis=1))
                self.n += part.shape[1]
            return
        idx = self._fine_index(part)
        units = np.arange(self.n_units)[:, None] * self.bins
        if self.stage == "coarse":
            self.coarse += np.bincount((units + idx // self.bins).ravel(), minlength=self.n_units * self.bins).reshape(
                self.n_units, self.bins)
        else:
            for j, (cell, _) in enumerate(self._targets):
                sel = idx // self.bins == cell[:, None]
                flat = np.broadcast_to(units, idx.shape)[sel] + idx[sel] % self.bins
                self.fine[j] += np.bincount(flat, minlength=self.n_units * self.bins).reshape(self.n_units, self.bins)

    def spawn(self):
        """An empty sketch on this one's grid and stage, for another shard's counts (then :meth:`merge`)."""
        other = GridQuantileSketch(self.n_units, self.q, self.bins)
        other.lo, other.hi, other.stage, other._targets = self.lo, self.hi, self.stage, self._targets
        if self.stage == "range":
            other.lo, other.hi = np.full(self.n_units, np.inf), np.full(self.n_units, -np.inf)
        else:
            other.n = self.n
        if self.coarse is not None:
            other.coarse = np.zeros_like(self.coarse)
        if self.fine is not None:
            other.fine = np.zeros_like(self.fine)
        return other

    def merge(self, other):
        """A new sketch holding this one's and another shard's: ranges in pass 1, grid counts after
        (both sketches on the same grid and stage)."""
        if (other.n_units, other.q, other.bins, other.stage) != (self.n_units, self.q, self.bins, self.stage):
            raise ConceptLensError("quantile sketches merge only with the same units, quantile, bins and stage")
        out = self.spawn()
        if self.stage == "range":
            out.lo, out.hi, out.n = np.minimum(self.lo, other.lo), np.maximum(self.hi, other.hi), self.n + other.n
            return out
        if not (np.array_equal(self.lo, other.lo) and np.array_equal(self.hi, other.hi) and self.n == other.n):
            raise ConceptLensError("quantile sketches merge only with the same grid (lo, hi, bins) and stage")
        if self.stage == "coarse":
            out.coarse = self.coarse + other.coarse
        else:
            out.fine = self.fine + other.fine
        return out

    @property
    def error_bound(self):
        """Per unit, the largest ``|estimate - exact quantile|``: ``(hi - lo) / (2 · bins²)``."""
        return (self.hi - self.lo) / (2.0 * self.bins * self.bins)

    def result(self):
        """After pass 3: the per-unit quantile estimates (float64)."""
        if self.stage != "fine":
            raise ConceptLensError("GridQuantileSketch.result needs the three passes first")
        _, _, t = _ranks(self.q, self.n)
        width = (self.hi - self.lo) / (self.bins * self.bins)
        values = []
        for j, (cell, rank_in_cell) in enumerate(self._targets):
            cum = np.cumsum(self.fine[j], axis=1)
            fine_cell = (cum <= rank_in_cell[:, None]).sum(axis=1)
            fine_cell = np.minimum(fine_cell, self.bins - 1)
            values.append(self.lo + (cell * self.bins + fine_cell + 0.5) * width)
        est = _lerp(values[0], values[1], t)
        return np.where(self.hi > self.lo, est, self.lo)


def unit_quantiles(chunks, q, n_units, n_values, method="auto", memory_budget=DEFAULT_BUDGET, bins=1024, name="layer"):
    """Per-unit quantile of a layer, exact or sketched.

    Parameters
    ----------
    chunks : callable
        ``chunks()`` returns a fresh iterable of ``[rows, units, ...]`` arrays (the sketch reads
        the data three times).
    q : float
        Quantile in ``[0, 1]``.
    n_units, n_values : int
        Units, and values per unit (rows × spatial positions).
    method : {"auto", "exact", "sketch"}
        ``auto``: exact when the ``4 · n_units · n_values``-byte buffer fits ``memory_budget``.
    memory_budget : int
        Bytes allowed for the exact buffer.
    bins : int
        Sketch cells per level.
    name : str
        Layer name for log messages.

    Returns
    -------
    Thresholds
    """
    q = _check_q(q)
    if method not in ("auto", "exact", "sketch"):
        raise ConceptLensError(f"the quantile method must be auto, exact or sketch; got {method!r}")
    need = 4 * n_units * n_values
    if method == "auto":
        method = "exact" if need <= memory_budget else "sketch"
        logger.info("thresholds of %s: %s quantiles (exact buffer %.0f MiB, budget %.0f MiB)",
                    name, method, need / 2**20, memory_budget / 2**20)
    if method == "exact":
        values = exact_quantiles(chunks(), q, n_units, n_values)
        return Thresholds(values, f"exact quantile {q:g} (numpy linear interpolation)", np.zeros(n_units))
    sketch = GridQuantileSketch(n_units, q, bins)
    for start in (None, sketch.start_coarse, sketch.start_fine):
        if start is not None:
            start()
        for chunk in chunks():
            sketch.update(chunk)
    return Thresholds(
        sketch.result(),
        f"grid-sketch quantile {q:g} (2 levels x {bins} bins; |error| <= (max - min) / (2 * {bins}^2))",
        sketch.error_bound,
    )


def load_thresholds(path, layers, n_units):
    """Thresholds given in a file: ``.npy`` (one layer, or all layers' units concatenated in
    order) or ``.npz`` (one array per layer name).

    Parameters
    ----------
    path : str or Path
    layers : list of str
    n_units : dict of str to int
        Units per layer.

    Returns
    -------
    dict of str to numpy.ndarray (float64)
    """
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise ConceptLensError(f"thresholds file {path} does not exist; pass a .npy or .npz file")
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise ConceptLensError(f"thresholds file {path} is not a readable .npy/.npz file: {exc}") from None
    if isinstance(data, np.lib.npyio.NpzFile):
        with data:
            missing = [layer for layer in layers if layer not in data.files]
            if missing:
                raise ConceptLensError(f"thresholds file {path} has no array for layer(s) {missing}; it holds {data.files}")
            out = {layer: np.asarray(data[layer], dtype=np.float64).ravel() for layer in layers}
    else:
        flat = np.asarray(data, dtype=np.float64).ravel()
        total = sum(n_units[layer] for layer in layers)
        if flat.size != total:
            raise ConceptLensError(
                f"thresholds file {path} holds {flat.size} values; expected {total} "
                f"(units of {', '.join(f'{layer}={n_units[layer]}' for layer in layers)}, concatenated in this order)"
            )
        out, pos = {}, 0
        for layer in layers:
            out[layer] = flat[pos:pos + n_units[layer]]
            pos += n_units[layer]
    for layer in layers:
        if out[layer].size != n_units[layer]:
            raise ConceptLensError(
                f"thresholds file {path}: layer {layer!r} has {n_units[layer]} units but {out[layer].size} thresholds"
            )
        if not np.isfinite(out[layer]).all():
            raise ConceptLensError(f"thresholds file {path}: layer {layer!r} has non-finite thresholds")
    return out

"""Mergeable accumulators: the one interface every streaming statistic follows.

An accumulator folds batches in with ``update(...)``, combines with the accumulator of another
shard of the same data through ``merge(other)`` (a **new** accumulator; neither input changes) and
gives its answer with ``result()``. Merging the accumulators of shards equals one pass over the
whole (``tests/test_accumulators.py``), so a dataset split over processes or machines gives the
single-machine numbers. The implementations are :class:`~conceptlens.core.topk.TopK`,
:class:`RunningMoments` (here), dissection's ``GridQuantileSketch`` and ``IoUTally``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..errors import ConceptLensError

__all__ = ["Accumulator", "RunningMoments", "Moments", "merge_all"]


@runtime_checkable
class Accumulator(Protocol):
    """``update(batch...)`` in place, ``merge(other) -> new accumulator``, ``result()``."""

    def update(self, *batch: Any) -> None: ...

    def merge(self, other: Any) -> Any: ...

    def result(self) -> Any: ...


def merge_all(accumulators):
    """The merge of a non-empty sequence of accumulators of disjoint shards, in order."""
    accumulators = list(accumulators)
    if not accumulators:
        raise ConceptLensError("merge_all needs at least one accumulator")
    return functools.reduce(lambda a, b: a.merge(b), accumulators)


@dataclass(frozen=True)
class Moments:
    """Per-feature count, mean and variance (``ddof`` as asked of :meth:`RunningMoments.result`)."""

    n: int
    mean: np.ndarray
    var: np.ndarray

    @property
    def std(self):
        return np.sqrt(self.var)


class RunningMoments:
    """Streaming per-feature mean and variance of ``[rows, features]`` batches (float64).

    Batches fold in with the pairwise update of Chan, Golub and LeVeque (1979), which is also the
    merge of two shards, so the answer does not depend on batch sizes beyond float rounding; a
    batch's own moments come from NumPy in two passes, which keeps the catastrophic cancellation
    of a sum-of-squares formula out of large-mean features.

    Parameters
    ----------
    n_features : int
    """

    def __init__(self, n_features):
        if not isinstance(n_features, (int, np.integer)) or n_features < 1:
            raise ConceptLensError(f"the n_features parameter of RunningMoments must be a positive integer; got {n_features!r}")
        self.n_features = int(n_features)
        self.n = 0
        self.mean = np.zeros(self.n_features)
        self.m2 = np.zeros(self.n_features)  # sum of squared deviations from the mean

    def _fold(self, n, mean, m2):
        if n == 0:
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta * delta * (self.n * n / total)
        self.n = total

    def update(self, batch):
        """Fold in a ``[rows, n_features]`` batch (anything ``numpy.asarray`` reads)."""
        x = np.asarray(batch, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ConceptLensError(f"RunningMoments({self.n_features}) needs [rows, {self.n_features}] batches; got shape {x.shape}")
        if len(x):
            mean = x.mean(axis=0)
            self._fold(len(x), mean, ((x - mean) ** 2).sum(axis=0))

    def merge(self, other):
        if other.n_features != self.n_features:
            raise ConceptLensError(f"cannot merge RunningMoments({other.n_features}) into RunningMoments({self.n_features})")
        out = RunningMoments(self.n_features)
        out.n, out.mean, out.m2 = self.n, self.mean.copy(), self.m2.copy()
        out._fold(other.n, other.mean, other.m2)
        return out

    def result(self, ddof=0):
        """:class:`Moments` (``var`` NaN where ``n <= ddof``)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            var = self.m2 / (self.n - ddof) if self.n > ddof else np.full(self.n_features, np.nan)
        return Moments(self.n, self.mean.copy(), var)

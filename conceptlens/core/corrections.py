"""Multiple-testing corrections shared by every analyzer that reports a family of tests (TCAV, probes)."""

from __future__ import annotations

import numpy as np
import scipy.stats

from ..errors import ConceptLensError

__all__ = ["CORRECTIONS", "holm", "benjamini_hochberg", "adjust_pvalues"]

CORRECTIONS = ("holm", "bh", "none")


def holm(p):
    """Holm–Bonferroni step-down adjusted p-values (controls the family-wise error rate).

    ``p_adj[(i)] = max_{j <= i} min(1, (m - j + 1) p_(j))`` over the sorted p-values ``p_(1) <= ...``.
    NaN entries are left out of the family and stay NaN.
    """
    p = np.asarray(p, float)
    out = np.full_like(p, np.nan)
    ok = ~np.isnan(p)
    q = p[ok]
    m = q.size
    if m:
        order = np.argsort(q, kind="stable")
        stepped = np.minimum(1.0, (m - np.arange(m)) * q[order])
        adj = np.empty(m)
        adj[order] = np.maximum.accumulate(stepped)
        out[ok] = adj
    return out


def benjamini_hochberg(p):
    """Benjamini–Hochberg adjusted p-values (false discovery rate), via ``scipy.stats.false_discovery_control``.

    NaN entries are left out of the family and stay NaN.
    """
    p = np.asarray(p, float)
    out = np.full_like(p, np.nan)
    ok = ~np.isnan(p)
    if ok.any():
        out[ok] = scipy.stats.false_discovery_control(p[ok], method="bh")
    return out


def adjust_pvalues(p, correction="holm"):
    """Adjust a whole experiment's p-values: ``holm`` (default), ``bh`` or ``none``."""
    if correction == "holm":
        return holm(p)
    if correction == "bh":
        return benjamini_hochberg(p)
    if correction == "none":
        return np.asarray(p, float).copy()
    raise ConceptLensError(f"correction must be one of {', '.join(CORRECTIONS)}; got {correction!r}")

"""Statistics for TCAV: two-sample tests, multiple-testing corrections, bootstrap CIs, CAV stability.

Every function works on many tests at once (rows of a 2-D array) so one call covers a whole
experiment; the random choices (permutations, bootstrap resamples) take a seed.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import scipy.stats

from ..errors import ConceptLensError

__all__ = ["two_sample_pvalues", "holm", "benjamini_hochberg", "adjust_pvalues", "bootstrap_ci", "mean_pairwise_cosine"]

logger = logging.getLogger(__name__)

TESTS = ("welch", "permutation")
CORRECTIONS = ("holm", "bh", "none")


def two_sample_pvalues(a, b, test="welch", n_permutations=9999, seed=0):
    """Two-sided p-values comparing row ``i`` of ``a`` with row ``i`` of ``b``.

    Parameters
    ----------
    a, b : array_like, shape (n_tests, n_a) and (n_tests, n_b)
        The concept's per-run scores and the null (random-vs-random) per-run scores.
    test : {"welch", "permutation"}
        ``welch``: Welch's unequal-variance t-test (``scipy.stats.ttest_ind(equal_var=False)``).
        ``permutation``: the same statistic with its null distribution from random relabellings
        of the pooled runs (``scipy.stats.PermutationMethod``, seeded).
    n_permutations : int
        Resamples for the permutation test.
    seed : int

    Returns
    -------
    ndarray, shape (n_tests,)
        Two-sided p-values. A test whose samples are all equal (zero variance, equal means) gets
        p = 1: there is no evidence of a difference.
    """
    a, b = np.atleast_2d(np.asarray(a, float)), np.atleast_2d(np.asarray(b, float))
    if test not in TESTS:
        raise ConceptLensError(f"test must be one of {', '.join(TESTS)}; got {test!r}")
    if a.shape[1] < 2 or b.shape[1] < 2:
        raise ConceptLensError(f"a two-sample test needs at least 2 runs per sample; got {a.shape[1]} and {b.shape[1]}")
    method = None
    if test == "permutation":
        method = scipy.stats.PermutationMethod(n_resamples=int(n_permutations), rng=np.random.default_rng(seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # zero-variance rows: handled below
        p = scipy.stats.ttest_ind(a, b, axis=1, equal_var=False, method=method).pvalue
    p = np.asarray(p, float)
    same = np.isnan(p) & np.isclose(a.mean(1), b.mean(1))
    p[same] = 1.0
    p[np.isnan(p)] = 0.0  # zero variance in both samples but different means
    return p


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


def bootstrap_ci(samples, confidence=0.95, n_resamples=2000, seed=0):
    """Percentile bootstrap CI of the mean of each row (``scipy.stats.bootstrap``, seeded).

    Parameters
    ----------
    samples : array_like, shape (n_tests, n_runs)
    confidence : float
    n_resamples : int
    seed : int

    Returns
    -------
    low, high : ndarray, shape (n_tests,)
    """
    x = np.atleast_2d(np.asarray(samples, float))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant rows give a degenerate (zero-width) interval
        res = scipy.stats.bootstrap(
            (x,), np.mean, axis=1, vectorized=True, n_resamples=int(n_resamples), confidence_level=confidence,
            method="percentile", rng=np.random.default_rng(seed),
        )
    low, high = np.asarray(res.confidence_interval.low, float), np.asarray(res.confidence_interval.high, float)
    const = np.ptp(x, axis=1) == 0
    low[const] = high[const] = x[const, 0]
    return low, high


def mean_pairwise_cosine(vectors):
    """Mean cosine similarity over all pairs of rows (CAV stability across runs).

    Parameters
    ----------
    vectors : array_like, shape (..., n_runs, dim)

    Returns
    -------
    ndarray, shape (...)
        ``(|sum u_i|^2 - n) / (n (n - 1))`` with ``u_i`` the unit-normalised rows: the mean of the
        off-diagonal cosine matrix without forming it.
    """
    v = np.asarray(vectors, float)
    n = v.shape[-2]
    if n < 2:
        return np.full(v.shape[:-2], np.nan)
    u = v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
    total = u.sum(axis=-2)
    return ((total * total).sum(-1) - n) / (n * (n - 1))

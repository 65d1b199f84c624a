"""Statistics for TCAV: two-sample tests, multiple-testing corrections, bootstrap CIs, CAV stability.

Every function works on many tests at once (rows of a 2-D array) so one call covers a whole
experiment; the random choices (permutations, bootstrap resamples) take a seed.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import scipy.stats

from ..core.corrections import CORRECTIONS, adjust_pvalues, benjamini_hochberg, holm
from ..errors import ConceptLensError

__all__ = ["two_sample_pvalues", "equivalence_test", "format_p", "CORRECTIONS", "holm", "benjamini_hochberg", "adjust_pvalues", "bootstrap_ci",
           "mean_pairwise_cosine"]

logger = logging.getLogger(__name__)

TESTS = ("mannwhitney", "welch", "permutation")


def two_sample_pvalues(a, b, test="mannwhitney", n_permutations=9999, seed=0):
    """Two-sided p-values comparing row ``i`` of ``a`` with row ``i`` of ``b``.

    Parameters
    ----------
    a, b : array_like, shape (n_tests, n_a) and (n_tests, n_b)
        The concept's per-run scores and the null (random-vs-random) per-run scores.
    test : {"mannwhitney", "welch", "permutation"}
        ``mannwhitney``: the rank-sum test (``scipy.stats.mannwhitneyu``, normal approximation with
        the tie correction). Per-run TCAV scores of random directions pile up near 0 and 1; a rank
        test keeps its size there, and with many more null runs than concept runs its p-value
        measures how extreme the concept's runs are within the null's distribution.
        ``welch``: Welch's unequal-variance t-test (``scipy.stats.ttest_ind(equal_var=False)``);
        with a concept whose runs agree, its variance estimate is near zero and the p-value far
        smaller than the null's bimodal distribution supports.
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
    if test == "mannwhitney":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-tied rows: handled below
            p = np.asarray(scipy.stats.mannwhitneyu(a, b, axis=1, alternative="two-sided", method="asymptotic").pvalue, float)
        p[np.isnan(p)] = 1.0  # every run tied: no evidence of a difference
        return p
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


def format_p(p):
    """A p-value as every table, verdict and report prints it: 3 significant digits, or ``1.2e-05``."""
    return "nan" if not np.isfinite(p) else (f"{p:.3g}" if p >= 1e-4 else f"{p:.1e}")


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


def equivalence_test(a, b, margin, alpha=0.05):
    """TOST: is the mean of row ``i`` of ``a`` within ``±margin`` of the mean of row ``i`` of ``b``?

    Two one-sided Welch t-tests (Schuirmann's TOST) of ``H0: |mean(a) - mean(b)| >= margin``.

    Parameters
    ----------
    a, b : array_like, shape (n_tests, n_a) and (n_tests, n_b)
    margin : float
        The equivalence margin (> 0), in the samples' units.
    alpha : float
        Level of the test; the returned interval is the matching ``1 - 2 alpha`` CI of the difference.

    Returns
    -------
    p, low, high : ndarray, shape (n_tests,)
        The TOST p-value (the larger of the two one-sided ones: equivalence is shown when ``p <
        alpha``, which is when ``[low, high]`` lies inside ``(-margin, margin)``) and the CI bounds.
    """
    a, b = np.atleast_2d(np.asarray(a, float)), np.atleast_2d(np.asarray(b, float))
    if not margin > 0:
        raise ConceptLensError(f"the equivalence margin must be positive; got {margin!r}")
    na, nb = a.shape[1], b.shape[1]
    if na < 2 or nb < 2:
        raise ConceptLensError(f"an equivalence test needs at least 2 runs per sample; got {na} and {nb}")
    d = a.mean(1) - b.mean(1)
    va, vb = a.var(1, ddof=1) / na, b.var(1, ddof=1) / nb
    se = np.sqrt(va + vb)
    with np.errstate(divide="ignore", invalid="ignore"):
        df = (va + vb) ** 2 / (va**2 / (na - 1) + vb**2 / (nb - 1))
        df = np.where(np.isfinite(df), df, na + nb - 2)
        p_low = scipy.stats.t.sf((d + margin) / se, df)  # H0: d <= -margin
        p_high = scipy.stats.t.cdf((d - margin) / se, df)  # H0: d >= +margin
        half = scipy.stats.t.ppf(1 - alpha, df) * se
    p = np.maximum(p_low, p_high)
    exact = se == 0  # both samples constant: the difference is known exactly
    p[exact] = np.where(np.abs(d[exact]) < margin, 0.0, 1.0)
    half[exact] = 0.0
    return p, d - half, d + half

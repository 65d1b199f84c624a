"""Statistics for shortcut review: does the model's accuracy depend on an attribute (site, scanner,
stain, a watermark tag) within classes, and do clusters of its representation follow one?

* :func:`accuracy_by_group` - accuracy per (class, attribute value) cell with Wilson score
  intervals (:func:`wilson_interval`), which keep their coverage for small cells and accuracies
  near 0 or 1, where the normal interval collapses; :func:`newcombe_interval` for the
  difference of two cells (is a gap shown to lie within a margin?).
* :func:`group_gap_test` - a stratified chi-square test of independence of correctness and the
  attribute within each class: the Pearson statistics of the per-class (attribute value ×
  correct) tables are summed, as are their degrees of freedom (independent strata, each χ² under
  the null). Unlike the Cochran-Mantel-Haenszel test, which pools one direction of effect over
  strata, the sum detects effects of opposite sign in different classes - the signature of a
  shortcut (the tag makes tagged images of its class right and tagged images of the other class
  wrong) - and it covers attributes with more than two values. It is the large-sample test:
  with many cells of expected count below 5 its p-value is approximate.
* :func:`cluster_alignment` - ARI and NMI between a clustering and an attribute, each with a
  permutation p-value ``(1 + #{null >= observed}) / (1 + n_permutations)``. The null permutes the
  attribute, which keeps both marginals, so only the contingency table changes: the permutations
  are scored in batches from one ``bincount`` per batch, with no per-permutation sklearn call.

For a family of such tests, adjust the p-values with :func:`conceptlens.core.corrections.holm`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.stats
from scipy.special import xlogy

from ..errors import ConceptLensError
from ._common import check_column, check_count, check_filled, check_fraction, check_frame

__all__ = ["wilson_interval", "newcombe_interval", "accuracy_by_group", "group_gap_test", "cluster_alignment"]


def wilson_interval(successes, n, confidence=0.95):
    """Wilson score interval for binomial proportions (vectorised).

    Parameters
    ----------
    successes, n : array_like of int
        Successes and trials per cell (``n > 0``).
    confidence : float

    Returns
    -------
    low, high : ndarray
        ``(p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)`` with ``p = successes / n``.
    """
    confidence = check_fraction(confidence, "confidence")
    k, n = np.asarray(successes, dtype=float), np.asarray(n, dtype=float)
    if (n <= 0).any() or (k < 0).any() or (k > n).any():
        raise ConceptLensError("wilson_interval needs 0 <= successes <= n and n > 0 in every cell")
    z = scipy.stats.norm.ppf(0.5 + confidence / 2)
    p = k / n
    centre = (p + z ** 2 / (2 * n)) / (1 + z ** 2 / n)
    half = z / (1 + z ** 2 / n) * np.sqrt(p * (1 - p) / n + z ** 2 / (4 * n ** 2))
    return np.clip(centre - half, 0.0, 1.0), np.clip(centre + half, 0.0, 1.0)


def newcombe_interval(x1, n1, x2, n2, confidence=0.95):
    """Difference ``x1/n1 - x2/n2`` of two independent proportions with Newcombe's hybrid score interval.

    Newcombe (1998), "Interval estimation for the difference between independent proportions",
    Statistics in Medicine 17:873-890, method 10: from the Wilson intervals ``(l1, u1)`` and
    ``(l2, u2)``, ``D - sqrt((p1 - l1)² + (u2 - p2)²)`` to ``D + sqrt((u1 - p1)² + (p2 - l2)²)``;
    it stays inside [-1, 1] and keeps its coverage at accuracies of 0 and 1.

    Parameters
    ----------
    x1, n1, x2, n2 : array_like
        Successes and trials of each proportion (broadcast together); NaN where an ``n`` is 0.
    confidence : float

    Returns
    -------
    delta, low, high : ndarray
    """
    x1, n1, x2, n2 = np.broadcast_arrays(*(np.asarray(v, dtype=float) for v in (x1, n1, x2, n2)))
    ok = (n1 > 0) & (n2 > 0)
    delta, low, high = (np.full(x1.shape, np.nan) for _ in range(3))
    p1, p2 = x1[ok] / n1[ok], x2[ok] / n2[ok]
    (l1, u1), (l2, u2) = wilson_interval(x1[ok], n1[ok], confidence), wilson_interval(x2[ok], n2[ok], confidence)
    delta[ok] = p1 - p2
    low[ok] = delta[ok] - np.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    high[ok] = delta[ok] + np.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return delta, low, high


def _correct(frame, correct):
    check_column(frame, correct, "correct")
    values = frame[correct]
    if values.dtype != bool:
        ok = values.isin([0, 1]).to_numpy()
        if not ok.all():
            raise ConceptLensError(f"column {correct!r} must hold True/False or 1/0 (is the prediction right?); "
                                   f"{int((~ok).sum())} row(s) hold something else, e.g. {values[~ok].iloc[0]!r}")
    return values.to_numpy().astype(bool)


def accuracy_by_group(frame, by, correct="correct", confidence=0.95):
    """Accuracy per cell of ``by`` (e.g. (class, attribute value)) with Wilson score intervals.

    Parameters
    ----------
    frame : DataFrame
        One row per example, with its correctness.
    by : str or sequence of str
        The grouping columns, e.g. ``("label", "site")``; every row needs a value in each.
    correct : str
        Column holding whether the prediction is right (bool or 0/1).
    confidence : float
        Of the intervals.

    Returns
    -------
    DataFrame
        The ``by`` columns, then ``n, correct`` (right predictions), ``accuracy, ci_low,
        ci_high``; one row per non-empty cell, sorted by the ``by`` columns.
    """
    check_frame(frame)
    by = [by] if isinstance(by, str) else list(by)
    if not by:
        raise ConceptLensError("the by parameter of accuracy_by_group must name at least one column, e.g. ('label', 'site')")
    for name in by:
        check_column(frame, name, "by")
        check_filled(frame, name)
    ok = _correct(frame, correct)
    table = (pd.DataFrame({**{name: frame[name].to_numpy() for name in by}, "_ok": ok})
             .groupby(by, sort=True, observed=True)["_ok"].agg(n="size", correct="sum").reset_index())
    table["accuracy"] = table["correct"] / table["n"]
    table["ci_low"], table["ci_high"] = wilson_interval(table["correct"], table["n"], confidence)
    return table


def _stratified_permutation_p(strata, values, outcome, expected, statistic, n_permutations, seed, batch=256):
    """P-value of the summed chi-square by permuting ``outcome`` within each stratum (margins fixed):
    exact in expectation where the chi-square approximation fails, i.e. cells of a few images."""
    rng = np.random.default_rng(seed)
    n = len(outcome)
    n_l, n_a = expected.shape[:2]
    cell = strata * n_a + values
    by_stratum = np.argsort(strata, kind="stable")  # positions grouped by stratum, in stratum order
    e1 = expected[:, :, 1].ravel()
    e0 = expected[:, :, 0].ravel()
    n_cell = np.bincount(cell, minlength=n_l * n_a)
    hits = 0
    for start in range(0, n_permutations, batch):
        b = min(batch, n_permutations - start)
        # argsort(stratum + U[0, 1)) is a uniform shuffle inside each stratum block.
        order = np.argsort(strata[None, :] + rng.random((b, n)), axis=1)
        shuffled = np.empty((b, n))
        shuffled[:, by_stratum] = outcome[order]
        o1 = np.bincount((np.arange(b)[:, None] * (n_l * n_a) + cell[None, :]).ravel(), weights=shuffled.ravel(),
                         minlength=b * n_l * n_a).reshape(b, -1)
        o0 = n_cell[None, :] - o1
        with np.errstate(invalid="ignore", divide="ignore"):
            stat = (np.where(e1 > 0, (o1 - e1) ** 2 / e1, 0.0) + np.where(e0 > 0, (o0 - e0) ** 2 / e0, 0.0)).sum(axis=1)
        hits += int((stat >= statistic - 1e-9).sum())
    return (1 + hits) / (1 + n_permutations)


def group_gap_test(frame, attr, label="label", correct="correct", n_permutations=9999, seed=0):
    """Does accuracy depend on ``attr`` within classes? A stratified chi-square test (module notes).

    Parameters
    ----------
    frame : DataFrame
        One row per example, with its correctness.
    attr : str
        The attribute column; every row needs a value.
    label : str
        The class column (the strata).
    correct : str
        Column holding whether the prediction is right (bool or 0/1).
    n_permutations : int
        Permutations of correctness within each class for the p-value (0: the chi-square
        distribution, which overstates significance when cells hold a few images).
    seed : int
        Seeds the permutations.

    Returns
    -------
    dict
        ``statistic`` (sum over classes of the Pearson chi-square of the (value × correct)
        table), ``dof`` (summed ``(values - 1)(outcomes - 1)`` per class, counting only the values
        and outcomes present in it: a class the model gets all right adds none), ``p_value``
        (permutation, ``(1 + #{null >= observed}) / (1 + n_permutations)``; with 0 permutations
        ``chi2.sf``; 1 when ``dof`` is 0), ``p_chi2`` (``chi2.sf`` always), ``gap`` (the largest within-class accuracy gap, max -
        min over the values of a class; NaN when no class has two values), ``gap_class``,
        ``best_value``, ``best_accuracy``, ``worst_value``, ``worst_accuracy`` (that class and its
        best and worst values), ``method``.
    """
    if not isinstance(attr, str) or not isinstance(label, str):
        raise ConceptLensError(f"group_gap_test takes one attribute column and one label column; got attr={attr!r}, "
                               f"label={label!r}")
    table = accuracy_by_group(frame, by=(label, attr), correct=correct)
    l_codes, l_values = pd.factorize(table[label], sort=True)
    a_codes, a_values = pd.factorize(table[attr], sort=True)
    # observed[class, value, outcome] from the cells, in one pass.
    observed = np.zeros((len(l_values), len(a_values), 2))
    observed[l_codes, a_codes, 0] = table["n"] - table["correct"]
    observed[l_codes, a_codes, 1] = table["correct"]
    rows, cols = observed.sum(axis=2, keepdims=True), observed.sum(axis=1, keepdims=True)
    expected = rows * cols / np.maximum(rows.sum(axis=1, keepdims=True), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        statistic = float(np.where(expected > 0, (observed - expected) ** 2 / expected, 0.0).sum())
    dof = int((((rows[:, :, 0] > 0).sum(axis=1) - 1).clip(0) * ((cols[:, 0, :] > 0).sum(axis=1) - 1).clip(0)).sum())
    p_chi2 = float(scipy.stats.chi2.sf(statistic, dof)) if dof > 0 else 1.0
    p_value = p_chi2
    if n_permutations and dof > 0:
        rows_l = pd.Index(l_values).get_indexer(frame[label])
        rows_a = pd.Index(a_values).get_indexer(frame[attr])
        p_value = _stratified_permutation_p(rows_l, rows_a, _correct(frame, correct).astype(float), expected, statistic,
                                            int(n_permutations), seed)
    test = (f"{int(n_permutations)} permutations of correctness within classes" if n_permutations and dof > 0
            else "chi-square distribution")
    out = {"statistic": statistic, "dof": dof, "p_value": p_value, "p_chi2": p_chi2, "gap": np.nan, "gap_class": None, "best_value": None, "best_accuracy": np.nan, "worst_value": None,
           "worst_accuracy": np.nan,
           "method": f"sum over {label!r} classes of Pearson chi-square ({attr!r} value x correct); p from {test}"}
    cells = table.assign(_l=l_codes)
    spread = cells.groupby("_l")["accuracy"].agg(["max", "min", "size"])
    spread = spread[spread["size"] > 1]
    if len(spread):
        cls = int((spread["max"] - spread["min"]).idxmax())
        ranked = cells[cells["_l"] == cls].sort_values("accuracy", kind="stable")
        best, worst = ranked.iloc[-1], ranked.iloc[0]
        out.update(gap=float(best["accuracy"] - worst["accuracy"]), gap_class=l_values[cls], best_value=best[attr],
                   best_accuracy=float(best["accuracy"]), worst_value=worst[attr], worst_accuracy=float(worst["accuracy"]))
    return out


def _contingency_scores(a, b_perm, n_a, n_b):
    """ARI and NMI of clustering ``a`` [N] against each row of ``b_perm`` [B, N] (same marginals)."""
    n = a.shape[0]
    batch = len(b_perm)
    idx = (np.arange(batch)[:, None] * (n_a * n_b) + a[None, :] * n_b + b_perm).ravel()
    table = np.bincount(idx, minlength=batch * n_a * n_b).reshape(batch, n_a, n_b).astype(float)
    rows, cols = np.bincount(a, minlength=n_a).astype(float), np.bincount(b_perm[0], minlength=n_b).astype(float)
    # ARI: only the sum of C(n_ij, 2) depends on the permutation.
    pairs = (table * (table - 1) / 2).sum(axis=(1, 2))
    sum_a, sum_b, total = (rows * (rows - 1) / 2).sum(), (cols * (cols - 1) / 2).sum(), n * (n - 1) / 2
    expected = sum_a * sum_b / total
    denom = (sum_a + sum_b) / 2 - expected
    ari = (pairs - expected) / denom if denom != 0 else np.ones(batch)
    # NMI (arithmetic): MI over the mean of the two entropies, which are fixed.
    mi = (xlogy(table, table) / n).sum(axis=(1, 2)) + np.log(n) - (xlogy(rows, rows).sum() + xlogy(cols, cols).sum()) / n
    h_a, h_b = -(xlogy(rows / n, rows / n)).sum(), -(xlogy(cols / n, cols / n)).sum()
    mean_h = (h_a + h_b) / 2
    nmi = np.maximum(mi, 0.0) / mean_h if mean_h > 0 else np.ones(batch)
    return ari, nmi


def cluster_alignment(clusters, attribute, n_permutations=999, seed=0, batch=None):
    """ARI and NMI between a clustering and an attribute, with permutation p-values.

    Parameters
    ----------
    clusters : array [N]
        Cluster of each example (e.g. SpRAy or k-means labels).
    attribute : array [N]
        The attribute (site, scanner, tag); no missing values.
    n_permutations : int
        Permutations of the attribute for the null (>= 1); the smallest p-value is ``1 / (n + 1)``.
    seed : int
        Seeds the permutations.
    batch : int, optional
        Permutations scored per ``bincount`` (default: about 4·10⁶ contingency entries per batch).

    Returns
    -------
    dict
        ``ari`` and ``nmi`` (``sklearn.metrics``; NMI with the arithmetic mean of the entropies),
        ``p_ari`` and ``p_nmi`` (permutation p-values), ``null_ari_mean`` and ``null_nmi_mean``
        (the null's means, the chance level), ``n_permutations``.
    """
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    clusters, attribute = np.asarray(clusters), np.asarray(attribute)
    if clusters.ndim != 1 or clusters.shape != attribute.shape or len(clusters) < 2:
        raise ConceptLensError(f"clusters and attribute must be 1-D arrays of one length >= 2; got shapes {clusters.shape} "
                               f"and {attribute.shape}")
    for name, values in (("clusters", clusters), ("attribute", attribute)):
        if pd.isna(pd.Series(values)).any():
            raise ConceptLensError(f"{name} has missing values; give every example one or drop those examples first")
    n_permutations, seed = check_count(n_permutations, "n_permutations"), check_count(seed, "seed", low=0)
    a, a_values = pd.factorize(clusters, sort=True)
    b, b_values = pd.factorize(attribute, sort=True)
    ari, nmi = float(adjusted_rand_score(attribute, clusters)), float(normalized_mutual_info_score(attribute, clusters))
    n_a, n_b = len(a_values), len(b_values)
    batch = check_count(batch, "batch") if batch is not None else max(1, min(n_permutations, 4_000_000 // max(len(a), n_a * n_b)))
    rng = np.random.default_rng(seed)
    null_ari, null_nmi = [], []
    for start in range(0, n_permutations, batch):  # batches of permutations, each one vectorised pass
        size = min(batch, n_permutations - start)
        perms = rng.permuted(np.broadcast_to(b, (size, len(b))), axis=1)
        batch_ari, batch_nmi = _contingency_scores(a, perms, n_a, n_b)
        null_ari.append(batch_ari)
        null_nmi.append(batch_nmi)
    null_ari, null_nmi = np.concatenate(null_ari), np.concatenate(null_nmi)
    # A null value within rounding of the observed one counts as reaching it.
    p_ari = (1 + np.sum(null_ari >= ari - 1e-12)) / (1 + n_permutations)
    p_nmi = (1 + np.sum(null_nmi >= nmi - 1e-12)) / (1 + n_permutations)
    return {"ari": ari, "p_ari": float(p_ari), "nmi": nmi, "p_nmi": float(p_nmi), "null_ari_mean": float(null_ari.mean()),
            "null_nmi_mean": float(null_nmi.mean()), "n_permutations": n_permutations}

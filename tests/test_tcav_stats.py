"""TCAV statistics and CAV fitting against brute-force definitions and scipy/sklearn references."""


import numpy as np
import pytest
import scipy.stats

from conceptlens.concepts import benjamini_hochberg, bootstrap_ci, fit_cavs, holm, mean_pairwise_cosine, two_sample_pvalues
from conceptlens.concepts.stats import equivalence_test
from conceptlens.errors import ConceptLensError


def _holm_brute(p, alpha):
    """Holm's procedure as stated: reject p_(1..k-1) where k is the first i with p_(i) > alpha / (m - i + 1)."""
    order = np.argsort(p)
    m = len(p)
    reject = np.zeros(m, bool)
    for rank, i in enumerate(order):
        if p[i] > alpha / (m - rank):
            break
        reject[i] = True
    return reject


def _bh_brute(p, alpha):
    """BH as stated: reject the k smallest where k is the largest i with p_(i) <= i alpha / m."""
    order = np.argsort(p)
    m = len(p)
    ks = [i + 1 for i in range(m) if p[order[i]] <= (i + 1) * alpha / m]
    reject = np.zeros(m, bool)
    if ks:
        reject[order[: max(ks)]] = True
    return reject


@pytest.mark.parametrize("seed", range(5))
def test_holm_and_bh_match_their_definitions(seed):
    rng = np.random.default_rng(seed)
    p = np.concatenate([rng.uniform(size=30), rng.uniform(0, 0.01, size=10)])
    for alpha in (0.01, 0.05, 0.2):
        np.testing.assert_array_equal(holm(p) <= alpha, _holm_brute(p, alpha))
        np.testing.assert_array_equal(benjamini_hochberg(p) <= alpha, _bh_brute(p, alpha))
    q = p.copy()
    q[[3, 7]] = np.nan  # left out of the family
    assert np.isnan(holm(q)[[3, 7]]).all()
    np.testing.assert_allclose(holm(q)[~np.isnan(q)], holm(p[~np.isnan(q)]))


def test_welch_rows_equal_scipy_and_permutation_agrees():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.6, 0.1, (4, 12)), rng.normal(0.5, 0.2, (4, 12))
    p = two_sample_pvalues(a, b, test="welch")
    for i in range(4):
        assert p[i] == pytest.approx(scipy.stats.ttest_ind(a[i], b[i], equal_var=False).pvalue)
    perm = two_sample_pvalues(a, b, test="permutation", n_permutations=4000, seed=1)
    np.testing.assert_allclose(perm, p, atol=0.05)
    np.testing.assert_array_equal(perm, two_sample_pvalues(a, b, test="permutation", n_permutations=4000, seed=1))
    for test in ("welch", "mannwhitney"):
        assert two_sample_pvalues(np.full((1, 5), 0.5), np.full((1, 5), 0.5), test=test)[0] == 1.0
    with pytest.raises(ConceptLensError, match="test must be one of"):
        two_sample_pvalues(a, b, test="z")


def test_mann_whitney_rows_equal_scipy_on_tied_bimodal_scores():
    """Per-run TCAV scores of random directions pile up at 0 and 1: many ties, unequal sample sizes."""
    rng = np.random.default_rng(2)
    a = np.round(rng.choice([0.0, 0.05, 0.95, 1.0, 0.5], size=(3, 20)), 2)
    b = np.round(rng.choice([0.0, 0.05, 0.95, 1.0], size=(3, 200)), 2)
    p = two_sample_pvalues(a, b)
    for i in range(3):
        ref = scipy.stats.mannwhitneyu(a[i], b[i], alternative="two-sided", method="asymptotic").pvalue
        assert p[i] == pytest.approx(ref)


def test_tost_equals_two_one_sided_welch_tests():
    rng = np.random.default_rng(3)
    a, b = rng.normal(0.52, 0.05, (5, 30)), rng.normal(0.5, 0.1, (5, 200))
    a[4] += 0.2  # far from b: not equivalent
    p, low, high = equivalence_test(a, b, margin=0.1, alpha=0.05)
    for i in range(5):
        lower = scipy.stats.ttest_ind(a[i] + 0.1, b[i], equal_var=False, alternative="greater").pvalue
        upper = scipy.stats.ttest_ind(a[i] - 0.1, b[i], equal_var=False, alternative="less").pvalue
        assert p[i] == pytest.approx(max(lower, upper))
        # Equivalence at alpha exactly when the 90 % CI of the difference lies inside the margin.
        assert (p[i] < 0.05) == (-0.1 < low[i] and high[i] < 0.1)
    assert (p[:4] < 0.05).all() and p[4] > 0.5
    exact = equivalence_test(np.full((2, 4), 0.5), np.array([[0.45] * 4, [0.7] * 4]), margin=0.1)[0]
    np.testing.assert_array_equal(exact, [0.0, 1.0])
    with pytest.raises(ConceptLensError, match="margin must be positive"):
        equivalence_test(a, b, margin=0)


def test_bootstrap_ci_is_seeded_and_covers_the_mean():
    rng = np.random.default_rng(0)
    x = rng.normal(0.7, 0.1, (50, 10))
    low, high = bootstrap_ci(x, seed=3, n_resamples=500)
    low2, high2 = bootstrap_ci(x, seed=3, n_resamples=500)
    np.testing.assert_array_equal(low, low2)
    assert ((low <= x.mean(1)) & (x.mean(1) <= high)).all()
    assert 0.8 < ((low <= 0.7) & (0.7 <= high)).mean() <= 1.0  # ~95 % coverage (percentile CIs run a bit narrow at n=10)


def test_mean_pairwise_cosine_equals_the_cosine_matrix():
    v = np.random.default_rng(0).normal(size=(3, 6, 20))
    u = v / np.linalg.norm(v, axis=-1, keepdims=True)
    for k in range(3):
        cos = u[k] @ u[k].T
        assert mean_pairwise_cosine(v)[k] == pytest.approx(cos[~np.eye(6, dtype=bool)].mean())


def test_mean_diff_cav_is_the_normalised_mean_difference_and_sgd_points_to_the_concept():
    rng = np.random.default_rng(0)
    direction = np.zeros(30)
    direction[4] = 3.0
    x = np.concatenate([rng.normal(size=(40, 30)) + direction, rng.normal(size=(40, 30))])
    pos, neg = [np.arange(40)], [np.arange(40, 80)]
    for method in ("sgd", "logistic", "mean-diff"):
        c = fit_cavs(x, pos, neg, method=method, seed=0)
        assert np.linalg.norm(c.vectors[0]) == pytest.approx(1.0, abs=1e-5)
        assert c.accuracy[0] >= 0.85 and c.vectors[0, 4] > 0.5, method
    # Rows repeated within each set: the mean difference is the same whatever the held-out split.
    xp, xn = rng.normal(size=30), rng.normal(size=30)
    y = np.concatenate([np.tile(xp, (8, 1)), np.tile(xn, (8, 1))])
    md = fit_cavs(y, [np.arange(8), np.arange(8)], [np.arange(8, 16)] * 2, method="mean-diff", seed=0)
    ref = (xp - xn) / np.linalg.norm(xp - xn)
    np.testing.assert_allclose(md.vectors, np.stack([ref, ref]), atol=1e-5)
    np.testing.assert_array_equal(md.accuracy, [1.0, 1.0])
    # The CAV is fitted on all its examples (the folds only measure accuracy).
    z = rng.normal(size=(10, 30))
    one = fit_cavs(z, [np.arange(2)], [np.arange(2, 4)], method="mean-diff", seed=0)
    ref = z[:2].mean(0) - z[2:4].mean(0)
    np.testing.assert_allclose(one.vectors[0], ref / np.linalg.norm(ref), atol=1e-5)
    assert one.accuracy[0] in (0.0, 0.25, 0.5, 0.75, 1.0)  # 2 folds x (1 concept + 1 random) held out
    with pytest.raises(ConceptLensError, match="at least 2 concept"):
        fit_cavs(x, [np.arange(1)], neg)
    with pytest.raises(ConceptLensError, match="CAV method"):
        fit_cavs(x, pos, neg, method="svm")

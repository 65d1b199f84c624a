"""Concept activation vectors: linear directions separating concept from random activations.

A CAV is the unit normal of a linear classifier trained on a layer's activations (flattened
spatial maps, or pooled channels) of concept examples (label 1) against random counter-examples
(label 0); it points towards the concept. Its accuracy is cross-fitted: each example is predicted
by a classifier trained without it (stratified, seeded folds), and the CAV itself is fitted on all
examples. With the few examples per CAV of a well-powered TCAV (2 concept against 2 random), a
held-out split would leave one training example a side and halve the CAV's signal.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np

from ..errors import ConceptLensError

__all__ = ["CAVs", "fit_cavs", "CAV_METHODS"]

logger = logging.getLogger(__name__)

CAV_METHODS = ("sgd", "logistic", "mean-diff")


@dataclass(frozen=True)
class CAVs:
    """A batch of CAVs for one layer.

    Attributes
    ----------
    vectors : ndarray, shape (n_cavs, dim)
        Unit-norm directions, pointing from the random towards the concept examples.
    accuracy : ndarray, shape (n_cavs,)
        Held-out accuracy of each classifier on its seeded test split.
    method : str
        How they were fitted (e.g. ``sgd(hinge, alpha=0.01)``).
    """

    vectors: np.ndarray
    accuracy: np.ndarray
    method: str


def _fold_ids(n, k, rng):
    """Seeded balanced fold labels ``0..k-1`` for ``n`` examples."""
    return rng.permutation(np.arange(n) % k)


def _method_string(method, alpha):
    return {"sgd": f"sgd(hinge, alpha={alpha})", "logistic": f"logistic(l2, C={1 / alpha:g})", "mean-diff": "mean-diff"}[method]


def fit_cavs(activations, positives, negatives, method="sgd", cv_folds=4, alpha=0.01, seed=0):
    """Fit one CAV per ``(positives[i], negatives[i])`` pair of example sets.

    Parameters
    ----------
    activations : ndarray, shape (n_images, dim)
        One layer's activations of every image the sets index into.
    positives, negatives : sequence of int arrays
        Row indices into ``activations`` of each CAV's concept and random examples.
    method : {"sgd", "logistic", "mean-diff"}
        ``sgd``: linear SVM by SGD on the hinge loss (the TCAV paper; ``sklearn.linear_model.SGDClassifier``).
        ``logistic``: L2 logistic regression (``sklearn.linear_model.LogisticRegression``, C = 1/alpha).
        ``mean-diff``: difference of the class means (FastCAV-style), all CAVs in one batched step;
        its classifier thresholds the projection half-way between the projected means.
    cv_folds : int
        Folds of the cross-fitted accuracy (stratified: each fold holds out concept and random
        examples), at most the smaller set's size.
    alpha : float
        Regularisation strength of ``sgd`` and ``logistic``.
    seed : int

    Returns
    -------
    CAVs
        ``accuracy`` is the share of the CAV's examples that the classifier fitted on the other
        folds predicts correctly.
    """
    if method not in CAV_METHODS:
        raise ConceptLensError(f"the CAV method must be one of {', '.join(CAV_METHODS)}; got {method!r}")
    if not (isinstance(cv_folds, (int, np.integer)) and cv_folds >= 2):
        raise ConceptLensError(f"cv_folds must be an integer >= 2; got {cv_folds!r}")
    x = np.asarray(activations, dtype=np.float32)
    rng = np.random.default_rng(seed)
    positives = [np.asarray(p, dtype=np.int64) for p in positives]
    negatives = [np.asarray(n, dtype=np.int64) for n in negatives]
    for pos, neg in zip(positives, negatives):
        if len(pos) < 2 or len(neg) < 2:
            raise ConceptLensError(
                f"a CAV needs at least 2 concept and 2 random examples (one held out each); got {len(pos)} and {len(neg)}"
            )
    fit = _mean_diff if method == "mean-diff" else (lambda x, p, n: _sklearn(x, p, n, method, alpha, rng))
    weights, _ = fit(x, positives, negatives)
    correct, total = np.zeros(len(positives)), np.zeros(len(positives))
    folds = [np.minimum(cv_folds, min(len(p), len(n))) for p, n in zip(positives, negatives)]
    ids = [(_fold_ids(len(p), k, rng), _fold_ids(len(n), k, rng)) for p, n, k in zip(positives, negatives, folds)]
    for f in range(max(folds)):
        which = [i for i, k in enumerate(folds) if k > f]
        w, b = fit(x, [positives[i][ids[i][0] != f] for i in which], [negatives[i][ids[i][1] != f] for i in which])
        held = [(positives[i][ids[i][0] == f], negatives[i][ids[i][1] == f]) for i in which]
        owner = np.concatenate([np.full(len(tp) + len(tn), j) for j, (tp, tn) in enumerate(held)])
        rows = np.concatenate([np.concatenate([tp, tn]) for tp, tn in held])
        label = np.concatenate([np.r_[np.ones(len(tp), bool), np.zeros(len(tn), bool)] for tp, tn in held])
        hit = ((np.einsum("ed,ed->e", x[rows], w[owner]) + b[owner]) > 0) == label
        correct[which] += np.bincount(owner, weights=hit, minlength=len(which))
        total[which] += np.bincount(owner, minlength=len(which))
    norms = np.linalg.norm(weights, axis=1, keepdims=True)
    degenerate = norms[:, 0] == 0
    if degenerate.any():
        logger.warning("%d CAVs are zero vectors (identical concept and random activations); their scores are 0", degenerate.sum())
    vectors = weights / np.where(norms == 0, 1.0, norms)
    return CAVs(vectors=vectors.astype(np.float32), accuracy=correct / total, method=_method_string(method, alpha))


def _set_means(x, index_sets, budget=2**26):
    """Mean row of ``x`` over each index set: segmented sums of gathered rows, ``budget`` bytes at a time."""
    sizes = np.array([len(i) for i in index_sets])
    out = np.empty((len(index_sets), x.shape[1]))
    per = max(1, int(budget // max(1, x.shape[1] * x.itemsize * sizes.max())))
    for lo in range(0, len(index_sets), per):
        chunk = sizes[lo: lo + per]
        starts = np.r_[0, np.cumsum(chunk)[:-1]]
        rows = x[np.concatenate(index_sets[lo: lo + per])].astype(np.float64)
        out[lo: lo + per] = np.add.reduceat(rows, starts, axis=0) / chunk[:, None]
    return out


def _mean_diff(x, positives, negatives):
    """``(w, b)``: ``w = mean(pos) - mean(neg)``, ``b`` puts the threshold half-way between the projected means."""
    mu_pos, mu_neg = _set_means(x, positives), _set_means(x, negatives)
    w = mu_pos - mu_neg
    return w, -0.5 * ((mu_pos + mu_neg) * w).sum(1)


def _sklearn(x, positives, negatives, method, alpha, rng):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression, SGDClassifier

    w = np.empty((len(positives), x.shape[1]), dtype=np.float64)
    b = np.empty(len(positives))
    seeds = rng.integers(0, 2**31 - 1, size=len(positives))
    for i, (p, n) in enumerate(zip(positives, negatives)):
        xtr = np.concatenate([x[p], x[n]])
        ytr = np.r_[np.ones(len(p)), np.zeros(len(n))]
        if method == "sgd":
            clf = SGDClassifier(loss="hinge", alpha=alpha, max_iter=1000, tol=1e-3, random_state=int(seeds[i]))
        else:
            clf = LogisticRegression(C=1.0 / alpha, max_iter=1000)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(xtr, ytr)
        w[i], b[i] = clf.coef_[0], clf.intercept_[0]
    return w, b

"""Concept activation vectors: linear directions separating concept from random activations.

A CAV is the unit normal of a linear classifier trained on a layer's activations (flattened
spatial maps, or pooled channels) of concept examples (label 1) against random counter-examples
(label 0); it points towards the concept. Each CAV's accuracy on a seeded held-out split is always
reported: a CAV no better than chance is not a concept.
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


def _split(n_pos, n_neg, test_fraction, rng):
    """Seeded stratified split: boolean test masks for positives and negatives (>= 1 of each side)."""
    def one(n):
        k = min(max(1, int(round(test_fraction * n))), n - 1)
        mask = np.zeros(n, bool)
        mask[rng.permutation(n)[:k]] = True
        return mask

    return one(n_pos), one(n_neg)


def _method_string(method, alpha):
    return {"sgd": f"sgd(hinge, alpha={alpha})", "logistic": f"logistic(l2, C={1 / alpha:g})", "mean-diff": "mean-diff"}[method]


def fit_cavs(activations, positives, negatives, method="sgd", test_fraction=0.25, alpha=0.01, seed=0):
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
    test_fraction : float
        Share of each set held out (seeded, stratified) to measure the CAV's accuracy; the CAV is
        fitted on the rest.
    alpha : float
        Regularisation strength of ``sgd`` and ``logistic``.
    seed : int

    Returns
    -------
    CAVs
    """
    if method not in CAV_METHODS:
        raise ConceptLensError(f"the CAV method must be one of {', '.join(CAV_METHODS)}; got {method!r}")
    if not 0 < test_fraction < 1:
        raise ConceptLensError(f"test_fraction must be between 0 and 1; got {test_fraction}")
    x = np.asarray(activations, dtype=np.float32)
    rng = np.random.default_rng(seed)
    splits = []
    for pos, neg in zip(positives, negatives):
        if len(pos) < 2 or len(neg) < 2:
            raise ConceptLensError(
                f"a CAV needs at least 2 concept and 2 random examples (one held out each); got {len(pos)} and {len(neg)}"
            )
        tp, tn = _split(len(pos), len(neg), test_fraction, rng)
        splits.append((np.asarray(pos)[~tp], np.asarray(neg)[~tn], np.asarray(pos)[tp], np.asarray(neg)[tn]))
    if method == "mean-diff":
        vectors, accuracy = _mean_diff(x, splits)
    else:
        vectors, accuracy = _sklearn(x, splits, method, alpha, rng)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    degenerate = norms[:, 0] == 0
    if degenerate.any():
        logger.warning("%d CAVs are zero vectors (identical concept and random activations); their scores are 0", degenerate.sum())
    vectors = vectors / np.where(norms == 0, 1.0, norms)
    return CAVs(vectors=vectors.astype(np.float32), accuracy=accuracy, method=_method_string(method, alpha))


def _mean_diff(x, splits):
    # Sets of equal size stack into [n_cavs, k] index arrays: one gather and mean for all CAVs.
    def means(idx_lists):
        sizes = {len(i) for i in idx_lists}
        if len(sizes) == 1:
            return x[np.stack(idx_lists)].mean(axis=1)
        return np.stack([x[i].mean(axis=0) for i in idx_lists])

    mu_pos, mu_neg = means([s[0] for s in splits]), means([s[1] for s in splits])
    vectors = mu_pos - mu_neg
    threshold = 0.5 * ((mu_pos + mu_neg) * vectors).sum(1)
    accuracy = np.empty(len(splits))
    for i, (_, _, tp, tn) in enumerate(splits):
        proj_pos, proj_neg = x[tp] @ vectors[i], x[tn] @ vectors[i]
        accuracy[i] = ((proj_pos > threshold[i]).sum() + (proj_neg <= threshold[i]).sum()) / (len(tp) + len(tn))
    return vectors, accuracy


def _sklearn(x, splits, method, alpha, rng):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression, SGDClassifier

    vectors = np.empty((len(splits), x.shape[1]), dtype=np.float64)
    accuracy = np.empty(len(splits))
    seeds = rng.integers(0, 2**31 - 1, size=len(splits))
    for i, (p, n, tp, tn) in enumerate(splits):
        xtr = np.concatenate([x[p], x[n]])
        ytr = np.r_[np.ones(len(p)), np.zeros(len(n))]
        if method == "sgd":
            clf = SGDClassifier(loss="hinge", alpha=alpha, max_iter=1000, tol=1e-3, random_state=int(seeds[i]))
        else:
            clf = LogisticRegression(C=1.0 / alpha, max_iter=1000)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(xtr, ytr)
        vectors[i] = clf.coef_[0]
        xte = np.concatenate([x[tp], x[tn]])
        yte = np.r_[np.ones(len(tp)), np.zeros(len(tn))]
        accuracy[i] = (clf.predict(xte) == yte).mean()
    return vectors, accuracy

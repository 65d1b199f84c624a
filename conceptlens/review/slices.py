"""Slice discovery: coherent groups of examples on which the model errs (Domino), and a k-means baseline.

:func:`discover_slices` follows Domino (Eyuboglu et al. 2022, "Domino: Discovering Systematic Errors
with Cross-Modal Embeddings"): an error-aware mixture model in which every component ``s`` has a
diagonal Gaussian over the PCA-reduced embedding ``z``, a categorical over the label ``y`` and a
categorical over the prediction ``ŷ``; it is fitted by EM on the weighted log-likelihood

    log Σ_s P(s) N(z | μ_s, diag σ²_s) P(y | s)^γ (Σ_c ŷ_c P(ŷ = c | s))^γ̂

(soft predictions enter as the expected categorical probability, as in Domino). Components start
from the confusion matrix - each component is assigned a (label, prediction) cell, round robin,
with a little seeded noise - so that error cells get components of their own; the ``n_slices``
components whose predictions depart most from their labels, ``|max_c (P(ŷ=c|s) - P(y=c|s))|``,
are the slices. Defaults are Domino's: 5 slices of 25 components, 128 PCA components (capped by
the data), γ = γ̂ = 1, 100 iterations, tolerance 1e-3 on the mean log-likelihood, covariance
regularisation 1e-6, confusion noise 1e-3. Domino's ``discover`` helper raises γ and γ̂ to 10,
which weighs the error structure more against the embedding; both are parameters here.

Slice membership is the posterior ``P(s | z, y, ŷ)`` of each example, the quantity the mixture
was fitted on (Domino's ``predict_proba`` scores new data from the embedding alone; here the
slices describe the data they were found on). :func:`kmeans_slices` is the baseline: k-means on
the same PCA embedding, scored by negative distance to each centre. For planted-truth evaluation,
:func:`best_slice` returns the slice whose top-scoring rows best recover a known sub-population.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.special import logsumexp

from ..core.result import Result, provenance
from ..errors import ConceptLensError
from ._common import check_count, check_nonnegative, data_hash, read_table

__all__ = ["SliceResult", "discover_slices", "kmeans_slices", "precision_at_k", "average_precision", "best_slice"]

logger = logging.getLogger(__name__)

TABLE_COLUMNS = ["slice", "component", "size", "weight", "accuracy", "error_gap", "label", "prediction", "error_score"]
INITS = ("confusion", "kmeans")


@dataclass(frozen=True)
class SliceResult(Result):
    """Slices of the data and each example's score in each.

    Attributes
    ----------
    slices : DataFrame
        One row per slice, largest error gap first: ``slice`` (0, 1, ... in this order; the
        column of :attr:`scores`), ``component`` (mixture component or k-means cluster),
        ``size`` (examples assigned to it: most probable component, or nearest centre),
        ``weight`` (summed membership; k-means: the size), ``accuracy`` (membership-weighted
        accuracy; k-means: over its examples), ``error_gap`` (overall accuracy minus the slice's:
        positive = worse than overall), ``label`` and ``prediction`` (the slice's most common
        label and predicted class), ``error_score`` (Domino's criterion,
        ``|max_c (mean prediction_c - mean label_c)|`` over the slice). The last five are empty
        for k-means slices computed without labels and predictions (then ordered by size).
    scores : ndarray [N, n_slices]
        Membership score of every example in every slice (columns in :attr:`slices` order):
        Domino, the posterior probability; k-means, the negative Euclidean distance to the centre.
    rows : DataFrame
        ``row`` per example, with ``label, prediction, correct`` when labels and predictions were
        given (prediction = most probable class).
    method : str
        ``"domino"`` or ``"kmeans"``.
    params : dict
        The parameters, the PCA dimension used, and for Domino the EM iterations, convergence and
        final mean log-likelihood.
    provenance : dict
    """

    slices: pd.DataFrame
    scores: np.ndarray = field(repr=False)
    rows: pd.DataFrame = field(repr=False)
    method: str
    params: dict = field(repr=False)
    provenance: dict = field(repr=False)

    KIND, META = "slices", "slices.json"

    def to_frame(self):
        """The per-slice table (:attr:`slices`)."""
        return self.slices

    def prototypes(self, slice, k=10):
        """Positions of the ``k`` examples scoring highest in ``slice``, best first (equal scores in
        row order): ``rows.iloc[result.prototypes(s)]`` are its prototypes."""
        n = self.scores.shape[1]
        if isinstance(slice, bool) or not isinstance(slice, (int, np.integer)) or not 0 <= slice < n:
            raise ConceptLensError(f"slice must be an integer in 0..{n - 1} (the slices table's slice column); got {slice!r}")
        return np.argsort(-self.scores[:, slice], kind="stable")[:check_count(k, "k")]

    def _write(self, directory):
        """``slices.csv``, ``rows.csv``, ``scores.npy``; ``slices.json``."""
        self.slices.to_csv(directory / "slices.csv", index=False)
        self.rows.to_csv(directory / "rows.csv", index=False)
        np.save(directory / "scores.npy", self.scores, allow_pickle=False)
        return {"method": self.method, "params": self.params}

    @classmethod
    def _read(cls, directory, meta):
        """Labels and predictions come back as text."""
        rows = read_table(directory / "rows.csv", ("label", "prediction"))
        if "correct" in rows:
            rows["correct"] = rows["correct"].astype(str).str.lower() == "true"
        return cls(slices=read_table(directory / "slices.csv", ("label", "prediction")),
                   scores=np.load(directory / "scores.npy", allow_pickle=False), rows=rows,
                   method=meta["method"], params=meta["params"], provenance=meta["provenance"])


def _embedding(embedding):
    x = np.asarray(embedding, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2 or not np.isfinite(x).all():
        raise ConceptLensError(f"embedding must be a finite [N, D] array with N >= 2; got shape {x.shape}"
                               f"{'' if np.isfinite(x).all() else ' with NaN or inf values'}")
    return x


def _inputs(embedding, labels, pred_probs, classes):
    """Validated ``(X [N, D] float64, y codes [N], P [N, C], classes [C])``."""
    x = _embedding(embedding)
    p = np.asarray(pred_probs, dtype=np.float64)
    if p.ndim == 1:  # binary: the probability of class 1, as Domino takes it
        p = np.stack([1 - p, p], axis=1)
    if p.ndim != 2 or len(p) != len(x):
        raise ConceptLensError(f"pred_probs must be [N, C] probabilities (or [N] for a binary model) for the N={len(x)} "
                               f"rows of embedding; got shape {np.shape(pred_probs)}")
    if not np.isfinite(p).all() or (p < 0).any() or not np.allclose(p.sum(axis=1), 1.0, atol=1e-3):
        raise ConceptLensError("pred_probs must hold probabilities: values in [0, 1] with rows summing to 1 (logits? "
                               "apply a softmax first)")
    labels = np.asarray(labels)
    if labels.shape != (len(x),):
        raise ConceptLensError(f"labels must hold one label per row of embedding ({len(x)}); got shape {labels.shape}")
    n_c = p.shape[1]
    if classes is None:
        if labels.dtype.kind in "iu":
            classes = np.arange(n_c)
        else:
            classes = np.unique(labels)
            if len(classes) != n_c:
                raise ConceptLensError(f"labels hold {len(classes)} distinct values but pred_probs has {n_c} columns; pass "
                                       "classes= (the class of each pred_probs column, in order)")
    classes = np.asarray(classes)
    if len(classes) != n_c or len(np.unique(classes)) != n_c:
        raise ConceptLensError(f"classes must name the {n_c} pred_probs columns once each; got {len(classes)} name(s)")
    codes = pd.Index(classes).get_indexer(labels)
    if (codes < 0).any():
        bad = labels[codes < 0][0]
        raise ConceptLensError(f"label {bad!r} ({int((codes < 0).sum())} row(s)) is not one of the classes "
                               f"({', '.join(map(str, classes[:10]))}{', ...' if n_c > 10 else ''})")
    return x, codes, p, classes


def _pca(x, n_components, seed):
    """The embedding reduced to ``n_components`` principal components (capped by the data)."""
    from sklearn.decomposition import PCA

    if n_components is None:
        return x, x.shape[1]
    n = min(check_count(n_components, "n_pca_components"), x.shape[0], x.shape[1])
    if n < n_components:
        logger.info("n_pca_components=%d capped at %d by the data (%d rows x %d features)", n_components, n, *x.shape)
    return PCA(n_components=n, random_state=seed).fit_transform(x), n


def _diag_log_gaussian(x, x2, means, var):
    """log N(x | mean_k, diag var_k) for every row and component, [N, K], by three products."""
    prec = 1.0 / var
    quad = x2 @ prec.T - 2.0 * (x @ (means * prec).T) + (means ** 2 * prec).sum(axis=1)
    return -0.5 * (x.shape[1] * np.log(2 * np.pi) + np.log(var).sum(axis=1) + quad)


def _m_step(x, x2, onehot, p, resp, reg_covar):
    """Parameters from responsibilities: weights, means, variances, P(y | s), P(ŷ | s)."""
    nk = resp.sum(axis=0) + 10 * np.finfo(float).eps
    means = resp.T @ x / nk[:, None]
    # Diagonal covariance E[x²] - mean², floored by reg_covar (rounding can take it below zero).
    var = np.maximum(resp.T @ x2 / nk[:, None] - means ** 2, 0.0) + reg_covar
    return nk / len(x), means, var, resp.T @ onehot / nk[:, None], resp.T @ p / nk[:, None]


def _e_step(x, x2, onehot, p, params, gamma, gamma_hat):
    """Log responsibilities under the weighted log-likelihood, and its mean over the rows."""
    weights, means, var, y_probs, y_hat_probs = params
    eps = np.finfo(float).eps
    log_p = (_diag_log_gaussian(x, x2, means, var) + np.log(weights)
             + gamma * np.log(onehot @ y_probs.T + eps) + gamma_hat * np.log(p @ y_hat_probs.T + eps))
    norm = logsumexp(log_p, axis=1)
    return log_p - norm[:, None], float(norm.mean())


def _init_resp(x, onehot, p, k, init, noise, seed):
    """Initial responsibilities [N, K]: confusion-matrix cells (Domino) or k-means clusters."""
    n, n_c = onehot.shape
    if init == "kmeans":
        from sklearn.cluster import KMeans

        assigned = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(x).labels_
        resp = np.zeros((n, k))
        resp[np.arange(n), assigned] = 1.0
        return resp
    if k < n_c ** 2:
        raise ConceptLensError(f"init='confusion' gives each (label, prediction) cell a component, so n_mixture_components "
                               f"must be at least {n_c}² = {n_c ** 2} for {n_c} classes; got {k} - raise it or use "
                               "init='kmeans'")
    cells = (onehot[:, :, None] * p[:, None, :]).reshape(n, n_c ** 2)
    resp = np.tile(cells, -(-k // n_c ** 2))[:, :k]  # cells round robin over the components
    resp /= resp.sum(axis=1, keepdims=True)
    resp += np.random.default_rng(seed).random((n, k)) * noise
    return resp / resp.sum(axis=1, keepdims=True)


def _slice_table(weights, hard, components, stats):
    """Per-slice table from membership ``weights`` [N, S] (soft or 0/1) and the hard assignment,
    sorted by error gap (by size without ``stats = (onehot, p, correct, classes)``)."""
    w = weights.sum(axis=0)
    table = pd.DataFrame({"component": components,
                          "size": np.bincount(hard, minlength=components.max() + 1)[components], "weight": w})
    if stats is None:
        table = table.assign(accuracy=np.nan, error_gap=np.nan, label=None, prediction=None, error_score=np.nan)
        order = np.argsort(-table["size"].to_numpy(), kind="stable")
    else:
        onehot, p, correct, classes = stats
        safe = np.maximum(w, np.finfo(float).tiny)
        y_mean, p_mean = weights.T @ onehot / safe[:, None], weights.T @ p / safe[:, None]
        acc = weights.T @ correct / safe
        table = table.assign(accuracy=acc, error_gap=correct.mean() - acc, label=classes[y_mean.argmax(axis=1)],
                             prediction=classes[p_mean.argmax(axis=1)], error_score=np.abs((p_mean - y_mean).max(axis=1)))
        order = np.argsort(-table["error_gap"].to_numpy(), kind="stable")
    table = table.iloc[order].reset_index(drop=True)
    table.insert(0, "slice", np.arange(len(table)))
    return table[TABLE_COLUMNS], order


def _rows(n, y=None, p=None, classes=None):
    if y is None:
        return pd.DataFrame({"row": np.arange(n)})
    pred = p.argmax(axis=1)
    return pd.DataFrame({"row": np.arange(n), "label": classes[y], "prediction": classes[pred], "correct": pred == y})


def _provenance(method, params, t0, *arrays):
    x = arrays[0]
    prov = provenance(parameters=params, timings={"total": time.perf_counter() - t0})
    prov.update(data=f"{method} slices of {x.shape[0]} rows x {x.shape[1]} features", data_hash=data_hash(*arrays))
    return prov


def discover_slices(embedding, labels, pred_probs, *, classes=None, n_slices=5, n_mixture_components=25,
                  n_pca_components=128, y_log_likelihood_weight=1.0, y_hat_log_likelihood_weight=1.0, max_iter=100,
                  tol=1e-3, reg_covar=1e-6, init="confusion", confusion_noise=1e-3, seed=0):
    """Discover slices on which the model errs with Domino's error-aware mixture model.

    Parameters
    ----------
    embedding : array [N, D]
        One embedding per example (layer activations, or a cross-modal embedding).
    labels : array [N]
        The given labels.
    pred_probs : array [N, C] or [N]
        The model's predicted probabilities (columns in ``classes`` order); ``[N]``: the
        probability of class 1 of a binary model.
    classes : array [C], optional
        The class of each ``pred_probs`` column. Default: ``0..C-1`` for integer labels, else the
        sorted distinct labels (which must then number C).
    n_slices : int
        Slices returned: the components with the largest Domino error score.
    n_mixture_components : int
        Components of the mixture (with ``init="confusion"`` at least C²).
    n_pca_components : int or None
        PCA dimension of the embedding, capped at ``min(N, D)``; ``None``: no PCA.
    y_log_likelihood_weight, y_hat_log_likelihood_weight : float
        γ and γ̂, the weights of the label and prediction terms of the log-likelihood.
    max_iter : int
        EM iterations at most.
    tol : float
        EM stops when the mean log-likelihood changes by less.
    reg_covar : float
        Added to every variance.
    init : {"confusion", "kmeans"}
        Initial responsibilities: Domino's confusion-matrix cells, or k-means clusters of the
        embedding (for many classes, where C² components are too many).
    confusion_noise : float
        Scale of the seeded uniform noise that tells components of one confusion cell apart.
    seed : int
        Seeds PCA, the initialisation noise and k-means.

    Returns
    -------
    SliceResult
    """
    t0 = time.perf_counter()
    x, y, p, classes = _inputs(embedding, labels, pred_probs, classes)
    k = check_count(n_mixture_components, "n_mixture_components")
    n_slices = check_count(n_slices, "n_slices")
    if n_slices > k:
        raise ConceptLensError(f"n_slices ({n_slices}) cannot exceed n_mixture_components ({k}): slices are chosen among "
                               "the components")
    if init not in INITS:
        raise ConceptLensError(f"the init parameter must be one of {', '.join(INITS)}; got {init!r}")
    max_iter, seed = check_count(max_iter, "max_iter"), check_count(seed, "seed", low=0)
    gammas = (check_nonnegative(y_log_likelihood_weight, "y_log_likelihood_weight"),
              check_nonnegative(y_hat_log_likelihood_weight, "y_hat_log_likelihood_weight"))
    for value, name in ((tol, "tol"), (reg_covar, "reg_covar"), (confusion_noise, "confusion_noise")):
        check_nonnegative(value, name)
    z, n_pca = _pca(x, n_pca_components, seed)
    x2 = z ** 2
    onehot = np.eye(len(classes))[y]
    params = _m_step(z, x2, onehot, p, _init_resp(z, onehot, p, k, init, confusion_noise, seed), reg_covar)
    converged, lower = False, -np.inf
    for n_iter in range(1, max_iter + 1):
        log_resp, bound = _e_step(z, x2, onehot, p, params, *gammas)
        params = _m_step(z, x2, onehot, p, np.exp(log_resp), reg_covar)
        if abs(bound - lower) < tol:
            converged = True
            break
        lower = bound
    if not converged:
        logger.warning("Domino EM did not converge in %d iterations (tolerance %g); raise max_iter or tol", max_iter, tol)
    log_resp, bound = _e_step(z, x2, onehot, p, params, *gammas)  # memberships under the final parameters
    resp = np.exp(log_resp)
    # Domino's choice: the components whose predictions depart most from their labels.
    y_probs, y_hat_probs = params[3], params[4]
    chosen = np.argsort(-np.abs((y_hat_probs - y_probs).max(axis=1)), kind="stable")[:n_slices]
    correct = (p.argmax(axis=1) == y).astype(float)
    table, order = _slice_table(resp[:, chosen], resp.argmax(axis=1), chosen, (onehot, p, correct, classes))
    params = {"method": "domino mixture (diagonal Gaussian embedding + categorical label and prediction), EM",
              "n_slices": n_slices, "n_mixture_components": k, "n_pca_components": n_pca_components, "pca_dim": n_pca,
              "y_log_likelihood_weight": y_log_likelihood_weight, "y_hat_log_likelihood_weight": y_hat_log_likelihood_weight,
              "max_iter": max_iter, "tol": tol, "reg_covar": reg_covar, "init": init, "confusion_noise": confusion_noise,
              "seed": seed, "n_iter": n_iter, "converged": converged, "mean_log_likelihood": bound,
              "scores": "posterior P(slice | embedding, label, prediction)"}
    return SliceResult(slices=table, scores=resp[:, chosen][:, order], rows=_rows(len(x), y, p, classes), method="domino",
                       params=params, provenance=_provenance("domino", params, t0, x, y, p))


def kmeans_slices(embedding, n_slices=5, seed=0, *, labels=None, pred_probs=None, classes=None, n_pca_components=128):
    """Baseline slices: k-means clusters of the PCA-reduced embedding (no error information).

    Parameters
    ----------
    embedding : array [N, D]
    n_slices : int
        Clusters, all returned as slices.
    seed : int
        Seeds PCA and k-means (10 restarts).
    labels, pred_probs, classes : optional
        As for :func:`discover_slices`: given (both), they describe the clusters (accuracy, error
        gap, ...) and order them by error gap; without them the clusters are ordered by size.
    n_pca_components : int or None
        As for :func:`discover_slices`, so both cluster the same space.

    Returns
    -------
    SliceResult
        Scores are the negative Euclidean distance to each cluster's centre.
    """
    from sklearn.cluster import KMeans

    t0 = time.perf_counter()
    if (labels is None) != (pred_probs is None):
        raise ConceptLensError("kmeans_slices describes the clusters with labels and pred_probs together; pass both or neither")
    if labels is None:
        x, arrays, stats = _embedding(embedding), (), None
        rows = _rows(len(x))
    else:
        x, y, p, classes = _inputs(embedding, labels, pred_probs, classes)
        arrays, stats = (y, p), (np.eye(len(classes))[y], p, (p.argmax(axis=1) == y).astype(float), classes)
        rows = _rows(len(x), y, p, classes)
    n_slices, seed = check_count(n_slices, "n_slices"), check_count(seed, "seed", low=0)
    if n_slices > len(x):
        raise ConceptLensError(f"n_slices ({n_slices}) cannot exceed the number of rows ({len(x)})")
    z, n_pca = _pca(x, n_pca_components, seed)
    km = KMeans(n_clusters=n_slices, n_init=10, random_state=seed).fit(z)
    table, order = _slice_table(np.eye(n_slices)[km.labels_], km.labels_, np.arange(n_slices), stats)
    params = {"method": "k-means on the PCA embedding (sklearn KMeans, n_init=10)", "n_slices": n_slices,
              "n_pca_components": n_pca_components, "pca_dim": n_pca, "seed": seed,
              "scores": "negative Euclidean distance to the cluster centre"}
    return SliceResult(slices=table, scores=-km.transform(z)[:, order], rows=rows, method="kmeans",
                       params=params, provenance=_provenance("kmeans", params, t0, x, *arrays))


def _scores_truth(scores, truth):
    scores, truth = np.asarray(scores, dtype=float), np.asarray(truth)
    if scores.ndim != 1 or truth.shape != scores.shape:
        raise ConceptLensError(f"scores and truth must be 1-D arrays of one length; got shapes {scores.shape} and {truth.shape}")
    if truth.dtype != bool:
        if not np.isin(truth, (0, 1)).all():
            raise ConceptLensError("truth must be boolean (or 0/1): True for the rows of the planted sub-population")
        truth = truth.astype(bool)
    if not truth.any():
        raise ConceptLensError("truth marks no row; a planted sub-population needs at least one")
    return scores, truth


def precision_at_k(scores, truth, k=10):
    """Fraction of the ``k`` highest-scoring rows that are true members (equal scores in row order).

    Parameters
    ----------
    scores : array [N]
    truth : array [N] of bool
    k : int

    Returns
    -------
    float
    """
    scores, truth = _scores_truth(scores, truth)
    k = check_count(k, "k")
    return float(truth[np.argsort(-scores, kind="stable")[:k]].mean())


def average_precision(scores, truth):
    """Average precision of ``scores`` at ranking the true members first (``sklearn.metrics.average_precision_score``).

    Parameters
    ----------
    scores : array [N]
    truth : array [N] of bool

    Returns
    -------
    float
    """
    from sklearn.metrics import average_precision_score

    scores, truth = _scores_truth(scores, truth)
    return float(average_precision_score(truth, scores))


def best_slice(result, truth, k=10):
    """The slice that best recovers a planted sub-population.

    Parameters
    ----------
    result : SliceResult
    truth : array [N] of bool
        True for the planted sub-population's rows.
    k : int
        For precision at k.

    Returns
    -------
    tuple
        ``(slice, precision_at_k, average_precision)`` of the slice with the highest precision at
        k, ties broken by average precision.
    """
    scores = [(precision_at_k(m, truth, k), average_precision(m, truth)) for m in result.scores.T]
    best = max(range(len(scores)), key=lambda s: scores[s])
    return best, scores[best][0], scores[best][1]

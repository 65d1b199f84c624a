"""Label issues by confident learning (Northcutt, Jiang & Chuang 2021, "Confident Learning:
Estimating Uncertainty in Dataset Labels", JAIR 70), written from the paper.

1. Out-of-sample predicted probabilities ``p̂`` from cross-validated linear probes
   (:func:`cross_val_probabilities`: standardized logistic regression, seeded stratified folds),
   so no example's own label shapes its own probabilities.
2. Per-class thresholds ``t_j``: the mean ``p̂_j`` over the examples labelled ``j`` (the
   classifier's expected self-confidence for class ``j``).
3. Each example's confident class: among the classes with ``p̂_j >= t_j``, the most probable;
   examples with none are not counted. The confident joint ``C[i][j]`` counts examples labelled
   ``i`` whose confident class is ``j``.
4. Issues: the examples on the off-diagonals of the confident joint - those whose confident class
   differs from their given label (the paper's ``C_{ỹ,y*}`` pruning rule) - ranked by
   self-confidence (``p̂`` of the given label), least confident first.

The calibrated joint (the paper's Eq. 2: rows of ``C`` rescaled to the class counts, then
normalised) estimates the joint distribution of given and true labels; its off-diagonal mass is
the estimated fraction of wrong labels. cleanlab (AGPL) implements the same paper; no code of it
is used here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from ..core.result import Result, provenance
from ..errors import ConceptLensError
from ._common import check_count, data_hash, read_table

__all__ = ["LabelIssueResult", "confident_label_issues", "confident_label_issues_from_probabilities", "cross_val_probabilities"]

ISSUE_COLUMNS = ["row", "given_label", "suggested_label", "p_given", "p_suggested"]


@dataclass(frozen=True)
class LabelIssueResult(Result):
    """Examples whose given label confident learning doubts.

    Attributes
    ----------
    issues : DataFrame
        ``row, given_label, suggested_label, p_given, p_suggested``, least self-confident first:
        ``row`` is the example's position in the input, ``suggested_label`` its confident class,
        ``p_given``/``p_suggested`` the out-of-sample probabilities of the two.
    pred_probs : ndarray [N, C]
        The out-of-sample predicted probabilities (columns in ``classes`` order).
    classes : list
        The classes, in column order.
    thresholds : ndarray [C]
        Per-class thresholds ``t_j``.
    confident_joint : DataFrame
        ``C[i][j]`` counts: index the given label, columns the confident class.
    estimated_noise_rate : float
        Off-diagonal mass of the calibrated joint: the estimated fraction of wrong labels.
    params : dict
    provenance : dict
    """

    issues: pd.DataFrame
    pred_probs: np.ndarray = field(repr=False)
    classes: list
    thresholds: np.ndarray = field(repr=False)
    confident_joint: pd.DataFrame = field(repr=False)
    estimated_noise_rate: float
    params: dict = field(repr=False)
    provenance: dict = field(repr=False)

    KIND, META = "label_issues", "label_issues.json"

    def to_frame(self):
        """The ranked issues (:attr:`issues`)."""
        return self.issues

    def _write(self, directory):
        """``issues.csv``, ``confident_joint.csv``, ``pred_probs.npy``; ``label_issues.json``."""
        self.issues.to_csv(directory / "issues.csv", index=False)
        self.confident_joint.to_csv(directory / "confident_joint.csv", index_label="given_label")
        np.save(directory / "pred_probs.npy", self.pred_probs, allow_pickle=False)
        return {"classes": self.classes, "thresholds": self.thresholds, "estimated_noise_rate": self.estimated_noise_rate,
                "params": self.params}

    @classmethod
    def _read(cls, directory, meta):
        """Labels come back as text."""
        joint = read_table(directory / "confident_joint.csv", ("given_label",)).set_index("given_label")
        return cls(issues=read_table(directory / "issues.csv", ("given_label", "suggested_label")),
                   pred_probs=np.load(directory / "pred_probs.npy", allow_pickle=False), classes=meta["classes"],
                   thresholds=np.asarray(meta["thresholds"], dtype=float), confident_joint=joint,
                   estimated_noise_rate=meta["estimated_noise_rate"], params=meta["params"], provenance=meta["provenance"])


def _labels(labels, n):
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ConceptLensError(f"labels must hold one label per example ({n}); got shape {labels.shape}")
    classes, codes = np.unique(labels, return_inverse=True)
    if len(classes) < 2:
        raise ConceptLensError(f"labels hold a single class ({classes[0]!r}); label issues need at least two")
    return classes, codes


def cross_val_probabilities(features, labels, *, n_folds=5, C=1.0, max_iter=1000, seed=0):
    """Out-of-sample class probabilities from cross-validated linear probes.

    Parameters
    ----------
    features : array [N, D]
        One feature vector per example (e.g. a layer's pooled activations).
    labels : array [N]
        The given labels.
    n_folds : int
        Folds of ``StratifiedKFold(shuffle=True, random_state=seed)``; every class needs at least
        this many examples.
    C, max_iter : float, int
        Of the ``LogisticRegression`` behind a ``StandardScaler``, fitted per fold.
    seed : int

    Returns
    -------
    classes : ndarray [C]
        The sorted distinct labels (the column order).
    pred_probs : ndarray [N, C]
        Each example's probabilities from the probe fitted without its fold.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or not np.isfinite(x).all():
        raise ConceptLensError(f"features must be a finite [N, D] array; got shape {x.shape}"
                               f"{'' if np.isfinite(x).all() else ' with NaN or inf values'}")
    classes, codes = _labels(labels, len(x))
    n_folds, seed = check_count(n_folds, "n_folds", low=2), check_count(seed, "seed", low=0)
    counts = np.bincount(codes)
    if counts.min() < n_folds:
        c = int(np.argmin(counts))
        raise ConceptLensError(f"class {classes[c]!r} has {counts[c]} example(s), fewer than n_folds={n_folds}: every fold "
                               "needs each class; pass fewer folds or drop the class")
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
    folds = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    return classes, cross_val_predict(probe, x, codes, cv=folds, method="predict_proba")


def confident_label_issues_from_probabilities(pred_probs, labels, *, classes=None):
    """Confident learning on given out-of-sample probabilities (see the module notes).

    Parameters
    ----------
    pred_probs : array [N, C]
        Out-of-sample predicted probabilities (in-sample ones hide the very errors sought).
    labels : array [N]
        The given labels.
    classes : array [C], optional
        The class of each column; default: the sorted distinct labels, which must then number C.

    Returns
    -------
    LabelIssueResult
    """
    t0 = time.perf_counter()
    p = np.asarray(pred_probs, dtype=np.float64)
    if p.ndim != 2 or not np.isfinite(p).all() or (p < 0).any():
        raise ConceptLensError(f"pred_probs must be a finite, non-negative [N, C] array of probabilities; got shape {p.shape}")
    labels = np.asarray(labels)
    if classes is None:
        classes, codes = _labels(labels, len(p))
    else:
        classes = np.asarray(classes)
        codes = pd.Index(classes).get_indexer(labels)
        if labels.shape != (len(p),) or (codes < 0).any():
            raise ConceptLensError(f"labels must hold one of the classes ({', '.join(map(str, classes))}) for each of the "
                                   f"{len(p)} examples")
    n_c = p.shape[1]
    if len(classes) != n_c:
        raise ConceptLensError(f"pred_probs has {n_c} columns but the labels hold {len(classes)} classes; pass classes= "
                               "(the class of each column, in order)")
    counts = np.bincount(codes, minlength=n_c)
    if (counts == 0).any():
        raise ConceptLensError(f"class {classes[np.argmin(counts)]!r} labels no example, so it has no threshold; drop its "
                               "column or pass data with it")
    thresholds = np.bincount(codes, weights=p[np.arange(len(p)), codes], minlength=n_c) / counts
    above = p >= thresholds[None, :]
    confident = np.where(above, p, -np.inf).argmax(axis=1)
    counted = above.any(axis=1)
    joint = np.bincount(codes[counted] * n_c + confident[counted], minlength=n_c * n_c).reshape(n_c, n_c)
    # Calibrated joint (Eq. 2): rows rescaled to the class counts, then normalised to sum to 1.
    calibrated = joint / np.maximum(joint.sum(axis=1, keepdims=True), 1) * counts[:, None]
    calibrated /= calibrated.sum()
    flagged = np.flatnonzero(counted & (confident != codes))
    order = np.argsort(p[flagged, codes[flagged]], kind="stable")  # least self-confident first
    flagged = flagged[order]
    issues = pd.DataFrame({"row": flagged, "given_label": classes[codes[flagged]],
                           "suggested_label": classes[confident[flagged]], "p_given": p[flagged, codes[flagged]],
                           "p_suggested": p[flagged, confident[flagged]]})
    params = {"method": "confident learning (Northcutt et al. 2021): per-class mean self-confidence thresholds, "
                        "off-diagonals of the confident joint, ranked by self-confidence"}
    prov = provenance(parameters=params, timings={"total": time.perf_counter() - t0})
    prov.update(data=f"pred_probs of {len(p)} examples x {n_c} classes", data_hash=data_hash(p, codes))
    return LabelIssueResult(issues=issues, pred_probs=p, classes=classes.tolist(), thresholds=thresholds,
                            confident_joint=pd.DataFrame(joint, index=pd.Index(classes, name="given_label"), columns=classes),
                            estimated_noise_rate=float(1.0 - np.trace(calibrated)), params=params, provenance=prov)


def confident_label_issues(features, labels, *, n_folds=5, C=1.0, max_iter=1000, seed=0):
    """Find label issues by confident learning on cross-validated linear-probe probabilities.

    Parameters
    ----------
    features : array [N, D]
        One feature vector per example.
    labels : array [N]
        The given labels.
    n_folds, C, max_iter, seed
        As for :func:`cross_val_probabilities`.

    Returns
    -------
    LabelIssueResult
        Its provenance records the features and labels; ``params`` the probe and folds.
    """
    t0 = time.perf_counter()
    classes, p = cross_val_probabilities(features, labels, n_folds=n_folds, C=C, max_iter=max_iter, seed=seed)
    t1 = time.perf_counter()
    result = confident_label_issues_from_probabilities(p, labels, classes=classes)
    params = {**result.params, "probabilities": f"cross_val_predict of StandardScaler + LogisticRegression(C={C}, "
                                                f"max_iter={max_iter}), StratifiedKFold({n_folds}, shuffle, seed {seed})",
              "n_folds": n_folds, "C": C, "max_iter": max_iter, "seed": seed}
    prov = provenance(parameters=params, timings={"probabilities": t1 - t0, "total": time.perf_counter() - t0})
    x = np.asarray(features)
    prov.update(data=f"features of {x.shape[0]} examples x {x.shape[1]} dimensions", data_hash=data_hash(x, labels))
    return replace(result, params=params, provenance=prov)

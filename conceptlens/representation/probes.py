"""Linear classifier probes: which layer encodes which manifest column (Alain & Bengio 2016).

For every captured layer and every target column (``label``, or an attribute such as ``has_tag``,
``site`` or ``scanner``) a multinomial logistic regression is fitted on frozen, standardized
features of the training rows and scored on the test rows. Accuracy alone overstates what a layer
encodes, so each probe is paired with a **control task** (Hewitt & Liang 2019): the same probe
trained and tested on labels permuted within each split, which keeps the class frequencies and
destroys the link to the image. ``selectivity = accuracy - control accuracy``; its bootstrap CI
(paired over test rows) tells whether a column is decodable at all, which is what an audit
"attribute X must not be decodable from layer L" needs.
"""

from __future__ import annotations

import logging
import warnings
import zlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from tqdm.auto import tqdm

from ..errors import ConceptLensError
from ._common import check_column, check_layers, layer_features, open_store, read_csv, read_json, store_provenance, write_result

__all__ = ["ProbeResult", "probe", "fit_probe"]

logger = logging.getLogger(__name__)

METHOD = "StandardScaler + LogisticRegression(lbfgs, multinomial) on frozen features"
COLUMNS = [
    "layer", "target", "n_classes", "n_train", "n_test", "accuracy", "ci_low", "ci_high",
    "control_accuracy", "control_ci_low", "control_ci_high", "selectivity", "selectivity_ci_low",
    "selectivity_ci_high", "majority_accuracy", "decodable",
]


@dataclass(frozen=True)
class ProbeResult:
    """Probe accuracies per (layer, target).

    Attributes
    ----------
    table : DataFrame
        One row per (layer, target): ``layer, target, n_classes, n_train, n_test, accuracy,
        ci_low, ci_high`` (bootstrap percentile CI over test rows), ``control_accuracy,
        control_ci_low, control_ci_high`` (control task: labels permuted within each split),
        ``selectivity, selectivity_ci_low, selectivity_ci_high`` (accuracy - control accuracy,
        paired bootstrap), ``majority_accuracy`` (always predicting the most frequent training
        class) and ``decodable`` (``selectivity_ci_low > 0``; False when no control or no bootstrap ran).
    params : dict
        Parameters, the method string and the split actually used.
    provenance : dict
        Model, weights hash, data hash, store, pooling.
    """

    table: pd.DataFrame = field(repr=False)
    params: dict
    provenance: dict = field(repr=False)

    def to_frame(self):
        """The probe table as a DataFrame (a copy)."""
        return self.table.copy()

    def get(self, layer, target):
        """The table row of one (layer, target) as a dict."""
        hit = self.table[(self.table["layer"] == layer) & (self.table["target"] == target)]
        if hit.empty:
            raise ConceptLensError(f"no probe for layer {layer!r} and target {target!r} in this result")
        return hit.iloc[0].to_dict()

    def save(self, directory):
        """Write ``probes.csv`` and ``probes.json`` (params and provenance) into ``directory``."""
        return write_result(directory, {"probes.csv": self.table}, ("probes.json", {"params": self.params, "provenance": self.provenance}))

    @classmethod
    def load(cls, directory):
        """Read a result written by :meth:`save`."""
        meta = read_json(directory, "probes.json", "probe")
        table = read_csv(f"{directory}/probes.csv")
        table["decodable"] = table["decodable"].astype(str).str.lower() == "true"
        return cls(table=table, params=meta["params"], provenance=meta["provenance"])


def _seed_for(seed, *names):
    """A seed per (layer, target) that does not change when other layers or targets are added."""
    return [int(seed), *(zlib.crc32(str(n).encode()) for n in names)]


def _split(rows, split, test_size, seed, y):
    """Boolean train mask over ``rows`` (test = the rest), and a description of the split."""
    has_column = "split" in rows.columns and (rows["split"] == "train").any() and (rows["split"] != "train").any()
    if split == "auto":
        split = "column" if has_column else "random"
        logger.info("split auto -> %s", "manifest column 'split' (train vs the rest)" if has_column else f"seeded random split, test_size={test_size}")
    if split == "column":
        if not has_column:
            raise ConceptLensError("split='column' needs a manifest column 'split' with 'train' rows and other rows; "
                                   "use split='random' for a seeded split")
        return (rows["split"] == "train").to_numpy(), "column 'split': train vs rest"
    if split != "random":
        raise ConceptLensError(f"the split parameter must be 'auto', 'column' or 'random'; got {split!r}")
    if not 0 < test_size < 1:
        raise ConceptLensError(f"the test_size parameter must be in (0, 1); got {test_size!r}")
    idx = np.arange(len(rows))
    counts = pd.Series(y).value_counts()
    stratify = y if counts.min() >= 2 else None
    _, test_idx = train_test_split(idx, test_size=test_size, random_state=seed, stratify=stratify)
    train = np.ones(len(rows), dtype=bool)
    train[test_idx] = False
    return train, f"seeded random split (test_size={test_size}, seed={seed}{', stratified' if stratify is not None else ''})"


def fit_probe(x_train, y_train, x_test, C=1.0, max_iter=1000):
    """Fit one standardized logistic-regression probe and predict the test rows.

    Parameters
    ----------
    x_train, x_test : ndarray [n, D]
        Frozen features.
    y_train : ndarray [n]
        Class labels of the training rows.
    C : float
        Inverse L2 regularisation strength of :class:`sklearn.linear_model.LogisticRegression`.
    max_iter : int
        L-BFGS iterations.

    Returns
    -------
    ndarray
        Predicted labels of ``x_test``.
    """
    scaler = StandardScaler().fit(x_train)
    clf = LogisticRegression(C=C, max_iter=max_iter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # reported below, once, with context
        clf.fit(scaler.transform(x_train), y_train)
    if np.max(clf.n_iter_) >= max_iter:
        logger.warning("a probe reached max_iter=%d without converging; raise max_iter for exact accuracies", max_iter)
    return clf.predict(scaler.transform(x_test))


def _percentile_ci(samples, confidence):
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(samples, [alpha, 1 - alpha], axis=-1)
    return float(lo), float(hi)


def probe(
    store,
    targets=("label",),
    layers=None,
    *,
    split="auto",
    test_size=0.3,
    C=1.0,
    max_iter=1000,
    n_controls=3,
    n_bootstrap=1000,
    confidence=0.95,
    seed=0,
    progress=True,
):
    """Fit a linear probe per (layer, target column) and report accuracy, control and selectivity.

    Parameters
    ----------
    store : ActivationStore or path
        Activations (``conceptlens extract``); spatial layers are mean-pooled over space.
    targets : sequence of str
        Manifest columns to predict (``label``, ``has_tag``, ``site``, ...). Rows with an empty
        cell are left out of that target's probe.
    layers : sequence of str, optional
        Layers to probe (default: all layers of the store).
    split : {"auto", "column", "random"}
        ``column``: train on ``split == "train"`` rows, test on the rest; ``random``: a seeded
        stratified split with ``test_size``; ``auto``: ``column`` when the manifest has one.
    test_size : float
        Test fraction of the random split.
    C, max_iter : float, int
        Logistic regression regularisation and iterations (see :func:`fit_probe`).
    n_controls : int
        Control-task repetitions (independent permutations), averaged; 0 skips the control.
    n_bootstrap : int
        Bootstrap resamples of the test rows for the confidence intervals (0: no intervals).
    confidence : float
        Confidence level of the intervals.
    seed : int
        Seeds the random split, the control permutations and the bootstrap.
    progress : bool
        Show a progress bar.

    Returns
    -------
    ProbeResult
    """
    store = open_store(store)
    layers = check_layers(store, layers)
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets:
        raise ConceptLensError("the targets parameter must name at least one manifest column (e.g. label)")
    if int(n_controls) < 0 or int(n_bootstrap) < 0:
        raise ConceptLensError(f"n_controls and n_bootstrap must be >= 0; got {n_controls} and {n_bootstrap}")
    if not 0 < confidence < 1:
        raise ConceptLensError(f"the confidence parameter must be in (0, 1); got {confidence!r}")
    rows = store.rows
    for t in targets:
        check_column(rows, t, "targets", f"the manifest of store {store.path}")

    # Per target: valid rows, labels, train mask (shared by all layers so layers are comparable).
    plans = {}
    for t in targets:
        values = rows[t].astype(str).to_numpy()
        valid = (values != "") & (values != "nan")
        y = values[valid]
        if len(np.unique(y)) < 2:
            raise ConceptLensError(f"target column {t!r} has fewer than two distinct values in store {store.path}; nothing to probe")
        train, how = _split(rows[valid].reset_index(drop=True), split, test_size, seed, y)
        if train.all() or not train.any():
            raise ConceptLensError(f"the split leaves no {'test' if train.all() else 'training'} rows for target {t!r}")
        if len(np.unique(y[train])) < 2:
            raise ConceptLensError(f"target {t!r} has a single value among the training rows; a probe needs two or more")
        plans[t] = (np.flatnonzero(valid), y, train, how)

    records = []
    bar = tqdm(total=len(layers) * len(targets), desc="probe", unit="probe", disable=not progress)
    for layer in layers:
        x_all = layer_features(store, layer)
        for t in targets:
            idx, y, train, _ = plans[t]
            records.append(_one(x_all[idx], y, train, layer, t, C, max_iter, n_controls, n_bootstrap, confidence, seed))
            bar.update()
    bar.close()
    params = {
        "method": METHOD,
        "control": "labels permuted within each split (class frequencies kept), Hewitt & Liang 2019",
        "ci": f"bootstrap percentile over test rows, {n_bootstrap} resamples",
        "targets": targets,
        "layers": layers,
        "split": split,
        "split_used": {t: plans[t][3] for t in targets},
        "test_size": test_size,
        "C": C,
        "max_iter": max_iter,
        "n_controls": n_controls,
        "n_bootstrap": n_bootstrap,
        "confidence": confidence,
        "seed": seed,
        "layer_shapes": {layer: list(store.shape(layer)) for layer in layers},
    }
    return ProbeResult(table=pd.DataFrame.from_records(records, columns=COLUMNS), params=params, provenance=store_provenance(store))


def _one(x, y, train, layer, target, C, max_iter, n_controls, n_bootstrap, confidence, seed):
    rng = np.random.default_rng(_seed_for(seed, layer, target))
    x_tr, x_te, y_tr, y_te = x[train], x[~train], y[train], y[~train]
    correct = (fit_probe(x_tr, y_tr, x_te, C, max_iter) == y_te).astype(np.float64)
    if n_controls:
        ctrl = np.zeros(len(y_te))
        for _ in range(n_controls):
            c_tr, c_te = rng.permutation(y_tr), rng.permutation(y_te)
            ctrl += fit_probe(x_tr, c_tr, x_te, C, max_iter) == c_te
        ctrl /= n_controls
    else:
        ctrl = np.full(len(y_te), np.nan)
    classes, counts = np.unique(y_tr, return_counts=True)
    majority = float(np.mean(y_te == classes[np.argmax(counts)]))
    acc, cacc = float(correct.mean()), float(ctrl.mean())
    nan2 = (np.nan, np.nan)
    ci = cci = sci = nan2
    if n_bootstrap:
        boot = rng.integers(0, len(y_te), size=(n_bootstrap, len(y_te)))
        acc_b, ctrl_b = correct[boot].mean(axis=1), ctrl[boot].mean(axis=1)
        ci = _percentile_ci(acc_b, confidence)
        if n_controls:
            cci, sci = _percentile_ci(ctrl_b, confidence), _percentile_ci(acc_b - ctrl_b, confidence)
    return {
        "layer": layer, "target": target, "n_classes": len(np.unique(y)), "n_train": int(train.sum()),
        "n_test": int((~train).sum()), "accuracy": acc, "ci_low": ci[0], "ci_high": ci[1],
        "control_accuracy": cacc, "control_ci_low": cci[0], "control_ci_high": cci[1],
        "selectivity": acc - cacc, "selectivity_ci_low": sci[0], "selectivity_ci_high": sci[1],
        "majority_accuracy": majority, "decodable": bool(sci[0] > 0) if n_controls and n_bootstrap else False,
    }

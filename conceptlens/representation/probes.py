"""Linear classifier probes: which layer encodes which manifest column (Alain & Bengio 2016).

For every captured layer and every target column (``label``, or an attribute such as ``has_tag``,
``site`` or ``scanner``) a multinomial logistic regression is fitted on frozen, standardized
features of the training rows and scored on the test rows.

Accuracy alone overstates what a layer *learned*: a linear probe on a wide random projection of
the image decodes much by itself. Hewitt & Liang's question - is it the representation or the
probe? - is answered against baselines the probe could exploit as well, trained and tested exactly
like the real probe (same rows, split, standardization, ``C`` and convergence criterion):

* **random-init baseline** (``baseline=``): the same layer of a seeded random-init copy of the
  network (:func:`conceptlens.models.random_init_copy`), extracted into a store of its own.
  ``selectivity = accuracy - baseline accuracy``, with a bootstrap CI paired over the test rows;
  ``decodable`` means its lower bound is above 0 - the layer encodes the column beyond what the
  architecture gives for free. Without a baseline store the table says ``baseline = none``,
  ``selectivity`` is empty and ``decodable`` is False: nothing is silently compared with chance.
* **pixel baseline** (``pixels=``, optional): the input pixels average-pooled to the grid whose
  feature count is closest to the layer's (:mod:`conceptlens.representation.baselines`).
* **permutation null**: the probe trained on permuted *training* labels and scored on the *true*
  test labels, ``n_permutations`` times; ``p_permutation`` is the probe's rank in that null.
  (Permuting the test labels too, as a "control task" for images, gives chance by construction.)

:meth:`ProbeResult.audit` turns the table into verdicts for "attribute X must not be decodable":
``fail`` = decodable (Holm-corrected over layers), ``pass`` = selectivity shown within a stated
margin at every layer (equivalence), otherwise ``inconclusive`` with what would decide it.
"""

from __future__ import annotations

import logging
import time
import math
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

from ..core.corrections import holm
from ..errors import ConceptLensError, did_you_mean
from ..core.result import Result, provenance
from ._common import TEXT_COLUMNS, check_column, check_layers, layer_features, open_store

__all__ = ["ProbeResult", "probe", "fit_probe"]

logger = logging.getLogger(__name__)

METHOD = "StandardScaler + LogisticRegression(lbfgs, multinomial) on frozen features"
COLUMNS = [
    "layer", "target", "n_classes", "n_train", "n_test", "accuracy", "ci_low", "ci_high",
    "baseline", "baseline_accuracy", "baseline_ci_low", "baseline_ci_high",
    "selectivity", "selectivity_ci_low", "selectivity_ci_high", "selectivity_p",
    "pixel_layer", "pixel_accuracy", "pixel_ci_low", "pixel_ci_high",
    "null_accuracy", "null_accuracy_high", "p_permutation", "majority_accuracy", "decodable",
]
NO_BASELINE = "none"
RANDOM_INIT = "random-init copy"


@dataclass(frozen=True)
class ProbeResult(Result):
    """Probe accuracies per (layer, target), with their baselines.

    Attributes
    ----------
    table : DataFrame
        One row per (layer, target): ``layer, target, n_classes, n_train, n_test, accuracy,
        ci_low, ci_high`` (bootstrap percentile CI over test rows); ``baseline`` (``"random-init
        copy"``, or ``"none"`` when no baseline store was given), ``baseline_accuracy,
        baseline_ci_low, baseline_ci_high`` (the same probe on the same layer of the random-init
        copy); ``selectivity, selectivity_ci_low, selectivity_ci_high`` (accuracy - baseline
        accuracy, bootstrap paired over test rows) and ``selectivity_p`` (one-sided bootstrap
        p-value of selectivity <= 0); ``pixel_layer, pixel_accuracy, pixel_ci_low, pixel_ci_high``
        (the probe on pooled input pixels; empty without a pixel store); ``null_accuracy``
        (mean accuracy on the true test labels of probes trained on permuted training labels),
        ``null_accuracy_high`` (its ``confidence`` quantile) and ``p_permutation``;
        ``majority_accuracy`` (always predicting the most frequent training class) and
        ``decodable`` (``selectivity_ci_low > 0``; False when there is no baseline or no bootstrap).
    params : dict
        Parameters, the method strings and the split actually used.
    provenance : dict
        Model, weights hash, data hash, store, pooling; ``baseline`` and ``pixels``: the same for
        the baseline stores (None when absent).
    """

    table: pd.DataFrame = field(repr=False)
    params: dict
    provenance: dict = field(repr=False)

    KIND, META = "probe", "probes.json"

    def to_frame(self):
        """The probe table as a DataFrame (a copy)."""
        return self.table.copy()

    def get(self, layer, target):
        """The table row of one (layer, target) as a dict."""
        hit = self.table[(self.table["layer"] == layer) & (self.table["target"] == target)]
        if hit.empty:
            raise ConceptLensError(f"no probe for layer {layer!r} and target {target!r} in this result")
        return hit.iloc[0].to_dict()

    def audit(self, targets, margin=0.05, alpha=None):
        """Verdicts for columns that must *not* be decodable (beyond the random-init baseline).

        Parameters
        ----------
        targets : iterable of str or (str, str)
            A target column (audited at every probed layer), ``"target:layer"`` or
            ``(target, layer)``.
        margin : float
            Equivalence margin in accuracy: ``pass`` needs the selectivity CI inside
            ``[-margin, +margin]`` at every audited layer (default 0.05, five points).
        alpha : float, optional
            One-sided level of the ``fail`` test (default ``(1 - confidence) / 2`` of the probe,
            i.e. the lower bound of its CI), Holm-corrected over the audited layers.

        Returns
        -------
        DataFrame
            One row per entry: ``target, layers, verdict`` (``fail`` when the selectivity is above
            0 at some layer after Holm's correction; ``pass`` when every layer's selectivity CI lies
            inside ``±margin`` - an intersection-union equivalence test at the CI's level;
            otherwise ``inconclusive``), ``decodable_layers``, ``layer`` (the deciding one),
            ``selectivity, selectivity_ci_low, selectivity_ci_high, p_adjusted`` there, ``margin``,
            ``alpha`` and ``evidence`` (the reason, and for ``inconclusive`` what would decide it).
        """
        if not 0 < float(margin) < 1:
            raise ConceptLensError(f"the margin parameter is an accuracy difference in (0, 1); got {margin!r}")
        conf = float(self.params.get("confidence", 0.95))
        alpha = (1 - conf) / 2 if alpha is None else float(alpha)
        if not 0 < alpha < 0.5:
            raise ConceptLensError(f"the alpha parameter must be in (0, 0.5); got {alpha!r}")
        if isinstance(targets, str):
            targets = [targets]
        t = self.table
        rows = []
        for item in targets:
            target, layer = (item.split(":", 1) if ":" in item else (item, None)) if isinstance(item, str) else tuple(item)
            known = sorted(t["target"].unique())
            if target not in known:
                raise ConceptLensError(f"audit target {target!r} was not probed{did_you_mean(target, known)} (probed: {', '.join(known)})")
            sub = t[t["target"] == target]
            if layer is not None:
                if layer not in set(sub["layer"]):
                    raise ConceptLensError(f"audit {target}:{layer}: layer {layer!r} was not probed"
                                           f"{did_you_mean(layer, list(sub['layer']))} (probed: {', '.join(sub['layer'])})")
                sub = sub[sub["layer"] == layer]
            rows.append(_audit_one(target, sub.reset_index(drop=True), float(margin), alpha, conf))
        return pd.DataFrame(rows, columns=["target", "layers", "verdict", "decodable_layers", "layer", "selectivity",
                                           "selectivity_ci_low", "selectivity_ci_high", "p_adjusted", "margin", "alpha", "evidence"])

    def _write(self, directory):  # probes.csv; probes.json holds params and provenance
        self.table.to_csv(directory / "probes.csv", index=False)
        return {"params": self.params}

    @classmethod
    def _read(cls, directory, meta):
        table = pd.read_csv(directory / "probes.csv", keep_default_na=False,
                            dtype={**TEXT_COLUMNS, "baseline": str, "pixel_layer": str})
        table["decodable"] = table["decodable"].astype(str).str.lower() == "true"
        for col in COLUMNS:
            if col not in ("layer", "target", "baseline", "pixel_layer", "decodable", "n_classes", "n_train", "n_test"):
                table[col] = pd.to_numeric(table[col].replace("", np.nan))
        return cls(table=table, params=meta["params"], provenance=meta["provenance"])


def _audit_one(target, sub, margin, alpha, conf):
    base = {"target": target, "layers": ",".join(sub["layer"]), "margin": margin, "alpha": alpha}
    nan = {"decodable_layers": "", "layer": "", "selectivity": np.nan, "selectivity_ci_low": np.nan,
           "selectivity_ci_high": np.nan, "p_adjusted": np.nan}
    if (sub["baseline"] == NO_BASELINE).any() or sub["selectivity"].isna().any():
        return {**base, **nan, "verdict": "inconclusive",
                "evidence": (f"no random-init baseline for {target!r}: accuracy alone cannot separate what the layer learned "
                             "from what a probe reads off any features; rerun with a baseline store "
                             "(probe(..., baseline=store of models.random_init_copy(model)); CLI: --model/--data or --baseline-store)")}
    if sub["selectivity_ci_low"].isna().any():
        return {**base, **nan, "verdict": "inconclusive",
                "evidence": "no bootstrap CI (n_bootstrap=0); rerun with n_bootstrap >= 1000"}
    sub = sub.assign(p_adjusted=holm(sub["selectivity_p"].to_numpy()))
    sig = sub[sub["p_adjusted"] < alpha]
    m = f"margin ±{margin:.3g} accuracy"
    if len(sig):
        best = sig.sort_values("p_adjusted").iloc[0]
        per = "; ".join(f"{r.layer}: accuracy {r.accuracy:.3f} vs random-init {r.baseline_accuracy:.3f}, selectivity "
                        f"{r.selectivity:+.3f} [{r.selectivity_ci_low:+.3f}, {r.selectivity_ci_high:+.3f}], p_adj {r.p_adjusted:.2g}"
                        for r in sig.itertuples())
        return {**base, **_pick(best), "decodable_layers": ",".join(sig["layer"]), "verdict": "fail",
                "evidence": f"decodable beyond the random-init baseline (one-sided alpha {alpha:.3g}, Holm over "
                            f"{len(sub)} layer(s)) at {per}"}
    inside = (sub["selectivity_ci_low"] >= -margin) & (sub["selectivity_ci_high"] <= margin)
    if inside.all():
        worst = sub.loc[np.maximum(sub["selectivity_ci_high"], -sub["selectivity_ci_low"]).idxmax()]
        return {**base, **_pick(worst), "decodable_layers": "", "verdict": "pass",
                "evidence": f"not decodable beyond the random-init baseline within the {m}: the {conf:.0%} selectivity CI "
                            f"lies inside ±{margin:.3g} at all {len(sub)} layer(s) (widest at {worst.layer}: "
                            f"[{worst.selectivity_ci_low:+.3f}, {worst.selectivity_ci_high:+.3f}])"}
    out = sub[~inside]
    worst = out.loc[np.maximum(out["selectivity_ci_high"] - margin, -margin - out["selectivity_ci_low"]).idxmax()]
    half = (worst.selectivity_ci_high - worst.selectivity_ci_low) / 2
    room = margin - abs(worst.selectivity)
    if room > 0:
        need = int(math.ceil(worst.n_test * (half / room) ** 2))
        fix = f"about {need} test rows (now {int(worst.n_test)}) would narrow it inside the margin if the estimate holds"
    else:
        fix = (f"the estimate itself ({worst.selectivity:+.3f}) is beyond the margin: more test rows (now "
               f"{int(worst.n_test)}) would show whether it is decodable")
    return {**base, **_pick(worst), "decodable_layers": "", "verdict": "inconclusive",
            "evidence": f"neither decodable nor shown within the {m}: at {worst.layer} the selectivity CI "
                        f"[{worst.selectivity_ci_low:+.3f}, {worst.selectivity_ci_high:+.3f}] crosses ±{margin:.3g}; {fix}"}


def _pick(r):
    return {"layer": r.layer, "selectivity": float(r.selectivity), "selectivity_ci_low": float(r.selectivity_ci_low),
            "selectivity_ci_high": float(r.selectivity_ci_high), "p_adjusted": float(r.p_adjusted)}


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


def _fit_scaled(z_train, y_train, z_test, C, max_iter):
    clf = LogisticRegression(C=C, max_iter=max_iter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # reported below, once, with context
        clf.fit(z_train, y_train)
    if np.max(clf.n_iter_) >= max_iter:
        logger.warning("a probe reached max_iter=%d without converging; raise max_iter for exact accuracies", max_iter)
    return clf.predict(z_test)


def _standardize(x_train, x_test):
    scaler = StandardScaler().fit(x_train)
    return scaler.transform(x_train), scaler.transform(x_test)


def fit_probe(x_train, y_train, x_test, C=1.0, max_iter=1000):
    """Fit one standardized logistic-regression probe and predict the test rows.

    Parameters
    ----------
    x_train, x_test : ndarray [n, D]
        Frozen features (standardized with the training rows' mean and SD).
    y_train : ndarray [n]
        Class labels of the training rows.
    C : float
        Inverse L2 regularisation strength of :class:`sklearn.linear_model.LogisticRegression`.
    max_iter : int
        L-BFGS iterations (sklearn's default tolerance ``tol=1e-4``).

    Returns
    -------
    ndarray
        Predicted labels of ``x_test``.
    """
    z_train, z_test = _standardize(x_train, x_test)
    return _fit_scaled(z_train, y_train, z_test, C, max_iter)


def _percentile_ci(samples, confidence):
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(samples, [alpha, 1 - alpha], axis=-1)
    return float(lo), float(hi)


def _aligned(store, other, layers, param, need_layers=True):
    """Open ``other`` and check it holds the same rows (and ``layers``) as ``store``."""
    other = open_store(other)
    req, oreq = store.meta["request"], other.meta["request"]
    if other.n_rows != store.n_rows or not np.array_equal(other.rows["manifest_row"].to_numpy(), store.rows["manifest_row"].to_numpy()):
        raise ConceptLensError(f"the {param} store {other.path} holds other rows than {store.path} ({other.n_rows} vs {store.n_rows}); "
                               "extract it from the same manifest (and --skip-bad setting)")
    if req.get("manifest_hash") and oreq.get("manifest_hash") and req["manifest_hash"] != oreq["manifest_hash"]:
        raise ConceptLensError(f"the {param} store {other.path} was extracted from another manifest than {store.path}; "
                               "extract both from the same manifest")
    if need_layers:
        missing = [layer for layer in layers if layer not in other.layers]
        if missing:
            raise ConceptLensError(f"the {param} store {other.path} lacks layer(s) {', '.join(missing)}; extract the random-init "
                                   "copy (models.random_init_copy) with the same layers")
        if req.get("weights_hash") and req.get("weights_hash") == oreq.get("weights_hash"):
            raise ConceptLensError(f"the {param} store {other.path} has the same weights as {store.path}; a baseline needs the "
                                   "random-init copy (models.random_init_copy(model))")
        if req.get("pool") != oreq.get("pool"):
            raise ConceptLensError(f"the {param} store {other.path} is pooled {oreq.get('pool')!r}, {store.path} {req.get('pool')!r}; "
                                   "extract both with the same --pool")
    return other


def _pixel_layer_for(pixels, dim):
    """The pixel grid whose feature count is closest (in ratio) to ``dim``."""
    sizes = {layer: int(np.prod(pixels.shape(layer))) for layer in pixels.layers}
    return min(sizes, key=lambda layer: (abs(math.log(sizes[layer] / dim)), sizes[layer]))


def probe(
    store,
    targets=("label",),
    layers=None,
    *,
    baseline=None,
    pixels=None,
    split="auto",
    test_size=0.3,
    C=1.0,
    max_iter=1000,
    n_permutations=19,
    n_bootstrap=1000,
    confidence=0.95,
    seed=0,
    progress=True,
):
    """Fit a linear probe per (layer, target column); report accuracy, baselines and selectivity.

    Parameters
    ----------
    store : ActivationStore or path
        Activations (``conceptlens extract``); spatial layers are mean-pooled over space.
    targets : sequence of str
        Manifest columns to predict (``label``, ``has_tag``, ``site``, ...). Rows with an empty
        cell are left out of that target's probe.
    layers : sequence of str, optional
        Layers to probe (default: all layers of the store).
    baseline : ActivationStore or path, optional
        The same layers of a seeded random-init copy of the model
        (:func:`conceptlens.models.random_init_copy`), extracted from the same manifest with the
        same pooling. Without it the table says ``baseline = none`` and nothing is decodable.
    pixels : ActivationStore or path, optional
        Pooled input pixels (:func:`conceptlens.representation.baselines.pixel_model`); each
        layer is compared with the grid whose feature count is closest to its own.
    split : {"auto", "column", "random"}
        ``column``: train on ``split == "train"`` rows, test on the rest; ``random``: a seeded
        stratified split with ``test_size``; ``auto``: ``column`` when the manifest has one.
    test_size : float
        Test fraction of the random split.
    C, max_iter : float, int
        Logistic regression regularisation and iterations (see :func:`fit_probe`), the same for
        the probe, its baselines and its null.
    n_permutations : int
        Probes trained on permuted training labels and scored on the true test labels (the
        permutation null); the smallest attainable ``p_permutation`` is ``1 / (n + 1)``. 0 skips it.
    n_bootstrap : int
        Bootstrap resamples of the test rows for the confidence intervals (0: no intervals).
    confidence : float
        Confidence level of the intervals.
    seed : int
        Seeds the random split, the permutations and the bootstrap.
    progress : bool
        Show a progress bar.

    Returns
    -------
    ProbeResult
    """
    t0 = time.perf_counter()
    store = open_store(store)
    layers = check_layers(store, layers)
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets:
        raise ConceptLensError("the targets parameter must name at least one manifest column (e.g. label)")
    if int(n_permutations) < 0 or int(n_bootstrap) < 0:
        raise ConceptLensError(f"n_permutations and n_bootstrap must be >= 0; got {n_permutations} and {n_bootstrap}")
    if not 0 < confidence < 1:
        raise ConceptLensError(f"the confidence parameter must be in (0, 1); got {confidence!r}")
    rows = store.rows
    for t in targets:
        check_column(rows, t, "targets", f"the manifest of store {store.path}")
    if baseline is not None:
        baseline = _aligned(store, baseline, layers, "baseline")
    else:
        logger.warning("probe without a random-init baseline store: selectivity is not computed and no column is called "
                       "decodable; pass baseline= (a store of models.random_init_copy(model))")
    if pixels is not None:
        pixels = _aligned(store, pixels, layers, "pixels", need_layers=False)

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
    pixel_cache = {}
    bar = tqdm(total=len(layers) * len(targets), desc="probe", unit="probe", disable=not progress)
    for layer in layers:
        x_all = layer_features(store, layer)
        xb_all = layer_features(baseline, layer) if baseline is not None else None
        pl = _pixel_layer_for(pixels, x_all.shape[1]) if pixels is not None else ""
        if pl and pl not in pixel_cache:
            pixel_cache[pl] = layer_features(pixels, pl)
        for t in targets:
            idx, y, train, _ = plans[t]
            xb = xb_all[idx] if xb_all is not None else None
            xp = pixel_cache[pl][idx] if pl else None
            records.append(_one(x_all[idx], xb, xp, pl, y, train, layer, t, C, max_iter, n_permutations, n_bootstrap,
                                confidence, seed))
            bar.update()
    bar.close()
    params = {
        "method": METHOD,
        "baseline": (f"{RANDOM_INIT}: the same layer of {baseline.meta['request'].get('model')}, probed like the model"
                     if baseline is not None else "none given: selectivity not computed"),
        "pixels": "input pixels average-pooled to the grid closest to the layer's feature count" if pixels is not None else None,
        "null": f"probe trained on permuted training labels, scored on the true test labels, {n_permutations} permutations",
        "ci": f"bootstrap percentile over test rows, {n_bootstrap} resamples, paired for selectivity",
        "decodable": "selectivity CI lower bound > 0 (selectivity = accuracy - random-init baseline accuracy)",
        "targets": targets,
        "layers": layers,
        "split": split,
        "split_used": {t: plans[t][3] for t in targets},
        "test_size": test_size,
        "C": C,
        "max_iter": max_iter,
        "n_permutations": n_permutations,
        "n_bootstrap": n_bootstrap,
        "confidence": confidence,
        "seed": seed,
        "layer_shapes": {layer: list(store.shape(layer)) for layer in layers},
    }
    prov = provenance(store=store, parameters=params, timings={"total": time.perf_counter() - t0},
                      baseline=provenance(store=baseline) if baseline is not None else None,
                      pixels=provenance(store=pixels) if pixels is not None else None)
    return ProbeResult(table=pd.DataFrame.from_records(records, columns=COLUMNS), params=params, provenance=prov)


def _one(x, xb, xp, pixel_layer, y, train, layer, target, C, max_iter, n_permutations, n_bootstrap, confidence, seed):
    rng = np.random.default_rng(_seed_for(seed, layer, target))
    y_tr, y_te = y[train], y[~train]
    z_tr, z_te = _standardize(x[train], x[~train])
    correct = (_fit_scaled(z_tr, y_tr, z_te, C, max_iter) == y_te).astype(np.float64)
    base = pix = None
    if xb is not None:
        base = (fit_probe(xb[train], y_tr, xb[~train], C, max_iter) == y_te).astype(np.float64)
    if xp is not None:
        pix = (fit_probe(xp[train], y_tr, xp[~train], C, max_iter) == y_te).astype(np.float64)
    acc = float(correct.mean())
    null = np.array([np.mean(_fit_scaled(z_tr, rng.permutation(y_tr), z_te, C, max_iter) == y_te)
                     for _ in range(int(n_permutations))])
    classes, counts = np.unique(y_tr, return_counts=True)
    majority = float(np.mean(y_te == classes[np.argmax(counts)]))
    nan2 = (np.nan, np.nan)
    ci = bci = sci = pci = nan2
    sel_p = np.nan
    if n_bootstrap:
        boot = rng.integers(0, len(y_te), size=(n_bootstrap, len(y_te)))
        acc_b = correct[boot].mean(axis=1)
        ci = _percentile_ci(acc_b, confidence)
        if base is not None:
            base_b = base[boot].mean(axis=1)
            diff = acc_b - base_b
            bci, sci = _percentile_ci(base_b, confidence), _percentile_ci(diff, confidence)
            sel_p = float((1 + np.sum(diff <= 0)) / (1 + n_bootstrap))
        if pix is not None:
            pci = _percentile_ci(pix[boot].mean(axis=1), confidence)
    return {
        "layer": layer, "target": target, "n_classes": len(np.unique(y)), "n_train": int(train.sum()),
        "n_test": int((~train).sum()), "accuracy": acc, "ci_low": ci[0], "ci_high": ci[1],
        "baseline": RANDOM_INIT if base is not None else NO_BASELINE,
        "baseline_accuracy": float(base.mean()) if base is not None else np.nan, "baseline_ci_low": bci[0], "baseline_ci_high": bci[1],
        "selectivity": acc - float(base.mean()) if base is not None else np.nan,
        "selectivity_ci_low": sci[0], "selectivity_ci_high": sci[1], "selectivity_p": sel_p,
        "pixel_layer": pixel_layer, "pixel_accuracy": float(pix.mean()) if pix is not None else np.nan,
        "pixel_ci_low": pci[0], "pixel_ci_high": pci[1],
        "null_accuracy": float(null.mean()) if len(null) else np.nan,
        "null_accuracy_high": float(np.quantile(null, confidence)) if len(null) else np.nan,
        "p_permutation": float((1 + np.sum(null >= acc)) / (1 + len(null))) if len(null) else np.nan,
        "majority_accuracy": majority,
        "decodable": bool(base is not None and n_bootstrap and sci[0] > 0),
    }

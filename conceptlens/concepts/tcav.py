"""TCAV with honest statistics: shared gradients, seeded random sets, many null runs, verdicts that say what they show.

``TCAV(model, layers).run(concepts, random_pool, classes, data)`` does, in this order:

1. plans the runs (seeded): how many runs and examples per CAV the concept images allow (below),
   concept examples, random counter-example sets of the same size, and many more random-vs-random
   null runs than concept runs;
2. captures the layers' activations of every image once (:func:`~conceptlens.core.extract.iter_activations`);
3. fits all CAVs of a layer (concept-vs-random runs and random-vs-random null runs);
4. streams the class inputs once per class through :func:`~conceptlens.core.extract.iter_gradients`
   (one forward and one backward per batch for all layers) and takes one matmul of each batch's
   gradients with all CAVs of the layer: ``S = d logit_k / d f_l(x) · v`` (the explicit class
   logit, no loss and no sign flips);
5. gates each concept's CAVs against the null CAVs' accuracy, tests each (concept, layer, class)
   against its null, corrects across the experiment, and tests equivalence for audits.

Why these choices (each measured on the concept world, ``tests/test_tcav.py`` and
``benchmarks/tcav_audit.py``):

* **Equal set sizes.** A CAV trained on 3 concept against 27 random examples scores 0.9 by
  predicting "random", so no accuracy gate can tell a concept from noise. Concept and random sets
  have the same size ``m`` (tf/tcav's setting) and chance is 0.5.
* **The gate is relative.** A concept's held-out CAV accuracy, pooled over its runs, must exceed the
  ``gate_quantile`` (0.95) quantile of the pooled accuracy of groups of as many null CAVs: a
  concept must separate from random images better than random sets separate from each other.
* **Many null runs.** Per-run scores of random directions pile up near 0 and 1, so ten null runs
  estimate the null badly and one unlucky draw shifts every concept of that (layer, class).
  Null runs cost a CAV fit and a column of the gradient matmul: ``null_runs`` (200) of them, each
  a fresh pair of disjoint random sets of size ``m``; the default test is rank-based
  (Mann-Whitney), which keeps its size on bimodal scores.
* **Power-aware runs.** With bimodal null scores the smallest attainable p-value falls roughly as
  ``2^-runs``: ten runs cannot reach significance after correction however strong the concept.
  By default the split design uses as many runs as the smallest concept allows with 2 examples
  each (at most 50); ``-v`` logs what was chosen.
* **Audits must show absence.** Non-significance is not evidence of insensitivity. An audit
  verdict is ``fail`` when the pair is significant after Holm over the audit's own tests,
  ``pass`` only when an equivalence test (TOST, margin 0.1 on score − null) succeeds at every
  layer whose CAV passes the gate, and ``inconclusive`` otherwise, with the reason and the fix.

Designs (``design``):

``split`` (default)
    Run ``r`` uses the ``r``-th of ``runs`` disjoint parts of the concept's images against random
    set ``N_r`` (disjoint from every other ``N``); null run ``j`` uses a pseudo-concept ``P_j`` of
    random images against a disjoint ``N'_j``, both drawn afresh from the pool. For a concept with
    no signal the concept runs and null runs are then identically distributed and the test has its
    nominal size.
``standard``
    tf/tcav's design: the whole concept set against each ``N_r``; null: one fixed random set
    against each ``N'_j``. The runs share the concept set, so the run-to-run spread misses the
    variability of the concept sample itself and the test is anti-conservative (it rejects far
    more true nulls than alpha; see ``tests/test_tcav.py``).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.stats
import torch
from tqdm.auto import tqdm

from ..data import Manifest, make_loader
from ..errors import ConceptLensError, did_you_mean
from ..models import load_model, validate_layers
from ..core.extract import iter_activations, iter_gradients
from ..core.hashing import hash_files
from ..core.result import Result, provenance
from . import stats
from .cav import CAV_METHODS, fit_cavs

__all__ = ["TCAV", "TCAVResult", "load_concept_sets", "load_image_pool", "DESIGNS"]

logger = logging.getLogger(__name__)

DESIGNS = ("split", "standard")
POOLS = ("none", "mean", "max")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
NULL = "<random>"  # concept name of the null (random-vs-random) runs in runs.csv


# --------------------------------------------------------------------------- inputs

def _images_in(folder):
    return sorted(p.resolve() for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_concept_sets(source, names=None):
    """Concept name → sorted list of image paths.

    Parameters
    ----------
    source : path or dict
        A directory with one subfolder of images per concept, a CSV with columns ``image,concept``
        (paths relative to the CSV), or a dict ``{name: [paths]}``.
    names : list of str, optional
        Keep only these concepts (each must exist).

    Returns
    -------
    dict
    """
    if isinstance(source, dict):
        sets = {str(k): sorted(Path(p).resolve() for p in v) for k, v in source.items()}
        origin = "the concepts dict"
    else:
        path = Path(source)
        origin = str(path)
        if path.is_dir():
            sets = {d.name: _images_in(d) for d in sorted(path.iterdir()) if d.is_dir()}
            if not sets:
                raise ConceptLensError(f"concept directory {path} has no subfolders; put each concept's images in <dir>/<concept>/")
        elif path.is_file() and path.suffix.lower() == ".csv":
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
            missing = {"image", "concept"} - set(frame.columns)
            if missing:
                raise ConceptLensError(f"concept CSV {path} lacks columns {sorted(missing)} (has {', '.join(frame.columns)}); expected image,concept")
            sets = {c: sorted((path.parent / g).resolve() for g in grp["image"]) for c, grp in frame.groupby("concept", sort=True)}
        else:
            raise ConceptLensError(f"concepts {path} does not exist or is neither a directory nor a .csv; pass a folder of concept subfolders or an image,concept CSV")
    if names is not None:
        for n in names:
            if n not in sets:
                raise ConceptLensError(f"concept {n!r} is not in {origin}{did_you_mean(n, sets)} (available: {', '.join(sets)})")
        sets = {n: sets[n] for n in names}
    for n, paths in sets.items():
        if not paths:
            raise ConceptLensError(f"concept {n!r} in {origin} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        absent = [p for p in paths if not p.is_file()]
        if absent:
            raise ConceptLensError(f"concept {n!r}: image {absent[0]} does not exist ({len(absent)} missing); fix the concept set")
    return sets


def load_image_pool(source):
    """Sorted image paths of a random pool: a folder of images (searched recursively) or a manifest CSV."""
    path = Path(source)
    if path.is_dir():
        paths = _images_in(path)
    elif path.is_file():
        paths = [p.resolve() for p in Manifest.read(path).image_paths()]
    else:
        raise ConceptLensError(f"random pool {path} does not exist; pass a folder of images or a manifest CSV")
    if not paths:
        raise ConceptLensError(f"random pool {path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return paths


def _class_inputs(model, data, classes, split, max_inputs, rng):
    """``[(name, logit index, Manifest of that class's rows)]``."""
    manifest = data if isinstance(data, Manifest) else Manifest.read(data)
    frame = manifest.frame
    if "label" not in frame.columns:
        raise ConceptLensError(f"manifest {manifest.path} has no 'label' column; TCAV takes each class's inputs from the rows with that label")
    mask = manifest.split_mask(split)
    labels = sorted(frame.loc[mask, "label"].unique())
    out = []
    for name in classes:
        index = model.class_index(str(name))
        rows = np.flatnonzero(mask & (frame["label"] == str(name)).to_numpy())
        if len(rows) == 0:
            raise ConceptLensError(
                f"class {name!r} has no rows in {manifest.path}" + (f" (split {split})" if split else "")
                + f"; labels there: {', '.join(labels)}"
            )
        if max_inputs is not None and len(rows) > max_inputs:
            rows = np.sort(rng.choice(rows, size=max_inputs, replace=False))
        sub = manifest.subset(np.isin(np.arange(len(frame)), rows))
        out.append((str(name), index, sub, rows))
    return manifest, out


# --------------------------------------------------------------------------- the plan

MAX_AUTO_RUNS = 50  # split design: runs chosen when not given (2 examples per CAV, at most this many runs)
STANDARD_RUNS = 10


def plan_sizes(design, smallest, runs=None, concept_size=None):
    """``(runs, m)``: concept runs and examples per CAV set (concept and random alike).

    The split design gives each run its own ``m`` concept images, so ``runs * m <= smallest``;
    unset values are chosen for power: as many runs as ``smallest`` allows with ``m = 2``, at most
    :data:`MAX_AUTO_RUNS` (then ``m = smallest // runs``). The standard design uses the whole
    smallest concept set (``m = smallest``) and :data:`STANDARD_RUNS` runs.
    """
    if design == "split":
        if runs is None:
            runs = min(MAX_AUTO_RUNS, smallest // (concept_size or 2))
        m = concept_size if concept_size is not None else (smallest // runs if runs else 0)
    else:
        runs = STANDARD_RUNS if runs is None else runs
        m = concept_size if concept_size is not None else smallest
    return int(runs), int(m)


def _plan(design, concept_sizes, pool_size, runs, null_runs, concept_size, rng):
    """Draw the experiment's sets as index arrays.

    Concept sets index their own concept's images; pool sets index the random pool. Returns
    ``(runs, m, parts, counters, null_pos, null_neg)``: ``parts[name]`` is ``[runs, m]`` (the same
    row repeated in the standard design), ``counters`` the concept runs' random sets ``[runs, m]``
    (disjoint), ``null_pos``/``null_neg`` the null runs' sets ``[null_runs, m]``.
    """
    smallest = min(concept_sizes.values())
    small_name = min(concept_sizes, key=concept_sizes.get)
    runs, m = plan_sizes(design, smallest, runs, concept_size)
    need_c = m * runs if design == "split" else m
    if runs < 2 or m < 2 or smallest < need_c:
        per = "per run (the split design gives each run its own part)" if design == "split" else "per concept"
        raise ConceptLensError(
            f"concept {small_name!r} has {smallest} images; design {design} with {max(runs, 2)} runs and "
            f"{max(m, 2)} concept examples {per} needs {max(need_c, 2 * max(runs, 2) if design == 'split' else 2)}; "
            "add images, lower runs, or set concept_size"
        )
    fixed = m if design == "standard" else 0  # the standard design's fixed pseudo-concept
    if pool_size < fixed + runs * m or pool_size < 2 * m:
        raise ConceptLensError(
            f"the random pool has {pool_size} images; {runs} disjoint random sets of {m} (as many as the concept "
            f"examples per CAV){' plus a fixed pseudo-concept of ' + str(m) if fixed else ''} need {fixed + runs * m}; "
            "add random images, lower runs, or set concept_size"
        )
    logger.info("TCAV plan (%s): %d runs with %d concept and %d random examples per CAV (smallest concept %r: %d images), "
                "%d null runs", design, runs, m, m, small_name, smallest, null_runs)
    if design == "split" and runs < 12:
        logger.warning("TCAV with %d runs: random directions score near 0 or 1, so %d runs cannot give a p-value much "
                       "below 2^-%d; add concept images (2 per run) for a test that can reach significance", runs, runs, runs)
    parts = {}
    for name, size in concept_sizes.items():
        perm = rng.permutation(size)
        parts[name] = perm[: m * runs].reshape(runs, m) if design == "split" else np.tile(np.sort(perm[:m]), (runs, 1))
    perm = rng.permutation(pool_size)
    counters = perm[fixed: fixed + runs * m].reshape(runs, m)
    if design == "split":
        # Each null run: 2m distinct pool images, drawn afresh (runs may share images with each other).
        draws = np.argsort(rng.random((null_runs, pool_size)), axis=1)[:, : 2 * m]
        null_pos, null_neg = draws[:, :m], draws[:, m:]
    else:
        rest = perm[fixed:]
        draws = rest[np.argsort(rng.random((null_runs, len(rest))), axis=1)[:, :m]]
        null_pos, null_neg = np.tile(np.sort(perm[:m]), (null_runs, 1)), draws
    return runs, m, parts, counters, null_pos, null_neg


def _direction_text(score, null):
    return "more sensitive than random directions" if score > null else "less sensitive than random directions"


def _more_runs_fix(row, margin, alpha, m):
    """What would show equivalence: the concept runs needed for the TOST CI to fit the margin at the
    observed difference and spreads (80 % power), as concept images at ``m`` per run."""
    d = abs(row.score_mean - row.null_mean)
    if d >= margin:
        return (f"the observed difference {d:.3f} at {row.layer} is itself beyond the margin {margin:g}: more runs "
                "would more likely make it significant than show equivalence")
    z = scipy.stats.norm.ppf(1 - alpha) + scipy.stats.norm.ppf(0.8)
    room = ((margin - d) / z) ** 2 - row.null_sd**2 / row.n_null_runs
    if room <= 0 or not np.isfinite(room):
        return f"add null runs (--null-runs, now {row.n_null_runs}) and concept images"
    runs = int(np.ceil(max(row.score_sd, row.null_sd) ** 2 / room))
    return (f"about {runs} concept runs ({runs * m} concept images at {m} per run; now {row.n_runs}) would show "
            f"insensitivity at {row.layer} if the difference stays at {d:.3f}")


# --------------------------------------------------------------------------- result

@dataclass(frozen=True)
class TCAVResult(Result):
    """TCAV scores with their significance, CAV quality and provenance.

    Attributes
    ----------
    table : DataFrame
        One row per (concept, layer, class): see :meth:`to_frame`.
    runs : DataFrame
        One row per (run, layer, class) and CAV: ``concept`` (``<random>`` for null runs), ``role``
        (``concept``/``null``), ``layer``, ``class``, ``run``, ``cav`` (column in ``derivatives``),
        ``score``, ``magnitude``, ``cav_accuracy``.
    derivatives : dict
        ``{(layer, class): ndarray [n_inputs, n_cavs]}`` per-example directional derivatives
        ``S = d logit / d activation · v`` of every CAV of the layer (columns = ``cavs.cav``).
    cavs : DataFrame
        ``layer, cav, role, concept, run, accuracy, positive_set, negative_set``: what each
        derivative column is and which example sets (``sets``) trained it.
    sets : DataFrame
        ``set, image``: the members of every example set (``cavs.positive_set``/``negative_set``).
    inputs : DataFrame
        ``class, position, row, image``: the class inputs, ``position`` = row in ``derivatives``,
        ``row`` = manifest row.
    cav_vectors : dict
        ``{layer: ndarray [n_cavs, dim]}`` the unit CAVs, rows in ``cavs.cav`` order.
    provenance : dict
        Model spec and weights hash, data and set hashes, layers, parameters, method strings.
    skipped : tuple of dict
        Images left out as unreadable (``skip_bad``): ``{source, manifest_row, image, error}``;
        ``source`` is ``concept NAME``, ``random pool`` or ``class NAME`` (``manifest_row`` only
        for class inputs, which come from the manifest).
    """

    table: pd.DataFrame = field(repr=False)
    runs: pd.DataFrame = field(repr=False)
    derivatives: dict = field(repr=False)
    cavs: pd.DataFrame = field(repr=False)
    cav_vectors: dict = field(repr=False)
    sets: pd.DataFrame = field(repr=False)
    inputs: pd.DataFrame = field(repr=False)
    provenance: dict = field(repr=False)
    skipped: tuple = ()

    KIND, META = "tcav", "provenance.json"

    def to_frame(self):
        """The table, one row per (concept, layer, class): ``score_mean`` (mean over runs of the
        fraction of class inputs whose logit rises along the CAV) with its bootstrap
        ``score_ci_low/high`` and ``score_sd``; ``null_mean``/``null_sd`` over the null runs;
        ``difference`` = score − null and ``direction`` (``more``/``less`` sensitive than random);
        ``p_value`` (``test``), ``p_adjusted`` (over every gated test of the experiment, empty where
        gated out) and ``significant``; ``p_equivalence`` with the TOST CI ``diff_ci_low/high`` and
        ``equivalent`` (within ``±margin``); ``cav_accuracy`` (cross-fitted, pooled over runs),
        ``accuracy_gate`` (the null CAVs' quantile it must exceed), ``cav_ok``, ``gate`` (why a
        test was not run), ``cav_stability``, ``null_accuracy``, ``null_stability``,
        ``magnitude_mean``, ``n_runs``, ``n_null_runs``, ``n_inputs``."""
        return self.table.copy()

    def audit(self, pairs):
        """Verdicts for ``(concept, class)`` pairs that must be *insensitive* (a bias audit).

        The audit is its own family: Holm over the raw p-values of every gated (concept, layer,
        class) test of the audited pairs, not over the whole exploratory table.

        * ``fail``: significant after that correction at some layer; ``direction`` says whether the
          class is more or less sensitive to the concept than to random directions.
        * ``pass``: shown insensitive - at every layer whose CAV passes the gate, the TOST ``1 - 2
          alpha`` CI of ``score - null`` lies within ``±margin`` (an intersection-union test, so no
          correction is needed), and at least one layer passes the gate.
        * ``inconclusive``: neither; ``evidence`` says why and ``fix`` what would decide it (more
          concept images, another layer).

        Parameters
        ----------
        pairs : iterable of (str, str) or "concept:class" strings

        Returns
        -------
        DataFrame
            One row per pair: ``concept, class, verdict, direction, significant_layers,
            min_p_adjusted, layer`` (of the deciding test), its ``score_mean, null_mean,
            p_equivalence``, ``margin, alpha, evidence, fix``.
        """
        t = self.table
        params = self.provenance["parameters"]
        alpha, margin = params["alpha"], params["margin"]
        wanted = []
        for pair in pairs:
            concept, cls = pair.split(":", 1) if isinstance(pair, str) else pair
            for value, column in ((concept, "concept"), (cls, "class")):
                known = sorted(t[column].unique())
                if value not in known:
                    raise ConceptLensError(f"audit pair {concept}:{cls}: {column} {value!r} was not tested"
                                           f"{did_you_mean(value, known)} (tested: {', '.join(known)})")
            wanted.append((concept, cls))
        in_audit = pd.Series(False, index=t.index)
        for concept, cls in wanted:
            in_audit |= (t["concept"] == concept) & (t["class"] == cls)
        gated = in_audit & t["cav_ok"]
        p_audit = pd.Series(np.nan, index=t.index)
        p_audit[gated] = stats.holm(t.loc[gated, "p_value"].to_numpy())
        rows = []
        for concept, cls in wanted:
            sub = t[(t["concept"] == concept) & (t["class"] == cls)].assign(p_audit=p_audit)
            valid = sub[sub["cav_ok"]]
            sig = valid[valid["p_audit"] < alpha]
            unrepresented = sub[~sub["cav_ok"]]
            gate_note = "".join(f"; {r.layer} not tested: CAV accuracy {r.cav_accuracy:.2f} <= random-vs-random gate "
                                f"{r.accuracy_gate:.2f}" for r in unrepresented.itertuples())
            fix = ""
            if len(sig):
                verdict, best = "fail", sig.sort_values("p_audit").iloc[0]
                evidence = "; ".join(
                    f"{r.layer}: {_direction_text(r.score_mean, r.null_mean)} (score {r.score_mean:.3f} vs null "
                    f"{r.null_mean:.3f}, p_audit {stats.format_p(r.p_audit)})" for r in sig.itertuples())
            elif not len(valid):
                verdict, best = "inconclusive", sub.sort_values("cav_accuracy", ascending=False).iloc[0]
                evidence = ("no tested layer represents the concept: its CAVs separate it from random images no better "
                            "than random sets separate from each other" + gate_note)
                fix = (f"add concept images (each run used {params['concept_size']} per CAV) or test layers where "
                       "the concept is linearly readable")
            elif valid["equivalent"].all():
                verdict, best = "pass", valid.sort_values("p_equivalence", ascending=False).iloc[0]
                evidence = (f"shown insensitive at {len(valid)} layer(s): the {1 - 2 * alpha:.0%} CI of score - null lies "
                            f"within ±{margin:g} (" + "; ".join(
                                f"{r.layer}: [{r.diff_ci_low:+.3f}, {r.diff_ci_high:+.3f}]" for r in valid.itertuples())
                            + ")" + gate_note)
            else:
                open_ = valid[~valid["equivalent"]]
                verdict, best = "inconclusive", open_.sort_values("p_equivalence", ascending=False).iloc[0]
                evidence = ("not significant, but insensitivity within ±{:g} is not shown: ".format(margin) + "; ".join(
                    f"{r.layer}: CI of score - null [{r.diff_ci_low:+.3f}, {r.diff_ci_high:+.3f}]" for r in open_.itertuples())
                    + gate_note)
                fix = _more_runs_fix(best, margin, alpha, params["concept_size"])
            rows.append({
                "concept": concept, "class": cls, "verdict": verdict,
                "direction": _direction_text(best.score_mean, best.null_mean) if verdict == "fail" else "",
                "significant_layers": ",".join(sig["layer"]),
                "min_p_adjusted": float(valid["p_audit"].min()) if len(valid) else np.nan,
                "layer": best.layer, "score_mean": float(best.score_mean), "null_mean": float(best.null_mean),
                "p_equivalence": float(best.p_equivalence), "margin": margin, "alpha": alpha,
                "evidence": evidence, "fix": fix,
            })
        return pd.DataFrame(rows)

    def concept_directions(self, layer, concepts=None):
        """``{concept: unit vector}``: the normalised mean of each concept's CAVs at ``layer``.

        In the space the CAVs were fitted in (flattened maps for ``pool="none"``, channels for a
        pooled TCAV); e.g. for ``decision_tree(directions=...)``.
        """
        cavs = self.cavs[(self.cavs["layer"] == layer) & (self.cavs["role"] == "concept")]
        if not len(cavs):
            raise ConceptLensError(f"no concept CAVs at layer {layer!r}; layers: {', '.join(sorted(self.cav_vectors))}")
        known = list(dict.fromkeys(cavs["concept"]))
        names = known if concepts is None else list(concepts)
        out = {}
        for name in names:
            if name not in known:
                raise ConceptLensError(f"concept {name!r} has no CAVs at layer {layer!r}{did_you_mean(name, known)}")
            mean = self.cav_vectors[layer][cavs.loc[cavs["concept"] == name, "cav"].to_numpy()].mean(axis=0)
            out[name] = mean / np.linalg.norm(mean)
        return out

    def top_inputs(self, concept, cls, layer, k=8):
        """The class inputs whose class logit rises most along the concept's CAVs: what a failed audit
        is about (e.g. the tagged circles of a tag shortcut).

        Parameters
        ----------
        concept, cls, layer : str
        k : int

        Returns
        -------
        DataFrame
            ``k`` rows, largest first: ``position, row, image`` (as in ``inputs``), ``derivative``
            (mean over the concept's runs of ``S = d logit / d activation · v``) and
            ``positive_runs`` (share of runs with ``S > 0``).
        """
        key = (layer, cls)
        if key not in self.derivatives:
            known = sorted({f"{a}/{b}" for a, b in self.derivatives})
            raise ConceptLensError(f"no derivatives for layer {layer!r} and class {cls!r} (have: {', '.join(known)})")
        cols = self.cavs[(self.cavs["layer"] == layer) & (self.cavs["concept"] == concept)]["cav"].to_numpy()
        if not len(cols):
            raise ConceptLensError(f"concept {concept!r} was not tested{did_you_mean(concept, sorted(self.table['concept'].unique()))}")
        s = self.derivatives[key][:, cols]
        inputs = self.inputs[self.inputs["class"] == cls].sort_values("position")
        frame = inputs[["position", "row", "image"]].reset_index(drop=True).assign(
            derivative=s.mean(axis=1), positive_runs=(s > 0).mean(axis=1))
        return frame.sort_values("derivative", ascending=False, kind="stable").head(int(k)).reset_index(drop=True)

    def _write(self, d):
        """``tcav.csv``, ``runs.csv``, ``cavs.csv``, ``sets.csv``, ``inputs.csv``, ``derivatives/<k>.npy``
        (indexed by ``derivatives.csv``: ``layer, class, file``) and ``cav_vectors/<k>.npy`` (indexed by
        ``cav_vectors.csv``: ``layer, file``); then ``provenance.json`` (with the skipped images)."""
        (d / "derivatives").mkdir(parents=True, exist_ok=True)
        for name, frame in (("tcav", self.table), ("runs", self.runs), ("cavs", self.cavs), ("inputs", self.inputs), ("sets", self.sets)):
            frame.to_csv(d / f"{name}.csv", index=False)
        index = []
        for k, ((layer, cls), arr) in enumerate(sorted(self.derivatives.items())):
            name = f"derivatives/{k:03d}.npy"
            np.save(d / name, arr)
            index.append({"layer": layer, "class": cls, "file": name})
        pd.DataFrame(index, columns=["layer", "class", "file"]).to_csv(d / "derivatives.csv", index=False)
        (d / "cav_vectors").mkdir(exist_ok=True)
        vindex = []
        for k, (layer, arr) in enumerate(self.cav_vectors.items()):
            np.save(d / f"cav_vectors/{k:03d}.npy", arr)
            vindex.append({"layer": layer, "file": f"cav_vectors/{k:03d}.npy"})
        pd.DataFrame(vindex, columns=["layer", "file"]).to_csv(d / "cav_vectors.csv", index=False)
        return {"skipped": list(self.skipped)}

    @classmethod
    def _read(cls, d, meta):
        str_cols = {"concept": str, "layer": str, "class": str}
        index = pd.read_csv(d / "derivatives.csv", dtype=str, keep_default_na=False)
        vindex = pd.read_csv(d / "cav_vectors.csv", dtype=str, keep_default_na=False)
        return cls(
            table=pd.read_csv(d / "tcav.csv", dtype={**str_cols, "direction": str, "gate": str}, keep_default_na=False,
                              na_values={"p_adjusted": [""]}),
            runs=pd.read_csv(d / "runs.csv", dtype=str_cols, keep_default_na=False),
            derivatives={(r.layer, r._2): np.load(d / r.file) for r in index.itertuples()},
            cavs=pd.read_csv(d / "cavs.csv", dtype=str_cols, keep_default_na=False),
            cav_vectors={r.layer: np.load(d / r.file) for r in vindex.itertuples()},
            sets=pd.read_csv(d / "sets.csv", dtype=str, keep_default_na=False),
            inputs=pd.read_csv(d / "inputs.csv", dtype={"class": str, "image": str}, keep_default_na=False),
            provenance=meta["provenance"],
            skipped=tuple(meta.get("skipped", ())),
        )


# --------------------------------------------------------------------------- the analyzer

class TCAV:
    """Testing with concept activation vectors, with calibrated significance and audit verdicts.

    Parameters
    ----------
    model : LoadedModel or str
        The model (or a model spec); must be in ``eval()`` mode.
    layers : list of str
        Layer names (``conceptlens layers MODEL``).
    method : {"mean-diff", "sgd", "logistic"}
        How CAVs are fitted (see :func:`~conceptlens.concepts.cav.fit_cavs`). ``mean-diff`` is the
        default: with the few examples per CAV of the split design it is the most stable, and on
        the concept world it finds the planted tag where ``sgd`` (the TCAV paper's) does not.
    pool : {"none", "mean", "max"}
        CAV space: ``none`` flattens the spatial activations (the TCAV paper); ``mean``/``max``
        pool channels, and the CAV direction is then applied at every position (``S`` uses the
        spatially summed gradient).
    design : {"split", "standard"}
        How runs draw their sets (module docstring); ``split`` is calibrated by construction.
    runs : int, optional
        Concept runs, each with its own random set. Default (split design): as many as the smallest
        concept allows with 2 images per run, at most 50 (:func:`plan_sizes`); standard design: 10.
    null_runs : int
        Random-vs-random runs (each a fresh pair of random sets of the concept runs' size); they
        are cheap, and many of them pin down the null's bimodal distribution.
    concept_size : int, optional
        Concept examples per CAV, and random ones (the sets have equal size). Default: the smallest
        concept's images divided among the runs (split) or all of them (standard).
    test : {"mannwhitney", "welch", "permutation"}
        Two-sided test of concept-run scores against null-run scores (:func:`~conceptlens.concepts.
        stats.two_sample_pvalues`).
    correction : {"holm", "bh", "none"}
        Across every (concept, layer, class) test of the experiment that passes the gate.
    alpha : float
        Level of the adjusted p-values and of the equivalence tests.
    margin : float
        Equivalence margin on ``score - null`` for audits (``pass`` needs the ``1 - 2 alpha`` CI
        of the difference within ``±margin``).
    gate_quantile : float
        A concept is tested at a layer only when its pooled held-out CAV accuracy exceeds this
        quantile of the pooled accuracy of random groups of as many null CAVs.
    n_bootstrap, n_permutations : int
        Resamples for the score CI and the permutation test.
    cv_folds : int
        Folds of each CAV's cross-fitted accuracy (at most the set size: 2 with 2 examples a side).
    cav_alpha : float
        Regularisation of ``sgd``/``logistic`` CAVs.
    seed : int
        Seeds every random choice (sets, splits, classifiers, bootstrap, permutations, gate groups).
    batch_size, num_workers : int
        Image loading; memory is bounded by one batch of activations and gradients.
    skip_bad : bool
        Leave unreadable concept, random-pool and class images out (listed in ``skipped``) instead
        of failing; the plan is drawn from the images that could be read.
    preprocessing : Preprocessing, optional
        Default: the model's, updated by the data manifest's sidecar; concept and random images use
        the same.
    progress : bool
    """

    def __init__(self, model, layers, method="mean-diff", pool="none", design="split", runs=None, null_runs=200,
                 concept_size=None, test="mannwhitney", correction="holm", alpha=0.05, margin=0.1, gate_quantile=0.95,
                 n_bootstrap=2000, n_permutations=9999, cv_folds=4, cav_alpha=0.01, seed=0, batch_size=64,
                 num_workers=0, skip_bad=False, preprocessing=None, progress=True):
        self.model, self.layers, self.method, self.pool, self.design = model, layers, method, pool, design
        self.runs, self.null_runs, self.concept_size = runs, null_runs, concept_size
        self.test, self.correction, self.alpha, self.margin, self.gate_quantile = test, correction, alpha, margin, gate_quantile
        self.n_bootstrap, self.n_permutations, self.cv_folds, self.cav_alpha = n_bootstrap, n_permutations, cv_folds, cav_alpha
        self.seed, self.batch_size, self.num_workers, self.skip_bad = seed, batch_size, num_workers, skip_bad
        self.preprocessing, self.progress = preprocessing, progress

    def _validate(self):
        def choice(name, allowed):
            value = getattr(self, name)
            if value not in allowed:
                raise ConceptLensError(f"the {name} parameter of TCAV must be one of {', '.join(allowed)}; got {value!r}")

        def integer(name, low, hint="", optional=False):
            v = getattr(self, name)
            if (v is None and optional) or (isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= low):
                return
            raise ConceptLensError(f"the {name} parameter of TCAV must be an integer >= {low}{' or None' if optional else ''}"
                                   f"{hint}; got {v!r}")

        def fraction(name):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 < v < 1):
                raise ConceptLensError(f"the {name} parameter of TCAV must be in (0, 1); got {v!r}")

        choice("method", CAV_METHODS)
        choice("pool", POOLS)
        choice("design", DESIGNS)
        choice("test", stats.TESTS)
        choice("correction", stats.CORRECTIONS)
        integer("runs", 2, " (default: chosen for power)", optional=True)
        integer("null_runs", 2, " (200 or more recommended)")
        if self.null_runs < 100:
            logger.warning("TCAV with %d null runs: per-run scores of random directions are bimodal, and fewer than "
                           "100 null runs estimate their distribution poorly", self.null_runs)
        integer("concept_size", 2, optional=True)
        integer("cv_folds", 2)
        for name in ("alpha", "gate_quantile"):
            fraction(name)
        if not (isinstance(self.margin, (int, float)) and 0 < self.margin < 1):
            raise ConceptLensError(f"the margin parameter of TCAV must be in (0, 1) (a difference of scores); got {self.margin!r}")

    def run(self, concepts, random_pool, classes, data, split=None, max_inputs=None, concept_names=None):
        """Run the experiment.

        Parameters
        ----------
        concepts : path or dict
            Concept sets (see :func:`load_concept_sets`).
        random_pool : path or list of paths
            Folder of images or manifest CSV (see :func:`load_image_pool`), or image paths. Images
            that are also concept examples are removed from it; of a pool larger than the plan can
            use, a seeded subsample is read.
        classes : list of str
            Class names (or logit indices as strings); each class's inputs are the manifest rows
            with that label.
        data : Manifest or path
            The manifest the class inputs come from.
        split : str, optional
            Only rows of this split (e.g. ``test``).
        max_inputs : int, optional
            At most this many inputs per class (a seeded subsample).
        concept_names : list of str, optional
            Use only these concepts of ``concepts``.

        Returns
        -------
        TCAVResult
        """
        t0 = time.perf_counter()
        self._validate()
        model = load_model(self.model) if isinstance(self.model, str) else self.model
        layers = validate_layers(model.module, self.layers)
        if isinstance(classes, str):
            classes = [c for c in classes.split(",") if c]
        if not classes:
            raise ConceptLensError("the classes parameter of TCAV.run must name at least one class")
        rng = np.random.default_rng(self.seed)
        sets = load_concept_sets(concepts, concept_names)
        pool = load_image_pool(random_pool) if isinstance(random_pool, (str, os.PathLike)) else sorted(Path(p).resolve() for p in random_pool)
        taken = {p for paths in sets.values() for p in paths}
        overlap = sum(p in taken for p in pool)
        if overlap:
            logger.info("removed %d random-pool images that are also concept examples", overlap)
            pool = [p for p in pool if p not in taken]
        manifest, class_inputs = _class_inputs(model, data, classes, split, max_inputs, rng)
        prep = model.preprocessing_for(manifest, self.preprocessing)
        names = list(sets)
        sizes = {c: len(sets[c]) for c in names}
        if self.skip_bad:
            # Which images can be read is known only after reading them: check the plan on the files,
            # read every concept image and as much of the pool as a plan can use, then draw the plan
            # from the images that could be read.
            _plan(self.design, sizes, len(pool), self.runs, self.null_runs, self.concept_size, np.random.default_rng(0))
            runs, m = plan_sizes(self.design, min(sizes.values()), self.runs, self.concept_size)
            usable = m + runs * m + 2 * m * self.null_runs
            if len(pool) > usable:
                logger.info("reading %d of the random pool's %d images (seeded): a plan uses at most that many", usable, len(pool))
                pool = [pool[i] for i in np.sort(rng.choice(len(pool), size=usable, replace=False))]
        else:
            plan = _plan(self.design, sizes, len(pool), self.runs, self.null_runs, self.concept_size, rng)
        sources = [f"concept {c}" for c in names for _ in sets[c]] + ["random pool"] * len(pool)
        paths = [p for c in names for p in sets[c]] + list(pool)
        start = dict(zip(names + [NULL], np.cumsum([0] + [sizes[c] for c in names])))
        if self.skip_bad:
            read = np.arange(len(paths))
        else:  # only the images the plan uses
            _, _, parts, counters, null_pos, null_neg = plan
            read = np.unique(np.concatenate([start[c] + parts[c].ravel() for c in names]
                                            + [start[NULL] + q.ravel() for q in (counters, null_pos, null_neg)]))
        acts, kept, skipped = self._activations(model, [paths[i] for i in read], [sources[i] for i in read], layers, prep)
        kept = read[kept]  # indices into paths, in the order of the activation rows
        position = np.full(len(paths), -1)  # activation row of each path, -1 where not read
        position[kept] = np.arange(len(kept))
        row_of = {c: position[start[c] + np.arange(sizes[c])] for c in names}
        row_of[NULL] = position[start[NULL] + np.arange(len(pool))]
        if self.skip_bad:  # the plan indexes the images that could be read
            row_of = {c: rows[rows >= 0] for c, rows in row_of.items()}
            plan = _plan(self.design, {c: len(row_of[c]) for c in names}, len(row_of[NULL]), self.runs, self.null_runs,
                         self.concept_size, rng)
        runs, m, parts, counters, null_pos, null_neg = plan

        derivative_state = {}

        def derivatives(fitted):
            out, inputs, skipped_inputs = self._derivatives(model, class_inputs, layers, prep, fitted)
            derivative_state.update(inputs=inputs, skipped=skipped_inputs)
            return out

        kept_paths = [str(paths[i]) for i in kept]
        table, runs_frame, cav_frame, sets_frame, derivs, fitted = self._experiment(
            names, acts, kept_paths, row_of, parts, counters, null_pos, null_neg, runs, layers,
            [name for name, *_ in class_inputs], derivatives, rng)
        inputs = derivative_state["inputs"]
        prov = provenance(
            model, manifest, parameters=self._parameters(runs, m), preprocessing=prep.to_dict(),
            timings={"total": time.perf_counter() - t0},
            methods=self._methods(fitted),
            layers=layers,
            classes={name: int(idx) for name, idx, _, _ in class_inputs},
            class_inputs={"split": split, "max_inputs": max_inputs,
                          "n_inputs": {k: int(v) for k, v in inputs.groupby("class").size().items()}},
            concepts={c: {"n_images": len(sets[c]), "n_read": int((row_of[c] >= 0).sum()), "hash": hash_files(sets[c])} for c in names},
            random_pool={"source": str(random_pool) if isinstance(random_pool, (str, os.PathLike)) else "paths",
                         "n_images": len(pool), "n_read": int((row_of[NULL] >= 0).sum()), "hash": hash_files(pool)},
        )
        return TCAVResult(table=table, runs=runs_frame, derivatives=derivs, cavs=cav_frame,
                          cav_vectors={k: f.vectors for k, f in fitted.items()}, sets=sets_frame, inputs=inputs,
                          provenance=prov, skipped=tuple(skipped + derivative_state["skipped"]))

    def _parameters(self, runs, m):
        return {"method": self.method, "pool": self.pool, "design": self.design, "runs": int(runs),
                "runs_requested": self.runs, "null_runs": int(self.null_runs), "concept_size": int(m),
                "random_size": int(m), "test": self.test, "correction": self.correction, "alpha": self.alpha,
                "margin": self.margin, "gate_quantile": self.gate_quantile, "n_bootstrap": self.n_bootstrap,
                "n_permutations": self.n_permutations, "cv_folds": self.cv_folds,
                "cav_alpha": self.cav_alpha, "seed": self.seed}

    def _methods(self, fitted):
        return {
            "cav": next(iter(fitted.values())).method,
            "score": "fraction of class inputs with d logit_k/d f_l(x) . v > 0 (explicit class logit k, unit CAV v)",
            "magnitude": "sum of positive S / sum of |S| over class inputs",
            "test": {"mannwhitney": "two-sided Mann-Whitney U (scipy.stats.mannwhitneyu, asymptotic, tie-corrected)",
                     "welch": "two-sided Welch t-test (scipy.stats.ttest_ind, equal_var=False)",
                     "permutation": f"two-sided permutation test of the Welch statistic ({self.n_permutations} resamples)"}[self.test],
            "null": f"{self.null_runs} random-vs-random CAVs: pseudo-concepts of random-pool images against disjoint random sets",
            "gate": f"pooled held-out CAV accuracy > the {self.gate_quantile:g} quantile of the pooled accuracy of random "
                    "groups of as many null CAVs",
            "correction": {"holm": "Holm step-down (FWER)", "bh": "Benjamini-Hochberg (FDR)", "none": "none"}[self.correction],
            "equivalence": f"TOST (two one-sided Welch t-tests) of |score - null| < {self.margin:g} at level {self.alpha:g}",
            "audit": "fail: Holm over the audit's gated tests < alpha; pass: equivalence at every gated layer; else inconclusive",
            "ci": f"percentile bootstrap of the mean run score ({self.n_bootstrap} resamples, 95 %)",
            "stability": "mean pairwise cosine of the concept's CAVs across runs",
            "accuracy": f"cross-fitted ({self.cv_folds} stratified folds at most), CAV fitted on all examples",
        }

    def run_arrays(self, concept_activations, pool_activations, gradients):
        """Run the experiment on precomputed activations and gradients (a stage that takes cached inputs).

        Parameters
        ----------
        concept_activations : dict
            ``{concept: {layer: ndarray [n_images, dim]}}`` in the CAV space (flattened maps, or
            pooled channels).
        pool_activations : dict
            ``{layer: ndarray [n_pool, dim]}`` of the random pool.
        gradients : dict
            ``{class: {layer: ndarray [n_inputs, dim]}}``: d logit_class / d activation of each class
            input, in the same space (for pooled CAVs: the spatially summed gradient).

        Returns
        -------
        TCAVResult
        """
        t0 = time.perf_counter()
        self._validate()
        rng = np.random.default_rng(self.seed)
        names = list(concept_activations)
        layers = list(pool_activations)
        sizes = {c: len(next(iter(concept_activations[c].values()))) for c in names}
        pool_size = len(pool_activations[layers[0]])
        runs, m, parts, counters, null_pos, null_neg = _plan(self.design, sizes, pool_size, self.runs, self.null_runs,
                                                             self.concept_size, rng)
        acts = {layer: np.concatenate([concept_activations[c][layer] for c in names] + [pool_activations[layer]]) for layer in layers}
        offsets = np.cumsum([0] + [sizes[c] for c in names])
        row_of = {c: offsets[i] + np.arange(sizes[c]) for i, c in enumerate(names)}
        row_of[NULL] = offsets[-1] + np.arange(pool_size)
        classes = [str(k) for k in gradients]

        def derivatives(fitted):
            return {(layer, str(k)): (np.asarray(g[layer], np.float32) @ fitted[layer].vectors.T) for k, g in gradients.items() for layer in layers}

        images = [f"{c}:{i}" for c in names for i in range(sizes[c])] + [f"{NULL}:{i}" for i in range(pool_size)]
        table, runs_frame, cav_frame, sets_frame, derivs, fitted = self._experiment(
            names, acts, images, row_of, parts, counters, null_pos, null_neg, runs, layers, classes, derivatives, rng)
        prov = provenance(parameters=self._parameters(runs, m), timings={"total": time.perf_counter() - t0},
                          methods=self._methods(fitted), layers=layers, class_inputs="precomputed arrays (TCAV.run_arrays)")
        inputs = pd.DataFrame([{"class": str(k), "position": i, "row": i, "image": ""}
                               for k, g in gradients.items() for i in range(len(next(iter(g.values()))))])
        return TCAVResult(table=table, runs=runs_frame, derivatives=derivs, cavs=cav_frame,
                          cav_vectors={k: f.vectors for k, f in fitted.items()}, sets=sets_frame, inputs=inputs, provenance=prov)

    def _experiment(self, names, acts, images, row_of, parts, counters, null_pos, null_neg, runs, layers, classes,
                    derivative_fn, rng):
        """Fit every CAV, get the derivatives, test. CAV order per layer: each concept's runs, then the null's."""
        n_null = len(null_pos)
        pos = [row_of[c][parts[c][r]] for c in names for r in range(runs)] + [row_of[NULL][q] for q in null_pos]
        neg = [row_of[NULL][counters[r]] for _ in names for r in range(runs)] + [row_of[NULL][q] for q in null_neg]
        owners = np.array([c for c in names for _ in range(runs)] + [NULL] * n_null, dtype=object)
        run_of = np.concatenate([np.tile(np.arange(runs), len(names)), np.arange(n_null)])
        cav_seeds = rng.integers(0, 2**31 - 1, size=len(layers))
        fitted = {
            layer: fit_cavs(acts[layer], pos, neg, self.method, self.cv_folds, self.cav_alpha, seed=int(s))
            for layer, s in zip(layers, cav_seeds)
        }
        derivatives = derivative_fn(fitted)
        table, runs_frame, cav_frame = self._statistics(names, owners, run_of, runs, layers, classes, fitted, derivatives, rng)
        pos_name = [f"{o}/run{r}" if o != NULL else f"null/run{r}" for o, r in zip(owners, run_of)]
        neg_name = [f"counter/run{r}" if o != NULL else f"null-counter/run{r}" for o, r in zip(owners, run_of)]
        cav_frame["positive_set"] = np.tile(pos_name, len(layers))
        cav_frame["negative_set"] = np.tile(neg_name, len(layers))
        members = {**dict(zip(pos_name, pos)), **dict(zip(neg_name, neg))}
        sets_frame = pd.DataFrame([{"set": k, "image": images[i]} for k, idx in members.items() for i in idx])
        return table, runs_frame, cav_frame, sets_frame, derivatives, fitted

    # -- stages

    def _flat(self, t):
        if self.pool == "none" or t.dim() == 2:
            return t.reshape(t.shape[0], -1)
        return t.mean(dim=(2, 3)) if self.pool == "mean" else t.amax(dim=(2, 3))

    def _activations(self, model, paths, sources, layers, prep):
        """Activations of the images that could be read: ``(acts, kept positions, skipped)``."""
        batches = make_loader(Manifest.from_images(paths, kind="image"), prep, batch_size=self.batch_size,
                              num_workers=self.num_workers, skip_bad=self.skip_bad)
        chunks, kept = {layer: [] for layer in layers}, []
        bar = tqdm(total=len(paths), desc="tcav activations", unit="img", disable=not self.progress)
        for rows, maps, _ in iter_activations(model, batches, layers, pool="none"):
            for layer in layers:
                chunks[layer].append(self._flat(maps[layer]).float().cpu().numpy())
            kept.append(np.asarray(rows))
            bar.update(len(rows))
        bar.close()
        skipped = [{"source": sources[b.manifest_row], "manifest_row": None, "image": str(paths[b.manifest_row]),
                    "error": b.error} for b in batches.skipped]
        if not kept:
            raise ConceptLensError("no concept or random-pool image could be read; see the warnings above")
        return {layer: np.concatenate(c) for layer, c in chunks.items()}, np.concatenate(kept), skipped

    def _derivatives(self, model, class_inputs, layers, prep, fitted):
        """``({(layer, class): S [n_inputs, n_cavs]}, inputs frame, skipped)``: one gradient pass per
        class, one matmul per layer; ``inputs`` lists the inputs that could be read."""
        device = model.device
        cavs = {layer: torch.from_numpy(f.vectors).to(device) for layer, f in fitted.items()}
        out, inputs, skipped = {}, [], []
        total = sum(len(sub) for _, _, sub, _ in class_inputs)
        bar = tqdm(total=total, desc="tcav gradients", unit="img", disable=not self.progress)
        for name, index, sub, rows in class_inputs:
            batches = make_loader(sub, prep, batch_size=self.batch_size, num_workers=self.num_workers, skip_bad=self.skip_bad)
            chunks, read = {layer: [] for layer in layers}, []
            for gb in iter_gradients(model, batches, layers, (index,)):
                for layer in layers:
                    g = gb.gradients[layer][0]
                    g = g.reshape(g.shape[0], -1) if self.pool == "none" or g.dim() == 2 else g.sum(dim=(2, 3))
                    chunks[layer].append((g.float() @ cavs[layer].T).cpu().numpy())
                read.append(np.asarray(gb.rows))
                bar.update(len(gb.rows))
            skipped += [{"source": f"class {name}", "manifest_row": int(rows[b.manifest_row]), "image": b.image, "error": b.error}
                        for b in batches.skipped]
            if not read:
                raise ConceptLensError(f"no input image of class {name!r} could be read; see the warnings above")
            read = np.concatenate(read)
            inputs += [{"class": name, "position": i, "row": int(rows[j]), "image": sub.frame["image"].iloc[j]}
                       for i, j in enumerate(read)]
            for layer in layers:
                out[(layer, name)] = np.concatenate(chunks[layer]).astype(np.float32)
        bar.close()
        return out, pd.DataFrame(inputs, columns=["class", "position", "row", "image"]), skipped

    def _gate(self, accuracy, n_concepts, runs, rng):
        """Per concept: pooled accuracy over its runs, and the gate - the ``gate_quantile`` of the pooled
        accuracy of random groups of ``runs`` null CAVs (drawn without replacement within a group)."""
        null = accuracy[n_concepts * runs:]
        groups = np.argsort(rng.random((2000, len(null))), axis=1)[:, : min(runs, len(null))]
        gate = float(np.quantile(null[groups].mean(axis=1), self.gate_quantile))
        return accuracy[: n_concepts * runs].reshape(n_concepts, runs).mean(axis=1), gate

    def _statistics(self, names, owners, run_of, runs, layers, classes, fitted, derivatives, rng):
        n_c = len(names)
        null = slice(n_c * runs, None)
        n_null = len(owners) - n_c * runs
        run_rows, table_rows, a_rows, b_rows = [], [], [], []
        for layer in layers:
            acc = fitted[layer].accuracy
            vectors = fitted[layer].vectors
            stability = stats.mean_pairwise_cosine(vectors[: n_c * runs].reshape(n_c, runs, -1))
            null_stability = float(stats.mean_pairwise_cosine(vectors[null]))
            pooled, gate = self._gate(acc, n_c, runs, rng)
            for cname in classes:
                s = derivatives[(layer, cname)]
                score = (s > 0).mean(axis=0)
                absum = np.abs(s).sum(axis=0)
                magnitude = np.where(absum > 0, np.clip(s, 0, None).sum(axis=0) / np.where(absum > 0, absum, 1), 0.5)
                run_rows.append(pd.DataFrame({
                    "concept": owners, "role": np.where(owners == NULL, "null", "concept"), "layer": layer, "class": cname,
                    "run": run_of, "cav": np.arange(len(owners)), "score": score, "magnitude": magnitude, "cav_accuracy": acc}))
                for i, concept in enumerate(names):
                    sl = slice(i * runs, (i + 1) * runs)
                    a_rows.append(score[sl])
                    b_rows.append(score[null])
                    table_rows.append({
                        "concept": concept, "layer": layer, "class": cname,
                        "score_mean": float(score[sl].mean()), "score_sd": float(score[sl].std(ddof=1)),
                        "null_mean": float(score[null].mean()), "null_sd": float(score[null].std(ddof=1)),
                        "magnitude_mean": float(magnitude[sl].mean()),
                        "cav_accuracy": float(pooled[i]), "accuracy_gate": gate, "null_accuracy": float(acc[null].mean()),
                        "cav_stability": float(stability[i]), "null_stability": null_stability,
                        "n_runs": runs, "n_null_runs": n_null, "n_inputs": int(s.shape[0]),
                    })
        table = pd.DataFrame(table_rows)
        a, b = np.stack(a_rows), np.stack(b_rows)
        table["difference"] = table["score_mean"] - table["null_mean"]
        table["direction"] = np.where(table["difference"] > 0, "more", np.where(table["difference"] < 0, "less", ""))
        table["p_value"] = stats.two_sample_pvalues(a, b, self.test, self.n_permutations, seed=int(rng.integers(2**31 - 1)))
        low, high = stats.bootstrap_ci(a, n_resamples=self.n_bootstrap, seed=int(rng.integers(2**31 - 1)))
        table["score_ci_low"], table["score_ci_high"] = low, high
        table["p_equivalence"], table["diff_ci_low"], table["diff_ci_high"] = stats.equivalence_test(a, b, self.margin, self.alpha)
        table["equivalent"] = table["p_equivalence"] < self.alpha
        table["cav_ok"] = table["cav_accuracy"] > table["accuracy_gate"]
        table["gate"] = np.where(table["cav_ok"], "", [f"CAV accuracy {x:.2f} <= random-vs-random {g:.2f}: not tested"
                                                       for x, g in zip(table["cav_accuracy"], table["accuracy_gate"])])
        gated = int((~table["cav_ok"]).sum())
        if gated:
            logger.info("%d of %d tests have CAVs no better than random-vs-random ones: flagged, not tested", gated, len(table))
        table["p_adjusted"] = stats.adjust_pvalues(np.where(table["cav_ok"], table["p_value"], np.nan), self.correction)
        table["significant"] = table["cav_ok"] & (table["p_adjusted"] < self.alpha)
        cols = ["concept", "layer", "class", "score_mean", "score_ci_low", "score_ci_high", "score_sd", "null_mean", "null_sd",
                "difference", "direction", "magnitude_mean", "p_value", "p_adjusted", "significant", "p_equivalence",
                "diff_ci_low", "diff_ci_high", "equivalent", "cav_accuracy", "accuracy_gate", "cav_ok", "gate",
                "cav_stability", "null_accuracy", "null_stability", "n_runs", "n_null_runs", "n_inputs"]
        cav_frame = pd.DataFrame([
            {"layer": layer, "cav": k, "role": "null" if o == NULL else "concept", "concept": o, "run": int(run_of[k]),
             "accuracy": float(fitted[layer].accuracy[k])}
            for layer in layers for k, o in enumerate(owners)
        ])
        return table[cols], pd.concat(run_rows, ignore_index=True), cav_frame

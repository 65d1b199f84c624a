"""TCAV with honest statistics: shared gradients, seeded disjoint random sets, calibrated tests.

``TCAV(model, layers).run(concepts, random_pool, classes, data)`` does, in this order:

1. draws the experiment's sets (seeded): concept examples, random counter-example sets that are
   disjoint from each other and from the concepts, and random "pseudo-concepts" for the null;
2. captures the layers' activations of every image once (:func:`~conceptlens.representation.extract.iter_activations`);
3. fits all CAVs of a layer (concept-vs-random runs and random-vs-random null runs);
4. streams the class inputs once per class through :func:`~conceptlens.representation.extract.iter_gradients`
   (one forward and one backward per batch for all layers) and takes one matmul of each batch's
   gradients with all CAVs of the layer: ``S = d logit_k / d f_l(x) · v`` (the explicit class
   logit, no loss and no sign flips);
5. tests each (concept, layer, class) against its null, corrects across the whole experiment and
   flags CAVs near chance.

Designs (``design``):

``split`` (default)
    Run ``r`` uses the ``r``-th of ``runs`` disjoint parts of the concept's images against random
    set ``N_r``; null run ``r`` uses a pseudo-concept ``P_r`` (random images, as many as a concept
    part) against the same ``N_r``. All sets are disjoint, so for a concept with no signal the
    concept runs and null runs are exchangeable and the test has its nominal size.
``standard``
    tf/tcav's design: the whole concept set against each ``N_r``; null: one fixed random set
    (fixed roles, no ``±CAV`` symmetry) against each ``N_r``. More concept images per CAV, but the
    runs share the concept set, so the run-to-run spread misses the variability of the concept
    sample itself and the t-test is anti-conservative: with concepts drawn from the random pool of
    the concept world it rejects about 25 % of true nulls at alpha = 0.05 (``split``: 4.5 %; see
    ``tests/test_tcav.py``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .. import __version__
from ..data import Manifest, make_loader
from ..errors import ConceptLensError, did_you_mean
from ..models import load_model, validate_layers
from ..representation.extract import iter_activations, iter_gradients
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
    mask = np.ones(len(frame), bool)
    if split is not None:
        if "split" not in frame.columns:
            raise ConceptLensError(f"split {split!r} requested but manifest {manifest.path} has no 'split' column")
        mask &= (frame["split"] == split).to_numpy()
        if not mask.any():
            raise ConceptLensError(f"manifest {manifest.path} has no rows with split {split!r} (splits: {', '.join(sorted(frame['split'].unique()))})")
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


def _set_hash(paths):
    h = hashlib.sha256()
    for p in paths:
        st = os.stat(p)
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- the plan

def _plan(design, concept_sizes, pool_size, runs, concept_size, random_size, rng):
    """Draw the experiment's sets as index arrays.

    Concept sets index their own concept's images; pool sets index the random pool. Returns
    ``(m, n, concept_parts, pseudo, counters)``: ``concept_parts[name]`` is ``[runs, m]`` (the same
    row repeated in the standard design), ``pseudo`` the null's positive sets ``[runs, m]``,
    ``counters`` the random sets ``[runs, n]``; all pool sets are disjoint.
    """
    smallest = min(concept_sizes.values())
    small_name = min(concept_sizes, key=concept_sizes.get)
    if design == "split":
        m = concept_size if concept_size is not None else smallest // runs
        need_c = m * runs
    else:
        m = concept_size if concept_size is not None else smallest
        need_c = m
    if m < 2 or smallest < need_c:
        per = "per run (the split design gives each run its own part)" if design == "split" else "per concept"
        raise ConceptLensError(
            f"concept {small_name!r} has {smallest} images; design {design} with {runs} runs and "
            f"{max(m, 2)} concept examples {per} needs {max(need_c, 2 * (runs if design == 'split' else 1))}; "
            "add images, lower runs, or set concept_size"
        )
    pseudo_need = m * runs if design == "split" else m
    n = random_size if random_size is not None else (pool_size - pseudo_need) // runs
    if n < 2 or pool_size < pseudo_need + runs * n:
        raise ConceptLensError(
            f"the random pool has {pool_size} images; {runs} disjoint random sets of {max(n, 2)} plus "
            f"{pseudo_need} pseudo-concept images for the null need {pseudo_need + runs * max(n, 2)}; "
            "add random images, lower runs, or set random_size"
        )
    logger.info("TCAV plan (%s): %d runs, %d concept examples and %d random counter-examples per CAV", design, runs, m, n)
    parts = {}
    for name, size in concept_sizes.items():
        perm = rng.permutation(size)
        if design == "split":
            parts[name] = perm[: m * runs].reshape(runs, m)
        else:
            parts[name] = np.tile(np.sort(perm[:m]), (runs, 1))
    perm = rng.permutation(pool_size)
    if design == "split":
        pseudo = perm[: m * runs].reshape(runs, m)
    else:
        pseudo = np.tile(np.sort(perm[:m]), (runs, 1))
    counters = perm[pseudo_need : pseudo_need + runs * n].reshape(runs, n)
    return m, n, parts, pseudo, counters


# --------------------------------------------------------------------------- result

@dataclass(frozen=True)
class TCAVResult:
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
    """

    table: pd.DataFrame = field(repr=False)
    runs: pd.DataFrame = field(repr=False)
    derivatives: dict = field(repr=False)
    cavs: pd.DataFrame = field(repr=False)
    cav_vectors: dict = field(repr=False)
    sets: pd.DataFrame = field(repr=False)
    inputs: pd.DataFrame = field(repr=False)
    provenance: dict = field(repr=False)

    def to_frame(self):
        """The table: ``concept, layer, class, score_mean, score_ci_low, score_ci_high, null_mean,
        magnitude_mean, p_value, p_adjusted, significant, cav_accuracy, cav_ok, cav_stability,
        null_accuracy, n_runs, n_inputs``."""
        return self.table.copy()

    def audit(self, pairs):
        """Verdicts for ``(concept, class)`` pairs that must be *insensitive* (a bias audit).

        Parameters
        ----------
        pairs : iterable of (str, str) or "concept:class" strings

        Returns
        -------
        DataFrame
            One row per pair: ``concept, class, verdict`` (``fail`` when the concept is significant
            for the class at any tested layer, ``inconclusive`` when no layer has a CAV above the
            accuracy gate, else ``pass``), ``significant_layers``, ``min_p_adjusted``, ``layer`` (of
            the smallest adjusted p-value), its ``score_mean`` and ``null_mean``, and ``evidence``.
        """
        t = self.table
        rows = []
        for pair in pairs:
            concept, cls = pair.split(":", 1) if isinstance(pair, str) else pair
            for value, column in ((concept, "concept"), (cls, "class")):
                known = sorted(t[column].unique())
                if value not in known:
                    raise ConceptLensError(f"audit pair {concept}:{cls}: {column} {value!r} was not tested"
                                           f"{did_you_mean(value, known)} (tested: {', '.join(known)})")
            sub = t[(t["concept"] == concept) & (t["class"] == cls)]
            sig = sub[sub["significant"]]
            valid = sub[sub["cav_ok"]]
            best = (valid if len(valid) else sub).sort_values("p_adjusted", na_position="last").iloc[0]
            if len(sig):
                verdict = "fail"
                evidence = "; ".join(
                    f"{r.layer}: score {r.score_mean:.3f} vs null {r.null_mean:.3f}, p_adj {r.p_adjusted:.2g}" for r in sig.itertuples()
                )
            elif not len(valid):
                verdict = "inconclusive"
                evidence = f"no layer has a CAV above the accuracy gate (best {sub['cav_accuracy'].max():.2f})"
            else:
                verdict = "pass"
                evidence = (f"not significant at {len(valid)} layer(s); smallest p_adj {best.p_adjusted:.2g} at {best.layer} "
                            f"(score {best.score_mean:.3f} vs null {best.null_mean:.3f})")
            rows.append({
                "concept": concept, "class": cls, "verdict": verdict,
                "significant_layers": ",".join(sig["layer"]), "min_p_adjusted": float(valid["p_adjusted"].min()) if len(valid) else np.nan,
                "layer": best.layer, "score_mean": float(best.score_mean), "null_mean": float(best.null_mean),
                "alpha": self.provenance["parameters"]["alpha"], "evidence": evidence,
            })
        return pd.DataFrame(rows)

    def save(self, directory):
        """Write ``tcav.csv``, ``runs.csv``, ``cavs.csv``, ``sets.csv``, ``inputs.csv``, ``provenance.json``,
        ``derivatives/<k>.npy`` (indexed by ``derivatives.csv``: ``layer, class, file``) and
        ``cav_vectors/<k>.npy`` (indexed by ``cav_vectors.csv``: ``layer, file``)."""
        d = Path(directory)
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
        (d / "provenance.json").write_text(json.dumps(self.provenance, indent=2, sort_keys=True))
        return d

    @classmethod
    def load(cls, directory):
        """Read a result written by :meth:`save`."""
        d = Path(directory)
        if not (d / "tcav.csv").is_file() or not (d / "provenance.json").is_file():
            raise ConceptLensError(f"{d} holds no TCAV result (tcav.csv and provenance.json); write one with TCAVResult.save or `conceptlens tcav`")
        str_cols = {"concept": str, "layer": str, "class": str}
        index = pd.read_csv(d / "derivatives.csv", dtype=str, keep_default_na=False)
        vindex = pd.read_csv(d / "cav_vectors.csv", dtype=str, keep_default_na=False)
        return cls(
            table=pd.read_csv(d / "tcav.csv", dtype=str_cols, keep_default_na=False, na_values=[""]),
            runs=pd.read_csv(d / "runs.csv", dtype=str_cols, keep_default_na=False),
            derivatives={(r.layer, r._2): np.load(d / r.file) for r in index.itertuples()},
            cavs=pd.read_csv(d / "cavs.csv", dtype=str_cols, keep_default_na=False),
            cav_vectors={r.layer: np.load(d / r.file) for r in vindex.itertuples()},
            sets=pd.read_csv(d / "sets.csv", dtype=str, keep_default_na=False),
            inputs=pd.read_csv(d / "inputs.csv", dtype={"class": str, "image": str}, keep_default_na=False),
            provenance=json.loads((d / "provenance.json").read_text()),
        )


# --------------------------------------------------------------------------- the analyzer

class TCAV:
    """Testing with concept activation vectors, with calibrated significance.

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
    runs : int
        Runs per concept (>= 10 recommended) and null runs, each with its own random set.
    concept_size, random_size : int, optional
        Concept examples and random counter-examples per CAV (default: as many as the smallest
        concept and the pool allow).
    test : {"welch", "permutation"}
        Two-sided test of concept-run scores against null-run scores.
    correction : {"holm", "bh", "none"}
        Across every (concept, layer, class) test of the experiment that passes the accuracy gate.
    alpha : float
        Significance level of the adjusted p-values.
    min_accuracy : float
        Accuracy gate: a concept whose mean held-out CAV accuracy at a layer is below this is
        flagged (``cav_ok`` False), left out of the correction and never significant.
    n_bootstrap, n_permutations : int
        Resamples for the score CI and the permutation test.
    test_fraction : float
        Held-out share of each CAV's examples for its accuracy.
    cav_alpha : float
        Regularisation of ``sgd``/``logistic`` CAVs.
    seed : int
        Seeds every random choice (sets, splits, classifiers, bootstrap, permutations).
    batch_size, num_workers : int
        Image loading; memory is bounded by one batch of activations and gradients.
    preprocessing : Preprocessing, optional
        Default: the model's, updated by the data manifest's sidecar; concept and random images use
        the same.
    progress : bool
    """

    def __init__(self, model, layers, method="mean-diff", pool="none", design="split", runs=10, concept_size=None,
                 random_size=None, test="welch", correction="holm", alpha=0.05, min_accuracy=0.6, n_bootstrap=2000,
                 n_permutations=9999, test_fraction=0.25, cav_alpha=0.01, seed=0, batch_size=64, num_workers=0,
                 preprocessing=None, progress=True):
        self.model, self.layers, self.method, self.pool, self.design = model, layers, method, pool, design
        self.runs, self.concept_size, self.random_size = runs, concept_size, random_size
        self.test, self.correction, self.alpha, self.min_accuracy = test, correction, alpha, min_accuracy
        self.n_bootstrap, self.n_permutations, self.test_fraction, self.cav_alpha = n_bootstrap, n_permutations, test_fraction, cav_alpha
        self.seed, self.batch_size, self.num_workers = seed, batch_size, num_workers
        self.preprocessing, self.progress = preprocessing, progress

    def _validate(self):
        def choice(name, allowed):
            value = getattr(self, name)
            if value not in allowed:
                raise ConceptLensError(f"the {name} parameter of TCAV must be one of {', '.join(allowed)}; got {value!r}")

        choice("method", CAV_METHODS)
        choice("pool", POOLS)
        choice("design", DESIGNS)
        choice("test", stats.TESTS)
        choice("correction", stats.CORRECTIONS)
        if not isinstance(self.runs, (int, np.integer)) or self.runs < 2:
            raise ConceptLensError(f"the runs parameter of TCAV must be an integer >= 2 (10 or more recommended); got {self.runs!r}")
        if self.runs < 10:
            logger.warning("TCAV with %d runs: 10 or more are recommended for a stable test", self.runs)
        if not 0 < self.alpha < 1:
            raise ConceptLensError(f"the alpha parameter of TCAV must be in (0, 1); got {self.alpha!r}")
        for name in ("concept_size", "random_size"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, np.integer)) or v < 2):
                raise ConceptLensError(f"the {name} parameter of TCAV must be an integer >= 2 or None; got {v!r}")

    def run(self, concepts, random_pool, classes, data, split=None, max_inputs=None, concept_names=None):
        """Run the experiment.

        Parameters
        ----------
        concepts : path or dict
            Concept sets (see :func:`load_concept_sets`).
        random_pool : path or list of paths
            Folder of images or manifest CSV (see :func:`load_image_pool`), or image paths. Images
            that are also concept examples are removed from it.
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
        m, n, parts, pseudo, counters = _plan(
            self.design, {k: len(v) for k, v in sets.items()}, len(pool), self.runs, self.concept_size, self.random_size, rng
        )

        # Every image of the plan, once: concept parts, then pool images.
        names = list(sets)
        used_c = {c: np.unique(parts[c]) for c in names}
        used_p = np.unique(np.concatenate([pseudo.ravel(), counters.ravel()]))
        paths, offset, row_of = [], 0, {}
        for c in names:
            row_of[c] = np.full(len(sets[c]), -1)
            row_of[c][used_c[c]] = offset + np.arange(len(used_c[c]))
            paths += [sets[c][i] for i in used_c[c]]
            offset += len(used_c[c])
        row_of[NULL] = np.full(len(pool), -1)
        row_of[NULL][used_p] = offset + np.arange(len(used_p))
        paths += [pool[i] for i in used_p]
        acts = self._activations(model, paths, layers, prep)

        class_meta = [(name, len(sub)) for name, _, sub, _ in class_inputs]
        table, runs_frame, cav_frame, sets_frame, derivatives, fitted = self._experiment(
            names, acts, [str(p) for p in paths], row_of, parts, pseudo, counters, layers, class_meta,
            lambda fitted: self._derivatives(model, class_inputs, layers, prep, fitted), rng,
        )
        provenance = {
            **self._provenance_core(m, n, fitted),
            "model": model.spec,
            "weights_hash": model.weights_hash,
            "layers": layers,
            "classes": {name: int(idx) for name, idx, _, _ in class_inputs},
            "data": {"manifest": str(manifest.path), "manifest_hash": manifest.content_hash(), "split": split,
                     "max_inputs": max_inputs, "n_inputs": {name: len(sub) for name, _, sub, _ in class_inputs}},
            "concepts": {c: {"n_images": len(sets[c]), "hash": _set_hash(sets[c])} for c in names},
            "random_pool": {"source": str(random_pool) if isinstance(random_pool, (str, os.PathLike)) else "paths",
                            "n_images": len(pool), "hash": _set_hash(pool)},
            "preprocessing": prep.to_dict(),
        }
        inputs = pd.DataFrame([{"class": name, "position": i, "row": int(r), "image": img}
                               for name, _, sub, rows in class_inputs for i, (r, img) in enumerate(zip(rows, sub.frame["image"]))])
        return TCAVResult(table=table, runs=runs_frame, derivatives=derivatives, cavs=cav_frame,
                          cav_vectors={k: f.vectors for k, f in fitted.items()}, sets=sets_frame, inputs=inputs, provenance=provenance)

    def _provenance_core(self, m, n, fitted):
        return {
            "library": f"conceptlens {__version__}",
            "parameters": {"method": self.method, "pool": self.pool, "design": self.design, "runs": int(self.runs),
                           "concept_size": int(m), "random_size": int(n), "test": self.test,
                           "correction": self.correction, "alpha": self.alpha, "min_accuracy": self.min_accuracy,
                           "n_bootstrap": self.n_bootstrap, "n_permutations": self.n_permutations,
                           "test_fraction": self.test_fraction, "cav_alpha": self.cav_alpha, "seed": self.seed},
            "methods": {
                "cav": next(iter(fitted.values())).method,
                "score": "fraction of class inputs with d logit_k/d f_l(x) . v > 0 (explicit class logit k, unit CAV v)",
                "magnitude": "sum of positive S / sum of |S| over class inputs",
                "test": "two-sided Welch t-test (scipy.stats.ttest_ind, equal_var=False)" if self.test == "welch"
                        else f"two-sided permutation test of the Welch statistic ({self.n_permutations} resamples)",
                "null": "random-vs-random CAVs: pseudo-concepts from the random pool (fixed positive role) against the same random sets",
                "correction": {"holm": "Holm step-down (FWER)", "bh": "Benjamini-Hochberg (FDR)", "none": "none"}[self.correction],
                "ci": f"percentile bootstrap of the mean run score ({self.n_bootstrap} resamples, 95 %)",
                "stability": "mean pairwise cosine of the concept's CAVs across runs",
            },
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
        self._validate()
        rng = np.random.default_rng(self.seed)
        names = list(concept_activations)
        layers = list(pool_activations)
        sizes = {c: len(next(iter(concept_activations[c].values()))) for c in names}
        pool_size = len(pool_activations[layers[0]])
        m, n, parts, pseudo, counters = _plan(self.design, sizes, pool_size, self.runs, self.concept_size, self.random_size, rng)
        acts = {layer: np.concatenate([concept_activations[c][layer] for c in names] + [pool_activations[layer]]) for layer in layers}
        offsets = np.cumsum([0] + [sizes[c] for c in names])
        row_of = {c: offsets[i] + np.arange(sizes[c]) for i, c in enumerate(names)}
        row_of[NULL] = offsets[-1] + np.arange(pool_size)
        class_meta = [(str(k), len(next(iter(g.values())))) for k, g in gradients.items()]

        def derivatives(fitted):
            return {(layer, str(k)): (np.asarray(g[layer], np.float32) @ fitted[layer].vectors.T) for k, g in gradients.items() for layer in layers}

        images = [f"{c}:{i}" for c in names for i in range(sizes[c])] + [f"{NULL}:{i}" for i in range(pool_size)]
        table, runs_frame, cav_frame, sets_frame, derivs, fitted = self._experiment(
            names, acts, images, row_of, parts, pseudo, counters, layers, class_meta, derivatives, rng)
        provenance = {**self._provenance_core(m, n, fitted), "layers": layers, "inputs": "precomputed arrays (TCAV.run_arrays)"}
        inputs = pd.DataFrame([{"class": name, "position": i, "row": i, "image": ""} for name, k in class_meta for i in range(k)])
        return TCAVResult(table=table, runs=runs_frame, derivatives=derivs, cavs=cav_frame,
                          cav_vectors={k: f.vectors for k, f in fitted.items()}, sets=sets_frame, inputs=inputs, provenance=provenance)

    def _experiment(self, names, acts, images, row_of, parts, pseudo, counters, layers, class_meta, derivative_fn, rng):
        """Fit every CAV, get the derivatives, test. CAV order per layer: each concept's runs, then the null's."""
        pos = [row_of[c][parts[c][r]] for c in names for r in range(self.runs)]
        pos += [row_of[NULL][pseudo[r]] for r in range(self.runs)]
        neg = [row_of[NULL][counters[r]] for _ in range(len(names) + 1) for r in range(self.runs)]
        owners = [c for c in names for _ in range(self.runs)] + [NULL] * self.runs
        cav_seeds = rng.integers(0, 2**31 - 1, size=len(layers))
        fitted = {
            layer: fit_cavs(acts[layer], pos, neg, self.method, self.test_fraction, self.cav_alpha, seed=int(s))
            for layer, s in zip(layers, cav_seeds)
        }
        derivatives = derivative_fn(fitted)
        table, runs_frame, cav_frame = self._statistics(names, owners, layers, class_meta, fitted, derivatives, rng)
        runs_of = np.tile(np.arange(self.runs), len(names) + 1)
        pos_name = [f"{o}/run{r}" for o, r in zip(owners, runs_of)]
        neg_name = [f"counter/run{r}" for r in runs_of]
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

    def _activations(self, model, paths, layers, prep):
        batches = make_loader(Manifest.from_images(paths), prep, batch_size=self.batch_size, num_workers=self.num_workers)
        chunks = {layer: [] for layer in layers}
        bar = tqdm(total=len(paths), desc="tcav activations", unit="img", disable=not self.progress)
        for rows, maps, _ in iter_activations(model, batches, layers, pool="none"):
            for layer in layers:
                chunks[layer].append(self._flat(maps[layer]).float().cpu().numpy())
            bar.update(len(rows))
        bar.close()
        return {layer: np.concatenate(c) for layer, c in chunks.items()}

    def _derivatives(self, model, class_inputs, layers, prep, fitted):
        """``{(layer, class): S [n_inputs, n_cavs]}``: one gradient pass per class, one matmul per layer."""
        device = model.device
        cavs = {layer: torch.from_numpy(f.vectors).to(device) for layer, f in fitted.items()}
        out = {}
        total = sum(len(sub) for _, _, sub, _ in class_inputs)
        bar = tqdm(total=total, desc="tcav gradients", unit="img", disable=not self.progress)
        for name, index, sub, _ in class_inputs:
            batches = make_loader(sub, prep, batch_size=self.batch_size, num_workers=self.num_workers)
            chunks = {layer: [] for layer in layers}
            for gb in iter_gradients(model, batches, layers, (index,)):
                for layer in layers:
                    g = gb.gradients[layer][0]
                    g = g.reshape(g.shape[0], -1) if self.pool == "none" or g.dim() == 2 else g.sum(dim=(2, 3))
                    chunks[layer].append((g.float() @ cavs[layer].T).cpu().numpy())
                bar.update(len(gb.rows))
            for layer in layers:
                out[(layer, name)] = np.concatenate(chunks[layer]).astype(np.float32)
        bar.close()
        return out

    def _statistics(self, names, owners, layers, class_meta, fitted, derivatives, rng):
        runs = self.runs
        owners = np.asarray(owners)
        run_of = np.tile(np.arange(runs), len(names) + 1)
        run_rows, table_rows, a_rows, b_rows = [], [], [], []
        for layer in layers:
            acc = fitted[layer].accuracy
            vec = fitted[layer].vectors.reshape(len(names) + 1, runs, -1)
            stability = stats.mean_pairwise_cosine(vec)
            for cname, n_inputs in class_meta:
                s = derivatives[(layer, cname)]
                score = (s > 0).mean(axis=0)
                absum = np.abs(s).sum(axis=0)
                magnitude = np.where(absum > 0, np.clip(s, 0, None).sum(axis=0) / np.where(absum > 0, absum, 1), 0.5)
                for k, owner in enumerate(owners):
                    run_rows.append({"concept": owner, "role": "null" if owner == NULL else "concept", "layer": layer,
                                     "class": cname, "run": int(run_of[k]), "cav": k, "score": float(score[k]),
                                     "magnitude": float(magnitude[k]), "cav_accuracy": float(acc[k])})
                null = slice(len(names) * runs, None)
                for i, concept in enumerate(names):
                    sl = slice(i * runs, (i + 1) * runs)
                    a_rows.append(score[sl])
                    b_rows.append(score[null])
                    table_rows.append({
                        "concept": concept, "layer": layer, "class": cname,
                        "score_mean": float(score[sl].mean()), "null_mean": float(score[null].mean()),
                        "magnitude_mean": float(magnitude[sl].mean()),
                        "cav_accuracy": float(acc[sl].mean()), "null_accuracy": float(acc[null].mean()),
                        "cav_stability": float(stability[i]), "null_stability": float(stability[-1]),
                        "n_runs": runs, "n_inputs": n_inputs,
                    })
        table = pd.DataFrame(table_rows)
        a, b = np.stack(a_rows), np.stack(b_rows)
        table["p_value"] = stats.two_sample_pvalues(a, b, self.test, self.n_permutations, seed=int(rng.integers(2**31 - 1)))
        low, high = stats.bootstrap_ci(a, n_resamples=self.n_bootstrap, seed=int(rng.integers(2**31 - 1)))
        table["score_ci_low"], table["score_ci_high"] = low, high
        table["cav_ok"] = table["cav_accuracy"] >= self.min_accuracy
        gated = int((~table["cav_ok"]).sum())
        if gated:
            logger.info("%d of %d tests have CAVs below the accuracy gate %.2f: flagged, not tested", gated, len(table), self.min_accuracy)
        table["p_adjusted"] = stats.adjust_pvalues(np.where(table["cav_ok"], table["p_value"], np.nan), self.correction)
        table["significant"] = table["cav_ok"] & (table["p_adjusted"] < self.alpha)
        cols = ["concept", "layer", "class", "score_mean", "score_ci_low", "score_ci_high", "null_mean", "magnitude_mean",
                "p_value", "p_adjusted", "significant", "cav_accuracy", "cav_ok", "cav_stability", "null_accuracy",
                "null_stability", "n_runs", "n_inputs"]
        cav_frame = pd.DataFrame([
            {"layer": layer, "cav": k, "role": "null" if o == NULL else "concept", "concept": o, "run": int(run_of[k]),
             "accuracy": float(fitted[layer].accuracy[k])}
            for layer in layers for k, o in enumerate(owners)
        ])
        return table[cols], pd.DataFrame(run_rows), cav_frame

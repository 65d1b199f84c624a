"""Nearest neighbours in a layer's feature space (FAISS), and two dataset-review products.

* **k-NN** with self matches excluded, cosine similarity (inner product on L2-normalised
  features). ``"Flat"`` (the default) is exact; any FAISS ``index_factory`` string
  (``"IVF1024,Flat"``, ``"HNSW32"``, ...) for large N, recorded in the result. The exact k-NN of a
  set against itself - the dataset-review query - runs as a blocked symmetric self-join
  (:func:`self_knn`): ``X X^T`` is symmetric, so each block of similarities is computed once and
  serves the rows on both sides, half the multiply-adds of a FAISS ``IndexFlatIP`` search
  (``benchmarks/representation.py`` measures both). Queries from outside the set go to FAISS.
* **Label-issue candidates**, ranked by ``p_label``: the probability of the row's *given* label
  estimated from its neighbours' labels (self excluded), calibrated out of sample - an isotonic
  regression of "carries the class" on the fraction of neighbours voting for it, cross-fitted over
  seeded folds, so a row's own label never calibrates its own score (:func:`label_probability`).
  The default cut ``p_label <= 0.1`` flags labels that fewer than 1 in 10 rows with such a
  neighbourhood carry; ``benchmarks/representation.py`` reports precision and recall at that cut on
  worlds with planted label noise.
* **Near-duplicate candidates**: pairs of the k-NN graph that are much closer than images usually
  are to their nearest neighbour: cosine distance ``d = sqrt(2 - 2 cos)`` at most
  ``duplicate_ratio`` (default 0.3) times the median nearest-neighbour distance of the set (or,
  if given, cosine ``>= duplicate_threshold``). Each pair keeps its similarity and
  ``crosses_splits``; only a pair that crosses splits is a possible leak of the training set into
  the test set (:attr:`NeighborResult.leaks`).

Features are mean-centred before normalisation by default: activations after a ReLU are
non-negative, so raw cosines of unrelated images crowd near 1 and a threshold separates little.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..errors import ConceptLensError
from ..core.result import Result, provenance
from ._common import TEXT_COLUMNS, check_column, check_layers, layer_features, open_store, read_csv

__all__ = ["NeighborResult", "neighbors", "knn", "self_knn", "build_index", "label_votes", "label_probability",
           "duplicate_candidates"]

logger = logging.getLogger(__name__)

DUPLICATE_COLUMNS = ["row_a", "row_b", "manifest_row_a", "manifest_row_b", "image_a", "image_b", "split_a", "split_b",
                     "similarity", "distance_ratio", "crosses_splits"]
ISSUE_COLUMNS = ["row", "manifest_row", "image", "split", "label", "p_label", "suggested_label", "p_suggested", "agreement",
                 "suggested_fraction"]


def _faiss():
    import faiss

    return faiss


def build_index(x, index="Flat", nprobe=None):
    """A FAISS inner-product index over ``x`` (float32, already normalised for cosine).

    Parameters
    ----------
    x : ndarray [N, D]
    index : str
        A FAISS ``index_factory`` string; ``"Flat"`` is exact.
    nprobe : int, optional
        Inverted lists visited per query for IVF indexes.

    Returns
    -------
    faiss.Index
    """
    faiss = _faiss()
    x = np.ascontiguousarray(x, dtype=np.float32)
    try:
        idx = faiss.index_factory(x.shape[1], index, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ConceptLensError(f"the index parameter {index!r} is not a valid FAISS index_factory string "
                               f"(e.g. 'Flat', 'IVF256,Flat', 'HNSW32'): {str(exc).splitlines()[0]}") from None
    if not idx.is_trained:
        logger.info("training FAISS index %s on %d vectors", index, len(x))
        idx.train(x)
    idx.add(x)
    if nprobe is not None:
        faiss.ParameterSpace().set_index_parameter(idx, "nprobe", int(nprobe))
    return idx


def _normalise(x, center):
    x = np.asarray(x, dtype=np.float32)
    if center is True:
        x = x - x.mean(axis=0, dtype=np.float64).astype(np.float32)
    elif center is not False and center is not None:
        x = x - np.asarray(center, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12), dtype=np.float32)


def knn(x, k=10, queries=None, *, index="Flat", nprobe=None, center=False, exclude_self=True):
    """Cosine k nearest neighbours: FAISS, or :func:`self_knn` for the exact self-join.

    Parameters
    ----------
    x : ndarray [N, D]
        Database vectors.
    k : int
        Neighbours per query.
    queries : ndarray [M, D], optional
        Query vectors; default: the database itself, with each row's own match removed.
    index : str
        FAISS ``index_factory`` string; ``"Flat"`` without ``queries`` uses :func:`self_knn`
        (exact, same neighbours, about half the work).
    nprobe : int, optional
        For IVF indexes.
    center : bool
        Subtract the database mean before normalising.
    exclude_self : bool
        Remove row ``i`` from the neighbours of query ``i`` (only when ``queries`` is None).

    Returns
    -------
    indices : ndarray [M, k] int64
        Neighbour rows, best first (-1 where fewer than k were found).
    similarities : ndarray [M, k] float32
        Cosine similarities.
    """
    if int(k) < 1:
        raise ConceptLensError(f"the k parameter must be a positive integer; got {k!r}")
    x = np.asarray(x, dtype=np.float32)
    mean = x.mean(axis=0, dtype=np.float64).astype(np.float32) if center else False
    db = _normalise(x, mean)
    self_query = queries is None
    q = db if self_query else _normalise(queries, mean)
    extra = 1 if self_query and exclude_self else 0
    if self_query and index == "Flat":
        inds, sims = self_knn(db, min(k, len(db) - extra), exclude_self=exclude_self)
    else:
        sims, inds = build_index(db, index, nprobe).search(q, min(k + extra, len(db)))
        if extra:
            inds, sims = _drop_self(inds, sims, k)
    if inds.shape[1] < k:  # fewer database rows than k
        pad = k - inds.shape[1]
        inds = np.pad(inds, ((0, 0), (0, pad)), constant_values=-1)
        sims = np.pad(sims, ((0, 0), (0, pad)), constant_values=np.nan)
    return inds.astype(np.int64), sims.astype(np.float32)


def self_knn(x, k, *, exclude_self=True, block=4096):
    """Exact k nearest neighbours of every row of ``x`` among the rows of ``x`` (inner product).

    The similarity matrix is computed block by block, only on and above the block diagonal: an
    off-diagonal block ``S = X_a X_b^T`` serves the rows of ``a`` (its rows) and of ``b`` (its
    columns). Diagonal blocks go first, so every row has a running k-th best similarity before the
    off-diagonal blocks; in those only entries at or above it are candidates, which keeps the
    selection to two comparisons and a merge of the few survivors.

    Parameters
    ----------
    x : ndarray [N, D] float32
        Vectors (L2-normalised for cosine similarity).
    k : int
        Neighbours per row.
    exclude_self : bool
        Leave row ``i`` out of its own neighbours.
    block : int
        Rows per block (a block of similarities is ``block**2`` float32).

    Returns
    -------
    indices : ndarray [N, k] int64
        Best first; equal similarities are ordered by row index. -1 where fewer than k exist.
    similarities : ndarray [N, k] float32
        ``-inf`` where the index is -1.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, k, block = len(x), int(k), int(block)
    best_s = np.full((n, k), -np.inf, dtype=np.float32)
    best_i = np.full((n, k), -1, dtype=np.int64)
    if k < 1 or n == 0:
        return best_i, best_s
    # Preallocated, contiguous buffers: allocating a fresh block per product costs as much as the
    # product itself (page faults), and BLAS runs slower into strided output.
    sim_buf, mask_buf = np.empty(block * block, dtype=np.float32), np.empty(block * block, dtype=bool)
    starts = range(0, n, block)
    for a, b in [(a, a) for a in starts] + [(a, b) for a in starts for b in starts if b > a]:
        na, nb = min(block, n - a), min(block, n - b)
        s = np.matmul(x[a:a + na], x[b:b + nb].T, out=sim_buf[:na * nb].reshape(na, nb))
        mask = mask_buf[:na * nb].reshape(na, nb)
        if a == b:
            if exclude_self:
                np.fill_diagonal(s, -np.inf)
            # Candidates: everything at or above each row's k-th best of this block (ties included).
            kth = -np.partition(-s, min(k, nb) - 1, axis=1)[:, min(k, nb) - 1: min(k, nb)]
            _merge(best_s, best_i, s, np.greater_equal(s, kth, out=mask), a, b)
        else:
            _merge(best_s, best_i, s, np.greater_equal(s, best_s[a:a + na, -1:], out=mask), a, b)
            _merge(best_s, best_i, s, np.greater_equal(s, best_s[b:b + nb, -1][None, :], out=mask), a, b, columns=True)
    best_i[~np.isfinite(best_s)] = -1
    return best_i, best_s


def _merge(best_s, best_i, s, mask, a, b, columns=False):
    """Fold the masked entries of block ``s`` (rows from ``a``, columns from ``b``) into the running
    top-k of their rows (``columns=True``: of their columns), ordered by similarity, then index."""
    flat = np.flatnonzero(mask)
    r, c = np.divmod(flat, s.shape[1])
    vals = s.ravel()[flat]
    rows, cols = (c + b, r + a) if columns else (r + a, c + b)
    keep = np.isfinite(vals)
    rows, cols, vals = rows[keep], cols[keep], vals[keep]
    if len(rows) == 0:
        return
    k = best_s.shape[1]
    touched = np.unique(rows)
    rows = np.concatenate([np.repeat(touched, k), rows])
    vals = np.concatenate([best_s[touched].ravel(), vals])
    cols = np.concatenate([best_i[touched].ravel(), cols])
    order = np.lexsort((cols, -vals, rows))
    rows, vals, cols = rows[order], vals[order], cols[order]
    first = np.searchsorted(rows, touched)
    rank = np.arange(len(rows)) - np.repeat(first, np.diff(np.append(first, len(rows))))
    top = rank < k
    best_s[rows[top], rank[top]] = vals[top]
    best_i[rows[top], rank[top]] = cols[top]


def _drop_self(inds, sims, k):
    """Remove each row's own index (wherever it ranks); rows without it lose their last match."""
    own = inds == np.arange(len(inds))[:, None]
    missing = ~own.any(axis=1)
    own[missing, -1] = True
    keep = ~own
    width = inds.shape[1] - 1
    inds = inds[keep].reshape(len(inds), width)[:, :k]
    sims = sims[keep].reshape(len(sims), width)[:, :k]
    return inds, sims


@dataclass(frozen=True)
class NeighborResult(Result):
    """k-NN graph of one layer, label-issue candidates and near-duplicate candidates.

    Attributes
    ----------
    indices : ndarray [N, k]
        Store rows of each row's neighbours (self excluded), best first.
    similarities : ndarray [N, k]
        Their cosine similarities.
    rows : DataFrame
        The store rows.
    label_issues : DataFrame
        Candidates with ``p_label <= label_cut``, most suspicious first: ``row`` (store row),
        ``manifest_row``, ``image``, ``split``, ``label``, ``p_label`` (out-of-sample calibrated
        probability of the given label from the neighbours' labels), ``suggested_label`` and
        ``p_suggested`` (the most probable label and its probability), ``agreement`` (raw
        fraction of labelled neighbours sharing the row's label), ``suggested_fraction`` (raw
        fraction voting for the suggested label).
    duplicates : DataFrame
        Near-duplicate candidate pairs, most similar first: ``row_a, row_b, manifest_row_a,
        manifest_row_b, image_a, image_b, split_a, split_b, similarity`` (cosine),
        ``distance_ratio`` (cosine distance over the median nearest-neighbour distance) and
        ``crosses_splits`` (the two rows are in different splits; ``a`` is then the ``train`` one
        when there is one).
    label_probability : ndarray [N]
        ``p_label`` of every row (NaN where unlabelled or not computed), for other cuts.
    layer : str
    index : str
        ``"Flat"`` (exact) or the FAISS ``index_factory`` string used.
    params : dict
    provenance : dict
    """

    indices: np.ndarray = field(repr=False)
    similarities: np.ndarray = field(repr=False)
    rows: pd.DataFrame = field(repr=False)
    label_issues: pd.DataFrame = field(repr=False)
    duplicates: pd.DataFrame = field(repr=False)
    label_probability: np.ndarray = field(repr=False)
    layer: str
    index: str
    params: dict = field(repr=False)
    provenance: dict = field(repr=False)

    KIND, META = "neighbors", "neighbors.json"

    @property
    def leaks(self):
        """Near-duplicate candidates that cross splits (e.g. train/test): possible leaks of the training set."""
        return self.duplicates[self.duplicates["crosses_splits"]].reset_index(drop=True)

    def to_frame(self):
        """The k-NN graph in long form: ``row, rank, neighbor, similarity`` (ranks from 1)."""
        n, k = self.indices.shape
        return pd.DataFrame({
            "row": np.repeat(np.arange(n), k),
            "rank": np.tile(np.arange(1, k + 1), n),
            "neighbor": self.indices.ravel(),
            "similarity": self.similarities.ravel(),
        })

    def _write(self, directory):
        """``duplicates.csv``, ``label_issues.csv``, ``rows.csv``, ``knn_indices.npy``,
        ``knn_similarities.npy``, ``label_probability.npy``; ``neighbors.json``."""
        for name, frame in (("duplicates", self.duplicates), ("label_issues", self.label_issues), ("rows", self.rows)):
            frame.to_csv(directory / f"{name}.csv", index=False)
        for name, arr in (("knn_indices", self.indices), ("knn_similarities", self.similarities),
                          ("label_probability", self.label_probability)):
            np.save(directory / f"{name}.npy", np.asarray(arr), allow_pickle=False)
        return {"layer": self.layer, "index": self.index, "params": self.params}

    @classmethod
    def _read(cls, directory, meta):
        dups = pd.read_csv(f"{directory}/duplicates.csv", keep_default_na=False,
                           dtype={**TEXT_COLUMNS, "image_a": str, "image_b": str, "split_a": str, "split_b": str})
        dups["crosses_splits"] = dups["crosses_splits"].astype(str).str.lower() == "true"
        return cls(
            indices=np.load(f"{directory}/knn_indices.npy", allow_pickle=False),
            similarities=np.load(f"{directory}/knn_similarities.npy", allow_pickle=False),
            rows=read_csv(f"{directory}/rows.csv"),
            label_issues=read_csv(f"{directory}/label_issues.csv"),
            duplicates=dups,
            label_probability=np.load(f"{directory}/label_probability.npy", allow_pickle=False),
            layer=meta["layer"], index=meta["index"], params=meta["params"], provenance=meta["provenance"],
        )


def label_votes(indices, labels):
    """Neighbour label votes per row.

    Parameters
    ----------
    indices : ndarray [N, k]
        Neighbour rows (``-1`` = none).
    labels : array [N]
        Labels (``""`` = unlabelled: ignored as neighbour).

    Returns
    -------
    classes : ndarray [C]
        The distinct non-empty labels.
    codes : ndarray [N] int
        Each row's class index (-1 = unlabelled).
    votes : ndarray [N, C]
        Count of each class among the row's labelled neighbours.
    """
    labels = np.asarray(labels).astype(str)
    classes, codes = np.unique(labels, return_inverse=True)
    keep = classes != ""
    remap = np.where(keep, np.cumsum(keep) - 1, -1)
    classes, codes = classes[keep], remap[codes]
    nb = np.where(indices >= 0, codes[np.clip(indices, 0, None)], -1)
    votes = np.zeros((len(labels), len(classes)))
    rows = np.repeat(np.arange(len(labels)), indices.shape[1])
    ok = nb.ravel() >= 0
    np.add.at(votes, (rows[ok], nb.ravel()[ok]), 1.0)
    return classes, codes, votes


def label_probability(votes, codes, n_folds=5, seed=0):
    """Out-of-sample calibrated probability that a row carries each class, from its neighbour votes.

    For every (row, class) pair the feature is the fraction ``f`` of the row's labelled neighbours
    voting for that class, the target whether the row's given label is that class. An isotonic
    (monotone) regression of target on ``f`` - a histogram calibration with as many bins as the
    fraction takes values - is cross-fitted: each row is scored by a fit on the other folds
    (seeded, stratified when possible), so no row's own label calibrates its own score. ``p`` is
    then the held-out rate at which rows whose neighbourhood votes ``f`` for a class carry that
    class: ``p_label <= 0.1`` means fewer than 1 in 10 such rows carry the label this row has.
    (One-vs-rest: a row's probabilities need not sum to 1.)

    Parameters
    ----------
    votes : ndarray [N, C]
        Neighbour label counts (:func:`label_votes`).
    codes : ndarray [N]
        Given class index per row (-1 = unlabelled: not fitted, scored by the average of the folds' fits).
    n_folds : int
        Cross-fitting folds.
    seed : int
        Seeds the fold assignment.

    Returns
    -------
    ndarray [N, C]
        Calibrated probabilities (NaN for rows without labelled neighbours).
    """
    from sklearn.isotonic import IsotonicRegression
    from sklearn.model_selection import KFold, StratifiedKFold

    n, c = votes.shape
    total = votes.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(total > 0, votes / total, np.nan)
    proba = np.full((n, c), np.nan)
    labelled = np.flatnonzero((codes >= 0) & (total[:, 0] > 0))
    if c < 2 or len(labelled) < 2 * n_folds:
        raise ConceptLensError(f"label-issue scores need at least two labels and {2 * n_folds} labelled rows with labelled "
                               f"neighbours (n_folds={n_folds}); got {c} label(s) and {len(labelled)} row(s)")
    y = codes[labelled]
    counts = np.bincount(y, minlength=c)
    splitter = (StratifiedKFold(n_folds, shuffle=True, random_state=seed) if counts[counts > 0].min() >= n_folds
                else KFold(n_folds, shuffle=True, random_state=seed))
    onehot = (y[:, None] == np.arange(c)[None, :]).astype(np.float64)
    fits = []
    for tr, te in splitter.split(labelled, y):
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip")
        iso.fit(frac[labelled[tr]].ravel(), onehot[tr].ravel())
        proba[labelled[te]] = iso.predict(frac[labelled[te]].ravel()).reshape(len(te), c)
        fits.append(iso)
    rest = np.flatnonzero((codes < 0) & (total[:, 0] > 0))
    if len(rest):  # no own label to leak: average the folds' fits
        proba[rest] = np.mean([iso.predict(frac[rest].ravel()) for iso in fits], axis=0).reshape(len(rest), c)
    return proba


def duplicate_candidates(indices, similarities, ratio=0.3, threshold=None):
    """Pairs of the k-NN graph much closer than the typical nearest neighbour.

    Parameters
    ----------
    indices, similarities : ndarray [N, k]
        The k-NN graph (self excluded, cosine similarities).
    ratio : float
        A pair is a candidate when its cosine distance ``sqrt(2 - 2 cos)`` is at most ``ratio``
        times the median nearest-neighbour distance over the rows.
    threshold : float, optional
        Instead: cosine similarity at or above which a pair is a candidate.

    Returns
    -------
    pairs : ndarray [P, 2] int64
        ``(a, b)`` with ``a < b``, each pair once.
    similarity, distance_ratio : ndarray [P]
    median_nn_distance : float
    """
    sims = np.asarray(similarities, dtype=np.float64)
    dist = np.sqrt(np.clip(2.0 - 2.0 * sims, 0.0, None))
    first = dist[:, 0][np.isfinite(dist[:, 0]) & (indices[:, 0] >= 0)]
    median = float(np.median(first)) if len(first) else np.nan
    ok = (indices >= 0) & np.isfinite(sims)
    hit = ok & ((sims >= threshold) if threshold is not None else (dist <= ratio * median))
    i, r = np.nonzero(hit)
    j = indices[i, r]
    pairs = np.stack([np.minimum(i, j), np.maximum(i, j)], axis=1).astype(np.int64)
    pairs, first_at = np.unique(pairs, axis=0, return_index=True)
    s = sims[i, r][first_at]
    ratio_out = dist[i, r][first_at] / median if median > 0 else np.full(len(s), np.nan)
    return pairs, s.astype(np.float32), ratio_out, median


def neighbors(
    store,
    layer=None,
    *,
    k=10,
    index="Flat",
    nprobe=None,
    center=True,
    label_column="label",
    label_cut=0.1,
    n_folds=5,
    seed=0,
    duplicate_ratio=0.3,
    duplicate_threshold=None,
    duplicates=True,
):
    """k-NN of every row, label-issue candidates and near-duplicate candidates.

    Parameters
    ----------
    store : ActivationStore or path
    layer : str, optional
        Default: the last layer of the store. Spatial maps are mean-pooled; to compare layouts
        (near-duplicates) extract with ``pool="adaptive:K"``.
    k : int
        Neighbours per row (self excluded).
    index : str
        FAISS ``index_factory`` string (inner product on L2-normalised features); ``"Flat"`` is
        exact, ``"IVF1024,Flat"`` or ``"HNSW32"`` scale to millions of rows.
    nprobe : int, optional
        IVF lists visited per query.
    center : bool
        Subtract the mean feature before normalising (see the module docstring).
    label_column : str or None
        Column for label-issue candidates (``None``: skip them).
    label_cut : float
        A row is a label-issue candidate when ``p_label`` (calibrated probability of its given
        label, :func:`label_probability`) is at most this (default 0.1).
    n_folds, seed : int
        Cross-fitting folds of the calibration and their seed.
    duplicate_ratio : float
        Near-duplicate cut: cosine distance at most this times the median nearest-neighbour
        distance (default 0.3; see :func:`duplicate_candidates`).
    duplicate_threshold : float, optional
        Absolute cut instead: cosine similarity at or above this.
    duplicates : bool
        Look for near-duplicates (False: ``duplicates`` is empty, e.g. when another layer, one
        that keeps the layout, is searched for them).

    Returns
    -------
    NeighborResult
    """
    t0 = time.perf_counter()
    store = open_store(store)
    layer = check_layers(store, [layer] if layer is not None else store.layers[-1:], "layer")[0]
    if duplicate_threshold is not None and not -1 <= duplicate_threshold <= 1:
        raise ConceptLensError(f"the duplicate_threshold parameter is a cosine similarity in [-1, 1]; got {duplicate_threshold!r}")
    if not 0 < duplicate_ratio < 1:
        raise ConceptLensError(f"the duplicate_ratio parameter must be in (0, 1); got {duplicate_ratio!r}")
    if not 0 < label_cut < 1:
        raise ConceptLensError(f"the label_cut parameter is a probability in (0, 1); got {label_cut!r}")
    if int(n_folds) < 2:
        raise ConceptLensError(f"the n_folds parameter must be at least 2; got {n_folds!r}")
    rows = store.rows
    x = layer_features(store, layer)
    xn = _normalise(x, center)
    inds, sims = knn(xn, k, index=index, nprobe=nprobe, center=False)
    split = rows["split"].astype(str).to_numpy() if "split" in rows.columns else np.full(len(rows), "")

    issues = pd.DataFrame(columns=ISSUE_COLUMNS)
    p_label = np.full(len(rows), np.nan)
    if label_column is not None:
        check_column(rows, label_column, "label_column", f"the manifest of store {store.path}")
        labels = rows[label_column].astype(str).to_numpy()
        classes, codes, votes = label_votes(inds, labels)
        proba = label_probability(votes, codes, int(n_folds), seed)
        rr = np.arange(len(rows))
        p_label = np.where(codes >= 0, proba[rr, np.clip(codes, 0, None)], np.nan)
        total = votes.sum(axis=1)
        best = np.argmax(votes, axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            own_frac = np.where(codes >= 0, votes[rr, np.clip(codes, 0, None)] / total, np.nan)
            best_frac = votes[rr, best] / total
        flagged = np.flatnonzero((codes >= 0) & (total > 0) & (p_label <= label_cut))
        order = flagged[np.lexsort((flagged, own_frac[flagged], p_label[flagged]))]
        issues = pd.DataFrame({
            "row": order,
            "manifest_row": rows["manifest_row"].to_numpy()[order],
            "image": rows["image"].to_numpy()[order],
            "split": split[order],
            "label": labels[order],
            "p_label": p_label[order],
            "suggested_label": classes[best[order]],
            "p_suggested": proba[order, best[order]],
            "agreement": own_frac[order],
            "suggested_fraction": best_frac[order],
        })

    pairs, psims, pratio, median = duplicate_candidates(inds, sims, duplicate_ratio, duplicate_threshold)
    if not duplicates:
        pairs, psims, pratio = pairs[:0], psims[:0], pratio[:0]
    a, b = pairs[:, 0], pairs[:, 1]
    crosses = split[a] != split[b]
    swap = crosses & (split[b] == "train")  # the train side first
    a, b = np.where(swap, b, a), np.where(swap, a, b)
    order = np.lexsort((b, a, -psims)) if len(pairs) else np.zeros(0, dtype=int)
    a, b, psims, pratio, crosses = a[order], b[order], psims[order], pratio[order], crosses[order]
    mr, im = rows["manifest_row"].to_numpy(), rows["image"].to_numpy()
    dups = pd.DataFrame({
        "row_a": a, "row_b": b, "manifest_row_a": mr[a], "manifest_row_b": mr[b], "image_a": im[a], "image_b": im[b],
        "split_a": split[a], "split_b": split[b], "similarity": psims, "distance_ratio": pratio, "crosses_splits": crosses,
    }, columns=DUPLICATE_COLUMNS)
    how = "exact blocked symmetric self-join" if index == "Flat" else f"FAISS {index}"
    dup_rule = (f"cosine >= {duplicate_threshold}" if duplicate_threshold is not None else
                f"cosine distance <= {duplicate_ratio} x the median nearest-neighbour distance ({median:.4g})")
    found = ([f"{len(issues)} label-issue candidates (p_label <= {label_cut:g})"] if label_column is not None else []) + (
        [f"{len(dups)} near-duplicate candidates ({dup_rule}), {int(crosses.sum())} of them across splits"] if duplicates else [])
    logger.info("neighbors of %s (%s): %s", layer, how, "; ".join(found) or "k-NN only")
    params = {"k": k, "index": index, "knn": how, "nprobe": nprobe, "metric": "cosine (inner product on L2-normalised features)",
              "center": bool(center), "label_column": label_column, "label_cut": label_cut,
              "label_score": ("p_label: held-out rate at which rows with this neighbour-vote fraction carry the label "
                              f"(isotonic calibration of the vote fraction, cross-fitted over {n_folds} seeded folds)"),
              "n_folds": n_folds, "seed": seed, "duplicate_ratio": duplicate_ratio, "duplicate_threshold": duplicate_threshold,
              "duplicate_rule": dup_rule if duplicates else "not searched", "median_nn_distance": median}
    return NeighborResult(indices=inds, similarities=sims, rows=rows, label_issues=issues, duplicates=dups,
                          label_probability=p_label, layer=layer, index=index, params=params,
                          provenance=provenance(store=store, parameters=params, timings={"total": time.perf_counter() - t0}))

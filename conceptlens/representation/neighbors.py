"""Nearest neighbours in a layer's feature space (FAISS), and two dataset-review products.

* **k-NN** with self matches excluded, cosine similarity (inner product on L2-normalised
  features). ``"Flat"`` (the default) is exact; any FAISS ``index_factory`` string
  (``"IVF1024,Flat"``, ``"HNSW32"``, ...) for large N, recorded in the result. The exact k-NN of a
  set against itself - the dataset-review query - runs as a blocked symmetric self-join
  (:func:`self_knn`): ``X X^T`` is symmetric, so each block of similarities is computed once and
  serves the rows on both sides, half the multiply-adds of a FAISS ``IndexFlatIP`` search
  (``benchmarks/representation.py`` measures both). Queries from outside the set go to FAISS.
* **Label-disagreement candidates**: rows whose neighbours mostly carry another label (the label
  is suspicious, or the image is atypical for its class).
* **Near-duplicates across splits**: (train, test) pairs whose cosine similarity reaches a
  threshold - the leakage that inflates test accuracy.

Features are mean-centred before normalisation by default: activations after a ReLU are
non-negative, so raw cosines of unrelated images crowd near 1 and a threshold separates little.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..errors import ConceptLensError
from ._common import check_column, check_layers, layer_features, open_store, read_csv, read_json, store_provenance, write_result

__all__ = ["NeighborResult", "neighbors", "knn", "self_knn", "build_index", "label_disagreement", "cross_split_duplicates"]

logger = logging.getLogger(__name__)

DUPLICATE_COLUMNS = ["train_row", "test_row", "train_manifest_row", "test_manifest_row", "train_image", "test_image", "similarity"]
ISSUE_COLUMNS = ["row", "manifest_row", "image", "split", "label", "suggested_label", "agreement", "suggested_fraction"]


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
class NeighborResult:
    """k-NN graph of one layer, label-disagreement candidates and cross-split near-duplicates.

    Attributes
    ----------
    indices : ndarray [N, k]
        Store rows of each row's neighbours (self excluded), best first.
    similarities : ndarray [N, k]
        Their cosine similarities.
    rows : DataFrame
        The store rows.
    label_issues : DataFrame
        Candidates, most suspicious first: ``row`` (store row), ``manifest_row``, ``image``,
        ``split``, ``label``, ``suggested_label`` (most common label among the neighbours),
        ``agreement`` (fraction of neighbours sharing the row's label), ``suggested_fraction``.
    duplicates : DataFrame
        Pairs above the threshold, most similar first: ``train_row, test_row,
        train_manifest_row, test_manifest_row, train_image, test_image, similarity``.
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
    layer: str
    index: str
    params: dict = field(repr=False)
    provenance: dict = field(repr=False)

    def to_frame(self):
        """The k-NN graph in long form: ``row, rank, neighbor, similarity`` (ranks from 1)."""
        n, k = self.indices.shape
        return pd.DataFrame({
            "row": np.repeat(np.arange(n), k),
            "rank": np.tile(np.arange(1, k + 1), n),
            "neighbor": self.indices.ravel(),
            "similarity": self.similarities.ravel(),
        })

    def save(self, directory):
        """Write ``duplicates.csv``, ``label_issues.csv``, ``rows.csv``, ``knn_indices.npy``,
        ``knn_similarities.npy`` and ``neighbors.json``."""
        meta = {"layer": self.layer, "index": self.index, "params": self.params, "provenance": self.provenance}
        return write_result(
            directory,
            {"duplicates.csv": self.duplicates, "label_issues.csv": self.label_issues, "rows.csv": self.rows},
            ("neighbors.json", meta),
            {"knn_indices.npy": self.indices, "knn_similarities.npy": self.similarities},
        )

    @classmethod
    def load(cls, directory):
        """Read a result written by :meth:`save`."""
        meta = read_json(directory, "neighbors.json", "neighbors")
        return cls(
            indices=np.load(f"{directory}/knn_indices.npy", allow_pickle=False),
            similarities=np.load(f"{directory}/knn_similarities.npy", allow_pickle=False),
            rows=read_csv(f"{directory}/rows.csv"),
            label_issues=read_csv(f"{directory}/label_issues.csv"),
            duplicates=read_csv(f"{directory}/duplicates.csv"),
            layer=meta["layer"], index=meta["index"], params=meta["params"], provenance=meta["provenance"],
        )


def label_disagreement(indices, labels, max_agreement=0.5):
    """Rows whose neighbours mostly carry another label.

    Parameters
    ----------
    indices : ndarray [N, k]
        Neighbour rows (``-1`` = none).
    labels : array [N]
        Labels (``""`` = unlabelled: ignored as row and as neighbour).
    max_agreement : float
        A row is a candidate when at most this fraction of its labelled neighbours shares its
        label and the most common neighbour label is another one.

    Returns
    -------
    candidates : ndarray of int
        Row indices, most suspicious first.
    agreement, suggested, suggested_fraction : ndarray [N]
    """
    labels = np.asarray(labels).astype(str)
    classes, codes = np.unique(labels, return_inverse=True)
    unlabelled = np.flatnonzero(classes == "")
    codes = np.where(np.isin(codes, unlabelled), -1, codes)
    nb = np.where(indices >= 0, codes[np.clip(indices, 0, None)], -1)
    votes = np.zeros((len(labels), len(classes)))
    rows = np.repeat(np.arange(len(labels)), indices.shape[1])
    ok = nb.ravel() >= 0
    np.add.at(votes, (rows[ok], nb.ravel()[ok]), 1.0)
    total = votes.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = votes / total[:, None]
    own = np.where(codes >= 0, frac[np.arange(len(labels)), np.clip(codes, 0, None)], np.nan)
    best = np.argmax(votes, axis=1)
    best_frac = frac[np.arange(len(labels)), best]
    flagged = (codes >= 0) & (total > 0) & (own <= max_agreement) & (best != codes)
    order = np.flatnonzero(flagged)
    order = order[np.lexsort((order, -best_frac[order], own[order]))]
    return order, own, classes[best], best_frac


def cross_split_duplicates(x_norm, split, threshold, k=5, index="Flat", nprobe=None):
    """(train, test) row pairs with cosine similarity >= ``threshold``; ``x_norm`` normalised."""
    train, test = np.flatnonzero(split == "train"), np.flatnonzero(split == "test")
    if len(train) == 0 or len(test) == 0:
        logger.info("no train/test pair possible (%d train, %d test rows): no duplicate search", len(train), len(test))
        return np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=np.float32)
    kk = min(k, len(train))
    sims, inds = build_index(x_norm[train], index, nprobe).search(x_norm[test], kk)
    hit = (sims >= threshold) & (inds >= 0)
    ti, rank = np.nonzero(hit)
    pairs = np.stack([train[inds[ti, rank]], test[ti]], axis=1)
    return pairs, sims[ti, rank]


def neighbors(
    store,
    layer=None,
    *,
    k=10,
    index="Flat",
    nprobe=None,
    center=True,
    label_column="label",
    max_agreement=0.5,
    duplicate_threshold=0.97,
    duplicates_per_image=5,
):
    """k-NN of every row, label-disagreement candidates and near-duplicates across splits.

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
        Column for label-disagreement candidates (``None``: skip them).
    max_agreement : float
        See :func:`label_disagreement`.
    duplicate_threshold : float
        Cosine similarity at or above which a (train, test) pair is reported.
    duplicates_per_image : int
        At most this many train matches are reported per test image.

    Returns
    -------
    NeighborResult
    """
    store = open_store(store)
    layer = check_layers(store, [layer] if layer is not None else store.layers[-1:], "layer")[0]
    if not -1 <= duplicate_threshold <= 1:
        raise ConceptLensError(f"the duplicate_threshold parameter is a cosine similarity in [-1, 1]; got {duplicate_threshold!r}")
    if not 0 <= max_agreement < 1:
        raise ConceptLensError(f"the max_agreement parameter must be in [0, 1); got {max_agreement!r}")
    rows = store.rows
    x = layer_features(store, layer)
    xn = _normalise(x, center)
    inds, sims = knn(xn, k, index=index, nprobe=nprobe, center=False)

    issues = pd.DataFrame(columns=ISSUE_COLUMNS)
    if label_column is not None:
        check_column(rows, label_column, "label_column", f"the manifest of store {store.path}")
        labels = rows[label_column].astype(str).to_numpy()
        order, own, suggested, frac = label_disagreement(inds, labels, max_agreement)
        issues = pd.DataFrame({
            "row": order,
            "manifest_row": rows["manifest_row"].to_numpy()[order],
            "image": rows["image"].to_numpy()[order],
            "split": rows["split"].to_numpy()[order] if "split" in rows else "",
            "label": labels[order],
            "suggested_label": suggested[order],
            "agreement": own[order],
            "suggested_fraction": frac[order],
        })

    dups = pd.DataFrame(columns=DUPLICATE_COLUMNS)
    if "split" in rows.columns:
        pairs, psims = cross_split_duplicates(xn, rows["split"].to_numpy(), duplicate_threshold, duplicates_per_image, index, nprobe)
        order = np.lexsort((pairs[:, 1], pairs[:, 0], -psims)) if len(pairs) else np.zeros(0, dtype=int)
        pairs, psims = pairs[order], psims[order]
        mr, im = rows["manifest_row"].to_numpy(), rows["image"].to_numpy()
        dups = pd.DataFrame({
            "train_row": pairs[:, 0], "test_row": pairs[:, 1],
            "train_manifest_row": mr[pairs[:, 0]], "test_manifest_row": mr[pairs[:, 1]],
            "train_image": im[pairs[:, 0]], "test_image": im[pairs[:, 1]], "similarity": psims,
        })
    else:
        logger.info("the manifest has no 'split' column: no cross-split duplicate search")
    how = "exact blocked symmetric self-join" if index == "Flat" else f"FAISS {index}"
    logger.info("neighbors of %s (%s): %d label-issue candidates, %d duplicate pairs", layer, how, len(issues), len(dups))
    params = {"k": k, "index": index, "knn": how, "nprobe": nprobe, "metric": "cosine (inner product on L2-normalised features)",
              "center": bool(center), "label_column": label_column, "max_agreement": max_agreement,
              "duplicate_threshold": duplicate_threshold, "duplicates_per_image": duplicates_per_image}
    return NeighborResult(indices=inds, similarities=sims, rows=rows, label_issues=issues, duplicates=dups,
                          layer=layer, index=index, params=params, provenance=store_provenance(store))

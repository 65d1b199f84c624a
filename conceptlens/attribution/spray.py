"""SpRAy: spectral relevance analysis (Lapuschkin et al. 2019) of one class's explanations.

The attribution maps of a class's images are downsampled and normalised, a symmetric k-nearest-
neighbour graph links similar maps, the eigengap of its normalised Laplacian chooses the number of
clusters, and spectral clustering (scikit-learn) groups the images by *explanation strategy*. A
small cluster whose prototype puts its relevance on an artefact (a watermark, a ruler, a scanner
tag) is a "Clever Hans" strategy.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ..errors import ConceptLensError
from ..core.result import Result, provenance
from ._results import as_numpy

__all__ = ["SprayResult", "spray", "spray_class", "prepare_maps"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SprayResult(Result):
    """Clusters of explanation strategies.

    Attributes
    ----------
    labels : ndarray [N] of int
        Cluster of each image; clusters are numbered by size, largest first.
    rows : DataFrame
        One row per image (``index`` and, from :func:`spray_class`, the manifest columns).
    eigenvalues : ndarray
        Smallest eigenvalues of the kNN graph's normalised Laplacian (ascending).
    n_clusters : int
        Chosen (eigengap) or given number of clusters.
    embedding : ndarray [N, 2]
        Spectral embedding (for plots).
    prototypes : ndarray [K, s, s]
        Mean normalised map of each cluster.
    medoids : ndarray [K] of int
        Position (into ``labels``) of each cluster's most typical member.
    maps : ndarray [N, s, s]
        The downsampled, normalised maps that were clustered.
    params : dict
    provenance : dict
    skipped : tuple of dict
        Images skipped as unreadable (:func:`spray_class` with ``skip_bad``): ``{manifest_row, image, error}``.
    """

    labels: np.ndarray = field(repr=False)
    rows: pd.DataFrame = field(repr=False)
    eigenvalues: np.ndarray = field(repr=False)
    n_clusters: int
    embedding: np.ndarray = field(repr=False)
    prototypes: np.ndarray = field(repr=False)
    medoids: np.ndarray = field(repr=False)
    maps: np.ndarray = field(repr=False)
    params: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    skipped: tuple = ()

    KIND = "spray"

    @property
    def eigengap(self):
        """``lambda_K - lambda_(K-1)``: the gap after the chosen number of clusters."""
        k = self.n_clusters
        return float(self.eigenvalues[k] - self.eigenvalues[k - 1]) if len(self.eigenvalues) > k else float("nan")

    def members(self, cluster):
        """``index`` values of the images in ``cluster``."""
        if not 0 <= int(cluster) < self.n_clusters:
            raise ConceptLensError(f"cluster must lie in 0..{self.n_clusters - 1}; got {cluster}")
        return self.rows["index"][self.labels == int(cluster)].tolist()

    def clusters(self):
        """Table ``cluster, size, fraction, medoid`` (the medoid's ``index``)."""
        sizes = np.bincount(self.labels, minlength=self.n_clusters)
        return pd.DataFrame({
            "cluster": np.arange(self.n_clusters), "size": sizes, "fraction": sizes / len(self.labels),
            "medoid": self.rows["index"].to_numpy()[self.medoids],
        })

    def to_frame(self):
        """One row per image: its ``rows`` columns, ``cluster``, ``x``, ``y``, ``is_medoid``."""
        frame = self.rows.copy()
        frame["cluster"] = self.labels
        frame["x"], frame["y"] = self.embedding[:, 0], self.embedding[:, 1]
        frame["is_medoid"] = np.isin(np.arange(len(frame)), self.medoids)
        return frame

    def _write(self, d):
        """``assignments.csv`` (:meth:`to_frame`), ``clusters.csv``, ``eigenvalues.npy``, ``embedding.npy``,
        ``prototypes.npy``, ``medoids.npy``, ``maps.npy``; then ``meta.json`` (with the ``skipped`` images)."""
        self.to_frame().to_csv(d / "assignments.csv", index=False)
        self.clusters().to_csv(d / "clusters.csv", index=False)
        for name in ("eigenvalues", "embedding", "prototypes", "medoids", "maps"):
            np.save(d / f"{name}.npy", getattr(self, name))
        return {"n_clusters": self.n_clusters, "eigengap": self.eigengap, "params": self.params,
                "row_columns": list(self.rows.columns), "skipped": [dict(s) for s in self.skipped]}

    @classmethod
    def _read(cls, d, meta):
        frame = pd.read_csv(d / "assignments.csv", keep_default_na=False)
        arrays = {name: np.load(d / f"{name}.npy") for name in ("eigenvalues", "embedding", "prototypes", "medoids", "maps")}
        return cls(labels=frame["cluster"].to_numpy(), rows=frame[meta["row_columns"]], n_clusters=int(meta["n_clusters"]),
                   params=meta["params"], provenance=meta["provenance"], skipped=tuple(meta.get("skipped", ())), **arrays)


def prepare_maps(maps, size=16, absolute=False):
    """Downsample maps ``[N, H, W]`` to ``size x size`` (area averaging) and scale each to unit L2 norm.

    Parameters
    ----------
    maps : Tensor or ndarray [N, H, W]
    size : int
        Side of the downsampled maps.
    absolute : bool
        Use relevance magnitudes (else signed relevance).

    Returns
    -------
    ndarray [N, size, size] float32
    """
    a = torch.as_tensor(as_numpy(maps))
    if a.ndim != 3:
        raise ConceptLensError(f"maps must be [N, H, W]; got shape {tuple(a.shape)}")
    if absolute:
        a = a.abs()
    small = F.adaptive_avg_pool2d(a[:, None], size)[:, 0]
    norm = small.flatten(1).norm(dim=1).clamp_min(1e-12)
    return (small / norm[:, None, None]).numpy()


def _affinity(features, n_neighbors, dense_limit=3000):
    """Self-tuning Gaussian affinity (Zelnik-Manor & Perona 2004): ``exp(-d_ij^2 / (s_i s_j))`` with ``s_i``
    the distance to the ``n_neighbors``-th neighbour; dense (always connected) up to ``dense_limit``
    maps, beyond that restricted to the symmetric kNN graph."""
    import scipy.sparse
    from sklearn.metrics import pairwise_distances
    from sklearn.neighbors import NearestNeighbors

    n = len(features)
    if n <= dense_limit:
        d = pairwise_distances(features)
        d = np.maximum(d, d.T)  # exactly symmetric
        scale = np.sort(d, axis=1)[:, min(n_neighbors, n - 1)].clip(1e-12)
        a = np.exp(-(d ** 2) / (scale[:, None] * scale[None, :]))
        np.fill_diagonal(a, 0.0)
        return scipy.sparse.csr_matrix(a)
    logger.info("affinity: %d maps > %d, using the sparse %d-NN graph", n, dense_limit, n_neighbors)
    dist, idx = NearestNeighbors(n_neighbors=n_neighbors + 1).fit(features).kneighbors(features)
    scale = dist[:, -1].clip(1e-12)
    w = np.exp(-(dist[:, 1:] ** 2) / (scale[:, None] * scale[idx[:, 1:]]))
    graph = scipy.sparse.csr_matrix((w.ravel(), idx[:, 1:].ravel(), np.arange(0, n * n_neighbors + 1, n_neighbors)), shape=(n, n))
    return graph.maximum(graph.T).tocsr()


def _laplacian_eigenvalues(affinity, count):
    import scipy.linalg
    from scipy.sparse.csgraph import laplacian

    lap = laplacian(affinity.astype(np.float64), normed=True)
    n = lap.shape[0]
    if n <= 3000:
        return scipy.linalg.eigh(lap.toarray(), eigvals_only=True, subset_by_index=[0, min(count, n) - 1])
    from scipy.sparse.linalg import eigsh

    return np.sort(eigsh(lap, k=min(count, n - 1), sigma=-1e-3, which="LM", return_eigenvectors=False))


def spray(maps, n_clusters="auto", max_clusters=8, size=16, n_neighbors=10, absolute=False, seed=0,
          rows=None, provenance_info=None):
    """Cluster attribution maps by explanation strategy.

    Parameters
    ----------
    maps : Tensor or ndarray [N, H, W]
        One attribution map per image (usually one class's images, target = that class).
    n_clusters : int or "auto"
        ``auto``: the eigengap heuristic over ``2..max_clusters``.
    max_clusters : int
        Largest number of clusters the eigengap may choose.
    size : int
        Maps are downsampled to ``size x size`` before clustering.
    n_neighbors : int
        Neighbours of the symmetric kNN affinity graph.
    absolute : bool
        Cluster relevance magnitudes instead of signed maps.
    seed : int
        Seed of the k-means step of spectral clustering.
    rows : DataFrame or sequence, optional
        What each map is (e.g. manifest rows); becomes ``rows`` (an ``index`` column is added).
    provenance_info : dict, optional

    Returns
    -------
    SprayResult
    """
    from sklearn.cluster import SpectralClustering
    from sklearn.manifold import spectral_embedding

    small = prepare_maps(maps, size=size, absolute=absolute)
    n = len(small)
    _check_params(n, n_clusters, max_clusters, n_neighbors)
    k_nn = min(n_neighbors, n - 1)
    features = small.reshape(n, -1).astype(np.float64)
    affinity = _affinity(features, k_nn)
    eig = _laplacian_eigenvalues(affinity, min(max_clusters, n - 1) + 1)
    if n_clusters == "auto":
        gaps = np.diff(eig)  # gaps[i] = lambda_(i+1) - lambda_i: a gap after i + 1 clusters
        k = int(np.argmax(gaps[1:max_clusters]) + 2)
        logger.info("n_clusters auto -> %d (eigengap %.3g)", k, gaps[k - 1])
    else:
        k = int(n_clusters)
    if k == 1:
        raw = np.zeros(n, dtype=int)
    else:
        raw = SpectralClustering(n_clusters=k, affinity="precomputed", random_state=seed, assign_labels="kmeans", n_init=10).fit_predict(affinity)
    # Number clusters by size (largest first), ties by first member, so labels are reproducible.
    sizes = np.bincount(raw, minlength=k)
    first = np.array([np.flatnonzero(raw == c)[0] for c in range(k)])
    order = np.lexsort((first, -sizes))
    labels = np.argsort(order)[raw]
    onehot = np.eye(k)[labels]  # [N, K]
    prototypes = (onehot.T @ features) / onehot.sum(0)[:, None]
    cos = features @ prototypes.T / np.linalg.norm(prototypes, axis=1).clip(1e-12)  # maps have unit norm
    medoids = np.where(onehot > 0, cos, -np.inf).argmax(0)
    embedding = spectral_embedding(affinity, n_components=2, random_state=seed, drop_first=True)
    if rows is None:
        frame = pd.DataFrame({"index": np.arange(n)})
    elif isinstance(rows, pd.DataFrame):
        frame = rows.reset_index(drop=True)
        if "index" not in frame.columns:
            frame.insert(0, "index", np.arange(n))
    else:
        frame = pd.DataFrame({"index": list(rows)})
    if len(frame) != n:
        raise ConceptLensError(f"rows has {len(frame)} entries for {n} maps")
    params = {"n_clusters": n_clusters, "max_clusters": max_clusters, "size": size, "n_neighbors": k_nn,
              "absolute": absolute, "seed": seed, "affinity": "self-tuning Gaussian (k-th neighbour scale)",
              "clustering": "sklearn SpectralClustering(assign_labels=kmeans)"}
    return SprayResult(labels=labels, rows=frame, eigenvalues=eig, n_clusters=k, embedding=embedding.astype(np.float32),
                       prototypes=prototypes.reshape(k, size, size).astype(np.float32), medoids=medoids,
                       maps=small, params=params, provenance=provenance(parameters=params, **(provenance_info or {})))


def _check_params(n, n_clusters="auto", max_clusters=8, n_neighbors=10):
    """Validate the clustering parameters for ``n`` maps (before any map is computed)."""
    if n < 3:
        raise ConceptLensError(f"SpRAy needs at least 3 maps; got {n}")
    if isinstance(n_neighbors, bool) or not isinstance(n_neighbors, int) or n_neighbors < 1:
        raise ConceptLensError(f"n_neighbors must be a positive integer; got {n_neighbors!r}")
    if isinstance(max_clusters, bool) or not isinstance(max_clusters, int) or max_clusters < 2:
        raise ConceptLensError(f"max_clusters must be an integer >= 2; got {max_clusters!r}")
    if n_clusters != "auto" and (not isinstance(n_clusters, (int, np.integer)) or not 1 <= n_clusters < n):
        raise ConceptLensError(f"n_clusters must be 'auto' or an integer in 1..{n - 1}; got {n_clusters!r}")


def spray_class(model, manifest, class_name, method="lrp-epsilon-plus-flat", preprocessing=None, split=None,
                method_params=None, batch_size=32, skip_bad=False, progress=False, **spray_kw):
    """SpRAy over the images of one class in a manifest, explaining that class's logit.

    Parameters
    ----------
    model : LoadedModel
    manifest : Manifest or path
        Needs a ``label`` column.
    class_name : str
        A label of the manifest and a class of the model.
    method : str
        Attribution method (see :func:`~conceptlens.attribution.list_methods`).
    preprocessing : Preprocessing, optional
        Default: the manifest's resolved against the model's.
    split : str, optional
        Use only rows of this ``split``.
    method_params : dict, optional
        Parameters of the attribution method.
    batch_size : int
    skip_bad : bool
        Skip unreadable images (counted and listed in ``skipped``) instead of failing.
    progress : bool
    **spray_kw
        Passed to :func:`spray` (checked before any image is read).

    Returns
    -------
    SprayResult
        ``rows`` holds the manifest rows (``index`` = the image path, ``manifest_row`` its row).
    """
    from ..data import Manifest, read_images
    from .methods import attribute, check_method

    t0 = time.perf_counter()
    check_method(model, method, **(method_params or {}))
    if not isinstance(manifest, Manifest):
        manifest = Manifest.read(manifest)
    frame = manifest.frame
    if "label" not in frame.columns:
        raise ConceptLensError(f"manifest {manifest.path} has no 'label' column; SpRAy needs the class of each image")
    keep = frame["label"] == class_name
    if split is not None:
        if "split" not in frame.columns:
            raise ConceptLensError(f"manifest {manifest.path} has no 'split' column; drop --split")
        keep &= frame["split"] == split
    if not keep.any():
        labels = sorted(frame["label"].unique())
        raise ConceptLensError(f"manifest {manifest.path} has no images of class {class_name!r}"
                               + (f" in split {split!r}" if split else "") + f"; labels: {', '.join(labels[:20])}")
    target = model.class_index(class_name)
    check = {k: spray_kw[k] for k in ("n_clusters", "max_clusters", "n_neighbors") if k in spray_kw}
    _check_params(int(keep.sum()), **check)
    prep = model.preprocessing_for(manifest, preprocessing)
    read = read_images(manifest, prep, rows=np.flatnonzero(keep.to_numpy()), batch_size=batch_size, skip_bad=skip_bad)
    maps = attribute(model, read.x, target, method, batch_size=batch_size, progress=progress, **(method_params or {}))
    rows = frame.iloc[read.rows].rename(columns={"image": "index"})
    rows.insert(1, "manifest_row", read.rows)
    result = spray(maps, rows=rows, **spray_kw)
    info = provenance(model, manifest, parameters={**result.params, "method": method, "method_params": dict(method_params or {}),
                                                   "class_name": class_name, "split": split},
                      preprocessing=prep.to_dict(), timings={"total": time.perf_counter() - t0}, target=target)
    return dataclasses.replace(result, provenance=info, skipped=tuple(s.to_dict() for s in read.skipped))

"""2-D maps of a layer's representation: PCA-50, then openTSNE (default), UMAP or PCA.

t-SNE follows the openTSNE recommendations: PCA initialisation, perplexity 30, and FFT-accelerated
gradients for large N (Barnes-Hut below 10 000 points). How faithful the map is to the
high-dimensional neighbourhoods is reported as scikit-learn's ``trustworthiness`` (computed on a
seeded subsample when N is large, since it needs all pairwise distances).
"""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA
from sklearn.manifold import trustworthiness

from ..errors import ConceptLensError
from ..core.result import Result, provenance
from ._common import check_layers, layer_features, open_store, read_csv

__all__ = ["Embedding", "embed", "embed_features"]

logger = logging.getLogger(__name__)

METHODS = ("tsne", "umap", "pca")
FFT_FROM = 10_000  # openTSNE's own switch from Barnes-Hut to FFT gradients


@dataclass(frozen=True)
class Embedding(Result):
    """2-D (or k-D) coordinates of every store row for one layer.

    Attributes
    ----------
    coords : ndarray [N, n_components]
    rows : DataFrame
        The store rows (``manifest_row`` and the manifest's columns), for colouring.
    layer : str
    method : str
        Exactly what produced the coordinates, e.g.
        ``pca(50) -> openTSNE(perplexity=30, init=pca, gradient=fft)``.
    trustworthiness : float
        :func:`sklearn.manifold.trustworthiness` of the map w.r.t. the layer's features.
    params : dict
    provenance : dict
    """

    coords: np.ndarray = field(repr=False)
    rows: pd.DataFrame = field(repr=False)
    layer: str
    method: str
    trustworthiness: float
    params: dict = field(repr=False)
    provenance: dict = field(repr=False)

    KIND, META = "embedding", "embedding.json"

    def to_frame(self):
        """Store rows with the coordinates as columns ``x``, ``y`` (``z``, ``c3``, ... beyond 2-D)."""
        frame = self.rows.copy()
        names = ["x", "y", "z"] + [f"c{i}" for i in range(3, self.coords.shape[1])]
        for j in range(self.coords.shape[1]):
            frame[names[j]] = self.coords[:, j]
        return frame

    def _write(self, directory):  # embedding.csv (rows + coordinates); embedding.json
        self.to_frame().to_csv(directory / "embedding.csv", index=False)
        return {"layer": self.layer, "method": self.method, "trustworthiness": self.trustworthiness,
                "n_components": int(self.coords.shape[1]), "params": self.params}

    @classmethod
    def _read(cls, directory, meta):
        frame = read_csv(directory / "embedding.csv")
        k = meta["n_components"]
        names = (["x", "y", "z"] + [f"c{i}" for i in range(3, k)])[:k]
        return cls(coords=frame[names].to_numpy(np.float64), rows=frame.drop(columns=names), layer=meta["layer"],
                   method=meta["method"], trustworthiness=meta["trustworthiness"], params=meta["params"],
                   provenance=meta["provenance"])


def embed_features(
    x,
    method="tsne",
    *,
    n_components=2,
    pca_components=50,
    perplexity=30.0,
    n_neighbors=15,
    min_dist=0.1,
    seed=0,
    n_jobs=1,
    trust_neighbors=10,
    trust_max_rows=4000,
):
    """Embed a feature matrix; the array-level core of :func:`embed`.

    Parameters
    ----------
    x : ndarray [N, D]
    method : {"tsne", "umap", "pca"}
    n_components : int
        Output dimensions.
    pca_components : int or None
        PCA dimensions before t-SNE/UMAP (skipped when ``None`` or ``>= D``).
    perplexity : float
        t-SNE perplexity (lowered to ``(N - 1) / 3`` for tiny N, with a log line).
    n_neighbors, min_dist : int, float
        UMAP parameters.
    seed : int
        Seeds PCA, t-SNE, UMAP and the trustworthiness subsample.
    n_jobs : int
        Threads for openTSNE (UMAP with a seed is single-threaded).
    trust_neighbors : int
        ``n_neighbors`` of the trustworthiness score.
    trust_max_rows : int
        Trustworthiness is computed on a seeded subsample of at most this many rows.

    Returns
    -------
    coords : ndarray [N, n_components]
    method : str
        Description of the pipeline actually run.
    trust : float
    """
    if method not in METHODS:
        raise ConceptLensError(f"the method parameter must be one of {', '.join(METHODS)}; got {method!r}")
    x = np.asarray(x, dtype=np.float32)
    n, d = x.shape
    if n < 4:
        raise ConceptLensError(f"an embedding needs at least 4 rows; got {n}")
    if int(n_components) < 1 or n_components >= d:
        raise ConceptLensError(f"n_components must be between 1 and the feature dimension - 1 ({d - 1}); got {n_components}")
    steps = []
    z = x
    if method != "pca" and pca_components and pca_components < d and pca_components < n:
        z = PCA(n_components=pca_components, random_state=seed).fit_transform(x).astype(np.float32)
        steps.append(f"pca({pca_components})")
    elif method != "pca":
        logger.info("PCA before %s skipped: %d features is not more than pca_components=%s", method, d, pca_components)
    if method == "pca":
        coords = PCA(n_components=n_components, random_state=seed).fit_transform(x)
        steps.append(f"pca({n_components})")
    elif method == "tsne":
        coords, desc = _tsne(z, n_components, perplexity, seed, n_jobs)
        steps.append(desc)
    else:
        coords, desc = _umap(z, n_components, n_neighbors, min_dist, seed)
        steps.append(desc)
    coords = np.asarray(coords, dtype=np.float64)
    trust = _trust(x, coords, trust_neighbors, trust_max_rows, seed)
    return coords, " -> ".join(steps), trust


def _tsne(z, n_components, perplexity, seed, n_jobs):
    from openTSNE import TSNE

    n = len(z)
    if perplexity * 3 >= n:
        new = max(1.0, (n - 1) / 3)
        logger.info("perplexity %.1f is too large for %d points: using %.1f", perplexity, n, new)
        perplexity = new
    gradient = "fft" if n >= FFT_FROM else "bh"
    logger.info("t-SNE negative gradient method: %s for %d points", gradient, n)
    tsne = TSNE(n_components=n_components, perplexity=perplexity, initialization="pca", negative_gradient_method=gradient,
                n_jobs=n_jobs, random_state=seed, verbose=False)
    coords = np.asarray(tsne.fit(z))
    return coords, f"openTSNE(perplexity={perplexity:g}, init=pca, gradient={gradient})"


def _umap(z, n_components, n_neighbors, min_dist, seed):
    import umap

    n_neighbors = min(n_neighbors, len(z) - 1)
    reducer = umap.UMAP(n_components=n_components, n_neighbors=n_neighbors, min_dist=min_dist, random_state=seed, n_jobs=1)
    coords = reducer.fit_transform(z)
    return coords, f"umap(n_neighbors={n_neighbors}, min_dist={min_dist:g})"


def _trust(x, coords, k, max_rows, seed):
    n = len(x)
    k = min(k, n // 2 - 1)
    if k < 1:
        return float("nan")
    if n > max_rows:
        logger.info("trustworthiness on a seeded subsample of %d of %d rows", max_rows, n)
        pick = np.sort(np.random.default_rng(seed).choice(n, size=max_rows, replace=False))
        x, coords = x[pick], coords[pick]
    return float(trustworthiness(x, coords, n_neighbors=k))


def embed(store, layer=None, method="tsne", **params):
    """Embed one layer of an activation store in 2-D.

    Parameters
    ----------
    store : ActivationStore or path
    layer : str, optional
        Layer to embed (default: the last layer of the store). Spatial maps are mean-pooled.
    method : {"tsne", "umap", "pca"}
    **params
        ``n_components, pca_components, perplexity, n_neighbors, min_dist, seed, n_jobs,
        trust_neighbors, trust_max_rows``: see :func:`embed_features` (its defaults apply).

    Returns
    -------
    Embedding
    """
    signature = inspect.signature(embed_features)
    unknown = sorted(set(params) - set(signature.parameters) - {"x", "method"})
    if unknown:
        valid = [k for k in signature.parameters if k not in ("x", "method")]
        raise ConceptLensError(f"embed got unknown parameters {unknown}; valid: {', '.join(valid)}")
    t0 = time.perf_counter()
    store = open_store(store)
    layer = check_layers(store, [layer] if layer is not None else store.layers[-1:], "layer")[0]
    x = layer_features(store, layer)
    bound = signature.bind(x, method, **params)
    bound.apply_defaults()
    coords, desc, trust = embed_features(*bound.args, **bound.kwargs)
    logger.info("embedding of %s: %s, trustworthiness %.3f", layer, desc, trust)
    recorded = {k: v for k, v in bound.arguments.items() if k != "x"}
    return Embedding(coords=coords, rows=store.rows, layer=layer, method=desc, trustworthiness=trust,
                     params=recorded, provenance=provenance(store=store, parameters={**recorded, "layer": layer},
                                                            timings={"total": time.perf_counter() - t0}))

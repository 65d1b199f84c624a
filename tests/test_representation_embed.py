"""Embeddings: planted groups recovered by every method, the world's hidden sub-class grouped."""

import numpy as np
import pandas as pd
import pytest
from sklearn.cluster import KMeans
from sklearn.manifold import trustworthiness
from sklearn.neighbors import NearestNeighbors

from conceptlens.errors import ConceptLensError
from conceptlens.representation.embed import Embedding, embed, embed_features
from representation_helpers import cached_store, synthetic_store


def _kmeans_purity(coords, truth):
    pred = KMeans(2, n_init=10, random_state=0).fit_predict(coords)
    table = pd.crosstab(pred, truth).to_numpy()
    return table.max(axis=1).sum() / table.sum()


def _knn_purity(coords, truth, k=10):
    ind = NearestNeighbors(n_neighbors=k + 1).fit(coords).kneighbors(coords)[1][:, 1:]
    return (truth[ind] == truth[:, None]).mean()


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Three Gaussian classes in 64-D; class 0 holds two sub-groups (the planted hidden sub-class)."""
    rng = np.random.default_rng(0)
    n = 240
    cls = np.repeat([0, 1, 2], n // 3)
    sub = np.where(cls == 0, rng.integers(0, 2, n), -1)
    centres = rng.normal(scale=6, size=(3, 64))
    x = centres[cls] + rng.normal(size=(n, 64))
    x[sub == 1] += rng.normal(scale=3, size=64)
    frame = pd.DataFrame({"label": cls.astype(str), "subclass": sub})
    return synthetic_store(tmp_path_factory.mktemp("emb") / "store", {"feat": x}, frame)


@pytest.mark.parametrize("method", ["tsne", "pca", "umap"])
def test_planted_subgroup_separates(planted, method):
    kw = {"pca_components": 20} if method != "pca" else {}
    e = embed(planted, "feat", method, seed=0, **kw)
    assert e.coords.shape == (240, 2) and np.isfinite(e.coords).all()
    frame = e.to_frame()
    inner = frame[frame["label"] == "0"]
    assert _kmeans_purity(inner[["x", "y"]].to_numpy(), inner["subclass"].to_numpy()) > 0.95
    assert e.trustworthiness > 0.85
    expected = {"tsne": "pca(20) -> openTSNE(perplexity=30, init=pca, gradient=bh)", "pca": "pca(2)"}
    assert e.method == expected.get(method, "pca(20) -> umap(n_neighbors=15, min_dist=0.1)")


def test_trustworthiness_is_sklearns_and_subsampled_when_large(planted):
    x = planted.load("feat")
    coords, _, trust = embed_features(x, "pca", seed=0)
    assert trust == pytest.approx(trustworthiness(x, coords, n_neighbors=10))
    _, _, sub = embed_features(x, "pca", seed=0, trust_max_rows=100)
    pick = np.sort(np.random.default_rng(0).choice(len(x), size=100, replace=False))
    assert sub == pytest.approx(trustworthiness(x[pick], coords[pick], n_neighbors=10))


def test_hidden_subclass_groups_in_world_embedding(world_dir, demo_model):
    # The demo model never sees hollow vs solid, yet at relu3 the two kinds of square stay apart:
    # neighbours in the t-SNE map share the sub-class far more often than a shuffled labelling does.
    store = cached_store("embed-world", demo_model, world_dir / "manifest.csv", ["relu3"])
    e = embed(store, "relu3", "tsne", seed=0)
    frame = e.to_frame()
    sq = frame["label"].to_numpy() == "square"
    coords, sub = e.coords[sq], frame["subclass"].to_numpy()[sq]
    purity = _knn_purity(coords, sub)
    rng = np.random.default_rng(0)
    null = [_knn_purity(coords, rng.permutation(sub)) for _ in range(50)]
    assert purity > max(null) + 0.1, (purity, max(null))
    assert e.trustworthiness > 0.9


def test_seeded_and_roundtrip(planted, tmp_path):
    a = embed(planted, "feat", "tsne", pca_components=20, seed=3)
    b = embed(planted, "feat", "tsne", pca_components=20, seed=3)
    np.testing.assert_array_equal(a.coords, b.coords)
    a.save(tmp_path)
    back = Embedding.load(tmp_path)
    np.testing.assert_allclose(back.coords, a.coords, rtol=1e-12)
    assert back.method == a.method and back.trustworthiness == a.trustworthiness
    pd.testing.assert_frame_equal(back.rows, a.rows, check_dtype=False)
    assert set(pd.read_csv(tmp_path / "embedding.csv").columns) >= {"manifest_row", "image", "label", "x", "y"}


def test_bad_input(planted):
    with pytest.raises(ConceptLensError, match="method parameter must be one of tsne, umap, pca; got 'tnse'"):
        embed(planted, "feat", "tnse")
    with pytest.raises(ConceptLensError, match="layer 'feet' is not in store"):
        embed(planted, "feet")
    with pytest.raises(ConceptLensError, match=r"unknown parameters \['perplexty'\]"):
        embed(planted, "feat", perplexty=5)

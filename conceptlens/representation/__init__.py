"""What each layer encodes: probes, embeddings, neighbours and max-activating images, read from the
core's ActivationStore (extraction itself is :mod:`conceptlens.core`)."""

from .._lazy import lazy_exports

__all__ = [
    "ProbeResult", "probe", "Embedding", "embed", "NeighborResult", "neighbors", "knn",
    "TopK", "TopKResult", "topk", "topk_from_store",
]

# Submodules load on first use of their names: importing one analyzer loads only its own code.
__getattr__, __dir__ = lazy_exports(__name__, {
    "embed": ["Embedding", "embed"],
    "neighbors": ["NeighborResult", "knn", "neighbors"],
    "probes": ["ProbeResult", "probe"],
    "topk": ["TopK", "TopKResult", "topk", "topk_from_store"],
})

"""What each layer encodes: extraction into the ActivationStore, and analyzers that read it."""

from .._lazy import lazy_exports

__all__ = [
    "ActivationStore", "GradientBatch", "extract", "iter_activations", "iter_gradients", "write_batches",
    "ProbeResult", "probe", "Embedding", "embed", "NeighborResult", "neighbors", "knn",
    "TopK", "TopKResult", "topk", "topk_from_store",
]

# Submodules load on first use of their names: importing one analyzer loads only its own code.
__getattr__, __dir__ = lazy_exports(__name__, {
    "extract": ["GradientBatch", "extract", "iter_activations", "iter_gradients", "write_batches"],
    "store": ["ActivationStore"],
    "embed": ["Embedding", "embed"],
    "neighbors": ["NeighborResult", "knn", "neighbors"],
    "probes": ["ProbeResult", "probe"],
    "topk": ["TopK", "TopKResult", "topk", "topk_from_store"],
})

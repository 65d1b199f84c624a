"""What each layer encodes: extraction into the ActivationStore, and analyzers that read it."""

from .extract import GradientBatch, extract, iter_activations, iter_gradients, write_batches
from .store import ActivationStore
from .embed import Embedding, embed
from .neighbors import NeighborResult, knn, neighbors
from .probes import ProbeResult, probe
from .topk import TopK, TopKResult, topk, topk_from_store

__all__ = [
    "ActivationStore", "GradientBatch", "extract", "iter_activations", "iter_gradients", "write_batches",
    "ProbeResult", "probe", "Embedding", "embed", "NeighborResult", "neighbors", "knn",
    "TopK", "TopKResult", "topk", "topk_from_store",
]

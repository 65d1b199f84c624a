"""What each layer encodes: extraction into the ActivationStore, and analyzers that read it."""

from .extract import GradientBatch, extract, iter_activations, iter_gradients, write_batches
from .store import ActivationStore

__all__ = ["ActivationStore", "GradientBatch", "extract", "iter_activations", "iter_gradients", "write_batches"]

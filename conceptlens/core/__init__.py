"""The core every analyzer stands on: extraction through forward hooks, the activation store,
mergeable accumulators and the shared statistics.

Analyzers (``concepts``, ``dissection``, ``representation``, ``attribution``) import this package,
``models``, ``data`` and their own package, never each other (``tests/test_import_boundaries.py``).
"""

from .._lazy import lazy_exports

__all__ = [
    "ActivationStore", "StoreWriter", "GradientBatch", "extract", "iter_activations", "iter_gradients", "predict",
    "predict_tensor", "write_batches", "TopK", "holm", "benjamini_hochberg", "adjust_pvalues",
]

# Submodules load on first use of their names, as in the analyzer packages.
__getattr__, __dir__ = lazy_exports(__name__, {
    "extract": ["GradientBatch", "extract", "iter_activations", "iter_gradients", "predict", "predict_tensor", "write_batches"],
    "store": ["ActivationStore", "StoreWriter"],
    "topk": ["TopK"],
    "corrections": ["holm", "benjamini_hochberg", "adjust_pvalues"],
})

"""The core every analyzer stands on: extraction through forward hooks, the activation store,
mergeable accumulators, the shared statistics and the Broden format.

Analyzers (``concepts``, ``dissection``, ``representation``, ``attribution``) import this package,
``models``, ``data`` and their own package, never each other (``tests/test_import_boundaries.py``).
"""

from .._lazy import lazy_exports

__all__ = [
    "ActivationStore", "StoreWriter", "GradientBatch", "capture", "StoreRequest", "Captured", "extract", "iter_activations", "iter_gradients", "predict",
    "predict_tensor", "write_batches", "TopK", "Accumulator", "RunningMoments", "Moments", "merge_all",
    "holm", "benjamini_hochberg", "adjust_pvalues", "BrodenRecord", "BrodenSet", "read_broden", "write_broden",
    "file_digest", "hash_files", "hash_tree", "hash_json", "frozen",
]

# Submodules load on first use of their names, as in the analyzer packages.
__getattr__, __dir__ = lazy_exports(__name__, {
    "extract": ["GradientBatch", "capture", "StoreRequest", "Captured", "extract", "iter_activations", "iter_gradients", "predict", "predict_tensor", "write_batches"],
    "store": ["ActivationStore", "StoreWriter"],
    "topk": ["TopK"],
    "accumulate": ["Accumulator", "Moments", "RunningMoments", "merge_all"],
    "broden": ["BrodenRecord", "BrodenSet", "read_broden", "write_broden"],
    "hashing": ["file_digest", "hash_files", "hash_tree", "hash_json"],
    "corrections": ["holm", "benjamini_hochberg", "adjust_pvalues"],
    "frozen": ["frozen"],
})

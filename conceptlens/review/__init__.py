"""Dataset review primitives: group leakage across splits, group-aware re-splitting, error slices,
label issues and shortcut statistics.

Pure analyses on tables and arrays (a manifest's rows, embeddings, predicted probabilities); they
read no images and run no model, so the report and the CLI feed them what the core extracted.
"""

from .._lazy import lazy_exports

__all__ = [
    "LeakageResult", "group_leakage", "check_nested",
    "SplitResult", "group_split", "write_split",
    "SliceResult", "discover_slices", "kmeans_slices", "precision_at_k", "average_precision", "best_slice",
    "LabelIssueResult", "confident_label_issues", "confident_label_issues_from_probabilities", "cross_val_probabilities",
    "wilson_interval", "newcombe_interval", "accuracy_by_group", "group_gap_test", "cluster_alignment",
]

# Submodules load on first use of their names: importing one analyzer loads only its own code.
__getattr__, __dir__ = lazy_exports(__name__, {
    "leakage": ["LeakageResult", "group_leakage", "check_nested"],
    "split": ["SplitResult", "group_split", "write_split"],
    "slices": ["SliceResult", "discover_slices", "kmeans_slices", "precision_at_k", "average_precision", "best_slice"],
    "labels": ["LabelIssueResult", "confident_label_issues", "confident_label_issues_from_probabilities",
               "cross_val_probabilities"],
    "shortcuts": ["wilson_interval", "newcombe_interval", "accuracy_by_group", "group_gap_test", "cluster_alignment"],
})

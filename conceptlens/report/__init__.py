"""The global model report, the dataset review and the before/after comparison: a TOML spec in, a
self-contained HTML folder out."""

from .._lazy import lazy_exports

__all__ = ["ReportSpec", "ReportResult", "SECTIONS", "build_report", "load_spec", "ReviewResult", "ReviewBuild",
           "build_review", "Comparison", "compare_results", "write_compare_page"]

# Submodules load on first use of their names: importing one analyzer loads only its own code.
__getattr__, __dir__ = lazy_exports(__name__, {
    "build": ["ReportResult", "build_report"],
    "spec": ["SECTIONS", "ReportSpec", "load_spec"],
    "review": ["ReviewResult", "ReviewBuild", "build_review"],
    "compare": ["Comparison", "compare_results", "write_compare_page"],
})

"""Network dissection on Broden-style concept sets: thresholds, IoU tally, dissect (the Broden reader and
writer live in :mod:`conceptlens.core.broden`, shared with the world generator; re-exported here)."""

from .._lazy import lazy_exports

__all__ = [
    "BrodenRecord", "BrodenSet", "read_broden", "write_broden", "encode_mask", "decode_mask",
    "DissectionResult", "dissect", "IoUTally", "label_columns",
    "GridQuantileSketch", "Thresholds", "unit_quantiles", "load_thresholds",
]

# Submodules load on first use of their names: importing one analyzer loads only its own code.
__getattr__, __dir__ = lazy_exports(__name__, {
    "conceptlens.core.broden": ["BrodenRecord", "BrodenSet", "decode_mask", "encode_mask", "read_broden", "write_broden"],
    "dissect": ["DissectionResult", "dissect"],
    "iou": ["IoUTally", "label_columns"],
    "quantiles": ["GridQuantileSketch", "Thresholds", "load_thresholds", "unit_quantiles"],
})

"""Network dissection on Broden-style concept sets: reader/writer, thresholds, IoU tally, dissect."""

from .broden import BrodenRecord, BrodenSet, decode_mask, encode_mask, read_broden, write_broden
from .dissect import DissectionResult, dissect
from .iou import IoUTally, label_columns
from .quantiles import GridQuantileSketch, Thresholds, load_thresholds, unit_quantiles

__all__ = [
    "BrodenRecord", "BrodenSet", "read_broden", "write_broden", "encode_mask", "decode_mask",
    "DissectionResult", "dissect", "IoUTally", "label_columns",
    "GridQuantileSketch", "Thresholds", "unit_quantiles", "load_thresholds",
]

"""The global model report: a TOML spec in, a self-contained HTML folder out."""

from .build import ReportResult, build_report
from .spec import SECTIONS, ReportSpec, load_spec

__all__ = ["ReportSpec", "ReportResult", "SECTIONS", "build_report", "load_spec"]

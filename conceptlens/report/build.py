"""``build_report``: run every analyzer a spec asks for (cached), then render the HTML report.

Stages run in a fixed order; each result is cached under ``<out>/cache`` keyed by a hash of the
model weights, the data fingerprints and the stage's parameters (:mod:`.cache`), so re-running an
unchanged spec only re-renders. ``on_stage(name, seconds, cached)`` reports progress per stage.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from ..data import Manifest
from ..errors import ConceptLensError
from ..models import load_model, validate_layers
from . import sections as S
from .cache import ResultCache
from .render import Page, render_page
from .spec import SECTIONS, ReportSpec, validate_spec

__all__ = ["ReportResult", "build_report"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReportResult:
    """A built report.

    Attributes
    ----------
    index : Path
        ``index.html``.
    stages : tuple of dict
        ``{"name", "seconds", "cached", "directory"}`` per analysis stage.
    analysis_seconds : float
        Time of all stages (computing or loading results).
    render_seconds : float
        Time of building the page (figures, tables, HTML) from the results.
    """

    index: Path
    stages: tuple
    analysis_seconds: float
    render_seconds: float


class _Run:
    """One build: the loaded model and data, the cache, and the stage log."""

    def __init__(self, spec, out, progress, on_stage):
        self.spec, self.out, self.progress, self.on_stage = spec, Path(out), progress, on_stage
        self.model = load_model(spec.model, device=spec.device, num_classes=spec.num_classes)
        self.manifest = Manifest.read(spec.manifest)
        # Resolved (and logged) before any stage, so a model that states no preprocessing stops here;
        # the stages resolve the same model + manifest the same way.
        self.model.preprocessing_for(self.manifest)
        self.cache = ResultCache(self.out / "cache")
        self.base = {"model": self.model.spec, "weights": self.model.weights_hash,
                     "manifest": self.manifest.content_hash(), "seed": spec.seed}
        self.stages = []

    def stage(self, name, params, compute, load):
        """Compute (or load from the cache) one result; ``compute(directory)`` must save it there."""
        t0 = time.perf_counter()
        key = self.cache.key(name=name, **self.base, **params)
        result, cached = self.cache.get(name, key, compute, load)
        seconds = time.perf_counter() - t0
        self.stages.append({"name": name, "seconds": seconds, "cached": cached, "directory": f"cache/{name}-{key}"})
        if self.on_stage:
            self.on_stage(name, seconds, cached)
        return result


def build_report(spec, out, progress=True, on_stage=None):
    """Analyse a model as ``spec`` says and write the HTML report to ``out``.

    Parameters
    ----------
    spec : ReportSpec
        From :func:`~conceptlens.report.spec.load_spec` (or built directly).
    out : str or Path
        Report folder: ``index.html``, ``assets/``, ``tables/``, ``cache/``.
    progress : bool
        Progress bars inside stages.
    on_stage : callable, optional
        ``on_stage(name, seconds, cached)`` after each stage.

    Returns
    -------
    ReportResult
    """
    if not isinstance(spec, ReportSpec):
        raise ConceptLensError(f"build_report needs a ReportSpec (see load_spec); got {type(spec).__name__}")
    spec = validate_spec(spec)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConceptLensError(f"report output {out} is a file; choose a directory")
    run = _Run(spec, out, progress, on_stage)
    # Every layer the spec names, checked before any long stage runs.
    for names in (spec.layers, spec.tcav_layers, spec.dissect_layers, [spec.duplicate_layer] if spec.duplicate_layer else None):
        if names:
            validate_layers(run.model.module, names)
    # Attribution methods too (e.g. LRP on an exported program whose layers cannot be rebuilt).
    if "drilldown" in spec.sections or "dataset" in spec.sections:
        from ..attribution import check_method

        for method in sorted({*spec.drill_methods, *([spec.spray_method] if spec.spray_classes else [])}):
            check_method(run.model, method)

    t0 = time.perf_counter()
    results = {}
    for build in S.STAGES:
        results.update(build(run, results))
    analysis = time.perf_counter() - t0

    t1 = time.perf_counter()
    page = Page(out)
    for sid in sorted(spec.sections, key=SECTIONS.index):
        S.SECTION_BUILDERS[sid](page, spec, results)
    index = render_page(page, spec.title, run.model.spec, str(run.manifest.path), run.stages, spec.to_dict())
    render = time.perf_counter() - t1
    logger.info("report %s: analyses %.1f s, rendering %.1f s", index, analysis, render)
    return ReportResult(index=index, stages=tuple(run.stages), analysis_seconds=analysis, render_seconds=render)


"""The report spec: a TOML file naming the model, the data and what to analyse.

Relative paths are resolved against the spec file's folder. Every table and key is validated; an
unknown key is an error that names it and suggests the closest valid one. See
``data_manifests/report-demo.toml`` and ``data_manifests/report-torchvision.toml`` for examples.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConceptLensError, did_you_mean

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["ReportSpec", "SECTIONS", "load_spec"]

#: Report sections, in page order: audit verdicts come first, then what the model is and knows.
SECTIONS = ("audits", "overview", "concepts", "units", "layers", "dataset", "drilldown")


@dataclass(frozen=True)
class ReportSpec:
    """What a report analyses; built by :func:`load_spec` (or directly, with absolute paths).

    Attributes
    ----------
    model : str
        Model spec (``demo:``, ``torchvision:``, ``python:``, ``export:``).
    manifest : Path
        Data manifest CSV.
    layers : tuple of str
        Layers captured for probes, embeddings, neighbours and top-k images.
    title : str
    seed : int
        Seeds every analyzer.
    sections : tuple of str
        Sections to build (subset of :data:`SECTIONS`); a section whose inputs are not given
        (e.g. ``units`` without a Broden set) is skipped with a note in the report.
    num_classes, device, batch_size : model and loader options.
    concepts, random_pool : Path or None
        TCAV concept sets (a folder of concept subfolders or an ``image,concept`` CSV) and random pool.
    concept_names : tuple of str or None
        Concepts to test (default: all of ``concepts``); every test counts in the correction.
    tcav_classes, tcav_layers : tuple of str or None
        Classes and layers TCAV scores (default: all classes; the last two of ``layers``).
    tcav_runs : int or None
        TCAV concept runs (default: chosen for power from the concept images, as `conceptlens tcav`).
    broden : Path or None
        Broden-style concept set for network dissection.
    dissect_layers : tuple of str or None
        Default: the last two of ``layers``.
    dissect_visualize : bool
        Show each top unit's feature visualisation beside its dissection images (``[dissection]
        visualize``; default off: it optimises one image per unit).
    dissect_visualize_steps : int
        Optimisation steps of those visualisations (default 128, a quarter of lucent's 512, to keep
        the report cheap).
    probe_targets : tuple of str or None
        Manifest columns the probes predict (default: ``label`` and every attribute with 2 to 20
        distinct values).
    embed_method : str
        ``tsne``, ``umap`` or ``pca``.
    duplicate_layer : str or None
        Layer whose layout (pooled to a 4 x 4 grid) the near-duplicate search compares (default: the
        first of ``layers``; an early post-activation layer works best).
    duplicate_threshold : float
        Cosine similarity above which a train/test pair is a near-duplicate.
    drill_methods : tuple of str
        Attribution methods of the drill-down.
    drill_samples : int
        Samples per class shown in the drill-down.
    spray_classes : tuple of str or None
        Classes whose explanation strategies SpRAy clusters (default: the classes of the
        ``insensitive`` audits).
    audit_insensitive : tuple of (concept, class)
        TCAV audits: the class must not be sensitive to the concept.
    audit_not_decodable : tuple of str
        Probe audits: the attribute must not be decodable above its control task.
    review_group : str or None
        Dataset review (``conceptlens review``): the manifest column that groups rows (e.g. ``patient``);
        a group in two splits is leakage.
    review_sensitive : tuple of str
        Attributes audited as shortcuts (e.g. ``site``, ``pen``).
    review_group_attributes : tuple of str
        Attributes that are properties of the group (a patient's site): a group with two values is an error.
    review_layer : str or None
        Layer whose features the slice discovery and label-issue probes use (default: the last of ``layers``).
    review_split : str
        The split the model is evaluated on (accuracy per group, slices); default ``test``.
    review_slices : int
        Slices to discover (Domino's ``n_slices``).
    review_margin : float
        Equivalence margin of a shortcut ``pass``: every within-class accuracy gap's 95 % CI inside ±margin.
    decision_classes : tuple of str or None
        Classes whose decision modes the ``layers`` section shows (``[decision] classes``; default none).
    decision_layer : str or None
        Their layer (default: the last of ``layers``); its units are read by concept when ``[dissection]``
        covers it.
    decision_modes, decision_cells : int
        Leaves of each tree (default 6) and the grid side of the unit contributions (default 2).
    decision_split : str or None
        Only rows of this split (default all).
    path : Path or None
        The spec file.
    """

    model: str
    manifest: Path
    layers: tuple
    title: str = "conceptlens report"
    seed: int = 0
    sections: tuple = SECTIONS
    num_classes: int | None = None
    device: str = "auto"
    batch_size: int = 64
    concepts: Path | None = None
    random_pool: Path | None = None
    concept_names: tuple | None = None
    tcav_classes: tuple | None = None
    tcav_layers: tuple | None = None
    tcav_runs: int | None = None
    broden: Path | None = None
    dissect_layers: tuple | None = None
    dissect_visualize: bool = False
    dissect_visualize_steps: int = 128
    probe_targets: tuple | None = None
    embed_method: str = "tsne"
    duplicate_layer: str | None = None
    duplicate_threshold: float = 0.97
    drill_methods: tuple = ("saliency", "integrated-gradients", "gradcam")
    drill_samples: int = 2
    spray_classes: tuple | None = None
    spray_method: str = "lrp-epsilon-plus-flat"
    audit_insensitive: tuple = ()
    audit_not_decodable: tuple = ()
    review_group: str | None = None
    review_sensitive: tuple = ()
    review_group_attributes: tuple = ()
    review_layer: str | None = None
    review_split: str = "test"
    review_slices: int = 5
    review_margin: float = 0.1
    decision_classes: tuple | None = None
    decision_layer: str | None = None
    decision_modes: int = 6
    decision_cells: int = 2
    decision_split: str | None = None
    path: Path | None = field(default=None, compare=False)

    def to_dict(self):
        """JSON-ready form (paths as strings); the report records it as its provenance."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
        return out


# Each TOML table: key -> (ReportSpec field, kind). Kinds: str, path, bool, int, float, names, pairs.
_TABLES = {
    "": {"title": ("title", "str"), "seed": ("seed", "int"), "sections": ("sections", "names")},
    "model": {"spec": ("model", "str"), "num_classes": ("num_classes", "int"), "device": ("device", "str")},
    "data": {"manifest": ("manifest", "path"), "batch_size": ("batch_size", "int")},
    "layers": {"names": ("layers", "names")},
    "concepts": {"dir": ("concepts", "path"), "random_pool": ("random_pool", "path"), "names": ("concept_names", "names"),
                 "classes": ("tcav_classes", "names"),
                 "layers": ("tcav_layers", "names"), "runs": ("tcav_runs", "int")},
    "dissection": {"broden": ("broden", "path"), "layers": ("dissect_layers", "names"),
                   "visualize": ("dissect_visualize", "bool"), "visualize_steps": ("dissect_visualize_steps", "int")},
    "probes": {"targets": ("probe_targets", "names")},
    "embedding": {"method": ("embed_method", "str")},
    "dataset": {"layer": ("duplicate_layer", "str"), "duplicate_threshold": ("duplicate_threshold", "float")},
    "drilldown": {"methods": ("drill_methods", "names"), "samples": ("drill_samples", "int"),
                  "spray_classes": ("spray_classes", "names"), "spray_method": ("spray_method", "str")},
    "audits": {"insensitive": ("audit_insensitive", "pairs"), "not_decodable": ("audit_not_decodable", "names")},
    "review": {"group": ("review_group", "str"), "sensitive": ("review_sensitive", "names"),
               "group_attributes": ("review_group_attributes", "names"), "layer": ("review_layer", "str"),
               "split": ("review_split", "str"), "slices": ("review_slices", "int"), "margin": ("review_margin", "float")},
    "decision": {"classes": ("decision_classes", "names"), "layer": ("decision_layer", "str"), "modes": ("decision_modes", "int"),
                 "cells": ("decision_cells", "int"), "split": ("decision_split", "str")},
}
_REQUIRED = {"model": "spec", "data": "manifest", "layers": "names"}
_EMBED_METHODS = ("tsne", "umap", "pca")


def _resolve_model(spec, base):
    """Make the file parts of a model spec (weights, program, code file) relative to the spec file."""
    kind, sep, rest = spec.partition(":")
    if not sep:
        return spec  # load_model explains what a model spec looks like
    parts = rest.split(":")
    # Which ':'-separated parts are files: demo/export PATH, torchvision ARCH[:W], python MOD:FACTORY[:W].
    files = {"demo": [0], "export": [0], "torchvision": [1], "python": [0, 2]}.get(kind, [])
    for i in files:
        if i < len(parts) and parts[i] and (kind != "python" or i == 2 or parts[i].endswith(".py")):
            p = Path(parts[i]).expanduser()
            if not p.is_absolute():
                parts[i] = str(base / p)
    return f"{kind}:{':'.join(parts)}"


def _where(source, table, key):
    return f"{source}: [{table}] {key}" if table else f"{source}: {key}"


def _convert(value, kind, where, base):
    if kind == "str":
        if not isinstance(value, str) or not value:
            raise ConceptLensError(f"{where} must be a non-empty string; got {value!r}")
        return value
    if kind == "path":
        if not isinstance(value, str) or not value:
            raise ConceptLensError(f"{where} must be a path (a string); got {value!r}")
        p = Path(value).expanduser()
        p = p if p.is_absolute() else base / p
        if not p.exists():
            raise ConceptLensError(f"{where} = {value!r}: {p} does not exist; paths are relative to the spec file")
        return p
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConceptLensError(f"{where} must be true or false; got {value!r}")
        return value
    if kind == "int":
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConceptLensError(f"{where} must be a non-negative integer; got {value!r}")
        return value
    if kind == "float":
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConceptLensError(f"{where} must be a number; got {value!r}")
        return float(value)
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConceptLensError(f"{where} must be a list of strings; got {value!r}")
    if kind == "names":
        return tuple(value)
    pairs = []
    for v in value:  # "concept:class"
        concept, sep, cls = v.rpartition(":")
        if not sep or not concept or not cls:
            raise ConceptLensError(f"{where}: {v!r} is not a concept:class pair (e.g. \"tag:circle\")")
        pairs.append((concept, cls))
    return tuple(pairs)


def _unknown(source, table, key, valid):
    where = f"table [{table}]" if table else "the top level"
    return ConceptLensError(f"{source}: unknown key {key!r} in {where}" + (did_you_mean(key, valid, 1) or f"; valid keys: {', '.join(valid)}"))


def load_spec(path):
    """Read and validate a report spec TOML file.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    ReportSpec
    """
    path = Path(path)
    if not path.is_file():
        raise ConceptLensError(f"report spec {path} does not exist; write one, or run `conceptlens demo --quick`, "
                               "which writes a complete, commented example as conceptlens-demo/report.toml")
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConceptLensError(f"report spec {path} is not valid TOML: {exc}") from None
    base = path.resolve().parent
    values = {}
    for key, value in doc.items():
        if isinstance(value, dict):
            if key not in _TABLES or key == "":
                raise _unknown(path, "", key, [t for t in _TABLES if t] + list(_TABLES[""]))
            items, table = value.items(), key
        else:
            if key not in _TABLES[""]:
                raise _unknown(path, "", key, [t for t in _TABLES if t] + list(_TABLES[""]))
            items, table = [(key, value)], ""
        for k, v in items:
            if k not in _TABLES[table]:
                raise _unknown(path, table, k, list(_TABLES[table]))
            name, kind = _TABLES[table][k]
            values[name] = _convert(v, kind, _where(path, table, k), base)
    for table, key in _REQUIRED.items():
        if _TABLES[table][key][0] not in values:
            raise ConceptLensError(f"{path}: [{table}] {key} is required")
    values["model"] = _resolve_model(values["model"], base)
    return validate_spec(ReportSpec(path=path.resolve(), **values))


def validate_spec(spec):
    """Check cross-field rules of a :class:`ReportSpec`; return it unchanged."""
    source = spec.path or "report spec"
    bad = [s for s in spec.sections if s not in SECTIONS]
    if bad:
        raise ConceptLensError(f"{source}: unknown section {bad[0]!r}{did_you_mean(bad[0], SECTIONS, 1)} (valid: {', '.join(SECTIONS)})")
    if not spec.layers:
        raise ConceptLensError(f"{source}: [layers] names must list at least one layer")
    if spec.embed_method not in _EMBED_METHODS:
        raise ConceptLensError(f"{source}: [embedding] method must be one of {', '.join(_EMBED_METHODS)}; got {spec.embed_method!r}")
    if not 0 < spec.duplicate_threshold <= 1:
        raise ConceptLensError(f"{source}: [dataset] duplicate_threshold must be in (0, 1]; got {spec.duplicate_threshold}")
    if spec.tcav_runs is not None and spec.tcav_runs < 2:
        raise ConceptLensError(f"{source}: [concepts] runs must be at least 2 (10 or more for a meaningful test); got {spec.tcav_runs}")
    if spec.review_layer is not None and spec.review_layer not in spec.layers:
        raise ConceptLensError(f"{source}: [review] layer {spec.review_layer!r} must be one of [layers] names {list(spec.layers)}")
    if spec.review_slices < 2:
        raise ConceptLensError(f"{source}: [review] slices must be at least 2; got {spec.review_slices}")
    if not 0 < spec.review_margin < 1:
        raise ConceptLensError(f"{source}: [review] margin must be in (0, 1); got {spec.review_margin}")
    if spec.dissect_visualize_steps < 1:
        raise ConceptLensError(f"{source}: [dissection] visualize_steps must be at least 1; got {spec.dissect_visualize_steps}")
    if spec.decision_modes < 1 or spec.decision_cells < 1:
        raise ConceptLensError(f"{source}: [decision] modes and cells must be at least 1; got {spec.decision_modes} and {spec.decision_cells}")
    if spec.audit_insensitive and (spec.concepts is None or spec.random_pool is None):
        raise ConceptLensError(f"{source}: [audits] insensitive needs [concepts] dir and random_pool")
    return spec

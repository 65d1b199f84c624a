"""Network dissection: label each unit with the Broden concept its thresholded map overlaps best.

Stages (each resumable; a finished stage whose inputs are unchanged is reused):

1. **extract** — one forward pass per image: the requested layers' spatial maps go to an
   :class:`~conceptlens.core.store.ActivationStore` (``<out>/activations``, float16
   by default). Images are resized whole (never cropped), so maps stay aligned with the masks.
2. **thresholds** — per unit, the ``quantile`` of its activations over all positions of all
   images (:mod:`~conceptlens.dissection.quantiles`; exact or sketched), or given ones.
3. **tally** — store chunks of all layers are read in lockstep and every mask is decoded once;
   :class:`~conceptlens.dissection.iou.IoUTally` counts intersections and unions, and a streaming
   top-k keeps each unit's best images (score: spatial max of the map).
4. **result** — per unit the best label per category, the overall label, IoU, threshold,
   ``interpretable`` (IoU ≥ ``iou_threshold``) and ``dead`` (never above its threshold), a
   per-layer summary, and per unit a PNG of its top images with the unit's mask (bright, yellow
   outline) and its label's mask (cyan outline) overlaid.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from ..data import Preprocessing
from ..errors import ConceptLensError
from ..models import load_model, validate_layers
from ..core.extract import extract
from ..core.hashing import hash_json
from ..core.result import Result, provenance
from ..core.topk import TopK
from ..core.broden import BrodenSet, read_broden
from .iou import RULES, IoUTally, label_batch, label_columns
from .quantiles import DEFAULT_BUDGET, Thresholds, load_thresholds, unit_quantiles

__all__ = ["DissectionResult", "dissect"]

logger = logging.getLogger(__name__)

RESULT_FORMAT = "conceptlens-dissection-1"
_UNIT_COLUMNS = ["layer", "unit", "label", "category", "iou", "threshold", "interpretable", "dead",
                 "label_number", "activated_pixels"]


def _safe(layer):
    return layer.replace("/", "_")


@dataclass(frozen=True)
class DissectionResult(Result):
    """Network dissection of some layers of a model on a Broden-style concept set.

    Attributes
    ----------
    units : pandas.DataFrame
        One row per unit (0-based): ``layer, unit, label, category, iou, threshold, interpretable,
        dead, label_number, activated_pixels`` and ``<category>_label``, ``<category>_iou`` per
        category. Dead units have an empty label and IoU 0.
    summary : pandas.DataFrame
        Per layer and category (and ``all``): ``units``, ``interpretable_units``,
        ``unique_concepts``, ``dead_units``.
    labels : pandas.DataFrame
        The IoU matrices' columns: ``column, number, name, category``.
    iou : dict of str to numpy.ndarray
        Per layer, ``[units, columns]`` float64.
    thresholds : dict of str to numpy.ndarray
        Per layer, ``[units]`` float64.
    top_rows, top_scores : dict of str to numpy.ndarray
        Per layer, ``[units, k]``: each unit's top images (``index.csv`` rows, -1 = none) and their
        scores (spatial max of the map).
    provenance : dict
        Model spec, weights hash, Broden set and its hash, data hash, layers, parameters and the
        method strings (quantiles, upsampling, rule).
    path : Path or None
        Directory the result lives in.
    """

    units: pd.DataFrame = field(repr=False)
    summary: pd.DataFrame = field(repr=False)
    labels: pd.DataFrame = field(repr=False)
    iou: dict = field(repr=False)
    thresholds: dict = field(repr=False)
    top_rows: dict = field(repr=False)
    top_scores: dict = field(repr=False)
    provenance: dict = field(repr=False)
    path: Path | None = None

    KIND, META = "dissection", "result.json"

    @property
    def layers(self):
        return list(self.provenance["layers"])

    def to_frame(self):
        """The per-unit table (a copy of :attr:`units`)."""
        return self.units.copy()

    def unit_labels(self, layer, interpretable=True):
        """``unit, label, category`` of ``layer``'s units (e.g. for ``decision_tree(unit_labels=...)``).

        With ``interpretable`` (default) a unit below the IoU threshold, or dead, gets an empty label.
        """
        if layer not in self.layers:
            raise ConceptLensError(f"layer {layer!r} was not dissected; dissected layers: {', '.join(self.layers)}")
        part = self.units[self.units["layer"] == layer]
        ok = part["interpretable"].to_numpy(bool) if interpretable else ~part["dead"].to_numpy(bool)
        return pd.DataFrame({"unit": part["unit"].to_numpy(), "label": np.where(ok, part["label"], ""),
                             "category": np.where(ok, part["category"], "")})

    def unit_panels(self, layer, unit, broden, cache=None):
        """What the unit sees in its top images: ``[(image, unit_mask, label_mask)]``, best first.

        ``image`` is the Broden image (uint8 ``[H, W, 3]``), ``unit_mask`` the unit's map upsampled
        (bilinear) to the image and thresholded at its quantile, ``label_mask`` the pixels of the
        unit's label (its category's, or any category's under ``netdissect-lite``). Empty for dead
        units and for ``top_k = 0``. Reads the maps from the activation store :func:`dissect` keeps
        in the result's folder (``activations/``; the provenance's store path when the result was
        not loaded from a folder); ``cache`` (a dict) keeps decoded images between calls. Drawn by
        :func:`conceptlens.plotting.write_unit_gallery`.
        """
        from ..core.store import ActivationStore

        row = self.units[(self.units["layer"] == layer) & (self.units["unit"] == unit)]
        if row.empty:
            raise ConceptLensError(f"no unit {unit} of layer {layer!r} in this dissection (layers: {', '.join(self.layers)})")
        row = row.iloc[0]
        if bool(row["dead"]):
            return []
        cache = {} if cache is None else cache
        key = ("store", layer)
        if key not in cache:
            store = ActivationStore.open(Path(self.path) / "activations" if self.path is not None
                                         else self.provenance["store"]["path"])
            cache[key] = (store.array(layer), {int(r): i for i, r in enumerate(store.rows["manifest_row"])})
        maps, store_row = cache[key]
        number, category = int(row["label_number"]), row["category"]
        rule = self.provenance["parameters"]["rule"]
        panels = []
        for r in (int(r) for r in self.top_rows[layer][unit] if r >= 0):
            if r not in cache:
                with Image.open(broden.image_path(r)) as im:
                    cache[r] = (np.asarray(im.convert("RGB")), broden.annotations(r))
            image, ann = cache[r]
            fmap = torch.from_numpy(np.asarray(maps[store_row[r], unit], dtype=np.float32))[None, None]
            up = F.interpolate(fmap, size=image.shape[:2], mode="bilinear", align_corners=False)[0, 0].numpy()
            sh, sw = int(broden.index["sh"].iat[r]), int(broden.index["sw"].iat[r])
            lmask = _label_mask(ann, number, category, rule, (sh, sw)) if number > 0 else np.zeros((sh, sw), bool)
            yi = (np.arange(image.shape[0]) * sh // image.shape[0])
            xi = (np.arange(image.shape[1]) * sw // image.shape[1])
            panels.append((image, up > self.thresholds[layer][unit], lmask[np.ix_(yi, xi)]))
        return panels

    def _write(self, directory):
        """CSV and .npy, then ``result.json`` (provenance).

        Layout: ``units.csv``, ``summary.csv``, ``labels.csv``,
        ``arrays/{iou,thresholds,top_rows,top_scores}_<layer>.npy``.
        """
        (directory / "arrays").mkdir(parents=True, exist_ok=True)
        self.units.to_csv(directory / "units.csv", index=False)
        self.summary.to_csv(directory / "summary.csv", index=False)
        self.labels.to_csv(directory / "labels.csv", index=False)
        for layer in self.layers:
            for name in ("iou", "thresholds", "top_rows", "top_scores"):
                np.save(directory / "arrays" / f"{name}_{_safe(layer)}.npy", getattr(self, name)[layer])
        return {"format": RESULT_FORMAT}

    @classmethod
    def _read(cls, directory, meta):
        if meta.get("format") != RESULT_FORMAT:
            raise ConceptLensError(f"{directory / cls.META} is not a {RESULT_FORMAT} result (format {meta.get('format')!r})")
        prov = meta["provenance"]
        arrays = {name: {layer: np.load(directory / "arrays" / f"{name}_{_safe(layer)}.npy", allow_pickle=False)
                         for layer in prov["layers"]}
                  for name in ("iou", "thresholds", "top_rows", "top_scores")}
        read = lambda name: pd.read_csv(directory / name, keep_default_na=False, dtype={"layer": str})  # noqa: E731
        units = read("units.csv")
        for col in units.columns:
            if col == "label" or col.endswith("_label") or col in ("layer", "category"):
                units[col] = units[col].astype(str)
        return cls(units=units, summary=read("summary.csv"), labels=read("labels.csv"),
                   provenance=prov, path=directory, **arrays)


def _top_images(acc, layers, n_units, k):
    """``{layer: (rows, scores)}``, ``[units, k]`` each, padded with row -1 / score -inf where fewer
    than ``k`` images were seen (the layout of ``toprows_*.npy`` / ``topscores_*.npy``)."""
    found = {} if acc is None else acc.result()
    tops = {}
    for layer in layers:
        scores, rows, _ = found.get(layer, (np.zeros((n_units[layer], 0)), np.zeros((n_units[layer], 0), dtype=np.int64), None))
        pad = ((0, 0), (0, k - scores.shape[1]))
        tops[layer] = (np.pad(rows, pad, constant_values=-1), np.pad(scores.astype(np.float64), pad, constant_values=-np.inf))
    return tops


class _Stages:
    """``stages.json`` in the work folder: the input key of each finished stage."""

    def __init__(self, path):
        self.path = path
        self.done = json.loads(path.read_text()) if path.is_file() else {}

    def finished(self, name, key):
        return self.done.get(name) == key

    def mark(self, name, key):
        self.done[name] = key
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.done, indent=1))
        os.replace(tmp, self.path)


def _check_params(quantile, iou_threshold, rule, top_k, batch_size, chunk_rows, dtype):
    if isinstance(quantile, bool) or not isinstance(quantile, (int, float)) or not 0 < quantile < 1:
        raise ConceptLensError(f"the `quantile` parameter of dissect must be a number in (0, 1) (default 0.995); got {quantile!r}")
    if isinstance(iou_threshold, bool) or not isinstance(iou_threshold, (int, float)) or not 0 <= iou_threshold <= 1:
        raise ConceptLensError(f"the `iou_threshold` parameter of dissect must be a number in [0, 1] (default 0.04); got {iou_threshold!r}")
    if rule not in RULES:
        raise ConceptLensError(f"the `rule` parameter of dissect must be one of {', '.join(RULES)}; got {rule!r}")
    for name, value, lo in (("top_k", top_k, 0), ("batch_size", batch_size, 1), ("chunk_rows", chunk_rows, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ConceptLensError(f"the `{name}` parameter of dissect must be an integer >= {lo}; got {value!r}")
    if dtype not in ("float16", "float32"):
        raise ConceptLensError(f"the `dtype` parameter of dissect must be float16 or float32; got {dtype!r}")


def _preprocessing(model, broden, size, mean, std):
    # Only the normalisation comes from the model's preprocessing: dissection resizes whole images
    # (never crops) so unit maps stay aligned with the masks.
    default = model.preprocessing_for(None, mean=mean, std=std)
    if size is None:
        fixed = model.input_size[0] if model.input_size and model.input_size[0] == model.input_size[1] else None
        size = default.crop or default.resize or fixed
        if size is not None:
            logger.info("dissection input size auto → %d (the model's input size; images are resized whole, never cropped)", size)
    prep = Preprocessing(resize=size, crop=None, mean=default.mean, std=default.std,
                         source=f"{default.source}; resized whole to {size or 'the images own size'}, never cropped")
    dims = broden.index[["ih", "iw"]].drop_duplicates().to_numpy()
    if len(dims) > 1:
        ratios = {round(h / w, 6) for h, w in dims}
        if size is None or len(ratios) > 1:
            raise ConceptLensError(
                f"the Broden images of {broden.root} have {len(dims)} different sizes (e.g. {dims[0].tolist()} and "
                f"{dims[1].tolist()}); dissection resizes whole images, so pass --size (same aspect ratio) "
                "or resize the set's images"
            )
    return prep


def _layer_units(store, layers):
    shapes = {}
    for layer in layers:
        shape = store.shape(layer)
        if len(shape) != 3:
            raise ConceptLensError(
                f"layer {layer!r} gives {len(shape)}-D outputs per image {tuple(shape)}; dissection needs "
                "convolutional [C, H, W] maps — choose a conv layer (see `conceptlens layers MODEL`)"
            )
        shapes[layer] = shape
    return shapes


def _label_mask(ann, number, category, rule, shape):
    mask = np.zeros(shape, dtype=bool)
    cats = [category] if rule == "paper" else list(ann)
    for cat in cats:
        for entry in ann.get(cat, []):
            if isinstance(entry, (int, np.integer)):
                if entry == number:
                    mask[:] = True
            else:
                mask |= entry == number
    return mask


def _unit_table(layer, iou, thr, tally, columns, iou_threshold):
    cats = columns.categories
    n_units = iou.shape[0]
    dead = tally.unit_area == 0
    table = {"layer": [layer] * n_units, "unit": np.arange(n_units)}
    best_iou = np.zeros((n_units, len(cats)))
    best_col = np.full((n_units, len(cats)), -1)
    for ci, cat in enumerate(cats):
        cols = np.flatnonzero(columns.category == ci)
        if cols.size:
            arg = iou[:, cols].argmax(axis=1)
            best_col[:, ci] = cols[arg]
            best_iou[:, ci] = iou[np.arange(n_units), cols[arg]]
    overall = best_iou.argmax(axis=1)
    score = best_iou[np.arange(n_units), overall]
    col = best_col[np.arange(n_units), overall]
    labelled = (score > 0) & ~dead
    name = np.where(labelled, columns.name[np.maximum(col, 0)], "")
    table.update({
        "label": name.astype(str),
        "category": np.where(labelled, np.asarray(cats, dtype=object)[overall], "").astype(str),
        "iou": np.where(labelled, score, 0.0),
        "threshold": thr,
        "interpretable": labelled & (score >= iou_threshold),
        "dead": dead,
        "label_number": np.where(labelled, columns.number[np.maximum(col, 0)], 0),
        "activated_pixels": tally.unit_area,
    })
    for ci, cat in enumerate(cats):
        ok = (best_iou[:, ci] > 0) & ~dead
        table[f"{cat}_label"] = np.where(ok, columns.name[np.maximum(best_col[:, ci], 0)], "").astype(str)
        table[f"{cat}_iou"] = np.where(ok, best_iou[:, ci], 0.0)
    return pd.DataFrame(table)


def _summary(units, categories):
    rows = []
    for layer, part in units.groupby("layer", sort=False):
        good = part[part["interpretable"]]
        for cat in list(categories) + ["all"]:
            sel = good if cat == "all" else good[good["category"] == cat]
            rows.append({
                "layer": layer, "category": cat, "units": len(part), "interpretable_units": len(sel),
                "unique_concepts": sel["label"].nunique(),
                "dead_units": int(part["dead"].sum()) if cat == "all" else 0,
            })
    return pd.DataFrame(rows, columns=["layer", "category", "units", "interpretable_units", "unique_concepts", "dead_units"])


def dissect(
    model,
    broden,
    layers,
    out,
    *,
    quantile=0.995,
    iou_threshold=0.04,
    rule="paper",
    thresholds=None,
    top_k=8,
    size=None,
    mean=None,
    std=None,
    categories=None,
    batch_size=32,
    dtype="float16",
    quantile_method="auto",
    memory_budget=DEFAULT_BUDGET,
    sketch_bins=1024,
    chunk_rows=32,
    num_workers=0,
    progress=True,
    engine="local",
):
    """Dissect ``layers`` of a model on a Broden-style concept set.

    Parameters
    ----------
    model : LoadedModel or str
        A loaded model or a model spec.
    broden : BrodenSet or path
        The concept set (:func:`~conceptlens.core.broden.read_broden`).
    layers : list of str
        Convolutional layers (``conceptlens layers MODEL``).
    out : path
        Output directory: the result files, ``activations/`` (the store) and ``work/`` (stage
        files). Re-running with the same inputs reuses finished stages.
    quantile : float, default 0.995
        Per-unit threshold quantile over all positions of all images.
    iou_threshold : float, default 0.04
        A unit is interpretable when its best IoU reaches this.
    rule : {"paper", "netdissect-lite"}
        Category rule of the unions (see :mod:`conceptlens.dissection.iou`).
    thresholds : path or dict, optional
        Given thresholds instead of quantiles: a ``.npy``/``.npz`` file
        (:func:`~conceptlens.dissection.quantiles.load_thresholds`) or ``{layer: array}``.
    top_k : int, default 8
        Top images kept (and drawn) per unit; 0 for none.
    size : int, optional
        Resize images (shorter side) to this; default the model's input size. Never cropped.
    mean, std : sequence of 3 floats, optional
        Normalisation (default the model's).
    categories : sequence of str, optional
        Broden categories to use (default all).
    batch_size : int
        Images per forward batch.
    dtype : {"float16", "float32"}
        Store dtype.
    quantile_method : {"auto", "exact", "sketch"}
        ``auto``: exact when the values fit ``memory_budget`` bytes, else the grid sketch.
    memory_budget : int
        Bytes for exact quantiles.
    sketch_bins : int
        Grid sketch cells per level.
    chunk_rows : int
        Images per tally chunk.
    num_workers : int
        DataLoader workers for the forward pass.
    progress : bool, default True
        tqdm progress bars.
    engine : {"local", "ray"}
        Where the forward pass runs (:func:`~conceptlens.core.extract.extract`); the store, and so
        the thresholds and tallies read from it here, are the same either way.

    Returns
    -------
    DissectionResult
        Also saved to ``out``.
    """
    _check_params(quantile, iou_threshold, rule, top_k, batch_size, chunk_rows, dtype)
    model = load_model(model) if isinstance(model, str) else model
    broden = broden if isinstance(broden, BrodenSet) else read_broden(broden, categories=categories)
    if categories is not None and set(categories) != set(broden.categories):
        broden = read_broden(broden.root, categories=categories)
    layers = validate_layers(model, layers)
    if thresholds is not None and not isinstance(thresholds, dict) and not Path(thresholds).is_file():
        raise ConceptLensError(f"thresholds file {thresholds} does not exist; give a .npy or .npz of per-unit thresholds")
    prep = _preprocessing(model, broden, size, mean, std)
    # Every input is checked above: only now are folders created.
    out = Path(out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    stages = _Stages(work / "stages.json")
    timings = {}

    # 1. one forward pass → spatial store
    t0 = time.perf_counter()
    manifest = broden.manifest()
    store = extract(model, manifest, layers, out / "activations", pool="none", dtype=dtype,
                    batch_size=batch_size, num_workers=num_workers, preprocessing=prep, progress=progress,
                    engine=engine)
    layers = store.layers
    if store.n_rows != len(broden):
        raise ConceptLensError(f"the activation store {store.path} has {store.n_rows} rows for {len(broden)} Broden images")
    shapes = _layer_units(store, layers)
    timings["extract"] = time.perf_counter() - t0

    # 2. thresholds
    t0 = time.perf_counter()
    given = None
    if thresholds is not None:
        given = (thresholds if isinstance(thresholds, dict)
                 else load_thresholds(thresholds, layers, {l: s[0] for l, s in shapes.items()}))
    thr, methods = {}, {}
    for layer in layers:
        c, h, w = shapes[layer]
        if given is not None:
            values = np.asarray(given[layer], dtype=np.float64).ravel()
            if values.size != c:
                raise ConceptLensError(f"given thresholds of layer {layer!r}: expected {c} values, got {values.size}")
            thr[layer] = values
            methods[layer] = f"given ({thresholds if not isinstance(thresholds, dict) else 'array'})"
            continue
        key = hash_json([store.meta["hash"], layer, quantile, quantile_method, memory_budget, sketch_bins])
        name = f"thresholds:{layer}"
        if stages.finished(name, key):
            thr[layer] = np.load(work / f"thresholds_{_safe(layer)}.npy")
            methods[layer] = json.loads((work / f"thresholds_{_safe(layer)}.json").read_text())["method"]
            logger.info("thresholds of %s: reusing %s", layer, work)
            continue
        res: Thresholds = unit_quantiles(
            lambda layer=layer: (chunk for _, chunk in store.iter_chunks(layer, chunk_rows)),
            quantile, c, store.n_rows * h * w, method=quantile_method, memory_budget=memory_budget,
            bins=sketch_bins, name=layer)
        thr[layer], methods[layer] = res.values, res.method
        np.save(work / f"thresholds_{_safe(layer)}.npy", res.values)
        (work / f"thresholds_{_safe(layer)}.json").write_text(json.dumps(
            {"method": res.method, "max_error_bound": float(res.error_bound.max(initial=0.0))}))
        stages.mark(name, key)
    timings["thresholds"] = time.perf_counter() - t0

    # 3. tally (masks decoded once per image, all layers in lockstep)
    t0 = time.perf_counter()
    columns = label_columns(broden, rule)
    broden_hash = broden.content_hash()  # CSVs and every mask file's contents: an edited mask re-tallies
    tally_key = hash_json([store.meta["hash"], broden_hash, rule, top_k,
                       {l: hashlib.sha256(thr[l].tobytes()).hexdigest() for l in layers}])
    tallies = {}
    if stages.finished("tally", tally_key):
        logger.info("IoU tally: reusing %s", work)
        for layer in layers:
            tallies[layer] = IoUTally.load(work, f"tally_{_safe(layer)}", columns, len(broden))
        tops = {layer: (np.load(work / f"toprows_{_safe(layer)}.npy"), np.load(work / f"topscores_{_safe(layer)}.npy"))
                for layer in layers}
    else:
        tallies = {layer: IoUTally(shapes[layer][0], columns) for layer in layers}
        topk = TopK(top_k, "max", layers=layers, locations=False) if top_k else None
        store_rows = store.rows["manifest_row"].to_numpy()
        bar = tqdm(total=store.n_rows, desc="tally", unit="img", disable=not progress)
        for parts in zip(*(store.iter_chunks(layer, chunk_rows) for layer in layers)):
            start = parts[0][0]
            rows = store_rows[start: start + len(parts[0][1])]
            labels = label_batch(broden, rows, columns)
            maps = {layer: torch.from_numpy(chunk) for layer, (_, chunk) in zip(layers, parts)}
            for layer in layers:
                tallies[layer].update(maps[layer], thr[layer], labels)
            if topk is not None:
                topk.update(rows, maps)
            bar.update(len(rows))
        bar.close()
        tops = _top_images(topk, layers, {layer: shapes[layer][0] for layer in layers}, top_k)
        for layer in layers:
            tallies[layer].save(work, f"tally_{_safe(layer)}")
            np.save(work / f"toprows_{_safe(layer)}.npy", tops[layer][0])
            np.save(work / f"topscores_{_safe(layer)}.npy", tops[layer][1])
        stages.mark("tally", tally_key)
    timings["tally"] = time.perf_counter() - t0

    # 4. result
    ious = {layer: tallies[layer].result() for layer in layers}
    units = pd.concat([_unit_table(layer, ious[layer], thr[layer], tallies[layer], columns, iou_threshold)
                       for layer in layers], ignore_index=True)
    for layer in layers:
        n_dead = int(units.loc[units["layer"] == layer, "dead"].sum())
        if n_dead:
            logger.info("layer %s: %d dead units (never above their threshold)", layer, n_dead)
    labels_frame = pd.DataFrame({"column": np.arange(len(columns)), "number": columns.number, "name": columns.name.astype(str),
                                 "category": [columns.categories[c] for c in columns.category]})
    prov = provenance(  # data: the Broden set (the store's manifest is its index), hashed as for the tally key
        model, broden, store=store, preprocessing=prep.to_dict(), timings=timings,
        parameters={
            "quantile": quantile, "iou_threshold": iou_threshold, "rule": rule, "top_k": top_k,
            "thresholds": None if thresholds is None else (str(thresholds) if not isinstance(thresholds, dict) else "array"),
            "dtype": dtype, "batch_size": batch_size,
            "quantile_method": quantile_method, "memory_budget": memory_budget, "sketch_bins": sketch_bins,
        },
        layers=layers,
        categories=list(broden.categories),
        n_images=len(broden),
        methods={
            "thresholds": methods,
            "upsample": "bilinear (torch's float32 arithmetic, align_corners=False) from the map to the sh x sw mask grid; "
                        "unit mask = up > T; maps never above T in an image skipped before upsampling, and within a map "
                        "only cells and columns that can exceed T (convexity) evaluated",
            "rule": ("paper: (category, label) columns; a category's union counts the unit's activation in images annotated "
                     "with it; image-level labels are whole-image masks" if rule == "paper" else
                     "netdissect-lite: label columns in their main category; activation counted for a category where a label "
                     "of it lies under the activated pixels or an image-level label of it is present; iou = I/(A+L-I+1e-10)"),
            "top_images": "spatial max of the unit's map",
            "tally": "(unit masks x pixels) @ (pixels x labels) as a gather of the activated pixels' label columns and "
                     "one bincount per batch; image-level labels via (unit x image areas) @ (image x labels); int64 counts",
        },
    )
    result = DissectionResult(units=units, summary=_summary(units, broden.categories), labels=labels_frame,
                              iou=ious, thresholds=thr, top_rows={l: tops[l][0] for l in layers},
                              top_scores={l: tops[l][1] for l in layers},
                              provenance=prov, path=out)
    result.save(out)
    return result

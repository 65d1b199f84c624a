"""Attribution maps of a few images for the drill-down view: maps, heatmap and overlay PNGs, a JSON index.

The PNGs are data for the report (one file per image and method), not plots: a heatmap maps the
relevance of each pixel to a colour (diverging ``bwr`` for signed methods, ``inferno`` for
non-negative ones, scaled by the map's 99.5th percentile of magnitudes), an overlay blends it over
the de-normalised input in proportion to the relevance magnitude.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from PIL import Image

from ..errors import ConceptLensError
from ..core.result import Result, provenance
from .methods import METHODS, attribute, check_method, method_info

__all__ = ["Explanations", "explain", "heatmap_rgb"]

logger = logging.getLogger(__name__)


def heatmap_rgb(a, signed=True):
    """RGB uint8 ``[H, W, 3]`` of one map: ``bwr`` in ``[-s, s]`` (signed) or ``inferno`` in ``[0, s]``,
    ``s`` = the 99.5th percentile of ``|a|``."""
    import matplotlib

    a = np.asarray(a, dtype=np.float32)
    scale = float(np.quantile(np.abs(a), 0.995)) or float(np.abs(a).max()) or 1.0
    if signed:
        rgba = matplotlib.colormaps["bwr"](np.clip(a / scale, -1, 1) * 0.5 + 0.5)
    else:
        rgba = matplotlib.colormaps["inferno"](np.clip(a / scale, 0, 1))
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def _overlay(image, a, signed):
    heat = heatmap_rgb(a, signed).astype(np.float32)
    mag = np.abs(np.asarray(a, dtype=np.float32))
    alpha = np.clip(mag / (float(np.quantile(mag, 0.995)) or 1.0), 0, 1)[..., None] * 0.75
    return (image * (1 - alpha) + heat * alpha).round().clip(0, 255).astype(np.uint8)


@dataclass(frozen=True)
class Explanations(Result):
    """Attribution maps of N images under M methods.

    Attributes
    ----------
    methods : tuple of str
    maps : dict of str -> ndarray [N, H, W]
    rows : DataFrame
        One row per image: ``manifest_row``, ``image`` (path), manifest columns, ``target``,
        ``target_name``, ``predicted``, ``predicted_name``, ``target_logit``.
    images : ndarray [N, H, W, 3] uint8
        The de-normalised inputs (for overlays).
    params : dict
        Method parameters per method.
    provenance : dict
    skipped : tuple of dict
        Images skipped as unreadable (``skip_bad``): ``{manifest_row, image, error}`` each.
    """

    methods: tuple
    maps: dict = field(repr=False)
    rows: pd.DataFrame = field(repr=False)
    images: np.ndarray = field(repr=False)
    params: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    skipped: tuple = ()

    KIND = "explanations"

    def to_frame(self):
        """Per image and method: ``rows`` columns, ``method``, ``relevance_sum``, ``relevance_max``."""
        frames = []
        for m in self.methods:
            f = self.rows.copy()
            f.insert(0, "method", m)
            f["relevance_sum"] = self.maps[m].reshape(len(f), -1).sum(1)
            f["relevance_max"] = self.maps[m].reshape(len(f), -1).max(1)
            frames.append(f)
        return pd.concat(frames, ignore_index=True)

    def _write(self, d):
        """``index.json``, ``rows.csv``, ``images.npy``, ``maps/<method>.npy`` and
        ``heatmaps/<method>/<i>.png`` + ``overlays/<method>/<i>.png`` (``i`` = position in ``rows``);
        then ``meta.json``. ``meta.json`` and ``index.json`` list the skipped images under ``skipped``."""
        skipped = [dict(s) for s in self.skipped]
        self.rows.to_csv(d / "rows.csv", index=False)
        np.save(d / "images.npy", self.images)
        (d / "maps").mkdir(exist_ok=True)
        entries = [{**{k: _plain(v) for k, v in row.items()}, "position": i, "heatmaps": {}, "overlays": {}}
                   for i, row in enumerate(self.rows.to_dict("records"))]
        for m in self.methods:
            np.save(d / "maps" / f"{m}.npy", self.maps[m])
            signed = METHODS[m].signed if m in METHODS else True
            for kind in ("heatmaps", "overlays"):
                (d / kind / m).mkdir(parents=True, exist_ok=True)
            for i, a in enumerate(self.maps[m]):
                Image.fromarray(heatmap_rgb(a, signed)).save(d / "heatmaps" / m / f"{i:05d}.png")
                Image.fromarray(_overlay(self.images[i], a, signed)).save(d / "overlays" / m / f"{i:05d}.png")
                entries[i]["heatmaps"][m] = f"heatmaps/{m}/{i:05d}.png"
                entries[i]["overlays"][m] = f"overlays/{m}/{i:05d}.png"
        index = {"methods": [{"name": m, "signed": METHODS[m].signed if m in METHODS else True,
                              "library": METHODS[m].library if m in METHODS else "?",
                              "description": METHODS[m].description if m in METHODS else ""} for m in self.methods],
                 "images": entries, "skipped": skipped}
        (d / "index.json").write_text(json.dumps(index, indent=2) + "\n")
        return {"methods": list(self.methods), "params": self.params, "skipped": skipped}

    @classmethod
    def _read(cls, d, meta):
        maps = {m: np.load(d / "maps" / f"{m}.npy") for m in meta["methods"]}
        rows = pd.read_csv(d / "rows.csv", keep_default_na=False)
        return cls(tuple(meta["methods"]), maps, rows, np.load(d / "images.npy"), meta["params"], meta["provenance"],
                   tuple(meta.get("skipped", ())))


def _plain(v):
    return v.item() if isinstance(v, np.generic) else v


def explain(model, manifest, methods, target=None, preprocessing=None, limit=None, method_params=None,
            batch_size=32, skip_bad=False, progress=False):
    """Attribute the images of a manifest with several methods.

    Parameters
    ----------
    model : LoadedModel
    manifest : Manifest or path
    methods : str or list of str
        Method names (comma-separated string allowed).
    target : str, int or None
        Class to explain for every image; None = each image's predicted class.
    preprocessing : Preprocessing, optional
        Default: the manifest's resolved against the model's.
    limit : int, optional
        Use only the first ``limit`` manifest rows (fewer images when some are skipped).
    method_params : dict, optional
        ``{method: {param: value}}``.
    batch_size : int
    skip_bad : bool
        Skip unreadable images (counted and listed in ``skipped``) instead of failing.
    progress : bool

    Returns
    -------
    Explanations
    """
    from ..data import Manifest, read_images
    from ..core.extract import predict_tensor

    t0 = time.perf_counter()
    if isinstance(methods, str):
        methods = [s.strip() for s in methods.split(",") if s.strip()]
    methods = [method_info(m).name for m in methods]
    if not methods:
        raise ConceptLensError("no attribution methods given; see `conceptlens attribute --help` for the list")
    method_params = dict(method_params or {})
    unknown = set(method_params) - set(methods)
    if unknown:
        raise ConceptLensError(f"method_params names methods not requested: {sorted(unknown)}")
    for m in methods:
        check_method(model, m, **method_params.get(m, {}))
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1):
        raise ConceptLensError(f"limit must be a positive integer (the first N manifest rows); got {limit!r}")
    if not isinstance(manifest, Manifest):
        manifest = Manifest.read(manifest)
    target_index = None if target is None else model.class_index(target) if isinstance(target, str) else int(target)
    prep = model.preprocessing_for(manifest, preprocessing)
    read = read_images(manifest, prep, rows=None if limit is None else range(min(int(limit), len(manifest))),
                       batch_size=batch_size, skip_bad=skip_bad)
    x = read.x
    logits = predict_tensor(model, x, batch_size)
    predicted = logits.argmax(1)
    if target_index is None:
        t = predicted
    else:
        if not 0 <= target_index < logits.shape[1]:
            raise ConceptLensError(f"target {target!r} is not a class of model {model.spec}: it has {logits.shape[1]} "
                                   f"outputs (0..{logits.shape[1] - 1})")
        t = torch.full((len(x),), target_index, dtype=torch.long)
    maps = {m: attribute(model, x, t, m, batch_size=batch_size, progress=progress, **method_params.get(m, {})).numpy()
            for m in methods}
    names = model.classes or [str(i) for i in range(logits.shape[1])]
    rows = manifest.frame.iloc[read.rows].copy()
    rows.insert(0, "manifest_row", read.rows)
    rows["image"] = [str(manifest.root / p) for p in rows["image"]]
    rows["target"] = t.numpy()
    rows["target_name"] = [names[i] for i in t.tolist()]
    rows["predicted"] = predicted.numpy()
    rows["predicted_name"] = [names[i] for i in predicted.tolist()]
    rows["target_logit"] = logits.gather(1, t[:, None])[:, 0].numpy()
    mean = torch.tensor(prep.mean)[:, None, None]
    std = torch.tensor(prep.std)[:, None, None]
    images = ((x * std + mean).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    info = provenance(model, manifest, parameters={"methods": list(methods), "target": target, "limit": limit,
                                                   "method_params": {m: dict(method_params.get(m, {})) for m in methods}},
                      preprocessing=prep.to_dict(), timings={"total": time.perf_counter() - t0})
    return Explanations(tuple(methods), maps, rows.reset_index(drop=True), images,
                        {m: dict(method_params.get(m, {})) for m in methods}, info,
                        tuple(s.to_dict() for s in read.skipped))

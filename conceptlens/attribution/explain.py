"""Attribution maps of a few images for the drill-down view: the maps, the de-normalised inputs and
each image's row (the heatmap and overlay PNGs are drawn by :mod:`conceptlens.plotting`)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from ..errors import ConceptLensError
from ..core.result import Result, provenance
from .methods import METHODS, attribute, check_method, method_info

__all__ = ["Explanations", "explain"]

logger = logging.getLogger(__name__)


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

    def method_info(self):
        """Per method ``{name, signed, library, description}`` (signed maps are drawn diverging)."""
        return [{"name": m, "signed": METHODS[m].signed if m in METHODS else True,
                 "library": METHODS[m].library if m in METHODS else "?",
                 "description": METHODS[m].description if m in METHODS else ""} for m in self.methods]

    def _write(self, d):
        """``rows.csv``, ``images.npy``, ``maps/<method>.npy``; then ``meta.json`` (which lists the skipped
        images under ``skipped``). The PNG gallery is drawn by
        :func:`conceptlens.plotting.write_explanation_gallery`."""
        self.rows.to_csv(d / "rows.csv", index=False)
        np.save(d / "images.npy", self.images)
        (d / "maps").mkdir(exist_ok=True)
        for m in self.methods:
            np.save(d / "maps" / f"{m}.npy", self.maps[m])
        return {"methods": list(self.methods), "params": self.params, "skipped": [dict(s) for s in self.skipped]}

    @classmethod
    def _read(cls, d, meta):
        maps = {m: np.load(d / "maps" / f"{m}.npy") for m in meta["methods"]}
        rows = pd.read_csv(d / "rows.csv", keep_default_na=False)
        return cls(tuple(meta["methods"]), maps, rows, np.load(d / "images.npy"), meta["params"], meta["provenance"],
                   tuple(meta.get("skipped", ())))


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

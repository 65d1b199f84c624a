"""Before/after evidence of a correction: clean and attacked accuracy, artifact relevance, TCAV audit.

Every model is measured on the same test rows:

- **clean accuracy** on all ``test`` rows, with a Wilson 95 % interval;
- **attacked accuracy** on the ``test`` rows *not* of the biased class, each with the artifact
  pasted in (:class:`Artifact`): a model that uses the artifact calls them the biased class;
- **artifact relevance share**: per attacked image, the share of |LRP| relevance of the biased
  class's logit that falls inside the artifact's mask (Arras et al.'s relevance mass), its mean
  with a bootstrap 95 % interval;
- optionally the **TCAV audit** of ``concept:class`` (score, adjusted p, verdict) on the test rows.

Removing the artifact from the biased class's own images needs the images without it, which a
pasted-in artifact does not give; it is not measured.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from ..attribution import attribute, localization
from ..concepts import TCAV, bootstrap_ci
from ..core.extract import predict_tensor
from ..core.result import Result, provenance
from ..data import Manifest, read_images
from ..errors import ConceptLensError
from ..review import wilson_interval
from .correct import _labels_of, _split_rows

__all__ = ["Artifact", "evaluate_correction", "CorrectionEvaluation", "DEFAULT_RELEVANCE_METHOD"]

logger = logging.getLogger(__name__)

DEFAULT_RELEVANCE_METHOD = "lrp-epsilon-plus-flat"


@dataclass(frozen=True)
class Artifact:
    """An artifact to paste: ``image`` ``[3, H, W]`` in ``[0, 1]`` and ``mask`` ``[H, W]`` bool."""

    image: torch.Tensor
    mask: torch.Tensor
    source: str = "given"

    @classmethod
    def read(cls, path):
        """From an RGBA PNG: the colour where alpha > 0 is the artifact, the rest is left alone."""
        path = Path(path)
        if not path.is_file():
            raise ConceptLensError(f"artifact image {path} does not exist; give an RGBA PNG whose opaque pixels are the artifact")
        with Image.open(path) as im:
            if im.mode not in ("RGBA", "LA", "PA") and "transparency" not in im.info:
                raise ConceptLensError(f"artifact image {path} has no alpha channel ({im.mode}); save it as RGBA with the "
                                       "artifact opaque and everything else transparent")
            rgba = np.asarray(im.convert("RGBA"))
        mask = rgba[..., 3] > 0
        if not mask.any():
            raise ConceptLensError(f"artifact image {path} is fully transparent: no artifact pixel to paste")
        return cls(torch.from_numpy(rgba[..., :3].copy()).permute(2, 0, 1).float() / 255, torch.from_numpy(mask), str(path))

    def paste(self, x, preprocessing):
        """``x`` (preprocessed ``[N, 3, H, W]``) with the artifact's pixels, normalised the same way."""
        if tuple(x.shape[-2:]) != tuple(self.mask.shape):
            raise ConceptLensError(f"the artifact ({self.source}) is {tuple(self.mask.shape)} pixels but the model's inputs "
                                   f"are {tuple(x.shape[-2:])}; give an artifact image of the input size")
        mean = torch.tensor(preprocessing.mean)[:, None, None]
        std = torch.tensor(preprocessing.std)[:, None, None]
        stamp = ((self.image - mean) / std).to(x.device, x.dtype)
        return torch.where(self.mask.to(x.device), stamp, x)


@dataclass(frozen=True)
class CorrectionEvaluation(Result):
    """One row per evaluated model: accuracies, relevance share and audit, with intervals.

    Columns: ``model, clean_accuracy, clean_ci_low, clean_ci_high, n_clean, attacked_accuracy,
    attacked_ci_low, attacked_ci_high, n_attacked, relevance_share, relevance_ci_low,
    relevance_ci_high`` and, with an audit, ``tcav_score, tcav_null, tcav_p_adjusted, audit``.
    """

    frame: pd.DataFrame = field(repr=False)
    provenance: dict = field(default_factory=dict)

    KIND = "correction-evaluation"

    def to_frame(self):
        return self.frame.copy()

    def _write(self, d):
        self.frame.to_csv(d / "evaluation.csv", index=False)
        return {}

    @classmethod
    def _read(cls, d, meta):
        return cls(pd.read_csv(d / "evaluation.csv"), meta["provenance"])


def _accuracy(model, x, y):
    hits = int((predict_tensor(model, x).argmax(1).cpu() == y).sum())
    low, high = wilson_interval(hits, len(y))
    return hits / len(y), float(low), float(high)


def evaluate_correction(models, data, target_class, artifact=None, concepts=None, random_pool=None, concept=None,
                        layer=None, relevance_method=DEFAULT_RELEVANCE_METHOD, tcav_runs=None, seed=0, preprocessing=None,
                        progress=True):
    """Measure each of ``models`` (``{name: LoadedModel}``, e.g. before and after) the same way.

    Parameters
    ----------
    models : dict
    data : str or Path
        Manifest CSV with ``test`` rows (labels: the models' classes).
    target_class : str
        The biased class (the one the artifact drives).
    artifact : Artifact, optional
        Without it, attacked accuracy and relevance share are not measured (columns NaN).
    concepts, random_pool, concept, layer
        With all four, the TCAV audit of ``concept:target_class`` at ``layer`` per model
        (:class:`~conceptlens.concepts.TCAV`, its defaults; ``tcav_runs`` overrides its runs).
    relevance_method : str
        The attribution method of the relevance share (an LRP rule of :func:`~conceptlens.attribution.attribute`).
    seed : int
        Of the bootstrap and TCAV.
    preprocessing : Preprocessing, optional
        Default: each model's own.

    Returns
    -------
    CorrectionEvaluation
    """
    if not models:
        raise ConceptLensError("evaluate_correction needs at least one model")
    manifest = Manifest.read(data)
    test = _split_rows(manifest, "test", "evaluate_correction measures on the test rows")
    audit = all(v is not None for v in (concepts, random_pool, concept, layer))
    rows, images = [], {}
    for name, model in models.items():
        k = model.class_index(target_class)
        prep = model.preprocessing_for(test, preprocessing=preprocessing)
        if prep not in images:  # models with the same preprocessing (before and after) share one read
            images[prep] = read_images(test, prep).x
        x, y = images[prep], _labels_of(model, test)
        row = {"model": name}
        row["clean_accuracy"], row["clean_ci_low"], row["clean_ci_high"] = _accuracy(model, x, y)
        row["n_clean"] = len(y)
        other = y != k
        if artifact is not None and other.any():
            xa = artifact.paste(x[other], prep)
            row["attacked_accuracy"], row["attacked_ci_low"], row["attacked_ci_high"] = _accuracy(model, xa, y[other])
            row["n_attacked"] = int(other.sum())
            maps = attribute(model, xa, target=k, method=relevance_method, reduce="abs", progress=progress)
            share = localization(maps, artifact.mask.numpy()).frame["relevance_mass"].to_numpy()
            row["relevance_share"] = float(share.mean())
            low, high = bootstrap_ci(share, seed=seed) if len(share) > 1 else (np.nan, np.nan)
            row["relevance_ci_low"], row["relevance_ci_high"] = float(np.squeeze(low)), float(np.squeeze(high))
        else:
            row.update(attacked_accuracy=np.nan, attacked_ci_low=np.nan, attacked_ci_high=np.nan, n_attacked=0,
                       relevance_share=np.nan, relevance_ci_low=np.nan, relevance_ci_high=np.nan)
        if audit:
            result = TCAV(model, [layer], runs=tcav_runs, seed=seed, preprocessing=preprocessing, progress=progress).run(
                concepts, random_pool, [target_class], manifest, split="test", concept_names=[concept])
            verdict = result.audit([(concept, target_class)]).iloc[0]  # one layer: its test decides
            row.update(tcav_score=float(verdict["score_mean"]), tcav_null=float(verdict["null_mean"]),
                       tcav_p_adjusted=float(verdict["min_p_adjusted"]), audit=str(verdict["verdict"]))
        rows.append(row)
        logger.info("%s: clean %.3f, attacked %s", name, row["clean_accuracy"], row["attacked_accuracy"])
    params = {"target_class": target_class, "relevance_method": relevance_method, "concept": concept, "layer": layer,
              "artifact": None if artifact is None else artifact.source, "seed": seed}
    return CorrectionEvaluation(pd.DataFrame(rows), provenance(data=manifest, parameters=params,
                                                               models={n: m.spec for n, m in models.items()}))

"""Class Artifact Compensation (ClArC): remove an artifact's concept direction from a model.

The artifact direction ``h`` is a CAV of the artifact concept against a random pool at one layer,
fitted by :func:`conceptlens.concepts.fit_cavs` on the layer's spatially mean-pooled channels
(:func:`fit_artifact_cav`). Three ways to use it (Anders et al. 2022; Dreyer et al. 2024):

- **P-ClArC** (:func:`p_clarc`): at inference, every activation's component along ``h`` is set to
  the random pool's mean level, ``a' = a − (h·a − h·z̄)·h``; no training.
- **A-ClArC**: fine-tune with the artifact *added* to every training image's activations
  (component along ``h`` set to the artifact images' mean level), so the classes no longer differ
  along ``h`` and the head unlearns it; the fine-tuned model runs without the hook.
- **RR-ClArC**: fine-tune with ``CE + λ·mean_n (∇ₐ f_k(x_n) · h)²``, the class-``k`` logit's
  gradient at the layer (spatially averaged, the space ``h`` lives in) projected on ``h``: the
  logit may no longer change along the artifact direction.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from ..concepts import fit_cavs, load_concept_sets, load_image_pool
from ..core.extract import _hooked, iter_activations
from ..core.projection import attach_projection
from ..data import Manifest, make_loader
from ..errors import ConceptLensError
from ..models import LoadedModel, _state_hash, validate_layers

__all__ = ["ArtifactCAV", "fit_artifact_cav", "read_cav", "p_clarc", "rr_clarc_penalty", "a_clarc_hook", "DEFAULT_RR_CLARC_WEIGHT"]

logger = logging.getLogger(__name__)

DEFAULT_RR_CLARC_WEIGHT = 10.0
"""λ of :func:`rr_clarc_penalty` (see ``correct``'s measured choice in the README)."""


@dataclass(frozen=True)
class ArtifactCAV:
    """An artifact's direction at one layer and the levels ClArC moves activations to.

    Attributes
    ----------
    layer, concept : str
    vector : ndarray, shape (channels,)
        Unit CAV in the layer's mean-pooled channel space, pointing towards the artifact.
    reference_level : float
        ``h · z̄``, the mean projection of the random pool (P-ClArC's target: "no artifact").
    artifact_level : float
        The mean projection of the artifact's concept images (A-ClArC's target).
    accuracy : float
        The CAV's cross-fitted accuracy (:func:`~conceptlens.concepts.fit_cavs`); near 0.5 means
        the layer does not separate the artifact, and correcting along it is meaningless.
    method : str
    n_concept, n_random : int
    """

    layer: str
    concept: str
    vector: np.ndarray
    reference_level: float
    artifact_level: float
    accuracy: float
    method: str
    n_concept: int
    n_random: int

    def to_dict(self):
        return {"layer": self.layer, "concept": self.concept, "vector": [float(v) for v in self.vector],
                "reference_level": self.reference_level, "artifact_level": self.artifact_level,
                "accuracy": self.accuracy, "method": self.method, "n_concept": self.n_concept, "n_random": self.n_random}

    @classmethod
    def from_dict(cls, d):
        return cls(**{**d, "vector": np.asarray(d["vector"], dtype=np.float32)})

    def projection(self):
        """P-ClArC's projection as a model sidecar records it (``layer``, ``vector``, ``level``)."""
        return {"layer": self.layer, "vector": [float(v) for v in self.vector], "level": self.reference_level}

    def check_layer(self, module, layer):
        """Raise unless this CAV was fitted at ``layer``."""
        if layer != self.layer:
            raise ConceptLensError(f"the {self.concept!r} CAV was fitted at layer {self.layer!r}, not {layer!r}; "
                                   f"fit it at {layer!r} (or correct at {self.layer!r})")
        validate_layers(module, [layer])


def read_cav(path):
    """The :class:`ArtifactCAV` recorded in a ``correction.json`` (of ``conceptlens correct``), to reuse it."""
    import json
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise ConceptLensError(f"CAV file {path} does not exist; pass the correction.json of an earlier ClArC correction")
    try:
        table = json.loads(path.read_text()).get("cav")
    except (json.JSONDecodeError, AttributeError):
        table = None
    if not isinstance(table, dict):
        raise ConceptLensError(f"{path} holds no artifact CAV (a \"cav\" table); it must be the correction.json of a "
                               "p-clarc, a-clarc or rr-clarc run")
    return ArtifactCAV.from_dict(table)


def _pooled(model, paths, layer, prep, batch_size, progress_desc):
    batches = make_loader(Manifest.from_images(paths, kind=progress_desc), prep, batch_size=batch_size)
    return torch.cat([pooled[layer].float().cpu() for _, pooled, _ in iter_activations(model, batches, [layer], pool="mean")])


def fit_artifact_cav(model, concepts, random_pool, concept, layer, method="mean-diff", preprocessing=None, batch_size=64,
                     seed=0):
    """The artifact CAV of ``concept`` (a folder of ``concepts``) against ``random_pool`` at ``layer``.

    Parameters
    ----------
    model : LoadedModel
    concepts : path or dict
        As for :func:`~conceptlens.concepts.load_concept_sets` (a folder of concept subfolders).
    random_pool : path
        A folder of images or a manifest CSV (:func:`~conceptlens.concepts.load_image_pool`).
    concept : str
        The artifact's concept name.
    layer : str
    method : {"mean-diff", "sgd", "logistic"}
        Of :func:`~conceptlens.concepts.fit_cavs`; ``mean-diff`` (the difference of the class means)
        is close to the "pattern" CAVs Dreyer et al. found to localise artifacts best, and needs no
        solver.
    preprocessing : Preprocessing, optional
        Default: the model's.
    batch_size, seed : int

    Returns
    -------
    ArtifactCAV
    """
    if not isinstance(model, LoadedModel):
        raise ConceptLensError("fit_artifact_cav needs a LoadedModel (conceptlens.models.load_model)")
    validate_layers(model.module, [layer])
    paths = load_concept_sets(concepts, [concept])[concept]
    pool = load_image_pool(random_pool)
    prep = model.preprocessing_for(preprocessing=preprocessing)
    pos = _pooled(model, paths, layer, prep, batch_size, "concept image")
    neg = _pooled(model, pool, layer, prep, batch_size, "random image")
    if pos.dim() != 2:
        raise ConceptLensError(f"layer {layer!r} has no channel axis to fit an artifact CAV on")
    acts = torch.cat([pos, neg]).numpy()
    cavs = fit_cavs(acts, [np.arange(len(pos))], [np.arange(len(pos), len(acts))], method=method, seed=seed)
    h = cavs.vectors[0]
    if not np.any(h):
        raise ConceptLensError(f"the {concept!r} CAV at layer {layer!r} is a zero vector: its images and the random pool "
                               "have the same activations there")
    cav = ArtifactCAV(layer=layer, concept=concept, vector=h, reference_level=float(neg.numpy().mean(0) @ h),
                      artifact_level=float(pos.numpy().mean(0) @ h), accuracy=float(cavs.accuracy[0]),
                      method=cavs.method, n_concept=len(pos), n_random=len(neg))
    logger.info("artifact CAV %r at %s: accuracy %.3f (%d concept vs %d random images)", concept, layer, cav.accuracy,
                cav.n_concept, cav.n_random)
    if cav.accuracy < 0.6:
        logger.warning("the %r CAV at %s separates its images from the random pool only %.0f %% of the time; "
                       "the layer may not encode the artifact", concept, layer, 100 * cav.accuracy)
    return cav


def p_clarc(model, cav):
    """P-ClArC: a copy of ``model`` whose ``cav.layer`` output has its component along the CAV set
    to the random pool's level (see :mod:`~conceptlens.core.projection`); no training.

    The copy keeps the model's layer names (the projection is a forward hook on that layer), so every
    analyzer runs on it; ``model`` itself is not changed. Saved by ``conceptlens correct
    --method p-clarc`` as the unchanged weights plus a sidecar from which
    :func:`~conceptlens.models.load_model` re-attaches the projection.
    """
    import copy
    import dataclasses

    if not isinstance(model, LoadedModel):
        raise ConceptLensError("p_clarc needs a LoadedModel (conceptlens.models.load_model)")
    cav.check_layer(model.module, cav.layer)
    module = copy.deepcopy(model.module)
    table = cav.projection()
    attach_projection(module, table["layer"], table["vector"], table["level"])
    return dataclasses.replace(model, module=module, spec=f"{model.spec} + p-clarc({cav.concept}@{cav.layer})",
                               weights_hash=_state_hash(module, table))


def rr_clarc_penalty(layer, cav, target_class, weight=DEFAULT_RR_CLARC_WEIGHT):
    """The RR-ClArC training term, as a ``penalty(model, x, y, aux) -> (logits, term)`` of the demo
    training loop: one forward with ``layer`` hooked, the class logit's gradient at the layer by
    ``create_graph=True`` (so the term trains by double backward), ``term = λ·mean_n (ḡ_n · h)²``
    with ``ḡ_n`` the gradient's spatial mean."""
    h = torch.as_tensor(np.asarray(cav.vector, dtype=np.float32))
    held = {}

    def keep(name, mod, out):
        held["a"] = out
        return out.clone()  # the gradient is taken at the layer's own output, whatever runs in place after it

    def penalty(model, x, y, aux):
        with _hooked(model, [layer], keep):
            logits = model(x)
        a = held.pop("a")
        (g,) = torch.autograd.grad(logits[:, target_class].sum(), a, create_graph=True)
        g = g.mean(dim=tuple(range(2, g.dim()))) if g.dim() > 2 else g
        share = ((g @ h.to(g.device, g.dtype)) ** 2).mean() / (g ** 2).sum(1).mean().detach().clamp_min(1e-12)
        return logits, weight * share

    return penalty


def a_clarc_hook(module, cav):
    """A-ClArC's training-time hook: every image's activations at ``cav.layer`` get the artifact's
    level along the CAV; returns the handle (remove it after fine-tuning)."""
    return attach_projection(module, cav.layer, cav.vector, cav.artifact_level)

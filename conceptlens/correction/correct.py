"""``correct``: one entry point for the correction methods, writing a model every command loads.

The input model is copied, never modified. ``p-clarc`` writes the unchanged weights and a sidecar
whose ``projection`` :func:`~conceptlens.models.load_model` re-attaches; the fine-tuning methods
(``a-clarc``, ``rr-clarc``, ``rrr``) train the copy on the manifest's ``train`` rows with the demo
CNN's training loop (AdamW, one-cycle learning rate, shift augmentation) and write its weights.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data import Manifest, read_images
from ..errors import ConceptLensError
from ..models import LoadedModel, _split_spec, trace_modules
from .clarc import DEFAULT_RR_CLARC_WEIGHT, a_clarc_hook, fit_artifact_cav, p_clarc, rr_clarc_penalty
from .rrr import DEFAULT_RRR_WEIGHT, _check_masks, _load_masks, _penalty as _rrr_penalty

__all__ = ["correct", "CorrectedModel", "METHODS"]

logger = logging.getLogger(__name__)

METHODS = ("p-clarc", "a-clarc", "rr-clarc", "rrr")
_CLARC = ("p-clarc", "a-clarc", "rr-clarc")
_REFERENCES = {"p-clarc": "Anders et al. 2022", "a-clarc": "Anders et al. 2022", "rr-clarc": "Dreyer et al. 2024",
               "rrr": "Ross et al. 2017"}
# Sidecar keys of the input model that describe its own training run, not the corrected one.
_STALE = ("train_accuracy", "test_accuracy", "train_seconds", "train_seed", "epochs", "manifest", "manifest_hash")


@dataclass(frozen=True)
class CorrectedModel:
    """What :func:`correct` wrote.

    Attributes
    ----------
    spec : str
        The model spec of the corrected model (``demo:DIR/model.pt`` ...), for every command.
    weights : Path
    settings : dict
        The content of ``correction.json``: method, reference, its parameters, the artifact CAV,
        the input model (spec and weights hash) and the seconds of each fine-tuning epoch.
    """

    spec: str
    weights: Path
    settings: dict


def _spec_parts(spec):
    """``(prefix, weights)``: a ``demo:``/``torchvision:``/``python:`` spec up to its weights file,
    and that file (``None`` when the spec names none)."""
    kind, rest = _split_spec(spec)
    before = {"demo": 0, "torchvision": 1, "python": 2}[kind]  # fields ahead of the weights file
    parts = rest.split(":")
    return ":".join([kind, *parts[:before]]), (parts[before] if len(parts) > before else None)


def _split_rows(manifest, split, purpose):
    """The sub-manifest of ``split`` rows; one line naming the manifest when it has none."""
    return manifest.subset(manifest.split_mask(split, hint=f"{purpose} (split it with `conceptlens split`)"))


def _labels_of(model, manifest):
    """The logit index of each row's label (``[N]``), or one line naming the labels the model lacks."""
    if not model.classes:
        raise ConceptLensError(f"model {model.spec} has no class names (a sidecar with \"classes\"); they are needed "
                               "to map the manifest's labels to logits")
    unknown = sorted(set(manifest.frame["label"]) - set(model.classes))
    if unknown:
        raise ConceptLensError(f"labels {unknown[:5]} of {manifest.path} are not classes of the model ({', '.join(model.classes)})")
    return torch.tensor([model.classes.index(c) for c in manifest.frame["label"]])


def _freeze_through(module, layer, probe):
    """Freeze the parameters of every module that completes, in a forward of ``probe``, no later than
    ``layer`` (the layer included); returns their names."""
    order = list(trace_modules(module, probe))
    frozen = order[: order.index(layer) + 1]
    for name in frozen:
        for q in module.get_submodule(name).parameters(recurse=False):
            q.requires_grad_(False)
    return [n for n in frozen if any(True for _ in module.get_submodule(n).parameters(recurse=False))]


def correct(model, data, method, out, concepts=None, random_pool=None, concept=None, layer=None, target_class=None,
            weight=None, masks_column="mask", epochs=10, lr=3e-3, batch_size=32, seed=0, cav_method="mean-diff",
            cav=None, train_all=False, preprocessing=None, progress=True):
    """Correct ``model`` with ``method`` and write it to ``out`` (a folder).

    Parameters
    ----------
    model : LoadedModel
        A ``demo:``, ``torchvision:`` or ``python:`` model (an exported program cannot be trained).
    data : str or Path
        Manifest CSV; its ``train`` rows are the fine-tuning data (labels: the model's classes).
    method : {"p-clarc", "a-clarc", "rr-clarc", "rrr"}
    out : str or Path
        Folder for ``model.pt``, its sidecar ``model.json`` and ``correction.json``.
    concepts, random_pool, concept, layer
        The artifact CAV of the ClArC methods (:func:`~conceptlens.correction.clarc.fit_artifact_cav`).
    target_class : str
        RR-ClArC: the class whose logit must not change along the artifact (the biased class).
    weight : float, optional
        λ: RR-ClArC's (default :data:`~conceptlens.correction.clarc.DEFAULT_RR_CLARC_WEIGHT`) or
        RRR's (default :data:`~conceptlens.correction.rrr.DEFAULT_RRR_WEIGHT`).
    masks_column : str
        RRR: the manifest column of mask PNGs (1 where the model must not look).
    epochs, lr, batch_size, seed
        Fine-tuning schedule (one-cycle learning rate peaking at ``lr``); ``seed`` seeds batch order,
        augmentation and the CAV, so the same inputs and seed give the same weights.
    cav_method : str
        Of the artifact CAV (``mean-diff``, ``sgd``, ``logistic``).
    cav : ArtifactCAV, optional
        Reuse this CAV (e.g. ``ArtifactCAV.from_dict(read_json("correction.json")["cav"])`` of an
        earlier run) instead of fitting one; ``layer``, if given, must be the layer it was fitted at.
    train_all : bool
        ClArC fine-tuning: train every layer. By default the layers up to and including ``layer`` are
        frozen (Anders et al.'s A-ClArC fine-tunes the part after the artifact layer): with them
        trainable the model re-encodes the artifact outside the one corrected direction (measured
        on tag worlds in the README: the tag's relevance share and TCAV sensitivity stay about
        twice as high). Batch-norm statistics are frozen in either case.
    preprocessing : Preprocessing, optional
        Default: the model's (stated in the log and in ``correction.json``).
    progress : bool

    Returns
    -------
    CorrectedModel
    """
    from ..demo_model import _fit  # the one training loop

    if method not in METHODS:
        raise ConceptLensError(f"the correction method must be one of {', '.join(METHODS)}; got {method!r}")
    if not isinstance(model, LoadedModel):
        raise ConceptLensError("correct needs a LoadedModel (conceptlens.models.load_model)")
    if _split_spec(model.spec)[0] == "export":
        raise ConceptLensError(f"{model.spec} is an exported program, which cannot be fine-tuned or re-saved; correct the "
                               "eager model (a python: spec) and export the result")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if not (isinstance(value, (int, np.integer)) and value >= 1):
            raise ConceptLensError(f"{name} must be an integer >= 1; got {value!r}")
    if weight is not None and not (np.isfinite(weight) and weight >= 0):
        raise ConceptLensError(f"the weight must be a finite number >= 0; got {weight!r}")
    manifest = Manifest.read(data)
    train = _split_rows(manifest, "train", "correct fine-tunes on the train rows")
    prep = model.preprocessing_for(train, preprocessing=preprocessing)  # for the CAV and the fine-tuning alike
    settings = {"method": method, "reference": _REFERENCES[method], "input_model": model.spec,
                "input_weights_hash": model.weights_hash, "manifest": str(manifest.path),
                "manifest_hash": manifest.content_hash(), "seed": int(seed)}
    if method in _CLARC:
        if cav is None:
            missing = [n for n, v in (("concepts", concepts), ("random_pool", random_pool), ("concept", concept),
                                      ("layer", layer)) if v is None]
            if missing:
                raise ConceptLensError(f"{method} needs the artifact's CAV: give {', '.join(missing)}")
            cav = fit_artifact_cav(model, concepts, random_pool, concept, layer, method=cav_method,
                                   preprocessing=prep, seed=seed)
        else:
            cav.check_layer(model.module, cav.layer if layer is None else layer)
            layer = cav.layer
        settings["cav"] = cav.to_dict()
    k = None
    if method == "rr-clarc":
        if target_class is None:
            raise ConceptLensError("rr-clarc needs the biased class (target_class / --class) whose logit must ignore the artifact")
        k = model.class_index(target_class)
        settings.update(target_class=target_class, weight=float(DEFAULT_RR_CLARC_WEIGHT if weight is None else weight))
    if method == "rrr":
        _check_masks(manifest, masks_column, np.flatnonzero(manifest.frame["split"].to_numpy() == "train"))
        settings.update(masks_column=masks_column, weight=float(DEFAULT_RRR_WEIGHT if weight is None else weight))

    out = Path(out)
    prefix, given = _spec_parts(model.spec)
    if given and Path(given).resolve() in ((out / "model.pt").resolve(), (out / "model.json").resolve()):
        raise ConceptLensError(f"{out / 'model.pt'} is the input model's own weights file; write the corrected model "
                               "to another folder (the input is never overwritten)")
    out.mkdir(parents=True, exist_ok=True)
    settings["preprocessing"] = prep.to_dict()
    if method == "p-clarc":
        module = p_clarc(model, cav).module
        projection = cav.projection()
        epoch_seconds = []
    else:
        module, projection = copy.deepcopy(model.module), None
        x = read_images(train, prep).x.to(model.device)
        y = _labels_of(model, train).to(model.device)
        if method in _CLARC and not train_all:
            settings["frozen"] = _freeze_through(module, layer, x[:1])
        penalty, aux, handle = None, None, None
        if method == "rr-clarc":
            penalty = rr_clarc_penalty(layer, cav, k, settings["weight"])
        elif method == "a-clarc":
            handle = a_clarc_hook(module, cav)
        else:
            penalty = _rrr_penalty(settings["weight"])
            aux = _load_masks(train, masks_column).to(model.device)
        settings.update(epochs=int(epochs), lr=float(lr), batch_size=int(batch_size))
        torch.manual_seed(seed)
        try:
            epoch_seconds = _fit(module, x, y, epochs, batch_size, lr, seed, progress, penalty=penalty, aux=aux,
                                 desc=f"correct ({method})", batch_stats=False)
        finally:
            if handle is not None:
                handle.remove()
        module.eval()
    settings["epoch_seconds"] = [round(s, 4) for s in epoch_seconds]

    weights = out / "model.pt"
    torch.save({n: t.detach().cpu() for n, t in module.state_dict().items()}, weights)
    sidecar = {}
    if model.sidecar is not None and Path(model.sidecar).is_file():
        sidecar = {k_: v for k_, v in json.loads(Path(model.sidecar).read_text()).items() if k_ not in _STALE}
    sidecar.update(classes=list(model.classes or []), preprocessing=prep.to_dict(),
                   correction={k_: v for k_, v in settings.items() if k_ != "cav"})
    if projection is not None:
        sidecar["projection"] = projection
    weights.with_suffix(".json").write_text(json.dumps(sidecar, indent=2) + "\n")
    spec = f"{prefix}:{weights}"
    settings["output_model"] = spec
    (out / "correction.json").write_text(json.dumps(settings, indent=2) + "\n")
    logger.info("%s: corrected model written to %s", method, spec)
    return CorrectedModel(spec=spec, weights=weights, settings=settings)

"""Pixel attributions behind one signature: captum and zennit adapters, plus our own batched RISE and SmoothTaylor.

``attribute(model, x, target, method, **params)`` returns a ``[B, H, W]`` map per image (and the
raw ``[B, C, H, W]`` attribution with ``raw=True``). Each method is a :class:`Method` that declares
its capabilities (``needs_layer``, ``needs_baseline``, ``stochastic``, ``signed``, ...) and its
parameters with defaults; unknown names and parameters are errors that list the valid ones.

Methods whose rules attach to module types (``needs_module_types``: LRP and its canonizers, guided
backprop, deconvnet, guided Grad-CAM) run on a ``torch.export`` program through a copy whose layers
are rebuilt as eager ``nn.Conv2d``/``nn.Linear``/``nn.BatchNorm2d``/``nn.ReLU``/pool modules and
torchvision ResNet blocks (:mod:`._rebuild`), checked to reproduce the program's outputs; a program
with a layer that cannot be rebuilt is refused up front (:func:`check_method`), never attributed
with the plain gradient.

Library methods come from their library: gradients, integrated gradients, SmoothGrad (NoiseTunnel),
occlusion, LIME, Grad-CAM, guided backprop, deconvnet and guided Grad-CAM from captum; LRP
composites and BatchNorm canonizers from zennit. RISE (Petsiuk et al. 2018) is ours: one set of
seeded masks for the whole batch, all masked forwards batched, the saliency a single matmul. So is
SmoothTaylor (Goh et al. 2021, :mod:`.smooth_taylor`): all (image, root) pairs batched, noise seeded
per image and root.

The caller's model comes back exactly as it went in: training flags, ``requires_grad`` of every
parameter, ``inplace`` flags of activations (switched off while we run, since backward hooks cannot
see through in-place ReLUs) and the hook dictionaries are restored in a ``finally`` block.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ..core.frozen import frozen
from ..errors import ConceptLensError, did_you_mean
from ..models import trace_modules, validate_layers
from . import _rebuild

__all__ = ["Method", "METHODS", "attribute", "list_methods", "method_info", "auto_layer", "check_method", "supports"]

logger = logging.getLogger(__name__)

_REDUCTIONS = ("sum", "abs", "max", "mean")
_COMMON = MappingProxyType({"reduce": None, "batch_size": 32})


@dataclass(frozen=True)
class Method:
    """An attribution method: its adapter and what it needs.

    Attributes
    ----------
    name : str
        The method string used in the API, the CLI and in results.
    library : str
        ``captum``, ``zennit``, ``conceptlens`` (own code) or ``control``.
    description : str
        One line on what it computes.
    params : Mapping
        Method-specific parameters and their defaults (``reduce`` and ``batch_size`` are common).
    needs_layer : bool
        Takes a ``layer`` (a ``named_modules`` name; ``"auto"``: the last spatial layer).
    needs_baseline : bool
        Takes a ``baseline`` (a float, ``"zero"``, ``"mean"`` (per-image channel mean) or a tensor).
    stochastic : bool
        Draws random numbers; takes a ``seed``.
    signed : bool
        Attributions can be negative (evidence against the target).
    uses_gradients : bool
        Back-propagates through the model (False: forward passes only).
    needs_module_types : bool
        Its rules attach to modules by type (``nn.Conv2d``, ``nn.Linear``, ``nn.BatchNorm2d``,
        ``nn.ReLU``); a ``torch.export`` program runs through a copy with rebuilt eager layers, or is
        refused (see :func:`check_method`).
    reduce : str
        Default channel reduction to ``[B, H, W]``: ``sum``, ``abs`` (sum of magnitudes), ``max``
        (max magnitude) or ``mean``.
    """

    name: str
    library: str
    description: str
    fn: object = field(repr=False)
    params: Mapping = field(default_factory=lambda: MappingProxyType({}))
    needs_layer: bool = False
    needs_baseline: bool = False
    stochastic: bool = False
    signed: bool = True
    uses_gradients: bool = True
    needs_module_types: bool = False
    reduce: str = "sum"

    def resolve_params(self, given):
        """Defaults updated by ``given``; unknown parameter names raise with the valid ones listed."""
        valid = {**_COMMON, **self.params}
        unknown = [k for k in given if k not in valid]
        if unknown:
            raise ConceptLensError(
                f"attribution method {self.name!r} has no parameter {unknown[0]!r}{did_you_mean(unknown[0], valid)}"
                f" (its parameters: {', '.join(sorted(valid))})"
            )
        out = {**valid, **given}
        if out["reduce"] is None:
            out["reduce"] = self.reduce
        if out["reduce"] not in _REDUCTIONS:
            raise ConceptLensError(f"the reduce parameter must be one of {', '.join(_REDUCTIONS)}; got {out['reduce']!r}")
        if not isinstance(out["batch_size"], int) or out["batch_size"] < 1:
            raise ConceptLensError(f"the batch_size parameter must be a positive integer; got {out['batch_size']!r}")
        return out


# --------------------------------------------------------------------------------------------
# Model preparation: everything we change is put back.

_HOOK_DICTS = (
    "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
    "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
)


@contextlib.contextmanager
def _analysis_mode(module):
    """:func:`~conceptlens.core.frozen.frozen`, and stray hooks a method left behind are removed."""
    modules = list(module.modules())
    hook_keys = [{d: set(getattr(m, d, {}) or {}) for d in _HOOK_DICTS} for m in modules]
    try:
        with frozen(module):
            yield
    finally:
        for m, keys in zip(modules, hook_keys):
            for d, before in keys.items():
                hooks = getattr(m, d, None)
                if hooks:
                    for k in [k for k in hooks if k not in before]:
                        del hooks[k]


def _unwrap(model):
    module = getattr(model, "module", model)
    if not isinstance(module, nn.Module):
        raise ConceptLensError(
            f"attribute needs a torch nn.Module or a LoadedModel (conceptlens.models.load_model); got {type(model).__name__}"
        )
    return module


def auto_layer(model, x):
    """The last module (in forward completion order) with a spatial ``[B, C, H, W]`` output, H·W > 1,
    run once per forward — Grad-CAM's default layer (``relu4`` for the demo CNN, ``layer4`` for ResNets)."""
    traced = trace_modules(_unwrap(model), x[:1])
    for name, entry in reversed(traced.items()):
        shape = entry["output_shape"]
        if isinstance(shape, tuple) and len(shape) == 4 and shape[-1] * shape[-2] > 1 and entry["calls"] == 1:
            logger.info("layer auto -> %s (last spatial layer)", name)
            return name
    raise ConceptLensError("the model has no layer with a spatial output; pass layer=NAME (see `conceptlens layers MODEL`)")


def _resolve_layer(module, x, layer):
    if layer in (None, "auto"):
        layer = auto_layer(module, x)
    validate_layers(module, [str(layer)])
    return module.get_submodule(str(layer))


def _baseline(x, baseline):
    if baseline in (None, "zero"):
        return torch.zeros_like(x)
    if baseline == "mean":
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x).contiguous()
    if isinstance(baseline, (int, float)):
        return torch.full_like(x, float(baseline))
    if isinstance(baseline, torch.Tensor):
        b = baseline.to(x.device, x.dtype)
        try:
            return torch.broadcast_to(b, x.shape).contiguous()
        except RuntimeError:
            raise ConceptLensError(f"the baseline tensor of shape {tuple(b.shape)} does not broadcast to the input {tuple(x.shape)}") from None
    raise ConceptLensError(f"baseline must be 'zero', 'mean', a number or a tensor; got {baseline!r}")


@contextlib.contextmanager
def _seeded(seed):
    """Seed torch's global generator inside the block (captum samples from it) and restore it after."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


# --------------------------------------------------------------------------------------------
# Adapters: fn(module, x, target, p) -> raw attribution [B, C, H, W] (or [B, 1, H, W]).


def _saliency(module, x, target, p):
    from captum.attr import Saliency

    return Saliency(module).attribute(x, target=target, abs=True)


def _sensitivity(module, x, target, p):
    from captum.attr import Saliency

    return Saliency(module).attribute(x, target=target, abs=False) ** 2


def _input_x_gradient(module, x, target, p):
    from captum.attr import InputXGradient

    return InputXGradient(module).attribute(x, target=target)


def _integrated_gradients(module, x, target, p):
    from captum.attr import IntegratedGradients

    return IntegratedGradients(module).attribute(
        x, baselines=_baseline(x, p["baseline"]), target=target, n_steps=p["n_steps"],
        method=p["ig_method"], internal_batch_size=p["internal_batch_size"],
    )


def _smoothgrad(module, x, target, p):
    from captum.attr import NoiseTunnel, Saliency

    with _seeded(p["seed"]):
        return NoiseTunnel(Saliency(module)).attribute(
            x, nt_type="smoothgrad", nt_samples=p["n_samples"], nt_samples_batch_size=p["n_samples"],
            stdevs=float(p["noise_level"]) * p["_range"], target=target, abs=True,
        )


def _occlusion(module, x, target, p):
    from captum.attr import Occlusion

    c = x.shape[1]
    return Occlusion(module).attribute(
        x, sliding_window_shapes=(c, p["window"], p["window"]), strides=(c, p["stride"], p["stride"]),
        baselines=_baseline(x, p["baseline"]), target=target, perturbations_per_eval=p["perturbations_per_eval"],
    )


def _superpixels(x, n_segments, compactness):
    """SLIC superpixels (scikit-image) of each image, min-max scaled; ``[B, 1, H, W]`` int64 labels from 0."""
    from skimage.segmentation import slic

    arr = x.detach().cpu().numpy()
    lo = arr.min(axis=(1, 2, 3), keepdims=True)
    hi = arr.max(axis=(1, 2, 3), keepdims=True)
    arr = np.transpose((arr - lo) / np.maximum(hi - lo, 1e-8), (0, 2, 3, 1))
    segs = [slic(a, n_segments=n_segments, compactness=compactness, start_label=0, channel_axis=-1) for a in arr]
    return torch.as_tensor(np.stack(segs)[:, None], dtype=torch.long, device=x.device)


def _lime(module, x, target, p):
    from captum.attr import Lime

    mask = _superpixels(x, p["n_segments"], p["compactness"])
    with _seeded(p["seed"]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You are providing multiple inputs for Lime")
        return Lime(module).attribute(
            x, target=target, feature_mask=mask.expand_as(x), n_samples=p["n_samples"],
            baselines=_baseline(x, p["baseline"]), perturbations_per_eval=p["perturbations_per_eval"],
            return_input_shape=True,
        )


def _gradcam(module, x, target, p):
    from captum.attr import LayerAttribution, LayerGradCam

    layer = _resolve_layer(module, x, p["layer"])
    cam = LayerGradCam(module, layer).attribute(x, target=target, relu_attributions=p["relu"])
    return LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), interpolate_mode="bilinear")


def _guided_backprop(module, x, target, p):
    from captum.attr import GuidedBackprop

    return GuidedBackprop(module).attribute(x, target=target)


def _deconvnet(module, x, target, p):
    from captum.attr import Deconvolution

    return Deconvolution(module).attribute(x, target=target)


def _guided_gradcam(module, x, target, p):
    from captum.attr import GuidedGradCam

    layer = _resolve_layer(module, x, p["layer"])
    return GuidedGradCam(module, layer).attribute(x, target=target, interpolate_mode="bilinear")


def _choose_canonizer(module, which):
    """Resolve ``canonizer="auto"`` once per call: ``resnet`` for torchvision ResNets, else ``merge-batchnorm``."""
    if which not in ("auto", "none", "resnet", "merge-batchnorm"):
        raise ConceptLensError(f"the canonizer parameter must be auto, none, resnet or merge-batchnorm; got {which!r}")
    from torchvision.models.resnet import BasicBlock, Bottleneck

    has_blocks = any(isinstance(m, (BasicBlock, Bottleneck)) for m in module.modules())
    if which == "resnet" and not has_blocks:
        # ResNetCanonizer finds its residual additions by these types; without them it would only merge BatchNorms.
        raise ConceptLensError("canonizer 'resnet' needs torchvision BasicBlock/Bottleneck modules and the model has "
                               "none; use canonizer='merge-batchnorm' or 'auto'")
    if which != "auto":
        return which
    chosen = "resnet" if has_blocks else "merge-batchnorm"
    logger.info("canonizer auto -> %s (zennit %s)", chosen,
                "ResNetCanonizer" if chosen == "resnet" else "SequentialMergeBatchNorm")
    return chosen


def _canonizers(which):
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.torchvision import ResNetCanonizer

    return {"none": [], "resnet": [ResNetCanonizer()], "merge-batchnorm": [SequentialMergeBatchNorm()]}[which]


def _composite(name, module, x, p):
    from zennit import composites as C
    from zennit.rules import Epsilon
    from zennit.types import Linear

    canon = _canonizers(p["canonizer"])
    if name == "lrp-epsilon":
        layer_map = C.layer_map_base() + [(Linear, Epsilon(epsilon=p["epsilon"]))]
        return C.LayerMapComposite(layer_map=layer_map, canonizers=canon)
    if name == "lrp-epsilon-plus-flat":
        return C.EpsilonPlusFlat(epsilon=p["epsilon"], canonizers=canon)
    if name == "lrp-epsilon-alpha2-beta1":
        return C.EpsilonAlpha2Beta1(epsilon=p["epsilon"], canonizers=canon)
    if name == "lrp-epsilon-alpha2-beta1-flat":
        return C.EpsilonAlpha2Beta1Flat(epsilon=p["epsilon"], canonizers=canon)
    # lrp-epsilon-gamma-box: z^B bounds (default: per-channel range of all the input images, set in attribute).
    low, high = _baseline(x, p["low"]), _baseline(x, p["high"])
    return C.EpsilonGammaBox(low=low, high=high, epsilon=p["epsilon"], gamma=p["gamma"], canonizers=canon)


def _lrp(name):
    def fn(module, x, target, p):
        from zennit.attribution import Gradient

        composite = _composite(name, module, x, p)
        with Gradient(model=module, composite=composite) as attributor:
            _, rel = attributor(x, attr_output=lambda out: out * F.one_hot(target, out.shape[1]).to(out.dtype))
        return rel

    return fn


def _rise_masks(n, cells, prob, h, w, seed):
    """RISE masks ``[n, h, w]``: ``cells x cells`` Bernoulli(prob) grids, bilinearly upsampled to
    ``(cells + 1) x`` the cell size, randomly shifted by up to one cell and cropped (Petsiuk et al. 2018)."""
    gen = torch.Generator().manual_seed(int(seed))
    grid = (torch.rand(n, 1, cells, cells, generator=gen) < prob).float()
    ch, cw = int(np.ceil(h / cells)), int(np.ceil(w / cells))
    up = F.interpolate(grid, size=((cells + 1) * ch, (cells + 1) * cw), mode="bilinear", align_corners=False)
    dy = torch.randint(0, ch, (n,), generator=gen)
    dx = torch.randint(0, cw, (n,), generator=gen)
    iy = (dy[:, None] + torch.arange(h)[None])[:, :, None].expand(n, h, w)
    ix = (dx[:, None] + torch.arange(w)[None])[:, None, :].expand(n, h, w)
    return up[torch.arange(n)[:, None, None], 0, iy, ix]


def _rise(module, x, target, p):
    """RISE: saliency = E_M[P(target | x * M) M] / p over seeded masks shared by the batch; one matmul."""
    b, _, h, w = x.shape
    n, prob = int(p["n_masks"]), float(p["p"])
    if not 0 < prob < 1 or n < 1 or int(p["cells"]) < 1:
        raise ConceptLensError(f"RISE needs n_masks >= 1, cells >= 1 and 0 < p < 1; got {n}, {p['cells']}, {prob}")
    masks = _rise_masks(n, int(p["cells"]), prob, h, w, p["seed"]).to(x.device, x.dtype)
    # All (image, mask) pairs in chunks of forward_batch: one forward per chunk.
    scores = torch.empty(b * n, device=x.device, dtype=x.dtype)
    with torch.no_grad():
        for k0 in range(0, b * n, p["forward_batch"]):
            k = torch.arange(k0, min(b * n, k0 + p["forward_batch"]), device=x.device)
            img, msk = k // n, k % n
            out = module(x[img] * masks[msk][:, None]).softmax(1)
            scores[k] = out[torch.arange(len(k), device=x.device), target[img]]
    scores = scores.view(b, n)
    sal = scores @ masks.flatten(1) / (n * prob)
    return sal.view(b, 1, h, w)


def _random(module, x, target, p):
    gen = torch.Generator().manual_seed(int(p["seed"]) * 1_000_003 + p["_start"])
    return torch.rand(x.shape[0], 1, *x.shape[-2:], generator=gen).to(x.device, x.dtype)


def _smooth_taylor(module, x, target, p):
    """SmoothTaylor, batched over all (image, root) pairs; the chosen scales are :func:`.smooth_taylor.smooth_taylor`'s."""
    from .smooth_taylor import _smooth_taylor_batch

    return _smooth_taylor_batch(module, x, target, p)[0]


def _params(**kw):
    return MappingProxyType(kw)


_BY_TYPE = dict(needs_module_types=True)
METHODS = MappingProxyType({m.name: m for m in [
    Method("saliency", "captum", "|dy/dx| (Simonyan et al. 2014), max magnitude over channels", _saliency,
           signed=False, reduce="max"),
    Method("sensitivity", "captum", "squared gradient (dy/dx)^2 summed over channels (sensitivity analysis)",
           _sensitivity, signed=False),
    Method("input-x-gradient", "captum", "x * dy/dx", _input_x_gradient),
    Method("integrated-gradients", "captum", "integrated gradients (Sundararajan et al. 2017)",
           _integrated_gradients, _params(baseline="zero", n_steps=32, ig_method="gausslegendre", internal_batch_size=None),
           needs_baseline=True),
    Method("smoothgrad", "captum", "SmoothGrad: |gradient| averaged over noisy copies (NoiseTunnel)", _smoothgrad,
           _params(n_samples=16, noise_level=0.15, seed=0), stochastic=True, signed=False, reduce="max"),
    Method("occlusion", "captum", "logit drop when a sliding window is replaced by the baseline", _occlusion,
           _params(window=8, stride=4, baseline="zero", perturbations_per_eval=64), needs_baseline=True,
           uses_gradients=False, reduce="mean"),
    Method("lime", "captum", "LIME on SLIC superpixels (scikit-image), Lasso surrogate", _lime,
           _params(n_segments=40, compactness=10.0, n_samples=200, baseline="zero", perturbations_per_eval=50, seed=0),
           needs_baseline=True, stochastic=True, uses_gradients=False, reduce="mean"),
    Method("gradcam", "captum", "Grad-CAM at a layer, bilinearly upsampled", _gradcam,
           _params(layer="auto", relu=True), needs_layer=True, signed=False),
    Method("guided-backprop", "captum", "guided backpropagation", _guided_backprop, **_BY_TYPE),
    Method("deconvnet", "captum", "deconvnet (Zeiler & Fergus 2014)", _deconvnet, **_BY_TYPE),
    Method("guided-gradcam", "captum", "guided backprop x Grad-CAM", _guided_gradcam, _params(layer="auto"),
           needs_layer=True, **_BY_TYPE),
    Method("lrp-epsilon", "zennit", "LRP-epsilon on every linear/conv layer (conserves relevance without biases)",
           _lrp("lrp-epsilon"), _params(epsilon=1e-6, canonizer="auto"), **_BY_TYPE),
    Method("lrp-epsilon-plus-flat", "zennit", "LRP: flat first layer, z+ convolutions, epsilon dense",
           _lrp("lrp-epsilon-plus-flat"), _params(epsilon=1e-6, canonizer="auto"), **_BY_TYPE),
    Method("lrp-epsilon-alpha2-beta1", "zennit", "LRP: alpha2-beta1 convolutions, epsilon dense",
           _lrp("lrp-epsilon-alpha2-beta1"), _params(epsilon=1e-6, canonizer="auto"), **_BY_TYPE),
    Method("lrp-epsilon-alpha2-beta1-flat", "zennit", "LRP: flat first layer, alpha2-beta1 convolutions, epsilon dense",
           _lrp("lrp-epsilon-alpha2-beta1-flat"), _params(epsilon=1e-6, canonizer="auto"), **_BY_TYPE),
    Method("lrp-epsilon-gamma-box", "zennit", "LRP: z^B first layer, gamma convolutions, epsilon dense",
           _lrp("lrp-epsilon-gamma-box"), _params(epsilon=1e-6, gamma=0.25, low=None, high=None, canonizer="auto"), **_BY_TYPE),
    Method("rise", "conceptlens", "RISE: class probability under random masks (Petsiuk et al. 2018), batched",
           _rise, _params(n_masks=500, cells=7, p=0.5, seed=0, forward_batch=512), stochastic=True, signed=False,
           uses_gradients=False),
    # 32 roots: the gradient budget of integrated gradients' 32 steps (the paper used 150 on ImageNet);
    # noise 0.15 of each image's range, as SmoothGrad's. needs_baseline: it takes one (the roots' centre).
    Method("smooth-taylor", "conceptlens", "SmoothTaylor: Taylor terms (x - z) * grad f(z) averaged over noisy roots "
           "z (Goh et al. 2021), batched", _smooth_taylor,
           _params(n_roots=32, noise_scale=0.15, baseline="input", seed=0, backward_batch=256,
                   noise_grid=(0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64)),
           needs_baseline=True, stochastic=True),
    Method("random", "control", "uniform random map: a control for faithfulness metrics, not an explanation",
           _random, _params(seed=0), stochastic=True, signed=False, uses_gradients=False),
]})


def method_info(name):
    """The :class:`Method` called ``name``; an unknown name raises with the closest valid names."""
    if name in METHODS:
        return METHODS[name]
    raise ConceptLensError(f"unknown attribution method {name!r}{did_you_mean(name, METHODS)} (valid: {', '.join(METHODS)})")


def list_methods():
    """Table of methods: name, library, capabilities, parameters with defaults, description."""
    rows = [{
        "name": m.name, "library": m.library, "needs_layer": m.needs_layer, "needs_baseline": m.needs_baseline,
        "stochastic": m.stochastic, "signed": m.signed, "uses_gradients": m.uses_gradients,
        "needs_module_types": m.needs_module_types, "reduce": m.reduce,
        "params": ", ".join(f"{k}={v!r}" for k, v in m.params.items()), "description": m.description,
    } for m in METHODS.values()]
    return pd.DataFrame(rows)


_ANY_MODEL = "input-x-gradient, integrated-gradients or gradcam"  # methods that read no module types


def _model_label(model, module):
    return f"model {model.spec}" if hasattr(model, "spec") else f"the {type(module).__name__} model"


def check_method(model, method, **params):
    """Raise unless ``method`` with ``params`` gives faithful results on ``model``; cheap (no forward pass).

    A method that ``needs_module_types`` runs on a ``torch.export`` program through eager copies of
    its layers; it is refused when a layer computes something that cannot be rebuilt as an eager
    module (the method would silently skip it and return a different attribution).

    Parameters
    ----------
    model : LoadedModel or nn.Module
    method : str
        A name from :data:`METHODS`.
    **params
        Its parameters (names and common values are checked, see :meth:`Method.resolve_params`).

    Raises
    ------
    ConceptLensError
        Naming the method, the model, the layer and what to use instead.
    """
    spec = method_info(method)
    spec.resolve_params(params)
    module = _unwrap(model)
    if not spec.needs_module_types or not _rebuild.is_program(module):
        return
    bad = _rebuild.unrebuildable_layers(module)
    if bad:
        layer, ops = next(iter(bad.items()))
        more = f" (and {len(bad) - 1} more layers)" if len(bad) > 1 else ""
        raise ConceptLensError(
            f"attribution method {spec.name!r} attaches its rules to module types (nn.Conv2d, nn.Linear, nn.BatchNorm2d, "
            f"nn.ReLU) and {_model_label(model, module)} is a torch.export program whose layer {layer!r} runs {ops}{more}, "
            f"which conceptlens cannot rebuild as such a module; use the python: spec of the same network, or a method "
            f"that works on any model ({_ANY_MODEL})"
        )


def supports(model, method):
    """True when :func:`check_method` accepts ``method`` on ``model`` (e.g. for a report to pick another method).

    Parameters
    ----------
    model : LoadedModel or nn.Module
    method : str

    Returns
    -------
    bool
    """
    method_info(method)  # an unknown name is an error, not "unsupported"
    try:
        check_method(model, method)
    except ConceptLensError:
        return False
    return True


def _eager_layers(model, module, spec, x):
    """The module the method runs on: ``module``, or for a program its copy with eager layers,
    checked to give the program's outputs on ``x``."""
    if not spec.needs_module_types or not _rebuild.is_program(module):
        return module
    rebuilt = _rebuild.eager_copy(module)
    if not _rebuild.check_same_outputs(module, rebuilt, x):
        raise ConceptLensError(
            f"the eager layers rebuilt from {_model_label(model, module)} do not reproduce the program's outputs, so "
            f"attribution method {spec.name!r} cannot run on it faithfully; use the python: spec of the same network, "
            f"or a method that works on any model ({_ANY_MODEL})"
        )
    logger.info("%s is a torch.export program: %s runs on a copy with its layers rebuilt as eager modules",
                _model_label(model, module), spec.name)
    return rebuilt


def _targets(target, x, module, model):
    n = x.shape[0]
    with torch.no_grad():
        out = module(x if target is None else x[:1])
    n_classes = out.shape[1]
    if target is None:
        t = out.argmax(1)
        logger.info("target auto -> predicted class of each image")
        return t
    if isinstance(target, str):
        if not hasattr(model, "class_index"):
            raise ConceptLensError(f"target {target!r} is a class name but the model has no class names; pass an index")
        target = model.class_index(target)
    if isinstance(target, (int, np.integer)):
        t = torch.full((n,), int(target), dtype=torch.long)
    else:
        t = torch.as_tensor(np.asarray(target), dtype=torch.long).reshape(-1)
        if len(t) != n:
            raise ConceptLensError(f"target has {len(t)} entries for {n} images; give one class per image or a single class")
    if len(t) and (t.min() < 0 or t.max() >= n_classes):
        raise ConceptLensError(f"target classes must lie in 0..{n_classes - 1} (the model has {n_classes} logits); got {t.tolist()[:8]}")
    return t.to(x.device)


def _reduce(raw, how):
    if raw.shape[1] == 1:
        return raw[:, 0]
    if how == "sum":
        return raw.sum(1)
    if how == "abs":
        return raw.abs().sum(1)
    if how == "mean":
        return raw.mean(1)
    return raw.abs().amax(1)


def attribute(model, x, target=None, method="saliency", raw=False, progress=False, **params):
    """Attribute the target logit of each image to its pixels.

    Parameters
    ----------
    model : LoadedModel or nn.Module
        The classifier; it comes back unchanged (mode, ``requires_grad``, hooks, in-place flags).
    x : Tensor
        Preprocessed images ``[B, C, H, W]`` (as the model takes them).
    target : int, str, sequence of int, Tensor or None
        The class to explain: one for all images, one per image, a class name (LoadedModel), or
        ``None`` for each image's predicted class.
    method : str
        A name from :data:`METHODS` (see :func:`list_methods`).
    raw : bool
        Also return the raw attribution ``[B, C, H, W]`` (``C = 1`` for Grad-CAM, RISE, random).
    progress : bool
        Show a progress bar over batches.
    **params
        Method parameters (see :func:`list_methods`); common: ``reduce`` (``sum``, ``abs``, ``max``,
        ``mean``) and ``batch_size`` (images per call, default 32). Stochastic methods are seeded
        per call; SmoothGrad and LIME draw their noise per batch, so their maps depend on
        ``batch_size`` as well as ``seed`` (RISE shares one mask set and SmoothTaylor seeds each
        image's roots by its index in ``x``: neither does).

    Returns
    -------
    Tensor ``[B, H, W]`` (float32, CPU), or ``(maps, raw)`` when ``raw=True``.

    Raises
    ------
    ConceptLensError
        For bad arguments, and before any work when the method cannot run faithfully on the model
        (see :func:`check_method`).
    """
    from tqdm.auto import tqdm

    spec = method_info(method)
    p = spec.resolve_params(params)
    module = _unwrap(model)
    check_method(model, spec.name, **params)
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ConceptLensError(f"x must be a float tensor of images [B, C, H, W]; got {shape}")
    if x.shape[0] == 0:
        raise ConceptLensError("x holds no images")
    device = next(iter(module.parameters()), torch.empty(0)).device
    maps, raws = [], []
    with _analysis_mode(module), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU")
        x = x.detach().to(device).clone()
        t = _targets(target, x, module, model)
        work = _eager_layers(model, module, spec, x[:p["batch_size"]])
        if spec.name == "smoothgrad":
            p["_range"] = float(x.max() - x.min()) or 1.0
        if spec.needs_layer:
            if p["layer"] in (None, "auto"):
                p["layer"] = auto_layer(work, x)
            _resolve_layer(work, x, p["layer"])  # validate before any work
        for key, reduce_fn in (("low", torch.amin), ("high", torch.amax)):
            if key in p and p[key] is None:  # z^B bounds: the inputs' per-channel range, the same for every batch
                p[key] = reduce_fn(x, dim=(0, 2, 3), keepdim=True)
        if "canonizer" in p:
            p["canonizer"] = _choose_canonizer(work, p["canonizer"])
        starts = range(0, x.shape[0], p["batch_size"])
        for i in tqdm(starts, desc=f"attribute {spec.name}", unit="batch", disable=not progress):
            xb = x[i:i + p["batch_size"]].clone()
            p["_start"] = i
            if spec.uses_gradients:
                xb.requires_grad_(True)
            r = spec.fn(work, xb, t[i:i + p["batch_size"]], p).detach().float()
            maps.append(_reduce(r, p["reduce"]).cpu())
            if raw:
                raws.append(r.cpu())
    maps = torch.cat(maps)
    return (maps, torch.cat(raws)) if raw else maps

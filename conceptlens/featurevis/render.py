"""Optimise images that maximise objectives: :func:`visualize` and its :class:`Visualization`.

Each objective gets one image (see :mod:`~conceptlens.featurevis.objectives` for how diversity
groups several images of one objective). Images are optimised in chunks of ``batch_size``: the
loss is the sum of the images' own objectives, so each image's gradient is that of its own run,
Adam updates element-wise, and every random draw (initial parameters, transforms) comes from the
image's own stream — a chunk gives what one-at-a-time runs give, bit for bit where the model's
kernels compute a sample the same way whatever the batch size (CPU with
``torch.backends.mkldnn.flags(enabled=False)``). oneDNN and cuDNN round differently per batch
size, and Adam's first steps (about ``lr * sign(gradient)``) turn that rounding into visibly
different images after a few dozen steps; each run is still repeatable for a fixed batch size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..core.frozen import frozen
from ..core.result import Result, provenance
from ..errors import ConceptLensError, did_you_mean
from ..models import validate_layers
from ._seed import generator
from .objectives import INPUT, LOGITS, Objective, batched_scorer, class_logit, input_alpha, input_l2, input_tv, match
from .param import PARAMS
from .relu import redirected_relus
from .transforms import RobustnessTransforms, default_transforms

__all__ = ["visualize", "objective_values", "class_models", "invert", "Visualization"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Visualization(Result):
    """Images that maximise objectives, one per objective.

    Attributes
    ----------
    images : ndarray of uint8, [N, H, W, C]
        The optimised images, ready to show or save (the layout of PIL and matplotlib).
    objective_values : ndarray of float, [N]
        Each image's objective, evaluated on the final float image without transforms (before the
        rounding to uint8).
    table : DataFrame
        ``image, objective, value``: the objective's description and ``objective_values``.
    provenance : dict
    """

    images: np.ndarray = field(repr=False)
    objective_values: np.ndarray = field(repr=False)
    table: pd.DataFrame = field(repr=False)
    provenance: dict = field(repr=False)

    KIND, META = "feature-visualization", "visualization.json"

    def to_frame(self):
        return self.table

    def _write(self, directory):
        from PIL import Image

        channels = self.images.shape[-1]
        modes = {1: "L", 3: "RGB", 4: "RGBA"}
        if channels not in modes:
            raise ConceptLensError(f"PNG holds 1, 3 or 4 channels; these images have {channels}: save images yourself")
        names = [f"image_{i:04d}.png" for i in range(len(self.images))]
        for name, image in zip(names, self.images):
            Image.fromarray(image[..., 0] if channels == 1 else image, modes[channels]).save(directory / name)
        self.table.to_csv(directory / "objectives.csv", index=False)
        return {"images": names, "table": "objectives.csv"}

    @classmethod
    def _read(cls, directory, meta):
        from PIL import Image

        images = [np.asarray(Image.open(directory / name)) for name in meta["images"]]
        images = np.stack([im[..., None] if im.ndim == 2 else im for im in images])
        table = pd.read_csv(directory / meta["table"])
        return cls(images=images, objective_values=table["value"].to_numpy(np.float64), table=table,
                   provenance=meta["provenance"])


@contextlib.contextmanager
def _capture(module, layers):
    """Forward hooks that store each layer's output in the yielded dict; exactly these are removed."""
    store, handles = {}, []

    def hook(name):
        def fn(mod, inputs, output):
            if not isinstance(output, torch.Tensor):
                raise ConceptLensError(f"layer {name!r} outputs a {type(output).__name__}, not a tensor; pick another layer")
            store[name] = output

        return fn

    try:
        for name in layers:
            handles.append(module.get_submodule(name).register_forward_hook(hook(name)))
        yield store
    finally:
        for h in handles:
            h.remove()


def _unwrap(model):
    module = getattr(model, "module", model)
    if not isinstance(module, nn.Module):
        raise ConceptLensError(f"visualize needs a torch nn.Module or a LoadedModel (conceptlens.models.load_model); "
                               f"got {type(model).__name__}")
    return module, getattr(model, "preprocessing", None)


def _as_objectives(objectives):
    objectives = [objectives] if isinstance(objectives, Objective) else list(objectives)
    if not objectives or not all(isinstance(o, Objective) for o in objectives):
        raise ConceptLensError("objectives must be an Objective or a non-empty list of them "
                               "(conceptlens.featurevis.channel, unit, direction, class_logit)")
    return objectives


def _groups(objectives):
    """Index lists of the images optimised together: one per diversity objective's description, else one each."""
    groups, by_description = [], {}
    for i, obj in enumerate(objectives):
        if obj.grouped and obj.description in by_description:
            by_description[obj.description].append(i)
        else:
            groups.append([i])
            if obj.grouped:
                by_description[obj.description] = groups[-1]
    return groups


def _chunks(groups, batch_size):
    """Whole groups packed into chunks of at most ``batch_size`` images (a larger group is a chunk alone)."""
    chunks, current = [], []
    for group in groups:
        if current and sum(map(len, current)) + len(group) > batch_size:
            chunks.append(current)
            current = []
        current.append(group)
    return chunks + [current] if current else chunks


class _Scorer:
    """Normalises images, runs the model with the objectives' hooks and scores each image."""

    def __init__(self, module, preprocessing, objectives, groups, channels, size, layers=()):
        self.module, self.objectives, self.groups = module, objectives, groups
        read = [layer for o in objectives for layer in o.layers if layer not in (LOGITS, INPUT)]
        self.layers = list(dict.fromkeys([*read, *layers]))  # ``layers``: captured for the caller too
        if self.layers:
            validate_layers(module, self.layers)
        device = next(module.parameters(), torch.zeros(())).device
        self.device, self.norm, self._plans = device, None, {}
        if preprocessing is not None:
            if channels != 3:
                raise ConceptLensError(f"the model's preprocessing normalises 3 (RGB) channels; got channels={channels}")
            self.norm = (torch.tensor(preprocessing.mean, device=device).view(1, 3, 1, 1),
                         torch.tensor(preprocessing.std, device=device).view(1, 3, 1, 1))
        self._check(channels, size)

    def _check(self, channels, size):
        probe = torch.full((1, channels, *size), 0.5, device=self.device)
        with torch.no_grad():
            acts = self._forward(probe)
        shapes = {name: tuple(a.shape[1:]) for name, a in acts.items()}
        for obj in self.objectives:
            obj.check(shapes)

    def _forward(self, images):
        x = images if self.norm is None else (images - self.norm[0]) / self.norm[1]
        with _capture(self.module, self.layers) as acts:
            try:
                out = self.module(x)
            except ConceptLensError:
                raise
            except Exception as exc:  # the model's own message says why the input does not fit
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ConceptLensError(f"the model rejects {tuple(x.shape[1:])} inputs ({reason}); pass another size") from None
        if not isinstance(out, torch.Tensor):
            raise ConceptLensError(f"the model returns a {type(out).__name__}, not a tensor of logits")
        return {**acts, LOGITS: out, INPUT: x}

    def __call__(self, images, groups):
        """Objective values ``[n]`` of ``images`` holding ``groups`` (index lists into ``self.objectives``), in order.

        The scoring plan (terms bucketed by kind and layer across the batch) is built once per
        ``groups`` and reused at every step.
        """
        acts = self._forward(images)
        key = tuple(map(tuple, groups))
        if key not in self._plans:
            self._plans[key] = batched_scorer(self.objectives, groups, device=images.device)
        return self._plans[key](acts)


def _resolve_size(size, preprocessing, model):
    if size is None:
        size = getattr(model, "input_size", None)
        if size is None and preprocessing is not None:
            size = preprocessing.crop or preprocessing.resize
        if size is None:
            raise ConceptLensError("the model does not say its input size; pass size=N or size=(H, W)")
        logger.info("size auto -> %s (from the model)", size)
    size = (size, size) if isinstance(size, int) and not isinstance(size, bool) else tuple(size)
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
        raise ConceptLensError(f"size must be a positive integer or (height, width); got {size!r}")
    return size


def _check_parameters(steps, lr, param, transforms, seed, batch_size, channels, relu_redirect_steps=0):
    """Each parameter's constraint, declared once."""
    def positive_int(name, value):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConceptLensError(f"{name} must be a positive integer; got {value!r}")

    positive_int("steps", steps)
    positive_int("batch_size", batch_size)
    positive_int("channels", channels)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConceptLensError(f"seed must be an integer; got {seed!r}")
    if isinstance(relu_redirect_steps, bool) or not isinstance(relu_redirect_steps, int) or relu_redirect_steps < 0:
        raise ConceptLensError(f"relu_redirect_steps must be a non-negative integer; got {relu_redirect_steps!r}")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
        raise ConceptLensError(f"lr must be a positive number; got {lr!r}")
    if param not in PARAMS:
        raise ConceptLensError(f"param must be one of {sorted(PARAMS)}; got {param!r}{did_you_mean(str(param), list(PARAMS))}")
    if not (transforms in ("default", None) or isinstance(transforms, RobustnessTransforms)):
        raise ConceptLensError(f"transforms must be 'default', None or a RobustnessTransforms; got {transforms!r}")


def objective_values(model, objectives, images):
    """Evaluate objectives on given images (no transforms), image ``i`` by objective ``i``.

    Parameters
    ----------
    model : LoadedModel or nn.Module
    objectives : Objective or list of Objective
        One per image; diversity groups as in :func:`visualize`.
    images : Tensor [N, C, H, W]
        Pixel values in ``[0, 1]``; the model's normalisation is applied here.

    Returns
    -------
    ndarray of float, [N]
    """
    module, prep = _unwrap(model)
    objectives = _as_objectives(objectives)
    images = torch.as_tensor(images, dtype=torch.float32)
    if images.ndim != 4 or len(images) != len(objectives):
        raise ConceptLensError(f"images must be [N, C, H, W] with one image per objective ({len(objectives)}); "
                               f"got shape {list(images.shape)}")
    groups = _groups(objectives)
    order = [i for g in groups for i in g]
    with frozen(module):
        scorer = _Scorer(module, prep, objectives, groups, images.shape[1], tuple(images.shape[2:]))
        with torch.no_grad():
            values = scorer(images[order].to(scorer.device), groups)
    out = np.empty(len(objectives))
    out[order] = values.double().cpu().numpy()
    return out


def visualize(model, objectives, size=None, steps=512, lr=0.05, param="fourier", transforms="default", seed=0,
              batch_size=32, progress=True, channels=3, relu_redirect_steps=0):
    """Optimise one image per objective (Lucid-style feature visualisation).

    Parameters
    ----------
    model : LoadedModel or nn.Module
        Put in eval mode with frozen parameters for the run; its modes, ``requires_grad`` flags,
        in-place flags and hooks are exactly restored afterwards. A LoadedModel's preprocessing
        mean and std normalise the images before each forward.
    objectives : Objective or list of Objective
        Image ``i`` maximises objective ``i``; repeat a diversity objective for several images.
    size : int or (int, int), optional
        Image height and width; default the model's fixed input size, else its preprocessing crop
        (else resize). Required for a bare nn.Module.
    steps : int
        Adam steps (lucent's default 512).
    lr : float
        Adam learning rate (lucent's default 0.05).
    param : {"fourier", "pixel"}
        Image parameterisation (:mod:`~conceptlens.featurevis.param`); fourier gives far less
        high-frequency noise.
    transforms : "default", None or RobustnessTransforms
        Random transforms each step; "default" is lucent's, scaled for images below 224 px
        (:func:`~conceptlens.featurevis.transforms.default_transforms`).
    seed : int
        Image ``i``'s initial parameters come from ``(seed, i)`` and its transforms at step ``t``
        from ``(seed, i, t)``, whatever the batching.
    batch_size : int
        Images optimised together; diversity groups are never split.
    progress : bool
        Show a tqdm bar.
    channels : int
        Image channels (3 for RGB models).
    relu_redirect_steps : int
        During the first this many steps, the model's ``nn.ReLU`` modules pass Lucid's redirected
        gradient to images that get none through them (:mod:`~conceptlens.featurevis.relu`), so
        that units dead for the initial image can still be optimised; Lucid uses 16. 0: off.

    Returns
    -------
    Visualization
    """
    module, prep = _unwrap(model)
    objectives = _as_objectives(objectives)
    _check_parameters(steps, lr, param, transforms, seed, batch_size, channels, relu_redirect_steps)
    size = _resolve_size(size, prep, model)
    if transforms == "default":
        transforms = default_transforms(*size)
        logger.info("transforms auto -> %s (for %dx%d images)", transforms.describe(), *size)
    groups = _groups(objectives)
    chunks = _chunks(groups, batch_size)
    from tqdm.auto import tqdm

    started = time.perf_counter()
    images, values, param_description = [None] * len(objectives), np.empty(len(objectives)), None
    step = 0
    redirect = (redirected_relus(module, lambda: step < relu_redirect_steps) if relu_redirect_steps
                else contextlib.nullcontext())
    with frozen(module), redirect:
        scorer = _Scorer(module, prep, objectives, groups, channels, size)
        bar = tqdm(total=steps * len(chunks), desc="feature visualisation", unit="step", disable=not progress)
        try:
            for chunk in chunks:
                index = [i for g in chunk for i in g]
                image = PARAMS[param]([generator(seed, i) for i in index], size[0], size[1], channels,
                                      device=scorer.device)
                param_description = image.description
                optimiser = torch.optim.Adam([image.params], lr=lr)
                for step in range(steps):
                    optimiser.zero_grad(set_to_none=True)
                    x = image()
                    if transforms is not None:
                        x = transforms(x, [generator(seed, i, step) for i in index])
                    (-scorer(x, chunk).sum()).backward()
                    optimiser.step()
                    bar.update()
                with torch.no_grad():
                    final = image()
                    got = scorer(final, chunk).double().cpu().numpy()
                for row, i in enumerate(index):
                    images[i], values[i] = final[row], got[row]
        finally:
            bar.close()
    pixels = (torch.stack(images).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    descriptions = [o.description for o in objectives]
    table = pd.DataFrame({"image": np.arange(len(objectives)), "objective": descriptions, "value": values})
    params = {"size": list(size), "steps": steps, "lr": lr, "param": param_description, "seed": seed,
              "batch_size": batch_size, "channels": channels, "relu_redirect_steps": relu_redirect_steps,
              "transforms": None if transforms is None else transforms.describe()}
    prov = provenance(model, parameters=params, preprocessing=None if prep is None else prep.to_dict(),
                      timings={"optimise": time.perf_counter() - started}, objectives=descriptions)
    return Visualization(images=pixels, objective_values=values, table=table, provenance=prov)


def class_models(model, classes=None, weight=1e-3, size=None, steps=256, lr=0.05, seed=0, batch_size=32, progress=True):
    """Class model visualisation (Simonyan et al. 2014): per class, the image maximising
    ``S_c(I) - weight * ||I||^2`` (the class logit, not its softmax, and the squared norm of the
    normalised input), by Adam on raw pixels without transforms, as the paper's plain gradient ascent.

    Parameters
    ----------
    model : LoadedModel or nn.Module
    classes : sequence of int or str, optional
        Logit indices or a LoadedModel's class names (default every class of a model with class names).
    weight : float
        The paper's lambda, for which it gives no value: at ``1e-3`` the norm term is about 6 % of the
        class logit on the demo CNN at 64 px (measured after 64 steps).
    size, steps, lr, seed, batch_size, progress :
        As in :func:`visualize` (``param="pixel"``, ``transforms=None``).

    Returns
    -------
    Visualization
        One image per class, in the order of ``classes``.
    """
    if classes is None:
        names = getattr(model, "classes", None)
        if not names:
            raise ConceptLensError("the model has no class names; pass classes=[logit indices]")
        classes = list(range(len(names)))
    index = [model.class_index(str(c)) if isinstance(c, str) and hasattr(model, "class_index") else c for c in classes]
    objectives = [class_logit(c) + input_l2(weight) for c in index]
    return visualize(model, objectives, size=size, steps=steps, lr=lr, param="pixel", transforms=None, seed=seed,
                     batch_size=batch_size, progress=progress)


TV_GROWTH = 100.0
"""How much ``tv_weight="auto"`` grows from a model's first module to its last (see :func:`invert`)."""


def _depth_fractions(module, layers, probe):
    """Each layer's position in the order the modules run on ``probe``, as a fraction of the network:
    0 for the first module to run, 1 for the last (leaf modules and the layers themselves are counted)."""
    order, handles = [], []
    watched = {name for name, m in module.named_modules() if name and not any(True for _ in m.children())}
    watched.update(layers)
    try:
        for name in watched:
            handles.append(module.get_submodule(name).register_forward_hook(
                lambda m, i, o, name=name: order.append(name) if name not in order else None))
        with torch.no_grad():
            module(probe)
    finally:
        for h in handles:
            h.remove()
    last = max(len(order) - 1, 1)
    return {layer: order.index(layer) / last if layer in order else 1.0 for layer in layers}


def _check_weight(name, value, auto=False):
    if auto and value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        allowed = "'auto' or a non-negative number" if auto else "a non-negative number"
        raise ConceptLensError(f"{name} must be {allowed}; got {value!r}")
    return float(value)


def invert(model, images, layers, steps=200, lr=0.05, alpha=6.0, beta=2.0, alpha_weight=1e-5, tv_weight="auto",
           seed=0, batch_size=32, progress=True, tv_base=1e-5):
    """Invert layer representations (Mahendran & Vedaldi 2015): per image and layer, the image ``x``
    maximising ``-||phi(x) - phi(x0)||^2 / ||phi(x0)||^2 - alpha_weight ||x||_alpha^alpha
    - tv_weight TV^beta(x)`` (on the normalised input), by Adam on pixels without transforms.

    Parameters
    ----------
    model : LoadedModel or nn.Module
    images : Tensor [N, C, H, W]
        The originals, pixel values in ``[0, 1]`` (the model's normalisation is applied here).
    layers : sequence of str
        Each image is reconstructed from each layer.
    alpha, beta, alpha_weight : float
        The alpha-norm prior: alpha 6 and beta 2 from the paper; the weight 1e-5 of the PyTorch
        port of its method on ImageNet-normalised inputs (the paper scales by its image range instead).
    tv_weight : "auto" or float
        The total-variation weight. A number is used for every layer. ``"auto"`` grows it with the
        layer's depth, as the authors do: their code (``deep-goggle``, ``experiments/experiment_cnn.m``)
        inverts the 20 layers of CaffeNet with ``lambdaTV`` 1 for layers 1-6, 10 for 7-12 and 100 for
        13-20; a VGG-16 reproduction uses 0.5 / 5 / 50 for conv1-2 / conv3-4 / conv5 and fc. Both are one decade per
        third of the network. ``"auto"`` is the continuous version of that rule,
        ``tv_base * TV_GROWTH ** d`` with ``TV_GROWTH = 100`` and ``d`` the layer's position in the order
        the model's modules run (0 for the first module, 1 for the last; measured with one forward of
        the first image), so it needs no knowledge of the architecture.
    tv_base : float
        ``tv_weight="auto"``'s weight at depth 0 (default 1e-5, the PyTorch port's fixed weight);
        ignored for a numeric ``tv_weight``.
    steps, lr, seed, batch_size, progress :
        As in :func:`visualize` (``param="pixel"``, ``transforms=None``).

    Returns
    -------
    Visualization
        One reconstruction per (image, layer), image-major; its table adds ``source`` (the
        image's position), ``layer``, ``tv_weight`` (the weight used for that layer) and ``psnr``
        (dB, against the original).
    """
    module, prep = _unwrap(model)
    images = torch.as_tensor(images, dtype=torch.float32)
    if images.ndim != 4 or not len(images):
        raise ConceptLensError(f"images must be a non-empty [N, C, H, W] tensor in [0, 1]; got shape {list(images.shape)}")
    layers = list(layers)
    if not layers:
        raise ConceptLensError("invert needs at least one layer")
    tv_weight = _check_weight("tv_weight", tv_weight, auto=True)
    tv_base = _check_weight("tv_base", tv_base)
    validate_layers(module, layers)
    with frozen(module), torch.no_grad():
        scorer = _Scorer(module, prep, [], [], images.shape[1], tuple(images.shape[2:]), layers=layers)
        targets = scorer._forward(images.to(scorer.device))
        if tv_weight == "auto":
            first = images[:1].to(scorer.device)
            depth = _depth_fractions(module, layers, first if scorer.norm is None else
                                     (first - scorer.norm[0]) / scorer.norm[1])
            weights = {layer: tv_base * TV_GROWTH ** depth[layer] for layer in layers}
            logger.info("tv_weight auto -> %s (tv_base * %g ** depth)",
                        ", ".join(f"{layer}: {w:.3g} (depth {depth[layer]:.2f})" for layer, w in weights.items()),
                        TV_GROWTH)
        else:
            weights = dict.fromkeys(layers, tv_weight)
    objectives = [match(layer, targets[layer][i]) + input_alpha(alpha_weight, alpha) + input_tv(weights[layer], beta)
                  for i in range(len(images)) for layer in layers]
    vis = visualize(model, objectives, size=tuple(images.shape[2:]), steps=steps, lr=lr, param="pixel", transforms=None,
                    seed=seed, batch_size=batch_size, progress=progress, channels=images.shape[1])
    recon = torch.from_numpy(vis.images).permute(0, 3, 1, 2).float() / 255
    original = images.repeat_interleave(len(layers), dim=0)
    mse = ((recon - original) ** 2).mean((1, 2, 3)).clamp_min(1e-12)
    table = vis.table.assign(source=np.repeat(np.arange(len(images)), len(layers)), layer=layers * len(images),
                             tv_weight=[weights[layer] for layer in layers] * len(images),
                             psnr=(10 * torch.log10(1 / mse)).numpy())
    return dataclasses.replace(vis, table=table)

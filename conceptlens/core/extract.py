"""The one extraction path: capture named layers with forward hooks, pool, store; and gradients.

* :func:`extract` runs a model over a manifest once and writes the requested layers into an
  :class:`~conceptlens.core.store.ActivationStore` (resumable, hash-checked).
* :func:`iter_activations` is the in-memory core: ``(rows, {layer: pooled tensor})`` per batch.
* :func:`iter_gradients` yields, per batch, the activations of the requested layers together with
  the gradients of explicit class logits with respect to them; only one batch is held at a time.

Hooks are removed on every exit path, and the caller's model keeps its mode and parameters.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import __version__
from ..data import Manifest, make_loader
from ..errors import ConceptLensError
from ..models import load_model, validate_layers
from .store import ActivationStore, StoreWriter

__all__ = ["extract", "predict", "predict_tensor", "write_batches", "iter_activations", "iter_gradients", "GradientBatch", "pool_activations", "parse_pool"]

logger = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by the hook of the last requested layer to skip the rest of the network."""


def parse_pool(pool):
    """Validate a pooling spec: ``none``, ``mean``, ``max`` or ``adaptive:K``."""
    if pool in ("none", "mean", "max"):
        return pool
    if isinstance(pool, str) and pool.startswith("adaptive:") and pool[9:].isdigit() and int(pool[9:]) > 0:
        return pool
    raise ConceptLensError(f"pool must be none, mean, max or adaptive:K (K a positive integer); got {pool!r}")


def pool_activations(x, pool, layer="layer"):
    """Pool one layer's output: ``[B,C,H,W]`` over space, ``[B,T,C]`` (tokens) over tokens."""
    if pool == "none" or x.dim() == 2:
        return x
    if x.dim() == 4:
        if pool == "mean":
            return x.mean(dim=(2, 3))
        if pool == "max":
            return x.amax(dim=(2, 3))
        return F.adaptive_avg_pool2d(x, int(pool[9:]))
    if x.dim() == 3 and pool in ("mean", "max"):
        return x.mean(dim=1) if pool == "mean" else x.amax(dim=1)
    raise ConceptLensError(f"cannot apply pool {pool!r} to the {x.dim()}-D output {tuple(x.shape)} of layer {layer!r}")


def _as_tensor(output, layer):
    if isinstance(output, torch.Tensor):
        return output
    raise ConceptLensError(
        f"layer {layer!r} returns {type(output).__name__}, not a tensor; capture one of its submodules "
        "(list them with `conceptlens layers MODEL`)"
    )


@contextlib.contextmanager
def _hooked(module, layers, on_output):
    """Register ``on_output(name, module, output)`` as forward hook on each layer; always removed."""
    handles = []
    try:
        for name in layers:
            sub = module.get_submodule(name)
            handles.append(sub.register_forward_hook(lambda m, i, o, name=name: on_output(name, m, o)))
        yield
    finally:
        for h in handles:
            h.remove()


class _Capture:
    """Per-forward capture state with the once-per-forward check and early stop.

    ``transform(name, output)`` returns ``(captured, replacement)``: what to keep, and a tensor to
    hand downstream instead of the output (``None`` keeps the output).
    """

    def __init__(self, layers, transform, stop_early):
        self.layers, self.transform, self.stop_early = layers, transform, stop_early
        self.outputs = {}
        self.calls = {}

    def reset(self):
        self.outputs, self.calls = {}, {}

    def __call__(self, name, module, output):
        self.calls[name] = self.calls.get(name, 0) + 1
        captured, replacement = self.transform(name, _as_tensor(output, name))
        self.outputs[name] = captured
        if self.stop_early and len(self.outputs) == len(self.layers):
            raise _StopForward
        return replacement

    def check_single_calls(self):
        missing = [n for n in self.layers if n not in self.calls]
        if missing:
            raise ConceptLensError(f"layers {missing} did not run in the forward pass; choose layers the model uses")
        repeated = {n: c for n, c in self.calls.items() if c > 1}
        if repeated:
            name, count = next(iter(repeated.items()))
            raise ConceptLensError(
                f"layer {name!r} runs {count} times per forward pass (a shared module), so its output is "
                "ambiguous; capture its parent block or another layer (see `conceptlens layers MODEL`, column calls)"
            )


def _model_and_device(model):
    model = load_model(model) if isinstance(model, str) else model
    module = getattr(model, "module", model)
    device = getattr(model, "device", None) or next(module.parameters()).device
    return model, module, device


def iter_activations(model, batches, layers, pool="mean", keep_raw=False):
    """Yield ``(rows, pooled, raw)`` per batch of ``batches`` (iterable of ``(rows, images)``).

    ``pooled`` maps each layer to its pooled output (detached, on the model's device); ``raw`` maps
    each layer to its unpooled output when ``keep_raw`` is True (for streaming statistics such as
    top-k images), to ``keep_raw(layer, output)`` when it is a callable (evaluated inside the
    forward hook, so no copy of the map outlives it), else is empty. The forward pass stops after
    the last requested layer has run; the first batch runs the whole model to check that each
    layer runs exactly once.
    """
    model, module, device = _model_and_device(model)
    layers = validate_layers(module, layers)
    pool = parse_pool(pool)

    def transform(name, out):
        out = out.detach()
        pooled = pool_activations(out, pool, name)
        if pooled is out:
            pooled = out.clone()  # downstream in-place ops (ReLU(inplace=True)) would change it
        if callable(keep_raw):
            return (pooled, keep_raw(name, out)), None
        return (pooled, out.clone() if keep_raw else None), None

    capture = _Capture(layers, transform, stop_early=False)
    first = True
    with _hooked(module, layers, capture), torch.inference_mode():
        for rows, x in batches:
            capture.reset()
            capture.stop_early = not first
            try:
                module(x.to(device, non_blocking=True))
            except _StopForward:
                pass
            if first:
                capture.check_single_calls()
                first = False
            pooled = {n: capture.outputs[n][0] for n in layers}
            raw = {n: capture.outputs[n][1] for n in layers} if keep_raw else {}
            yield rows, pooled, raw


@dataclass(frozen=True)
class GradientBatch:
    """One batch of activations and class-logit gradients.

    Attributes
    ----------
    rows : Tensor
        Row indices of the batch (as given by the batch source).
    activations : dict
        ``{layer: Tensor [B, ...]}`` unpooled layer outputs, detached.
    gradients : dict
        ``{layer: Tensor [K, B, ...]}``: ``gradients[layer][k, i]`` = d logit_{classes[k]}(x_i) / d f_layer(x_i).
    logits : Tensor
        ``[B, num_outputs]`` model outputs, detached.
    classes : tuple of int
        Logit indices, in the order of the gradients' first axis.
    """

    rows: torch.Tensor
    activations: dict
    gradients: dict
    logits: torch.Tensor
    classes: tuple


def iter_gradients(model, batches, layers, classes):
    """Yield a :class:`GradientBatch` per batch: activations and d logit_k / d activation.

    One forward and, per class, one backward pass for all requested layers together. The model
    must be in ``eval()`` mode so that each example's logit depends only on that example (BatchNorm
    in training mode would mix the batch); the gradient of the summed logit is then the
    per-example gradient.
    """
    model, module, device = _model_and_device(model)
    layers = validate_layers(module, layers)
    classes = tuple(int(c) for c in ([classes] if np.isscalar(classes) else classes))
    if not classes:
        raise ConceptLensError("iter_gradients needs at least one class index")
    if module.training:
        raise ConceptLensError("the model is in training mode; call model.eval() before computing gradients")

    # The hook keeps the module's own output for differentiation and hands a clone downstream, so an
    # in-place op after the layer cannot invalidate the tensor we differentiate with respect to.
    capture = _Capture(layers, lambda n, o: ((o,), o.clone()), stop_early=False)
    with _hooked(module, layers, capture), torch.enable_grad():
        for rows, x in batches:
            capture.reset()
            x = x.to(device, non_blocking=True).requires_grad_(True)  # grads flow even for frozen weights
            out = module(x)
            out = out[0] if isinstance(out, (tuple, list)) else out
            if not isinstance(out, torch.Tensor) or out.dim() != 2:
                raise ConceptLensError("the model must return logits of shape [batch, classes] for gradients")
            capture.check_single_calls()
            bad = [c for c in classes if not 0 <= c < out.shape[1]]
            if bad:
                raise ConceptLensError(f"class indices {bad} are out of range for a model with {out.shape[1]} outputs")
            acts = [capture.outputs[n][0] for n in layers]
            per_class = []
            for j, c in enumerate(classes):
                per_class.append(torch.autograd.grad(out[:, c].sum(), acts, retain_graph=j < len(classes) - 1))
            grads = {n: torch.stack([g[i] for g in per_class]) for i, n in enumerate(layers)}
            yield GradientBatch(
                rows=rows,
                activations={n: a.detach() for n, a in zip(layers, acts)},
                gradients=grads,
                logits=out.detach(),
                classes=classes,
            )


def _resolve_dtype(dtype, pool):
    if dtype == "auto":
        chosen = "float32" if pool in ("mean", "max") else "float16"
        logger.info("dtype auto → %s for pool %s", chosen, pool)
        return chosen
    if dtype not in ("float16", "float32"):
        raise ConceptLensError(f"dtype must be auto, float16 or float32; got {dtype!r}")
    return dtype


def extract(
    model,
    data,
    layers,
    out,
    pool="mean",
    dtype="auto",
    batch_size=64,
    num_workers=0,
    skip_bad=False,
    preprocessing=None,
    observers=(),
    progress=True,
):
    """Capture ``layers`` for every image of a manifest into an ActivationStore at ``out``.

    Parameters
    ----------
    model : LoadedModel or str
        A loaded model or a model spec.
    data : Manifest or path
        The images (manifest CSV).
    layers : list of str
        Module names (``conceptlens layers MODEL``); all are captured in one forward pass.
    out : path
        Store directory. A complete store for the same request is returned as is; an unfinished one
        is resumed; a store for another request (model weights, manifest, layers, pooling, dtype,
        preprocessing) is rebuilt.
    pool : {"mean", "max", "none", "adaptive:K"}
    dtype : {"auto", "float16", "float32"}
        ``auto``: float32 for mean/max pooling, float16 for spatial maps.
    preprocessing : Preprocessing, optional
        Defaults to the model's, updated by the manifest's TOML sidecar.
    observers : sequence of callables
        Each is called as ``observer(rows, raw)`` per batch with the unpooled outputs
        (``{layer: Tensor}``), for streaming statistics computed without another forward pass. An
        observer with a ``reduce(layer, output)`` method gets ``{layer: reduce(layer, output)}``
        instead, computed inside the forward hook (no copy of the maps is kept).
    skip_bad : bool
        Skip unreadable images (recorded in the store's ``skipped``) instead of failing.

    Returns
    -------
    ActivationStore
    """
    model = load_model(model) if isinstance(model, str) else model
    manifest = data if isinstance(data, Manifest) else Manifest.read(data)
    layers = validate_layers(model.module, layers)
    pool = parse_pool(pool)
    dtype = _resolve_dtype(dtype, pool)
    prep = model.preprocessing_for(manifest, preprocessing)
    request = {
        "model": model.spec,
        "weights_hash": model.weights_hash,
        "manifest": str(manifest.path),
        "manifest_hash": manifest.content_hash(),
        "layers": layers,
        "pool": pool,
        "dtype": dtype,
        "preprocessing": prep.to_dict(),
        "version": __version__,
    }
    writer = StoreWriter(Path(out), request, len(manifest))
    state = writer.existing()
    if state == "complete":
        logger.info("activation store %s is complete for this request: reusing it", out)
        return ActivationStore.open(out)
    start = writer.rows_completed
    batches = make_loader(manifest, prep, batch_size=batch_size, num_workers=num_workers, skip_bad=skip_bad,
                          rows=range(start, len(manifest)))
    write_batches(model, batches, layers, writer, pool, dtype, observers=observers, progress=progress)
    if batches.skipped:
        logger.warning("skipped %d unreadable images (listed in %s/meta.json)", len(batches.skipped), out)
    return writer.finish(manifest.frame)


def predict(model, data, batch_size=64, num_workers=0, skip_bad=False, preprocessing=None, progress=True):
    """The model's outputs (logits) for every readable image of a manifest.

    Parameters
    ----------
    model : LoadedModel or str
    data : Manifest or path
    preprocessing : Preprocessing, optional
        Defaults to the model's, updated by the manifest's TOML sidecar.

    Returns
    -------
    rows : ndarray of int, shape (N,)
        Manifest rows predicted (skipped images are missing).
    logits : ndarray of float32, shape (N, K)
    """
    model, module, device = _model_and_device(model)
    manifest = data if isinstance(data, Manifest) else Manifest.read(data)
    prep = model.preprocessing_for(manifest, preprocessing)
    batches = make_loader(manifest, prep, batch_size=batch_size, num_workers=num_workers, skip_bad=skip_bad)
    rows, logits = [], []
    for r, x in tqdm(batches, desc="predict", unit="batch", disable=not progress):
        rows.append(r.numpy())
        logits.append(_logits(module, x, device).numpy())
    if not rows:
        raise ConceptLensError(f"no readable image in {manifest.path}; nothing to predict")
    return np.concatenate(rows), np.concatenate(logits)


def predict_tensor(model, x, batch_size=64):
    """The model's outputs (float32 logits, on the CPU) for preprocessed images already in memory.

    Parameters
    ----------
    model : LoadedModel
    x : Tensor [N, 3, H, W]
    batch_size : int
    """
    _, module, device = _model_and_device(model)
    return torch.cat([_logits(module, xb, device) for xb in x.split(int(batch_size))])


def _logits(module, x, device):
    with torch.inference_mode():
        out = module(x.to(device, non_blocking=True))
    out = out[0] if isinstance(out, (tuple, list)) else out
    return out.float().cpu()


def write_batches(model, batches, layers, writer, pool, dtype, observers=(), progress=True):
    """Run ``batches`` (``(rows, images)`` in manifest order) through the model into ``writer``.

    The extraction loop of :func:`extract`, usable with in-memory batches (benchmarks do). Skipped
    images are taken from ``batches.skipped`` when the source records them.
    """
    skipped = getattr(batches, "skipped", [])
    n_total = writer.n_manifest_rows
    reported = 0
    bar = tqdm(total=n_total, initial=writer.rows_completed, desc="extract", unit="img", disable=not progress)
    observers = list(observers)

    def keep(name, out):  # inside the forward hook: what each observer keeps of the map
        return [o.reduce(name, out) if hasattr(o, "reduce") else out.clone() for o in observers]

    for rows, pooled, raw in iter_activations(model, batches, layers, pool, keep_raw=keep if observers else False):
        for i, observer in enumerate(observers):
            observer(rows, {n: r[i] for n, r in raw.items()})
        if writer.meta is None:
            writer.create({n: tuple(t.shape[1:]) for n, t in pooled.items()}, dtype)
        arrays = {n: t.to("cpu", getattr(torch, dtype)).numpy() for n, t in pooled.items()}
        writer.write(arrays, int(rows[-1]) + 1, skipped[reported:])
        reported = len(skipped)
        bar.update(int(rows[-1]) + 1 - bar.n)
    bar.close()
    if writer.meta is None:
        raise ConceptLensError("no readable image in the data; nothing to extract")
    writer.write({}, n_total, skipped[reported:])

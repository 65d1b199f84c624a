"""The one extraction path: capture named layers with forward hooks, pool, store; and gradients.

* :func:`capture` is the capture plan: one pass over a manifest that writes any number of
  activation stores (each with its own layers and pooling), keeps the logits and feeds streaming
  observers such as top-k. :func:`extract` (one store) and :func:`predict` (logits) are its
  one-output cases.
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

__all__ = ["capture", "StoreRequest", "Captured", "extract", "predict", "predict_tensor", "write_batches", "iter_activations", "iter_gradients", "GradientBatch", "pool_activations", "parse_pool"]

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


def _forward_batches(model, batches, layers, views, keep_raw=False, logits=False):
    """The capture loop: per batch ``(rows, {view: pooled}, {layer: raw}, logits or None)``.

    ``views`` maps a name to ``(layer, pool)``, so one layer can be pooled several ways in the same
    forward. Without ``logits`` the forward stops after the last hooked layer (after the first
    batch, which runs the whole model to check that each layer runs exactly once).
    """
    model, module, device = _model_and_device(model)
    layers = validate_layers(module, layers) if layers else []
    by_layer = {}
    for view, (layer, pool) in views.items():
        by_layer.setdefault(layer, []).append((view, parse_pool(pool)))

    def transform(name, out):
        out = out.detach()
        pooled = {}
        for view, pool in by_layer.get(name, ()):
            p = pool_activations(out, pool, name)
            pooled[view] = out.clone() if p is out else p  # downstream in-place ops (ReLU(inplace=True)) would change it
        if callable(keep_raw):
            return (pooled, keep_raw(name, out)), None
        return (pooled, out.clone() if keep_raw else None), None

    capture = _Capture(layers, transform, stop_early=False)
    first = True
    with _hooked(module, layers, capture), torch.inference_mode():
        for rows, x in batches:
            capture.reset()
            capture.stop_early = bool(layers) and not first and not logits
            out = None
            try:
                out = module(x.to(device, non_blocking=True))
            except _StopForward:
                pass
            if first:
                capture.check_single_calls()
                first = False
            pooled = {view: t for n in layers for view, t in capture.outputs[n][0].items()}
            raw = {n: capture.outputs[n][1] for n in layers} if keep_raw else {}
            if logits:
                out = (out[0] if isinstance(out, (tuple, list)) else out).float()
            yield rows, pooled, raw, out if logits else None


def iter_activations(model, batches, layers, pool="mean", keep_raw=False):
    """Yield ``(rows, pooled, raw)`` per batch of ``batches`` (iterable of ``(rows, images)``).

    ``pooled`` maps each layer to its pooled output (detached, on the model's device); ``raw`` maps
    each layer to its unpooled output when ``keep_raw`` is True (for streaming statistics such as
    top-k images), to ``keep_raw(layer, output)`` when it is a callable (evaluated inside the
    forward hook, so no copy of the map outlives it), else is empty. The forward pass stops after
    the last requested layer has run; the first batch runs the whole model to check that each
    layer runs exactly once.
    """
    model, module, _ = _model_and_device(model)
    layers = validate_layers(module, layers)
    pool = parse_pool(pool)
    for rows, pooled, raw, _ in _forward_batches(model, batches, layers, {n: (n, pool) for n in layers}, keep_raw):
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


@dataclass(frozen=True)
class StoreRequest:
    """One activation store a :func:`capture` pass writes: ``layers`` pooled by ``pool`` into ``path``.

    ``dtype`` ``auto``: float32 for mean/max pooling, float16 for spatial maps.
    """

    path: Path
    layers: tuple
    pool: str = "mean"
    dtype: str = "auto"


@dataclass(frozen=True)
class Captured:
    """What one :func:`capture` pass gave.

    Attributes
    ----------
    stores : tuple of ActivationStore
        One per :class:`StoreRequest`, in order.
    rows : ndarray of int or None
        Manifest rows of ``logits`` (readable images), when logits were asked for.
    logits : ndarray of float32 ``[N, K]`` or None
    forwarded : int
        Images this call ran through the model (0 when every store was reused and no logits asked).
    """

    stores: tuple
    rows: np.ndarray | None
    logits: np.ndarray | None
    forwarded: int


@dataclass
class _Target:
    writer: StoreWriter
    layers: list
    pool: str
    dtype: str


def _store_request(model, manifest, manifest_hash, prep, req):
    """``(layers, pool, dtype, request)`` of a :class:`StoreRequest`: what a store's hash covers."""
    layers = validate_layers(model.module, req.layers)
    pool = parse_pool(req.pool)
    dtype = _resolve_dtype(req.dtype, pool)
    request = {"model": model.spec, "weights_hash": model.weights_hash, "manifest": str(manifest.path),
               "manifest_hash": manifest_hash, "layers": layers, "pool": pool, "dtype": dtype,
               "preprocessing": prep.to_dict(), "version": __version__}
    return layers, pool, dtype, request


def capture(model, data, stores=(), logits=False, observers=(), batch_size=64, num_workers=0, skip_bad=False,
            preprocessing=None, progress=True):
    """One pass over a manifest for everything asked of it: stores, logits and streaming observers.

    The capture plan of every analyzer and of the report: each :class:`StoreRequest` is an
    activation store (its own layers, pooling and dtype; a layer may be in several), ``logits``
    keeps the model's outputs, ``observers`` (e.g. :class:`~conceptlens.core.topk.TopK`) see the
    unpooled maps of every captured layer, as in :func:`extract`. Complete stores of the same
    request are reused; unfinished ones resume where they stopped when they all stopped at the
    same row (as stores written by one pass do), else all are rewritten from the first row, as
    they are when logits are asked for. The forward stops after the last captured layer unless
    logits are asked for.

    Parameters
    ----------
    model : LoadedModel or str
    data : Manifest or path
    stores : sequence of StoreRequest
    logits : bool
    observers, batch_size, num_workers, skip_bad, preprocessing, progress
        As for :func:`extract`.

    Returns
    -------
    Captured
    """
    model = load_model(model) if isinstance(model, str) else model
    manifest = data if isinstance(data, Manifest) else Manifest.read(data)
    prep = model.preprocessing_for(manifest, preprocessing)
    manifest_hash = manifest.content_hash() if stores else None  # reads every image: only stores need it
    targets, states = [], []
    for req in stores:
        layers, pool, dtype, request = _store_request(model, manifest, manifest_hash, prep, req)
        writer = StoreWriter(Path(req.path), request, len(manifest))
        states.append(writer.existing())
        if states[-1] == "complete":
            logger.info("activation store %s is complete for this request: reusing it", req.path)
        targets.append(_Target(writer, layers, pool, dtype))
    pending = [t for t, state in zip(targets, states) if state != "complete"]
    resumed = {t.writer.rows_completed for t in pending}
    start = resumed.pop() if len(resumed) == 1 and not logits else 0
    for t in pending:
        if t.writer.rows_completed > start:  # the pass must start earlier for its other outputs: keep them in step
            logger.info("store %s: rewriting it from the first row with the other outputs of this pass", t.writer.path)
            t.writer.restart()
    rows = out = None
    forwarded = 0
    if pending or logits:
        batches = make_loader(manifest, prep, batch_size=batch_size, num_workers=num_workers, skip_bad=skip_bad,
                              rows=range(start, len(manifest)))
        rows, out, forwarded = _write_pass(model, batches, pending, observers, logits, start, len(manifest), progress)
        if batches.skipped:
            logger.warning("skipped %d unreadable images of %s%s", len(batches.skipped), manifest.path,
                           "".join(f" (listed in {t.writer.path}/meta.json)" for t in pending[:1]))
        if logits and not len(rows):
            raise ConceptLensError(f"no readable image in {manifest.path}; nothing to predict")
    done = [t.writer.finish(manifest.frame) if state != "complete" else ActivationStore.open(t.writer.path)
            for t, state in zip(targets, states)]
    return Captured(tuple(done), rows, out, forwarded)


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
    engine="local",
    shards=None,
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
    engine : {"local", "ray"}
        ``ray``: the forward passes run in Ray actors, shard by shard (:mod:`~conceptlens.core.engine`;
        ``RAY_ADDRESS`` or a new local instance); the store is the one a local run writes, bit for
        bit. ``observers`` must then be mergeable (``empty()`` and ``merge()``, as
        :class:`~conceptlens.core.topk.TopK`): each shard fills a copy in its actor and the driver
        merges them. ``num_workers`` is local only.
    shards : int, optional
        Ray: how many row ranges (default four per actor).

    Returns
    -------
    ActivationStore
    """
    from .engine import check_engine, ray_extract

    if check_engine(engine) == "ray":
        unmergeable = [type(o).__name__ for o in observers if not (hasattr(o, "empty") and hasattr(o, "merge"))]
        if unmergeable:
            raise ConceptLensError(f"observers {', '.join(unmergeable)} cannot be merged across shards (they need "
                                   "empty() and merge()); use engine='local' for them")
        model = load_model(model) if isinstance(model, str) else model
        manifest = data if isinstance(data, Manifest) else Manifest.read(data)
        prep = model.preprocessing_for(manifest, preprocessing)
        validate_layers(model.module, layers)  # before any actor starts
        req = StoreRequest(out, layers, pool, dtype)
        return ray_extract(model, manifest, lambda: _store_request(model, manifest, manifest.content_hash(), prep, req),
                           out, batch_size=batch_size, skip_bad=skip_bad, prep=prep, observers=observers, shards=shards,
                           progress=progress)
    (store,) = capture(model, data, [StoreRequest(out, layers, pool, dtype)], observers=observers, batch_size=batch_size,
                       num_workers=num_workers, skip_bad=skip_bad, preprocessing=preprocessing, progress=progress).stores
    return store


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
    got = capture(model, data, logits=True, batch_size=batch_size, num_workers=num_workers, skip_bad=skip_bad,
                  preprocessing=preprocessing, progress=progress)
    return got.rows, got.logits


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
    _write_pass(model, batches, [_Target(writer, list(layers), pool, dtype)], observers, False, writer.rows_completed,
                writer.n_manifest_rows, progress)


def _write_pass(model, batches, targets, observers, logits, start, n_total, progress):
    """The loop of :func:`capture`: returns ``(rows, logits, images forwarded)`` (``None`` logits
    unless asked); every target's writer is left ready for ``finish``."""
    skipped = getattr(batches, "skipped", [])
    reported = 0
    bar = tqdm(total=n_total, initial=start, desc="extract" if targets else "predict", unit="img", disable=not progress)
    observers = list(observers)

    def keep(name, out):  # inside the forward hook: what each observer keeps of the map
        return [o.reduce(name, out) if hasattr(o, "reduce") else out.clone() for o in observers]

    views = {(i, n): (n, t.pool) for i, t in enumerate(targets) for n in t.layers}
    layers = list(dict.fromkeys(n for t in targets for n in t.layers))
    all_rows, all_logits, forwarded = [], [], 0
    for rows, pooled, raw, out in _forward_batches(model, batches, layers, views, keep if observers else False, logits):
        forwarded += len(rows)
        for i, observer in enumerate(observers):
            observer(rows, {n: r[i] for n, r in raw.items()})
        for i, t in enumerate(targets):
            arrays = {n: pooled[(i, n)] for n in t.layers}
            if t.writer.meta is None:
                t.writer.create({n: tuple(a.shape[1:]) for n, a in arrays.items()}, t.dtype)
            t.writer.write({n: a.to("cpu", getattr(torch, t.dtype)).numpy() for n, a in arrays.items()},
                           int(rows[-1]) + 1, skipped[reported:])
        reported = len(skipped)
        if logits:
            all_rows.append(np.asarray(rows))
            all_logits.append(out.cpu().numpy())
        bar.update(int(rows[-1]) + 1 - bar.n)
    bar.close()
    for t in targets:
        if t.writer.meta is None:
            raise ConceptLensError("no readable image in the data; nothing to extract")
        t.writer.write({}, n_total, skipped[reported:])
    if not logits:
        return None, None, forwarded
    if not all_rows:
        return np.zeros(0, dtype=np.int64), None, forwarded
    return np.concatenate(all_rows), np.concatenate(all_logits), forwarded

"""Faithfulness and localisation of attribution maps.

:func:`region_perturbation` is the region-perturbation protocol of Samek et al. (2017): split each
image into ``patch x patch`` regions, rank them by summed relevance, and replace them one by one,
most relevant first (MoRF) or least relevant first (LeRF), with a baseline; record the target score
after each step. ``AOPC = mean over images and steps k = 0..L of (f(x_0) - f(x_k))``; a faithful
map has a high MoRF AOPC and a low LeRF AOPC. It is batched: each perturbation step is one forward
pass over all images, methods and orders together (chunked only beyond ``batch_size``).

:func:`localization` scores maps against ground-truth masks: relevance mass (share of positive
relevance inside the mask, Arras et al. 2022), relevance rank accuracy and the pointing game
(Zhang et al. 2018), beside the mask's area fraction (the score of a uniform map).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ..errors import ConceptLensError
from ..core.result import Result, provenance
from ._results import as_numpy
from .methods import _analysis_mode, _targets, _unwrap

__all__ = ["PerturbationResult", "LocalizationResult", "region_perturbation", "localization", "BASELINES"]

logger = logging.getLogger(__name__)

BASELINES = ("mean", "blur", "uniform")
_ORDERS = ("morf", "lerf")
_SCORES = ("logit", "probability")


@dataclass(frozen=True)
class PerturbationResult(Result):
    """Region-perturbation curves and AOPC per method and order.

    Attributes
    ----------
    methods : tuple of str
        Method names (keys of the attributions given).
    orders : tuple of str
        ``morf`` and/or ``lerf``.
    fractions : ndarray [L + 1]
        Fraction of the image's patches perturbed after each step (0 first).
    curves : ndarray [M, O, N, L + 1]
        Target score of each image after each step.
    params : dict
        ``patch``, ``steps``, ``baseline``, ``score``, ``seed``.
    provenance : dict
        Model spec and weights hash, data hash when known, library version.
    """

    methods: tuple
    orders: tuple
    fractions: np.ndarray = field(repr=False)
    curves: np.ndarray = field(repr=False)
    params: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)

    KIND = "region_perturbation"

    def aopc(self):
        """Table ``method, order, aopc, aopc_sem`` (standard error over images)."""
        drop = self.curves[..., :1] - self.curves  # [M, O, N, L+1]
        per_image = drop.mean(-1)
        n = per_image.shape[-1]
        rows = [{"method": m, "order": o, "aopc": float(per_image[i, j].mean()),
                 "aopc_sem": float(per_image[i, j].std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")}
                for i, m in enumerate(self.methods) for j, o in enumerate(self.orders)]
        return pd.DataFrame(rows)

    def to_frame(self):
        """Mean curves, long format: ``method, order, step, fraction, score, drop``."""
        mean = self.curves.mean(2)
        rows = [{"method": m, "order": o, "step": k, "fraction": float(self.fractions[k]),
                 "score": float(mean[i, j, k]), "drop": float(mean[i, j, 0] - mean[i, j, k])}
                for i, m in enumerate(self.methods) for j, o in enumerate(self.orders)
                for k in range(len(self.fractions))]
        return pd.DataFrame(rows)

    def _write(self, d):
        """``curves.npy`` ``[M, O, N, L+1]``, ``fractions.npy``, ``aopc.csv``, ``curves.csv``; then ``meta.json``."""
        np.save(d / "curves.npy", self.curves)
        np.save(d / "fractions.npy", self.fractions)
        self.aopc().to_csv(d / "aopc.csv", index=False)
        self.to_frame().to_csv(d / "curves.csv", index=False)
        return {"methods": list(self.methods), "orders": list(self.orders), "params": self.params}

    @classmethod
    def _read(cls, d, meta):
        return cls(tuple(meta["methods"]), tuple(meta["orders"]), np.load(d / "fractions.npy"),
                   np.load(d / "curves.npy"), meta["params"], meta["provenance"])


def _as_dict(attributions):
    """``{name: maps}`` from maps or a dict of them (a bare array is called ``attribution``)."""
    if not isinstance(attributions, dict):
        attributions = {"attribution": attributions}
    if not attributions:
        raise ConceptLensError("attributions is empty; pass maps [N, H, W] or {method: maps}")
    return attributions


def _baseline_images(x, baseline, patch, seed):
    if baseline == "mean":
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    if baseline == "blur":
        from torchvision.transforms.v2.functional import gaussian_blur

        sigma = max(1.0, patch / 2)
        k = int(2 * round(2 * sigma) + 1)
        return gaussian_blur(x, kernel_size=[k, k], sigma=[sigma, sigma])
    gen = torch.Generator().manual_seed(int(seed))
    lo = x.amin(dim=(0, 2, 3), keepdim=True)
    hi = x.amax(dim=(0, 2, 3), keepdim=True)
    noise = torch.rand(x.shape, generator=gen).to(x.device, x.dtype)
    return lo + (hi - lo) * noise


def _patch_ranks(maps, patch, order):
    """Rank of each patch (0 = perturbed first) per image, ``[N, gh, gw]``; ties by patch index."""
    n, h, w = maps.shape
    ph, pw = -h % patch, -w % patch
    padded = F.pad(maps[:, None], (0, pw, 0, ph))
    rel = F.avg_pool2d(padded, patch, stride=patch)[:, 0] * patch * patch  # summed relevance per patch
    flat = rel.flatten(1)
    key = -flat if order == "morf" else flat
    idx = torch.argsort(key, dim=1, stable=True)
    ranks = torch.empty_like(idx)
    ranks.scatter_(1, idx, torch.arange(flat.shape[1], device=flat.device).expand_as(idx))
    return ranks.view(rel.shape)


def region_perturbation(model, x, target, attributions, patch=8, steps=None, baseline="blur",
                        orders=_ORDERS, score="logit", seed=0, batch_size=32, progress=False):
    """MoRF/LeRF region-perturbation curves and AOPC (Samek et al. 2017), batched over images.

    Parameters
    ----------
    model : LoadedModel or nn.Module
        The classifier (comes back unchanged).
    x : Tensor ``[N, C, H, W]``
        Preprocessed images.
    target : int, str, sequence or None
        Class per image (as in :func:`~conceptlens.attribution.attribute`; None = predicted).
    attributions : Tensor/ndarray ``[N, H, W]`` or dict of them
        One map per image, or ``{method name: maps}``.
    patch : int
        Side of the square regions (the last row/column of patches may be smaller).
    steps : int or None
        Regions perturbed (``L``); None = all regions.
    baseline : str
        What replaces a region: ``mean`` (the image's channel means), ``blur`` (a Gaussian blur
        of the image, sigma = patch / 2) or ``uniform`` (seeded uniform noise in the inputs' range).
    orders : sequence of str
        ``morf`` and/or ``lerf``.
    score : str
        ``logit`` or ``probability`` of the target class.
    seed : int
        Seed of the ``uniform`` baseline.
    batch_size : int
        Most images per forward (32: the CPU sweet spot of the demo CNN at 64 px, whose activations
        spill the caches at 64 and more; raise it on a GPU); each step is one forward when
        methods x orders x N fit, else ceil(methods x orders x N / batch_size).
    progress : bool
        Progress bar over forward batches.

    Returns
    -------
    PerturbationResult
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()

    attributions = _as_dict(attributions)
    orders = tuple(orders)
    bad = [o for o in orders if o not in _ORDERS] or ([] if orders else ["(none)"])
    if bad:
        raise ConceptLensError(f"orders must be morf and/or lerf; got {bad[0]!r}")
    if baseline not in BASELINES:
        raise ConceptLensError(f"the baseline parameter must be one of {', '.join(BASELINES)}; got {baseline!r}")
    if score not in _SCORES:
        raise ConceptLensError(f"the score parameter must be logit or probability; got {score!r}")
    if not isinstance(patch, int) or patch < 1:
        raise ConceptLensError(f"the patch parameter must be a positive integer; got {patch!r}")
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ConceptLensError(f"x must be a tensor of images [N, C, H, W]; got {getattr(x, 'shape', type(x).__name__)}")
    module = _unwrap(model)
    n, _, h, w = x.shape
    names = list(attributions)
    maps = []
    for name in names:
        a = torch.as_tensor(as_numpy(attributions[name]))
        if tuple(a.shape) != (n, h, w):
            raise ConceptLensError(f"attributions[{name!r}] has shape {tuple(a.shape)}; expected [N, H, W] = {(n, h, w)}")
        maps.append(a)
    n_regions = int(np.ceil(h / patch) * np.ceil(w / patch))
    steps = n_regions if steps is None else int(steps)
    if not 1 <= steps <= n_regions:
        raise ConceptLensError(f"steps must lie in 1..{n_regions} (regions of {patch} px); got {steps}")
    device = next(iter(module.parameters()), torch.empty(0)).device
    # Conv nets get channels-last (NHWC) images: oneDNN's NHWC kernels take about a third of the CPU
    # time per image of NCHW at batch 8-32 on the demo CNN (a third less at batch 1, where torch
    # keeps its own conv). Only for conv nets: a model that .view()s its input needs it NCHW.
    fmt = torch.channels_last if any(isinstance(m, torch.nn.Conv2d) for m in module.modules()) else torch.contiguous_format
    x = x.detach().to(device).contiguous(memory_format=fmt)
    # One row per (method, order, image): its ranks, its image index.
    ranks = torch.stack([_patch_ranks(m, patch, o) for m in maps for o in orders]).to(device)  # [M*O, N, gh, gw]
    ranks = ranks.flatten(0, 1).int()
    img = torch.arange(n, device=device).repeat(len(maps) * len(orders))
    curves = torch.empty(len(img), steps + 1)
    with _analysis_mode(module), torch.inference_mode():
        t = _targets(target, x, module, model)
        base = _baseline_images(x, baseline, patch, seed)

        def scores(xb, tb):
            out = module(xb.contiguous(memory_format=fmt))
            return (out.softmax(1) if score == "probability" else out).gather(1, tb[:, None])[:, 0].float().cpu()

        # Step 0 is the unperturbed image, shared by all methods and orders: one forward per image.
        first = torch.cat([scores(x[s:s + batch_size], t[s:s + batch_size]) for s in range(0, n, batch_size)])
        curves[:, 0] = first[img.cpu()]
        chunks = range(0, len(img), batch_size)
        bar = tqdm(total=steps * len(chunks), desc="region perturbation", unit="batch", disable=not progress)
        # Chunks outer, steps inner: a chunk's images, baselines and pixel ranks are gathered once
        # and reused by all its steps, and memory stays bounded by batch_size.
        for s in chunks:
            rows = img[s:s + batch_size]
            xr, br, tr = x[rows], base[rows], t[rows]
            # Rank of each pixel's region, upsampled and cropped; at step k, perturbed = rank < k.
            pix = ranks[s:s + batch_size].repeat_interleave(patch, 1).repeat_interleave(patch, 2)[:, None, :h, :w]
            for k in range(1, steps + 1):
                curves[s:s + batch_size, k] = scores(torch.where(pix < k, br, xr), tr)
                bar.update()
        bar.close()
    curves = curves.view(len(maps), len(orders), n, steps + 1).numpy()
    fractions = np.arange(steps + 1) / n_regions
    params = {"patch": patch, "steps": steps, "baseline": baseline, "score": score, "seed": seed}
    return PerturbationResult(tuple(names), orders, fractions, curves, params,
                              provenance(model, parameters={**params, "methods": list(names), "orders": list(orders)},
                                         timings={"total": time.perf_counter() - t0}))


@dataclass(frozen=True)
class LocalizationResult(Result):
    """Per-image localisation scores of attribution maps against ground-truth masks.

    Attributes
    ----------
    frame : DataFrame
        ``method, index, relevance_mass, rank_accuracy, pointing_hit, mask_fraction``.
    params : dict
        ``tolerance`` (pointing-game dilation in pixels).
    provenance : dict
    """

    frame: pd.DataFrame = field(repr=False)
    params: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)

    KIND = "localization"

    def to_frame(self):
        return self.frame.copy()

    def summary(self):
        """Mean per method of each score."""
        return self.frame.drop(columns="index").groupby("method", sort=False).mean().reset_index()

    def _write(self, d):  # scores.csv; then meta.json
        self.frame.to_csv(d / "scores.csv", index=False)
        return {"params": self.params}

    @classmethod
    def _read(cls, d, meta):
        return cls(pd.read_csv(d / "scores.csv"), meta["params"], meta["provenance"])


def localization(attributions, masks, tolerance=0, provenance_info=None):
    """Relevance mass, relevance rank accuracy and pointing game of maps against boolean masks.

    Parameters
    ----------
    attributions : Tensor/ndarray ``[N, H, W]`` or dict of them
    masks : ndarray/Tensor of bool ``[N, H, W]`` or ``[H, W]`` (same mask for all images)
        Ground truth; images with an empty mask are an error (their scores are undefined).
    tolerance : int
        Pointing game: a hit when the maximum lies within this many pixels of the mask.
    provenance_info : dict, optional
        Stored with the result.

    Returns
    -------
    LocalizationResult
    """
    attributions = _as_dict(attributions)
    first = as_numpy(next(iter(attributions.values())))
    m = np.asarray(masks.cpu() if isinstance(masks, torch.Tensor) else masks).astype(bool)
    if m.ndim == 2:
        m = np.broadcast_to(m, first.shape)
    if m.shape != first.shape:
        raise ConceptLensError(f"masks have shape {m.shape}; expected the maps' shape {first.shape} (or [H, W])")
    area = m.reshape(len(m), -1).sum(1)
    if (area == 0).any():
        raise ConceptLensError(f"masks of images {np.flatnonzero(area == 0)[:5].tolist()} are empty; keep only images with a mask")
    mt = torch.as_tensor(np.ascontiguousarray(m)).float()
    dil = F.max_pool2d(mt[:, None], 2 * tolerance + 1, stride=1, padding=tolerance)[:, 0] if tolerance else mt
    frames = []
    for name, a in attributions.items():
        a = torch.as_tensor(as_numpy(a))
        if tuple(a.shape) != m.shape:
            raise ConceptLensError(f"attributions[{name!r}] has shape {tuple(a.shape)}; expected {m.shape}")
        flat, mf = a.flatten(1), mt.flatten(1)
        pos = flat.clamp_min(0)
        mass = (pos * mf).sum(1) / pos.sum(1).clamp_min(1e-12)
        # Rank accuracy: share of the top-|mask| pixels that lie inside the mask.
        order = torch.argsort(flat, dim=1, descending=True, stable=True)
        ranks = torch.empty_like(order).scatter_(1, order, torch.arange(flat.shape[1]).expand_as(order))
        k = torch.as_tensor(area)[:, None]
        rank_acc = ((ranks < k).float() * mf).sum(1) / k[:, 0]
        hit = dil.flatten(1).gather(1, flat.argmax(1, keepdim=True))[:, 0]
        frames.append(pd.DataFrame({
            "method": name, "index": np.arange(len(a)), "relevance_mass": mass.numpy(),
            "rank_accuracy": rank_acc.numpy(), "pointing_hit": hit.numpy().astype(bool),
            "mask_fraction": area / m[0].size,
        }))
    return LocalizationResult(pd.concat(frames, ignore_index=True), {"tolerance": tolerance},
                              provenance(parameters={"tolerance": tolerance}, **(provenance_info or {})))

"""SmoothTaylor (Goh et al., ICPR 2021): first-order Taylor terms averaged over noisy roots, batched.

``A(x) = (1/N) sum_i (x - z_i) * grad f(z_i)`` with roots ``z_i = c + sigma * eps_i``,
``eps_i ~ N(0, I)``, ``f`` the target logit. The paper centres the roots at the input (``c = x``,
``baseline="input"``) and gives ``sigma`` as a fraction of the image's value range (its
``percent`` option); a baseline centre (``"zero"``, ``"mean"``, a number or a tensor) turns it into
a smoothed Taylor expansion around that point (``sigma = 0``, one root: ``grad f(b) * (x - b)``).

All (image, root) pairs of a batch go through the model together, ``backward_batch`` pairs per
forward/backward. Root ``i`` of the image at global index ``j`` draws its noise from a
``torch.Generator`` seeded by ``(seed, j, i)``, so a map depends on the image, its index in ``x``,
the target, ``seed``, ``n_roots``, the noise scale and the centre — not on ``batch_size``,
``backward_batch``, the global RNG or the other images (up to float rounding of batched convolutions).

``noise_scale="adaptive"`` picks, per image, the scale of ``noise_grid`` whose map has the least
total variation after the paper's heatmap normalisation (``|sum over channels|``, min to 99th
percentile scaled to [0, 1], clipped): scale-free, so a vanishing map at ``sigma -> 0`` does not win.
All candidates reuse the same noise draws and run in the same batched passes (cost: candidates
times a fixed-scale call). :func:`smooth_taylor` returns the chosen scales beside the attributions.
"""

from __future__ import annotations

import logging
import math
from numbers import Real

import numpy as np
import torch
from torch import nn

from ..errors import ConceptLensError

__all__ = ["smooth_taylor"]

logger = logging.getLogger(__name__)

_CENTRES = ("input", "zero", "mean")


def _is_int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_scale(v):
    return isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def _adaptive(v):
    return isinstance(v, str) and v == "adaptive"


def _validate(p):
    """Raise for a bad SmoothTaylor parameter; every constraint is stated once, here."""
    def bad(name, expected):
        return ConceptLensError(f"the {name} parameter of smooth-taylor must be {expected}; got {p[name]!r}")

    if not _is_int(p["n_roots"]) or p["n_roots"] < 1:
        raise bad("n_roots", "a positive integer")
    if not _adaptive(p["noise_scale"]) and not _is_scale(p["noise_scale"]):
        raise bad("noise_scale", "a number >= 0 (a fraction of each image's value range) or 'adaptive'")
    b = p["baseline"]
    if not (isinstance(b, torch.Tensor) or (isinstance(b, str) and b in _CENTRES)
            or (isinstance(b, Real) and not isinstance(b, bool))):
        raise bad("baseline", "'input', 'zero', 'mean', a number or a tensor (the centre of the roots)")
    if not _is_int(p["seed"]) or p["seed"] < 0:
        raise bad("seed", "a non-negative integer")
    if not _is_int(p["backward_batch"]) or p["backward_batch"] < 1:
        raise bad("backward_batch", "a positive integer (image-root pairs per backward pass)")
    grid = p["noise_grid"]
    if isinstance(grid, (str, bytes)) or not np.iterable(grid) or not len(grid) \
            or not all(_is_scale(s) and s > 0 for s in grid):
        raise bad("noise_grid", "a non-empty sequence of numbers > 0 (candidate noise scales)")


def _root_noise(seed, index, roots, shape):
    """``eps`` of the given roots of the image at global ``index``: one generator per (seed, image, root)."""
    out = torch.empty(len(roots), *shape)
    for r, root in enumerate(roots):
        state = np.random.SeedSequence([seed, index, root]).generate_state(1, np.uint64)[0]
        out[r] = torch.randn(shape, generator=torch.Generator().manual_seed(int(state)))
    return out


def _taylor_terms(module, x, target, centre, sigma, n_roots, seed, start, backward_batch):
    """``(1/N) sum_i (x - z_i) * grad f(z_i)`` for each image and candidate scale: ``[B, K, C, H, W]``.

    ``sigma`` ``[B, K]`` holds absolute noise standard deviations. Rows (image, root, candidate) run
    ``backward_batch`` at a time; candidates vary fastest so a chunk draws each root's noise once.
    """
    b, k = sigma.shape
    shape = tuple(x.shape[1:])
    total = torch.zeros(b, k, *shape, device=x.device, dtype=x.dtype)
    # Channels-last roots for conv nets: about a third less CPU time per forward/backward on the demo
    # CNN (as in region_perturbation); a model that .view()s its input keeps NCHW.
    fmt = torch.channels_last if any(isinstance(m, nn.Conv2d) for m in module.modules()) else torch.contiguous_format
    n_rows = b * n_roots * k
    for r0 in range(0, n_rows, backward_batch):
        rows = torch.arange(r0, min(n_rows, r0 + backward_batch))
        img, cand = rows // (n_roots * k), rows % k
        pairs, inverse = torch.unique_consecutive(rows // k, return_inverse=True)
        eps = torch.cat([_root_noise(seed, start + int(j), (pairs[pairs // n_roots == j] % n_roots).tolist(), shape)
                         for j in torch.unique_consecutive(pairs // n_roots).tolist()])
        eps = eps.to(x.device, x.dtype)[inverse.to(x.device)]
        img, cand = img.to(x.device), cand.to(x.device)
        z = (centre[img] + sigma[img, cand].view(-1, 1, 1, 1) * eps).contiguous(memory_format=fmt).requires_grad_(True)
        out = module(z)
        (grad,) = torch.autograd.grad(out.gather(1, target[img][:, None]).sum(), z)
        # On CPU the accumulation runs in row order, so each (image, candidate) adds its roots in
        # the same order whatever the chunking.
        total.index_put_((img, cand), (x[img] - z.detach()) * grad, accumulate=True)
    return total / n_roots


def _total_variation(maps):
    """Mean absolute neighbour difference of each ``[..., H, W]`` heatmap normalised as the paper does.

    ``h = |map|`` scaled so its minimum is 0 and its 99th percentile 1, clipped to [0, 1]; then
    ``(sum |dx| + sum |dy|) / (H W)``. A constant map (e.g. zero gradient at every root) has no
    normalised TV and gets ``inf``, so it never wins the search.
    """
    h = maps.abs()
    flat = h.flatten(-2)
    srt = flat.sort(-1).values
    # Linear interpolation between order statistics, as numpy.percentile (torch.quantile caps its input size).
    pos = 0.99 * (flat.shape[-1] - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, flat.shape[-1] - 1)
    vmax = srt[..., lo] + (pos - lo) * (srt[..., hi] - srt[..., lo])
    vmin = srt[..., 0]
    span = (vmax - vmin)[..., None, None]
    norm = ((h - vmin[..., None, None]) / span.clamp_min(torch.finfo(h.dtype).tiny)).clamp(0, 1)
    tv = ((norm[..., :, 1:] - norm[..., :, :-1]).abs().sum((-2, -1))
          + (norm[..., 1:, :] - norm[..., :-1, :]).abs().sum((-2, -1))) / (h.shape[-2] * h.shape[-1])
    return torch.where(span[..., 0, 0] > 0, tv, torch.full_like(tv, math.inf))


def _smooth_taylor_batch(module, x, target, p):
    """SmoothTaylor of one batch on a prepared module: ``(raw [B, C, H, W], scale [B])``.

    ``p`` holds the resolved method parameters and ``_start``, the batch's first global image index.
    """
    from .methods import _baseline

    _validate(p)
    x = x.detach()
    centre = x if isinstance(p["baseline"], str) and p["baseline"] == "input" else _baseline(x, p["baseline"])
    # The paper's "percent" noise: a fraction of each image's own value range (1 for a constant image).
    span = (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3))).double()
    span = torch.where(span > 0, span, torch.ones_like(span))
    adaptive = _adaptive(p["noise_scale"])
    grid = torch.tensor([float(s) for s in p["noise_grid"]] if adaptive else [float(p["noise_scale"])],
                        dtype=torch.float64, device=x.device)
    sigma = (span[:, None] * grid[None]).to(x.dtype)
    maps = _taylor_terms(module, x, target, centre, sigma, p["n_roots"], int(p["seed"]), p["_start"],
                         p["backward_batch"])
    if not adaptive:
        return maps[:, 0], grid.expand(len(x)).cpu()
    best = _total_variation(maps.sum(2)).argmin(1)
    chosen = grid[best]
    logger.info("noise_scale adaptive -> %s (least normalised total variation over %d candidates)",
                ", ".join(f"{s:g}" for s in chosen.tolist()[:8]), len(grid))
    return maps[torch.arange(len(x), device=x.device), best], chosen.cpu()


def smooth_taylor(model, x, target=None, progress=False, **params):
    """SmoothTaylor attributions and the noise scale each image used (the adaptive choice, when asked).

    Gives the same attributions as ``attribute(model, x, target, "smooth-taylor", raw=True, **params)[1]``;
    use it to see which scale ``noise_scale="adaptive"`` chose.

    Parameters
    ----------
    model : LoadedModel or nn.Module
        The classifier; it comes back unchanged.
    x : Tensor
        Preprocessed images ``[B, C, H, W]``.
    target : int, str, sequence of int, Tensor or None
        As in :func:`~conceptlens.attribution.attribute` (None: each image's predicted class).
    progress : bool
        Progress bar over batches.
    **params
        ``n_roots``, ``noise_scale`` (fraction of each image's value range, or ``"adaptive"``),
        ``baseline`` (root centre: ``"input"``, ``"zero"``, ``"mean"``, a number or a tensor),
        ``seed``, ``backward_batch``, ``noise_grid`` and the common ``batch_size``; defaults as
        listed by :func:`~conceptlens.attribution.list_methods`.

    Returns
    -------
    attribution : Tensor ``[B, C, H, W]`` (float32, CPU)
    noise_scale : Tensor ``[B]`` (float64)
        The scale (fraction of the image's range) of each image's map: ``noise_scale`` itself, or
        the grid value the adaptive search chose.
    """
    from tqdm.auto import tqdm

    from .methods import _analysis_mode, _targets, _unwrap, method_info

    p = method_info("smooth-taylor").resolve_params(params)
    module = _unwrap(model)
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point() or not len(x):
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ConceptLensError(f"x must be a non-empty float tensor of images [B, C, H, W]; got {shape}")
    _validate(p)
    device = next(iter(module.parameters()), torch.empty(0)).device
    raws, scales = [], []
    with _analysis_mode(module):
        x = x.detach().to(device)
        t = _targets(target, x, module, model)
        for i in tqdm(range(0, len(x), p["batch_size"]), desc="smooth-taylor", unit="batch", disable=not progress):
            p["_start"] = i
            r, s = _smooth_taylor_batch(module, x[i:i + p["batch_size"]], t[i:i + p["batch_size"]], p)
            raws.append(r.detach().float().cpu())
            scales.append(s)
    return torch.cat(raws), torch.cat(scales)

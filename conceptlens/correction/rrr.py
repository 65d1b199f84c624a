"""Right for the Right Reasons (Ross, Hughes & Doshi-Velez 2017): an input-gradient penalty inside
annotation masks.

The right-reasons term is ``λ · Σ_{n, d} (A_nd · ∂/∂x_nd Σ_k log p_k(y | x_n))²``, where ``A`` is 1
on the pixels the model must *not* use (a decoy patch, a watermark). It is added to the cross
entropy and trained by double backpropagation (``create_graph=True``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data import Manifest
from ..errors import ConceptLensError

__all__ = ["rrr_penalty", "train_rrr", "DEFAULT_RRR_WEIGHT"]

logger = logging.getLogger(__name__)

DEFAULT_RRR_WEIGHT = 10.0
"""λ for inputs normalised to zero mean, unit variance per channel (the demo CNN's preprocessing).

Ross et al.'s λ = 1000 is for their MNIST inputs in [0, 1] with the penalty *summed* over the batch.
Here the penalty is the mean over the batch of each image's sum, and inputs are divided by the
train std, so the paper's number does not transfer. Measured on decoy digits (16 px, 4 epochs,
seed 0; clean baseline 0.991): λ = 3 gives 0.978 test accuracy, λ = 10 0.976, λ = 100 0.956
(a larger λ starts to cost accuracy); 10 was chosen as the middle of the range that works.
λ does not carry over across image sizes: at 32 px (patch 8 px, plain 0.458, clean 0.989) λ = 10
recovers only 0.749 and λ = 100 gives 0.960, so pass ``weight`` for other sizes and data."""


def rrr_penalty(model, x, mask, weight=DEFAULT_RRR_WEIGHT, logits=None):
    """Ross et al.'s right-reasons term for one batch, differentiable in the model's parameters.

    Parameters
    ----------
    model : torch.nn.Module
        A classifier returning logits ``[B, K]``.
    x : torch.Tensor
        The (preprocessed) batch ``[B, C, H, W]``; it must require grad (e.g. ``x.requires_grad_()``).
    mask : torch.Tensor
        ``[B, 1, H, W]`` or ``[B, C, H, W]``, 1 (or any positive weight) where the model must not look.
    weight : float
        λ (see :data:`DEFAULT_RRR_WEIGHT`).
    logits : torch.Tensor, optional
        ``model(x)`` when the caller already ran that forward (with its graph); saves a second one.

    Returns
    -------
    torch.Tensor
        ``λ · mean_n Σ_d (mask · ∂ Σ_k log softmax_k(f(x_n)) / ∂x_nd)²``, a scalar with a graph
        (``create_graph=True``), so its ``backward`` is the double backward of the paper.
    """
    if not x.requires_grad:
        raise ConceptLensError("rrr_penalty needs an input batch that requires grad; call x.requires_grad_() first")
    log_p = torch.log_softmax(model(x) if logits is None else logits, dim=1)
    (grad,) = torch.autograd.grad(log_p.sum(), x, create_graph=True)
    return weight * ((mask * grad) ** 2).sum(dim=tuple(range(1, x.ndim))).mean()


def _penalty(weight):
    """The RRR term as a ``penalty(model, x, y, mask) -> (logits, term)`` of the demo training loop
    (one forward; the term on its logits)."""
    def penalty(model, x, y, mask):
        logits = model(x)
        return logits, rrr_penalty(model, x, mask, weight, logits=logits)

    return penalty


def _check_masks(manifest, column, rows):
    """Raise naming the column and the manifest rows (of ``rows``) whose mask cell is empty or missing."""
    frame = manifest.frame
    if column not in frame.columns:
        raise ConceptLensError(f"manifest {manifest.path} has no {column!r} column for the RRR masks "
                               f"(columns: {', '.join(frame.columns)}); pass masks_column= naming a column of mask PNG paths")
    cells = frame[column].astype(str)
    bad = [int(r) for r in rows if cells.iloc[r] in ("", "nan") or not (manifest.root / cells.iloc[r]).is_file()]
    if bad:
        show = ", ".join(str(r) for r in bad[:5]) + (" ..." if len(bad) > 5 else "")
        raise ConceptLensError(f"{len(bad)} train rows of {manifest.path} have no mask file in column {column!r} "
                               f"(manifest rows {show}; first cell: {cells.iloc[bad[0]]!r}); give every train row "
                               "a mask PNG path relative to the CSV (an all-black PNG for 'no constraint')")


def _load_masks(manifest, column):
    """``[N, 1, H, W]`` float masks (PNG, > 0 means masked) named in ``column`` of ``manifest``
    (its cells already checked by :func:`_check_masks`, which names the rows of the whole manifest)."""
    masks = []
    for rel in manifest.frame[column].astype(str):
        with Image.open(manifest.root / rel) as im:
            masks.append((np.asarray(im.convert("L")) > 0).astype(np.float32))
    shapes = {m.shape for m in masks}
    if len(shapes) > 1:
        raise ConceptLensError(f"the masks in column {column!r} of {manifest.path} have different sizes {sorted(shapes)}")
    return torch.from_numpy(np.stack(masks))[:, None]


def train_rrr(world, out, masks_column="mask", weight=DEFAULT_RRR_WEIGHT, epochs=12, batch_size=32, lr=3e-3, seed=0,
              device="auto", progress=True, manifest=None):
    """Train the demo CNN with the right-reasons penalty inside the masks of ``masks_column``.

    Same schedule, augmentation (masks are shifted with their images), data and output format as
    :func:`conceptlens.demo_model.train_demo`, so ``demo:<out>`` loads the corrected model; the
    sidecar adds ``correction``: method, weight, masks column and gradient target.

    Parameters
    ----------
    world : str or Path
        A world directory with ``world.json`` and ``manifest.csv`` (e.g. from
        :func:`conceptlens.world.generate_decoy_digits`).
    out : str or Path
        The state dict ``.pt``; the sidecar goes to ``<stem>.json``.
    masks_column : str
        Manifest column of mask PNG paths (relative to the CSV, same size as the images); every
        ``train`` row needs one.
    weight : float
        λ of :func:`rrr_penalty` (see :data:`DEFAULT_RRR_WEIGHT` for the choice).
    epochs, batch_size, lr, seed, device, progress, manifest
        As for :func:`~conceptlens.demo_model.train_demo`.

    Returns
    -------
    dict
        The sidecar (``test_accuracy``, ``train_seconds``, ``correction`` ...).
    """
    from ..demo_model import _train  # the one training loop

    if not np.isfinite(weight) or weight < 0:
        raise ConceptLensError(f"the weight parameter of train_rrr must be a finite number >= 0; got {weight!r}")
    path = Path(world) / "manifest.csv" if manifest is None else Path(manifest)
    if path.is_file():  # validate the masks before any training (train_demo reports a missing manifest)
        m = Manifest.read(path)
        _check_masks(m, masks_column, np.flatnonzero(m.frame["split"].to_numpy() == "train"))

    settings = {"correction": {"method": "rrr", "reference": "Ross et al. 2017", "weight": float(weight),
                               "masks_column": masks_column,
                               "gradient_of": "sum over classes of log softmax, w.r.t. the normalised input",
                               "reduction": "mean over the batch of each image's sum of squares"}}
    sidecar, _ = _train(world, out, epochs, batch_size, lr, seed, device, progress, manifest, penalty=_penalty(weight),
                        aux=lambda m: _load_masks(m, masks_column), extra_sidecar=settings, desc="train demo CNN (RRR)")
    return sidecar

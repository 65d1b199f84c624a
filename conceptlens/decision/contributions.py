"""Per-image unit contributions to a class logit: gradient x activation at one layer, one gradient pass.

Near an image the logit is, to first order, linear in a layer's map ``a``: ``y ~ g . a + b`` with
``g = dy/da`` (Zhang et al., CVPR 2019). The term ``g . a`` splits exactly over units and
positions, ``sum_{u,h,w} g_uhw a_uhw``: a unit's contribution is its share of the first-order
logit. Along a concept direction ``v`` (a CAV) the split is ``sum_hw (g_hw . v)(a_hw . v)`` per
position (CAVs of pooled channels) or ``(g . v)(a . v)`` (CAVs of flattened maps): the part of
``g . a`` that runs through the concept's direction.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.extract import iter_gradients
from ..data import make_loader
from ..errors import ConceptLensError

__all__ = ["Contributions", "unit_contributions", "MEMORY_BUDGET"]

#: Bytes for the kept per-image gradients and maps (the fidelity of every node needs both).
MEMORY_BUDGET = 2 * 2**30


@dataclass(frozen=True)
class Contributions:
    """What one gradient pass gives per image.

    Attributes
    ----------
    rows : ndarray [N]
        Manifest rows.
    logits : ndarray [N]
        The target logit ``y``.
    predicted : ndarray [N]
        The model's predicted class (argmax of all logits).
    linear : ndarray [N]
        The first-order term ``g . a`` (equal to ``cells.sum((1, 2))``).
    cells : ndarray [N, C, K*K]
        Each unit's contribution on a ``K x K`` grid of the map (``K = 1``: the unit's whole map).
    gradients, activations : list of ndarray [n_b, D]
        ``g`` and ``a`` flattened (float32), as the pass's batches computed them (kept, not copied:
        copying them costed more than a third of the pass); a node's fidelity uses them through
        :meth:`mean_gradients` and :meth:`dot_maps`.
    directions : ndarray [N, M] or None
        Contribution along each concept direction.
    skipped : tuple of BadImage
        Rows left out as unreadable (``skip_bad``); ``rows`` holds only the images read.
    """

    rows: np.ndarray
    logits: np.ndarray
    predicted: np.ndarray
    linear: np.ndarray
    cells: np.ndarray
    gradients: list
    activations: list
    directions: np.ndarray | None = None
    skipped: tuple = ()

    @property
    def units(self):
        """``[N, C]`` each unit's contribution over its whole map."""
        return self.cells.sum(2)

    def take(self, index):
        """The images at sorted positions ``index``."""
        index = np.asarray(index, dtype=np.int64)
        bounds = np.cumsum([0] + [len(c) for c in self.gradients])

        def chunks(parts):
            return [c[index[(index >= lo) & (index < hi)] - lo] for c, lo, hi in zip(parts, bounds[:-1], bounds[1:])]

        plain = {f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index]
                 for f in dataclasses.fields(self) if f.name not in ("gradients", "activations", "skipped")}
        return Contributions(**plain, gradients=chunks(self.gradients), activations=chunks(self.activations),
                             skipped=self.skipped)

    def mean_gradients(self, groups):
        """``[K, D]``: the mean gradient of each group (an array of image positions)."""
        weights = np.zeros((len(groups), len(self.rows)), dtype=np.float32)
        for k, members in enumerate(groups):
            weights[k, members] = 1.0 / len(members)
        out, start = 0.0, 0
        for g in self.gradients:
            out = out + weights[:, start:start + len(g)] @ g
            start += len(g)
        return out

    def dot_maps(self, vectors):
        """``[N, K]``: each image's map ``a_i`` dotted with each row of ``vectors`` ``[K, D]``."""
        return np.concatenate([a @ vectors.T for a in self.activations])


def _cell_matrix(shape, k, device):
    """``[H*W, k*k]`` one-hot: the grid cell of each position (rows ``h*k//H``, columns ``w*k//W``),
    so that the cells partition the map and their contributions sum to the unit's."""
    h, w = shape
    cell = (torch.arange(h, device=device)[:, None] * k // h) * k + torch.arange(w, device=device)[None, :] * k // w
    return F.one_hot(cell.flatten(), k * k).float()


def _direction_contributions(g, a, directions):
    """``[B, M]``: the first-order logit through each unit direction (rows of ``directions``)."""
    c = g.shape[1]
    if directions.shape[1] == c:  # a CAV of pooled channels: split at every position
        pg = torch.einsum("bchw,mc->bmhw", g, directions)
        pa = torch.einsum("bchw,mc->bmhw", a, directions)
        return (pg * pa).sum((2, 3))
    return (g.flatten(1) @ directions.T) * (a.flatten(1) @ directions.T)


def unit_contributions(model, manifest, rows, layer, target, preprocessing, cells=1, directions=None,
                       batch_size=64, num_workers=0, skip_bad=False, progress=True, memory_budget=MEMORY_BUDGET):
    """Run the gradient pass over ``rows`` of ``manifest`` and return :class:`Contributions`.

    Parameters
    ----------
    model : LoadedModel
    manifest : Manifest
    rows : array of int
        Manifest rows to read.
    layer : str
        A layer with a spatial output ``[B, C, H, W]``.
    target : int
        Logit index.
    preprocessing : Preprocessing
    cells : int
        Grid side of the per-unit contributions (``1``: one number per unit).
    directions : ndarray [M, C] or [M, C*H*W], optional
        Unit-norm concept directions in the layer's pooled-channel or flattened-map space.
    batch_size, num_workers, skip_bad :
        Loader options (``skip_bad``: leave unreadable images out, listed in ``skipped``).
    progress : bool
    memory_budget : int
        Bytes allowed for the kept gradients and maps; more raises before the pass.
    """
    rows = np.asarray(rows, dtype=np.int64)
    loader = make_loader(manifest, preprocessing, batch_size=batch_size, num_workers=num_workers, skip_bad=skip_bad, rows=rows)
    read, logits, predicted, linear, parts, dirs, grads, acts = [], [], [], [], [], [], [], []
    cell_of = None
    bar = tqdm(total=len(rows), desc=f"gradients of {layer}", unit="img", disable=not progress)
    for batch in iter_gradients(model, loader, [layer], [target]):
        a, g = batch.activations[layer], batch.gradients[layer][0]
        if cell_of is None:
            if a.dim() != 4:
                raise ConceptLensError(
                    f"layer {layer!r} outputs shape {tuple(a.shape[1:])}; decision modes need a convolutional map "
                    "[C, H, W] (see `conceptlens layers MODEL`)")
            if cells > min(a.shape[2:]):
                raise ConceptLensError(f"cells={cells} exceeds the {a.shape[2]}x{a.shape[3]} map of layer {layer!r}; use at most {min(a.shape[2:])}")
            need = 2 * 4 * len(rows) * a[0].numel()
            if need > memory_budget:
                raise ConceptLensError(
                    f"keeping the gradients and maps of layer {layer!r} for {len(rows)} images needs {need / 2**30:.1f} GiB "
                    f"(budget {memory_budget / 2**30:.1f} GiB); pass max_images (--max-images) or raise memory_budget")
            if directions is not None and directions.shape[1] not in (a.shape[1], a[0].numel()):
                raise ConceptLensError(
                    f"concept directions have {directions.shape[1]} dimensions; layer {layer!r} has {a.shape[1]} channels "
                    f"({a[0].numel()} values per map): give CAVs of this layer")
            cell_of = _cell_matrix(a.shape[2:], cells, a.device)
            if directions is not None:
                directions = torch.as_tensor(directions, dtype=g.dtype, device=g.device)
        ga = (g * a).float()
        parts.append((ga.flatten(2) @ cell_of).cpu().numpy())
        linear.append(ga.sum((1, 2, 3)).cpu().numpy())
        logits.append(batch.logits[:, target].float().cpu().numpy())
        predicted.append(batch.logits.argmax(1).cpu().numpy())
        grads.append(g.flatten(1).float().cpu().numpy())  # views of the batch's own tensors on CPU
        acts.append(a.flatten(1).float().cpu().numpy())
        if directions is not None:
            dirs.append(_direction_contributions(g, a, directions).float().cpu().numpy())
        read.append(np.asarray(batch.rows, dtype=np.int64))
        bar.update(len(batch.rows))
    bar.close()
    if not parts:
        raise ConceptLensError("no images to explain: the selection of manifest rows is empty")
    return Contributions(
        rows=np.concatenate(read), logits=np.concatenate(logits), predicted=np.concatenate(predicted), linear=np.concatenate(linear), cells=np.concatenate(parts),
        gradients=grads, activations=acts,
        directions=np.concatenate(dirs) if dirs else None, skipped=tuple(loader.skipped),
    )

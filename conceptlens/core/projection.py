"""Moving a layer's activations along one direction (the operation of the ClArC corrections).

``a' = a − (h·a − t)·h`` at every spatial position, for a unit channel direction ``h``: the
component along ``h`` is replaced by ``t`` and everything orthogonal to ``h`` is kept. The
spatial mean of ``a'`` then has component ``t`` too (the mean is linear), so a CAV fitted on
mean-pooled activations is neutralised in the pooled space it was fitted in.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ConceptLensError

__all__ = ["project_along", "attach_projection"]


def _direction(vector, channels, layer):
    h = torch.as_tensor(np.asarray(vector, dtype=np.float32))
    if h.ndim != 1 or h.numel() != channels:
        raise ConceptLensError(f"the direction has {h.numel()} values but layer {layer!r} has {channels} channels; "
                               "fit the CAV at this layer (its pooled channels)")
    norm = torch.linalg.vector_norm(h)
    if not torch.isfinite(norm) or norm == 0:
        raise ConceptLensError(f"the direction for layer {layer!r} is zero or not finite")
    return h / norm


def project_along(a, vector, target, layer="layer"):
    """``a`` ``[B, C, ...]`` with its component along the unit ``vector`` ``[C]`` set to ``target``
    (a float, or one per image ``[B]``) at every position; differentiable."""
    h = _direction(vector, a.shape[1], layer).to(a.device, a.dtype).view((1, -1) + (1,) * (a.dim() - 2))
    t = torch.as_tensor(target, dtype=a.dtype, device=a.device)
    t = t.view((-1,) + (1,) * (a.dim() - 1)) if t.dim() else t
    return a - ((a * h).sum(1, keepdim=True) - t) * h


def attach_projection(module, layer, vector, target):
    """Register a forward hook on ``module.get_submodule(layer)`` that returns :func:`project_along`
    of its output; returns the hook handle (``.remove()`` undoes it)."""
    sub = module.get_submodule(layer)

    def hook(mod, inputs, output):
        if not isinstance(output, torch.Tensor) or output.dim() < 2:
            raise ConceptLensError(f"layer {layer!r} does not output a [batch, channels, ...] tensor; project at a conv layer")
        return project_along(output, vector, target, layer)

    return sub.register_forward_hook(hook)

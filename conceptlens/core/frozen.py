"""The model state an analysis that back-propagates to its input runs in, restored exactly afterwards."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["frozen"]


@contextlib.contextmanager
def frozen(module):
    """eval(), parameters without gradients, no in-place activations, gradients enabled; on exit every
    module's training flag, every parameter's ``requires_grad`` and every ``inplace`` flag are put back.

    In-place activations are switched off because backward hooks cannot see through them and a
    hooked layer's output would be overwritten by the next in-place op before it is read.
    """
    modules = list(module.modules())
    training = [m.training for m in modules]
    inplace = [(m, m.inplace) for m in modules if isinstance(getattr(m, "inplace", None), bool)]
    params = list(module.parameters())
    grads = [p.requires_grad for p in params]
    try:
        module.eval()
        for m, _ in inplace:
            m.inplace = False
        for p in params:
            p.requires_grad_(False)
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        for m, flag in zip(modules, training):
            m.training = flag
        for m, flag in inplace:
            m.inplace = flag
        for p, flag in zip(params, grads):
            p.requires_grad_(flag)

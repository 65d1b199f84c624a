"""Lucid's gradient-redirecting ReLU: a way out for units that start dead.

An image that leaves a ReLU negative everywhere gets no gradient through it, and the optimisation
of an objective behind it never starts. Lucid (``redirected_relu_grad``) then lets through, for
that image, the part of the incoming gradient that would push the negative inputs *up*, and only
during the first steps; afterwards, and for every image with any gradient through the ReLU, the
gradient is the plain ReLU's. The forward value is the ReLU's throughout.

Only ``nn.ReLU`` modules are redirected (forward hooks): a ReLU called as a function inside a
model's ``forward`` cannot be reached from outside the model.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..errors import ConceptLensError

__all__ = ["redirected_relus"]


class _RedirectedReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        relu_grad = grad * (x > 0)
        # ``grad`` is of the loss (minus the objective): positive where descent lowers the input
        redirected = torch.where((x < 0) & (grad > 0), torch.zeros_like(grad), grad)
        alive = relu_grad.reshape(len(x), -1).abs().amax(dim=1) > 0  # per image, as the batch never mixes images
        return torch.where(alive.view(-1, *[1] * (x.dim() - 1)), relu_grad, redirected)


@contextlib.contextmanager
def redirected_relus(module, active):
    """While the context is open, every ``nn.ReLU`` of ``module`` back-propagates Lucid's redirected
    gradient whenever ``active()`` is true at its forward, and the plain ReLU's otherwise.

    Raises a ConceptLensError when ``module`` has no ``nn.ReLU`` module. The hooks, and only they,
    are removed on exit.
    """
    relus = [m for m in module.modules() if isinstance(m, nn.ReLU)]
    if not relus:
        raise ConceptLensError(f"redirecting ReLU gradients needs nn.ReLU modules; this {type(module).__name__} has "
                               "none (a ReLU called as a function cannot be reached): pass relu_redirect_steps=0")

    def hook(mod, inputs, output):
        return _RedirectedReLU.apply(inputs[0]) if active() and torch.is_grad_enabled() else output

    handles = [m.register_forward_hook(hook) for m in relus]
    try:
        yield
    finally:
        for h in handles:
            h.remove()

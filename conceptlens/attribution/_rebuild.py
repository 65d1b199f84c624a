"""Eager layer modules for ``torch.export`` programs, for methods whose rules attach to module types.

zennit's LRP rules and canonizers and captum's guided backprop / deconvnet pick the modules they
modify by type (``nn.Conv2d``, ``nn.Linear``, ``nn.BatchNorm2d``, ``nn.ReLU``, ...). A program
restored by ``torch.export.unflatten`` has the original module *names* but every module is an
``InterpreterModule`` running an FX graph, so those libraries find nothing to modify and fall back to
the plain gradient without a word. :func:`eager_copy` gives them what they look for: a copy of the
unflattened module in which every leaf layer whose graph is a single known aten op (``conv2d``,
``linear``, ``batch_norm``, ``relu``, the pools, ``flatten``) is replaced by the eager module of that
op, sharing the program's parameter and buffer tensors. The program records the type of every
module it was exported from, and a layer is rebuilt only as that very type (a user's own activation
module that calls ``relu`` is no ``nn.ReLU``, and zennit would not treat it as one). torchvision
ResNet blocks are rebuilt as ``BasicBlock``/``Bottleneck`` around their rebuilt children, so that
zennit's ``ResNetCanonizer`` finds their residual additions as it does in the eager model. Other
parents keep their graphs (functional code stays functional, as it is in the eager model) and look
their children up by name when they run, so the copy computes the program with eager layers.

A leaf that runs anything else is left as it is when that cannot matter to such a method (no
parameters, no op a rule would be attached to: a view, an identity, dropout in eval mode), and is
reported by :func:`unrebuildable_layers` otherwise, so that the caller refuses instead of guessing.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["is_program", "unrebuildable_layers", "eager_copy", "check_same_outputs"]

_aten = torch.ops.aten


def _ints(v, n=2):
    """An aten int-list argument (``[a]`` broadcasts, as aten does) as the tuple eager modules take."""
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return tuple(v * n if len(v) == 1 else v)


def _conv2d(node, x=None, w=None, b=None, stride=(1,), padding=(0,), dilation=(1,), groups=1):
    m = nn.Conv2d(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride=_ints(stride), padding=_ints(padding),
                  dilation=_ints(dilation), groups=groups, bias=b is not None)
    return _adopt(m, weight=w, bias=b)


def _linear(node, x=None, w=None, b=None):
    return _adopt(nn.Linear(w.shape[1], w.shape[0], bias=b is not None), weight=w, bias=b)


_BATCH_NORMS = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def _batch_norm(node, x=None, w=None, b=None, mean=None, var=None, training=False, momentum=0.1, eps=1e-5,
                cudnn=True):
    val = node.meta.get("val")
    if training or mean is None or var is None or val is None or val.ndim not in _BATCH_NORMS:
        return None  # batch statistics (a program exported in train mode) are no eval-mode BatchNorm
    m = _BATCH_NORMS[val.ndim](mean.shape[0], eps=eps, momentum=momentum, affine=w is not None)
    return _adopt(m, weight=w, bias=b, running_mean=mean, running_var=var)


def _max_pool2d(node, x=None, kernel=None, stride=(), padding=(0,), dilation=(1,), ceil_mode=False):
    return nn.MaxPool2d(_ints(kernel), stride=_ints(stride) if stride else None, padding=_ints(padding),
                        dilation=_ints(dilation), ceil_mode=ceil_mode)


def _avg_pool2d(node, x=None, kernel=None, stride=(), padding=(0,), ceil_mode=False, count_include_pad=True,
                divisor_override=None):
    return nn.AvgPool2d(_ints(kernel), stride=_ints(stride) if stride else None, padding=_ints(padding),
                        ceil_mode=ceil_mode, count_include_pad=count_include_pad, divisor_override=divisor_override)


# aten op of a leaf's single compute node -> builder(node, *op args) -> eager module or None.
# In-place variants get out-of-place modules: backward hooks cannot see through in-place ops.
_BUILDERS = {
    _aten.conv2d.default: _conv2d,
    _aten.linear.default: _linear,
    _aten.batch_norm.default: _batch_norm,
    _aten.relu.default: lambda node, x: nn.ReLU(),
    _aten.relu_.default: lambda node, x: nn.ReLU(),
    _aten.max_pool2d.default: _max_pool2d,
    _aten.avg_pool2d.default: _avg_pool2d,
    _aten.adaptive_avg_pool2d.default: lambda node, x, size: nn.AdaptiveAvgPool2d(_ints(size)),
    _aten.flatten.using_ints: lambda node, x, start=0, end=-1: nn.Flatten(start, end),
}

# Ops that some method treats by module type (zennit.types: Linear, BatchNorm, Activation, AvgPool;
# captum: ReLU): a leaf that runs one of them other than as its only op cannot be left as a graph.
_TYPED = ("conv", "linear", "addmm", "mm", "matmul", "bmm", "einsum", "batch_norm", "norm", "relu", "elu", "gelu",
          "silu", "mish", "sigmoid", "tanh", "softplus", "softmax", "hardswish", "hardsigmoid", "hardtanh", "prelu",
          "avg_pool", "mean", "threshold")


def _type_name(cls):
    return f"{cls.__module__}.{cls.__qualname__}"


def _recorded_type(module):
    """The type name the program recorded for the module it was exported from (None for eager modules)."""
    return module.type_name() if hasattr(module, "type_name") else None


def _blocks():
    """Recorded type name -> a function giving an instance of that torchvision block to fill with children.

    The instance is built small (its own layers are all replaced); only its ``forward`` is wanted.
    """
    from torchvision.models.resnet import BasicBlock, Bottleneck

    return {_type_name(BasicBlock): lambda: BasicBlock(1, 1), _type_name(Bottleneck): lambda: Bottleneck(4, 1)}


def _adopt(module, **tensors):
    """Put the program's own tensors into a fresh module (shared, not copied: the copy has no weights of its own)."""
    for name, t in tensors.items():
        if t is None:
            continue
        if name in module._parameters:
            module._parameters[name] = t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=t.requires_grad)
        else:
            module._buffers[name] = t
    return module


def is_program(module):
    """True when ``module`` (or a module inside it) runs an unflattened ``torch.export`` graph."""
    from torch.export.unflatten import InterpreterModule, UnflattenedModule

    return any(isinstance(m, (InterpreterModule, UnflattenedModule)) for m in module.modules())


def _leaves(module):
    """``(name, module)`` of the graph-running modules that call no submodule."""
    from torch.export.unflatten import InterpreterModule

    for name, m in module.named_modules():
        if isinstance(m, InterpreterModule) and not any(n.op == "call_module" for n in m.graph.nodes):
            yield name, m


def _plan(leaf):
    """``(builder, node)`` when the leaf's graph is one op with a builder; ``(None, ops)`` otherwise."""
    ops = [n for n in leaf.graph.nodes if n.op in ("call_function", "call_method")]
    if len(ops) == 1 and ops[0].target in _BUILDERS:
        return _BUILDERS[ops[0].target], ops[0]
    return None, ops


def _op_name(node):
    return str(getattr(node.target, "__name__", node.target))


def _build(leaf):
    """The eager module for a leaf, or None when its graph is not one op with a builder, or the
    module the program was exported from was of another type."""
    builder, node = _plan(leaf)
    if builder is None:
        return None
    env = {n: getattr(leaf, n.target) for n in leaf.graph.nodes if n.op == "get_attr"}
    args = [env.get(a, a) if isinstance(a, torch.fx.Node) and a.op == "get_attr" else a for a in node.args]
    if args and isinstance(args[0], torch.fx.Node):
        args[0] = None  # the input itself: builders only read the op's parameters
    eager = builder(node, *args)
    recorded = _recorded_type(leaf)
    if eager is None or (recorded is not None and recorded != _type_name(type(eager))):
        return None
    # The op's arguments carry every tensor but BatchNorm's step counter; the program has that too
    # (under the same name, the type being the same), so the copy keeps no tensor of its own.
    for name, t in leaf.named_buffers(recurse=False):
        if name in eager._buffers:
            eager._buffers[name] = t
    return eager


def unrebuildable_layers(module):
    """``{layer name: ops it runs}`` of the leaves :func:`eager_copy` would have to leave as graphs
    although a method that picks modules by type would treat them differently from the eager model.

    Parameters
    ----------
    module : nn.Module
        An unflattened program (see :func:`is_program`).

    Returns
    -------
    dict of str -> str
        Empty when every such layer can be rebuilt.
    """
    bad = {}
    for name, leaf in _leaves(module):
        builder, found = _plan(leaf)
        if builder is not None and _build(leaf) is not None:
            continue
        ops = [found] if builder is not None else found
        names = [_op_name(n) for n in ops]
        has_params = any(True for _ in leaf.parameters(recurse=False))
        if has_params or any(t in n.split(".")[0] for n in names for t in _TYPED):
            bad[name] = f"{' + '.join(names) or 'no op'} (exported from a {_recorded_type(leaf) or 'module of unknown type'})"
    return bad


def eager_copy(module):
    """A copy of an unflattened program whose single-op leaf layers are eager modules (same names).

    Parameters and buffers are shared with ``module``, not copied; the copy is in eval mode.

    Parameters
    ----------
    module : nn.Module
        An unflattened program (see :func:`is_program`).

    Returns
    -------
    nn.Module
    """
    leaves = {id(m) for _, m in _leaves(module)}
    blocks = _blocks()

    def rebuild(m):
        if id(m) in leaves:
            eager = _build(m)
            if eager is not None:
                return eager
        if _recorded_type(m) in blocks:
            block = blocks[_recorded_type(m)]()
            for name, child in m.named_children():
                setattr(block, name, rebuild(child))
            return block
        # copy.deepcopy fails on the graphs' symbolic FakeTensor metadata, and a shallow copy shares
        # the graph (read, never changed) and tensors while its own dicts take our children and hooks.
        out = copy.copy(m)
        for key, value in vars(m).items():
            if isinstance(value, dict):
                setattr(out, key, copy.copy(value))
        for name, child in m.named_children():
            out._modules[name] = rebuild(child)
        return out

    return rebuild(module).eval()


def check_same_outputs(program, rebuilt, x):
    """True when ``rebuilt`` gives the program's outputs on ``x`` (float32 tolerances)."""
    with torch.no_grad():
        a, b = program(x), rebuilt(x)
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max().clamp_min(1)))

"""Attribution methods whose rules attach to module types on ``torch.export`` programs: LRP (zennit
rules and canonizers), guided backprop, deconvnet and guided Grad-CAM give the same maps on an
``export:`` spec as on the ``python:`` spec of the same weights (and on an exported resnet18 as on
the eager one), LRP conserves relevance on the bias-free export, the program comes back unchanged,
and a program with a layer that cannot be rebuilt is refused up front with one line."""

import pytest
import torch
from export_models import images, seeded_cnn, write_specs
from torch import nn

from conceptlens.attribution import METHODS, attribute, check_method, explain, spray_class, supports
from conceptlens.attribution import _rebuild
from conceptlens.errors import ConceptLensError
from conceptlens.models import load_model

TYPED = [m for m in METHODS if METHODS[m].needs_module_types]


def _tensor_ids(module):
    return {id(t) for t in [*module.parameters(), *module.buffers()]}


def _hook_counts(module):
    return [len(getattr(m, d)) for m in module.modules()
            for d in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")]


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    return write_specs(tmp_path_factory.mktemp("cnn"), seeded_cnn())


@pytest.fixture(scope="module")
def models(specs):
    return {kind: load_model(spec, device="cpu") for kind, spec in specs.items()}


@pytest.fixture(scope="module")
def bias_free(tmp_path_factory):
    return load_model(write_specs(tmp_path_factory.mktemp("cnn-bias-free"), seeded_cnn(biases=False))["export"],
                      device="cpu")


def test_the_export_is_a_program_and_every_layer_is_rebuilt_as_its_eager_module(models):
    program, python = models["export"].module, models["python"].module
    assert _rebuild.is_program(program) and not _rebuild.is_program(python)
    assert _rebuild.unrebuildable_layers(program) == {}
    rebuilt = _rebuild.eager_copy(program)
    types = {n: type(m) for n, m in rebuilt.named_modules() if n}
    assert types == {n: type(m) for n, m in python.named_modules() if n}
    assert _tensor_ids(rebuilt) == _tensor_ids(program)  # the program's own tensors (and device), no copies
    x = images()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), program(x))
        torch.testing.assert_close(program(x), python(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", [*TYPED, "gradcam", "input-x-gradient"])
def test_export_gives_the_maps_of_the_python_spec(method, models):
    x = images()
    on_export = attribute(models["export"], x, 1, method)
    on_python = attribute(models["python"], x, 1, method)
    scale = float(on_python.abs().max())
    assert scale > 0
    torch.testing.assert_close(on_export, on_python, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("method", ["lrp-epsilon-plus-flat", "lrp-epsilon", "guided-backprop", "guided-gradcam"])
def test_exported_resnet18_gives_the_maps_of_the_eager_one(method, resnet18, tmp_path):
    # Residual blocks: zennit's ResNetCanonizer (canonizer auto) must find them in the program too.
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    program = torch.export.export(resnet18.module, (x,), dynamic_shapes=({0: torch.export.Dim("batch", max=64)},))
    torch.export.save(program, str(tmp_path / "resnet18.pt2"))
    exported = load_model(f"export:{tmp_path / 'resnet18.pt2'}", device="cpu")
    assert _tensor_ids(_rebuild.eager_copy(exported.module)) == _tensor_ids(exported.module)
    before = {k: v.clone() for k, v in exported.module.state_dict().items()}
    on_export, on_eager = attribute(exported, x, 3, method), attribute(resnet18, x, 3, method)
    torch.testing.assert_close(on_export, on_eager, rtol=1e-4, atol=1e-5 * float(on_eager.abs().max()))
    assert all(torch.equal(v, exported.module.state_dict()[k]) for k, v in before.items())  # canonizers undone


def test_lrp_on_export_is_not_the_gradient_fallback(models):
    # The bug this guards against: with no module to attach a rule to, zennit returns the target
    # logit x its gradient for every composite.
    x = images().requires_grad_()
    logit = models["export"].module(x)[:, 1]
    (grad,) = torch.autograd.grad(logit.sum(), x)
    fallback = (logit.detach()[:, None, None, None] * grad).sum(1)
    eps = attribute(models["export"], x, 1, "lrp-epsilon")
    flat = attribute(models["export"], x, 1, "lrp-epsilon-plus-flat")
    assert not torch.allclose(eps, fallback, rtol=1e-3, atol=1e-6)
    assert not torch.allclose(flat, eps, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("method", ["lrp-epsilon", "lrp-epsilon-plus-flat", "lrp-epsilon-alpha2-beta1", "lrp-epsilon-gamma-box"])
def test_lrp_conserves_relevance_on_the_bias_free_export(method, bias_free):
    x = images(6)
    with torch.no_grad():
        logits = bias_free.module(x)
    target = logits.argmax(1)
    rel = attribute(bias_free, x, target, method)
    torch.testing.assert_close(rel.sum((1, 2)), logits.gather(1, target[:, None])[:, 0], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("method", ["lrp-epsilon-plus-flat", "guided-backprop", "guided-gradcam"])
def test_the_program_comes_back_unchanged(method, specs):
    model = load_model(specs["export"], device="cpu")
    module = model.module.train()
    first = module.get_submodule("0")
    first.weight.requires_grad_(False)
    module.get_submodule("12").register_forward_hook(lambda *a: None)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    hooks, grads = _hook_counts(module), [p.requires_grad for p in module.parameters()]
    children = dict(module.named_modules())

    attribute(model, images(2), 0, method)

    assert all(m.training for m in module.modules())
    assert [p.requires_grad for p in module.parameters()] == grads
    assert _hook_counts(module) == hooks
    assert dict(module.named_modules()) == children  # no layer swapped into the caller's program
    after = module.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


class _Odd(nn.Module):
    """A layer no eager module type describes: a convolution with reflection padding and a GELU."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 3, 3, 3, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        return nn.functional.gelu(nn.functional.conv2d(nn.functional.pad(x, (1, 1, 1, 1), mode="reflect"), self.weight))


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    from export_models import export_program

    net = nn.Sequential(_Odd(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    return load_model(f"export:{export_program(net, tmp_path_factory.mktemp('odd') / 'odd.pt2')}", device="cpu")


@pytest.mark.parametrize("method", TYPED)
def test_a_layer_that_cannot_be_rebuilt_is_refused_before_any_work(method, odd):
    calls = []
    handle = odd.module.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ConceptLensError, match=rf"method '{method}' .* model export:.*odd.pt2 .* layer '0' "
                                                   r"runs .*gelu.*; use the python: spec of the same network"):
            attribute(odd, images(2), 0, method)
        with pytest.raises(ConceptLensError, match="layer '0'"):
            explain(odd, "no-such-manifest.csv", [method])  # refused before the manifest is read
        with pytest.raises(ConceptLensError, match="layer '0'"):
            spray_class(odd, "no-such-manifest.csv", "0", method=method)
    finally:
        handle.remove()
    assert calls == []
    assert not supports(odd, method)


class _OwnReLU(nn.Module):
    """An activation of the user's own: it calls relu but is no nn.ReLU, so zennit gives it no rule."""

    def forward(self, x):
        return torch.relu(x)


def test_a_layer_is_rebuilt_only_as_the_type_it_was_exported_from(tmp_path):
    from export_models import export_program

    net = nn.Sequential(nn.Conv2d(3, 4, 3), _OwnReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    model = load_model(f"export:{export_program(net, tmp_path / 'own.pt2')}", device="cpu")
    assert list(_rebuild.unrebuildable_layers(model.module)) == ["1"]
    with pytest.raises(ConceptLensError, match=r"layer '1' runs relu.default \(exported from a .*_OwnReLU\)"):
        check_method(model, "lrp-epsilon")


def test_supports_answers_for_every_method(models, odd):
    assert all(supports(models["export"], m) for m in METHODS)
    assert all(supports(models["python"], m) for m in METHODS)
    assert [m for m in METHODS if not supports(odd, m)] == TYPED
    assert supports(odd, "input-x-gradient") and check_method(odd, "gradcam") is None
    attribute(odd, images(2), 0, "input-x-gradient")  # methods that read no module types still run
    with pytest.raises(ConceptLensError, match="unknown attribution method"):
        supports(odd, "lrp-epsilonn")


def test_rebuilt_layers_that_disagree_with_the_program_are_refused(models, monkeypatch):
    # A wrong rebuild (here: BatchNorm with another epsilon) must stop the method, not change its answer.
    build = _rebuild._BUILDERS[torch.ops.aten.batch_norm.default]

    def wrong_eps(*args):
        bn = build(*args)
        bn.eps = 1.0
        return bn

    monkeypatch.setitem(_rebuild._BUILDERS, torch.ops.aten.batch_norm.default, wrong_eps)
    with pytest.raises(ConceptLensError, match="do not reproduce the program's outputs"):
        attribute(models["export"], images(2), 0, "lrp-epsilon")


def test_resnet_canonizer_is_refused_without_resnet_blocks(models):
    with pytest.raises(ConceptLensError, match="canonizer 'resnet' needs torchvision BasicBlock"):
        attribute(models["export"], images(2), 0, "lrp-epsilon", canonizer="resnet")

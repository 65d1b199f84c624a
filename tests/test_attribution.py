"""Attribution methods: shapes on every architecture, the caller's model untouched, input validation,
LRP conservation, integrated gradients against captum and a hand-written Riemann sum, RISE against its
definition, and the planted tag found by LRP on the tag-biased demo model."""

import copy

import pytest
import torch
from attribution_helpers import assert_close_but_at_kinks, world_images

from conceptlens.attribution import METHODS, attribute, list_methods, localization
from conceptlens.attribution.methods import _rise_masks
from conceptlens.errors import ConceptLensError
from conceptlens.world.shapes import tag_masks

# Small settings so every method runs in well under a second on 64 px images.
FAST = {
    "integrated-gradients": {"n_steps": 8},
    "smoothgrad": {"n_samples": 4},
    "occlusion": {"window": 16, "stride": 16},
    "lime": {"n_samples": 24, "n_segments": 16},
    "rise": {"n_masks": 24},
    "smooth-taylor": {"n_roots": 4},
}


def _hook_counts(module):
    return [len(getattr(m, d)) for m in module.modules()
            for d in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")]


@pytest.fixture(scope="module")
def demo_x(demo_model, world_dir):
    x, frame = world_images(world_dir, demo_model, lambda f: f["split"] == "test", limit=2)
    return x


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_runs_on_demo_cnn_and_leaves_the_model_as_it_was(method, demo_model, demo_x):
    # A copy in *train* mode, with a frozen layer and a user hook: all must survive, and BatchNorm
    # statistics must not move (attribution runs in eval mode).
    module = copy.deepcopy(demo_model.module).train()
    module.conv1.weight.requires_grad_(False)
    module.fc.register_forward_hook(lambda *a: None)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    hooks, grads = _hook_counts(module), [p.requires_grad for p in module.parameters()]

    maps, raw = attribute(module, demo_x, 1, method, raw=True, **FAST.get(method, {}))

    assert maps.shape == (2, 64, 64) and maps.dtype == torch.float32
    assert raw.shape[0] == 2 and raw.shape[-2:] == (64, 64) and raw.shape[1] in (1, 3)
    assert torch.isfinite(maps).all() and maps.abs().sum() > 0
    assert all(m.training for m in module.modules())
    assert [p.requires_grad for p in module.parameters()] == grads
    assert _hook_counts(module) == hooks
    after = module.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_runs_on_resnet18(method, resnet18):
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    maps = attribute(resnet18, x, 3, method, **FAST.get(method, {}))
    assert maps.shape == (1, 64, 64)
    assert torch.isfinite(maps).all()
    # resnet18's in-place ReLUs are switched off while attributing and switched back on afterwards.
    assert all(m.inplace for m in resnet18.module.modules() if isinstance(m, torch.nn.ReLU))


def test_bad_names_and_parameters_are_errors_with_suggestions(demo_model, demo_x):
    with pytest.raises(ConceptLensError, match="did you mean 'lrp-epsilon-plus-flat'"):
        attribute(demo_model, demo_x, 0, "lrp-epsilon-plus-flt")
    with pytest.raises(ConceptLensError, match="no parameter 'n_step'; did you mean 'n_steps'"):
        attribute(demo_model, demo_x, 0, "integrated-gradients", n_step=4)
    with pytest.raises(ConceptLensError, match="layer 'relu9'.*did you mean"):
        attribute(demo_model, demo_x, 0, "gradcam", layer="relu9")
    with pytest.raises(ConceptLensError, match="0..3"):
        attribute(demo_model, demo_x, 7, "saliency")
    with pytest.raises(ConceptLensError, match="not a class of model"):
        attribute(demo_model, demo_x, "hexagon", "saliency")
    with pytest.raises(ConceptLensError, match=r"\[B, C, H, W\]"):
        attribute(demo_model, demo_x[0], 0, "saliency")
    with pytest.raises(ConceptLensError, match="reduce parameter"):
        attribute(demo_model, demo_x, 0, "saliency", reduce="median")
    table = list_methods()
    assert list(table["name"]) == list(METHODS)
    assert table.set_index("name").loc["gradcam", "needs_layer"]
    assert table.set_index("name").loc["integrated-gradients", "needs_baseline"]
    assert not table.set_index("name").loc["rise", "uses_gradients"]


def test_targets_by_name_and_prediction(demo_model, demo_x):
    by_name = attribute(demo_model, demo_x, "square", "input-x-gradient")
    by_index = attribute(demo_model, demo_x, [1, 1], "input-x-gradient")
    assert torch.equal(by_name, by_index)
    with torch.no_grad():
        pred = demo_model.module(demo_x).argmax(1)
    assert torch.equal(attribute(demo_model, demo_x, None, "input-x-gradient"),
                       attribute(demo_model, demo_x, pred, "input-x-gradient"))


def test_stochastic_methods_are_seeded_and_batching_does_not_change_results(demo_model, demo_x):
    for method, kw in (("smoothgrad", {"n_samples": 4}), ("rise", {"n_masks": 24}), ("smooth-taylor", {"n_roots": 4})):
        a = attribute(demo_model, demo_x, 0, method, seed=3, **kw)
        assert torch.equal(a, attribute(demo_model, demo_x, 0, method, seed=3, **kw))
        assert not torch.equal(a, attribute(demo_model, demo_x, 0, method, seed=4, **kw))
    full = attribute(demo_model, demo_x, 0, "rise", n_masks=24, forward_batch=4096)
    chunked = attribute(demo_model, demo_x, 0, "rise", n_masks=24, forward_batch=5, batch_size=1)
    torch.testing.assert_close(full, chunked, rtol=1e-5, atol=1e-6)
    # Input-dependent defaults (here the z^B bounds) come from all images, not from each batch.
    torch.testing.assert_close(attribute(demo_model, demo_x, 0, "lrp-epsilon-gamma-box", batch_size=1),
                               attribute(demo_model, demo_x, 0, "lrp-epsilon-gamma-box", batch_size=2))


def _bias_free(module):
    m = copy.deepcopy(module)
    for bn in (m.bn1, m.bn2, m.bn3, m.bn4):
        bn.running_mean.zero_()
        bn.bias.data.zero_()
    m.fc.bias.data.zero_()
    return m


@pytest.mark.parametrize("method", ["lrp-epsilon", "lrp-epsilon-plus-flat", "lrp-epsilon-alpha2-beta1", "lrp-epsilon-gamma-box"])
def test_lrp_conserves_relevance_without_biases(method, demo_model, world_dir):
    x, _ = world_images(world_dir, demo_model, lambda f: f["split"] == "test", limit=6)
    module = _bias_free(demo_model.module)  # BatchNorm folds into the convs with zero bias
    with torch.no_grad():
        logits = module(x)
    target = logits.argmax(1)
    rel = attribute(module, x, target, method)
    torch.testing.assert_close(rel.sum((1, 2)), logits.gather(1, target[:, None])[:, 0], rtol=1e-3, atol=1e-3)
    if method == "lrp-epsilon":
        # Control: with its biases the model absorbs relevance, so the same check fails there.
        with torch.no_grad():
            biased = demo_model.module(x).gather(1, target[:, None])[:, 0]
        gap = (attribute(demo_model, x, target, method).sum((1, 2)) - biased).abs()
        assert (gap > 1e-2 * biased.abs().clamp_min(1)).any()


def test_integrated_gradients_equals_captum_and_a_hand_riemann_sum(demo_model, world_dir):
    from captum.attr import IntegratedGradients

    x, _ = world_images(world_dir, demo_model, lambda f: f["split"] == "test", limit=3)
    module = demo_model.module
    baseline = x.mean(dim=(2, 3), keepdim=True).expand_as(x).contiguous()
    n = 12
    ours = attribute(demo_model, x, 2, "integrated-gradients", baseline="mean", n_steps=n,
                     ig_method="riemann_right", raw=True)[1]
    theirs = IntegratedGradients(module).attribute(x.clone().requires_grad_(), baselines=baseline, target=2,
                                                   n_steps=n, method="riemann_right").detach()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
    # Independent of captum: right Riemann sum over the straight path (alpha = k / n), autograd gradients.
    total = torch.zeros_like(x)
    for k in range(1, n + 1):
        xa = (baseline + k / n * (x - baseline)).requires_grad_()
        (g,) = torch.autograd.grad(module(xa)[:, 2].sum(), xa)
        total += g / n
    # the hand sum runs 3 images per forward where ours runs 36: equal but at ReLU/max-pool kinks
    assert_close_but_at_kinks(ours, (x - baseline) * total)
    # Completeness axiom with the default Gauss-Legendre rule: sum of IG = f(x) - f(baseline).
    ig = attribute(demo_model, x, 2, "integrated-gradients", baseline="mean", n_steps=64)
    with torch.no_grad():
        delta = module(x)[:, 2] - module(baseline)[:, 2]
    torch.testing.assert_close(ig.sum((1, 2)), delta, rtol=0.05, atol=0.05)


def test_rise_equals_its_definition_computed_mask_by_mask(demo_model, demo_x):
    n, cells, p = 16, 4, 0.5
    ours = attribute(demo_model, demo_x, 2, "rise", n_masks=n, cells=cells, p=p, seed=5)
    masks = _rise_masks(n, cells, p, 64, 64, 5)
    assert masks.min() >= 0 and masks.max() <= 1
    ref = torch.zeros(2, 64, 64)
    with torch.no_grad():
        for i in range(2):
            for m in masks:
                prob = demo_model.module(demo_x[i:i + 1] * m).softmax(1)[0, 2]
                ref[i] += prob * m
    torch.testing.assert_close(ours, ref / (n * p), rtol=1e-4, atol=1e-5)


def test_lrp_puts_relevance_on_the_planted_tag(demo_model, world_dir):
    """The demo model learned the tag as a shortcut for 'circle': LRP finds it on tagged test circles."""
    x, frame = world_images(world_dir, demo_model, lambda f: (f["split"] == "test") & (f["label"] == "circle"))
    tagged = frame["has_tag"].to_numpy() == 1
    assert 8 <= tagged.sum() < len(frame)
    tag = tag_masks(x.shape[-1])[0]
    rel = attribute(demo_model, x, "circle", "lrp-epsilon-plus-flat")
    scores = localization(rel, tag).to_frame()
    area = tag.mean()
    on = scores[tagged]
    off = scores[~tagged]
    # Tagged circles: far more relevance inside the 1.6 % tag square than its area; untagged: about none.
    assert on["relevance_mass"].mean() > 5 * area, on["relevance_mass"].mean()
    assert on["pointing_hit"].mean() >= 0.8
    assert off["relevance_mass"].mean() < 2 * area

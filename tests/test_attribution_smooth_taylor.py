"""SmoothTaylor (``smooth-taylor``): one noiseless root against autograd, the batched roots against a
per-root loop with the documented noise, the completeness gap measured over roots and noise scales,
seeding, the adaptive noise search against a direct total-variation computation, and bad parameters."""

import copy

import numpy as np
import pytest
import torch
from attribution_helpers import assert_close_but_at_kinks, world_images
from test_attribution import _hook_counts

from conceptlens.attribution import attribute, smooth_taylor
from conceptlens.attribution.smooth_taylor import _total_variation
from conceptlens.errors import ConceptLensError


@pytest.fixture(scope="module")
def demo_xy(demo_model, world_dir):
    x, frame = world_images(world_dir, demo_model, lambda f: f["split"] == "test", limit=8)
    return x, torch.tensor([demo_model.class_index(c) for c in frame["label"]])


def _noise(seed, index, root, shape):
    """The documented noise of root ``root`` of the image at ``index``: its own generator per (seed, image, root)."""
    state = np.random.SeedSequence([seed, index, root]).generate_state(1, np.uint64)[0]
    return torch.randn(shape, generator=torch.Generator().manual_seed(int(state)))


def _roots(x, j, n_roots, scale, seed, centre):
    """Roots ``c + scale * range(x_j) * eps_i`` of image ``j``, ``[n_roots, C, H, W]``."""
    span = x[j].max() - x[j].min()
    return torch.stack([centre[j] + scale * span * _noise(seed, j, i, x.shape[1:]) for i in range(n_roots)])


def _tv_reference(heatmap):
    """The paper's ``average_total_variation`` (lp 1) of ``heatmap_normalize(heatmap)`` (attribution/eval.py)."""
    h = np.abs(heatmap)
    vmin, vmax = h.min(), np.percentile(h, 99)
    h = np.clip((h - vmin) / (vmax - vmin), 0, 1)
    return (np.abs(h[:, 1:] - h[:, :-1]).sum() + np.abs(h[1:] - h[:-1]).sum()) / h.size


# "mean", not "zero": a trained CNN may have no gradient at all at the all-zero image (every ReLU
# shut), which would make the comparison vacuous on that model.
@pytest.mark.parametrize("kind", ["mean", "tensor"])
def test_one_noiseless_root_is_the_gradient_at_the_baseline_times_the_difference(kind, demo_model, demo_xy):
    x, y = demo_xy
    b = (x.mean(dim=(2, 3), keepdim=True).expand_as(x) if kind == "mean"
         else torch.randn(x.shape, generator=torch.Generator().manual_seed(7)))
    ours = attribute(demo_model, x, y, "smooth-taylor", baseline="mean" if kind == "mean" else b,
                     noise_scale=0, n_roots=1, raw=True)[1]
    root = b.clone().requires_grad_()
    (grad,) = torch.autograd.grad(demo_model.module(root).gather(1, y[:, None]).sum(), root)
    torch.testing.assert_close(ours, grad * (x - b), rtol=1e-5, atol=1e-6)
    assert ours.abs().sum() > 0
    # Roots at the input without noise: every Taylor term is (x - x) * grad = 0, exactly.
    assert torch.equal(attribute(demo_model, x, y, "smooth-taylor", noise_scale=0.0, n_roots=3), torch.zeros(8, 64, 64))


@pytest.mark.parametrize("batch_size, backward_batch", [(8, 256), (3, 7), (1, 1)])
@pytest.mark.parametrize("centre", ["input", "mean"])
def test_batched_roots_equal_a_loop_over_roots_and_images(batch_size, backward_batch, centre, demo_model, demo_xy):
    x, y = demo_xy
    n, scale, seed = 5, 0.15, 4
    ours = attribute(demo_model, x, y, "smooth-taylor", n_roots=n, noise_scale=scale, seed=seed, baseline=centre,
                     batch_size=batch_size, backward_batch=backward_batch, raw=True)[1]
    c = x if centre == "input" else x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    ref = torch.zeros_like(x)
    for j in range(len(x)):
        for z in _roots(x, j, n, scale, seed, c):
            z = z.clone().requires_grad_()
            (grad,) = torch.autograd.grad(demo_model.module(z[None])[0, y[j]], z)
            ref[j] += (x[j] - z.detach()) * grad / n
    assert_close_but_at_kinks(ours, ref)


def test_completeness_gap_is_the_mean_taylor_remainder_and_does_not_vanish_with_more_roots(demo_model, demo_xy):
    """Gaps per image, mean over these 8 test images x 3 seeds, noise 0.15, for N = 1 / 4 / 16 / 64:

    * ``taylor``: |sum A - (f(x) - mean_i f(z_i))| = |mean_i R_i|, R_i the first-order remainder of
      the expansion at root z_i. It tends to |E R| > 0, not to 0: input centre 2.17 / 1.97 / 1.98 / 2.03;
      zero centre 3.93 / 3.71 / 3.59 / 3.58.
    * ``centre``: |sum A - (f(x) - f(c))|: input 5.81 / 5.68 / 5.60 / 5.61; zero 6.52 / 6.44 / 6.33 / 6.29.
      With c = x, E[sum A] = -sigma d/dsigma E f(x + sigma eps) (Stein's lemma), not f(x) - f(x) = 0.

    Neither shrinks with N (gap(64) / gap(1): 0.91-0.97). What shrinks is the Monte Carlo error, the
    spread of sum A over seeds (~1/sqrt(N): 0.78 -> 0.069 input, 0.75 -> 0.084 zero), and with c = x
    the remainder as sigma -> 0 (1.98 at 0.15, 0.26 at 0.02; N = 16). Gradients taken at x instead of
    at the roots would make the ``centre`` gap vanish like 1/sqrt(N) and fail the plateau check.
    """
    x, y = demo_xy
    module = demo_model.module
    with torch.no_grad():
        fx = module(x).gather(1, y[:, None])[:, 0]
        f0 = module(torch.zeros_like(x)).gather(1, y[:, None])[:, 0]

    def measure(centre, n, seed, scale=0.15):
        total = attribute(demo_model, x, y, "smooth-taylor", baseline=centre, n_roots=n, seed=seed,
                          noise_scale=scale).sum((1, 2))
        c = x if centre == "input" else torch.zeros_like(x)
        with torch.no_grad():
            fz = torch.stack([module(_roots(x, j, n, scale, seed, c))[:, y[j]].mean() for j in range(len(x))])
        fc = fx if centre == "input" else f0
        return total, (total - (fx - fz)).abs(), (total - (fx - fc)).abs()

    roots = (1, 4, 16, 64)
    for centre in ("input", "zero"):
        runs = {n: [measure(centre, n, seed) for seed in range(3)] for n in roots}
        taylor = {n: float(torch.stack([r[1] for r in runs[n]]).mean()) for n in roots}
        gap_c = {n: float(torch.stack([r[2] for r in runs[n]]).mean()) for n in roots}
        spread = {n: float(torch.stack([r[0] for r in runs[n]]).std(0).mean()) for n in roots}
        for gap in (taylor, gap_c):
            assert 0.75 < gap[64] / gap[1] < 1.25, (centre, gap)  # a plateau: measured 0.91-0.97
            assert gap[64] > 1.0, (centre, gap)  # far from complete: measured 2.0-6.3
        assert spread[64] < spread[1] / 4, (centre, spread)  # measured / 9-11
        if centre == "input":  # with roots around the input the remainder shrinks with sigma (about linearly here)
            small = float(torch.stack([measure("input", 16, seed, 0.02)[1] for seed in range(3)]).mean())
            assert small < taylor[16] / 3, (small, taylor)  # measured / 7.5


def test_seeded_independent_of_the_global_rng_and_the_model_is_left_as_it_was(demo_model, demo_xy):
    x, y = demo_xy
    module = copy.deepcopy(demo_model.module).train()
    module.conv1.weight.requires_grad_(False)
    module.fc.register_forward_hook(lambda *a: None)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    hooks, grads = _hook_counts(module), [p.requires_grad for p in module.parameters()]
    rng = torch.random.get_rng_state()

    raw, scales = smooth_taylor(module, x, y, n_roots=4, seed=2)

    assert torch.equal(torch.random.get_rng_state(), rng)
    assert all(m.training for m in module.modules()) and _hook_counts(module) == hooks
    assert [p.requires_grad for p in module.parameters()] == grads
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert raw.shape == x.shape and torch.equal(scales, torch.full((8,), 0.15, dtype=torch.float64))
    torch.manual_seed(123)  # the global generator does not matter
    assert torch.equal(raw, attribute(demo_model, x, y, "smooth-taylor", n_roots=4, seed=2, raw=True)[1])
    assert not torch.equal(raw, smooth_taylor(demo_model, x, y, n_roots=4, seed=3)[0])
    # An image's noise follows its index in x, not its batch: the second half alone differs from its
    # place in the whole, and equals it given as a batch of the whole call.
    assert not torch.allclose(smooth_taylor(demo_model, x[4:], y[4:], n_roots=4, seed=2)[0], raw[4:])
    torch.testing.assert_close(smooth_taylor(demo_model, x, y, n_roots=4, seed=2, batch_size=4)[0], raw,
                               rtol=1e-5, atol=1e-6)


def test_total_variation_is_scale_free_and_matches_the_papers_definition():
    half = torch.zeros(4, 4)
    half[:, :2] = 1  # one unit step per row: TV = 4 / 16
    maps = torch.stack([half, -1000 * half, 1e-6 * half, torch.zeros(4, 4)])
    torch.testing.assert_close(_total_variation(maps)[:3], torch.full((3,), 0.25))
    assert _total_variation(maps)[3] == float("inf")  # a constant map has no normalised TV and never wins
    noise = torch.randn(5, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_total_variation(noise).double(),
                               torch.tensor([_tv_reference(m.numpy()) for m in noise], dtype=torch.float64))


def test_adaptive_noise_picks_the_grid_scale_of_least_total_variation(demo_model, demo_xy):
    x, y = demo_xy
    grid = (0.01, 0.02, 0.04, 0.08)
    raw, scales = smooth_taylor(demo_model, x, y, n_roots=8, noise_scale="adaptive", noise_grid=grid, backward_batch=50)
    fixed = {s: attribute(demo_model, x, y, "smooth-taylor", n_roots=8, noise_scale=s, raw=True)[1] for s in grid}
    tv = np.array([[_tv_reference(fixed[s][j].sum(0).numpy()) for s in grid] for j in range(len(x))])
    # Clear winners (no near-tie that float rounding could flip: measured margin >= 3e-3), and
    # different scales for different images (measured: 0.01 x 6, 0.02, 0.04).
    top2 = np.sort(tv, 1)[:, :2]
    assert (top2[:, 1] - top2[:, 0] > 1e-3).all()
    assert len(set(scales.tolist())) > 1
    np.testing.assert_array_equal(scales.numpy(), np.array(grid)[tv.argmin(1)])
    for j, s in enumerate(scales.tolist()):
        torch.testing.assert_close(raw[j], fixed[s][j], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(attribute(demo_model, x, y, "smooth-taylor", n_roots=8, noise_scale="adaptive",
                                         noise_grid=grid), raw.sum(1))


@pytest.mark.parametrize("params, message", [
    ({"noise_scale": -0.1}, r"the noise_scale parameter of smooth-taylor must be a number >= 0 .* or 'adaptive'; got -0.1"),
    ({"noise_scale": "adaptiv"}, r"noise_scale parameter of smooth-taylor .*; got 'adaptiv'"),
    ({"noise_scale": float("nan")}, r"noise_scale parameter of smooth-taylor .*; got nan"),
    ({"n_roots": 0}, r"the n_roots parameter of smooth-taylor must be a positive integer; got 0"),
    ({"n_roots": 2.0}, r"n_roots parameter of smooth-taylor must be a positive integer; got 2.0"),
    ({"baseline": "inputs"}, r"the baseline parameter of smooth-taylor must be 'input', 'zero', 'mean', a number or a tensor"),
    ({"seed": -1}, r"the seed parameter of smooth-taylor must be a non-negative integer; got -1"),
    ({"backward_batch": 0}, r"the backward_batch parameter of smooth-taylor must be a positive integer"),
    ({"noise_grid": ()}, r"the noise_grid parameter of smooth-taylor must be a non-empty sequence of numbers > 0"),
    ({"noise_grid": (0.1, 0)}, r"noise_grid parameter .*; got \(0.1, 0\)"),
    ({"n_root": 4}, r"no parameter 'n_root'; did you mean 'n_roots'"),
])
@pytest.mark.parametrize("entry", ["attribute", "smooth_taylor"])
def test_bad_parameters_are_one_line_errors(params, message, entry, demo_model, demo_xy):
    x, y = demo_xy
    with pytest.raises(ConceptLensError, match=message) as err:
        if entry == "attribute":
            attribute(demo_model, x[:1], y[:1], "smooth-taylor", **params)
        else:
            smooth_taylor(demo_model, x[:1], y[:1], **params)
    assert "\n" not in str(err.value)

"""Feature visualisation against planted truth: colour detectors, batch invariance, exact restoration."""

from collections import OrderedDict

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conceptlens.errors import ConceptLensError
from conceptlens.featurevis import (RobustnessTransforms, Visualization, channel, class_logit, direction, diversity,
                                    fourier, objective_values, pixel, unit, visualize)
from conceptlens.featurevis._seed import generator


def _colour_model():
    """1x1 conv detectors: channel 0 fires on red, 1 on blue, 2 on green (R - (G+B)/2 style weights)."""
    conv = nn.Conv2d(3, 3, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, -0.5, -0.5], [-0.5, -0.5, 1.0], [-0.5, 1.0, -0.5]])[..., None, None])
        conv.bias.zero_()
    return nn.Sequential(OrderedDict(conv=conv, relu=nn.ReLU(inplace=True), gap=nn.AdaptiveAvgPool2d(1),
                                     flat=nn.Flatten(), fc=nn.Linear(3, 2)))


def _hook_count(module):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


@pytest.mark.parametrize("param, steps, margin", [("fourier", 128, 40), ("pixel", 64, 150)])
def test_colour_channels_visualise_as_their_colour(param, steps, margin):
    model = _colour_model()
    vis = visualize(model, [channel("relu", 0), channel("relu", 1)], size=16, steps=steps, param=param, progress=False)
    red, blue = vis.images.astype(float).mean(axis=(1, 2))  # mean R, G, B of each image
    assert vis.images.shape == (2, 16, 16, 3) and vis.images.dtype == np.uint8
    assert red[0] > red[1] + margin and red[0] > red[2] + margin, red
    assert blue[2] > blue[0] + margin and blue[2] > blue[1] + margin, blue
    # the achieved objective is the detector's response to the final image, R - (G + B) / 2 on average
    response = lambda rgb: max(0.0, (rgb[0] - (rgb[1] + rgb[2]) / 2) / 255)  # noqa: E731
    assert vis.objective_values[0] >= response(red) - 0.01
    assert vis.objective_values[1] >= response(blue[[2, 0, 1]]) - 0.01


@pytest.mark.filterwarnings("ignore:TF32 acceleration")
def test_a_batch_equals_one_image_at_a_time(demo_model):
    objectives = [channel("conv4", c) for c in (1, 2, 3)] + [unit("conv4", 5)]
    # oneDNN's convolutions round differently for different batch sizes, and Adam's first steps
    # (about lr * sign(gradient)) amplify that; with the native kernels every image's arithmetic
    # is the same in a batch, so the result must be bit-identical.
    with torch.backends.mkldnn.flags(enabled=False):
        batched = visualize(demo_model, objectives, size=64, steps=16, batch_size=4, progress=False)
        single = visualize(demo_model, objectives, size=64, steps=16, batch_size=1, progress=False)
    np.testing.assert_array_equal(batched.images, single.images)
    np.testing.assert_allclose(batched.objective_values, single.objective_values, rtol=0, atol=1e-6)


def test_seeds_repeat_and_differ_and_the_model_is_restored():
    model = _colour_model()
    model.train()
    model.fc.weight.requires_grad_(False)
    calls = []
    model.conv.register_forward_hook(lambda *args: calls.append(1))  # the caller's own hook stays
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    grads = [p.requires_grad for p in model.parameters()]
    hooks = _hook_count(model)
    run = dict(size=12, steps=8, progress=False)
    a = visualize(model, [channel("relu", 0), class_logit(1)], seed=3, **run)
    b = visualize(model, [channel("relu", 0), class_logit(1)], seed=3, **run)
    c = visualize(model, [channel("relu", 0), class_logit(1)], seed=4, **run)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.objective_values, b.objective_values)
    assert np.abs(a.images.astype(int) - c.images).max() > 0
    with pytest.raises(ConceptLensError):
        visualize(model, [channel("relu", 0), channel("relu", 7)], **run)  # fails after the model was prepared
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == flags
    assert [p.requires_grad for p in model.parameters()] == grads
    assert model.relu.inplace is True
    assert _hook_count(model) == hooks
    calls.clear()
    model(torch.rand(1, 3, 8, 8))
    assert calls == [1]


def test_objective_arithmetic_and_direct_values(demo_model):
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    v = lambda obj: objective_values(demo_model, [obj, obj], x)  # noqa: E731
    a, b = channel("conv4", 3), channel("conv4", 10)
    np.testing.assert_allclose(v(a + 2 * b), v(a) + 2 * v(b), rtol=1e-6)
    np.testing.assert_allclose(v(a - b * 0.5), v(a) - 0.5 * v(b), rtol=1e-6)
    np.testing.assert_allclose(v(-a), -v(a), rtol=1e-6)
    assert (a - 2 * b).description == "channel(conv4, 3) - 2*channel(conv4, 10)"

    acts = {}
    handle = demo_model.module.conv4.register_forward_hook(lambda m, i, o: acts.setdefault("a", o))
    mean = torch.tensor(demo_model.preprocessing.mean).view(1, 3, 1, 1)
    std = torch.tensor(demo_model.preprocessing.std).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = demo_model.module((x - mean) / std)
    handle.remove()
    a4 = acts["a"].double()  # [2, 64, 8, 8]
    vec = torch.linspace(-1, 1, 64, dtype=torch.float64)
    np.testing.assert_allclose(v(unit("conv4", 7)), a4[:, 7, 4, 4].numpy(), rtol=1e-5)
    np.testing.assert_allclose(v(unit("conv4", 7, y=1, x=6)), a4[:, 7, 1, 6].numpy(), rtol=1e-5)
    np.testing.assert_allclose(v(direction("conv4", vec.numpy())), torch.einsum("nchw,c->n", a4, vec).numpy() / 64,
                               rtol=1e-4)
    np.testing.assert_allclose(v(class_logit(2)), logits[:, 2].numpy(), rtol=1e-5)
    # Lucid's diversity: -sum over ordered pairs of Gram cosine similarity / batch, shared out per image
    grams = F.normalize(torch.einsum("ncp,ndp->ncd", *(a4.flatten(2),) * 2).flatten(1), dim=1)
    expected = -(grams @ grams.T).fill_diagonal_(0).sum() / 2
    got = objective_values(demo_model, [diversity("conv4", 3.0)] * 2, x)
    np.testing.assert_allclose(got.sum(), 3.0 * expected.item(), rtol=1e-4)


def test_diversity_groups_stay_together_and_differ(demo_model):
    obj = channel("conv4", 3) + diversity("conv4", 10.0)
    vis = visualize(demo_model, [obj] * 3 + [channel("conv4", 1)], size=32, steps=4, batch_size=2, progress=False)
    assert len(vis.images) == 4
    assert vis.table["objective"].tolist()[:3] == [obj.description] * 3
    assert np.abs(vis.images[0].astype(int) - vis.images[1]).max() > 0


def test_bad_input_is_one_clear_error(demo_model):
    run = dict(size=32, steps=1, progress=False)
    with pytest.raises(ConceptLensError, match=r"'conv9' is not a module.*did you mean"):
        visualize(demo_model, channel("conv9", 0), **run)
    with pytest.raises(ConceptLensError, match=r"^channel 70 is out of range for layer 'conv4' \(channels 0-63\)$"):
        visualize(demo_model, channel("conv4", 70), **run)
    with pytest.raises(ConceptLensError, match=r"unit y=9 is out of range for layer 'conv4' \(y 0-3"):
        visualize(demo_model, unit("conv4", 0, y=9, x=0), **run)
    with pytest.raises(ConceptLensError, match=r"needs a vector of 64 values"):
        visualize(demo_model, direction("conv4", np.ones(10)), **run)
    with pytest.raises(ConceptLensError, match=r"class 9 is out of range.*classes 0-3"):
        visualize(demo_model, class_logit(9), **run)
    with pytest.raises(ConceptLensError, match=r"param must be one of \['fourier', 'pixel'\]; got 'fourrier'"):
        visualize(demo_model, channel("conv4", 0), param="fourrier", **run)
    with pytest.raises(ConceptLensError, match="pass size=N"):
        visualize(demo_model, channel("conv4", 0), steps=1, progress=False)
    fixed = nn.Sequential(OrderedDict(flat=nn.Flatten(), fc=nn.Linear(3 * 16 * 16, 2)))
    with pytest.raises(ConceptLensError, match=r"^the model rejects \(3, 20, 20\) inputs \(.*\); pass another size$"):
        visualize(fixed, class_logit(0), size=20, steps=1, progress=False)


def test_save_and_load_round_trip(tmp_path):
    vis = visualize(_colour_model(), [channel("relu", 0), channel("relu", 2)], size=10, steps=2, param="pixel",
                    progress=False)
    back = Visualization.load(vis.save(tmp_path / "vis"))
    np.testing.assert_array_equal(back.images, vis.images)
    np.testing.assert_allclose(back.objective_values, vis.objective_values, rtol=1e-12)
    assert back.table["objective"].tolist() == ["channel(relu, 0)", "channel(relu, 2)"]
    assert back.provenance["parameters"]["param"] == "pixel(sd=0.01)"
    assert sorted(p.name for p in (tmp_path / "vis").iterdir()) == [
        "image_0000.png", "image_0001.png", "objectives.csv", "visualization.json"]


def test_parameters_and_transforms_do_not_depend_on_the_batch():
    for make in (pixel, fourier):
        both = make([generator(0, 0), generator(0, 1)], 9, 12)()
        alone = make([generator(0, 1)], 9, 12)()
        assert both.shape == (2, 3, 9, 12)
        torch.testing.assert_close(both[1:], alone, rtol=0, atol=0)
    x = torch.rand(3, 3, 20, 17)
    t = RobustnessTransforms(pad=3, jitter=2, jitter2=1)
    batched = t(x, [generator(5, i, 2) for i in range(3)])
    single = torch.cat([t(x[i:i + 1], [generator(5, i, 2)]) for i in range(3)])
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-6)
    # at scale 1 and angle 0 the transforms are an exact crop of the 0.5-padded image
    crop = RobustnessTransforms(pad=3, jitter=2, scale=(1, 1), degrees=0, jitter2=1)(x, [generator(0, i) for i in range(3)])
    padded = F.pad(x, (3,) * 4, value=0.5)
    for i in range(3):
        err = min((padded[i, :, a:a + 20, b:b + 17] - crop[i]).abs().max().item() for a in range(7) for b in range(7))
        assert err < 1e-5


def test_cli_visualize_writes_images_values_and_sheet(demo_weights, tmp_path, capsys):
    from PIL import Image

    from conceptlens.cli import main

    base = ["visualize", "--model", f"demo:{demo_weights}", "--layer", "conv4", "--size", "32", "--steps", "4", "-q"]
    assert main(base + ["--channels", "0-2,7", "--out", str(tmp_path / "v")]) == 0
    assert "visualised 4 images at conv4" in capsys.readouterr().out
    table = pd.read_csv(tmp_path / "v" / "objectives.csv")
    assert len(table) == 4 and table["objective"].str.contains("7").iloc[-1]
    assert Image.open(tmp_path / "v" / "image_0003.png").size == (32, 32)
    assert Image.open(tmp_path / "v" / "sheet.png").size == (4 * 32 + 3 * 2, 32)
    assert main(base + ["--channels", "60-70", "--out", str(tmp_path / "bad")]) == 2
    assert "channel 64 is out of range for layer 'conv4' (channels 0-63)" in capsys.readouterr().err
    assert main(base + ["--layer", "conv9", "--channels", "0", "--out", str(tmp_path / "bad")]) == 2
    with pytest.raises(SystemExit):
        main(base + ["--channels", "5-2", "--out", str(tmp_path / "bad")])
    assert main(base + ["--channels", "0", "--redirect-relu", "2", "--out", str(tmp_path / "r")]) == 0
    assert Visualization.load(tmp_path / "r").provenance["parameters"]["relu_redirect_steps"] == 2
    assert main(base + ["--channels", "0", "--redirect-relu", "-1", "--out", str(tmp_path / "bad")]) == 2
    assert "relu_redirect_steps must be a non-negative integer" in capsys.readouterr().err


def test_each_channel_image_drives_its_own_channel_above_the_median(demo_model):
    # Specificity on the demo model's last conv: channel k's image activates channel k more than the
    # median channel of the layer on that image, and more than the median other channel's image does
    # (measured: 64 of 64 channels at 32 and 64 steps, for both).
    objectives = [channel("conv4", c) for c in range(64)]
    vis = visualize(demo_model, objectives, size=64, steps=32, batch_size=64, progress=False)
    x = torch.from_numpy(vis.images).permute(0, 3, 1, 2).float() / 255
    acts = np.stack([objective_values(demo_model, objectives, x[k:k + 1].expand(64, -1, -1, -1).contiguous())
                     for k in range(64)])  # acts[k, j]: channel j on channel k's image
    own = np.diag(acts)
    assert (own > np.median(acts, axis=1)).mean() >= 0.9
    assert (own > np.median(acts, axis=0)).mean() >= 0.9


def test_class_models_are_classified_as_their_class(demo_model):
    # Simonyan et al.'s class models: every class's image is the model's prediction for it (measured:
    # softmax ~1.0 for all four classes at 32-128 steps; the norm term ~6 % of the logit).
    from conceptlens.featurevis import class_models, input_l2

    vis = class_models(demo_model, size=64, steps=32, progress=False)
    assert len(vis.images) == len(demo_model.classes) == 4
    x = torch.from_numpy(vis.images).permute(0, 3, 1, 2).float() / 255
    logits = np.stack([objective_values(demo_model, [class_logit(c)] * 4, x) for c in range(4)], 1)
    np.testing.assert_array_equal(logits.argmax(1), np.arange(4))
    # the regulariser is minus the squared norm of the normalised input the model sees
    mean = torch.tensor(demo_model.preprocessing.mean).view(1, 3, 1, 1)
    std = torch.tensor(demo_model.preprocessing.std).view(1, 3, 1, 1)
    direct = -((x - mean) / std).pow(2).sum((1, 2, 3)).numpy() * 1e-3
    np.testing.assert_allclose(objective_values(demo_model, [input_l2(1e-3)] * 4, x), direct, rtol=1e-5)
    assert class_models(demo_model, ["square"], size=32, steps=2, progress=False).table["objective"][0].startswith(
        f"class_logit({demo_model.class_index('square')})")


def test_inversion_keeps_more_of_the_image_at_an_early_layer(demo_model, demo_weights, world_dir, tmp_path, capsys):
    # Planted by the architecture: relu1 sees the image at full resolution, conv4 after three
    # poolings. Measured on 4 images: PSNR 18.5 dB from relu1 vs 10.6 from conv4 at 100 steps
    # (21.5 vs 10.7 at 200) with a fixed tv_weight 1e-5; with tv_weight="auto" (1.8e-5 for relu1,
    # 3.2e-4 for conv4) 15.3 vs 10.8 at 60 steps on the same 4 images.
    from conceptlens.cli import main
    from conceptlens.data import Manifest, load_images
    from conceptlens.featurevis import invert, match

    manifest = Manifest.read(world_dir / "manifest.csv")
    prep = demo_model.preprocessing
    normalised = load_images(manifest.subset(np.arange(len(manifest.frame)) < 2), prep)
    x = (normalised * torch.tensor(prep.std).view(1, 3, 1, 1) + torch.tensor(prep.mean).view(1, 3, 1, 1)).clamp(0, 1)
    vis = invert(demo_model, x, ["relu1", "conv4"], steps=60, progress=False)
    psnr = vis.table.groupby("layer")["psnr"].mean()
    assert list(vis.table["layer"]) == ["relu1", "conv4"] * 2 and psnr["relu1"] > psnr["conv4"] + 3, psnr
    tv = vis.table.groupby("layer")["tv_weight"].first()  # tv_weight="auto": the deeper layer's prior is stronger
    assert tv["relu1"] < tv["conv4"], tv
    # the data term: minus the squared distance to the target representation over its squared norm
    seen = {}
    hook = demo_model.module.relu1.register_forward_hook(lambda m, i, o: seen.setdefault("a", o.detach()))
    with torch.no_grad():
        demo_model.module.eval()((x - torch.tensor(prep.mean).view(1, 3, 1, 1)) / torch.tensor(prep.std).view(1, 3, 1, 1))
    hook.remove()
    a0 = seen["a"][0]
    assert objective_values(demo_model, [match("relu1", a0)], x[:1])[0] == pytest.approx(0, abs=1e-6)
    expected = -((seen["a"][1] - a0) ** 2).sum() / (a0 ** 2).sum()
    assert objective_values(demo_model, [match("relu1", a0)], x[1:2])[0] == pytest.approx(float(expected), rel=1e-4)
    with pytest.raises(ConceptLensError, match="relu9"):
        invert(demo_model, x, ["relu9"], steps=1, progress=False)
    image = str(manifest.root / manifest.frame["image"][0])
    base = ["invert", "--model", f"demo:{demo_weights}", "--image", image, "--steps", "3", "-q"]
    assert main(base + ["--layers", "relu1,conv4", "--out", str(tmp_path / "o")]) == 0
    assert "relu1" in capsys.readouterr().out and (tmp_path / "o" / "sheet.png").is_file()
    assert len(pd.read_csv(tmp_path / "o" / "objectives.csv")) == 2
    assert main(base + ["--layers", "relu9", "--out", str(tmp_path / "bad")]) == 2


def _dead_red_model():
    """One red detector behind a ReLU with bias -0.7: dead (no gradient) for the grey initial image."""
    conv = nn.Conv2d(3, 1, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1))
        conv.bias.fill_(-0.7)
    return nn.Sequential(OrderedDict(conv=conv, relu=nn.ReLU(), gap=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten()))


@pytest.mark.parametrize("param", ["pixel", "fourier"])
def test_redirected_relu_revives_a_dead_unit(param):
    model = _dead_red_model()
    hooks = _hook_count(model)
    plain = visualize(model, [channel("relu", 0)], size=16, steps=64, param=param, progress=False)
    redirected = visualize(model, [channel("relu", 0)], size=16, steps=64, param=param, progress=False,
                           relu_redirect_steps=16)
    assert plain.objective_values[0] == 0.0  # never leaves the dead start
    assert redirected.objective_values[0] > 0.04  # measured 0.22 (pixel) and 0.045 (fourier)
    red = redirected.images.astype(float).mean(axis=(0, 1, 2))
    assert red[0] > red[1] and red[0] > red[2]
    assert _hook_count(model) == hooks


def test_redirected_gradient_follows_lucid_rule():
    from conceptlens.featurevis.relu import _RedirectedReLU

    # image 0 has a positive input (alive): plain ReLU gradient; image 1 is all negative (dead):
    # the incoming gradient passes except where it would push a negative input lower (grad > 0)
    x = torch.tensor([[[-1.0, 2.0, -3.0]], [[-1.0, -2.0, -3.0]]], requires_grad=True)
    grad = torch.tensor([[[1.0, -1.0, -2.0]], [[1.0, -1.0, -2.0]]])
    out = _RedirectedReLU.apply(x)
    out.backward(grad)
    torch.testing.assert_close(out, x.detach().clamp_min(0))
    reference = torch.autograd.grad(torch.relu(x[:1]), x, grad[:1])[0][0]
    torch.testing.assert_close(x.grad[0], reference)
    torch.testing.assert_close(x.grad[1], torch.tensor([[0.0, -1.0, -2.0]]))


def test_redirecting_needs_relu_modules():
    model = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 2, 1), gap=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten()))
    with pytest.raises(ConceptLensError, match="nn.ReLU modules"):
        visualize(model, [channel("conv", 0)], size=8, steps=2, progress=False, relu_redirect_steps=4)
    with pytest.raises(ConceptLensError, match="relu_redirect_steps must be a non-negative integer"):
        visualize(model, [channel("conv", 0)], size=8, steps=2, progress=False, relu_redirect_steps=-1)


def test_cli_visualize_units_concept_directions_and_diversity(demo_weights, demo_model, world_dir, tmp_path, capsys):
    from conceptlens.cli import main
    from conceptlens.concepts import TCAV, TCAVResult

    base = ["visualize", "--model", f"demo:{demo_weights}", "--layer", "conv4", "--size", "32", "--steps", "4", "-q"]
    assert main(base + ["--channels", "3", "--objective", "unit", "--diversity", "2", "--out", str(tmp_path / "u")]) == 0
    vis = Visualization.load(tmp_path / "u")
    assert len(vis.images) == 2 and (vis.images[0] != vis.images[1]).any()
    expected = unit("conv4", 3) + diversity("conv4", 1e2)
    assert vis.table["objective"].tolist() == [expected.description] * 2
    np.testing.assert_allclose(vis.objective_values, objective_values(demo_model, [expected] * 2, torch.from_numpy(
        vis.images).permute(0, 3, 1, 2).float() / 255), atol=5e-2)

    TCAV(demo_model, ["conv4"], runs=10, null_runs=20, n_bootstrap=100, progress=False).run(
        world_dir / "concepts", world_dir / "random", ["circle"], world_dir / "manifest.csv", split="test",
        max_inputs=10, concept_names=["tag", "red"]).save(tmp_path / "tcav")
    # TCAV's default CAVs live in the flattened conv4 map of 64 px images
    assert main(base + ["--size", "64", "--concepts", str(tmp_path / "tcav"), "--out", str(tmp_path / "c")]) == 0
    directions = TCAVResult.load(tmp_path / "tcav").concept_directions("conv4")
    assert Visualization.load(tmp_path / "c").table["objective"].tolist() == [
        direction("conv4", v).description for v in directions.values()]
    assert main(base + ["--out", str(tmp_path / "bad")]) == 2
    assert "pass exactly one of --channels" in capsys.readouterr().err
    assert main(base + ["--concepts", str(tmp_path / "tcav"), "--objective", "unit", "--out", str(tmp_path / "bad")]) == 2
    assert "--objective unit applies to --channels" in capsys.readouterr().err
    assert main(base + ["--channels", "1", "--diversity", "0", "--out", str(tmp_path / "bad")]) == 2
    assert "--diversity must be at least 1" in capsys.readouterr().err


def test_direction_in_the_flattened_map_is_its_dot_product():
    model = _colour_model()
    images = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    v = torch.randn(3 * 4 * 4, generator=torch.Generator().manual_seed(1))
    got = objective_values(model, [direction("conv", v)] * 2, images)
    with torch.no_grad():
        expected = model.conv(images).reshape(2, -1) @ v
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ConceptLensError, match=r"needs a vector of 3 values \(one per channel\) or 48"):
        objective_values(model, [direction("conv", v[:5])], images[:1])


def test_batched_scoring_equals_the_per_image_reference(demo_model):
    # the fast path buckets terms by kind and layer across the batch; Objective.evaluate is the
    # per-image reference it must agree with, on every term kind and on mixed objectives
    from conceptlens.featurevis import input_alpha, input_l2, input_tv, match
    from conceptlens.featurevis.objectives import batched_scorer
    from conceptlens.featurevis.render import _Scorer, _groups

    g = torch.Generator().manual_seed(2)
    x = torch.rand(12, 3, 64, 64, generator=g)
    target = torch.randn(64, 8, 8, generator=g)
    div = channel("conv4", 2) + diversity("conv4", 5.0)
    objectives = [channel("conv4", 3), unit("conv4", 5) - 0.5 * channel("relu1", 2), unit("conv4", 1, y=0, x=7),
                  direction("conv4", torch.randn(64, generator=g).numpy()),
                  direction("conv4", torch.randn(64 * 8 * 8, generator=g).numpy()), class_logit(1) + input_l2(1e-3),
                  match("conv4", target) + input_alpha(1e-5) + input_tv(1e-4), div, div, div, input_tv(2e-4, beta=1.0),
                  channel("conv4", 3) * 2]
    groups = _groups(objectives)
    order = [i for grp in groups for i in grp]
    with torch.no_grad():
        scorer = _Scorer(demo_model.module.eval(), demo_model.preprocessing, objectives, groups, 3, (64, 64))
        acts = scorer._forward(x[order])
        fast = batched_scorer(objectives, groups)(acts)
        reference, start = [], 0
        for grp in groups:
            reference.append(objectives[grp[0]].evaluate(acts, torch.arange(start, start + len(grp))))
            start += len(grp)
    torch.testing.assert_close(fast, torch.cat(reference), rtol=1e-5, atol=1e-6)


def test_inversion_tv_weight_grows_with_depth(demo_model):
    from conceptlens.featurevis import invert

    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    # listed out of depth order: the weight follows where the layer runs, not the list
    vis = invert(demo_model, x, ["conv4", "relu1", "relu3", "relu2"], steps=1, progress=False)
    w = vis.table.set_index("layer")["tv_weight"]
    assert w["relu1"] < w["relu2"] < w["relu3"] < w["conv4"], w
    assert 1e-5 < w["relu1"] and w["conv4"] < 1e-5 * 100
    fixed = invert(demo_model, x, ["relu1", "conv4"], steps=1, progress=False, tv_weight=3e-5)
    assert fixed.table["tv_weight"].tolist() == [3e-5, 3e-5]
    assert "3e-05*tv2(input)" in fixed.table["objective"][1]
    with pytest.raises(ConceptLensError, match=r"^tv_weight must be 'auto' or a non-negative number; got 'big'$"):
        invert(demo_model, x, ["relu1"], steps=1, progress=False, tv_weight="big")

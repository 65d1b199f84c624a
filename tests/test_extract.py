import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.models.feature_extraction import create_feature_extractor

from conceptlens.data import Manifest, Preprocessing, load_images
from conceptlens.errors import ConceptLensError
from conceptlens.core.extract import StoreRequest, capture, extract, iter_activations, iter_gradients, predict, predict_tensor
from conceptlens.core.store import ActivationStore

PREP = Preprocessing(resize=32, crop=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
LAYERS = ["layer2", "layer3.1.bn2", "layer4"]


def _reference(resnet18, manifest):
    """Layer outputs computed by torchvision's FX feature extractor, independently of our hooks."""
    x = load_images(Manifest.read(manifest), PREP)
    fx = create_feature_extractor(resnet18.module, return_nodes={n: n for n in LAYERS})
    with torch.no_grad():
        return fx(x)


def _count_forward_images(module):
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(len(args[0])))
    return seen, handle


def test_spatial_capture_equals_module_outputs(tmp_path, resnet18, image_manifest):
    store = extract(resnet18, image_manifest, LAYERS, tmp_path / "s", pool="none", dtype="float32",
                    batch_size=6, preprocessing=PREP, progress=False)
    ref = _reference(resnet18, image_manifest)
    for layer in LAYERS:
        np.testing.assert_allclose(store.load(layer), ref[layer].numpy(), rtol=1e-5, atol=1e-5)
    # bn2 is followed by an in-place add/ReLU in the block: the capture must be the BN output
    assert store.load("layer3.1.bn2").min() < 0
    assert store.n_rows == 20 and store.rows["manifest_row"].tolist() == list(range(20))
    assert store.rows["site"].tolist()[:3] == ["s0", "s1", "s2"]


@pytest.mark.parametrize("pool", ["mean", "max", "adaptive:2"])
def test_pooled_equals_pooling_of_spatial(tmp_path, resnet18, image_manifest, pool):
    spatial = extract(resnet18, image_manifest, LAYERS, tmp_path / "sp", pool="none", dtype="float32",
                      batch_size=8, preprocessing=PREP, progress=False)
    pooled = extract(resnet18, image_manifest, LAYERS, tmp_path / pool.replace(":", "_"), pool=pool,
                     dtype="float32", batch_size=8, preprocessing=PREP, progress=False)
    for layer in LAYERS:
        s = torch.from_numpy(spatial.load(layer))
        expected = {"mean": s.mean(dim=(2, 3)), "max": s.amax(dim=(2, 3)), "adaptive:2": F.adaptive_avg_pool2d(s, 2)}[pool]
        np.testing.assert_allclose(pooled.load(layer), expected.numpy(), rtol=1e-5, atol=1e-6)


def test_float16_default_for_spatial_and_chunked_reads(tmp_path, resnet18, image_manifest):
    store = extract(resnet18, image_manifest, ["layer3"], tmp_path / "s", pool="none", batch_size=7,
                    preprocessing=PREP, progress=False)
    assert store.meta["dtype"] == "float16" and store.array("layer3").dtype == np.float16
    chunks = list(store.iter_chunks("layer3", chunk_rows=6))
    assert [c[0] for c in chunks] == [0, 6, 12, 18]
    np.testing.assert_array_equal(np.concatenate([c[1] for c in chunks]), store.load("layer3"))


class _Interrupt(Exception):
    pass


def _interrupted_after_two_batches(model, manifest, layers, out, **kw):
    """An extraction stopped (by its observer) in the third batch: an unfinished store."""
    calls = []

    def stop_after_two_batches(rows, raw):
        calls.append(1)
        if len(calls) == 3:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        extract(model, manifest, layers, out, observers=[stop_after_two_batches], **kw)


def test_interrupted_store_resumes_and_equals_uninterrupted(tmp_path, resnet18, image_manifest):
    full = extract(resnet18, image_manifest, LAYERS, tmp_path / "full", pool="mean", batch_size=4,
                   preprocessing=PREP, progress=False)
    _interrupted_after_two_batches(resnet18, image_manifest, LAYERS, tmp_path / "part", pool="mean", batch_size=4,
                                   preprocessing=PREP, progress=False)
    with pytest.raises(ConceptLensError, match="unfinished.*resume"):
        ActivationStore.open(tmp_path / "part")
    seen, handle = _count_forward_images(resnet18.module)
    try:
        resumed = extract(resnet18, image_manifest, LAYERS, tmp_path / "part", pool="mean", batch_size=4,
                          preprocessing=PREP, progress=False)
    finally:
        handle.remove()
    assert sum(seen) == 20 - 8  # only the rows after the two completed batches ran again
    for layer in LAYERS:
        np.testing.assert_array_equal(resumed.load(layer), full.load(layer))
    assert resumed.rows.equals(full.rows)


def test_one_capture_pass_equals_separate_passes(tmp_path, resnet18, image_manifest):
    """Two stores (one layer pooled two ways), logits and a top-k observer from one forward per image."""
    from conceptlens.core.topk import TopK

    kw = dict(batch_size=6, preprocessing=PREP, progress=False)
    mean = extract(resnet18, image_manifest, ["layer2", "layer4"], tmp_path / "mean", pool="mean", **kw)
    grid = extract(resnet18, image_manifest, ["layer2"], tmp_path / "grid", pool="adaptive:2", **kw)
    rows, logits = predict(resnet18, image_manifest, **kw)
    alone = TopK(3)
    extract(resnet18, image_manifest, ["layer2", "layer4"], tmp_path / "alone", observers=[alone], **kw)
    together = TopK(3)
    seen, handle = _count_forward_images(resnet18.module)
    try:
        got = capture(resnet18, image_manifest, [StoreRequest(tmp_path / "m", ["layer2", "layer4"], "mean"),
                                                 StoreRequest(tmp_path / "g", ["layer2"], "adaptive:2")],
                      logits=True, observers=[together], **kw)
    finally:
        handle.remove()
    assert sum(seen) == 20 and got.forwarded == 20  # one forward per image for all four outputs
    for layer in ("layer2", "layer4"):
        np.testing.assert_array_equal(got.stores[0].load(layer), mean.load(layer))
    np.testing.assert_array_equal(got.stores[1].load("layer2"), grid.load("layer2"))
    assert got.stores[1].pool == "adaptive:2" and got.stores[1].meta["dtype"] == "float16"  # its own dtype (auto)
    np.testing.assert_array_equal(got.rows, rows)
    np.testing.assert_allclose(got.logits, logits, rtol=1e-6, atol=1e-6)
    for layer, (s, r, _) in alone.result().items():
        np.testing.assert_array_equal(together.result()[layer][1], r)
    # everything stored already and no logits asked: no forward at all
    seen, handle = _count_forward_images(resnet18.module)
    try:
        again = capture(resnet18, image_manifest, [StoreRequest(tmp_path / "m", ["layer2", "layer4"], "mean")], **kw)
    finally:
        handle.remove()
    assert seen == [] and again.forwarded == 0 and again.logits is None


def test_capture_keeps_resumed_stores_in_step(tmp_path, resnet18, image_manifest, caplog):
    kw = dict(batch_size=4, preprocessing=PREP, progress=False)
    full = extract(resnet18, image_manifest, ["layer2"], tmp_path / "full", **kw)
    _interrupted_after_two_batches(resnet18, image_manifest, ["layer2"], tmp_path / "a", **kw)
    # store a resumes at row 8, store b is new: both are written from row 0 in one pass
    with caplog.at_level(logging.INFO, logger="conceptlens"):
        got = capture(resnet18, image_manifest, [StoreRequest(tmp_path / "a", ["layer2"]), StoreRequest(tmp_path / "b", ["layer2"])], **kw)
    assert "rewriting it from the first row" in caplog.text and got.forwarded == 20
    for store in got.stores:
        np.testing.assert_array_equal(store.load("layer2"), full.load("layer2"))
        assert store.rows.equals(full.rows)


def test_complete_store_is_reused_only_for_the_same_request(tmp_path, resnet18, image_manifest, caplog):
    kw = dict(batch_size=8, preprocessing=PREP, progress=False)
    first = extract(resnet18, image_manifest, ["layer4"], tmp_path / "s", **kw).load("layer4")
    seen, handle = _count_forward_images(resnet18.module)
    try:
        extract(resnet18, image_manifest, ["layer4"], tmp_path / "s", **kw)
        assert sum(seen) == 0  # reused
        # other inputs: one image changed → rebuilt, with a warning naming what differs
        img = image_manifest.parent / "img" / "000.png"
        from PIL import Image

        Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(img)
        with caplog.at_level(logging.WARNING):
            second = extract(resnet18, image_manifest, ["layer4"], tmp_path / "s", **kw)
        assert sum(seen) == 20
        assert "manifest_hash" in caplog.text
        assert not np.array_equal(second.load("layer4")[0], first[0])
        np.testing.assert_array_equal(second.load("layer4")[1:], first[1:])
        # other pooling → rebuilt too
        third = extract(resnet18, image_manifest, ["layer4"], tmp_path / "s", pool="max", **kw)
        assert sum(seen) == 40 and third.pool == "max"
    finally:
        handle.remove()


def test_store_out_dir_that_is_not_a_store_is_refused(tmp_path, resnet18, image_manifest):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ConceptLensError, match="not empty and is not an activation store"):
        extract(resnet18, image_manifest, ["layer4"], tmp_path / "other", preprocessing=PREP, progress=False)


def test_gradients_equal_autograd_computed_directly(resnet18, image_manifest):
    x = load_images(Manifest.read(image_manifest), PREP)[:6]
    batches = [(torch.arange(3), x[:3]), (torch.arange(3, 6), x[3:])]
    got = list(iter_gradients(resnet18, batches, ["layer3", "layer4"], classes=[2, 7]))
    m = resnet18.module
    fx = create_feature_extractor(m, return_nodes={"layer3": "layer3"})
    for k, cls in enumerate([2, 7]):
        for b, (rows, xb) in enumerate(batches):
            # independent path: layer3 output from FX, then the rest of the network by hand
            a3 = fx(xb)["layer3"].detach().requires_grad_(True)
            a4 = m.layer4(a3)
            logits = m.fc(torch.flatten(m.avgpool(a4), 1))
            g3, g4 = torch.autograd.grad(logits[:, cls].sum(), [a3, a4])
            torch.testing.assert_close(got[b].gradients["layer3"][k], g3, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(got[b].gradients["layer4"][k], g4, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(got[b].activations["layer3"], a3.detach(), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got[b].logits, logits.detach(), rtol=1e-5, atol=1e-5)
    # the caller's model is unchanged: no hooks left, still in eval mode, parameters untouched
    assert not any(mod._forward_hooks for mod in m.modules())
    assert not m.training and all(p.grad is None for p in m.parameters())


def test_gradients_refuse_training_mode_and_bad_class(resnet18):
    batch = [(torch.arange(2), torch.randn(2, 3, 32, 32))]
    with pytest.raises(ConceptLensError, match="out of range"):
        list(iter_gradients(resnet18, batch, ["layer4"], classes=[10]))
    resnet18.module.train()
    try:
        with pytest.raises(ConceptLensError, match="training mode"):
            list(iter_gradients(resnet18, batch, ["layer4"], classes=[0]))
    finally:
        resnet18.module.eval()


def test_shared_module_is_refused_and_hooks_are_removed(resnet18):
    batch = [(torch.arange(2), torch.randn(2, 3, 32, 32))]
    with pytest.raises(ConceptLensError, match="runs 2 times per forward pass"):
        list(iter_activations(resnet18, batch, ["layer1.0.relu"]))
    assert not any(mod._forward_hooks for mod in resnet18.module.modules())


def test_skip_bad_images_are_counted_and_listed(tmp_path, resnet18, image_manifest):
    bad = image_manifest.parent / "img" / "005.png"
    bad.write_bytes(b"not a png")
    (image_manifest.parent / "img" / "011.png").unlink()
    with pytest.raises(ConceptLensError, match=r"image img/005.png at manifest row 5 \(line 7 of .*\): cannot decode.*--skip-bad"):
        extract(resnet18, image_manifest, ["layer4"], tmp_path / "a", batch_size=4, preprocessing=PREP, progress=False)
    store = extract(resnet18, image_manifest, ["layer4"], tmp_path / "b", batch_size=4, preprocessing=PREP,
                    skip_bad=True, progress=False)
    assert store.n_rows == 18 and store.load("layer4").shape == (18, 512)
    assert [(s["manifest_row"], s["image"]) for s in store.skipped] == [(5, "img/005.png"), (11, "img/011.png")]
    assert "file not found" in store.skipped[1]["error"]
    assert 5 not in store.rows["manifest_row"].tolist() and len(store.rows) == 18
    # surviving rows hold the right activations
    ref = extract(resnet18, Manifest.read(image_manifest).subset([i not in (5, 11) for i in range(20)]),
                  ["layer4"], tmp_path / "c", batch_size=4, preprocessing=PREP, progress=False)
    np.testing.assert_allclose(store.load("layer4"), ref.load("layer4"), rtol=1e-5, atol=1e-6)


def test_predict_equals_the_model_on_the_same_images_and_counts_skips(tmp_path, resnet18, image_manifest):
    x = load_images(Manifest.read(image_manifest), PREP)
    with torch.no_grad():
        direct = resnet18.module(x).numpy()
    rows, logits = predict(resnet18, image_manifest, batch_size=7, preprocessing=PREP, progress=False)
    assert rows.tolist() == list(range(20))
    np.testing.assert_allclose(logits, direct, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(predict_tensor(resnet18, x, batch_size=6).numpy(), direct, rtol=1e-5, atol=1e-5)
    (image_manifest.parent / "img" / "004.png").write_bytes(b"not a png")
    with pytest.raises(ConceptLensError, match="004.png"):
        predict(resnet18, image_manifest, preprocessing=PREP, progress=False)
    rows, logits = predict(resnet18, image_manifest, preprocessing=PREP, skip_bad=True, progress=False)
    assert 4 not in rows and len(logits) == 19

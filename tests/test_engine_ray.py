"""``engine="ray"``: sharded extraction in Ray actors writes the store a local run writes, bit for bit,
survives a killed actor, resumes by shard and refuses what it cannot do right."""

import builtins
import filecmp
import json
import logging
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import conceptlens
from conceptlens.cli import main
from conceptlens.core import engine as engine_module
from conceptlens.core.engine import check_engine, shard_ranges
from conceptlens.core.extract import extract
from conceptlens.data import Manifest
from conceptlens.errors import ConceptLensError
from conceptlens.models import load_model

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'conceptlens[ray]'; .ci/run installs it)")


@pytest.fixture(scope="module", autouse=True)
def cluster():
    # The workers import the conceptlens under test (installed, or the checkout).
    path = str(Path(conceptlens.__file__).parents[1])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield
    ray.shutdown()


def _same_store(a, b):
    assert a.meta == b.meta  # request, hash, shapes, rows, skipped
    for layer in a.layers:
        x, y = a.array(layer), b.array(layer)
        assert x.dtype == y.dtype and np.array_equal(x, y)  # bitwise (no NaNs in activations)
    assert filecmp.cmp(a.path / "rows.csv", b.path / "rows.csv", shallow=False)


N, BATCH = 384, 16  # 24 batches: enough shards to kill an actor mid-run, quick to extract


@pytest.fixture(scope="module")
def manifest(world_dir, tmp_path_factory):
    """The world's first N rows, image paths absolute (the CSV lives elsewhere)."""
    import pandas as pd

    frame = pd.read_csv(world_dir / "manifest.csv", dtype=str, keep_default_na=False).head(N)
    frame["image"] = [str(world_dir / p) for p in frame["image"]]
    path = tmp_path_factory.mktemp("data") / "manifest.csv"
    frame.to_csv(path, index=False)
    return path


def _extract(model, manifest, out, pool="mean", **kw):
    return extract(model, manifest, ["conv3", "conv4"], out, pool=pool, batch_size=BATCH, progress=False, **kw)


@pytest.fixture(scope="module")
def local_stores(demo_model, manifest, tmp_path_factory):
    root = tmp_path_factory.mktemp("local")
    return {pool: _extract(demo_model, manifest, root / pool, pool) for pool in ("mean", "none")}


def test_ray_store_is_the_local_store_bit_for_bit(demo_model, manifest, local_stores, tmp_path):
    out = tmp_path / "ray"
    store = _extract(demo_model, manifest, out, "mean", engine="ray", shards=5)
    _same_store(local_stores["mean"], store)
    assert not Path(f"{out}.shards").exists()
    # A complete store is reused, not recomputed.
    assert _extract(demo_model, manifest, out, "mean", engine="ray").meta == store.meta


def test_shards_start_at_batch_boundaries_and_cover_every_row():
    for n, batch, k in [(1200, 64, 5), (10, 64, 4), (130, 64, 8), (1, 1, 3), (1000, 7, 3)]:
        ranges = shard_ranges(n, batch, k)
        assert ranges[0][0] == 0 and ranges[-1][1] == n and len(ranges) <= k
        assert all(a % batch == 0 and a < b for a, b in ranges)
        assert all(b == a2 for (_, b), (a2, _) in zip(ranges, ranges[1:]))


def test_a_killed_actor_is_restarted_and_every_row_lands_once(demo_model, manifest, local_stores, tmp_path):
    out = tmp_path / "killed"
    result = {}
    run = threading.Thread(target=lambda: result.update(store=_extract(demo_model, manifest, out, "none", engine="ray",
                                                                        shards=24)))  # spatial float16 maps
    run.start()
    shards = Path(f"{out}.shards")
    deadline = time.time() + 120
    while not (shards.exists() and any((d / "meta.json").is_file() for d in shards.iterdir())):
        assert time.time() < deadline, "no shard started"
        time.sleep(0.05)
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("conceptlens-extract-")]
    assert names and run.is_alive()
    ray.kill(ray.get_actor(names[0]), no_restart=False)  # as if its process died mid-shard
    run.join(timeout=300)
    assert not run.is_alive() and "store" in result
    _same_store(local_stores["none"], result["store"])


def test_an_interrupted_run_resumes_by_shard(demo_model, manifest, local_stores, tmp_path, monkeypatch, caplog):
    out = tmp_path / "resumed"
    real = engine_module._append
    calls = []

    def crash_after_two(writer, shard, start, stop):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the driver stopped after appending two shards
        calls.append(start)
        real(writer, shard, start, stop)

    monkeypatch.setattr(engine_module, "_append", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        _extract(demo_model, manifest, out, engine="ray", shards=6)
    monkeypatch.setattr(engine_module, "_append", real)
    second = shard_ranges(N, BATCH, 6)[1][1]
    with caplog.at_level(logging.INFO, logger="conceptlens.core.store"):
        store = _extract(demo_model, manifest, out, engine="ray", shards=6)
    assert f"at manifest row {second}" in caplog.text
    _same_store(local_stores["mean"], store)


def test_topk_ranked_in_the_actors_equals_the_local_top_k(demo_weights, manifest, tmp_path):
    base = ["topk", "--model", f"demo:{demo_weights}", "--data", str(manifest), "--layers", "conv3,conv4", "--k", "5",
            "--batch-size", str(BATCH), "--device", "cpu", "-q"]
    assert main(base + ["--out", str(tmp_path / "local")]) == 0
    assert main(["--engine", "ray"] + base + ["--out", str(tmp_path / "ray")]) == 0
    # Ranked during the (Ray) extraction, not by a fallback local pass:
    params = json.loads((tmp_path / "ray" / "topk.json").read_text())["params"]
    assert params["source"] == "extraction" and params["n_seen"] == N
    # Scores, rows and argmax locations of every (layer, channel, rank), and the store written with them.
    assert filecmp.cmp(tmp_path / "local" / "topk.csv", tmp_path / "ray" / "topk.csv", shallow=False)
    for name in ("conv3.npy", "conv4.npy", "rows.csv"):
        assert filecmp.cmp(tmp_path / "local" / "activations" / name, tmp_path / "ray" / "activations" / name,
                           shallow=False)


def test_dissection_with_its_forward_pass_on_ray_is_the_local_dissection(demo_model, world_dir, tmp_path):
    from conceptlens.dissection import dissect

    # The Broden set's manifest lives in memory (image paths under images/): the actors get it as is.
    runs = {e: dissect(demo_model, world_dir / "broden", ["conv4"], tmp_path / e, top_k=4, batch_size=BATCH,
                       progress=False, engine=e) for e in ("local", "ray")}
    local, remote = (runs[e].to_frame() for e in ("local", "ray"))
    assert local.equals(remote)
    np.testing.assert_array_equal(runs["local"].thresholds["conv4"], runs["ray"].thresholds["conv4"])


def test_workers_refuse_other_weights_and_missing_data(demo_weights, manifest, tmp_path):
    weights = tmp_path / "m.pt"
    shutil.copy(demo_weights, weights)
    shutil.copy(demo_weights.with_suffix(".json"), weights.with_suffix(".json"))
    model = load_model(f"demo:{weights}", device="cpu")
    state = torch.load(weights, weights_only=True)
    state["fc.bias"] += 1.0
    torch.save(state, weights)  # the file changed after the driver loaded it: the nodes load other weights
    with pytest.raises(ConceptLensError, match=r"node .*: demo:.*m\.pt loads weights \w+, not the driver's"):
        _extract(model, manifest, tmp_path / "a", engine="ray", shards=2)
    good = load_model(f"demo:{weights}", device="cpu")
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(manifest, data / "manifest.csv")
    m = Manifest.read(data / "manifest.csv")
    data.rename(tmp_path / "elsewhere")  # the driver read the manifest; the nodes do not see its folder
    with pytest.raises(ConceptLensError, match=r"node .*: the data folder .*data \(of .*manifest\.csv\) does not exist there"):
        _extract(good, m, tmp_path / "b", engine="ray", shards=2)


def test_engine_errors_are_one_line(monkeypatch, capsys, demo_weights):
    with pytest.raises(ConceptLensError, match="engine must be one of local, ray"):
        check_engine("spark")
    assert main(["--engine", "ray", "layers", f"demo:{demo_weights}"]) == 2
    assert "--engine ray runs extract, topk, dissect so far" in capsys.readouterr().err
    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(ConceptLensError, match=r'needs Ray, which is not installed; install it with pip install "conceptlens\[ray\]"'):
        check_engine("ray")

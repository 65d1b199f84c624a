"""Every analyzer result: one base (to_frame/save/load), one provenance schema, a clear error for
a folder that holds another result or none."""

import importlib
import json

import pytest

from conceptlens.core.result import PROVENANCE_SCHEMA, Result, provenance
from conceptlens.errors import ConceptLensError

RESULTS = [
    ("conceptlens.concepts.tcav", "TCAVResult"), ("conceptlens.dissection.dissect", "DissectionResult"),
    ("conceptlens.representation.probes", "ProbeResult"), ("conceptlens.representation.embed", "Embedding"),
    ("conceptlens.representation.neighbors", "NeighborResult"), ("conceptlens.representation.topk", "TopKResult"),
    ("conceptlens.attribution.explain", "Explanations"), ("conceptlens.attribution.spray", "SprayResult"),
    ("conceptlens.attribution.evaluate", "PerturbationResult"), ("conceptlens.attribution.evaluate", "LocalizationResult"),
    ("conceptlens.report.overview", "Overview"),
]
SCHEMA_KEYS = {"schema", "library_version", "model", "weights_hash", "data", "data_hash", "parameters",
               "preprocessing", "timings"}


@pytest.mark.parametrize("module,name", RESULTS)
def test_every_result_derives_from_the_base(module, name):
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, Result)
    for method in ("to_frame", "_write", "_read"):
        assert getattr(cls, method) is not getattr(Result, method), f"{name} does not implement {method}"
    assert "provenance" in cls.__dataclass_fields__ and cls.__dataclass_params__.frozen


def test_load_names_the_folder_and_the_kind(tmp_path):
    from conceptlens.representation.probes import ProbeResult
    from conceptlens.representation.topk import TopKResult

    with pytest.raises(ConceptLensError, match=r"holds no probe result \(no probes.json\)"):
        ProbeResult.load(tmp_path)
    (tmp_path / "probes.json").write_text(json.dumps({"kind": "top-k"}))
    with pytest.raises(ConceptLensError, match="holds a 'top-k' result, not a 'probe' result"):
        ProbeResult.load(tmp_path)
    (tmp_path / "topk.json").write_text("{")
    with pytest.raises(ConceptLensError, match="not valid JSON"):
        TopKResult.load(tmp_path)


def test_provenance_schema_from_a_manifest_and_a_store(tmp_path, demo_model, image_manifest):
    from conceptlens.core import extract
    from conceptlens.data import Manifest

    manifest = Manifest.read(image_manifest)
    p = provenance(demo_model, manifest, parameters={"k": 3}, timings={"total": 1.5}, extra="x")
    assert SCHEMA_KEYS <= set(p) and p["schema"] == PROVENANCE_SCHEMA and p["extra"] == "x"
    assert (p["model"], p["weights_hash"]) == (demo_model.spec, demo_model.weights_hash)
    assert p["data"] == str(manifest.path) and p["data_hash"] == manifest.content_hash()
    store = extract(demo_model, manifest, ["relu2"], tmp_path / "s", progress=False)
    q = provenance(store=store)
    assert (q["model"], q["weights_hash"], q["data_hash"]) == (p["model"], p["weights_hash"], p["data_hash"])
    assert q["store"]["hash"] == store.meta["hash"] and q["store"]["pool"] == "mean" and q["preprocessing"]
    # the data hash follows the images' contents
    first = manifest.image_paths()[0]
    first.write_bytes(first.read_bytes() + b"\0")
    assert provenance(data=manifest)["data_hash"] != p["data_hash"]


def test_saved_results_carry_the_schema(tmp_path, demo_model, image_manifest):
    from conceptlens.core import extract
    from conceptlens.representation import embed, probe
    from conceptlens.representation.topk import topk

    store = extract(demo_model, image_manifest, ["relu2", "relu3"], tmp_path / "s", progress=False)
    results = [probe(store, ["label"], n_permutations=2, n_bootstrap=10), embed(store, "relu3", "pca"),
               topk(demo_model, image_manifest, ["relu2"], k=2, progress=False)]
    for i, res in enumerate(results):
        back = type(res).load(res.save(tmp_path / f"r{i}"))
        assert SCHEMA_KEYS <= set(back.provenance) and back.provenance["timings"]["total"] >= 0
        assert back.provenance == json.loads(json.dumps(res.provenance, default=str))

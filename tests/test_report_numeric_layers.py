"""Layer names are strings end to end: the demo CNN as a user's ``nn.Sequential`` (layers '0'..'17')
through the report, with a failing decodability audit (the class label, which the trained model
encodes far better than its random-init copy)."""

import json

import pandas as pd
import torch

from conceptlens.report import build_report, load_spec

CODE = """
from torch import nn
from conceptlens.demo_model import DemoCNN


def build():
    children = list(DemoCNN({n_classes}).children())  # conv1 bn1 relu1 pool1 ... relu4 gap fc
    return nn.Sequential(*children[:-1], nn.Flatten(), children[-1])
"""

SPEC = """
title = "numeric layer names"
sections = ["audits", "overview", "layers"]
[model]
spec = "python:{code}:build:{weights}"
device = "cpu"
[data]
manifest = "{world}/manifest.csv"
[layers]
names = ["10", "14"]
[probes]
targets = ["label"]
[embedding]
method = "pca"
[audits]
not_decodable = ["label"]
"""


def test_report_with_numeric_layer_names_and_a_failing_audit(tmp_path, demo_weights, world_dir):
    side = json.loads(demo_weights.with_suffix(".json").read_text())
    code = tmp_path / "sequential_demo.py"
    code.write_text(CODE.format(n_classes=len(side["classes"])))
    demo = torch.load(demo_weights, weights_only=True)
    namespace = {}
    exec(code.read_text(), namespace)  # noqa: S102 - the test's own model code
    net = namespace["build"]()
    # Same tensors, positional names: children are registered in the demo's order.
    net.load_state_dict(dict(zip(net.state_dict(), demo.values())))
    torch.save(net.state_dict(), tmp_path / "seq.pt")
    (tmp_path / "seq.json").write_text(json.dumps({"classes": side["classes"], "preprocessing": side["preprocessing"]}))
    (tmp_path / "spec.toml").write_text(SPEC.format(code=code, weights=tmp_path / "seq.pt", world=world_dir))

    result = build_report(load_spec(tmp_path / "spec.toml"), tmp_path / "out", progress=False)

    html = result.index.read_text()
    assert 'id="audits"' in html and 'id="layers"' in html
    audits = pd.read_csv(tmp_path / "out" / "tables" / "audits.csv")
    (row,) = audits[audits["kind"] == "decodability"].itertuples()
    assert row.verdict == "fail" and "14" in row.evidence
    probes = pd.read_csv(tmp_path / "out" / "tables" / "probes.csv", dtype={"layer": str})
    assert set(probes["layer"]) == {"10", "14"}

"""Every public name a module declares in ``__all__`` exists, and nothing private leaks into it."""

import importlib

import pytest

MODULES = [
    "conceptlens.errors",
    "conceptlens.data",
    "conceptlens.models",
    "conceptlens.demo_model",
    "conceptlens.world",
    "conceptlens.representation",
    "conceptlens.core", "conceptlens.core.extract", "conceptlens.core.store", "conceptlens.core.topk",
    "conceptlens.core.corrections", "conceptlens.core.accumulate", "conceptlens.core.hashing", "conceptlens.core.result",
    "conceptlens.core.frozen",
    "conceptlens.plotting",
    "conceptlens.concepts", "conceptlens.concepts.cav", "conceptlens.concepts.stats", "conceptlens.concepts.tcav",
    "conceptlens.representation.probes", "conceptlens.representation.embed", "conceptlens.representation.neighbors", "conceptlens.representation.topk",
    "conceptlens.attribution", "conceptlens.attribution.methods", "conceptlens.attribution.evaluate",
    "conceptlens.attribution.spray", "conceptlens.attribution.explain",
    "conceptlens.dissection", "conceptlens.core.broden", "conceptlens.dissection.quantiles",
    "conceptlens.dissection.iou", "conceptlens.dissection.dissect",
    "conceptlens.review", "conceptlens.report", "conceptlens.report.review", "conceptlens.report.compare",
    "conceptlens.decision", "conceptlens.decision.contributions", "conceptlens.decision.tree",
    "conceptlens.featurevis", "conceptlens.featurevis.objectives", "conceptlens.featurevis.param",
    "conceptlens.featurevis.transforms", "conceptlens.featurevis.render", "conceptlens.featurevis.atlas",
    "conceptlens.core.projection", "conceptlens.correction", "conceptlens.correction.clarc",
    "conceptlens.correction.correct", "conceptlens.correction.evaluate", "conceptlens.correction.rrr",
]


@pytest.mark.parametrize("name", MODULES)
def test_all_names_exist_and_are_public(name):
    module = importlib.import_module(name)
    assert module.__all__, f"{name} declares no public names"
    for attr in module.__all__:
        assert not attr.startswith("_")
        assert hasattr(module, attr), f"{name}.__all__ lists {attr!r} but the module has no such name"

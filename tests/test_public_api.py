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
    "conceptlens.representation.extract",
    "conceptlens.representation.store",
]


@pytest.mark.parametrize("name", MODULES)
def test_all_names_exist_and_are_public(name):
    module = importlib.import_module(name)
    assert module.__all__, f"{name} declares no public names"
    for attr in module.__all__:
        assert not attr.startswith("_")
        assert hasattr(module, attr), f"{name}.__all__ lists {attr!r} but the module has no such name"

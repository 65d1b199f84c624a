"""Startup: the CLI module and each analyzer load only what they use (checked in fresh interpreters)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import conceptlens

HEAVY = ["torch", "torchvision", "sklearn", "sklearn.manifold", "umap", "faiss", "openTSNE", "captum", "zennit",
         "matplotlib", "scipy", "pandas"]


def _loaded_after(code):
    """Which of HEAVY a fresh interpreter has imported after running ``code``."""
    script = f"import sys, json\n{code}\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    env = {**os.environ, "PYTHONPATH": str(Path(conceptlens.__file__).parents[1])}  # the package under test
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout.splitlines()[-1]))


def test_cli_module_imports_no_heavy_library():
    assert _loaded_after("import conceptlens.cli; conceptlens.cli.build_parser()") == set()


def test_help_runs_without_heavy_libraries():
    code = ("import conceptlens.cli\ntry:\n    conceptlens.cli.main(['--help'])\nexcept SystemExit:\n    pass")
    assert _loaded_after(code) == set()


@pytest.mark.parametrize("code", [
    "import conceptlens.concepts",
    "from conceptlens.concepts import TCAV, fit_cavs",
    "from conceptlens.dissection import dissect, read_broden",
    "from conceptlens.core import extract, ActivationStore, TopK",
    "from conceptlens.representation import topk",
])
def test_analyzers_do_not_load_other_analyzers_libraries(code):
    assert not _loaded_after(code) & {"umap", "faiss", "sklearn.manifold", "openTSNE", "captum", "zennit", "matplotlib"}


def test_lazy_names_keep_meaning_functions_over_same_named_submodules():
    import conceptlens.dissection.dissect  # noqa: F401 - binds the submodule onto the package
    import conceptlens.core.extract  # noqa: F401
    from conceptlens import core, dissection, representation

    assert callable(core.extract) and core.extract.__name__ == "extract"
    assert callable(dissection.dissect)
    assert "probe" in dir(representation) and "embed" in dir(representation)
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        representation.nope  # noqa: B018

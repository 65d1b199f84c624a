"""The layering: analyzers import only the core, ``models``, ``data`` and their own package, and
importing one analyzer loads none of the heavy dependencies of another."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import conceptlens

PACKAGE = Path(conceptlens.__file__).parent
ANALYZERS = ("concepts", "dissection", "representation", "attribution", "review", "decision", "featurevis")
SHARED = {"core", "models", "data", "errors", "_lazy", "_threads"}


def _imports(path):
    """Every ``conceptlens`` module a source file imports, as absolute dotted names."""
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    package = list(rel.parts[:-1])  # a module's package; for __init__.py, the package itself
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                found.append(".".join(base + ([node.module] if node.module else [])))
            else:
                found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
    return [name for name in found if name and name.split(".")[0] == "conceptlens"]


def _boundary_violations(analyzer):
    bad = []
    for path in sorted((PACKAGE / analyzer).rglob("*.py")):
        for target in _imports(path):
            parts = target.split(".")
            if len(parts) > 1 and parts[1] not in SHARED | {analyzer}:
                bad.append(f"{path.relative_to(PACKAGE)} imports {target}")
    return bad


@pytest.mark.parametrize("analyzer", ANALYZERS)
def test_analyzer_imports_only_the_core_and_itself(analyzer):
    assert _boundary_violations(analyzer) == []


def test_the_checker_sees_a_crossing(tmp_path, monkeypatch):
    # The test above must be able to fail: a planted cross-analyzer import is reported.
    fake = tmp_path / "conceptlens"
    (fake / "concepts").mkdir(parents=True)
    (fake / "concepts" / "bad.py").write_text("from ..representation.embed import embed\nfrom ..core import TopK\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert _boundary_violations("concepts") == ["concepts/bad.py imports conceptlens.representation.embed"]


def test_core_and_world_import_no_analyzer():
    for part in ("core", "world"):
        for path in sorted((PACKAGE / part).rglob("*.py")):
            crossing = [t for t in _imports(path) if len(t.split(".")) > 1 and t.split(".")[1] in ANALYZERS + ("report", "correction")]
            assert crossing == [], f"{path.relative_to(PACKAGE)} imports {crossing}"


HEAVY = ("umap", "openTSNE", "faiss", "sklearn.manifold", "matplotlib")


def test_importing_concepts_loads_no_embedding_or_neighbour_library():
    code = ("import sys, json; import conceptlens.concepts as c; from conceptlens.concepts import tcav, cav, stats; "
            "import conceptlens.concepts.tcav; "
            f"print(json.dumps([m for m in {list(HEAVY)!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PACKAGE.parent)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []

"""The package as users get it: tests run against the installed wheel, which carries every file.

README's test command (`pip install ".[test]" && pytest`) imports the installed package, not the
checkout; a file the package reads but the wheel leaves out (the report templates once) then fails
here and in the report tests, instead of only for users.
"""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import conceptlens

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "conceptlens"
INSTALLED = Path(conceptlens.__file__).resolve().parent
FROM_CHECKOUT = INSTALLED == SOURCE.resolve()


def _package_files(root, prefix=""):
    return {prefix + p.relative_to(root).as_posix() for p in root.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


def test_tests_run_against_the_installed_package():
    if FROM_CHECKOUT and os.environ.get("CONCEPTLENS_TEST_CHECKOUT") == "1":
        pytest.skip("CONCEPTLENS_TEST_CHECKOUT=1: testing the checkout on purpose")
    assert not FROM_CHECKOUT, (
        f"conceptlens was imported from the checkout ({INSTALLED}), not the installed package: run "
        "`pip install '.[test]' && pytest` (not `python -m pytest`, which puts the checkout first on sys.path), "
        "or set CONCEPTLENS_TEST_CHECKOUT=1 to test the checkout deliberately"
    )


@pytest.mark.skipif(not SOURCE.is_dir(), reason="no source tree beside the tests")
def test_installed_package_carries_every_source_file(tmp_path):
    expected = _package_files(SOURCE)
    assert "report/templates/report.html.j2" in expected
    if FROM_CHECKOUT:
        # Testing the checkout: build the wheel and read its file list instead.
        pytest.importorskip("setuptools")
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
        (wheel,) = tmp_path.glob("conceptlens-*.whl")
        with zipfile.ZipFile(wheel) as zf:
            shipped = {n[len("conceptlens/"):] for n in zf.namelist() if n.startswith("conceptlens/")}
    else:
        shipped = _package_files(INSTALLED)
    missing = sorted(expected - shipped)
    assert not missing, f"files of the source tree missing from the installed package: {missing}"

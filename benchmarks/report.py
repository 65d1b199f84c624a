"""The report: rendering cost next to the analyses, and the speed-up of a cached re-run.

Builds the demo report (concept world → demo CNN → every section) once from scratch, then again
with the same spec (every stage loads its cached result). Prints

* ``report_render_fraction``: time to build the page (figures, tables, HTML) from cached results,
  divided by the time of the analyses of the first run (target < 0.1);
* ``report_rerun_speedup``: first build / cached re-build, both whole ``build_report`` calls
  (target >= 5).

    python benchmarks/report.py [--quick]
"""

import argparse
import tempfile
import time
from pathlib import Path

from conceptlens.report import build_report, load_spec
from conceptlens.report.demo import run_demo


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the demo's quick world (1200 images)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "demo"
        t0 = time.perf_counter()
        first = run_demo(out, quick=args.quick, progress=False, log=print)
        first_total = time.perf_counter() - t0
        spec = load_spec(out / "report.toml")
        t1 = time.perf_counter()
        again = build_report(spec, out / "report", progress=False)
        again_total = time.perf_counter() - t1
    assert all(s["cached"] for s in again.stages)
    print(f"first build: analyses {first.analysis_seconds:.1f} s, rendering {first.render_seconds:.1f} s "
          f"(whole demo incl. world and training {first_total:.1f} s)")
    print(f"cached re-build: {again_total:.2f} s (loading results {again.analysis_seconds:.2f} s, rendering {again.render_seconds:.2f} s)")
    build_first = first.analysis_seconds + first.render_seconds
    print(f"BENCH report_render_fraction {again.render_seconds / first.analysis_seconds:.4f}")
    print(f"BENCH report_rerun_speedup {build_first / again_total:.1f}")


if __name__ == "__main__":
    main()

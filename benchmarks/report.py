"""The report: its passes over the manifest, rendering cost next to the analyses, cached re-runs.

Builds the demo report (concept world → demo CNN → every section) once from scratch, then again
with the same spec (every stage loads its cached result), then once more from scratch into another
folder with the report's capture stage replaced by the three passes it made before the capture
plan (#15): ``predict`` for the overview, ``topk(..., store=...)`` for the mean-pooled store with
its top-k images, and an early-stopped ``extract`` of the layout layer. Both from-scratch builds
run every other stage unchanged on the same model, manifest and spec, and their captured outputs
are checked equal before any figure is printed. A forward pre-hook on the report's model counts
the images each stage sends through it. Prints

* ``report_forward_passes``: images forwarded by the capture stage / manifest images (target 1);
  ``report_forward_passes_old`` the same for the three stages it replaces (3);
* ``report_analysis_seconds_ratio``: analysis seconds of the build with the capture plan over those
  of the build with the three passes (all stages, both from scratch), and
  ``report_capture_seconds_ratio`` the same for the capture work alone;
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

import numpy as np
import pandas as pd

import conceptlens.report.build as build_module
from conceptlens.core import ActivationStore, extract, predict
from conceptlens.data import Manifest
from conceptlens.report import build_report, load_spec
from conceptlens.report import sections as S
from conceptlens.report.demo import run_demo
from conceptlens.report.overview import Overview, overview_from_logits
from conceptlens.representation.topk import TopKResult, topk

OLD_STAGES = ("overview", "activations", "layout")


def three_pass_capture(run, results):
    """The peer: the report's capture as three cached stages, one pass over the manifest each."""
    spec = run.spec
    layers, layout = list(spec.layers), [spec.duplicate_layer or spec.layers[0]]

    def overview(d):
        rows, logits = predict(run.model, run.manifest, batch_size=spec.batch_size, progress=False)
        overview_from_logits(run.model, run.manifest, rows, logits).save(d)

    def activations(d):
        topk(run.model, run.manifest, layers, k=S.TOPK, store=d / "store", pool="mean", batch_size=spec.batch_size,
             progress=False).save(d / "topk")

    ov = run.stage("overview", {}, overview, Overview.load)
    top, store = run.stage("activations", {"layers": layers, "k": S.TOPK}, activations,
                           lambda d: (TopKResult.load(d / "topk"), ActivationStore.open(d / "store")))
    lay = run.stage("layout", {"layer": layout[0], "pool": S.LAYOUT_POOL},
                    lambda d: extract(run.model, run.manifest, layout, d / "store", pool=S.LAYOUT_POOL,
                                      batch_size=spec.batch_size, progress=False),
                    lambda d: ActivationStore.open(d / "store"))
    return {"overview": ov, "_capture": {"overview": ov, "topk": top, "store": store, "layout": lay}}


def _counting(seen):
    """``load_model`` for the report that counts the images each forward of the loaded model gets."""
    real = build_module.load_model

    def load(*args, **kwargs):
        model = real(*args, **kwargs)
        root = model.module
        root.register_forward_pre_hook(lambda m, a: seen.append(len(a[0])) if m is root else None)
        return model
    return load


def _build(spec, out, seen, stages=None):
    """A from-scratch build; returns the result and the images forwarded inside each stage."""
    per_stage = {}
    real_stage = build_module._Run.stage

    def counted_stage(run, name, params, compute, load):
        before = sum(seen)
        result = real_stage(run, name, params, compute, load)
        per_stage[name] = sum(seen) - before
        return result

    original = S.STAGES[:]
    if stages is not None:
        S.STAGES[:] = stages
    build_module._Run.stage = counted_stage
    try:
        return build_report(spec, out, progress=False), per_stage
    finally:
        S.STAGES[:] = original
        build_module._Run.stage = real_stage


def _captured(out, names):
    """The overview predictions, top-k table and both stores of a build's cache."""
    cache = Path(out) / "cache"
    found = {}
    for name in names:
        (d,) = cache.glob(f"{name}-*")
        found[name] = d
    if "capture" in found:
        d = found["capture"]
        return (pd.read_csv(d / "overview" / "predictions.csv"), pd.read_csv(d / "topk" / "topk.csv"),
                ActivationStore.open(d / "store"), ActivationStore.open(d / "layout"))
    return (pd.read_csv(found["overview"] / "predictions.csv"), pd.read_csv(found["activations"] / "topk" / "topk.csv"),
            ActivationStore.open(found["activations"] / "store"), ActivationStore.open(found["layout"] / "store"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the demo's quick world (1200 images)")
    args = parser.parse_args()
    seen = []
    build_module.load_model = _counting(seen)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "demo"
        run_demo(out, quick=args.quick, progress=False, log=print)  # world, model, spec (and a first report, not timed)
        spec = load_spec(out / "report.toml")
        n_images = len(Manifest.read(spec.manifest))
        t0 = time.perf_counter()
        first, new_forwards = _build(spec, out / "report-new", seen)
        first_total = time.perf_counter() - t0
        t1 = time.perf_counter()
        again = build_report(spec, out / "report-new", progress=False)
        again_total = time.perf_counter() - t1
        old, old_forwards = _build(spec, out / "report-old", seen, [three_pass_capture] + S.STAGES[1:])
        new_out, old_out = _captured(out / "report-new", ["capture"]), _captured(out / "report-old", OLD_STAGES)
        pd.testing.assert_frame_equal(new_out[0], old_out[0])
        pd.testing.assert_frame_equal(new_out[1], old_out[1])
        for a, b in zip(new_out[2:], old_out[2:]):
            assert a.layers == b.layers
            for layer in a.layers:
                np.testing.assert_array_equal(a.load(layer), b.load(layer))
    assert all(s["cached"] for s in again.stages)
    seconds = {s["name"]: s["seconds"] for s in first.stages}
    old_seconds = {s["name"]: s["seconds"] for s in old.stages}
    print(f"# forwards per stage, capture plan: {new_forwards}")
    print(f"# forwards per stage, three passes: {old_forwards}")
    print(f"# analyses: capture plan {first.analysis_seconds:.1f} s (capture {seconds['capture']:.1f} s), "
          f"three passes {old.analysis_seconds:.1f} s ({' + '.join(f'{old_seconds[n]:.1f}' for n in OLD_STAGES)} s)")
    print(f"first build: analyses {first.analysis_seconds:.1f} s, rendering {first.render_seconds:.1f} s "
          f"(whole build_report {first_total:.1f} s)")
    print(f"cached re-build: {again_total:.2f} s (loading results {again.analysis_seconds:.2f} s, rendering {again.render_seconds:.2f} s)")
    build_first = first.analysis_seconds + first.render_seconds
    print(f"BENCH report_forward_passes {new_forwards['capture'] / n_images:.2f}")
    print(f"BENCH report_forward_passes_old {sum(old_forwards[n] for n in OLD_STAGES) / n_images:.2f}")
    print(f"BENCH report_analysis_seconds_ratio {first.analysis_seconds / old.analysis_seconds:.3f}")
    print(f"BENCH report_capture_seconds_ratio {seconds['capture'] / sum(old_seconds[n] for n in OLD_STAGES):.3f}")
    print(f"BENCH report_render_fraction {again.render_seconds / first.analysis_seconds:.4f}")
    print(f"BENCH report_rerun_speedup {build_first / again_total:.1f}")


if __name__ == "__main__":
    main()

"""``run_demo``: concept world → demo CNN → full report, on the embedded default."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from ..demo_model import train_demo
from ..models import resolve_device
from ..world import generate_world
from .build import build_report
from .spec import load_spec

__all__ = ["run_demo", "run_histo_demo", "DEMO_SPEC", "HISTO_REVIEW_SPEC", "HistoDemo"]

#: The report spec the demo writes as ``<out>/report.toml`` (paths relative to it);
#: ``data_manifests/report-demo.toml`` is this text with the defaults filled in.
DEMO_SPEC = """\
# Report spec written by `conceptlens demo`; edit it and run `conceptlens report report.toml --out report`.
title = "conceptlens demo: the demo CNN on the concept world"
seed = {seed}

[model]
spec = "demo:model/demo.pt"
device = "{device}"

[data]
manifest = "world/manifest.csv"

[layers]
names = ["conv1", "conv2", "conv3", "conv4"]

[concepts]
dir = "world/concepts"
random_pool = "world/random"
# Every (concept, layer, class) test counts in the Holm correction: test what you mean to ask.
names = ["tag", "red", "blue", "stripes", "dots"]
classes = ["circle", "square"]
layers = ["conv3", "conv4"]
# runs: chosen for power (as many as the concept images allow at 2 per run, at most 50)

[dissection]
broden = "world/broden"
layers = ["conv3", "conv4"]

[probes]
targets = ["label", "has_tag", "color", "texture", "scene", "subclass"]

[embedding]
method = "tsne"

[dataset]
# Near-duplicates: the layout of an early layer (pooled to 4 x 4), cosine >= the threshold.
layer = "relu1"
duplicate_threshold = 0.99

[drilldown]
methods = ["saliency", "integrated-gradients", "gradcam", "lrp-epsilon-plus-flat"]
samples = 2
spray_classes = ["circle"]

[audits]
# The world plants the tag in most training circles: a model that learned the shortcut fails these.
insensitive = ["tag:circle"]
# Attributes the features must not encode, checked with linear probes against a control task, e.g. the
# hospital of a scan: not_decodable = ["site"]. (The tag is drawn in the pixels, so every model encodes it.)
"""


DUPLICATES, LABEL_NOISE = 10, 0.02
# TCAV's split design gives each run its own concept images: 100 images -> 50 runs of 2 per CAV.
CONCEPT_IMAGES = 100


def _reuse_or_train(world, weights, epochs, seed, device, progress):
    side_path = Path(weights).with_suffix(".json")
    if side_path.is_file():
        side = json.loads(side_path.read_text())
        if (side.get("world_hash"), side.get("epochs"), side.get("train_seed")) == (world.content_hash, epochs, seed):
            return side, True
    return train_demo(world.root, weights, epochs=epochs, seed=seed, device=device, progress=progress), False


def run_demo(out="conceptlens-demo", quick=False, seed=0, device="auto", tag_bias=0.9, progress=True, log=None):
    """Build the concept world, train (or reuse) the demo CNN and write the full report.

    Parameters
    ----------
    out : str or Path
        Folder for ``world/``, ``model/``, ``report.toml`` and ``report/``.
    quick : bool
        Smaller world and shorter training.
    device : str
        ``auto``, ``cpu`` or ``cuda[:N]``, for training and the report; checked before any work.
    tag_bias : float
        Tag/class association of the training split (0 = an unbiased world).
    log : callable, optional
        ``log(message)`` for progress lines.

    Returns
    -------
    ReportResult
    """
    resolve_device(device)  # a bad or absent device fails now, not after building the world and training
    log = log or (lambda message: None)
    out = Path(out).resolve()
    n, epochs = (1200, 12) if quick else (2000, 15)
    t0 = time.perf_counter()
    # Planted for the dataset review: near-copies of train images in the test split, a few flipped labels.
    world = generate_world(out / "world", n=n, size=64, seed=seed, tag_bias=tag_bias, near_duplicates=DUPLICATES,
                           label_noise=LABEL_NOISE, n_concept=CONCEPT_IMAGES, progress=progress)
    log(f"[{time.perf_counter() - t0:6.1f} s] concept world: {n} images in {world.root}")
    weights = out / "model" / "demo.pt"
    side, reused = _reuse_or_train(world, weights, epochs, seed, device, progress)
    log(f"[{time.perf_counter() - t0:6.1f} s] demo CNN: test accuracy {side['test_accuracy']:.3f}"
        f"{' (reused)' if reused else ''} ({weights})")
    spec_path = out / "report.toml"
    spec_path.write_text(DEMO_SPEC.format(seed=seed, device=device))

    def on_stage(name, seconds, cached):
        log(f"[{time.perf_counter() - t0:6.1f} s] {name}: {seconds:.1f} s{' (cached)' if cached else ''}")

    return build_report(load_spec(spec_path), out / "report", progress=progress, on_stage=on_stage)


#: The review spec the histo demo writes as ``<out>/review-{before,after}.toml``.
HISTO_REVIEW_SPEC = """\
# Review spec written by `conceptlens demo --preset histo`; run `conceptlens review {name}.toml --out {name}`.
title = "conceptlens dataset review: {title}"
seed = {seed}

[model]
spec = "demo:{name}/model/demo.pt"
device = "{device}"

[data]
manifest = "{manifest}"

[layers]
names = ["relu1", "conv3", "conv4"]

[concepts]
# TCAV of the attributes' concept folders: `pen`, and one folder per site stain (site0, site1, ...).
dir = "{world}/concepts"
random_pool = "{world}/random"
layers = ["conv4"]

[dataset]
# Near-duplicates: the layout of an early layer (pooled to 4 x 4), cosine >= the threshold.
layer = "relu1"
duplicate_threshold = 0.99

[review]
group = "patient"              # a patient in two splits is leakage
sensitive = ["site", "pen"]    # audited as shortcuts
group_attributes = ["site"]    # a patient sits at one site
layer = "conv4"                # features of the slice discovery and label-issue probes
split = "test"                 # where the model is evaluated
"""


@dataclass(frozen=True)
class HistoDemo:
    """What :func:`run_histo_demo` built: the two reviews and their comparison."""

    before: object
    after: object
    compare: Path


def run_histo_demo(out="conceptlens-histo-demo", quick=False, seed=0, device="auto", progress=True, log=None):
    """The dataset-design loop on the ``histo`` world: review a biased dataset, fix it, retrain, compare.

    Before: sites confounded with classes, pen marks mostly on tumour slides, patients leaking across
    splits, near-duplicates and label noise. The fixes a team would apply: a site-balanced,
    pen-balanced collection (the same world drawn with ``site_bias=0, pen_bias=0``) re-split by
    patient with ``conceptlens split``. Each dataset trains the demo CNN and gets a review; the
    comparison page shows which findings the fixes resolved.

    Parameters
    ----------
    out : str or Path
        Folder for ``before/`` and ``after/`` (world, model, review), the specs and ``compare/``.
    quick : bool
        Smaller worlds and shorter training.
    seed, device, progress, log
        As :func:`run_demo`.

    Returns
    -------
    HistoDemo
    """
    from ..review import write_split
    from .compare import compare_results, write_compare_page
    from .review import build_review

    resolve_device(device)
    log = log or (lambda message: None)
    out = Path(out).resolve()
    n, epochs = (1200, 12) if quick else (2000, 15)
    t0 = time.perf_counter()

    def on_stage(name, seconds, cached):
        log(f"[{time.perf_counter() - t0:6.1f} s] {name}: {seconds:.1f} s{' (cached)' if cached else ''}")

    common = dict(preset="histo", n=n, size=64, seed=seed, leak_patients=5, near_duplicates=6, label_noise=0.03,
                  n_concept=40, n_random=120, progress=progress)
    built = {}
    for name, fix in (("before", {}), ("after", {"site_bias": 0.0, "pen_bias": 0.0})):
        world = generate_world(out / name / "world", **common, **fix)
        manifest = world.manifest
        if fix:
            manifest = world.root / "manifest-by-patient.csv"
            moved = write_split(world.manifest, manifest, group="patient", stratify="label", test=0.25, seed=seed)
            log(f"[{time.perf_counter() - t0:6.1f} s] split by patient -> {manifest}\n" + moved.summary_text())
        log(f"[{time.perf_counter() - t0:6.1f} s] histo world ({name}): {n} images in {world.root}")
        weights = out / name / "model" / "demo.pt"
        side = train_demo(world.root, weights, epochs=epochs, seed=seed, device=device, progress=progress, manifest=manifest)
        log(f"[{time.perf_counter() - t0:6.1f} s] demo CNN ({name}): test accuracy {side['test_accuracy']:.3f}")
        spec_path = out / f"review-{name}.toml"
        spec_path.write_text(HISTO_REVIEW_SPEC.format(
            name=name, title=f"{name} the fix", seed=seed, device=device, world=f"{name}/world",
            manifest=Path(manifest).relative_to(out).as_posix()))
        built[name] = build_review(load_spec(spec_path), out / name / "review", progress=progress, on_stage=on_stage)
        log(f"[{time.perf_counter() - t0:6.1f} s] review ({name}): {built[name].index}")
    comparison = compare_results(out / "before" / "review", out / "after" / "review")
    index = write_compare_page(comparison, out / "compare", title="conceptlens histo demo: before and after the fix")
    comparison.save(out / "compare" / "comparison")
    log(f"[{time.perf_counter() - t0:6.1f} s] comparison: {index}")
    return HistoDemo(before=built["before"], after=built["after"], compare=index)

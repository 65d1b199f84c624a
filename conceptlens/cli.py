"""``conceptlens <command>``: a thin layer that parses arguments and calls the Python API.

User errors (:class:`~conceptlens.errors.ConceptLensError`) print one line on stderr and exit with
status 2; no traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

from . import __version__
from ._threads import thread_limits
from .errors import ConceptLensError

logger = logging.getLogger("conceptlens")


def _floats3(text):
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers, got {text!r}") from None
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers (R,G,B), got {text!r}")
    return values


def _csv_list(text):
    return [s.strip() for s in text.split(",") if s.strip()]


def _add_model_args(p, layers=True, required=True):
    p.add_argument("--model", required=required, help="model spec: demo:W.pt | torchvision:ARCH[:W.pt] | python:MOD:FACTORY[:W.pt] | export:P.pt2")
    p.add_argument("--num-classes", type=int, default=None, help="head size for torchvision architectures (default: from the weights, else 1000)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default auto: CUDA when present)")
    if layers:
        p.add_argument("--layers", required=required, type=_csv_list, help="comma-separated layer names (see `conceptlens layers MODEL`)")


def _add_data_args(p, required=True, loader=True):
    p.add_argument("--data", required=required, help="data manifest CSV (column 'image', paths relative to the CSV)")
    if loader:
        p.add_argument("--batch-size", type=int, default=64)
        p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
        p.add_argument("--skip-bad", action="store_true", help="skip unreadable images (counted and listed) instead of failing")
    p.add_argument("--resize", type=int, default=None, help="resize the shorter side to N pixels (0: no resize; default: the model's)")
    p.add_argument("--crop", type=int, default=None, help="centre crop to N x N (0: no crop; default: the model's)")
    p.add_argument("--mean", type=_floats3, default=None, help="normalisation mean R,G,B (default: the model's)")
    p.add_argument("--std", type=_floats3, default=None, help="normalisation std R,G,B (default: the model's)")


def _preprocessing(args, model, manifest):
    return model.preprocessing_for(manifest, resize=args.resize, crop=args.crop, mean=args.mean, std=args.std)


def _cmd_world(args):
    from .world import generate_world

    # Preset-specific options (default None: unset): config field (= argparse dest) -> (flag, preset).
    specific = {
        "tag_bias": ("--tag-bias", "shapes"), "subclass": ("--no-subclass", "shapes"),
        "site_bias": ("--site-bias", "histo"), "n_sites": ("--sites", "histo"), "pen_bias": ("--pen-bias", "histo"),
        "patches_per_patient": ("--patches-per-patient", "histo"), "leak_patients": ("--leak-patients", "histo"),
    }
    options = {}
    for field, (flag, preset) in specific.items():
        value = getattr(args, field)
        if value is None:
            continue
        if preset != args.preset:
            raise ConceptLensError(f"{flag} applies to the {preset} preset, not {args.preset}; drop it or pass --preset {preset}")
        options[field] = value
    t0 = time.perf_counter()
    world = generate_world(
        args.out,
        preset=args.preset,
        n=args.n,
        size=args.size,
        seed=args.seed,
        label_noise=args.label_noise,
        near_duplicates=args.near_duplicates,
        **options,
    )
    print(f"concept world ({args.preset}, {args.n} images, {args.size} px, seed {args.seed}) in {world.root} "
          f"[{time.perf_counter() - t0:.1f} s]")
    print(f"  manifest: {world.manifest}\n  broden:   {world.broden}\n  concepts: {world.concepts}\n  random:   {world.random}")


def _cmd_train_demo(args):
    from .demo_model import train_demo

    side = train_demo(args.world, args.out, epochs=args.epochs, seed=args.seed, device=args.device, progress=not args.quiet,
                      manifest=args.manifest)
    print(f"demo CNN saved to {args.out} (+ sidecar {Path(args.out).with_suffix('.json')}): "
          f"test accuracy {side['test_accuracy']:.3f}, trained in {side['train_seconds']:.0f} s")


def _cmd_layers(args):
    from .models import list_layers, load_model

    model = load_model(args.model, device=args.device, num_classes=args.num_classes)
    frame = list_layers(model, input_size=args.input_size)
    with __import__("pandas").option_context("display.max_rows", None, "display.width", 200):
        print(frame.to_string(index=False))


def _cmd_extract(args):
    from .data import Manifest
    from .models import load_model
    from .core.extract import extract

    model = load_model(args.model, device=args.device, num_classes=args.num_classes)
    manifest = Manifest.read(args.data)
    store = extract(
        model,
        manifest,
        args.layers,
        args.out,
        pool=args.pool,
        dtype=args.dtype,
        batch_size=args.batch_size,
        num_workers=args.workers,
        skip_bad=args.skip_bad,
        preprocessing=_preprocessing(args, model, manifest),
        progress=not args.quiet,
        engine=args.engine,
        shards=args.shards,
    )
    _print_store(store)


def _print_store(store):
    print(f"activation store {store.path}: {store.n_rows} rows, pool {store.pool}, dtype {store.meta['dtype']}")
    for layer in store.layers:
        print(f"  {layer:<24} {'x'.join(map(str, store.shape(layer)))}")
    _print_skipped(store.skipped)


def _print_skipped(skipped):
    """The images a ``--skip-bad`` run left out, as its results list them."""
    if skipped:
        print(f"  skipped {len(skipped)} unreadable images:")
        for s in skipped:
            where = f"manifest row {s['manifest_row']}" if s.get("manifest_row") is not None else s["source"]
            print(f"    {where}: {s['image']}: {s['error']}")


def _print_report(result):
    print(f"report: {result.index}  (analyses {result.analysis_seconds:.1f} s, rendering {result.render_seconds:.1f} s)")


def _print_stage(name, seconds, cached):
    print(f"  {name:<12} {seconds:6.1f} s{'  (cached)' if cached else ''}", flush=True)


def _cmd_report(args):
    from .report import build_report, load_spec

    _print_report(build_report(load_spec(args.spec), args.out, progress=not args.quiet, on_stage=_print_stage))


def _cmd_review(args):
    from .report import load_spec
    from .report.review import build_review

    built = build_review(load_spec(args.spec), args.out, progress=not args.quiet, on_stage=_print_stage)
    print(f"review: {built.index}  (analyses {built.analysis_seconds:.1f} s, rendering {built.render_seconds:.1f} s)")
    for r in built.result.findings.itertuples():
        print(f"  {r.verdict:<12} {r.id:<28} {r.statistic} {r.value:.3g}")


def _cmd_split(args):
    from .review import write_split

    stratify = None if args.stratify.lower() == "none" else args.stratify
    result = write_split(args.manifest, args.out, group=args.group, stratify=stratify, test=args.test, seed=args.seed)
    print(f"split by {args.group} (stratified by {args.stratify or 'nothing'}, test {args.test:g}, seed {args.seed}) -> {args.out}")
    print(result.summary_text())


def _cmd_compare(args):
    from .report.compare import compare_results, write_compare_page

    comparison = compare_results(args.before, args.after)
    index = write_compare_page(comparison, args.out, title=args.title)
    comparison.save(Path(args.out) / "comparison")
    print(f"comparison: {index}")
    for r in comparison.findings.itertuples():
        print(f"  {r.status:<14} {r.id:<28} {r.verdict_a} -> {r.verdict_b}")
    for note in comparison.missing:
        print(f"  note: {note}")


def _cmd_demo(args):
    from .report.demo import run_demo, run_histo_demo

    log = lambda message: print(message, flush=True)  # noqa: E731
    if args.preset == "histo":
        demo = run_histo_demo(args.out or "conceptlens-histo-demo", quick=args.quick, seed=args.seed, device=args.device,
                              progress=not args.quiet, log=log)
        for name, built in (("before", demo.before), ("after", demo.after)):
            print(f"review ({name}): {built.index}")
        print(f"comparison: {demo.compare}")
        return
    result = run_demo(args.out or "conceptlens-demo", quick=args.quick, seed=args.seed, device=args.device,
                      progress=not args.quiet, log=log)
    _print_report(result)


def _add_store_source_args(p, pool="mean"):
    """``--store DIR`` or ``--model/--data/--layers`` (extracted into ``--out``/activations)."""
    p.add_argument("--store", default=None, help="activation store directory (from `conceptlens extract`)")
    _add_model_args(p, required=False)
    _add_data_args(p, required=False)
    p.add_argument("--pool", default=pool, help=f"pooling when extracting from --model/--data (default {pool})")
    p.add_argument("--out", required=True, help="output directory for the result tables")


def _store_from_args(args, columns=None, layer=None):
    """Open ``--store``, or extract ``--model`` over ``--data`` into ``<out>/activations``.

    ``columns`` (``(flag, manifest column)`` pairs) and ``layer`` (``--layer``) are what the analysis will
    read; with ``--model/--data`` they are checked before the extraction, not after it.
    """
    from .core.store import ActivationStore

    if args.store is not None:
        if args.model or args.data:
            raise ConceptLensError("give either --store or --model/--data/--layers, not both")
        if args.engine == "ray":
            raise ConceptLensError("top-k from a --store reads it in this process; --engine ray needs --model/--data/--layers")
        return ActivationStore.open(args.store)
    if not (args.model and args.data and args.layers):
        raise ConceptLensError("give --store DIR, or all of --model, --data and --layers to extract activations first")
    from .data import Manifest
    from .models import load_model
    from .representation._common import check_column
    from .core.extract import extract

    model = load_model(args.model, device=args.device, num_classes=args.num_classes)
    manifest = Manifest.read(args.data)
    for flag, column in columns or ():
        check_column(manifest.frame, column, flag, f"manifest {manifest.path}")
    if layer is not None and layer not in args.layers:
        raise ConceptLensError(f"--layer {layer!r} is not one of --layers ({', '.join(args.layers)}); "
                               "add it to --layers or choose one of them")
    return extract(model, manifest, args.layers, Path(args.out) / "activations", pool=args.pool, batch_size=args.batch_size,
                   num_workers=args.workers, skip_bad=args.skip_bad, preprocessing=_preprocessing(args, model, manifest),
                   progress=not args.quiet)


def _probe_baselines(args, store):
    """``--baseline-store``/``--pixels-store``, or (with ``--model/--data``) the random-init copy and the
    pooled pixels extracted into ``<out>/baseline-store`` and ``<out>/pixel-store``."""
    from .core.store import ActivationStore

    if args.store is not None:
        return (ActivationStore.open(args.baseline_store) if args.baseline_store else None,
                ActivationStore.open(args.pixels_store) if args.pixels_store else None)
    if args.baseline_store or args.pixels_store:
        raise ConceptLensError("--baseline-store/--pixels-store go with --store; with --model/--data the baselines are extracted")
    from .data import Manifest
    from .models import load_model
    from .representation.baselines import extract_baselines

    model = load_model(args.model, device=args.device, num_classes=args.num_classes)
    manifest = Manifest.read(args.data)
    return extract_baselines(model, manifest, args.layers, args.out, seed=args.baseline_seed, pool=args.pool,
                             batch_size=args.batch_size, num_workers=args.workers, skip_bad=args.skip_bad,
                             preprocessing=_preprocessing(args, model, manifest), progress=not args.quiet)


def _cmd_probe(args):
    from .representation.probes import probe

    store = _store_from_args(args, columns=[("--targets", t) for t in args.targets])
    baseline, pixels = _probe_baselines(args, store)
    result = probe(store, args.targets, args.layers, baseline=baseline, pixels=pixels, split=args.split,
                   n_permutations=args.n_permutations, n_bootstrap=args.n_bootstrap, C=args.C, seed=args.seed,
                   progress=not args.quiet)
    result.save(args.out)
    t = result.table
    print(f"probes ({len(t)}) -> {Path(args.out) / 'probes.csv'}")
    if baseline is None:
        print("  no random-init baseline (--baseline-store): selectivity not computed, nothing is called decodable")
    for r in t.itertuples():
        base = (f"random-init {r.baseline_accuracy:.3f}  selectivity {r.selectivity:+.3f} "
                f"[{r.selectivity_ci_low:+.3f}, {r.selectivity_ci_high:+.3f}]" if r.baseline != "none" else "no baseline")
        print(f"  {r.layer:<20} {r.target:<14} acc {r.accuracy:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}]  {base}"
              f"  null {r.null_accuracy:.3f}{'  decodable' if r.decodable else ''}")


def _cmd_embed(args):
    from .representation.embed import embed

    store = _store_from_args(args, layer=args.layer)
    result = embed(store, args.layer, args.method, perplexity=args.perplexity, n_neighbors=args.n_neighbors,
                   pca_components=args.pca or None, seed=args.seed, n_jobs=args.n_jobs)
    result.save(args.out)
    print(f"embedding of {result.layer} ({result.method}; trustworthiness {result.trustworthiness:.3f}) -> "
          f"{Path(args.out) / 'embedding.csv'}")


def _cmd_neighbors(args):
    from .representation.neighbors import neighbors

    store = _store_from_args(args, columns=[("--label-column", args.label_column)] if args.label_column else None,
                             layer=args.layer)
    result = neighbors(store, args.layer, k=args.k, index=args.index, nprobe=args.nprobe, center=not args.no_center,
                       label_column=args.label_column or None, label_cut=args.label_cut,
                       duplicate_ratio=args.duplicate_ratio, duplicate_threshold=args.threshold)
    result.save(args.out)
    print(f"neighbours of {result.layer} ({result.params['knn']}, k={args.k}): {len(result.label_issues)} label-issue candidates "
          f"(p_label <= {args.label_cut}) -> {Path(args.out) / 'label_issues.csv'}; {len(result.duplicates)} near-duplicate "
          f"candidates ({result.params['duplicate_rule']}), {len(result.leaks)} of them across splits -> "
          f"{Path(args.out) / 'duplicates.csv'}")


def _cmd_topk(args):
    from .representation.topk import topk, topk_from_store

    if args.store is not None:
        if args.model or args.data:
            raise ConceptLensError("give either --store or --model/--data/--layers, not both")
        if args.engine == "ray":
            raise ConceptLensError("top-k from a --store reads it in this process; --engine ray needs --model/--data/--layers")
        result = topk_from_store(args.store, args.layers, k=args.k, score=args.score)
    else:
        if not (args.model and args.data and args.layers):
            raise ConceptLensError("give --store DIR, or all of --model, --data and --layers")
        from .data import Manifest
        from .models import load_model

        model = load_model(args.model, device=args.device, num_classes=args.num_classes)
        manifest = Manifest.read(args.data)
        result = topk(model, manifest, args.layers, k=args.k, score=args.score, store=Path(args.out) / "activations",
                      pool=args.pool, batch_size=args.batch_size, num_workers=args.workers,
                      preprocessing=_preprocessing(args, model, manifest), skip_bad=args.skip_bad, progress=not args.quiet,
                      engine=args.engine)
    result.save(args.out)
    layers = result.table["layer"].unique()
    print(f"top-{args.k} images by spatial {args.score} for {len(result.table)} (layer, channel, rank) entries of "
          f"{', '.join(layers)} -> {Path(args.out) / 'topk.csv'}")


def _cmd_attribute(args):
    from .attribution import explain
    from .data import Manifest
    from .models import load_model

    if bool(args.data) == bool(args.image):
        raise ConceptLensError("give either --data MANIFEST or --image PATH (repeatable), not both or neither")
    model = load_model(args.model, device=args.device, num_classes=args.num_classes)
    manifest = Manifest.read(args.data) if args.data else Manifest.from_images(args.image)
    result = explain(model, manifest, args.methods, target=args.target, preprocessing=_preprocessing(args, model, manifest),
                     limit=args.limit, batch_size=args.batch_size, skip_bad=args.skip_bad, progress=not args.quiet)
    from .plotting import write_explanation_gallery

    out = result.save(args.out)
    index = write_explanation_gallery(result, out)
    print(f"attributions of {len(result.rows)} images x {len(result.methods)} methods -> {index}")
    for m in result.methods:
        print(f"  {m:<30} heatmaps/{m}/  overlays/{m}/  maps/{m}.npy")
    _print_skipped(result.skipped)


def _cmd_spray(args):
    from .attribution import spray_class
    from .data import Manifest
    from .models import load_model

    model = load_model(args.model, device=args.device, num_classes=args.num_classes)
    manifest = Manifest.read(args.data)
    result = spray_class(model, manifest, args.cls, method=args.method, preprocessing=_preprocessing(args, model, manifest),
                         split=args.split, batch_size=args.batch_size, skip_bad=args.skip_bad, progress=not args.quiet,
                         n_clusters=args.clusters if args.clusters == "auto" else int(args.clusters),
                         max_clusters=args.max_clusters, seed=args.seed)
    out = result.save(args.out)
    print(f"SpRAy of class {args.cls!r} ({len(result.labels)} images, {args.method}): {result.n_clusters} clusters "
          f"(eigengap {result.eigengap:.3f}) -> {out}")
    print(result.clusters().to_string(index=False))
    _print_skipped(result.skipped)


def _cmd_decision_tree(args):
    from .data import Manifest
    from .decision import decision_tree
    from .models import load_model
    from .plotting import decision_tree_plot, write_mode_gallery

    model = load_model(args.model, device=args.device, num_classes=args.num_classes)
    manifest = Manifest.read(args.data)
    labels = directions = None
    if args.dissection:
        from .dissection import DissectionResult

        labels = DissectionResult.load(args.dissection).unit_labels(args.layer, interpretable=args.interpretable_only)
    if args.concepts:
        from .concepts import TCAVResult

        directions = TCAVResult.load(args.concepts).concept_directions(args.layer)
    result = decision_tree(model, manifest, args.layer, args.cls, split=args.split, select=args.select, unit_labels=labels,
                           directions=directions, n_modes=args.modes, cells=args.cells, prototypes=args.prototypes,
                           max_images=args.max_images, seed=args.seed, batch_size=args.batch_size,
                           num_workers=args.workers, skip_bad=args.skip_bad,
                           preprocessing=_preprocessing(args, model, manifest), progress=not args.quiet)
    out = result.save(args.out)
    params = result.provenance["parameters"]
    decision_tree_plot(result.nodes, out / "tree.png", f"decision modes of {params['class_name']} at {args.layer}")
    write_mode_gallery(result, manifest.root, out)
    print(f"decision modes of class {params['class_name']!r} at {args.layer}: {len(result.images)} images, "
          f"{int(result.nodes['mode'].sum())} modes; root: {result.nodes.iloc[0]['rationale']} -> {out}")
    for r in result.modes.itertuples():
        fid = "n/a" if r.fidelity_r2 != r.fidelity_r2 else f"{r.fidelity_r2:.2f}"
        print(f"  mode #{r.node:<3} {r.size:>5} images  fidelity R² {fid:>5}  {r.rationale}")
    _print_skipped(result.skipped)
    if args.route:
        routed = result.route(model, args.route, batch_size=args.batch_size, skip_bad=args.skip_bad, progress=not args.quiet)
        routed.to_csv(out / "routes.csv", index=False)
        print(f"routed {len(routed)} images of {args.route} -> {out / 'routes.csv'}")


def _index_list(text):
    """``0-63``, ``1,5,9`` or ``0-3,8``: sorted unique non-negative integers."""
    out = set()
    for part in _csv_list(text):
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()) or (sep and int(hi) < int(lo)):
            raise argparse.ArgumentTypeError(f"expected channel numbers like 0-63 or 1,5,9; got {part!r}")
        out.update(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    if not out:
        raise argparse.ArgumentTypeError("expected at least one channel number (e.g. 0-63)")
    return sorted(out)


def _tv_weight(text):
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected auto or a non-negative number; got {text!r}")
    return value


def _visualize_objectives(args):
    """The objectives ``visualize`` asks for: one per channel (mean or centre unit) or per concept
    direction, each repeated ``--diversity`` times with the diversity term."""
    from .featurevis import channel, direction, diversity, unit

    if (args.channels is None) == (args.concepts is None):
        raise ConceptLensError("pass exactly one of --channels (channels of --layer) and --concepts (a TCAV result's "
                               "concept directions at --layer)")
    if args.diversity < 1:
        raise ConceptLensError(f"--diversity must be at least 1 (images per objective); got {args.diversity}")
    if args.concepts is not None:
        if args.objective != "channel":
            raise ConceptLensError(f"--objective {args.objective} applies to --channels; --concepts maximises each "
                                   "concept's direction over the whole map")
        from .concepts import TCAVResult

        directions = TCAVResult.load(args.concepts).concept_directions(args.layer)
        objectives = [direction(args.layer, v) for v in directions.values()]
    else:
        make = unit if args.objective == "unit" else channel
        objectives = [make(args.layer, c) for c in args.channels]
    if args.diversity > 1:
        objectives = [o + diversity(args.layer, args.diversity_weight) for o in objectives for _ in range(args.diversity)]
    return objectives


def _cmd_visualize(args):
    import numpy as np

    from .featurevis import visualize
    from .models import load_model
    from .plotting import grid, save_png

    objectives = _visualize_objectives(args)
    model = load_model(args.model, device=args.device, num_classes=args.num_classes)
    result = visualize(model, objectives, size=args.size, steps=args.steps,
                       lr=args.lr, param=args.param, transforms=None if args.no_transforms else "default",
                       seed=args.seed, batch_size=args.batch_size, progress=not args.quiet,
                       relu_redirect_steps=args.redirect_relu)
    out = result.save(args.out)
    save_png(grid(list(result.images)), out / "sheet.png")
    values = result.objective_values
    print(f"visualised {len(values)} images at {args.layer} ({args.steps} steps, {args.param}): objective median "
          f"{np.median(values):.3g} (min {values.min():.3g}, max {values.max():.3g}) -> {out} (image_NNNN.png, "
          f"objectives.csv, sheet.png)")


def _cmd_invert(args):
    import dataclasses

    from .data import Manifest, load_images
    from .featurevis import invert
    from .models import load_model
    from .plotting import grid, save_png

    model = load_model(args.model, device=args.device, num_classes=args.num_classes)
    manifest = Manifest.from_images(args.image, kind="image")
    # The model's resize and crop without its normalisation: invert takes [0, 1] pixels and normalises itself.
    prep = dataclasses.replace(model.preprocessing_for(manifest), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    x = load_images(manifest, prep)
    result = invert(model, x, args.layers, steps=args.steps, seed=args.seed, progress=not args.quiet,
                    tv_weight=args.tv_weight)
    out = result.save(args.out)
    originals = list((x.permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8"))
    per_image = len(args.layers)
    rows = [p for i, o in enumerate(originals) for p in [o, *result.images[i * per_image:(i + 1) * per_image]]]
    save_png(grid(rows, columns=per_image + 1), out / "sheet.png")
    print(f"inverted {len(originals)} images from {', '.join(args.layers)} ({args.steps} steps) -> {out} "
          "(image_NNNN.png, objectives.csv with psnr, sheet.png: original then one per layer)")
    for r in result.table.itertuples():
        print(f"  {args.image[r.source]}  {r.layer:<12} PSNR {r.psnr:5.1f} dB")


def _cmd_atlas(args):
    import numpy as np

    from .data import Manifest
    from .featurevis import activation_atlas
    from .models import load_model

    model = load_model(args.model, device=args.device, num_classes=args.num_classes)
    manifest = Manifest.read(args.data)
    result = activation_atlas(model, manifest, args.layer, grid=args.grid, min_count=args.min_count,
                              samples_per_image=args.samples_per_image, classes=args.classes, seed=args.seed,
                              size=args.size, steps=args.steps, extract_batch_size=args.batch_size,
                              num_workers=args.workers, skip_bad=args.skip_bad,
                              preprocessing=_preprocessing(args, model, manifest), progress=not args.quiet)
    out = result.save(args.out)
    cells, samples = result.cells, result.samples
    values = cells["value"].to_numpy()
    print(f"atlas of {args.layer}: {len(cells)} of {args.grid * args.grid} cells drawn (>= {args.min_count} samples; "
          f"{int(cells['count'].sum())} of {len(samples)} samples from {samples['manifest_row'].nunique()} images), "
          f"objective median {np.median(values):.3g} -> {out} (atlas.png, cells.csv, samples.csv)")


def _cmd_tcav(args):
    from .concepts import TCAV
    from .concepts.stats import format_p
    from .data import Manifest
    from .models import load_model

    model = load_model(args.model, device=args.device, num_classes=args.num_classes)
    manifest = Manifest.read(args.data)
    pairs = [q for a in (args.audit or []) for q in _csv_list(a)]
    audit = [tuple(q.split(":", 1)) for q in pairs]
    bad = [q for q in pairs if ":" not in q]
    if bad:
        raise ConceptLensError(f"--audit takes concept:class pairs; got {bad[0]!r}")
    tcav = TCAV(model, args.layers, method=args.method, pool=args.pool, design=args.design, runs=args.runs,
                null_runs=args.null_runs, concept_size=args.concept_size, test=args.test, correction=args.correction,
                alpha=args.alpha, margin=args.margin, gate_quantile=args.gate_quantile, seed=args.seed,
                batch_size=args.batch_size, num_workers=args.workers, skip_bad=args.skip_bad,
                preprocessing=_preprocessing(args, model, manifest), progress=not args.quiet)
    result = tcav.run(args.concepts, args.random_pool, args.classes, manifest, split=args.split,
                      max_inputs=args.max_inputs, concept_names=args.concept_names)
    out = result.save(args.out)
    table = result.to_frame()
    params = result.provenance["parameters"]
    print(f"TCAV: {len(table)} tests ({table['concept'].nunique()} concepts x {table['layer'].nunique()} layers x "
          f"{table['class'].nunique()} classes; {params['runs']} runs of {params['concept_size']} concept vs "
          f"{params['random_size']} random images, {params['null_runs']} null runs), {int(table['significant'].sum())} "
          f"significant at alpha {args.alpha} ({args.correction}), {int((~table['cav_ok']).sum())} not tested (CAV gate); "
          f"table in {out / 'tcav.csv'}")
    for r in table[table["significant"]].itertuples():
        print(f"  {r.concept:<12} {r.layer:<16} {r._3:<12} score {r.score_mean:.3f} vs null {r.null_mean:.3f} "
              f"({r.direction} sensitive than random)  p_adj {format_p(r.p_adjusted)}")
    if audit:
        verdicts = result.audit(audit)
        verdicts.to_csv(out / "audit.csv", index=False)
        for r in verdicts.itertuples():
            print(f"  audit {r.concept}:{r._2}: {r.verdict.upper()} - {r.evidence}" + (f"; to decide: {r.fix}" if r.fix else ""))
        print(f"audit verdicts in {out / 'audit.csv'} (margin ±{params['margin']:g}, alpha {params['alpha']:g})")
    _print_skipped(result.skipped)


def _cmd_dissect(args):
    from .dissection import dissect
    from .models import load_model

    model = load_model(args.model, device=args.device, num_classes=args.num_classes)
    result = dissect(model, args.broden, args.layers, args.out, quantile=args.quantile, iou_threshold=args.iou_threshold,
                     rule=args.rule, thresholds=args.thresholds, top_k=args.top_k, size=args.size, mean=args.mean,
                     std=args.std, categories=args.categories, batch_size=args.batch_size, dtype=args.dtype,
                     quantile_method=args.quantile_method, memory_budget=int(args.memory_budget * 2**20),
                     num_workers=args.workers, progress=not args.quiet, engine=args.engine)
    if not args.no_images and args.top_k > 0:
        from .core.broden import read_broden
        from .plotting import write_unit_gallery

        write_unit_gallery(result, read_broden(args.broden, categories=args.categories), args.out, progress=not args.quiet)
    print(f"dissection of {', '.join(result.layers)} on {result.provenance['n_images']} Broden images "
          f"(rule {args.rule}) -> {Path(args.out) / 'units.csv'}")
    print(result.summary[result.summary["category"] == "all"].to_string(index=False))


def _cmd_correct(args):
    from .correction import Artifact, correct, evaluate_correction, read_cav
    from .data import Manifest
    from .models import load_model

    model = load_model(args.model, device=args.device, num_classes=args.num_classes)
    manifest = Manifest.read(args.data)
    prep = _preprocessing(args, model, manifest)
    artifact = Artifact.read(args.artifact) if args.artifact else None  # read before training: a bad file fails fast
    cav = read_cav(args.cav) if args.cav else None
    fixed = correct(model, manifest.path, args.method, args.out, concepts=args.concepts, random_pool=args.random_pool,
                    concept=args.concept, layer=args.layer, target_class=args.target_class, weight=args.weight,
                    masks_column=args.masks_column, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                    seed=args.seed, cav=cav, train_all=args.train_all, preprocessing=prep, progress=not args.quiet)
    layer = fixed.settings.get("cav", {}).get("layer", args.layer)  # the audit runs where the CAV was fitted
    epochs = fixed.settings["epoch_seconds"]
    print(f"{args.method}: corrected model -> {fixed.spec}"
          + (f" ({len(epochs)} epochs, {sum(epochs):.1f} s)" if epochs else " (no training)")
          + f"; settings in {Path(args.out) / 'correction.json'}")
    if args.target_class is None:
        print("no --class given: before/after evaluation skipped (it measures the biased class's shortcut)")
        return
    audit = dict(concepts=args.concepts, random_pool=args.random_pool, concept=args.concept, layer=layer)
    if None in audit.values():
        audit = {}
    after = load_model(fixed.spec, device=args.device)
    evaluation = evaluate_correction({"before": model, "after": after}, manifest.path, args.target_class, artifact=artifact,
                                     tcav_runs=args.tcav_runs, seed=args.seed, preprocessing=prep,
                                     progress=not args.quiet, **audit)
    out = evaluation.save(Path(args.out) / "evaluation")
    for r in evaluation.to_frame().to_dict("records"):
        line = (f"  {r['model']:<7} clean accuracy {r['clean_accuracy']:.3f} "
                f"[{r['clean_ci_low']:.3f}, {r['clean_ci_high']:.3f}]")
        if r["n_attacked"]:
            line += (f"  attacked {r['attacked_accuracy']:.3f} [{r['attacked_ci_low']:.3f}, {r['attacked_ci_high']:.3f}]"
                     f"  artifact relevance share {r['relevance_share']:.3f}")
        if "audit" in r:
            line += f"  TCAV {args.concept}:{args.target_class} {r['tcav_score']:.3f} (null {r['tcav_null']:.3f}) {r['audit']}"
        print(line)
    print(f"evaluation in {out / 'evaluation.csv'}" + ("" if artifact else " (no --artifact: attacked accuracy and "
                                                        "relevance share not measured)"))


ENGINE_CHOICES = ("local", "ray")  # conceptlens.core.engine.ENGINES, without importing the core for --help
ENGINE_HELP = ("where forward passes run: local (default) or ray (Ray actors; RAY_ADDRESS, else a new local "
               "instance; needs conceptlens[ray]); ray runs `extract`, `topk` and `dissect`'s forward pass so far")
RAY_COMMANDS = ("extract", "topk", "dissect")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="conceptlens",
        description="Explain what a PyTorch vision model has learned: concepts, units, layers, attributions.",
    )
    parser.add_argument("--version", action="version", version=f"conceptlens {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log automatic choices (INFO)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--engine", choices=ENGINE_CHOICES, default="local", help=ENGINE_HELP)
    # The global flags are accepted after the command too (`conceptlens demo -q`); SUPPRESS keeps a
    # subcommand from resetting a flag given before it.
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log automatic choices (INFO)")
    flags.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    flags.add_argument("--engine", choices=ENGINE_CHOICES, default=argparse.SUPPRESS, help=ENGINE_HELP)
    sub = _Subcommands(parser.add_subparsers(dest="command", metavar="COMMAND"), flags)

    p = sub.add_parser("world", help="generate a procedural concept world (images, manifest, Broden set, concepts)")
    p.add_argument("--preset", default="shapes", choices=["shapes", "histo"],
                   help="shapes: shapes, colours and textures with a watermark tag; histo: H&E-like tissue patches "
                        "(tumour, stroma, normal) with sites, pen marks and patients (default shapes)")
    p.add_argument("--n", type=int, default=1200, help="classification images (default 1200)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64; histo: 32 to 128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label-noise", type=float, default=0.0, help="fraction of training labels flipped (default 0)")
    p.add_argument("--near-duplicates", type=int, default=0, help="test images planted as near-copies of train images")
    p.add_argument("--out", required=True, help="output directory")
    g = p.add_argument_group("shapes preset only")
    g.add_argument("--tag-bias", type=float, default=None, help="tag/class association in training, 0 (none) to 1 (default 0.9)")
    g.add_argument("--no-subclass", dest="subclass", action="store_false", default=None, help="no hidden sub-class")
    g = p.add_argument_group("histo preset only")
    g.add_argument("--site-bias", type=float, default=None,
                   help="site/class association in training, 0 (balanced) to 1 (default 0.9); test sites are balanced")
    g.add_argument("--sites", dest="n_sites", type=int, default=None, help="acquisition sites, 3 to 8 (default 3)")
    g.add_argument("--pen-bias", type=float, default=None,
                   help="pen-mark/tumour association in training, 0 (none) to 1 (default 0.9)")
    g.add_argument("--patches-per-patient", type=int, default=None, help="patches per patient (default 8)")
    g.add_argument("--leak-patients", type=int, default=None, help="patients planted in both splits (default 0)")
    p.set_defaults(func=_cmd_world)

    p = sub.add_parser("train-demo", help="train the demo CNN on a concept world")
    p.add_argument("--world", required=True, help="concept world directory")
    p.add_argument("--manifest", default=None,
                   help="train/test on this manifest instead of the world's (e.g. one re-split by `conceptlens split`)")
    p.add_argument("--out", required=True, help="weights file to write (.pt; sidecar .json beside it)")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default auto: CUDA when present)")
    p.set_defaults(func=_cmd_train_demo)

    p = sub.add_parser("layers", help="list a model's layers with output shapes")
    p.add_argument("model", help="model spec (see `conceptlens extract --help`)")
    p.add_argument("--input-size", type=int, default=None,
                   help="square input side for the shape trace (default: the size an exported program fixes, else 224)")
    p.add_argument("--num-classes", type=int, default=None, help="head size for torchvision architectures (default: from the weights, else 1000)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default auto: CUDA when present)")
    p.set_defaults(func=_cmd_layers)

    p = sub.add_parser("extract", help="capture layer activations of a manifest into an activation store")
    _add_model_args(p)
    _add_data_args(p)
    p.add_argument("--pool", default="mean", help="none | mean | max | adaptive:K (default mean)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float16", "float32"],
                   help="auto: float32 pooled, float16 spatial")
    p.add_argument("--shards", type=int, default=None, help="--engine ray: row ranges the manifest is cut into "
                   "(default four per actor); a run resumes shard by shard")
    p.add_argument("--out", required=True, help="store directory (resumed if unfinished, rebuilt if stale)")
    p.set_defaults(func=_cmd_extract)

    p = sub.add_parser("report", help="analyse a model as a TOML report spec says and write the HTML report")
    p.add_argument("spec", help="report spec (TOML; `conceptlens demo` writes a complete one as <out>/report.toml)")
    p.add_argument("--out", required=True, help="report folder (index.html, assets/, tables/, cache/)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("demo", help="concept world → demo CNN → full HTML report, on the embedded default")
    p.add_argument("--preset", default="shapes", choices=["shapes", "histo"],
                   help="shapes: world -> CNN -> report; histo: the dataset-review loop (biased world -> review -> fixes "
                        "-> retrain -> review -> compare)")
    p.add_argument("--out", default=None, help="output directory (default ./conceptlens-demo, ./conceptlens-histo-demo)")
    p.add_argument("--quick", action="store_true", help="smaller world and shorter training (under 3 min)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default auto: CUDA when present); checked first")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("review", help="dataset-design review: shortcuts, hidden slices, leakage, label issues (HTML + CSV)")
    p.add_argument("spec", help="report spec (TOML) with a [review] table: group, sensitive, group_attributes, layer, split")
    p.add_argument("--out", required=True, help="review folder (index.html, tables/, review/, cache/)")
    p.set_defaults(func=_cmd_review)

    p = sub.add_parser("compare", help="before/after page of two reviews (or reports): findings resolved, remaining, new")
    p.add_argument("before", help="review or report folder (before the fix)")
    p.add_argument("after", help="review or report folder (after the fix)")
    p.add_argument("--out", required=True, help="comparison folder (index.html, tables/, comparison/)")
    p.add_argument("--title", default=None, help="page title")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("split", help="a leakage-free, stratified group split of a manifest (scikit-learn group splitters)")
    p.add_argument("manifest", help="data manifest CSV")
    p.add_argument("--group", required=True, help="column whose groups (e.g. patient) must not cross splits")
    p.add_argument("--stratify", default="label", help="column to balance across splits (default label; 'none' for none)")
    p.add_argument("--test", type=float, default=0.2, help="test fraction of the groups' rows (default 0.2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="new manifest CSV (image paths rewritten to resolve from its folder)")
    p.set_defaults(func=_cmd_split)

    p = sub.add_parser("probe", help="linear probes per layer for manifest columns, against a random-init baseline (probes.csv)")
    _add_store_source_args(p)
    p.add_argument("--baseline-store", default=None,
                   help="with --store: store of the same layers of a random-init copy (with --model/--data it is extracted "
                        "into OUT/baseline-store)")
    p.add_argument("--pixels-store", default=None, help="with --store: store of pooled input pixels (optional)")
    p.add_argument("--baseline-seed", type=int, default=0, help="seed of the random-init copy (default 0)")
    p.add_argument("--targets", type=_csv_list, default=["label"], help="manifest columns to predict (default label)")
    p.add_argument("--split", default="auto", choices=["auto", "column", "random"], help="train/test: manifest 'split' or seeded random")
    p.add_argument("--n-permutations", type=int, default=19,
                   help="permutation null: probes on permuted training labels, scored on the true test labels (default 19)")
    p.add_argument("--n-bootstrap", type=int, default=1000, help="bootstrap resamples for CIs (default 1000)")
    p.add_argument("--C", type=float, default=1.0, help="inverse L2 regularisation of the probe (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_probe)

    p = sub.add_parser("embed", help="2-D embedding of a layer: PCA-50 + openTSNE, UMAP or PCA (embedding.csv)")
    _add_store_source_args(p)
    p.add_argument("--layer", default=None, help="layer to embed (default: the store's last)")
    p.add_argument("--method", default="tsne", choices=["tsne", "umap", "pca"])
    p.add_argument("--perplexity", type=float, default=30.0)
    p.add_argument("--n-neighbors", type=int, default=15, help="UMAP neighbours (default 15)")
    p.add_argument("--pca", type=int, default=50, help="PCA dimensions before t-SNE/UMAP (0: none; default 50)")
    p.add_argument("--n-jobs", type=int, default=1, help="openTSNE threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_embed)

    p = sub.add_parser("neighbors", help="cosine k-NN: label-issue and near-duplicate candidates for dataset review")
    _add_store_source_args(p)
    p.add_argument("--layer", default=None, help="layer (default: the store's last)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--index", default="Flat", help="Flat (default) = exact blocked self-join; or a FAISS index_factory string, e.g. IVF1024,Flat")
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists visited per query")
    p.add_argument("--no-center", action="store_true", help="do not subtract the mean feature before normalising")
    p.add_argument("--label-column", default="label", help="column for label-issue candidates ('' to skip)")
    p.add_argument("--label-cut", type=float, default=0.1,
                   help="flag rows whose calibrated neighbour probability of their label is at most this (default 0.1)")
    p.add_argument("--duplicate-ratio", type=float, default=0.3,
                   help="near-duplicate: cosine distance <= this x the median nearest-neighbour distance (default 0.3)")
    p.add_argument("--threshold", type=float, default=None, help="near-duplicate: cosine >= this instead of --duplicate-ratio")
    p.set_defaults(func=_cmd_neighbors)

    p = sub.add_parser("topk", help="top-k images per channel (spatial max or mean of ReLU), with argmax locations (topk.csv)")
    _add_store_source_args(p)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--score", default="max", choices=["max", "mean"], help="max: spatial max; mean: spatial mean of ReLU")
    p.set_defaults(func=_cmd_topk)

    p = sub.add_parser("attribute", help="pixel attributions of images: heatmap and overlay PNGs plus a JSON index")
    _add_model_args(p, layers=False)
    _add_data_args(p)
    next(a for a in p._actions if a.dest == "data").required = False  # --data or --image
    p.add_argument("--image", action="append", default=None, help="an image file (repeatable) instead of --data")
    p.add_argument("--methods", required=True, type=_csv_list, help="comma-separated methods, e.g. saliency,lrp-epsilon-plus-flat,gradcam")
    p.add_argument("--target", default=None, help="class to explain (name or index; default: each image's prediction)")
    p.add_argument("--limit", type=int, default=None, help="only the first N manifest rows")
    p.add_argument("--out", required=True, help="output folder (index.json, heatmaps/, overlays/, maps/)")
    p.set_defaults(func=_cmd_attribute)
    p = sub.add_parser("spray", help="SpRAy: cluster one class's explanation strategies (Clever-Hans finder)")
    _add_model_args(p, layers=False)
    _add_data_args(p)
    p.add_argument("--class", dest="cls", required=True, help="class to analyse (its manifest label and model class)")
    p.add_argument("--method", default="lrp-epsilon-plus-flat", help="attribution method (default lrp-epsilon-plus-flat)")
    p.add_argument("--split", default=None, help="only rows of this split")
    p.add_argument("--clusters", default="auto", help="number of clusters or auto (eigengap; default)")
    p.add_argument("--max-clusters", type=int, default=8, help="largest k the eigengap may choose (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder (assignments.csv, clusters.csv, prototypes.npy, ...)")
    p.set_defaults(func=_cmd_spray)
    p = sub.add_parser("decision-tree", help="decision modes: a tree of what a class logit relies on, unit by unit (Zhang et al. 2019)")
    _add_model_args(p, layers=False)
    _add_data_args(p)
    p.add_argument("--layer", required=True, help="a convolutional layer (post-ReLU works best; see `conceptlens layers MODEL`)")
    p.add_argument("--class", dest="cls", required=True, help="the class explained (a model class name or logit index)")
    p.add_argument("--split", default=None, help="only rows of this split")
    p.add_argument("--select", default="label", choices=["label", "predicted"],
                   help="explain the images labelled the class (default) or those the model assigns to it")
    p.add_argument("--dissection", default=None, help="a `conceptlens dissect` output of this layer: read units by concept label")
    p.add_argument("--interpretable-only", action="store_true",
                   help="label only units whose IoU reaches the dissection's threshold (default: every live unit's best label)")
    p.add_argument("--concepts", default=None, help="a `conceptlens tcav` output of this layer: report the logit share through each CAV")
    p.add_argument("--modes", type=int, default=8, help="leaves of the tree (default 8)")
    p.add_argument("--cells", type=int, default=2, help="split each unit's contribution over a CxC grid of its map (default 2; 1 = per unit)")
    p.add_argument("--prototypes", type=int, default=6, help="prototype images per node (default 6)")
    p.add_argument("--max-images", type=int, default=None, help="at most N images (seeded subsample)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--route", default=None, metavar="MANIFEST", help="also route these images to their modes (OUT/routes.csv)")
    p.add_argument("--out", required=True, help="output folder (nodes.csv, node_places.csv, images.csv, tree.png, modes/*.png, ...)")
    p.set_defaults(func=_cmd_decision_tree)
    p = sub.add_parser("visualize", help="feature visualisation: an image that maximises each channel of a layer (Lucid-style)")
    _add_model_args(p, layers=False)
    p.add_argument("--layer", required=True, help="the layer (see `conceptlens layers MODEL`)")
    p.add_argument("--channels", type=_index_list, help="channels: 0-63, 1,5,9 or 0-3,8 (or --concepts)")
    p.add_argument("--objective", default="channel", choices=["channel", "unit"],
                   help="channel: the channel's mean over its map (default); unit: the channel at the map's centre")
    p.add_argument("--concepts", metavar="TCAV_DIR", default=None,
                   help="instead of --channels: one image per concept of a saved TCAV result, maximising its mean "
                        "CAV direction at --layer")
    p.add_argument("--diversity", type=int, default=1, metavar="K",
                   help="K images per objective made to differ by Lucid's diversity term (default 1)")
    p.add_argument("--diversity-weight", type=float, default=1e2, help="weight of the diversity term (default 1e2, "
                   "as lucent's examples)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's input size)")
    p.add_argument("--steps", type=int, default=512, help="Adam steps (default 512, as lucent)")
    p.add_argument("--lr", type=float, default=0.05, help="Adam learning rate (default 0.05)")
    p.add_argument("--param", default="fourier", choices=["fourier", "pixel"], help="image parameterisation (default fourier)")
    p.add_argument("--no-transforms", action="store_true", help="no random pad/jitter/scale/rotate during the optimisation")
    p.add_argument("--redirect-relu", type=int, default=0, metavar="STEPS",
                   help="during the first STEPS steps, nn.ReLU modules pass Lucid's redirected gradient to images "
                        "that get none through them, reviving units dead at the start (Lucid: 16; default 0, off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32, help="images optimised together (default 32)")
    p.add_argument("--out", required=True, help="output folder (image_NNNN.png, objectives.csv, sheet.png)")
    p.set_defaults(func=_cmd_visualize)
    p = sub.add_parser("invert", help="invert layer representations of images (Mahendran & Vedaldi): what each layer keeps")
    _add_model_args(p)
    p.add_argument("--image", required=True, action="append", help="an image file (repeat for several)")
    p.add_argument("--steps", type=int, default=200, help="Adam steps (default 200)")
    p.add_argument("--tv-weight", type=_tv_weight, default="auto", metavar="auto|W",
                   help="total-variation weight: auto (default) grows it 100-fold from the model's first module to "
                        "its last, as Mahendran & Vedaldi's code does per layer; a number is used for every layer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder (image_NNNN.png, objectives.csv with PSNR and "
                   "tv_weight, sheet.png)")
    p.set_defaults(func=_cmd_invert)
    p = sub.add_parser("atlas", help="activation atlas (Carter et al.): a layer's activations over a dataset laid "
                       "out by UMAP, one feature visualisation per grid cell")
    _add_model_args(p, layers=False)
    _add_data_args(p)
    p.add_argument("--layer", required=True, help="a layer with a spatial map, e.g. a conv layer (see `conceptlens "
                   "layers MODEL`)")
    p.add_argument("--grid", type=int, default=8, help="cells along each side of the atlas (default 8)")
    p.add_argument("--min-count", type=int, default=3, metavar="N",
                   help="draw a cell only when it holds at least N samples (default 3)")
    p.add_argument("--samples-per-image", type=int, default=1, metavar="K",
                   help="random spatial positions sampled per image (default 1, as Carter et al.)")
    p.add_argument("--classes", type=_csv_list, default=None,
                   help="comma-separated labels: only images with these labels (default: every image)")
    p.add_argument("--size", type=int, default=None, help="icon side in pixels (default: the size the model sees "
                   "the images at)")
    p.add_argument("--steps", type=int, default=256, help="Adam steps per icon (default 256)")
    p.add_argument("--seed", type=int, default=0, help="seeds the sampled positions, UMAP and the icons (default 0)")
    p.add_argument("--out", required=True, help="output folder (atlas.png, cells.csv with each icon's objective "
                   "value, samples.csv, atlas.json)")
    p.set_defaults(func=_cmd_atlas)
    p = sub.add_parser("tcav", help="concept sensitivity (TCAV) with calibrated significance and bias audits")
    _add_model_args(p)
    _add_data_args(p)
    p.add_argument("--concepts", required=True, help="folder with one subfolder of images per concept, or an image,concept CSV")
    p.add_argument("--concept-names", type=_csv_list, default=None, help="use only these concepts (default: all)")
    p.add_argument("--random-pool", required=True, help="folder of random images or a manifest CSV (random counter-examples)")
    p.add_argument("--classes", required=True, type=_csv_list, help="comma-separated classes; inputs = manifest rows with that label")
    p.add_argument("--split", default=None, help="only manifest rows of this split (e.g. test)")
    p.add_argument("--max-inputs", type=int, default=None, help="at most N inputs per class (seeded subsample)")
    p.add_argument("--runs", type=int, default=None,
                   help="concept runs (default: as many as the smallest concept allows with 2 images per run, at most 50)")
    p.add_argument("--null-runs", type=int, default=200, help="random-vs-random runs (default 200)")
    p.add_argument("--method", default="mean-diff", choices=["mean-diff", "sgd", "logistic"], help="CAV classifier (default mean-diff)")
    p.add_argument("--pool", default="none", choices=["none", "mean", "max"], help="CAV space: flattened maps (none) or pooled channels")
    p.add_argument("--design", default="split", choices=["split", "standard"], help="split (calibrated, default) or standard (tf/tcav)")
    p.add_argument("--concept-size", type=int, default=None,
                   help="concept examples per CAV, and random ones (equal sizes; default: the smallest concept split among the runs)")
    p.add_argument("--test", default="mannwhitney", choices=["mannwhitney", "welch", "permutation"],
                   help="two-sided test against the null runs (default mannwhitney)")
    p.add_argument("--correction", default="holm", choices=["holm", "bh", "none"], help="multiple-testing correction (default holm)")
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--margin", type=float, default=0.1,
                   help="equivalence margin on score - null: an audit passes only when insensitivity within it is shown (default 0.1)")
    p.add_argument("--gate-quantile", type=float, default=0.95,
                   help="CAV gate: pooled accuracy must exceed this quantile of random-vs-random CAVs' (default 0.95)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--audit", action="append", default=None, metavar="CONCEPT:CLASS",
                   help="a pair that must be insensitive; repeat or comma-separate; verdicts go to OUT/audit.csv")
    p.add_argument("--out", required=True, help="result directory (tcav.csv, runs.csv, provenance.json, ...)")
    p.set_defaults(func=_cmd_tcav)
    p = sub.add_parser("dissect", help="network dissection: label conv units with Broden concepts by IoU (units.csv)")
    _add_model_args(p)
    p.add_argument("--broden", required=True, help="Broden-style concept set directory (index.csv, label.csv, ...)")
    p.add_argument("--out", required=True, help="output directory (units.csv, summary.csv, units/*.png; resumable)")
    p.add_argument("--quantile", type=float, default=0.995, help="per-unit threshold quantile (default 0.995)")
    p.add_argument("--iou-threshold", type=float, default=0.04, help="interpretable if IoU >= this (default 0.04)")
    p.add_argument("--rule", default="paper", choices=["paper", "netdissect-lite"], help="category rule (default paper)")
    p.add_argument("--thresholds", default=None, help="given thresholds: .npy (units of the layers concatenated) or .npz per layer")
    p.add_argument("--top-k", type=int, default=8, help="top images per unit drawn with masks (default 8)")
    p.add_argument("--no-images", action="store_true", help="do not draw the per-unit PNGs")
    p.add_argument("--categories", type=_csv_list, default=None, help="Broden categories to use (default all)")
    p.add_argument("--size", type=int, default=None, help="resize images (shorter side) to N; never cropped (default: model input size)")
    p.add_argument("--mean", type=_floats3, default=None, help="normalisation mean R,G,B (default: the model's)")
    p.add_argument("--std", type=_floats3, default=None, help="normalisation std R,G,B (default: the model's)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="activation store dtype (default float16)")
    p.add_argument("--quantile-method", default="auto", choices=["auto", "exact", "sketch"],
                   help="auto: exact when it fits --memory-budget, else a grid sketch with a bounded error")
    p.add_argument("--memory-budget", type=float, default=512, help="MiB for exact quantiles (default 512)")
    p.set_defaults(func=_cmd_dissect)
    p = sub.add_parser("correct", help="fix a shortcut: P-/A-/RR-ClArC or RRR, with before/after accuracy, attacked "
                       "accuracy, relevance share and TCAV audit")
    _add_model_args(p, layers=False)
    _add_data_args(p, loader=False)  # the train and test rows are read whole; an unreadable image stops the run
    p.add_argument("--method", required=True, choices=("p-clarc", "a-clarc", "rr-clarc", "rrr"),
                   help="p-clarc: project the artifact CAV out at --layer (no training); a-clarc / rr-clarc: fine-tune "
                   "the layers after --layer (artifact added / logit gradient along the CAV penalised); rrr: fine-tune "
                   "with input gradients penalised inside --masks-column")
    p.add_argument("--concept", default=None, help="the artifact's concept folder in --concepts (ClArC methods)")
    p.add_argument("--concepts", default=None, help="folder of concept subfolders (or image,concept CSV)")
    p.add_argument("--random-pool", default=None, help="folder of random images (or a manifest CSV) for the CAV")
    p.add_argument("--layer", default=None, help="the layer of the artifact CAV (ClArC methods), e.g. the last conv")
    p.add_argument("--class", dest="target_class", default=None,
                   help="the biased class: RR-ClArC's gradient target, and what the evaluation attacks")
    p.add_argument("--artifact", default=None, help="RGBA PNG of the artifact at the input size (opaque = artifact): "
                   "pasted into the other classes' test images for the attacked accuracy and relevance share")
    p.add_argument("--cav", default=None, help="reuse the artifact CAV of an earlier run's correction.json (instead "
                   "of fitting one from --concepts/--random-pool)")
    p.add_argument("--weight", type=float, default=None, help="lambda of rr-clarc or rrr (default 10 for both)")
    p.add_argument("--masks-column", default="mask", help="rrr: manifest column of mask PNGs (default 'mask')")
    p.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs (default 10)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak one-cycle learning rate of fine-tuning (default 3e-3)")
    p.add_argument("--batch-size", type=int, default=32, help="fine-tuning batch size (default 32)")
    p.add_argument("--train-all", action="store_true", help="ClArC: fine-tune every layer, not only those after --layer")
    p.add_argument("--tcav-runs", type=int, default=None, help="runs of the before/after TCAV audit (default: TCAV's)")
    p.add_argument("--seed", type=int, default=0, help="seeds the CAV, fine-tuning and the evaluation (default 0)")
    p.add_argument("--out", required=True, help="output folder (model.pt + model.json, correction.json, evaluation/)")
    p.set_defaults(func=_cmd_correct)
    return parser


class _Subcommands:
    """``add_subparsers()`` whose parsers all inherit the global flags."""

    def __init__(self, action, flags):
        self.action, self.flags = action, flags

    def add_parser(self, name, **kw):
        return self.action.add_parser(name, parents=[self.flags], **kw)


class _OneLine(logging.Formatter):
    def format(self, record):
        msg = record.getMessage()
        if record.name == "py.warnings":  # "file:line: UserWarning: text\n  source" → "text"
            msg = msg.split("Warning: ", 1)[-1].splitlines()[0]
        return f"conceptlens: {record.levelname.lower()}: {msg}"


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.engine == "ray" and args.command not in RAY_COMMANDS:
        print(f"conceptlens: error: --engine ray runs {', '.join(RAY_COMMANDS)} so far; run {args.command} with "
              "--engine local (the default)", file=sys.stderr)
        return 2
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine())
    root = logging.getLogger()
    # Restored on return, so `main()` called in-process (tests, notebooks) leaves logging as it was.
    saved = root.handlers[:], root.level
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if args.verbose else logging.WARNING)
    # FAISS logs at INFO which of its builds it tried, with the traceback of each one missing.
    faiss_loader = logging.getLogger("faiss.loader")
    saved_faiss = faiss_loader.level
    faiss_loader.setLevel(logging.WARNING)
    logging.captureWarnings(True)
    try:
        # The thread limits are in force before any heavy library loads: they size its pools as it does.
        with warnings.catch_warnings(), thread_limits():
            warnings.simplefilter("default")
            args.func(args)
    except ConceptLensError as exc:
        print(f"conceptlens: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nconceptlens: interrupted", file=sys.stderr)  # a progress bar may hold the current line
        return 130
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
        faiss_loader.setLevel(saved_faiss)
        logging.captureWarnings(False)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

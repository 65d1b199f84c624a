"""Report stages (run an analyzer, cached) and section builders (results → page blocks).

Each analyzer contributes a stage ``stage_x(run, results) -> {name: result}`` that runs it when
the spec asks for it and its inputs exist, and a builder ``section_x(page, spec, results)``.
Builders read only results, never analyzer internals.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pandas as pd

from ..core.hashing import hash_tree
from ..core.broden import read_broden
from ..plotting import (confusion_plot, decision_tree_plot, depth_plot, enlarge, fit_height, grouped_bars, heatmap_rgb,
                        heatmap_scale, overlay_rgb, prototype_strip, save_png, scatter_plot, strip, topk_thumbnail,
                        unit_panel)
from .render import image_block, table_block

__all__ = ["STAGES", "SECTION_BUILDERS"]


def _wants(spec, *sections):
    return any(s in spec.sections for s in sections)


# --------------------------------------------------------------------------- the capture pass

TOPK = 8  # images kept per channel for the max-activation gallery
LAYOUT_POOL = "adaptive:4"  # features of the near-duplicate search



def _wants_representation(spec):
    return _wants(spec, "layers", "dataset") or bool(spec.audit_not_decodable)


def stage_capture(run, results):
    """One pass over the manifest for all the report captures of it: the overview's logits, the
    mean-pooled store of the spec's layers with the top-k images per channel, and the layout store
    of the near-duplicate search (an early layer pooled to a grid, which mean-pooled deep features
    do not keep)."""
    from ..core import ActivationStore, StoreRequest, TopK, capture
    from ..core.result import provenance
    from ..representation.topk import TopKResult
    from .overview import Overview, overview_from_logits

    spec = run.spec
    layers = list(spec.layers) if _wants_representation(spec) else []
    layout = [spec.duplicate_layer or spec.layers[0]] if _wants(spec, "dataset") else []

    def compute(d):
        requests = [StoreRequest(d / "store", layers, "mean")] if layers else []
        requests += [StoreRequest(d / "layout", layout, LAYOUT_POOL)] if layout else []
        top = TopK(TOPK, "max", layers=layers)
        t0 = time.perf_counter()
        got = capture(run.model, run.manifest, requests, logits=True, observers=[top] if layers else [],
                      batch_size=spec.batch_size, progress=run.progress)
        overview_from_logits(run.model, run.manifest, got.rows, got.logits).save(d / "overview")
        if layers:
            prov = provenance(run.model, run.manifest, store=got.stores[0], parameters={"k": TOPK, "score": "max", "layers": layers},
                              timings={"capture": time.perf_counter() - t0})
            TopKResult.from_accumulator(top, run.manifest, {"layers": layers, "source": "extraction"}, prov).save(d / "topk")

    def load(d):
        out = {"overview": Overview.load(d / "overview")}
        if layers:
            out.update(topk=TopKResult.load(d / "topk"), store=ActivationStore.open(d / "store"))
        if layout:
            out["layout"] = ActivationStore.open(d / "layout")
        return out

    # "overview": 2 since the overview keeps the class probabilities.
    got = run.stage("capture", {"layers": layers, "k": TOPK, "layout": layout, "layout_pool": LAYOUT_POOL, "overview": 2},
                    compute, load)
    return {"overview": got["overview"], "_capture": got}


# --------------------------------------------------------------------------- overview


def section_overview(page, spec, results):
    ov = results["overview"]
    text = (f"{len(ov.predictions)} of {ov.provenance['n_images']} manifest images predicted; "
            f"classes: {', '.join(ov.classes)}.")
    blocks = [table_block(page, ov.accuracy(), "accuracy", "Accuracy per split and class", text)]
    splits = sorted(set(ov.predictions["split"]))
    for split in splits:
        m = ov.confusion(split)
        if m.to_numpy().sum():
            path = confusion_plot(m, page.asset(f"confusion-{split}.png"), f"confusion matrix ({split})")
            blocks.append(image_block(page, path, f"confusion matrix, split {split}", caption=f"split {split}: rows true, columns predicted"))
    page.table(ov.predictions, "predictions")
    page.section("overview", "Overview", blocks)


# --------------------------------------------------------------------------- concepts (TCAV)

def _tcav_classes(run):
    spec = run.spec
    if spec.tcav_classes is not None:
        return list(spec.tcav_classes)
    if run.model.classes:
        return list(run.model.classes)
    return sorted(run.manifest.frame["label"].astype(str).unique())


def stage_tcav(run, results):
    spec = run.spec
    if not (_wants(spec, "concepts") or spec.audit_insensitive) or spec.concepts is None or spec.random_pool is None:
        return {}
    from ..concepts import TCAV, TCAVResult

    layers = list(spec.tcav_layers or spec.layers[-2:])
    classes = _tcav_classes(run)
    for _, cls in spec.audit_insensitive:
        if cls not in classes:
            classes.append(cls)
    # The CLI's defaults and all of each class's inputs, so the report and `conceptlens tcav` agree.
    params = {"layers": layers, "classes": classes, "runs": spec.tcav_runs, "concepts": hash_tree(spec.concepts),
              "names": spec.concept_names, "random": hash_tree(spec.random_pool)}

    def compute(d):
        tcav = TCAV(run.model, layers, runs=spec.tcav_runs, seed=spec.seed, batch_size=spec.batch_size,
                    progress=run.progress)
        names = list(spec.concept_names) if spec.concept_names else None
        tcav.run(spec.concepts, spec.random_pool, classes, run.manifest, concept_names=names).save(d)

    return {"tcav": run.stage("tcav", params, compute, TCAVResult.load)}


def _tcav_display(table):
    """The TCAV table as a reader needs it: score with its CI, direction, p-values printed once, the gate's reason."""
    from ..concepts.stats import format_p

    out = pd.DataFrame({
        "concept": table["concept"], "layer": table["layer"], "class": table["class"],
        "score [95 % CI]": [f"{m:.3f} [{lo:.2f}, {hi:.2f}]" for m, lo, hi in
                            zip(table["score_mean"], table["score_ci_low"], table["score_ci_high"])],
        "null": table["null_mean"].round(3),
        "direction": [f"{d} than random" if d and ok else "" for d, ok in zip(table["direction"], table["cav_ok"])],
        "p": [format_p(p) for p in table["p_value"]],
        "p_adj": [format_p(p) if ok else "not tested" for p, ok in zip(table["p_adjusted"], table["cav_ok"])],
        "significant": table["significant"],
        "CAV acc / gate": [f"{a:.2f} / {g:.2f}" for a, g in zip(table["cav_accuracy"], table["accuracy_gate"])],
    })
    return out


def section_concepts(page, spec, results):
    if "tcav" not in results:
        return page.section("concepts", "Concepts", skipped="no concept sets ([concepts] dir and random_pool)")
    res = results["tcav"]
    table = res.to_frame()
    prov = res.provenance.get("parameters", {})
    text = (f"TCAV score = fraction of class inputs whose class logit increases along the concept's CAV (mean over "
            f"{prov.get('runs')} runs of {prov.get('concept_size')} concept against as many random images, bootstrap 95 % CI), "
            f"tested against {prov.get('null_runs')} random-vs-random runs ({prov.get('test')} test, "
            f"{prov.get('correction')} correction over the whole table, alpha {prov.get('alpha')}). Direction: whether "
            "the class is more or less sensitive to the concept than to random directions. A concept is tested at a "
            "layer only when its cross-fitted CAV accuracy beats the gate, the "
            f"{prov.get('gate_quantile')} quantile of random-vs-random CAVs' accuracy; below it the layer does not "
            "represent the concept and p_adj says 'not tested'. Inputs: every manifest row of each class, as "
            "`conceptlens tcav` uses them.")
    blocks = [table_block(page, _tcav_display(table), "tcav", "TCAV scores", text, max_rows=60)]
    page.table(table, "tcav")  # the full table (every column) in tables/tcav.csv
    for cls, g in table.groupby("class", sort=True):
        path = grouped_bars(g, "concept", "layer", "score_mean", "score_ci_low", "score_ci_high",
                            page.asset(f"tcav-{_slug(cls)}.png"), f"TCAV scores for class {cls}", "TCAV score",
                            reference=0.5, marks="significant")
        blocks.append(image_block(page, path, f"TCAV scores for class {cls}", caption=f"class {cls}: bars = layers, "
                                  "whiskers = 95 % CI, * = significant after correction"))
    quality = table.groupby(["concept", "layer"], sort=False)[["cav_accuracy", "accuracy_gate", "cav_ok", "cav_stability"]].first().reset_index()
    blocks.append(table_block(page, quality, "cav_quality", "CAV quality",
                              "Cross-fitted accuracy of the concept-vs-random classifiers, pooled over runs, against the "
                              "gate (random sets told apart from each other as well as this would not be a concept: "
                              "cav_ok false, not tested), and stability (mean pairwise cosine of the runs' CAVs).",
                              max_rows=60))
    page.section("concepts", "Concepts", blocks)


# --------------------------------------------------------------------------- units (network dissection)

UNIT_GALLERY = 12  # units shown with their top images


def stage_dissection(run, results):
    spec = run.spec
    if not _wants(spec, "units") or spec.broden is None:
        return {}
    from ..dissection import DissectionResult, dissect

    layers = list(spec.dissect_layers or spec.layers[-2:])

    def compute(d):
        dissect(run.model, spec.broden, layers, d, batch_size=spec.batch_size, progress=run.progress)

    params = {"layers": layers, "broden": hash_tree(spec.broden)}
    return {"dissection": run.stage("dissection", params, compute, DissectionResult.load)}


def gallery_units(dissection):
    """The units the units section shows with their images: the ``UNIT_GALLERY`` interpretable
    units of highest IoU, best first (rows of the dissection's unit table)."""
    ranked = dissection.to_frame().sort_values("iou", ascending=False)
    return ranked[ranked["interpretable"].astype(bool)].head(UNIT_GALLERY)


# Feature visualisation settings of the units section (visualize's defaults, named so the cache key
# holds them); one chunk for the whole gallery, since chunking changes the rounding (see visualize).
UNIT_VIS = {"lr": 0.05, "param": "fourier", "transforms": "default", "batch_size": UNIT_GALLERY}


def stage_unit_visualizations(run, results):
    """One feature visualisation per gallery unit (``[dissection] visualize``), all in one
    :func:`~conceptlens.featurevis.visualize` call, with the preprocessing the report's images get."""
    spec = run.spec
    if not spec.dissect_visualize or "dissection" not in results:
        return {}
    from ..featurevis import Visualization, channel, visualize

    units = [[r.layer, int(r.unit)] for r in gallery_units(results["dissection"]).itertuples()]
    if not units:
        return {}
    # The model's own preprocessing may be unset where the manifest's sidecar gives it: visualise
    # with what the analyses use (its normalisation and input size), which the cache key then holds.
    prep = run.model.preprocessing_for(run.manifest)
    model = dataclasses.replace(run.model, preprocessing=prep)
    size = _input_size(run, prep)

    def compute(d):
        visualize(model, [channel(layer, u) for layer, u in units], size=size, steps=spec.dissect_visualize_steps,
                  seed=spec.seed, progress=run.progress, **UNIT_VIS).save(d)

    params = {"units": units, "steps": spec.dissect_visualize_steps, "preprocessing": prep.to_dict(), "size": size,
              **UNIT_VIS}
    return {"unit_visualizations": run.stage("unit_visualizations", params, compute, Visualization.load)}


def _input_size(run, prep):
    """The visualisations' ``[H, W]`` where neither the model nor the preprocessing gives a size
    (``None`` otherwise: :func:`~conceptlens.featurevis.visualize` uses theirs): the first manifest
    image's, as the model sees the report's images unresized."""
    if run.model.input_size or prep.crop or prep.resize:
        return None
    from PIL import Image

    with Image.open(run.manifest.image_paths()[0]) as im:
        return [im.height, im.width]


def section_units(page, spec, results):
    from ..featurevis import channel

    if "dissection" not in results:
        return page.section("units", "Units", skipped="no Broden-style concept set ([dissection] broden)")
    res = results["dissection"]
    units = res.to_frame()
    summary = res.summary
    prov = res.provenance
    text = (f"Network dissection of {', '.join(res.layers)} on {prov.get('broden', 'the Broden set')}: each unit's map, "
            f"upsampled to the mask grid and thresholded at its {prov.get('parameters', {}).get('quantile', 0.995)} "
            "quantile, is compared with every concept mask; IoU over the whole set; interpretable when IoU ≥ "
            f"{prov.get('parameters', {}).get('iou_threshold', 0.04)}.")
    blocks = [table_block(page, summary, "dissection_summary", "Interpretable units per layer and category", text)]
    per_cat = summary[summary["category"] != "all"] if "category" in summary else summary
    if len(per_cat):
        path = grouped_bars(per_cat.assign(lo=per_cat["interpretable_units"], hi=per_cat["interpretable_units"]),
                            "category", "layer", "interpretable_units", "lo", "hi", page.asset("units-per-category.png"),
                            "interpretable units per category", "units")
        blocks.append(image_block(page, path, "interpretable units per category and layer"))
    cols = ["layer", "unit", "label", "category", "iou", "threshold", "interpretable", "dead"]
    ranked = units.sort_values("iou", ascending=False)
    blocks.append(table_block(page, ranked[[c for c in cols if c in ranked]], "units", "Units by IoU", max_rows=30))
    vis = results.get("unit_visualizations")
    # Matched by objective, not position: a unit never shows another unit's visualisation.
    images = {} if vis is None else dict(zip(vis.table["objective"], vis.images))
    items, cache = [], {}
    broden = read_broden(spec.broden) if spec.broden is not None else None
    for r in gallery_units(res).itertuples():
        panels = [unit_panel(*p) for p in res.unit_panels(r.layer, r.unit, broden, cache=cache)] if broden else []
        if not panels:
            continue
        seen = images.get(channel(r.layer, int(r.unit)).description)
        if seen is not None:
            panels.insert(0, fit_height(seen, panels[0].shape[0]))
        name = f"unit-{_slug(r.layer)}-{r.unit}.png"
        save_png(strip(panels), page.asset(name))
        shown = "feature visualisation, then top images" if seen is not None else "top images"
        items.append({"src": f"assets/{name}", "alt": f"{r.layer} unit {r.unit} {shown}",
                      "caption": f"{r.layer} unit {r.unit}: {r.label} ({r.category}), IoU {r.iou:.3f}"})
    if items:
        title = "Top units: most activating images with unit mask and concept mask"
        text = None
        if vis is not None:
            title = "Top units: feature visualisation, then most activating images with unit mask and concept mask"
            text = _unit_visualization_text(vis)
        blocks.append({"kind": "strip", "title": title, "text": text, "items": items})
    page.section("units", "Units", blocks)


def _unit_visualization_text(vis):
    """What the first image of each gallery strip is, from the visualisation's own provenance."""
    p = vis.provenance.get("parameters", {})
    return (f"First image of each strip: the unit's feature visualisation, activation maximisation of the unit's mean "
            f"activation over its map by a Fourier-parameterised image, {p.get('steps')} Adam steps at learning rate "
            f"{p.get('lr')}, random transforms each step ({p.get('transforms')}), seed {p.get('seed')}; then the "
            "unit's most activating Broden images.")


# --------------------------------------------------------------------------- audits

def audit_verdicts(spec, results):
    """Audit rows (``kind, name, verdict, evidence``) from the TCAV and probe results."""
    rows = []
    if spec.audit_insensitive and "tcav" in results:
        for r in results["tcav"].audit(list(spec.audit_insensitive)).itertuples():
            evidence = r.evidence + (f"; to decide: {r.fix}" if r.fix else "")
            rows.append({"kind": "concept sensitivity", "name": f"class {r._2} must not be sensitive to concept {r.concept}",
                         "verdict": r.verdict, "evidence": f"{evidence} (margin ±{r.margin:g}, alpha {r.alpha:g}; "
                                                            "p_audit: Holm over the audits' tests)"})
    if spec.audit_not_decodable and "probes" in results:
        probes = results["probes"]
        probed = set(probes.to_frame()["target"])
        for attr in spec.audit_not_decodable:
            name = f"{attr} must not be decodable from the features"
            if attr not in probed:
                rows.append({"kind": "decodability", "name": name, "verdict": "inconclusive",
                             "evidence": f"no probe for {attr} (is it a manifest column with 2 or more values?)"})
                continue
            r = probes.audit([attr]).iloc[0]
            rows.append({"kind": "decodability", "name": name, "verdict": r.verdict, "evidence": r.evidence})
    return rows


def section_audits(page, spec, results):
    rows = audit_verdicts(spec, results)
    if not rows:
        return page.section("audits", "Audits", skipped="no audits in the spec ([audits] insensitive, not_decodable)")
    frame = pd.DataFrame(rows)
    page.table(frame, "audits")
    n_fail = int((frame["verdict"] == "fail").sum())
    text = f"{len(rows)} audits: {n_fail} failed, {int((frame['verdict'] == 'pass').sum())} passed."
    page.section("audits", "Audits", [{"kind": "verdicts", "text": text, "items": rows}])


# --------------------------------------------------------------------------- layers (representation)


def stage_decision(run, results):
    """Decision modes of the ``[decision] classes``, with units read by their dissection labels when
    the dissection covers the layer."""
    spec = run.spec
    if not _wants(spec, "layers") or not spec.decision_classes:
        return {}
    from ..decision import DecisionTreeResult, decision_tree

    layer = spec.decision_layer or spec.layers[-1]
    dissection = results.get("dissection")
    labels = dissection.unit_labels(layer, interpretable=False) if dissection and layer in dissection.layers else None
    out = {}
    for cls in spec.decision_classes:
        params = {"class": cls, "layer": layer, "modes": spec.decision_modes, "cells": spec.decision_cells,
                  "split": spec.decision_split, "labels": None if labels is None else labels["label"].tolist()}

        def compute(d, cls=cls):
            decision_tree(run.model, run.manifest, layer, cls, split=spec.decision_split, unit_labels=labels,
                          n_modes=spec.decision_modes, cells=spec.decision_cells, seed=spec.seed,
                          batch_size=spec.batch_size, progress=run.progress).save(d)

        out[cls] = run.stage(f"decision-{_slug(cls)}", params, compute, DecisionTreeResult.load)
    return {"decision": out}


def decision_blocks(page, spec, trees):
    """Per class: the tree figure, the modes table and each mode's prototype images."""
    blocks = []
    for cls, tree in trees.items():
        params = tree.provenance["parameters"]
        name = f"decision-{_slug(cls)}"
        path = decision_tree_plot(tree.nodes, page.asset(f"{name}.png"), f"decision modes of {cls} at {params['layer']}")
        read = "concept labels of the dissection" if params.get("unit_labels") else "unit (no dissection of this layer)"
        text = (f"{len(tree.images)} images of class {cls}: each image's logit, to first order g·a at {params['layer']}, split "
                f"over units and a {params['cells']}×{params['cells']} grid of the map; shares of its total magnitude, grouped by "
                f"{read}. Images with similar shares merged bottom-up (Ward); the leaves are the decision modes. Fidelity R²: "
                "how well one shared rationale (the node's mean gradient) reproduces its images' logits.")
        blocks.append(image_block(page, path, f"decision tree of class {cls}", title=f"Decision modes: {cls}", text=text))
        cols = ["node", "parent", "depth", "mode", "size", "leading", "leading_share", "rationale", "fidelity_r2", "own_r2"]
        blocks.append(table_block(page, tree.nodes[cols], f"{name}-nodes", f"Nodes of the {cls} tree"))
        items = []
        for mode in tree.modes.itertuples():
            panel = prototype_strip(tree, mode.node, spec.manifest.parent)
            if panel is not None:
                asset = f"{name}-mode-{mode.node}.png"
                save_png(panel, page.asset(asset))
                items.append({"src": f"assets/{asset}", "alt": f"mode {mode.node} prototypes",
                              "caption": f"mode #{mode.node} ({mode.size} images): {mode.rationale}"})
        if items:
            blocks.append({"kind": "strip", "title": f"Prototype images of each {cls} mode", "items": items})
    return blocks




def stage_representation(run, results):
    """Probes, embedding and k-NN on the capture pass's stores (top-k images came with it)."""
    spec = run.spec
    if not _wants_representation(spec):
        return {}
    from ..representation.embed import Embedding, embed
    from ..representation.neighbors import NeighborResult, neighbors
    from ..representation.probes import ProbeResult

    layers = list(spec.layers)
    captured = results["_capture"]
    store = captured["store"]
    out = {"topk": captured["topk"]}
    targets = list(spec.probe_targets) if spec.probe_targets is not None else _default_targets(run.manifest)
    targets += [t for t in spec.audit_not_decodable if t not in targets]
    if targets:
        out["probes"] = run.stage("probes", {"layers": layers, "targets": targets, "baseline_seed": spec.seed},
                                  lambda d: _probe_with_baselines(run, store, targets, layers, d).save(d), ProbeResult.load)
    if _wants(spec, "layers"):
        out["embedding"] = run.stage("embedding", {"layer": layers[-1], "method": spec.embed_method},
                                     lambda d: embed(store, layers[-1], spec.embed_method, seed=spec.seed).save(d),
                                     Embedding.load)
    if _wants(spec, "dataset"):
        label_column = "label" if "label" in run.manifest.frame else None
        out["neighbors"] = run.stage(
            "neighbors", {"layer": layers[-1], "duplicates": False},
            lambda d: neighbors(store, layers[-1], label_column=label_column, duplicates=False).save(d), NeighborResult.load)
        # Near-duplicates are copies up to noise and small shifts: compare layouts (the capture's grid-pooled
        # early layer), which mean-pooled deep features do not keep.
        dup_layer = spec.duplicate_layer or layers[0]
        layout = captured["layout"]
        out["duplicates"] = run.stage(
            "duplicates", {"layer": dup_layer, "pool": LAYOUT_POOL, "threshold": spec.duplicate_threshold},
            lambda d: neighbors(layout, dup_layer, label_column=None, duplicate_threshold=spec.duplicate_threshold).save(d),
            NeighborResult.load)
    return out


def _probe_with_baselines(run, store, targets, layers, directory):
    """Probes against a seeded random-init copy and pooled input pixels, extracted into the stage's
    folder; a model without initialisers gets no random-init baseline, and its audits say so."""
    from ..representation.baselines import extract_baselines
    from ..representation.probes import probe

    spec = run.spec
    baseline, pixels = extract_baselines(run.model, run.manifest, layers, directory, seed=spec.seed, required=False,
                                         batch_size=spec.batch_size, progress=run.progress)
    return probe(store, targets, layers, baseline=baseline, pixels=pixels, seed=spec.seed, progress=run.progress)


def _default_targets(manifest):
    """``label`` and every attribute with 2 to 20 distinct values (ids and paths are not targets)."""
    frame = manifest.frame
    cols = (["label"] if "label" in frame else []) + manifest.attributes
    return [c for c in cols if 2 <= frame[c].nunique() <= 20]


def _categorical_columns(frame, limit=12):
    skip = {"manifest_row", "image", "split", "x", "y"}
    return [c for c in frame.columns if c not in skip and 2 <= frame[c].nunique() <= limit]


def section_layers(page, spec, results):
    blocks = []
    if "probes" in results:
        table = results["probes"].to_frame()
        depth = {layer: i for i, layer in enumerate(spec.layers)}
        order = table.assign(depth=table["layer"].map(depth)).sort_values(["target", "depth"], kind="stable")
        path = depth_plot(order, "layer", "target", [("accuracy", "probe", "-"), ("baseline_accuracy", "random-init", ":")],
                          page.asset("probes.png"), "linear probes across depth", "test accuracy")
        blocks.append(image_block(page, path, "probe accuracy of the trained and the random-init network per target across layers",
                                  caption="solid: the trained network; dotted: the same layer of a random-init copy "
                                          "(same colour = same target)"))
        cols = ["layer", "target", "accuracy", "ci_low", "ci_high", "baseline_accuracy", "selectivity", "selectivity_ci_low",
                "selectivity_ci_high", "pixel_accuracy", "null_accuracy", "p_permutation", "decodable"]
        blocks.insert(0, table_block(page, table[[c for c in cols if c in table]], "probes", "Linear probes per layer",
                                     "Accuracy of a linear probe on frozen standardized features (bootstrap 95 % CI); the "
                                     "same probe on the same layer of a seeded random-init copy of the network "
                                     "(baseline_accuracy) and on the input pixels pooled to about the layer's size "
                                     "(pixel_accuracy); selectivity = accuracy − random-init accuracy with a paired CI; "
                                     "null_accuracy: probes trained on permuted labels, scored on the true test labels. "
                                     "decodable = the selectivity CI lies above 0: the layer learned it."))
    if "embedding" in results:
        emb = results["embedding"]
        frame = emb.to_frame()
        xy = emb.coords[:, :2]
        for col in _categorical_columns(frame):
            path = scatter_plot(xy, frame[col].astype(str).to_numpy(), page.asset(f"embedding-{_slug(col)}.png"),
                                f"{emb.layer}: coloured by {col}")
            blocks.append(image_block(page, path, f"embedding coloured by {col}", caption=f"colour: {col}"))
        page.table(frame, "embedding")
        blocks.append({"kind": "text", "title": "Embedding",
                       "text": f"{emb.method} of layer {emb.layer}; trustworthiness {emb.trustworthiness:.3f}."})
    if "topk" in results:
        blocks += topk_blocks(page, spec, results["topk"])
    if "decision" in results:
        blocks += decision_blocks(page, spec, results["decision"])
    page.section("layers", "Layers", blocks, skipped=None if blocks else "no layer analyses were requested")


def topk_blocks(page, spec, top, channels=8):
    """Contact sheets of the most activating images of the strongest channels of the last layer."""
    table = top.to_frame()
    layer = spec.layers[-1]
    t = table[table["layer"] == layer]
    if t.empty:
        return []
    best = t[t["rank"] == 1].sort_values("score", ascending=False)["channel"].head(channels).tolist()
    items = []
    root = spec.manifest.parent
    for ch in best:
        rows = t[t["channel"] == ch].sort_values("rank")
        thumbs = [topk_thumbnail(root / r.image, r.y, r.x, r.height, r.width) for r in rows.itertuples()]
        name = f"topk-{_slug(layer)}-{ch}.png"
        save_png(strip(thumbs, gap=0), page.asset(name))
        items.append({"src": f"assets/{name}", "alt": f"top images of {layer} channel {ch}",
                      "caption": f"{layer} channel {ch}: top score {rows['score'].iloc[0]:.2f}"})
    page.table(table, "topk")
    return [{"kind": "strip", "title": f"Max-activating images, {layer}",
             "text": f"Top {len(rows)} images of the {len(best)} channels with the highest peak activation "
                     f"(score: spatial {top.params.get('score', 'max')}; magenta: argmax cell).", "items": items}]


# --------------------------------------------------------------------------- drill-down (attribution)

def _drill_rows(run):
    """Seeded choice of ``drill_samples`` manifest rows per class, from the test split when there is one."""
    frame = run.manifest.frame
    pool = frame[frame["split"] == "test"] if "split" in frame and (frame["split"] == "test").any() else frame
    rng = np.random.default_rng(run.spec.seed)
    rows = []
    if "label" in pool:
        for _, g in pool.groupby("label", sort=True):
            rows += sorted(rng.choice(g.index.to_numpy(), size=min(run.spec.drill_samples, len(g)), replace=False).tolist())
    else:
        rows = sorted(rng.choice(pool.index.to_numpy(), size=min(run.spec.drill_samples, len(pool)), replace=False).tolist())
    return rows


def stage_drilldown(run, results):
    if not _wants(run.spec, "drilldown"):
        return {}
    from ..attribution import Explanations, explain

    rows = _drill_rows(run)
    subset = run.manifest.subset(run.manifest.frame.index.isin(rows))
    params = {"methods": list(run.spec.drill_methods), "rows": rows}

    def compute(d):
        explain(run.model, subset, list(run.spec.drill_methods), progress=run.progress).save(d)

    return {"drilldown": run.stage("drilldown", params, compute, Explanations.load)}


AUDIT_DRILL_IMAGES = 4  # inputs shown per failed audit


def failed_audits(spec, results):
    """``[(concept, class, layer, audit row)]`` of the TCAV audits that failed, at their deciding layer."""
    if not spec.audit_insensitive or "tcav" not in results:
        return []
    verdicts = results["tcav"].audit(list(spec.audit_insensitive))
    return [(r.concept, r._2, r.layer, r) for r in verdicts.itertuples() if r.verdict == "fail"]


def stage_audit_drilldown(run, results):
    """Attributions of the inputs behind each failed audit: those whose class logit rises most along
    the concept's CAVs at the deciding layer (:meth:`TCAVResult.top_inputs`)."""
    if not _wants(run.spec, "drilldown"):
        return {}
    from ..attribution import Explanations, explain

    out = {}
    for concept, cls, layer, _ in failed_audits(run.spec, results):
        top = results["tcav"].top_inputs(concept, cls, layer, k=AUDIT_DRILL_IMAGES)
        top["image_path"] = [str(run.manifest.root / p) for p in top["image"]]  # as Explanations name them
        rows = top["row"].tolist()
        subset = run.manifest.subset(run.manifest.frame.index.isin(rows))

        def compute(d, subset=subset, cls=cls):
            explain(run.model, subset, list(run.spec.drill_methods), target=cls, progress=run.progress).save(d)

        params = {"methods": list(run.spec.drill_methods), "rows": rows, "class": cls}
        expl = run.stage(f"audit_drill_{_slug(concept)}_{_slug(cls)}", params, compute, Explanations.load)
        out[f"audit_drill:{concept}:{cls}"] = (expl, top, layer)
    return out


def _galleries(page, expl, prefix, text, caption, order=None):
    """One gallery per explained image (in ``order``, positions in ``expl.rows``): the input and each method's overlay."""
    blocks = []
    for n, i in enumerate(range(len(expl.rows)) if order is None else order):
        row = expl.rows.iloc[i]
        name = f"{prefix}-{i:03d}-input.png"
        save_png(expl.images[i], page.asset(name))
        items = [{"src": f"assets/{name}", "alt": f"input {row['image']}", "caption": "input"}]
        for info in expl.method_info():
            m = info["name"]
            name = f"{prefix}-{i:03d}-{m}.png"
            save_png(overlay_rgb(expl.images[i], expl.maps[m][i], info["signed"]), page.asset(name))
            items.append({"src": f"assets/{name}", "alt": f"{m} overlay", "caption": m})
        blocks.append({"kind": "gallery", "title": caption(i, row), "text": text if n == 0 else None, "items": items})
    return blocks


def section_drilldown(page, spec, results):
    if "drilldown" not in results:
        return page.section("drilldown", "Drill-down", skipped="the drilldown section was not requested")
    blocks = []
    for key in [k for k in results if k.startswith("audit_drill:")]:
        _, concept, cls = key.split(":", 2)
        expl, top, layer = results[key]
        by_path = top.set_index("image_path")
        extra = _binary_columns(expl.rows, both_values=False)  # e.g. has_tag: what the images really show
        text = (f"Audit failed: class {cls} is sensitive to concept {concept}. These are the {len(top)} {cls} inputs "
                f"whose {cls} logit rises most along the {concept} CAVs at {layer} (mean directional derivative over "
                f"the runs), with attributions of class {cls} ({', '.join(expl.methods)}).")

        def caption(i, row, by_path=by_path, extra=extra):
            r = by_path.loc[row["image"]]
            tail = "".join(f", {c} = {row[c]}" for c in extra)
            return (f"{_short(row['image'])}: derivative {r['derivative']:.3g}, positive in {r['positive_runs']:.0%} of "
                    f"runs{tail}")

        position = {path: i for i, path in enumerate(expl.rows["image"])}
        order = [position[p] for p in top["image_path"] if p in position]  # largest derivative first
        blocks += _galleries(page, expl, f"audit-{_slug(concept)}-{_slug(cls)}", text, caption, order)
        page.table(top.drop(columns="image_path"), f"audit-drill-{_slug(concept)}-{_slug(cls)}")
    expl = results["drilldown"]
    text = (f"Attribution maps of the predicted class for {len(expl.rows)} seeded test images "
            f"({spec.drill_samples} per class), methods: {', '.join(expl.methods)}.")
    blocks += _galleries(page, expl, "drill", text,
                         lambda i, row: f"{_short(row['image'])}: label {row.get('label', '?')}, predicted {row['predicted_name']}")
    blocks.append(_scale_block(page))
    page.table(expl.to_frame(), "drilldown")
    page.section("drilldown", "Drill-down", blocks)


def _short(path):
    parts = str(path).replace("\\", "/").split("/")
    return "/".join(parts[-2:])


# --------------------------------------------------------------------------- SpRAy (dataset review)

def _spray_classes(spec):
    if spec.spray_classes is not None:
        return list(spec.spray_classes)
    return sorted({cls for _, cls in spec.audit_insensitive})


def stage_spray(run, results):
    if not _wants(run.spec, "dataset"):
        return {}
    from ..attribution import SprayResult, spray_class

    out = {}
    for cls in _spray_classes(run.spec):
        def compute(d, cls=cls):
            spray_class(run.model, run.manifest, cls, method=run.spec.spray_method, seed=run.spec.seed,
                        progress=run.progress).save(d)

        out[f"spray:{cls}"] = run.stage(f"spray_{_slug(cls)}", {"class": cls, "method": run.spec.spray_method},
                                        compute, SprayResult.load)
    return out


def _binary_columns(frame, both_values=True):
    """Manifest attributes with values 0/1 (e.g. ``has_tag``): the ground truth a reader checks clusters
    and images against (``both_values``: only those where both occur, for rates that can differ)."""
    skip = {"index", "manifest_row", "label", "split", "x", "y", "target", "predicted"}
    return [c for c in frame.columns if c not in skip and (not both_values or frame[c].nunique() == 2)
            and set(map(str, frame[c].unique())) <= {"0", "1"}]


def _slug(text):
    return "".join(c if c.isalnum() else "_" for c in str(text))[:40]


def spray_blocks(page, spec, results):
    blocks = []
    for key, res in results.items():
        if not key.startswith("spray:"):
            continue
        cls = key.split(":", 1)[1]
        clusters = res.clusters()
        frame = res.to_frame()
        # Attribute make-up of each cluster (e.g. the share of tagged images): what tells strategies apart.
        for col in _binary_columns(frame.drop(columns=[c for c in ("cluster", "is_medoid") if c in frame])):
            clusters[f"{col} rate"] = frame.groupby("cluster")[col].apply(lambda v: np.mean(v.astype(int))).to_numpy()
        items = []
        for k, proto in enumerate(res.prototypes):
            name = f"spray-{_slug(cls)}-{k}.png"
            save_png(enlarge(heatmap_rgb(proto, signed=True), 128), page.asset(name))
            items.append({"src": f"assets/{name}", "alt": f"cluster {k} prototype",
                          "caption": f"cluster {k}: {int(clusters['size'][k])} images"})
        text = (f"SpRAy on class {cls}: {res.n_clusters} clusters of explanation strategy (eigengap {res.eigengap:.3f}), "
                f"method {spec.spray_method}.")
        for concept, audited, _, _ in failed_audits(spec, results):
            drill = results.get(f"audit_drill:{concept}:{cls}")
            if audited != cls or drill is None or "manifest_row" not in frame:
                continue
            top = drill[1]
            hits = frame.loc[frame["manifest_row"].isin(top["row"]), "cluster"].value_counts()
            if len(hits):
                text += (f" Audit {concept}:{cls} failed: {hits.iloc[0]} of the {len(top)} inputs it drills into (those the "
                         f"{concept} CAVs push most) fall in cluster {hits.index[0]}, the strategy it points at.")
        blocks.append(table_block(page, clusters, f"spray-{_slug(cls)}", f"Explanation strategies of class {cls}", text))
        blocks.append({"kind": "gallery", "title": f"Cluster prototypes (mean relevance), class {cls}", "items": items})
        blocks.append(_scale_block(page))
        page.table(frame, f"spray-{_slug(cls)}-members")
    return blocks


def _scale_block(page):
    path = page.asset("heatmap-scale.png")
    if not path.exists():
        heatmap_scale(path)
    return image_block(page, path, "colour scale of the heatmaps", caption="heatmap colours (blue-white-red)")


def neighbor_blocks(page, spec, results):
    if "neighbors" not in results:
        return []
    nb, dup = results["neighbors"], results["duplicates"]
    dup_cols = ["image_a", "image_b", "split_a", "split_b", "similarity", "crosses_splits"]
    issue_cols = ["image", "split", "label", "p_label", "suggested_label", "p_suggested"]
    blocks = [table_block(page, dup.duplicates[dup_cols], "duplicates", "Near-duplicate candidates",
                          f"Pairs of images with cosine similarity ≥ {spec.duplicate_threshold} between the layouts of "
                          f"{dup.layer} pooled to a 4 × 4 grid (FAISS index {dup.index}, mean-centred features): "
                          f"{len(dup.duplicates)} candidates to look at, {len(dup.leaks)} of them across splits "
                          "(crosses_splits): only those can leak the training set into the test set.", max_rows=20)]
    if len(nb.label_issues.columns):
        blocks.append(table_block(page, nb.label_issues[[c for c in issue_cols if c in nb.label_issues]], "label_issues",
                                  "Label-issue candidates",
                                  f"Images whose given label is improbable from their {nb.indices.shape[1]} nearest "
                                  f"neighbours at {nb.layer}: p_label (calibrated out of sample) ≤ "
                                  f"{nb.params['label_cut']:g}, {len(nb.label_issues)} candidates, most suspicious first.",
                                  max_rows=20))
    return blocks


def section_dataset(page, spec, results):
    blocks = neighbor_blocks(page, spec, results) + spray_blocks(page, spec, results)
    page.section("dataset", "Dataset review", blocks,
                 skipped=None if blocks else "no SpRAy classes (set [drilldown] spray_classes or [audits] insensitive)")


STAGES = [stage_capture, stage_tcav, stage_dissection, stage_unit_visualizations, stage_decision, stage_representation, stage_drilldown, stage_audit_drilldown,
          stage_spray]

SECTION_BUILDERS = {
    "overview": section_overview,
    "audits": section_audits,
    "concepts": section_concepts,
    "units": section_units,
    "layers": section_layers,
    "dataset": section_dataset,
    "drilldown": section_drilldown,
}

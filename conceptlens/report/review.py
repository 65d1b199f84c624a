"""``build_review``: the dataset-design review as its own page: shortcuts, hidden slices, leakage, label issues.

It reads the report spec format plus a ``[review]`` table (``group``, ``sensitive``,
``group_attributes``, ``layer``, ``split``) and reuses the report's stages: one capture pass over the
manifest (logits, the mean-pooled store of the spec's layers, the near-duplicate layout store),
then probes, k-NN, TCAV of the attributes' concept folders and SpRAy as the report runs them. The
review's own statistics (:mod:`conceptlens.review`) run on those results; every finding carries
its evidence and a verdict (``fail`` only with a corrected p-value; ``pass`` only shown within a
margin; otherwise ``inconclusive``; ``info`` for lists that have no test).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.corrections import holm
from ..core.result import Result, provenance
from ..data import Manifest
from ..errors import ConceptLensError, did_you_mean
from ..models import validate_layers
from . import sections as S
from .build import _Run
from .spec import ReportSpec, validate_spec

__all__ = ["ReviewResult", "ReviewBuild", "build_review", "FINDING_COLUMNS"]

logger = logging.getLogger(__name__)

FINDING_COLUMNS = ["id", "kind", "subject", "verdict", "severity", "statistic", "value", "p_adj", "summary"]
ALPHA = 0.05  # level of every review test, after Holm's correction within its family
_VERDICT_ORDER = {"fail": 0, "inconclusive": 1, "info": 2, "pass": 3}


@dataclass(frozen=True)
class ReviewResult(Result):
    """A dataset review: ranked findings and every table behind them.

    Attributes
    ----------
    findings : DataFrame
        One row per finding, in :data:`FINDING_COLUMNS`, ranked (``fail`` first, then by severity).
    tables : dict of str to DataFrame
        ``class_metrics`` (``split, class, n, correct, accuracy, ci_low, ci_high``),
        ``group_metrics`` (``attribute, value, class, ...``), ``leakage_counts``
        (``split_a, split_b, groups, near_duplicates``) and the evidence tables of each finding.
    info : dict
        ``title, model, manifest, group, sensitive, eval_split``.
    provenance : dict
    """

    findings: pd.DataFrame = field(repr=False)
    tables: dict = field(repr=False)
    info: dict
    provenance: dict = field(repr=False)

    KIND, META = "review", "review.json"

    def to_frame(self):
        return self.findings.copy()

    def _write(self, directory):  # findings.csv and <table>.csv; review.json
        self.findings.to_csv(directory / "findings.csv", index=False)
        for name, table in self.tables.items():
            table.to_csv(directory / f"{name}.csv", index=False)
        return {**self.info, "tables": sorted(self.tables)}

    @classmethod
    def _read(cls, directory, meta):
        def read(name):
            return pd.read_csv(directory / f"{name}.csv", keep_default_na=False, na_values=[""])

        info = {k: meta[k] for k in ("title", "model", "manifest", "group", "sensitive", "eval_split")}
        return cls(findings=read("findings"), tables={name: read(name) for name in meta["tables"]}, info=info,
                   provenance=meta["provenance"])


@dataclass(frozen=True)
class ReviewBuild:
    """A built review page: ``index`` (``index.html``), the result (also saved in ``<out>/review``),
    the stage log and the time of the analyses and of rendering."""

    index: Path
    result: ReviewResult
    stages: tuple
    analysis_seconds: float
    render_seconds: float


# --------------------------------------------------------------------------- input checks

def _column(manifest, name, what):
    frame = manifest.frame
    if name not in frame:
        raise ConceptLensError(f"{manifest.path}: [review] {what} names column {name!r}, which the manifest lacks"
                               f"{did_you_mean(name, list(frame.columns), 1)} (columns: {', '.join(map(str, frame.columns))})")
    values = frame[name].astype(str)
    if (values == "").any():
        raise ConceptLensError(f"{manifest.path}: column {name!r} is empty in {int((values == '').sum())} rows; "
                               "fill it (every row needs a value) or drop those rows")
    return values


def check_review_inputs(spec, manifest):
    """One-line errors for a review the manifest cannot support (columns, values, splits, groups)."""
    from ..review import check_nested

    for col in ("label", "split"):
        if col not in manifest.frame:
            raise ConceptLensError(f"{manifest.path}: a dataset review needs a {col!r} column in the manifest")
    if not spec.review_sensitive and spec.review_group is None:
        raise ConceptLensError(f"{spec.path or 'review spec'}: [review] names neither `sensitive` attributes nor a "
                               "`group` column; name at least one (e.g. sensitive = [\"site\"], group = \"patient\")")
    splits = manifest.frame["split"].astype(str)
    if spec.review_split not in set(splits):
        raise ConceptLensError(f"{manifest.path}: the evaluation split {spec.review_split!r} ([review] split) has no rows; "
                               f"splits present: {', '.join(sorted(set(splits)))}")
    for attr in spec.review_sensitive:
        values = _column(manifest, attr, "sensitive")
        present = sorted(set(values[splits == spec.review_split]))
        if len(present) < 2:
            raise ConceptLensError(f"{manifest.path}: sensitive attribute {attr!r} has one value ({present[0]!r}) in split "
                                   f"{spec.review_split!r}; an attribute needs two values to be a shortcut")
    if spec.review_group is not None:
        _column(manifest, spec.review_group, "group")
        for attr in spec.review_group_attributes:
            _column(manifest, attr, "group_attributes")
            check_nested(manifest.frame, spec.review_group, attr)
    elif spec.review_group_attributes:
        raise ConceptLensError(f"{spec.path or 'review spec'}: [review] group_attributes needs a `group` column")


def _concept_folders(spec, manifest, attr):
    """The attribute's TCAV concept folders: one named after it (``pen``) or after its values (``site0``)."""
    if spec.concepts is None or spec.random_pool is None or not Path(spec.concepts).is_dir():
        return []
    names = {p.name for p in Path(spec.concepts).iterdir() if p.is_dir()}
    if attr in names:
        return [attr]
    return sorted(v for v in set(manifest.frame[attr].astype(str)) if v in names)


# --------------------------------------------------------------------------- analyses

def _predictions(run, results):
    """Manifest columns of every predicted row with ``predicted`` and ``correct``, and the class probabilities."""
    ov = results["overview"]
    pred = ov.predictions
    frame = run.manifest.frame.iloc[pred["manifest_row"].to_numpy()].reset_index(drop=True).astype(
        {c: str for c in ("label", "split", *run.spec.review_sensitive)})
    frame = frame.assign(manifest_row=pred["manifest_row"].to_numpy(), predicted=pred["predicted"].to_numpy(),
                         correct=(pred["predicted"].to_numpy() == frame["label"].to_numpy()).astype(int))
    return frame, ov.probabilities, list(ov.classes)


def _features(results, layer, manifest_rows):
    """Mean-pooled features of ``layer`` for ``manifest_rows`` (from the capture's store)."""
    store = results["_capture"]["store"]
    where = pd.Series(np.arange(store.n_rows), index=store.rows["manifest_row"].to_numpy())
    return store.load(layer, rows=where.loc[np.asarray(manifest_rows)].to_numpy())


def _class_metrics(pred):
    from ..review import accuracy_by_group

    per_class = accuracy_by_group(pred, by=("split", "label")).rename(columns={"label": "class"})
    overall = accuracy_by_group(pred, by=("split",)).assign(**{"class": "(all)"})
    return pd.concat([overall, per_class], ignore_index=True)[
        ["split", "class", "n", "correct", "accuracy", "ci_low", "ci_high"]].sort_values(["split", "class"], ignore_index=True)


def _group_metrics(ev, attrs):
    from ..review import accuracy_by_group

    parts = []
    for attr in attrs:
        cells = accuracy_by_group(ev, by=("label", attr)).rename(columns={"label": "class", attr: "value"})
        overall = accuracy_by_group(ev, by=(attr,)).rename(columns={attr: "value"}).assign(**{"class": "(all)"})
        parts.append(pd.concat([overall, cells], ignore_index=True).assign(attribute=attr))
    cols = ["attribute", "value", "class", "n", "correct", "accuracy", "ci_low", "ci_high"]
    return pd.concat(parts, ignore_index=True)[cols] if parts else pd.DataFrame(columns=cols)


def _within_margin(cells, margin):
    """Equivalence of a shortcut ``pass``: in every class, the CI of best minus worst cell inside ±margin."""
    from ..review import newcombe_interval

    for _, g in cells[cells["class"] != "(all)"].groupby("class"):
        hi, lo = g.loc[g["accuracy"].idxmax()], g.loc[g["accuracy"].idxmin()]
        _, low, high = newcombe_interval(int(hi["correct"]), int(hi["n"]), int(lo["correct"]), int(lo["n"]))
        if low <= -margin or high >= margin:
            return False
    return True


def _alignment(ev, features, attr, seed):
    """Do the layer's neighbourhoods follow the attribute? Per class, KMeans (one cluster per value) on the
    features of the evaluation rows, ARI and NMI against the attribute with a permutation null."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    from ..review import cluster_alignment

    rows = []
    for cls in sorted(set(ev["label"])):
        m = (ev["label"] == cls).to_numpy()
        values = ev.loc[m, attr].to_numpy()
        k = len(set(values))
        if k < 2 or m.sum() <= k:
            continue
        x = features[m]
        x = PCA(n_components=min(20, x.shape[1], len(x) - 1), random_state=seed).fit_transform(x - x.mean(0))
        clusters = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)
        a = cluster_alignment(clusters, values, seed=seed)
        rows.append({"attribute": attr, "class": cls, "source": "embedding k-means", "n": int(m.sum()), **a})
    return rows


def _spray_alignment(results, pred, attr, seed):
    from ..review import cluster_alignment

    rows = []
    for key, res in results.items():
        if not key.startswith("spray:"):
            continue
        members = res.to_frame()
        if "manifest_row" not in members:
            continue
        values = pred.set_index("manifest_row").loc[members["manifest_row"].to_numpy(), attr].to_numpy()
        if len(set(values)) < 2:
            continue
        a = cluster_alignment(members["cluster"].to_numpy(), values, seed=seed)
        rows.append({"attribute": attr, "class": key.split(":", 1)[1], "source": "SpRAy clusters", "n": len(members), **a})
    return rows


def _shortcut_findings(run, results, pred, ev, ev_features, group_metrics):
    """One finding per sensitive attribute: the within-class accuracy test decides (Holm over the
    attributes); decodability, TCAV and cluster alignment are its evidence."""
    from ..review import group_gap_test

    spec = run.spec
    attrs = list(spec.review_sensitive)
    tests = [group_gap_test(ev, attr) for attr in attrs]
    p_adj = holm(np.array([t["p_value"] for t in tests])) if tests else np.array([])
    probes = results.get("probes")
    audits = probes.audit(attrs) if probes is not None and attrs else None
    tcav = results.get("tcav")
    decod, tcav_rows, align = [], [], []
    findings = []
    for i, attr in enumerate(attrs):
        t = tests[i]
        evidence = [f"largest within-class accuracy gap {t['gap']:.2f} (class {t['gap_class']}: {attr}={t['best_value']} "
                    f"{t['best_accuracy']:.2f} vs {attr}={t['worst_value']} {t['worst_accuracy']:.2f}); stratified "
                    f"chi-square {t['statistic']:.1f} ({t['dof']} dof), permutation p_adj {p_adj[i]:.2g} (Holm over "
                    f"{len(attrs)} attributes)"]
        if audits is not None:
            a = audits.iloc[i]
            decod.append({"attribute": attr, "verdict_decodable": "decodable" if a["verdict"] == "fail" else a["verdict"],
                          "layer": a["layer"], "selectivity": a["selectivity"], "ci_low": a["selectivity_ci_low"],
                          "ci_high": a["selectivity_ci_high"], "p_adj": a["p_adjusted"], "evidence": a["evidence"]})
            evidence.append(f"probe: {a['evidence']}")
        folders = _concept_folders(spec, run.manifest, attr)
        if tcav is not None and folders:
            tab = tcav.to_frame()
            tab = tab[tab["concept"].isin(folders)]
            tcav_rows.append(tab.assign(attribute=attr))
            sig = tab[tab["significant"].astype(bool)]
            evidence.append(f"TCAV of {', '.join(folders)}: {len(sig)} of {len(tab)} (concept, layer, class) tests "
                            "significant after correction")
        rows = _alignment(ev, ev_features, attr, spec.seed) + _spray_alignment(results, pred, attr, spec.seed)
        align += rows
        if rows:
            best = max(rows, key=lambda r: r["ari"])
            evidence.append(f"{best['source']} of class {best['class']} vs {attr}: ARI {best['ari']:.2f} "
                            f"(p {best['p_ari']:.2g}), NMI {best['nmi']:.2f}")
        cells = group_metrics[group_metrics["attribute"] == attr]
        if p_adj[i] < ALPHA:
            verdict = "fail"
        elif _within_margin(cells, spec.review_margin):
            verdict = "pass"
        else:
            verdict = "inconclusive"
            evidence.append(f"to decide: more evaluation images per (class, {attr}) cell, so every gap's 95 % CI fits "
                            f"inside ±{spec.review_margin:g}")
        findings.append({"id": f"shortcut:{attr}", "kind": "shortcut", "subject": attr, "verdict": verdict,
                         "severity": float(t["gap"]), "statistic": "within-class accuracy gap", "value": float(t["gap"]),
                         "p_adj": float(p_adj[i]), "summary": "; ".join(evidence)})
    tables = {}
    if decod:
        tables["shortcut_decodability"] = pd.DataFrame(decod)
    if tcav_rows:
        tables["shortcut_tcav"] = pd.concat(tcav_rows, ignore_index=True)
    if align:
        tables["shortcut_alignment"] = pd.DataFrame(align)
    return findings, tables


def _slice_findings(run, ev, ev_features, probs, classes):
    """Hidden sub-populations: Domino's error-aware mixture on the evaluation rows, KMeans beside it."""
    from scipy.stats import fisher_exact

    from ..review import discover_slices, kmeans_slices

    spec = run.spec
    keep = ev["label"].isin(classes).to_numpy()  # rows labelled with a class the model has
    x, p, rows = ev_features[keep], probs[keep], ev[keep].reset_index(drop=True)
    y, names = rows["label"].to_numpy(), np.asarray(classes)
    res = discover_slices(x, y, p, classes=names, n_slices=spec.review_slices, seed=spec.seed)
    base = kmeans_slices(x, n_slices=spec.review_slices, seed=spec.seed, labels=y, pred_probs=p, classes=names)
    wrong = rows["correct"].to_numpy() == 0
    table = res.slices.copy()
    # A slice's members (posterior > 1/2, so the slice is their most probable component) against the rest:
    # is its error rate higher? One-sided Fisher, Holm over the slices.
    pvals = []
    for s in table["slice"]:
        m = res.scores[:, s] > 0.5
        tab = [[int((wrong & m).sum()), int((~wrong & m).sum())], [int((wrong & ~m).sum()), int((~wrong & ~m).sum())]]
        pvals.append(fisher_exact(tab, alternative="greater")[1] if m.any() and (~m).any() else 1.0)
    table["p_adj"] = holm(np.array(pvals))
    members = []
    for s in table["slice"]:
        top = res.prototypes(s, k=8)
        members.append(rows.iloc[top][["manifest_row", "image", "label", "predicted"]].assign(slice=s, rank=np.arange(len(top))))
    worst = table.iloc[0]
    verdict = "fail" if worst["p_adj"] < ALPHA and worst["error_gap"] > 0 else "info"
    summary = (f"{len(table)} slices of the {len(rows)} evaluation images at {spec.review_layer or spec.layers[-1]} "
               f"(Domino's error-aware mixture); worst: slice {int(worst['slice'])}, {int(worst['size'])} images, accuracy "
               f"{worst['accuracy']:.2f} ({worst['error_gap']:+.2f} error rate against all), p_adj {worst['p_adj']:.2g} "
               "(one-sided Fisher, Holm over slices). Look at its prototypes: a shared trait the labels do not name is a "
               "hidden sub-population.")
    finding = {"id": "slices", "kind": "slice", "subject": "evaluation split", "verdict": verdict,
               "severity": float(max(worst["error_gap"], 0.0)), "statistic": "worst slice error gap",
               "value": float(worst["error_gap"]), "p_adj": float(worst["p_adj"]), "summary": summary}
    # Every evaluation row's score per slice (Domino's posterior, k-means' negative distance), for other cuts.
    scores = pd.concat([rows[["manifest_row", "image"]]] + [
        pd.DataFrame(r.scores, columns=[f"{name}_{k}" for k in range(r.scores.shape[1])])
        for name, r in (("domino", res), ("kmeans", base))], axis=1)
    tables = {"slices": table, "slice_prototypes": pd.concat(members, ignore_index=True),
              "slices_kmeans": base.slices.copy(), "slice_scores": scores}
    return [finding], tables


def _leakage_findings(run, results):
    from ..review import group_leakage

    spec = run.spec
    frame = run.manifest.frame
    findings, tables = [], {}
    dup = results.get("duplicates")
    leaks = dup.leaks if dup is not None else pd.DataFrame(columns=["split_a", "split_b"])
    pairs = leaks.assign(pair=[" | ".join(sorted(p)) for p in zip(leaks["split_a"].astype(str), leaks["split_b"].astype(str))])
    dup_counts = pairs.groupby("pair").size()
    if spec.review_group is not None:
        leak = group_leakage(frame, spec.review_group)
        counts = leak.counts.copy()
        n_groups = int(len(leak.groups))
        rows_in = int(frame[spec.review_group].astype(str).isin(set(leak.groups["group"].astype(str))).sum())
        findings.append({
            "id": f"leakage:{spec.review_group}", "kind": "leakage", "subject": spec.review_group,
            "verdict": "fail" if n_groups else "pass", "severity": rows_in / max(len(frame), 1),
            "statistic": f"{spec.review_group} groups in more than one split", "value": float(n_groups), "p_adj": np.nan,
            "summary": (f"{n_groups} {spec.review_group} groups sit in more than one split ({rows_in} rows); from the "
                        f"manifest, exact. Fix: `conceptlens split MANIFEST --group {spec.review_group}`." if n_groups else
                        f"no {spec.review_group} group sits in two splits (exact, from the manifest)")})
        tables["leaking_groups"] = leak.groups
    else:
        splits = sorted(set(frame["split"].astype(str)))
        counts = pd.DataFrame([(a, b) for i, a in enumerate(splits) for b in splits[i + 1:]], columns=["split_a", "split_b"])
        counts["groups"] = np.nan  # no group column: not counted
    key = [" | ".join(sorted(p)) for p in zip(counts["split_a"].astype(str), counts["split_b"].astype(str))]
    counts["near_duplicates"] = [int(dup_counts.get(k, 0)) for k in key]
    tables["leakage_counts"] = counts[["split_a", "split_b", "groups", "near_duplicates"]]
    if dup is not None:
        n = len(leaks)
        findings.append({
            "id": "leakage:near-duplicates", "kind": "leakage", "subject": "near-duplicate images",
            "verdict": "fail" if n else "pass", "severity": n / max(len(frame), 1),
            "statistic": "near-duplicate pairs across splits", "value": float(n), "p_adj": np.nan,
            "summary": (f"{n} image pairs across splits with layout cosine ≥ {spec.duplicate_threshold} ({dup.layer} "
                        "pooled to 4 × 4, FAISS): candidates to check by eye" if n else
                        f"no image pair across splits with layout cosine ≥ {spec.duplicate_threshold}")})
        tables["near_duplicates"] = leaks
    return findings, tables


def _label_findings(run, results, pred, features):
    from ..review import confident_label_issues

    res = confident_label_issues(features, pred["label"].to_numpy(), seed=run.spec.seed)
    issues = res.issues.copy()
    issues.insert(0, "manifest_row", pred["manifest_row"].to_numpy()[issues["row"].to_numpy()])
    issues.insert(1, "image", pred["image"].to_numpy()[issues["row"].to_numpy()])
    issues.insert(2, "split", pred["split"].to_numpy()[issues["row"].to_numpy()])
    tables = {"label_issues": issues.drop(columns=["row"])}
    nb = results.get("neighbors")
    knn = len(nb.label_issues) if nb is not None else 0
    if nb is not None:
        tables["label_issues_knn"] = nb.label_issues
    both = len(set(issues["manifest_row"]) & set(nb.label_issues["manifest_row"])) if nb is not None and knn else 0
    summary = (f"{len(issues)} rows whose given label the cross-validated probes on {run.spec.review_layer or run.spec.layers[-1]} "
               f"confidently contradict (confident learning, per-class thresholds), most suspicious first; the k-NN vote "
               f"flags {knn}, {both} of them in both lists. Relabel or remove after a look.")
    return [{"id": "label-issues", "kind": "label-issues", "subject": "label", "verdict": "info",
             "severity": len(issues) / max(len(pred), 1), "statistic": "confident label issues", "value": float(len(issues)),
             "p_adj": np.nan, "summary": summary}], tables


def _rank(findings):
    frame = pd.DataFrame(findings, columns=FINDING_COLUMNS)
    order = frame["verdict"].map(_VERDICT_ORDER)
    return frame.assign(_o=order).sort_values(["_o", "severity"], ascending=[True, False]).drop(columns="_o").reset_index(drop=True)


def review_from_results(run, results):
    """Compute the review's findings and tables from the report stages' ``results``."""
    spec = run.spec
    t0 = time.perf_counter()
    pred, probs, classes = _predictions(run, results)
    layer = spec.review_layer or spec.layers[-1]
    features = _features(results, layer, pred["manifest_row"])
    is_eval = (pred["split"] == spec.review_split).to_numpy()
    ev, ev_features = pred[is_eval].reset_index(drop=True), features[is_eval]
    tables = {"class_metrics": _class_metrics(pred)}
    tables["group_metrics"] = _group_metrics(ev, spec.review_sensitive)
    findings, extra = _shortcut_findings(run, results, pred, ev, ev_features, tables["group_metrics"])
    tables.update(extra)
    for f, t in (_slice_findings(run, ev, ev_features, probs[is_eval], classes), _leakage_findings(run, results),
                 _label_findings(run, results, pred, features)):
        findings += f
        tables.update(t)
    info = {"title": spec.title, "model": run.model.spec, "manifest": str(run.manifest.path), "group": spec.review_group,
            "sensitive": list(spec.review_sensitive), "eval_split": spec.review_split}
    prov = provenance(run.model, run.manifest, parameters={"layer": layer, "alpha": ALPHA, "margin": spec.review_margin,
                                                           "n_slices": spec.review_slices, "seed": spec.seed},
                      timings={"review": time.perf_counter() - t0})
    return ReviewResult(findings=_rank(findings), tables=tables, info=info, provenance=prov)


# --------------------------------------------------------------------------- the build

def _review_spec(spec, manifest):
    """The report stages this review needs: probes of the sensitive attributes, k-NN and
    near-duplicates ("dataset"), TCAV of the attributes' concept folders."""
    folders = sorted({f for a in spec.review_sensitive for f in _concept_folders(spec, manifest, a)})
    sections = ("dataset", "concepts") if folders else ("dataset",)
    return dataclasses.replace(spec, sections=sections, probe_targets=tuple(spec.review_sensitive),
                               concept_names=tuple(folders) or None, audit_insensitive=(), audit_not_decodable=())


def build_review(spec, out, progress=True, on_stage=None):
    """Review the dataset behind a model as ``spec`` (with its ``[review]`` table) says; write the page to ``out``.

    Parameters
    ----------
    spec : ReportSpec
        From :func:`~conceptlens.report.spec.load_spec`.
    out : str or Path
        Review folder: ``index.html``, ``assets/``, ``tables/``, ``review/`` (the :class:`ReviewResult`), ``cache/``.
    progress : bool
    on_stage : callable, optional
        ``on_stage(name, seconds, cached)`` after each stage.

    Returns
    -------
    ReviewBuild
    """
    from .review_page import render_review

    if not isinstance(spec, ReportSpec):
        raise ConceptLensError(f"build_review needs a ReportSpec (see load_spec); got {type(spec).__name__}")
    spec = validate_spec(spec)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConceptLensError(f"review output {out} is a file; choose a directory")
    manifest = Manifest.read(spec.manifest)
    check_review_inputs(spec, manifest)  # before the model loads: a bad column should not wait for it
    run = _Run(_review_spec(spec, manifest), out, progress, on_stage)
    validate_layers(run.model.module, list(spec.layers))
    if spec.spray_classes:
        from ..attribution import check_method

        check_method(run.model, spec.spray_method)

    t0 = time.perf_counter()
    results = {}
    for build in (S.stage_capture, S.stage_tcav, S.stage_representation, S.stage_spray):
        results.update(build(run, results))
    review = run.stage("review", {"spec": run.spec.to_dict()}, lambda d: review_from_results(run, results).save(d),
                       ReviewResult.load)
    review.save(out / "review")
    analysis = time.perf_counter() - t0

    t1 = time.perf_counter()
    index = render_review(review, run, out)
    render = time.perf_counter() - t1
    logger.info("review %s: analyses %.1f s, rendering %.1f s", index, analysis, render)
    return ReviewBuild(index=index, result=review, stages=tuple(run.stages), analysis_seconds=analysis, render_seconds=render)

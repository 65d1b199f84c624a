"""The dataset-review page: findings first, then the evidence of each kind (shortcuts, slices, leakage, labels).

Built with the report's page machinery (:mod:`.render`): every table is also a CSV under ``tables/``,
every figure a local PNG under ``assets/``, every string autoescaped.
"""

from __future__ import annotations

from ..plotting import grouped_bars, save_png, strip, topk_thumbnail
from .render import Page, image_block, render_page, table_block
from .sections import _slug

__all__ = ["render_review"]

_PROTOTYPES = 8  # images shown per slice


def _findings_section(page, review):
    f = review.findings
    items = [{"kind": r.kind, "name": f"{r.id} ({r.statistic} {r.value:.3g})", "verdict": r.verdict, "evidence": r.summary}
             for r in f.itertuples()]
    n_fail = int((f["verdict"] == "fail").sum())
    text = (f"{len(f)} findings, {n_fail} failed; ranked by verdict, then severity. fail = significant after Holm's "
            "correction (shortcuts, slices) or an exact count above zero (leakage); pass = shown within the margin or "
            "zero; inconclusive = neither; info = a ranked list to review.")
    blocks = [{"kind": "verdicts", "text": text, "items": items},
              table_block(page, f, "findings", "All findings"),
              table_block(page, review.tables["class_metrics"], "class_metrics", "Accuracy per split and class",
                          "Wilson 95 % confidence intervals.")]
    page.section("findings", "Findings", blocks)


def _shortcut_section(page, review):
    t = review.tables
    gm = t["group_metrics"]
    blocks = []
    for attr, g in gm.groupby("attribute", sort=False):
        cells = g[g["class"] != "(all)"]
        path = grouped_bars(cells, "class", "value", "accuracy", "ci_low", "ci_high", page.asset(f"shortcut-{_slug(attr)}.png"),
                            f"accuracy per class and {attr} ({review.info['eval_split']} split)", "accuracy")
        blocks.append(image_block(page, path, f"accuracy per class and {attr}",
                                  caption=f"bars: values of {attr}; whiskers: Wilson 95 % CI"))
        blocks.append(table_block(page, g, f"group_metrics-{_slug(attr)}", f"Accuracy per (class, {attr})",
                                  f"On the {review.info['eval_split']} split. A model that keys on {attr} is right more "
                                  "often where the training data paired the class with that value."))
    for name, title, text in (
            ("shortcut_decodability", "Decodability of the attributes",
             "Linear probes on the captured layers against a random-init copy of the network: decodable means the "
             "features carry the attribute beyond what any network's features would (it need not be used)."),
            ("shortcut_alignment", "Neighbourhoods and explanation strategies against the attributes",
             "Per class, k-means on the layer's features (one cluster per attribute value) and SpRAy's clusters when "
             "run: adjusted Rand index and NMI with the attribute, p-values from 999 permutations."),
            ("shortcut_tcav", "TCAV of the attributes' concept folders",
             "Concept sensitivity of each class to the attribute's concept images, against random directions.")):
        if name in t:
            blocks.append(table_block(page, t[name], name, title, text))
    page.section("shortcuts", "Shortcuts", blocks, skipped=None if blocks else "no [review] sensitive attributes")


def _slice_section(page, review, manifest_root):
    t = review.tables
    if "slices" not in t:
        return page.section("slices", "Hidden sub-populations", skipped="no slices computed")
    blocks = [table_block(page, t["slices"], "slices", "Slices (Domino's error-aware mixture)",
                          "Slices of the evaluation images found by a Gaussian mixture over the layer's PCA'd features, "
                          "the labels and the predicted probabilities, ranked by error gap (slice error rate minus the "
                          "overall). p_adj: one-sided Fisher test of the slice's errors, Holm over slices."),
              table_block(page, t["slices_kmeans"], "slices_kmeans", "Baseline: k-means on the same features",
                          "The same number of clusters without labels or predictions, for comparison.")]
    items = []
    for s, g in t["slice_prototypes"].groupby("slice", sort=False):
        panels = [topk_thumbnail(manifest_root / img, -1, -1, 1, 1, size=64) for img in g["image"].head(_PROTOTYPES)]
        name = f"slice-{int(s)}.png"
        save_png(strip(panels), page.asset(name))
        labels = ", ".join(f"{a}→{b}" for a, b in zip(g["label"].head(_PROTOTYPES), g["predicted"].head(_PROTOTYPES)))
        items.append({"src": f"assets/{name}", "alt": f"prototypes of slice {int(s)}",
                      "caption": f"slice {int(s)}: label→predicted {labels}"})
    blocks.append({"kind": "strip", "title": "Prototypes (most typical members) per slice", "items": items})
    page.section("slices", "Hidden sub-populations", blocks)


def _leakage_section(page, review):
    t = review.tables
    group = review.info["group"]
    blocks = [table_block(page, t["leakage_counts"], "leakage_counts", "Leakage per split pair",
                          (f"groups: {group} values present in both splits (exact, from the manifest); " if group else "")
                          + "near_duplicates: image pairs across the splits whose layouts nearly coincide.")]
    if "leaking_groups" in t:
        blocks.append(table_block(page, t["leaking_groups"], "leaking_groups", f"{group} groups in more than one split"))
    if "near_duplicates" in t:
        blocks.append(table_block(page, t["near_duplicates"], "near_duplicates", "Near-duplicate pairs across splits"))
    page.section("leakage", "Leakage", blocks)


def _label_section(page, review):
    t = review.tables
    blocks = [table_block(page, t["label_issues"], "label_issues", "Label issues (confident learning)",
                          "Out-of-sample class probabilities from 5-fold cross-validated linear probes; a row is flagged "
                          "when another class clears its per-class confidence threshold and its given label does not. "
                          "Most suspicious (lowest probability of the given label) first.")]
    if "label_issues_knn" in t:
        blocks.append(table_block(page, t["label_issues_knn"], "label_issues_knn", "Label issues (k-NN vote)",
                                  "Images whose given label is improbable from their nearest neighbours' labels."))
    page.section("labels", "Label issues", blocks)


def render_review(review, run, out):
    """Write the review page for ``review`` into ``out``; return ``index.html``."""
    page = Page(out)
    _findings_section(page, review)
    _shortcut_section(page, review)
    _slice_section(page, review, run.manifest.root)
    _leakage_section(page, review)
    _label_section(page, review)
    return render_page(page, review.info["title"], run.model.spec, str(run.manifest.path), run.stages, run.spec.to_dict())

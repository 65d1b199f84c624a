"""``compare``: two dataset reviews (or reports) before and after a dataset fix — finding statuses,
accuracy deltas with Newcombe's interval checked against the paper and the formula by hand, leakage
counts, report folders, one-line errors, save/load, and the page in headless Chromium."""

import json
import math
from statistics import NormalDist

import numpy as np
import pandas as pd
import pytest
from browser import inspect_page, require_chromium

from conceptlens.errors import ConceptLensError
from conceptlens.report.compare import Comparison, compare_results, write_compare_page
from conceptlens.review import newcombe_interval

XSS = "<script>alert(1)</script>"


def finding(id, verdict, severity=1.0, kind=None, subject=None, statistic="auc", value=0.5, p_adj=""):
    return {"id": id, "kind": kind or id.split(":")[0], "subject": subject or id.split(":")[-1], "verdict": verdict,
            "severity": severity, "statistic": statistic, "value": value, "p_adj": p_adj, "summary": f"{id} is {verdict}"}


def write_review(root, findings, classes=None, groups=None, leakage=None, title="review"):
    """A folder as `conceptlens review` writes it: review/review.json and the CSVs given (None: left out)."""
    d = root / "review"
    d.mkdir(parents=True)
    (d / "review.json").write_text(json.dumps({
        "kind": "review", "title": title, "model": "demo:m.pt", "manifest": "data/manifest.csv", "group": "patient",
        "sensitive": ["site"], "eval_split": "test", "provenance": {"schema": "conceptlens-provenance-1", "data_hash": title}}))
    pd.DataFrame(findings, columns=["id", "kind", "subject", "verdict", "severity", "statistic", "value", "p_adj",
                                    "summary"]).to_csv(d / "findings.csv", index=False)
    for name, rows, cols in (("class_metrics", classes, ["split", "class", "n", "correct"]),
                             ("group_metrics", groups, ["attribute", "value", "class", "n", "correct"]),
                             ("leakage_counts", leakage, ["split_a", "split_b", "groups", "near_duplicates"])):
        if rows is not None:
            frame = pd.DataFrame(rows, columns=cols)
            if "n" in frame:  # the review's own per-row numbers, which compare recomputes from the counts
                frame["accuracy"] = frame["correct"] / frame["n"]
                frame["ci_low"], frame["ci_high"] = 0.0, 1.0
            frame.to_csv(d / f"{name}.csv", index=False)
    return root


def write_report(root, audits=None, accuracy=None, duplicates=None, title="report"):
    """A folder as `conceptlens report` writes it: spec.json and the tables compare reads."""
    (root / "tables").mkdir(parents=True)
    (root / "assets").mkdir()
    (root / "spec.json").write_text(json.dumps({"title": title, "model": "demo:r.pt", "manifest": "world/manifest.csv",
                                                "sections": ["audits", "overview", "dataset"]}))
    if audits is not None:
        pd.DataFrame(audits, columns=["kind", "name", "verdict", "evidence"]).to_csv(root / "tables" / "audits.csv", index=False)
    if accuracy is not None:
        pd.DataFrame(accuracy, columns=["split", "class", "n", "accuracy"]).to_csv(root / "tables" / "accuracy.csv", index=False)
    if duplicates is not None:
        frame = pd.DataFrame(duplicates, columns=["image_a", "image_b", "split_a", "split_b", "similarity"])
        frame["crosses_splits"] = frame["split_a"] != frame["split_b"]
        frame.to_csv(root / "tables" / "duplicates.csv", index=False)
    return root


@pytest.fixture
def before_after(tmp_path):
    """A dataset fix: the site shortcut and patient leakage are gone, a pen-mark shortcut appeared."""
    a = write_review(tmp_path / "a", [
        finding("shortcut:site", "fail", 0.4), finding("leakage:patient", "fail", 3.0, statistic="groups", value=12),
        finding("slices:tumour", "pass", 0.1), finding("slices:necrosis", "fail", 0.8),
        finding("label-issues", "fail", 0.3, kind="label-issues")],
        classes=[("test", "(all)", 150, 104), ("test", "tumour", 70, 56), ("test", "normal", 80, 48)],
        groups=[("site", "s1", "(all)", 40, 36), ("site", "s2", "(all)", 30, 12)],
        leakage=[("train", "test", 12, 5), ("train", "val", 3, 0)], title="before")
    b = write_review(tmp_path / "b", [
        finding("shortcut:site", "pass", 0.0), finding("leakage:patient", "pass", 0.0, statistic="groups", value=0),
        finding("shortcut:pen", "fail", 0.9), finding("slices:tumour", "pass", 0.2)],
        classes=[("test", "(all)", 160, 130), ("test", "tumour", 80, 48), ("test", "normal", 80, 72)],
        groups=[("site", "s1", "(all)", 40, 35), ("site", "s2", "(all)", 40, 30), ("site", "s3", "(all)", 10, 9)],
        leakage=[("test", "train", 0, 1)], title="after")
    return a, b


# --------------------------------------------------------------------------- findings

def test_finding_statuses_follow_the_planted_fix(before_after):
    cmp = compare_results(*before_after)
    status = dict(zip(cmp.findings["id"], cmp.findings["status"]))
    assert status == {"shortcut:site": "resolved", "leakage:patient": "resolved", "shortcut:pen": "new",
                      "slices:tumour": "unchanged",
                      # absent from B, which analysed slices: nothing found there any more
                      "slices:necrosis": "resolved",
                      # B did not look for label issues at all: nothing can be said
                      "label-issues": "not compared"}
    # Resolved first (worst first), then new, then the rest.
    assert cmp.findings["id"].tolist()[:4] == ["leakage:patient", "slices:necrosis", "shortcut:site", "shortcut:pen"]
    row = cmp.findings.set_index("id").loc["leakage:patient"]
    assert (row.verdict_a, row.verdict_b, row.value_a, row.value_b) == ("fail", "pass", 12.0, 0.0)
    assert cmp.findings.set_index("id").loc["slices:necrosis", "verdict_b"] == "absent"
    assert cmp.counts() == {"resolved": 3, "new": 1, "remaining": 0, "unchanged": 1, "not compared": 1}
    assert any("label-issues" in m and "only A" in m for m in cmp.missing)


def test_a_failure_in_both_remains_and_info_is_not_a_failure(tmp_path):
    a = write_review(tmp_path / "a", [finding("shortcut:site", "fail"), finding("shortcut:scanner", "info")])
    b = write_review(tmp_path / "b", [finding("shortcut:site", "fail"), finding("shortcut:scanner", "inconclusive")])
    status = dict(zip(*compare_results(a, b).findings[["id", "status"]].to_numpy().T))
    assert status == {"shortcut:site": "remaining", "shortcut:scanner": "unchanged"}


# --------------------------------------------------------------------------- statistics

def _newcombe_by_hand(x1, n1, x2, n2, z=NormalDist().inv_cdf(0.975)):
    """Newcombe (1998) method 10 written out with scalar math, from the Wilson score limits."""
    def wilson(x, n):
        p = x / n
        centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)

    (l1, u1), (l2, u2), d = wilson(x1, n1), wilson(x2, n2), x1 / n1 - x2 / n2
    return d, d - math.sqrt((x1 / n1 - l1) ** 2 + (u2 - x2 / n2) ** 2), d + math.sqrt((u1 - x1 / n1) ** 2 + (x2 / n2 - l2) ** 2)


@pytest.mark.parametrize("counts, published", [
    # Newcombe (1998), Table II, method 10: examples (a), (b), (d) and (h) (the 100 % vs 0 % edge).
    ((56, 70, 48, 80), (0.2, 0.0524, 0.3339)),
    ((9, 10, 3, 10), (0.6, 0.1705, 0.8090)),
    ((5, 56, 0, 29), (0.0893, -0.0381, 0.1926)),
    ((10, 10, 0, 10), (1.0, 0.6075, 1.0)),
])
def test_newcombe_interval_matches_the_paper_and_the_formula(counts, published):
    got = np.array(newcombe_interval(*counts), dtype=float)
    assert got == pytest.approx(_newcombe_by_hand(*counts), abs=1e-12)
    assert np.round(got, 4) == pytest.approx(published, abs=1e-4)


def test_newcombe_interval_is_vectorised_and_nan_without_trials():
    d, lo, hi = newcombe_interval([56, 3, 1], [70, 0, 4], [48, 1, np.nan], [80, 5, 4])
    assert (d[0], lo[0], hi[0]) == pytest.approx(_newcombe_by_hand(56, 70, 48, 80))
    assert np.isnan([d[1], lo[1], hi[1], d[2], lo[2], hi[2]]).all()


def test_accuracy_deltas_carry_the_formulas_interval(before_after):
    cmp = compare_results(*before_after)
    cls = cmp.class_metrics.set_index(["split", "class"])
    for key, (xa, na, xb, nb) in {("test", "(all)"): (104, 150, 130, 160), ("test", "tumour"): (56, 70, 48, 80),
                                  ("test", "normal"): (48, 80, 72, 80)}.items():
        r = cls.loc[key]
        assert (r.accuracy_a, r.accuracy_b) == pytest.approx((xa / na, xb / nb))
        assert (r.delta, r.ci_low, r.ci_high) == pytest.approx(_newcombe_by_hand(xb, nb, xa, na), abs=1e-12)  # B − A
    # tumour: the paper's example the other way round (B − A = −0.2): the interval flips.
    assert (cls.loc[("test", "tumour"), ["ci_low", "ci_high"]]).tolist() == pytest.approx([-0.3339, -0.0524], abs=1e-4)
    assert cls["change"].to_dict() == {("test", "(all)"): "higher", ("test", "tumour"): "lower", ("test", "normal"): "higher"}
    grp = cmp.group_metrics.set_index("value")
    assert (grp.loc["s2", "delta"], grp.loc["s2", "ci_low"]) == pytest.approx(_newcombe_by_hand(30, 40, 12, 30)[:2])
    assert grp.loc["s1", "change"] == "no clear change"
    assert grp.loc["s3", "change"] == "only in B" and np.isnan(grp.loc["s3", "delta"])


def test_leakage_counts_line_up_per_split_pair(before_after):
    cmp = compare_results(*before_after)
    leak = cmp.leakage.set_index(["split_a", "split_b"])
    # B lists (test, train) the other way round; (train, val) is not in B, which counted: none shared.
    assert leak.loc[("test", "train")].tolist() == [12, 0, -12, 5, 1, -4]
    assert leak.loc[("train", "val")].tolist() == [3, 0, -3, 0, 0, 0]


def test_a_review_without_groups_did_not_count_them(tmp_path, before_after):
    b = write_review(tmp_path / "nogroup", [finding("shortcut:site", "pass")],
                     leakage=[("test", "train", np.nan, 2), ("test", "val", np.nan, 0)])
    cmp = compare_results(before_after[0], b)
    leak = cmp.leakage.set_index(["split_a", "split_b"])
    assert np.isnan(leak.loc[("train", "val"), "groups_b"]) and leak.loc[("train", "val"), "near_duplicates_b"] == 0
    assert leak.loc[("test", "train"), ["near_duplicates_b", "near_duplicates_change"]].tolist() == [2, -3]
    assert any(m.startswith("leakage groups: B (review)") for m in cmp.missing)


# --------------------------------------------------------------------------- report folders

def test_report_folders_compare_and_mix_with_reviews(tmp_path, before_after):
    audit = "class circle must not be sensitive to concept tag"
    ra = write_report(tmp_path / "ra", audits=[("concept sensitivity", audit, "fail", "TCAV 0.9"),
                                                ("decodability", "site must not be decodable from the features", "pass", "x")],
                      accuracy=[("test", "(all)", 150, 104 / 150), ("test", "circle", 70, 0.8)],
                      duplicates=[("a.png", "b.png", "train", "test", 0.99), ("c.png", "d.png", "test", "train", 0.98),
                                  ("e.png", "f.png", "train", "train", 0.97)])
    rb = write_report(tmp_path / "rb", audits=[("concept sensitivity", audit, "pass", "TCAV 0.5")],
                      accuracy=[("test", "(all)", 150, 0.9), ("test", "circle", 70, 0.9)], duplicates=[])
    cmp = compare_results(ra, rb)
    status = dict(zip(cmp.findings["id"], cmp.findings["status"]))
    # The decodability audit is absent from B, which ran no decodability audit: not compared.
    assert status == {audit: "resolved", "site must not be decodable from the features": "not compared"}
    cls = cmp.class_metrics.set_index("class")
    assert cls.loc["circle", ["correct_a", "correct_b"]].tolist() == [56, 63]  # round(n · accuracy)
    assert cls.loc["(all)", "correct_a"] == 104
    assert cls.loc["circle", "delta"] == pytest.approx(_newcombe_by_hand(63, 70, 56, 70)[0])
    leak = cmp.leakage.set_index(["split_a", "split_b"])
    assert leak.loc[("test", "train"), ["near_duplicates_a", "near_duplicates_b"]].tolist() == [2, 0]
    assert np.isnan(leak.loc[("test", "train"), "groups_a"])
    assert any(m.startswith("group metrics") for m in cmp.missing)

    mixed = compare_results(before_after[0], rb)
    assert {"review", "report"} == {i["format"] for i in mixed.inputs}
    assert set(mixed.findings["status"]) == {"not compared"}  # no finding kind in common
    assert mixed.class_metrics.set_index("class").loc["(all)", "n_b"] == 150
    assert mixed.class_metrics.set_index("class").loc["tumour", "change"] == "only in A"
    assert any("leakage groups: B (report)" in m for m in mixed.missing)
    assert mixed.group_metrics.empty and list(mixed.group_metrics.columns)[:3] == ["attribute", "value", "class"]


# --------------------------------------------------------------------------- errors

def _one_line(exc_info):
    assert "\n" not in str(exc_info.value)
    return str(exc_info.value)


def test_bad_inputs_give_one_line_errors(tmp_path, before_after):
    a, b = before_after
    with pytest.raises(ConceptLensError, match=r"compare input B .*nowhere is not a folder; pass a review folder") as e:
        compare_results(a, tmp_path / "nowhere")
    _one_line(e)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConceptLensError, match=r"empty is neither kind of folder; .*review/review.json.*spec.json and tables/") as e:
        compare_results(tmp_path / "empty", b)
    _one_line(e)

    findings = b / "review" / "findings.csv"
    good = findings.read_text()
    findings.write_text(good.replace("severity", "sev"))
    with pytest.raises(ConceptLensError, match=r"findings.csv lacks column\(s\) severity; it needs id, kind") as e:
        compare_results(a, b)
    _one_line(e)
    findings.write_text(good.replace("0.9", "very"))
    with pytest.raises(ConceptLensError, match=r"findings.csv, line 4: column severity must hold a number; got 'very'"):
        compare_results(a, b)
    findings.write_text(good.replace(",fail,", ",failed,"))
    with pytest.raises(ConceptLensError, match=r"line 4: verdict must be one of fail, pass, inconclusive, info; got 'failed'"):
        compare_results(a, b)
    findings.write_text(good + good.splitlines()[1] + "\n")
    with pytest.raises(ConceptLensError, match=r"lists id='shortcut:site' twice"):
        compare_results(a, b)
    findings.write_text(good)

    metrics = b / "review" / "class_metrics.csv"
    metrics.write_text("split,class,n,correct\ntest,a,1,1\ntest,b,1,2,3,4,5\n")
    with pytest.raises(ConceptLensError, match=r"class_metrics.csv is not a readable CSV \(.*Expected 4 fields in line 3, saw 7\); write it again with `conceptlens review`") as e:
        compare_results(a, b)
    _one_line(e)
    metrics.write_bytes(b"\xff\xfe\x00\x81\x00")
    with pytest.raises(ConceptLensError, match=r"class_metrics.csv is not a readable CSV"):
        compare_results(a, b)
    metrics.write_text("split,class,n,correct\ntest,a,10,11\n")
    with pytest.raises(ConceptLensError, match=r"class_metrics.csv, line 2: needs 0 <= correct <= n; got correct 11, n 10"):
        compare_results(a, b)

    (b / "review" / "review.json").write_text("{not json")
    with pytest.raises(ConceptLensError, match=r"review.json is not valid JSON"):
        compare_results(a, b)
    with pytest.raises(ConceptLensError, match=r"confidence parameter of compare_results must lie in \(0, 1\); got 95"):
        compare_results(a, a, confidence=95)

    report = write_report(tmp_path / "r", accuracy=[("test", "x", 10, 0.5)])
    (report / "tables" / "accuracy.csv").write_text("split,class,accuracy\ntest,x,0.5\n")
    with pytest.raises(ConceptLensError, match=r"accuracy.csv lacks column\(s\) n; .*`conceptlens report`"):
        compare_results(report, a)


def test_a_comparison_page_is_not_an_input_and_not_written_over_one(tmp_path, before_after):
    cmp = compare_results(*before_after)
    with pytest.raises(ConceptLensError, match=r"compare output .* is input B's folder"):
        write_compare_page(cmp, before_after[1])
    write_compare_page(cmp, tmp_path / "page")
    with pytest.raises(ConceptLensError, match=r"is a comparison page, not a review or a report"):
        compare_results(tmp_path / "page", before_after[0])


# --------------------------------------------------------------------------- result and page

def test_save_load_round_trip_and_provenance(tmp_path, before_after):
    a, b = before_after
    cmp = compare_results(a, b)
    back = Comparison.load(cmp.save(tmp_path / "saved"))
    for name in Comparison.TABLES:
        pd.testing.assert_frame_equal(getattr(back, name), getattr(cmp, name), check_dtype=False)
    assert back.missing == cmp.missing and back.provenance == json.loads(json.dumps(cmp.provenance))
    pa, pb = cmp.inputs
    assert (pa["path"], pb["path"]) == (str(a), str(b)) and cmp.provenance["data"] == [str(a), str(b)]
    assert pa["source"]["data_hash"] == "before" and pa["format"] == "review"
    assert "review/leakage_counts.csv" in pa["files"]
    # The input hash is over the files read: editing one changes it.
    (b / "review" / "findings.csv").write_text((b / "review" / "findings.csv").read_text().replace("0.9", "0.7"))
    again = compare_results(a, b)
    assert again.inputs[0]["hash"] == pa["hash"] and again.inputs[1]["hash"] != pb["hash"]
    assert again.provenance["data_hash"] != cmp.provenance["data_hash"]


def test_page_renders_offline_in_headless_chromium(tmp_path, before_after):
    a, b = before_after
    # A finding whose id and subject are a script tag, failing in B: it reaches the headline too.
    with open(b / "review" / "findings.csv", "a") as f:
        pd.DataFrame([finding(f"shortcut:{XSS}", "fail", 5.0, subject=XSS)]).to_csv(f, header=False, index=False)
    cmp = compare_results(a, b)
    index = write_compare_page(cmp, tmp_path / "page", title=f"fix {XSS}")
    out = index.parent
    for table in ("inputs", "findings", "shortcuts", "class_metrics", "group_metrics", "leakage"):
        assert (out / "tables" / f"{table}.csv").is_file(), table
    assert pd.read_csv(out / "tables" / "findings.csv")["status"].tolist()[:4] == ["resolved"] * 3 + ["new"]
    html = index.read_text()
    assert XSS not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert 'class="verdict new"' in html and 'class="verdict resolved"' in html
    spec = json.loads((out / "spec.json").read_text())
    assert spec["kind"] == "compare" and spec["a"] == str(a)

    require_chromium()
    seen = inspect_page(index, out / "screenshot.png")
    assert [m for m in seen["console"] if m[0] in ("error", "pageerror")] == []
    assert all(u.startswith("file://") for u in seen["requests"]), [u for u in seen["requests"] if not u.startswith("file://")]
    assert seen["failed"] == []
    assert len(seen["images"]) >= 1 and all(i["ok"] for i in seen["images"]), seen["images"]
    assert {"summary", "findings", "shortcuts", "classes", "groups", "leakage", "provenance"} <= set(seen["sections"])
    assert f"shortcut:{XSS}" in seen["text"] and seen["dialogs"] == [] and seen["scripts"] == 0
    assert "RESOLVED" in seen["text"] and "NEW" in seen["text"]

"""Before/after: compare two dataset reviews (or two reports) and show whether a dataset fix worked.

:func:`compare_results` reads two folders, each either a **review** (``<dir>/review/review.json``
with ``findings.csv``, ``class_metrics.csv``, ``group_metrics.csv``, ``leakage_counts.csv``,
written by ``conceptlens review``) or a **report** (``spec.json`` and ``tables/``, written by
``conceptlens report``), and returns a :class:`Comparison`; :func:`write_compare_page` renders it
with the report's page machinery.

What is compared:

* **Findings**, keyed by their stable ``id`` (a report's audits by their name). Status of each id:
  ``resolved`` (fail in A, not fail in B, or absent from B while B analysed that kind of finding),
  ``remaining`` (fail in both), ``new`` (fail in B, not fail in A, or absent from A while A
  analysed that kind), ``unchanged`` (not fail in either), ``not compared`` (only one input
  analysed that kind, so nothing can be said).
* **Accuracy** per (split, class) and per (attribute, value, class) group: B − A with a 95 % CI
  for the difference of two independent proportions, Newcombe's hybrid score interval
  (Newcombe 1998, method 10; :func:`conceptlens.review.newcombe_interval`). Each row's CI is not adjusted for the
  number of rows.
* **Leakage** per split pair: groups (e.g. patients) and near-duplicate pairs shared across the
  pair, with the change. A report counts only near-duplicates: its crossing duplicate pairs.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.hashing import hash_files, hash_json
from ..core.result import Result, provenance, read_json
from ..errors import ConceptLensError
from ..plotting import grouped_bars
from ..review import newcombe_interval
from .render import Page, image_block, render_page, table_block

__all__ = ["Comparison", "compare_results", "write_compare_page"]

logger = logging.getLogger(__name__)

VERDICTS = ("fail", "pass", "inconclusive", "info")
# Display order: what changed first, then what stayed, then what cannot be judged.
STATUSES = ("resolved", "new", "remaining", "unchanged", "not compared")
# A report's audits ask whether the model uses what it must not: shortcut tests, like a review's.
SHORTCUT_KINDS = ("shortcut", "concept sensitivity", "decodability")

FINDING_COLUMNS = ["id", "kind", "subject", "verdict", "severity", "statistic", "value", "p_adj", "summary"]
CLASS_KEYS = ["split", "class"]
GROUP_KEYS = ["attribute", "value", "class"]
PAIR_KEYS = ["split_a", "split_b"]
LEAK_COUNTS = ["groups", "near_duplicates"]

# The comparison's own tables (Comparison attributes and CSV files) and their numeric columns.
_METRIC_NUMBERS = ["n_a", "correct_a", "accuracy_a", "n_b", "correct_b", "accuracy_b", "delta", "ci_low", "ci_high"]
_NUMBERS = {
    "findings": ["value_a", "value_b", "p_adj_a", "p_adj_b", "severity_a", "severity_b"],
    "class_metrics": _METRIC_NUMBERS,
    "group_metrics": _METRIC_NUMBERS,
    "leakage": [f"{c}_{s}" for c in LEAK_COUNTS for s in ("a", "b", "change")],
}
COLUMNS = {
    "findings": ["id", "kind", "subject", "status", "verdict_a", "verdict_b", "statistic", *_NUMBERS["findings"],
                 "summary_a", "summary_b"],
    "class_metrics": CLASS_KEYS + _METRIC_NUMBERS + ["change"],
    "group_metrics": GROUP_KEYS + _METRIC_NUMBERS + ["change"],
    "leakage": PAIR_KEYS + _NUMBERS["leakage"],
}

_REVIEW_FIX = "write it again with `conceptlens review`"
_REPORT_FIX = "write it again with `conceptlens report`"


# --------------------------------------------------------------------------- statistics

# --------------------------------------------------------------------------- reading the inputs

def _read_csv(path, required, numbers=(), fix=_REVIEW_FIX):
    """A CSV as text columns (``numbers`` parsed, empty cells NaN); one-line errors for what is wrong."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise ConceptLensError(f"{path} is missing; {fix}") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConceptLensError(f"{path} is not a readable CSV ({reason}); {fix}") from None
    lacking = [c for c in required if c not in frame.columns]
    if lacking:
        raise ConceptLensError(f"{path} lacks column(s) {', '.join(lacking)}; it needs {', '.join(required)}; {fix}")
    for col in numbers:
        raw = frame[col].str.strip()
        values = pd.to_numeric(raw.where(raw != ""), errors="coerce")
        bad = values.isna() & (raw != "") & (raw.str.lower() != "nan")
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise ConceptLensError(f"{path}, line {i + 2}: column {col} must hold a number; got {raw.iloc[i]!r}; {fix}")
        frame[col] = values.astype(float)
    return frame


def _read_meta(path, fix):
    try:
        meta = read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConceptLensError(f"{path} is not valid JSON ({getattr(exc, 'msg', exc)}); {fix}") from None
    if not isinstance(meta, dict):
        raise ConceptLensError(f"{path} must hold a JSON object; got a {type(meta).__name__}; {fix}")
    return meta


def _check_unique(frame, keys, path, fix):
    dup = frame.duplicated(keys)
    if dup.any():
        row = frame[dup].iloc[0]
        raise ConceptLensError(f"{path} lists {', '.join(f'{k}={row[k]!r}' for k in keys)} twice; each must be one row; {fix}")


def _check_counts(frame, keys, path, fix):
    """Counts a proportion can be made of: 0 ≤ correct ≤ n, one row per key."""
    bad = ~((frame["n"] >= 0) & (frame["correct"] >= 0) & (frame["correct"] <= frame["n"]))
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise ConceptLensError(f"{path}, line {i + 2}: needs 0 <= correct <= n; got correct {frame['correct'].iloc[i]:g}, "
                               f"n {frame['n'].iloc[i]:g}; {fix}")
    _check_unique(frame, keys, path, fix)
    return frame[keys + ["n", "correct"]]


def _check_verdicts(frame, path, fix):
    bad = ~frame["verdict"].isin(VERDICTS)
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise ConceptLensError(f"{path}, line {i + 2}: verdict must be one of {', '.join(VERDICTS)}; "
                               f"got {frame['verdict'].iloc[i]!r}; {fix}")
    _check_unique(frame, ["id"], path, fix)
    return frame


def _leak_pairs(frame):
    """Counts per unordered split pair (names sorted, so A and B line up whichever way they list it)."""
    pair = np.sort(frame[PAIR_KEYS].astype(str).to_numpy(), axis=1)
    frame = frame.assign(split_a=pair[:, 0], split_b=pair[:, 1])
    return frame.groupby(PAIR_KEYS, sort=True)[LEAK_COUNTS].sum(min_count=1).reset_index()


@dataclass
class _Input:
    """One side of the comparison, in the review's terms; ``None`` tables were not there to read."""

    label: str
    path: Path
    format: str
    title: str
    model: str
    manifest: str
    findings: pd.DataFrame
    class_metrics: pd.DataFrame | None
    group_metrics: pd.DataFrame | None
    leakage: pd.DataFrame | None
    counted: tuple  # which of LEAK_COUNTS ``leakage`` holds
    files: list
    source: dict  # the input's own provenance (review) or spec (report)

    def describe(self):
        return {"label": self.label, "path": str(self.path), "format": self.format, "title": self.title,
                "model": self.model, "manifest": self.manifest,
                "hash": hash_files(self.files, [f.relative_to(self.path).as_posix() for f in self.files]),
                "files": [f.relative_to(self.path).as_posix() for f in self.files],
                "tables": [name for name in Comparison.TABLES if getattr(self, name) is not None],
                "counted": list(self.counted), "source": self.source}


def _read_review(label, root, d):
    meta_path = d / "review.json"
    meta = _read_meta(meta_path, _REVIEW_FIX)
    if meta.get("kind") != "review":
        raise ConceptLensError(f"{meta_path} holds kind {meta.get('kind')!r}, not 'review'; {_REVIEW_FIX}")
    files = [meta_path, d / "findings.csv"]
    findings = _read_csv(d / "findings.csv", FINDING_COLUMNS, ["severity", "value", "p_adj"])
    findings = _check_verdicts(findings, d / "findings.csv", _REVIEW_FIX)[FINDING_COLUMNS]
    tables = {}
    for name, keys, numbers in (("class_metrics", CLASS_KEYS, ["n", "correct"]),
                                ("group_metrics", GROUP_KEYS, ["n", "correct"]),
                                ("leakage_counts", PAIR_KEYS, LEAK_COUNTS)):
        path = d / f"{name}.csv"
        if not path.is_file():  # a review may skip an analysis; the comparison says what it lacks
            tables[name] = None
            continue
        files.append(path)
        frame = _read_csv(path, keys + numbers, numbers)
        tables[name] = frame if name == "leakage_counts" else _check_counts(frame, keys, path, _REVIEW_FIX)
    leakage = None if tables["leakage_counts"] is None else _leak_pairs(tables["leakage_counts"])
    return _Input(label, root, "review", str(meta.get("title", root.name)), str(meta.get("model", "")),
                  str(meta.get("manifest", "")), findings, tables["class_metrics"], tables["group_metrics"], leakage,
                  # a review without a group column leaves ``groups`` empty: it did not count them
                  tuple(c for c in LEAK_COUNTS if leakage is not None and leakage[c].notna().any()), files,
                  meta.get("provenance", {}))


def _read_report(label, root, spec):
    tables = root / "tables"
    files = [root / "spec.json"]
    findings = pd.DataFrame(columns=FINDING_COLUMNS)
    if (tables / "audits.csv").is_file():  # audits exist only when the spec asked for some
        files.append(tables / "audits.csv")
        audits = _read_csv(tables / "audits.csv", ["kind", "name", "verdict", "evidence"], fix=_REPORT_FIX)
        findings = pd.DataFrame({"id": audits["name"], "kind": audits["kind"], "subject": audits["name"],
                                 "verdict": audits["verdict"], "severity": np.nan, "statistic": "", "value": np.nan,
                                 "p_adj": np.nan, "summary": audits["evidence"]})
        _check_verdicts(findings, tables / "audits.csv", _REPORT_FIX)
    metrics = None
    if (tables / "accuracy.csv").is_file():
        files.append(tables / "accuracy.csv")
        acc = _read_csv(tables / "accuracy.csv", CLASS_KEYS + ["n", "accuracy"], ["n", "accuracy"], _REPORT_FIX)
        acc["correct"] = np.round(acc["n"] * acc["accuracy"])  # the report keeps the rate, not the count
        metrics = _check_counts(acc, CLASS_KEYS, tables / "accuracy.csv", _REPORT_FIX)
    leakage = None
    if (tables / "duplicates.csv").is_file():
        files.append(tables / "duplicates.csv")
        dup = _read_csv(tables / "duplicates.csv", PAIR_KEYS + ["crosses_splits"], fix=_REPORT_FIX)
        crossing = dup[dup["crosses_splits"].str.strip().str.lower().isin(("true", "1", "yes"))]
        leakage = _leak_pairs(crossing.assign(groups=np.nan, near_duplicates=1.0))
    return _Input(label, root, "report", str(spec.get("title", root.name)), str(spec.get("model", "")),
                  str(spec.get("manifest", "")), findings, metrics, None, leakage,
                  ("near_duplicates",) if leakage is not None else (), files, spec)


def _read_input(label, path):
    root = Path(path)
    what = ("a review folder (review/review.json with findings.csv, written by `conceptlens review`) or a report "
            "folder (spec.json and tables/, written by `conceptlens report`)")
    if not root.is_dir():
        raise ConceptLensError(f"compare input {label} {root} is not a folder; pass {what}")
    for d in (root / "review", root):  # the folder `review` wrote, or its review/ subfolder itself
        if (d / "review.json").is_file():
            return _read_review(label, root, d)
    if (root / "spec.json").is_file() and (root / "tables").is_dir():
        spec = _read_meta(root / "spec.json", _REPORT_FIX)
        if spec.get("kind") == "compare":
            raise ConceptLensError(f"compare input {label} {root} is a comparison page, not a review or a report; pass {what}")
        return _read_report(label, root, spec)
    raise ConceptLensError(f"compare input {label} {root} is neither kind of folder; pass {what}")


# --------------------------------------------------------------------------- comparing

def _statuses(fail_a, fail_b, has_a, has_b, kind_in_a, kind_in_b):
    """Status per finding; an id absent from one side counts as "not fail" there only if that side
    analysed its kind (no finding of a kind that was looked at means nothing was found)."""
    known_a, known_b = has_a | kind_in_a, has_b | kind_in_b
    return np.select(
        [~(known_a & known_b), fail_a & fail_b, fail_a, fail_b],
        ["not compared", "remaining", "resolved", "new"], "unchanged")


def _compare_findings(a, b):
    merged = a.findings.merge(b.findings, on="id", how="outer", suffixes=("_a", "_b"), indicator=True, sort=False)
    has_a, has_b = merged["_merge"] != "right_only", merged["_merge"] != "left_only"
    kind = merged["kind_a"].where(has_a, merged["kind_b"])
    status = _statuses((merged["verdict_a"] == "fail").to_numpy(), (merged["verdict_b"] == "fail").to_numpy(),
                       has_a.to_numpy(), has_b.to_numpy(), kind.isin(set(a.findings["kind"])).to_numpy(),
                       kind.isin(set(b.findings["kind"])).to_numpy())
    out = pd.DataFrame({
        "id": merged["id"], "kind": kind, "subject": merged["subject_b"].where(has_b, merged["subject_a"]),
        "status": status,
        "verdict_a": merged["verdict_a"].fillna("absent"), "verdict_b": merged["verdict_b"].fillna("absent"),
        "statistic": merged["statistic_b"].where(has_b & (merged["statistic_b"] != ""), merged["statistic_a"]).fillna(""),
        "value_a": merged["value_a"], "value_b": merged["value_b"],
        "p_adj_a": merged["p_adj_a"], "p_adj_b": merged["p_adj_b"],
        "severity_a": merged["severity_a"], "severity_b": merged["severity_b"],
        "summary_a": merged["summary_a"].fillna(""), "summary_b": merged["summary_b"].fillna(""),
    }).astype({c: float for c in _NUMBERS["findings"]})  # float even when an input has no findings
    severity = np.fmax(out["severity_a"].to_numpy(float), out["severity_b"].to_numpy(float))
    order = pd.DataFrame({"s": [STATUSES.index(s) for s in status], "sev": -np.nan_to_num(severity, nan=-np.inf),
                          "id": out["id"]})
    return out.iloc[order.sort_values(["s", "sev", "id"], kind="stable").index].reset_index(drop=True)


def _compare_metrics(a, b, keys, confidence):
    merged = a.merge(b, on=keys, how="outer", suffixes=("_a", "_b"), sort=False)
    for s in ("a", "b"):
        merged[f"accuracy_{s}"] = merged[f"correct_{s}"] / merged[f"n_{s}"].where(merged[f"n_{s}"] > 0)
    delta, low, high = newcombe_interval(merged["correct_b"], merged["n_b"], merged["correct_a"], merged["n_a"], confidence)
    merged = merged.assign(delta=delta, ci_low=low, ci_high=high)
    merged["change"] = np.select(
        [merged["n_a"].isna(), merged["n_b"].isna(), merged["ci_low"] > 0, merged["ci_high"] < 0, merged["delta"].notna()],
        ["only in B", "only in A", "higher", "lower", "no clear change"], "no data")
    return merged[keys + _METRIC_NUMBERS + ["change"]]  # COLUMNS of class_metrics / group_metrics


def _compare_leakage(a, b):
    merged = a.leakage.merge(b.leakage, on=PAIR_KEYS, how="outer", suffixes=("_a", "_b"), sort=True)
    for count in LEAK_COUNTS:
        for s, side in (("a", a), ("b", b)):
            if count in side.counted:  # a pair the side counted and does not list shares nothing
                merged[f"{count}_{s}"] = merged[f"{count}_{s}"].fillna(0.0)
        merged[f"{count}_change"] = merged[f"{count}_b"] - merged[f"{count}_a"]
    return merged[COLUMNS["leakage"]]


def _empty(name):
    return pd.DataFrame({c: pd.Series(dtype=float if c in _NUMBERS[name] else object) for c in COLUMNS[name]})


@dataclass(frozen=True)
class Comparison(Result):
    """Two dataset reviews (or reports) side by side: A (before) and B (after).

    Attributes
    ----------
    findings : DataFrame
        ``id, kind, subject, status, verdict_a, verdict_b, statistic, value_a, value_b, p_adj_a,
        p_adj_b, severity_a, severity_b, summary_a, summary_b``, one row per finding id, resolved /
        new / remaining first, then unchanged and not compared, each by severity (worse first).
        ``verdict_x`` is ``absent`` where the id is not in that input.
    class_metrics : DataFrame
        ``split, class, n_a, correct_a, accuracy_a, n_b, correct_b, accuracy_b, delta, ci_low,
        ci_high, change``: ``delta`` = accuracy B − A with the Newcombe CI; ``change`` is
        ``higher``/``lower`` where the CI excludes 0, ``no clear change``, or ``only in A``/``only in B``.
    group_metrics : DataFrame
        The same per ``attribute, value, class`` (reviews only).
    leakage : DataFrame
        ``split_a, split_b, groups_a, groups_b, groups_change, near_duplicates_a,
        near_duplicates_b, near_duplicates_change`` per unordered split pair; NaN where an input
        did not count it.
    missing : tuple of str
        What could not be compared, and why.
    provenance : dict
        The provenance schema; ``data`` = both input paths, ``data_hash`` over both inputs' hashes,
        ``inputs`` = per input its path, format, title, model, manifest, hash of the files read,
        and its own provenance (review) or spec (report).
    """

    findings: pd.DataFrame = field(repr=False)
    class_metrics: pd.DataFrame = field(repr=False)
    group_metrics: pd.DataFrame = field(repr=False)
    leakage: pd.DataFrame = field(repr=False)
    missing: tuple
    provenance: dict = field(repr=False)

    KIND, META = "comparison", "comparison.json"
    TABLES = ("findings", "class_metrics", "group_metrics", "leakage")

    @property
    def inputs(self):
        """``[A, B]``: each input's description (see ``provenance``)."""
        return self.provenance["inputs"]

    def counts(self):
        """Number of findings per status, every status included."""
        return {s: int((self.findings["status"] == s).sum()) for s in STATUSES}

    def to_frame(self):
        """The findings table (see the class attributes)."""
        return self.findings.copy()

    def _write(self, directory):  # findings.csv, class_metrics.csv, group_metrics.csv, leakage.csv; comparison.json
        for name in self.TABLES:
            getattr(self, name).to_csv(directory / f"{name}.csv", index=False)
        return {"missing": list(self.missing)}

    @classmethod
    def _read(cls, directory, meta):
        tables = {}
        for name in cls.TABLES:
            tables[name] = _read_csv(directory / f"{name}.csv", COLUMNS[name], _NUMBERS[name], "save the comparison again")
        return cls(**tables, missing=tuple(meta["missing"]), provenance=meta["provenance"])


def compare_results(dir_a, dir_b, confidence=0.95):
    """Compare two dataset reviews or reports: what a dataset fix resolved, what remains, what is new.

    Parameters
    ----------
    dir_a, dir_b : str or Path
        Before (A) and after (B): each a folder written by ``conceptlens review`` (holding
        ``review/review.json``) or by ``conceptlens report`` (``spec.json`` and ``tables/``).
        A review and a report can be compared; what only one has is listed in ``missing``.
    confidence : float
        Coverage of the accuracy-difference intervals, in (0, 1).

    Returns
    -------
    Comparison

    Raises
    ------
    ConceptLensError
        A folder that is neither kind, or an unreadable file or missing column (named).
    """
    if not 0 < confidence < 1:
        raise ConceptLensError(f"the confidence parameter of compare_results must lie in (0, 1); got {confidence!r}")
    t0 = time.perf_counter()
    a = _read_input("A", dir_a)
    t1 = time.perf_counter()
    b = _read_input("B", dir_b)
    t2 = time.perf_counter()
    missing = []
    for kind in sorted(set(a.findings["kind"]) ^ set(b.findings["kind"])):
        side, other = (a, b) if kind in set(a.findings["kind"]) else (b, a)
        missing.append(f"findings of kind {kind!r}: only {side.label} ({side.format}) analysed them, "
                       f"{other.label} did not; they are 'not compared'")
    tables = {}
    for name, keys in (("class_metrics", CLASS_KEYS), ("group_metrics", GROUP_KEYS)):
        sa, sb = getattr(a, name), getattr(b, name)
        if sa is None or sb is None:
            lacking = [f"{s.label} ({s.format})" for s in (a, b) if getattr(s, name) is None]
            missing.append(f"{name.replace('_', ' ')}: {' and '.join(lacking)} has none")
            tables[name] = _empty(name)
        else:
            tables[name] = _compare_metrics(sa, sb, keys, confidence)
    if a.leakage is None or b.leakage is None:
        lacking = [f"{s.label} ({s.format})" for s in (a, b) if s.leakage is None]
        missing.append(f"leakage counts: {' and '.join(lacking)} has none")
        tables["leakage"] = _empty("leakage")
    else:
        tables["leakage"] = _compare_leakage(a, b)
        for count in LEAK_COUNTS:
            lacking = [f"{s.label} ({s.format})" for s in (a, b) if count not in s.counted]
            if lacking:
                missing.append(f"leakage {count.replace('_', '-')}: {' and '.join(lacking)} did not count them")
    findings = _compare_findings(a, b)
    t3 = time.perf_counter()
    inputs = [a.describe(), b.describe()]
    prov = provenance(parameters={"confidence": confidence,
                                  "interval": "Newcombe hybrid score (1998, method 10) from Wilson intervals, B - A"},
                      timings={"read_a": t1 - t0, "read_b": t2 - t1, "compare": t3 - t2}, inputs=inputs)
    prov.update(data=[i["path"] for i in inputs], data_hash=hash_json([i["hash"] for i in inputs]))
    for line in missing:
        logger.info("compare: %s", line)
    return Comparison(findings=findings, **tables, missing=tuple(missing), provenance=prov)


# --------------------------------------------------------------------------- the page

def _fmt(v):
    return "" if pd.isna(v) else f"{v:.3g}"


def _headline(comparison):
    items = []
    for r in comparison.findings[comparison.findings["status"].isin(("resolved", "remaining", "new"))].itertuples():
        value = f"; {r.statistic} {_fmt(r.value_a) or '–'} → {_fmt(r.value_b) or '–'}" if r.statistic else ""
        items.append({"verdict": r.status, "name": r.id, "kind": r.kind,
                      "evidence": f"{r.subject}: {r.verdict_a} → {r.verdict_b}{value}. " + (
                          f"B: {r.summary_b}" if r.verdict_b != "absent" else
                          f"A: {r.summary_a}; B lists no such finding, though it analysed {r.kind}")})
    n = comparison.counts()
    text = (f"{len(comparison.findings)} findings: {n['resolved']} resolved, {n['remaining']} remaining, {n['new']} new, "
            f"{n['unchanged']} unchanged (not failing in either), {n['not compared']} not compared (their kind was "
            "analysed in one input only).")
    return {"kind": "verdicts", "title": "Resolved, remaining and new failures", "text": text, "items": items}


def _whole(frame, columns):
    """Counts shown as integers (empty where an input has none), not as the floats NaN forces on them."""
    return frame.assign(**{c: ["" if pd.isna(v) else int(v) for v in frame[c]] for c in columns})


def _metric_blocks(page, frame, name, heading, text, figure):
    """The delta table, and a bar chart of the deltas with their CIs (``figure``: group and bar columns)."""
    counts = ["n_a", "correct_a", "n_b", "correct_b"]
    blocks = [table_block(page, _whole(frame, counts), name, heading, text, max_rows=60)]
    shown = frame.dropna(subset=["delta"])
    if figure and len(shown):
        path = grouped_bars(shown.assign(clear=shown["change"].isin(("higher", "lower"))), *figure, "delta", "ci_low",
                            "ci_high", page.asset(f"{name}.png"), f"{heading}: accuracy B − A", "accuracy B − A",
                            reference=0.0, marks="clear")
        blocks.append(image_block(page, path, f"{heading}: accuracy B − A with CI",
                                  caption="bars: B − A, whiskers: CI, * = CI excludes 0"))
    return blocks


def write_compare_page(comparison, out_dir, title=None):
    """Render a :class:`Comparison` as an offline HTML page.

    Parameters
    ----------
    comparison : Comparison
        From :func:`compare_results` (or :meth:`Comparison.load`).
    out_dir : str or Path
        Page folder: ``index.html``, ``assets/``, ``tables/`` (every table as CSV: ``inputs``,
        ``findings``, ``shortcuts``, ``class_metrics``, ``group_metrics``, ``leakage``) and
        ``spec.json``. Its ``assets/`` and ``tables/`` are replaced, so it must not be an input.
    title : str, optional
        Page title; by default both inputs' titles.

    Returns
    -------
    Path
        ``out_dir/index.html``.
    """
    if not isinstance(comparison, Comparison):
        raise ConceptLensError(f"write_compare_page needs a Comparison (see compare_results); got {type(comparison).__name__}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConceptLensError(f"compare output {out} is a file; choose a directory")
    a, b = comparison.inputs
    for side in (a, b):
        if out.resolve() == Path(side["path"]).resolve():
            raise ConceptLensError(f"compare output {out} is input {side['label']}'s folder; writing there would replace "
                                   "its tables; choose another directory")
    t0 = time.perf_counter()
    page = Page(out)
    both_have = {name: all(name in s["tables"] for s in (a, b)) for name in Comparison.TABLES}

    inputs = pd.DataFrame([{k: s[k] for k in ("label", "format", "title", "path", "model", "manifest", "hash")}
                           for s in (a, b)])
    blocks = [_headline(comparison), table_block(page, inputs, "inputs", "Inputs: A (before) and B (after)")]
    if comparison.missing:
        blocks.append({"kind": "text", "title": "Not compared", "text": "; ".join(comparison.missing) + "."})
    page.section("summary", "Summary", blocks)

    page.section("findings", "Findings", [table_block(
        page, comparison.findings, "findings", "Every finding, A and B side by side",
        "resolved: fail in A, not in B (or absent from B, which analysed its kind); remaining: fail in both; new: fail "
        "in B, not in A (or absent from A, which analysed its kind); unchanged: fail in neither; not compared: its kind "
        "was analysed in one input only.", max_rows=100)])

    shortcuts = comparison.findings[comparison.findings["kind"].isin(SHORTCUT_KINDS)]
    if len(shortcuts):
        cols = ["id", "subject", "status", "verdict_a", "verdict_b", "statistic", "value_a", "value_b", "p_adj_a", "p_adj_b"]
        page.section("shortcuts", "Shortcuts", [table_block(
            page, shortcuts[cols], "shortcuts", "Shortcut verdicts",
            "Is the label tied to what it must not be, e.g. a site, a scanner, a pen mark (review shortcuts; a report's "
            "concept-sensitivity and decodability audits)?")])
    else:
        page.section("shortcuts", "Shortcuts", skipped="no shortcut findings in either input")

    deltas = (f"Accuracy B − A with a {comparison.provenance['parameters']['confidence']:.0%} CI for the difference of "
              "two independent proportions (Newcombe's hybrid score interval, method 10 of Newcombe 1998, from the Wilson "
              "intervals); change = higher / lower where the CI excludes 0. Each row's CI stands alone, not adjusted for "
              "the number of rows.")
    for sid, heading, name, figure in (("classes", "Accuracy per class", "class_metrics", ("class", "split")),
                                       ("groups", "Accuracy per group", "group_metrics", None)):
        if both_have[name]:
            page.section(sid, heading, _metric_blocks(page, getattr(comparison, name), name, heading, deltas, figure))
        else:
            page.section(sid, heading, skipped="not in both inputs (see Summary)")
    if both_have["leakage"]:
        page.section("leakage", "Leakage", [table_block(
            page, _whole(comparison.leakage, _NUMBERS["leakage"]), "leakage", "Shared groups and near-duplicates per split pair",
            "groups: groups (e.g. patients) present in both splits; near_duplicates: near-duplicate image pairs across "
            "the two splits; change = B − A (negative is better); empty where an input did not count it.")])
    else:
        page.section("leakage", "Leakage", skipped="not in both inputs (see Summary)")

    timings = comparison.provenance.get("timings", {})
    stages = [{"name": f"read {s['label']} ({s['format']})", "seconds": timings.get(f"read_{s['label'].lower()}", 0.0),
               "cached": False, "directory": s["path"]} for s in (a, b)]
    stages.append({"name": "render", "seconds": time.perf_counter() - t0, "cached": False, "directory": str(out)})

    def both(key):
        return a[key] if a[key] == b[key] else f"{a[key]} → {b[key]}"

    title = title or f"conceptlens compare: {a['title']} → {b['title']}"
    spec = {"kind": "compare", "title": title, "a": a["path"], "b": b["path"], "provenance": comparison.provenance}
    return render_page(page, title, both("model"), both("manifest"), stages, spec)

"""Group-aware re-splitting: a train/test split in which no group (patient, slide, video) has rows
on both sides, stratified by class, seeded, with a record of what moved.

:func:`group_split` uses scikit-learn's group splitters: ``StratifiedGroupKFold`` (shuffled,
seeded) with ``round(1 / test)`` folds, its first fold being the test set, so classes keep
about their overall proportions in both splits; ``GroupShuffleSplit`` when nothing is stratified
(then ``test`` is the fraction of *groups*). :func:`write_split` does it for a manifest CSV and
writes a new CSV whose image paths still resolve from its own folder.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.result import Result, provenance
from ..errors import ConceptLensError
from ._common import (check_column, check_count, check_filled, check_fraction, check_frame, data_hash, joined_names,
                      missing_mask, read_table)

__all__ = ["SplitResult", "group_split", "write_split"]

logger = logging.getLogger(__name__)

SPLITS = ("train", "test")


@dataclass(frozen=True)
class SplitResult(Result):
    """A new train/test split and what it changed.

    Attributes
    ----------
    frame : DataFrame
        The input rows with the split column rewritten to ``train``/``test`` (a copy; same row
        order and index).
    sizes : DataFrame
        ``split, rows, groups, row_fraction`` for ``train`` and ``test``.
    classes : DataFrame
        ``split, class, rows, fraction, overall``: rows of each class per split, their fraction
        of the split and the class's fraction of all rows (how close the stratification came).
        Empty when nothing was stratified.
    moved : DataFrame
        ``old_split, new_split, rows``: rows per (old split -> new split), ``old_split`` empty
        for rows that had none.
    moved_groups : DataFrame
        ``group, rows, old_splits, new_split``: the groups with a row whose old split differs
        from its new one (rows without an old split are assigned, not moved); ``old_splits`` is
        the ``;``-joined sorted old splits of the group.
    params : dict
        ``group``, ``stratify``, ``test`` (asked), ``test_fraction`` (the fraction of rows that
        went to test), ``seed``, ``split_column`` and ``method`` (the splitter used).
    provenance : dict
    """

    frame: pd.DataFrame = field(repr=False)
    sizes: pd.DataFrame
    classes: pd.DataFrame = field(repr=False)
    moved: pd.DataFrame
    moved_groups: pd.DataFrame = field(repr=False)
    params: dict
    provenance: dict = field(repr=False)

    KIND, META = "group_split", "group_split.json"

    def to_frame(self):
        """The re-split rows (:attr:`frame`)."""
        return self.frame

    def summary_text(self):
        """A few lines for a terminal: rows and groups per split, class fractions, what moved."""
        lines = [f"{r.split}: {r.rows} rows ({r.row_fraction:.1%}), {r.groups} groups" for r in self.sizes.itertuples()]
        if len(self.classes):
            for split, part in self.classes.groupby("split", sort=False):
                lines.append(f"{split} classes: " + ", ".join(
                    f"{c} {f:.1%} (all {o:.1%})" for c, f, o in zip(part["class"], part["fraction"], part["overall"])))
        had = self.moved[self.moved["old_split"] != ""]
        changed = int(had.loc[had["old_split"] != had["new_split"], "rows"].sum())
        lines.append(f"moved: {changed} of {int(had['rows'].sum())} rows with an old split, in {len(self.moved_groups)} groups"
                     if len(had) else "no old split: every row assigned")
        return "\n".join(lines)

    def _write(self, directory):
        """``frame.csv``, ``sizes.csv``, ``classes.csv``, ``moved.csv``, ``moved_groups.csv``; ``group_split.json``."""
        for name in ("frame", "sizes", "classes", "moved", "moved_groups"):
            getattr(self, name).to_csv(directory / f"{name}.csv", index=False)
        return {"params": self.params}

    @classmethod
    def _read(cls, directory, meta):
        """Every column of ``frame`` comes back as text, as a manifest is read."""
        return cls(frame=pd.read_csv(directory / "frame.csv", dtype=str, keep_default_na=False),
                   sizes=read_table(directory / "sizes.csv", ("split",)),
                   classes=read_table(directory / "classes.csv", ("split", "class")),
                   moved=read_table(directory / "moved.csv", ("old_split", "new_split")),
                   moved_groups=read_table(directory / "moved_groups.csv", ("group", "old_splits", "new_split")),
                   params=meta["params"], provenance=meta["provenance"])


def _test_rows(g_codes, y, classes, stratify, test, seed):
    """Boolean test mask from the sklearn splitter, and the splitter's description."""
    from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

    zeros = np.zeros(len(g_codes))
    if y is None:
        _, test_idx = next(GroupShuffleSplit(n_splits=1, test_size=test, random_state=seed).split(zeros, groups=g_codes))
        method = f"GroupShuffleSplit(n_splits=1, test_size={test:g}, random_state={seed})"
    else:
        n_folds = round(1 / test)
        if n_folds < 2:
            raise ConceptLensError(f"a stratified split puts 1/round(1/test) of the rows in test, so test must be at most 2/3; "
                                   f"got {test:g} - pass a smaller test fraction or stratify=None")
        # A class needs a group in every fold, or some fold - maybe the test set - has none of it.
        pairs = np.unique(g_codes.astype(np.int64) * len(classes) + y)
        per_class = np.bincount(pairs % len(classes), minlength=len(classes))
        short = np.flatnonzero(per_class < n_folds)
        if len(short):
            c = short[np.argmin(per_class[short])]
            raise ConceptLensError(f"class {classes[c]!r} of column {stratify!r} is in {per_class[c]} group(s), but a stratified "
                                   f"split with test={test:g} deals the groups into {n_folds} folds and needs at least {n_folds} "
                                   f"groups per class ({len(short)} class(es) have fewer); merge or drop such classes, "
                                   "pass a larger test fraction, or stratify=None")
        splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        _, test_idx = next(splitter.split(zeros, y, groups=g_codes))
        method = f"StratifiedGroupKFold(n_splits={n_folds}, shuffle=True, random_state={seed}), first fold as test"
        if not np.isclose(1 / n_folds, test):
            logger.info("test=%g: a stratified group split with %d folds puts about 1/%d of the rows in test", test, n_folds, n_folds)
    is_test = np.zeros(len(g_codes), dtype=bool)
    is_test[test_idx] = True
    return is_test, method


def group_split(frame, group, stratify="label", test=0.2, seed=0, split_column="split"):
    """Split rows into train and test so that no group has rows in both, stratified by class.

    Parameters
    ----------
    frame : DataFrame
        The rows, e.g. ``Manifest.read(path).frame``.
    group : str
        Column holding each row's group (patient, slide, ...); every row needs one.
    stratify : str or None
        Column whose classes keep about their overall proportions in both splits (every row
        needs one); ``None``: a plain group shuffle split.
    test : float
        Fraction for the test split, in (0, 1). Stratified, the test split is one fold of
        ``round(1 / test)`` (so 0.2 -> 1/5, 0.3 -> 1/3; at most 2/3); unstratified, it is the
        fraction of groups.
    seed : int
        Seeds the splitter: the same frame (same row order) and seed give the same split.
    split_column : str
        The column to write ``train``/``test`` into; its old values, when present, are what
        "moved" is measured against.

    Returns
    -------
    SplitResult

    Raises
    ------
    ConceptLensError
        A column is missing or has empty cells, ``test`` is not in (0, 1), there are fewer than
        two groups, or a class is in too few groups to be stratified.
    """
    t0 = time.perf_counter()
    check_frame(frame)
    check_column(frame, group, "group")
    check_filled(frame, group, "group")
    if stratify is not None:
        check_column(frame, stratify, "stratify")
        check_filled(frame, stratify, "class")
    test = check_fraction(test, "test")
    seed = check_count(seed, "seed", low=0)
    if not isinstance(split_column, str) or not split_column:
        raise ConceptLensError(f"the split_column parameter must name the column to write the split into; got {split_column!r}")

    g_codes, g_values = pd.factorize(frame[group], sort=False)
    g_values = np.asarray(g_values)
    if len(g_values) < 2:
        raise ConceptLensError(f"column {group!r} holds a single group ({g_values[0]!r}); a group split needs at least two")
    y = classes = None
    if stratify is not None:
        y, classes = pd.factorize(frame[stratify].astype(str), sort=True)
        classes = np.asarray(classes, dtype=object)
    is_test, method = _test_rows(g_codes, y, classes, stratify, test, seed)
    new = np.where(is_test, "test", "train").astype(object)

    if split_column in frame.columns:
        old = frame[split_column].astype(str).to_numpy(dtype=object)
        old[missing_mask(frame[split_column])] = ""
    else:
        old = np.full(len(frame), "", dtype=object)
    out = frame.copy()
    out[split_column] = new

    in_test = np.bincount(g_codes, weights=is_test, minlength=len(g_values)) > 0
    sizes = pd.DataFrame({"split": list(SPLITS), "rows": [int((~is_test).sum()), int(is_test.sum())],
                          "groups": [int((~in_test).sum()), int(in_test.sum())]})
    sizes["row_fraction"] = sizes["rows"] / len(frame)

    classes_table = pd.DataFrame(columns=["split", "class", "rows", "fraction", "overall"])
    if y is not None:
        n_c = len(classes)
        counts = np.bincount(is_test * n_c + y, minlength=2 * n_c).reshape(2, n_c)
        classes_table = pd.DataFrame({"split": np.repeat(list(SPLITS), n_c), "class": np.tile(classes, 2),
                                      "rows": counts.ravel(),
                                      "fraction": (counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)).ravel(),
                                      "overall": np.tile(counts.sum(axis=0) / len(frame), 2)})

    moved = (pd.DataFrame({"old_split": old, "new_split": new}).value_counts(sort=False).rename("rows").reset_index()
             .sort_values(["old_split", "new_split"], kind="stable").reset_index(drop=True))
    moved_groups = _moved_groups(g_codes, g_values, old, new, in_test)

    params = {"group": group, "stratify": stratify, "test": test, "test_fraction": float(is_test.mean()), "seed": seed,
              "split_column": split_column, "method": method}
    prov = provenance(parameters=params, timings={"total": time.perf_counter() - t0})
    prov.update(data=f"frame of {len(frame)} rows",
                data_hash=data_hash(frame[[c for c in (group, stratify, split_column) if c in frame.columns]]))
    return SplitResult(frame=out, sizes=sizes, classes=classes_table, moved=moved, moved_groups=moved_groups,
                       params=params, provenance=prov)


def _moved_groups(g_codes, g_values, old, new, in_test):
    """The groups with a row whose (non-empty) old split differs from its new one."""
    s_codes, s_names = pd.factorize(old, sort=True)
    n_s = len(s_names)
    cells = np.bincount(g_codes * n_s + s_codes, minlength=len(g_values) * n_s).reshape(len(g_values), n_s) > 0
    keep = np.asarray(s_names) != ""  # no old split: assigned, not moved
    moved_rows = (old != "") & (old != new)
    moved = np.flatnonzero(np.bincount(g_codes, weights=moved_rows, minlength=len(g_values)) > 0)
    return pd.DataFrame({"group": g_values[moved], "rows": np.bincount(g_codes, minlength=len(g_values))[moved],
                         "old_splits": joined_names(cells[moved][:, keep], np.asarray(s_names)[keep]),
                         "new_split": np.where(in_test[moved], "test", "train")})


def write_split(manifest, out, group, **kwargs):
    """Re-split a manifest CSV by group (:func:`group_split`) and write it as a new CSV.

    Image paths are relative to the CSV's folder: when ``out`` lies in another folder they are
    rewritten relative to it, so every image still resolves; absolute paths are kept. A
    preprocessing sidecar (``<manifest>.toml``) is copied beside the new CSV.

    Parameters
    ----------
    manifest : path
        The manifest CSV (read with every column as text, so values are written back unchanged).
    out : path
        The new CSV (its folder is created); must not be the manifest itself.
    group : str
        The group column.
    **kwargs
        :func:`group_split`'s other parameters (``stratify``, ``test``, ``seed``, ``split_column``).

    Returns
    -------
    SplitResult
        With the frame as written and the manifest as its provenance's data.
    """
    t0 = time.perf_counter()
    manifest, out = Path(manifest), Path(out)
    if not manifest.is_file():
        raise ConceptLensError(f"manifest {manifest} does not exist; pass the path of a CSV file")
    if out.resolve() == manifest.resolve():
        raise ConceptLensError(f"write_split would overwrite its manifest {manifest}; write the new split to another file "
                               "(the old one is what the moves are measured against)")
    frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    if "image" not in frame.columns:
        raise ConceptLensError(f"manifest {manifest} has no 'image' column (columns: {', '.join(frame.columns)}); the first "
                               "line must name the columns, with image paths relative to the CSV")
    result = group_split(frame, group, **kwargs)
    new = result.frame
    src, dst = manifest.resolve().parent, out.resolve().parent
    if src != dst:
        prefix = os.path.relpath(src, dst)
        new = new.assign(image=[p if os.path.isabs(p) else os.path.normpath(os.path.join(prefix, p)) for p in new["image"]])
        logger.info("image paths rewritten relative to %s (prefix %s)", dst, prefix)
    dst.mkdir(parents=True, exist_ok=True)
    sidecar, out_sidecar = manifest.with_suffix(".toml"), out.with_suffix(".toml")
    if sidecar.is_file():
        if out_sidecar.is_file() and out_sidecar.read_bytes() != sidecar.read_bytes():
            raise ConceptLensError(f"{out_sidecar} exists and differs from the manifest's sidecar {sidecar}; remove it or "
                                   "write the split elsewhere")
        shutil.copyfile(sidecar, out_sidecar)
    new.to_csv(out, index=False)
    prov = provenance(data=manifest, parameters={**result.params, "out": str(out)},
                      timings={"total": time.perf_counter() - t0})
    return replace(result, frame=new, provenance=prov)

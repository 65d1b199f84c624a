"""Group leakage across splits, from metadata alone.

Rows that belong together - the slides of one patient, the frames of one video, the tiles of one
slide - must sit in one split, or a test score measures memory of the group rather than
generalisation. :func:`group_leakage` finds every group with rows in more than one split, exactly
(no sampling), with one ``bincount`` over ``(group, split)`` codes: a groups × splits table of
row counts from which everything else is read, so a manifest of 10⁶ rows takes well under a
second. :func:`check_nested` checks that a group sits within one value of an attribute (a patient
at one site), the assumption behind splitting by group and then reading results by attribute.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..core.result import Result, provenance
from ..errors import ConceptLensError
from ._common import check_column, check_filled, check_frame, data_hash, joined_names, read_table

__all__ = ["LeakageResult", "group_leakage", "check_nested"]

COUNT_COLUMNS = ["split_a", "split_b", "groups"]
SPLIT_COLUMNS = ["split", "rows", "groups", "leaking_groups", "leaking_rows"]


@dataclass(frozen=True)
class LeakageResult(Result):
    """Groups with rows in more than one split.

    Attributes
    ----------
    groups : DataFrame
        One row per leaking group, most splits then most rows first (ties in order of first
        appearance): ``group``, ``splits`` (the splits it is in, sorted, ``;``-joined),
        ``n_splits``, ``rows`` and ``rows_<split>`` for every split present (its rows there).
    counts : DataFrame
        ``split_a, split_b, groups``: for every unordered pair of splits present (``split_a <
        split_b``), how many groups have rows in both; pairs sharing none are listed with 0.
    splits : DataFrame
        ``split, rows, groups, leaking_groups, leaking_rows`` per split: its rows and groups, and
        how many of them belong to a group that is also in another split.
    totals : dict
        ``rows``, ``groups``, ``splits`` (how many), ``leaking_groups``, ``leaking_rows``.
    group, split : str
        The group and split columns.
    provenance : dict
    """

    groups: pd.DataFrame = field(repr=False)
    counts: pd.DataFrame = field(repr=False)
    splits: pd.DataFrame = field(repr=False)
    totals: dict
    group: str
    split: str
    provenance: dict = field(repr=False)

    KIND, META = "group_leakage", "group_leakage.json"

    def to_frame(self):
        """The leaking groups (:attr:`groups`)."""
        return self.groups

    def _write(self, directory):
        """``groups.csv``, ``counts.csv``, ``splits.csv``; ``group_leakage.json``."""
        for name in ("groups", "counts", "splits"):
            getattr(self, name).to_csv(directory / f"{name}.csv", index=False)
        return {"totals": self.totals, "group": self.group, "split": self.split}

    @classmethod
    def _read(cls, directory, meta):
        """Group values and split names come back as text."""
        return cls(groups=read_table(directory / "groups.csv", ("group", "splits")),
                   counts=read_table(directory / "counts.csv", ("split_a", "split_b")),
                   splits=read_table(directory / "splits.csv", ("split",)),
                   totals=meta["totals"], group=meta["group"], split=meta["split"], provenance=meta["provenance"])


def _codes(frame, group, split):
    """Validated ``(group codes, group values, split codes, split names)``; split names sorted."""
    check_frame(frame)
    check_column(frame, group, "group")
    check_column(frame, split, "split")
    check_filled(frame, group, "group")
    check_filled(frame, split, "split")
    g_codes, g_values = pd.factorize(frame[group], sort=False)
    s_codes, s_names = pd.factorize(frame[split].astype(str), sort=True)
    return g_codes, np.asarray(g_values), s_codes, np.asarray(s_names, dtype=object)


def group_leakage(frame, group, split="split"):
    """Find the groups (patients, slides, ...) that have rows in more than one split.

    Parameters
    ----------
    frame : DataFrame
        The rows, e.g. ``Manifest.read(path).frame``.
    group : str
        Column holding each row's group; every row needs one.
    split : str
        Column holding each row's split (``train``, ``val``, ``test``, ...); every row needs one
        and at least two splits must be present.

    Returns
    -------
    LeakageResult

    Raises
    ------
    ConceptLensError
        A column is missing, a row has no group or no split, or fewer than two splits are present.
    """
    t0 = time.perf_counter()
    g_codes, g_values, s_codes, s_names = _codes(frame, group, split)
    n_s = len(s_names)
    if n_s < 2:
        raise ConceptLensError(f"column {split!r} holds a single split ({s_names[0]!r}); group leakage needs rows in at "
                               "least two splits (e.g. train and test)")
    cells = np.bincount(g_codes * n_s + s_codes, minlength=len(g_values) * n_s).reshape(len(g_values), n_s)
    present = cells > 0
    n_splits = present.sum(axis=1)
    leak = np.flatnonzero(n_splits > 1)
    leak = leak[np.lexsort((leak, -cells[leak].sum(axis=1), -n_splits[leak]))]
    sub, sub_cells = present[leak], cells[leak]

    groups = pd.DataFrame({"group": g_values[leak], "splits": joined_names(sub, s_names),
                           "n_splits": n_splits[leak], "rows": sub_cells.sum(axis=1)})
    for j, name in enumerate(s_names):
        groups[f"rows_{name}"] = sub_cells[:, j]

    shared = sub.T.astype(np.int64) @ sub.astype(np.int64)  # groups in both splits, leaking ones suffice
    ia, ib = np.triu_indices(n_s, 1)
    counts = pd.DataFrame({"split_a": s_names[ia], "split_b": s_names[ib], "groups": shared[ia, ib]})
    splits = pd.DataFrame({"split": s_names, "rows": cells.sum(axis=0), "groups": present.sum(axis=0),
                           "leaking_groups": sub.sum(axis=0), "leaking_rows": sub_cells.sum(axis=0)})
    totals = {"rows": len(frame), "groups": len(g_values), "splits": n_s, "leaking_groups": len(leak),
              "leaking_rows": int(sub_cells.sum())}
    prov = provenance(parameters={"group": group, "split": split}, timings={"total": time.perf_counter() - t0})
    prov.update(data=f"frame of {len(frame)} rows", data_hash=data_hash(frame[[group, split]]))
    return LeakageResult(groups=groups, counts=counts, splits=splits, totals=totals, group=group, split=split,
                         provenance=prov)


def check_nested(frame, group, attribute):
    """Raise unless every group has a single value of ``attribute`` (a patient sits at one site).

    Parameters
    ----------
    frame : DataFrame
    group : str
        Column holding each row's group; every row needs one.
    attribute : str
        Column that must be constant within a group (a missing value counts as a value).

    Raises
    ------
    ConceptLensError
        A column is missing, a row has no group, or a group spans several values; the message
        names the first such group (in row order) and its values.
    """
    check_frame(frame)
    check_column(frame, group, "group")
    check_column(frame, attribute, "attribute")
    check_filled(frame, group, "group")
    pairs = frame[[group, attribute]].drop_duplicates()
    per_group = pairs[group].value_counts(sort=False)
    spanning = per_group[per_group > 1]
    if len(spanning):
        first = pairs[group][pairs[group].isin(spanning.index)].iloc[0]
        values = sorted(pairs.loc[pairs[group] == first, attribute].astype(str))
        raise ConceptLensError(f"group '{first}' spans {len(values)} values of column {attribute!r} ({', '.join(values)}); "
                               f"each {group} must sit within one {attribute} - fix those rows "
                               f"({len(spanning)} of {len(per_group)} groups span several values)")

"""Validation and hashing shared by the dataset-review primitives (leakage, split, slices, labels,
shortcuts): one message per kind of bad input, so every primitive says it the same way."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..core.hashing import hash_files
from ..errors import ConceptLensError, did_you_mean

def check_frame(frame, param="frame"):
    """Raise unless ``frame`` is a non-empty DataFrame."""
    if not isinstance(frame, pd.DataFrame):
        raise ConceptLensError(f"the {param} parameter must be a pandas DataFrame (e.g. a manifest's rows); "
                               f"got {type(frame).__name__}")
    if len(frame) == 0:
        raise ConceptLensError(f"the {param} parameter is an empty table; nothing to review")


def check_column(frame, column, param):
    """Raise unless ``column`` is a column of ``frame``, naming the available columns."""
    if column not in frame.columns:
        raise ConceptLensError(f"the {param} parameter names column {column!r}, which the frame does not have"
                               f"{did_you_mean(column, map(str, frame.columns))} (columns: {', '.join(map(str, frame.columns))})")


def missing_mask(values):
    """Rows whose value is missing: NaN/None, or an empty or blank string (how a CSV read with
    ``keep_default_na=False`` holds an empty cell)."""
    values = pd.Series(values)
    if not (values.dtype.kind in "OSU" or isinstance(values.dtype, pd.StringDtype)):
        return values.isna().to_numpy(dtype=bool)
    # Strip the distinct values only: a column of 10^6 rows holds far fewer of them.
    codes, uniques = pd.factorize(values, use_na_sentinel=True)
    blank = pd.Series(uniques).astype("string").str.strip().eq("").to_numpy(dtype=bool, na_value=True)
    return (codes < 0) | np.append(blank, True)[codes]


def check_filled(frame, column, what="value"):
    """Raise when ``column`` has missing values, naming the column and counting the rows."""
    bad = missing_mask(frame[column])
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ConceptLensError(f"column {column!r} has no {what} in {int(bad.sum())} of {len(frame)} rows (first: row {first}); "
                               f"give every row a {what} or drop those rows first")


def check_fraction(value, param, low=0.0, high=1.0):
    """Raise unless ``low < value < high``."""
    if not isinstance(value, (int, float, np.number)) or isinstance(value, bool) or not low < float(value) < high:
        raise ConceptLensError(f"the {param} parameter must be a number strictly between {low:g} and {high:g}; got {value!r}")
    return float(value)


def check_nonnegative(value, param):
    """Raise unless ``value`` is a finite number ``>= 0``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not 0 <= float(value) < np.inf:
        raise ConceptLensError(f"the {param} parameter must be a finite number >= 0; got {value!r}")
    return float(value)


def check_count(value, param, low=1):
    """Raise unless ``value`` is an integer ``>= low``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ConceptLensError(f"the {param} parameter must be an integer >= {low}; got {value!r}")
    return int(value)


def joined_names(present, names):
    """``;``-joined names of the True columns of each row of ``present`` [R, S] (``names`` in
    column order), built column by column: S is a handful of splits, R may be 10^6 rows."""
    joined = np.full(len(present), "", dtype=object)
    for j, name in enumerate(names):
        joined = joined + np.where(present[:, j], f"{name};", "").astype(object)
    return pd.Series(joined, dtype=object).str[:-1].to_numpy()


def data_hash(*parts):
    """SHA-256 of in-memory inputs (frames, arrays) through the core hasher, for provenance."""
    chunks = []
    for part in parts:
        if isinstance(part, pd.DataFrame):
            chunks.append(pd.util.hash_pandas_object(part, index=False).to_numpy().tobytes())
            chunks.append(repr([str(c) for c in part.columns]).encode())
        else:
            arr = np.asarray(part)
            if arr.dtype.kind in "OUS":  # text: hash the values, not object pointers
                chunks.append(pd.util.hash_array(arr.astype(str).ravel()).tobytes())
            else:
                chunks.append(np.ascontiguousarray(arr).tobytes())
            chunks.append(f"{arr.dtype.kind}{arr.shape}".encode())
    return hash_files([], seed=b"\0".join(chunks))


def read_table(path, text=()):
    """A result table written by ``to_csv``, with ``text`` columns kept as strings (labels "1", "NA")."""
    return pd.read_csv(path, keep_default_na=False, dtype={c: str for c in text})

"""Unit ↔ label intersection-over-union, tallied batch by batch as sparse matrix products.

For a batch of images the pixels of all images are laid end to end (``Npix`` = Σ sh·sw) and
two sparse 0/1 matrices are built:

* ``M`` — ``[active pairs, Npix]``: for each (image, unit) pair whose map exceeds the unit's
  threshold somewhere, the unit's map bilinearly upsampled to the mask grid
  (``align_corners=False``) and thresholded, ``up > T``. Pairs whose map never exceeds ``T`` are
  skipped before upsampling (their mask is empty), and within a pair the upsampled values are
  computed only in the blocks of output pixels that read a source pixel ``> T`` (a bilinear
  value is a convex combination of its 4 source pixels, so elsewhere it cannot exceed ``T``);
* ``L`` — ``[Npix, labels]``: pixel ↔ label columns (image-level labels are whole-image masks).

``M @ L`` (one sparse matmul, scipy) gives every pair's intersection with every label; a 0/1
``[units, pairs]`` matrix sums them per unit. All counts are int64; accumulators add across
shards (:meth:`IoUTally.merge`).

Two category rules decide a unit's activation area in a label's union:

``paper`` (Bau et al. 2017; default)
    Columns are (category, label) pairs from ``c_<cat>.csv``. A column of category ``c`` counts
    label pixels of ``c``'s masks only, and the unit's activation area counts in images
    annotated with ``c``. ``IoU = I / (A_c + L - I)``, 0 where the union is empty.
``netdissect-lite``
    NetDissect-Lite's tally: one column per label (its main category), label pixels counted over
    all categories' masks (a pixel covered by one label in two masks counts twice, as Lite's
    ``bincount`` of the concatenated masks does), and the unit's activation area in an image
    counts for category ``c`` when a label of main category ``c`` lies under the activated
    pixels (image-level labels lie under all of them). ``IoU = I / (A_c + L - I + 1e-10)``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from ..errors import ConceptLensError

__all__ = ["RULES", "LabelColumns", "LabelBatch", "IoUTally", "label_columns", "label_batch", "unit_masks"]

logger = logging.getLogger(__name__)

RULES = ("paper", "netdissect-lite")
_LITE_EPS = 1e-10
_BLOCK_ELEMENTS = 1 << 23  # upsampled values per slice


def _check_rule(rule):
    if rule not in RULES:
        raise ConceptLensError(f"the rule must be one of {', '.join(RULES)}; got {rule!r}")
    return rule


@dataclass(frozen=True)
class LabelColumns:
    """The label columns of an IoU matrix.

    Attributes
    ----------
    rule : str
    categories : tuple of str
    number : numpy.ndarray of int64, shape (J,)
        Label number of each column.
    name : numpy.ndarray of str, shape (J,)
    category : numpy.ndarray of int64, shape (J,)
        Index into ``categories`` of each column's category.
    lookup : numpy.ndarray of int64, shape (n_categories, max_label + 1)
        Column of (category, label number); -1 where there is none.
    """

    rule: str
    categories: tuple
    number: np.ndarray
    name: np.ndarray
    category: np.ndarray
    lookup: np.ndarray

    def __len__(self):
        return len(self.number)

    def onehot(self):
        """Sparse ``[J, n_categories]`` 0/1 matrix: column → its category."""
        j = len(self.number)
        return sp.csr_matrix((np.ones(j, dtype=np.int64), (np.arange(j), self.category)),
                             shape=(j, len(self.categories)))


def label_columns(broden, rule="paper"):
    """The label columns of ``broden`` (a :class:`~conceptlens.dissection.broden.BrodenSet`) for a rule."""
    rule = _check_rule(rule)
    cats = broden.categories
    lookup = np.full((len(cats), broden.max_label + 1), -1, dtype=np.int64)
    names = dict(zip(broden.labels["number"], broden.labels["name"]))
    if rule == "paper":
        number, category = [], []
        for ci, cat in enumerate(cats):
            nums = broden.codes[cat]["number"].to_numpy()
            lookup[ci, nums] = len(number) + np.arange(len(nums))
            number.extend(nums.tolist())
            category.extend([ci] * len(nums))
    else:
        number = broden.labels["number"].tolist()
        category = [cats.index(c) for c in broden.labels["category"]]
        lookup[:, number] = np.arange(len(number))[None, :]
    return LabelColumns(rule, tuple(cats), np.asarray(number, dtype=np.int64),
                        np.asarray([names[n] for n in number], dtype=object),
                        np.asarray(category, dtype=np.int64), lookup)


@dataclass(frozen=True)
class LabelBatch:
    """Labels of a batch of images as one sparse pixel × column matrix.

    Attributes
    ----------
    matrix : scipy.sparse.csr_matrix of int64, shape (Npix, J)
    offsets : numpy.ndarray of int64, shape (B + 1,)
        First pixel of each image in ``matrix`` (images are ``sh × sw``, row-major).
    shapes : numpy.ndarray of int64, shape (B, 2)
        ``(sh, sw)`` per image.
    annotated : numpy.ndarray of bool, shape (B, n_categories)
    """

    matrix: sp.csr_matrix
    offsets: np.ndarray
    shapes: np.ndarray
    annotated: np.ndarray


def label_batch(broden, rows, columns, annotations=None):
    """Decode the masks of images ``rows`` once and build their :class:`LabelBatch`.

    Parameters
    ----------
    broden : BrodenSet
    rows : sequence of int
        ``index.csv`` rows (0-based).
    columns : LabelColumns
    annotations : list of dict, optional
        Already decoded ``broden.annotations(i)`` for ``rows`` (decoded here otherwise).

    Raises
    ------
    ConceptLensError
        If a mask holds a label that has no column (not in ``label.csv``, or, under the paper
        rule, not listed in its category's ``c_<cat>.csv``).
    """
    rows = [int(r) for r in rows]
    shapes = np.array([[broden.index["sh"].iat[r], broden.index["sw"].iat[r]] for r in rows], dtype=np.int64).reshape(-1, 2)
    offsets = np.concatenate([[0], np.cumsum(shapes[:, 0] * shapes[:, 1])]).astype(np.int64)
    annotated = np.zeros((len(rows), len(columns.categories)), dtype=bool)
    pix, col = [], []
    max_label = columns.lookup.shape[1] - 1
    for b, r in enumerate(rows):
        ann = annotations[b] if annotations is not None else broden.annotations(r)
        s = int(offsets[b + 1] - offsets[b])
        for ci, cat in enumerate(columns.categories):
            entries = ann.get(cat, [])
            annotated[b, ci] = len(entries) > 0
            for entry in entries:
                if isinstance(entry, (int, np.integer)):
                    j = columns.lookup[ci, entry] if entry <= max_label else -1
                    if j < 0:
                        raise ConceptLensError(
                            f"{broden.root / 'index.csv'} line {r + 2}, column {cat!r}: image-level label {entry} "
                            f"is not listed in {_listing(columns, cat)}"
                        )
                    pix.append(np.arange(offsets[b], offsets[b + 1]))
                    col.append(np.full(s, j, dtype=np.int64))
                    continue
                flat = np.asarray(entry).ravel()
                keep = np.flatnonzero(flat)
                labels = flat[keep]
                bad = labels > max_label
                j = columns.lookup[ci, np.where(bad, 0, labels)]
                if bad.any() or (j < 0).any():
                    unknown = np.unique(labels[bad | (j < 0)])[:5].tolist()
                    raise ConceptLensError(
                        f"{broden.root / 'index.csv'} line {r + 2}, column {cat!r}: a mask holds label(s) {unknown} "
                        f"not listed in {_listing(columns, cat)}"
                    )
                pix.append(offsets[b] + keep)
                col.append(j)
    pix = np.concatenate(pix) if pix else np.zeros(0, dtype=np.int64)
    col = np.concatenate(col) if col else np.zeros(0, dtype=np.int64)
    matrix = sp.csr_matrix((np.ones(len(pix), dtype=np.int64), (pix, col)), shape=(int(offsets[-1]), len(columns)))
    matrix.sum_duplicates()
    if columns.rule == "paper":
        matrix.data[:] = 1  # a (category, label) mask is a set of pixels
    return LabelBatch(matrix, offsets, shapes, annotated)


def _listing(columns, cat):
    return f"c_{cat}.csv" if columns.rule == "paper" else "label.csv"


@functools.lru_cache(maxsize=64)
def _axis(n_out, n_in):
    """Bilinear (align_corners=False) source indices and weights along one axis, in float32 as torch
    computes them, and for each source index the output positions that read it (padded with -1)."""
    scale = np.float32(n_in / n_out)
    src = np.maximum(scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), np.float32(0))
    i0 = np.minimum(src.astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = (src - i0).astype(np.float32)
    readers = [np.flatnonzero((i0 == k) | (i1 == k)) for k in range(n_in)]
    width = max(1, max(len(r) for r in readers))
    table = np.full((n_in, width), -1, dtype=np.int64)
    for k, r in enumerate(readers):
        table[k, : len(r)] = r
    return i0, i1, lam, table


@functools.lru_cache(maxsize=64)
def _weights(n_out, n_in):
    """Bilinear weight matrix ``[n_out + 1, n_in]`` (2 non-zeros per row; the last row is zero, for
    padding) plus, per source index, the output positions reading it (``[n_in, L]``, padded with
    ``n_out``) and their validity."""
    i0, i1, lam, readers = _axis(n_out, n_in)
    W = np.zeros((n_out + 1, n_in), dtype=np.float32)  # last row: zeros for padding
    W[np.arange(n_out), i0] += 1 - lam
    W[np.arange(n_out), i1] += lam
    valid = readers >= 0
    readers = np.where(valid, readers, n_out)
    return torch.from_numpy(W), torch.from_numpy(readers), torch.from_numpy(valid)


def _block_masks(fm, thr, sh, sw):
    """``up > T`` of maps ``fm`` ``[P, h, w]`` on the ``sh × sw`` grid, evaluated only where it can hold.

    A bilinear value is a convex combination of its 4 source pixels, so it can exceed ``T`` only
    at output pixels that read a source pixel ``> T``. For each such source pixel the block of
    output rows × columns reading it is computed as ``Wy[rows] @ map @ Wx[cols]ᵀ`` (batched
    matmul). Returns ``(pair, pixel)`` index arrays (with repeats where blocks overlap).
    """
    p, h, w = fm.shape
    Wy, rows_of, row_ok = _weights(sh, h)
    Wx, cols_of, col_ok = _weights(sw, w)
    q, i, j = torch.nonzero(fm > thr[:, None, None], as_tuple=True)
    ry, cx = rows_of[i], cols_of[j]  # [Q, Lr], [Q, Lc]
    up = torch.bmm(torch.bmm(Wy[ry], fm[q]), Wx[cx].transpose(1, 2))  # [Q, Lr, Lc]
    hit = (up > thr[q][:, None, None]) & row_ok[i][:, :, None] & col_ok[j][:, None, :]
    b, a, c = torch.nonzero(hit, as_tuple=True)
    return q[b].numpy(), (ry[b, a] * sw + cx[b, c]).numpy()


def unit_masks(maps, thresholds, shapes, offsets):
    """Sparse unit masks of a batch: pairs (image, unit) whose map exceeds the threshold.

    Parameters
    ----------
    maps : torch.Tensor or numpy.ndarray, shape (B, C, h, w)
        A layer's activations for the batch.
    thresholds : array_like, shape (C,)
    shapes, offsets : numpy.ndarray
        As in :class:`LabelBatch`.

    Returns
    -------
    pair_image, pair_unit : numpy.ndarray of int64, shape (P,)
        The active pairs (maps that exceed the threshold somewhere; the others are skipped).
    masks : scipy.sparse.csr_matrix of int64, shape (P, Npix)
        ``up > T`` of each pair, ``up`` the map bilinearly upsampled (``align_corners=False``,
        as ``torch.nn.functional.interpolate``) to its image's ``sh × sw`` mask grid; evaluated
        only at pixels that read a source pixel ``> T`` (elsewhere ``up <= T`` by convexity).
    """
    with _one_thread():
        return _unit_masks(maps, thresholds, shapes, offsets)


@contextlib.contextmanager
def _one_thread():
    """Run torch ops on one thread: the tally is many small ops, for which intra-op thread
    hand-offs cost more than they gain (about 15x slower on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _unit_masks(maps, thresholds, shapes, offsets):
    maps = torch.as_tensor(maps, dtype=torch.float32)
    thr = torch.as_tensor(np.asarray(thresholds, dtype=np.float32))
    if maps.dim() != 4 or maps.shape[1] != thr.numel():
        raise ConceptLensError(f"unit maps must be [images, {thr.numel()} units, h, w]; got {tuple(maps.shape)}")
    active = maps.amax(dim=(2, 3)) > thr[None, :]
    pair_image, pair_unit = (t.numpy().astype(np.int64) for t in torch.nonzero(active, as_tuple=True))
    rows, cols = [], []
    pair_shapes = shapes[pair_image] if len(pair_image) else np.zeros((0, 2), dtype=np.int64)
    kinds, group = np.unique(pair_shapes, axis=0, return_inverse=True)
    h, w = maps.shape[2:]
    for g, (sh, sw) in enumerate(kinds.tolist()):
        members = np.flatnonzero(group.ravel() == g)
        block = _weights(sh, h)[1].shape[1] * _weights(sw, w)[1].shape[1]
        step = max(1, _BLOCK_ELEMENTS // (4 * block))  # ~4 blocks per pair
        for start in range(0, len(members), step):
            sel = members[start:start + step]
            b, c = torch.from_numpy(pair_image[sel]), torch.from_numpy(pair_unit[sel])
            p_idx, s_idx = _block_masks(maps[b, c], thr[c], sh, sw)
            rows.append(sel[p_idx])
            cols.append(offsets[pair_image[sel[p_idx]]] + s_idx)
    rows = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    cols = np.concatenate(cols) if cols else np.zeros(0, dtype=np.int64)
    masks = sp.csr_matrix((np.ones(len(rows), dtype=np.int64), (rows, cols)), shape=(len(pair_image), int(offsets[-1])))
    masks.sum_duplicates()
    masks.data[:] = 1  # overlapping blocks
    return pair_image, pair_unit, masks


class IoUTally:
    """Mergeable IoU accumulators of one layer.

    Attributes
    ----------
    intersection : numpy.ndarray of int64, shape (units, J)
    unit_area_cat : numpy.ndarray of int64, shape (units, n_categories)
        The unit's activation area counted in each category's unions (see the rules).
    unit_area : numpy.ndarray of int64, shape (units,)
        Total activated pixels (0: a dead unit).
    label_area : numpy.ndarray of int64, shape (J,)
    n_images : int
    """

    _ARRAYS = ("intersection", "unit_area_cat", "unit_area", "label_area")

    def __init__(self, n_units, columns):
        self.columns = columns
        self.n_units = int(n_units)
        j, k = len(columns), len(columns.categories)
        self.intersection = np.zeros((self.n_units, j), dtype=np.int64)
        self.unit_area_cat = np.zeros((self.n_units, k), dtype=np.int64)
        self.unit_area = np.zeros(self.n_units, dtype=np.int64)
        self.label_area = np.zeros(j, dtype=np.int64)
        self.n_images = 0
        self._labelcat = columns.onehot()

    def add(self, maps, thresholds, labels):
        """Tally a batch: ``maps`` ``[B, units, h, w]`` with its :class:`LabelBatch`.

        Returns
        -------
        tuple
            ``(pair_image, pair_unit, masks)`` from :func:`unit_masks`, for callers that need them.
        """
        pair_image, pair_unit, masks = unit_masks(maps, thresholds, labels.shapes, labels.offsets)
        self.label_area += np.asarray(labels.matrix.sum(axis=0)).ravel().astype(np.int64)
        self.n_images += len(labels.shapes)
        n_pairs = len(pair_unit)
        if n_pairs:
            per_pair = (masks @ labels.matrix).tocsr()  # [P, J] intersections: the one matmul
            gather = sp.csr_matrix((np.ones(n_pairs, dtype=np.int64), (pair_unit, np.arange(n_pairs))),
                                   shape=(self.n_units, n_pairs))
            self.intersection += (gather @ per_pair).toarray()
            area = np.asarray(masks.sum(axis=1)).ravel().astype(np.int64)
            if self.columns.rule == "paper":
                present = labels.annotated[pair_image]
            else:
                present = (per_pair @ self._labelcat).toarray() > 0
            self.unit_area_cat += gather @ (area[:, None] * present)
            self.unit_area += np.bincount(pair_unit, weights=area, minlength=self.n_units).astype(np.int64)
        return pair_image, pair_unit, masks

    def merge(self, other):
        """Add the counts of a tally of another shard (same units and columns)."""
        if other.intersection.shape != self.intersection.shape or other.columns.rule != self.columns.rule:
            raise ConceptLensError("IoU tallies merge only with the same units, label columns and rule")
        for name in self._ARRAYS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.n_images += other.n_images
        return self

    def iou(self):
        """IoU ``[units, J]`` (float64); 0 where the union is empty, never NaN."""
        inter = self.intersection.astype(np.float64)
        union = self.unit_area_cat[:, self.columns.category].astype(np.float64) + self.label_area[None, :] - inter
        if self.columns.rule == "netdissect-lite":
            return inter / (union + _LITE_EPS)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)

    def save(self, directory, prefix):
        """Write the accumulators as ``<prefix>_<name>.npy`` files."""
        directory = Path(directory)
        for name in self._ARRAYS:
            np.save(directory / f"{prefix}_{name}.npy", getattr(self, name))

    @classmethod
    def load(cls, directory, prefix, columns, n_images=0):
        """Read accumulators written by :meth:`save`."""
        directory = Path(directory)
        first = np.load(directory / f"{prefix}_intersection.npy", allow_pickle=False)
        tally = cls(first.shape[0], columns)
        for name in cls._ARRAYS:
            setattr(tally, name, np.load(directory / f"{prefix}_{name}.npy", allow_pickle=False))
        tally.n_images = n_images
        return tally

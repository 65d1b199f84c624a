"""Unit ↔ label intersection-over-union, tallied batch by batch with gathers and bincounts.

For a batch of images the pixels of all images are laid end to end (``Npix`` = Σ sh·sw):

* the **labels** (:func:`label_batch`) are ``K`` planes of ``Npix`` label columns — plane ``k``
  holds the column of each image's ``k``-th pixel mask at every pixel (a sparse pixel × column
  0/1 matrix with at most ``K`` entries per row, stored by row) — plus a ``[B, J]`` count of
  image-level labels (whole-image masks, kept apart: their intersection with a unit mask is the
  mask's area);
* the **unit masks** (:func:`unit_hits`) are the activated pixels of each (image, unit) pair,
  ``up > T`` with ``up`` the map bilinearly upsampled to the mask grid (``align_corners=False``,
  the arithmetic of ``torch.nn.functional.interpolate``). Pairs whose map never exceeds ``T``
  are skipped (a bilinear value is a convex combination of source pixels, so their mask is
  empty); the output grid is cut into cells of pixels that read the same 2 × 2 source pixels,
  and only cells with a source pixel ``> T``, and there only columns that can exceed ``T``, are
  evaluated — for all pairs of the batch at once, one array op per row of cells.

The product (unit masks) · (labels) is then a gather of the activated pixels' label columns and
one ``bincount`` over (unit, column) keys — exactly the sparse matmul, without building either
matrix; image-level labels add (unit × image areas) · (image-level counts). All counts are int64;
accumulators add across shards (:meth:`IoUTally.merge`).

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

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ..errors import ConceptLensError

__all__ = ["RULES", "LabelColumns", "LabelBatch", "IoUTally", "label_columns", "label_batch", "unit_hits",
           "unit_masks"]

logger = logging.getLogger(__name__)

RULES = ("paper", "netdissect-lite")
_LITE_EPS = 1e-10


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
    """The label columns of ``broden`` (a :class:`~conceptlens.core.broden.BrodenSet`) for a rule."""
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
    """Labels of a batch of images, laid out for :meth:`IoUTally.add`.

    Attributes
    ----------
    planes : numpy.ndarray of int32, shape (K, Npix)
        Pixel-mask labels as columns: plane ``k`` holds, at each pixel of the batch (images end
        to end, row-major), the column of the image's ``k``-th pixel mask there, or ``J`` (no
        label). ``K`` is the most pixel masks of an image in the batch. Under the paper rule a
        (category, label) pixel is kept in one plane only (a mask is a set of pixels) and not at
        all where the image has the same (category, label) image-level.
    whole : numpy.ndarray of int64, shape (B, J)
        Image-level labels per image (whole-image masks): 0/1 under the paper rule, the number
        of entries under netdissect-lite.
    label_area : numpy.ndarray of int64, shape (J,)
        Label pixels of the batch per column.
    offsets : numpy.ndarray of int64, shape (B + 1,)
        First pixel of each image (images are ``sh × sw``).
    shapes : numpy.ndarray of int64, shape (B, 2)
        ``(sh, sw)`` per image.
    annotated : numpy.ndarray of bool, shape (B, n_categories)
    """

    planes: np.ndarray
    whole: np.ndarray
    label_area: np.ndarray
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
    anns = annotations if annotations is not None else [broden.annotations(r) for r in rows]
    shapes = broden.index[["sh", "sw"]].to_numpy(dtype=np.int64)[rows].reshape(-1, 2)
    offsets = np.concatenate([[0], np.cumsum(shapes[:, 0] * shapes[:, 1])]).astype(np.int64)
    cats, n_cols, paper = columns.categories, len(columns), columns.rule == "paper"
    max_label = columns.lookup.shape[1] - 1
    # label number → plane value: its column, n_cols for 0 ("no label"), -1 where it has none
    table = columns.lookup.astype(np.int32)
    table[:, 0] = n_cols
    n_masks = [sum(not isinstance(e, (int, np.integer)) for cat in cats for e in ann.get(cat, [])) for ann in anns]
    planes = np.full((max(n_masks, default=0), int(offsets[-1])), n_cols, dtype=np.int32)
    whole = np.zeros((len(rows), n_cols), dtype=np.int64)
    annotated = np.zeros((len(rows), len(cats)), dtype=bool)
    for b, (r, ann) in enumerate(zip(rows, anns)):
        lo, hi, k = offsets[b], offsets[b + 1], 0
        for ci, cat in enumerate(cats):
            entries = ann.get(cat, [])
            annotated[b, ci] = len(entries) > 0
            first = k  # this category's planes of the image start here
            for entry in entries:
                if isinstance(entry, (int, np.integer)):
                    j = columns.lookup[ci, entry] if 0 <= entry <= max_label else -1
                    if j < 0:
                        raise ConceptLensError(
                            f"{broden.root / 'index.csv'} line {r + 2}, column {cat!r}: image-level label {entry} "
                            f"is not listed in {_listing(columns, cat)}"
                        )
                    whole[b, j] = 1 if paper else whole[b, j] + 1
                    continue
                flat = np.asarray(entry).ravel()
                plane = planes[k, lo:hi]
                top = flat.max(initial=0)
                if top <= max_label:
                    np.take(table[ci], flat, out=plane)
                if top > max_label or plane.min(initial=0) < 0:
                    bad = np.unique(flat[(flat > max_label) | (table[ci][np.minimum(flat, max_label)] < 0)])
                    raise ConceptLensError(
                        f"{broden.root / 'index.csv'} line {r + 2}, column {cat!r}: a mask holds label(s) "
                        f"{bad[:5].tolist()} not listed in {_listing(columns, cat)}"
                    )
                if paper:  # a label pixel already in an earlier mask of the category counts once
                    for earlier in planes[first:k, lo:hi]:
                        plane[plane == earlier] = n_cols
                k += 1
        if paper and whole[b].any():  # ... and not at all where the label is image-level
            image = planes[:, lo:hi]
            image[np.append(whole[b], 0)[image] > 0] = n_cols
    label_area = np.bincount(planes.ravel(), minlength=n_cols + 1)[:n_cols] + whole.T @ (shapes[:, 0] * shapes[:, 1])
    return LabelBatch(planes, whole, label_area.astype(np.int64), offsets, shapes, annotated)


def _listing(columns, cat):
    return f"c_{cat}.csv" if columns.rule == "paper" else "label.csv"


@functools.lru_cache(maxsize=64)
def _axis(n_out, n_in):
    """One axis of the bilinear (``align_corners=False``) resize ``n_in → n_out``.

    Source indices and weights are computed in float32 as torch computes them. Output positions
    reading the same source pair ``(i0, i1)`` are consecutive: a *run*.

    Returns
    -------
    i0, i1 : numpy.ndarray of int64, shape (n_out,)
    w0, w1 : numpy.ndarray of float32, shape (n_out,)
        Weights of ``i0`` and ``i1``.
    starts : numpy.ndarray of int64, shape (runs + 1,)
        First position of each run, then ``n_out``.
    """
    scale = np.float32(n_in / n_out)
    src = np.maximum(scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), np.float32(0))
    i0 = np.minimum(src.astype(np.int64), n_in - 1)
    w1 = np.minimum(src - i0, np.float32(1)).astype(np.float32)
    starts = np.append(np.flatnonzero(np.r_[True, i0[1:] != i0[:-1]]), n_out)
    return i0, np.minimum(i0 + 1, n_in - 1), np.float32(1) - w1, w1, starts


@functools.lru_cache(maxsize=64)
def _column_cells(n_out, n_in):
    """The columns of :func:`_axis` cut into cells: runs split into pieces of at most
    ``ceil(n_out / n_in)`` positions, padded to that width.

    Returns
    -------
    i0, i1 : numpy.ndarray of int64, shape (G,)
        Source indices each cell reads.
    pos : numpy.ndarray of int64, shape (G, L)
        Output positions (padded with 0).
    w0, w1 : numpy.ndarray of float32, shape (G, L)
        Weights (NaN at padding, so a padded value is never ``> T``).
    """
    i0, i1, w0, w1, starts = _axis(n_out, n_in)
    width = -(-n_out // n_in)
    run = np.repeat(np.arange(len(starts) - 1), np.diff(starts))
    cell = np.cumsum(np.r_[True, i0[1:] != i0[:-1]] | ((np.arange(n_out) - starts[run]) % width == 0)) - 1
    first = np.flatnonzero(np.r_[True, cell[1:] != cell[:-1]])
    slot = np.arange(n_out) - first[cell]
    pos = np.zeros((len(first), width), dtype=np.int64)
    c0 = np.full((len(first), width), np.nan, dtype=np.float32)
    c1 = c0.copy()
    pos[cell, slot], c0[cell, slot], c1[cell, slot] = np.arange(n_out), w0, w1
    return i0[first], i1[first], pos, c0, c1


def unit_hits(maps, thresholds, shapes, offsets):
    """Activated pixels of a batch's unit masks: pairs (image, unit) and their pixels ``up > T``.

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
        The active pairs: maps that exceed the threshold somewhere (the others are skipped, as
        NetDissect-Lite does).
    hit_pair, hit_pixel : numpy.ndarray of int64, shape (N,)
        Each activated pixel once: its pair and its pixel in the batch (``offsets`` layout).

    Notes
    -----
    ``up`` is the map bilinearly upsampled (``align_corners=False``, in torch's float32
    arithmetic: columns first, then rows) to the image's ``sh × sw`` mask grid. A bilinear value
    is a convex combination, so ``up`` is evaluated only where it can exceed ``T``: in column
    cells (:func:`_column_cells`) × row runs whose 2 × 2 source pixels hold one above ``T``, and
    there only in columns whose column-interpolated values (of the run's two source rows) hold
    one above ``T``. These tests use ``T`` lowered by 2⁻²⁰·|T| so that float rounding (a few
    units in the last place) cannot prune a pixel that is above ``T``.
    """
    if hasattr(maps, "detach"):  # a torch tensor
        maps = maps.detach().cpu().numpy()
    maps = np.asarray(maps, dtype=np.float32)
    thr = np.asarray(thresholds, dtype=np.float32).ravel()
    if maps.ndim != 4 or maps.shape[1] != thr.size:
        raise ConceptLensError(f"unit maps must be [images, {thr.size} units, h, w]; got {tuple(maps.shape)}")
    b, c, h, w = maps.shape
    pair_image, pair_unit = np.nonzero(maps.reshape(b, c, h * w).max(axis=2) > thr[None, :])
    low = thr - np.abs(thr) * np.float32(2.0 ** -20)  # pruning bound, below T by more than rounding
    hit_pair, hit_pixel = [], []
    kinds, kind = np.unique(np.asarray(shapes).reshape(-1, 2), axis=0, return_inverse=True)
    for g, (sh, sw) in enumerate(kinds.tolist()):
        members = np.flatnonzero(kind.ravel()[pair_image] == g)
        fm, tl = maps[pair_image[members], pair_unit[members]], low[pair_unit[members]]
        y0, y1, wy0, wy1, starts = _axis(sh, h)
        ry0, ry1 = y0[starts[:-1]], y1[starts[:-1]]  # source rows of each row run
        x0, x1, xpos, wx0, wx1 = _column_cells(sw, w)
        above = fm > tl[:, None, None]
        live = above[:, ry0][:, :, x0] | above[:, ry1][:, :, x0] | above[:, ry0][:, :, x1] | above[:, ry1][:, :, x1]
        ry, q, cx = np.nonzero(live.transpose(1, 0, 2))  # live cells, grouped by row run
        # column interpolation of the run's two source rows, [cells, L]
        top = wx0[cx] * fm[q, ry0[ry], x0[cx]][:, None] + wx1[cx] * fm[q, ry0[ry], x1[cx]][:, None]
        bot = wx0[cx] * fm[q, ry1[ry], x0[cx]][:, None] + wx1[cx] * fm[q, ry1[ry], x1[cx]][:, None]
        cell, col = np.nonzero(np.maximum(top, bot) > tl[q][:, None])  # live columns
        top, bot, run = top[cell, col], bot[cell, col], ry[cell]
        pair = members[q[cell]]
        t, base = thr[pair_unit[pair]], offsets[pair_image[pair]] + xpos[cx[cell], col]
        bounds = np.searchsorted(run, np.arange(len(starts)))
        for r in np.flatnonzero(np.diff(bounds)):  # each row run: its rows' weights are shared
            s, rows = slice(bounds[r], bounds[r + 1]), slice(starts[r], starts[r + 1])
            up = top[s, None] * wy0[None, rows]
            up += bot[s, None] * wy1[None, rows]
            k, i = np.divmod(np.flatnonzero(up > t[s, None]), up.shape[1])
            hit_pair.append(pair[s][k])
            hit_pixel.append(base[s][k] + (starts[r] + i) * sw)
    def cat(parts):
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    return pair_image.astype(np.int64), pair_unit.astype(np.int64), cat(hit_pair), cat(hit_pixel)


def unit_masks(maps, thresholds, shapes, offsets):
    """The unit masks of :func:`unit_hits` as a sparse 0/1 matrix.

    Returns
    -------
    pair_image, pair_unit : numpy.ndarray of int64, shape (P,)
    masks : scipy.sparse.csr_matrix of int64, shape (P, Npix)
    """
    pair_image, pair_unit, hit_pair, hit_pixel = unit_hits(maps, thresholds, shapes, offsets)
    masks = sp.csr_matrix((np.ones(len(hit_pair), dtype=np.int64), (hit_pair, hit_pixel)),
                          shape=(len(pair_unit), int(offsets[-1])))
    return pair_image, pair_unit, masks


class IoUTally:
    """Mergeable IoU accumulators of one layer (:mod:`conceptlens.core.accumulate`'s interface:
    ``update(maps, thresholds, labels)``, ``merge``, ``result()`` = the IoU matrix).

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
        # for the netdissect-lite rule: category of each column (then k for "no label"), one-hot
        self._category = np.append(columns.category, k)
        self._labelcat = columns.onehot().toarray()

    def update(self, maps, thresholds, labels):
        """Tally a batch: ``maps`` ``[B, units, h, w]`` with its :class:`LabelBatch`."""
        pair_image, pair_unit, hit_pair, hit_pixel = unit_hits(maps, thresholds, labels.shapes, labels.offsets)
        self.label_area += labels.label_area
        self.n_images += len(labels.shapes)
        j, n_pairs = len(self.columns), len(pair_unit)
        area = np.bincount(hit_pair, minlength=n_pairs)
        # activated area per (unit, image), float64 (exact for these integers) for BLAS products
        by_image = np.zeros((self.n_units, len(labels.shapes)))
        by_image[pair_unit, pair_image] = area
        self.unit_area += by_image.sum(axis=1).astype(np.int64)
        # masks · pixel labels: each activated pixel's label columns, counted per (unit, column)
        cols = np.take(labels.planes, hit_pixel, axis=1)  # [K, N]; take: ~5x faster than fancy indexing here
        counts = np.bincount((pair_unit[hit_pair] * (j + 1) + cols).ravel(), minlength=self.n_units * (j + 1))
        self.intersection += counts.reshape(self.n_units, j + 1)[:, :j]
        self.intersection += (by_image @ labels.whole).astype(np.int64)  # image-level: whole-image masks
        if self.columns.rule == "paper":
            self.unit_area_cat += (by_image @ labels.annotated).astype(np.int64)
        else:  # per pair: does a label of the category lie under the activated pixels?
            k = self._labelcat.shape[1]
            under = np.bincount((hit_pair * (k + 1) + self._category[cols]).ravel(), minlength=n_pairs * (k + 1))
            under = under.reshape(n_pairs, k + 1)[:, :k] > 0
            under |= (labels.whole @ self._labelcat > 0)[pair_image]  # image-level labels lie under all
            np.add.at(self.unit_area_cat, pair_unit, area[:, None] * under)

    def merge(self, other):
        """A new tally holding the counts of this one and of another shard's (same units and columns)."""
        if other.intersection.shape != self.intersection.shape or other.columns.rule != self.columns.rule:
            raise ConceptLensError("IoU tallies merge only with the same units, label columns and rule")
        out = IoUTally(self.n_units, self.columns)
        for name in self._ARRAYS:
            setattr(out, name, getattr(self, name) + getattr(other, name))
        out.n_images = self.n_images + other.n_images
        return out

    def result(self):
        """The IoU ``[units, J]`` (float64); 0 where the union is empty, never NaN."""
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

"""Broden-style concept sets (the NetDissect layout): mask encoding and the writer.

A Broden directory holds

``index.csv``
    ``image,split,ih,iw,sh,sw,<category>...``; one row per image, ``image`` relative to
    ``images/``. A category cell holds ``;``-separated entries: a decimal integer is an image-level
    label, a file name (relative to ``images/``) is a segmentation PNG whose label is ``R + 256·G``.
    An empty cell means "not annotated in this category".
``label.csv``
    ``number,name,category,frequency,coverage,syns``; no row 0 (0 means "no label" in masks).
    ``category`` is ``cat(frequency)`` entries joined by ``;`` in order of decreasing frequency,
    ``frequency`` the number of (image, category) pairs the label occurs in, ``coverage`` the
    summed fraction of pixels it covers, in units of whole images (an image-level label counts
    1.0 per image) -- exactly as CSAILVision's ``joinseg.py`` computes them.
``category.csv``
    ``name,first,last,count,frequency``: lowest and highest label number, number of labels, and
    summed label frequency of each category.
``c_<category>.csv``
    ``code,number,name,frequency,coverage``: a dense per-category code (from 1) for each label
    occurring in the category, with that category's frequency and coverage.

Numbers are written as plain decimals (NetDissect-Lite's CSV reader does not parse exponent
notation).
"""

from __future__ import annotations

import csv
import io
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from ..errors import ConceptLensError

__all__ = ["BrodenRecord", "write_broden", "encode_mask", "decode_mask", "INDEX_COLUMNS"]

logger = logging.getLogger(__name__)

#: The fixed leading columns of ``index.csv``.
INDEX_COLUMNS = ("image", "split", "ih", "iw", "sh", "sw")

_MAX_LABEL = 65535  # R + 256·G with 8-bit channels
_CATEGORY_RE = re.compile(r"^[A-Za-z0-9_-]+$")


def encode_mask(labels):
    """Encode integer labels as a Broden RGB mask (``R = label % 256``, ``G = label // 256``).

    Parameters
    ----------
    labels : array_like of int, shape (H, W)
        Label numbers in ``[0, 65535]``; 0 means "no label".

    Returns
    -------
    numpy.ndarray of uint8, shape (H, W, 3)
        The mask image; the blue channel is 0.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise ConceptLensError(
            f"a Broden mask must be a 2-D integer array of label numbers; got shape {labels.shape}, dtype {labels.dtype}"
        )
    if labels.size and (labels.min() < 0 or labels.max() > _MAX_LABEL):
        raise ConceptLensError(
            f"Broden mask labels must lie in [0, {_MAX_LABEL}]; got values from {labels.min()} to {labels.max()}"
        )
    lab = labels.astype(np.int32)
    out = np.zeros(lab.shape + (3,), dtype=np.uint8)
    out[..., 0] = lab % 256
    out[..., 1] = lab // 256
    return out


def decode_mask(mask):
    """Decode a Broden mask PNG (or its pixel array) to label numbers ``R + 256·G``.

    Parameters
    ----------
    mask : str, Path or array_like
        A mask file, or an ``(H, W, 3|4)`` uint8 array as read from one. A 2-D array (a
        greyscale mask) is taken as the labels themselves.

    Returns
    -------
    numpy.ndarray of int32, shape (H, W)
        Label numbers; 0 means "no label".
    """
    if isinstance(mask, (str, Path)):
        path = Path(mask)
        try:
            with Image.open(path) as im:
                # Palette images would decode to palette indices, not colours.
                arr = np.asarray(im.convert("RGB") if im.mode == "P" else im)
        except (OSError, ValueError) as exc:
            raise ConceptLensError(f"cannot read Broden mask {path}: {exc}") from exc
    else:
        arr = np.asarray(mask)
    if arr.ndim == 2:
        return arr.astype(np.int32)
    if arr.ndim != 3 or arr.shape[2] < 2:
        raise ConceptLensError(f"a Broden mask must be an (H, W, 3) RGB image; got shape {arr.shape}")
    # int32 before adding: in uint8, G * 256 wraps around to 0.
    return arr[..., 0].astype(np.int32) + 256 * arr[..., 1].astype(np.int32)


@dataclass(frozen=True)
class BrodenRecord:
    """One image of a Broden set, as handed to :func:`write_broden`.

    Attributes
    ----------
    image : str
        File name relative to ``images/`` (``/``-separated), e.g. ``"00012.png"``.
    split : str
        Split name written to ``index.csv`` (Broden uses ``train`` and ``val``).
    ih, iw : int
        Image height and width.
    sh, sw : int
        Segmentation (mask) height and width; every mask of the record must be ``sh × sw``.
    annotations : dict of str to list
        Per category, a list of entries, dominant first: a 2-D integer array (a pixel mask of
        global label numbers, 0 = unlabelled) or an int (an image-level label number). Entries of
        both kinds may be mixed in one category, as the format allows.
    pixels : numpy.ndarray or None
        The ``(ih, iw, 3)`` uint8 image to save as ``images/<image>``; ``None`` if the caller has
        put the image file there already.
    """

    image: str
    split: str
    ih: int
    iw: int
    sh: int
    sw: int
    annotations: dict = field(default_factory=dict)
    pixels: np.ndarray | None = None


def _label_table(labels):
    """Normalise ``labels`` (names numbered from 1, or number → name) to a dict, validated."""
    if isinstance(labels, Mapping):
        table = {}
        for k, v in labels.items():
            if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
                raise ConceptLensError(f"Broden label numbers must be integers; got {k!r}")
            table[int(k)] = v
    else:
        table = {i + 1: name for i, name in enumerate(labels)}
    if not table:
        raise ConceptLensError("the `labels` parameter of write_broden must name at least one label; got none")
    seen = set()
    for number, name in table.items():
        if not 1 <= number <= _MAX_LABEL:
            raise ConceptLensError(
                f"Broden label numbers must lie in [1, {_MAX_LABEL}] (0 means 'no label'); got {number} for {name!r}"
            )
        if not isinstance(name, str) or not name or any(c in name for c in ";,\n\r\"()"):
            raise ConceptLensError(
                f"Broden label names must be non-empty strings without ; , ( ) quotes or newlines; got {name!r}"
            )
        if name in seen:
            raise ConceptLensError(f"Broden label name {name!r} is used by more than one label number")
        seen.add(name)
    return table


def _fmt_float(x):
    # '%f' never uses exponent notation; NetDissect-Lite reads r'^\d+\.\d*$' as a float.
    return "%.6f" % float(x)


def _mask_name(image, category, k, n):
    stem = PurePosixPath(image).with_suffix("")
    suffix = f"_{category}.png" if n == 1 else f"_{category}_{k + 1}.png"
    return str(stem) + suffix


def _save_png(arr, path):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    path.write_bytes(buf.getvalue())


def write_broden(directory, records, labels, *, syns=None, categories=None, overwrite=False):
    """Write a Broden-style concept set (NetDissect layout) from per-image records.

    Records are processed one at a time (masks are encoded and saved as they come), so
    ``records`` may be a generator over a large set.

    Parameters
    ----------
    directory : str or Path
        Output directory; ``images/`` is created inside it.
    records : iterable of BrodenRecord
        The images with their annotations. Pixel masks are saved as
        ``images/<image stem>_<category>.png`` (``_<category>_<k>.png`` when a category holds
        several masks), as CSAILVision's ``joinseg.py`` names them.
    labels : sequence of str or mapping of int to str
        The label table: names numbered from 1, or ``{number: name}``. Labels that occur in no
        record are left out of ``label.csv`` (as in Broden, every listed label occurs).
    syns : mapping of str to sequence of str, optional
        Synonyms per label name, written ``;``-separated in ``label.csv``.
    categories : sequence of str, optional
        Column order of the categories in ``index.csv``; by default categories are ordered by
        their lowest label number, as in Broden. Only categories that occur get a column.
    overwrite : bool, default False
        Replace an existing ``index.csv`` in ``directory``.

    Returns
    -------
    pathlib.Path
        ``directory``.

    Raises
    ------
    ConceptLensError
        On a mask of the wrong shape or dtype, an unknown label number or category name, a
        duplicate image name, no records, or an existing set without ``overwrite``.
    """
    directory = Path(directory)
    table = _label_table(labels)
    syns = dict(syns or {})
    if (directory / "index.csv").exists() and not overwrite:
        raise ConceptLensError(
            f"{directory} already holds a Broden set (index.csv); pass overwrite=True or choose another directory"
        )
    images_dir = directory / "images"
    images_dir.mkdir(parents=True, exist_ok=True)

    # (label, category) -> number of images / summed pixel fraction, as joinseg.py counts them.
    freq: dict[tuple[int, str], int] = {}
    cov: dict[tuple[int, str], float] = {}
    rows = []
    seen_images = set()
    used_categories = {}  # category -> order of first appearance (ties of first label number)
    valid = np.zeros(_MAX_LABEL + 1, dtype=bool)
    valid[list(table)] = True
    for record in records:
        if not isinstance(record, BrodenRecord):
            raise ConceptLensError(f"write_broden expects BrodenRecord objects; got {type(record).__name__}")
        where = f"Broden record {record.image!r}"
        image = str(PurePosixPath(record.image))
        if not image or image.startswith("/") or ".." in PurePosixPath(image).parts:
            raise ConceptLensError(f"{where}: `image` must be a relative path inside images/")
        if image in seen_images:
            raise ConceptLensError(f"{where}: image name used twice; masks would overwrite each other")
        seen_images.add(image)
        dims = (record.ih, record.iw, record.sh, record.sw)
        if any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1 for d in dims):
            raise ConceptLensError(f"{where}: ih, iw, sh, sw must be positive integers; got {dims}")
        if record.pixels is not None:
            px = np.asarray(record.pixels)
            if px.dtype != np.uint8 or px.shape[:2] != (record.ih, record.iw) or px.ndim not in (2, 3):
                raise ConceptLensError(
                    f"{where}: pixels must be a uint8 array of shape ({record.ih}, {record.iw}[, 3]); "
                    f"got {px.dtype} {px.shape}"
                )
            (images_dir / image).parent.mkdir(parents=True, exist_ok=True)
            _save_png(px, images_dir / image)
        row = {"image": image, "split": record.split, "ih": record.ih, "iw": record.iw, "sh": record.sh, "sw": record.sw}
        pixels = record.sh * record.sw
        for cat, entries in record.annotations.items():
            if not isinstance(cat, str) or not _CATEGORY_RE.match(cat) or cat in INDEX_COLUMNS:
                raise ConceptLensError(f"{where}: category names must match [A-Za-z0-9_-]+ and not be an index column; got {cat!r}")
            if categories is not None and cat not in categories:
                raise ConceptLensError(f"{where}: category {cat!r} is not in `categories` {list(categories)}")
            if isinstance(entries, (int, np.integer, np.ndarray)):
                entries = [entries]
            n_masks = sum(1 for e in entries if not isinstance(e, (int, np.integer)))
            cells = []
            img_cov: dict[int, float] = {}
            k = 0
            for entry in entries:
                if isinstance(entry, (int, np.integer)) and not isinstance(entry, bool):
                    number = int(entry)
                    if number == 0:
                        continue  # joinseg.py omits zero image-level labels
                    if number not in table:
                        raise ConceptLensError(f"{where}: image-level label {number} in {cat!r} is not in the label table")
                    cells.append("%d" % number)
                    img_cov[number] = 1.0
                    continue
                mask = np.asarray(entry)
                if mask.shape != (record.sh, record.sw) or not np.issubdtype(mask.dtype, np.integer):
                    raise ConceptLensError(
                        f"{where}: {cat!r} masks must be integer arrays of shape (sh, sw) = "
                        f"({record.sh}, {record.sw}); got {mask.dtype} {mask.shape}"
                    )
                if mask.size and (mask.min() < 0 or mask.max() > _MAX_LABEL):
                    raise ConceptLensError(f"{where}: {cat!r} mask values must lie in [0, {_MAX_LABEL}]")
                counts = np.bincount(mask.ravel().astype(np.int64), minlength=1)
                present = np.flatnonzero(counts)
                present = present[present > 0]
                bad = present[~valid[present]]
                if bad.size:
                    raise ConceptLensError(
                        f"{where}: {cat!r} mask holds label numbers {bad[:5].tolist()} that are not in the label table"
                    )
                name = _mask_name(image, cat, k, n_masks)
                k += 1
                _save_png(encode_mask(mask), images_dir / name)
                cells.append(name)
                for number in present.tolist():
                    if img_cov.get(number) != 1.0:
                        img_cov[number] = img_cov.get(number, 0.0) + counts[number] / pixels
            if not cells:
                continue
            row[cat] = ";".join(cells)
            used_categories.setdefault(cat, len(used_categories))
            for number, c in img_cov.items():
                freq[(number, cat)] = freq.get((number, cat), 0) + 1
                cov[(number, cat)] = cov.get((number, cat), 0.0) + c
        rows.append(row)
    if not rows:
        raise ConceptLensError("write_broden got no records; a Broden set needs at least one image")

    first = {}
    for number, cat in freq:
        first[cat] = min(first.get(cat, number), number)
    if categories is not None:
        cats = [c for c in categories if c in used_categories]
    else:
        cats = sorted(used_categories, key=lambda c: (first[c], used_categories[c]))
    unused = sorted(set(table) - {n for n, _ in freq})
    if unused:
        logger.info("Broden set %s: %d labels occur in no image and are left out of label.csv: %s",
                    directory, len(unused), ", ".join(table[n] for n in unused[:10]))

    _write_csv(directory / "index.csv", list(INDEX_COLUMNS) + cats, [{c: r.get(c, "") for c in list(INDEX_COLUMNS) + cats} for r in rows])

    label_rows = []
    for number in sorted({n for n, _ in freq}):
        per_cat = sorted(((c, freq[(number, c)]) for c in cats if (number, c) in freq), key=lambda x: (-x[1], cats.index(x[0])))
        name = table[number]
        label_rows.append({
            "number": "%d" % number,
            "name": name,
            "category": ";".join("%s(%d)" % s for s in per_cat),
            "frequency": "%d" % sum(f for _, f in per_cat),
            "coverage": _fmt_float(sum(cov[(number, c)] for c, _ in per_cat)),
            "syns": ";".join(s for s in syns.get(name, ()) if s != name),
        })
    _write_csv(directory / "label.csv", ["number", "name", "category", "frequency", "coverage", "syns"], label_rows)

    cat_rows = []
    for cat in cats:
        numbers = sorted(n for n, c in freq if c == cat)
        cat_rows.append({
            "name": cat,
            "first": "%d" % numbers[0],
            "last": "%d" % numbers[-1],
            "count": "%d" % len(numbers),
            "frequency": "%d" % sum(freq[(n, cat)] for n in numbers),
        })
        # Dense codes in label-number order (Broden orders them by frequency; readers must use
        # the code/number columns, not the row order).
        _write_csv(
            directory / f"c_{cat}.csv",
            ["code", "number", "name", "frequency", "coverage"],
            [
                {"code": "%d" % (code + 1), "number": "%d" % n, "name": table[n],
                 "frequency": "%d" % freq[(n, cat)], "coverage": _fmt_float(cov[(n, cat)])}
                for code, n in enumerate(numbers)
            ],
        )
    _write_csv(directory / "category.csv", ["name", "first", "last", "count", "frequency"], cat_rows)
    logger.info("wrote Broden set %s: %d images, categories %s, %d labels", directory, len(rows), cats, len(label_rows))
    return directory


def _write_csv(path, fields, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)

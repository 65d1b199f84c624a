"""Broden-style concept sets (the NetDissect layout): mask encoding, the writer and the reader.

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
import pandas as pd
from PIL import Image

from ..errors import ConceptLensError, did_you_mean
from .hashing import hash_files

__all__ = ["BrodenRecord", "write_broden", "encode_mask", "decode_mask", "INDEX_COLUMNS", "BrodenSet", "read_broden"]

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
            # Naming the format skips PIL's probing of other formats (a quarter of the time of a small mask).
            with Image.open(path, formats=("PNG",) if path.suffix.lower() == ".png" else None) as im:
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
    labels = arr[..., 1].astype(np.int32)
    labels *= 256
    labels += arr[..., 0]
    return labels


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


# ---------------------------------------------------------------------------------------- reader

_INT_RE = re.compile(r"^\d+$")


@dataclass(frozen=True)
class BrodenSet:
    """A Broden-style concept set read by :func:`read_broden` (masks are decoded on demand).

    Attributes
    ----------
    root : Path
        The set's directory; images and masks lie under ``root / "images"``.
    index : pandas.DataFrame
        One row per image: ``image``, ``split`` (str), ``ih``, ``iw``, ``sh``, ``sw`` (int).
    categories : tuple of str
        The categories used, in ``category.csv`` order.
    entries : dict of str to tuple
        Per category, per image a tuple of entries: ``int`` (an image-level label number) or
        ``str`` (a mask file relative to ``images/``). An empty tuple: not annotated.
    labels : pandas.DataFrame
        One row per label of the used categories, ordered by number: ``number``, ``name``,
        ``category`` (the main category: where its ``c_<cat>.csv`` coverage is highest),
        ``frequency``, ``coverage``, ``syns``.
    codes : dict of str to pandas.DataFrame
        Per category its ``c_<cat>.csv`` table: ``code``, ``number``, ``name``, ``frequency``,
        ``coverage``.
    """

    root: Path
    index: pd.DataFrame = field(repr=False)
    categories: tuple
    entries: dict = field(repr=False)
    labels: pd.DataFrame = field(repr=False)
    codes: dict = field(repr=False)

    def __len__(self):
        return len(self.index)

    @property
    def max_label(self):
        """The highest label number listed."""
        return int(self.labels["number"].max()) if len(self.labels) else 0

    def label_names(self):
        """Array of label names indexed by label number (``""`` where no label has the number)."""
        names = np.full(self.max_label + 1, "", dtype=object)
        names[self.labels["number"].to_numpy()] = self.labels["name"].to_numpy()
        return names

    def image_path(self, i):
        """Path of image ``i`` (an ``index.csv`` row, 0-based)."""
        return self.root / "images" / self.index["image"].iat[i]

    def annotations(self, i):
        """Decoded annotations of image ``i``: ``{category: [int label | int32 (sh, sw) mask]}``.

        Raises
        ------
        ConceptLensError
            If a mask file is missing, unreadable or not ``sh × sw``.
        """
        sh, sw = int(self.index["sh"].iat[i]), int(self.index["sw"].iat[i])
        out = {}
        for cat in self.categories:
            decoded = []
            for entry in self.entries[cat][i]:
                if isinstance(entry, int):
                    decoded.append(entry)
                    continue
                path = self.root / "images" / entry
                if not path.is_file():
                    raise ConceptLensError(
                        f"{self.root / 'index.csv'} line {i + 2}, column {cat!r}: mask {path} does not exist"
                    )
                mask = decode_mask(path)
                if mask.shape != (sh, sw):
                    raise ConceptLensError(
                        f"{self.root / 'index.csv'} line {i + 2}, column {cat!r}: mask {path} is "
                        f"{mask.shape[0]}x{mask.shape[1]}, but sh x sw of the row is {sh}x{sw}"
                    )
                decoded.append(mask)
            out[cat] = decoded
        return out

    def annotated(self):
        """Boolean array ``[n_images, n_categories]``: image annotated in the category."""
        return np.array([[len(self.entries[c][i]) > 0 for c in self.categories] for i in range(len(self))],
                        dtype=bool).reshape(len(self), len(self.categories))

    def manifest(self):
        """A :class:`~conceptlens.data.Manifest` of the images, for :func:`~conceptlens.core.extract`.

        Its ``path`` is ``index.csv`` and its ``image`` column is prefixed with ``images/``, so
        image paths resolve relative to the set's root; messages name an image by its file.
        """
        from ..data import Manifest

        frame = pd.DataFrame({"image": ["images/" + p for p in self.index["image"]], "split": self.index["split"]})
        return Manifest(path=(self.root / "index.csv").resolve(), frame=frame, kind="Broden image")

    def content_hash(self):
        """SHA-256 over the categories used, the set's CSV files and every mask file they reference.

        Every file by content (:func:`~conceptlens.core.hashing.hash_files`), so an edited mask
        changes the hash and the dissection tally keyed by it is recomputed.
        """
        names = ["index.csv", "label.csv", "category.csv"] + [f"c_{c}.csv" for c in self.categories]
        names += ["images/" + e for c in self.categories for cell in self.entries[c] for e in cell if isinstance(e, str)]
        return hash_files([self.root / n for n in names], names, seed=repr(self.categories).encode())


def _read_table(path, required):
    if not path.is_file():
        raise ConceptLensError(f"Broden file {path} does not exist; a Broden set needs index.csv, label.csv, "
                               "category.csv and c_<category>.csv for each category")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ConceptLensError(f"Broden file {path} is not a readable CSV: {str(exc).splitlines()[0]}") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ConceptLensError(
            f"Broden file {path} lacks the column(s) {', '.join(missing)}; its header is {', '.join(frame.columns)}"
        )
    return frame


def _parse_numbers(frame, path, column, kind, minimum=None):
    """Parse a column as int or float; a bad cell raises naming the file, line and column."""
    out = []
    for i, text in enumerate(frame[column].tolist()):
        text = text.strip()
        try:
            value = int(text) if kind is int else float(text if text else "0")
            if kind is int and not _INT_RE.match(text):
                raise ValueError
        except ValueError:
            what = "a non-negative integer" if kind is int else "a number"
            raise ConceptLensError(f"Broden file {path} line {i + 2}, column {column!r}: expected {what}; got {text!r}") from None
        if minimum is not None and value < minimum:
            raise ConceptLensError(f"Broden file {path} line {i + 2}, column {column!r}: expected a value >= {minimum}; got {text!r}")
        out.append(value)
    return np.array(out, dtype=np.int64 if kind is int else np.float64)


def _parse_cell(text, path, line, column):
    entries = []
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        if _INT_RE.match(part):
            number = int(part)
            if number > _MAX_LABEL:
                raise ConceptLensError(f"Broden file {path} line {line}, column {column!r}: label {number} exceeds {_MAX_LABEL}")
            if number:  # 0 is "no label"
                entries.append(number)
        elif part.startswith("/") or ".." in PurePosixPath(part).parts or part.lstrip("-").replace(".", "", 1).isdigit():
            raise ConceptLensError(
                f"Broden file {path} line {line}, column {column!r}: entry {part!r} is neither a label number "
                "nor a mask file relative to images/"
            )
        else:
            entries.append(part)
    return tuple(entries)


def read_broden(directory, categories=None):
    """Read a Broden-style concept set (the NetDissect layout); real Broden loads unchanged.

    Parameters
    ----------
    directory : str or Path
        The set's directory (``index.csv``, ``label.csv``, ``category.csv``, ``c_<cat>.csv``,
        ``images/``).
    categories : sequence of str, optional
        Use only these categories (default: all of ``category.csv``).

    Returns
    -------
    BrodenSet

    Raises
    ------
    ConceptLensError
        On a missing file or column, or a malformed cell (naming the file, line and column), an
        unknown category, or a category without its ``index.csv`` column or ``c_<cat>.csv`` codes.

    Notes
    -----
    ``index.csv`` cells hold ``;``-separated entries: a decimal integer is an image-level label
    (0 is ignored), anything else a mask PNG relative to ``images/``, decoded as ``R + 256·G``
    (in int32). ``label.csv`` need not have a row 0. A label's main category is the category whose
    ``c_<cat>.csv`` lists it with the highest coverage; ties go to the later category in
    ``category.csv`` order, as NetDissect-Lite's ``primary_categories_per_index`` breaks them.
    Masks are checked against the row's ``sh × sw`` when decoded.
    """
    root = Path(directory)
    if not root.is_dir():
        raise ConceptLensError(f"Broden directory {root} does not exist; pass the folder holding index.csv")
    cat_path = root / "category.csv"
    cat_frame = _read_table(cat_path, ["name"])
    all_cats = [c.strip() for c in cat_frame["name"]]
    if len(set(all_cats)) != len(all_cats) or not all(all_cats):
        raise ConceptLensError(f"Broden file {cat_path}: column 'name' must hold distinct, non-empty category names; got {all_cats}")
    if categories is None:
        cats = all_cats
    else:
        cats = [categories] if isinstance(categories, str) else list(categories)
        if not cats:
            raise ConceptLensError(f"the `categories` parameter of read_broden must name at least one of {all_cats}; got none")
        for c in cats:
            if c not in all_cats:
                raise ConceptLensError(f"category {c!r} is not in {cat_path}{did_you_mean(c, all_cats, 1)} (it lists {', '.join(all_cats)})")
        cats = [c for c in all_cats if c in cats]

    index_path = root / "index.csv"
    index = _read_table(index_path, list(INDEX_COLUMNS))
    if len(index) == 0:
        raise ConceptLensError(f"Broden file {index_path} has no rows; a Broden set needs at least one image")
    missing = [c for c in cats if c not in index.columns]
    if missing:
        raise ConceptLensError(
            f"Broden file {index_path} has no column for the category(ies) {', '.join(missing)} listed in {cat_path}; "
            "add the column or pass categories= to use only the others"
        )
    frame = pd.DataFrame({"image": index["image"].str.strip(), "split": index["split"].str.strip()})
    empty = np.flatnonzero(frame["image"].str.len().to_numpy() == 0)
    if empty.size:
        raise ConceptLensError(f"Broden file {index_path} line {empty[0] + 2}, column 'image': empty cell")
    for col in ("ih", "iw", "sh", "sw"):
        frame[col] = _parse_numbers(index, index_path, col, int, minimum=1)
    entries = {}
    for cat in cats:
        entries[cat] = tuple(_parse_cell(text, index_path, i + 2, cat) for i, text in enumerate(index[cat].tolist()))

    label_path = root / "label.csv"
    lab = _read_table(label_path, ["number", "name"])
    numbers = _parse_numbers(lab, label_path, "number", int)
    if numbers.size and numbers.max() > _MAX_LABEL:
        bad = int(np.argmax(numbers > _MAX_LABEL))
        raise ConceptLensError(f"Broden file {label_path} line {bad + 2}, column 'number': label {numbers[bad]} exceeds {_MAX_LABEL}")
    uniq, counts = np.unique(numbers, return_counts=True)
    if (counts > 1).any():
        raise ConceptLensError(f"Broden file {label_path}, column 'number': label {uniq[counts > 1][0]} is listed more than once")
    names = dict(zip(numbers.tolist(), (n.strip() for n in lab["name"])))
    extras = {}
    for col, kind in (("frequency", int), ("coverage", float)):
        if col in lab.columns:
            extras[col] = dict(zip(numbers.tolist(), _parse_numbers(lab, label_path, col, kind).tolist()))
    syns = dict(zip(numbers.tolist(), lab["syns"].str.strip())) if "syns" in lab.columns else {}

    codes = {}
    coverage = {}  # number -> [coverage per category, -1 where not listed]
    for ci, cat in enumerate(cats):
        path = root / f"c_{cat}.csv"
        table = _read_table(path, ["code", "number", "name", "frequency", "coverage"])
        if len(table) == 0:
            raise ConceptLensError(f"Broden file {path} lists no labels; every category present needs a non-empty c_{cat}.csv")
        codes_frame = pd.DataFrame({
            "code": _parse_numbers(table, path, "code", int, minimum=1),
            "number": _parse_numbers(table, path, "number", int, minimum=1),
            "name": table["name"].str.strip(),
            "frequency": _parse_numbers(table, path, "frequency", int),
            "coverage": _parse_numbers(table, path, "coverage", float),
        })
        unknown = ~codes_frame["number"].isin(list(names))
        if unknown.any():
            row = int(np.flatnonzero(unknown.to_numpy())[0])
            raise ConceptLensError(
                f"Broden file {path} line {row + 2}, column 'number': label {codes_frame['number'].iat[row]} is not in {label_path}"
            )
        if codes_frame["number"].duplicated().any():
            row = int(np.flatnonzero(codes_frame["number"].duplicated().to_numpy())[0])
            raise ConceptLensError(f"Broden file {path} line {row + 2}, column 'number': label listed twice")
        codes[cat] = codes_frame
        for number, cov in zip(codes_frame["number"].tolist(), codes_frame["coverage"].tolist()):
            coverage.setdefault(number, [-1.0] * len(cats))[ci] = cov

    rows = []
    for number in sorted(coverage):
        cov = coverage[number]
        best = max(range(len(cats)), key=lambda c: (cov[c], c))  # ties → later category (NetDissect-Lite)
        rows.append({
            "number": number,
            "name": names[number],
            "category": cats[best],
            "frequency": extras.get("frequency", {}).get(number, 0),
            "coverage": extras.get("coverage", {}).get(number, 0.0),
            "syns": syns.get(number, ""),
        })
    labels = pd.DataFrame(rows, columns=["number", "name", "category", "frequency", "coverage", "syns"])
    logger.info("read Broden set %s: %d images, categories %s, %d labels", root, len(frame), cats, len(labels))
    return BrodenSet(root=root, index=frame, categories=tuple(cats), entries=entries, labels=labels, codes=codes)

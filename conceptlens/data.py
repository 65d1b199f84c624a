"""Data manifests: CSV tables of images, their preprocessing, and loaders with a bad-image policy.

A manifest is a CSV whose ``image`` column holds paths relative to the CSV; ``label`` and
``split`` are optional and every further column is an attribute (``site``, ``has_tag``, ...).
Preprocessing comes, in increasing priority, from the model's defaults, a TOML sidecar next to the
CSV (``<stem>.toml`` with a ``[preprocessing]`` table), and explicit overrides.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .errors import ConceptLensError

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["Preprocessing", "partial_preprocessing", "Manifest", "ImageDataset", "BadImage", "Images", "make_loader",
           "read_images", "load_images"]

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """How an image file becomes a model input.

    Parameters
    ----------
    resize : int or None
        Resize so the shorter side has this many pixels (``None``: keep the size).
    crop : int or None
        Centre crop to ``crop x crop`` after resizing (``None``: no crop). Dissection never crops.
    mean, std : tuple of float
        Per-channel normalisation of the ``[0, 1]`` RGB tensor.
    """

    resize: int | None = None
    crop: int | None = None
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    source: str = field(default="given", compare=False)
    """Where each value came from, for logs and error messages (not part of equality)."""

    def __post_init__(self):
        for name in ("resize", "crop"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConceptLensError(
                    f"preprocessing {name} must be a positive integer or None; got {value!r}"
                )
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ConceptLensError(
                f"preprocessing mean and std need 3 values (RGB); got mean={self.mean}, std={self.std}"
            )
        if any(s <= 0 for s in self.std):
            raise ConceptLensError(f"preprocessing std values must be positive; got {self.std}")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    @classmethod
    def imagenet(cls):
        """The torchvision ImageNet evaluation preprocessing: resize 256, centre crop 224."""
        return cls(resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)

    @classmethod
    def from_dict(cls, d, source="preprocessing"):
        """From a sidecar table; ``resize``/``crop`` of ``0``, ``false`` or ``"none"`` mean none."""
        return cls(**partial_preprocessing(d, source), source=source)

    def to_dict(self):
        return {"resize": self.resize, "crop": self.crop, "mean": list(self.mean), "std": list(self.std)}

    def describe(self):
        """One line for logs: the values and where they came from."""
        mean = ", ".join(f"{m:g}" for m in self.mean)
        std = ", ".join(f"{s:g}" for s in self.std)
        return (f"resize {self.resize or 'none'}, crop {self.crop or 'none'}, mean ({mean}), std ({std}) "
                f"[{self.source}]")

    def transform(self):
        from torchvision.transforms import v2 as T  # torchvision loads torch._dynamo: only when images are read

        steps = [T.ToImage(), T.ToDtype(torch.float32, scale=True)]
        if self.resize is not None:
            steps.append(T.Resize(self.resize, antialias=True))
        if self.crop is not None:
            steps.append(T.CenterCrop(self.crop))
        steps.append(T.Normalize(self.mean, self.std))
        return T.Compose(steps)


@dataclass(frozen=True)
class Manifest:
    """A table of images: ``frame`` holds the CSV, ``root`` the folder image paths are relative to.

    Rows are numbered from 0 in the order of the CSV's data lines (``manifest_row`` in every result);
    messages name a row as ``manifest row R (line L of FILE)``, ``L = R + 2`` counting the header
    (for a CSV without blank lines or multi-line cells). ``kind`` says what the rows are:
    ``"manifest"`` for a CSV, else what the images of an in-memory list are (``"concept image"``,
    ``"random image"``, ...), and those are named by their file (:meth:`describe_row`).
    """

    path: Path
    frame: pd.DataFrame = field(repr=False)
    preprocessing: dict = field(default_factory=dict)
    kind: str = "manifest"

    @classmethod
    def read(cls, path):
        """Read and validate a manifest CSV and its optional TOML sidecar."""
        path = Path(path)
        if not path.is_file():
            raise ConceptLensError(f"manifest {path} does not exist; pass the path of a CSV file")
        try:
            frame = pd.read_csv(path, dtype={"image": str, "label": str, "split": str}, keep_default_na=False)
        except (pd.errors.ParserError, UnicodeDecodeError) as exc:
            raise ConceptLensError(f"manifest {path} is not a readable CSV: {exc}") from None
        if "image" not in frame.columns:
            raise ConceptLensError(
                f"manifest {path} has no 'image' column (columns: {', '.join(frame.columns)}); "
                "the first line must name the columns, with image paths relative to the CSV"
            )
        if len(frame) == 0:
            raise ConceptLensError(f"manifest {path} has no rows")
        empty = frame.index[frame["image"].str.len() == 0]
        if len(empty):
            raise ConceptLensError(f"manifest row {empty[0]} (line {empty[0] + 2} of {path}) has an empty 'image' cell; "
                                   "give each row an image path relative to the CSV")
        sidecar = path.with_suffix(".toml")
        prep = {}
        if sidecar.is_file():
            try:
                prep = tomllib.loads(sidecar.read_text()).get("preprocessing", {})
            except tomllib.TOMLDecodeError as exc:
                raise ConceptLensError(f"manifest sidecar {sidecar} is not valid TOML: {exc}") from None
            partial_preprocessing(prep, source=str(sidecar))  # validate early
        return cls(path=path.resolve(), frame=frame.reset_index(drop=True), preprocessing=prep)

    @classmethod
    def from_images(cls, paths, root=None, kind="image"):
        """An in-memory manifest of image files (no labels), e.g. a concept folder's images.

        ``root`` (default: the paths' common folder) is what the stored ``image`` paths are relative
        to; ``path`` is a virtual ``<root>/images.csv`` that is not written. ``kind`` names the images
        in messages (e.g. ``"concept image"``: *concept image /data/red/3.png: file not found*).
        """
        paths = [Path(p).resolve() for p in paths]
        if not paths:
            raise ConceptLensError("Manifest.from_images needs at least one image path")
        root = Path(root).resolve() if root is not None else Path(os.path.commonpath([p.parent for p in paths]))
        frame = pd.DataFrame({"image": [os.path.relpath(p, root) for p in paths]})
        return cls(path=root / "images.csv", frame=frame, kind=kind)

    @property
    def root(self):
        return self.path.parent

    def __len__(self):
        return len(self.frame)

    def image_paths(self):
        return [self.root / p for p in self.frame["image"]]

    def describe_row(self, row):
        """How messages name row ``row``: ``image IMG at manifest row R (line L of FILE)`` for a CSV,
        ``<kind> PATH`` for an in-memory list of images."""
        image = self.frame["image"].iloc[row]
        if self.kind == "manifest":
            return f"image {image} at manifest row {row} (line {row + 2} of {self.path})"
        return f"{self.kind} {self.root / image}"

    @property
    def attributes(self):
        """Columns other than ``image``, ``label`` and ``split``."""
        return [c for c in self.frame.columns if c not in ("image", "label", "split")]

    def split_mask(self, split, hint=""):
        """Boolean mask of the rows whose ``split`` column is ``split`` (``None``: every row).

        Raises one line naming the manifest (and its splits) when it has no such rows; ``hint``
        (what to do) is appended."""
        frame = self.frame
        if split is None:
            return np.ones(len(frame), bool)
        tail = f"; {hint}" if hint else ""
        if "split" not in frame.columns:
            raise ConceptLensError(f"manifest {self.path} has no 'split' column to select split {split!r}{tail}")
        mask = np.array(frame["split"] == split, dtype=bool)  # a writable copy: callers narrow it in place
        if not mask.any():
            raise ConceptLensError(f"manifest {self.path} has no rows with split {split!r}; splits: "
                                   f"{', '.join(sorted(map(str, frame['split'].unique())))}{tail}")
        return mask

    def subset(self, mask):
        """A manifest of the rows where ``mask`` holds, keeping the same root and sidecar."""
        return dataclasses.replace(self, frame=self.frame[np.asarray(mask)].reset_index(drop=True))


    def content_hash(self):
        """Hash of the rows and of each image file's path and contents
        (:func:`~conceptlens.core.hashing.hash_files`).

        An edited image changes the hash, which makes caches rebuild rather than silently reuse
        stale results; a touched or copied-in-place one does not.
        """
        from .core.hashing import hash_files

        rows = pd.util.hash_pandas_object(self.frame, index=True).values.tobytes() + str(list(self.frame.columns)).encode()
        return hash_files(self.image_paths(), seed=rows)


def partial_preprocessing(d, source="preprocessing"):
    """Validate a (possibly partial) preprocessing table: known keys, "none" spelled as ``None``.

    TOML has no null, so ``resize``/``crop`` accept ``0``, ``false`` or ``"none"`` for "no resize" /
    "no crop"; JSON may also use ``null``.
    """
    names = ("resize", "crop", "mean", "std")
    unknown = set(d) - set(names)
    if unknown:
        raise ConceptLensError(f"{source}: unknown preprocessing keys {sorted(unknown)}; expected resize, crop, mean, std")
    out = {}
    for key, value in d.items():
        if key in ("resize", "crop"):
            if value is None or value is False or (type(value) is int and value == 0) or str(value).lower() == "none":
                value = None
            elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConceptLensError(
                    f"{source}: preprocessing {key} must be a positive integer, or 0 / false / \"none\" for no {key}; "
                    f"got {value!r}"
                )
        else:
            try:
                value = tuple(float(v) for v in value)
            except (TypeError, ValueError):
                raise ConceptLensError(f"{source}: preprocessing {key} must be 3 numbers (R, G, B); got {value!r}") from None
        out[key] = value
    return out


@dataclass(frozen=True)
class BadImage:
    """An image that could not be read: its ``manifest_row`` (0-based data row), path and the reason."""

    manifest_row: int
    image: str
    error: str

    def to_dict(self):
        """``{"manifest_row", "image", "error"}``: how results (``meta.json``, ``index.json``) list it."""
        return dataclasses.asdict(self)


class ImageDataset(Dataset):
    """Manifest rows as ``(row, tensor, error)``; a bad image gives ``tensor=None`` and the reason.

    Errors travel as values so the main process decides (raise or skip) even with worker processes.
    """

    def __init__(self, manifest, preprocessing):
        self.paths = [str(p) for p in manifest.image_paths()]
        self.transform = preprocessing.transform()

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            with Image.open(self.paths[i]) as im:
                x = self.transform(im.convert("RGB"))
        except FileNotFoundError:
            return i, None, "file not found"
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad image, reported by name
            return i, None, f"cannot decode image ({type(exc).__name__}: {exc})"
        return i, x, None


def _collate(items):
    good = [(i, x) for i, x, err in items if err is None]
    bad = [(i, err) for i, x, err in items if err is not None]
    if good:
        shapes = {tuple(x.shape) for _, x in good}
        if len(shapes) > 1:
            raise ConceptLensError(
                f"images in one batch have different sizes after preprocessing ({sorted(shapes)}); "
                "set a resize and crop (e.g. --size and a TOML sidecar with crop) so they match"
            )
        rows = torch.tensor([i for i, _ in good])
        batch = torch.stack([x for _, x in good])
    else:
        rows, batch = torch.empty(0, dtype=torch.long), None
    return rows, batch, bad


class _Batches:
    """Iterates ``(rows, images)`` batches, applying the bad-image policy and recording skips."""

    def __init__(self, loader, manifest, skip_bad):
        self.loader, self.manifest, self.skip_bad = loader, manifest, skip_bad
        self.skipped: list[BadImage] = []

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for rows, batch, bad in self.loader:
            for i, err in bad:
                where = self.manifest.describe_row(i)
                if not self.skip_bad:
                    raise ConceptLensError(
                        f"{where}: {err}; fix or remove it, "
                        "or pass --skip-bad to skip bad images (they are counted and listed)"
                    )
                self.skipped.append(BadImage(i, self.manifest.frame["image"].iloc[i], err))
                logger.warning("skipping %s: %s", where, err)
            if batch is not None:
                yield rows, batch


def make_loader(manifest, preprocessing, batch_size=64, num_workers=0, skip_bad=False, rows=None):
    """Batches ``(rows, images)`` over manifest rows, in the order given.

    ``rows`` (default: all) are manifest rows to read, e.g. ``range(start, len(manifest))`` to resume;
    the batches' ``rows`` are these manifest rows, never positions within a selection. The returned
    object has a ``skipped`` list of :class:`BadImage` filled during iteration.
    """
    if batch_size < 1:
        raise ConceptLensError(f"batch_size must be a positive integer; got {batch_size}")
    dataset = ImageDataset(manifest, preprocessing)
    indices = range(len(dataset)) if rows is None else [int(r) for r in rows]
    loader = DataLoader(
        torch.utils.data.Subset(dataset, indices),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate,
        persistent_workers=False,
    )
    return _Batches(loader, manifest, skip_bad)


class Images(NamedTuple):
    """Images read into memory by :func:`read_images`."""

    rows: np.ndarray
    """Manifest row of each image (``int64 [N]``)."""
    x: torch.Tensor
    """The preprocessed images ``[N, 3, H, W]``."""
    skipped: list
    """:class:`BadImage` of every row skipped as unreadable (``skip_bad=True``)."""


def read_images(manifest, preprocessing, rows=None, batch_size=256, num_workers=0, skip_bad=False):
    """The images of (some) rows of a small manifest in one tensor, with the bad-image policy.

    Parameters
    ----------
    manifest : Manifest
    preprocessing : Preprocessing
    rows : sequence of int, optional
        Manifest rows to read (default: all), in this order.
    batch_size, num_workers : int
        Of the loader.
    skip_bad : bool
        Skip unreadable images (listed in ``skipped``) instead of raising.

    Returns
    -------
    Images
        ``rows``, ``x`` and ``skipped``.

    Raises
    ------
    ConceptLensError
        For an unreadable image (without ``skip_bad``), or when no image could be read.
    """
    batches = make_loader(manifest, preprocessing, batch_size=batch_size, num_workers=num_workers, skip_bad=skip_bad,
                          rows=rows)
    parts = list(batches)
    if not parts and not batches.skipped:
        raise ConceptLensError(f"no rows of {manifest.path} to read; select at least one")
    if not parts:
        first = batches.skipped[0]
        raise ConceptLensError(f"none of the {len(batches.skipped)} images asked for in {manifest.path} could be read "
                               f"(first: {first.image}: {first.error}); check the image paths (relative to the CSV)")
    return Images(torch.cat([r for r, _ in parts]).numpy(), torch.cat([x for _, x in parts]), batches.skipped)


def load_images(manifest, preprocessing, batch_size=256, num_workers=0):
    """All images of a (small) manifest as one tensor ``[N, 3, H, W]`` in manifest order."""
    return read_images(manifest, preprocessing, batch_size=batch_size, num_workers=num_workers).x

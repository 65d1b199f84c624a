"""Activation atlas (Carter et al. 2019; Lucid's ``activation_atlas``): the space of a layer's
activations, laid out in 2-D and drawn cell by cell with feature visualisation.

:func:`activation_atlas`

1. captures the layer's spatial map ``[C, H, W]`` of every image through the core's one
   extraction path (:func:`~conceptlens.core.extract.iter_activations`, ``pool="none"``) and keeps
   ``samples_per_image`` channel vectors per image at positions drawn by a seeded RNG (Carter et
   al. keep one random position per image); position draws come from ``(seed, manifest row)``,
   so they do not depend on the batching or on the class filter;
2. lays the vectors out in 2-D with UMAP (umap-learn, cosine metric, ``random_state=seed``;
   Lucid's notebook uses ``n_neighbors=20, min_dist=0.01``);
3. normalises each axis to ``[0, 1]`` by its 1st and 99th percentiles (values beyond are clipped
   to the border, so a few outliers do not squeeze the rest into a corner) and cuts it into
   ``grid x grid`` cells; cells holding at least ``min_count`` samples are kept;
4. visualises each kept cell's mean activation vector, ``direction(layer, mean)``, all cells in
   one batched :func:`~conceptlens.featurevis.render.visualize` call;
5. stitches the icons into one image: grid row 0 is the top, holding the largest UMAP ``y``
   (as in a scatter plot); grid column 0 the smallest ``x``; empty and dropped cells are grey;
   icons of at least ``COUNT_FROM`` (24) pixels show their sample count in the top-left corner.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from ..core.extract import iter_activations
from ..core.result import Result, provenance
from ..data import Manifest, make_loader
from ..errors import ConceptLensError
from ..models import load_model, validate_layers
from .objectives import direction
from .render import visualize

__all__ = ["activation_atlas", "ActivationAtlas"]

logger = logging.getLogger(__name__)

EMPTY_GREY = 224
"""The grey level of atlas cells without an icon (no samples, or fewer than ``min_count``)."""
PERCENTILES = (1.0, 99.0)
"""Each UMAP axis is normalised to ``[0, 1]`` between these percentiles (values beyond are clipped)."""
MIN_SAMPLES = 4
"""The fewest activation samples UMAP is run on."""


@dataclass(frozen=True)
class ActivationAtlas(Result):
    """An activation atlas of one layer: a grid of icons over the 2-D layout of its activations.

    Attributes
    ----------
    atlas : ndarray of uint8, [grid * size, grid * size, 3]
        The stitched icons (grey where a cell is empty or dropped), each with its sample count
        when icons are at least ``COUNT_FROM`` pixels high.
    icons : ndarray of uint8, [n_cells, size, size, 3]
        The icon of each kept cell, in the order of ``cells`` (without the count drawn on it).
    vectors : ndarray of float32, [n_cells, C]
        Each kept cell's mean activation vector (the direction its icon maximises).
    cells : DataFrame
        One row per kept cell: ``cell`` (its index), ``grid_row``, ``grid_col``, ``count``
        (samples in the cell, at least ``min_count``), ``x``, ``y`` (the cell's centre in UMAP
        coordinates), ``objective``, ``value`` (the achieved objective of its icon), and with
        labels ``top_label`` and ``top_label_fraction`` (the most frequent label of its samples).
    samples : DataFrame
        One row per activation sample: ``manifest_row``, ``image``, ``label`` (when the manifest
        has labels), ``map_y``, ``map_x`` (the position in the layer's map), ``umap_x``, ``umap_y``,
        ``grid_row``, ``grid_col`` and ``cell`` (the index into ``cells``; -1 when its grid cell
        holds fewer than ``min_count`` samples and was dropped).
    layer : str
    provenance : dict
    """

    atlas: np.ndarray = field(repr=False)
    icons: np.ndarray = field(repr=False)
    vectors: np.ndarray = field(repr=False)
    cells: pd.DataFrame = field(repr=False)
    samples: pd.DataFrame = field(repr=False)
    layer: str
    provenance: dict = field(repr=False)

    KIND, META = "activation-atlas", "atlas.json"

    @property
    def grid(self):
        """The number of cells along each side."""
        return int(self.provenance["parameters"]["grid"])

    def to_frame(self):
        return self.cells

    def _write(self, directory):
        from PIL import Image

        Image.fromarray(self.atlas, "RGB").save(directory / "atlas.png")
        self.cells.to_csv(directory / "cells.csv", index=False)
        self.samples.to_csv(directory / "samples.csv", index=False)
        np.save(directory / "icons.npy", self.icons)
        np.save(directory / "cell_vectors.npy", self.vectors)
        return {"layer": self.layer, "atlas": "atlas.png", "cells": "cells.csv", "samples": "samples.csv",
                "icons": "icons.npy", "vectors": "cell_vectors.npy"}

    @classmethod
    def _read(cls, directory, meta):
        from PIL import Image

        cells = pd.read_csv(directory / meta["cells"], keep_default_na=False, dtype={"top_label": str})
        samples = pd.read_csv(directory / meta["samples"], keep_default_na=False, dtype={"image": str, "label": str})
        return cls(atlas=np.asarray(Image.open(directory / meta["atlas"]).convert("RGB")),
                   icons=np.load(directory / meta["icons"]), vectors=np.load(directory / meta["vectors"]),
                   cells=cells, samples=samples, layer=meta["layer"], provenance=meta["provenance"])


def _check_parameters(grid, min_count, samples_per_image, n_neighbors, min_dist, seed):
    """Each parameter's constraint, declared once (visualisation parameters are checked by ``visualize``)."""
    def positive_int(name, value):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ConceptLensError(f"{name} must be a positive integer; got {value!r}")

    positive_int("grid", grid)
    positive_int("min_count", min_count)
    positive_int("samples_per_image", samples_per_image)
    if isinstance(n_neighbors, bool) or not isinstance(n_neighbors, (int, np.integer)) or n_neighbors < 2:
        raise ConceptLensError(f"n_neighbors must be an integer of at least 2; got {n_neighbors!r}")
    if isinstance(min_dist, bool) or not isinstance(min_dist, (int, float)) or not min_dist >= 0:
        raise ConceptLensError(f"min_dist must be a non-negative number; got {min_dist!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ConceptLensError(f"seed must be an integer; got {seed!r}")


def _selected_rows(manifest, classes):
    """Manifest rows to use: all, or those whose label is one of ``classes``."""
    if classes is None:
        return np.arange(len(manifest))
    classes = [classes] if isinstance(classes, str) else [str(c) for c in classes]
    if not classes:
        raise ConceptLensError("classes must name at least one label (or be None for every image)")
    if "label" not in manifest.frame.columns:
        raise ConceptLensError(f"classes needs a 'label' column; manifest {manifest.path} has none")
    labels = manifest.frame["label"].astype(str)
    known = sorted(set(labels))
    unknown = [c for c in classes if c not in known]
    if unknown:
        raise ConceptLensError(f"unknown class {unknown[0]!r} in classes; the manifest's labels are: {', '.join(known)}")
    return np.flatnonzero(labels.isin(classes).to_numpy())


def _sample(batches, model, layer, samples_per_image, seed):
    """``(vectors [N, C], rows [N], ys [N], xs [N])``: ``samples_per_image`` channel vectors per
    image at positions drawn from ``(seed, manifest row)``."""
    vectors, rows, ys, xs = [], [], [], []
    for batch_rows, pooled, _ in iter_activations(model, batches, [layer], pool="none"):
        maps = pooled[layer]
        if maps.dim() != 4:
            raise ConceptLensError(f"layer {layer!r} gives {list(maps.shape[1:])} per image, not a spatial map "
                                   "[C, H, W]; the atlas samples positions of a map: pick a convolutional layer "
                                   "(see `conceptlens layers MODEL`)")
        _, _, h, w = maps.shape
        if samples_per_image > h * w:
            raise ConceptLensError(f"samples_per_image={samples_per_image} exceeds the {h}x{w} = {h * w} positions "
                                   f"of layer {layer!r}'s map; pass at most {h * w}")
        batch_rows = np.asarray(batch_rows)
        # One seeded draw per image (positions depend on the row only), then one gather for the batch.
        picks = np.stack([np.random.default_rng([seed, int(r)]).choice(h * w, size=samples_per_image, replace=False)
                          for r in batch_rows])
        flat = maps.float().cpu().flatten(2)  # [B, C, H*W]
        taken = flat.gather(2, torch.from_numpy(picks)[:, None, :].expand(-1, flat.shape[1], -1))  # [B, C, K]
        vectors.append(taken.permute(0, 2, 1).reshape(-1, flat.shape[1]).numpy())
        rows.append(np.repeat(batch_rows, samples_per_image))
        ys.append((picks // w).ravel())
        xs.append((picks % w).ravel())
    if not vectors:
        raise ConceptLensError("no readable image in the data; nothing to lay out")
    return (np.concatenate(vectors).astype(np.float32), np.concatenate(rows).astype(np.int64), np.concatenate(ys),
            np.concatenate(xs))


def _recording(batches, seen):
    """``batches`` as they are, noting the spatial size of the model's inputs in ``seen["size"]``."""
    for rows, x in batches:
        seen.setdefault("size", tuple(int(s) for s in x.shape[2:]))
        yield rows, x


def _umap(vectors, n_neighbors, min_dist, seed):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Tensorflow not installed", category=ImportWarning)
        import umap

    n_neighbors = min(int(n_neighbors), len(vectors) - 1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*n_jobs value.*overridden.*")
        reducer = umap.UMAP(n_components=2, metric="cosine", n_neighbors=n_neighbors, min_dist=float(min_dist),
                            random_state=int(seed), n_jobs=1)
        coords = np.asarray(reducer.fit_transform(vectors), dtype=np.float64)
    return coords, f"umap(metric=cosine, n_neighbors={n_neighbors}, min_dist={float(min_dist):g}, random_state={seed})"


def _normalise(values):
    """``values`` in ``[0, 1]`` between their 1st and 99th percentiles (clipped), and those bounds."""
    lo, hi = np.percentile(values, PERCENTILES)
    if not hi > lo:  # every sample at one coordinate: the middle of the axis
        return np.full(len(values), 0.5), float(lo), float(hi)
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0), float(lo), float(hi)


def _cells(coords, grid):
    """Grid row and column of each sample, and per axis the bounds of the normalisation."""
    ux, lo_x, hi_x = _normalise(coords[:, 0])
    uy, lo_y, hi_y = _normalise(coords[:, 1])
    col = np.minimum((ux * grid).astype(np.int64), grid - 1)
    row = grid - 1 - np.minimum((uy * grid).astype(np.int64), grid - 1)  # row 0 at the top: the largest y
    return row, col, (lo_x, hi_x), (lo_y, hi_y)


def _centre(index, bounds, grid):
    lo, hi = bounds
    return lo + (index + 0.5) / grid * (hi - lo)


COUNT_FROM = 24
"""Icons at least this many pixels high show their cell's sample count (smaller ones would be mostly text)."""


def _draw_count(icon, count):
    """``icon`` with ``count`` written small (PIL's default font, 1/8 of the icon's height, at
    least 8 px) in white on a black box in its top-left corner."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.fromarray(icon, "RGB")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(8, icon.shape[0] // 8))
    text = str(int(count))
    left, top, right, bottom = draw.textbbox((1, 0), text, font=font)
    draw.rectangle((0, 0, right + 1, bottom + 1), fill=(0, 0, 0))
    draw.text((1, 0), text, fill=(255, 255, 255), font=font)
    return np.asarray(image)


def _stitch(icons, rows, cols, counts, grid, size):
    h, w = size
    atlas = np.full((grid * h, grid * w, 3), EMPTY_GREY, dtype=np.uint8)
    label = h >= COUNT_FROM
    if not label:
        logger.info("atlas: icons of %d px are below %d px: no counts drawn on them (see cells.csv)", h, COUNT_FROM)
    for icon, r, c, n in zip(icons, rows, cols, counts):
        atlas[r * h:(r + 1) * h, c * w:(c + 1) * w] = _draw_count(icon, n) if label else icon
    return atlas


def activation_atlas(model, data, layer, grid=8, min_count=3, samples_per_image=1, classes=None, seed=0,
                     n_neighbors=20, min_dist=0.01, size=None, steps=256, lr=0.05, param="fourier",
                     transforms="default", batch_size=32, extract_batch_size=64, num_workers=0, skip_bad=False,
                     preprocessing=None, progress=True):
    """An activation atlas of ``layer`` over the images of ``data`` (see the module notes).

    Parameters
    ----------
    model : LoadedModel or str
        A loaded model or a model spec.
    data : Manifest or path
        The images (manifest CSV); labels, when present, name each cell's most frequent class.
    layer : str
        A module with a spatial output ``[C, H, W]`` per image (``conceptlens layers MODEL``).
    grid : int
        Cells along each side of the atlas.
    min_count : int
        A cell is drawn when it holds at least this many samples; sparser cells stay grey and
        their samples get ``cell = -1``.
    samples_per_image : int
        Spatial positions drawn per image (without replacement; Carter et al. draw 1).
    classes : sequence of str, optional
        Only images whose label is one of these (the class-filtered atlas); default every image.
    seed : int
        Seeds the position draws, UMAP's ``random_state`` and the visualisation.
    n_neighbors, min_dist : int, float
        UMAP's parameters (Lucid's atlas notebook: 20 and 0.01); ``n_neighbors`` is clipped to
        the number of samples minus one.
    size : int or (int, int), optional
        Icon height and width in pixels; default the size at which the model sees the images.
    steps, lr, param, transforms, batch_size :
        As in :func:`~conceptlens.featurevis.render.visualize` (one image per kept cell, all in one
        call; ``batch_size`` is the number optimised together); ``steps`` defaults to 256 here,
        half lucent's 512, as an atlas draws up to ``grid ** 2`` icons.
    extract_batch_size, num_workers, skip_bad :
        As ``batch_size``, ``num_workers`` and ``skip_bad`` of
        :func:`~conceptlens.core.extract.extract`, for the capture pass.
    preprocessing : Preprocessing, optional
        Defaults to the model's, updated by the manifest's TOML sidecar; the visualisation
        normalises its images with the same mean and std.
    progress : bool
        Show tqdm bars.

    Returns
    -------
    ActivationAtlas

    Raises
    ------
    ConceptLensError
        For an unknown layer, a layer without a spatial map, invalid parameters, unknown class
        names, or fewer than ``MIN_SAMPLES`` samples.
    """
    _check_parameters(grid, min_count, samples_per_image, n_neighbors, min_dist, seed)
    model = load_model(model) if isinstance(model, str) else model
    if not hasattr(model, "preprocessing_for"):
        raise ConceptLensError(f"activation_atlas needs a LoadedModel or a model spec (conceptlens.models.load_model); "
                               f"got {type(model).__name__}")
    if not isinstance(layer, str):
        raise ConceptLensError(f"layer must be one layer name; got {layer!r}")
    validate_layers(model.module, [layer])
    manifest = data if isinstance(data, Manifest) else Manifest.read(data)
    rows = _selected_rows(manifest, classes)
    prep = model.preprocessing_for(manifest, preprocessing)
    started = time.perf_counter()
    timings = {}

    from tqdm.auto import tqdm

    batches = make_loader(manifest, prep, batch_size=extract_batch_size, num_workers=num_workers, skip_bad=skip_bad,
                          rows=rows)
    seen = {}
    bar = tqdm(_recording(batches, seen), total=len(batches), desc="atlas: capture", unit="batch", disable=not progress)
    vectors, sample_rows, ys, xs = _sample(bar, model, layer, samples_per_image, seed)
    timings["capture"] = time.perf_counter() - started
    if len(vectors) < MIN_SAMPLES:
        raise ConceptLensError(f"the atlas needs at least {MIN_SAMPLES} activation samples for UMAP; got {len(vectors)} "
                               f"({len(np.unique(sample_rows))} images x {samples_per_image} per image): use more "
                               "images or a larger samples_per_image")
    if size is None:
        size = seen["size"]
        logger.info("size auto -> %dx%d (the size at which the model sees the images)", *size)
    size = (size, size) if isinstance(size, (int, np.integer)) and not isinstance(size, bool) else tuple(size)

    t = time.perf_counter()
    coords, embedding = _umap(vectors, n_neighbors, min_dist, seed)
    timings["umap"] = time.perf_counter() - t
    grid_row, grid_col, bounds_x, bounds_y = _cells(coords, grid)
    flat = grid_row * grid + grid_col
    counts = np.bincount(flat, minlength=grid * grid)
    kept = np.flatnonzero(counts >= min_count)  # row-major order: cell i is at (kept[i] // grid, kept[i] % grid)
    if not len(kept):
        raise ConceptLensError(f"no cell of the {grid}x{grid} grid holds min_count={min_count} of the {len(vectors)} "
                               "samples; lower min_count or grid, or use more images")
    cell_of = np.full(grid * grid, -1)
    cell_of[kept] = np.arange(len(kept))
    sample_cell = cell_of[flat]
    sums = np.zeros((grid * grid, vectors.shape[1]))
    np.add.at(sums, flat, vectors)  # per-cell sums in one pass over the samples
    means = (sums[kept] / counts[kept, None]).astype(np.float32)
    logger.info("atlas: %d of %d cells hold >= %d samples (%d of %d samples dropped)", len(kept), grid * grid,
                min_count, int((sample_cell < 0).sum()), len(vectors))

    t = time.perf_counter()
    # The visualisation normalises with the preprocessing the activations were captured with.
    vis_model = dataclasses.replace(model, preprocessing=prep)
    objectives = [direction(layer, v) for v in means]
    vis = visualize(vis_model, objectives, size=size, steps=steps, lr=lr, param=param, transforms=transforms,
                    seed=seed, batch_size=batch_size, progress=progress)
    timings["visualize"] = time.perf_counter() - t

    frame = manifest.frame
    samples = pd.DataFrame({"manifest_row": sample_rows, "image": frame["image"].to_numpy()[sample_rows]})
    has_labels = "label" in frame.columns
    if has_labels:
        samples["label"] = frame["label"].astype(str).to_numpy()[sample_rows]
    samples = samples.assign(map_y=ys, map_x=xs, umap_x=coords[:, 0], umap_y=coords[:, 1], grid_row=grid_row,
                             grid_col=grid_col, cell=sample_cell)
    cells = pd.DataFrame({"cell": np.arange(len(kept)), "grid_row": kept // grid, "grid_col": kept % grid,
                          "count": counts[kept], "x": _centre(kept % grid, bounds_x, grid),
                          "y": _centre(grid - 1 - kept // grid, bounds_y, grid),
                          "objective": [o.description for o in objectives], "value": vis.objective_values})
    if has_labels:
        tops = [samples.loc[samples["cell"] == i, "label"].value_counts() for i in range(len(kept))]
        cells["top_label"] = [str(tc.index[0]) for tc in tops]
        cells["top_label_fraction"] = [float(tc.iloc[0] / tc.sum()) for tc in tops]
    atlas = _stitch(vis.images, cells["grid_row"], cells["grid_col"], cells["count"], grid, size)

    params = {"layer": layer, "grid": grid, "min_count": min_count, "samples_per_image": samples_per_image,
              "classes": None if classes is None else ([classes] if isinstance(classes, str) else [str(c) for c in classes]),
              "seed": seed, "n_neighbors": n_neighbors, "min_dist": min_dist, "size": list(size),
              "percentiles": list(PERCENTILES), "steps": steps, "lr": lr, "param": param,
              "batch_size": batch_size}
    timings["total"] = time.perf_counter() - started
    prov = provenance(model, manifest, parameters=params, preprocessing=prep.to_dict(), timings=timings,
                      embedding=embedding, visualization=vis.provenance["parameters"],
                      n_samples=len(vectors), n_dropped=int((sample_cell < 0).sum()),
                      skipped=[b.to_dict() for b in batches.skipped])
    return ActivationAtlas(atlas=atlas, icons=vis.images, vectors=means, cells=cells, samples=samples, layer=layer,
                           provenance=prov)

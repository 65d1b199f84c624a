"""Sampling and writing of a concept world: classification manifest, Broden set, concept folders.

The ``shapes`` preset lives here, with the machinery every preset shares (validation, splits,
label noise and near-duplicates, the writer, reuse of an existing world); the ``histo`` preset
builds on it in :mod:`conceptlens.world.histo_world`.

Every image depends only on ``(seed, role, index)``: its random generator comes from
``SeedSequence(seed, spawn_key=(role, index, ...))``, so the same configuration gives the same
bytes, and changing one count does not reshuffle the other roles' images.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import numbers
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .. import __version__
from ..core.broden import BrodenRecord, write_broden
from ..core.hashing import hash_tree
from ..errors import ConceptLensError, did_you_mean
from . import histo as H
from . import shapes as S

__all__ = ["WorldConfig", "World", "generate_world", "PRESETS", "MANIFEST_COLUMNS"]

logger = logging.getLogger(__name__)

# Bump when a change to the drawing or sampling code changes the bytes of a world; a directory
# written by another generator version is not reused.
GENERATOR_VERSION = 1

MANIFEST_COLUMNS = (
    "image", "split", "label", "color", "texture", "scene", "has_tag", "subclass",
    "true_label", "label_noise", "duplicate_of",
)

PRESETS = MappingProxyType({
    "shapes": MappingProxyType({
        "classes": S.SHAPES,
        "colors": S.COLORS,
        "textures": S.TEXTURES,
        "scenes": S.SCENES,
        # The hidden sub-class: this class is drawn solid or hollow (outline only).
        "subclass_of": "square",
        "subclass_values": ("solid", "hollow"),
    }),
    # H&E-like tissue patches (config: conceptlens.world.histo_world.HistoConfig).
    "histo": MappingProxyType({
        "classes": H.TISSUES,
        "subclass_of": "tumour",
        "subclass_values": ("viable", "necrosis"),
    }),
})

_NO_SUBCLASS = "none"  # `subclass` value of rows outside the sub-classed class

# spawn_key roles; each image's generator is keyed by (role, index, ...).
_LAYOUT, _CLASSIFY, _DUPLICATE, _NOISE, _BRODEN, _CONCEPT, _RANDOM = range(7)


@dataclass(frozen=True)
class WorldConfig:
    """Parameters of a concept world; validated by :func:`generate_world`.

    Attributes
    ----------
    preset : str
        World family: ``"shapes"``, classes ``circle, square, triangle, cross`` (the ``"histo"``
        preset has its own config class, :class:`~conceptlens.world.histo_world.HistoConfig`).
    n : int
        Classification images (train + test).
    size : int
        Image side in pixels (>= 16).
    seed : int
        Seed of everything; same config, same bytes.
    test_fraction : float
        Fraction of each class put in the ``test`` split (stratified, at least one image per
        class in each split).
    tag_class : str
        The class the tag co-occurs with in training.
    tag_bias : float
        In ``[0, 1]``. Training: P(tag | tag_class) = base + bias·(1 − base), P(tag | other) =
        base·(1 − bias). Test (and Broden, concepts, random pool): P(tag) = base. 0 = unbiased.
    tag_base_rate : float
        ``base`` above, in ``[0, 1]``.
    subclass : bool
        Draw half of the ``square`` images hollow (the hidden sub-class).
    label_noise : float
        Fraction of training rows whose ``label`` is replaced by another class.
    near_duplicates : int
        Test images planted as near-copies (pixel noise, half with a 1-px shift) of distinct train
        images.
    n_broden : int or None
        Images of the Broden concept set; None = as many as test images.
    n_concept : int
        Images per TCAV concept folder.
    n_random : int
        Images in the random pool.
    mask_scale : int
        Broden masks are ``size // mask_scale`` pixels (nearest-neighbour downsampling).
    """

    preset: str = "shapes"
    n: int = 1200
    size: int = 64
    seed: int = 0
    test_fraction: float = 0.25
    tag_class: str = "circle"
    tag_bias: float = 0.9
    tag_base_rate: float = 0.3
    subclass: bool = True
    label_noise: float = 0.0
    near_duplicates: int = 0
    n_broden: int | None = None
    n_concept: int = 50
    n_random: int = 300
    mask_scale: int = 1


@dataclass(frozen=True)
class World:
    """A generated concept world on disk.

    Attributes
    ----------
    root : Path
        The world directory.
    manifest : Path
        ``manifest.csv`` (classification images, both splits).
    broden : Path
        The Broden-style concept set directory.
    concepts : Path
        TCAV concept folders, one subfolder per concept.
    random : Path
        The random counter-example pool (a folder of images).
    classes : tuple of str
        Class names in label order.
    concept_names : tuple of str
        Subfolders of ``concepts``.
    config : WorldConfig or HistoConfig
        The configuration it was generated from (the preset's config class).
    content_hash : str
        SHA-256 over all files of the world except ``world.json``.
    """

    root: Path
    manifest: Path
    broden: Path
    concepts: Path
    random: Path
    classes: tuple
    concept_names: tuple
    config: WorldConfig
    content_hash: str

    @classmethod
    def load(cls, root):
        """Open an existing world directory (reads ``world.json``).

        Parameters
        ----------
        root : str or Path
            A directory written by :func:`generate_world`.

        Returns
        -------
        World
        """
        root = Path(root)
        meta_path = root / "world.json"
        if not meta_path.is_file():
            raise ConceptLensError(
                f"{root} is not a concept world (no world.json); create one with generate_world() or `conceptlens world`"
            )
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            config = _preset(meta["config"].get("preset"))[0](**meta["config"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ConceptLensError(f"{meta_path} is not a valid world.json ({exc}); regenerate the world") from exc
        return cls(
            root=root,
            manifest=root / "manifest.csv",
            broden=root / "broden",
            concepts=root / "concepts",
            random=root / "random",
            classes=tuple(meta["classes"]),
            concept_names=tuple(meta["concepts"]),
            config=config,
            content_hash=meta["content_hash"],
        )


# --------------------------------------------------------------------------- validation

def _bad(name, expected, got, hint=""):
    return ConceptLensError(f"the `{name}` parameter of generate_world must be {expected}; got {got!r}{hint}")


def _int(cfg, name, lo, hi=None):
    v = getattr(cfg, name)
    ok = isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= lo and (hi is None or v <= hi)
    if not ok:
        rng = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
        raise _bad(name, rng, v)
    return int(v)


def _float(cfg, name, lo, hi, open_=False):
    v = getattr(cfg, name)
    ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and ((lo < v < hi) if open_ else (lo <= v <= hi))
    if not ok:
        raise _bad(name, f"a number in {'(' if open_ else '['}{lo}, {hi}{')' if open_ else ']'}", v)
    return float(v)


def _split_counts(n, n_classes, test_fraction):
    """Per-class (train, test) counts: classes are balanced, test is stratified, >= 1 each."""
    counts = []
    for c in range(n_classes):
        n_c = len(range(c, n, n_classes))
        k = min(max(1, round(n_c * test_fraction)), n_c - 1)
        counts.append((n_c - k, k))
    return counts


def _class_name(cfg, name):
    """Validate the field ``name`` of ``cfg``: a class of its preset."""
    classes = PRESETS[cfg.preset]["classes"]
    v = getattr(cfg, name)
    if v not in classes:
        raise _bad(name, f"a class of the {cfg.preset!r} preset {list(classes)}", v, did_you_mean(v, classes, 1))
    return v


def _common_values(cfg, min_size, max_size):
    """Validate the fields every preset has; return them normalised (plain int/float types)."""
    values = dict(
        n=_int(cfg, "n", 2 * len(PRESETS[cfg.preset]["classes"])),
        size=_int(cfg, "size", min_size, max_size),
        seed=_int(cfg, "seed", 0),
        test_fraction=_float(cfg, "test_fraction", 0, 1, open_=True),
        label_noise=_float(cfg, "label_noise", 0, 1),
        n_concept=_int(cfg, "n_concept", 1),
        n_random=_int(cfg, "n_random", 1),
        mask_scale=_int(cfg, "mask_scale", 1),
    )
    if values["size"] // values["mask_scale"] < 4:
        raise _bad("mask_scale", f"small enough to leave masks of at least 4 px (size // mask_scale >= 4 with size "
                   f"{values['size']})", cfg.mask_scale)
    counts = _split_counts(values["n"], len(PRESETS[cfg.preset]["classes"]), values["test_fraction"])
    n_train, n_test = sum(c[0] for c in counts), sum(c[1] for c in counts)
    values["near_duplicates"] = _int(cfg, "near_duplicates", 0)
    if values["near_duplicates"] > min(n_train, n_test):
        raise _bad("near_duplicates", f"at most min(train, test) = {min(n_train, n_test)} images for n={values['n']} "
                   f"and test_fraction={values['test_fraction']}", cfg.near_duplicates)
    if cfg.n_broden is not None:
        values["n_broden"] = _int(cfg, "n_broden", 1)
    return values


def _validate(cfg):
    """Check every field of a shapes ``cfg``; return a normalised copy (plain int/float/bool types)."""
    values = _common_values(cfg, 16, 1024)
    values.update(tag_bias=_float(cfg, "tag_bias", 0, 1), tag_base_rate=_float(cfg, "tag_base_rate", 0, 1),
                  tag_class=_class_name(cfg, "tag_class"))
    if not isinstance(cfg.subclass, (bool, np.bool_)):
        raise _bad("subclass", "True or False", cfg.subclass)
    return dataclasses.replace(cfg, subclass=bool(cfg.subclass), **values)


# --------------------------------------------------------------------------- sampling

def _rng(seed, *key):
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


@dataclass(frozen=True)
class _Spec:
    """What to draw for one image; ``key`` seeds its rendering (placement, jitter, noise)."""

    shape: str
    color: str
    texture: str
    scene: str
    tag: bool
    hollow: bool
    key: tuple


def _sample(cfg, key, p_tag, **fixed):
    """Draw an image's attributes from its own generator ``(*key, 0)``; ``fixed`` overrides them.

    Every value is drawn, used or not, so a fixed attribute does not shift the others' draws.
    """
    preset = PRESETS[cfg.preset]
    rng = _rng(cfg.seed, *key, 0)
    draws = dict(
        shape=preset["classes"][rng.integers(len(preset["classes"]))],
        color=preset["colors"][rng.integers(len(preset["colors"]))],
        texture=preset["textures"][rng.integers(len(preset["textures"]))],
        scene=preset["scenes"][rng.integers(len(preset["scenes"]))],
    )
    u_hollow, u_tag = rng.random(2)
    draws.update({k: v for k, v in fixed.items() if k != "tag"})
    hollow = cfg.subclass and draws["shape"] == preset["subclass_of"] and u_hollow < 0.5
    tag = fixed["tag"] if "tag" in fixed else bool(u_tag < p_tag)
    return _Spec(tag=tag, hollow=bool(hollow), key=(*key, 1), **draws)


def _render(cfg, spec):
    return S.draw(_rng(cfg.seed, *spec.key), cfg.size, spec.shape, spec.color, spec.texture, spec.scene,
                  spec.tag, hollow=spec.hollow)


def _render_image(cfg, spec):
    return _render(cfg, spec).image


def _biased_rates(classes, target, base, bias):
    """Training rates of an attribute planted on class ``target``: base + bias·(1 − base) there,
    base·(1 − bias) elsewhere (bias 0: ``base`` everywhere)."""
    return {c: (base + bias * (1 - base)) if c == target else base * (1 - bias) for c in classes}


def _stratified_split(cfg, layout):
    """Balanced class indices of the ``n`` classification rows and their test mask, drawn from ``layout``."""
    n_cls = len(PRESETS[cfg.preset]["classes"])
    cls = layout.permutation(np.arange(cfg.n) % n_cls)
    is_test = np.zeros(cfg.n, dtype=bool)
    for c, (_, k) in enumerate(_split_counts(cfg.n, n_cls, cfg.test_fraction)):
        is_test[layout.choice(np.flatnonzero(cls == c), size=k, replace=False)] = True
    return cls, is_test


def _plant_noise_and_duplicates(cfg, rows, specs, cls, is_test, noise_column):
    """Plant label noise and near-duplicates in ``rows`` and ``specs`` (in place).

    Label noise: a seeded subset of training rows gets another class as its ``label`` and 1 in
    ``noise_column``. Near-duplicates: distinct test rows become copies of distinct train rows
    (their spec and attributes, ``label`` = the source's ``true_label``, ``duplicate_of`` = its
    image). Returns ``{test row: duplicate number}`` (the number seeds :func:`_perturb`).
    """
    classes = PRESETS[cfg.preset]["classes"]
    n_cls = len(classes)
    train_idx = np.flatnonzero(~is_test)
    noise = _rng(cfg.seed, _NOISE)
    k = round(cfg.label_noise * len(train_idx))
    flipped = noise.choice(train_idx, size=k, replace=False) if k else np.array([], dtype=int)
    shifts = noise.integers(1, n_cls, size=k)
    for i, s in zip(flipped.tolist(), shifts.tolist()):
        rows[i]["label"] = classes[(cls[i] + s) % n_cls]
        rows[i][noise_column] = 1

    dup_of = {}
    K = cfg.near_duplicates
    if K:
        dup = _rng(cfg.seed, _DUPLICATE)
        tests = np.sort(dup.choice(np.flatnonzero(is_test), size=K, replace=False))
        sources = dup.choice(train_idx, size=K, replace=False)
        for j, (t, s) in enumerate(zip(tests.tolist(), sources.tolist())):
            specs[t] = specs[s]
            rows[t] = {**rows[s], "image": rows[t]["image"], "split": "test", "label": rows[s]["true_label"],
                       noise_column: 0, "duplicate_of": rows[s]["image"]}
            dup_of[t] = j
    return dup_of


def _plan_classification(cfg):
    """Rows of the classification manifest, and the specs to draw (index-aligned)."""
    preset = PRESETS[cfg.preset]
    classes = preset["classes"]
    cls, is_test = _stratified_split(cfg, _rng(cfg.seed, _LAYOUT))
    p_train = _biased_rates(classes, cfg.tag_class, cfg.tag_base_rate, cfg.tag_bias)

    specs, rows = [], []
    for i in range(cfg.n):
        split = "test" if is_test[i] else "train"
        label = classes[cls[i]]
        p = p_train[label] if split == "train" else cfg.tag_base_rate
        spec = _sample(cfg, (_CLASSIFY, i), p, shape=label)
        specs.append(spec)
        rows.append(_row(f"images/{split}/{i:05d}.png", split, label, spec, preset))
    return rows, specs, _plant_noise_and_duplicates(cfg, rows, specs, cls, is_test, "label_noise")


def _row(image, split, label, spec, preset):
    if spec.shape == preset["subclass_of"]:
        sub = preset["subclass_values"][1 if spec.hollow else 0]
    else:
        sub = _NO_SUBCLASS
    return {
        "image": image, "split": split, "label": label, "color": spec.color, "texture": spec.texture,
        "scene": spec.scene, "has_tag": int(spec.tag), "subclass": sub, "true_label": label,
        "label_noise": 0, "duplicate_of": "",
    }


def _perturb(cfg, image, j):
    """A near-duplicate of ``image``: ±2 levels of noise, and a 1-px shift for odd ``j``."""
    rng = _rng(cfg.seed, _DUPLICATE, j)
    out = image.astype(np.int16)
    if j % 2:
        dy, dx = [(0, 1), (1, 0), (0, -1), (-1, 0)][rng.integers(4)]
        # Edge-replicating shift (np.roll would wrap the opposite border in).
        out = np.pad(out, ((1, 1), (1, 1), (0, 0)), mode="edge")[1 - dy:1 - dy + cfg.size, 1 - dx:1 - dx + cfg.size]
    out = out + rng.integers(-2, 3, size=out.shape, dtype=np.int16)
    return np.clip(out, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- writing

def _save(arr, path):
    Image.fromarray(arr).save(path, format="PNG", compress_level=1)


def _broden_names(preset):
    """Candidate Broden labels per category, in label-number order."""
    return {
        "color": list(preset["colors"]) + ["white", "black"],
        "object": list(preset["classes"]) + ["tag"],
        "texture": list(preset["textures"]),
        "scene": list(preset["scenes"]),
    }


def _downsample(mask, sh):
    idx = ((np.arange(sh) + 0.5) * mask.shape[0] / sh).astype(int)
    return mask[np.ix_(idx, idx)]


def _broden_annotations(cfg, spec, table):
    """Render a Broden image; return it with its masks (label numbers from ``table``, name → number)."""
    size, sh = cfg.size, cfg.size // cfg.mask_scale
    d = _render(cfg, spec)
    color = np.zeros((size, size), dtype=np.int32)
    color[d.object] = table.get(spec.color, 0)
    color[d.tag & ~d.tag_dark] = table.get("white", 0)
    color[d.tag_dark] = table.get("black", 0)
    obj = np.where(d.object, table.get(spec.shape, 0), 0).astype(np.int32)
    obj[d.tag] = table.get("tag", 0)
    tex = np.where(d.object, table.get(spec.texture, 0), 0).astype(np.int32)
    ann = {
        "color": [_downsample(color, sh)],
        "object": [_downsample(obj, sh)],
        "texture": [_downsample(tex, sh)],
        "scene": [table.get(spec.scene, 0)],
    }
    return d.image, ann


def _broden_table(cfg, specs, names, annotate):
    """Label table (name → number from 1) of the labels that occur in the downsampled masks.

    ``names`` maps each category to its candidate labels; ``annotate(cfg, spec, table)`` renders an
    image and returns it with its annotations. A cheap extra rendering pass: a label can vanish
    when masks are downsampled (e.g. the tag's white pixels at ``mask_scale=2``), and label numbers
    should stay contiguous.
    """
    full = {name: i + 1 for i, name in enumerate(n for cat in names.values() for n in cat)}
    present = set()
    for spec in specs:
        _, ann = annotate(cfg, spec, full)
        for entries in ann.values():  # image-level numbers and masks alike
            for entry in entries:
                present |= set(np.unique(entry).tolist())
    kept = [name for name, number in full.items() if number in present]
    return {name: i + 1 for i, name in enumerate(kept)}


def _broden_records(cfg, specs, table, annotate, bar):
    sh = cfg.size // cfg.mask_scale
    for j, spec in enumerate(specs):
        image, ann = annotate(cfg, spec, table)
        bar.update(1)
        yield BrodenRecord(image=f"{j:05d}.png", split="train", ih=cfg.size, iw=cfg.size, sh=sh, sw=sh,
                           annotations=ann, pixels=image)


def _write_images(folder, images, bar):
    """Save ``images`` (an iterable of arrays) as ``folder/NNNNN.png``."""
    folder.mkdir(parents=True)
    for j, image in enumerate(images):
        _save(image, folder / f"{j:05d}.png")
        bar.update(1)


@dataclass(frozen=True)
class _Drawing:
    """What the shared writer :func:`_write_world` needs from a preset."""

    columns: tuple  # manifest columns
    sample: Callable  # sample(cfg, key, p_artifact, **fixed) -> spec (p_artifact: rate of the planted artifact)
    render: Callable  # render(cfg, spec) -> (size, size, 3) uint8 image
    annotate: Callable  # annotate(cfg, spec, table) -> (image, {category: [label number or mask]})
    broden_names: dict  # Broden category -> candidate label names, in label-number order
    concepts: dict  # concept folder name -> fixed attributes of its images (artifact rate 0 unless fixed)
    base_rate: float  # the artifact's rate in the Broden set and the random pool


def _write_world(cfg, root, progress, version, drawing, rows, specs, dup_of, *, counts=None, **fields):
    """Write a world to ``root``: classification images and manifest, Broden set, concepts, random pool, world.json.

    ``rows`` and ``specs`` are the planned classification set, ``dup_of`` its near-duplicates (see
    :func:`_plant_noise_and_duplicates`). ``world.json`` holds the generator and library versions,
    the config, the concept names, the image counts (plus ``counts``), the Broden label table,
    ``fields`` and the content hash.
    """
    n_test = sum(r["split"] == "test" for r in rows)
    n_broden = cfg.n_broden
    if n_broden is None:
        n_broden = n_test
        logger.info("n_broden=None: the Broden set gets as many images as the test split (%d)", n_broden)
    broden_specs = [drawing.sample(cfg, (_BRODEN, j), drawing.base_rate) for j in range(n_broden)]
    total = cfg.n + n_broden + len(drawing.concepts) * cfg.n_concept + cfg.n_random

    with tqdm(total=total, desc="concept world", unit="img", disable=None if progress is None else not progress) as bar:
        for split in ("train", "test"):
            (root / "images" / split).mkdir(parents=True)
        for i, (row, spec) in enumerate(zip(rows, specs)):
            image = drawing.render(cfg, spec)
            if i in dup_of:
                image = _perturb(cfg, image, dup_of[i])
            _save(image, root / row["image"])
            bar.update(1)
        with open(root / "manifest.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=drawing.columns, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)

        table = _broden_table(cfg, broden_specs, drawing.broden_names, drawing.annotate)
        write_broden(root / "broden", _broden_records(cfg, broden_specs, table, drawing.annotate, bar),
                     {v: k for k, v in table.items()}, categories=tuple(drawing.broden_names))

        for q, (name, fixed) in enumerate(drawing.concepts.items()):
            _write_images(root / "concepts" / name, (drawing.render(cfg, drawing.sample(cfg, (_CONCEPT, q, j), 0.0, **fixed))
                                                     for j in range(cfg.n_concept)), bar)
        _write_images(root / "random", (drawing.render(cfg, drawing.sample(cfg, (_RANDOM, j), drawing.base_rate))
                                        for j in range(cfg.n_random)), bar)

    meta = {
        "generator": version,
        "conceptlens_version": __version__,
        "config": dataclasses.asdict(cfg),
        "concepts": list(drawing.concepts),
        "counts": {"train": cfg.n - n_test, "test": n_test, "broden": n_broden, "concept": cfg.n_concept,
                   "random": cfg.n_random, **(counts or {})},
        "broden_labels": table,
        **fields,
        "content_hash": hash_tree(root, exclude={"world.json"}),
    }
    (root / "world.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write(cfg, root, progress):
    preset = PRESETS[cfg.preset]
    classes = tuple(preset["classes"])
    rows, specs, dup_of = _plan_classification(cfg)
    concepts = {**{c: dict(color=c, tag=False) for c in preset["colors"]},
                **{t: dict(texture=t, tag=False) for t in preset["textures"]}, "tag": dict(tag=True)}
    drawing = _Drawing(MANIFEST_COLUMNS, _sample, _render_image, _broden_annotations, _broden_names(preset), concepts,
                       cfg.tag_base_rate)
    _write_world(
        cfg, root, progress, GENERATOR_VERSION, drawing, rows, specs, dup_of,
        classes=list(classes),
        attributes={
            "color": list(preset["colors"]),
            "texture": list(preset["textures"]),
            "scene": list(preset["scenes"]),
            "subclass": [_NO_SUBCLASS, *preset["subclass_values"]],
        },
        planted={
            "tag_class": cfg.tag_class,
            "p_tag_train": _biased_rates(classes, cfg.tag_class, cfg.tag_base_rate, cfg.tag_bias),
            "p_tag_test": cfg.tag_base_rate,
            "subclass_of": preset["subclass_of"] if cfg.subclass else None,
            "label_noise_rows": int(sum(r["label_noise"] for r in rows)),
            "near_duplicates": cfg.near_duplicates,
        },
    )


def _config_diff(old, new):
    keys = sorted(set(old) | set(new))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k))


def _preset(name):
    """``(config class, validate, write, generator version)`` of preset ``name``.

    The ``histo`` preset's module builds on this one, so it is imported on first use.
    """
    if name == "histo":
        from . import histo_world

        return histo_world.HistoConfig, histo_world._validate, histo_world._write, histo_world.GENERATOR_VERSION
    return WorldConfig, _validate, _write, GENERATOR_VERSION


def generate_world(out_dir, config=None, *, progress=None, **overrides):
    """Generate a concept world: images with planted effects, manifest, Broden set, concept folders.

    Parameters
    ----------
    out_dir : str or Path
        Directory to create (or an empty one). If it already holds a world of the same
        configuration, that world is returned without regenerating.
    config : WorldConfig or HistoConfig, optional
        Base configuration (default: the preset's config class with its defaults; the preset is
        ``overrides["preset"]``, else ``config.preset``, else ``"shapes"``).
    progress : bool or None, default None
        Show a tqdm progress bar; None shows it only on a terminal.
    **overrides
        Fields of the preset's config class to replace, e.g. ``n=200, size=32`` or
        ``preset="histo", site_bias=0.0``.

    Returns
    -------
    World

    Raises
    ------
    ConceptLensError
        On an invalid parameter, or when ``out_dir`` is a file, a non-empty directory that is not a
        world, or a world of another configuration.

    Notes
    -----
    The ``histo`` preset (H&E-like patches, :class:`~conceptlens.world.histo_world.HistoConfig`)
    documents its manifest columns, Broden labels and planted effects in
    :mod:`conceptlens.world.histo_world`; the layout of ``out_dir`` below is common to both presets.

    ``shapes`` ``manifest.csv`` columns: ``image`` (relative to the CSV), ``split``
    (``train``/``test``), ``label`` (the class used for training; differs from ``true_label`` on
    label-noise rows), ``color``, ``texture``, ``scene``, ``has_tag`` (0/1), ``subclass``
    (``solid``/``hollow`` for squares, ``none`` for other classes), ``true_label``,
    ``label_noise`` (0/1), ``duplicate_of`` (the train image a planted near-duplicate test image
    copies; empty otherwise).

    ``shapes`` Broden categories: ``color`` (object pixels get the object colour; the tag's light pixels
    ``white``, its dark "x" ``black``), ``object`` (the shape name over object pixels, ``tag`` over
    the tag square), ``texture`` (pixel masks over object pixels) and ``scene`` (image-level). All
    rows have split ``train``. Only labels that occur in the (downsampled) masks are listed, so
    label numbers are contiguous from 1.

    Layout of ``out_dir``: ``manifest.csv`` and ``images/{train,test}/NNNNN.png`` (the
    classification set), ``broden/`` (Broden set: ``index.csv``, ``label.csv``,
    ``category.csv``, ``c_*.csv``, ``images/``), ``concepts/<concept>/NNNNN.png``,
    ``random/NNNNN.png`` and ``world.json`` (config, classes, concepts, planted truth, content
    hash). The world is written to a temporary sibling directory and renamed into place, so an
    interrupted run leaves nothing behind at ``out_dir``.
    """
    name = overrides.get("preset", getattr(config, "preset", "shapes"))
    if name not in PRESETS:
        raise _bad("preset", f"one of {list(PRESETS)}", name, did_you_mean(name, PRESETS, 1))
    config_class, validate, write, version = _preset(name)
    base = config_class() if config is None else config
    if not isinstance(base, config_class):
        raise ConceptLensError(f"the `config` parameter of generate_world must be a {config_class.__name__} for the "
                               f"{name!r} preset; got {type(base).__name__}")
    fields = [f.name for f in dataclasses.fields(config_class)]
    for key in overrides:
        if key not in fields:
            raise ConceptLensError(f"generate_world got an unknown parameter {key!r} for the {name!r} preset"
                                   f"{did_you_mean(key, fields, 1)} (valid: {', '.join(fields)})")
    cfg = validate(dataclasses.replace(base, **overrides))

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConceptLensError(f"cannot write a concept world to {out}: it is a file; choose a directory")
    if out.is_dir() and any(out.iterdir()):
        meta_path = out / "world.json"
        if not meta_path.is_file():
            raise ConceptLensError(
                f"{out} is not empty and holds no concept world (no world.json); choose a new or empty directory"
            )
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ConceptLensError(f"{meta_path} is not valid JSON ({exc}); delete {out} and regenerate") from exc
        want = json.loads(json.dumps(dataclasses.asdict(cfg)))
        if meta.get("config") == want and meta.get("generator") == version:
            logger.info("%s already holds a concept world with this configuration; reusing it", out)
            return World.load(out)
        diff = _config_diff(meta.get("config") or {}, want)
        if meta.get("generator") != version:
            diff = ", ".join(filter(None, [diff, f"generator: {meta.get('generator')!r} -> {version}"]))
        raise ConceptLensError(
            f"{out} holds a concept world of another configuration ({diff}); delete it or choose another directory"
        )

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(cfg, tmp, progress)
        if out.is_dir():
            out.rmdir()  # empty (checked above); rename cannot replace it everywhere
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote concept world %s (%d images, %d px, seed %d)", out, cfg.n, cfg.size, cfg.seed)
    return World.load(out)

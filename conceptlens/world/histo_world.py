"""The ``histo`` world preset: H&E-like histopathology patches with planted truth.

Classes ``tumour`` (crowded, large, pleomorphic nuclei), ``stroma`` (sparse spindle nuclei in
pink fibres) and ``normal`` (small round nuclei lining gland-like lumens), drawn by
:mod:`conceptlens.world.histo`. Planted effects, each with a knob of :class:`HistoConfig`:

* **acquisition site**: every slide comes from one of ``n_sites`` sites, each with its own stain
  colours. In training, class ``i`` comes mostly from site ``i`` (``site_bias``); the test split
  has every site equally often in every class.
* **pen marks**: a marker-ink stroke, in training mostly on ``pen_class`` patches (``pen_bias``).
* **hidden sub-class**: some tumour patches are necrotic (``necrosis_rate``; in training only
  ``necrosis_train_rate``, a rare subtype the model barely sees: hidden stratification); the label
  stays ``tumour``.
* **patients**: ``patches_per_patient`` patches per patient, a patient at one site and, except
  the ``leak_patients`` planted ones, in one split.
* **label noise** and **near-duplicates** across splits, as in the ``shapes`` preset.

``manifest.csv`` columns (:data:`MANIFEST_COLUMNS`): ``image``, ``split``, ``label`` (used for
training; differs from ``true_label`` on noisy rows), ``site`` (``site0`` ...), ``patient``
(``P000`` ...), ``pen`` (0/1), ``subclass`` (``necrosis``/``viable`` for tumour, ``none``
otherwise), ``true_label``, ``noisy`` (0/1) and ``duplicate_of`` (the train image a planted
near-duplicate copies, with its site, patient and attributes; empty otherwise).

The Broden set has the pixel category ``object`` (``necrosis``: the necrotic region,
``nuclei``: intact nuclei, ``pen``: the ink; each drawn over the ones before) and the image-level
``scene`` (the tissue class). Concept folders: ``pen``, ``necrosis`` and one per site stain
(``site0`` ...: patches of that site, any class, no pen). ``world.json`` ``planted`` records the
site and pen rates, the stain vectors, the sub-class, the leaking patients and the label-noise
and duplicate counts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from . import histo as H
from .generate import (_CLASSIFY, _LAYOUT, _NO_SUBCLASS, PRESETS, _bad, _biased_rates, _class_name, _common_values,
                       _downsample, _Drawing, _float, _int, _plant_noise_and_duplicates, _rng, _stratified_split,
                       _write_world)

__all__ = ["HistoConfig", "MANIFEST_COLUMNS"]

# Bump when a change to the drawing or sampling code changes the bytes of a histo world.
GENERATOR_VERSION = 1

MANIFEST_COLUMNS = (
    "image", "split", "label", "site", "patient", "pen", "subclass", "true_label", "noisy", "duplicate_of",
)

_PRESET = PRESETS["histo"]
_PATIENT = 7  # spawn_key role of a patient's stain jitter (after generate.py's roles 0-6)
_STAIN_JITTER = 0.04  # a slide's random stain change, relative; well below the site shift


@dataclass(frozen=True)
class HistoConfig:
    """Parameters of a ``histo`` concept world; validated by :func:`~conceptlens.world.generate_world`.

    Attributes
    ----------
    preset : str
        Always ``"histo"``.
    n : int
        Classification patches (train + test).
    size : int
        Patch side in pixels, 32 to 128 (lengths are designed at 64 and scale with the size).
    seed : int
        Seed of everything; same config, same bytes.
    test_fraction : float
        Fraction of each class put in the ``test`` split (stratified).
    n_sites : int
        Acquisition sites, 3 to 8 (at least one per class: class ``i`` is associated with site ``i``).
    site_bias : float
        In ``[0, 1]``. Training: P(site | class i) = (1 − bias)/n_sites + bias·[site = i]. Test:
        every site equally often in every class. 0 = no association.
    stain_shift : float
        In ``[0, 1]``: how much the sites' stain colours differ (0: all alike).
    pen_class : str
        The class the pen marks co-occur with in training.
    pen_bias : float
        In ``[0, 1]``. Training: P(pen | pen_class) = base + bias·(1 − base), P(pen | other) =
        base·(1 − bias). Test (and Broden, random pool): P(pen) = base.
    pen_base_rate : float
        ``base`` above, in ``[0, 1]``.
    necrosis_rate : float
        Fraction of tumour patches drawn with necrosis (the hidden sub-class), in ``[0, 1]``, in the
        test split, the concept folders, the Broden set and the random pool.
    necrosis_train_rate : float
        The same fraction in the training split. Rare in training, necrosis is where a model fails
        (its tumour is pink with few intact nuclei, like stroma): the error slice to discover.
    patches_per_patient : int
        Patches per patient (a patient's patches share a split, a site and the slide's stain).
    leak_patients : int
        Patients planted with patches in both splits (a train and a test patient at the same site
        merged into one).
    label_noise : float
        Fraction of training rows whose ``label`` is replaced by another class.
    near_duplicates : int
        Test patches planted as near-copies of distinct train patches.
    n_broden : int or None
        Images of the Broden concept set; None = as many as test images.
    n_concept : int
        Images per TCAV concept folder.
    n_random : int
        Images in the random pool.
    mask_scale : int
        Broden masks are ``size // mask_scale`` pixels.
    """

    preset: str = "histo"
    n: int = 1200
    size: int = 64
    seed: int = 0
    test_fraction: float = 0.25
    n_sites: int = 3
    site_bias: float = 0.9
    stain_shift: float = 0.3
    pen_class: str = "tumour"
    pen_bias: float = 0.9
    pen_base_rate: float = 0.2
    necrosis_rate: float = 0.25
    necrosis_train_rate: float = 0.0
    patches_per_patient: int = 8
    leak_patients: int = 0
    label_noise: float = 0.0
    near_duplicates: int = 0
    n_broden: int | None = None
    n_concept: int = 50
    n_random: int = 300
    mask_scale: int = 1


def _validate(cfg):
    """Check every field of ``cfg``; return a normalised copy (plain int/float types)."""
    values = _common_values(cfg, 32, 128)
    values.update(
        n_sites=_int(cfg, "n_sites", len(_PRESET["classes"]), 8),
        site_bias=_float(cfg, "site_bias", 0, 1),
        stain_shift=_float(cfg, "stain_shift", 0, 1),
        pen_class=_class_name(cfg, "pen_class"),
        pen_bias=_float(cfg, "pen_bias", 0, 1),
        pen_base_rate=_float(cfg, "pen_base_rate", 0, 1),
        necrosis_rate=_float(cfg, "necrosis_rate", 0, 1),
        necrosis_train_rate=_float(cfg, "necrosis_train_rate", 0, 1),
        patches_per_patient=_int(cfg, "patches_per_patient", 1),
        leak_patients=_int(cfg, "leak_patients", 0),
    )
    return dataclasses.replace(cfg, **values)


# --------------------------------------------------------------------------- sampling

@dataclass(frozen=True)
class _Spec:
    """What to draw for one patch; ``stain_key`` seeds the slide's stain jitter, ``key`` the drawing."""

    tissue: str
    site: int
    pen: bool
    necrosis: bool
    stain_key: tuple
    key: tuple


def _sample(cfg, key, p_pen, stain_key=None, p_necrosis=None, **fixed):
    """Draw a patch's attributes from its own generator ``(*key, 0)``; ``fixed`` overrides them.

    Every value is drawn, used or not, so a fixed attribute does not shift the others' draws. A
    patch without a patient (``stain_key`` None) is its own slide. ``p_necrosis`` defaults to
    ``necrosis_rate``.
    """
    classes = _PRESET["classes"]
    rng = _rng(cfg.seed, *key, 0)
    draws = dict(tissue=classes[rng.integers(len(classes))], site=int(rng.integers(cfg.n_sites)))
    u_pen, u_necrosis = rng.random(2)
    draws.update({k: v for k, v in fixed.items() if k in draws})
    pen = fixed.get("pen", bool(u_pen < p_pen))
    p_necrosis = cfg.necrosis_rate if p_necrosis is None else p_necrosis
    necrosis = fixed.get("necrosis", draws["tissue"] == _PRESET["subclass_of"] and bool(u_necrosis < p_necrosis))
    return _Spec(pen=pen, necrosis=necrosis, stain_key=stain_key or (*key, 2), key=(*key, 1), **draws)


def _render(cfg, spec):
    stain = H.jitter_stain(H.site_stain(spec.site, cfg.n_sites, cfg.stain_shift), _rng(cfg.seed, *spec.stain_key),
                           _STAIN_JITTER)
    return H.draw(_rng(cfg.seed, *spec.key), cfg.size, spec.tissue, stain, necrosis=spec.necrosis, pen=spec.pen)


def _render_image(cfg, spec):
    return _render(cfg, spec).image


def _site_name(s):
    return f"site{s}"


def _site_probabilities(cfg):
    """Training P(site | class) (one row of probabilities per class): class ``i`` leans to site ``i``."""
    n_cls = len(_PRESET["classes"])
    return (1 - cfg.site_bias) / cfg.n_sites + cfg.site_bias * np.eye(n_cls, cfg.n_sites)


def _allocate(n, p):
    """Split ``n`` items by probabilities ``p`` into integer counts (largest remainders, ties to the lower index)."""
    exact = n * np.asarray(p)
    counts = np.floor(exact).astype(int)
    counts[np.argsort(counts - exact, kind="stable")[: n - counts.sum()]] += 1
    return counts


def _patients(cfg, layout, is_test, site):
    """Patient number of every row, and the planted leaking patients (sorted numbers).

    Within each (split, site), the rows are shuffled and cut into patients of
    ``patches_per_patient`` (a patient can have patches of several classes). A leaking patient is a
    train and a test patient of the same site merged into one.
    """
    groups = []  # (is_test, site, rows)
    for test in (False, True):
        for s in range(cfg.n_sites):
            rows = layout.permutation(np.flatnonzero((is_test == test) & (site == s)))
            groups += [(test, s, rows[k:k + cfg.patches_per_patient])
                       for k in range(0, len(rows), cfg.patches_per_patient)]
    number = layout.permutation(len(groups))  # patient numbers do not reveal the split or site
    patient = np.empty(cfg.n, dtype=int)
    for g, (_, _, rows) in zip(number, groups):
        patient[rows] = g
    pairs = []  # (train patient, test patient) at one site
    for s in range(cfg.n_sites):
        train = [g for g, (test, gs, _) in zip(number, groups) if gs == s and not test]
        pairs += zip(train, (g for g, (test, gs, _) in zip(number, groups) if gs == s and test))
    if cfg.leak_patients > len(pairs):
        raise _bad("leak_patients", f"at most {len(pairs)} (pairs of a train and a test patient at the same site) "
                   f"for this configuration", cfg.leak_patients)
    leak = []
    for k in np.sort(layout.choice(len(pairs), size=cfg.leak_patients, replace=False)):
        keep, merged = pairs[k]
        patient[patient == merged] = keep
        leak.append(keep)
    # Renumber 0 .. P-1 (merging left gaps); numbers keep their order.
    numbers, patient = np.unique(patient, return_inverse=True)
    return patient, sorted(np.searchsorted(numbers, leak).tolist())


def _patient_name(g, n_patients):
    return f"P{g:0{max(3, len(str(n_patients - 1)))}d}"


def _plan(cfg):
    """Rows of the manifest, the specs to draw, near-duplicate numbers and the leaking patients' names."""
    classes = _PRESET["classes"]
    layout = _rng(cfg.seed, _LAYOUT)
    cls, is_test = _stratified_split(cfg, layout)
    # Sites: exact proportions per (class, split): P(site | class) in train, uniform in test.
    site = np.empty(cfg.n, dtype=int)
    p_site = _site_probabilities(cfg)
    for c in range(len(classes)):
        for test in (False, True):
            rows = np.flatnonzero((cls == c) & (is_test == test))
            p = np.full(cfg.n_sites, 1 / cfg.n_sites) if test else p_site[c]
            site[layout.permutation(rows)] = np.repeat(np.arange(cfg.n_sites), _allocate(len(rows), p))
    patient, leak = _patients(cfg, layout, is_test, site)
    n_patients = int(patient.max()) + 1
    p_pen = _biased_rates(classes, cfg.pen_class, cfg.pen_base_rate, cfg.pen_bias)

    specs, rows = [], []
    for i in range(cfg.n):
        split = "test" if is_test[i] else "train"
        label = classes[cls[i]]
        train = split == "train"
        spec = _sample(cfg, (_CLASSIFY, i), p_pen[label] if train else cfg.pen_base_rate,
                       stain_key=(_PATIENT, int(patient[i])), p_necrosis=cfg.necrosis_train_rate if train else None,
                       tissue=label, site=int(site[i]))
        specs.append(spec)
        rows.append({
            "image": f"images/{split}/{i:05d}.png", "split": split, "label": label, "site": _site_name(spec.site),
            "patient": _patient_name(int(patient[i]), n_patients), "pen": int(spec.pen),
            "subclass": _subclass(spec), "true_label": label, "noisy": 0, "duplicate_of": "",
        })
    dup_of = _plant_noise_and_duplicates(cfg, rows, specs, cls, is_test, "noisy")
    return rows, specs, dup_of, [_patient_name(g, n_patients) for g in leak]


def _subclass(spec):
    if spec.tissue != _PRESET["subclass_of"]:
        return _NO_SUBCLASS
    return _PRESET["subclass_values"][1 if spec.necrosis else 0]


# --------------------------------------------------------------------------- writing

# Object labels in drawing order: a later one covers an earlier one (ink over nuclei over necrosis).
_BRODEN_NAMES = {"object": ["necrosis", "nuclei", "pen"], "scene": list(_PRESET["classes"])}


def _broden_annotations(cfg, spec, table):
    """Render a Broden patch; return it with its masks (label numbers from ``table``, name → number)."""
    d = _render(cfg, spec)
    obj = np.zeros((cfg.size, cfg.size), dtype=np.int32)
    for name in _BRODEN_NAMES["object"]:
        obj[getattr(d, name)] = table.get(name, 0)
    return d.image, {"object": [_downsample(obj, cfg.size // cfg.mask_scale)], "scene": [table.get(spec.tissue, 0)]}


def _write(cfg, root, progress):
    classes = _PRESET["classes"]
    rows, specs, dup_of, leak = _plan(cfg)
    sites = [_site_name(s) for s in range(cfg.n_sites)]
    concepts = {"pen": dict(pen=True), "necrosis": dict(tissue=_PRESET["subclass_of"], necrosis=True),
                **{name: dict(site=s) for s, name in enumerate(sites)}}
    drawing = _Drawing(MANIFEST_COLUMNS, _sample, _render_image, _broden_annotations, _BRODEN_NAMES, concepts,
                       cfg.pen_base_rate)
    splits_of = {}
    for r in rows:
        splits_of.setdefault(r["patient"], set()).add(r["split"])
    stains = {name: H.site_stain(s, cfg.n_sites, cfg.stain_shift) for s, name in enumerate(sites)}
    _write_world(
        cfg, root, progress, GENERATOR_VERSION, drawing, rows, specs, dup_of,
        counts={"patients": len(splits_of)},
        classes=list(classes),
        attributes={"site": sites, "pen": [0, 1], "subclass": [_NO_SUBCLASS, *_PRESET["subclass_values"]]},
        planted={
            "site_of_class": {c: sites[i] for i, c in enumerate(classes)},
            "p_site_train": {c: dict(zip(sites, p.tolist())) for c, p in zip(classes, _site_probabilities(cfg))},
            "p_site_test": {s: 1 / cfg.n_sites for s in sites},
            "stain_od": {s: {"h": np.round(st.h, 6).tolist(), "e": np.round(st.e, 6).tolist()}
                         for s, st in stains.items()},
            "pen_class": cfg.pen_class,
            "p_pen_train": _biased_rates(classes, cfg.pen_class, cfg.pen_base_rate, cfg.pen_bias),
            "p_pen_test": cfg.pen_base_rate,
            "subclass_of": _PRESET["subclass_of"] if cfg.necrosis_rate > 0 else None,
            "necrosis_rate": cfg.necrosis_rate,
            "necrosis_train_rate": cfg.necrosis_train_rate,
            "leak_patients": leak,
            # The leaking patients and those of near-duplicate sources (a copy is the same tissue).
            "patients_in_both_splits": sorted(p for p, s in splits_of.items() if len(s) == 2),
            "label_noise_rows": int(sum(r["noisy"] for r in rows)),
            "near_duplicates": cfg.near_duplicates,
        },
    )

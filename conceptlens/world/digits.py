"""Decoy digits: sklearn's bundled handwritten digits with a class-coloured corner patch (Ross et al. 2017).

Ross, Hughes & Doshi-Velez (2017), "Right for the Right Reasons", built *decoy MNIST*: a swatch in
a random corner whose shade encodes the class in training and is random at test time, so a model
that learns the swatch fails on the test set. Here the real scans are the 1,797 8x8 greyscale
digits bundled with scikit-learn (``sklearn.datasets.load_digits``, no download), upsampled to
``size`` px RGB. The patch is ``size // 4`` px square (4 px at 16 px; larger than Ross et al.'s 4 px at 28 px, because
the CNN with shift augmentation learns these easy digits despite a smaller one) in one of the four corners,
drawn at random per image; its colour is the label's colour in ``train`` and the colour of a
random class in ``test``. Each image has a patch mask (PNG, 255 inside the patch) named in the
manifest's ``mask`` column, the annotation that :func:`conceptlens.correction.train_rrr` penalises.

``manifest.csv`` columns: ``image``, ``split``, ``label`` (``"0"`` ... ``"9"``), ``decoy`` (the
class whose colour the patch has; empty without a patch), ``corner`` and ``mask``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ..core.hashing import hash_tree
from ..errors import ConceptLensError

__all__ = ["generate_decoy_digits", "DIGIT_CLASSES", "DECOY_COLOURS"]

DIGIT_CLASSES = tuple(str(d) for d in range(10))
# One clearly distinct RGB colour per class (none is grey, so a patch never looks like ink).
DECOY_COLOURS = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                 (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (128, 0, 0))
CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")


def generate_decoy_digits(root, size=16, seed=0, decoy=True, test_fraction=0.25, n=None, patch=None):
    """Write a decoy-digits world (or its clean twin) to ``root``; loadable by ``train_demo``.

    Imported from ``conceptlens.world.digits`` (not yet re-exported by ``conceptlens.world``).

    Parameters
    ----------
    root : str or Path
        Output directory (created); holds ``manifest.csv``, ``world.json``, ``images/`` and ``masks/``.
    size : int
        Image side in pixels (>= 8); the 8x8 scans are upsampled bilinearly. 16 (the default) is
        where ``train_rrr``'s default weight was measured; larger images need a larger weight.
    seed : int
        Seeds the split, the corners and the test patches' colours; same seed, same files.
    decoy : bool
        ``False`` writes the same images and split without any patch (masks are empty): the clean baseline.
    test_fraction : float
        Share of the images in the ``test`` split (seeded, stratified by class).
    n : int, optional
        Use only the first ``n`` digits of a seeded shuffle (default: all 1,797).
    patch : int, optional
        Side of the corner patch in pixels (default ``size // 4``, 4 px at 16 px).

    Returns
    -------
    Path
        ``root``.
    """
    from sklearn.datasets import load_digits

    if not isinstance(size, int) or size < 8:
        raise ConceptLensError(f"the size parameter of generate_decoy_digits must be an integer >= 8; got {size!r}")
    if not 0 < test_fraction < 1:
        raise ConceptLensError(f"the test_fraction parameter of generate_decoy_digits must be in (0, 1); got {test_fraction!r}")
    digits = load_digits()
    images, targets = digits.images, digits.target
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    if n is not None:
        if not isinstance(n, int) or n < 20:
            raise ConceptLensError(f"the n parameter of generate_decoy_digits must be an integer >= 20; got {n!r}")
        order = order[:n]
    split = np.empty(len(images), dtype=object)
    for c in range(10):
        rows = order[targets[order] == c]
        k = max(1, int(round(test_fraction * len(rows))))
        split[rows[:k]], split[rows[k:]] = "test", "train"
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    p = max(1, size // 4) if patch is None else int(patch)
    records = []
    for i in sorted(order.tolist()):
        grey = np.clip(images[i] / 16.0 * 255.0, 0, 255).astype(np.uint8)
        grey = np.asarray(Image.fromarray(grey).resize((size, size), Image.BILINEAR))
        rgb = np.repeat(grey[:, :, None], 3, axis=2)
        mask = np.zeros((size, size), dtype=np.uint8)
        label = int(targets[i])
        corner = int(rng.integers(4))
        colour_class = label if split[i] == "train" else int(rng.integers(10))
        if decoy:
            ys = slice(0, p) if corner < 2 else slice(size - p, size)
            xs = slice(0, p) if corner % 2 == 0 else slice(size - p, size)
            rgb[ys, xs] = DECOY_COLOURS[colour_class]
            mask[ys, xs] = 255
        name = f"{i:04d}.png"
        Image.fromarray(rgb).save(root / "images" / name)
        Image.fromarray(mask).save(root / "masks" / name)
        records.append({"image": f"images/{name}", "split": split[i], "label": str(label),
                        "decoy": str(colour_class) if decoy else "", "corner": CORNERS[corner] if decoy else "",
                        "mask": f"masks/{name}"})
    pd.DataFrame(records).to_csv(root / "manifest.csv", index=False)
    meta = {
        "preset": "decoy_digits",
        "classes": list(DIGIT_CLASSES),
        "config": {"preset": "decoy_digits", "size": size, "seed": seed, "decoy": decoy,
                   "test_fraction": test_fraction, "n": n},
        "planted": {"patch_px": p if decoy else 0, "colours": {c: list(DECOY_COLOURS[k]) for k, c in enumerate(DIGIT_CLASSES)},
                    "train_patch_colour": "label's colour" if decoy else None,
                    "test_patch_colour": "a random class's colour" if decoy else None},
        "source": "sklearn.datasets.load_digits (UCI optical recognition of handwritten digits, test set)",
        "content_hash": hash_tree(root, exclude=("world.json",)),
    }
    (root / "world.json").write_text(json.dumps(meta, indent=2) + "\n")
    return root

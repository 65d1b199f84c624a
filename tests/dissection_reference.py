"""Straightforward reference implementations of network dissection, for tests and the benchmark.

Per image, per unit loops with numpy only (no sparse matrices, no torch): exact quantiles with
``np.quantile``, bilinear upsampling written out (``align_corners=False``), and both category
rules as their definitions say (the netdissect-lite one follows NetDissect-Lite's ``tally_job``
line by line). Also a tiny Broden-format set with every format corner.
"""

import numpy as np

from conceptlens.core.broden import BrodenRecord, write_broden


def reference_quantiles(maps, q):
    """``maps`` ``[N, C, h, w]`` → per-unit ``np.quantile`` over all images and positions."""
    n, c = maps.shape[:2]
    return np.quantile(np.moveaxis(maps, 1, 0).reshape(c, -1), q, axis=1)


def bilinear(fmap, sh, sw):
    """Bilinear resize of a 2-D map to ``(sh, sw)`` with half-pixel centres, borders clamped."""
    h, w = fmap.shape

    def axis(n_out, n_in):
        src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, (src - i0).astype(np.float32)

    y0, y1, ly = axis(sh, h)
    x0, x1, lx = axis(sw, w)
    f = fmap.astype(np.float32)
    top = f[y0][:, x0] * (1 - lx) + f[y0][:, x1] * lx
    bottom = f[y1][:, x0] * (1 - lx) + f[y1][:, x1] * lx
    return top * (1 - ly)[:, None] + bottom * ly[:, None]


def reference_iou(maps, thresholds, broden, rule, labels):
    """IoU ``[units, len(labels)]`` by loops; ``labels`` is a frame with ``number, category``."""
    n, c = maps.shape[:2]
    cats = list(broden.categories)
    main = dict(zip(broden.labels["number"], broden.labels["category"]))
    if rule == "paper":
        keys = list(zip(labels["category"], labels["number"]))
    else:
        keys = list(labels["number"])
    col = {k: j for j, k in enumerate(keys)}
    inter = np.zeros((c, len(keys)))
    unit_cat = np.zeros((c, len(cats)))
    label_area = np.zeros(len(keys))
    for i in range(n):
        ann = broden.annotations(i)
        sh, sw = int(broden.index["sh"].iat[i]), int(broden.index["sw"].iat[i])
        if rule == "paper":
            present = {}
            for cat in cats:
                for entry in ann[cat]:
                    if isinstance(entry, int):
                        present.setdefault((cat, entry), np.zeros((sh, sw), bool))[:] = True
                    else:
                        for number in np.unique(entry):
                            if number:
                                present.setdefault((cat, int(number)), np.zeros((sh, sw), bool))
                                present[(cat, int(number))] |= entry == number
            for key, m in present.items():
                label_area[col[key]] += m.sum()
            for u in range(c):
                if maps[i, u].max() <= thresholds[u]:
                    continue
                mask = bilinear(maps[i, u], sh, sw) > thresholds[u]
                for ci, cat in enumerate(cats):
                    if ann[cat]:
                        unit_cat[u, ci] += mask.sum()
                for key, m in present.items():
                    inter[u, col[key]] += (mask & m).sum()
        else:  # NetDissect-Lite's tally_job
            scalars, pixels = [], []
            for cat in cats:
                for entry in ann[cat]:
                    (scalars if isinstance(entry, int) else pixels).append(entry)
            both = np.zeros((c, broden.max_label + 1))
            labs = np.zeros(broden.max_label + 1)
            for s in scalars:
                labs[s] += sh * sw
            if pixels:
                pixels = np.stack(pixels)
                t = np.bincount(pixels.ravel(), minlength=broden.max_label + 1)
                t[0] = 0
                labs += t
            labelcat = np.zeros((broden.max_label + 1, len(cats)))
            for number, cat in main.items():
                labelcat[number, cats.index(cat)] = 1
            for u in range(c):
                if maps[i, u].max() <= thresholds[u]:
                    continue
                mask = bilinear(maps[i, u], sh, sw) > thresholds[u]
                idx = np.argwhere(mask)
                tally_cat = np.zeros(len(cats))
                if len(pixels):
                    bt = np.bincount(pixels[:, idx[:, 0], idx[:, 1]].ravel(), minlength=broden.max_label + 1)
                    bt[0] = 0
                    tally_cat = bt @ labelcat
                    both[u] += bt
                for s in scalars:
                    tally_cat = tally_cat + labelcat[s]
                    both[u, s] += len(idx)
                unit_cat[u] += len(idx) * (tally_cat > 0)
            for j, number in enumerate(keys):
                inter[:, j] += both[:, number]
                label_area[j] += labs[number]
    if rule == "paper":
        cat_of = [cats.index(k[0]) for k in keys]
        union = unit_cat[:, cat_of] + label_area[None] - inter
        return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
    cat_of = [cats.index(main[k]) for k in keys]
    return inter / (unit_cat[:, cat_of] + label_area[None] - inter + 1e-10)


# Labels of the tiny set: number -> name; 300 needs the green channel (300 = 44 + 256).
TINY_LABELS = {1: "red", 2: "green", 3: "wheel", 4: "door", 5: "street", 6: "lake", 7: "dotted", 300: "window"}


def tiny_broden(directory, n=14, seed=0, size=16, mask=8):
    """A Broden set with every corner: masks smaller than images, two masks in one cell, a mask
    and an image-level label mixed, multi-label scene cells, a label (300) > 255, a label
    ("wheel") in two categories, a sparsely annotated category, one image with another mask size.
    """
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        sh = sw = mask if i != 3 else mask + 2
        def blobs(choices, p=0.5):
            m = np.zeros((sh, sw), dtype=np.int32)
            for number in choices:
                y, x = rng.integers(0, sh - 2), rng.integers(0, sw - 2)
                hh, ww = rng.integers(2, sh // 2 + 2), rng.integers(2, sw // 2 + 2)
                if rng.random() < p + 0.3:
                    m[y:y + hh, x:x + ww] = number
            return m
        ann = {"color": [blobs([1, 2])], "object": [blobs([3, 4, 300])]}
        if i % 3 == 0:
            ann["color"].append(blobs([2]))  # two masks in one cell
        if i % 2 == 0:
            ann["part"] = [blobs([3, 300])]  # "wheel" and "window" also parts, only on some images
        ann["scene"] = [5, 6] if i % 4 == 0 else [int(rng.choice([5, 6]))]
        if i % 5 == 1:
            ann["texture"] = [7, blobs([7])]  # an image-level label and a mask in one cell
        elif i % 5 == 2:
            ann["texture"] = [blobs([7])]
        px = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        records.append(BrodenRecord(image=f"im/{i:03d}.png", split="train", ih=size, iw=size, sh=sh, sw=sw,
                                    annotations=ann, pixels=px))
    write_broden(directory, records, TINY_LABELS, categories=("color", "object", "part", "scene", "texture"))
    return directory

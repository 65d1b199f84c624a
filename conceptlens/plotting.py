"""All drawing: the report's figures and the image galleries of the CLI and the report.

Analyzers return data (maps, masks, top images); this module turns it into pictures, so the CLI
galleries and the report draw the same things the same way:

* figures (matplotlib, Agg backend: no display needed), written as PNG files: confusion matrices,
  grouped bars with CIs, metrics over depth, embedding scatters, the heatmap colour scale;
* images as ``uint8 [H, W, 3]`` arrays: attribution heatmaps and overlays, dissection unit panels
  (image dimmed outside the unit's mask, outlines of the unit and label masks), strips of panels;
* galleries written to a folder: :func:`write_explanation_gallery` (``conceptlens attribute``) and
  :func:`write_unit_gallery` (``conceptlens dissect``).

A heatmap maps each pixel's relevance to a colour (diverging ``bwr`` for signed methods,
``inferno`` for non-negative ones) scaled by the map's 99.5th percentile of magnitudes; an overlay
blends it over the de-normalised input in proportion to the relevance magnitude.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402
from scipy import ndimage  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

__all__ = ["confusion_plot", "grouped_bars", "depth_plot", "scatter_plot", "heatmap_scale", "heatmap_rgb", "overlay_rgb",
           "unit_panel", "enlarge", "fit_height", "topk_thumbnail", "strip", "grid", "save_png", "write_explanation_gallery", "write_unit_gallery",
           "decision_tree_plot", "prototype_strip", "write_mode_gallery"]


def _save(fig, path):
    fig.tight_layout()
    # Fast PNG compression: the report's figures are small, and writing them dominates rendering.
    fig.savefig(path, dpi=90, pil_kwargs={"compress_level": 1})
    plt.close(fig)
    return path


def confusion_plot(matrix, path, title):
    """Heatmap of a confusion-matrix DataFrame (rows true, columns predicted)."""
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(matrix), 1.0 + 0.6 * len(matrix)))
    ax.imshow(matrix.to_numpy(), cmap="Blues")
    ax.set_xticks(range(len(matrix.columns)), matrix.columns, rotation=45, ha="right")
    ax.set_yticks(range(len(matrix.index)), matrix.index)
    for (i, j), v in np.ndenumerate(matrix.to_numpy()):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def grouped_bars(frame, group, bar, value, low, high, path, title, ylabel, reference=None, marks=None):
    """Bars of ``value`` with CI whiskers ``[low, high]``, grouped by ``group``, one colour per ``bar``.

    ``marks`` (a boolean column) puts a star above significant bars; ``reference`` draws a line.
    """
    groups = list(dict.fromkeys(frame[group]))
    bars = list(dict.fromkeys(frame[bar]))
    width = 0.8 / max(1, len(bars))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(groups) * len(bars) + 2), 3.2))
    for k, b in enumerate(bars):
        sub = frame[frame[bar] == b].set_index(group).reindex(groups)
        x = np.arange(len(groups)) + (k - (len(bars) - 1) / 2) * width
        y = sub[value].to_numpy(dtype=float)
        err = np.vstack([y - sub[low].to_numpy(dtype=float), sub[high].to_numpy(dtype=float) - y])
        # Clipped: a score interval's bound can sit a rounding error inside its estimate at 0 or 1.
        ax.bar(x, y, width, yerr=np.clip(np.nan_to_num(err), 0, None), capsize=2, label=str(b))
        if marks is not None:
            for xi, yi, m in zip(x, sub[high].to_numpy(dtype=float), sub[marks].to_numpy()):
                if m is True or m == 1:
                    ax.text(xi, yi + 0.02, "*", ha="center", fontsize=12)
    if reference is not None:
        ax.axhline(reference, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(groups)), [str(g) for g in groups], rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=min(4, len(bars)))
    return _save(fig, path)


def depth_plot(frame, x, group, lines, path, title, ylabel):
    """Per ``group`` value one colour, per ``(column, label, style)`` of ``lines`` one line style,
    over the ordered ``x`` values (layer depth)."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    cmap = plt.get_cmap("tab10")
    for i, (name, g) in enumerate(frame.groupby(group, sort=False)):
        for column, label, style in lines:
            ax.plot(g[x], g[column], style, color=cmap(i % 10), marker="o", ms=3,
                    label=f"{name}: {label}")
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    ax.set_ylim(-0.05, 1.05)
    return _save(fig, path)


def scatter_plot(xy, values, path, title):
    """2-D embedding scatter coloured by a categorical ``values`` array."""
    fig, ax = plt.subplots(figsize=(4.6, 4.0))
    # Sorted, not first-seen: the same class gets the same colour in every panel (label, true_label, ...).
    cats = sorted(dict.fromkeys(values), key=str)
    cmap = plt.get_cmap("tab10" if len(cats) <= 10 else "tab20")
    for i, c in enumerate(cats):
        m = values == c
        ax.scatter(xy[m, 0], xy[m, 1], s=6, color=cmap(i % cmap.N), label=str(c))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)
    if len(cats) <= 12:
        ax.legend(fontsize=7, markerscale=2, loc="best")
    return _save(fig, path)


def decision_tree_plot(nodes, path, title):
    """The decision-mode tree: one box per node (id, size, leading group and share, fidelity R^2),
    leaves in depth-first order along the bottom, each parent above the middle of its children."""
    nodes = nodes.set_index("node")
    x, leaves = {}, []

    def place(v):  # iterative depth-first walk: the tree is shallow, but keep it stack-safe
        stack = [(v, False)]
        while stack:
            n, seen = stack.pop()
            if nodes.at[n, "mode"]:
                x[n] = len(leaves)
                leaves.append(n)
            elif seen:
                x[n] = (x[int(nodes.at[n, "left"])] + x[int(nodes.at[n, "right"])]) / 2
            else:
                stack += [(n, True), (int(nodes.at[n, "right"]), False), (int(nodes.at[n, "left"]), False)]

    place(int(nodes.index[0]))
    depth = nodes["depth"].max()
    fig, ax = plt.subplots(figsize=(1.0 + 1.9 * len(leaves), 1.2 + 1.1 * (depth + 1)))
    for n, row in nodes.iterrows():
        if row["parent"] >= 0:
            p = int(row["parent"])
            ax.plot([x[p], x[n]], [-nodes.at[p, "depth"], -row["depth"]], color="0.6", lw=1, zorder=1)
    for n, row in nodes.iterrows():
        fid = "" if pd.isna(row["fidelity_r2"]) else f"\nR² {row['fidelity_r2']:.2f}"
        text = f"#{n}  n={row['size']}\n{row['leading']}\n{row['leading_share']:.2f}{fid}"
        ax.text(x[n], -row["depth"], text, ha="center", va="center", fontsize=7, zorder=2,
                bbox={"boxstyle": "round", "fc": "#fde0c5" if row["mode"] else "#e8eef7", "ec": "0.5"})
    ax.set_xlim(-0.7, len(leaves) - 0.3)
    ax.set_ylim(-depth - 0.6, 0.6)
    ax.axis("off")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def heatmap_scale(path, signed=True):
    """Colour scale of the attribution heatmaps (``heatmap_rgb``): each map is scaled to ``s``, the
    99.5th percentile of its own ``|relevance|``, so colours compare regions within a map, not maps."""
    fig, ax = plt.subplots(figsize=(4.2, 0.75))
    ramp = np.linspace(-1 if signed else 0, 1, 256)[None, :]
    ax.imshow(ramp, cmap="bwr" if signed else "inferno", aspect="auto", vmin=-1 if signed else 0, vmax=1,
              extent=(ramp.min(), 1, 0, 1))
    ticks = [-1, 0, 1] if signed else [0, 1]
    names = {-1: "−s: against the class", 0: "0", 1: "+s: for the class"}
    ax.set_xticks(ticks, [names[t] for t in ticks], fontsize=7)
    ax.set_yticks([])
    ax.set_title("relevance, s = 99.5th percentile of |relevance| in each map", fontsize=7)
    return _save(fig, path)


# --------------------------------------------------------------------------- images


def save_png(image, path):
    """Write a ``uint8 [H, W, 3]`` array as PNG (fast compression: galleries have many small files)."""
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(path, compress_level=1)
    return path


def heatmap_rgb(a, signed=True):
    """RGB uint8 ``[H, W, 3]`` of one map: ``bwr`` in ``[-s, s]`` (signed) or ``inferno`` in ``[0, s]``,
    ``s`` = the 99.5th percentile of ``|a|``."""
    a = np.asarray(a, dtype=np.float32)
    scale = float(np.quantile(np.abs(a), 0.995)) or float(np.abs(a).max()) or 1.0
    if signed:
        rgba = matplotlib.colormaps["bwr"](np.clip(a / scale, -1, 1) * 0.5 + 0.5)
    else:
        rgba = matplotlib.colormaps["inferno"](np.clip(a / scale, 0, 1))
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def overlay_rgb(image, a, signed=True):
    """The heatmap of ``a`` over ``image`` (uint8 ``[H, W, 3]``), opaque where the relevance is large."""
    heat = heatmap_rgb(a, signed).astype(np.float32)
    mag = np.abs(np.asarray(a, dtype=np.float32))
    alpha = np.clip(mag / (float(np.quantile(mag, 0.995)) or 1.0), 0, 1)[..., None] * 0.75
    return (image * (1 - alpha) + heat * alpha).round().clip(0, 255).astype(np.uint8)


def _edge(mask):
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def unit_panel(image, unit_mask, label_mask):
    """Image dimmed outside the unit's mask; yellow outline of the unit mask, cyan of the label's."""
    out = image.astype(np.float32)
    out[~unit_mask] *= 0.3
    out = out.astype(np.uint8)
    out[_edge(unit_mask)] = (255, 220, 0)
    out[_edge(label_mask)] = (0, 230, 255)
    return out


def enlarge(image, size):
    """Nearest-neighbour resize of a uint8 image to ``size x size`` (prototype maps stay blocky)."""
    return np.asarray(Image.fromarray(np.asarray(image, dtype=np.uint8)).resize((size, size), Image.NEAREST))


def fit_height(image, height):
    """Bilinear resize of a uint8 ``[H, W, 3]`` image to ``height`` rows, keeping its aspect ratio
    (a feature visualisation beside dissection panels of another size)."""
    h, w = image.shape[:2]
    width = max(1, round(w * height / h))
    return np.asarray(Image.fromarray(np.asarray(image, dtype=np.uint8)).resize((width, height), Image.BILINEAR))


def topk_thumbnail(path, y, x, height, width, size=64):
    """An image resized to ``size x size`` with a magenta mark on the argmax cell ``(y, x)`` of a
    ``height x width`` map (no mark for ``y < 0``: vector outputs)."""
    with Image.open(path) as im:
        thumb = np.array(im.convert("RGB").resize((size, size)))
    if y >= 0:
        cy, cx = int((y + 0.5) * size / height), int((x + 0.5) * size / width)
        thumb[max(0, cy - 1):cy + 2, max(0, cx - 1):cx + 2] = (255, 0, 255)
    return thumb


def grid(panels, columns=16, gap=2):
    """Panels in rows of ``columns`` (each row a :func:`strip`) on white, ``gap`` pixels apart."""
    rows = [strip(panels[i:i + columns], gap) for i in range(0, len(panels), columns)]
    out = np.full((sum(r.shape[0] for r in rows) + gap * (len(rows) - 1), max(r.shape[1] for r in rows), 3), 255,
                  dtype=np.uint8)
    y = 0
    for r in rows:
        out[y:y + r.shape[0], : r.shape[1]] = r
        y += r.shape[0] + gap
    return out


def strip(panels, gap=2):
    """Panels side by side on white, ``gap`` pixels apart, top-aligned."""
    h = max(p.shape[0] for p in panels)
    w = sum(p.shape[1] for p in panels) + gap * (len(panels) - 1)
    out = np.full((h, w, 3), 255, dtype=np.uint8)
    x = 0
    for p in panels:
        out[: p.shape[0], x: x + p.shape[1]] = p
        x += p.shape[1] + gap
    return out


# --------------------------------------------------------------------------- galleries


def write_explanation_gallery(expl, directory):
    """``heatmaps/<method>/<i>.png``, ``overlays/<method>/<i>.png`` (``i`` = position in the rows) and
    ``index.json`` (methods, per image its row and PNG paths, skipped images) for
    :class:`~conceptlens.attribution.Explanations`."""
    d = Path(directory)
    methods = expl.method_info()
    entries = [{**{k: (v.item() if isinstance(v, np.generic) else v) for k, v in row.items()}, "position": i,
                "heatmaps": {}, "overlays": {}} for i, row in enumerate(expl.rows.to_dict("records"))]
    for m, signed in ((info["name"], info["signed"]) for info in methods):
        for kind in ("heatmaps", "overlays"):
            (d / kind / m).mkdir(parents=True, exist_ok=True)
        for i, a in enumerate(expl.maps[m]):
            save_png(heatmap_rgb(a, signed), d / "heatmaps" / m / f"{i:05d}.png")
            save_png(overlay_rgb(expl.images[i], a, signed), d / "overlays" / m / f"{i:05d}.png")
            entries[i]["heatmaps"][m] = f"heatmaps/{m}/{i:05d}.png"
            entries[i]["overlays"][m] = f"overlays/{m}/{i:05d}.png"
    index = {"methods": methods, "images": entries, "skipped": [dict(s) for s in expl.skipped]}
    (d / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    return d / "index.json"


def write_unit_gallery(result, broden, directory, progress=False):
    """``units/<layer>/unit_NNNN.png`` (a strip of the unit's top images, see :func:`unit_panel`) for
    every live unit of a :class:`~conceptlens.dissection.DissectionResult`, and ``images.csv``
    (``layer, unit, path``, paths relative to ``directory``). Returns the listing."""
    d = Path(directory)
    listing, cache = [], {}
    for layer in result.layers:
        (d / "units" / layer.replace("/", "_")).mkdir(parents=True, exist_ok=True)
        live = result.units[(result.units["layer"] == layer) & ~result.units["dead"].astype(bool)]["unit"]
        for unit in tqdm(live.tolist(), desc=f"draw {layer}", unit="unit", disable=not progress):
            panels = [unit_panel(*p) for p in result.unit_panels(layer, unit, broden, cache=cache)]
            if panels:
                rel = Path("units") / layer.replace("/", "_") / f"unit_{unit:04d}.png"
                save_png(strip(panels), d / rel)
                listing.append({"layer": layer, "unit": int(unit), "path": rel.as_posix()})
    frame = pd.DataFrame(listing, columns=["layer", "unit", "path"])
    frame.to_csv(d / "images.csv", index=False)
    return frame


def prototype_strip(tree, node, root, size=64):
    """A strip of a decision node's prototype images (paths in the tree's ``images`` table are relative
    to ``root``, the manifest's folder), or ``None`` when it has none."""
    paths = tree.images.set_index("manifest_row")["image"]
    rows = [int(r) for r in str(tree.nodes.set_index("node").at[node, "prototypes"]).split()]
    if not rows:
        return None
    return strip([enlarge(np.asarray(Image.open(Path(root) / paths[r]).convert("RGB")), size) for r in rows])


def write_mode_gallery(tree, root, directory):
    """``modes/node_NN.png`` (:func:`prototype_strip` of every node of a
    :class:`~conceptlens.decision.DecisionTreeResult`) and ``modes/images.csv`` (``node, path``)."""
    d = Path(directory)
    (d / "modes").mkdir(parents=True, exist_ok=True)
    listing = []
    for node in tree.nodes["node"]:
        panel = prototype_strip(tree, node, root)
        if panel is not None:
            rel = Path("modes") / f"node_{node:02d}.png"
            save_png(panel, d / rel)
            listing.append({"node": int(node), "path": rel.as_posix()})
    frame = pd.DataFrame(listing, columns=["node", "path"])
    frame.to_csv(d / "modes" / "images.csv", index=False)
    return frame

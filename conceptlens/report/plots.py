"""Matplotlib figures of the report, written as PNG files (Agg backend: no display needed)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["confusion_plot", "grouped_bars", "depth_plot", "scatter_plot", "heatmap_scale"]


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
        ax.bar(x, y, width, yerr=np.nan_to_num(err), capsize=2, label=str(b))
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

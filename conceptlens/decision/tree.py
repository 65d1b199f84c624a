"""Decision modes: a tree of the rationales a class logit relies on (after Zhang et al., CVPR 2019).

Each image of a class gets its vector of unit contributions to the class logit (gradient x
activation at one layer, :mod:`.contributions`), normalised to shares of its total magnitude.
Images with similar share vectors are merged bottom-up (Ward linkage, scipy) into one tree; its top
``n_modes - 1`` merges are kept. The leaves of that tree are the *decision modes* (specific
rationales of groups of images), the root is what the class relies on overall. Each node records
its size, mean shares per unit group (a dissection's concept labels), prototype images and the
**fidelity** of one shared linear rationale: how well ``g_node . a_i + b`` (``g_node`` the mean
gradient of its images) reproduces its images' logits.

Departure from the paper: Zhang et al. merge the pair of nodes that best keeps the likelihood of a
sparse shared rationale (re-fitting a sparse ``g`` per merge, on a CNN trained to have part
filters). Here the merge rule is Ward's (the pair whose union least increases the within-node
variance of the share vectors), which needs no re-fit and works on any CNN; a node's rationale is
its images' mean gradient, not a sparse fit, and its fidelity says how far that holds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..core.result import Result, provenance
from ..data import Manifest
from ..errors import ConceptLensError
from ..models import load_model
from .contributions import MEMORY_BUDGET, unit_contributions

__all__ = ["DecisionTreeResult", "decision_tree", "UNLABELLED"]

UNLABELLED = "unlabelled"
_SELECT = ("label", "predicted")


def _shares(cells):
    """Contributions as shares of their total magnitude, per image (all-zero rows stay zero)."""
    flat = cells.reshape(len(cells), -1)
    total = np.abs(flat).sum(1, keepdims=True)
    return np.divide(flat, total, out=np.zeros_like(flat), where=total > 0), total[:, 0]


def _cell_names(k):
    if k == 1:
        return [""]
    if k == 2:
        return ["top-left", "top-right", "bottom-left", "bottom-right"]
    return [f"cell {r},{c}" for r in range(k) for c in range(k)]


def _group_matrix(groups, k, by_cell=False):
    """``[C*k*k, G]`` one-hot of each feature's unit group (or group and grid cell), and the names."""
    cells = _cell_names(k)
    keys = [(g, c if by_cell else "") for g in groups for c in cells]
    column = {key: i for i, key in enumerate(dict.fromkeys(keys))}
    onehot = np.zeros((len(keys), len(column)))
    onehot[np.arange(len(keys)), [column[key] for key in keys]] = 1
    return onehot, [f"{g} @ {c}" if c else g for g, c in column]


def _unit_groups(unit_labels, n_units):
    """Group name of each unit: its label (``unit_labels``), else ``unit U`` (no labels given)."""
    if unit_labels is None:
        return [f"unit {u}" for u in range(n_units)]
    labels = pd.Series(unit_labels) if not isinstance(unit_labels, pd.DataFrame) else \
        unit_labels.set_index("unit")["label"]
    bad = [u for u in labels.index if not 0 <= int(u) < n_units]
    if bad:
        raise ConceptLensError(f"unit labels name unit {bad[0]} but the layer has units 0..{n_units - 1}; "
                               "give the labels of this layer")
    out = [UNLABELLED] * n_units
    for u, name in labels.items():
        if isinstance(name, str) and name:
            out[int(u)] = name
    return out


def _ward_linkage(x, block=1024):
    """scipy's Ward linkage of the rows of ``x``, its condensed Euclidean distances computed from row
    blocks of the Gram matrix (BLAS): a third of the time of ``scipy.spatial.distance.pdist`` at
    5,000 x 256, and never more than ``block x N`` distances beyond the condensed matrix itself."""
    from scipy.cluster.hierarchy import linkage

    x = np.ascontiguousarray(x, dtype=np.float64)
    n = len(x)
    sq = np.einsum("ij,ij->i", x, x)
    condensed = np.empty(n * (n - 1) // 2)
    pos = 0
    for start in range(0, n, block):
        stop = min(n, start + block)
        d = sq[start:stop, None] + sq[None, :] - 2 * (x[start:stop] @ x.T)
        np.sqrt(np.maximum(d, 0, out=d), out=d)
        for r in range(start, stop):  # row r's distances to rows r+1.. are contiguous in the condensed form
            condensed[pos:pos + n - r - 1] = d[r - start, r + 1:]
            pos += n - r - 1
    return linkage(condensed, method="ward")


def _cut(linkage_matrix, n, n_modes):
    """The top of the dendrogram: ``(order, children, modes)`` with nodes as linkage ids.

    ``order`` lists the kept nodes breadth-first from the root; ``children`` maps each internal
    node to its two children; ``modes`` are the kept leaves. Ward heights only grow, so the last
    ``n_modes - 1`` merges are exactly the nodes above the ``n_modes`` subtrees.
    """
    top = set(range(2 * n - n_modes, 2 * n - 1))
    order, children, modes, queue = [], {}, [], [2 * n - 2]
    while queue:
        node = queue.pop(0)
        order.append(node)
        if node in top:
            a, b = (int(v) for v in linkage_matrix[node - n, :2])
            children[node] = (a, b)
            queue += [a, b]
        else:
            modes.append(node)
    return order, children, modes


def _members(linkage_matrix, n, modes):
    """Leaf images under each mode id (iteratively: deep dendrograms overflow recursion)."""
    out = {}
    for mode in modes:
        stack, got = [mode], []
        while stack:
            v = stack.pop()
            if v < n:
                got.append(v)
            else:
                stack += [int(linkage_matrix[v - n, 0]), int(linkage_matrix[v - n, 1])]
        out[mode] = np.sort(np.asarray(got, dtype=np.int64))
    return out


def _fidelity(logits, shared, own, members):
    """R^2 of the node's shared ``g_node . a_i + b`` for its logits (NaN below 3 images or for constant
    logits), its mean absolute error in logits, and the R^2 of each image's own ``g_i . a_i + b``."""
    y = logits[members]
    if len(members) < 3 or np.ptp(y) == 0:
        return np.nan, np.nan, np.nan
    sst = ((y - y.mean()) ** 2).sum()

    def r2(pred):
        resid = y - pred - (y - pred).mean()  # the intercept b is the mean offset
        return 1 - (resid ** 2).sum() / sst, np.abs(resid).mean()

    (shared_r2, mae), (own_r2, _) = r2(shared), r2(own[members])
    return float(shared_r2), float(mae), float(own_r2)


def _shared_predictions(got, members, modes, order, children):
    """``{node: g_node . a_i for its images}`` from one pass over the maps: the mean gradient of a node
    is the size-weighted mean of its modes' mean gradients, so ``a_i . g_mode`` for every image and
    mode (``[N, K]``) gives every node's predictions."""
    per_mode = got.dot_maps(got.mean_gradients([members[m] for m in modes]))
    weights = {m: np.eye(len(modes))[k] for k, m in enumerate(modes)}
    for node in reversed(order):
        if node in children:
            a, b = children[node]
            na, nb = len(members[a]), len(members[b])
            weights[node] = (na * weights[a] + nb * weights[b]) / (na + nb)
    return {node: per_mode[members[node]] @ weights[node] for node in order}


def _rationale(shares, names, k=3):
    order = np.argsort(-shares)[:k]
    return ", ".join(f"{names[i]} {shares[i]:.2f}" for i in order)


@dataclass(frozen=True)
class DecisionTreeResult(Result):
    """A class's decision modes.

    Attributes
    ----------
    nodes : DataFrame
        One row per node, root first (breadth-first): ``node, parent, left, right, depth, mode``
        (a leaf of the tree), ``size, fraction, height`` (Ward merge distance), ``leading`` and
        ``leading_share`` (the unit group, at a grid cell when ``cells > 1``, with the largest mean
        share), ``rationale`` (the top three), ``fidelity_r2`` (shared ``g_node``), ``fidelity_mae`` (logits), ``own_r2`` (each
        image's own ``g_i``, the best a first-order rationale can do), ``logit_mean``,
        ``prototypes`` (manifest rows, space-separated).
    node_groups : DataFrame
        ``node`` x unit group: mean share of each group (rows as ``nodes``).
    node_places : DataFrame
        ``node`` x ``group @ cell``: the same per grid cell of the map (``cells > 1``); ``leading``
        and ``rationale`` read this table.
    node_directions : DataFrame or None
        ``node`` x concept direction: mean share of the logit through each CAV.
    images : DataFrame
        ``manifest_row, image, logit, first_order, mode``: each image's logit, ``g . a`` and mode.
    image_groups : DataFrame
        Per image (rows as ``images``): share of each unit group.
    unit_groups : DataFrame
        ``unit, group``: what the groups are made of.
    centroids : ndarray [n_nodes, C*K*K]
        Mean share vector of each node (routing new images).
    provenance : dict
    skipped : tuple of dict
        Images left out as unreadable (``skip_bad``): ``{manifest_row, image, error}``.
    """

    nodes: pd.DataFrame = field(repr=False)
    node_groups: pd.DataFrame = field(repr=False)
    node_places: pd.DataFrame = field(repr=False)
    images: pd.DataFrame = field(repr=False)
    image_groups: pd.DataFrame = field(repr=False)
    unit_groups: pd.DataFrame = field(repr=False)
    centroids: np.ndarray = field(repr=False)
    provenance: dict = field(repr=False)
    node_directions: pd.DataFrame | None = field(default=None, repr=False)
    skipped: tuple = ()

    KIND, META = "decision-tree", "decision_tree.json"

    @property
    def modes(self):
        """The leaves of the tree (the decision modes), largest first."""
        return self.nodes[self.nodes["mode"]].sort_values(["size", "node"], ascending=[False, True])

    def to_frame(self):
        return self.nodes

    def members(self, node):
        """Manifest rows of the images under ``node``."""
        leaves = self._leaves_under(int(node))
        return self.images.loc[self.images["mode"].isin(leaves), "manifest_row"].to_numpy()

    def _leaves_under(self, node):
        nodes = self.nodes.set_index("node")
        stack, out = [node], []
        while stack:
            v = stack.pop()
            if nodes.at[v, "mode"]:
                out.append(v)
            else:
                stack += [int(nodes.at[v, "left"]), int(nodes.at[v, "right"])]
        return out

    def route(self, model, data, rows=None, preprocessing=None, batch_size=64, skip_bad=False, progress=False):
        """Route images to their decision mode, with their rationale.

        Each image's share vector descends from the root to the child whose centroid is nearer
        (Euclidean, as Ward's merge criterion measures), down to a mode.

        Parameters
        ----------
        model : LoadedModel or str
            The model the tree was built on (its weights hash is checked).
        data : Manifest or path
        rows : array of int, optional
            Manifest rows (default all).
        preprocessing : Preprocessing, optional
        skip_bad : bool
            Leave unreadable images out (a warning names each) instead of failing.

        Returns
        -------
        DataFrame
            ``manifest_row, image, mode, path, logit, first_order, leading, rationale, mode_rationale``.
        """
        model = load_model(model) if isinstance(model, str) else model
        params = self.provenance["parameters"]
        weights = self.provenance.get("weights_hash")
        if weights and getattr(model, "weights_hash", None) not in (None, weights):
            raise ConceptLensError("the model's weights differ from those the decision tree was built on; "
                                   "build the tree again for this model")
        manifest = data if isinstance(data, Manifest) else Manifest.read(data)
        rows = np.arange(len(manifest.frame)) if rows is None else np.asarray(rows, dtype=np.int64)
        prep = model.preprocessing_for(manifest, preprocessing)
        got = unit_contributions(model, manifest, rows, params["layer"], params["target"], prep, cells=params["cells"],
                                 batch_size=batch_size, skip_bad=skip_bad, progress=progress)
        rows = got.rows
        shares, _ = _shares(got.cells)
        if shares.shape[1] != self.centroids.shape[1]:
            raise ConceptLensError(f"layer {params['layer']!r} gives {shares.shape[1]} features per image; the tree has "
                                   f"{self.centroids.shape[1]}: route with the model the tree was built on")
        nodes = self.nodes.set_index("node")  # node ids are the rows of nodes and centroids, root first
        current = np.zeros(len(rows), dtype=np.int64)  # the root
        paths = [["0"] for _ in rows]
        while True:
            inner = ~nodes.loc[current, "mode"].to_numpy(bool)
            if not inner.any():
                break
            idx = np.flatnonzero(inner)
            left = nodes.loc[current[idx], "left"].to_numpy(int)
            right = nodes.loc[current[idx], "right"].to_numpy(int)
            dl = ((shares[idx] - self.centroids[left]) ** 2).sum(1)
            dr = ((shares[idx] - self.centroids[right]) ** 2).sum(1)
            current[idx] = np.where(dl <= dr, left, right)
            for i in idx:
                paths[i].append(str(current[i]))
        by_place = shares @ _group_matrix(self.unit_groups["group"].tolist(), params["cells"], by_cell=True)[0]
        places = self.node_places.columns[1:].tolist()
        return pd.DataFrame({
            "manifest_row": rows, "image": manifest.frame["image"].to_numpy()[rows], "mode": current,
            "path": [">".join(p) for p in paths], "logit": got.logits, "first_order": got.linear,
            "leading": [places[i] for i in by_place.argmax(1)],
            "rationale": [_rationale(v, places) for v in by_place],
            "mode_rationale": nodes.loc[current, "rationale"].to_numpy(),
        })

    def _write(self, d):
        self.nodes.to_csv(d / "nodes.csv", index=False)
        self.node_groups.to_csv(d / "node_groups.csv", index=False)
        self.node_places.to_csv(d / "node_places.csv", index=False)
        self.images.to_csv(d / "images.csv", index=False)
        self.image_groups.to_csv(d / "image_groups.csv", index=False)
        self.unit_groups.to_csv(d / "unit_groups.csv", index=False)
        np.save(d / "centroids.npy", self.centroids)
        if self.node_directions is not None:
            self.node_directions.to_csv(d / "node_directions.csv", index=False)
        return {"directions": self.node_directions is not None, "skipped": list(self.skipped)}

    @classmethod
    def _read(cls, d, meta):
        def csv(name):
            return pd.read_csv(d / name, keep_default_na=False, na_values=[""])

        nodes = csv("nodes.csv")
        nodes["prototypes"] = nodes["prototypes"].fillna("").astype(str)
        return cls(nodes=nodes, node_groups=csv("node_groups.csv"), node_places=csv("node_places.csv"), images=csv("images.csv"),
                   image_groups=csv("image_groups.csv"), unit_groups=csv("unit_groups.csv"),
                   centroids=np.load(d / "centroids.npy", allow_pickle=False), provenance=meta["provenance"],
                   node_directions=csv("node_directions.csv") if meta.get("directions") else None,
                   skipped=tuple(meta.get("skipped", ())))


def _check(n_modes, cells, prototypes, select, max_images):
    for name, value, low in (("n_modes", n_modes, 1), ("cells", cells, 1), ("prototypes", prototypes, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ConceptLensError(f"{name} must be an integer >= {low}; got {value!r}")
    if select not in _SELECT:
        raise ConceptLensError(f"select must be one of {', '.join(_SELECT)}; got {select!r}")
    if max_images is not None and (isinstance(max_images, bool) or not isinstance(max_images, (int, np.integer)) or max_images < 2):
        raise ConceptLensError(f"max_images must be an integer >= 2 or None; got {max_images!r}")


def _selected_rows(manifest, split, select, class_name):
    frame = manifest.frame
    keep = manifest.split_mask(split, hint="pick another split or drop it (--split)")
    if select == "label":
        if "label" not in frame.columns:
            raise ConceptLensError(f"manifest {manifest.path} has no 'label' column; use select='predicted' "
                                   "(--select predicted) to explain the images the model assigns to the class")
        keep &= (frame["label"].astype(str) == class_name).to_numpy()
        if not keep.any():
            raise ConceptLensError(f"manifest {manifest.path} has no images labelled {class_name!r}"
                                   + (f" in split {split!r}" if split else "")
                                   + f"; labels: {', '.join(sorted(map(str, frame['label'].unique()))[:20])}")
    return np.flatnonzero(keep)


def _directions(directions):
    if directions is None:
        return None, []
    if not isinstance(directions, dict) or not directions:
        raise ConceptLensError("directions must be a non-empty {concept: vector} mapping (e.g. TCAVResult.concept_directions)")
    names = [str(k) for k in directions]
    v = np.stack([np.asarray(directions[k], dtype=np.float64).ravel() for k in directions])
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ConceptLensError(f"concept direction {names[int(np.flatnonzero(norms[:, 0] == 0)[0])]!r} is all zeros")
    return (v / norms).astype(np.float32), names


def decision_tree(model, data, layer, target, *, split=None, select="label", unit_labels=None, directions=None,
                  n_modes=8, cells=2, prototypes=6, max_images=None, seed=0, batch_size=64, num_workers=0,
                  skip_bad=False, preprocessing=None, memory_budget=MEMORY_BUDGET, progress=True):
    """Build the decision-mode tree of one class at one layer.

    Parameters
    ----------
    model : LoadedModel or str
        The classifier (a model spec is loaded).
    data : Manifest or path
        The manifest.
    layer : str
        A convolutional layer (``conceptlens layers MODEL``); a post-ReLU layer makes ``g . a`` the
        part of the logit the layer's units carry.
    target : str or int
        The class (name or logit index).
    split : str, optional
        Only rows of this split.
    select : {"label", "predicted"}
        The images explained: those labelled ``target``, or those the model assigns to it.
    unit_labels : DataFrame or mapping, optional
        ``unit -> concept label`` (e.g. ``DissectionResult.unit_labels(layer)``; empty labels are
        ``unlabelled``). Contributions are then read per concept; without it, per unit.
    directions : mapping, optional
        ``{concept: vector}`` CAV directions of this layer (``TCAVResult.concept_directions``): the
        share of the logit through each is reported per node.
    n_modes : int, default 8
        Leaves of the tree (fewer when there are fewer images).
    cells : int, default 2
        Each unit's contribution is split over a ``cells x cells`` grid of its map before the
        merging, so that a unit used in one place (a corner watermark) and the same unit used
        elsewhere are different rationales; 1 = one number per unit, as in the paper.
    prototypes : int, default 6
        Images per node nearest to its mean share vector.
    max_images : int, optional
        At most this many images (a seeded subsample).
    seed : int
        Seeds the subsample; the tree itself has no random step.
    batch_size, num_workers, skip_bad, preprocessing, memory_budget, progress :
        Loader options (``skip_bad``: unreadable images are left out and listed in ``skipped``); the
        bytes allowed for the kept gradients and maps; progress bars.

    Returns
    -------
    DecisionTreeResult
    """
    t0 = time.perf_counter()
    _check(n_modes, cells, prototypes, select, max_images)
    model = load_model(model) if isinstance(model, str) else model
    manifest = data if isinstance(data, Manifest) else Manifest.read(data)
    index = model.class_index(str(target))
    class_name = model.classes[index] if getattr(model, "classes", None) else str(index)
    rows = _selected_rows(manifest, split, select, class_name)
    if select == "label" and max_images is not None and len(rows) > max_images:
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=max_images, replace=False))
    dirs, dir_names = _directions(directions)
    prep = model.preprocessing_for(manifest, preprocessing)
    got = unit_contributions(model, manifest, rows, layer, index, prep, cells=cells, directions=dirs,
                             batch_size=batch_size, num_workers=num_workers, skip_bad=skip_bad, progress=progress,
                             memory_budget=memory_budget)
    keep = np.arange(len(rows))
    if select == "predicted":
        keep = np.flatnonzero(got.predicted == index)
        if max_images is not None and len(keep) > max_images:
            keep = np.sort(np.random.default_rng(seed).choice(keep, size=max_images, replace=False))
    if len(keep) < 2:
        raise ConceptLensError(f"only {len(keep)} image(s) of class {class_name!r} to explain; a tree needs at least 2")
    if len(keep) < len(got.rows):  # copies the kept maps: only when some images are left out
        got = got.take(keep)
    t_gradients = time.perf_counter() - t0

    n = len(got.rows)
    n_units = got.cells.shape[1]
    shares, total = _shares(got.cells)
    groups = _unit_groups(unit_labels, n_units)
    onehot, group_names = _group_matrix(groups, cells)
    by_group = shares @ onehot
    onehot, place_names = _group_matrix(groups, cells, by_cell=True)
    by_place = shares @ onehot
    z = _ward_linkage(shares)
    order, children, modes = _cut(z, n, min(n_modes, n))
    members = _members(z, n, modes)
    for node in reversed(order):  # internal nodes hold their children's images
        if node in children:
            members[node] = np.sort(np.concatenate([members[c] for c in children[node]]))
    ids = {node: i for i, node in enumerate(order)}
    parent = {c: p for p, pair in children.items() for c in pair}
    depth = {order[0]: 0}
    for node in order[1:]:
        depth[node] = depth[parent[node]] + 1

    shared = _shared_predictions(got, members, modes, order, children)
    mode_of = np.empty(n, dtype=np.int64)
    for m in modes:
        mode_of[members[m]] = ids[m]
    rows_out, group_rows, place_rows, dir_rows, centroids = [], [], [], [], []
    manifest_rows = got.rows
    for node in order:
        m = members[node]
        centroid = shares[m].mean(0)
        mean_places = by_place[m].mean(0)
        near = m[np.argsort(((shares[m] - centroid) ** 2).sum(1), kind="stable")[:prototypes]]
        r2, mae, own = _fidelity(got.logits, shared[node], got.linear, m)
        lead = int(np.argmax(mean_places))
        left, right = children.get(node, (None, None))
        rows_out.append({
            "node": ids[node], "parent": ids.get(parent.get(node), -1), "left": ids[left] if left is not None else -1,
            "right": ids[right] if right is not None else -1, "depth": depth[node], "mode": node not in children,
            "size": len(m), "fraction": len(m) / n, "height": float(z[node - n, 2]) if node in children else 0.0,
            "leading": place_names[lead], "leading_share": float(mean_places[lead]),
            "rationale": _rationale(mean_places, place_names),
            "fidelity_r2": r2, "fidelity_mae": mae, "own_r2": own, "logit_mean": float(got.logits[m].mean()),
            "prototypes": " ".join(str(int(r)) for r in manifest_rows[near]),
        })
        group_rows.append({"node": ids[node], **dict(zip(group_names, by_group[m].mean(0)))})
        place_rows.append({"node": ids[node], **dict(zip(place_names, mean_places))})
        if dirs is not None:
            through = np.divide(got.directions[m], total[m, None], out=np.zeros_like(got.directions[m]),
                                where=total[m, None] > 0)
            dir_rows.append({"node": ids[node], **dict(zip(dir_names, through.mean(0)))})
        centroids.append(centroid)

    images = pd.DataFrame({"manifest_row": manifest_rows, "image": manifest.frame["image"].to_numpy()[manifest_rows],
                           "logit": got.logits, "first_order": got.linear, "mode": mode_of})
    params = {"layer": layer, "target": index, "class_name": class_name, "split": split, "select": select,
              "n_modes": n_modes, "cells": cells, "prototypes": prototypes, "max_images": max_images, "seed": seed,
              "merge": "ward (scipy.cluster.hierarchy.linkage) on per-image contribution shares",
              "unit_labels": unit_labels is not None, "directions": dir_names}
    prov = provenance(model, manifest, parameters=params, preprocessing=prep.to_dict(),
                      timings={"gradients": t_gradients, "tree": time.perf_counter() - t0 - t_gradients})
    return DecisionTreeResult(
        nodes=pd.DataFrame(rows_out), node_groups=pd.DataFrame(group_rows), node_places=pd.DataFrame(place_rows),
        images=images, image_groups=pd.DataFrame(by_group, columns=group_names),
        unit_groups=pd.DataFrame({"unit": np.arange(n_units), "group": groups}),
        centroids=np.stack(centroids).astype(np.float32), provenance=prov,
        node_directions=pd.DataFrame(dir_rows) if dirs is not None else None,
        skipped=tuple(b.to_dict() for b in got.skipped),
    )

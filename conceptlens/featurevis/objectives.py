"""What a feature visualisation maximises: objectives over layer activations and logits.

An :class:`Objective` is a weighted sum of terms. :func:`visualize` optimises one image per
objective: in a batch of N objectives, image ``i`` is scored by objective ``i`` alone, on its own
activations, so the images of a batch never interact — except through :func:`diversity`.

Diversity needs several images of one objective. Pass the same objective several times
(``[obj] * 4``): the images whose objectives have a diversity term and the same
:attr:`~Objective.description` form one *group*, and each image's diversity term is Lucid's
negative Gram-matrix cosine similarity against the other images of its group (an image alone in
its group scores 0). A group is never split across optimisation chunks.

Objectives are *maximised* (Lucid's sign, not lucent's loss sign): ``channel(...)`` is the mean
activation and ``diversity(...)`` is higher for more diverse images, so
``channel("conv4", 3) + diversity("conv4", 1e2)`` asks for strong, varied images.
"""

from __future__ import annotations

import hashlib
import numbers

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConceptLensError

__all__ = ["Objective", "channel", "unit", "direction", "class_logit", "diversity", "input_l2", "match", "input_alpha",
           "input_tv", "LOGITS", "INPUT"]

LOGITS = "<logits>"
"""The key under which the model's output is captured; ``class_logit`` reads it."""
INPUT = "<input>"
"""The key of the model's input (the normalised image the forward sees); ``input_l2`` reads it."""


class _Term:
    """One scored quantity; ``layer`` is a module name or :data:`LOGITS`."""

    layer: str
    grouped = False  # True when the term compares an image with the other images of its group

    def check(self, shape):
        """Raise a ConceptLensError when the term does not fit a layer output of ``shape`` (no batch)."""

    def __call__(self, act):
        """The term for one image's activation ``act`` (``[C, *spatial]``): a 0-d tensor."""
        raise NotImplementedError

    def batch_key(self):
        """Terms of one class with equal keys can be scored together by :meth:`batched`."""
        return ()

    @classmethod
    def batched(cls, terms):
        """A function ``f(act, rows) -> [len(terms)]``: term ``k`` on image ``rows[k]`` of ``act`` ``[N, ...]``.

        ``terms`` share a class, layer and :meth:`batch_key`. One call scores many images at once
        (one indexing op, one reduction) rather than one small autograd graph per image; this
        default is the per-image reference the subclasses' vectorised versions must agree with.
        """
        return lambda act, rows: torch.stack([t(a) for t, a in zip(terms, act[rows])])


def _channels_of(layer, shape, what="channel"):
    if len(shape) < 1:
        raise ConceptLensError(f"layer {layer!r} gives a scalar per image; a {what} objective needs channels")
    return shape[0]


def _check_channel(layer, c, shape):
    n = _channels_of(layer, shape)
    if not 0 <= c < n:
        raise ConceptLensError(f"channel {c} is out of range for layer {layer!r} (channels 0-{n - 1})")


def _index(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConceptLensError(f"{name} must be an integer; got {value!r}")
    return int(value)


class _Channel(_Term):
    def __init__(self, layer, c):
        self.layer, self.c = layer, c
        self.description = f"channel({layer}, {c})"

    def check(self, shape):
        _check_channel(self.layer, self.c, shape)

    def __call__(self, act):
        return act[self.c].mean()

    @classmethod
    def batched(cls, terms):
        cs = torch.tensor([t.c for t in terms])

        def f(act, rows):
            picked = act[rows, cs.to(act.device)]  # [n, *spatial]
            return picked.reshape(len(terms), -1).mean(1)

        return f


class _Unit(_Term):
    def __init__(self, layer, c, y, x):
        self.layer, self.c, self.y, self.x = layer, c, y, x
        where = "centre" if y is None and x is None else f"y={y}, x={x}"
        self.description = f"unit({layer}, {c}, {where})"

    def _position(self, spatial):
        # Lucid's default unit is the centre of the map: index size // 2 along each axis.
        return (spatial[0] // 2 if self.y is None else self.y, spatial[1] // 2 if self.x is None else self.x)

    def check(self, shape):
        _check_channel(self.layer, self.c, shape)
        if len(shape) != 3:
            raise ConceptLensError(f"unit needs a spatial layer output [C, H, W]; layer {self.layer!r} gives "
                                   f"{list(shape)} per image (use channel(...) instead)")
        for axis, value, size in zip("yx", self._position(shape[1:]), shape[1:]):
            if not 0 <= value < size:
                raise ConceptLensError(f"unit {axis}={value} is out of range for layer {self.layer!r} "
                                       f"({axis} 0-{size - 1} at this input size)")

    def __call__(self, act):
        y, x = self._position(act.shape[1:])
        return act[self.c, y, x]

    @classmethod
    def batched(cls, terms):
        cs = torch.tensor([t.c for t in terms])

        def f(act, rows):
            ys, xs = (torch.tensor(v) for v in zip(*(t._position(act.shape[2:]) for t in terms)))
            d = act.device
            return act[rows, cs.to(d), ys.to(d), xs.to(d)]

        return f


class _Direction(_Term):
    def __init__(self, layer, vector):
        self.layer = layer
        self.vector = torch.as_tensor(np.asarray(vector, dtype=np.float32))
        digest = hashlib.sha256(self.vector.numpy().tobytes()).hexdigest()[:8]
        self.description = f"direction({layer}, {self.vector.numel()}-d {digest})"

    def check(self, shape):
        n = _channels_of(self.layer, shape, "direction")
        whole = int(np.prod(shape))
        if self.vector.ndim != 1 or self.vector.numel() not in (n, whole):
            raise ConceptLensError(f"direction for layer {self.layer!r} needs a vector of {n} values (one per channel) "
                                   f"or {whole} (the whole {list(shape)} map at this input size); got shape "
                                   f"{list(self.vector.shape)}")

    def __call__(self, act):
        if self.vector.numel() == act.numel() and act.dim() > 1:  # a direction in the flattened map (TCAV's pool none)
            return self.vector.to(act) @ act.reshape(-1)
        flat = act.reshape(act.shape[0], -1)  # [C, positions]; a [C] output is one position
        return (self.vector.to(flat) @ flat).mean()

    def batch_key(self):
        return (self.vector.numel(),)

    @classmethod
    def batched(cls, terms):
        vectors = torch.stack([t.vector for t in terms])  # [n, C] or [n, C*H*W]

        def f(act, rows):
            a = act[rows]
            v = vectors.to(a)
            if v.shape[1] == a[0].numel() and a.dim() > 2:  # flattened-map directions
                return (a.reshape(len(terms), 1, -1) @ v[:, :, None]).reshape(-1)
            flat = a.reshape(a.shape[0], a.shape[1], -1)  # [n, C, positions]
            return (v[:, None, :] @ flat).reshape(len(terms), -1).mean(1)

        return f


class _ClassLogit(_Term):
    layer = LOGITS

    def __init__(self, c):
        self.c = c
        self.description = f"class_logit({c})"

    def check(self, shape):
        if len(shape) != 1:
            raise ConceptLensError(f"class_logit needs a model output of shape [N, classes]; got {list(shape)} per image")
        if not 0 <= self.c < shape[0]:
            raise ConceptLensError(f"class {self.c} is out of range for the model's logits (classes 0-{shape[0] - 1})")

    def __call__(self, act):
        return act[self.c]

    @classmethod
    def batched(cls, terms):
        cs = torch.tensor([t.c for t in terms])
        return lambda act, rows: act[rows, cs.to(act.device)]


class _InputL2(_Term):
    layer = INPUT
    description = "l2(input)"

    def __call__(self, act):
        return (act * act).sum()

    @classmethod
    def batched(cls, terms):
        def f(act, rows):
            a = act[rows]
            return (a * a).reshape(len(terms), -1).sum(1)

        return f


class _InputAlpha(_Term):
    layer = INPUT

    def __init__(self, alpha):
        self.alpha = alpha
        self.description = f"alpha{alpha:g}(input)"

    def __call__(self, act):
        return act.abs().pow(self.alpha).sum()

    def batch_key(self):
        return (self.alpha,)

    @classmethod
    def batched(cls, terms):
        alpha = terms[0].alpha
        return lambda act, rows: act[rows].abs().pow(alpha).reshape(len(terms), -1).sum(1)


class _InputTV(_Term):
    """``sum over pixels of (dx^2 + dy^2)^(beta/2)``, forward differences, zero at the last row/column."""

    layer = INPUT

    def __init__(self, beta):
        self.beta = beta
        self.description = f"tv{beta:g}(input)"

    def __call__(self, act):
        return self._tv(act).sum()

    def _tv(self, act):
        dx = F.pad(act[..., :, 1:] - act[..., :, :-1], (0, 1))
        dy = F.pad(act[..., 1:, :] - act[..., :-1, :], (0, 0, 0, 1))
        return (dx * dx + dy * dy).pow(self.beta / 2)

    def batch_key(self):
        return (self.beta,)

    @classmethod
    def batched(cls, terms):
        return lambda act, rows: terms[0]._tv(act[rows]).reshape(len(terms), -1).sum(1)


class _Match(_Term):
    """``||a - a0||^2 / ||a0||^2``: how far the layer output is from a target (one image's)."""

    def __init__(self, layer, target):
        self.layer = layer
        self.target = torch.as_tensor(target, dtype=torch.float32).detach()
        self.scale = float((self.target * self.target).sum()) or 1.0
        self.description = f"match({layer})"

    def check(self, shape):
        if tuple(self.target.shape) != tuple(shape):
            raise ConceptLensError(f"the target of match({self.layer!r}) has shape {list(self.target.shape)}; "
                                   f"the layer gives {list(shape)} per image")

    def __call__(self, act):
        d = act - self.target.to(act.device)
        return (d * d).sum() / self.scale

    @classmethod
    def batched(cls, terms):
        targets = torch.stack([t.target for t in terms])
        scales = torch.tensor([t.scale for t in terms], dtype=torch.float64)

        def f(act, rows):
            d = act[rows] - targets.to(act.device)
            return (d * d).reshape(len(terms), -1).sum(1) / scales.to(act.device, act.dtype)

        return f


class _Diversity(_Term):
    grouped = True

    def __init__(self, layer):
        self.layer = layer
        self.description = f"diversity({layer})"

    def check(self, shape):
        if len(shape) < 2:
            raise ConceptLensError(f"diversity needs a spatial layer output [C, H, W]; layer {self.layer!r} gives "
                                   f"{list(shape)} per image")

    def group_values(self, acts):
        """Each image's term for a group's activations ``[k, C, *spatial]``: ``-sum_j cos(G_i, G_j) / k``.

        Summed over the group this is Lucid's ``diversity`` (negative pairwise cosine similarity of
        the Gram matrices, divided by the batch size), with the sign flipped to be maximised.
        """
        k = acts.shape[0]
        flat = acts.reshape(k, acts.shape[1], -1)
        grams = F.normalize((flat @ flat.transpose(1, 2)).reshape(k, -1), dim=1)
        sim = grams @ grams.T
        return -(sim.sum(1) - sim.diagonal()) / k


def batched_scorer(objectives, groups, device="cpu"):
    """A function ``f(acts) -> [n]`` scoring a batch that holds ``groups`` in order, as
    :meth:`Objective.evaluate` of each group would, without a Python loop over images.

    ``groups`` are index lists into ``objectives`` (images ``0..n-1`` of the batch, in order).
    Non-grouped terms are bucketed by (position in their objective, class, layer, batch key) and
    each bucket is scored by one call of its class's :meth:`_Term.batched`; diversity terms keep
    their per-group evaluation. Each image's total adds its terms in its objective's order, as
    ``evaluate`` does.
    """
    buckets, grouped = {}, []
    row = 0
    for group in groups:
        obj = objectives[group[0]]
        rows = list(range(row, row + len(group)))
        for j, (w, term) in enumerate(obj.terms):
            if term.grouped:
                grouped.append((j, w, term, rows))
                continue
            key = (j, type(term), term.layer, term.batch_key())
            bucket = buckets.setdefault(key, ([], [], []))
            for r in rows:
                bucket[0].append(r)
                bucket[1].append(w)
                bucket[2].append(term)
        row += len(group)
    n = row
    plan = []
    for key, (rows, weights, terms) in buckets.items():
        plan.append((key[0], "batched", key[2], torch.tensor(rows, device=device),
                     torch.tensor(weights, device=device), type(terms[0]).batched(terms)))
    for j, w, term, rows in grouped:
        plan.append((j, "grouped", term.layer, torch.tensor(rows, device=device), w, term))
    plan.sort(key=lambda p: p[0])  # stable: images add their terms in objective order

    def score(acts):
        total = None
        for _, how, layer, rows, w, fn in plan:
            act = acts[layer]
            if total is None:
                total = act.new_zeros(n)
            value = w.to(act) * fn(act, rows) if how == "batched" else w * fn.group_values(act[rows])
            total = total.index_add(0, rows, value)
        return total if total is not None else torch.zeros(n, device=device)

    return score


def _check_layer_name(layer):
    if not isinstance(layer, str) or not layer:
        raise ConceptLensError(f"an objective's layer must be a module name (see `conceptlens layers MODEL`); got {layer!r}")
    return layer


class Objective:
    """A weighted sum of terms, evaluated per image; combine with ``+``, ``-`` and scalar ``*``.

    Build objectives with :func:`channel`, :func:`unit`, :func:`direction`, :func:`class_logit` and
    :func:`diversity` rather than with this constructor.

    Parameters
    ----------
    terms : sequence of (float, term)
        Weights and terms.
    """

    def __init__(self, terms):
        self.terms = tuple((float(w), t) for w, t in terms)

    @property
    def description(self):
        """The objective as a formula, e.g. ``channel(conv4, 3) - 2*unit(conv4, 5, centre)``."""
        text = ""
        for w, term in self.terms:
            sign = "-" if w < 0 else "+"
            mag = "" if abs(w) == 1 else f"{abs(w):g}*"
            text += f" {sign} {mag}{term.description}" if text else f"{sign.strip('+')}{mag}{term.description}"
        return text

    @property
    def layers(self):
        """Names of the layers (and :data:`LOGITS`) the objective reads, in first-use order."""
        return list(dict.fromkeys(t.layer for _, t in self.terms))

    @property
    def grouped(self):
        """Whether the objective has a diversity term (its images are optimised together)."""
        return any(t.grouped for _, t in self.terms)

    def check(self, shapes):
        """Raise a ConceptLensError unless every term fits ``shapes`` (``{layer: per-image shape}``)."""
        for _, term in self.terms:
            term.check(shapes[term.layer])

    def evaluate(self, acts, rows):
        """The objective for the images ``rows`` of captured activations ``acts`` (``{layer: [N, ...]}``).

        ``rows`` are the indices of this objective's images (its group); returns a ``[len(rows)]``
        tensor. Non-grouped terms score each image on its own activations. This is the per-image
        reference; :func:`batched_scorer` scores a whole batch of objectives at once.
        """
        total = 0.0
        for w, term in self.terms:
            act = acts[term.layer][rows]
            if term.grouped:
                total = total + w * term.group_values(act)
            else:
                total = total + w * torch.stack([term(a) for a in act])
        return total

    def __repr__(self):
        return f"Objective({self.description})"

    def __add__(self, other):
        if not isinstance(other, Objective):
            return NotImplemented
        return Objective(self.terms + other.terms)

    def __sub__(self, other):
        if not isinstance(other, Objective):
            return NotImplemented
        return Objective(self.terms + tuple((-w, t) for w, t in other.terms))

    def __neg__(self):
        return Objective((-w, t) for w, t in self.terms)

    def __mul__(self, scalar):
        if isinstance(scalar, bool) or not isinstance(scalar, numbers.Real):
            return NotImplemented
        return Objective((w * float(scalar), t) for w, t in self.terms)

    __rmul__ = __mul__


def channel(layer, c):
    """The mean of channel ``c`` of ``layer``'s output over all positions (Lucid's ``channel``)."""
    return Objective([(1.0, _Channel(_check_layer_name(layer), _index(c, "channel")))])


def unit(layer, c, y=None, x=None):
    """Channel ``c`` of ``layer`` at one position ``(y, x)`` of its map; default the centre (``size // 2``)."""
    y = None if y is None else _index(y, "unit y")
    x = None if x is None else _index(x, "unit x")
    return Objective([(1.0, _Unit(_check_layer_name(layer), _index(c, "channel"), y, x))])


def direction(layer, vector):
    """The mean over positions of ``vector . a[:, y, x]``, the channel vector at each position; or,
    for a vector with one value per element of the map (a CAV of flattened maps), ``vector . a``.

    ``vector`` (e.g. a CAV) has one value per channel of ``layer``, or one per element of its map;
    it is used as given, not normalised, so the value scales with its norm.
    """
    return Objective([(1.0, _Direction(_check_layer_name(layer), vector))])


def class_logit(c):
    """The model output's logit ``c`` (before any softmax)."""
    return Objective([(1.0, _ClassLogit(_index(c, "class")))])


def input_l2(weight=1.0):
    """``-weight`` times the squared L2 norm of the model's (normalised) input: Simonyan et al.'s
    regulariser of class-model images, ``S_c(I) - lambda ||I||^2`` = ``class_logit(c) + input_l2(lambda)``."""
    return Objective([(-float(weight), _InputL2())])


def match(layer, target, weight=1.0):
    """``-weight * ||a - a0||^2 / ||a0||^2``: ``layer``'s output close to ``target`` (one image's
    output, without the batch axis) — the data term of Mahendran & Vedaldi's inversion."""
    return Objective([(-float(weight), _Match(_check_layer_name(layer), target))])


def input_alpha(weight, alpha=6.0):
    """``-weight * ||x||_alpha^alpha`` of the normalised input (Mahendran & Vedaldi's alpha-norm prior)."""
    return Objective([(-float(weight), _InputAlpha(float(alpha)))])


def input_tv(weight, beta=2.0):
    """``-weight * TV^beta`` of the normalised input (Mahendran & Vedaldi's total-variation prior)."""
    return Objective([(-float(weight), _InputTV(float(beta)))])


def diversity(layer, weight=1.0):
    """``weight`` times Lucid's diversity of a group of images at ``layer`` (see the module notes).

    Add it to an objective and pass that objective several times; lucent's examples use
    ``channel(...) - 1e2 * diversity(...)`` in loss sign, which is ``diversity(layer, 1e2)`` here.
    """
    return Objective([(float(weight), _Diversity(_check_layer_name(layer)))])

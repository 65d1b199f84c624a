"""Drawing primitives of the ``histo`` world: H&E-like tissue patches, stains and pen marks.

A patch is drawn as stain *amounts* per pixel (haematoxylin ``H`` in nuclei, eosin ``E`` in
cytoplasm, fibres and necrosis) and turned into colour by the Beer–Lambert law,
``pixel = 255 · exp(−(H · od_H + E · od_E + ink · od_ink))``, so a stain's appearance is a colour
basis (:class:`Stain`) that an acquisition site can shift without touching the tissue. Everything
is computed on coordinate grids with numpy; lengths are given for 64 px and scale with the size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .shapes import grid

TISSUES = ("tumour", "stroma", "normal")
INKS = ("green", "blue")

# Optical-density colour vectors (R, G, B) per unit of stain: Ruifrok & Johnston's H and E.
_OD_H = np.array([0.650, 0.704, 0.286])
_OD_E = np.array([0.072, 0.990, 0.105])
# Marker inks absorb what they do not show: green absorbs red and blue, blue absorbs red and green.
_OD_INK = {"green": np.array([1.28, 0.40, 0.88]), "blue": np.array([1.20, 0.88, 0.19])}


def _unit(v):
    return v / np.linalg.norm(v)


@dataclass(frozen=True)
class Stain:
    """A stain basis: optical density per unit of haematoxylin (``h``) and eosin (``e``), RGB."""

    h: np.ndarray
    e: np.ndarray


def _orthonormal(v):
    """Two unit vectors orthogonal to ``v`` and to each other."""
    a = _unit(np.cross(v, [0.0, 0.0, 1.0]))
    return a, np.cross(_unit(v), a)


def site_stain(site, n_sites, shift):
    """The stain basis of acquisition site ``site`` of ``n_sites``.

    Sites are spread evenly on a circle of hue shifts around the reference H and E vectors and
    stain more or less strongly, so every pair of sites differs by about the same amount.

    Parameters
    ----------
    site, n_sites : int
        Site index and number of sites.
    shift : float
        Size of the shift (0: every site stains alike).

    Returns
    -------
    Stain
    """
    phi = 2 * np.pi * site / n_sites
    h1, h2 = _orthonormal(_OD_H)
    e1, e2 = _orthonormal(_OD_E)
    # Optical densities stay positive (a stain cannot add light).
    h = np.maximum(_unit(_OD_H) + shift * (np.cos(phi) * h1 + np.sin(phi) * h2), 0.02)
    e = np.maximum(_unit(_OD_E) + shift * (np.cos(phi + 2.0) * e1 + np.sin(phi + 2.0) * e2), 0.02)
    # Staining strength (vector length) varies too: some sites stain darker.
    return Stain(h=_unit(h) * np.exp(0.6 * shift * np.cos(phi + 1.0)),
                 e=_unit(e) * np.exp(0.6 * shift * np.sin(phi + 1.0)))


def jitter_stain(stain, rng, scale):
    """``stain`` with small random changes (a patient's slides, a scan): relative size ``scale``."""
    h1, h2 = _orthonormal(stain.h)
    e1, e2 = _orthonormal(stain.e)
    a = rng.normal(0.0, scale, size=6)
    n_h, n_e = np.linalg.norm(stain.h), np.linalg.norm(stain.e)
    h = _unit(_unit(stain.h) + a[0] * h1 + a[1] * h2) * n_h * np.exp(a[2])
    e = _unit(_unit(stain.e) + a[3] * e1 + a[4] * e2) * n_e * np.exp(a[5])
    return Stain(h=h, e=e)


@dataclass(frozen=True)
class Drawn:
    """A rendered patch and the masks of what is where (boolean, ``(size, size)``)."""

    image: np.ndarray  # (size, size, 3) uint8
    nuclei: np.ndarray  # intact nuclei
    necrosis: np.ndarray  # the necrotic region (all False without necrosis)
    pen: np.ndarray  # the ink stroke (all False without pen)


def _field(rng, size, scale, k=10):
    """Smooth random field of about unit variance with features ``scale`` pixels across."""
    ang = rng.uniform(0, 2 * np.pi, k)
    freq = rng.uniform(0.6, 1.4, k) / scale
    phase = rng.uniform(0, 2 * np.pi, k)
    c = np.arange(size) + 0.5
    # A sum of plane waves; cos(a + b) = cos a cos b - sin a sin b makes it two matrix products.
    ax = 2 * np.pi * (np.cos(ang) * freq)[:, None] * c + phase[:, None]
    by = 2 * np.pi * (np.sin(ang) * freq)[:, None] * c
    f = np.cos(by).T @ np.cos(ax) - np.sin(by).T @ np.sin(ax)
    return (f * np.sqrt(2.0 / k)).astype(np.float32)


def _nuclei(rng, size, cy, cx, ry, rx, theta, strength, wobble=0.0):
    """Haematoxylin amount and coverage ``(size, size)`` of elliptical nuclei, anti-aliased.

    ``ry, rx`` are the semi-axes, ``theta`` the rotation of the ``x`` axis. With ``wobble`` each
    rim's radius is scaled by ``1 + w · cos(lobes · angle + phase)``, ``w`` up to ``wobble``
    (pleomorphic nuclei). Each nucleus is computed in a small window around its centre and
    max-composited into the patch.
    """
    amount = np.zeros(size * size, dtype=np.float32)
    cover = np.zeros(size * size, dtype=np.float32)
    n = len(cy)
    lobes, w, phase = rng.integers(2, 5, n), rng.uniform(0, wobble, n), rng.uniform(0, 2 * np.pi, n)
    if n == 0:
        return amount.reshape(size, size), cover.reshape(size, size)
    col = lambda a: np.asarray(a, dtype=np.float32)[:, None, None]  # noqa: E731
    half = int(np.ceil(max(np.max(rx), np.max(ry)) * (1 + wobble))) + 1
    off = np.arange(-half, half + 1)
    iy = np.floor(cy).astype(int)[:, None, None] + off[:, None]
    ix = np.floor(cx).astype(int)[:, None, None] + off[None, :]
    dy, dx = iy + 0.5 - col(cy), ix + 0.5 - col(cx)
    c, s = np.cos(col(theta)), np.sin(col(theta))
    u, v = (dx * c + dy * s) / col(rx), (dy * c - dx * s) / col(ry)
    rim = 1.0 + col(w) * np.cos(col(lobes) * np.arctan2(v, u) + col(phase))
    # (rim - d) in units of the short semi-axis is about the distance to the rim in pixels.
    cov = np.clip(0.5 + (rim - np.sqrt(u * u + v * v)) * np.minimum(col(ry), col(rx)), 0.0, 1.0)
    iy, ix = np.broadcast_arrays(iy, ix)
    inside = (iy >= 0) & (iy < size) & (ix >= 0) & (ix < size) & (cov > 0)
    flat = (iy * size + ix)[inside]
    np.maximum.at(amount, flat, (cov * col(strength))[inside])
    np.maximum.at(cover, flat, cov[inside])
    return amount.reshape(size, size), cover.reshape(size, size)


def _fibres(rng, size, s, angle):
    """Wavy eosinophilic fibres along ``angle``: a field in ``[0, 1]``."""
    yy, xx = grid(size)
    across = -xx * np.sin(angle) + yy * np.cos(angle)
    warp = _field(rng, size, 12 * s) * (2.5 * s)
    period = rng.uniform(3.2, 4.2) * s
    return (0.5 + 0.5 * np.sin(2 * np.pi * (across + warp) / period)) ** 1.5


def _spindles(rng, size, s, count, angle):
    """Elongated stromal nuclei roughly aligned with ``angle``."""
    return _nuclei(rng, size, rng.uniform(0, size, count), rng.uniform(0, size, count),
                   rng.uniform(0.9, 1.4, count) * s, rng.uniform(3.5, 5.5, count) * s,
                   angle + rng.normal(0, 0.25, count), rng.uniform(1.0, 1.4, count))


def _lymphocytes(rng, size, s):
    """Small, dark, round nuclei scattered at random (in every tissue: a nuisance, not a class cue)."""
    count = rng.poisson(rng.uniform(0, 10) * s * s)
    r = rng.uniform(1.2, 1.6, count) * s
    return _nuclei(rng, size, rng.uniform(0, size, count), rng.uniform(0, size, count), r, r,
                   np.zeros(count), rng.uniform(1.3, 1.7, count))


def _stroma(rng, size, s):
    """Pink wavy fibres with sparse spindle nuclei along them."""
    angle = rng.uniform(0, np.pi)
    e = rng.uniform(0.7, 1.0) * (0.45 + 0.55 * _fibres(rng, size, s, angle))
    h, cover = _spindles(rng, size, s, rng.poisson(rng.uniform(4, 14) * s * s), angle)
    return h, e, cover


def _region(rng, size, scale, share):
    """A random blob-like region ``scale`` pixels across covering ``share`` of the patch: (mask, soft mask in [0, 1])."""
    f = _field(rng, size, scale, k=6)
    t = np.quantile(f, 1 - share)
    return f > t, np.clip((f - t) / 0.3, 0.0, 1.0)


def _tumour(rng, size, s):
    """Nests of crowded, large, pleomorphic, dark nuclei in mottled cytoplasm, invading stroma.

    The tumour covers 10-100 % of the patch, so some patches show only a little of it.
    """
    h, e, cover = _stroma(rng, size, s)
    inside, soft = _region(rng, size, 20 * s, rng.uniform(0.1, 1.0))
    step = rng.uniform(8.5, 12.5) * s
    ticks = np.arange(-0.5 * step, size + step, step)
    cy, cx = (a.ravel() for a in np.meshgrid(ticks, ticks, indexing="ij"))
    n = cy.size
    cy = cy + rng.uniform(-0.35, 0.35, n) * step
    cx = cx + rng.uniform(-0.35, 0.35, n) * step
    iy, ix = (np.clip(a.astype(int), 0, size - 1) for a in (cy, cx))
    u, inside_at = rng.random(n), inside[iy, ix]
    keep = inside_at & (u < rng.uniform(0.6, 0.95))
    # At least six nuclei, so that a small nest is still recognisably tumour.
    candidates = np.flatnonzero(inside_at)
    keep[candidates[np.argsort(u[candidates])[:6]]] = True
    cy, cx = cy[keep], cx[keep]
    m = cy.size
    r = rng.uniform(2.6, 4.6, m) * s
    th, tc = _nuclei(rng, size, cy, cx, r * rng.uniform(0.7, 1.0, m), r, rng.uniform(0, np.pi, m),
                     rng.uniform(1.0, 1.7, m), wobble=0.22)
    te = rng.uniform(0.35, 0.55) * (1 + 0.15 * _field(rng, size, 6 * s))
    return (np.maximum(h * (1 - soft), th), e * (1 - soft) + te * soft, np.maximum(cover * (1 - soft), tc))


def _normal(rng, size, s):
    """Gland-like lumens lined by one row of small, regular, round nuclei, in stroma."""
    yy, xx = grid(size)
    h, e, cover = _stroma(rng, size, s)
    lumen_all = np.zeros((size, size), dtype=bool)
    centres = []
    for _ in range(rng.integers(1, 3)):
        ry, rx = rng.uniform(3.5, 7.5, 2) * s
        t = rng.uniform(4.5, 5.5) * s  # epithelium thickness
        # Keep glands apart: a few tries, then accept an overlap.
        for _ in range(8):
            cy, cx = rng.uniform(0.1, 0.9, 2) * size
            if all(np.hypot(cy - a, cx - b) > rx + ry + 2 * t for a, b in centres):
                break
        centres.append((cy, cx))
        rot = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = dx * np.cos(rot) + dy * np.sin(rot)
        v = dy * np.cos(rot) - dx * np.sin(rot)
        lumen = (u / rx) ** 2 + (v / ry) ** 2 <= 1
        epithelium = ((u / (rx + t)) ** 2 + (v / (ry + t)) ** 2 <= 1) & ~lumen
        e = np.where(epithelium, rng.uniform(0.3, 0.42), e)
        lumen_all |= lumen
        # Basal nuclei evenly along the ring, two thirds of the way out.
        a_r, b_r = rx + 0.65 * t, ry + 0.65 * t
        count = max(6, int(np.pi * (a_r + b_r) / (4.3 * s)))
        alpha = rng.uniform(0, 2 * np.pi) + 2 * np.pi * np.arange(count) / count
        px, py = a_r * np.cos(alpha), b_r * np.sin(alpha)
        r = rng.uniform(1.6, 2.0, count) * s
        gh, gc = _nuclei(rng, size, cy + px * np.sin(rot) + py * np.cos(rot), cx + px * np.cos(rot) - py * np.sin(rot),
                         r * rng.uniform(0.85, 1.0, count), r, rng.uniform(0, np.pi, count),
                         rng.uniform(0.95, 1.2, count), wobble=0.03)
        h, cover = np.maximum(h, gh), np.maximum(cover, gc)
    e = np.where(lumen_all, 0.03, e)
    h = np.where(lumen_all, 0.0, h)
    cover = np.where(lumen_all, 0.0, cover)
    return h, e, cover


_TISSUE = {"tumour": _tumour, "stroma": _stroma, "normal": _normal}


def _necrosis(rng, size, s, h, e, cover):
    """Replace a large amorphous region by bright eosin with nuclear dust; returns the new maps and the region."""
    region, soft = _region(rng, size, 40 * s, rng.uniform(0.7, 0.9))
    count = rng.poisson(60 * s * s)
    dust, _ = _nuclei(rng, size, rng.uniform(0, size, count), rng.uniform(0, size, count),
                      rng.uniform(0.6, 1.1, count) * s, rng.uniform(0.7, 1.4, count) * s,
                      rng.uniform(0, np.pi, count), rng.uniform(1.2, 1.8, count))
    e_necrotic = rng.uniform(1.1, 1.4) * (1 + 0.08 * _field(rng, size, 2 * s))
    h = h * (1 - soft) + dust * soft + 0.08 * soft  # diffuse basophilic haze of broken-down nuclei
    e = e * (1 - soft) + e_necrotic * soft
    return h, e, cover * (1 - soft), region


def _pen(rng, size, s):
    """Coverage of a thick, slightly curved marker stroke across the patch."""
    yy, xx = grid(size)
    side = rng.permutation(4)[:2]
    ends = []
    for k in side:  # entry and exit points on two different edges
        w = rng.uniform(0.1, 0.9) * size
        ends.append({0: (0.0, w), 1: (size, w), 2: (w, 0.0), 3: (w, size)}[int(k)])
    (y0, x0), (y1, x1) = ends
    cy, cx = rng.uniform(0.25, 0.75, 2) * size
    t = np.linspace(0, 1, 48)[:, None, None]
    by = (1 - t) ** 2 * y0 + 2 * t * (1 - t) * cy + t ** 2 * y1
    bx = (1 - t) ** 2 * x0 + 2 * t * (1 - t) * cx + t ** 2 * x1
    d = np.sqrt(((yy - by) ** 2 + (xx - bx) ** 2).min(0))
    half = rng.uniform(2.5, 3.5) * s
    return np.clip(0.5 + half - d, 0.0, 1.0).astype(np.float32)


def draw(rng, size, tissue, stain, necrosis=False, pen=False):
    """Render one H&E-like patch.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of everything not given (layout, sizes, noise).
    size : int
        Patch side in pixels.
    tissue : str
        One of :data:`TISSUES`.
    stain : Stain
        Colour basis of the slide (site and patient).
    necrosis : bool
        Replace a large region by necrosis (eosinophilic, with nuclear debris).
    pen : bool
        Draw a marker-ink stroke (green or blue) over the patch.

    Returns
    -------
    Drawn
    """
    s = size / 64.0
    h, e, cover = _TISSUE[tissue](rng, size, s)
    lh, lc = _lymphocytes(rng, size, s)
    tissue_px = e > 0.1  # no cells in a lumen
    h, cover = np.maximum(h, lh * tissue_px), np.maximum(cover, lc * tissue_px)
    region = np.zeros((size, size), dtype=bool)
    if necrosis:
        h, e, cover, region = _necrosis(rng, size, s, h, e, cover)
    # Chromatin grain and uneven section thickness.
    h = h * (1 + 0.15 * rng.standard_normal((size, size))) + 0.03
    e = e * (1 + 0.08 * _field(rng, size, 16 * s, k=4))
    od = h[..., None] * stain.h + e[..., None] * stain.e
    ink = np.zeros((size, size), dtype=np.float32)
    if pen:
        ink = _pen(rng, size, s)
        colour = INKS[rng.integers(len(INKS))]
        od = od + (ink * rng.uniform(0.9, 1.3))[..., None] * _OD_INK[colour]
    img = 255.0 * np.exp(-od) + 2.0 * rng.standard_normal((size, size, 1))
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return Drawn(image=image, nuclei=cover > 0.5, necrosis=region, pen=ink > 0.5)

"""Drawing primitives of the concept world: shapes, textures, scenes and the tag.

Everything is computed on coordinate grids with numpy (no per-pixel Python loops). Coordinates
are pixel centres (``0.5 … size - 0.5``), ``y`` down, ``x`` right. Masks are boolean ``(size,
size)`` arrays; images are ``(size, size, 3)`` uint8 (float in ``[0, 255]`` while composing).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = ("red", "green", "blue", "yellow")
TEXTURES = ("plain", "stripes", "dots", "checker")
SCENES = ("sky", "grass", "sand", "night")

# Saturated object colours; none equals a background colour (see _SCENE_COLORS).
COLOR_RGB = {
    "red": (220, 45, 40),
    "green": (40, 190, 60),
    "blue": (45, 80, 225),
    "yellow": (235, 210, 35),
}
TAG_LIGHT = (245, 245, 245)  # labelled "white" in the Broden colour masks
TAG_DARK = (25, 25, 25)  # labelled "black"

# (top colour, bottom colour) of each background's vertical gradient.
_SCENE_COLORS = {
    "sky": ((105, 165, 235), (185, 215, 245)),
    "grass": ((70, 115, 40), (100, 140, 55)),
    "sand": ((220, 195, 150), (200, 175, 125)),
    "night": ((15, 18, 45), (40, 35, 80)),
}

_TEXTURE_DARK = 0.5  # brightness factor of a texture's dark parts


@lru_cache(maxsize=8)
def grid(size):
    """Return ``(yy, xx)`` float32 pixel-centre coordinate grids of shape ``(size, size)`` (read-only)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + np.float32(0.5)
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def tag_box(size):
    """Return ``(y0, x0, side)`` of the tag square in the bottom-right corner of a ``size`` image.

    The side is ``max(5, size // 8)`` pixels, so the tag stays legible at 16-32 px.
    """
    side = max(5, size // 8)
    margin = max(1, size // 32)
    return size - margin - side, size - margin - side, side


@lru_cache(maxsize=8)
def tag_masks(size):
    """Return ``(tag, dark)`` boolean masks: the tag square and its dark "x" (a subset of it; read-only)."""
    y0, x0, side = tag_box(size)
    tag = np.zeros((size, size), dtype=bool)
    tag[y0:y0 + side, x0:x0 + side] = True
    j, i = np.mgrid[0:side, 0:side]
    x_mark = (i == j) | (i + j == side - 1)
    dark = np.zeros((size, size), dtype=bool)
    dark[y0:y0 + side, x0:x0 + side] = x_mark
    tag.flags.writeable = False
    dark.flags.writeable = False
    return tag, dark


def tag_artifact(size):
    """The tag as an RGBA ``uint8`` image ``(size, size, 4)``: opaque on the tag square, transparent
    elsewhere; saved as a PNG it is the artifact ``conceptlens correct --artifact`` pastes."""
    tag, dark = tag_masks(size)
    rgb = np.where(dark[..., None], TAG_DARK, TAG_LIGHT).astype(np.uint8)
    return np.dstack([rgb, np.where(tag, 255, 0).astype(np.uint8)])


def shape_mask(shape, cy, cx, r, size, hollow=False):
    """Boolean mask of one shape centred at ``(cy, cx)`` with half-extent ``r`` pixels.

    Parameters
    ----------
    shape : str
        One of :data:`SHAPES`.
    cy, cx : float
        Centre in pixel coordinates.
    r : float
        Half of the shape's bounding-box side.
    size : int
        Image side.
    hollow : bool
        Outline only (used for the hidden ``hollow`` square sub-class).

    Returns
    -------
    numpy.ndarray of bool, shape (size, size)
    """
    yy, xx = grid(size)
    dy, dx = yy - cy, xx - cx
    if shape == "circle":
        return dy * dy + dx * dx <= r * r
    if shape == "square":
        h = 0.85 * r  # about the area of the circle of radius r
        outer = (np.abs(dy) <= h) & (np.abs(dx) <= h)
        if not hollow:
            return outer
        # A thick outline so the hole survives downsampling to 32 px.
        t = max(2.0, 0.32 * h)
        return outer & ~((np.abs(dy) <= h - t) & (np.abs(dx) <= h - t))
    if shape == "triangle":
        top, bottom = cy - r, cy + 0.85 * r
        frac = (yy - top) / (bottom - top)
        return (frac >= 0) & (frac <= 1) & (np.abs(dx) <= r * frac + 0.5)
    if shape == "cross":
        arm = max(1.0, r / 3.0)
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {shape!r}")


def texture_factor(texture, size, phase):
    """Brightness factor ``(size, size)`` of a texture: 1.0 on light parts, 0.5 on dark parts.

    Parameters
    ----------
    texture : str
        One of :data:`TEXTURES`.
    size : int
        Image side; the texture period is ``max(4, size // 8)`` pixels.
    phase : (float, float)
        Offsets in ``[0, 1)`` of a period, so textures do not line up across images.
    """
    yy, xx = grid(size)
    p = float(max(4, size // 8))
    oy, ox = phase[0] * p, phase[1] * p
    if texture == "plain":
        return np.ones((size, size), dtype=np.float32)
    if texture == "stripes":
        dark = np.floor((xx + yy + ox) / (p / 2)) % 2 == 1
    elif texture == "dots":
        fy = (yy + oy) % p - p / 2
        fx = (xx + ox) % p - p / 2
        dark = fy * fy + fx * fx <= (0.3 * p) ** 2
    elif texture == "checker":
        dark = (np.floor((yy + oy) / (p / 2)) + np.floor((xx + ox) / (p / 2))) % 2 == 1
    else:
        raise ValueError(f"unknown texture {texture!r}")
    return np.where(dark, np.float32(_TEXTURE_DARK), np.float32(1.0))


def background(scene, size, rng):
    """Procedural background ``(size, size, 3)`` float32 for ``scene`` with mild noise."""
    yy, xx = grid(size)
    top, bottom = (np.asarray(c, dtype=np.float32) for c in _SCENE_COLORS[scene])
    t = (yy / size)[..., None]
    img = top * (1 - t) + bottom * t
    if scene == "grass":
        # Vertical blades: per-column brightness streaks.
        streak = np.float32(14.0) * rng.standard_normal((1, size, 1), dtype=np.float32)
        img = img + streak
    elif scene == "sand":
        # Gentle horizontal ripples.
        ripple = 9.0 * np.sin(2 * np.pi * (yy / max(4.0, size / 6.0) + 0.15 * np.sin(xx / 5.0) + rng.random()))
        img = img + ripple[..., None]
    elif scene == "sky":
        # A soft, pale cloud blob somewhere in the upper half.
        cy, cx = rng.uniform(0.1, 0.5) * size, rng.uniform(0.1, 0.9) * size
        s = size / 6.0
        cloud = np.exp(-(((yy - cy) / s) ** 2 + ((xx - cx) / (2 * s)) ** 2))
        img = img + (40.0 * cloud)[..., None]
    img = img + np.float32(5.0) * rng.standard_normal((size, size, 1), dtype=np.float32)
    return img


@dataclass(frozen=True)
class Drawn:
    """A rendered world image and the masks of what is where."""

    image: np.ndarray  # (size, size, 3) uint8
    object: np.ndarray  # bool, object pixels
    tag: np.ndarray  # bool, tag pixels (all False without a tag)
    tag_dark: np.ndarray  # bool, the tag's dark "x" pixels


def place(rng, size):
    """Sample ``(cy, cx, r)``: object side 35-60 % of ``size``, fully inside, clear of the tag corner."""
    r = rng.uniform(0.35, 0.60) * size / 2
    y0, x0, _ = tag_box(size)
    lo, hi = r + 1.0, size - 1.0 - r
    for _ in range(64):
        cy, cx = rng.uniform(lo, hi, size=2)
        # Keep one pixel of background between the object's box and the tag box.
        if cy + r < y0 - 1 or cx + r < x0 - 1:
            return float(cy), float(cx), float(r)
    # Unreachable in practice (the feasible region is most of the image); a safe fallback.
    return float(lo), float(lo), float(r)


def draw(rng, size, shape, color, texture, scene, tag, hollow=False):
    """Render one world image.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of everything not given (placement, colour jitter, texture phase, noise).
    size : int
        Image side in pixels.
    shape, color, texture, scene : str
        Attribute values from :data:`SHAPES`, :data:`COLORS`, :data:`TEXTURES`, :data:`SCENES`.
    tag : bool
        Draw the watermark tag in the bottom-right corner.
    hollow : bool
        Draw the shape as an outline (squares only in the ``shapes`` preset).

    Returns
    -------
    Drawn
    """
    cy, cx, r = place(rng, size)
    obj = shape_mask(shape, cy, cx, r, size, hollow=hollow)
    rgb = np.asarray(COLOR_RGB[color], dtype=np.float32) + rng.uniform(-12, 12, size=3).astype(np.float32)
    phase = rng.random(2)
    img = background(scene, size, rng)
    fill = rgb * texture_factor(texture, size, phase)[..., None]
    fill = fill + np.float32(3.0) * rng.standard_normal((size, size, 1), dtype=np.float32)
    img = np.where(obj[..., None], fill, img)
    if tag:
        tag_m, dark = tag_masks(size)
        # The tag is drawn crisp and noise-free, as a stamped watermark would be.
        img = np.where(tag_m[..., None], np.where(dark[..., None], TAG_DARK, TAG_LIGHT), img)
    else:
        tag_m = dark = np.zeros((size, size), dtype=bool)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return Drawn(image=image, object=obj, tag=tag_m, tag_dark=dark)

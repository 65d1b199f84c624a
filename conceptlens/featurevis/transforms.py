"""Robustness transforms: lucent's default random pad, jitter, scale and rotation, in plain torch.

Optimising an image through small random transforms keeps it from exploiting single-pixel
patterns the model would not respond to once shifted (Olah et al. 2017, "Feature Visualization").
The steps follow lucent's ``standard_transforms``: pad 12 (constant 0.5) -> jitter 8 -> scale
0.9-1.1 -> rotate +-10 degrees -> jitter 4, with two departures:

- scale and rotation resample at the canvas's own pixel size and the last jitter crops to the
  input size, so the model always sees ``H x W`` images (lucent's grow by about 12 pixels and vary
  with the scale). A model with a fixed input size then works, and a unit objective's position
  means the same map cell in every step.
- scale and angle are drawn uniformly from their ranges (lucent draws from short lists of values).

Every image draws its transforms from its own generator, seeded per (seed, image, step), so a
batch is transformed exactly as its images would be one at a time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import ConceptLensError

__all__ = ["RobustnessTransforms", "default_transforms", "REFERENCE_SIZE"]

REFERENCE_SIZE = 224
"""The image size lucent's pixel amounts were chosen for."""


class RobustnessTransforms:
    """Random pad -> jitter -> scale -> rotate -> jitter, one draw per image.

    Parameters
    ----------
    pad : int
        Pixels of constant 0.5 added on every side.
    jitter : int
        The first random crop removes this many rows and columns (a shift of 0-``jitter`` pixels).
    scale : (float, float)
        Range of the random zoom factor.
    degrees : float
        Rotation drawn from ``[-degrees, degrees]``.
    jitter2 : int
        The final random shift; the output is cropped to the input's ``H x W``.
    """

    def __init__(self, pad=12, jitter=8, scale=(0.9, 1.1), degrees=10.0, jitter2=4):
        for name, value in (("pad", pad), ("jitter", jitter), ("jitter2", jitter2)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConceptLensError(f"transform {name} must be a non-negative integer number of pixels; got {value!r}")
        if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
            raise ConceptLensError(f"transform scale must be a range (low, high) with 0 < low <= high; got {scale!r}")
        self.pad, self.jitter, self.jitter2 = pad, jitter, jitter2
        self.scale, self.degrees = (float(scale[0]), float(scale[1])), float(degrees)

    def describe(self):
        """The transforms as one line, for provenance."""
        return (f"pad({self.pad}, 0.5) > jitter({self.jitter}) > scale({self.scale[0]:g}-{self.scale[1]:g}) > "
                f"rotate(+-{self.degrees:g}) > jitter({self.jitter2})")

    def _draw(self, g):
        dy1, dx1 = (int(v) for v in torch.randint(0, self.jitter + 1, (2,), generator=g))
        s, a = torch.rand(2, generator=g, dtype=torch.float64).tolist()
        dy2, dx2 = (int(v) for v in torch.randint(0, self.jitter2 + 1, (2,), generator=g))
        scale = self.scale[0] + (self.scale[1] - self.scale[0]) * s
        return dy1, dx1, scale, math.radians(self.degrees * (2 * a - 1)), dy2, dx2

    def __call__(self, images, generators):
        """Transform ``images`` ``[N, C, H, W]`` with one generator per image; returns ``[N, C, H, W]``."""
        n, c, h, w = images.shape
        draws = [self._draw(g) for g in generators]
        x = F.pad(images, (self.pad,) * 4, value=0.5)
        h1, w1 = h + 2 * self.pad - self.jitter, w + 2 * self.pad - self.jitter
        x = self._crops(x, [d[:2] for d in draws], h1, w1)
        h2, w2 = h + self.jitter2, w + self.jitter2
        theta = self._theta([d[2] for d in draws], [d[3] for d in draws], (h1, w1), (h2, w2))
        grid = F.affine_grid(theta.to(x), [n, c, h2, w2], align_corners=False)
        # Sampling x - 0.5 with zero padding fills whatever rotation brings in from outside with 0.5,
        # the pad colour, so the canvas edge never shows.
        x = F.grid_sample(x - 0.5, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + 0.5
        return self._crops(x, [d[4:] for d in draws], h, w)

    @staticmethod
    def _crops(x, offsets, h, w):
        """``x[i, ..., dy:dy + h, dx:dx + w]`` for each image's ``(dy, dx)``, stacked: exact copies by one
        ``gather`` over the flattened map (its backward is one ``scatter_add``, not one slice per image)."""
        n, width = x.shape[0], x.shape[-1]
        offsets = torch.tensor(offsets, device=x.device)  # [n, 2]
        rows = offsets[:, 0, None] + torch.arange(h, device=x.device)  # [n, h]
        cols = offsets[:, 1, None] + torch.arange(w, device=x.device)  # [n, w]
        flat = x.reshape(*x.shape[:-2], -1)  # [n, ..., H * W]
        index = (rows[:, :, None] * width + cols[:, None, :]).reshape(n, *(1,) * (flat.dim() - 2), h * w)
        return flat.gather(-1, index.expand(*flat.shape[:-1], h * w)).reshape(*x.shape[:-2], h, w)

    @staticmethod
    def _theta(scales, angles, size_in, size_out):
        """``affine_grid``'s matrices ``[n, 2, 3]``: output pixels to input pixels about the centre, zoom
        ``scales[i]``, turn ``angles[i]`` (one matrix per image, computed together in float64).

        Works in pixel units (so rotation is a true rotation on non-square images) and shifts by
        half a pixel where input and output sizes differ by an odd amount, so that at scale 1 and
        angle 0 the output is an exact crop.
        """
        (hi, wi), (ho, wo) = size_in, size_out
        scales, angles = (torch.tensor(v, dtype=torch.float64) for v in (scales, angles))
        cos, sin = torch.cos(angles) / scales, torch.sin(angles) / scales
        to_norm_in = torch.tensor([[2.0 / wi, 0.0], [0.0, 2.0 / hi]], dtype=torch.float64)
        from_norm_out = torch.tensor([[wo / 2.0, 0.0], [0.0, ho / 2.0]], dtype=torch.float64)
        rot = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)  # [n, 2, 2]
        shift = torch.tensor([-((wi - wo) % 2) / wi, -((hi - ho) % 2) / hi], dtype=torch.float64)
        linear = to_norm_in @ rot @ from_norm_out
        return torch.cat([linear, shift[:, None].expand(len(linear), 2, 1)], dim=2).float()


def default_transforms(height, width):
    """lucent's default transforms, their pixel amounts scaled for images smaller than 224 px.

    lucent's pad 12 / jitter 8 / jitter 4 were chosen for 224-px ImageNet inputs; on a 32-px model
    an 8-pixel shift is a quarter of the image and blurs the result. The amounts are scaled by
    ``min(H, W) / 224`` below 224 px (jitters at least 1 pixel) and kept as they are above it.
    Scale and rotation are relative and stay unchanged.
    """
    r = min(1.0, min(height, width) / REFERENCE_SIZE)
    return RobustnessTransforms(pad=max(1, round(12 * r)), jitter=max(1, round(8 * r)), jitter2=max(1, round(4 * r)))

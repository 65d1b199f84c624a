"""Image parameterisations: what the optimiser changes, and how that becomes ``[0, 1]`` images.

Both take one ``torch.Generator`` per image, so each image's initial parameters depend on its own
seed alone and not on which other images share its batch. The parameters of all images form one
``[N, ...]`` leaf tensor; Adam updates it element-wise, so a batch optimises like N separate runs.
"""

from __future__ import annotations

import torch

from ..errors import ConceptLensError

__all__ = ["ImageParam", "pixel", "fourier", "COLOR_CORRELATION_SQRT", "PARAMS"]

COLOR_CORRELATION_SQRT = torch.tensor([[0.26, 0.09, 0.02],
                                       [0.27, 0.00, -0.05],
                                       [0.27, -0.09, 0.03]])
"""Lucid's square root of the ImageNet RGB colour correlation matrix (``color_correlation_svd_sqrt``)."""


class ImageParam:
    """A batch of parameterised images.

    Attributes
    ----------
    params : Tensor
        The leaf tensor the optimiser updates (``requires_grad``), one row per image.
    shape : tuple of int
        ``(N, C, H, W)`` of the images.
    """

    def __init__(self, params, shape, to_image, description):
        self.params, self.shape, self._to_image, self.description = params, shape, to_image, description

    def __call__(self):
        """The images, ``[N, C, H, W]`` in ``(0, 1)``."""
        return self._to_image(self.params)


def _check(generators, height, width, channels):
    for name, value in (("height", height), ("width", width), ("channels", channels)):
        if not isinstance(value, int) or value < 1:
            raise ConceptLensError(f"image {name} must be a positive integer; got {value!r}")
    if not generators:
        raise ConceptLensError("an image parameterisation needs one torch.Generator per image; got none")


def _randn(generators, shape, sd, device):
    # Each image's values come from its own generator on the CPU, so they do not depend on the batch
    # or on the device's random number generator.
    rows = [torch.randn(shape, generator=g) * sd for g in generators]
    return torch.stack(rows).to(device).requires_grad_(True)


def pixel(generators, height, width, channels=3, sd=0.01, device="cpu"):
    """Raw pixel values through a sigmoid, initialised ``N(0, sd)`` (so the images start near grey).

    Parameters
    ----------
    generators : list of torch.Generator
        One per image; N = ``len(generators)``.
    height, width, channels : int
    sd : float
        Standard deviation of the initial values.
    device : str or torch.device

    Returns
    -------
    ImageParam
    """
    _check(generators, height, width, channels)
    params = _randn(generators, (channels, height, width), sd, device)
    return ImageParam(params, (len(generators), channels, height, width), torch.sigmoid, f"pixel(sd={sd:g})")


def _freqs(height, width):
    # |f| of each rfft2 coefficient. Lucid takes w // 2 + 2 columns for odd widths and lets irfft
    # drop the extra one; rfftfreq's w // 2 + 1 is the exact count.
    fy = torch.fft.fftfreq(height)[:, None]
    fx = torch.fft.rfftfreq(width)[None, :]
    return torch.sqrt(fx * fx + fy * fy)


def fourier(generators, height, width, channels=3, sd=0.01, decay_power=1.0, decorrelate=True, device="cpu"):
    """Lucid's FFT parameterisation: a spectrum scaled by ``1 / freq^decay_power``, then sigmoid.

    The parameters are the real and imaginary parts of each channel's ``rfft2`` spectrum,
    initialised ``N(0, sd)``. Scaling by ``1 / max(freq, 1 / max(H, W))^decay_power`` makes equal
    steps in every coefficient give the image a natural ``1/f`` spectrum, which keeps the optimiser
    from filling the image with high-frequency patterns. The inverse ``irfft2`` (``norm="ortho"``)
    is divided by Lucid's constant 4; for 3 channels the colours are then decorrelated with
    :data:`COLOR_CORRELATION_SQRT` (columns normalised to a largest norm of 1, as in Lucid), and a
    sigmoid maps the result to ``(0, 1)``.

    Parameters
    ----------
    generators : list of torch.Generator
        One per image; N = ``len(generators)``.
    height, width, channels : int
    sd : float
        Standard deviation of the initial spectrum.
    decay_power : float
        Exponent of the frequency scaling (Lucid: 1).
    decorrelate : bool
        Apply the colour decorrelation matrix (3 channels only; ignored otherwise).
    device : str or torch.device

    Returns
    -------
    ImageParam
    """
    _check(generators, height, width, channels)
    freqs = _freqs(height, width)
    scale = (1.0 / freqs.clamp_min(1.0 / max(height, width)) ** decay_power).to(device)
    params = _randn(generators, (channels, *freqs.shape, 2), sd, device)
    color = None
    if decorrelate and channels == 3:
        color = COLOR_CORRELATION_SQRT / COLOR_CORRELATION_SQRT.norm(dim=0).max()
        color = color.to(device)

    def to_image(spectrum):
        image = torch.fft.irfft2(torch.view_as_complex(spectrum * scale[..., None]), s=(height, width), norm="ortho")
        image = image / 4.0  # Lucid's "magic" constant: keeps the initial image's contrast low
        if color is not None:
            # contiguous: conv kernels pick their algorithm by memory layout, and a batch should
            # take the same path as a single image
            image = torch.einsum("nchw,dc->ndhw", image, color).contiguous()
        return torch.sigmoid(image)

    description = f"fourier(sd={sd:g}, decay_power={decay_power:g}, decorrelate={color is not None})"
    return ImageParam(params, (len(generators), channels, height, width), to_image, description)


PARAMS = {"pixel": pixel, "fourier": fourier}
"""The parameterisations :func:`~conceptlens.featurevis.visualize` accepts by name."""

"""Colour differences between scanners (and a paler counterstain), as transforms of a real slide's
RGB pixels.

No second scanner's copy of a slide is at hand, so ``bench/drift.py`` and the tests apply these
to a real slide and score the copies: white balance (per-channel gains), the tone curve (a gamma:
it turns every optical density OD relative to white into gamma × OD), colour saturation, softer
optics, and all of them together; :func:`counterstain` redraws the slide with less haematoxylin,
as a lab whose counterstain runs pale would stain it. Each takes and returns float RGB (0–255, not
clipped).
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

from pipeline.stains import StainMatrix, deconvolve

Transform = Callable[[np.ndarray], np.ndarray]


def gains(r: float, g: float, b: float) -> Transform:
    """White balance: each channel's light times its gain."""
    return lambda rgb: rgb * np.array([r, g, b])


def gamma(power: float) -> Transform:
    """A tone curve 255 × (v / 255) ** power."""
    return lambda rgb: 255.0 * (np.maximum(rgb, 0.0) / 255.0) ** power


def saturation(factor: float) -> Transform:
    """Colours moved towards (factor < 1) or away from their grey (luma)."""

    def apply(rgb: np.ndarray) -> np.ndarray:
        grey = rgb @ np.array([0.299, 0.587, 0.114])
        return grey[..., None] + factor * (rgb - grey[..., None])

    return apply


def soft(sigma_px: float = 0.5) -> Transform:
    """Softer optics: a Gaussian blur of ``sigma_px``."""
    return lambda rgb: cv2.GaussianBlur(np.asarray(rgb, np.float64), (0, 0), sigma_px)


def combined() -> Transform:
    """Warmer white balance, gamma 1.15, 15 % less saturation and softer optics together."""
    steps = (gains(1.06, 1.0, 0.94), gamma(1.15), saturation(0.85), soft())

    def apply(rgb: np.ndarray) -> np.ndarray:
        for step in steps:
            rgb = step(rgb)
        return rgb

    return apply


def counterstain(scale: float, stains: StainMatrix | None = None) -> Transform:
    """The haematoxylin of every pixel times ``scale`` (colour deconvolution against white 255 with
    ``stains``, QuPath's H-DAB defaults unless given; DAB and the residual kept)."""
    matrix = stains or StainMatrix()

    def apply(rgb: np.ndarray) -> np.ndarray:
        amounts = deconvolve(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), matrix, 255.0).astype(np.float64)
        amounts[..., 0] *= scale
        return 255.0 * np.power(10.0, -(amounts @ matrix.matrix()))

    return apply


#: The copies ``bench/drift.py`` scores, by name.
SCANNER_DIFFERENCES: dict[str, Transform] = {
    "warmer white balance": gains(1.06, 1.0, 0.94),
    "cooler white balance": gains(0.94, 1.0, 1.06),
    "gamma 0.85": gamma(0.85),
    "gamma 1.15": gamma(1.15),
    "saturation -15 %": saturation(0.85),
    "saturation +15 %": saturation(1.15),
    "softer optics": soft(),
    "all together": combined(),
}


def apply(transform: Transform, pixels: np.ndarray) -> np.ndarray:
    """``transform`` of uint8 RGB ``pixels``, rounded and clipped back to uint8."""
    return np.clip(np.rint(transform(pixels.astype(np.float64))), 0, 255).astype(np.uint8)

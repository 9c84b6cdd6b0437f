"""Stain vectors and the Beer–Lambert optical-density model.

Vectors are unit optical-density directions in RGB order. The defaults are
QuPath's "H-DAB default" estimates, so a lab moving a QuPath protocol over
gets the same deconvolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: QuPath H-DAB default: haematoxylin optical-density vector (R, G, B).
HEMATOXYLIN_QUPATH = (0.65111, 0.70119, 0.29049)
#: QuPath H-DAB default: DAB optical-density vector (R, G, B).
DAB_QUPATH = (0.26917, 0.56824, 0.77759)


def unit(v: np.ndarray | tuple[float, ...]) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64)
    n = float(np.linalg.norm(a))
    if n == 0:
        raise ValueError("stain vector must not be zero")
    return a / n


@dataclass(frozen=True)
class StainMatrix:
    """Haematoxylin, DAB and a residual third stain (their cross product)."""

    hematoxylin: tuple[float, float, float] = HEMATOXYLIN_QUPATH
    dab: tuple[float, float, float] = DAB_QUPATH

    def matrix(self) -> np.ndarray:
        """3×3 matrix, one unit OD vector per row: H, DAB, residual."""
        h, d = unit(self.hematoxylin), unit(self.dab)
        r = np.cross(h, d)
        return np.stack([h, d, unit(r)])

    def concentrations_to_rgb(self, conc: np.ndarray, background: float = 255.0) -> np.ndarray:
        """Beer–Lambert: ``(..., 3)`` stain ODs to ``(..., 3)`` float intensities."""
        od = conc @ self.matrix()
        return background * np.power(10.0, -od)

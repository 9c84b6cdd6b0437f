"""Tissue detection on a low-resolution image and tissue-tile selection.

Method: optical-density sum of a low-resolution read (default 8 µm/px)
measured against the slide's own glass colour, then a threshold, a
morphological closing to join cells into tissue, and removal of pieces
smaller than ``min_region_um2``. White holes inside tissue (fat, lumina,
tears) stay holes: they are not tissue.

* **Glass colour** (the white level): the median colour of bright pixels
  well away from what a first pass (against white 255) calls tissue; where
  the first pass sees no such glass — a crop that is all tissue and lumina,
  or a scanner colour cast that makes the glass itself absorb — the median
  of the brightest *flat* pixels (3×3 standard deviation under 2 levels:
  empty glass, not textured tissue), if there are enough of them; else 255.
* **Threshold**: the lower of the two three-class Otsu thresholds (glass |
  pale stroma | dense tissue), clipped to ``[min_od, max_od]``. Two-class
  Otsu splits dense tumour from everything else and loses pale stroma on a
  slide with a weak counterstain; any counterstained tissue absorbs more
  than ``max_od`` above the glass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage
from skimage.filters import threshold_multiotsu, threshold_otsu

from config.settings import TissueSettings
from pipeline.slide import Slide, TileGrid
from pipeline.stains import od_sum


@dataclass(frozen=True)
class TissueMask:
    """Boolean tissue mask at ``mpp`` µm/px covering the slide from (0, 0)."""

    mask: np.ndarray
    mpp: float
    threshold_od: float
    #: Median RGB of the glass around the tissue, None when there is too little glass.
    glass_rgb: tuple[float, float, float] | None = None

    @property
    def area_mm2(self) -> float:
        return float(self.mask.sum()) * (self.mpp / 1000.0) ** 2

    def tile_fractions(self, grid: TileGrid) -> np.ndarray:
        """Tissue fraction of every tile core of ``grid`` (rows × columns)."""
        scale = grid.mpp / self.mpp
        h, w = self.mask.shape
        integral = np.zeros((h + 1, w + 1), np.float64)
        integral[1:, 1:] = self.mask.cumsum(0).cumsum(1)
        out = np.zeros((grid.rows, grid.columns))
        for x, y, tw, th in grid.cores():
            x0, y0 = min(w, int(x * scale)), min(h, int(y * scale))
            x1, y1 = min(w, max(x0 + 1, round((x + tw) * scale))), min(h, max(y0 + 1, round((y + th) * scale)))
            area = (x1 - x0) * (y1 - y0)
            if area <= 0:
                continue
            s = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
            out[y // grid.tile_size, x // grid.tile_size] = s / area
        return out

    def tissue_bounds(self, core: tuple[int, int, int, int], mpp: float, pad_um: float) -> tuple[int, int, int, int]:
        """The part of a tile core ``(x, y, width, height)`` (px at ``mpp``) that
        holds tissue: the bounding box of the mask's tissue pixels under it,
        grown by ``pad_um`` and clipped to the core (the whole core when it has
        no tissue pixel)."""
        x, y, cw, ch = core
        scale = mpp / self.mpp
        h, w = self.mask.shape
        x0, y0 = min(w, int(x * scale)), min(h, int(y * scale))
        x1, y1 = min(w, max(x0 + 1, math.ceil((x + cw) * scale))), min(h, max(y0 + 1, math.ceil((y + ch) * scale)))
        under = self.mask[y0:y1, x0:x1]
        rows, cols = np.flatnonzero(under.any(axis=1)), np.flatnonzero(under.any(axis=0))
        if rows.size == 0:
            return core
        pad = pad_um / mpp
        left = max(x, math.floor((x0 + cols[0]) / scale - pad))
        top = max(y, math.floor((y0 + rows[0]) / scale - pad))
        right = min(x + cw, math.ceil((x0 + cols[-1] + 1) / scale + pad))
        bottom = min(y + ch, math.ceil((y0 + rows[-1] + 1) / scale + pad))
        return left, top, right - left, bottom - top


def low_resolution(slide: Slide, settings: TissueSettings) -> tuple[np.ndarray, float]:
    """The whole slide at the tissue mask's resolution (``tissue.mpp``, or the slide's own if
    coarser), and that resolution: what tissue detection and quality control look at."""
    mpp = max(settings.mpp, slide.mpp)
    grid = slide.grid(mpp, tile_size=1 << 30)
    rgb, _ = slide.read_at_mpp(mpp, 0, 0, grid.width, grid.height)
    return rgb, mpp


def detect_tissue(slide: Slide, settings: TissueSettings, background: float = 255.0) -> TissueMask:
    """Find tissue on a low-resolution read of ``slide``."""
    rgb, mpp = low_resolution(slide, settings)
    return tissue_from_rgb(rgb, mpp, settings, background)


def tissue_from_rgb(rgb: np.ndarray, mpp: float, settings: TissueSettings, background: float = 255.0) -> TissueMask:
    od, first = _threshold(rgb, background, settings)
    glass = _glass_rgb(rgb, od > first)
    if glass is None:
        glass = _flat_glass_rgb(rgb)
    if glass is not None:
        od, threshold = _threshold(rgb, glass, settings)
    else:
        threshold = first
    mask = od > threshold
    radius = round(settings.close_um / mpp)
    if radius > 0:
        # Padded so that the closing does not see the image edge as background.
        yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
        disk = (xx * xx + yy * yy <= radius * radius).astype(np.uint8)
        padded = cv2.copyMakeBorder(mask.view(np.uint8), *(radius,) * 4, cv2.BORDER_CONSTANT, value=0)
        closed = cv2.morphologyEx(padded, cv2.MORPH_CLOSE, disk)
        mask = np.ascontiguousarray(closed[radius:-radius, radius:-radius]).view(bool)
        # The closing joins cells across pale gaps, and would also fill fat cells and lumina:
        # pieces as clear as glass (below min_od), at least a closing disk in area, stay holes,
        # with the one-pixel rim the blur of the low-resolution read gives them.
        clear = (od < settings.min_od).view(np.uint8)
        n, pieces, stats, _ = cv2.connectedComponentsWithStats(clear, connectivity=4)
        if n > 1:
            big = stats[:, cv2.CC_STAT_AREA] >= disk.sum()
            big[0] = False
            holes = cv2.dilate(big[pieces].view(np.uint8), cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3)))
            mask &= holes == 0
    min_px = settings.min_region_um2 / (mpp * mpp)
    if min_px > 1 and mask.any():
        _, labels, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=4)
        keep = stats[:, cv2.CC_STAT_AREA] >= min_px
        keep[0] = False
        mask = keep[labels]
    return TissueMask(mask=mask, mpp=mpp, threshold_od=threshold, glass_rgb=glass)


def _threshold(
    rgb: np.ndarray, white: float | tuple[float, float, float], settings: TissueSettings
) -> tuple[np.ndarray, float]:
    """The smoothed OD sum against ``white`` and the tissue threshold on it."""
    od = ndimage.gaussian_filter(od_sum(rgb, white), 1.0)
    try:
        otsu = float(threshold_multiotsu(od, classes=3)[0])
    except ValueError:  # fewer than three grey levels
        try:
            otsu = float(threshold_otsu(od))
        except ValueError:  # a constant image
            otsu = settings.min_od
    threshold = float(np.clip(otsu, settings.min_od, settings.max_od))
    return od, threshold


def _glass_rgb(rgb: np.ndarray, tissue: np.ndarray) -> tuple[float, float, float] | None:
    """Median colour of pixels well away from tissue (the slide's white level)."""
    cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    glass = cv2.dilate(tissue.view(np.uint8), cross, iterations=3) == 0
    # Dark non-tissue (pen marks, label edges, out-of-slide black) is not glass.
    bright = np.minimum(np.minimum(rgb[..., 0], rgb[..., 1]), rgb[..., 2]) >= 150
    chosen = glass & bright
    if np.count_nonzero(chosen) < max(100, 0.01 * tissue.size):
        return None
    return _median_rgb(rgb, chosen)


def _median_rgb(rgb: np.ndarray, where: np.ndarray) -> tuple[float, float, float]:
    """Each channel's median over the ``where`` pixels of uint8 ``rgb`` (as ``np.median``: the mean
    of the two middle values of an even count), from a histogram instead of a sort."""
    out = []
    for c in range(3):
        counts = np.cumsum(np.bincount(rgb[..., c][where], minlength=256))
        n = int(counts[-1])
        low = int(np.searchsorted(counts, (n - 1) // 2, side="right"))
        high = int(np.searchsorted(counts, n // 2, side="right"))
        out.append((low + high) / 2.0)
    return out[0], out[1], out[2]


#: Glass is flat: a 3×3 standard deviation of brightness under this many grey levels.
_FLAT_SD = 2.0

#: Glass pixels lie within this many grey levels of the brightest flat pixels.
_GLASS_SPREAD = 8.0


def _flat_glass_rgb(rgb: np.ndarray) -> tuple[float, float, float] | None:
    """Median colour of the brightest flat pixels (empty glass or lumina), None when there are too few."""
    third = np.full((1, 3), 1.0 / 3.0, np.float32)
    brightness = cv2.transform(rgb.astype(np.float32), third).reshape(rgb.shape[:2])  # numpy: far slower
    mean = cv2.blur(brightness, (3, 3))
    sd = np.sqrt(np.maximum(cv2.blur(brightness * brightness, (3, 3)) - mean * mean, 0.0))
    darkest = cv2.min(cv2.min(rgb[..., 0], rgb[..., 1]), rgb[..., 2])
    flat = (sd < _FLAT_SD) & (darkest >= 150)
    if flat.sum() < max(20, 0.005 * flat.size):
        return None
    glass = flat & (brightness >= np.percentile(brightness[flat], 99) - _GLASS_SPREAD)
    if glass.sum() < max(20, 0.005 * flat.size):
        return None
    return _median_rgb(rgb, glass)

"""Compiled per-pixel loops for per-cell measurement (numba).

Each measurement used to be one NumPy reduction over the cells' pixels
(bincount, scatter-max, gathers): some twenty passes over a tile. These
kernels make one pass for all the sums and maxima and one for the membrane
sectors; a third turns a nearest-nucleus distance transform into cell
labels. Compiled code is cached on disk (beside the module, or in
``NUMBA_CACHE_DIR`` where that is set): compiled once, not in every process.
"""

from __future__ import annotations

import math

import numba
import numpy as np

#: Rows of :func:`cell_stats`' result.
CELL_PIXELS, CELL_DAB_SUM, NUCLEUS_PIXELS, NUCLEUS_DAB_SUM, NUCLEUS_H_SUM, NUCLEUS_X_SUM, NUCLEUS_Y_SUM = range(7)
CELL_DAB_MAX, NUCLEUS_DAB_MAX, CYTOPLASM_DAB_MAX = range(7, 10)
_STATS = 10


@numba.njit(cache=True, nogil=True)
def cell_stats(nuclei: np.ndarray, cells: np.ndarray, h_od: np.ndarray, dab_od: np.ndarray, n: int) -> np.ndarray:
    """Per-cell pixel counts, sums and maxima in one pass over a tile.

    ``nuclei`` and ``cells`` are label images (1..n, 0 = none) in which every
    nucleus pixel lies in the cell of the same label. Returns a ``(10, n)``
    float64 array indexed by the row constants of this module; maxima are
    -inf where a compartment has no pixel.
    """
    height, width = cells.shape
    out = np.zeros((_STATS, n))
    out[CELL_DAB_MAX:] = -np.inf
    for y in range(height):
        for x in range(width):
            c = cells[y, x]
            if c == 0:
                continue
            i = c - 1
            d = np.float64(dab_od[y, x])
            out[CELL_PIXELS, i] += 1.0
            out[CELL_DAB_SUM, i] += d
            if d > out[CELL_DAB_MAX, i]:
                out[CELL_DAB_MAX, i] = d
            k = nuclei[y, x]
            if k > 0:
                j = k - 1
                out[NUCLEUS_PIXELS, j] += 1.0
                out[NUCLEUS_DAB_SUM, j] += d
                out[NUCLEUS_H_SUM, j] += np.float64(h_od[y, x])
                out[NUCLEUS_X_SUM, j] += x
                out[NUCLEUS_Y_SUM, j] += y
                if d > out[NUCLEUS_DAB_MAX, j]:
                    out[NUCLEUS_DAB_MAX, j] = d
            elif d > out[CYTOPLASM_DAB_MAX, i]:
                out[CYTOPLASM_DAB_MAX, i] = d
    return out


@numba.njit(cache=True, nogil=True)
def sector_peaks(
    nuclei: np.ndarray, cells: np.ndarray, dab_od: np.ndarray, cx: np.ndarray, cy: np.ndarray, sectors: int
) -> np.ndarray:
    """Highest DAB of each cell's cytoplasm in each of ``sectors`` equal angles
    around its nucleus centre ``(cx, cy)`` (px); ``(n, sectors)``, -inf where a
    sector holds no pixel. Sector k spans angles ``atan2(dy, dx)`` from
    -π + 2πk/sectors."""
    height, width = cells.shape
    peak = np.full((cx.shape[0], sectors), -np.inf)
    scale = sectors / (2.0 * np.pi)
    for y in range(height):
        for x in range(width):
            c = cells[y, x]
            if c == 0 or nuclei[y, x] != 0:
                continue
            i = c - 1
            s = min(int((math.atan2(y - cy[i], x - cx[i]) + np.pi) * scale), sectors - 1)
            d = np.float64(dab_od[y, x])
            if d > peak[i, s]:
                peak[i, s] = d
    return peak


@numba.njit(cache=True, nogil=True)
def nearest_labels(nuclei: np.ndarray, nearest: np.ndarray, dist: np.ndarray, max_dist: float) -> np.ndarray:
    """Each pixel's nearest nucleus label within ``max_dist`` (0 beyond).

    ``nearest`` and ``dist`` are OpenCV's ``distanceTransformWithLabels``
    (``DIST_LABEL_PIXEL``) of the non-nucleus pixels: the index (1, 2, … in
    raster order) of each pixel's nearest nucleus pixel, and the distance to it.
    """
    height, width = nuclei.shape
    owner = np.zeros(height * width + 1, np.int32)
    k = 0
    for y in range(height):
        for x in range(width):
            if nuclei[y, x] != 0:
                k += 1
                owner[k] = nuclei[y, x]
    cells = np.zeros((height, width), np.int32)
    for y in range(height):
        for x in range(width):
            if dist[y, x] <= max_dist:
                cells[y, x] = owner[nearest[y, x]]
    return cells

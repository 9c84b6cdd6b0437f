"""Compiled per-pixel loops of the cell detector and the pixel H-score (numba).

Each of these used to be several NumPy passes over a tile (bincount,
scatter-max, gathers, lookups); each kernel is one pass: per-cell sums and
maxima, membrane sector peaks, nucleus labels from OpenCV's components and
distance transforms (split, trimmed, filtered by area), cell labels from the
nearest-nucleus transform, and pixel classes per tissue-grid cell.

Compiled code is cached on disk (in ``NUMBA_CACHE_DIR`` where that is set,
else beside this module or in the user's cache folder), so it is compiled
once, not in every process. Where none of those is writable the kernels are
compiled in each process (about 2 s) and a warning says so.
"""

from __future__ import annotations

import logging
import math

import numba
import numpy as np

log = logging.getLogger(__name__)


def _disk_cache_available() -> bool:
    """Whether numba finds a writable place for its on-disk cache (it refuses to
    decorate a cached function otherwise)."""
    try:
        numba.njit(cache=True)(_probe)
    except RuntimeError as exc:
        log.warning("compiled kernels cannot be cached on disk (%s); set NUMBA_CACHE_DIR to a writable folder", exc)
        return False
    return True


def _probe() -> int:
    return 0


_CACHE = _disk_cache_available()

#: Rows of :func:`cell_stats`' result.
CELL_PIXELS, CELL_DAB_SUM, NUCLEUS_PIXELS, NUCLEUS_DAB_SUM, NUCLEUS_H_SUM, NUCLEUS_X_SUM, NUCLEUS_Y_SUM = range(7)
CELL_DAB_MAX, NUCLEUS_DAB_MAX, CYTOPLASM_DAB_MAX = range(7, 10)
_STATS = 10


@numba.njit(cache=_CACHE, nogil=True)
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


@numba.njit(cache=_CACHE, nogil=True)
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


@numba.njit(cache=_CACHE, nogil=True)
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


@numba.njit(cache=_CACHE, nogil=True)
def split_trim_filter(
    pieces: np.ndarray,
    n_pieces: int,
    nearest: np.ndarray,
    peaks: np.ndarray,
    fine: np.ndarray,
    threshold: float,
    min_area: float,
    max_area: float,
    pixel_area: float,
) -> np.ndarray:
    """Nucleus labels 1..k from connected foreground ``pieces`` (0 = background).

    Split: where ``peaks`` is not empty, a pixel whose nearest peak plateau
    (``nearest``, OpenCV's component labels of the peaks) lies in its own piece
    takes that plateau as its label. Trim: where ``fine`` is not empty, a pixel
    stays only if ``fine`` reaches both ``threshold`` and half its label's
    highest ``fine``. Filter: labels whose area (pixels × ``pixel_area``) is
    outside [``min_area``, ``max_area``] are dropped; the rest are numbered
    1..k in order of label.
    """
    height, width = pieces.shape
    out = np.zeros((height, width), np.int32)
    split = peaks.size > 0
    n = n_pieces - 1
    marker_piece = np.zeros(1, np.int32)
    if split:
        plateaus = 0
        for y in range(height):
            for x in range(width):
                if nearest[y, x] > plateaus:
                    plateaus = nearest[y, x]
        marker_piece = np.zeros(plateaus + 1, np.int32)
        for y in range(height):
            for x in range(width):
                if peaks[y, x]:
                    marker_piece[nearest[y, x]] = pieces[y, x]
        n = n_pieces + plateaus
    for y in range(height):
        for x in range(width):
            p = pieces[y, x]
            if p != 0:
                out[y, x] = nearest[y, x] + n_pieces if split and marker_piece[nearest[y, x]] == p else p
    if fine.size > 0:
        peak = np.full(n + 1, -np.inf, np.float32)
        for y in range(height):
            for x in range(width):
                k = out[y, x]
                if k != 0 and fine[y, x] > peak[k]:
                    peak[k] = fine[y, x]
        cut = np.maximum(np.float32(threshold), np.float32(0.5) * peak)
        for y in range(height):
            for x in range(width):
                k = out[y, x]
                if k != 0 and not fine[y, x] >= cut[k]:
                    out[y, x] = 0
    count = np.zeros(n + 1, np.int64)
    for y in range(height):
        for x in range(width):
            count[out[y, x]] += 1
    lut = np.zeros(n + 1, np.int32)
    kept = 0
    for k in range(1, n + 1):
        area = count[k] * pixel_area
        if area >= min_area and area <= max_area:
            kept += 1
            lut[k] = kept
    for y in range(height):
        for x in range(width):
            out[y, x] = lut[out[y, x]]
    return out


@numba.njit(cache=_CACHE, nogil=True)
def class_counts_on_grid(
    nuclei: np.ndarray,
    cells: np.ndarray,
    dab_od: np.ndarray,
    compartment: int,
    thresholds: np.ndarray,
    x0: int,
    y0: int,
    scale: float,
    grid_h: int,
    grid_w: int,
) -> tuple[np.ndarray, int, int, int]:
    """Pixels of one compartment counted per cell of a coarser grid and intensity class.

    ``compartment``: 0 nucleus pixels, 1 cell pixels, 2 cell pixels outside the
    nucleus. A pixel's class is the number of ``thresholds`` (ascending) at
    or below its DAB. The tile's pixel (x, y) sits at (x0 + x, y0 + y) in the
    slide's grid, whose grid cell is that + 0.5 times ``scale``, clipped to
    ``grid_h`` × ``grid_w``. Returns a histogram over the grid cells the tile
    touches (row-major, ``len(thresholds) + 1`` classes each), their first
    row and column and the number of columns.
    """
    height, width = cells.shape
    classes = thresholds.shape[0] + 1
    row0 = min(max(int((y0 + 0.5) * scale), 0), grid_h - 1)
    col0 = min(max(int((x0 + 0.5) * scale), 0), grid_w - 1)
    rows = min(max(int((y0 + height - 0.5) * scale), 0), grid_h - 1) - row0 + 1
    cols = min(max(int((x0 + width - 0.5) * scale), 0), grid_w - 1) - col0 + 1
    hist = np.zeros(rows * cols * classes, np.int64)
    for y in range(height):
        row = min(max(int((y0 + y + 0.5) * scale), 0), grid_h - 1) - row0
        for x in range(width):
            c = cells[y, x]
            k = nuclei[y, x]
            if compartment == 0:
                inside = k > 0
            elif compartment == 1:
                inside = c > 0
            else:
                inside = c > 0 and k == 0
            if not inside:
                continue
            col = min(max(int((x0 + x + 0.5) * scale), 0), grid_w - 1) - col0
            v = dab_od[y, x]
            cls = 0
            for t in thresholds:
                if v >= t:
                    cls += 1
            hist[(row * cols + col) * classes + cls] += 1
    return hist, row0, col0, cols

"""Compiled per-pixel loops of the cell detector and the pixel H-score (numba).

Each of these used to be several NumPy passes over a tile (bincount,
scatter-max, gathers, lookups); each kernel is one pass, or a few: per-cell
sums and maxima, membrane sector peaks, nucleus labels from OpenCV's
components and distance transforms (split, trimmed, filtered by area),
cells grown from the nuclei by a chamfer distance, and pixel classes per
tissue-grid cell.

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


#: Steps of the diamond angle's lookup of sectors (:func:`sector_peaks`).
_ANGLE_STEPS = 4096


@numba.njit(cache=_CACHE, nogil=True, inline="always", error_model="numpy")
def _diamond_angle(dy: float, dx: float) -> float:
    """A stand-in for the angle of ``(dx, dy)``: rises with it from 0 (along +x)
    to 4 (a full turn) with no trigonometry; 0 for the zero vector. Written
    without branches on the quadrant (pixels of neighbouring cells alternate
    quadrants, which a branch predictor cannot follow)."""
    ax, ay = abs(dx), abs(dy)
    total = ax + ay
    t = ay / total if total > 0 else 0.0
    left, below = dx < 0, dy < 0  # `below` in y-up terms; -0.0 counts as >= 0
    base = 2.0 if left else (4.0 if below else 0.0)
    return base - t if left != below else base + t


@numba.njit(cache=_CACHE, nogil=True, error_model="numpy")
def sector_peaks(
    nuclei: np.ndarray, cells: np.ndarray, dab_od: np.ndarray, cx: np.ndarray, cy: np.ndarray, sectors: int
) -> np.ndarray:
    """Highest DAB of each cell's cytoplasm in each of ``sectors`` equal angles
    around its nucleus centre ``(cx, cy)`` (px); ``(n, sectors)``, -inf where a
    sector holds no pixel. Sector k spans angles ``atan2(dy, dx)`` from
    -π + 2πk/sectors (found from the diamond angle, a lookup and one
    comparison with a sector edge: no arctangent per pixel). At most 1024
    sectors."""
    height, width = cells.shape
    peak = np.full((cx.shape[0], sectors), -np.inf)
    # atan2(dy, dx) + π is the angle of (-dx, -dy); sector k starts at 2πk/sectors.
    edges = np.full(sectors + 1, np.inf)
    edges[0] = 0.0
    for k in range(1, sectors):
        turn = 2.0 * np.pi * k / sectors
        edges[k] = _diamond_angle(math.sin(turn), math.cos(turn))
    # The sector at the start of each of 4096 equal steps of the diamond angle: a
    # step is narrower than any sector, so at most one edge falls inside it.
    start = np.zeros(_ANGLE_STEPS, np.int64)
    k = 0
    for b in range(_ANGLE_STEPS):
        while k + 1 < sectors and edges[k + 1] <= b * (4.0 / _ANGLE_STEPS):
            k += 1
        start[b] = k
    for y in range(height):
        for x in range(width):
            c = cells[y, x]
            if c == 0 or nuclei[y, x] != 0:
                continue
            i = c - 1
            dy, dx = y - cy[i], x - cx[i]
            if dy == 0 and dx < 0:
                k = sectors - 1  # atan2(+0, -1) = +π: the end of the last sector
            else:
                a = 2.0 if dx == 0 and dy == 0 else _diamond_angle(-dy, -dx)
                k = start[min(int(a * (_ANGLE_STEPS / 4.0)), _ANGLE_STEPS - 1)]
                if a >= edges[k + 1]:
                    k += 1
            d = np.float64(dab_od[y, x])
            if d > peak[i, k]:
                peak[i, k] = d
    return peak


#: Units per pixel of the chamfer distance in :func:`expand_cells` (Borgefors'
#: 5-7-11 mask: a step across, diagonal or knight's move costs 5, 7 or 11,
#: i.e. 1, 1.4 and 2.2 px; OpenCV's ``DIST_L2`` 5×5 mask uses 1, 1.4 and 2.1969).
CHAMFER_UNITS = 5


def expand_cells(nuclei: np.ndarray, max_dist: float) -> tuple[np.ndarray, np.ndarray]:
    """Each pixel's nearest nucleus label within ``max_dist`` px (0 beyond) and
    its distance to that nucleus, by the 5×5 chamfer distance: within about
    2 % of the Euclidean distance, and within 0.2 % of OpenCV's 5×5
    ``DIST_L2`` transform. This is the cell expansion
    (:mod:`pipeline.nuclei`, step 6): ``nuclei`` are labels 1..n, 0 none.

    Distance and label travel together as one integer key (distance in the
    high bits, label in the low ones), so the two chamfer passes are a
    minimum over shifted rows, which vectorises; ties go to the smaller
    label. Distances beyond ``max_dist`` are capped just above it.
    """
    nuclei = np.ascontiguousarray(nuclei, dtype=np.int32)
    n = int(nuclei.max(initial=0))
    max_units = math.floor(max_dist * CHAMFER_UNITS + 1e-6)
    if max_units < 0:
        raise ValueError(f"max_dist must be zero or positive, not {max_dist}")
    bits = max(1, n.bit_length())
    cap = max_units + 1
    dtype: type[np.unsignedinteger] = np.uint32
    if (cap + 11) >> (32 - bits):  # too far or too many labels for 32-bit keys
        dtype = np.uint64
        if (cap + 11) >> (64 - bits):
            raise ValueError(f"max_dist {max_dist} px is too large with {n} nuclei")
    weights = np.array([cap << bits, 5 << bits, 7 << bits, 11 << bits, (1 << bits) - 1], dtype)
    height, width = nuclei.shape
    keys = np.full((height + 4, width + 4), weights[0], dtype)
    return _chamfer_cells(nuclei, keys, weights, bits, max_units)


@numba.njit(cache=_CACHE, nogil=True)
def _chamfer_cells(
    nuclei: np.ndarray, keys: np.ndarray, weights: np.ndarray, bits: int, max_units: int
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`expand_cells`' two passes; ``keys`` is the image padded by 2 px,
    all ``far``; ``weights`` are ``far``, the three step costs and the label mask
    as keys."""
    height, width = nuclei.shape
    far, a, b, c, mask = weights[0], weights[1], weights[2], weights[3], weights[4]
    row = np.empty(width, keys.dtype)
    # Loops run over unpadded x (so that stores need no negative-index check
    # and vectorise); p = x + 2 indexes the padded keys.
    for y in range(height):  # forward: from the two rows above, then along the row
        up1, up2, cur, labels = keys[y + 1], keys[y], keys[y + 2], nuclei[y]
        for x in range(width):
            p = x + 2
            c1 = min(up1[p - 1] + b, up1[p] + a)
            c2 = min(up1[p + 1] + b, up1[p - 2] + c)
            c3 = min(up1[p + 2] + c, up2[p - 1] + c)
            c4 = min(up2[p + 1] + c, far)
            row[x] = min(min(c1, c2), min(c3, c4))
            if labels[x] != 0:
                row[x] = labels[x]
        prev = far
        for x in range(width):
            prev = min(row[x], prev + a)
            cur[x + 2] = prev
    for y in range(height - 1, -1, -1):  # backward: from the two rows below, then back along the row
        dn1, dn2, cur = keys[y + 3], keys[y + 4], keys[y + 2]
        for x in range(width):
            p = x + 2
            c1 = min(dn1[p + 1] + b, dn1[p] + a)
            c2 = min(dn1[p - 1] + b, dn1[p + 2] + c)
            c3 = min(dn1[p - 2] + c, dn2[p + 1] + c)
            c4 = min(dn2[p - 1] + c, cur[p])
            row[x] = min(min(c1, c2), min(c3, c4))
        prev = far
        for x in range(width - 1, -1, -1):
            prev = min(row[x], prev + a)
            cur[x + 2] = prev
    cells = np.empty((height, width), np.int32)
    dist = np.empty((height, width), np.float32)
    scale = np.float32(1.0 / CHAMFER_UNITS)
    for y in range(height):
        for x in range(width):
            key = keys[y + 2, x + 2]
            units = key >> bits
            dist[y, x] = units * scale
            cells[y, x] = 0
            if units <= max_units:
                cells[y, x] = key & mask
    return cells, dist


#: :func:`split_at_peaks` finds each pixel's nearest peak by trying every peak
#: pixel of its piece while pixels × peak pixels of the piece stay under this;
#: larger pieces (a fold, pen ink) use a linear-time propagation instead.
@numba.njit(cache=_CACHE, nogil=True)
def merge_neckless_peaks(
    pieces: np.ndarray, plateaus: np.ndarray, n_plateaus: int, dist: np.ndarray, tolerance: float
) -> tuple[np.ndarray, int]:
    """Peak plateaus (labels 1..n_plateaus-1) of one piece that no neck separates, merged.

    Two peaks of a piece's distance map are two nuclei only where the way between
    them dips: along the straight line joining them (one sample per pixel) the
    distance must fall more than ``tolerance`` below the lower peak, or leave
    the piece. Otherwise (an elongated nucleus whose ridge has two bumps) the
    plateaus are one. Returns the relabelled plateaus (1..k, in order of first
    label) and k + 1.
    """
    height, width = plateaus.shape
    py = np.full(n_plateaus, -1, np.int64)
    px = np.zeros(n_plateaus, np.int64)
    for y in range(height):
        for x in range(width):
            q = plateaus[y, x]
            if q > 0 and py[q] < 0:
                py[q], px[q] = y, x
    parent = np.arange(n_plateaus)
    order = np.argsort(pieces.ravel()[py[1:] * width + px[1:]]) + 1  # plateaus grouped by piece
    start = 0
    while start < len(order):
        piece = pieces[py[order[start]], px[order[start]]]
        stop = start
        while stop < len(order) and pieces[py[order[stop]], px[order[stop]]] == piece:
            stop += 1
        for a in range(start, stop):
            i = order[a]
            for b in range(a + 1, stop):
                j = order[b]
                low = min(dist[py[i], px[i]], dist[py[j], px[j]])
                steps = max(abs(py[j] - py[i]), abs(px[j] - px[i]))
                neck = False
                for k in range(1, steps):
                    y = py[i] + (py[j] - py[i]) * k / steps
                    x = px[i] + (px[j] - px[i]) * k / steps
                    yy, xx = int(y + 0.5), int(x + 0.5)
                    if pieces[yy, xx] != piece or dist[yy, xx] < low - tolerance:
                        neck = True
                        break
                if not neck:
                    ri, rj = i, j
                    while parent[ri] != ri:
                        ri = parent[ri]
                    while parent[rj] != rj:
                        rj = parent[rj]
                    if ri != rj:
                        parent[max(ri, rj)] = min(ri, rj)
        start = stop
    new = np.zeros(n_plateaus, np.int32)
    k = 0
    for q in range(1, n_plateaus):
        r = q
        while parent[r] != r:
            r = parent[r]
        if r == q:
            k += 1
            new[q] = k
    for q in range(1, n_plateaus):
        r = q
        while parent[r] != r:
            r = parent[r]
        new[q] = new[r]
    out = np.zeros((height, width), np.int32)
    for y in range(height):
        for x in range(width):
            out[y, x] = new[plateaus[y, x]]
    return out, k + 1


SPLIT_BRUTE_FORCE_BUDGET = 1 << 20


@numba.njit(cache=_CACHE, nogil=True)
def split_at_peaks(pieces: np.ndarray, n_pieces: int, plateaus: np.ndarray, n_plateaus: int, budget: int) -> np.ndarray:
    """Split connected foreground ``pieces`` (labels 1..n_pieces-1, 0 = background)
    at peak ``plateaus`` (labels 1..n_plateaus-1). A plateau belongs to the
    piece of its last pixel in raster order; its pixels in any other piece
    (a plateau may touch two pieces at a corner) are ignored.

    In a piece holding two or more plateaus, each pixel takes the label
    ``n_pieces + plateau`` of the plateau with the nearest pixel (Euclidean;
    ties to the first in raster order); a piece with one plateau or none keeps
    its own label. Pieces where pixels × peak pixels exceed ``budget`` are
    split by propagating nearest-peak offsets through the piece instead
    (raster sweeps, exact but for rare one-pixel slips; distances within
    the piece).
    """
    height, width = pieces.shape
    plateau_piece = np.zeros(max(n_plateaus, 1), np.int32)
    area = np.zeros(n_pieces, np.int64)
    listed = 0
    for y in range(height):
        for x in range(width):
            if plateaus[y, x] > 0:
                listed += 1
    ly = np.zeros(listed, np.int32)  # peak pixels, listed in raster order
    lx = np.zeros(listed, np.int32)
    listed = 0
    for y in range(height):
        for x in range(width):
            p = pieces[y, x]
            if p == 0:
                continue
            area[p] += 1
            q = plateaus[y, x]
            if q > 0:
                plateau_piece[q] = p
                ly[listed], lx[listed] = y, x
                listed += 1
    count = np.zeros(n_pieces, np.int32)
    for q in range(1, n_plateaus):
        count[plateau_piece[q]] += 1
    peak_px = np.zeros(n_pieces + 1, np.int64)
    for k in range(listed):
        p = pieces[ly[k], lx[k]]
        if plateau_piece[plateaus[ly[k], lx[k]]] == p and count[p] >= 2:
            peak_px[p + 1] += 1
    start = np.cumsum(peak_px)  # peak pixels of piece p: start[p]:start[p + 1]
    fill = start[:-1].copy()
    py = np.zeros(start[-1], np.int32)
    px = np.zeros(start[-1], np.int32)
    pq = np.zeros(start[-1], np.int32)
    for k in range(listed):
        y, x = ly[k], lx[k]
        q, p = plateaus[y, x], pieces[y, x]
        if plateau_piece[q] == p and count[p] >= 2:
            i = fill[p]
            py[i], px[i], pq[i] = y, x, q
            fill[p] += 1
    # 0: keep the piece, 1: try every peak, 2: propagate.
    mode = np.zeros(n_pieces, np.int8)
    for p in range(1, n_pieces):
        if count[p] >= 2:
            mode[p] = 1 if area[p] * (start[p + 1] - start[p]) <= budget else 2
    out = np.empty((height, width), np.int32)
    propagate = False
    for y in range(height):
        for x in range(width):
            p = pieces[y, x]
            out[y, x] = p
            if mode[p] == 1:
                best, label = np.int64(1) << 62, 0
                for k in range(start[p], start[p + 1]):
                    d = np.int64(y - py[k]) ** 2 + np.int64(x - px[k]) ** 2
                    if d < best:
                        best, label = d, pq[k]
                out[y, x] = n_pieces + label
            elif mode[p] == 2:
                propagate = True
    if propagate:
        _propagate_nearest_peak(pieces, plateaus, plateau_piece, mode, n_pieces, out)
    return out


@numba.njit(cache=_CACHE, nogil=True)
def _propagate_nearest_peak(
    pieces: np.ndarray,
    plateaus: np.ndarray,
    plateau_piece: np.ndarray,
    mode: np.ndarray,
    n_pieces: int,
    out: np.ndarray,
) -> None:
    """Nearest-peak labels for the pixels of pieces with ``mode`` 2 (see
    :func:`split_at_peaks`): each pixel carries its nearest known peak pixel,
    offered to its neighbours in the same piece by forward and backward raster
    sweeps, repeated until every such pixel has one."""
    height, width = pieces.shape
    far = np.int64(1) << 62
    sy = np.zeros((height, width), np.int32)
    sx = np.zeros((height, width), np.int32)
    d2 = np.full((height, width), far, np.int64)
    lab = np.zeros((height, width), np.int32)
    for y in range(height):
        for x in range(width):
            q = plateaus[y, x]
            if mode[pieces[y, x]] == 2 and q > 0 and plateau_piece[q] == pieces[y, x]:
                sy[y, x], sx[y, x], d2[y, x], lab[y, x] = y, x, 0, q
    forward = ((-1, -1), (-1, 0), (-1, 1), (0, -1))
    backward = ((1, 1), (1, 0), (1, -1), (0, 1))
    missing = True
    while missing:
        for sweep in range(2):
            rows = range(height) if sweep == 0 else range(height - 1, -1, -1)
            offsets = forward if sweep == 0 else backward
            for y in rows:
                for x in range(width) if sweep == 0 else range(width - 1, -1, -1):
                    _offer(pieces, mode, sy, sx, d2, lab, y, x, offsets)
                for x in range(width - 1, -1, -1) if sweep == 0 else range(width):
                    _offer(pieces, mode, sy, sx, d2, lab, y, x, ((0, 1),) if sweep == 0 else ((0, -1),))
        missing = False
        for y in range(height):
            for x in range(width):
                if mode[pieces[y, x]] == 2 and d2[y, x] == far:
                    missing = True
    for y in range(height):
        for x in range(width):
            if mode[pieces[y, x]] == 2:
                out[y, x] = n_pieces + lab[y, x]


@numba.njit(cache=_CACHE, nogil=True, inline="always")
def _offer(
    pieces: np.ndarray,
    mode: np.ndarray,
    sy: np.ndarray,
    sx: np.ndarray,
    d2: np.ndarray,
    lab: np.ndarray,
    y: int,
    x: int,
    offsets: tuple[tuple[int, int], ...],
) -> None:
    """Give pixel (y, x) the nearest peak its neighbours at ``offsets`` know of, if nearer."""
    p = pieces[y, x]
    if mode[p] != 2:
        return
    height, width = pieces.shape
    for dy, dx in offsets:
        ny, nx = y + dy, x + dx
        if ny < 0 or ny >= height or nx < 0 or nx >= width or pieces[ny, nx] != p or lab[ny, nx] == 0:
            continue
        d = np.int64(y - sy[ny, nx]) ** 2 + np.int64(x - sx[ny, nx]) ** 2
        if d < d2[y, x] or (d == d2[y, x] and lab[ny, nx] < lab[y, x]):
            sy[y, x], sx[y, x], d2[y, x], lab[y, x] = sy[ny, nx], sx[ny, nx], d, lab[ny, nx]


@numba.njit(cache=_CACHE, nogil=True)
def trim_and_filter(
    labels: np.ndarray,
    n: int,
    fine: np.ndarray,
    threshold: float,
    min_area: float,
    max_area: float,
    pixel_area: float,
) -> np.ndarray:
    """Nucleus labels 1..k from candidate ``labels`` (1..n-1, 0 = none).

    Trim: where ``fine`` is not empty, a pixel stays only if ``fine`` reaches
    both ``threshold`` and half its label's highest ``fine``. Filter: labels
    whose area (pixels × ``pixel_area``) is outside [``min_area``,
    ``max_area``] are dropped; the rest are numbered 1..k in order of label.
    """
    height, width = labels.shape
    out = np.empty((height, width), np.int32)
    count = np.zeros(n, np.int64)
    if fine.size > 0:
        peak = np.full(n, -np.inf, np.float32)
        for y in range(height):
            for x in range(width):
                k = labels[y, x]
                if k != 0 and fine[y, x] > peak[k]:
                    peak[k] = fine[y, x]
        cut = np.maximum(np.float32(threshold), np.float32(0.5) * peak)
        for y in range(height):
            for x in range(width):
                k = labels[y, x]
                if k != 0 and fine[y, x] >= cut[k]:
                    count[k] += 1
                else:
                    k = 0
                out[y, x] = k
    else:
        for y in range(height):
            for x in range(width):
                k = labels[y, x]
                out[y, x] = k
                if k != 0:
                    count[k] += 1
    lut = np.zeros(n, np.int32)
    kept = 0
    for k in range(1, n):
        area = count[k] * pixel_area
        if area >= min_area and area <= max_area:
            kept += 1
            lut[k] = kept
    for y in range(height):
        for x in range(width):
            out[y, x] = lut[out[y, x]]
    return out


@numba.njit(cache=_CACHE, nogil=True)
def two_stain_od(rgb: np.ndarray, tables: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two stains' optical density from ``(h, w, 3)`` uint8 RGB in one pass.

    ``tables[s, c, v]`` is stain ``s``'s share of the OD of value ``v`` in
    channel ``c`` (deconvolution is linear in the channels' OD, so each
    stain is a sum of three lookups). Returns two float32 images.
    """
    height, width = rgb.shape[0], rgb.shape[1]
    first = np.empty((height, width), np.float32)
    second = np.empty((height, width), np.float32)
    for y in range(height):
        for x in range(width):
            r, g, b = rgb[y, x, 0], rgb[y, x, 1], rgb[y, x, 2]
            first[y, x] = tables[0, 0, r] + tables[0, 1, g] + tables[0, 2, b]
            second[y, x] = tables[1, 0, r] + tables[1, 1, g] + tables[1, 2, b]
    return first, second


@numba.njit(cache=_CACHE, nogil=True)
def label_max(values: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """Maximum of flat ``values`` per flat label 1..n (-inf where a label has
    no pixel; label 0 and labels above n are ignored)."""
    out = np.full(n + 1, -np.inf)
    for i in range(values.size):
        k = labels[i]
        if 0 < k <= n and values[i] > out[k]:
            out[k] = values[i]
    return out[1:]


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


@numba.njit(cache=_CACHE, nogil=True)
def focus_sums(
    green: np.ndarray, laplacian: np.ndarray, near_clipped: np.ndarray, block: int, glass: float
) -> np.ndarray:
    """Per ``block``-square block (partial blocks at the edges included), in one pass: the number
    of pixels and the sums of ``green``, its square, ``laplacian`` squared, the pixels brighter than
    ``glass`` and the ``near_clipped`` ones — ``(6, rows, columns)`` float64."""
    h, w = green.shape
    rows, cols = (h + block - 1) // block, (w + block - 1) // block
    out = np.zeros((6, rows, cols))
    for y in range(h):
        r = y // block
        for x in range(w):
            c = x // block
            g = np.float64(green[y, x])
            lap = np.float64(laplacian[y, x])
            out[0, r, c] += 1.0
            out[1, r, c] += g
            out[2, r, c] += g * g
            out[3, r, c] += lap * lap
            if g > glass:
                out[4, r, c] += 1.0
            if near_clipped[y, x]:
                out[5, r, c] += 1.0
    return out


@numba.njit(cache=_CACHE, nogil=True, inline="always")
def _is_grey(r: int, g: int, b: int, residual: np.ndarray, od: float, white: np.ndarray, saturation: float) -> bool:
    """Whether a pixel is grey: deconvolution residual (``residual[c, v]``: channel ``c`` value
    ``v``'s share of it) over ``od`` and colour, divided by ``white`` per channel, of saturation
    (max − min) / max at most ``saturation``."""
    if residual[0, r] + residual[1, g] + residual[2, b] <= od:
        return False
    br, bg, bb = r / white[0], g / white[1], b / white[2]
    hi = max(br, bg, bb, 1e-3)
    return 1.0 - min(br, bg, bb) / hi <= saturation


@numba.njit(cache=_CACHE, nogil=True)
def grey_counts(
    rgb: np.ndarray, residual: np.ndarray, od: float, white: np.ndarray, saturation: float, cell: int
) -> np.ndarray:
    """Per ``cell``-square cell of ``(h, w, 3)`` uint8 RGB (partial cells included): the number of
    grey pixels (:func:`_is_grey`), float32 (exact to cells of 4096²). With ``cell`` 1, each
    pixel's 0 or 1."""
    h, w = rgb.shape[0], rgb.shape[1]
    out = np.zeros(((h + cell - 1) // cell, (w + cell - 1) // cell), np.float32)
    for y in range(h):
        for x in range(w):
            if _is_grey(rgb[y, x, 0], rgb[y, x, 1], rgb[y, x, 2], residual, od, white, saturation):
                out[y // cell, x // cell] += 1.0
    return out


@numba.njit(cache=_CACHE, nogil=True)
def lookup_sum(rgb: np.ndarray, tables: np.ndarray) -> np.ndarray:
    """``tables[0, r] + tables[1, g] + tables[2, b]`` at every pixel of ``(h, w, 3)`` uint8 RGB, as
    float32: any quantity linear in the channels' optical density (their sum, a stain's share)."""
    h, w = rgb.shape[0], rgb.shape[1]
    out = np.empty((h, w), np.float32)
    for y in range(h):
        for x in range(w):
            out[y, x] = tables[0, rgb[y, x, 0]] + tables[1, rgb[y, x, 1]] + tables[2, rgb[y, x, 2]]
    return out


@numba.njit(cache=_CACHE, nogil=True)
def subtract_steps(det: np.ndarray, opened: np.ndarray, step: np.float32, limit: np.float32) -> tuple[np.ndarray, bool]:
    """``det`` less the background ``opened`` (uint16 steps of ``step`` OD), as float32, in one
    pass; and whether any background exceeds ``limit``."""
    h, w = det.shape
    out = np.empty((h, w), np.float32)
    over = False
    for y in range(h):
        for x in range(w):
            background = np.float32(opened[y, x]) * step
            out[y, x] = det[y, x] - background
            if background > limit:
                over = True
    return out, over

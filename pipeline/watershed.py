"""Compiled watershed building blocks (numba): regional maxima, a seeded flood with watershed
lines, and filled regions.

They follow the ImageJ / QuPath conventions the QuPath-compatible detector
(:mod:`pipeline.qupath`) needs:

* :func:`regional_maxima`: 8-connected plateaus higher than every neighbour,
  at or above a minimum value, not touching the image border.
* :func:`flood`: a seeded watershed that visits pixels from the highest
  priority down (first come, first served among equals), grows each region
  through 4-connected neighbours, never into pixels outside ``allowed``, and
  leaves a pixel unlabelled (a watershed line) where two regions meet. The
  priority is quantised to ``levels`` buckets: a bucket queue is linear in
  the number of pixels, where a binary heap costs a logarithm per pixel; 4,096
  levels decide order as a float comparison would except between values
  closer than 1/4,096 of the range (first come, first served between those).
* :func:`fill_holes`: each labelled region with its holes (8-connected
  unlabelled pieces that touch no other region and not the border), as
  ImageJ's wand traces and fills a 4-connected outline; only the enclosed
  pixels (what a flood from the border does not reach) are visited.
"""

from __future__ import annotations

import math

import cv2
import numba
import numpy as np

from pipeline.kernels import _CACHE

#: Buckets of the flood's priority queue.
FLOOD_LEVELS = 4096

_DY4 = np.array([-1, 0, 0, 1], np.int64)
_DX4 = np.array([0, -1, 1, 0], np.int64)


@numba.njit(cache=_CACHE, nogil=True)
def regional_maxima(image: np.ndarray, min_value: float) -> tuple[np.ndarray, int]:
    """Labels 1..n of the regional maxima of a float image (0 elsewhere) and n."""
    h, w = image.shape
    labels = np.zeros((h, w), np.int32)
    seen = np.zeros((h, w), np.bool_)
    stack = np.empty(h * w, np.int64)
    members = np.empty(h * w, np.int64)
    n = 0
    for y in range(1, h - 1):
        for x in range(1, w - 1):
            v = image[y, x]
            if seen[y, x] or v < min_value:
                continue
            candidate = True
            for dy in range(-1, 2):
                for dx in range(-1, 2):
                    if image[y + dy, x + dx] > v:
                        candidate = False
            if not candidate:
                continue
            # The 8-connected plateau of equal pixels: a maximum if nothing around it is higher.
            top = 0
            count = 0
            stack[top] = y * w + x
            top += 1
            seen[y, x] = True
            is_max = True
            while top > 0:
                top -= 1
                p = stack[top]
                members[count] = p
                count += 1
                py, px = p // w, p % w
                if py == 0 or px == 0 or py == h - 1 or px == w - 1:
                    is_max = False
                for dy in range(-1, 2):
                    for dx in range(-1, 2):
                        qy, qx = py + dy, px + dx
                        if qy < 0 or qx < 0 or qy >= h or qx >= w:
                            continue
                        q = image[qy, qx]
                        if q > v:
                            is_max = False
                        elif q == v and not seen[qy, qx]:
                            seen[qy, qx] = True
                            stack[top] = qy * w + qx
                            top += 1
            if is_max:
                n += 1
                for i in range(count):
                    labels[members[i] // w, members[i] % w] = n
    return labels, n


def flood(priority: np.ndarray, seeds: np.ndarray, allowed: np.ndarray, levels: int) -> np.ndarray:
    """Grow ``seeds`` (int32 labels, 0 = none) over the ``allowed`` pixels, highest ``priority`` first.

    A pixel takes the label of its labelled 4-neighbours when they agree and
    stays 0 (a watershed line) when they disagree; pixels outside ``allowed``
    are never labelled. Returns the new label image.
    """
    h, w = priority.shape
    # A one-pixel frame of forbidden, unlabelled pixels: neighbours are index ± 1 and ± (w + 2).
    labels = np.pad(np.ascontiguousarray(seeds, dtype=np.int32), 1).ravel()
    inside = np.pad(np.ascontiguousarray(allowed, dtype=np.bool_), 1).ravel()
    values = np.pad(np.ascontiguousarray(priority, dtype=np.float32), 1).ravel()
    _flood(values, labels, inside, w + 2, levels)
    return labels.reshape(h + 2, w + 2)[1:-1, 1:-1].copy()


@numba.njit(cache=_CACHE, nogil=True)
def _flood(values: np.ndarray, labels: np.ndarray, inside: np.ndarray, stride: int, levels: int) -> None:
    """The flood on flat, framed arrays: pixels sorted into ``levels`` buckets (a counting sort),
    then level by level from the top, first in first out: a level's pixels next to a region
    start it, and a pixel that joins a region brings in its neighbours at or above the level."""
    n = values.size
    # Only the allowed pixels (often a small share of the tile) are sorted, in raster order.
    members = np.nonzero(inside)[0]
    lo, hi = np.inf, -np.inf
    for p in members:
        v = values[p]
        if v < lo:
            lo = v
        if v > hi:
            hi = v
    if not hi >= lo:
        return
    scale = (levels - 1) / (hi - lo) if hi > lo else 0.0
    key = np.zeros(n, np.int32)
    start = np.zeros(levels + 1, np.int64)
    queued = np.ones(n, np.bool_)  # labelled or not allowed: never (re)queued
    for p in members:
        if labels[p] == 0:
            queued[p] = False
            k = int((values[p] - lo) * scale)
            key[p] = k
            start[k + 1] += 1
    for k in range(levels):
        start[k + 1] += start[k]
    order = np.empty(start[levels], np.int64)
    fill = start[:levels].copy()
    for p in members:
        if not queued[p]:
            order[fill[key[p]]] = p
            fill[key[p]] += 1
    fifo = np.empty(n, np.int64)
    offsets = (-stride, -1, 1, stride)
    for level in range(levels - 1, -1, -1):
        head = 0
        tail = 0
        for i in range(start[level], start[level + 1]):
            p = order[i]
            if not queued[p] and (
                labels[p - stride] != 0 or labels[p - 1] != 0 or labels[p + 1] != 0 or labels[p + stride] != 0
            ):
                queued[p] = True
                fifo[tail] = p
                tail += 1
        while head < tail:
            p = fifo[head]
            head += 1
            label = 0
            clash = False
            for d in offsets:
                q = labels[p + d]
                if q != 0:
                    if label == 0:
                        label = q
                    elif q != label:
                        clash = True
            if clash or label == 0:
                continue  # a watershed line
            labels[p] = label
            for d in offsets:
                q = p + d
                if not queued[q] and key[q] >= level:
                    queued[q] = True
                    fifo[tail] = q
                    tail += 1


def flood_pieces(priority: np.ndarray, seeds: np.ndarray, pieces: np.ndarray, n_pieces: int, levels: int) -> np.ndarray:
    """:func:`flood` over the pixels of ``pieces`` (labels 1..n_pieces-1, separate 4-connected pieces,
    0 = not allowed), flooding only the pieces that hold more than one seed: a piece with a single
    seed label takes it everywhere (what the flood would give), a piece without any stays 0."""
    h, w = priority.shape
    labels = np.pad(np.ascontiguousarray(seeds, dtype=np.int32), 1).ravel()
    framed = np.pad(np.ascontiguousarray(pieces, dtype=np.int32), 1).ravel()
    values = np.pad(np.ascontiguousarray(priority, dtype=np.float32), 1).ravel()
    inside = _shared_pieces(framed, labels, n_pieces)
    _flood(values, labels, inside, w + 2, levels)
    return labels.reshape(h + 2, w + 2)[1:-1, 1:-1].copy()


@numba.njit(cache=_CACHE, nogil=True)
def _shared_pieces(pieces: np.ndarray, labels: np.ndarray, n_pieces: int) -> np.ndarray:
    """The pixels of pieces with several seed labels (to flood); every other piece's pixels take
    their one seed's label in ``labels`` (0 where the piece has none)."""
    owner = np.zeros(n_pieces, np.int32)
    for p in range(pieces.size):
        s = labels[p]
        c = pieces[p]
        if s == 0 or c == 0:
            continue
        if owner[c] == 0:
            owner[c] = s
        elif owner[c] != s:
            owner[c] = -1
    inside = np.zeros(pieces.size, np.bool_)
    for p in range(pieces.size):
        c = pieces[p]
        if c == 0:
            labels[p] = 0
        elif owner[c] < 0:
            inside[p] = True
        else:
            labels[p] = owner[c]
    return inside


def fill_holes(labels: np.ndarray) -> np.ndarray:
    """``labels`` with every hole filled by the label around it: a piece of unlabelled pixels
    (8-connected) that touches exactly one label and not the image border."""
    # The unlabelled pixels the border reaches are flooded first (OpenCV, one pass); what is left
    # is enclosed, usually a few pixels, and only those are looked at.
    empty = np.pad((labels == 0).view(np.uint8), 1, constant_values=1)
    cv2.floodFill(empty, None, (0, 0), 2, flags=8)
    count = _count_enclosed(empty)  # (a compiled scan: NumPy's nonzero took 1.4 ms a 1088² region)
    if not count:
        return labels
    out = labels.copy()
    _fill_enclosed(out, labels, empty, count)
    return out


@numba.njit(cache=_CACHE, nogil=True)
def _count_enclosed(empty: np.ndarray) -> int:
    """The pixels of the framed ``empty`` map (:func:`fill_holes`) that are still 1: enclosed."""
    count = 0
    for y in range(1, empty.shape[0] - 1):
        for x in range(1, empty.shape[1] - 1):
            if empty[y, x] == 1:
                count += 1
    return count


@numba.njit(cache=_CACHE, nogil=True)
def _fill_enclosed(out: np.ndarray, labels: np.ndarray, empty: np.ndarray, count: int) -> None:
    """Fill in ``out`` each 8-connected piece of enclosed pixels (1 in ``empty``, ``labels`` framed
    by one pixel; ``count`` of them, none on the border) whose neighbours hold exactly one label;
    ``empty`` is cleared as pieces are visited."""
    h, w = labels.shape
    stack = np.empty(count, np.int64)
    members = np.empty(count, np.int64)
    for sy in range(h):
        for sx in range(w):
            if empty[sy + 1, sx + 1] == 1:
                _fill_piece(out, labels, empty, sy, sx, stack, members)


@numba.njit(cache=_CACHE, nogil=True)
def _fill_piece(
    out: np.ndarray,
    labels: np.ndarray,
    empty: np.ndarray,
    sy: int,
    sx: int,
    stack: np.ndarray,
    members: np.ndarray,
) -> None:
    """Flood the enclosed piece at (``sy``, ``sx``) and fill it if one label surrounds it."""
    w = labels.shape[1]
    empty[sy + 1, sx + 1] = 0
    stack[0] = sy * w + sx
    top = 1
    count = 0
    owner = 0
    single = True
    while top > 0:
        top -= 1
        p = stack[top]
        members[count] = p
        count += 1
        py, px = p // w, p % w
        for dy in range(-1, 2):
            for dx in range(-1, 2):
                qy, qx = py + dy, px + dx
                q = labels[qy, qx]
                if q != 0:
                    if owner == 0:
                        owner = q
                    elif owner != q:
                        single = False
                elif empty[qy + 1, qx + 1] == 1:
                    empty[qy + 1, qx + 1] = 0
                    stack[top] = qy * w + qx
                    top += 1
    if single and owner != 0:
        for j in range(count):
            out[members[j] // w, members[j] % w] = owner


@numba.njit(cache=_CACHE, nogil=True)
def prominent_maxima(image: np.ndarray, allowed: np.ndarray, tolerance: float) -> np.ndarray:
    """Labels of the maxima of ``image`` (over ``allowed`` pixels) that stand more than ``tolerance``
    above the way to any higher one, each with the pixels within ``tolerance`` of it; 0 elsewhere.

    As ImageJ's *Find Maxima*: candidate maxima (no 8-neighbour higher) are taken from the highest
    down; each floods its 8-connected surroundings down to ``tolerance`` below it and is a
    maximum unless that flood meets a higher pixel or the surroundings of a maximum taken before.
    """
    h, w = image.shape
    cand_y = np.empty(h * w, np.int64)
    cand_x = np.empty(h * w, np.int64)
    cand_v = np.empty(h * w, np.float64)
    m = 0
    for y in range(h):
        for x in range(w):
            if not allowed[y, x]:
                continue
            v = image[y, x]
            top = True
            for dy in range(-1, 2):
                for dx in range(-1, 2):
                    qy, qx = y + dy, x + dx
                    if 0 <= qy < h and 0 <= qx < w and allowed[qy, qx] and image[qy, qx] > v:
                        top = False
            if top:
                cand_y[m], cand_x[m], cand_v[m] = y, x, v
                m += 1
    order = np.argsort(-cand_v[:m], kind="mergesort")
    labels = np.zeros((h, w), np.int32)
    processed = np.zeros((h, w), np.bool_)
    listed = np.zeros((h, w), np.bool_)
    stack = np.empty(h * w, np.int64)
    n = 0
    for i in order:
        y0, x0, v0 = cand_y[i], cand_x[i], cand_v[i]
        if processed[y0, x0]:
            continue
        count = 1
        stack[0] = y0 * w + x0
        listed[y0, x0] = True
        is_max = True
        k = 0
        while k < count:
            p = stack[k]
            k += 1
            py, px = p // w, p % w
            for dy in range(-1, 2):
                for dx in range(-1, 2):
                    qy, qx = py + dy, px + dx
                    if qy < 0 or qx < 0 or qy >= h or qx >= w or not allowed[qy, qx] or listed[qy, qx]:
                        continue
                    if processed[qy, qx]:
                        is_max = False
                        continue
                    v = image[qy, qx]
                    if v > v0:
                        is_max = False
                    elif v >= v0 - tolerance:
                        listed[qy, qx] = True
                        stack[count] = qy * w + qx
                        count += 1
        if is_max:
            n += 1
        for j in range(count):
            q = stack[j]
            qy, qx = q // w, q % w
            listed[qy, qx] = False
            processed[qy, qx] = True
            if is_max:
                labels[qy, qx] = n
    return labels


@numba.njit(cache=_CACHE, nogil=True)
def ridge_height(edm: np.ndarray) -> np.ndarray:
    """The distance map's height where a ridge or peak passes between pixel centres.

    A pixel on a ridge of the distance map samples it off its crest; across
    each of the four axes through the pixel the crest is estimated from the
    two neighbours (their mean where the pixel is the highest of the three,
    else the lower one) plus the step to them, never more than half a
    diagonal above the pixel. ImageJ's EDM watershed compares maxima by this
    height; pixels on no ridge, on the border or in the background keep
    their own value.
    """
    h, w = edm.shape
    out = edm.copy()
    half_diagonal = 0.5 * math.sqrt(2.0)
    for y in range(1, h - 1):
        for x in range(1, w - 1):
            v = edm[y, x]
            if v == 0:
                continue
            best = v + half_diagonal
            ridge = False
            for d in range(4):
                dy, dx = _AXIS_DY[d], _AXIS_DX[d]
                v1, v2 = edm[y + dy, x + dx], edm[y - dy, x - dx]
                if v >= v1 and v >= v2:
                    ridge = True
                    c = (v1 + v2) / 2.0
                else:
                    c = min(v1, v2)
                c += 1.0 if d % 2 == 0 else math.sqrt(2.0)
                best = min(best, c)
            if ridge:
                out[y, x] = best
    return out


_AXIS_DY = np.array([-1, -1, 0, 1], np.int64)
_AXIS_DX = np.array([0, 1, 1, 1], np.int64)


def reconstruct(marker: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Grey-level reconstruction by dilation of ``marker`` under ``mask``, 8-connected (Vincent's
    hybrid algorithm: raster and anti-raster passes, then a first-in first-out queue)."""
    h, w = marker.shape
    # A one-pixel frame at -inf that nothing propagates into: neighbours are p ± 1, p ± (w + 2) ± 1.
    out = np.pad(np.minimum(marker, mask).astype(np.float32), 1, constant_values=-np.inf).ravel()
    limit = np.pad(np.ascontiguousarray(mask, dtype=np.float32), 1, constant_values=-np.inf).ravel()
    _reconstruct(out, limit, h, w)
    return out.reshape(h + 2, w + 2)[1:-1, 1:-1].copy()


@numba.njit(cache=_CACHE, nogil=True)
def _reconstruct(out: np.ndarray, mask: np.ndarray, h: int, w: int) -> None:
    stride = w + 2
    # A raster, anti-raster and raster pass, then an anti-raster pass that queues what can still
    # grow: one pair of passes more than Vincent's hybrid halves what the queue must carry (1.6 to
    # 0.8 pixel visits per pixel on tissue), which costs less than the queue saved (−20 %).
    for y in range(1, h + 1):
        for p in range(y * stride + 1, y * stride + w + 1):
            v = max(out[p], out[p - stride - 1], out[p - stride], out[p - stride + 1], out[p - 1])
            out[p] = min(v, mask[p])
    for y in range(h, 0, -1):
        for p in range(y * stride + w, y * stride, -1):
            v = max(out[p], out[p + stride - 1], out[p + stride], out[p + stride + 1], out[p + 1])
            out[p] = min(v, mask[p])
    for y in range(1, h + 1):
        for p in range(y * stride + 1, y * stride + w + 1):
            v = max(out[p], out[p - stride - 1], out[p - stride], out[p - stride + 1], out[p - 1])
            out[p] = min(v, mask[p])
    queue = np.empty(h * w + 1, np.int64)
    size = queue.size
    queued = np.zeros(out.size, np.bool_)
    count = 0
    for y in range(h, 0, -1):
        for p in range(y * stride + w, y * stride, -1):
            v = max(out[p], out[p + stride - 1], out[p + stride], out[p + stride + 1], out[p + 1])
            v = min(v, mask[p])
            out[p] = v
            for q in (p + 1, p + stride - 1, p + stride, p + stride + 1):
                if out[q] < v and out[q] < mask[q]:
                    queue[count] = p
                    count += 1
                    queued[p] = True
                    break
    head = 0
    offsets = (-stride - 1, -stride, -stride + 1, -1, 1, stride - 1, stride, stride + 1)
    while count > 0:
        p = queue[head]
        head = head + 1 if head + 1 < size else 0
        count -= 1
        queued[p] = False
        v = out[p]
        for d in offsets:
            q = p + d
            if out[q] < v and out[q] != mask[q]:
                out[q] = min(v, mask[q])
                if not queued[q]:
                    queued[q] = True
                    tail = head + count
                    queue[tail if tail < size else tail - size] = q
                    count += 1


@numba.njit(cache=_CACHE, nogil=True)
def label_sums(labels: np.ndarray, values: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per label 0..n: the sum of ``values`` and the number of pixels."""
    total = np.zeros(n + 1)
    count = np.zeros(n + 1)
    h, w = labels.shape
    for y in range(h):
        for x in range(w):
            k = labels[y, x]
            total[k] += values[y, x]
            count[k] += 1.0
    return total, count

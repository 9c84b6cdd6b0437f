"""PNG overviews next to the JSON: what a pathologist can look at to see why a slide scored as it did.

* ``heatmap_<score>.png``, one per :data:`BLOCK_SCORES` entry, per block of ``outputs.heatmap_um``
  (128 µm), coloured with the viridis map from 0 to the score's top; blocks without cells (for the
  tissue maps: without tissue) are transparent:

  - ``h_score``: H-score of the tumour and stroma cells (0–300);
  - ``positive``: % positive of the tumour and stroma cells;
  - ``tumour_positive``: % positive of the tumour cells only (the Ki-67 index of a Ki-67 slide);
  - ``tumour``: with a segmentation model, its mean tumour probability over the block's tissue
    (× 100); with the built-in rule, which has no probability, the % of the block's tissue it calls
    tumour;
  - ``qc``: % of the block's tissue quality control left out.
* ``overview.png``: the slide's thumbnail with the tumour region outlined in red and the areas
  quality control left out in cyan.
* ``attribution_<model>.png`` (with ``explain.integrated_gradients``, per model plug-in): each
  explained tile (:mod:`pipeline.explain`) above its attribution map, red where a pixel pushes the
  decision up and blue where it pushes it down, white where it does not matter (one scale for all
  tiles: the 99th percentile of |attribution|).

The same blocks are the DICOM Parametric Maps and banded SEG of :mod:`dicom_io.pm`.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from pipeline.analysis import SlideResult
from pipeline.labels import Compartment
from pipeline.slide import Slide

#: Longest side of an overview image (pixels).
MAX_SIDE = 1024


#: The block scores and the top of their scales.
BLOCK_SCORES = {"h_score": 300.0, "positive": 100.0, "tumour_positive": 100.0, "tumour": 100.0, "qc": 100.0}


def _grid_share(part: np.ndarray, whole: np.ndarray, mpp: float, block_um: float, shape: tuple[int, int]) -> np.ndarray:
    """Per block of a ``shape`` (rows, columns) grid: 100 × the mean of ``part`` (a boolean or 0–1
    map) over the pixels of ``whole`` (boolean; both at ``mpp`` from the origin), NaN where ``whole``
    has none."""
    rows, cols = shape
    by = np.minimum(((np.arange(whole.shape[0]) + 0.5) * mpp / block_um).astype(np.int64), rows - 1)
    bx = np.minimum(((np.arange(whole.shape[1]) + 0.5) * mpp / block_um).astype(np.int64), cols - 1)
    index = (by[:, None] * cols + bx[None, :]).ravel()
    n = np.bincount(index, weights=whole.ravel().astype(np.float64), minlength=rows * cols)
    k = np.bincount(index, weights=np.where(whole, part, 0).ravel().astype(np.float64), minlength=rows * cols)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, 100.0 * k / n, np.nan).reshape(rows, cols)


def block_scores(result: SlideResult, block_um: float, shape_um: tuple[float, float]) -> dict[str, np.ndarray]:
    """Per block (rows × columns covering ``shape_um`` = width, height), the :data:`BLOCK_SCORES`:
    H-score and % positive of the scored cells and % positive of the tumour cells (NaN where a
    block has none), and the % of its tissue that is tumour and that quality control left out (NaN
    where a block has no tissue)."""
    cells = result.cells
    cols = max(1, int(np.ceil(shape_um[0] / block_um)))
    rows = max(1, int(np.ceil(shape_um[1] / block_um)))
    bx = np.clip((cells["x_um"] / block_um).astype(np.int64), 0, cols - 1)
    by = np.clip((cells["y_um"] / block_um).astype(np.int64), 0, rows - 1)
    classes = cells["intensity_class"].astype(np.float64)

    def per_block(which: tuple[Compartment, ...], values: np.ndarray) -> np.ndarray:
        """100 × the mean of ``values`` over the cells of the ``which`` compartments in each block."""
        keep = np.isin(cells["compartment"], which)
        index = by[keep] * cols + bx[keep]
        n = np.bincount(index, minlength=rows * cols).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return 100.0 * (np.bincount(index, weights=values[keep], minlength=rows * cols) / n).reshape(rows, cols)

    scored = (Compartment.TUMOUR, Compartment.STROMA)
    positive = (classes > 0).astype(float)
    out = {
        "h_score": per_block(scored, classes),
        "positive": per_block(scored, positive),
        "tumour_positive": per_block((Compartment.TUMOUR,), positive),
    }
    comp = result.compartments
    tissue = np.isin(comp.labels, (Compartment.TUMOUR, Compartment.STROMA, Compartment.OTHER))
    part = comp.labels == Compartment.TUMOUR if comp.tumour_probability is None else comp.tumour_probability
    out["tumour"] = _grid_share(part, tissue, comp.mpp, block_um, (rows, cols))
    if result.qc_map is not None:
        left_out = result.qc_map.mask
        whole = left_out | result.tissue.mask[: left_out.shape[0], : left_out.shape[1]]
        out["qc"] = _grid_share(left_out, whole, result.qc_map.mpp, block_um, (rows, cols))
    else:
        out["qc"] = np.full((rows, cols), np.nan)
    return out


def _colour(values: np.ndarray, top: float) -> np.ndarray:
    """RGBA (as BGRA for OpenCV) viridis colours of ``values`` in [0, top]; NaN transparent."""
    scaled = np.clip(np.nan_to_num(values, nan=0.0) / top * 255.0, 0, 255).astype(np.uint8)
    bgr = cv2.applyColorMap(scaled, cv2.COLORMAP_VIRIDIS)
    alpha = np.where(np.isnan(values), 0, 255).astype(np.uint8)
    return np.dstack([bgr, alpha])


def _attribution_mosaic(tiles: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """BGR image: the tiles side by side, each above its attribution in a blue–white–red map."""
    top = float(np.percentile(np.abs(np.concatenate([a.ravel() for _, a in tiles])), 99)) or 1.0
    columns = []
    for pixels, attribution in tiles:
        a = np.clip(attribution / top, -1.0, 1.0)[..., None]
        white = np.ones((*a.shape[:2], 3))
        red, blue = np.array([0.0, 0.0, 1.0]), np.array([1.0, 0.0, 0.0])  # BGR
        colour = np.where(a > 0, white + a * (red - white), white - a * (blue - white))
        columns.append(np.vstack([cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR), (255 * colour).astype(np.uint8)]))
    height = max(c.shape[0] for c in columns)
    columns = [np.pad(c, ((0, height - c.shape[0]), (0, 4), (0, 0)), constant_values=255) for c in columns]
    return np.hstack(columns)


def _scale(shape: tuple[int, int]) -> float:
    return MAX_SIDE / max(shape)


def write_overviews(result: SlideResult, slide: Slide, out_dir: Path) -> dict[str, Path]:
    """Write the overview PNGs into ``out_dir``; returns them by name."""
    lv0 = slide.levels[0]
    shape_um = (lv0.width * lv0.mpp_x, lv0.height * lv0.mpp_y)
    block = result.settings.outputs.heatmap_um
    blocks = block_scores(result, block, shape_um)
    written: dict[str, Path] = {}
    for name, top in BLOCK_SCORES.items():
        values = blocks[name]
        image = _colour(values, top)
        f = max(1, int(_scale(values.shape)))
        image = cv2.resize(image, None, fx=f, fy=f, interpolation=cv2.INTER_NEAREST)
        path = out_dir / f"heatmap_{name}.png"
        cv2.imwrite(str(path), image)
        written[f"heatmap_{name}"] = path
    for explanation in result.explanations:
        if explanation.tiles:
            path = out_dir / f"attribution_{explanation.model}.png"
            cv2.imwrite(path.as_posix(), _attribution_mosaic([(p, a) for _, p, a in explanation.tiles]))
            written[f"attribution_{explanation.model}"] = path
    thumb = np.ascontiguousarray(slide.thumbnail(MAX_SIDE))
    th, tw = thumb.shape[:2]
    bgr = cv2.cvtColor(thumb, cv2.COLOR_RGB2BGR)
    labels = result.compartments.labels
    tumour = cv2.resize((labels == Compartment.TUMOUR).astype(np.uint8), (tw, th), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(tumour, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(bgr, contours, -1, (0, 0, 255), 1)
    if result.qc_map is not None and result.qc_map.mask.any():
        qc = cv2.resize(result.qc_map.mask.astype(np.uint8), (tw, th), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(qc, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(bgr, contours, -1, (255, 255, 0), 1)
    path = out_dir / "overview.png"
    cv2.imwrite(str(path), bgr)
    written["overview"] = path
    return written

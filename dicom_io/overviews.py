"""PNG overviews next to the JSON: what a pathologist can look at to see why a slide scored as it did.

* ``heatmap_h_score.png`` and ``heatmap_positive.png``: the H-score and the % of positive cells of
  the tumour and stroma cells in each block of ``outputs.heatmap_um`` (128 µm), coloured with the
  viridis map (H-score 0–300, % positive 0–100); blocks without cells are transparent.
* ``overview.png``: the slide's thumbnail with the tumour region outlined in red and the areas
  quality control left out in cyan.

The same H-score blocks are the DICOM Parametric Map (``outputs.heatmap``).
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


def block_scores(result: SlideResult, block_um: float, shape_um: tuple[float, float]) -> dict[str, np.ndarray]:
    """Per block (rows × columns covering ``shape_um`` = width, height): H-score and % positive of
    the scored cells, NaN where a block has none."""
    cells = result.cells
    keep = np.isin(cells["compartment"], (Compartment.TUMOUR, Compartment.STROMA))
    cols = max(1, int(np.ceil(shape_um[0] / block_um)))
    rows = max(1, int(np.ceil(shape_um[1] / block_um)))
    bx = np.clip((cells["x_um"][keep] / block_um).astype(np.int64), 0, cols - 1)
    by = np.clip((cells["y_um"][keep] / block_um).astype(np.int64), 0, rows - 1)
    index = by * cols + bx
    classes = cells["intensity_class"][keep].astype(np.float64)
    n = np.bincount(index, minlength=rows * cols).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        h = 100.0 * np.bincount(index, weights=classes, minlength=rows * cols) / n
        pos = 100.0 * np.bincount(index, weights=(classes > 0).astype(float), minlength=rows * cols) / n
    return {"h_score": h.reshape(rows, cols), "positive": pos.reshape(rows, cols)}


def _colour(values: np.ndarray, top: float) -> np.ndarray:
    """RGBA (as BGRA for OpenCV) viridis colours of ``values`` in [0, top]; NaN transparent."""
    scaled = np.clip(np.nan_to_num(values, nan=0.0) / top * 255.0, 0, 255).astype(np.uint8)
    bgr = cv2.applyColorMap(scaled, cv2.COLORMAP_VIRIDIS)
    alpha = np.where(np.isnan(values), 0, 255).astype(np.uint8)
    return np.dstack([bgr, alpha])


def _scale(shape: tuple[int, int]) -> float:
    return MAX_SIDE / max(shape)


def write_overviews(result: SlideResult, slide: Slide, out_dir: Path) -> dict[str, Path]:
    """Write the overview PNGs into ``out_dir``; returns them by name."""
    lv0 = slide.levels[0]
    shape_um = (lv0.width * lv0.mpp_x, lv0.height * lv0.mpp_y)
    block = result.settings.outputs.heatmap_um
    blocks = block_scores(result, block, shape_um)
    written: dict[str, Path] = {}
    for name, values, top in (("h_score", blocks["h_score"], 300.0), ("positive", blocks["positive"], 100.0)):
        image = _colour(values, top)
        f = max(1, int(_scale(values.shape)))
        image = cv2.resize(image, None, fx=f, fy=f, interpolation=cv2.INTER_NEAREST)
        path = out_dir / f"heatmap_{name}.png"
        cv2.imwrite(str(path), image)
        written[f"heatmap_{name}"] = path
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

"""Score a slide: tissue → tiles → deconvolution → cells → tumour/stroma → scores → alerts.

:func:`analyse` takes a :class:`~pipeline.slide.Slide` and the frozen
:class:`~config.settings.Settings` and returns a :class:`SlideResult`. It
never imports a slide backend: to use several processes it needs an
``opener`` (a picklable zero-argument callable returning the slide, such as
``functools.partial(dicom_io.open_slide, path)``), because each worker reads
its own tiles.

Tiles are read at ``nuclei.requested_pixel_size_um`` with a margin; a cell
belongs to the tile whose core holds its centroid, so a cell on a seam is
counted once. Only tiles with at least ``tissue.min_tile_tissue`` tissue are
read, and of a tile at the edge of the tissue only the bounding box of its
tissue (by the tissue mask) grown by ``tiling.margin_um``; aligned groups of
``tiling.group_tiles``² tissue tiles are read and scored as one region.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import multiprocessing
import multiprocessing.forkserver
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from config.settings import IntensitySettings, NucleiSettings, Settings
from pipeline import kernels, scoring, watershed
from pipeline.allocator import keep_freed_memory
from pipeline.explain import Explanation, explain_models
from pipeline.nuclei import (
    CELL_COLUMNS,
    NucleusModel,
    class_thresholds,
    detect_cells,
    intensity_class,
    intensity_value,
)
from pipeline.qc import (
    Artefact,
    QcMap,
    artefacts_from_rgb,
    blur_mask,
    bubble_mask,
    counterstain_check,
    debris_mask,
    floor_blocks,
    focus_block_px,
    focus_blocks,
    fold_floor_mask,
    grey_cell_px,
    grey_cells,
    half_resolution,
    overexposed,
)
from pipeline.scoring import Alert, AlertCode, CompartmentSummary
from pipeline.segmentation import (
    CLASS_NAMES,
    STROMA,
    TUMOUR,
    CompartmentMap,
    TorchScriptSegmenter,
    builtin_segmentation,
)
from pipeline.slide import Slide
from pipeline.stains import (
    Background,
    StainMatrix,
    estimate_dominant,
    estimate_macenko,
    od_sum,
    rgb_to_od,
    stain_planes,
)
from pipeline.tissue import TissueMask, low_resolution, tissue_from_rgb
from pipeline.uncertainty import Uncertainty, score_intervals

log = logging.getLogger(__name__)

SlideOpener = Callable[[], Slide]


@dataclass
class SlideResult:
    """Everything the pipeline found on one slide (JSON via :meth:`to_json`)."""

    profile: str
    slide: dict[str, Any]
    settings: Settings
    analysis_mpp: float
    tissue: TissueMask
    compartments: CompartmentMap
    cells: dict[str, np.ndarray]
    tumour_fraction: float
    compartment_stats: dict[str, CompartmentSummary]
    scores: dict[str, Any]
    alerts: list[Alert]
    stain: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    #: The nucleus threshold the tiles used and how it was chosen (:func:`adapt_threshold`).
    detection: dict[str, Any] = field(default_factory=dict)
    #: Intervals of the scores (:mod:`pipeline.uncertainty`); None when turned off.
    uncertainty: Uncertainty | None = None
    #: Tissue left out by quality control (:mod:`pipeline.qc`): artefact → area_mm2, percent_of_tissue.
    qc: dict[str, dict[str, float]] = field(default_factory=dict)
    #: The quality-control map (artefact labels on the tissue grid); None when QC is off.
    qc_map: QcMap | None = None
    #: Integrated-gradients attributions of the model plug-ins (``explain.integrated_gradients``).
    explanations: list[Explanation] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "slide": self.slide,
            "analysis_mpp": self.analysis_mpp,
            "tumour_fraction": self.tumour_fraction,
            "compartments": self.compartment_stats,
            "scores": self.scores,
            "alerts": self.alerts,
            "segmentation": self.compartments.method,
            "stain": self.stain,
            "detection": self.detection,
            "scores_ci": {k: [round(lo, 3), round(hi, 3)] for k, (lo, hi) in self.uncertainty.intervals.items()}
            if self.uncertainty
            else {},
            "uncertainty": self.uncertainty.to_json() if self.uncertainty else None,
            "qc": self.qc,
            "explanations": [e.to_json() for e in self.explanations],
            "settings": self.settings.model_dump(mode="json"),
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
        }


# -- per-tile work (runs in worker processes) -------------------------------------


@dataclass
class _TileContext:
    slide: Slide | None  # None: :func:`score_region` only
    settings: Settings
    stains: StainMatrix
    background: Background
    tissue_mpp: float
    tissue_shape: tuple[int, int]
    nucleus_model: NucleusModel | None = None
    #: The analysis pixel size (:meth:`pipeline.slide.Slide.analysis_mpp`); 0: the requested one.
    mpp: float = 0.0

    def __post_init__(self) -> None:
        if self.mpp <= 0:
            self.mpp = self.settings.nuclei.requested_pixel_size_um
        if self.settings.nuclei.model is not None and self.nucleus_model is None:
            self.nucleus_model = NucleusModel(self.settings.nuclei, self.stains)


_CTX: _TileContext | None = None


def _init_worker(
    opener: SlideOpener,
    settings: Settings,
    stains: StainMatrix,
    background: Background,
    tissue_mpp: float,
    tissue_shape: tuple[int, int],
    mpp: float,
) -> None:
    global _CTX  # one context per worker process
    import cv2

    # One worker per core: no nested thread pools.
    cv2.setNumThreads(1)
    if settings.nuclei.model is not None:  # torch is loaded only to run a model
        import torch

        torch.set_num_threads(1)
    keep_freed_memory()  # reuse each tile's memory for the next one (pipeline.allocator)
    slide = opener()
    slide.manage_colour(settings.stain.icc_profile)
    _CTX = _TileContext(slide, settings, stains, background, tissue_mpp, tissue_shape, mpp=mpp)


def _process_block(cores: list[tuple[int, int, int, int]]) -> list[dict[str, Any]]:
    assert _CTX is not None
    return [process_tile(_CTX, c) for c in cores]


def group_tiles(cores: list[tuple[int, int, int, int]], tile_size: int, n: int) -> list[tuple[int, int, int, int]]:
    """Merge each aligned n×n group of tiles that are all in ``cores`` into one
    region, read and scored at once with one margin around it; tiles of
    incomplete groups stay on their own. Cells are still owned by the region
    that holds their centroid, so a cell on a seam is counted once, and one
    inside a group sees its whole neighbourhood. Regions keep raster order
    of their first tile."""
    if n <= 1:
        return list(cores)
    at = {(c[1] // tile_size, c[0] // tile_size): c for c in cores}
    out: list[tuple[int, int, int, int]] = []
    for (row, col), c in sorted(at.items()):
        r0, c0 = row - row % n, col - col % n
        members = [at.get((r, k)) for r in range(r0, r0 + n) for k in range(c0, c0 + n)]
        whole = all(m is not None for m in members)
        if not whole:
            out.append(c)
        elif (row, col) == (r0, c0):
            last = members[-1]
            assert last is not None
            out.append((c[0], c[1], last[0] + last[2] - c[0], last[1] + last[3] - c[1]))
    return out


def tile_blocks(
    cores: list[tuple[int, int, int, int]], tile_size: int, tiles: int | None = None
) -> list[list[tuple[int, int, int, int]]]:
    """Group tiles into square blocks of up to 8×8, one block a task.

    A tile's margin reaches into its neighbours, so each source tile is read
    by up to nine analysis tiles. Row by row, in chunks shared among
    workers, it falls out of a worker's decoded-tile cache before the next
    row needs it: 4.4 decodes per analysis tile with two workers (simulated
    with the TIFF reader's 64 MB cache), 1.5 in 8×8 blocks. Blocks are
    smaller on small slides (at least 32 blocks where there are 32 tiles)
    so that every worker has several. The layout does not depend on the
    number of workers, so neither does the order of the cells. Blocks and
    the tiles in each keep raster order. ``cores`` may be groups of tiles
    (:func:`group_tiles`); ``tiles`` is then how many tiles they hold, which
    sizes the blocks.
    """
    if not cores:
        return []
    side = max(1, min(8, math.isqrt((len(cores) if tiles is None else tiles) // 32)))
    blocks: dict[tuple[int, int], list[tuple[int, int, int, int]]] = {}
    for c in cores:
        blocks.setdefault((c[1] // tile_size // side, c[0] // tile_size // side), []).append(c)
    return [blocks[k] for k in sorted(blocks)]


def read_with_margin(slide: Slide, mpp: float, x: int, y: int, w: int, h: int, margin: int) -> np.ndarray:
    """The region ``(x, y, w, h)`` of the grid at ``mpp`` with ``margin`` pixels around it. Where the
    margin falls outside the slide, the slide's edge pixels are repeated (ImageJ's and QuPath's
    convention) instead of white: on a crop whose border cuts through tissue, a white frame would
    make every cut nucleus a sharp dark-on-white edge."""
    grid = slide.grid(mpp)
    x0, y0 = max(x - margin, 0), max(y - margin, 0)
    x1, y1 = min(x + w + margin, grid.width), min(y + h + margin, grid.height)
    pixels, _ = slide.read_at_mpp(mpp, x0, y0, x1 - x0, y1 - y0)
    pads = (y0 - (y - margin), (y + h + margin) - y1, x0 - (x - margin), (x + w + margin) - x1)
    if not any(pads):
        return pixels
    return cv2.copyMakeBorder(pixels, *pads, cv2.BORDER_REPLICATE)


def process_tile(ctx: _TileContext, core: tuple[int, int, int, int]) -> dict[str, Any]:
    """Read one tile with its margin, find and measure its cells."""
    assert ctx.slide is not None
    mpp = ctx.mpp
    margin = int(np.ceil(ctx.settings.tiling.margin_um / mpp))
    x, y, w, h = core
    t0 = time.perf_counter()
    pixels = read_with_margin(ctx.slide, mpp, x, y, w, h, margin)
    read_s = time.perf_counter() - t0
    out = score_region(ctx, pixels, core, margin)
    out["timings"]["read"] = read_s
    return out


def score_region(ctx: _TileContext, pixels: np.ndarray, core: tuple[int, int, int, int], margin: int) -> dict[str, Any]:
    """Cells and pixel classes of ``core`` from its pixels read with ``margin`` around it."""
    s = ctx.settings
    mpp = ctx.mpp
    x, y, w, h = core
    t1 = time.perf_counter()
    h_od, dab_od = stain_planes(pixels, ctx.stains, ctx.background)
    od = od_sum(pixels, ctx.background) if s.nuclei.detection_image == "od_sum" else h_od
    t2 = time.perf_counter()
    prob = ctx.nucleus_model.probability(pixels, ctx.background) if ctx.nucleus_model is not None else None
    tc = detect_cells(h_od, dab_od, od, mpp, s.nuclei, s.intensity, prob)
    t3 = time.perf_counter()
    table = tc.table
    cx, cy = table["x"] - margin, table["y"] - margin
    own = (cx >= 0) & (cx < w) & (cy >= 0) & (cy < h)
    cells = {k: v[own] for k, v in table.items()}
    cells["x_um"] = (x + cx[own] + 0.5) * mpp
    cells["y_um"] = (y + cy[own] + 0.5) * mpp
    # Pixel classes in the score compartment, binned on the tissue-mask grid (pixel H-score).
    core_sl = (slice(margin, margin + h), slice(margin, margin + w))
    scale = mpp / ctx.tissue_mpp
    keys, counts = pixel_class_counts(
        tc.nuclei[core_sl], tc.cells[core_sl], dab_od[core_sl], s.intensity, x, y, scale, ctx.tissue_shape
    )
    t4 = time.perf_counter()
    return {
        "cells": cells,
        "pixel_keys": keys,
        "pixel_counts": counts,
        **_qc_measures(ctx, pixels[core_sl]),
        "floor": (
            floor_blocks(h_od[core_sl], dab_od[core_sl], cx[own], cy[own], cells["nucleus_area_um2"], mpp, s.qc)
            if s.qc.enabled and s.qc.fold_floor_ratio > 0
            else np.zeros((3, 0, 0))  # (the opt-in fold-floor check reads the stain planes and cells)
        ),
        "timings": {"deconvolution": t2 - t1, "cells": t3 - t2, "measure": t4 - t3},
    }


def _qc_measures(ctx: _TileContext, core: np.ndarray) -> dict[str, np.ndarray]:
    """A tile core's quality-control measures: its :func:`pipeline.qc.focus_blocks` and, with the
    grey checks (bubbles, debris) on, its :func:`pipeline.qc.grey_cells`."""
    s = ctx.settings.qc
    if not s.enabled:
        return {"blocks": np.zeros((2, 0, 0)), "grey": np.zeros((0, 0), np.float32)}
    small = half_resolution(core)
    grey = np.zeros((0, 0), np.float32)
    if s.grey_residual_od > 0:
        cell = grey_cell_px(ctx.tissue_mpp, ctx.mpp)
        grey = grey_cells(small, cell, ctx.stains, ctx.background, s.grey_residual_od)
    return {"blocks": focus_blocks(small, focus_block_px(s, ctx.mpp)), "grey": grey}


def warm_up() -> int:
    """Score a small synthetic region once with each way of reading membranes
    and once with the QuPath detector, so that every compiled kernel the tile
    workers call is loaded (from numba's disk cache, or compiled) in this
    process. Returns the number of cells found (two nuclei on each pass).

    The workers' fork server runs this (:mod:`pipeline.prewarm`): each worker
    forked from it then starts with the kernels instead of loading them
    itself, about 0.3 s a worker.
    """
    stains = StainMatrix()
    mpp = NucleiSettings().requested_pixel_size_um
    yy, xx = np.mgrid[:96, :96].astype(np.float64)
    conc = np.zeros((96, 96, 3))
    # Two touching nuclei (one piece split at two peaks), brown rims around them.
    for cy, cx in ((44.0, 40.0), (52.0, 56.0)):
        r2 = ((yy - cy) ** 2 + (xx - cx) ** 2) * mpp * mpp
        conc[..., 0] += 0.8 * np.exp(-r2 / 8.0)
        conc[..., 1] += 0.3 * np.exp(-((np.sqrt(r2) - 5.0) ** 2))
    pixels = np.clip(stains.concentrations_to_rgb(conc), 0, 255).astype(np.uint8)
    found = 0
    passes = (
        Settings(intensity=IntensitySettings(membrane_method="sectors")),
        Settings(intensity=IntensitySettings(membrane_method="ring")),
        Settings(nuclei=NucleiSettings(method="qupath", exclude_dab=True, median_radius_um=0.5)),
    )
    for settings in passes:
        ctx = _TileContext(None, settings, stains, 255.0, 8 * mpp, (2, 2))
        found += len(score_region(ctx, pixels, (16, 16, 64, 64), 16)["cells"]["x_um"])
    # A nucleus with a hole: the region above may have none, and its kernel must load all the same.
    ring = np.zeros((5, 5), np.int32)
    ring[1:4, 1:4] = 1
    ring[2, 2] = 0
    watershed.fill_holes(ring)
    return found


def pixel_class_counts(
    nuclei: np.ndarray,
    cells: np.ndarray,
    dab_od: np.ndarray,
    intensity: IntensitySettings,
    x0: int,
    y0: int,
    scale: float,
    grid_shape: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of a tile core in the score compartment by tissue-grid cell and class.

    Returns flat keys ``grid index * 4 + class`` (classes as
    :func:`pipeline.nuclei.intensity_class`) and their counts, nonzero only.
    """
    compartment = {"nucleus": 0, "cell": 1}.get(intensity.compartment, 2)
    thresholds = class_thresholds(intensity)
    hist, row0, col0, cols = kernels.class_counts_on_grid(
        nuclei, cells, dab_od, compartment, thresholds, x0, y0, scale, *grid_shape
    )
    classes = len(thresholds) + 1
    found = np.flatnonzero(hist)
    cell, cls = np.divmod(found, classes)
    row, col = np.divmod(cell, cols)
    keys = ((row + row0) * grid_shape[1] + col + col0) * 4 + cls
    return keys.astype(np.int64), hist[found]


# -- the slide-level run --------------------------------------------------------------


def _background(settings: Settings, tissue: TissueMask) -> Background:
    if settings.stain.background != "auto":
        return float(settings.stain.background)
    if tissue.glass_rgb is None:
        return 255.0
    r, g, b = tissue.glass_rgb
    return (max(r, 1.0), max(g, 1.0), max(b, 1.0))


def _sample_tiles(
    slide: Slide, settings: Settings, cores: list[tuple[int, int, int, int]], mpp: float
) -> list[np.ndarray]:
    """Up to ``stain.estimate_tiles`` tissue tiles spread over the slide, for per-slide estimates."""
    pick = np.linspace(0, len(cores) - 1, min(settings.stain.estimate_tiles, len(cores))).astype(int)
    return [slide.read_at_mpp(mpp, *cores[i])[0] for i in pick] if cores else []


def _estimate_stains(settings: Settings, tiles: list[np.ndarray], background: Background) -> tuple[StainMatrix, str]:
    ref = StainMatrix(settings.stain.hematoxylin, settings.stain.dab)
    if not settings.stain.estimate:
        return ref, "default"
    ods = [rgb_to_od(t, background).reshape(-1, 3) for t in tiles]
    if not ods:
        return ref, "no tissue tiles; kept default vectors"
    estimate = estimate_dominant if settings.stain.estimate_method == "dominant" else estimate_macenko
    return estimate(np.concatenate(ods), ref, max_angle_deg=settings.stain.estimate_max_angle_deg)


def analyse(
    slide: Slide,
    settings: Settings,
    opener: SlideOpener | None = None,
    progress: bool = False,
) -> SlideResult:
    """Run the whole pipeline on ``slide``."""
    for warning in slide.metadata.get("warnings", []):
        log.warning("%s", warning)
    if slide.manage_colour(settings.stain.icc_profile):
        log.info("%s: colours converted from the slide's ICC profile to sRGB", slide.path)
    timings: dict[str, float] = {}
    workers = settings.tiling.workers or (os.cpu_count() or 1)
    context = _worker_context(opener, slide) if workers > 1 and opener is not None else None
    t = time.perf_counter()
    low, low_mpp = low_resolution(slide, settings.tissue)
    tissue = tissue_from_rgb(low, low_mpp, settings.tissue)
    background = _background(settings, tissue)
    qc: dict[str, dict[str, float]] = {}
    qc_failed: list[str] = []  # why the result is not valid
    counterstain: tuple[bool, str] | None = None
    qc_map = None
    before_mm2 = tissue.area_mm2
    if settings.qc.enabled:
        qc_map = artefacts_from_rgb(
            low, tissue, settings.qc, StainMatrix(settings.stain.hematoxylin, settings.stain.dab)
        )
        for kind in (Artefact.INK, Artefact.SATURATED, Artefact.FOLD, Artefact.EDGE):
            area = float(np.count_nonzero((qc_map.labels == kind) & tissue.mask)) * (tissue.mpp / 1000.0) ** 2
            if area > 0:
                qc[kind.label] = {"area_mm2": area, "percent_of_tissue": 100.0 * area / before_mm2}
        if qc:
            tissue = dataclasses.replace(tissue, mask=tissue.mask & ~qc_map.mask)
    timings["tissue"] = time.perf_counter() - t

    mpp = slide.analysis_mpp(settings.nuclei.requested_pixel_size_um)
    grid = slide.grid(mpp, settings.tiling.tile_size)
    fractions = tissue.tile_fractions(grid)
    cores = [
        c
        for c in grid.cores()
        if fractions[c[1] // grid.tile_size, c[0] // grid.tile_size] >= settings.tissue.min_tile_tissue
    ]
    t = time.perf_counter()
    tiles = (
        _sample_tiles(slide, settings, cores, mpp)
        if settings.stain.estimate or settings.nuclei.adaptive_threshold or settings.qc.enabled
        else []
    )
    stains, stain_status = _estimate_stains(settings, tiles, background)
    timings["stain_estimation"] = time.perf_counter() - t
    configured = settings
    settings, detection = adapt_threshold(settings, tiles, stains, background, mpp)
    if settings.qc.enabled and settings.nuclei.model is None and tiles:
        level = detection.get("nuclear_hematoxylin_od")
        if level is None:
            level = round(nuclear_hematoxylin_level(tiles, stains, background, settings.nuclei.sigma_um / mpp), 4)
            detection["nuclear_hematoxylin_od"] = level
        counterstain = counterstain_check(level, settings.qc)
        if counterstain is not None:
            log.warning("%s: %s", slide.path, counterstain[1])
            if counterstain[0]:
                qc_failed.append(counterstain[1])
    if detection["threshold"] != configured.nuclei.threshold:
        log.info(
            "%s: nuclear haematoxylin level %.3f OD: adaptive nucleus threshold %.3f instead of %.3f",
            slide.path,
            detection["nuclear_hematoxylin_od"],
            detection["threshold"],
            configured.nuclei.threshold,
        )

    t = time.perf_counter()
    workers = min(workers, max(1, len(cores)))
    args = (settings, stains, background, tissue.mpp, tissue.mask.shape, mpp)
    if settings.nuclei.model is not None:
        NucleusModel(settings.nuclei, stains)  # refuse a bad model file here, not in every worker
    # Of a tile at the tissue's edge only the part around its tissue is read and
    # scored (cells further than a margin from the tissue mask are not counted).
    units = group_tiles(cores, grid.tile_size, settings.tiling.group_tiles)
    blocks = tile_blocks(
        [tissue.tissue_bounds(u, mpp, settings.tiling.margin_um) for u in units], grid.tile_size, len(cores)
    )
    # Biggest blocks first, so that the last ones, which one worker may finish
    # while the other waits, are small; results are put back in raster order.
    order = sorted(range(len(blocks)), key=lambda i: -sum(c[2] * c[3] for c in blocks[i]))
    parts: Any
    pool = None
    if context is not None and opener is not None and workers > 1:
        pool = ProcessPoolExecutor(workers, context, initializer=_init_worker, initargs=(opener, *args))
        parts = pool.map(_process_block, [blocks[i] for i in order])
    else:
        ctx = _TileContext(slide, settings, stains, background, tissue.mpp, tissue.mask.shape, mpp=mpp)
        parts = ([process_tile(ctx, c) for c in blocks[i]] for i in order)
    done: list[list[dict[str, Any]]] = [[] for _ in blocks]
    try:
        with tqdm(total=len(cores), unit="tile", desc="scoring", disable=not progress) as bar:
            for i, part in zip(order, parts, strict=True):
                done[i] = part
                bar.update(len(part))
    finally:
        if pool is not None:
            pool.shutdown()
    outputs = [o for part in done for o in part]
    units_done = [c for i in range(len(blocks)) for c in blocks[i]]
    timings["tiles"] = time.perf_counter() - t
    for key in ("read", "deconvolution", "cells", "measure"):
        timings[f"tiles_{key}_cpu"] = float(sum(o["timings"][key] for o in outputs))
    # The tissue tiles' whole area (cores, before edge tiles are cut to their
    # tissue) and the tissue in them (by the tissue mask).
    tiles_mpx = sum(c[2] * c[3] for c in cores) / 1e6
    tissue_mpx = sum(fractions[c[1] // grid.tile_size, c[0] // grid.tile_size] * c[2] * c[3] for c in cores) / 1e6

    cells = _concat_cells([o["cells"] for o in outputs])
    pixel_keys = np.concatenate([np.zeros(0, np.int64), *(o["pixel_keys"] for o in outputs)])
    pixel_counts = np.concatenate([np.zeros(0, np.int64), *(o["pixel_counts"] for o in outputs)])
    if qc_map is not None:
        # Folds over pale tissue (opt-in), bubbles, debris, out-of-focus and over-exposed regions:
        # known only now, from the tiles; their cells and pixels leave the scores.
        measures = [o["blocks"] for o in outputs]
        for kind, found in (
            (Artefact.FOLD, fold_floor_mask(units_done, [o["floor"] for o in outputs], mpp, tissue, settings.qc)),
            (
                Artefact.BUBBLE,
                bubble_mask(units_done, [o["grey"] for o in outputs], mpp, tissue, settings.qc, qc_map.mask),
            ),
            (Artefact.DEBRIS, debris_mask(units_done, [o["grey"] for o in outputs], mpp, tissue, settings.qc)),
            (Artefact.BLUR, blur_mask(units_done, measures, mpp, tissue, settings.qc)),
            (Artefact.OVEREXPOSED, overexposed(units_done, measures, mpp, tissue, settings.qc, qc_map.white_clipped)),
        ):
            found &= tissue.mask
            if not found.any():
                continue
            height, width = found.shape
            qc_map.labels[found] = kind
            # (folds found on the tiles add to those of the low-resolution read)
            area = float(found.sum()) * (tissue.mpp / 1000.0) ** 2 + qc.get(kind.label, {}).get("area_mm2", 0.0)
            qc[kind.label] = {"area_mm2": area, "percent_of_tissue": 100.0 * area / before_mm2}
            tissue = dataclasses.replace(tissue, mask=tissue.mask & ~found)
            rows = np.clip((cells["y_um"] / tissue.mpp).astype(np.int64), 0, height - 1)
            cols = np.clip((cells["x_um"] / tissue.mpp).astype(np.int64), 0, width - 1)
            keep = ~found[rows, cols]
            cells = {k: v[keep] for k, v in cells.items()}
            usable = ~found.ravel()[pixel_keys // 4]
            pixel_keys, pixel_counts = pixel_keys[usable], pixel_counts[usable]
    if qc:
        usable = tissue.area_mm2 / before_mm2 if before_mm2 > 0 else 0.0
        log.info(
            "%s: quality control left out %s",
            slide.path,
            ", ".join(f"{k} {v['area_mm2']:.3f} mm²" for k, v in qc.items()),
        )
        if usable < settings.qc.min_usable_fraction:
            qc_failed.append(
                f"only {100 * usable:.0f}% of the tissue is usable after quality control ("
                + ", ".join(f"{k} {v['percent_of_tissue']:.0f}%" for k, v in qc.items())
                + ")"
            )

    t = time.perf_counter()
    if settings.segmentation.method == "model":
        compartments = TorchScriptSegmenter(settings.segmentation, settings.stain).segment(slide, tissue, background)
    else:
        compartments = builtin_segmentation(
            cells["x_um"], cells["y_um"], cells["nucleus_area_um2"], tissue, settings.segmentation
        )
    timings["segmentation"] = time.perf_counter() - t

    t = time.perf_counter()
    cells["compartment"] = compartments.lookup(cells["x_um"], cells["y_um"])
    cells["intensity_class"] = intensity_class(intensity_value(cells, settings.intensity), settings.intensity)
    if settings.intensity.membrane_method == "none":  # not measured, and no score reads it (config.settings)
        cells["membrane_class"] = np.zeros(len(cells["x_um"]), np.uint8)
        cells["membrane_complete"] = np.zeros(len(cells["x_um"]), bool)
    else:
        cells["membrane_class"] = intensity_class(cells["membrane_dab_mean"], settings.intensity)
        cells["membrane_complete"] = cells["membrane_positive_fraction"] >= settings.scores.her2_complete_fraction

    tissue_area = compartments.area_mm2(TUMOUR) + compartments.area_mm2(STROMA)
    tumour_area = compartments.area_mm2(TUMOUR)
    tumour_fraction = tumour_area / tissue_area if tissue_area > 0 else 0.0
    stats: dict[str, CompartmentSummary] = {}
    # Pixel classes were counted on the tissue-mask grid: read the map at those
    # cells' centres and total the classes per compartment label.
    step = max(1, round(tissue.mpp / compartments.mpp))
    on_tissue_grid = compartments.labels[step // 2 :: step, step // 2 :: step]
    grid_cell, pixel_class = np.divmod(pixel_keys, 4)
    grid_label = on_tissue_grid[np.divmod(grid_cell, tissue.mask.shape[1])].astype(np.int64)
    n_labels = max(len(CLASS_NAMES), int(compartments.labels.max(initial=0)) + 1)
    per_label = np.bincount(grid_label * 4 + pixel_class, weights=pixel_counts, minlength=n_labels * 4)
    pixels_by_label = np.rint(per_label).astype(np.int64).reshape(n_labels, 4)
    for name, sel, pix in (
        ("tumour", cells["compartment"] == TUMOUR, (TUMOUR,)),
        ("stroma", cells["compartment"] == STROMA, (STROMA,)),
        ("tissue", np.isin(cells["compartment"], (TUMOUR, STROMA)), (TUMOUR, STROMA)),
    ):
        area = sum(compartments.area_mm2(label) for label in pix)
        stats[name] = scoring.compartment_summary(
            cells["intensity_class"][sel], area, pixels_by_label[list(pix)].sum(axis=0)
        )
    tum = cells["compartment"] == TUMOUR
    scores = scoring.profile_scores(
        settings.scores.kind,
        cells["intensity_class"][tum],
        cells["membrane_class"][tum],
        cells["membrane_complete"][tum],
        settings.scores,
    )
    alerts = scoring.alerts(settings.scores.kind, tumour_fraction, int(tum.sum()), tissue_area, scores, settings.scores)
    if qc_failed:
        message = "; ".join(qc_failed) + "; the result is not valid"
        alerts.insert(0, {"code": AlertCode.QC_FAILED.value, "message": message})
    if counterstain is not None and not counterstain[0]:
        alerts.append({"code": AlertCode.PALE_COUNTERSTAIN.value, "message": counterstain[1]})
    uncertainty = None
    if settings.uncertainty.enabled:
        uncertainty = score_intervals(cells, intensity_value(cells, settings.intensity), scores, settings)
        alerts.extend(uncertainty.alerts)
    timings["scoring"] = time.perf_counter() - t
    explanations: list[Explanation] = []
    if settings.explain.integrated_gradients:
        t = time.perf_counter()
        explanations = explain_models(
            slide,
            tissue,
            settings.segmentation,
            settings.nuclei,
            mpp,
            settings.tiling.tile_size,
            stains,
            background,
            settings.explain,
        )
        for e in explanations:
            log.info(
                "%s: %s model attributions (integrated gradients, %d tiles): r = %.2f with DAB OD, %.2f with "
                "haematoxylin OD",
                slide.path,
                e.model,
                len(e.tiles),
                e.dab_correlation,
                e.hematoxylin_correlation,
            )
        timings["explain"] = time.perf_counter() - t
    timings["tissue_mpx"] = tissue_mpx
    timings["tiles_mpx"] = tiles_mpx
    described = slide.describe()
    described.pop("levels", None)
    return SlideResult(
        profile=settings.profile,
        slide=described,
        settings=configured,
        analysis_mpp=mpp,
        tissue=tissue,
        compartments=compartments,
        cells=cells,
        tumour_fraction=tumour_fraction,
        compartment_stats=stats,
        scores=scores,
        alerts=alerts,
        stain={
            "hematoxylin": stains.hematoxylin,
            "dab": stains.dab,
            "background": background,
            "status": stain_status,
            "tissue_threshold_od": tissue.threshold_od,
        },
        timings=timings,
        detection=detection,
        uncertainty=uncertainty,
        qc=qc,
        qc_map=qc_map,
        explanations=explanations,
    )


def nuclear_hematoxylin_level(
    tiles: list[np.ndarray], stains: StainMatrix, background: Background, sigma_px: float
) -> float:
    """What the darkest blue nuclei of the sampled ``tiles`` reach: the 99th percentile of
    haematoxylin OD smoothed by ``sigma_px``."""
    smoothed = []
    for pixels in tiles:
        h_od, _ = stain_planes(pixels, stains, background)
        smoothed.append(cv2.GaussianBlur(np.ascontiguousarray(h_od, np.float32), (0, 0), sigma_px).ravel())
    return float(np.percentile(np.concatenate(smoothed), 99))


def adapt_threshold(
    settings: Settings, tiles: list[np.ndarray], stains: StainMatrix, background: Background, mpp: float
) -> tuple[Settings, dict[str, Any]]:
    """The settings the tiles are scored with, and a record of the nucleus threshold chosen.

    With ``nuclei.adaptive_threshold`` (and no nucleus model), the slide's nuclear haematoxylin
    level is the 99th percentile of haematoxylin OD, smoothed by the detection sigma, over the
    sampled tissue tiles: what its darkest blue nuclei reach. The threshold is at most
    ``adaptive_fraction`` (0.32) of that level, never below ``min_threshold`` and never above the
    configured one: the real Ki-67 crop OS-2 (0.317 OD) and the generator's default slide (0.61)
    keep the configured 0.1 OD; a paler slide gets a threshold in proportion — the generator at
    0.35 of its counterstain (0.23) 0.074, at 0.2 of it (0.12) 0.038 (a fixed 0.1 OD finds 77 % of
    its nuclei, Ki-67 +9.4 points). A scanner's tone curve scales all optical densities, and the
    threshold follows: OS-2 under gamma 0.85 (level 0.27) is scored at 0.086 OD and finds the same
    nuclei (``bench/drift.py``; with the earlier fraction 0.5 it kept 0.1 and lost a quarter of them).
    """
    n = settings.nuclei
    record: dict[str, Any] = {"threshold": n.threshold, "configured_threshold": n.threshold, "adaptive": False}
    if not n.adaptive_threshold or n.model is not None or not tiles:
        return settings, record
    level = nuclear_hematoxylin_level(tiles, stains, background, n.sigma_um / mpp)
    threshold = float(max(n.min_threshold, min(n.threshold, n.adaptive_fraction * level)))
    record.update(adaptive=True, nuclear_hematoxylin_od=round(level, 4), threshold=round(threshold, 4))
    if threshold == n.threshold:
        return settings, record
    return settings.model_copy(update={"nuclei": n.model_copy(update={"threshold": threshold})}), record


def _worker_context(opener: SlideOpener, slide: Slide) -> multiprocessing.context.ForkServerContext:
    """The tile workers' process context, its fork server started now.

    Workers come from a fork server, not a fork of this process: forking a
    process whose OpenCV/torch thread pools (or a service's threads) are
    running can deadlock the child. The server imports the pipeline, the
    opener's module and the slide's backend module, and loads the compiled
    kernels (:mod:`pipeline.prewarm`), once, while this process detects the
    tissue; workers forked from it start ready. A server already running (an
    earlier slide in this process) is reused as it is: a slide of another
    backend than the first one's then has its workers import that backend.
    """
    context = multiprocessing.get_context("forkserver")
    modules = ["pipeline.analysis"]
    for module in (getattr(getattr(opener, "func", opener), "__module__", None), type(slide).__module__):
        if isinstance(module, str) and module != "__main__" and module not in modules:
            modules.append(module)
    context.set_forkserver_preload([*modules, "pipeline.prewarm"])
    multiprocessing.forkserver.ensure_running()
    return context


def _concat_cells(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    keys = (*CELL_COLUMNS, "x_um", "y_um")
    if not parts:
        return {k: np.zeros(0) for k in keys}
    return {k: np.concatenate([p[k] for p in parts]) for k in keys}


__all__ = ["CLASS_NAMES", "SlideResult", "analyse"]

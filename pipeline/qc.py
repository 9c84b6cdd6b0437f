"""Tissue quality control before scoring: artefacts mapped on the tissue grid and left out.

On the same low-resolution read as tissue detection (8 µm/px), white-balanced to the slide's glass:

* **Marker ink**: colours no H-DAB (or H&E) slide holds — green or cyan (hue 70–190°, saturation
  over ``qc.ink_saturation``) or saturated blue (hue 200–260°, saturation over 0.6).
* **Saturated (near-black)**: value under ``qc.dark_value`` (0.08 of white) over a whole 8 µm
  pixel: black ink, dirt or tissue so dark that the sensor is saturated and no stain can be
  measured there (a single dark nucleus is far smaller than such a pixel).
* **Folds and overlaps**: tissue lying twice absorbs in both stains at once — haematoxylin and DAB
  OD both over ``qc.fold_od`` at this resolution, where single-layer tissue, even dense tumour
  full of strongly stained nuclei, stays under it.
* **Edge** (opt-in, ``qc.edge_um`` > 0): the rim of each tissue piece (holes and lumina filled,
  so only the section's cut edges count), where IHC often stains more strongly (edge artefact).

Pieces smaller than ``qc.min_area_um2`` are ignored; the rest are taken out of the tissue before
tiles are chosen, so their cells are neither counted nor
shown. The areas are reported per kind and as a share of the tissue; when the usable tissue falls
under ``qc.min_usable_fraction`` of it the result is marked not valid (``QC_FAILED``).

* **Out of focus**: per block of ``qc.blur_block_um`` (48 µm) of the scored tiles at the analysis
  resolution, the energy of the green channel's Laplacian relative to its variance
  (:func:`focus_blocks`); a block is blurred when that is under ``qc.blur_ratio`` of the slide's
  median, or under ``qc.blur_floor`` (a slide out of focus everywhere), and at least three blurred
  blocks touch. On the generator's defocused patches (σ 2.5 µm) the blocks found overlap the
  patches with IoU 0.92 (4096² slide); no block of the real slides in ``../shared/data`` is
  called blurred.

**Absent or pale counterstain** is judged for the whole slide (:func:`counterstain_check`): when
the nuclear haematoxylin level of the sampled tissue tiles stays under ``qc.min_counterstain_od``
(0.08 OD), nuclei cannot be found reliably and the result is marked not valid (``QC_FAILED``);
under ``qc.pale_counterstain_od`` (0.15) a ``PALE_COUNTERSTAIN`` alert asks for a look. Chosen on
the real Ki-67 crop OS-2 (level 0.32) with its haematoxylin cut in the image: at 0.6 of it (level
0.19) the adaptive threshold finds 95 % of its nuclei and the index moves 0.7 points; at 0.4
(0.12) 90 % and 6 points; at 0.25 (0.075) 68 % and 22 points.

* **Over-exposed** (:func:`overexposed`): blocks of the scored tiles where at least
  ``qc.overexposed_fraction`` (half) of the pixels lie within 3 µm of a pixel clipped at white,
  unless the scanner clips its glass at white (then the palest tissue clips everywhere: the TCGA
  frozen section in ``../shared/data``). The lightest tissue is never brighter than the glass, so
  on a well exposed slide nothing there clips; under too much light the pale gaps between the
  cells clip even in dense tumour. On the generator's over-exposed discs (1.3 × the light; 3072²
  slide, seed 76) 92 % of what is found lies in them and 90 % of their (detected) tissue is found
  (IoU 0.83); Ki-67 65.6 % as without the discs (63.9 % with quality control off). Counting only
  the clipped pixels themselves (a quarter of a block) found 41 %. Nothing on the real slides.
  Tissue so pale under the extra light that the tissue detector takes it for glass is not scored
  and not counted in any area.

* **Air bubbles** (:func:`bubble_mask`): a bubble's rim refracts the light away in every colour
  alike, a thin grey line no mix of the two stains makes. At half the analysis resolution a pixel
  is grey when its colour-deconvolution residual exceeds ``qc.grey_residual_od`` (0.12) and its
  colour's saturation is at most 0.5 (:func:`grey_cells`); each area the grey encloses on the tissue grid, of at
  least ``qc.bubble_min_area_um2`` and larger than its rim, is left out, rim and inside. On four
  generator slides with three bubbles each (3072², seeds 75, 78–80, one with a paler
  counterstain, one with stain vectors turned by 6°) IoU 0.96 each; the Ki-67 index within 0.3 points
  of the bubble-free twin's; nothing on the real slides (marker ink on CMU-1 is grey-ish at its
  edges but far from unsaturated; a ring around an area an earlier check took is not a bubble).
* **Folds over pale tissue** (opt-in, :func:`fold_floor_mask`, ``qc.fold_floor_ratio``): the
  both-stains rule above needs strongly stained tissue; a fold over pale tissue stays pale, but a
  second layer doubles everything, the haematoxylin *floor* between the nuclei included, while
  the nuclei stay as crowded. Per 16 µm block of the scored tiles: the floor (an opening over
  15 µm, averaged over the tissue) against the median of the blocks as crowded with nuclei (a
  second pass leaves the first pass's folds out of the medians); at 1.6 times it a block is
  folded, where that median is at least ``qc.fold_min_floor_od`` (0.03) and the DAB floor did not
  rise more (stronger DAB, some of which reads as haematoxylin, is not a fold); holes in a folded
  piece are filled. On the generator's folds IoU 0.92 and 0.91 (3072², seeds 71 and 72) and
  0.84–0.93, median 0.88 (ten 2048² slides, seeds 100–109, two folds each); on the real IHC
  images (OS-2, scikit-image's), the H&E OS-1 and CMU-1 nothing, on the TCGA frozen section
  0.4 % (with one pass CMU-1 lost 10.7 %: its epidermis, whose cytoplasm takes haematoxylin).
  Off by default: it costs about 5 ms per 1024² region (an eighth of the default's time; the
  benchmark slide 36.4 MP/s against 39.0 in the same hour), tissue whose cytoplasm or stroma takes
  the counterstain more than its neighbours' (squamous epithelium) can read as folded, and the
  real slides here hold no fold to choose the ratio on. Left in, the generator's two folds (seed
  71) move the Ki-67 index by 0.02 points and the tumour H-score by +4.6; left out, by −0.4 and
  −0.5.

* **Debris** (:func:`debris_mask`): dust and dirt absorb every colour alike too. Tissue-grid
  pixels at least half of whose pixels are grey (as above), in solid pieces (a bubble's thin rim
  has none) of at least ``qc.debris_min_area_um2`` (400 µm²). Grey pixels are not taken for folds
  by the both-stains rule, dark as they are. On twelve generator particles (3072², seed 81;
  15–50 µm radius, 0.6–0.9 OD) IoU 0.95; Ki-67 64.3 % against 64.1 % without them (64.5 % with
  quality control off); nothing on the real slides.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

import cv2
import numpy as np
from scipy import ndimage

from config.settings import QcSettings
from pipeline import kernels
from pipeline.stains import Background, StainMatrix, per_channel, residual_tables, stain_planes
from pipeline.tissue import TissueMask


class Artefact(IntEnum):
    """Labels of the QC map."""

    NONE = 0
    INK = 1
    FOLD = 2
    BLUR = 3
    SATURATED = 4
    EDGE = 5
    OVEREXPOSED = 6
    BUBBLE = 7
    DEBRIS = 8

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class QcMap:
    """Artefact labels on the tissue grid (``mpp`` µm/px from the slide's origin)."""

    labels: np.ndarray
    mpp: float
    #: The scanner clips its glass at white (nine in ten bright pixels off the tissue are): pale
    #: tissue clips everywhere on such a slide, so clipping says nothing of over-exposure there.
    white_clipped: bool = False

    @property
    def mask(self) -> np.ndarray:
        return self.labels != Artefact.NONE

    def area_mm2(self, kind: Artefact) -> float:
        return float(np.count_nonzero(self.labels == kind)) * (self.mpp / 1000.0) ** 2


def artefacts_from_rgb(rgb: np.ndarray, tissue: TissueMask, settings: QcSettings, stains: StainMatrix) -> QcMap:
    """Ink and folds over the tissue (and, for ink, wherever it lies on the slide) on ``rgb``, the
    low-resolution read the ``tissue`` mask was found on (:func:`pipeline.tissue.low_resolution`)."""
    h, w = tissue.mask.shape
    rgb = rgb[:h, :w]
    glass = np.asarray(tissue.glass_rgb or (255.0, 255.0, 255.0), np.float64)
    gains = (255.0 / glass[0], 255.0 / glass[1], 255.0 / glass[2], 0.0)
    balanced = cv2.multiply(np.ascontiguousarray(rgb), gains, dtype=cv2.CV_8U)  # saturating
    hsv = cv2.cvtColor(balanced, cv2.COLOR_RGB2HSV)  # hue in 2° steps, saturation and value 0–255
    hue, sat, val = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    ink = ((hue >= 35) & (hue <= 95) & (sat > settings.ink_saturation * 255)) | (
        (hue >= 100) & (hue <= 130) & (sat > 0.6 * 255)
    )
    dark = val < settings.dark_value * 255
    h_od, dab_od = stain_planes(rgb, stains, tuple(glass))  # type: ignore[arg-type]
    fold = (h_od > settings.fold_od) & (dab_od > settings.fold_od) & tissue.mask[: rgb.shape[0], : rgb.shape[1]]
    if settings.grey_residual_od > 0:
        # Grey is dust or a bubble's rim, not two layers of stained tissue (the tile checks judge it).
        fold &= _grey_counts(rgb, 1, stains, tuple(glass), settings.grey_residual_od) == 0  # type: ignore[arg-type]
    edge = np.zeros((h, w), bool)
    if settings.edge_um > 0:
        filled = ndimage.binary_fill_holes(tissue.mask)
        inside = cv2.distanceTransform(np.pad(filled, 1).astype(np.uint8), cv2.DIST_L2, 5)[1:-1, 1:-1]
        edge = tissue.mask & (inside * tissue.mpp <= settings.edge_um)
    labels = np.zeros((h, w), np.uint8)
    min_px = settings.min_area_um2 / (tissue.mpp * tissue.mpp)
    for kind, found in ((Artefact.EDGE, edge), (Artefact.FOLD, fold), (Artefact.SATURATED, dark), (Artefact.INK, ink)):
        if not settings.enabled or not found.any():
            continue
        labels[large_pieces(found, min_px, 8)] = kind
    darkest = cv2.min(cv2.min(rgb[..., 0], rgb[..., 1]), rgb[..., 2])  # numpy's min(axis=-1): 20× slower
    bright_glass = ~tissue.mask[: rgb.shape[0], : rgb.shape[1]] & (darkest >= 150)
    white_clipped = bool(bright_glass.sum() >= 100 and (darkest[bright_glass] >= CLIPPED).mean() >= 0.9)
    return QcMap(labels=labels, mpp=tissue.mpp, white_clipped=white_clipped)


#: Focus is judged on the analysis image shrunk by this factor.
FOCUS_STEP = 2

#: Green level above which a pixel counts as glass when judging focus.
GLASS_GREY = 225.0


def _block_sums(image: np.ndarray, block: int) -> np.ndarray:
    """Sums of ``image`` over ``block``-square blocks (partial blocks at the edges included)."""
    h, w = image.shape
    rows, cols = -(-h // block), -(-w // block)
    padded = np.zeros((rows * block, cols * block), np.float32)
    padded[:h, :w] = image
    return padded.reshape(rows, block, cols, block).sum(axis=(1, 3), dtype=np.float64)


def focus_block_px(settings: QcSettings, mpp: float) -> int:
    """Side of a focus block (``qc.blur_block_um``) in pixels at ``mpp``; at least 8."""
    return max(8, round(settings.blur_block_um / mpp))


def half_resolution(pixels: np.ndarray) -> np.ndarray:
    """An RGB region at half its resolution (pixel areas averaged), as the checks below read it."""
    h, w = pixels.shape[:2]
    return cv2.resize(pixels, (max(1, w // FOCUS_STEP), max(1, h // FOCUS_STEP)), interpolation=cv2.INTER_AREA)


def focus_blocks(small: np.ndarray, block_px: int) -> np.ndarray:
    """Per ``block_px`` square of an RGB region (rows × columns, partial blocks at the edges
    included; ``small`` is the region at half the analysis resolution, :func:`half_resolution`),
    two measures, as ``(2, rows, columns)``:

    0. Sharpness: the mean squared Laplacian of the green channel (where both stains absorb) over
       its variance — a defocus of 2 µm and more is plain at half resolution, at a quarter of the
       cost; at a quarter of the resolution the patches found shrank to IoU 0.65 — NaN for a block
       too flat to judge or mostly glass (whose edge against tissue is sharp whatever the focus).
    1. Clipped share: the share of pixels within :data:`CLIPPED_REACH_PX` (3 µm at half the
       analysis resolution) of a pixel white in every channel (≥ 254), which no tissue or glass of
       a well exposed slide reaches (:func:`overexposed`). Under too much light the palest pixels
       between the cells clip even in dense tumour, whose darker pixels do not: the clipped pixels
       themselves covered a quarter of only 41 % of the generator's over-exposed tissue blocks,
       their surroundings cover 85 % or more of 99 % of them.
    """
    green = np.ascontiguousarray(small[..., 1])
    laplacian = cv2.Laplacian(green, cv2.CV_32F, ksize=1)
    block = max(1, block_px // FOCUS_STEP)
    darkest = cv2.min(cv2.min(small[..., 0], small[..., 1]), small[..., 2])  # numpy's min(axis=-1): 20× slower
    near_clipped = cv2.dilate((darkest >= CLIPPED).view(np.uint8), _CLIPPED_REACH)
    sums = kernels.focus_sums(green, laplacian, near_clipped, block, GLASS_GREY)
    n = sums[0]
    m = sums[1] / n
    variance = sums[2] / n - m * m
    energy = sums[3] / n
    glass = sums[4] / n
    clipped = sums[5] / n
    with np.errstate(invalid="ignore", divide="ignore"):
        sharpness = energy / variance
    sharpness[(variance <= 4.0) | (glass > 0.5)] = np.nan
    return np.stack([sharpness, clipped])


#: A pixel this bright in every channel is clipped at white.
CLIPPED = 254

#: A pixel this close to a clipped one (at half the analysis resolution, so 3 µm at 0.5 µm/px)
#: counts towards a block's clipped share.
CLIPPED_REACH_PX = 3
_CLIPPED_REACH = np.ones((2 * CLIPPED_REACH_PX + 1, 2 * CLIPPED_REACH_PX + 1), np.uint8)


def _grey_counts(rgb: np.ndarray, cell_px: int, stains: StainMatrix, background: Background, od: float) -> np.ndarray:
    """Grey pixels (:func:`pipeline.kernels.grey_counts`: deconvolution residual over ``od``,
    saturation, white-balanced to ``background``, at most :data:`GREY_SATURATION`) per
    ``cell_px`` square of ``rgb``."""
    white = per_channel(background)
    tables = residual_tables(stains, white)
    rgb = np.ascontiguousarray(rgb)
    return kernels.grey_counts(rgb, tables, od, np.asarray(white), GREY_SATURATION, cell_px)


def grey_cells(small: np.ndarray, cell_px: int, stains: StainMatrix, background: Background, od: float) -> np.ndarray:
    """Per ``cell_px`` square of ``small`` (a region at half the analysis resolution; partial cells
    at the edges included): the share of its pixels that are grey — their deconvolution residual
    (:func:`pipeline.stains.residual_tables`) over ``od`` and their colour, against the glass, of
    saturation at most :data:`GREY_SATURATION`. A bubble's rim refracts the light away in every
    colour alike, and dust absorbs it so; the stains, each and mixed, leave no residual; marker
    ink and the purple of an H&E stain leave some, but are far from grey."""
    h, w = small.shape[:2]
    counts = _grey_counts(small, cell_px, stains, background, od)
    return (counts / _block_sums(np.ones((h, w), np.float32), cell_px)).astype(np.float32)


#: A grey pixel's colour (white-balanced) has at most this saturation, (max − min) / max: a bubble's
#: rim over the generator's tissue 0.1–0.45; teal marker ink on CMU-1 0.5, H&E's purple 0.9.
GREY_SATURATION = 0.5


def bubble_mask(
    regions: Sequence[tuple[int, int, int, int]],
    grey: Sequence[np.ndarray],
    mpp: float,
    tissue: TissueMask,
    settings: QcSettings,
    flagged: np.ndarray | None = None,
) -> np.ndarray:
    """Air bubbles on the tissue grid, rim and inside, from the :func:`grey_cells` of each analysed
    region (:func:`grey_cell_px`: a cell about a tissue-grid pixel): every area the grey cells
    enclose (8-connected) of at least ``qc.bubble_min_area_um2``, and larger than the grey around
    it, is a bubble, rim included. The generator's rims stay unbroken on this grid, so no gap is
    bridged: specks of grey dirt rarely enclose anything. What an earlier check ``flagged`` (the
    edge of a marker stroke can be greyish) is not counted as inside."""
    rim = _grey_on_grid(regions, grey, mpp, tissue, settings, 0.0)
    if not rim.any():
        return rim
    filled = ndimage.binary_fill_holes(rim)
    inside = filled & ~rim
    if flagged is not None:
        inside &= ~flagged
    n, pieces = cv2.connectedComponents(filled.view(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    inside_px = np.bincount(pieces[inside], minlength=n)
    # A bubble's rim is a thin line around it: more inside than rim (a net of grey specks
    # encloses little).
    keep = (inside_px * tissue.mpp**2 >= settings.bubble_min_area_um2) & (
        inside_px >= np.bincount(pieces[rim], minlength=n)
    )
    keep[0] = False
    return keep[pieces] & tissue.mask


def debris_mask(
    regions: Sequence[tuple[int, int, int, int]],
    grey: Sequence[np.ndarray],
    mpp: float,
    tissue: TissueMask,
    settings: QcSettings,
) -> np.ndarray:
    """Debris (dust, dirt) on the tissue grid, from the :func:`grey_cells` of each analysed region:
    cells at least ``qc.debris_grey_share`` grey, in solid pieces (a thin grey line, such as a
    bubble's rim, has no cell whose eight neighbours are grey too) of at least
    ``qc.debris_min_area_um2``."""
    found = _grey_on_grid(regions, grey, mpp, tissue, settings, settings.debris_grey_share)
    if not found.any():
        return found
    n, pieces, stats, _ = cv2.connectedComponentsWithStats(found.view(np.uint8), connectivity=8)
    solid = np.zeros(n, bool)
    solid[np.unique(pieces[cv2.erode(found.view(np.uint8), np.ones((3, 3), np.uint8)).view(bool)])] = True
    keep = solid & (stats[:, cv2.CC_STAT_AREA] * tissue.mpp**2 >= settings.debris_min_area_um2)
    keep[0] = False
    return keep[pieces] & tissue.mask


def _grey_on_grid(
    regions: Sequence[tuple[int, int, int, int]],
    grey: Sequence[np.ndarray],
    mpp: float,
    tissue: TissueMask,
    settings: QcSettings,
    least: float,
) -> np.ndarray:
    """The tissue grid under the :func:`grey_cells` more than ``least`` grey (``least`` > 0: at
    least that share), tissue or not; nothing when the grey checks are off."""
    found = np.zeros(tissue.mask.shape, bool)
    if not settings.enabled or settings.grey_residual_od <= 0:
        return found
    shares = np.concatenate([np.zeros(0), *(g.ravel() for g in grey)])
    flags = shares >= least if least > 0 else shares > 0
    paste_blocks(found, regions, grey, flags, 2 * grey_cell_px(tissue.mpp, mpp), mpp, tissue.mpp)
    return found


def grey_cell_px(tissue_mpp: float, mpp: float) -> int:
    """Side of a :func:`grey_cells` cell at half the analysis resolution: about a tissue-grid pixel."""
    return max(1, round(tissue_mpp / (FOCUS_STEP * mpp)))


def blurred(values: list[float] | np.ndarray, settings: QcSettings) -> np.ndarray:
    """Which regions (their :func:`focus` values) are out of focus."""
    f = np.asarray(values, np.float64)
    if not settings.enabled or not np.isfinite(f).any():
        return np.zeros(f.shape, bool)
    median = float(np.nanmedian(f))
    with np.errstate(invalid="ignore"):
        return np.isfinite(f) & ((f < settings.blur_ratio * median) | (f < settings.blur_floor))


def blur_mask(
    regions: Sequence[tuple[int, int, int, int]],
    measures: Sequence[np.ndarray],
    mpp: float,
    tissue: TissueMask,
    settings: QcSettings,
) -> np.ndarray:
    """Out-of-focus tissue on the tissue grid, from the :func:`focus_blocks` of each analysed
    region: the blocks :func:`blurred` calls out of focus across the whole slide
    (:func:`block_mask`)."""
    sharpness = [m[0] for m in measures]
    out_of_focus = blurred(np.concatenate([np.zeros(0), *(v.ravel() for v in sharpness)]), settings)
    return block_mask(regions, sharpness, out_of_focus, mpp, tissue, settings)


def overexposed(
    regions: Sequence[tuple[int, int, int, int]],
    measures: Sequence[np.ndarray],
    mpp: float,
    tissue: TissueMask,
    settings: QcSettings,
    white_clipped: bool,
) -> np.ndarray:
    """Over-exposed tissue on the tissue grid: blocks in which at least ``qc.overexposed_fraction``
    of the pixels are clipped at white (:func:`focus_blocks`), unless the scanner clips its glass
    at white (``white_clipped``, :class:`QcMap`: then the palest tissue clips everywhere and
    clipping says nothing). Too much light there: every optical density reads low, pale tissue as
    glass."""
    clipped = [m[1] for m in measures]
    flags = np.concatenate([np.zeros(0), *(v.ravel() for v in clipped)]) >= settings.overexposed_fraction
    if not settings.enabled or white_clipped:
        flags[:] = False
    return block_mask(regions, clipped, flags, mpp, tissue, settings)


def block_mask(
    regions: Sequence[tuple[int, int, int, int]],
    blocks: Sequence[np.ndarray],
    flags: np.ndarray,
    mpp: float,
    tissue: TissueMask,
    settings: QcSettings,
) -> np.ndarray:
    """The flagged blocks (``flags``: every region's ``blocks`` in turn, raveled) on the tissue
    grid, on tissue, in connected pieces of at least three blocks (a lone odd block is texture,
    not an artefact). Regions are (x, y, width, height) in pixels at ``mpp``."""
    found = np.zeros(tissue.mask.shape, bool)
    if not flags.any():
        return found
    block = focus_block_px(settings, mpp)
    scale = mpp / tissue.mpp
    paste_blocks(found, regions, blocks, flags, block, mpp, tissue.mpp)
    found &= tissue.mask
    return large_pieces(found, 3 * (block * scale) ** 2, 4)


def fold_block_px(settings: QcSettings, mpp: float) -> int:
    """Side of a :func:`floor_blocks` block (``qc.fold_block_um``) in pixels at ``mpp``: a whole
    number of half-resolution pixels."""
    return FOCUS_STEP * max(1, round(settings.fold_block_um / (FOCUS_STEP * mpp)))


def floor_blocks(
    h_od: np.ndarray,
    dab_od: np.ndarray,
    cells_x_px: np.ndarray,
    cells_y_px: np.ndarray,
    nucleus_area_um2: np.ndarray,
    mpp: float,
    settings: QcSettings,
) -> np.ndarray:
    """Per ``qc.fold_block_um`` block of a tile core's haematoxylin and DAB OD (at ``mpp``; cells
    at core-relative pixels), as ``(3, rows, columns)``: the haematoxylin and the DAB *floor*, the
    mean over the block's tissue of an opening over ``qc.fold_floor_window_um`` (at half
    resolution; it clears the nuclei and keeps what lies between them: cytoplasm and stroma, which
    a second layer of tissue doubles; NaN where under a third of the block is tissue), and the
    share of the block its nuclei cover (which the floors are compared within,
    :func:`fold_floor_mask`)."""
    window = max(3, round(settings.fold_floor_window_um / (FOCUS_STEP * mpp)))
    square = np.ones((window, window), np.uint8)
    small_h, small_dab = half_resolution(h_od), half_resolution(dab_od)
    tissue = (small_h + small_dab > GLASS_H_OD).astype(np.float32)
    side = fold_block_px(settings, mpp)
    block = side // FOCUS_STEP
    n = _block_sums(tissue, block)
    floors = []
    for small in (small_h, small_dab):
        floor = cv2.morphologyEx(small, cv2.MORPH_OPEN, square)
        with np.errstate(invalid="ignore", divide="ignore"):
            floors.append(np.where(n >= block * block / 3.0, _block_sums(floor * tissue, block) / n, np.nan))
    rows, cols = floors[0].shape
    index = np.clip(cells_y_px // side, 0, rows - 1) * cols + np.clip(cells_x_px // side, 0, cols - 1)
    covered = np.bincount(index.astype(np.int64), weights=nucleus_area_um2, minlength=rows * cols)
    return np.stack([*floors, covered.reshape(rows, cols) / (side * mpp) ** 2])


#: Haematoxylin plus DAB OD above which a pixel is tissue when judging the floors.
GLASS_H_OD = 0.02

#: Crowding classes the haematoxylin floor is compared within (quantiles of the nuclear share).
FOLD_CROWDING_BINS = 8

#: Passes of :func:`fold_floor_mask`: each takes the folds the one before found out of the medians.
FOLD_PASSES = 2


def fold_floor_mask(
    regions: Sequence[tuple[int, int, int, int]],
    measures: Sequence[np.ndarray],
    mpp: float,
    tissue: TissueMask,
    settings: QcSettings,
) -> np.ndarray:
    """Folds over any tissue on the tissue grid (opt-in, ``qc.fold_floor_ratio``): tissue lying
    twice doubles every optical density, the pale floor between the nuclei included, while its
    nuclei stay as crowded. Blocks (:func:`floor_blocks`) are put in :data:`FOLD_CROWDING_BINS`
    classes by the share their nuclei cover; a block whose haematoxylin floor is at least
    ``qc.fold_floor_ratio`` times its class's median, where that median is at least
    ``qc.fold_min_floor_od``, is folded — unless its DAB floor rose further above its class's
    than the haematoxylin one did: then it is stronger staining (some DAB reads as haematoxylin
    where the slide's DAB differs from the vector), not a second layer. Pieces under
    ``qc.min_area_um2`` are ignored."""
    found = np.zeros(tissue.mask.shape, bool)
    if not settings.enabled or settings.fold_floor_ratio <= 0 or not measures:
        return found
    floor, dab, crowding = (np.concatenate([np.zeros(0), *(m[i].ravel() for m in measures)]) for i in range(3))
    valid = np.isfinite(floor)
    if valid.sum() < 2 * FOLD_CROWDING_BINS:
        return found
    edges = np.quantile(crowding[valid], np.linspace(0, 1, FOLD_CROWDING_BINS + 1)[1:-1])
    bins = np.searchsorted(edges, crowding, side="right")
    flags = np.zeros(floor.shape, bool)
    for _ in range(FOLD_PASSES):  # the references again without the folds a pass found
        expected = np.full((2, FOLD_CROWDING_BINS), np.nan)
        for b in range(FOLD_CROWDING_BINS):
            members = valid & ~flags & (bins == b)
            if members.any():
                expected[:, b] = np.median(floor[members]), np.median(dab[members])
        ref, ref_dab = expected[0, bins], expected[1, bins]
        with np.errstate(invalid="ignore"):
            excess = floor - ref
            flags = (
                valid
                & (ref >= settings.fold_min_floor_od)
                & (floor >= settings.fold_floor_ratio * ref)
                & (dab - ref_dab <= excess)
            )
    paste_blocks(found, regions, [m[0] for m in measures], flags, fold_block_px(settings, mpp), mpp, tissue.mpp)
    # A fold is one sheet: blocks inside it that missed the ratio (a nucleus-free gap) are in it.
    found = ndimage.binary_fill_holes(found) & tissue.mask
    return large_pieces(found, settings.min_area_um2 / tissue.mpp**2, 8)


def paste_blocks(
    out: np.ndarray,
    regions: Sequence[tuple[int, int, int, int]],
    blocks: Sequence[np.ndarray],
    flags: np.ndarray,
    block: int,
    mpp: float,
    grid_mpp: float,
) -> None:
    """Set ``out`` (a grid of ``grid_mpp``) True under the flagged blocks: ``flags`` holds every
    region's ``blocks`` in turn, raveled; blocks are ``block`` pixels square at ``mpp`` from the
    region's (x, y, width, height) corner."""
    if not flags.any():
        return
    scale = mpp / grid_mpp
    start = 0
    for (x, y, w, h), v in zip(regions, blocks, strict=True):
        bad = flags[start : start + v.size].reshape(v.shape)
        start += v.size
        for r, c in zip(*np.nonzero(bad), strict=True):
            y0, x0 = y + r * block, x + c * block
            y1, x1 = min(y + h, y0 + block), min(x + w, x0 + block)
            out[int(y0 * scale) : int(np.ceil(y1 * scale)), int(x0 * scale) : int(np.ceil(x1 * scale))] = True


def large_pieces(mask: np.ndarray, min_px: float, connectivity: int) -> np.ndarray:
    """The connected pieces of ``mask`` (``connectivity`` 4 or 8) of at least ``min_px`` pixels."""
    _, pieces, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=connectivity)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_px
    keep[0] = False
    return keep[pieces]


def counterstain_check(nuclear_hematoxylin_od: float | None, settings: QcSettings) -> tuple[bool, str] | None:
    """``(failed, why)`` when the slide's counterstain is too weak to find nuclei (failed) or pale
    enough to miss some; None when it is neither, or was not measured."""
    if not settings.enabled or nuclear_hematoxylin_od is None:
        return None
    level = f"the nuclear haematoxylin level of the sampled tissue is {nuclear_hematoxylin_od:.3f} OD"
    if nuclear_hematoxylin_od < settings.min_counterstain_od:
        return True, f"too little counterstain: {level} (qc.min_counterstain_od {settings.min_counterstain_od})"
    if nuclear_hematoxylin_od < settings.pale_counterstain_od:
        return False, (
            f"pale counterstain: {level} (qc.pale_counterstain_od {settings.pale_counterstain_od}); "
            "pale negative nuclei may be missed and the positive share read high"
        )
    return None

"""Classical nucleus and cell detection, in the terms of QuPath's positive cell detection.

For one tile of haematoxylin / DAB optical density at the requested pixel size (the ``fast``
detector; ``nuclei.method = "qupath"`` hands step 3–5 to :mod:`pipeline.qupath`):

1. *Detection image*: haematoxylin OD, the OD sum, or the stronger of haematoxylin and DAB
   (``stain_max``, the nuclear-stain profiles' choice); with *Exclude DAB*, only where
   haematoxylin dominates.
2. *Median filter radius*, then *Background radius*: the background is a
   grey opening (erosion then dilation) with that radius and is subtracted;
   pixels whose background exceeds *Max background intensity* are ignored.
3. *Sigma*: Gaussian smoothing; *Threshold*: foreground is smoothed OD above it
   where the smoothed image is also curved down (Laplacian of Gaussian > 0, as in
   QuPath), which cuts the bridges between touching nuclei; holes filled.
4. *Split by shape*: touching nuclei are split at the local maxima of the
   smoothed distance transform that a neck separates: each pixel of a piece with
   several maxima goes to the nearest one in that piece — a Voronoi split that
   costs one distance transform and no watershed flood.
5. Each nucleus is trimmed at half its peak (σ = 0.75 µm); *Minimum / Maximum area* filter.
6. *Cell expansion*: each nucleus grows by up to that distance, never into
   a neighbour (nearest-nucleus partition), as QuPath does; distances are
   5-7-11 chamfer distances, the nucleus label carried along with them
   (:func:`pipeline.kernels.expand_cells`).

The image operations are OpenCV's (Gaussian blur, morphology, connected
components, the distance map of the split: several times faster than
scipy.ndimage on one core); splitting, labelling, the cell expansion and
the per-cell measurements are compiled loops over the tile
(:mod:`pipeline.kernels`): there is no Python loop per cell or per pixel.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage

from config.errors import ConfigError
from config.settings import IntensitySettings, NucleiSettings
from pipeline import kernels, qupath, watershed
from pipeline.stains import Background, StainMatrix
from pipeline.torchscript import load_model, model_input, run_model

#: Split by shape: distance-transform peaks closer than this are one nucleus.
SPLIT_RADIUS_UM = 3.0

#: Nuclei are trimmed at half their peak in the detection image smoothed by this σ (µm): fine
#: enough to keep a thin stromal nucleus thin (its DAB mean undiluted; σ = 1.5 µm lowered
#: class accuracy on synthetic stroma from 0.996 to 0.969), coarse enough not to cut a
#: textured real nucleus into fragments (σ = 0.5 µm found 89 % of QuPath's nuclei on OS-2
#: instead of 91 %, 0.86 of their area instead of 0.93).
TRIM_SIGMA_UM = 0.75

#: Split by shape: two peaks are two nuclei only if the distance map dips more than this many
#: pixels below the lower one on the way between them (ImageJ's EDM watershed uses 0.5).
SPLIT_NECK_PX = 0.5

#: The 3×3 Laplacian, negated: positive where the image is curved down (inside a blob).
_LAPLACIAN = np.array([[0, -1, 0], [-1, 4, -1], [0, -1, 0]], np.float32)

#: Background estimation quantises OD to steps of 1 / this (up to OD 16).
_BACKGROUND_STEPS = 4000.0

#: Per-cell columns produced by :func:`detect_cells`.
CELL_COLUMNS = (
    "x",
    "y",
    "nucleus_area_um2",
    "cell_area_um2",
    "nucleus_h",
    "nucleus_dab_mean",
    "nucleus_dab_max",
    "cytoplasm_dab_mean",
    "membrane_dab_mean",
    "membrane_dab_max",
    "membrane_positive_fraction",
    "cell_dab_mean",
    "cell_dab_max",
)


@dataclass(frozen=True)
class TileCells:
    """Cells of one tile: label images (tile incl. margin) and per-cell columns."""

    nuclei: np.ndarray
    cells: np.ndarray
    table: dict[str, np.ndarray]

    def __len__(self) -> int:
        return int(self.table["x"].shape[0])


def _disk(radius: float) -> np.ndarray:
    r = max(1, round(radius))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return np.asarray(xx * xx + yy * yy <= radius * radius + 0.5)


def _gaussian(image: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian smoothing truncated at 3 σ, edges mirrored."""
    k = 2 * int(np.ceil(3.0 * sigma_px)) + 1
    return cv2.GaussianBlur(image, (k, k), sigma_px, borderType=cv2.BORDER_REFLECT)


def _square(size: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_RECT, (size, size))


def raw_detection_image(
    h_od: np.ndarray, dab_od: np.ndarray, od_sum: np.ndarray, settings: NucleiSettings
) -> np.ndarray:
    """The detection image before any filtering: haematoxylin OD, the OD sum, the stronger of the two
    stains' OD at each pixel (``stain_max``: a nucleus whether blue or brown, as bright as its own
    stain makes it, without the residual) or their sum (``stain_sum``); with ``exclude_dab``, kept
    only where haematoxylin dominates (:func:`pipeline.qupath.exclude_dab`)."""
    if settings.detection_image == "hematoxylin":
        det = h_od
    elif settings.detection_image == "od_sum":
        det = od_sum
    elif settings.detection_image == "stain_max":
        det = np.maximum(h_od, dab_od)
    else:
        det = h_od + np.maximum(dab_od, 0)
    det = np.ascontiguousarray(det, dtype=np.float32)
    if settings.exclude_dab and settings.method == "fast":
        det = qupath.exclude_dab(det, h_od, dab_od)  # the QuPath method applies it in its own place
    return det


def detection_image(
    h_od: np.ndarray, dab_od: np.ndarray, od_sum: np.ndarray, settings: NucleiSettings, mpp: float
) -> tuple[np.ndarray, np.ndarray]:
    """Steps 1–3: the smoothed image the threshold is applied to, and a finer one (σ =
    :data:`TRIM_SIGMA_UM`) that trims each nucleus to its own pixels; both 0 where the
    background exceeds *Max background intensity*."""
    det = raw_detection_image(h_od, dab_od, od_sum, settings)
    if settings.median_radius_um > 0:
        det = ndimage.median_filter(det, footprint=_disk(settings.median_radius_um / mpp))
    valid = None
    if settings.background_radius_um > 0:
        size = 2 * max(1, round(settings.background_radius_um / mpp)) + 1
        # The opening runs on OD in steps of 1/4000 (uint16: four times faster
        # than on float32); negative OD counts as 0.
        steps = cv2.multiply(det, _BACKGROUND_STEPS, dtype=cv2.CV_16U)
        opened = cv2.morphologyEx(steps, cv2.MORPH_OPEN, _square(size))
        step, limit = np.float32(1.0 / _BACKGROUND_STEPS), np.float32(settings.max_background)
        det, over = kernels.subtract_steps(det, opened, step, limit)  # (one pass: 1.5 → 0.4 ms a region)
        if over:
            valid = opened.astype(np.float32) * step <= limit
    fine = _gaussian(det, TRIM_SIGMA_UM / mpp)
    det = _gaussian(det, settings.sigma_um / mpp)
    if valid is not None and not valid.all():
        det = np.where(valid, det, np.float32(0))
        fine = np.where(valid, fine, np.float32(0))
    return det, fine


def segment_nuclei(
    det: np.ndarray, settings: NucleiSettings, mpp: float, fine: np.ndarray | None = None, blobs: bool = True
) -> np.ndarray:
    """Steps 3–5: threshold, split by shape, trim, area filter → nucleus labels (0 = none).

    Foreground is where ``det`` exceeds the threshold and, with ``blobs`` (the
    classical detection image), where ``det`` is curved down (its 3×3 Laplacian
    is negative: a Laplacian of Gaussian above zero, as in QuPath's detector).
    The curvature cuts the low bridges that join neighbouring nuclei into one
    piece larger than any nucleus — on the real OS-2 Ki-67 crop the threshold
    alone found 64 % of the nuclei QuPath's own method finds there, with the cut
    91 % — and the holes it leaves inside textured nuclei are filled. Touching
    nuclei are split at distance-map peaks that a neck separates
    (:func:`pipeline.kernels.merge_neckless_peaks`). With ``fine``, each
    nucleus then keeps its pixels at or above half its own peak in ``fine``
    (a blurred step's true edge is where it falls to half its height), so the
    smoothing does not bloat nuclei into their cytoplasm. A model's
    probability image (``blobs`` False, no ``fine``) is thresholded as it is.
    """
    fg = np.ascontiguousarray(det > settings.threshold)
    if blobs:
        fg &= cv2.filter2D(det, -1, _LAPLACIAN, borderType=cv2.BORDER_REPLICATE) > 0
    if not fg.any():
        return np.zeros(det.shape, np.int32)
    n_pieces, pieces = cv2.connectedComponents(fg.view(np.uint8), connectivity=4, ltype=cv2.CV_32S)
    if blobs:
        pieces = watershed.fill_holes(pieces)
        fg = pieces > 0
    fg8 = fg.view(np.uint8)
    labels, n_labels = pieces, n_pieces
    if settings.split_by_shape:
        dist = _gaussian(cv2.distanceTransform(fg8, cv2.DIST_L2, 5), 1.0)
        # Peaks at least a typical nucleus radius apart; a plateau of equal
        # peak pixels, diagonal neighbours included, is one peak.
        size = 2 * max(1, round(SPLIT_RADIUS_UM / mpp)) + 1
        found = (dist == cv2.dilate(dist, _square(size))) & fg & (dist > 1.0)
        n_plateaus, plateaus = cv2.connectedComponents(found.view(np.uint8), connectivity=8, ltype=cv2.CV_32S)
        if n_plateaus > 2:
            plateaus, n_plateaus = kernels.merge_neckless_peaks(pieces, plateaus, n_plateaus, dist, SPLIT_NECK_PX)
        if n_plateaus > 2:
            labels = kernels.split_at_peaks(pieces, n_pieces, plateaus, n_plateaus, kernels.SPLIT_BRUTE_FORCE_BUDGET)
            n_labels = n_pieces + n_plateaus
    return kernels.trim_and_filter(
        labels,
        n_labels,
        np.zeros((0, 0), np.float32) if fine is None else np.ascontiguousarray(fine, dtype=np.float32),
        settings.threshold,
        settings.min_area_um2,
        settings.max_area_um2,
        mpp * mpp,
    )


def membrane_rings(
    cell: np.ndarray,
    nucleus: np.ndarray,
    dist_px: np.ndarray,
    dab: np.ndarray,
    n: int,
    ring_px: float,
    threshold: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Membrane DAB per cell: the ring around the nucleus where staining is strongest.

    Inputs are flat, one entry per pixel: cell label, nucleus label (0 in the
    cytoplasm), distance from the nucleus and DAB. The cytoplasm of each cell
    is cut into rings ``ring_px`` wide by distance from its nucleus; the
    membrane is the ring with the highest mean DAB (membranes are the
    brightest closed contour around a nucleus, wherever the cell's outline
    lies). Returns that ring's mean and max DAB and the fraction of its
    pixels at or above ``threshold`` (completeness).
    """
    zeros = np.zeros(n)
    outside = np.flatnonzero((cell > 0) & (nucleus == 0))
    if n == 0 or len(outside) == 0:
        return zeros, zeros, zeros
    ring = np.minimum((dist_px[outside] / ring_px).astype(np.int64), 63)
    rings = int(ring.max()) + 1
    key = (cell[outside] - 1) * rings + ring
    dab = dab[outside]
    count = np.bincount(key, minlength=n * rings).reshape(n, rings)
    total = np.bincount(key, weights=dab, minlength=n * rings).reshape(n, rings)
    above = np.bincount(key, weights=(dab >= threshold), minlength=n * rings).reshape(n, rings)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / count, -np.inf)
    best = mean.argmax(axis=1)
    rows = np.arange(n)
    has = np.isfinite(mean[rows, best])
    best_key = rows * rings + best
    ring_max = label_max(dab, key + 1, n * rings)[best_key]
    with np.errstate(invalid="ignore", divide="ignore"):
        complete = above[rows, best] / count[rows, best]
    return (
        np.where(has, mean[rows, best], 0.0),
        np.where(has, ring_max, 0.0),
        np.where(has, complete, 0.0),
    )


def membrane_sectors(peak: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Membrane DAB per cell from the peak along each direction out of the nucleus.

    ``peak`` is ``(n, sectors)``: the highest cytoplasm DAB of each cell in
    each equal angle around its nucleus centre (-inf where a sector has no
    pixel; :func:`pipeline.kernels.sector_peaks`). A membrane crosses every
    direction once, wherever the cell's outline lies, so a sector's peak is
    the membrane's there. Returns the mean and max of the sector peaks and the
    fraction of sectors whose peak reaches ``threshold`` (the stained fraction
    of the circumference); 0 for a cell without cytoplasm.
    """
    seen = np.isfinite(peak)
    n_seen = seen.sum(axis=1)
    has = n_seen > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(seen, peak, 0.0).sum(axis=1) / n_seen
        stained = (seen & (peak >= threshold)).sum(axis=1) / n_seen
    top = peak.max(axis=1) if peak.shape[1] else np.zeros(len(peak))
    return np.where(has, mean, 0.0), np.where(has, top, 0.0), np.where(has, stained, 0.0)


def label_max(values: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """Maximum of ``values`` per label 1..n (-inf where a label has no pixel), in O(pixels).

    scipy's ``ndimage.maximum`` sorts all pixels; this is one pass (:func:`pipeline.kernels.label_max`).
    """
    return kernels.label_max(
        np.ascontiguousarray(values, dtype=np.float32).ravel(),
        np.ascontiguousarray(labels, dtype=np.int64).ravel(),
        n,
    )


def measure_cells(
    nuclei: np.ndarray,
    cells: np.ndarray,
    dist_px: np.ndarray,
    h_od: np.ndarray,
    dab_od: np.ndarray,
    mpp: float,
    intensity: IntensitySettings,
    include_nuclei: bool = True,
) -> dict[str, np.ndarray]:
    """Per-cell centroid (tile px), areas and DAB statistics per compartment.

    Without ``include_nuclei`` (QuPath 'Include cell nucleus' off) the cell is
    its cytoplasm only: cell area and cell DAB leave the nucleus out. With
    ``membrane_method = "none"`` the membrane columns are NaN.

    ``cells`` must hold each nucleus' pixels under its own label (as
    :func:`pipeline.kernels.expand_cells` returns), so the cytoplasm is the cell minus its nucleus.
    """
    n = int(nuclei.max())
    if n == 0:
        return {c: np.zeros(0) for c in CELL_COLUMNS}
    if not nuclei.shape == cells.shape == h_od.shape == dab_od.shape:
        raise ValueError(
            f"label and OD images differ in shape: {nuclei.shape}, {cells.shape}, {h_od.shape}, {dab_od.shape}"
        )
    if cells.max() > n or cells.min() < 0 or nuclei.min() < 0:
        raise ValueError(f"cell labels must lie in 0..{n}, the nucleus labels")
    nuclei, cells = np.ascontiguousarray(nuclei), np.ascontiguousarray(cells)
    dab_od = np.ascontiguousarray(dab_od)
    st = kernels.cell_stats(nuclei, cells, np.ascontiguousarray(h_od), dab_od, n)
    counts, cell_counts = st[kernels.NUCLEUS_PIXELS], st[kernels.CELL_PIXELS]
    if not counts.all():
        missing = int(np.flatnonzero(counts == 0)[0]) + 1
        raise ValueError(f"nucleus {missing} has no pixel inside its cell: labels must be 1..n, each in its own cell")
    nucleus_dab, cell_dab = st[kernels.NUCLEUS_DAB_SUM], st[kernels.CELL_DAB_SUM]
    cx, cy = st[kernels.NUCLEUS_X_SUM] / counts, st[kernels.NUCLEUS_Y_SUM] / counts
    if intensity.membrane_method == "none":
        mem_mean = mem_max = mem_pos = np.full(n, np.nan)
    elif intensity.membrane_method == "sectors":
        peak = kernels.sector_peaks(nuclei, cells, dab_od, cx, cy, intensity.membrane_sectors)
        mem_mean, mem_max, mem_pos = membrane_sectors(peak, intensity.thresholds[0])
    else:
        inside = np.flatnonzero(cells.ravel())
        mem_mean, mem_max, mem_pos = membrane_rings(
            cells.ravel()[inside].astype(np.intp),
            nuclei.ravel()[inside].astype(np.intp),
            dist_px.ravel()[inside],
            dab_od.ravel()[inside].astype(np.float64),
            n,
            intensity.membrane_width_um / mpp,
            intensity.thresholds[0],
        )
    px = mpp * mpp
    cyto_counts = cell_counts - counts
    with np.errstate(invalid="ignore", divide="ignore"):
        cytoplasm_dab = np.where(cyto_counts > 0, (cell_dab - nucleus_dab) / cyto_counts, 0.0)
    if include_nuclei:
        cell_mean, cell_max = cell_dab / cell_counts, st[kernels.CELL_DAB_MAX]
    else:
        cell_counts = cyto_counts
        cell_mean = cytoplasm_dab
        cell_max = np.maximum(st[kernels.CYTOPLASM_DAB_MAX], 0.0)
    return {
        "x": cx,
        "y": cy,
        "nucleus_area_um2": counts * px,
        "cell_area_um2": cell_counts * px,
        "nucleus_h": st[kernels.NUCLEUS_H_SUM] / counts,
        "nucleus_dab_mean": nucleus_dab / counts,
        "nucleus_dab_max": st[kernels.NUCLEUS_DAB_MAX],
        "cytoplasm_dab_mean": cytoplasm_dab,
        "membrane_dab_mean": mem_mean,
        "membrane_dab_max": mem_max,
        "membrane_positive_fraction": mem_pos,
        "cell_dab_mean": cell_mean,
        "cell_dab_max": cell_max,
    }


class NucleusModel:
    """A nucleus model file (``nuclei.model``, TorchScript or ``.pt2``) in place of the detection image."""

    def __init__(self, settings: NucleiSettings, stains: StainMatrix):
        self.model, self.device = load_model(settings.model, settings.device, "nuclei")
        self.settings = settings
        self.stains = stains

    def probability(self, rgb: np.ndarray, background: Background) -> np.ndarray:
        """Nucleus probability of every pixel of an ``(H, W, 3)`` tile."""
        import torch  # only with a model: tile workers without one never load torch

        s = self.settings
        arr = model_input(rgb, s.model_channels, self.stains, background)
        inp = torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous().to(self.device)
        out = run_model(self.model, inp, "nuclei", s.model)
        if not isinstance(out, torch.Tensor) or out.ndim != 4 or out.shape[0] != 1 or out.shape[1] not in (1, 2):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ConfigError("nuclei.model", str(s.model), f"output {shape} is not (N, 1 or 2, H, W) logits")
        if out.shape[-2:] != inp.shape[-2:]:
            out = torch.nn.functional.interpolate(out.float(), size=inp.shape[-2:], mode="bilinear")
        prob = torch.sigmoid(out[:, 0]) if out.shape[1] == 1 else torch.softmax(out.float(), 1)[:, 1]
        return np.ascontiguousarray(prob[0].to("cpu", torch.float32).numpy())


def detect_cells(
    h_od: np.ndarray,
    dab_od: np.ndarray,
    od_sum: np.ndarray,
    mpp: float,
    settings: NucleiSettings,
    intensity: IntensitySettings,
    nucleus_probability: np.ndarray | None = None,
) -> TileCells:
    """Detect nuclei, expand to cells and measure them, for one tile.

    With ``nucleus_probability`` (a nucleus model's output) the nuclei are its
    pixels above ``model_threshold``, split by shape and filtered by area;
    otherwise the classical detection image is used.
    """
    h_od, dab_od = np.ascontiguousarray(h_od), np.ascontiguousarray(dab_od)
    if nucleus_probability is not None:
        nuclei = segment_nuclei(
            nucleus_probability, settings.model_copy(update={"threshold": settings.model_threshold}), mpp, blobs=False
        )
    elif settings.method == "qupath":
        raw = raw_detection_image(h_od, dab_od, od_sum, settings)
        nuclei = qupath.detect_nuclei(raw, h_od, dab_od, settings, mpp)
    else:
        det, fine = detection_image(h_od, dab_od, od_sum, settings, mpp)
        nuclei = segment_nuclei(det, settings, mpp, fine)
    cells, dist = kernels.expand_cells(nuclei, settings.cell_expansion_um / mpp)
    table = measure_cells(nuclei, cells, dist, h_od, dab_od, mpp, intensity, settings.include_nuclei)
    return TileCells(nuclei=nuclei, cells=cells, table=table)


def intensity_value(table: dict[str, np.ndarray], intensity: IntensitySettings) -> np.ndarray:
    """The DAB OD a cell is classed by (its score compartment and statistic)."""
    key = f"{intensity.compartment}_dab_{intensity.statistic}"
    if intensity.compartment == "cytoplasm":
        key = "cytoplasm_dab_mean"
    return table[key]


def class_thresholds(intensity: IntensitySettings) -> np.ndarray:
    """The ascending DAB thresholds that divide the classes: 1+/2+/3+, or the single positive one."""
    if intensity.single_threshold is not None:
        return np.array([intensity.single_threshold], np.float64)
    return np.asarray(intensity.thresholds, np.float64)


def intensity_class(values: np.ndarray, intensity: IntensitySettings) -> np.ndarray:
    """0 negative, 1 = 1+, 2 = 2+, 3 = 3+ (single threshold: 0 or 1): the number
    of :func:`class_thresholds` at or below each value."""
    return np.digitize(values, class_thresholds(intensity)).astype(np.uint8)

"""Tumour–stroma segmentation into the AutoIHC paper's four classes.

Two methods behind one result type (:class:`CompartmentMap`):

``builtin`` (no model file)
    An honest, documented rule on low-magnification *nuclear crowding*, not
    a trained network. Detected nuclei are binned on a grid (``grid_um``);
    their summed area and count are smoothed (``smooth_um``) and tissue is
    called tumour where nuclei cover at least ``tumour_nuclear_fraction`` of
    the tissue area and the mean nuclear area reaches
    ``tumour_min_nucleus_um2`` (carcinoma is crowded with large nuclei,
    ~20–35 % of its area; stroma is sparse, ~3–5 %; lymphocyte-rich stroma is
    crowded but its nuclei are small). The region is then drawn on a finer
    map (``map_um``) and its edge pulled in to the cells that make it up
    (within ``refine_reach_um`` of its nuclei, shrunk back to
    ``refine_margin_um`` beyond the outermost ones). Non-tissue is
    fat/background; the rest of the tissue is stroma. It knows nothing of
    necrosis, in-situ disease or normal epithelium, which it will call tumour
    when crowded: for those, train a model.
``model``
    A model file (``segmentation.model``, TorchScript or torch.export ``.pt2``; see
    :mod:`pipeline.torchscript`) run on tiles read at
    ``model_mpp`` with ``model_tile_size``; input ``(N, 3, H, W)`` float32,
    RGB in [0, 1] or H/DAB/residual OD (``model_channels``); output
    ``(N, C, H', W')`` logits whose channels mean ``model_classes``. Batches
    run on CUDA when present, else on the CPU. Nothing is downloaded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage

from config.errors import ConfigError
from config.settings import SegmentationSettings, StainSettings
from pipeline.labels import Compartment
from pipeline.slide import Slide
from pipeline.stains import Background, StainMatrix
from pipeline.tissue import TissueMask
from pipeline.torchscript import load_model, model_input, run_model

log = logging.getLogger(__name__)

TUMOUR, STROMA, FAT_BACKGROUND, OTHER = (
    Compartment.TUMOUR,
    Compartment.STROMA,
    Compartment.BACKGROUND,
    Compartment.OTHER,
)
#: The labels a compartment map holds, by name (``segmentation.model_classes`` names these).
CLASS_NAMES = {c: c.label for c in (FAT_BACKGROUND, TUMOUR, STROMA, OTHER)}
_NAME_TO_LABEL = {v: k for k, v in CLASS_NAMES.items()}


@dataclass(frozen=True)
class CompartmentMap:
    """Labels (0 fat/background, 1 tumour, 2 stroma, 3 other) at ``mpp`` from (0, 0)."""

    labels: np.ndarray
    mpp: float
    method: str
    #: A segmentation model's tumour probability on the same grid (float32, 0 off the tissue);
    #: None for the built-in rule, which decides without one.
    tumour_probability: np.ndarray | None = None

    def area_mm2(self, label: int) -> float:
        return float((self.labels == label).sum()) * (self.mpp / 1000.0) ** 2

    def lookup(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """Label at each point (µm); outside the map is fat/background."""
        return self.lookup_regions(self.labels, x_um, y_um).astype(np.uint8)

    def lookup_regions(self, image: np.ndarray, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """Value of ``image`` (on this map's grid) at each point; 0 outside."""
        col = np.floor(np.asarray(x_um) / self.mpp).astype(np.int64)
        row = np.floor(np.asarray(y_um) / self.mpp).astype(np.int64)
        h, w = image.shape
        inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
        out = np.zeros(col.shape, image.dtype)
        out[inside] = image[row[inside], col[inside]]
        return out


def builtin_segmentation(
    x_um: np.ndarray,
    y_um: np.ndarray,
    nucleus_area_um2: np.ndarray,
    tissue: TissueMask,
    settings: SegmentationSettings,
) -> CompartmentMap:
    """Tumour where tissue is crowded with large nuclei (see module docstring)."""
    h, w = tissue.mask.shape
    grid = settings.grid_um
    gw = max(1, int(np.ceil(w * tissue.mpp / grid)))
    gh = max(1, int(np.ceil(h * tissue.mpp / grid)))
    gx = np.clip((x_um / grid).astype(np.int64), 0, gw - 1)
    gy = np.clip((y_um / grid).astype(np.int64), 0, gh - 1)
    counts = np.bincount(gy * gw + gx, minlength=gw * gh).reshape(gh, gw).astype(np.float64)
    area_sum = np.bincount(gy * gw + gx, weights=nucleus_area_um2, minlength=gw * gh).reshape(gh, gw)
    # Tissue fraction of each grid cell, so density is per mm² of tissue, not of glass.
    zoom = (gh / h, gw / w)
    tissue_frac = ndimage.zoom(tissue.mask.astype(np.float64), zoom, order=1, grid_mode=True, mode="nearest")
    tissue_frac = _fit(tissue_frac, (gh, gw))
    sigma = settings.smooth_um / grid
    if sigma > 0:
        counts = ndimage.gaussian_filter(counts, sigma)
        area_sum = ndimage.gaussian_filter(area_sum, sigma)
        tissue_frac = ndimage.gaussian_filter(tissue_frac, sigma)
    cell_mm2 = (grid / 1000.0) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        nuclear_fraction = area_sum / (np.maximum(tissue_frac, 1e-3) * cell_mm2 * 1e6)
        mean_area = np.where(counts > 1e-6, area_sum / counts, 0.0)
    tumour_grid = (nuclear_fraction >= settings.tumour_nuclear_fraction) & (
        mean_area >= settings.tumour_min_nucleus_um2
    )
    # Up to the map's resolution, an integer refinement of the tissue mask's
    # (bilinear on the 0/255 score keeps edges smooth; the mask is replicated).
    f = max(1, round(tissue.mpp / settings.map_um))
    while f > 1 and h * w * f * f > settings.map_max_mpx * 1e6:
        f -= 1  # a coarser map on very large slides keeps memory bounded
    size = (w * f, h * f)
    # The map is up to map_max_mpx: 0/1 uint8 planes worked on in place, since every fresh plane of
    # that size is memory the system must fault in (in a virtual machine after the tile workers
    # ran, about 0.1 s each: the map took 1.3–1.6 s on the benchmark slide, 1.0–1.1 s now).
    tumour = cv2.resize(tumour_grid.astype(np.uint8) * np.uint8(255), size, interpolation=cv2.INTER_LINEAR)
    cv2.threshold(tumour, 127, 1, cv2.THRESH_BINARY, dst=tumour)  # the bilinear score ≥ 128
    labels: np.ndarray
    if f == 1:
        labels = tissue.mask.astype(np.uint8)
    else:
        labels = cv2.resize(tissue.mask.view(np.uint8), size, interpolation=cv2.INTER_NEAREST)
    mpp = tissue.mpp / f
    if settings.refine_to_nuclei and tumour.any():
        _refine_to_nuclei(tumour, x_um, y_um, mpp, settings)
    # labels holds the tissue (0/1): stroma there, tumour where the tumour plane is set too.
    np.bitwise_and(tumour, labels, out=tumour)
    np.multiply(labels, np.uint8(STROMA), out=labels)  # FAT_BACKGROUND is 0
    np.copyto(labels, np.uint8(TUMOUR), where=tumour.view(bool))
    return CompartmentMap(labels=labels, mpp=mpp, method="builtin")


def _refine_to_nuclei(
    tumour: np.ndarray,
    x_um: np.ndarray,
    y_um: np.ndarray,
    mpp: float,
    settings: SegmentationSettings,
) -> None:
    """Pull the smoothed region's edge (``tumour``, a 0/1 uint8 plane, changed in place) in to the
    cells that make it up.

    Smoothing spreads a crowded region about one smoothing radius into its
    surroundings; a pathologist draws tumour around the tumour cells. The
    region keeps the pixels within ``refine_reach_um`` of a nucleus it holds
    (so a gap of one undetected cell between two detected ones stays filled),
    shrunk back to ``refine_margin_um`` beyond the outermost nuclei (their
    radius plus a cell expansion). Every nucleus in the region counts, not
    only large ones: the region rule has already judged the crowding, and pale
    tumour nuclei are often measured small.
    """
    h, w = tumour.shape
    col = np.clip((x_um / mpp).astype(np.int64), 0, w - 1)
    row = np.clip((y_um / mpp).astype(np.int64), 0, h - 1)
    near = np.zeros((h, w), np.uint8)
    near[row, col] = 1
    reach = max(1, round(settings.refine_reach_um / mpp))
    cv2.dilate(near, _disk(reach), dst=near)
    # Back from the reach to the margin. Beyond the slide's edge OpenCV's
    # erosion sees foreground, so regions cut by the edge are not eaten.
    shrink = reach - min(reach, round(settings.refine_margin_um / mpp))
    if shrink > 0:
        cv2.erode(near, _disk(shrink), dst=near)
    np.bitwise_and(tumour, near, out=tumour)


def _disk(radius_px: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius_px + 1, 2 * radius_px + 1))


def _fit(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Crop or edge-pad ``a`` to ``shape`` (zoom can be off by one)."""
    out = a[: shape[0], : shape[1]]
    pad = ((0, shape[0] - out.shape[0]), (0, shape[1] - out.shape[1]))
    return np.pad(out, pad, mode="edge") if any(p[1] for p in pad) else out


class TorchScriptSegmenter:
    """Runs a tumour–stroma model file (TorchScript or ``.pt2``) over a slide in batches."""

    def __init__(self, settings: SegmentationSettings, stains: StainSettings):
        unknown = [c for c in settings.model_classes if c not in _NAME_TO_LABEL]
        if unknown:
            raise ConfigError("segmentation.model_classes", unknown, f"classes must be among {sorted(_NAME_TO_LABEL)}")
        self.model, self.device = load_model(settings.model, settings.device, "segmentation")
        self.settings = settings
        self.stains = StainMatrix(stains.hematoxylin, stains.dab)
        self._lut = np.array([_NAME_TO_LABEL[c] for c in settings.model_classes], np.uint8)

    def segment(self, slide: Slide, tissue: TissueMask, background: Background) -> CompartmentMap:
        import torch

        s = self.settings
        grid = slide.grid(s.model_mpp, s.model_tile_size)
        labels = np.full((grid.height, grid.width), FAT_BACKGROUND, np.uint8)
        cores = list(grid.cores())
        classes = list(s.model_classes)
        tumour_index = classes.index("tumour") if "tumour" in classes else None
        probability = np.zeros((grid.height, grid.width), np.float32) if tumour_index is not None else None
        for start in range(0, len(cores), s.batch_size):
            batch = cores[start : start + s.batch_size]
            arrays = []
            for x, y, _w, _h in batch:
                pixels, _ = slide.read_at_mpp(s.model_mpp, x, y, s.model_tile_size, s.model_tile_size)
                arrays.append(model_input(pixels, s.model_channels, self.stains, background))
            inp = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous().to(self.device)
            out = run_model(self.model, inp, "segmentation", s.model)
            if out.ndim != 4 or out.shape[1] != len(s.model_classes):
                raise ConfigError(
                    "segmentation.model",
                    str(s.model),
                    f"output shape {tuple(out.shape)} is not (N, {len(s.model_classes)}, H, W)",
                )
            if out.shape[-2:] != inp.shape[-2:]:
                out = torch.nn.functional.interpolate(out, size=inp.shape[-2:], mode="bilinear")
            cls = out.argmax(1).to("cpu").numpy()
            for (x, y, w, h), c in zip(batch, cls, strict=True):
                labels[y : y + h, x : x + w] = self._lut[c[:h, :w]]
            if probability is not None:
                tumour = torch.softmax(out.float(), 1)[:, tumour_index].to("cpu").numpy()
                for (x, y, w, h), p in zip(batch, tumour, strict=True):
                    probability[y : y + h, x : x + w] = p[:h, :w]
        # Resample to the tissue mask grid and keep labels inside tissue only.
        th, tw = tissue.mask.shape
        zoom = (th / labels.shape[0], tw / labels.shape[1])
        resampled = _fit(ndimage.zoom(labels, zoom, order=0, grid_mode=True, mode="nearest"), (th, tw))
        resampled = np.where(tissue.mask, resampled, FAT_BACKGROUND).astype(np.uint8)
        if probability is not None:
            smooth = _fit(ndimage.zoom(probability, zoom, order=1, grid_mode=True, mode="nearest"), (th, tw))
            probability = np.where(tissue.mask, np.clip(smooth, 0.0, 1.0), 0.0).astype(np.float32)
        return CompartmentMap(
            labels=resampled,
            mpp=tissue.mpp,
            method=f"model:{Path(str(s.model)).name}",
            tumour_probability=probability,
        )

"""Ground-truth tissue model of a synthetic IHC slide.

Everything is defined in micrometres, so the same seed gives the same tissue
at any µm/px. Compartments come from smooth random fields thresholded so the
tumour fraction of tissue is exactly what was asked (on the truth grid);
cells are placed block by block (128 µm) with a generator seeded by the block
index, so any tile can be rendered alone and every cell has one owner.

Compartment labels (:class:`pipeline.labels.Compartment`): 0 background (glass), 1 tumour,
2 stroma, 4 fat.
Intensity classes: 0 negative, 1 = 1+, 2 = 2+, 3 = 3+, defined by the mean
DAB optical density painted in the cell's stained compartment, cut at
:data:`CLASS_CUTS` (the QuPath-style 0.2 / 0.4 / 0.6 thresholds).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from functools import lru_cache
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator
from scipy import ndimage

from pipeline.labels import Compartment

BACKGROUND, TUMOUR, STROMA, FAT = Compartment.BACKGROUND, Compartment.TUMOUR, Compartment.STROMA, Compartment.FAT
COMPARTMENT_NAMES = {BACKGROUND: "background", TUMOUR: "tumour", STROMA: "stroma", FAT: "fat"}
#: Mean DAB OD bands painted for negative, 1+, 2+, 3+ cells.
CLASS_DAB_BANDS = ((0.0, 0.1), (0.25, 0.35), (0.45, 0.55), (0.7, 0.9))
#: The same classes drawn without gaps (``continuous_dab``): cells lie right at the cut-offs too.
CONTIGUOUS_DAB_BANDS = ((0.0, 0.2), (0.2, 0.4), (0.4, 0.6), (0.6, 0.9))
#: Class boundaries on mean DAB OD (1+ from 0.2, 2+ from 0.4, 3+ from 0.6).
CLASS_CUTS = (0.2, 0.4, 0.6)
#: Side of a cell-placement block in µm.
BLOCK_UM = 128.0
#: Hexagonal spacing of cohesive tumour cells in µm.
TUMOUR_SPACING_UM = 13.0

Localisation = Literal["nuclear", "cytoplasmic", "membranous"]
Proportions = tuple[float, float, float, float]


class SynthSpec(BaseModel):
    """Parameters of a synthetic bright-field H-DAB slide (all validated)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    width: int = Field(2048, ge=64, le=200_000, description="level-0 width in pixels")
    height: int = Field(2048, ge=64, le=200_000, description="level-0 height in pixels")
    mpp: float = Field(0.5, gt=0.05, le=4.0, description="level-0 µm/px")
    seed: int = Field(0, ge=0)
    tumour_fraction: float = Field(0.4, ge=0.0, le=0.95, description="tumour area / tissue area")
    fat_fraction: float = Field(0.1, ge=0.0, le=0.6, description="fat area / non-tumour tissue area")
    localisation: Localisation = "nuclear"
    tumour_classes: Proportions = (0.35, 0.25, 0.25, 0.15)
    stroma_classes: Proportions = (0.85, 0.1, 0.05, 0.0)
    stain_jitter_deg: float = Field(0.0, ge=0.0, le=20.0, description="random rotation of stain vectors")
    dab_scale_jitter: float = Field(0.0, ge=0.0, le=0.5, description="random ± scale of all DAB")
    noise_sigma: float = Field(2.0, ge=0.0, le=20.0, description="sensor noise, 8-bit units")
    background: float = Field(242.0, ge=150.0, le=255.0, description="glass brightness")
    counterstain_scale: float = Field(
        1.0, gt=0.0, le=3.0, description="haematoxylin strength (0.3-0.4: a pale counterstain)"
    )
    dab_masks_hematoxylin: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="share of a nucleus' haematoxylin hidden under strong nuclear DAB (0.8: brown nuclei "
        "with little blue left, as in real Ki-67 3+ nuclei)",
    )
    strong_dab_od: float = Field(
        0.9, gt=0.6, le=2.5, description="top of the 3+ DAB range (above ~1.4 dark pixels saturate)"
    )
    continuous_dab: bool = Field(
        False,
        description="draw each cell's DAB from contiguous class ranges that meet at the cut-offs (no gaps), "
        "so classes near a cut-off are as hard as on a real slide",
    )
    colour_cast: tuple[float, float, float] = Field(
        (1.0, 1.0, 1.0), description="per-channel gain of the scanner (white balance), applied to the light"
    )
    jpeg_quality: int = Field(90, ge=30, le=100)
    tile_size: int = Field(512, ge=64, le=4096)
    pen_strokes: int = Field(0, ge=0, le=20, description="green marker strokes drawn over the slide (QC artefact)")
    blur_patches: int = Field(0, ge=0, le=20, description="out-of-focus discs (QC artefact)")
    blur_sigma_um: float = Field(2.5, gt=0, le=4.0, description="defocus blur (Gaussian σ) inside the patches")
    folds: int = Field(0, ge=0, le=10, description="tissue folds: bands where the section lies twice (QC artefact)")
    bubbles: int = Field(
        0, ge=0, le=10, description="air bubbles under the coverslip: a dark grey rim, the tissue inside paler and soft"
    )
    overexposed: int = Field(
        0, ge=0, le=10, description="over-exposed discs: 1.3 times the light, clipped at white (QC artefact)"
    )
    debris: int = Field(
        0,
        ge=0,
        le=50,
        description="debris (dust, dirt) on the slide: irregular grey particles of radius 15–50 µm, 0.6–0.9 OD "
        "in every channel (QC artefact)",
    )

    @field_validator("tumour_classes", "stroma_classes")
    @classmethod
    def _proportions(cls, v: Proportions) -> Proportions:
        if any(p < 0 for p in v) or abs(sum(v) - 1.0) > 1e-6:
            raise ValueError(f"class proportions {v} must be non-negative and sum to 1")
        return v

    @field_validator("tile_size")
    @classmethod
    def _tile_multiple(cls, v: int) -> int:
        if v % 16:
            raise ValueError(f"tile_size {v} must be a multiple of 16")
        return v


class _SmoothField:
    """Gaussian-smoothed white noise on a coarse grid, sampled bilinearly (unit variance)."""

    def __init__(self, rng: np.random.Generator, width_um: float, height_um: float, step_um: float, sigma: float):
        nx, ny = math.ceil(width_um / step_um) + 4, math.ceil(height_um / step_um) + 4
        g = ndimage.gaussian_filter(rng.standard_normal((ny, nx)), sigma, mode="wrap")
        self.grid = ((g - g.mean()) / (g.std() + 1e-12)).astype(np.float32)
        self.step = step_um

    def sample(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        coords = np.stack([np.asarray(y_um) / self.step + 1.0, np.asarray(x_um) / self.step + 1.0])
        return ndimage.map_coordinates(self.grid, coords, order=1, mode="nearest")


def _mix64(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint64(31))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> np.uint64(29))
    h = h * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(32))


def value_noise(u: np.ndarray, v: np.ndarray, seed: int) -> np.ndarray:
    """Seamless lattice value noise in [0, 1] at lattice coordinates ``(u, v)``.

    Lattice values are a hash of the integer coordinates, so neighbouring
    tiles agree exactly along their seams.
    """
    i0, i1 = int(np.floor(u.min())), int(np.floor(u.max())) + 1
    j0, j1 = int(np.floor(v.min())), int(np.floor(v.max())) + 1
    ii, jj = np.meshgrid(np.arange(i0, i1 + 1, dtype=np.int64), np.arange(j0, j1 + 1, dtype=np.int64))
    with np.errstate(over="ignore"):
        h = (
            (ii.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))
            ^ (jj.astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F))
            ^ np.uint64((seed * 0x165667B19E3779F9) % (1 << 64))
        )
        lattice = (_mix64(h) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return ndimage.map_coordinates(lattice, np.stack([v - j0, u - i0]), order=1, mode="nearest")


class SlideModel:
    """The tissue of one synthetic slide: compartments and cells, in µm."""

    def __init__(self, spec: SynthSpec, thresholds: tuple[float, float] | None = None):
        """Build the model; ``thresholds`` (from :attr:`thresholds` of a model of
        the same spec) skips the calibration pass, e.g. in render workers."""
        self.spec = spec
        self.width_um = spec.width * spec.mpp
        self.height_um = spec.height * spec.mpp
        rng = np.random.default_rng([spec.seed, 1])
        big = max(self.width_um, self.height_um)
        self._tissue = _SmoothField(rng, self.width_um, self.height_um, big / 96.0, 4.0)
        self._tumour = _SmoothField(rng, self.width_um, self.height_um, 20.0, 5.0)
        self._fat = _SmoothField(rng, self.width_um, self.height_um, 20.0, 3.0)
        self._angle = _SmoothField(rng, self.width_um, self.height_um, 40.0, 3.0)
        self.truth_step_px = self._truth_step(spec)
        self.stain_matrix, self.dab_scale = self._staining(rng)
        self._thr_tumour, self._thr_fat = thresholds if thresholds is not None else self._calibrate()
        self.pen = self._pen_strokes(np.random.default_rng([spec.seed, 9]))
        self.blur = self._blur_patches(np.random.default_rng([spec.seed, 10]))
        self.fold = self._folds(np.random.default_rng([spec.seed, 11]))
        self.bubble = self._bubbles(np.random.default_rng([spec.seed, 12]))
        self.overexposure = self._discs(np.random.default_rng([spec.seed, 13]), spec.overexposed, (0.1, 0.18))
        self.debris = self._debris(np.random.default_rng([spec.seed, 14]))

    @property
    def thresholds(self) -> tuple[float, float]:
        """Field thresholds for tumour and fat found by calibration."""
        return self._thr_tumour, self._thr_fat

    # -- compartments ----------------------------------------------------
    @staticmethod
    def _truth_step(spec: SynthSpec) -> int:
        step = 4
        while max(spec.width, spec.height) / step > 4096:
            step *= 2
        return step

    def _tissue_value(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        ex = (x_um - self.width_um / 2) / (0.46 * self.width_um)
        ey = (y_um - self.height_um / 2) / (0.46 * self.height_um)
        return 1.2 * (1.0 - ex * ex - ey * ey) + 0.35 * self._tissue.sample(x_um, y_um)

    def _truth_rows(self, chunk: int = 256) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Centres (µm) of the truth-grid pixels, as meshes of ``chunk`` rows."""
        s = self.truth_step_px
        nx, ny = math.ceil(self.spec.width / s), math.ceil(self.spec.height / s)
        xs = (np.arange(nx) + 0.5) * s * self.spec.mpp
        for r0 in range(0, ny, chunk):
            ys = (np.arange(r0, min(ny, r0 + chunk)) + 0.5) * s * self.spec.mpp
            yield np.meshgrid(xs, ys)

    def _on_truth_grid(self, at: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
        """``at(x_um, y_um)`` over the whole truth grid, a chunk of rows at a time."""
        return np.concatenate([at(xx, yy) for xx, yy in self._truth_rows()], axis=0)

    def _calibrate(self) -> tuple[float, float]:
        # Only the field values of tissue points are kept (float32), row chunk by chunk.
        tumour_values = []
        for xx, yy in self._truth_rows():
            tissue = self._tissue_value(xx, yy) > 0
            tumour_values.append(self._tumour.sample(xx[tissue], yy[tissue]).astype(np.float32))
        tv = np.concatenate(tumour_values)
        if not tv.size:
            return math.inf, math.inf
        r, f = self.spec.tumour_fraction, self.spec.fat_fraction
        # tumour / (tissue - fat) = r with fat = f * (tissue - tumour)
        p = r * (1 - f) / (1 - r * f) if r < 1 else 1.0
        thr_t = float(np.quantile(tv, 1 - p)) if p > 0 else math.inf
        if f == 0 or not (tv <= thr_t).any():
            return thr_t, math.inf
        del tv
        fat_values = []
        for xx, yy in self._truth_rows():
            tissue = self._tissue_value(xx, yy) > 0
            xt, yt = xx[tissue], yy[tissue]
            rest = self._tumour.sample(xt, yt) <= thr_t
            fat_values.append(self._fat.sample(xt[rest], yt[rest]).astype(np.float32))
        return thr_t, float(np.quantile(np.concatenate(fat_values), 1 - f))

    def labels_at(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """Compartment label at each point."""
        out = np.zeros(np.shape(x_um), np.uint8)
        tissue = self._tissue_value(x_um, y_um) > 0
        if not tissue.any():
            return out
        xt, yt = x_um[tissue], y_um[tissue]
        lab = np.full(xt.shape, STROMA, np.uint8)
        tum = self._tumour.sample(xt, yt) > self._thr_tumour
        lab[tum] = TUMOUR
        if math.isfinite(self._thr_fat):
            rest = ~tum
            fat = self._fat.sample(xt[rest], yt[rest]) > self._thr_fat
            sub = lab[rest]
            sub[fat] = FAT
            lab[rest] = sub
        out[tissue] = lab
        return out

    # -- artefacts ------------------------------------------------------------
    def _bands(self, rng: np.random.Generator, count: int, half_width_um: tuple[float, float]) -> np.ndarray:
        """Straight bands as segments ``(x0, y0, x1, y1, half_width)`` in µm, over the slide's inner part."""
        bands = []
        for _ in range(count):
            cx, cy = rng.uniform(0.2, 0.8) * self.width_um, rng.uniform(0.2, 0.8) * self.height_um
            length = rng.uniform(0.15, 0.4) * min(self.width_um, self.height_um)
            angle = rng.uniform(0, np.pi)
            dx, dy = 0.5 * length * np.cos(angle), 0.5 * length * np.sin(angle)
            bands.append((cx - dx, cy - dy, cx + dx, cy + dy, rng.uniform(*half_width_um)))
        return np.asarray(bands, np.float64).reshape(-1, 5)

    @staticmethod
    def _band_density(bands: np.ndarray, x_um: np.ndarray, y_um: np.ndarray, edge_um: float) -> np.ndarray:
        """0–1 at the points: 1 inside a band, falling off over ``edge_um`` across its border."""
        out = np.zeros(np.shape(x_um))
        for x0, y0, x1, y1, half in bands:
            vx, vy = x1 - x0, y1 - y0
            t = np.clip(((x_um - x0) * vx + (y_um - y0) * vy) / (vx * vx + vy * vy), 0.0, 1.0)
            d = np.hypot(x_um - (x0 + t * vx), y_um - (y0 + t * vy))
            out = np.maximum(out, np.clip((half - d) / edge_um + 0.5, 0.0, 1.0))
        return out

    def _pen_strokes(self, rng: np.random.Generator) -> np.ndarray:
        """Marker strokes (:meth:`_bands`, 15–30 µm half-width)."""
        return self._bands(rng, self.spec.pen_strokes, (15.0, 30.0))

    def ink_at(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """Marker ink density (0–1) at the points: 1 inside a stroke, falling off over 3 µm."""
        return self._band_density(self.pen, x_um, y_um, 3.0)

    def _folds(self, rng: np.random.Generator) -> np.ndarray:
        """Folds (:meth:`_bands`, 40–90 µm half-width: the section turned over onto itself)."""
        return self._bands(rng, self.spec.folds, (40.0, 90.0))

    def fold_at(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """Extra layers of tissue (0–1) at the points: 1 inside a fold, its crease 2 µm wide."""
        return self._band_density(self.fold, x_um, y_um, 2.0)

    def _bubbles(self, rng: np.random.Generator) -> np.ndarray:
        """Air bubbles ``(x, y, radius)`` in µm, radius 60–200 µm, over the slide's inner part."""
        return np.asarray(
            [
                (rng.uniform(0.2, 0.8) * self.width_um, rng.uniform(0.2, 0.8) * self.height_um, rng.uniform(60, 200))
                for _ in range(self.spec.bubbles)
            ],
            np.float64,
        ).reshape(-1, 3)

    def bubble_at(self, x_um: np.ndarray, y_um: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """At the points: inside a bubble (bool) and the darkness of its rim (0–1; 1 on the rim's
        middle, a 6 µm wide line where the light is refracted away)."""
        inside = np.zeros(np.shape(x_um), bool)
        rim = np.zeros(np.shape(x_um))
        for cx, cy, r in self.bubble:
            d = np.hypot(x_um - cx, y_um - cy)
            inside |= d <= r
            rim = np.maximum(rim, np.clip(1.0 - np.abs(d - r) / 3.0, 0.0, 1.0))
        return inside, rim

    def truth_bubble(self) -> np.ndarray:
        """Bubbles, rim included, on the truth grid."""

        def covered(xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
            inside, rim = self.bubble_at(xx, yy)
            return inside | (rim > 0)

        return self._on_truth_grid(covered)

    def _discs(self, rng: np.random.Generator, count: int, radius: tuple[float, float]) -> np.ndarray:
        """Discs ``(x, y, radius)`` in µm over the slide's inner part, radius a share of its shorter side."""
        side = min(self.width_um, self.height_um)
        return np.asarray(
            [
                (
                    rng.uniform(0.2, 0.8) * self.width_um,
                    rng.uniform(0.2, 0.8) * self.height_um,
                    rng.uniform(*radius) * side,
                )
                for _ in range(count)
            ],
            np.float64,
        ).reshape(-1, 3)

    @staticmethod
    def _in_discs(discs: np.ndarray, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """Whether the points lie in any of the ``discs`` ``(x, y, radius)``."""
        out = np.zeros(np.shape(x_um), bool)
        for cx, cy, r in discs:
            out |= np.hypot(x_um - cx, y_um - cy) <= r
        return out

    def overexposed_at(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """Whether the points lie in an over-exposed disc."""
        return self._in_discs(self.overexposure, x_um, y_um)

    def truth_overexposed(self) -> np.ndarray:
        """Over-exposed discs on the truth grid."""
        return self._on_truth_grid(self.overexposed_at)

    def _debris(self, rng: np.random.Generator) -> np.ndarray:
        """Particles ``(x, y, radius, od, a2, p2, a3, p3)``: centre and mean radius in µm over the
        slide's inner part, grey OD, and the amplitude (share of the radius) and phase of a second
        and third angular harmonic of the outline (irregular, never star-shaped)."""
        rows = []
        for _ in range(self.spec.debris):
            x, y = rng.uniform(0.2, 0.8) * self.width_um, rng.uniform(0.2, 0.8) * self.height_um
            radius, od = rng.uniform(15.0, 50.0), rng.uniform(0.6, 0.9)
            harmonics = rng.uniform(0, 0.2), rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.1), rng.uniform(0, 2 * np.pi)
            rows.append((x, y, radius, od, *harmonics))
        return np.asarray(rows, np.float64).reshape(-1, 8)

    def debris_at(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """Grey optical density of the debris at the points (0 where there is none; edges soft
        over 1 µm)."""
        out = np.zeros(np.shape(x_um))
        for cx, cy, r, od, a2, p2, a3, p3 in self.debris:
            dx, dy = x_um - cx, y_um - cy
            theta = np.arctan2(dy, dx)
            radius = r * (1.0 + a2 * np.cos(2 * theta + p2) + a3 * np.cos(3 * theta + p3))
            out = np.maximum(out, od * np.clip(radius - np.hypot(dx, dy) + 0.5, 0.0, 1.0))
        return out

    def truth_debris(self) -> np.ndarray:
        """Debris (grey OD 0.3 and more: the particles' outlines) on the truth grid."""
        return self._on_truth_grid(lambda xx, yy: self.debris_at(xx, yy) >= 0.3)

    def truth_fold(self) -> np.ndarray:
        """Where the section lies twice (fold ≥ 0.5) on the truth grid; tissue or not."""
        return self._on_truth_grid(lambda xx, yy: self.fold_at(xx, yy) >= 0.5)

    def _blur_patches(self, rng: np.random.Generator) -> np.ndarray:
        """Out-of-focus discs (:meth:`_discs`, radius 0.12–0.2 of the shorter side)."""
        return self._discs(rng, self.spec.blur_patches, (0.12, 0.2))

    def blur_at(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """Whether the points lie in an out-of-focus patch."""
        return self._in_discs(self.blur, x_um, y_um)

    def truth_blur(self) -> np.ndarray:
        """Out-of-focus patches on the truth grid."""
        return self._on_truth_grid(self.blur_at)

    def truth_ink(self) -> np.ndarray:
        """Where marker ink covers the slide (ink density ≥ 0.5) on the truth grid."""
        return self._on_truth_grid(lambda xx, yy: self.ink_at(xx, yy) >= 0.5)

    def truth_labels(self) -> np.ndarray:
        """Compartment labels on the truth grid (``truth_step_px`` level-0 px per pixel)."""
        return self._on_truth_grid(self.labels_at)

    def stroma_angle(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        return np.pi * self._angle.sample(x_um, y_um)

    # -- staining ---------------------------------------------------------
    def _staining(self, rng: np.random.Generator) -> tuple[np.ndarray, float]:
        from pipeline.stains import StainMatrix, unit

        base = StainMatrix()
        vectors = []
        for stain in (base.hematoxylin, base.dab):
            v = unit(stain)
            if self.spec.stain_jitter_deg > 0:
                axis = unit(rng.standard_normal(3))
                angle = math.radians(rng.uniform(-1, 1) * self.spec.stain_jitter_deg)
                # Rodrigues rotation of the OD direction.
                v = (
                    v * math.cos(angle)
                    + np.cross(axis, v) * math.sin(angle)
                    + axis * float(axis @ v) * (1 - math.cos(angle))
                )
                v = unit(np.abs(v))
            vectors.append(v)
        scale = 1.0 + rng.uniform(-1, 1) * self.spec.dab_scale_jitter
        return np.stack(vectors), float(scale)

    # -- cells -------------------------------------------------------------
    @lru_cache(maxsize=256)  # noqa: B019 - the model lives for one slide
    def block_cells(self, bx: int, by: int) -> dict[str, np.ndarray]:
        """The cells whose centres fall in block ``(bx, by)``."""
        spec = self.spec
        # SeedSequence wants non-negative entries; margin blocks can be at -1.
        rng = np.random.default_rng([spec.seed, 2, bx + (1 << 20), by + (1 << 20)])
        x0, y0 = bx * BLOCK_UM, by * BLOCK_UM
        # Tumour: jittered hexagonal lattice, kept where the centre is tumour.
        s = TUMOUR_SPACING_UM
        dy = s * math.sqrt(3) / 2
        rows = np.arange(math.ceil(y0 / dy), math.ceil((y0 + BLOCK_UM) / dy))
        tx: list[np.ndarray] = []
        ty: list[np.ndarray] = []
        for j in rows:
            off = (j % 2) * s / 2
            cols = np.arange(math.ceil((x0 - off) / s), math.ceil((x0 + BLOCK_UM - off) / s))
            tx.append(cols * s + off)
            ty.append(np.full(cols.shape, j * dy))
        txa = np.concatenate(tx) if tx else np.empty(0)
        tya = np.concatenate(ty) if ty else np.empty(0)
        txa = txa + rng.uniform(-1.5, 1.5, txa.shape)
        tya = tya + rng.uniform(-1.5, 1.5, tya.shape)
        keep = (self.labels_at(txa, tya) == TUMOUR) & (rng.random(txa.shape) > 0.03)
        txa, tya = txa[keep], tya[keep]
        # Stroma: sparse dart throwing, away from tumour.
        n_try = rng.poisson(BLOCK_UM * BLOCK_UM / 500.0)
        cand = rng.uniform(0, BLOCK_UM, (n_try, 2)) + np.array([x0, y0])
        sx: list[float] = []
        sy: list[float] = []
        for cx, cy in cand:
            if all((cx - px) ** 2 + (cy - py) ** 2 > 12.0**2 for px, py in zip(sx, sy, strict=True)):
                sx.append(cx)
                sy.append(cy)
        sxa, sya = np.asarray(sx), np.asarray(sy)
        if sxa.size:
            ok = self.labels_at(sxa, sya) == STROMA
            for ddx, ddy in ((9, 0), (-9, 0), (0, 9), (0, -9)):
                ok &= self.labels_at(sxa + ddx, sya + ddy) != TUMOUR
            sxa, sya = sxa[ok], sya[ok]
        nt, ns = txa.size, sxa.size
        a = np.concatenate([rng.uniform(3.6, 5.0, nt), rng.uniform(4.5, 7.0, ns)])
        b = np.concatenate([a[:nt] * rng.uniform(0.75, 1.0, nt), rng.uniform(1.4, 2.2, ns)])
        theta = np.concatenate([rng.uniform(0, np.pi, nt), self.stroma_angle(sxa, sya) + rng.normal(0, 0.2, ns)])
        comp = np.concatenate([np.full(nt, TUMOUR, np.uint8), np.full(ns, STROMA, np.uint8)])
        drawn = np.concatenate(
            [
                rng.choice(4, nt, p=np.asarray(spec.tumour_classes)),
                rng.choice(4, ns, p=np.asarray(spec.stroma_classes)),
            ]
        ).astype(np.int64)
        bands = np.asarray(CONTIGUOUS_DAB_BANDS if spec.continuous_dab else CLASS_DAB_BANDS, dtype=np.float64)
        bands[3, 1] = spec.strong_dab_od
        dab = rng.uniform(bands[drawn, 0], bands[drawn, 1]) * self.dab_scale
        h_od = np.concatenate([rng.uniform(0.45, 0.75, nt), rng.uniform(0.55, 0.85, ns)]) * spec.counterstain_scale
        if spec.localisation == "nuclear" and spec.dab_masks_hematoxylin > 0:
            h_od *= 1.0 - spec.dab_masks_hematoxylin * np.minimum(dab / 0.8, 1.0)
        return {
            "x_um": np.concatenate([txa, sxa]),
            "y_um": np.concatenate([tya, sya]),
            "a_um": a,
            "b_um": b,
            "theta": theta,
            "h_od": h_od,
            "expand_um": np.concatenate([np.full(nt, 3.5), np.full(ns, 1.2)]),
            "dab_od": dab,
            "compartment": comp,
            "intensity_class": np.digitize(dab, CLASS_CUTS).astype(np.uint8),
        }

    def cells_in(self, x0_um: float, y0_um: float, x1_um: float, y1_um: float) -> dict[str, np.ndarray]:
        """All cells with centres in the rectangle, from every block it touches."""
        parts = [
            self.block_cells(bx, by)
            for by in range(math.floor(y0_um / BLOCK_UM), math.floor(y1_um / BLOCK_UM) + 1)
            for bx in range(math.floor(x0_um / BLOCK_UM), math.floor(x1_um / BLOCK_UM) + 1)
        ]
        cells = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        inside = (cells["x_um"] >= x0_um) & (cells["x_um"] < x1_um) & (cells["y_um"] >= y0_um) & (cells["y_um"] < y1_um)
        return {k: v[inside] for k, v in cells.items()}

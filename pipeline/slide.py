"""The slide interface the pipeline depends on.

Backends (DICOM WSI, OME-TIFF, SVS, generic TIFF) live in :mod:`dicom_io` and
implement :class:`Slide`; nothing here imports a backend. A backend only has
to provide its levels and :meth:`Slide._read_level_region`; tiling at a
target µm/px, resampling and thumbnails are shared here.

Coordinates: ``x`` is the column, ``y`` the row; every size is ``(width,
height)`` and every array is ``(rows, columns, 3)`` uint8 RGB.

Colour management: a backend that finds an ICC profile in the slide sets
:attr:`Slide.icc_profile`; :meth:`Slide.manage_colour` then converts every
region read to sRGB with it (LittleCMS through Pillow), so the same tissue
scanned by two scanners reads alike. Off unless asked for
(``stain.icc_profile``): the stain vectors were chosen on unmanaged RGB.
"""

from __future__ import annotations

import io
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Self

import numpy as np
from PIL import Image, ImageCms

from config.errors import ConfigError, SlideReadError

#: Background value used outside the slide (bright-field glass is white).
BACKGROUND_RGB = 255


#: :meth:`Slide.analysis_mpp` rounds read scales to multiples of this.
SCALE_STEP = 1e-3

#: Pixel sizes in x and y closer than this (relative) are read as square pixels.
SQUARE_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Level:
    """One resolution level of a slide."""

    index: int
    width: int
    height: int
    mpp_x: float
    mpp_y: float
    tile_width: int
    tile_height: int
    compression: str

    @property
    def mpp(self) -> float:
        """Mean pixel size in µm/px (x and y differ only on odd scanners)."""
        return (self.mpp_x + self.mpp_y) / 2.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "width": self.width,
            "height": self.height,
            "mpp_x": self.mpp_x,
            "mpp_y": self.mpp_y,
            "tile_width": self.tile_width,
            "tile_height": self.tile_height,
            "compression": self.compression,
        }


@dataclass(frozen=True)
class Tile:
    """A tile of a slide resampled to the target µm/px.

    ``x``/``y`` are the top-left pixel of the tile's *core* in the target
    grid; ``pixels`` includes ``margin`` extra pixels on each side (filled
    with white outside the slide), so a detector can see cells across the
    seam and keep only those whose centre falls inside the core.
    """

    x: int
    y: int
    width: int
    height: int
    margin: int
    mpp: float
    level: int
    pixels: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class TileGrid:
    """The grid of tiles covering a slide at a target µm/px."""

    mpp: float
    width: int
    height: int
    tile_size: int

    @property
    def columns(self) -> int:
        return math.ceil(self.width / self.tile_size)

    @property
    def rows(self) -> int:
        return math.ceil(self.height / self.tile_size)

    def __len__(self) -> int:
        return self.columns * self.rows

    def cores(self) -> Iterator[tuple[int, int, int, int]]:
        """Yield ``(x, y, width, height)`` of every tile core, row by row."""
        for row in range(self.rows):
            y = row * self.tile_size
            h = min(self.tile_size, self.height - y)
            for col in range(self.columns):
                x = col * self.tile_size
                yield x, y, min(self.tile_size, self.width - x), h


class Slide(ABC):
    """A bright-field whole-slide image: levels, regions, tiles, metadata."""

    #: Short format name, e.g. ``"dicom"``, ``"ome-tiff"``, ``"svs"``, ``"tiff"``.
    format: str = "unknown"
    #: The slide's ICC profile, where it has one (set by the backend).
    icc_profile: bytes | None = None
    _colour: Any = None  # the ICC → sRGB transform, while colour management is on

    def __init__(self, path: str | Path, levels: list[Level], metadata: dict[str, Any]):
        if not levels:
            raise ValueError("a slide needs at least one level")
        self.path = Path(path)
        ordered = sorted(levels, key=lambda lv: lv.width, reverse=True)
        self.levels: tuple[Level, ...] = tuple(replace(lv, index=i) for i, lv in enumerate(ordered))
        self.metadata = metadata

    # -- backend hook ---------------------------------------------------
    @abstractmethod
    def _read_level_region(self, level: Level, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Read a region that lies fully inside ``level`` as ``(h, w, 3)`` uint8,
        a new array the caller may keep and modify."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release file handles."""

    def manage_colour(self, enabled: bool) -> bool:
        """Convert every region read from now on from the slide's ICC profile to sRGB (or stop).
        Returns whether regions are converted: False when off or the slide has no profile."""
        self._colour = None
        if not enabled or not self.icc_profile:
            return False
        try:
            profile = ImageCms.ImageCmsProfile(io.BytesIO(self.icc_profile))
            self._colour = ImageCms.buildTransform(
                profile, ImageCms.createProfile("sRGB"), "RGB", "RGB", ImageCms.Intent.PERCEPTUAL
            )
        except (OSError, ImageCms.PyCMSError) as exc:
            raise SlideReadError(self.path, f"its ICC profile cannot be used: {exc}") from exc
        return True

    # -- shared behaviour -----------------------------------------------
    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def mpp(self) -> float:
        """µm/px of the finest level."""
        return self.levels[0].mpp

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` of the finest level."""
        return self.levels[0].width, self.levels[0].height

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Read ``(height, width, 3)`` pixels at ``level``; outside the slide is white."""
        if width <= 0 or height <= 0:
            raise ConfigError("region", (x, y, width, height), "width and height must be positive")
        lv = self.levels[level]
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, lv.width), min(y + height, lv.height)
        if (x0, y0, x1, y1) == (x, y, x + width, y + height):  # inside: no white frame to add
            return self._managed(self._read_level_region(lv, x, y, width, height))
        out = np.full((height, width, 3), BACKGROUND_RGB, dtype=np.uint8)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._managed(self._read_level_region(lv, x0, y0, x1 - x0, y1 - y0))
        return out

    def _managed(self, pixels: np.ndarray) -> np.ndarray:
        if self._colour is None:
            return pixels
        return np.asarray(ImageCms.applyTransform(Image.fromarray(pixels), self._colour))

    def level_for_mpp(self, target_mpp: float) -> int:
        """Index of the coarsest level at or finer than ``target_mpp``.

        Falls back to the finest level when every level is coarser than the
        target (the tile is then upsampled).
        """
        if not target_mpp > 0:
            raise ConfigError("target_mpp", target_mpp, "must be a positive number of µm/px")
        best = 0
        for i, lv in enumerate(self.levels):
            if lv.mpp <= target_mpp * 1.001:
                best = i
        return best

    def analysis_mpp(self, target_mpp: float) -> float:
        """The pixel size to analyse at when ``target_mpp`` is requested: the read scale from the
        level it is read from (:meth:`level_for_mpp`) rounded to a multiple of 1/1000, at most 0.05 %
        from the request. Copies of one slide whose headers round the pixel size differently (an
        SVS keeps four decimals, a DICOM file sixteen characters) are then read into identical
        pixels, so they give identical cells."""
        lv = self.levels[self.level_for_mpp(target_mpp)]
        steps = round(target_mpp / lv.mpp_x / SCALE_STEP)
        return lv.mpp_x * steps * SCALE_STEP if steps > 0 else target_mpp

    def grid(self, target_mpp: float, tile_size: int = 512) -> TileGrid:
        """The tile grid that covers the slide at ``target_mpp``."""
        if tile_size < 16:
            raise ConfigError("tile_size", tile_size, "must be at least 16 pixels")
        lv0 = self.levels[0]
        return TileGrid(
            mpp=target_mpp,
            width=max(1, round(lv0.width * lv0.mpp_x / target_mpp)),
            height=max(1, round(lv0.height * _mpp_y(lv0) / target_mpp)),
            tile_size=tile_size,
        )

    def read_at_mpp(self, target_mpp: float, x: int, y: int, width: int, height: int) -> tuple[np.ndarray, int]:
        """Read a region given in the pixel grid of ``target_mpp``.

        Reads from the nearest level at or finer than the target and
        resamples with an area filter, using the exact (sub-pixel) source
        box so tiles from neighbouring calls line up. Returns the pixels and
        the level index used.
        """
        index = self.level_for_mpp(target_mpp)
        lv = self.levels[index]
        sx, sy = target_mpp / lv.mpp_x, target_mpp / _mpp_y(lv)
        fx0, fy0 = x * sx, y * sy
        fx1, fy1 = (x + width) * sx, (y + height) * sy
        ix0, iy0 = math.floor(fx0), math.floor(fy0)
        ix1, iy1 = math.ceil(fx1), math.ceil(fy1)
        src = self.read_region(index, ix0, iy0, ix1 - ix0, iy1 - iy0)
        exact = ix1 - ix0 == width and iy1 - iy0 == height and fx0 == ix0 and fy0 == iy0
        if exact:
            return src, index
        box = (fx0 - ix0, fy0 - iy0, fx1 - ix0, fy1 - iy0)
        downsampling = sx >= 1.0 and sy >= 1.0
        method = Image.Resampling.BOX if downsampling else Image.Resampling.BILINEAR
        img = Image.fromarray(src).resize((width, height), method, box=box)
        return np.asarray(img), index

    def iter_tiles(self, target_mpp: float, tile_size: int = 512, margin: int = 0) -> Iterator[Tile]:
        """Yield every tile of the grid at ``target_mpp``, row by row."""
        if margin < 0:
            raise ConfigError("margin", margin, "must be zero or positive")
        grid = self.grid(target_mpp, tile_size)
        for x, y, w, h in grid.cores():
            pixels, index = self.read_at_mpp(target_mpp, x - margin, y - margin, w + 2 * margin, h + 2 * margin)
            yield Tile(x=x, y=y, width=w, height=h, margin=margin, mpp=target_mpp, level=index, pixels=pixels)

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """The whole slide scaled so its longer side is at most ``max_size``."""
        lv0 = self.levels[0]
        phys_w, phys_h = lv0.width * lv0.mpp_x, lv0.height * lv0.mpp_y
        target = max(phys_w, phys_h) / max_size
        grid = self.grid(target, tile_size=max_size)
        pixels, _ = self.read_at_mpp(target, 0, 0, grid.width, grid.height)
        return pixels

    def describe(self) -> dict[str, Any]:
        """A JSON-ready description: format, levels and identifying metadata."""
        return {
            "path": str(self.path),
            "format": self.format,
            "width": self.levels[0].width,
            "height": self.levels[0].height,
            "mpp": self.levels[0].mpp,
            "levels": [lv.to_dict() for lv in self.levels],
            "icc_profile": self.icc_profile is not None,
            "metadata": self.metadata,
        }


def _mpp_y(level: Level) -> float:
    """The level's y pixel size, or its x pixel size where the two differ by less than
    :data:`SQUARE_TOLERANCE` (a header's rounding, not a scanner's anisotropy)."""
    return level.mpp_x if abs(level.mpp_y / level.mpp_x - 1.0) < SQUARE_TOLERANCE else level.mpp_y

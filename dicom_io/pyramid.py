"""Streamed image pyramids of JPEG tiles, shared by every slide writer.

Level-0 pixels arrive as horizontal bands (one tile row at a time); each band
is cut into tiles, JPEG-encoded once and appended to a per-level tile file on
disk, and halved (2×2 mean) into the next level, which accumulates half-bands
until it has a full tile row. Memory holds at most one band per level, so a
40k×40k slide is never whole in memory. The DICOM, OME-TIFF and SVS writers
then copy the same encoded tiles into their containers without re-encoding,
so the three formats carry identical pixels.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import imagecodecs
import numpy as np

from config.errors import ConfigError

#: JPEG chroma subsampling used for every tile: 4:2:2, which DICOM names
#: YBR_FULL_422 and TIFF declares as YCbCrSubSampling (2, 1).
JPEG_SUBSAMPLING = "422"


@dataclass
class EncodedLevel:
    """One pyramid level: tile geometry and where each encoded tile lies."""

    width: int
    height: int
    tile_size: int
    mpp: float
    path: Path
    offsets: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    #: DICOM Photometric Interpretation of the JPEG tiles (what their streams hold).
    photometric: str = "YBR_FULL_422"

    @property
    def columns(self) -> int:
        return math.ceil(self.width / self.tile_size)

    @property
    def rows(self) -> int:
        return math.ceil(self.height / self.tile_size)

    @property
    def nbytes(self) -> int:
        return sum(self.lengths)

    def read_tile(self, col: int, row: int) -> bytes:
        """The encoded JPEG of tile ``(col, row)``."""
        i = row * self.columns + col
        with self.path.open("rb") as fh:
            fh.seek(self.offsets[i])
            return fh.read(self.lengths[i])

    def iter_tiles(self) -> Iterator[bytes]:
        """Every encoded tile in row-major order, read lazily from disk."""
        with self.path.open("rb") as fh:
            for off, n in zip(self.offsets, self.lengths, strict=True):
                fh.seek(off)
                yield fh.read(n)


class _LevelWriter:
    def __init__(
        self,
        width: int,
        height: int,
        tile: int,
        mpp: float,
        path: Path,
        quality: int,
        given: EncodedLevel | None = None,
    ):
        """``given``: the level's tiles are already encoded (the source's own); rows only pass through."""
        self.level = given or EncodedLevel(width, height, tile, mpp, path)
        self.quality = quality
        self._fh = None if given is not None else path.open("wb")
        self._pos = 0
        self.rows_done = 0
        self._pending: list[np.ndarray] = []
        self._pending_rows = 0

    def add_rows(self, rows: np.ndarray) -> list[np.ndarray]:
        """Buffer rows and encode every complete tile row (the last may be short).

        Returns the encoded bands so the caller can halve them into the next level.
        """
        if rows.shape[0]:
            self._pending.append(rows)
            self._pending_rows += rows.shape[0]
        bands: list[np.ndarray] = []
        t, height = self.level.tile_size, self.level.height
        while self.rows_done < height:
            need = min(t, height - self.rows_done)
            if self._pending_rows < need:
                break
            band = np.concatenate(self._pending, axis=0) if len(self._pending) > 1 else self._pending[0]
            out, rest = band[:need], band[need:]
            self._pending = [rest] if rest.shape[0] else []
            self._pending_rows = rest.shape[0]
            self._encode_band(out)
            self.rows_done += need
            bands.append(out)
        return bands

    def _encode_band(self, band: np.ndarray) -> None:
        if self._fh is None:
            return
        t = self.level.tile_size
        h = band.shape[0]
        for col in range(self.level.columns):
            tile = band[:, col * t : (col + 1) * t]
            if tile.shape[0] != t or tile.shape[1] != t:
                padded = np.full((t, t, 3), 255, dtype=np.uint8)
                padded[:h, : tile.shape[1]] = tile
                tile = padded
            data = imagecodecs.jpeg8_encode(
                np.ascontiguousarray(tile), level=self.quality, subsampling=JPEG_SUBSAMPLING
            )
            self._fh.write(data)
            self.level.offsets.append(self._pos)
            self.level.lengths.append(len(data))
            self._pos += len(data)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


def halve(band: np.ndarray) -> np.ndarray:
    """2×2 mean downsample; an odd last row/column is averaged with itself."""
    h, w = band.shape[:2]
    if h % 2 or w % 2:
        band = np.pad(band, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    b = band.astype(np.uint16)
    s = b[0::2, 0::2] + b[1::2, 0::2] + b[0::2, 1::2] + b[1::2, 1::2]
    return ((s + 2) // 4).astype(np.uint8)


class PyramidBuilder:
    """Build an :class:`EncodedLevel` pyramid from level-0 bands given in order.

    Levels halve until the whole image fits in one tile. With ``base`` (level 0
    as the source's own encoded tiles, of ``tile_size``), level 0 is not
    encoded again: its bands only feed the levels below.
    """

    def __init__(
        self,
        width: int,
        height: int,
        mpp: float,
        workdir: Path,
        tile_size: int = 512,
        quality: int = 90,
        min_size: int | None = None,
        base: EncodedLevel | None = None,
    ):
        if tile_size % 16:
            raise ConfigError("tile_size", tile_size, "must be a multiple of 16 (JPEG blocks)")
        if not 1 <= quality <= 100:
            raise ConfigError("jpeg_quality", quality, "must be between 1 and 100")
        self.width, self.height = width, height
        self._writers: list[_LevelWriter] = []
        floor = min_size or tile_size
        w, h, m, i = width, height, mpp, 0
        workdir.mkdir(parents=True, exist_ok=True)
        if base is not None and (base.width, base.height, base.tile_size) != (width, height, tile_size):
            raise ValueError(f"base level {base.width}x{base.height} in {base.tile_size} px tiles does not match")
        while True:
            given = base if i == 0 else None
            self._writers.append(_LevelWriter(w, h, tile_size, m, workdir / f"level{i}.jpegs", quality, given))
            if max(w, h) <= floor:
                break
            w, h, m, i = math.ceil(w / 2), math.ceil(h / 2), m * 2, i + 1
        self._rows_in = 0

    def add_band(self, band: np.ndarray) -> None:
        """Append the next rows of level 0 (full width, any height)."""
        if band.shape[1] != self.width or band.ndim != 3 or band.shape[2] != 3:
            raise ValueError(f"band of shape {band.shape} does not match width {self.width}")
        self._rows_in += band.shape[0]
        self._push(0, band)

    def _push(self, index: int, rows: np.ndarray) -> None:
        for band in self._writers[index].add_rows(rows):
            if index + 1 < len(self._writers):
                self._push(index + 1, halve(band))

    def finish(self) -> list[EncodedLevel]:
        """Close the tile files and return the levels, finest first."""
        if self._rows_in != self.height:
            raise ValueError(f"got {self._rows_in} rows, expected {self.height}")
        for w in self._writers:
            w.close()
            if w.rows_done != w.level.height:
                raise RuntimeError(f"pyramid level {w.level.width}x{w.level.height} incomplete")
        return [w.level for w in self._writers]

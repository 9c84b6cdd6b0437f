"""The slide interface: regions, nearest-level choice, tiling at a target µm/px."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from adapter.synth import SynthOutput
from config.errors import ConfigError
from dicom_io import open_slide
from pipeline.slide import Level, Slide


class ArraySlide(Slide):
    """An in-memory slide: one array per level (the tests' backend)."""

    format = "array"

    def __init__(self, levels: list[np.ndarray], mpp: float):
        self._arrays = levels
        lvls = [
            Level(
                i,
                a.shape[1],
                a.shape[0],
                mpp * levels[0].shape[1] / a.shape[1],
                mpp * levels[0].shape[0] / a.shape[0],
                64,
                64,
                "none",
            )
            for i, a in enumerate(levels)
        ]
        super().__init__(Path("memory"), lvls, {})

    def _read_level_region(self, level: Level, x: int, y: int, width: int, height: int) -> np.ndarray:
        return self._arrays[level.index][y : y + height, x : x + width].copy()


def _ramp(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([(xx % 256), (yy % 256), ((xx + yy) % 256)], axis=-1).astype(np.uint8)


def test_read_region_outside_is_white() -> None:
    s = ArraySlide([_ramp(100, 120)], 0.5)
    r = s.read_region(0, -10, -5, 30, 20)
    assert (r[:5] == 255).all() and (r[:, :10] == 255).all()
    assert np.array_equal(r[5:, 10:], _ramp(100, 120)[0:15, 0:20])
    with pytest.raises(ConfigError, match="region"):
        s.read_region(0, 0, 0, 0, 10)


def test_level_for_mpp_picks_coarsest_at_or_finer() -> None:
    base = _ramp(256, 256)
    s = ArraySlide([base, base[::2, ::2], base[::4, ::4]], 0.25)
    assert s.level_for_mpp(0.25) == 0
    assert s.level_for_mpp(0.5) == 1
    assert s.level_for_mpp(0.9) == 1
    assert s.level_for_mpp(1.0) == 2
    assert s.level_for_mpp(0.1) == 0  # finer than any level: upsample the finest
    with pytest.raises(ConfigError, match="target_mpp"):
        s.level_for_mpp(0)


def test_exact_level_read_needs_no_resampling() -> None:
    base = _ramp(256, 256)
    s = ArraySlide([base, np.ascontiguousarray(base[::2, ::2])], 0.25)
    pixels, level = s.read_at_mpp(0.5, 10, 20, 30, 40)
    assert level == 1
    assert np.array_equal(pixels, base[::2, ::2][20:60, 10:40])


def test_resampling_is_an_area_mean() -> None:
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    s = ArraySlide([base], 0.5)
    pixels, level = s.read_at_mpp(1.0, 0, 0, 32, 32)
    expected = base.reshape(32, 2, 32, 2, 3).mean(axis=(1, 3))
    assert level == 0
    assert np.abs(pixels.astype(float) - expected).max() <= 1.0


def test_tiles_cover_the_grid_once_with_margins() -> None:
    s = ArraySlide([_ramp(300, 500)], 0.5)
    tiles = list(s.iter_tiles(1.0, tile_size=64, margin=8))
    grid = s.grid(1.0, 64)
    assert (grid.width, grid.height) == (250, 150)
    assert len(tiles) == grid.columns * grid.rows == 4 * 3
    covered = np.zeros((150, 250), int)
    for t in tiles:
        covered[t.y : t.y + t.height, t.x : t.x + t.width] += 1
        assert t.pixels.shape == (t.height + 16, t.width + 16, 3)
    assert (covered == 1).all()
    # The margin of an edge tile lies outside the slide: white.
    assert (tiles[0].pixels[:8] == 255).all()


def test_tiles_at_target_mpp_match_the_coarser_level(small_slide: SynthOutput) -> None:
    """Tiling at 1.0 µm/px reads level 1 of the generated slide exactly."""
    assert small_slide.ome_tiff
    with open_slide(small_slide.ome_tiff) as s:
        lv1 = s.read_region(1, 0, 0, s.levels[1].width, s.levels[1].height)
        for t in s.iter_tiles(1.0, tile_size=128):
            assert t.level == 1
            assert np.array_equal(t.pixels, lv1[t.y : t.y + t.height, t.x : t.x + t.width])


def test_thumbnail_keeps_aspect(small_slide: SynthOutput) -> None:
    assert small_slide.svs
    with open_slide(small_slide.svs) as s:
        thumb = s.thumbnail(100)
    assert thumb.shape == (76, 100, 3)

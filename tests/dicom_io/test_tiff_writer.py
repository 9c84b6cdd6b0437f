"""The lossless one-level OME-TIFF writer: what is written is read back pixel for pixel."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dicom_io import open_slide
from dicom_io.tiff_writer import write_rgb_ome_tiff


def test_an_rgb_image_round_trips_with_its_pixel_size(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (300, 520, 3), dtype=np.uint8)
    path = write_rgb_ome_tiff(pixels, 0.3461, tmp_path / "copy.ome.tif")
    with open_slide(path) as slide:
        level = slide.levels[0]
        assert (level.width, level.height) == (520, 300)
        assert level.mpp_x == level.mpp_y == 0.3461
        assert np.array_equal(slide.read_region(0, 0, 0, 520, 300), pixels)

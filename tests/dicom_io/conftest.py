"""Fixtures shared by the dicom_io tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import tifffile

from adapter.synth import SynthOutput
from config.settings import load_settings
from dicom_io import open_slide
from dicom_io.results import WrittenResults, write_results
from pipeline.analysis import SlideResult, analyse


@pytest.fixture(scope="session")
def dicom_results(
    small_slide: SynthOutput, tmp_path_factory: pytest.TempPathFactory
) -> tuple[SlideResult, WrittenResults]:
    assert small_slide.dicom_dir
    with open_slide(small_slide.dicom_dir) as slide:
        overrides = ["tiling.workers=1", "outputs.heatmap=true", "outputs.heatmap_seg=true"]
        result = analyse(slide, load_settings("ki67", overrides))
        written = write_results(result, slide, tmp_path_factory.mktemp("results"))
    return result, written


def write_jpeg_tiled_tiff(path: Path, tiles: Sequence[bytes], height: int, width: int, photometric: str) -> Path:
    """A one-level RGB TIFF at 0.5 µm/px whose 256² tiles are the given JPEG streams, as they are
    (row by row), tagged ``photometric``."""
    tifffile.imwrite(
        path,
        data=iter(tiles),
        shape=(height, width, 3),
        dtype=np.uint8,
        tile=(256, 256),
        photometric=photometric,
        compression=7,
        resolution=(1e4 / 0.5, 1e4 / 0.5),
        resolutionunit="CENTIMETER",
    )
    return path

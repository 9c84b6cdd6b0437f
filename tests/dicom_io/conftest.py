"""Fixtures shared by the dicom_io tests."""

from __future__ import annotations

import pytest

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
        result = analyse(slide, load_settings("ki67", ["tiling.workers=1", "outputs.heatmap=true"]))
        written = write_results(result, slide, tmp_path_factory.mktemp("results"))
    return result, written

"""Write → read → compare: the same pyramid as DICOM WSI, OME-TIFF and SVS."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from adapter.synth import SynthOutput
from dicom_io import open_slide
from dicom_io.pyramid import PyramidBuilder, halve
from tests.conftest import SMALL_SPEC, require_tool


def _formats(out: SynthOutput) -> list[Path]:
    assert out.dicom_dir and out.ome_tiff and out.svs
    return [out.dicom_dir, out.ome_tiff, out.svs]


def test_three_formats_have_same_levels_and_pixels(small_slide: SynthOutput) -> None:
    slides = [open_slide(p) for p in _formats(small_slide)]
    try:
        assert [s.format for s in slides] == ["dicom", "ome-tiff", "svs"]
        sizes = [[(lv.width, lv.height) for lv in s.levels] for s in slides]
        assert sizes[0] == sizes[1] == sizes[2] == [(1000, 760), (500, 380), (250, 190)]
        for index in range(3):
            lv = slides[0].levels[index]
            ref = slides[0].read_region(index, 0, 0, lv.width, lv.height)
            for other in slides[1:]:
                assert np.array_equal(ref, other.read_region(index, 0, 0, lv.width, lv.height))
    finally:
        for s in slides:
            s.close()


def test_mpp_right_at_every_level(small_slide: SynthOutput) -> None:
    for path in _formats(small_slide):
        with open_slide(path) as s:
            for i, lv in enumerate(s.levels):
                assert lv.mpp_x == pytest.approx(SMALL_SPEC.mpp * 2**i, rel=0.01), (path, i)
                assert lv.mpp_y == pytest.approx(SMALL_SPEC.mpp * 2**i, rel=0.01), (path, i)


def test_dicom_identifiers_round_trip(small_slide: SynthOutput) -> None:
    assert small_slide.dicom_dir
    with open_slide(small_slide.dicom_dir) as s:
        meta = s.metadata
    assert meta["patient"]["name"] == "Synthetic^Slide"
    assert meta["patient"]["id"] == "SYNTH-0001"
    assert meta["container_identifier"] == f"SYNTH-{SMALL_SPEC.seed}"
    assert meta["specimens"][0]["identifier"] == "SYNTH-SPECIMEN-1"
    assert meta["frame_of_reference_uid"] and meta["study_instance_uid"] and meta["series_instance_uid"]
    files = sorted(small_slide.dicom_dir.glob("*.dcm"))
    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    assert {ds.file_meta.TransferSyntaxUID for ds in datasets} == {pydicom.uid.JPEGBaseline8Bit}
    assert {ds.PhotometricInterpretation for ds in datasets} == {"YBR_FULL_422"}
    assert all("ICCProfile" in ds.OpticalPathSequence[0] for ds in datasets)


def test_dicom_wsi_passes_dciodvfy(small_slide: SynthOutput) -> None:
    tool = require_tool("dciodvfy")
    assert small_slide.dicom_dir
    for f in sorted(small_slide.dicom_dir.glob("*.dcm")):
        run = subprocess.run([tool, str(f)], capture_output=True, text=True, timeout=60)
        report = run.stdout + run.stderr
        problems = [line for line in report.splitlines() if line.startswith(("Error", "Warning"))]
        assert problems == [], f"{f.name}:\n{report}"


def test_ome_xml_physical_sizes(small_slide: SynthOutput) -> None:
    assert small_slide.ome_tiff
    with open_slide(small_slide.ome_tiff) as s:
        assert s.metadata["physical_size_x_um"] == pytest.approx(SMALL_SPEC.mpp)
        assert s.metadata["image_name"] == f"synthetic-{SMALL_SPEC.seed}"


def test_pyramid_builder_streams_any_band_height(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (333, 517, 3), dtype=np.uint8)
    b = PyramidBuilder(517, 333, 0.25, tmp_path, tile_size=128, quality=95)
    for y in range(0, 333, 37):
        b.add_band(img[y : y + 37])
    levels = b.finish()
    assert [(lv.width, lv.height) for lv in levels] == [(517, 333), (259, 167), (130, 84), (65, 42)]
    assert [lv.mpp for lv in levels] == [0.25, 0.5, 1.0, 2.0]
    assert [len(lv.offsets) for lv in levels] == [5 * 3, 3 * 2, 2, 1]


def test_pyramid_builder_rejects_wrong_row_count(tmp_path: Path) -> None:
    b = PyramidBuilder(64, 64, 0.5, tmp_path, tile_size=32)
    b.add_band(np.zeros((32, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="got 32 rows, expected 64"):
        b.finish()


def test_halve_is_a_2x2_mean() -> None:
    a = np.array([[[0, 0, 0], [4, 4, 4], [9, 9, 9]], [[8, 8, 8], [4, 4, 4], [9, 9, 9]]], np.uint8)
    h = halve(a)
    assert h.shape == (1, 2, 3)
    assert h[0, 0, 0] == 4 and h[0, 1, 0] == 9

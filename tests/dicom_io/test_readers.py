"""Readers on the real files in ../shared/data and on bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from adapter.synth import SynthOutput
from config.errors import ConfigError, SlideReadError
from dicom_io import open_slide
from dicom_io.wsi_reader import series_gaps
from tests.conftest import ct_image, shared_file


def test_ki67_ome_tiff() -> None:
    with open_slide(shared_file("OS-2-vsi.ome.tif")) as s:
        assert s.format == "ome-tiff"
        assert s.size == (1445, 1445)
        assert s.mpp == pytest.approx(0.3461, abs=1e-4)
        assert s.levels[0].compression == "JPEG"
        assert s.metadata["physical_size_x_um"] == pytest.approx(0.3461, abs=1e-4)
        region = s.read_region(0, 600, 600, 64, 64)
        assert region.shape == (64, 64, 3) and region.dtype == np.uint8
        # Real tissue, not a blank decode.
        assert region.std() > 5


def test_he_ome_tiff() -> None:
    with open_slide(shared_file("OS-1-detail.ome.tif")) as s:
        assert s.format == "ome-tiff"
        assert s.size == (1101, 1101)


def test_aperio_svs() -> None:
    with open_slide(shared_file("cmu_small_region.svs")) as s:
        assert s.format == "svs"
        assert s.size == (2220, 2967)
        assert s.mpp == pytest.approx(0.499)
        assert s.levels[0].tile_width == 240
        assert "Thumbnail" in s.metadata["associated_images"]
        assert s.read_region(0, 1000, 1000, 32, 32).std() > 1


def test_svs_without_mpp_is_refused_with_file_name() -> None:
    path = shared_file("tcga-cr-7395-01a-01-ts1.svs")
    with pytest.raises(SlideReadError, match=r"tcga-cr-7395.*no pixel size.*--mpp"):
        open_slide(path)


def test_svs_without_mpp_opens_with_caller_mpp_and_decodes_jpeg2000() -> None:
    with open_slide(shared_file("tcga-cr-7395-01a-01-ts1.svs"), mpp=0.25) as s:
        assert [(lv.width, lv.height) for lv in s.levels] == [(4443, 3567), (2221, 1783)]
        assert s.levels[0].mpp == 0.25
        assert s.levels[1].mpp_x == pytest.approx(0.25 * 4443 / 2221)
        assert "JP2000" in s.levels[0].compression
        assert s.read_region(1, 1000, 800, 64, 64).std() > 1


def test_generic_pyramidal_tiff_levels() -> None:
    with open_slide(shared_file("boxes.tiff"), mpp=1.0) as s:
        assert s.format == "tiff"
        assert [lv.width for lv in s.levels] == [300, 150, 75, 37]
        assert s.levels[2].mpp_x == pytest.approx(4.0)


@pytest.mark.parametrize("name", ["sm_image.dcm", "sm_image_jpegls.dcm"])
def test_dicom_edge_wsi(name: str) -> None:
    with open_slide(shared_file(f"dicom_edge/{name}")) as s:
        assert s.format == "dicom"
        assert s.size == (50, 50)
        assert s.mpp == pytest.approx(0.499)
        assert s.levels[0].tile_width == 10
        assert s.metadata["container_identifier"] == "S19-1_A_1_1"
        assert s.metadata["study_instance_uid"]


def test_jpegls_decodes_same_pixels_as_uncompressed() -> None:
    with (
        open_slide(shared_file("dicom_edge/sm_image.dcm")) as a,
        open_slide(shared_file("dicom_edge/sm_image_jpegls.dcm")) as b,
    ):
        assert np.array_equal(a.read_region(0, 0, 0, 50, 50), b.read_region(0, 0, 0, 50, 50))


def test_dicom_level_with_thumbnail_instance() -> None:
    files = [shared_file("dicom_edge/boxes_0.dcm"), shared_file("dicom_edge/boxes_1.dcm")]
    with open_slide(files) as s:
        assert len(s.levels) == 1  # the THUMBNAIL instance is not a pyramid level
        assert s.metadata["container_identifier"] == "SLIDE_1"
        assert "JPEG Baseline" in s.levels[0].compression


def test_folder_with_several_series_is_refused() -> None:
    folder = shared_file("dicom_edge")
    with pytest.raises(SlideReadError, match="WSI series"):
        open_slide(folder)


def test_corrupt_svs_is_refused() -> None:
    with pytest.raises(SlideReadError, match=r"broken\.svs"):
        open_slide(shared_file("bad/broken.svs"))


def test_truncated_tiff_is_refused(tmp_path: Path) -> None:
    src = shared_file("cmu_small_region.svs")
    cut = tmp_path / "cut.svs"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    with pytest.raises(SlideReadError, match=r"cut\.svs: .*(truncated|corrupt)"):
        open_slide(cut)


def test_ct_image_is_refused_with_reason(tmp_path: Path) -> None:
    path = ct_image(tmp_path / "ct.dcm")
    with pytest.raises(SlideReadError, match=r"ct\.dcm: not a VL Whole Slide Microscopy image: found CT Image Storage"):
        open_slide(path)


def test_missing_empty_and_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(SlideReadError, match="no such file"):
        open_slide(tmp_path / "nope.svs")
    empty = tmp_path / "empty.tif"
    empty.touch()
    with pytest.raises(SlideReadError, match=r"empty\.tif: file is empty"):
        open_slide(empty)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(SlideReadError, match="not a DICOM or TIFF file"):
        open_slide(text)
    with pytest.raises(ConfigError, match="mpp=-1"):
        open_slide(text, mpp=-1)


def test_truncated_dicom_is_refused(tmp_path: Path) -> None:
    src = shared_file("dicom_edge/sm_image.dcm")
    cut = tmp_path / "cut.dcm"
    shutil.copy(src, cut)
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    with pytest.raises(SlideReadError, match=r"cut\.dcm"), open_slide(cut) as s:
        s.read_region(0, 0, 0, 50, 50)


@pytest.mark.parametrize(
    ("name", "mpp"),
    [
        ("cmu_small_region.svs", None),
        ("tcga-cr-7395-01a-01-ts1.svs", 0.5),
        ("OS-2-vsi.ome.tif", None),
        ("boxes.tiff", 1.0),
    ],
)
def test_direct_tile_reads_equal_tifffile(name: str, mpp: float | None) -> None:
    import tifffile

    path = shared_file(name)
    with open_slide(path, mpp=mpp) as s, tifffile.TiffFile(path) as tf:
        for i, level in enumerate(s.levels[:2]):
            full = tf.series[0].levels[i].asarray()
            x, y = level.width // 3, level.height // 4
            w, h = min(300, level.width - x), min(200, level.height - y)
            assert np.array_equal(s.read_region(i, x, y, w, h), full[y : y + h, x : x + w, :3])


def _wsi_files(slide_dir: Path, dst: Path) -> list[tuple[Path, pydicom.Dataset]]:
    """Copies of a synthetic WSI series, largest level first, with their datasets."""
    dst.mkdir()
    out = []
    for src in slide_dir.glob("*.dcm"):
        ds = pydicom.dcmread(src)
        out.append((dst / src.name, ds))
    out.sort(key=lambda f: -int(f[1].TotalPixelMatrixColumns))
    return out


def test_series_gaps_concatenation_and_base_level(small_slide: SynthOutput, tmp_path: Path) -> None:
    assert small_slide.dicom_dir
    assert series_gaps(small_slide.dicom_dir.glob("*.dcm")) == []
    files = _wsi_files(small_slide.dicom_dir, tmp_path / "series")
    # The base level announced as part 1 of a 2-instance concatenation.
    (base, ds), *rest = files
    ds.ConcatenationUID = "1.2.3.99"
    ds.InConcatenationNumber = 1
    ds.InConcatenationTotalNumber = 2
    ds.save_as(base)
    gaps = series_gaps([base])
    assert gaps == ["concatenation 1.2.3.99 has 1 of 2 instances"]
    # Only the resampled levels arrived so far.
    for path, level in rest:
        level.ImageType = ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
        level.save_as(path)
    assert series_gaps([p for p, _ in rest]) == [f"{len(rest)} resampled (DERIVED) level(s) but no ORIGINAL base level"]
    # Non-WSI and unreadable files are the reader's business, not gaps.
    ct = tmp_path / "ct.dcm"
    ct_image(ct)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom")
    assert series_gaps([ct, junk]) == []


@pytest.mark.parametrize("kind", ["dicom", "ome", "svs"])
def test_a_region_read_is_the_callers_own_copy(small_slide: SynthOutput, kind: str) -> None:
    """Regions are returned without a copy into a white frame when they lie
    inside the slide: they must still be new arrays, not views of a decoded
    tile that a later read would see changed."""
    path = {"dicom": small_slide.dicom_dir, "ome": small_slide.ome_tiff, "svs": small_slide.svs}[kind]
    with open_slide(path) as s:
        first = s.read_region(0, 256, 256, 256, 256)  # exactly one source tile
        kept = first.copy()
        assert first.flags.writeable
        first[:] = 0
        assert np.array_equal(s.read_region(0, 256, 256, 256, 256), kept)
        framed = s.read_region(0, -8, -8, 64, 64)
        assert (framed[:8] == 255).all() and np.array_equal(framed[8:, 8:], s.read_region(0, 0, 0, 56, 56))

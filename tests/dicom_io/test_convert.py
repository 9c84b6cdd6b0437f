from __future__ import annotations

import json
from pathlib import Path

import imagecodecs
import numpy as np
import pydicom
import pytest
import tifffile

from adapter.synth import SynthOutput
from config.errors import ConfigError
from dicom_io import open_slide
from dicom_io.convert import convert_to_dicom, identity_from_sidecar
from tests.dicom_io.conftest import write_jpeg_tiled_tiff
from tests.icc import gamma_profile


def test_convert_with_sidecar_round_trip(small_slide: SynthOutput, tmp_path: Path) -> None:
    sidecar = tmp_path / "meta.json"
    sidecar.write_text(
        json.dumps({"patient_name": "Doe^Jane", "patient_id": "P123", "patient_birth_date": "1970-01-02"})
    )
    assert small_slide.svs
    with open_slide(small_slide.svs) as src:
        identity = identity_from_sidecar(sidecar, src)
        convert_to_dicom(src, tmp_path / "dcm", identity, tile_size=256, quality=95)
        original = src.read_region(0, 0, 0, *src.size)
        src_tile = src.levels[0].tile_width
    with open_slide(tmp_path / "dcm") as out:
        assert out.size == (1000, 760) and out.mpp == pytest.approx(0.5)
        assert out.metadata["patient"] == {"name": "Doe^Jane", "id": "P123", "birth_date": "19700102", "sex": "O"}
        converted = out.read_region(0, 0, 0, *out.size)
    # The SVS's own JPEG tiles were copied, in its own tile size: the very same pixels.
    assert np.array_equal(converted, original)
    level0 = max(
        (pydicom.dcmread(p, stop_before_pixels=True) for p in (tmp_path / "dcm").glob("*.dcm")),
        key=lambda ds: int(ds.TotalPixelMatrixColumns),
    )
    assert (level0.Columns, level0.PhotometricInterpretation) == (src_tile, "YBR_FULL_422")


def _smooth_image(height: int, width: int, seed: int) -> np.ndarray:
    """Tissue-like colours that vary smoothly (JPEG keeps them within a few levels)."""
    yy, xx = np.mgrid[:height, :width]
    base = np.stack(
        [170 + 40 * np.sin(xx / 37.0), 120 + 30 * np.cos(yy / 23.0), 150 + 20 * np.sin((xx + yy) / 51.0)], -1
    )
    noise = np.random.default_rng(seed).normal(0, 2, base.shape)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("photometric", ["rgb", "ycbcr"])
def test_convert_copies_jpeg_tiles_in_the_colour_model_they_hold(photometric: str, tmp_path: Path) -> None:
    """RGB JPEG tiles (Adobe marker, transform 0) become an RGB DICOM level; YCbCr tiles at full chroma
    resolution without a JFIF marker, tagged YCbCr, become YBR_FULL; the pixels stay the same."""
    img = _smooth_image(512, 768, 3)
    encode = {"colorspace": "RGB", "outcolorspace": "RGB"} if photometric == "rgb" else {"subsampling": "444"}
    tiles = []
    for y in range(0, 512, 256):
        for x in range(0, 768, 256):
            stream = imagecodecs.jpeg8_encode(img[y : y + 256, x : x + 256], level=95, **encode)
            if stream[2:4] == b"\xff\xe0":  # drop the JFIF marker: the TIFF tag says what the stream is
                stream = stream[:2] + stream[4 + int.from_bytes(stream[4:6], "big") :]
            tiles.append(stream)
    src = write_jpeg_tiled_tiff(tmp_path / "src.tif", tiles, 512, 768, photometric)
    with open_slide(src) as slide:
        original = slide.read_region(0, 0, 0, *slide.size)
        files = convert_to_dicom(slide, tmp_path / "dcm", identity_from_sidecar(None, slide))
    assert np.abs(original.astype(int) - img).mean() < 3.0  # decoded in the right colours
    with open_slide(tmp_path / "dcm") as out:
        assert not out.metadata.get("warnings")
        assert np.array_equal(out.read_region(0, 0, 0, *out.size), original)
    level0 = max(
        (pydicom.dcmread(p, stop_before_pixels=True) for p in files), key=lambda ds: int(ds.TotalPixelMatrixColumns)
    )
    assert level0.PhotometricInterpretation == ("RGB" if photometric == "rgb" else "YBR_FULL")
    assert level0.Columns == 256


def test_convert_encodes_a_level_that_is_not_jpeg(tmp_path: Path) -> None:
    img = _smooth_image(300, 400, 4)
    src = tmp_path / "src.tif"
    tifffile.imwrite(src, img, tile=(128, 128), compression="zlib", resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    with open_slide(src) as slide:
        convert_to_dicom(slide, tmp_path / "dcm", identity_from_sidecar(None, slide), tile_size=256, quality=95)
    with open_slide(tmp_path / "dcm") as out:
        converted = out.read_region(0, 0, 0, *out.size)
        assert out.levels[0].tile_width == 256
    assert 0 < np.abs(converted.astype(int) - img).mean() < 3.0  # encoded once as JPEG: close, not identical


def test_sidecar_errors_name_the_key(small_slide: SynthOutput, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"patient_nmae": "x"}))
    assert small_slide.svs
    with open_slide(small_slide.svs) as src:
        with pytest.raises(ConfigError, match=r"sidecar=.*unknown keys \['patient_nmae'\]"):
            identity_from_sidecar(bad, src)
        bad.write_text(json.dumps({"patient_birth_date": "1970-13-45"}))
        with pytest.raises(ConfigError, match=r"sidecar\.patient_birth_date='1970-13-45'"):
            identity_from_sidecar(bad, src)


def test_resampled_levels_say_so(small_slide: SynthOutput) -> None:
    """One ORIGINAL image per slide: every level resampled from it is DERIVED\\PRIMARY\\VOLUME\\RESAMPLED."""
    assert small_slide.dicom_dir
    levels = sorted(
        (pydicom.dcmread(p, stop_before_pixels=True) for p in small_slide.dicom_dir.glob("*.dcm")),
        key=lambda ds: -int(ds.TotalPixelMatrixColumns),
    )
    assert len(levels) >= 2
    assert list(levels[0].ImageType) == ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    for ds in levels[1:]:
        assert list(ds.ImageType) == ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]


def test_a_converted_slide_carries_what_its_source_says_and_no_placeholders(tmp_path: Path) -> None:
    """No generator defaults in a real slide's DICOM copy: no "Synthetic" text, no invented specimen
    description or stains; the scan date from the Aperio header; the source's ICC profile."""
    icc = gamma_profile(2.2)
    img = _smooth_image(256, 256, 5)
    src = tmp_path / "scan.svs"
    description = (
        "Aperio Image Library v12.0.0 \r\n256x256 JPEG/RGB Q=90|AppMag = 20|MPP = 0.5|Date = 12/29/09|Time = 09:59:15"
    )
    tifffile.imwrite(
        src,
        img,
        tile=(256, 256),
        compression="jpeg",
        description=description,
        extratags=[(34675, 7, len(icc), icc, True)],
    )
    with open_slide(src) as slide:
        assert slide.format == "svs" and slide.icc_profile == icc
        files = convert_to_dicom(slide, tmp_path / "dcm", identity_from_sidecar(None, slide))
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        assert "synthetic" not in str(ds).lower()
        assert ds.AcquisitionDateTime.startswith("20091229095915")
        assert "SpecimenShortDescription" not in ds.SpecimenDescriptionSequence[0]
        written = bytes(ds.OpticalPathSequence[0].ICCProfile)
        assert written[: len(icc)] == icc and len(written) - len(icc) <= 1  # OB values are padded to even
    assert pydicom.dcmread(files[0], stop_before_pixels=True).PyramidDescription == "converted from scan.svs"

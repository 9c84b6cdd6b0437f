"""Colour that is right whatever the container: JPEG streams that contradict their header, ICC profiles,
and the same score from DICOM, OME-TIFF and SVS copies of one real slide."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import imagecodecs
import numpy as np
import pydicom
import pytest
import tifffile

from adapter.cli import main
from dicom_io import open_slide
from dicom_io.convert import convert_to_dicom, identity_from_sidecar
from dicom_io.jpeg_colour import ColourModel, declared_model, parse_header
from dicom_io.pyramid import PyramidBuilder
from dicom_io.tiff_writer import write_svs
from tests.conftest import shared_file
from tests.dicom_io.conftest import write_jpeg_tiled_tiff
from tests.icc import gamma_profile


def _pattern(size: int = 256) -> np.ndarray:
    """Brown, blue and white stripes: colours a missing YCbCr conversion would wreck."""
    rng = np.random.default_rng(1)
    img = np.empty((size, size, 3), np.uint8)
    img[:, : size // 3] = (120, 75, 40)
    img[:, size // 3 : 2 * size // 3] = (70, 90, 160)
    img[:, 2 * size // 3 :] = (235, 232, 236)
    return np.clip(img + rng.integers(-6, 7, img.shape), 0, 255).astype(np.uint8)


def _strip_app0(stream: bytes) -> bytes:
    assert stream[2:4] == b"\xff\xe0"
    return stream[:2] + stream[4 + int.from_bytes(stream[4:6], "big") :]


def test_the_colour_model_a_jpeg_stream_declares() -> None:
    img = _pattern(64)
    jfif = imagecodecs.jpeg8_encode(img, level=90, subsampling="422")
    assert parse_header(jfif) is not None and parse_header(jfif).jfif  # type: ignore[union-attr]
    assert declared_model(jfif) is ColourModel.YCBCR
    # Without the JFIF marker, subsampled chroma still says YCbCr; full-resolution chroma says nothing.
    assert declared_model(_strip_app0(jfif)) is ColourModel.YCBCR
    full = _strip_app0(imagecodecs.jpeg8_encode(img, level=90, subsampling="444"))
    assert declared_model(full) is ColourModel.UNDECLARED
    rgb = imagecodecs.jpeg8_encode(img, level=90, colorspace="RGB", outcolorspace="RGB")
    assert declared_model(rgb) is ColourModel.RGB  # an Adobe marker with transform 0, or 'R','G','B' ids
    assert declared_model(b"not a jpeg at all") is ColourModel.UNDECLARED
    assert declared_model(jfif[:40]) is ColourModel.UNDECLARED  # cut before the frame header


@pytest.fixture(scope="module")
def os2_copies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The real OS-2 Ki-67 crop as OME-TIFF (as shipped), DICOM (by ``convert``), DICOM whose header
    wrongly says RGB over its YCbCr JPEG frames (as some converters write it), and SVS (pixel size
    rounded to four decimals, as Aperio writes it); every copy keeps the source's own JPEG tiles,
    as a scanner's exports or a tile-preserving converter do, and has a pyramid below them."""
    src = shared_file("OS-2-vsi.ome.tif")
    out = tmp_path_factory.mktemp("os2")
    with open_slide(src) as slide:
        files = convert_to_dicom(slide, out / "dicom", identity_from_sidecar(None, slide))
        lv0 = slide.levels[0]
        (out / "work").mkdir()
        base, why = slide.jpeg_level(0, out / "work")
        assert base is not None, why
        builder = PyramidBuilder(lv0.width, lv0.height, lv0.mpp_x, out / "work", base.tile_size, 90, base=base)
        builder.add_band(slide.read_region(0, 0, 0, lv0.width, lv0.height))
        write_svs(builder.finish(), out / "os2.svs")
    (out / "dicom-rgb").mkdir()
    for f in files:
        ds = pydicom.dcmread(f)
        assert ds.PhotometricInterpretation == "YBR_FULL_422"
        ds.PhotometricInterpretation = "RGB"  # the frames stay JFIF YCbCr
        ds.save_as(out / "dicom-rgb" / f.name)
    return {"ome": src, "dicom": out / "dicom", "dicom-rgb": out / "dicom-rgb", "svs": out / "os2.svs"}


def test_a_mislabelled_dicom_series_is_decoded_as_its_frames_say(
    os2_copies: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    with open_slide(os2_copies["dicom"]) as good, open_slide(os2_copies["dicom-rgb"]) as bad:
        a, b = good.read_region(0, 0, 0, 1445, 1445), bad.read_region(0, 0, 0, 1445, 1445)
        assert not good.metadata.get("warnings")
        assert len(bad.metadata["warnings"]) == len(bad.levels)
    assert np.array_equal(a, b)
    with open_slide(os2_copies["ome"]) as ome, open_slide(os2_copies["svs"]) as svs:
        assert np.array_equal(ome.read_region(0, 0, 0, 1445, 1445), a)  # convert copied the tiles
        assert np.array_equal(svs.read_region(0, 0, 0, 1445, 1445), a)
    assert main(["info", str(os2_copies["dicom-rgb"])]) == 0
    assert "WARNING: " in capsys.readouterr().out


def test_a_tiff_tagged_rgb_over_ycbcr_tiles_without_jfif_is_decoded_as_ycbcr(tmp_path: Path) -> None:
    img = _pattern(512)
    tiles = [
        _strip_app0(imagecodecs.jpeg8_encode(img[y : y + 256, x : x + 256], level=92, subsampling="422"))
        for y in range(0, 512, 256)
        for x in range(0, 512, 256)
    ]
    path = write_jpeg_tiled_tiff(tmp_path / "mislabelled.tif", tiles, 512, 512, "rgb")
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tif.pages[0].tags["PhotometricInterpretation"].overwrite(2)  # says RGB over YCbCr tiles
    with tifffile.TiffFile(path) as tif:  # what decoding "as the tag says" gives
        assert np.abs(tif.pages[0].asarray().astype(int) - img).mean() > 20
    with open_slide(path) as slide:
        pixels = slide.read_region(0, 0, 0, 512, 512)
        assert "decoded as YCbCr" in slide.metadata["warnings"][0]
    expected = np.vstack([np.hstack([imagecodecs.jpeg8_decode(tiles[2 * r + c]) for c in range(2)]) for r in range(2)])
    assert np.array_equal(pixels, expected)  # what the tiles hold, decoded as YCbCr
    assert np.abs(pixels.astype(int) - img).mean() < 4  # and the colours painted (JPEG noise only)


def test_the_same_slide_scores_alike_from_every_container(os2_copies: dict[str, Path], tmp_path: Path) -> None:
    scores = {}
    for name, path in os2_copies.items():
        out = tmp_path / f"{name}.json"
        assert main(["score", str(path), "--profile", "ki67", "--json", str(out)]) == 0
        result = json.loads(out.read_text())
        scores[name] = result["scores"]["ki67_index_percent"]
    assert scores["dicom-rgb"] == scores["dicom"]
    assert max(scores.values()) - min(scores.values()) < 0.5, scores


def _tiff_with_profile(path: Path, pixels: np.ndarray, icc: bytes | None) -> Path:
    extratags = [(34675, 7, len(icc), icc, True)] if icc else []
    tifffile.imwrite(
        path,
        pixels,
        tile=(256, 256),
        photometric="rgb",
        resolution=(1e4 / 0.5, 1e4 / 0.5),
        resolutionunit="CENTIMETER",
        extratags=extratags,
    )
    return path


def test_an_icc_profile_is_honoured_when_asked(tmp_path: Path) -> None:
    grey = np.full((256, 256, 3), 128, np.uint8)
    linear = _tiff_with_profile(tmp_path / "linear.tif", grey, gamma_profile(1.0))
    plain = _tiff_with_profile(tmp_path / "plain.tif", grey, None)
    with open_slide(linear) as slide:
        assert slide.icc_profile is not None and slide.describe()["icc_profile"]
        assert slide.read_region(0, 0, 0, 8, 8)[0, 0].tolist() == [128, 128, 128]  # off by default
        assert slide.manage_colour(True)
        # Linear-light 0.5 is sRGB 188: the profile's tone curve is applied.
        assert abs(int(slide.read_region(0, 0, 0, 8, 8)[0, 0, 0]) - 188) <= 1
        assert abs(int(slide.read_at_mpp(1.0, 0, 0, 8, 8)[0][0, 0, 1]) - 188) <= 1
        assert not slide.manage_colour(False)
        assert slide.read_region(0, 0, 0, 8, 8)[0, 0, 0] == 128
    with open_slide(plain) as slide:
        assert slide.icc_profile is None and not slide.manage_colour(True)


def test_an_icc_profile_in_a_dicom_optical_path(os2_copies: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "with-icc"
    shutil.copytree(os2_copies["dicom"], folder)
    for f in folder.glob("*.dcm"):
        ds = pydicom.dcmread(f)
        ds.OpticalPathSequence[0].ICCProfile = gamma_profile(1.0)
        ds.save_as(f)
    with open_slide(folder) as slide, open_slide(os2_copies["dicom"]) as plain:
        assert slide.icc_profile is not None and slide.manage_colour(True)
        managed, raw = slide.read_region(0, 0, 0, 64, 64), plain.read_region(0, 0, 0, 64, 64)
    assert managed.mean() > raw.mean() + 10  # linear-light data brightened into sRGB

"""QuPath's cell detection: each step against an independent implementation, and the published QuPath
v0.3.2 results on the real OS-2 Ki-67 crop (../shared/data/reference/qupath-OS-2-vsi.tsv)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy import ndimage
from scipy.ndimage import grey_opening
from skimage.morphology import h_maxima, local_maxima, reconstruction
from skimage.segmentation import watershed as skimage_watershed

from adapter.cli import main
from config.settings import load_settings
from pipeline import qupath, watershed
from tests.conftest import shared_file


def _blobs(shape: tuple[int, int], centres: list[tuple[int, int, float, float]]) -> np.ndarray:
    """Gaussian blobs ``(y, x, sigma, height)`` on zero."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    image = np.zeros(shape, np.float32)
    for y, x, s, a in centres:
        image += a * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * s * s))
    return image


def test_regional_maxima_are_plateaus_above_every_neighbour() -> None:
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.random((120, 130)).astype(np.float32), (0, 0), 2.0)
    image[40:43, 50:53] = image.max() + 1  # a plateau maximum
    image[0, 10] = image.max() + 5  # on the border: never a maximum
    labels, n = watershed.regional_maxima(image, -np.inf)
    expected = local_maxima(image, connectivity=2, allow_borders=False)
    assert np.array_equal(labels > 0, expected)
    assert n == ndimage.label(expected, structure=np.ones((3, 3)))[1]
    assert len(np.unique(labels[40:43, 50:53])) == 1 and labels[0, 10] == 0
    above, _ = watershed.regional_maxima(image, float(np.median(image)))
    assert np.array_equal(above > 0, expected & (image >= np.median(image)))


def test_flood_splits_basins_at_watershed_lines() -> None:
    image = _blobs((60, 100), [(30, 30, 8, 1.0), (30, 62, 8, 0.8)])
    seeds = np.zeros(image.shape, np.int32)
    seeds[30, 30], seeds[30, 62] = 1, 2
    allowed = image > 0.05
    ours = watershed.flood(image, seeds, allowed, watershed.FLOOD_LEVELS)
    theirs = skimage_watershed(-image, seeds, mask=allowed, connectivity=1, watershed_line=True)
    assert set(np.unique(ours)) == {0, 1, 2}
    assert not ours[~allowed].any()  # nothing outside the allowed pixels
    # Different labels never touch: a line of unlabelled pixels lies between them.
    a, b = ours[:, :-1], ours[:, 1:]
    assert not np.any((a > 0) & (b > 0) & (a != b))
    assert (ours == theirs).mean() > 0.99  # the same basins as a heap-based watershed
    line = np.flatnonzero((ours[30] == 0) & allowed[30])
    assert line.size == 1 and 44 <= line[0] <= 50  # the divide lies at the saddle


def test_fill_holes_fills_each_region_and_nothing_between_regions() -> None:
    labels = np.zeros((60, 60), np.int32)
    labels[5:25, 5:25] = 1
    labels[10:14, 10:14] = 0  # a hole of region 1
    labels[30:50, 30:50] = 2
    labels[30:50, 50:58] = 3
    labels[35:45, 49:51] = 0  # a gap between regions 2 and 3: not a hole of either
    labels[0:10, 40:60] = 4
    labels[0:3, 50:53] = 0  # touches the border: not a hole
    filled = watershed.fill_holes(labels)
    assert (filled[10:14, 10:14] == 1).all()
    assert (filled[35:45, 49:51] == 0).all() and (filled[0:3, 50:53] == 0).all()
    for k in (1, 4):
        assert np.array_equal(filled == k, ndimage.binary_fill_holes(labels == k) & ((labels == k) | (labels == 0)))


def test_prominent_maxima_match_h_maxima() -> None:
    image = _blobs((80, 140), [(40, 30, 10, 10.0), (40, 58, 10, 10.0), (40, 100, 9, 9.0), (20, 120, 4, 0.3)])
    image += _blobs((80, 140), [(40, 44, 3, 0.2)])  # a bump on the saddle, less than 0.5 high
    inside = np.ones(image.shape, bool)
    labels = watershed.prominent_maxima(image, inside, 0.5)
    expected = h_maxima(image.astype(np.float64), 0.5) > 0
    assert len(np.unique(labels)) - 1 == ndimage.label(expected, structure=np.ones((3, 3)))[1]
    for y, x in np.argwhere(expected):
        assert labels[y, x] > 0


def test_reconstruction_by_dilation_matches_scikit_image() -> None:
    rng = np.random.default_rng(3)
    mask = cv2.GaussianBlur(rng.random((200, 170)).astype(np.float32), (0, 0), 3.0)
    marker = cv2.erode(mask, qupath.imagej_disk(6))
    assert np.allclose(watershed.reconstruct(marker, mask), reconstruction(marker, mask, method="dilation"))


def test_plain_opening_is_local_where_reconstruction_is_not() -> None:
    """*Use opening by reconstruction* off: the background is erosion then dilation with the disk
    (scikit-image's grey opening); a long bright band crossing the tile (a fold) raises the
    reconstructed background wherever the band reaches, the plain opening only where the disk fits."""
    image = _blobs((80, 80), [(40, 20, 3, 1.0)]) + np.float32(0.05)
    image[:, 55:75] += np.float32(0.6)  # a band wider than the disk
    image[36:44, 24:60] += np.float32(0.6)  # a narrow bridge from the band towards the nucleus
    plain, _ = qupath.subtract_background(image, 5.0, 2.0, by_reconstruction=False)
    rebuilt, _ = qupath.subtract_background(image, 5.0, 2.0, by_reconstruction=True)
    disk = qupath.imagej_disk(5.0).astype(bool)
    expected = image - grey_opening(np.pad(image, 6, mode="edge"), footprint=disk)[6:-6, 6:-6]
    assert np.allclose(plain, expected, atol=1e-6)
    # Along the narrow bridge the reconstruction keeps the band's level as background (nothing
    # subtracted shows the bridge); the plain opening removes the bridge from the background.
    assert rebuilt[40, 40] < 0.05 and plain[40, 40] > 0.5


def test_imagej_disk_and_ridge_height() -> None:
    assert qupath.imagej_disk(2.5).sum() == 21  # dx² + dy² ≤ 7
    assert qupath.imagej_disk(0.5).sum() == 5 and qupath.imagej_disk(1).sum() == 9
    assert qupath.imagej_disk(16).shape == (33, 33)
    # A 2-pixel-wide bar: the crest runs between pixel centres, one pixel from the edge.
    binary = np.zeros((20, 30), np.uint8)
    binary[9:11, 5:25] = 1
    edm = cv2.distanceTransform(binary, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    ridge = watershed.ridge_height(edm)
    assert np.allclose(edm[9:11, 8:22], 1.0)
    assert np.allclose(ridge[9:11, 8:22], 1.5)  # the crest height, not the sampled 1.0
    assert np.array_equal(ridge[binary == 0], edm[binary == 0])


def test_the_threshold_applies_to_the_mean_of_a_candidate_region() -> None:
    """Two touching pale nuclei whose pixels straddle the threshold: QuPath keeps both (their means
    are above it) and splits them, where a per-pixel threshold would lose or merge them."""
    od = _blobs((100, 140), [(50, 55, 7, 0.5), (50, 80, 7, 0.5)]) + 0.02
    pale = ['nuclei.method="qupath"', "nuclei.threshold=0.25", "nuclei.background_radius_um=0"]
    settings = load_settings("ki67", pale)
    labels = qupath.detect_nuclei(od, od, np.zeros_like(od), settings.nuclei, 0.5)
    assert labels.max() == 2
    assert labels[50, 55] != labels[50, 80] and labels[50, 55] > 0 and labels[50, 80] > 0
    assert od[labels > 0].min() < 0.25  # pixels below the threshold belong to the nuclei
    higher = load_settings("ki67", ['nuclei.method="qupath"', "nuclei.threshold=0.6", "nuclei.background_radius_um=0"])
    assert qupath.detect_nuclei(od, od, np.zeros_like(od), higher.nuclei, 0.5).max() == 0


def test_exclude_dab_ignores_dab_dominant_objects() -> None:
    h = _blobs((120, 120), [(60, 40, 5, 0.6)]) + 0.05
    dab = _blobs((120, 120), [(60, 85, 5, 1.0)])  # brown, with no haematoxylin under it
    for background_um in (0, 8):
        found = {}
        for exclude in (False, True):
            settings = load_settings(
                "her2",
                [
                    'nuclei.method="qupath"',
                    'nuclei.detection_image="od_sum"',
                    "nuclei.threshold=0.1",
                    f"nuclei.background_radius_um={background_um}",
                    f"nuclei.exclude_dab={str(exclude).lower()}",
                ],
            )
            found[exclude] = qupath.detect_nuclei(h + dab, h, dab, settings.nuclei, 0.5)
        assert found[False][60, 40] > 0 and found[False][60, 85] > 0 and found[False].max() == 2
        assert found[True][60, 40] > 0 and found[True][60, 85] == 0 and found[True].max() == 1
    # The mask itself: haematoxylin-dominant pixels, majority-filtered, grown by 2.5 px.
    h_od = np.zeros((40, 40), np.float32)
    dab_od = np.zeros((40, 40), np.float32)
    dab_od[10:30, 10:30] = 1.0
    masked = qupath.exclude_dab(np.ones((40, 40), np.float32), h_od, dab_od)
    assert masked[20, 20] == 0 and masked[10:12, 20].all() and masked[5, 5] == 1 and masked[13, 20] == 0


def test_background_subtraction_drops_regions_on_a_dark_background() -> None:
    od = _blobs((160, 160), [(40, 40, 5, 0.6), (120, 120, 5, 0.6)])
    od[80:, 80:] += 3.0  # a fold: background above max_background
    settings = load_settings(
        "ki67", ['nuclei.method="qupath"', "nuclei.background_radius_um=8", "nuclei.max_background=2"]
    )
    labels = qupath.detect_nuclei(od, od, np.zeros_like(od), settings.nuclei, 0.5)
    assert labels[40, 40] > 0 and labels[120, 120] == 0


def _reference() -> list[dict[str, str]]:
    with shared_file("reference/qupath-OS-2-vsi.tsv").open() as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


@pytest.mark.parametrize("row", range(4))
def test_qupath_protocol_on_real_ki67_matches_qupath(row: int, tmp_path: Path) -> None:
    """QuPath v0.3.2's own Ki-67 protocol on OS-2-vsi: cells within 10 %, positive % within 2 points."""
    ref = _reference()[row]
    out = tmp_path / "result.json"
    # The protocol as QuPath's script records it; the white level belongs to the image in QuPath.
    protocol = (
        "runPlugin('qupath.imagej.detect.cells.PositiveCellDetection', '{"
        '"detectionImageBrightfield": "Optical density sum", "requestedPixelSizeMicrons": 0.5, '
        '"backgroundRadiusMicrons": 0.0, "medianRadiusMicrons": 0.0, "sigmaMicrons": 2.0, '
        f'"minAreaMicrons": 10.0, "maxAreaMicrons": 400.0, "threshold": {ref["detection_threshold"]}, '
        '"maxBackground": 2.0, "watershedPostProcess": true, "excludeDAB": false, "cellExpansionMicrons": 0.0, '
        '"includeNuclei": true, "smoothBoundaries": true, "makeMeasurements": true, '
        '"thresholdCompartment": "Nucleus: DAB OD mean", '
        f'"thresholdPositive1": {ref["dab_threshold"]}, "thresholdPositive2": 0.4, "thresholdPositive3": 0.6, '
        '"singleThreshold": true}\')'
    )
    args = [
        "score",
        str(shared_file("OS-2-vsi.ome.tif")),
        "--profile",
        "ki67",
        "--json",
        str(out),
        "--qupath",
        protocol,
        *("--set", "stain.background=255"),
    ]
    assert main(args) == 0
    tissue = json.loads(out.read_text())["compartments"]["tissue"]
    cells, positive = int(ref["cells"]), float(ref["positive_percent"])
    assert abs(tissue["cells"] - cells) <= 0.10 * cells, (tissue["cells"], cells)
    assert abs(tissue["positive_percent"] - positive) <= 2.0, (tissue["positive_percent"], positive)


def test_cli_names_the_white_level_a_qupath_protocol_leaves_open(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The white level belongs to the image in QuPath, not to the protocol: run without it, the
    CLI says the slide's glass stands in and how to get QuPath's 255; given, it says nothing."""
    protocol = '{"threshold": 0.2, "sigmaMicrons": 2.0}'
    slide = str(shared_file("OS-2-vsi.ome.tif"))
    assert main(["score", slide, "--profile", "ki67", "--qupath", protocol, "--workers", "1"]) == 0
    assert "--set stain.background=255" in capsys.readouterr().err
    args = ["score", slide, "--profile", "ki67", "--qupath", protocol, "--set", "stain.background=255"]
    assert main([*args, "--workers", "1"]) == 0
    assert "stain.background" not in capsys.readouterr().err


@pytest.mark.parametrize("radius", [0.5, 2.5, 8.0, 16.0, 23.0])
def test_disk_filter_by_rectangles_equals_the_disk_kernel(radius: float) -> None:
    """The disk as a union of rectangles gives OpenCV's erosion and dilation by the disk itself."""
    rng = np.random.default_rng(int(radius * 10))
    image = cv2.GaussianBlur(rng.random((150, 170)).astype(np.float32), (0, 0), 2.0)
    disk = qupath.imagej_disk(radius)
    rows = qupath.disk_rectangles(radius)
    assert rows[0][0] == disk.shape[1] // 2 and rows[-1][1] == disk.shape[0] // 2  # widest row, tallest column
    for op, reference in ((cv2.MORPH_ERODE, cv2.erode), (cv2.MORPH_DILATE, cv2.dilate)):
        expected = reference(image, disk, borderType=cv2.BORDER_REPLICATE)
        assert np.array_equal(qupath.disk_filter(image, radius, op), expected)

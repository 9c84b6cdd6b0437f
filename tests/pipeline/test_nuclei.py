"""Nucleus/cell detection and vectorised measurement."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree

from config.settings import IntensitySettings, NucleiSettings, load_settings
from pipeline.nuclei import (
    detect_cells,
    expand_cells,
    intensity_class,
    intensity_value,
    label_max,
    measure_cells,
    segment_nuclei,
)
from pipeline.stains import StainMatrix, deconvolve, rgb_to_od
from pipeline.synth import SlideModel, SynthSpec, render_tile


def _disc(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.indices(shape)
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_split_by_shape_separates_touching_nuclei() -> None:
    img = np.zeros((60, 80), np.float32)
    img[_disc(img.shape, 30, 28, 10)] = 0.6
    img[_disc(img.shape, 30, 46, 10)] = 0.6
    s = NucleiSettings()
    split = segment_nuclei(img, s, 0.5)
    assert split.max() == 2
    merged = segment_nuclei(img, s.model_copy(update={"split_by_shape": False}), 0.5)
    assert merged.max() == 1


def test_area_filter_in_square_micrometres() -> None:
    img = np.zeros((80, 80), np.float32)
    img[_disc(img.shape, 20, 20, 2)] = 0.6  # ~13 px = 3 µm² at 0.5 µm/px: too small
    img[_disc(img.shape, 50, 50, 8)] = 0.6  # ~200 px = 50 µm²
    labels = segment_nuclei(img, NucleiSettings(min_area_um2=10), 0.5)
    assert labels.max() == 1 and labels[50, 50] == 1 and labels[20, 20] == 0


def test_expansion_stops_at_neighbours_and_distance() -> None:
    nuclei = np.zeros((20, 40), np.int32)
    nuclei[10, 5] = 1
    nuclei[10, 15] = 2
    cells, dist = expand_cells(nuclei, 4.0)
    assert cells[10, 9] == 1 and cells[10, 11] == 2
    assert cells[10, 30] == 0 and dist[10, 30] > 4
    assert cells[10, 1] == 1  # 4 px away: inside


def test_measurements_by_hand() -> None:
    nuclei = np.zeros((10, 10), np.int32)
    nuclei[2:4, 2:4] = 1
    nuclei[6:8, 6:8] = 2
    cells, dist = expand_cells(nuclei, 1.0)
    dab = np.zeros((10, 10), np.float32)
    dab[2:4, 2:4] = [[0.1, 0.3], [0.5, 0.7]]
    dab[6:8, 6:8] = 0.2
    t = measure_cells(nuclei, cells, dist, dab, dab, 0.5, IntensitySettings())
    assert t["nucleus_dab_mean"] == pytest.approx([0.4, 0.2])
    assert t["nucleus_dab_max"] == pytest.approx([0.7, 0.2])
    assert t["x"] == pytest.approx([2.5, 6.5]) and t["y"] == pytest.approx([2.5, 6.5])
    assert t["nucleus_area_um2"] == pytest.approx([1.0, 1.0])  # 4 px × 0.25 µm²
    assert (t["cell_area_um2"] > t["nucleus_area_um2"]).all()


def test_label_max_matches_a_loop() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, (50, 50))
    values = rng.random((50, 50))
    got = label_max(values, labels, 5)
    assert got == pytest.approx([values[labels == k].max() for k in range(1, 6)])


def test_intensity_classes_and_single_threshold() -> None:
    v = np.array([0.1, 0.2, 0.39, 0.4, 0.6, 0.9])
    assert intensity_class(v, IntensitySettings()).tolist() == [0, 1, 1, 2, 3, 3]
    assert intensity_class(v, IntensitySettings(single_threshold=0.5)).tolist() == [0, 0, 0, 0, 1, 1]


@pytest.mark.parametrize("seed", [4, 5])
def test_detection_and_classes_on_a_synthetic_tile(seed: int) -> None:
    """F1 of centroids within 4 µm and intensity-class accuracy, Ki-67 profile."""
    spec = SynthSpec(width=2048, height=2048, seed=seed)
    tile = render_tile(SlideModel(spec), 512, 512, 1024, 1024)
    s = load_settings("ki67")
    bg = (spec.background,) * 3
    od = deconvolve(tile.pixels, StainMatrix(), bg)
    tc = detect_cells(od[..., 0], od[..., 1], rgb_to_od(tile.pixels, bg).sum(-1), 0.5, s.nuclei, s.intensity)
    truth = np.stack([tile.cells["x_um"] / 0.5 - 512, tile.cells["y_um"] / 0.5 - 512], 1)
    found = np.stack([tc.table["x"], tc.table["y"]], 1)
    d, j = cKDTree(truth).query(found, distance_upper_bound=4.0 / 0.5)
    ok = np.isfinite(d)
    tp = len(set(j[ok]))
    precision, recall = tp / len(found), tp / len(truth)
    assert 2 * precision * recall / (precision + recall) >= 0.9
    cls = intensity_class(intensity_value(tc.table, s.intensity), s.intensity)
    assert (cls[ok] == tile.cells["intensity_class"][j[ok]]).mean() >= 0.9

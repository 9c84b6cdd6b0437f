"""Nucleus/cell detection and vectorised measurement."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.spatial import cKDTree

from adapter.synth import SynthOutput
from config.errors import ConfigError
from config.settings import IntensitySettings, NucleiSettings, load_settings
from dicom_io import open_slide
from pipeline.analysis import analyse
from pipeline.kernels import expand_cells
from pipeline.nuclei import (
    NucleusModel,
    detect_cells,
    intensity_class,
    intensity_value,
    label_max,
    measure_cells,
    segment_nuclei,
)
from pipeline.stains import StainMatrix, deconvolve, rgb_to_od
from pipeline.synth import SlideModel, SynthSpec, render_tile
from pipeline.synth.render import RenderedTile
from pipeline.synth.toy_models import HaematoxylinNuclei, save_exported, save_torchscript


def _disc(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.indices(shape)
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_split_by_shape_separates_touching_nuclei() -> None:
    img = np.zeros((60, 80), np.float32)
    img[_disc(img.shape, 30, 28, 10)] = 0.6
    img[_disc(img.shape, 30, 46, 10)] = 0.6
    s = NucleiSettings()
    split = segment_nuclei(img, s, 0.5, blobs=False)
    assert split.max() == 2
    merged = segment_nuclei(img, s.model_copy(update={"split_by_shape": False}), 0.5, blobs=False)
    assert merged.max() == 1


def _smoothed(img: np.ndarray, sigma_px: float = 3.0) -> np.ndarray:
    return np.asarray(ndimage.gaussian_filter(img, sigma_px), np.float32)


def test_curvature_cuts_the_bridge_between_two_nuclei() -> None:
    """Two nuclei 1 µm apart, blurred (σ 1.5 µm) into one piece above the threshold (0.49 OD at the
    junction): one piece to a per-pixel threshold, two where the image is curved down."""
    img = np.zeros((60, 100), np.float32)
    img[_disc(img.shape, 30, 30, 10)] = 0.8
    img[_disc(img.shape, 30, 52, 10)] = 0.8
    det = _smoothed(img)
    s = NucleiSettings(split_by_shape=False, max_area_um2=1000)
    assert det[30, 41] > 0.4
    assert segment_nuclei(det, s, 0.5, blobs=False).max() == 1
    cut = segment_nuclei(det, s, 0.5)
    assert cut.max() == 2 and cut[30, 30] != cut[30, 52] and cut[30, 30] > 0 and cut[30, 52] > 0


def test_a_textured_nucleus_stays_whole() -> None:
    """Dark chromatin spots inside a nucleus make the curvature negative between them; those holes
    are filled, so the nucleus is one piece with no hole."""
    rng = np.random.default_rng(2)
    img = np.zeros((80, 80), np.float32)
    disc = _disc(img.shape, 40, 40, 14)
    img[disc] = 0.5
    spots = rng.random(img.shape) < 0.05
    img[disc & spots] = 1.2
    det = _smoothed(img)
    labels = segment_nuclei(det, NucleiSettings(), 0.5)
    assert labels.max() == 1
    assert not ndimage.binary_fill_holes(labels > 0)[labels == 0].any()


def test_an_elongated_nucleus_with_two_bumps_is_not_split() -> None:
    """Its distance map has two maxima along the ridge but no neck between them: one nucleus.
    A real neck (a waist) splits it."""
    yy, xx = np.indices((60, 120))
    rod = ((yy - 30) / 6.0) ** 2 + ((xx - 60) / 40.0) ** 2 <= 1.0
    bumps = rod | _disc(rod.shape, 30, 40, 7) | _disc(rod.shape, 30, 80, 7)
    s = NucleiSettings(max_area_um2=1000)
    assert segment_nuclei(_smoothed(bumps.astype(np.float32) * 0.6, 1.0), s, 0.5).max() == 1
    waist = _disc(rod.shape, 30, 40, 12) | _disc(rod.shape, 30, 80, 12) | (rod & (np.abs(yy - 30) <= 3))
    assert segment_nuclei(_smoothed(waist.astype(np.float32) * 0.6, 1.0), s, 0.5).max() == 2


def test_area_filter_in_square_micrometres() -> None:
    img = np.zeros((80, 80), np.float32)
    img[_disc(img.shape, 20, 20, 2)] = 0.6  # ~13 px = 3 µm² at 0.5 µm/px: too small
    img[_disc(img.shape, 50, 50, 8)] = 0.6  # ~200 px = 50 µm²
    labels = segment_nuclei(img, NucleiSettings(min_area_um2=10), 0.5, blobs=False)
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
    got = label_max(values, labels, 6)  # label 6 has no pixel
    assert got[:5] == pytest.approx([values[labels == k].max() for k in range(1, 6)])
    assert got[5] == -np.inf


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


class _TwoClassModel(torch.nn.Module):
    """The same decision as background/nucleus logits at half resolution (the pipeline resizes)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.avg_pool2d(x[:, :1], 2)
        return torch.cat([torch.zeros_like(h), (h - 0.15) * 40.0], 1)


class _Nothing(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x[:, :1], -20.0)


class _WrongShape(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _tile_f1(tile: RenderedTile, table: dict[str, np.ndarray]) -> float:
    truth = np.stack([tile.cells["x_um"] / 0.5 - 512, tile.cells["y_um"] / 0.5 - 512], 1)
    found = np.stack([table["x"], table["y"]], 1)
    if len(found) == 0:
        return 0.0
    d, j = cKDTree(truth).query(found, distance_upper_bound=4.0 / 0.5)
    tp = len(set(j[np.isfinite(d)]))
    precision, recall = tp / len(found), tp / len(truth)
    return 2 * precision * recall / (precision + recall) if tp else 0.0


@pytest.mark.parametrize("module", [HaematoxylinNuclei(), _TwoClassModel()], ids=["sigmoid", "softmax"])
def test_nucleus_model_replaces_the_detection_image(module: torch.nn.Module, tmp_path: Path) -> None:
    spec = SynthSpec(width=2048, height=2048, seed=4)
    tile = render_tile(SlideModel(spec), 512, 512, 1024, 1024)
    bg = (spec.background,) * 3
    s = load_settings("ki67")
    nuclei = s.nuclei.model_copy(
        update={"model": save_torchscript(module, tmp_path / "m.pt"), "model_channels": "hdab"}
    )
    model = NucleusModel(nuclei, StainMatrix())
    prob = model.probability(tile.pixels, bg)
    assert prob.shape == tile.pixels.shape[:2] and prob.dtype == np.float32
    assert prob.min() >= 0.0 and prob.max() <= 1.0
    od = deconvolve(tile.pixels, StainMatrix(), bg)
    # A detection image that finds nothing: only the model's probability can find the cells.
    blank = np.zeros(od.shape[:2], np.float32)
    tc = detect_cells(blank, od[..., 1], blank, 0.5, nuclei, s.intensity, prob)
    assert len(tc.table["x"]) > 100
    assert _tile_f1(tile, tc.table) >= 0.85
    # The model decides: a model that sees no nucleus anywhere gives no cells.
    none = nuclei.model_copy(update={"model": save_torchscript(_Nothing(), tmp_path / "none.pt")})
    empty = detect_cells(
        od[..., 0],
        od[..., 1],
        od[..., 0],
        0.5,
        none,
        s.intensity,
        NucleusModel(none, StainMatrix()).probability(tile.pixels, bg),
    )
    assert len(empty.table["x"]) == 0


def test_nucleus_model_errors_name_the_setting_and_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nuclei\.model.*absent\.pt.*file not found"):
        NucleusModel(NucleiSettings(model=tmp_path / "absent.pt"), StainMatrix())
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00not torchscript")
    with pytest.raises(ConfigError, match=r"nuclei\.model.*junk\.pt.*not a loadable TorchScript model"):
        NucleusModel(NucleiSettings(model=junk), StainMatrix())
    wrong = NucleusModel(NucleiSettings(model=save_torchscript(_WrongShape(), tmp_path / "wrong.pt")), StainMatrix())
    with pytest.raises(ConfigError, match=r"wrong\.pt.*output \(1, 3, 32, 32\) is not \(N, 1 or 2, H, W\)"):
        wrong.probability(np.full((32, 32, 3), 200, np.uint8), 255.0)


def test_nucleus_model_in_the_slide_pipeline(small_slide: SynthOutput, tmp_path: Path) -> None:
    model = save_torchscript(HaematoxylinNuclei(), tmp_path / "m.pt")
    assert small_slide.ome_tiff
    with open_slide(small_slide.ome_tiff) as slide:
        classical = analyse(slide, load_settings("ki67", ["tiling.workers=1"]))
        learned = analyse(
            slide, load_settings("ki67", ["tiling.workers=1", f"nuclei.model={model}", "nuclei.model_channels=hdab"])
        )
    assert learned.settings.nuclei.model == model
    n_classical, n_learned = len(classical.cells["x_um"]), len(learned.cells["x_um"])
    assert n_classical > 50 and abs(n_learned - n_classical) <= 0.15 * n_classical
    with open_slide(small_slide.ome_tiff) as slide, pytest.raises(ConfigError, match=r"nuclei\.model.*file not found"):
        analyse(slide, load_settings("ki67", [f"nuclei.model={tmp_path / 'gone.pt'}"]))


def test_include_nuclei_off_measures_the_cytoplasm_only() -> None:
    nuclei = np.zeros((12, 12), np.int32)
    nuclei[4:8, 4:8] = 1  # 16 px of nucleus, DAB 0.9
    cells, dist = expand_cells(nuclei, 2.0)
    dab = np.where(nuclei > 0, 0.9, 0.3).astype(np.float32)
    dab[5, 9] = 0.5  # one brighter cytoplasm pixel
    with_n = measure_cells(nuclei, cells, dist, dab, dab, 0.5, IntensitySettings())
    without = measure_cells(nuclei, cells, dist, dab, dab, 0.5, IntensitySettings(), include_nuclei=False)
    n_cell = int((cells == 1).sum())
    assert with_n["cell_area_um2"] == pytest.approx([n_cell * 0.25])
    assert without["cell_area_um2"] == pytest.approx([(n_cell - 16) * 0.25])
    assert with_n["cell_dab_max"] == pytest.approx([0.9]) and without["cell_dab_max"] == pytest.approx([0.5])
    cyto = (0.3 * (n_cell - 17) + 0.5) / (n_cell - 16)
    assert without["cell_dab_mean"] == pytest.approx([cyto])
    assert with_n["cell_dab_mean"] == pytest.approx([(0.3 * (n_cell - 17) + 0.5 + 0.9 * 16) / n_cell])
    assert without["nucleus_dab_mean"] == pytest.approx(with_n["nucleus_dab_mean"])


def _cell_with_wavy_membrane() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One cell: nucleus of radius 5 px, cell of radius 16 px, and a membrane whose
    distance from the centre wanders between 9 and 14 px with the angle (DAB 0.5 on 0.05)."""
    yy, xx = np.indices((41, 41)) - 20.0
    r, theta = np.hypot(xx, yy), np.arctan2(yy, xx)
    nuclei = (r <= 5).astype(np.int32)
    cells = (r <= 16).astype(np.int32)
    membrane_r = 11.5 + 2.5 * np.sin(3 * theta)
    dab = np.where(np.abs(r - membrane_r) <= 0.75, 0.5, 0.05).astype(np.float32)
    dist = np.maximum(r - 5, 0).astype(np.float32)
    return nuclei, cells, dist, dab


def test_membrane_sectors_follow_a_membrane_at_any_distance() -> None:
    nuclei, cells, dist, dab = _cell_with_wavy_membrane()
    sectors = measure_cells(nuclei, cells, dist, dab, dab, 0.5, IntensitySettings(membrane_method="sectors"))
    ring = measure_cells(nuclei, cells, dist, dab, dab, 0.5, IntensitySettings(membrane_method="ring"))
    # Every direction crosses the membrane: its full intensity, all around.
    assert sectors["membrane_dab_mean"] == pytest.approx([0.5])
    assert sectors["membrane_positive_fraction"] == pytest.approx([1.0])
    assert sectors["membrane_dab_max"] == pytest.approx([0.5])
    # One ring at a fixed distance holds only part of it.
    assert ring["membrane_dab_mean"][0] < 0.35 and ring["membrane_positive_fraction"][0] < 0.7


def test_membranes_not_measured_leave_the_other_columns_alone() -> None:
    nuclei, cells, dist, dab = _cell_with_wavy_membrane()
    measured = measure_cells(nuclei, cells, dist, dab, dab, 0.5, IntensitySettings(membrane_method="sectors"))
    skipped = measure_cells(nuclei, cells, dist, dab, dab, 0.5, IntensitySettings(membrane_method="none"))
    for key, values in skipped.items():
        if key.startswith("membrane_"):
            assert np.isnan(values).all(), key
        else:
            np.testing.assert_array_equal(values, measured[key], err_msg=key)


def test_membrane_sectors_completeness_counts_stained_directions() -> None:
    nuclei, cells, dist, dab = _cell_with_wavy_membrane()
    yy, xx = np.indices(dab.shape) - 20.0
    dab[(xx < 0) & (yy < 0)] = 0.05  # a quarter of the circumference unstained
    t = measure_cells(nuclei, cells, dist, dab, dab, 0.5, IntensitySettings(membrane_sectors=16))
    assert t["membrane_positive_fraction"] == pytest.approx([12 / 16])
    assert t["membrane_dab_mean"] == pytest.approx([(12 * 0.5 + 4 * 0.05) / 16])


def test_exported_nucleus_model_gives_what_its_torchscript_gives(tmp_path: Path) -> None:
    spec = SynthSpec(width=1024, height=1024, seed=6)
    tile = render_tile(SlideModel(spec), 0, 0, 300, 250)  # not square, not a power of two
    bg = (spec.background,) * 3
    base = NucleiSettings(model_channels="hdab")
    scripted = NucleusModel(
        base.model_copy(update={"model": save_torchscript(HaematoxylinNuclei(), tmp_path / "m.pt")}), StainMatrix()
    )
    exported = NucleusModel(
        base.model_copy(update={"model": save_exported(HaematoxylinNuclei(), tmp_path / "m.pt2")}), StainMatrix()
    )
    want = scripted.probability(tile.pixels, bg)
    got = exported.probability(tile.pixels, bg)
    assert got.shape == (250, 300) and (want > 0.5).sum() > 1000
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_model_files_that_cannot_run_are_refused_by_name(tmp_path: Path) -> None:
    fixed = NucleusModel(
        NucleiSettings(model=save_exported(HaematoxylinNuclei(), tmp_path / "fixed.pt2", "none")), StainMatrix()
    )
    with pytest.raises(ConfigError, match=r"nuclei\.model.*fixed\.pt2.*failed on an input of shape \(1, 3, 32, 48\)"):
        fixed.probability(np.full((32, 48, 3), 200, np.uint8), 255.0)
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"PK\x03\x04 not an archive")
    with pytest.raises(ConfigError, match=r"junk\.pt2.*not a loadable torch\.export program"):
        NucleusModel(NucleiSettings(model=junk), StainMatrix())

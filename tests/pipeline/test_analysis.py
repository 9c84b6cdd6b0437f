"""End-to-end accuracy on synthetic slides with ground truth (numbers reported in the README)."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.spatial import cKDTree

from adapter.synth import SynthOutput
from config.errors import SlideReadError
from config.settings import IntensitySettings, load_settings
from dicom_io import open_slide
from pipeline.analysis import SlideResult, analyse, group_tiles, pixel_class_counts, tile_blocks
from pipeline.nuclei import intensity_class
from pipeline.segmentation import TUMOUR


@pytest.fixture(scope="module")
def results(accuracy_slides: dict[str, SynthOutput]) -> dict[str, SlideResult]:
    out = {}
    for name, slide_out in accuracy_slides.items():
        assert slide_out.ome_tiff
        opener = functools.partial(open_slide, slide_out.ome_tiff)
        with opener() as slide:
            out[name] = analyse(slide, load_settings("ki67", ["tiling.workers=2"]), opener=opener)
    return out


def _match(result: SlideResult, out: SynthOutput) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    truth = dict(np.load(out.truth_dir / "cells.npz"))
    mpp0 = out.truth["spec"]["mpp"]
    t = np.stack([truth["x_px"] * mpp0, truth["y_px"] * mpp0], 1)
    f = np.stack([result.cells["x_um"], result.cells["y_um"]], 1)
    d, j = cKDTree(t).query(f, distance_upper_bound=4.0)
    return d, j, truth


@pytest.mark.parametrize("name", ["typical", "low_tumour"])
def test_cell_detection_f1_and_class_accuracy(
    name: str, results: dict[str, SlideResult], accuracy_slides: dict[str, SynthOutput]
) -> None:
    r, out = results[name], accuracy_slides[name]
    d, j, truth = _match(r, out)
    ok = np.isfinite(d)
    tp = len(set(j[ok]))
    precision, recall = tp / len(d), tp / len(truth["x_px"])
    f1 = 2 * precision * recall / (precision + recall)
    assert f1 >= 0.97, (precision, recall)  # 0.994 / 0.988 measured
    accuracy = (r.cells["intensity_class"][ok] == truth["intensity_class"][j[ok]]).mean()
    assert accuracy >= 0.98  # 1.000 / 0.996


def test_compartment_h_scores(results: dict[str, SlideResult], accuracy_slides: dict[str, SynthOutput]) -> None:
    r, out = results["typical"], accuracy_slides["typical"]
    for compartment in ("tumour", "stroma", "tissue"):
        expected = out.truth["compartments"][compartment]["h_score"]
        assert abs(r.compartment_stats[compartment]["h_score"] - expected) <= 4, compartment  # within 0.8 measured


@pytest.mark.parametrize("name", ["typical", "low_tumour"])
def test_tumour_iou_and_fraction(
    name: str, results: dict[str, SlideResult], accuracy_slides: dict[str, SynthOutput]
) -> None:
    r, out = results[name], accuracy_slides[name]
    truth = np.array(Image.open(out.truth_dir / "compartments.png"))
    step_um = out.truth["truth_step_px"] * out.truth["spec"]["mpp"]
    yy, xx = np.indices(truth.shape)
    predicted = r.compartments.lookup((xx + 0.5) * step_um, (yy + 0.5) * step_um)
    t, p = truth == TUMOUR, predicted == TUMOUR
    assert (t & p).sum() / (t | p).sum() >= 0.8  # 0.91 / 0.83 measured
    assert abs(r.tumour_fraction - out.truth["tumour_fraction"]) < 0.05  # 0.027 / 0.004


def test_low_tumour_alert_exactly_on_the_low_tumour_slide(results: dict[str, SlideResult]) -> None:
    assert "LOW_TUMOUR" in [a["code"] for a in results["low_tumour"].alerts]
    assert "LOW_TUMOUR" not in [a["code"] for a in results["typical"].alerts]


def test_json_has_the_documented_keys(results: dict[str, SlideResult]) -> None:
    j = results["typical"].to_json()
    assert {"profile", "slide", "tumour_fraction", "compartments", "scores", "alerts", "timings"} <= set(j)
    for c in ("tumour", "stroma", "tissue"):
        assert {"cells", "negative", "1+", "2+", "3+", "h_score", "positive_percent", "area_mm2"} <= set(
            j["compartments"][c]
        )
    assert j["profile"] == "ki67" and "ki67_index_percent" in j["scores"]


def test_process_pool_and_inline_agree(
    accuracy_slides: dict[str, SynthOutput], results: dict[str, SlideResult]
) -> None:
    out = accuracy_slides["low_tumour"]
    assert out.ome_tiff
    with open_slide(out.ome_tiff) as slide:
        inline = analyse(slide, load_settings("ki67", ["tiling.workers=1"]))
    pooled = results["low_tumour"]
    assert inline.compartment_stats == pooled.compartment_stats
    assert np.array_equal(inline.cells["x_um"], pooled.cells["x_um"])


def test_tile_blocks_cover_every_tile_once_in_square_blocks() -> None:
    cores = [(x * 512, y * 512, 512, 512) for y in range(20) for x in range(30) if (x + 2 * y) % 7]
    blocks = tile_blocks(cores, 512)
    flat = [c for b in blocks for c in b]
    assert len(flat) == len(cores) and set(flat) == set(cores)
    for b in blocks:
        cols, rows = {c[0] // 512 for c in b}, {c[1] // 512 for c in b}
        assert max(cols) - min(cols) < 4 and max(rows) - min(rows) < 4
        assert b == sorted(b, key=lambda c: (c[1], c[0]))
    # ~510 tiles: 4×4 blocks, 40 of them.
    assert max(len(b) for b in blocks) <= 16 and len(blocks) >= 32
    big = [(x * 512, y * 512, 512, 512) for y in range(64) for x in range(64)]
    assert max(len(b) for b in tile_blocks(big, 512)) == 64  # 8×8: neighbours share decoded tiles
    # A small slide still gives the workers several blocks.
    small = [(x * 512, y * 512, 512, 512) for y in range(4) for x in range(4)]
    assert len(tile_blocks(small, 512)) == 16
    assert tile_blocks([], 512) == []


def test_group_tiles_merges_only_complete_aligned_groups() -> None:
    # A 5×3 slide whose last column is 100 px wide; tile (1, 3) has no tissue.
    widths = [512, 512, 512, 512, 100]
    cores = [(x * 512, y * 512, widths[x], 512) for y in range(3) for x in range(5) if (x, y) != (3, 1)]
    units = group_tiles(cores, 512, 2)
    assert (0, 0, 1024, 1024) in units  # tiles (0..1, 0..1)
    # (2..3, 0..1) lacks (3, 1): its three tiles stay single; the edge column and the last row too.
    assert {(1024, 0, 512, 512), (1536, 0, 512, 512), (1024, 512, 512, 512)} <= set(units)
    assert (2048, 0, 100, 512) in units and (0, 1024, 512, 512) in units
    # Every tile is covered exactly once.
    covered = sorted(
        (x, y) for ux, uy, uw, uh in units for y in range(uy, uy + uh, 512) for x in range(ux, ux + uw, 512)
    )
    assert covered == sorted((c[0], c[1]) for c in cores)
    assert group_tiles(cores, 512, 1) == cores
    # Blocks are sized by the tiles the groups hold, not by the number of groups.
    big = [(x * 512, y * 512, 512, 512) for y in range(64) for x in range(64)]
    merged = group_tiles(big, 512, 2)
    assert len(merged) == 1024 and max(len(b) for b in tile_blocks(merged, 512, len(big))) == 16


@pytest.mark.parametrize(
    ("compartment", "single", "origin"),
    [
        ("nucleus", None, (0, 0)),
        ("cell", None, (512, 1024)),
        ("membrane", 0.3, (1000, 37)),
        ("cytoplasm", None, (9, 9)),
    ],
)
def test_pixel_class_counts_match_numpy(compartment: str, single: float | None, origin: tuple[int, int]) -> None:
    rng = np.random.default_rng(5)
    cells = rng.integers(0, 4, (64, 80)).astype(np.int32)
    nuclei = np.where(rng.random(cells.shape) < 0.5, cells, 0).astype(np.int32)
    dab = rng.random(cells.shape).astype(np.float32)
    intensity = IntensitySettings(compartment=compartment, single_threshold=single)
    x0, y0 = origin
    scale, grid = 0.5 / 8.0, (70, 75)  # 0.5 µm pixels on an 8 µm grid, clipped at its edge
    keys, counts = pixel_class_counts(nuclei, cells, dab, intensity, x0, y0, scale, grid)
    # Reference: the same binning in plain NumPy.
    in_cell = {"nucleus": nuclei > 0, "cell": cells > 0}.get(compartment, (cells > 0) & (nuclei == 0))
    yy, xx = np.nonzero(in_cell)
    gi = np.clip(((y0 + yy + 0.5) * scale).astype(np.int64), 0, grid[0] - 1) * grid[1] + np.clip(
        ((x0 + xx + 0.5) * scale).astype(np.int64), 0, grid[1] - 1
    )
    want = np.bincount(gi * 4 + intensity_class(dab[in_cell], intensity).astype(np.int64))
    assert np.array_equal(keys, np.flatnonzero(want)) and np.array_equal(counts, want[want > 0])


def test_a_cut_dicom_series_is_refused_by_the_workers_with_its_reason(small_slide: SynthOutput, tmp_path: Path) -> None:
    assert small_slide.dicom_dir is not None
    cut = tmp_path / "cut"
    shutil.copytree(small_slide.dicom_dir, cut)
    base = max(cut.glob("*.dcm"), key=lambda f: f.stat().st_size)
    base.write_bytes(base.read_bytes()[: base.stat().st_size // 2])
    opener = functools.partial(open_slide, cut)
    with opener() as slide, pytest.raises(SlideReadError, match=r"cut: cannot decode level 0"):
        analyse(slide, load_settings("ki67", ["tiling.workers=2"]), opener=opener)


def test_grouped_tiles_find_the_cells_single_tiles_find(accuracy_slides: dict[str, SynthOutput]) -> None:
    out = accuracy_slides["typical"]
    assert out.ome_tiff
    with open_slide(out.ome_tiff) as slide:
        single = analyse(slide, load_settings("ki67", ["tiling.workers=1", "tiling.group_tiles=1"]))
        grouped = analyse(slide, load_settings("ki67", ["tiling.workers=1", "tiling.group_tiles=2"]))
    a = np.stack([single.cells["x_um"], single.cells["y_um"]], 1)
    b = np.stack([grouped.cells["x_um"], grouped.cells["y_um"]], 1)
    d, _ = cKDTree(a).query(b)
    # The same cells, each once (none doubled or lost on the seams inside a group) ...
    assert abs(len(a) - len(b)) <= 0.005 * len(a)
    assert (d < 0.5).mean() > 0.99
    # ... and the same scores.
    for c in ("tumour", "stroma", "tissue"):
        assert grouped.compartment_stats[c]["h_score"] == pytest.approx(single.compartment_stats[c]["h_score"], abs=1.0)


_WARM_UP_CHECK = """
import json, sys
import numba
from config.settings import load_settings
from dicom_io import open_slide
from pipeline import kernels, watershed
from pipeline.analysis import _TileContext, process_tile, warm_up
from pipeline.stains import StainMatrix

def compiled():
    kinds = numba.core.dispatcher.Dispatcher
    return {
        name: len(f.signatures)
        for module in (kernels, watershed)
        for name, f in vars(module).items()
        if isinstance(f, kinds)
    }

found = warm_up()
warm = compiled()
with open_slide(sys.argv[1]) as slide:
    for profile, extra in (
        ("ki67", ["intensity.membrane_method=none"]),
        ("her2", ["intensity.membrane_method=sectors"]),
        ("hscore", ["intensity.membrane_method=ring"]),
        ("ki67", ['nuclei.method="qupath"', "nuclei.exclude_dab=true", "nuclei.median_radius_um=0.5"]),
        ("ki67", ['nuclei.method="qupath"', "nuclei.background_radius_um=0"]),
    ):
        settings = load_settings(profile, extra)
        process_tile(_TileContext(slide, settings, StainMatrix(), 255.0, 8.0, (200, 200)), (0, 0, 512, 512))
print(json.dumps({"found": found, "warm": warm, "after_tiles": compiled()}))
"""


def test_warm_up_loads_every_kernel_a_tile_worker_calls(small_slide: SynthOutput) -> None:
    """The fork server's warm-up (pipeline.prewarm) must leave nothing for a
    worker to compile: real tiles of every membrane method and of the QuPath
    detector add no signature."""
    assert small_slide.ome_tiff
    run = subprocess.run(
        [sys.executable, "-c", _WARM_UP_CHECK, str(small_slide.ome_tiff)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["found"] == 6
    assert report["after_tiles"] == report["warm"]
    for name in ("cell_stats", "sector_peaks", "_chamfer_cells", "split_at_peaks", "trim_and_filter"):
        assert report["warm"][name] >= 1, name
    assert report["warm"]["class_counts_on_grid"] >= 1 and report["warm"]["label_max"] >= 1
    for name in ("_flood", "_shared_pieces", "_reconstruct", "prominent_maxima", "_fill_enclosed", "label_sums"):
        assert report["warm"][name] >= 1, name

"""Compiled per-cell passes against plain NumPy on random label images."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numba
import numpy as np
import pytest

from config.settings import IntensitySettings
from pipeline import kernels
from pipeline.nuclei import measure_cells


def _labels(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Random cells 1..n on a 60×70 tile, each with its nucleus a random subset of its pixels."""
    rng = np.random.default_rng(seed)
    n = 7
    cells = rng.integers(0, n + 1, (60, 70)).astype(np.int32)
    cells[cells == 3] = 0  # a label with no pixel at all
    cells[0, 0] = 3  # ... now one pixel, all nucleus
    nuclei = np.where(rng.random(cells.shape) < 0.4, cells, 0).astype(np.int32)
    nuclei[0, 0] = 3
    h = rng.random(cells.shape).astype(np.float32)
    dab = rng.random(cells.shape).astype(np.float32)
    return nuclei, cells, h, dab, n


@pytest.mark.parametrize("seed", [0, 1])
def test_cell_stats_match_numpy(seed: int) -> None:
    nuclei, cells, h, dab, n = _labels(seed)
    st = kernels.cell_stats(nuclei, cells, h, dab, n)
    yy, xx = np.indices(cells.shape)
    for k in range(1, n + 1):
        cell, nuc = cells == k, nuclei == k
        cyto = cell & ~nuc
        i = k - 1
        assert st[kernels.CELL_PIXELS, i] == cell.sum()
        assert st[kernels.NUCLEUS_PIXELS, i] == nuc.sum()
        assert st[kernels.CELL_DAB_SUM, i] == pytest.approx(dab[cell].astype(np.float64).sum())
        assert st[kernels.NUCLEUS_DAB_SUM, i] == pytest.approx(dab[nuc].astype(np.float64).sum())
        assert st[kernels.NUCLEUS_H_SUM, i] == pytest.approx(h[nuc].astype(np.float64).sum())
        assert st[kernels.NUCLEUS_X_SUM, i] == xx[nuc].sum()
        assert st[kernels.NUCLEUS_Y_SUM, i] == yy[nuc].sum()
        assert st[kernels.CELL_DAB_MAX, i] == pytest.approx(dab[cell].max())
        assert st[kernels.NUCLEUS_DAB_MAX, i] == pytest.approx(dab[nuc].max())
        want_cyto = dab[cyto].max() if cyto.any() else -np.inf
        assert st[kernels.CYTOPLASM_DAB_MAX, i] == pytest.approx(want_cyto)


@pytest.mark.parametrize("sectors", [4, 16, 7])
def test_sector_peaks_match_numpy(sectors: int) -> None:
    nuclei, cells, _, dab, n = _labels(2)
    cx = np.linspace(5, 60, n)
    cy = np.linspace(50, 8, n)
    peak = kernels.sector_peaks(nuclei, cells, dab, cx, cy, sectors)
    assert peak.shape == (n, sectors)
    yy, xx = np.indices(cells.shape)
    for k in range(1, n + 1):
        cyto = (cells == k) & (nuclei == 0)
        angle = np.arctan2(yy[cyto] - cy[k - 1], xx[cyto] - cx[k - 1])
        sector = np.minimum(((angle + np.pi) * sectors / (2 * np.pi)).astype(int), sectors - 1)
        for s in range(sectors):
            values = dab[cyto][sector == s]
            want = values.max() if values.size else -np.inf
            assert peak[k - 1, s] == pytest.approx(want)


@pytest.mark.parametrize("sectors", [8, 16, 7])
def test_sector_of_each_direction_is_the_arctangent_sector(sectors: int) -> None:
    # One cell per direction, its only cytoplasm pixel at that offset from an integer
    # centre: straight left/right/up/down and the diagonals lie on sector edges.
    offsets = [(dy, dx) for dy in (-2, -1, 0, 1, 2) for dx in (-2, -1, 0, 1, 2) if (dy, dx) != (0, 0)]
    n = len(offsets)
    cells = np.zeros((7, 7 * n), np.int32)
    nuclei = np.zeros_like(cells)
    cx = np.arange(n) * 7 + 3.0
    cy = np.full(n, 3.0)
    for i, (dy, dx) in enumerate(offsets):
        cells[3 + dy, 3 + 7 * i + dx] = i + 1
    dab = np.ones(cells.shape, np.float32)
    peak = kernels.sector_peaks(nuclei, cells, dab, cx, cy, sectors)
    for i, (dy, dx) in enumerate(offsets):
        want = min(int((np.arctan2(dy, dx) + np.pi) * sectors / (2 * np.pi)), sectors - 1)
        assert np.flatnonzero(np.isfinite(peak[i])).tolist() == [want], (dy, dx)


def _brute_force_nearest(nuclei: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Euclidean distance to the nearest nucleus pixel, its label, and the
    distance to the nearest pixel of any other label."""
    ny, nx = np.nonzero(nuclei)
    yy, xx = np.indices(nuclei.shape)
    d = np.sqrt((yy[..., None] - ny) ** 2 + (xx[..., None] - nx) ** 2)
    label = nuclei[ny, nx][d.argmin(axis=-1)]
    other = np.where(nuclei[ny, nx] != label[..., None], d, np.inf).min(axis=-1)
    return d.min(axis=-1), label, other


def test_expand_cells_gives_the_nearest_nucleus_within_the_distance() -> None:
    rng = np.random.default_rng(3)
    nuclei = np.zeros((40, 50), np.int32)
    for label in range(1, 9):  # small blobs, some touching
        y, x = rng.integers(2, 38), rng.integers(2, 48)
        nuclei[y - 1 : y + 2, x - 1 : x + rng.integers(1, 4)] = label
    cells, dist = kernels.expand_cells(nuclei, 6.0)
    euclid, want, other = _brute_force_nearest(nuclei)
    # The 5-7-11 chamfer distance is within 2.1 % of the Euclidean one (beyond
    # the limit it is only capped above it).
    within = euclid <= 6.0
    assert np.allclose(dist[within], euclid[within], rtol=0.021, atol=1e-6)
    assert (dist[~within] > 6.0).all()
    clear = (other > 1.05 * euclid + 0.5) & (np.abs(euclid - 6.0) > 0.15)  # no near tie, not on the limit
    assert (cells[clear] == np.where(euclid <= 6.0, want, 0)[clear]).all()
    assert (cells[nuclei > 0] == nuclei[nuclei > 0]).all() and (dist[nuclei > 0] == 0).all()
    assert set(np.unique(cells)) == set(range(9))


def test_expand_cells_matches_opencvs_chamfer_distance() -> None:
    """OpenCV's 5×5 L2 mask (1, 1.4, 2.1969) and 5-7-11 agree within 0.2 %."""
    rng = np.random.default_rng(4)
    nuclei = np.where(rng.random((120, 90)) < 0.002, rng.integers(1, 50, (120, 90)), 0).astype(np.int32)
    nuclei[60, 45] = 50
    _, dist = kernels.expand_cells(nuclei, 200.0)
    ref = cv2.distanceTransform((nuclei == 0).view(np.uint8), cv2.DIST_L2, 5)
    assert np.allclose(dist, ref, rtol=0.002, atol=1e-5)


def test_expand_cells_ties_go_to_the_smaller_label_and_limits_hold() -> None:
    nuclei = np.zeros((5, 11), np.int32)
    nuclei[2, 2], nuclei[2, 8] = 7, 3
    cells, dist = kernels.expand_cells(nuclei, 3.0)
    assert cells[2, 5] == 3 and dist[2, 5] == pytest.approx(3.0)  # 3 px from both
    assert cells[2].tolist() == [7, 7, 7, 7, 7, 3, 3, 3, 3, 3, 3]
    assert cells[0, 0] == 7 and dist[0, 0] == pytest.approx(2.8)  # two diagonal steps
    alone, _ = kernels.expand_cells(nuclei, 0.0)
    assert (alone == nuclei).all()
    with pytest.raises(ValueError, match="max_dist must be zero or positive"):
        kernels.expand_cells(nuclei, -1.0)


def test_expand_cells_uses_wider_keys_for_many_labels_or_far_expansion() -> None:
    """More labels or a longer reach than 32-bit keys hold: same cells, 64-bit keys."""
    rng = np.random.default_rng(5)
    nuclei = np.where(rng.random((300, 300)) < 0.3, rng.integers(1, 1 << 22, (300, 300)), 0).astype(np.int32)
    cells, dist = kernels.expand_cells(nuclei, 2.0)  # 22 label bits: a 2 px reach still fits in 32
    wide, wide_dist = kernels.expand_cells(nuclei, 2000.0)  # 2000 px does not: 64-bit keys
    assert len(kernels._chamfer_cells.signatures) >= 2
    near = dist <= 2.0
    assert (cells[near] == wide[near]).all() and np.allclose(dist[near], wide_dist[near])
    assert (wide > 0).all()


def test_trim_and_filter_by_hand() -> None:
    pieces = np.zeros((4, 8), np.int32)
    pieces[0:2, 0:4] = 1  # 8 px: fine falls from 1.0 to 0.4 across it
    pieces[3, 5:8] = 2  # 3 px
    pieces[0, 6] = 3  # 1 px
    fine = np.zeros(pieces.shape, np.float32)
    fine[0:2, 0:4] = [1.0, 0.8, 0.5, 0.4]
    fine[3, 5:8] = [0.9, 0.2, 0.9]
    fine[0, 6] = 0.7
    empty = np.zeros((0, 0), np.float32)
    # Areas in px × 1.0: 2..8 kept, in label order.
    out = kernels.trim_and_filter(pieces, 4, empty, 0.3, 2.0, 8.0, 1.0)
    assert out.max() == 2 and (out[pieces == 1] == 1).all() and (out[pieces == 2] == 2).all()
    assert (out[pieces == 3] == 0).all()
    # Trim at max(threshold 0.3, half the peak): piece 1 keeps ≥ 0.5 (6 px), piece 2 loses its 0.2.
    out = kernels.trim_and_filter(pieces, 4, fine, 0.3, 2.0, 8.0, 1.0)
    assert (out[0:2, 0:3] == 1).all() and (out[0:2, 3] == 0).all()
    assert out[3, 5] == 2 and out[3, 6] == 0 and out[3, 7] == 2


def test_split_at_peaks_by_hand() -> None:
    pieces = np.zeros((4, 9), np.int32)
    pieces[0:2, 0:5] = 1  # two peaks
    pieces[3, 5:8] = 2  # one peak: kept whole
    pieces[0, 7] = 3  # no peak
    plateaus = np.zeros(pieces.shape, np.int32)
    plateaus[0, 0] = 1
    plateaus[1, 3:5] = 2  # a plateau of two pixels
    plateaus[3, 6] = 3
    out = kernels.split_at_peaks(pieces, 4, plateaus, 4, kernels.SPLIT_BRUTE_FORCE_BUDGET)
    # Split parts are labelled n_pieces + plateau; the rest keep their piece's label.
    want = pieces.copy()
    want[0:2, 0:2] = 5
    want[0:2, 2:5] = 6  # (0, 2) is 2 px from (0, 0) but √2 from (1, 3)
    assert (out == want).all()

    # A plateau touching two pieces at a corner belongs to the later one (raster order).
    pieces = np.zeros((4, 8), np.int32)
    pieces[0:2, 0:2] = 1
    pieces[2:4, 2:8] = 2
    plateaus = np.zeros(pieces.shape, np.int32)
    plateaus[1, 1] = plateaus[2, 2] = 1  # diagonal neighbours: one plateau
    plateaus[3, 7] = 2
    out = kernels.split_at_peaks(pieces, 3, plateaus, 3, kernels.SPLIT_BRUTE_FORCE_BUDGET)
    assert (out[pieces == 1] == 1).all()  # no peak of its own left: kept whole
    assert (out[2:4, 2:5] == 4).all() and (out[2:4, 6:8] == 5).all()


def _nearest_peak_reference(pieces: np.ndarray, plateaus: np.ndarray, n_pieces: int) -> np.ndarray:
    """Brute force over all pixels: nearest peak pixel of the same piece, first in raster order on ties."""
    out = pieces.copy()
    py, px = np.nonzero(plateaus)
    for p in range(1, n_pieces):
        own = pieces[py, px] == p
        if len(np.unique(plateaus[py[own], px[own]])) < 2:
            continue
        yy, xx = np.nonzero(pieces == p)
        d2 = (yy[:, None] - py[own]) ** 2 + (xx[:, None] - px[own]) ** 2
        out[yy, xx] = n_pieces + plateaus[py[own], px[own]][d2.argmin(axis=1)]
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_at_peaks_matches_brute_force_and_propagation_agrees(seed: int) -> None:
    rng = np.random.default_rng(seed)
    blobs = np.zeros((90, 120), np.uint8)
    for _ in range(40):
        cv2.circle(blobs, (int(rng.integers(0, 120)), int(rng.integers(0, 90))), int(rng.integers(3, 9)), 1, -1)
    n_pieces, pieces = cv2.connectedComponents(blobs, connectivity=4, ltype=cv2.CV_32S)
    seeds = (rng.random(blobs.shape) < 0.02) & (blobs > 0)
    n_plateaus, plateaus = cv2.connectedComponents(seeds.view(np.uint8), connectivity=4, ltype=cv2.CV_32S)
    want = _nearest_peak_reference(pieces, plateaus, n_pieces)
    out = kernels.split_at_peaks(pieces, n_pieces, plateaus, n_plateaus, kernels.SPLIT_BRUTE_FORCE_BUDGET)
    assert (out == want).all()
    assert len(np.unique(out)) > n_pieces  # some pieces were split
    # Budget 0: every split piece by propagation; the same but for rare one-pixel slips at a border.
    swept = kernels.split_at_peaks(pieces, n_pieces, plateaus, n_plateaus, 0)
    assert (swept > 0).sum() == (want > 0).sum()
    assert (swept != want).mean() < 0.01
    assert set(np.unique(swept)) == set(np.unique(want))


def test_split_by_propagation_stays_inside_a_winding_piece() -> None:
    # A U-shaped piece with a peak at the end of each arm: the bottom of the U goes to the
    # nearest peak along the piece; pixels of the right arm never take the left peak.
    pieces = np.zeros((30, 30), np.int32)
    pieces[0:28, 2:6] = pieces[24:28, 2:28] = pieces[0:28, 24:28] = 1
    plateaus = np.zeros(pieces.shape, np.int32)
    plateaus[0, 3] = 1
    plateaus[0, 26] = 2
    out = kernels.split_at_peaks(pieces, 2, plateaus, 3, 0)
    assert (out[0:24, 2:6] == 3).all() and (out[0:24, 24:28] == 4).all()
    assert (out[pieces == 0] == 0).all() and set(np.unique(out)) == {0, 3, 4}


def test_measure_cells_refuses_labels_the_kernels_cannot_index() -> None:
    nuclei = np.zeros((6, 6), np.int32)
    nuclei[1:3, 1:3] = 1
    cells = np.where(nuclei > 0, 1, 0).astype(np.int32)
    dab = np.zeros((6, 6), np.float32)
    intensity = IntensitySettings()
    with pytest.raises(ValueError, match="differ in shape"):
        measure_cells(nuclei, cells, dab, dab[:5], dab, 0.5, intensity)
    with pytest.raises(ValueError, match=r"cell labels must lie in 0\.\.1"):
        measure_cells(nuclei, np.where(cells > 0, 2, 0).astype(np.int32), dab, dab, dab, 0.5, intensity)
    gap = np.where(nuclei > 0, 2, 0).astype(np.int32)  # label 1 has no pixel
    with pytest.raises(ValueError, match="nucleus 1 has no pixel"):
        measure_cells(gap, gap, dab, dab, dab, 0.5, intensity)


@pytest.mark.skipif(not hasattr(numba.config, "CACHE_LOCATOR_CLASSES"), reason="numba without locator override")
def test_kernels_work_without_a_writable_cache(tmp_path: Path) -> None:
    # Only the user-wide cache may be used, and its folder cannot be made (a file is in the way).
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    env = {
        **os.environ,
        "NUMBA_CACHE_LOCATOR_CLASSES": "UserWideCacheLocator",
        "XDG_CACHE_HOME": str(blocker),
        "HOME": str(blocker),
    }
    env.pop("NUMBA_CACHE_DIR", None)
    code = (
        "import numpy as np; from pipeline import kernels; "
        "one = np.ones((3, 3), np.int32); od = np.full((3, 3), 0.5, np.float32); "
        "print(kernels._CACHE, kernels.cell_stats(one, one, od, od, 1)[kernels.CELL_DAB_SUM, 0])"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "4.5"]
    assert "NUMBA_CACHE_DIR" in done.stderr

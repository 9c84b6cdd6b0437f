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


def test_nearest_labels_follow_the_raster_numbering_of_nucleus_pixels() -> None:
    # Label 2 comes first in raster order and label 1 spans several rows.
    nuclei = np.zeros((12, 30), np.int32)
    nuclei[2:4, 20:23] = 1
    nuclei[5:8, 18:21] = 1
    nuclei[1, 3:5] = 2
    nuclei[9, 4] = 3
    dist, nearest = cv2.distanceTransformWithLabels(
        (nuclei == 0).view(np.uint8), cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_PIXEL
    )
    cells = kernels.nearest_labels(nuclei, nearest, dist, 3.0)
    # Brute force: the label of the nearest nucleus pixel, cut at the same distances.
    ny, nx = np.nonzero(nuclei)
    yy, xx = np.indices(nuclei.shape)
    d2 = (yy[..., None] - ny) ** 2 + (xx[..., None] - nx) ** 2
    want = np.where(dist <= 3.0, nuclei[ny, nx][d2.argmin(axis=-1)], 0)
    unique = np.sort(d2, axis=-1)[..., 1] > np.sort(d2, axis=-1)[..., 0]  # no tie between two nucleus pixels
    assert (cells[unique] == want[unique]).all()
    assert (cells[nuclei > 0] == nuclei[nuclei > 0]).all()
    assert cells[2, 10] == 0 and cells[1, 6] == 2 and cells[10, 4] == 3


def test_split_trim_filter_by_hand() -> None:
    pieces = np.zeros((4, 8), np.int32)
    pieces[0:2, 0:4] = 1  # 8 px: fine falls from 1.0 to 0.4 across it
    pieces[3, 5:8] = 2  # 3 px
    pieces[0, 6] = 3  # 1 px
    fine = np.zeros(pieces.shape, np.float32)
    fine[0:2, 0:4] = [1.0, 0.8, 0.5, 0.4]
    fine[3, 5:8] = [0.9, 0.2, 0.9]
    fine[0, 6] = 0.7
    no_split, no_peaks = np.zeros((0, 0), np.int32), np.zeros((0, 0), bool)
    empty = np.zeros((0, 0), np.float32)
    # Areas in px × 1.0: 2..8 kept, in label order.
    out = kernels.split_trim_filter(pieces, 4, no_split, no_peaks, empty, 0.3, 2.0, 8.0, 1.0)
    assert out.max() == 2 and (out[pieces == 1] == 1).all() and (out[pieces == 2] == 2).all()
    assert (out[pieces == 3] == 0).all()
    # Trim at max(threshold 0.3, half the peak): piece 1 keeps ≥ 0.5 (6 px), piece 2 loses its 0.2.
    out = kernels.split_trim_filter(pieces, 4, no_split, no_peaks, fine, 0.3, 2.0, 8.0, 1.0)
    assert (out[0:2, 0:3] == 1).all() and (out[0:2, 3] == 0).all()
    assert out[3, 5] == 2 and out[3, 6] == 0 and out[3, 7] == 2
    # Split: two peak plateaus in piece 1; each pixel joins the nearest one of its own piece.
    peaks = np.zeros(pieces.shape, bool)
    peaks[0, 0] = peaks[1, 3] = True
    plateau = np.zeros(pieces.shape, np.int32)
    plateau[:, :2], plateau[:, 2:] = 1, 2  # as OpenCV's nearest-plateau labels would be here
    out = kernels.split_trim_filter(pieces, 4, plateau, peaks, empty, 0.3, 1.0, 8.0, 1.0)
    # Split parts are numbered after the pieces that keep their own label.
    assert (out[3, 5:8] == 1).all() and out[0, 6] == 2
    assert (out[0:2, 0:2] == 3).all() and (out[0:2, 2:4] == 4).all()


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

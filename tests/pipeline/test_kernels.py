"""Compiled per-cell passes against plain NumPy on random label images."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import kernels


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

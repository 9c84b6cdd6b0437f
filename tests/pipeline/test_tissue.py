from __future__ import annotations

import numpy as np
from PIL import Image

from adapter.synth import SynthOutput
from config.settings import TissueSettings
from dicom_io import open_slide
from pipeline.labels import Compartment
from pipeline.slide import TileGrid
from pipeline.tissue import TissueMask, detect_tissue


def test_tissue_matches_truth_and_glass_is_estimated(accuracy_slides: dict[str, SynthOutput]) -> None:
    out = accuracy_slides["typical"]
    assert out.ome_tiff
    with open_slide(out.ome_tiff) as s:
        tm = detect_tissue(s, TissueSettings())
    truth = np.array(Image.open(out.truth_dir / "compartments.png"))
    step = out.truth["truth_step_px"] * 0.5  # µm per truth pixel
    yy, xx = np.indices(tm.mask.shape)
    t = truth[
        np.clip(((yy + 0.5) * tm.mpp / step).astype(int), 0, truth.shape[0] - 1),
        np.clip(((xx + 0.5) * tm.mpp / step).astype(int), 0, truth.shape[1] - 1),
    ]
    tissue_truth = np.isin(t, (1, 2))
    iou = (tm.mask & tissue_truth).sum() / (tm.mask | tissue_truth).sum()
    assert iou > 0.9
    assert tm.glass_rgb is not None and np.allclose(tm.glass_rgb, 242, atol=3)
    assert not tm.mask[t == Compartment.FAT].mean() > 0.2  # fat is not tissue


def test_tile_fractions() -> None:
    mask = np.zeros((10, 10), bool)
    mask[:5, :5] = True
    tm = TissueMask(mask=mask, mpp=8.0, threshold_od=0.1)
    grid = TileGrid(mpp=4.0, width=20, height=20, tile_size=10)
    f = tm.tile_fractions(grid)
    assert f.tolist() == [[1.0, 0.0], [0.0, 0.0]]
    assert tm.area_mm2 == 25 * (8 / 1000) ** 2


def test_tissue_bounds_cut_an_edge_tile_to_its_tissue() -> None:
    # Mask at 8 µm/px: a tile of 256 px at 0.5 µm/px spans 16 × 16 mask pixels.
    mask = np.zeros((32, 32), bool)
    mask[2:4, 5:7] = True  # in the first tile: x 80..112 px, y 32..64 px
    mask[16:32, 16:32] = True  # the whole of the last tile
    tissue = TissueMask(mask=mask, mpp=8.0, threshold_od=0.1)
    # Grown by 4 µm = 8 px on each side, clipped to the core.
    assert tissue.tissue_bounds((0, 0, 256, 256), 0.5, 4.0) == (72, 24, 48, 48)
    assert tissue.tissue_bounds((0, 0, 256, 256), 0.5, 100.0) == (0, 0, 256, 256)
    assert tissue.tissue_bounds((256, 256, 256, 256), 0.5, 4.0) == (256, 256, 256, 256)
    # No tissue under the tile: the whole core (it was chosen for a reason).
    assert tissue.tissue_bounds((256, 0, 256, 256), 0.5, 4.0) == (256, 0, 256, 256)

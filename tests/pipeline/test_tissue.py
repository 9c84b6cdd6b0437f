from __future__ import annotations

import numpy as np
from PIL import Image

from adapter.synth import SynthOutput
from config.settings import TissueSettings
from dicom_io import open_slide
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
    assert not tm.mask[t == 3].mean() > 0.2  # fat is not tissue


def test_tile_fractions() -> None:
    mask = np.zeros((10, 10), bool)
    mask[:5, :5] = True
    tm = TissueMask(mask=mask, mpp=8.0, threshold_od=0.1)
    grid = TileGrid(mpp=4.0, width=20, height=20, tile_size=10)
    f = tm.tile_fractions(grid)
    assert f.tolist() == [[1.0, 0.0], [0.0, 0.0]]
    assert tm.area_mm2 == 25 * (8 / 1000) ** 2

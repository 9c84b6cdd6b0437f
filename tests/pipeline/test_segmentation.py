"""Tumour–stroma segmentation: the builtin map's resolution and edge, and the TorchScript plug-in path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from adapter.synth import SynthOutput
from config.errors import ConfigError
from config.settings import SegmentationSettings, StainSettings, TissueSettings
from dicom_io import open_slide
from pipeline.segmentation import (
    FAT_BACKGROUND,
    STROMA,
    TUMOUR,
    CompartmentMap,
    TorchScriptSegmenter,
    builtin_segmentation,
)
from pipeline.synth.toy_models import DarknessCompartments, save_exported, save_torchscript
from pipeline.tissue import TissueMask, detect_tissue


class _WrongOutput(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :2]


@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
def test_model_labels_the_slide(suffix: str, small_slide: SynthOutput, tmp_path: Path) -> None:
    path = tmp_path / f"dark{suffix}"
    model = (
        save_torchscript(DarknessCompartments(), path)
        if suffix == ".pt"
        else save_exported(DarknessCompartments(), path, "batch")
    )
    settings = SegmentationSettings(method="model", model=model, model_mpp=4.0, model_tile_size=64, batch_size=3)
    assert small_slide.ome_tiff
    with open_slide(small_slide.ome_tiff) as slide:
        tissue = detect_tissue(slide, TissueSettings())
        result = TorchScriptSegmenter(settings, StainSettings()).segment(slide, tissue, 255.0)
        rgb, _ = slide.read_at_mpp(tissue.mpp, 0, 0, tissue.mask.shape[1], tissue.mask.shape[0])
    assert result.method == f"model:dark{suffix}"
    assert result.labels.shape == tissue.mask.shape
    assert (result.labels[~tissue.mask] == FAT_BACKGROUND).all()
    dark = 1.0 - rgb.mean(-1) / 255.0
    inside = tissue.mask
    expected = np.where(dark > 0.25, TUMOUR, np.where(dark < 0.08, FAT_BACKGROUND, STROMA))
    agreement = (result.labels[inside] == expected[inside]).mean()
    assert agreement > 0.8  # the model saw 4 µm/px tiles, the check 8 µm/px pixels
    assert (result.labels == TUMOUR).any() and (result.labels == STROMA).any()
    # The model's tumour probability is kept (for the heat map): the softmax of its logits, so
    # where the darkness (here at 8 µm/px, the model saw 4) is well above the cut-off it is high, well
    # below it low.
    p = result.tumour_probability
    assert p is not None and p.shape == tissue.mask.shape and p.min() >= 0 and p.max() <= 1
    assert (p[~tissue.mask] == 0).all()
    assert p[inside & (dark > 0.4)].mean() > 0.7 and p[inside & (dark < 0.15)].mean() < 0.2
    assert p[result.labels == TUMOUR].mean() > p[result.labels == STROMA].mean() + 0.5


def test_model_errors_are_clear(small_slide: SynthOutput, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        TorchScriptSegmenter(SegmentationSettings(method="model", model=tmp_path / "none.pt"), StainSettings())
    junk = tmp_path / "junk.pt"
    junk.write_text("not a model")
    with pytest.raises(ConfigError, match=r"junk\.pt.*not a loadable TorchScript model"):
        TorchScriptSegmenter(SegmentationSettings(method="model", model=junk), StainSettings())
    wrong = save_torchscript(_WrongOutput(), tmp_path / "wrong.pt")
    seg = TorchScriptSegmenter(
        SegmentationSettings(method="model", model=wrong, model_mpp=8.0, model_tile_size=64), StainSettings()
    )
    assert small_slide.ome_tiff
    with open_slide(small_slide.ome_tiff) as slide:
        tissue = detect_tissue(slide, TissueSettings())
        with pytest.raises(ConfigError, match=r"output shape \(1, 2, 64, 64\) is not \(N, 4, H, W\)"):
            seg.segment(slide, tissue, 255.0)


def _crowded_disc(radius_um: float, spacing_um: float = 9.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nuclei (35 µm² each) on a square lattice filling a disc centred at (600, 600) µm."""
    g = np.arange(-radius_um, radius_um + 1e-9, spacing_um)
    xx, yy = np.meshgrid(g, g)
    inside = xx**2 + yy**2 <= radius_um**2
    x, y = xx[inside] + 600.0, yy[inside] + 600.0
    return x, y, np.full(x.shape, 35.0)


def _edge_um(map_um: float, margin_um: float, hole: bool = False) -> tuple[float, CompartmentMap]:
    """How far the builtin tumour region reaches beyond its outermost nuclei (equivalent radius)."""
    tissue = TissueMask(mask=np.ones((150, 150), bool), mpp=8.0, threshold_od=0.1)
    x, y, area = _crowded_disc(200.0)
    if hole:  # one undetected nucleus at the centre
        keep = np.hypot(x - 600, y - 600) > 1.0
        x, y, area = x[keep], y[keep], area[keep]
    settings = SegmentationSettings(map_um=map_um, refine_margin_um=margin_um)
    cmap = builtin_segmentation(x, y, area, tissue, settings)
    assert cmap.mpp == map_um and cmap.labels.shape == (round(150 * 8 / map_um),) * 2
    assert (cmap.lookup(x, y) == TUMOUR).all()
    outermost = float(np.hypot(x - 600, y - 600).max())
    assert cmap.lookup(np.array([630.0 + outermost]), np.array([600.0]))[0] == STROMA
    return float(np.sqrt(cmap.area_mm2(TUMOUR) * 1e6 / np.pi)) - outermost, cmap


@pytest.mark.parametrize("map_um", [8.0, 2.0])
def test_builtin_edge_lies_a_margin_beyond_the_outermost_nuclei(map_um: float) -> None:
    edge, _ = _edge_um(map_um, 10.0)
    # The lattice's outline runs up to half a spacing (4.5 µm) inside its outermost nucleus.
    assert 10.0 - 4.5 - map_um <= edge <= 10.0 + map_um


def test_builtin_fine_map_resolves_the_margin() -> None:
    """On a 2 µm map, 4 µm more margin moves the edge out by about 4 µm."""
    assert abs((_edge_um(2.0, 10.0)[0] - _edge_um(2.0, 6.0)[0]) - 4.0) <= 1.5


def test_builtin_region_has_no_hole_where_one_nucleus_was_missed() -> None:
    _, cmap = _edge_um(2.0, 10.0, hole=True)
    assert cmap.lookup(np.array([600.0]), np.array([600.0]))[0] == TUMOUR


def test_refine_margin_may_not_exceed_the_reach() -> None:
    with pytest.raises(ValidationError, match=r"refine_margin_um 20\.0 must not exceed refine_reach_um 16\.0"):
        SegmentationSettings(refine_margin_um=20.0)


def test_builtin_map_stays_within_its_pixel_budget() -> None:
    tissue = TissueMask(mask=np.ones((150, 150), bool), mpp=8.0, threshold_od=0.1)
    x, y, area = _crowded_disc(200.0)
    # 150² at 8 µm: 2 µm would be 0.36 MP, 4 µm 0.09 MP.
    cmap = builtin_segmentation(x, y, area, tissue, SegmentationSettings(map_um=2.0, map_max_mpx=0.1))
    assert cmap.mpp == 4.0 and cmap.labels.size <= 0.1e6

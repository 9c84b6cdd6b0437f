"""Tumour–stroma segmentation: the TorchScript plug-in path (the builtin is in test_analysis)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from adapter.synth import SynthOutput
from config.errors import ConfigError
from config.settings import SegmentationSettings, StainSettings, TissueSettings
from dicom_io import open_slide
from pipeline.segmentation import FAT_BACKGROUND, STROMA, TUMOUR, TorchScriptSegmenter
from pipeline.tissue import detect_tissue


class _DarknessModel(torch.nn.Module):
    """Tumour where the mean RGB darkness exceeds 0.25, fat/background where it is below 0.08."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dark = 1.0 - x.mean(1, keepdim=True)
        tumour = (dark - 0.25) * 50
        background = (0.08 - dark) * 50
        stroma = torch.zeros_like(dark)
        other = torch.full_like(dark, -100.0)
        return torch.cat([tumour, stroma, background, other], 1)


class _WrongOutput(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :2]


def _save(module: torch.nn.Module, path: Path) -> Path:
    torch.jit.script(module).save(str(path))
    return path


def test_torchscript_model_labels_the_slide(small_slide: SynthOutput, tmp_path: Path) -> None:
    model = _save(_DarknessModel(), tmp_path / "dark.pt")
    settings = SegmentationSettings(method="model", model=model, model_mpp=4.0, model_tile_size=64, batch_size=3)
    assert small_slide.ome_tiff
    with open_slide(small_slide.ome_tiff) as slide:
        tissue = detect_tissue(slide, TissueSettings())
        result = TorchScriptSegmenter(settings, StainSettings()).segment(slide, tissue, 255.0)
        rgb, _ = slide.read_at_mpp(tissue.mpp, 0, 0, tissue.mask.shape[1], tissue.mask.shape[0])
    assert result.method == "model:dark.pt"
    assert result.labels.shape == tissue.mask.shape
    assert (result.labels[~tissue.mask] == FAT_BACKGROUND).all()
    dark = 1.0 - rgb.mean(-1) / 255.0
    inside = tissue.mask
    expected = np.where(dark > 0.25, TUMOUR, np.where(dark < 0.08, FAT_BACKGROUND, STROMA))
    agreement = (result.labels[inside] == expected[inside]).mean()
    assert agreement > 0.8  # the model saw 4 µm/px tiles, the check 8 µm/px pixels
    assert (result.labels == TUMOUR).any() and (result.labels == STROMA).any()


def test_model_errors_are_clear(small_slide: SynthOutput, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        TorchScriptSegmenter(SegmentationSettings(method="model", model=tmp_path / "none.pt"), StainSettings())
    junk = tmp_path / "junk.pt"
    junk.write_text("not a model")
    with pytest.raises(ConfigError, match=r"junk\.pt.*not a loadable TorchScript model"):
        TorchScriptSegmenter(SegmentationSettings(method="model", model=junk), StainSettings())
    wrong = _save(_WrongOutput(), tmp_path / "wrong.pt")
    seg = TorchScriptSegmenter(
        SegmentationSettings(method="model", model=wrong, model_mpp=8.0, model_tile_size=64), StainSettings()
    )
    assert small_slide.ome_tiff
    with open_slide(small_slide.ome_tiff) as slide:
        tissue = detect_tissue(slide, TissueSettings())
        with pytest.raises(ConfigError, match=r"output shape \(1, 2, 64, 64\) is not \(N, 4, H, W\)"):
            seg.segment(slide, tissue, 255.0)

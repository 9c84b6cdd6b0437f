"""Integrated-gradients attributions of the model plug-ins."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image

from adapter.synth import SynthOutput
from config.settings import load_settings
from dicom_io import open_slide
from dicom_io.results import WrittenResults, write_results
from pipeline.analysis import SlideResult, analyse
from pipeline.explain import integrated_gradients
from pipeline.synth.toy_models import DarknessCompartments, HaematoxylinNuclei, save_torchscript
from tests.conftest import require_tool


def _total(out: torch.Tensor) -> torch.Tensor:
    return out.flatten(1).sum(1)


def test_attributions_of_a_linear_model_are_exact() -> None:
    """For f(x) = Σ w·x the attribution of each input is (x − baseline)·w, whatever the steps."""
    conv = torch.nn.Conv2d(3, 1, 1, bias=True)
    inp = torch.rand(1, 3, 8, 8)
    attr, gap = integrated_gradients(conv, inp, 1.0, _total, steps=4)
    w = conv.weight.detach().reshape(1, 3, 1, 1)
    assert torch.allclose(attr, (inp - 1.0) * w, atol=1e-6)
    assert float(attr.sum()) == pytest.approx(float(gap[0]), rel=1e-5)


def test_attributions_of_a_nonlinear_model_add_up_with_enough_steps() -> None:
    """Completeness: the attributions add up to f(input) − f(baseline), to within the midpoint
    rule's error, which shrinks as the steps grow."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(4, 1, 1))
    inp = torch.rand(1, 3, 16, 16)

    def miss(steps: int) -> float:
        attr, gap = integrated_gradients(model, inp, 0.0, _total, steps)
        return abs(float(attr.sum()) - float(gap[0])) / abs(float(gap[0]))

    coarse, fine = miss(2), miss(64)
    assert fine < 1e-3 and fine < coarse


def _explained_nuclei(source: Path, out: Path, steps: int) -> tuple[SlideResult, WrittenResults]:
    """``source`` scored with the toy haematoxylin nucleus model, explained on two tiles; results
    written under ``out``."""
    model = save_torchscript(HaematoxylinNuclei(), out / "nuclei.pt")
    overrides = [
        "tiling.workers=1",
        f'nuclei.model="{model}"',
        'nuclei.model_channels="hdab"',
        "explain.integrated_gradients=true",
        "explain.tiles=2",
        f"explain.steps={steps}",
    ]
    with open_slide(source) as slide:
        result = analyse(slide, load_settings("ki67", overrides))
        return result, write_results(result, slide, out / "out")


def test_a_nucleus_model_that_reads_haematoxylin_is_seen_to(small_slide: SynthOutput, tmp_path: Path) -> None:
    """The toy nucleus model's logit is 40 × (haematoxylin OD − 0.15): its attributions are
    haematoxylin OD × 40, so they correlate with haematoxylin (r > 0.99) and much less with DAB;
    written to the JSON, the CLI summary and an attribution PNG."""
    assert small_slide.ome_tiff
    result, written = _explained_nuclei(small_slide.ome_tiff, tmp_path, steps=8)
    (e,) = result.explanations
    assert e.model == "nuclei" and len(e.tiles) == 2
    assert e.hematoxylin_correlation > 0.99 and e.dab_correlation < e.hematoxylin_correlation - 0.2
    assert e.completeness_error < 1e-3
    record = json.loads(written.json.read_text())["explanations"][0]
    assert record["hematoxylin_correlation"] == pytest.approx(e.hematoxylin_correlation, abs=1e-4)
    assert record["method"] == "integrated gradients" and record["steps"] == 8
    mosaic = np.asarray(Image.open(written.overviews["attribution_nuclei"]))
    assert mosaic.shape[0] == 2 * e.tiles[0][1].shape[0]  # tiles above their attribution maps


def test_without_the_option_or_a_model_nothing_is_explained(small_slide: SynthOutput, tmp_path: Path) -> None:
    assert small_slide.ome_tiff
    model = save_torchscript(DarknessCompartments(), tmp_path / "seg.pt")
    seg = [
        "tiling.workers=1",
        'segmentation.method="model"',
        f'segmentation.model="{model}"',
        "explain.tiles=2",
        "explain.steps=4",
    ]
    with open_slide(small_slide.ome_tiff) as slide:
        off = analyse(slide, load_settings("ki67", seg))
        on = analyse(slide, load_settings("ki67", [*seg, "explain.integrated_gradients=true"]))
        no_model = analyse(slide, load_settings("ki67", ["tiling.workers=1", "explain.integrated_gradients=true"]))
    assert off.explanations == [] and no_model.explanations == []
    (e,) = on.explanations
    # Darkness (1 − mean RGB) drives the tumour logit: attributions follow the optical density.
    assert e.model == "segmentation" and e.target.startswith("tumour")
    assert e.hematoxylin_correlation > 0.5


def test_attributions_as_a_parametric_map(small_slide: SynthOutput, tmp_path: Path) -> None:
    """From a DICOM slide the attributions are also a Parametric Map on the heat maps' level: the
    mapped values over each explained tile average to the tile's mean attribution, there is no value
    elsewhere, and dciodvfy finds no error."""
    assert small_slide.dicom_dir
    result, written = _explained_nuclei(small_slide.dicom_dir, tmp_path, steps=4)
    (e,) = result.explanations
    (path,) = written.dicom["attribution"]
    pm = pydicom.dcmread(path)
    mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert mapping.LUTLabel == "IGATTR" and int(mapping.RealWorldValueFirstValueMapped) == 1
    stored = hd.image.Image.from_dataset(pm, copy=False).get_total_pixel_matrix(apply_real_world_transform=False)
    values = stored * float(mapping.RealWorldValueSlope) + float(mapping.RealWorldValueIntercept)
    mpp = float(pm.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing[0]) * 1000
    inside = np.zeros(stored.shape, bool)
    for (x_um, y_um), _, attribution in e.tiles:
        r0, c0 = round(y_um / mpp), round(x_um / mpp)
        r1, c1 = r0 + round(attribution.shape[0] * e.mpp / mpp), c0 + round(attribution.shape[1] * e.mpp / mpp)
        inside[r0:r1, c0:c1] = True
        assert values[r0:r1, c0:c1].mean() == pytest.approx(float(attribution.mean()), rel=0.01)
    assert (stored[~inside] == 0).all() and (stored[inside] > 0).all()
    # The correlations are measurements of the SR's slide group too.
    sr = pydicom.dcmread(written.dicom["sr"][0])
    found = {}

    def walk(items: pydicom.Sequence) -> None:
        for item in items:
            code = item.ConceptNameCodeSequence[0].CodeValue if "ConceptNameCodeSequence" in item else ""
            if code.startswith("IG-R-") and "MeasuredValueSequence" in item:
                found[code] = float(item.MeasuredValueSequence[0].NumericValue)
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    assert found["IG-R-H-NUC"] == pytest.approx(e.hematoxylin_correlation, abs=1e-6)
    assert found["IG-R-DAB-NUC"] == pytest.approx(e.dab_correlation, abs=1e-6)
    for obj in (path, written.dicom["sr"][0]):
        run = subprocess.run([require_tool("dciodvfy"), str(obj)], capture_output=True, text=True, timeout=120)
        assert not [line for line in run.stderr.splitlines() if line.startswith("Error")], run.stderr

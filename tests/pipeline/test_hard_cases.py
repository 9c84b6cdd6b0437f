"""The hard cases of real slides, drawn by the generator with their truth: a pale counterstain, a
very pale one, brown nuclei whose haematoxylin strong DAB hides, and a scanner colour cast. Per-cell
DAB is drawn continuously across the class cut-offs. The bounds sit at what the default ``ki67``
profile achieves on these slides (``python bench/accuracy.py --hard`` prints the same figures on
larger ones), with a margin for the slides' randomness."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.spatial import cKDTree

from adapter.synth import SynthOutput, generate
from config.settings import load_settings
from dicom_io import open_slide
from dicom_io.tiff_writer import write_rgb_ome_tiff
from pipeline.analysis import SlideResult, analyse
from pipeline.synth.cases import hard_cases
from pipeline.synth.scanner import SCANNER_DIFFERENCES, apply, counterstain
from pipeline.tissue import detect_tissue
from tests.conftest import shared_file

#: The hard cases of ``bench/accuracy.py --hard``, on smaller slides.
HARD_SPECS = {
    name: spec
    for name, spec in hard_cases(1536).items()
    if name in ("pale_counterstain", "very_pale_counterstain", "dab_dominant", "colour_cast")
}


@dataclass(frozen=True)
class Measured:
    recall: float
    recall_dab_positive: float
    ki67_error: float
    tissue_iou: float
    result: SlideResult


def _measure(out: SynthOutput) -> Measured:
    assert out.ome_tiff
    settings = load_settings("ki67")
    with open_slide(out.ome_tiff) as slide:
        result = analyse(slide, settings)
        tissue = detect_tissue(slide, settings.tissue)
    truth = dict(np.load(out.truth_dir / "cells.npz"))
    mpp = out.truth["spec"]["mpp"]
    t = np.stack([truth["x_px"] * mpp, truth["y_px"] * mpp], 1)
    f = np.stack([result.cells["x_um"], result.cells["y_um"]], 1)
    d, j = cKDTree(t).query(f, distance_upper_bound=4.0)
    found = np.zeros(len(t), bool)
    found[j[np.isfinite(d)]] = True
    strong = truth["intensity_class"] >= 2
    labels = np.array(Image.open(out.truth_dir / "compartments.png"))
    step_um = out.truth["truth_step_px"] * mpp
    yy, xx = np.indices(tissue.mask.shape)
    rows = np.clip(((yy + 0.5) * tissue.mpp / step_um).astype(int), 0, labels.shape[0] - 1)
    cols = np.clip(((xx + 0.5) * tissue.mpp / step_um).astype(int), 0, labels.shape[1] - 1)
    real = np.isin(labels[rows, cols], (1, 2))
    iou = float((tissue.mask & real).sum() / (tissue.mask | real).sum())
    want = out.truth["compartments"]["tumour"]["positive_percent"]
    return Measured(
        recall=float(found.mean()),
        recall_dab_positive=float(found[strong].mean()),
        ki67_error=float(result.compartment_stats["tumour"]["positive_percent"] - want),
        tissue_iou=iou,
        result=result,
    )


@pytest.fixture(scope="module")
def hard(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Measured]:
    root = Path(tmp_path_factory.mktemp("hard"))
    return {
        name: _measure(generate(spec, root / name, formats=("ome",), workers=2)) for name, spec in HARD_SPECS.items()
    }


@pytest.mark.parametrize("name", ["pale_counterstain", "very_pale_counterstain"])
def test_pale_counterstain_tissue_and_nuclei_are_found(name: str, hard: dict[str, Measured]) -> None:
    m = hard[name]
    assert m.tissue_iou >= 0.9  # pale stroma is tissue (a fixed OD cut-off found 0.41 of it)
    assert m.recall >= 0.95  # a fixed threshold of 0.1 OD found 0.76 on the very pale slide
    assert abs(m.ki67_error) <= 3.0


def test_the_threshold_adapts_only_to_a_pale_counterstain(hard: dict[str, Measured]) -> None:
    very_pale, cast = hard["very_pale_counterstain"].result.detection, hard["colour_cast"].result.detection
    assert very_pale["adaptive"] and very_pale["threshold"] < very_pale["configured_threshold"] == 0.1
    assert cast["threshold"] == 0.1


def test_brown_nuclei_whose_haematoxylin_is_hidden_are_found(hard: dict[str, Measured]) -> None:
    m = hard["dab_dominant"]
    assert m.recall_dab_positive >= 0.95  # haematoxylin alone as the detection image: 0.44
    assert abs(m.ki67_error) <= 2.0  # haematoxylin alone: -15.6 points


def test_a_scanner_colour_cast_is_taken_out_with_the_glass_colour(hard: dict[str, Measured]) -> None:
    m = hard["colour_cast"]
    glass = m.result.stain["background"]
    assert isinstance(glass, tuple) and glass[2] < glass[1] < glass[0]  # the cast's own glass, not 255
    assert m.tissue_iou >= 0.9  # the cast glass is not tissue
    assert abs(m.ki67_error) <= 2.0  # white 255: +20.5 points


@pytest.mark.parametrize("name", ["gamma 0.85", "gamma 1.15", "warmer white balance", "all together"])
def test_a_real_slide_under_another_scanners_colours(name: str, tmp_path: Path) -> None:
    """The real Ki-67 crop under a simulated scanner colour difference (``bench/drift.py``): the
    index stays within 1.5 points of the original's (a tone curve scales every density; the
    adaptive threshold follows it down: with the earlier fraction 0.5, gamma 0.85 moved it 2.4)."""
    with open_slide(shared_file("OS-2-vsi.ome.tif")) as slide:
        level = slide.levels[0]
        pixels = slide.read_region(0, 0, 0, level.width, level.height)
        original = analyse(slide, load_settings("ki67", ["tiling.workers=1"])).scores["ki67_index_percent"]
    copy = _scored_copy(apply(SCANNER_DIFFERENCES[name], pixels), level.mpp_x, tmp_path / "copy.ome.tif")
    scored = copy.scores["ki67_index_percent"]
    assert abs(scored - original) <= 1.5, (name, scored, original)


def _scored_copy(pixels: np.ndarray, mpp: float, path: Path) -> SlideResult:
    with open_slide(write_rgb_ome_tiff(pixels, mpp, path)) as slide:
        return analyse(slide, load_settings("ki67", ["tiling.workers=1"]))


def test_a_real_slide_with_a_paler_counterstain(tmp_path: Path) -> None:
    """The real Ki-67 crop redrawn with less haematoxylin: at 0.6 of it the adaptive threshold still
    finds 90 % of the original's nuclei and the index holds (a threshold at half the nuclear level,
    the earlier rule, found 49 % and read 50 %); at 0.4 the result carries PALE_COUNTERSTAIN, and at
    0.25, where a third of the nuclei are lost, it is not valid (QC_FAILED)."""
    with open_slide(shared_file("OS-2-vsi.ome.tif")) as slide:
        level = slide.levels[0]
        pixels = slide.read_region(0, 0, 0, level.width, level.height)
    original = _scored_copy(pixels, level.mpp_x, tmp_path / "original.ome.tif")
    where = np.c_[original.cells["x_um"], original.cells["y_um"]]
    codes = {}
    for scale in (0.6, 0.4, 0.25):
        result = _scored_copy(apply(counterstain(scale), pixels), level.mpp_x, tmp_path / f"h{scale}.ome.tif")
        codes[scale] = {a["code"] for a in result.alerts}
        if scale == 0.6:
            d, _ = cKDTree(np.c_[result.cells["x_um"], result.cells["y_um"]]).query(where, distance_upper_bound=4.0)
            assert np.isfinite(d).mean() >= 0.9
            ki67 = result.scores["ki67_index_percent"]
            assert abs(ki67 - original.scores["ki67_index_percent"]) <= 2.0
    assert not codes[0.6] & {"PALE_COUNTERSTAIN", "QC_FAILED"}
    assert "PALE_COUNTERSTAIN" in codes[0.4] and "QC_FAILED" not in codes[0.4]
    assert "QC_FAILED" in codes[0.25]

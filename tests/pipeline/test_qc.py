"""Quality control before scoring: marker ink and folds are found, left out and reported."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import tifffile
from PIL import Image

from adapter.synth import SynthOutput, generate
from config.settings import QcSettings, load_settings
from dicom_io import open_slide
from dicom_io.results import write_results
from dicom_io.seg import read_headers, sample_on_level
from dicom_io.tiff_writer import write_rgb_ome_tiff
from pipeline.analysis import SlideResult, analyse
from pipeline.qc import Artefact, QcMap, artefacts_from_rgb
from pipeline.stains import StainMatrix
from pipeline.synth import SynthSpec
from pipeline.tissue import TissueMask, low_resolution, tissue_from_rgb
from tests.conftest import require_tool, shared_file

Twins = dict[str, tuple[SynthOutput, SlideResult]]


def _analysed_twins(root: Path, specs: dict[str, SynthSpec]) -> Twins:
    """Each spec generated as OME-TIFF under ``root`` and analysed with the ki67 profile."""
    out = {}
    for name, spec in specs.items():
        slide = generate(spec, root / name, formats=("ome",))
        assert slide.ome_tiff
        with open_slide(slide.ome_tiff) as s:
            out[name] = (slide, analyse(s, load_settings("ki67", ["tiling.workers=1"])))
    return out


@pytest.fixture(scope="module")
def inked(tmp_path_factory: pytest.TempPathFactory) -> Twins:
    """One slide with three marker strokes and its clean twin (the same cells, no ink)."""
    specs = {
        name: SynthSpec(width=2048, height=2048, seed=51, pen_strokes=n) for name, n in (("inked", 3), ("clean", 0))
    }
    return _analysed_twins(Path(tmp_path_factory.mktemp("qc")), specs)


def _tissue_and_qc(path: Path) -> tuple[TissueMask, QcMap]:
    """Tissue and the ink/fold map of a slide with the ki67 profile, from one low-resolution read
    as :func:`pipeline.analysis.analyse` does."""
    settings = load_settings("ki67")
    with open_slide(path) as s:
        low, mpp = low_resolution(s, settings.tissue)
    tissue = tissue_from_rgb(low, mpp, settings.tissue)
    return tissue, artefacts_from_rgb(low, tissue, settings.qc, StainMatrix())


def _truth_on_qc_grid(slide: SynthOutput, name: str, qc: QcMap) -> np.ndarray:
    """The generator's truth mask ``truth/<name>.png`` at the centres of the QC map's pixels."""
    truth = np.array(Image.open(slide.truth_dir / f"{name}.png")) > 0
    step = slide.truth["truth_step_px"] * 0.5
    yy, xx = np.indices(qc.labels.shape)
    rows = np.clip(((yy + 0.5) * qc.mpp / step).astype(int), 0, truth.shape[0] - 1)
    cols = np.clip(((xx + 0.5) * qc.mpp / step).astype(int), 0, truth.shape[1] - 1)
    return truth[rows, cols]


def _iou_on_tissue(slide: SynthOutput, result: SlideResult, name: str, kind: Artefact) -> float:
    """IoU of the ``kind`` areas of the result's QC map with the generator's ``truth/<name>.png``,
    on the tissue as detected (artefacts included)."""
    q = result.qc_map
    assert q is not None
    found, real = q.labels == kind, _truth_on_qc_grid(slide, name, q)
    tissue = result.tissue.mask | (q.labels != Artefact.NONE)
    return float((found & real & tissue).sum() / ((found | real) & tissue).sum())


def test_marker_ink_is_found_where_the_generator_drew_it(inked: Twins) -> None:
    slide, _ = inked["inked"]
    assert slide.ome_tiff
    _, qc = _tissue_and_qc(slide.ome_tiff)
    real, found = _truth_on_qc_grid(slide, "ink", qc), qc.labels == Artefact.INK
    assert (real & found).sum() / (real | found).sum() >= 0.8


def test_inked_cells_are_left_out_and_the_score_holds(inked: Twins) -> None:
    slide, result = inked["inked"]
    _, clean = inked["clean"]
    truth = np.array(Image.open(slide.truth_dir / "ink.png")) > 0
    step = slide.truth["truth_step_px"] * 0.5
    scored = np.isin(result.cells["compartment"], (1, 2))
    rows = (result.cells["y_um"][scored] / step).astype(int).clip(0, truth.shape[0] - 1)
    cols = (result.cells["x_um"][scored] / step).astype(int).clip(0, truth.shape[1] - 1)
    assert truth[rows, cols].mean() < 0.01  # no scored cell under the ink
    assert result.qc["ink"]["area_mm2"] > 0.01 and 0 < result.qc["ink"]["percent_of_tissue"] < 50
    assert clean.qc == {}
    ki67, ki67_clean = result.scores["ki67_index_percent"], clean.scores["ki67_index_percent"]
    assert abs(ki67 - ki67_clean) <= 2.0
    assert "QC_FAILED" not in [a["code"] for a in result.alerts]
    assert json.loads(json.dumps(result.to_json()))["qc"]["ink"]["area_mm2"] == pytest.approx(
        result.qc["ink"]["area_mm2"]
    )


def test_too_little_usable_tissue_is_not_valid(inked: Twins) -> None:
    slide, _ = inked["inked"]
    assert slide.ome_tiff
    with open_slide(slide.ome_tiff) as s:
        strict = analyse(s, load_settings("ki67", ["tiling.workers=1", "qc.min_usable_fraction=0.99"]))
    (failed,) = [a for a in strict.alerts if a["code"] == "QC_FAILED"]
    assert "not valid" in failed["message"] and "ink" in failed["message"]


def test_a_fold_absorbs_in_both_stains() -> None:
    stains = StainMatrix()
    conc = np.zeros((40, 40, 3))
    conc[..., 0], conc[..., 1] = 0.3, 0.15  # ordinary stained tissue
    conc[10:25, 10:25, 0], conc[10:25, 10:25, 1] = 0.9, 0.8  # two layers
    rgb = np.clip(stains.concentrations_to_rgb(conc), 0, 255).astype(np.uint8)
    tissue = TissueMask(mask=np.ones((40, 40), bool), mpp=8.0, threshold_od=0.05, glass_rgb=(255.0, 255.0, 255.0))
    labels = artefacts_from_rgb(rgb, tissue, QcSettings(min_area_um2=0), stains).labels
    assert (labels[10:25, 10:25] == Artefact.FOLD).all()
    assert (labels[30:, 30:] == Artefact.NONE).all()


@pytest.mark.parametrize("name", ["OS-2-vsi.ome.tif", "OS-1-detail.ome.tif", "cmu_small_region.svs"])
def test_clean_real_slides_lose_at_most_two_percent(name: str) -> None:
    tissue, qc = _tissue_and_qc(shared_file(name))
    assert (qc.mask & tissue.mask).sum() <= 0.02 * tissue.mask.sum()


@pytest.fixture(scope="module")
def defocused(tmp_path_factory: pytest.TempPathFactory) -> Twins:
    """A slide with two out-of-focus patches (σ 2.5 µm) and its sharp twin."""
    specs = {
        name: SynthSpec(width=3072, height=3072, seed=61, blur_patches=n) for name, n in (("blurred", 2), ("sharp", 0))
    }
    return _analysed_twins(Path(tmp_path_factory.mktemp("blur")), specs)


def test_out_of_focus_patches_are_found_and_left_out(defocused: Twins) -> None:
    slide, result = defocused["blurred"]
    _, sharp = defocused["sharp"]
    assert result.qc_map is not None and sharp.qc == {}
    truth = np.array(Image.open(slide.truth_dir / "blur.png")) > 0
    step = slide.truth["truth_step_px"] * 0.5
    q = result.qc_map
    found, real = q.labels == Artefact.BLUR, _truth_on_qc_grid(slide, "blur", q)
    tissue = result.tissue.mask | found
    iou = ((found & real & tissue).sum()) / ((found | real) & tissue).sum()
    assert iou >= 0.8  # 48 µm blocks on a disc's rim
    scored = np.isin(result.cells["compartment"], (1, 2))
    r = (result.cells["y_um"][scored] / step).astype(int).clip(0, truth.shape[0] - 1)
    c = (result.cells["x_um"][scored] / step).astype(int).clip(0, truth.shape[1] - 1)
    assert truth[r, c].mean() < 0.05  # blurred cells are (nearly all) left out
    assert abs(result.scores["ki67_index_percent"] - sharp.scores["ki67_index_percent"]) <= 2.0


@pytest.mark.parametrize("name", ["OS-2-vsi.ome.tif", "cmu_small_region.svs", "OS-1-detail.ome.tif", "skimage"])
def test_clean_real_slides_lose_at_most_two_percent_to_any_check(name: str, tmp_path: Path) -> None:
    """Every check, those on the tiles (focus, over-exposure, bubbles) included, on real slides
    without artefacts; ``skimage`` is scikit-image's real H-DAB image (taken as 0.5 µm/px)."""
    if name == "skimage":
        from skimage import data

        path = write_rgb_ome_tiff(data.immunohistochemistry(), 0.5, tmp_path / "ihc.ome.tif")
    else:
        path = shared_file(name)
    with open_slide(path) as s:
        result = analyse(s, load_settings("ki67", ["tiling.workers=1"]))
    left_out = sum(v["percent_of_tissue"] for v in result.qc.values())
    assert left_out <= 2.0, result.qc


def test_folds_over_pale_tissue_are_found_by_their_doubled_floor(tmp_path: Path) -> None:
    """Opt-in ``qc.fold_floor_ratio``: the generator's folds (the section lying twice, pale where
    the tissue is) double the haematoxylin floor between the nuclei; the folded blocks are left out,
    they match the folds on the tissue, and the Ki-67 index stays within 2 points of the fold-free
    twin's. Off (the default), the both-stains rule finds none of them."""
    on = ["tiling.workers=1", "qc.fold_floor_ratio=1.6"]
    results = {}
    for name, folds in (("folded", 2), ("flat", 0)):
        slide = generate(SynthSpec(width=3072, height=3072, seed=71, folds=folds), tmp_path / name, formats=("ome",))
        assert slide.ome_tiff
        with open_slide(slide.ome_tiff) as s:
            results[name] = (slide, analyse(s, load_settings("ki67", on)))
            if folds:
                assert "fold" not in analyse(s, load_settings("ki67", ["tiling.workers=1"])).qc
    (slide, result), (_, flat) = results["folded"], results["flat"]
    assert "fold" in result.qc and flat.qc == {}
    iou = _iou_on_tissue(slide, result, "fold", Artefact.FOLD)
    assert iou >= 0.8, iou  # 0.92: 16 µm blocks on the folds' edges
    assert abs(result.scores["ki67_index_percent"] - flat.scores["ki67_index_percent"]) <= 2.0


@pytest.mark.parametrize("name", ["OS-2-vsi.ome.tif", "skimage", "cmu_small_region.svs"])
def test_real_slides_have_no_doubled_floor(name: str, tmp_path: Path) -> None:
    """The fold-floor rule on the real IHC images and CMU-1's H&E: nothing called a fold (on
    scikit-image's, strong membranous DAB would be, without the DAB guard and the minimum floor;
    CMU-1's epidermis, 10.7 %, without the second pass)."""
    if name == "skimage":
        from skimage import data

        path = write_rgb_ome_tiff(data.immunohistochemistry(), 0.5, tmp_path / "ihc.ome.tif")
    else:
        path = shared_file(name)
    with open_slide(path) as s:
        result = analyse(s, load_settings("ki67", ["tiling.workers=1", "qc.fold_floor_ratio=1.6"]))
    assert "fold" not in result.qc, result.qc


def test_debris_is_found_as_solid_grey_and_left_out(tmp_path: Path) -> None:
    """The generator's debris (grey particles 15–50 µm in radius): the grey pieces are left out as
    debris (not as folds, though they are dark in both stains), they match the particles on the
    tissue, and the Ki-67 index stays within 2 points of the debris-free twin's."""
    twins = _analysed_twins(
        tmp_path, {n: SynthSpec(width=3072, height=3072, seed=81, debris=k) for n, k in (("dusty", 12), ("clean", 0))}
    )
    slide, result = twins["dusty"]
    _, clean = twins["clean"]
    assert set(result.qc) == {"debris"} and clean.qc == {}
    iou = _iou_on_tissue(slide, result, "debris", Artefact.DEBRIS)
    assert iou >= 0.8, iou  # 0.95
    assert abs(result.scores["ki67_index_percent"] - clean.scores["ki67_index_percent"]) <= 2.0


def test_bubbles_are_found_by_their_grey_rim_and_left_out(tmp_path: Path) -> None:
    """The generator's air bubbles (a grey rim, the tissue inside paler and softened): the areas
    their rims enclose are left out as bubbles (not as out of focus), they match the bubbles on
    the tissue, and the Ki-67 index stays within 2 points of the bubble-free twin's."""
    twins = _analysed_twins(
        tmp_path, {n: SynthSpec(width=3072, height=3072, seed=75, bubbles=k) for n, k in (("bubbles", 3), ("clean", 0))}
    )
    slide, result = twins["bubbles"]
    _, clean = twins["clean"]
    assert "bubble" in result.qc and clean.qc == {}
    iou = _iou_on_tissue(slide, result, "bubble", Artefact.BUBBLE)
    assert iou >= 0.8, iou  # 0.96: the tissue grid's 8 µm pixels on the rims
    assert result.qc_map is not None and not (result.qc_map.labels == Artefact.BLUR).any()  # insides: bubbles
    assert abs(result.scores["ki67_index_percent"] - clean.scores["ki67_index_percent"]) <= 2.0


def test_qc_areas_are_segments_of_the_dicom_seg(tmp_path: Path) -> None:
    """Ink left out by quality control is a SEG segment of its own (Physical object / Image
    artifact(s)), drawn where the QC map says; the tumour and stroma segments and the SR stay as
    they were; dciodvfy finds no error."""
    slide = generate(SynthSpec(width=1536, height=1536, seed=52, pen_strokes=2), tmp_path / "s", formats=("dicom",))
    assert slide.dicom_dir
    with open_slide(slide.dicom_dir) as s:
        result = analyse(s, load_settings("ki67", ["tiling.workers=1", "outputs.heatmap=true"]))
        written = write_results(result, s, tmp_path / "out")
    assert result.qc_map is not None and "ink" in result.qc
    seg = pydicom.dcmread(written.dicom["seg"][0])
    labels = [str(item.SegmentLabel) for item in seg.SegmentSequence]
    assert labels == ["tumour", "stroma", "QC ink"]
    qc_item = seg.SegmentSequence[2]
    assert qc_item.SegmentedPropertyTypeCodeSequence[0].CodeValue == "111207"
    assert qc_item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "260787004"
    volumes = read_headers(sorted(slide.dicom_dir.glob("*.dcm")))
    level = next(v for v in volumes if v.SOPInstanceUID == seg.SourceImageSequence[0].ReferencedSOPInstanceUID)
    expected = sample_on_level(result.qc_map.labels, result.qc_map.mpp, level) == Artefact.INK
    pixels = hd.seg.Segmentation.from_dataset(seg).get_total_pixel_matrix(combine_segments=False)
    assert np.array_equal(pixels[..., 2] > 0, expected)
    # The share of each block left out is a Parametric Map of its own (strokes 30–60 µm wide: a
    # third or so of a 128 µm block).
    qc_pm = pydicom.dcmread(written.dicom["heatmap"][-1])
    assert qc_pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0].LUTLabel == "QCPCT"
    stored = hd.image.Image.from_dataset(qc_pm, copy=False).get_total_pixel_matrix(apply_real_world_transform=False)
    ink_on_pm = sample_on_level(result.qc_map.labels, result.qc_map.mpp, level) == Artefact.INK
    assert stored.max() > 20 and (stored[ink_on_pm] > 1).mean() > 0.9
    require_tool("dciodvfy")
    for path in [*written.dicom["seg"], qc_pm.filename]:
        out = subprocess.run(["dciodvfy", "-new", str(path)], capture_output=True, text=True).stderr
        assert not [line for line in out.splitlines() if line.startswith("Error")], out


def test_qc_areas_in_the_ome_label_image(inked: Twins, tmp_path: Path) -> None:
    slide, result = inked["inked"]
    assert slide.ome_tiff and result.qc_map is not None
    with open_slide(slide.ome_tiff) as s:
        written = write_results(result, s, tmp_path)
    with tifffile.TiffFile(written.ome["labels"]) as tif:
        labels = tif.pages[0].asarray()
        legend = tif.ome_metadata or ""
    assert "qc_ink" in legend
    ink = labels == 10 + Artefact.INK
    assert ink.any() and not (ink & np.isin(labels, (1, 2))).any()
    mpp = result.compartments.mpp
    rows, cols = np.nonzero(ink)
    qc_rows = ((rows + 0.5) * mpp / result.qc_map.mpp).astype(int)
    qc_cols = ((cols + 0.5) * mpp / result.qc_map.mpp).astype(int)
    assert (result.qc_map.labels[qc_rows, qc_cols] == Artefact.INK).all()


def test_near_black_is_saturated_and_green_is_ink() -> None:
    """A near-black patch (black ink, dirt, a dark fold: nothing measurable) is SATURATED; a green
    stroke is INK; stained tissue is neither."""
    rgb = np.full((40, 40, 3), (170, 150, 190), np.uint8)  # bluish tissue
    rgb[5:20, 5:20] = (12, 10, 14)
    rgb[25:35, 5:35] = (60, 170, 90)
    tissue = TissueMask(mask=np.ones((40, 40), bool), mpp=8.0, threshold_od=0.05, glass_rgb=(255.0, 255.0, 255.0))
    labels = artefacts_from_rgb(rgb, tissue, QcSettings(min_area_um2=0), StainMatrix()).labels
    assert (labels[5:20, 5:20] == Artefact.SATURATED).all()
    assert (labels[25:35, 5:35] == Artefact.INK).all()
    assert (labels[36:, 36:] == Artefact.NONE).all()


def test_the_cut_edge_is_left_out_only_when_asked() -> None:
    """``qc.edge_um``: the rim of the tissue's outer edge, not the rim of a lumen inside it."""
    yy, xx = np.indices((60, 60))
    mask = (yy - 30) ** 2 + (xx - 30) ** 2 <= 25**2
    mask &= (yy - 30) ** 2 + (xx - 30) ** 2 > 5**2  # a lumen
    tissue = TissueMask(mask=mask, mpp=8.0, threshold_od=0.05, glass_rgb=(255.0, 255.0, 255.0))
    rgb = np.where(mask[..., None], np.uint8(180), np.uint8(255)).astype(np.uint8).repeat(3, -1)
    off = artefacts_from_rgb(rgb, tissue, QcSettings(min_area_um2=0), StainMatrix()).labels
    assert not off.any()
    on = artefacts_from_rgb(rgb, tissue, QcSettings(min_area_um2=0, edge_um=24.0), StainMatrix()).labels
    r = np.hypot(yy - 30, xx - 30)
    assert (on[mask & (r >= 23)] == Artefact.EDGE).all()  # within 3 px of the outer edge
    assert (on[mask & (r <= 18)] == Artefact.NONE).all()  # the lumen's rim is not an edge
    assert not on[~mask].any()


def test_a_slide_without_counterstain_is_not_valid(tmp_path: Path) -> None:
    """Nuclear haematoxylin at 5 % of the usual strength: no nucleus can be found reliably, so the
    result says QC_FAILED and why; the very pale but present counterstain of the hard cases (level
    0.12) is scored, with a PALE_COUNTERSTAIN alert."""
    for scale, fails in ((0.05, True), (0.2, False)):
        slide = generate(
            SynthSpec(width=1024, height=1024, seed=53, counterstain_scale=scale), tmp_path / str(scale), ("ome",)
        )
        assert slide.ome_tiff
        with open_slide(slide.ome_tiff) as s:
            result = analyse(s, load_settings("ki67", ["tiling.workers=1"]))
        failed = [a["message"] for a in result.alerts if a["code"] == "QC_FAILED"]
        assert bool(failed) == fails, (scale, result.detection)
        if fails:
            assert "too little counterstain" in failed[0] and "qc.min_counterstain_od" in failed[0]
        else:
            (pale,) = [a["message"] for a in result.alerts if a["code"] == "PALE_COUNTERSTAIN"]
            assert "qc.pale_counterstain_od" in pale


def test_overexposed_discs_are_found_and_left_out(tmp_path: Path) -> None:
    """The generator's over-exposed discs (1.3 × the light, clipped at white): the blocks where half
    the pixels lie near a clipped one are left out, they match the discs' tissue, and the
    Ki-67 index stays within 2 points of the twin's without them. Real slides lose nothing to it
    (``test_clean_real_slides_lose_at_most_two_percent``, ``test_sharp_real_slides_...``)."""
    twins = _analysed_twins(
        tmp_path, {n: SynthSpec(width=3072, height=3072, seed=76, overexposed=k) for n, k in (("bright", 2), ("ok", 0))}
    )
    slide, result = twins["bright"]
    _, ok = twins["ok"]
    assert "overexposed" in result.qc and "overexposed" not in ok.qc
    q = result.qc_map
    assert q is not None
    found, real = q.labels == Artefact.OVEREXPOSED, _truth_on_qc_grid(slide, "overexposed", q)
    tissue = result.tissue.mask | (q.labels != Artefact.NONE)  # tissue as detected, artefacts included
    precision = (found & real).sum() / found.sum()
    recall = (found & real & tissue).sum() / (real & tissue).sum()
    iou = (found & real & tissue).sum() / ((found | real) & tissue).sum()
    # 48 µm blocks straddle a disc's rim: precision 0.92, recall 0.90 of the discs' tissue, IoU 0.83.
    assert precision >= 0.85 and recall >= 0.85 and iou >= 0.8, (precision, recall, iou)
    assert abs(result.scores["ki67_index_percent"] - ok.scores["ki67_index_percent"]) <= 2.0

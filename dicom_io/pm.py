"""Heat maps (explainability aid): Parametric Maps, and a banded SEG for viewers without PM support.

Each block score of :func:`dicom_io.overviews.block_scores` (blocks of ``heatmap_um``, the same
blocks as the PNG overviews: local H-score, % positive, % positive tumour cells, tumour share of
the tissue, share left out by quality control) is painted on the pixel grid of the same source
level the SEG uses, so each map overlays the slide exactly; one PM series per score. Pixels are
unsigned 16-bit integers (PACS serve these more reliably than float maps) with a real-world value
mapping: score = value − 1 for stored values 1 and above; stored 0 (a block without cells, or
without tissue) is not mapped.

Viewers that draw SEG but not PM (OHIF's slide viewer, older Slim) get the same blocks as one
BINARY SEG series (``outputs.heatmap_seg``): for each score, ``HEATMAP_BANDS`` segments covering
equal parts of its scale ("positive 25–50 %" …), category SCT 85756007 *Tissue*, property type the
score's own concept (as in the SR), coloured from blue (low) to red (high).
"""

from __future__ import annotations

import cv2
import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from config.product import SOFTWARE_NAME, software_version
from dicom_io.overviews import BLOCK_SCORES, block_scores
from dicom_io.seg import build_label_pyramid, choose_level, level_mpp
from dicom_io.sr import (
    H_SCORE,
    POSITIVE_PERCENT,
    QC_EXCLUDED_PERCENT,
    SCHEME,
    TUMOUR_FRACTION,
    declare_private_scheme,
)
from pipeline.analysis import SlideResult
from pipeline.explain import Explanation

_PERCENT = hd.sr.CodedConcept("%", "UCUM", "percent")

#: The scores a heat map can show: block value name → LUT label, quantity, unit, what it is.
HEATMAPS = {
    "h_score": ("HSCORE", H_SCORE, hd.sr.CodedConcept("1", "UCUM", "no units"), "local H-score"),
    "positive": ("POSPCT", POSITIVE_PERCENT, _PERCENT, "local % positive"),
    "tumour_positive": (
        "TUMPOS",
        hd.sr.CodedConcept("TUMOUR-POS-PCT", SCHEME, "Positive tumour cells percentage"),
        _PERCENT,
        "local % positive tumour cells",
    ),
    "tumour": ("TUMPCT", TUMOUR_FRACTION, _PERCENT, "local tumour % of tissue"),
    "qc": ("QCPCT", QC_EXCLUDED_PERCENT, _PERCENT, "local % left out by QC"),
}

#: The tumour map of a segmentation model: its mean tumour probability, not an area share.
TUMOUR_PROBABILITY = (
    "TUMPRB",
    hd.sr.CodedConcept("TUMOUR-PROB", SCHEME, "Tumour probability"),
    _PERCENT,
    "local mean tumour probability",
)


def heatmap_spec(result: SlideResult, score: str) -> tuple[str, hd.sr.CodedConcept, hd.sr.CodedConcept, str]:
    """LUT label, quantity, unit and description of a block score's map for this result."""
    if score == "tumour" and result.compartments.tumour_probability is not None:
        return TUMOUR_PROBABILITY
    return HEATMAPS[score]


#: Segments per score in the banded SEG.
HEATMAP_BANDS = 4

#: Band colours from low to high.
_BAND_COLOURS = ("blue", "cyan", "yellow", "red")


def _long_string(text: str) -> str:
    """``text`` cut to the 64 bytes (UTF-8, as the objects declare) a Long String holds."""
    return text.encode("utf-8")[:64].decode("utf-8", errors="ignore")


def _scores_on_level(result: SlideResult, level: pydicom.Dataset, block_um: float) -> dict[str, np.ndarray]:
    """The block scores painted on ``level``'s pixel grid (NaN where a block has no value)."""
    rows, cols = int(level.TotalPixelMatrixRows), int(level.TotalPixelMatrixColumns)
    mpp = level_mpp(level)
    blocks = block_scores(result, block_um, (cols * mpp, rows * mpp))
    any_block = next(iter(blocks.values()))
    ys = np.minimum(((np.arange(rows) + 0.5) * mpp / block_um).astype(np.int64), any_block.shape[0] - 1)
    xs = np.minimum(((np.arange(cols) + 0.5) * mpp / block_um).astype(np.int64), any_block.shape[1] - 1)
    return {name: values[np.ix_(ys, xs)] for name, values in blocks.items()}


def build_heatmap(
    result: SlideResult,
    volumes: list[pydicom.Dataset],
    block_um: float = 128.0,
    series_number: int = 500,
    content_qualification: str = "PRODUCT",
    score: str = "h_score",
) -> hd.pm.ParametricMap:
    """A block score (``score``, one of :data:`HEATMAPS`) in ``block_um`` blocks as a Parametric
    Map on the source level nearest the compartment map. Stored value = score + 1; 0 (no cells, or
    no tissue, in the block) lies outside the real-world value mapping, so a reader gets no value
    there rather than a fake score."""
    lut_label, quantity, unit, what = heatmap_spec(result, score)
    top = int(BLOCK_SCORES[score])
    level = volumes[choose_level(volumes, result.compartments.mpp)]
    values = _scores_on_level(result, level, block_um)[score]
    pixels = np.where(np.isnan(values), 0, np.rint(values) + 1).astype(np.uint16)
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=lut_label,
        lut_explanation=_long_string(f"{what}, {block_um:g} µm blocks; 0 = none (unmapped)"),
        unit=unit,
        value_range=(0, top + 1),  # highdicom wants every stored value in range; 0 is unmapped below
        slope=1,
        intercept=-1,
        quantity_definition=quantity,
    )
    window = hd.VOILUTTransformation(window_center=top / 2 + 1, window_width=float(top))
    return _parametric_map(
        result, level, pixels, mapping, window, series_number, content_qualification, f"{lut_label}_HEATMAP", what
    )


def _parametric_map(
    result: SlideResult,
    level: pydicom.Dataset,
    pixels: np.ndarray,
    mapping: hd.pm.RealWorldValueMapping,
    window: hd.VOILUTTransformation,
    series_number: int,
    content_qualification: str,
    content_label: str,
    what: str,
) -> hd.pm.ParametricMap:
    """A 16-bit Parametric Map of ``pixels`` (``level``'s grid) whose stored 0 is unmapped."""
    pm = hd.pm.ParametricMap(
        source_images=[level],
        pixel_array=pixels[None],
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=SOFTWARE_NAME,
        manufacturer_model_name=f"{SOFTWARE_NAME} heatmap",
        software_versions=software_version(),
        device_serial_number="0",
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[window],
        transfer_syntax_uid=ExplicitVRLittleEndian,
        content_label=content_label,
        content_qualification=content_qualification,
        content_description=_long_string(f"{result.profile} {what}"),
        tile_pixel_array=True,
        tile_size=(int(level.Columns), int(level.Rows)),
        # TILED_SPARSE: per-frame plane positions, which validators still require for PMs.
        dimension_organization_type=hd.DimensionOrganizationTypeValues.TILED_SPARSE,
    )
    pm.SeriesDescription = _long_string(f"{result.profile} {what} (automated)")
    # Stored 0 (no value) outside the mapped range: a reader gets no real-world value there.
    pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0].RealWorldValueFirstValueMapped = 1
    declare_private_scheme(pm)
    return pm


#: Attributions are stored as ATTRIBUTION_ZERO + attribution / scale (1 … 2 × ATTRIBUTION_ZERO − 1).
ATTRIBUTION_ZERO = 32768
ATTRIBUTION = hd.sr.CodedConcept("IG-ATTRIBUTION", SCHEME, "Integrated-gradients attribution")


def build_attribution_map(
    result: SlideResult,
    volumes: list[pydicom.Dataset],
    explanation: Explanation,
    series_number: int = 560,
    content_qualification: str = "PRODUCT",
) -> hd.pm.ParametricMap:
    """A model's integrated-gradients attributions (:mod:`pipeline.explain`) on the explained tiles,
    averaged onto the pixels of the source level the heat maps use; elsewhere stored 0 (unmapped).
    Stored ``ATTRIBUTION_ZERO`` is an attribution of 0; the slope is the largest |attribution| over
    ``ATTRIBUTION_ZERO − 1``, so the full range of the model's attributions is kept."""
    level = volumes[choose_level(volumes, result.compartments.mpp)]
    rows, cols = int(level.TotalPixelMatrixRows), int(level.TotalPixelMatrixColumns)
    mpp = level_mpp(level)
    values = np.full((rows, cols), np.nan)
    for (x_um, y_um), _, attribution in explanation.tiles:
        # The tile at its own size on this level, then cut where the level ends.
        h, w = attribution.shape
        r0, c0 = round(y_um / mpp), round(x_um / mpp)
        size = (max(1, round(w * explanation.mpp / mpp)), max(1, round(h * explanation.mpp / mpp)))
        part = cv2.resize(attribution, size, interpolation=cv2.INTER_AREA)[: max(0, rows - r0), : max(0, cols - c0)]
        values[r0 : r0 + part.shape[0], c0 : c0 + part.shape[1]] = part
    top = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
    scale = (top or 1.0) / (ATTRIBUTION_ZERO - 1)
    pixels = np.where(np.isnan(values), 0, np.rint(np.nan_to_num(values) / scale) + ATTRIBUTION_ZERO).astype(np.uint16)
    what = f"{explanation.model} model attributions"
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="IGATTR",
        lut_explanation=_long_string(f"integrated gradients, {explanation.model} model; 0 = none (unmapped)"),
        unit=hd.sr.CodedConcept("1", "UCUM", "no units"),
        value_range=(0, 2 * ATTRIBUTION_ZERO - 1),
        slope=scale,
        intercept=-ATTRIBUTION_ZERO * scale,
        quantity_definition=ATTRIBUTION,
    )
    window = hd.VOILUTTransformation(
        window_center=float(ATTRIBUTION_ZERO), window_width=float(2 * ATTRIBUTION_ZERO - 2)
    )
    return _parametric_map(
        result, level, pixels, mapping, window, series_number, content_qualification, "IG_ATTRIBUTION", what
    )


def build_heatmap_bands(
    result: SlideResult,
    volumes: list[pydicom.Dataset],
    scores: tuple[str, ...],
    block_um: float = 128.0,
    series_number: int = 550,
) -> list[hd.seg.Segmentation]:
    """The block ``scores`` as one banded SEG series (a pyramid like the compartment SEG's): for each
    score :data:`HEATMAP_BANDS` segments, equal parts of its scale, the top band closed (a block at
    the top of the scale is in it); blocks without a value are in no segment."""
    start = choose_level(volumes, result.compartments.mpp)
    on_level = _scores_on_level(result, volumes[start], block_um)
    planes: list[np.ndarray] = []
    descriptions: list[hd.seg.SegmentDescription] = []
    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"{SOFTWARE_NAME} block scores", version=software_version(), family=codes.cid7162.NeighborhoodAnalysis
    )
    for score in scores:
        lut_label, quantity, unit, what = heatmap_spec(result, score)
        top = BLOCK_SCORES[score]
        values = on_level[score]
        for band in range(HEATMAP_BANDS):
            low, high = top * band / HEATMAP_BANDS, top * (band + 1) / HEATMAP_BANDS
            with np.errstate(invalid="ignore"):
                inside = (values >= low) & ((values < high) | (band == HEATMAP_BANDS - 1))
            planes.append(inside)
            name = f"{lut_label} {low:g}-{high:g}{'' if unit.value == '1' else ' ' + unit.value}"
            descriptions.append(
                hd.seg.SegmentDescription(
                    segment_number=len(descriptions) + 1,
                    segment_label=name,
                    segmented_property_category=codes.SCT.Tissue,
                    segmented_property_type=quantity,
                    algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                    algorithm_identification=algorithm,
                    display_color=hd.color.CIELabColor.from_string(
                        _BAND_COLOURS[band * len(_BAND_COLOURS) // HEATMAP_BANDS]
                    ),
                    tracking_id=name,
                    tracking_uid=hd.UID(),
                )
            )
            descriptions[-1].SegmentDescription = _long_string(f"{what} {low:g} to {high:g}, {block_um:g} µm blocks")
    segs = build_label_pyramid(
        np.stack(planes, axis=-1).astype(np.uint8),
        descriptions,
        volumes,
        start,
        series_number,
        content_label="HEATMAP_BANDS",
        content_description=f"{result.profile} block scores in bands",
    )
    for seg in segs:
        seg.SeriesDescription = f"{result.profile} heat map bands (automated)"[:64]
        declare_private_scheme(seg)
    return segs

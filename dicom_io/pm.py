"""Parametric Maps: low-resolution heat maps of local H-score and % positive (explainability aid).

The score of all scored cells in blocks of ``heatmap_um`` (:func:`dicom_io.overviews.block_scores`,
the same blocks as the PNG overviews) is painted on the pixel grid of the same source level the SEG
uses, so each map overlays the slide exactly; one series per score. Pixels are unsigned 16-bit
integers (PACS serve these more reliably than float maps) with a real-world value mapping: score =
value − 1 for stored values 1 and above; stored 0 (a block without cells) is not mapped.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian

from config.product import SOFTWARE_NAME, software_version
from dicom_io.overviews import block_scores
from dicom_io.seg import choose_level, level_mpp
from dicom_io.sr import H_SCORE, POSITIVE_PERCENT, declare_private_scheme
from pipeline.analysis import SlideResult

#: The scores a heat map can show: block value name, top of the scale, LUT label, quantity, unit.
HEATMAPS = {
    "h_score": (300, "HSCORE", H_SCORE, hd.sr.CodedConcept("1", "UCUM", "no units"), "local H-score"),
    "positive": (100, "POSPCT", POSITIVE_PERCENT, hd.sr.CodedConcept("%", "UCUM", "percent"), "local % positive"),
}


def build_heatmap(
    result: SlideResult,
    volumes: list[pydicom.Dataset],
    block_um: float = 128.0,
    series_number: int = 500,
    content_qualification: str = "PRODUCT",
    score: str = "h_score",
) -> hd.pm.ParametricMap:
    """A local score (``score``: ``h_score`` or ``positive``, per :data:`HEATMAPS`) of the scored
    cells in ``block_um`` blocks as a Parametric Map on the source level nearest the compartment
    map. Stored value = score + 1; 0 (no cells in the block) lies outside the real-world value
    mapping, so a reader gets no value there rather than a fake score."""
    top, lut_label, quantity, unit, what = HEATMAPS[score]
    level = volumes[choose_level(volumes, result.compartments.mpp)]
    rows, cols = int(level.TotalPixelMatrixRows), int(level.TotalPixelMatrixColumns)
    mpp = level_mpp(level)
    blocks = block_scores(result, block_um, (cols * mpp, rows * mpp))[score]
    ys = np.minimum(((np.arange(rows) + 0.5) * mpp / block_um).astype(np.int64), blocks.shape[0] - 1)
    xs = np.minimum(((np.arange(cols) + 0.5) * mpp / block_um).astype(np.int64), blocks.shape[1] - 1)
    values = blocks[np.ix_(ys, xs)]
    pixels = np.where(np.isnan(values), 0, np.rint(values) + 1).astype(np.uint16)
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=lut_label,
        lut_explanation=f"{what} in {block_um:g} µm blocks; 0 = no cells (unmapped)",
        unit=unit,
        value_range=(0, top + 1),  # highdicom wants every stored value in range; 0 is unmapped below
        slope=1,
        intercept=-1,
        quantity_definition=quantity,
    )
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
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=top / 2 + 1, window_width=float(top))],
        transfer_syntax_uid=ExplicitVRLittleEndian,
        content_label=f"{lut_label}_HEATMAP",
        content_qualification=content_qualification,
        content_description=f"{result.profile} {what}",
        tile_pixel_array=True,
        tile_size=(int(level.Columns), int(level.Rows)),
        # TILED_SPARSE: per-frame plane positions, which validators still require for PMs.
        dimension_organization_type=hd.DimensionOrganizationTypeValues.TILED_SPARSE,
    )
    pm.SeriesDescription = f"{result.profile} {what} (automated)"[:64]
    # Stored 0 (no cells) outside the mapped range: a reader gets no real-world value there.
    pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0].RealWorldValueFirstValueMapped = 1
    declare_private_scheme(pm)
    return pm

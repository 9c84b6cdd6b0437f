"""Parametric Map: a low-resolution heatmap of local H-score (explainability aid).

The H-score of all scored cells in blocks of ``heatmap_um`` is painted on the
pixel grid of the same source level the SEG uses, so the map overlays the
slide exactly. Pixels are unsigned 16-bit integers (PACS serve these more
reliably than float maps) with a real-world value mapping: H-score = value
− 1, and 0 where a block has no cells.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian

from config.product import SOFTWARE_NAME, software_version
from dicom_io.seg import choose_level, level_mpp
from dicom_io.sr import H_SCORE, declare_private_scheme
from pipeline.analysis import SlideResult


def h_score_blocks(result: SlideResult, block_um: float, shape_um: tuple[float, float]) -> np.ndarray:
    """H-score per block (NaN where no cell), rows × columns covering ``shape_um`` (width, height)."""
    cells = result.cells
    keep = np.isin(cells["compartment"], (1, 2))
    cols = max(1, int(np.ceil(shape_um[0] / block_um)))
    rows = max(1, int(np.ceil(shape_um[1] / block_um)))
    bx = np.clip((cells["x_um"][keep] / block_um).astype(np.int64), 0, cols - 1)
    by = np.clip((cells["y_um"][keep] / block_um).astype(np.int64), 0, rows - 1)
    idx = by * cols + bx
    n = np.bincount(idx, minlength=rows * cols)
    weighted = np.bincount(idx, weights=cells["intensity_class"][keep].astype(np.float64), minlength=rows * cols)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (100.0 * weighted / n).reshape(rows, cols)


def build_heatmap(
    result: SlideResult,
    volumes: list[pydicom.Dataset],
    block_um: float = 128.0,
    series_number: int = 500,
    content_qualification: str = "PRODUCT",
) -> hd.pm.ParametricMap:
    """Local H-score as a Parametric Map on the source level nearest the compartment map. Stored
    value = H-score + 1; 0 (no cells in the block) lies outside the real-world value mapping, so a
    reader gets no value there rather than a fake H-score."""
    level = volumes[choose_level(volumes, result.compartments.mpp)]
    rows, cols = int(level.TotalPixelMatrixRows), int(level.TotalPixelMatrixColumns)
    mpp = level_mpp(level)
    blocks = h_score_blocks(result, block_um, (cols * mpp, rows * mpp))
    ys = np.minimum(((np.arange(rows) + 0.5) * mpp / block_um).astype(np.int64), blocks.shape[0] - 1)
    xs = np.minimum(((np.arange(cols) + 0.5) * mpp / block_um).astype(np.int64), blocks.shape[1] - 1)
    values = blocks[np.ix_(ys, xs)]
    pixels = np.where(np.isnan(values), 0, np.rint(values) + 1).astype(np.uint16)
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="HSCORE",
        lut_explanation=f"H-score in {block_um:g} µm blocks (stored 0: no cells, unmapped)",
        unit=hd.sr.CodedConcept("1", "UCUM", "no units"),
        value_range=(0, 301),  # highdicom wants every stored value in range; 0 is unmapped below
        slope=1,
        intercept=-1,
        quantity_definition=H_SCORE,
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
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=151.0, window_width=300.0)],
        transfer_syntax_uid=ExplicitVRLittleEndian,
        content_label="HSCORE_HEATMAP",
        content_qualification=content_qualification,
        content_description=f"{result.profile} local H-score",
        tile_pixel_array=True,
        tile_size=(int(level.Columns), int(level.Rows)),
        # TILED_SPARSE: per-frame plane positions, which validators still require for PMs.
        dimension_organization_type=hd.DimensionOrganizationTypeValues.TILED_SPARSE,
    )
    pm.SeriesDescription = f"{result.profile} local H-score (automated)"[:64]
    # Stored 0 (no cells) outside the mapped range: a reader gets no real-world value there.
    pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0].RealWorldValueFirstValueMapped = 1
    declare_private_scheme(pm)
    return pm

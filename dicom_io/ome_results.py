"""Results for OME-TIFF / TIFF / SVS sources: label OME-TIFF, cell table, JSON.

The label image is the compartment map (0 fat/background, 1 tumour,
2 stroma, 3 other) as a pyramidal OME-TIFF whose physical pixel size is the
map's, so it covers exactly the physical extent of the source; label names
go into the OME-XML as channel name and a map annotation. The cell table is
CSV with centroids in µm and in level-0 pixels of the source.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import tifffile
from ome_types import to_xml
from ome_types.model import (
    OME,
    Channel,
    Image,
    Map,
    MapAnnotation,
    Pixels,
    Pixels_DimensionOrder,
    PixelType,
    StructuredAnnotations,
    UnitsLength,
)

from pipeline.analysis import SlideResult
from pipeline.qc import Artefact
from pipeline.segmentation import CLASS_NAMES

CELL_TABLE_COLUMNS = (
    "x_um",
    "y_um",
    "x_px",
    "y_px",
    "compartment",
    "intensity_class",
    "dab_od",
    "nucleus_area_um2",
    "nucleus_dab_mean",
    "membrane_dab_mean",
    "cell_dab_mean",
)


#: Quality-control areas in the label image: this offset plus the artefact's value (11 ink, 12 fold,
#: 13 blur, 14 saturated, 15 edge, 16 overexposed, 17 bubble, 18 debris), named "qc_ink" and so on in the legend.
QC_LABEL_OFFSET = 10


def label_legend() -> dict[int, str]:
    """Label value → name of the OME label image: the compartments and the QC areas."""
    legend = {int(k): v for k, v in CLASS_NAMES.items()}
    legend.update({QC_LABEL_OFFSET + int(a): f"qc_{a.label}" for a in Artefact if a is not Artefact.NONE})
    return legend


def label_ome_xml(name: str, width: int, height: int, mpp: float) -> str:
    annotation = MapAnnotation(
        id="Annotation:labels",
        namespace="ihc-adapter/labels",
        value=Map(ms=[Map.M(k=str(k), value=v) for k, v in sorted(label_legend().items())]),
    )
    ome = OME(
        images=[
            Image(
                id="Image:0",
                name=name,
                pixels=Pixels(
                    id="Pixels:0",
                    dimension_order=Pixels_DimensionOrder.XYCZT,
                    type=PixelType.UINT8,
                    size_x=width,
                    size_y=height,
                    size_c=1,
                    size_z=1,
                    size_t=1,
                    physical_size_x=mpp,
                    physical_size_x_unit=UnitsLength.MICROMETER,
                    physical_size_y=mpp,
                    physical_size_y_unit=UnitsLength.MICROMETER,
                    channels=[Channel(id="Channel:0:0", name="compartment", samples_per_pixel=1)],
                    metadata_only=True,
                ),
                annotation_refs=[{"id": "Annotation:labels"}],
            )
        ],
        structured_annotations=StructuredAnnotations(map_annotations=[annotation]),
        creator="ihc-adapter",
    )
    return to_xml(ome)


def write_label_ome_tiff(result: SlideResult, path: Path) -> Path:
    """The compartment map as a pyramidal OME-TIFF label image, with the areas quality control
    left out as ``QC_LABEL_OFFSET`` + their artefact value."""
    labels = result.compartments.labels
    mpp = result.compartments.mpp
    qc = result.qc_map
    if qc is not None and qc.mask.any():
        rows = np.minimum(((np.arange(labels.shape[0]) + 0.5) * mpp / qc.mpp).astype(np.int64), qc.labels.shape[0] - 1)
        cols = np.minimum(((np.arange(labels.shape[1]) + 0.5) * mpp / qc.mpp).astype(np.int64), qc.labels.shape[1] - 1)
        on_map = qc.labels[np.ix_(rows, cols)]
        labels = np.where(on_map > 0, QC_LABEL_OFFSET + on_map, labels).astype(np.uint8)
    levels = [labels]
    while max(levels[-1].shape) > 256:
        levels.append(levels[-1][::2, ::2])
    xml = label_ome_xml(f"{Path(str(result.slide['path'])).name} compartments", labels.shape[1], labels.shape[0], mpp)
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        opts = dict(tile=(256, 256), compression="zlib", photometric="minisblack", metadata=None)
        tw.write(labels, subifds=len(levels) - 1, description=xml.encode("utf-8"), **opts)  # type: ignore[arg-type]
        for lv in levels[1:]:
            tw.write(lv, subfiletype=1, **opts)  # type: ignore[arg-type]
    return path


def write_cell_table(result: SlideResult, path: Path, level0_mpp: tuple[float, float]) -> Path:
    from pipeline.nuclei import intensity_value

    c = result.cells
    columns = {
        "x_um": c["x_um"],
        "y_um": c["y_um"],
        "x_px": c["x_um"] / level0_mpp[0],
        "y_px": c["y_um"] / level0_mpp[1],
        "compartment": np.vectorize(CLASS_NAMES.get)(c["compartment"]) if len(c["x_um"]) else c["compartment"],
        "intensity_class": c["intensity_class"],
        "dab_od": intensity_value(c, result.settings.intensity),
        "nucleus_area_um2": c["nucleus_area_um2"],
        "nucleus_dab_mean": c["nucleus_dab_mean"],
        "membrane_dab_mean": c["membrane_dab_mean"],
        "cell_dab_mean": c["cell_dab_mean"],
    }
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(CELL_TABLE_COLUMNS)
        for row in zip(*(columns[k] for k in CELL_TABLE_COLUMNS), strict=True):
            # A column that was not measured (membrane_method "none") is left empty.
            w.writerow([_cell_text(v) for v in row])
    return path


def _cell_text(value: object) -> object:
    if isinstance(value, float | np.floating):
        return "" if np.isnan(value) else f"{value:.3f}"
    return value


def write_json(result: SlideResult, path: Path, extra: dict | None = None) -> Path:
    data = result.to_json()
    if extra:
        data.update(extra)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False))
    return path

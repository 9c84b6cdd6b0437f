"""Microscopy Bulk Simple Annotations: one POINT per detected cell.

One annotation group per compartment and intensity class (tumour negative,
tumour 1+, …, stroma 3+), centroids in the total pixel matrix of the finest
source level (2D, float32, one ``(1, 2)`` array per cell), each cell carrying
its DAB OD (the value it was classed by) and its intensity class (0–3) as
measurements. Each group's property is a cell (SCT 4421005) whose primary
anatomic structure is its compartment's segment type (SCT 108369006 Neoplasm,
21793004 Connective tissue), with a recommended display colour by class
(blue, yellow, orange, red; lighter in stroma) so viewers do not draw negative
and 3+ cells alike.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from skimage import color

from config.product import SOFTWARE_NAME, software_version
from dicom_io.seg import SEGMENTS, level_mpp
from dicom_io.sr import SCHEME, declare_private_scheme
from pipeline.analysis import SlideResult
from pipeline.labels import INTENSITY_LABELS
from pipeline.nuclei import intensity_value
from pipeline.segmentation import TUMOUR

CLASS_NAMES = INTENSITY_LABELS
ANATOMICAL_STRUCTURE = hd.sr.CodedConcept("91723000", "SCT", "Anatomical structure")
CELL = hd.sr.CodedConcept("4421005", "SCT", "Cell")
DAB_OD = hd.sr.CodedConcept("DAB-OD", SCHEME, "DAB optical density")
INTENSITY_CLASS = hd.sr.CodedConcept("INTENSITY-CLASS", SCHEME, "IHC intensity class (0 negative to 3)")
OD_UNIT = hd.sr.CodedConcept("1", "UCUM", "no units")

#: Recommended display colour (sRGB) per intensity class: blue, yellow, orange, red, as viewers
#: draw DAB classes; stroma groups are drawn lighter than tumour ones.
CLASS_RGB = ((40, 90, 220), (240, 200, 0), (245, 120, 0), (215, 0, 0))


def display_colour(intensity_class: int, tumour: bool) -> hd.color.CIELabColor:
    """The group's recommended display colour (CIELab)."""
    rgb = np.asarray(CLASS_RGB[intensity_class], np.float64) / 255.0
    if not tumour:
        rgb = 0.55 * rgb + 0.45  # the same hue, lighter
    lab = color.rgb2lab(rgb[None, None, :])[0, 0]
    return hd.color.CIELabColor(float(lab[0]), float(lab[1]), float(lab[2]))


def build_annotations(
    result: SlideResult, volumes: list[pydicom.Dataset], series_number: int = 300
) -> hd.ann.MicroscopyBulkSimpleAnnotations:
    """Cell centroids grouped by compartment and class, on the finest source level."""
    base = volumes[0]
    mpp = level_mpp(base)
    cells = result.cells
    values = intensity_value(cells, result.settings.intensity).astype(np.float32)
    # Total pixel matrix coordinates: (column, row), pixel centres at +0.5.
    xy = np.stack([cells["x_um"] / mpp, cells["y_um"] / mpp], axis=1).astype(np.float32)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"{SOFTWARE_NAME} cell detection", version=software_version(), family=codes.cid7162.EdgeDetection
    )
    groups = []
    number = 0
    for spec in SEGMENTS:
        in_comp = cells["compartment"] == spec.label
        for k, cls_name in enumerate(CLASS_NAMES):
            sel = np.flatnonzero(in_comp & (cells["intensity_class"] == k))
            if sel.size == 0:
                continue
            number += 1
            groups.append(
                hd.ann.AnnotationGroup(
                    number=number,
                    uid=hd.UID(),
                    label=f"{spec.name} {cls_name}",
                    annotated_property_category=ANATOMICAL_STRUCTURE,
                    annotated_property_type=CELL,
                    graphic_type=hd.ann.GraphicTypeValues.POINT,
                    graphic_data=[xy[i : i + 1] for i in sel],
                    algorithm_type=hd.ann.AnnotationGroupGenerationTypeValues.AUTOMATIC,
                    algorithm_identification=algorithm,
                    measurements=[
                        hd.ann.Measurements(name=DAB_OD, values=values[sel], unit=OD_UNIT),
                        hd.ann.Measurements(
                            name=INTENSITY_CLASS, values=np.full(sel.size, k, np.float32), unit=OD_UNIT
                        ),
                    ],
                    description=f"{cls_name} cells in {spec.name}",
                    primary_anatomic_structures=[spec.property_type],
                    display_color=display_colour(k, spec.label == TUMOUR),
                )
            )
    ann = hd.ann.MicroscopyBulkSimpleAnnotations(
        source_images=[base],
        annotation_coordinate_type=hd.ann.AnnotationCoordinateTypeValues.SCOORD,
        annotation_groups=groups,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=SOFTWARE_NAME,
        manufacturer_model_name=f"{SOFTWARE_NAME} cells",
        software_versions=software_version(),
        device_serial_number="0",
        content_label="CELLS",
        content_description=f"{result.profile} cells by compartment and class",
    )
    ann.SeriesDescription = f"{result.profile} cells by compartment and class (automated)"[:64]
    declare_private_scheme(ann)
    return ann

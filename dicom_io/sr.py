"""Comprehensive 3D SR: the TID 1500 measurement report of a scored slide.

One measurement group (TID 1411) per compartment segment, referencing its
segment in the SEG directly (highdicom's ``from_segmentation`` helper fails
on tiled SEGs, whose Derivation Image Sequence is empty), and one slide-level
group (TID 1501) with the tumour fraction, the profile's clinical score and
the alerts as qualitative evaluations. Concepts without a standard code use
the private scheme :data:`SCHEME`, declared in the document's Coding Scheme
Identification Sequence. The report is UNVERIFIED and PRELIMINARY: it waits
for a pathologist.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

from config.product import SOFTWARE_NAME, device_uid, software_version
from dicom_io.seg import SEGMENTS, level_mpp
from pipeline.analysis import SlideResult
from pipeline.labels import INTENSITY_LABELS
from pipeline.scoring import AlertCode, CompartmentSummary
from pipeline.segmentation import TUMOUR

log = logging.getLogger(__name__)

#: Private coding scheme for concepts no standard terminology covers.
SCHEME = "99IHCADPT"
SCHEME_NAME = "ihc-adapter private concepts"
CodedConcept = hd.sr.CodedConcept


def _private(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value, SCHEME, meaning)


PROCEDURE = CodedConcept("117617002", "SCT", "Immunohistochemistry procedure")
AREA = CodedConcept("42798000", "SCT", "Area")
H_SCORE = _private("H-SCORE", "H-score")
PIXEL_H_SCORE = _private("PIXEL-H-SCORE", "Pixel H-score")
POSITIVE_PERCENT = _private("POS-PCT", "Positive cells percentage")
CLASS_PERCENT = {k: _private(f"PCT-{k}", f"Cells {k} percentage") for k in ("1+", "2+", "3+")}
CELL_COUNT = {k: _private(f"N-{k.upper()}", f"{k} cell count") for k in INTENSITY_LABELS}
TOTAL_CELLS = _private("N-CELLS", "Cell count")
CELLULARITY = _private("CELLULARITY", "Cells per area")
TUMOUR_FRACTION = _private("TUMOUR-FRACTION", "Tumour area fraction of tissue")
TISSUE_AREA = _private("TISSUE-AREA", "Tissue area")
#: LOINC codes (scheme LN) where LOINC has the concept: the Ki-67 index, ER and PR percentages of
#: stained cells, the receptor and HER2 interpretations. PD-L1 has only clone-specific LOINC codes
#: (22C3, 28-8, SP142 …) and the clone is not known here, so its TPS keeps the private code.
KI67_INDEX = CodedConcept("29593-1", "LN", "Cells.Ki-67 nuclear Ag/cells in Tissue by Immune stain")
RECEPTOR_PERCENT = {
    "er": CodedConcept("14228-1", "LN", "Cells.estrogen receptor/cells in Tissue by Immune stain"),
    "pr": CodedConcept("14230-7", "LN", "Cells.progesterone receptor/cells in Tissue by Immune stain"),
}
RECEPTOR_INTERPRETATION = {
    "er": CodedConcept("16112-5", "LN", "Estrogen receptor [Interpretation] in Tissue"),
    "pr": CodedConcept("16113-3", "LN", "Progesterone receptor [Interpretation] in Tissue"),
}
#: Receptor status values: SNOMED CT where it has them.
RECEPTOR_VALUES = {
    "positive": CodedConcept("10828004", "SCT", "Positive"),
    "negative": CodedConcept("260385009", "SCT", "Negative"),
}
#: The marker each profile's score is about (named in the algorithm parameters).
MARKERS = {
    "ki67": "Ki-67",
    "er": "estrogen receptor",
    "pr": "progesterone receptor",
    "her2": "HER2",
    "pdl1": "PD-L1",
    "hscore": "unspecified",
}
ALLRED = {
    "proportion": _private("ALLRED-PS", "Allred proportion score"),
    "intensity": _private("ALLRED-IS", "Allred intensity score"),
    "total": _private("ALLRED-TS", "Allred total score"),
}
TPS = _private("PDL1-TPS", "PD-L1 tumour proportion score")
QC_EXCLUDED_AREA = _private("QC-EXCLUDED", "Tissue area left out by quality control")
QC_EXCLUDED_PERCENT = _private("QC-EXCLUDED-PCT", "Share of tissue left out by quality control")
#: Pearson r of a model plug-in's integrated-gradients attributions with a stain's OD
#: (:mod:`pipeline.explain`), per model and stain.
ATTRIBUTION_CORRELATION = {
    (model, stain): _private(f"IG-R-{code}-{short}", f"{name} model attributions vs {label} OD (Pearson r)")
    for model, short, name in (("segmentation", "SEG", "Segmentation"), ("nuclei", "NUC", "Nucleus"))
    for stain, code, label in (("dab", "DAB", "DAB"), ("hematoxylin", "H", "haematoxylin"))
}
HER2_SCORE = CodedConcept("48676-1", "LN", "HER2 [Interpretation] in Tissue")
#: Concept name of every alert: one qualitative evaluation per alert, its code the value.
ALERT = _private("ALERT", "Automated analysis alert")


def alert_code_value(code: AlertCode) -> str:
    """The alert's Code Value: its name with hyphens, shortened to the 16 characters SH allows."""
    short = {AlertCode.UNCERTAIN_CATEGORY: "UNCERTAIN-CAT", AlertCode.PALE_COUNTERSTAIN: "PALE-STAIN"}
    return short.get(code, code.value.replace("_", "-"))


ALERT_VALUES = {code: _private(alert_code_value(code), code.meaning) for code in AlertCode}
PERCENT = CodedConcept("%", "UCUM", "percent")
MM2 = CodedConcept("mm2", "UCUM", "square millimeter")
PER_MM2 = CodedConcept("/mm2", "UCUM", "per square millimeter")
ONE = CodedConcept("1", "UCUM", "no units")
CELLS = CodedConcept("{cells}", "UCUM", "cells")


Interval = tuple[float, float] | None


def _m(
    name: CodedConcept, value: float | None, unit: CodedConcept, interval: Interval = None
) -> hd.sr.Measurement | None:
    """A measurement; with ``interval`` (low, high), its 95 % interval as TID 310 Measurement
    Properties: Upper and Lower Measurement Uncertainty, the distances from the value to the
    interval's ends (:mod:`pipeline.uncertainty`)."""
    if value is None:
        return None
    properties = None
    if interval is not None:
        low, high = interval
        properties = hd.sr.MeasurementProperties(
            upper_measurement_uncertainty=max(0.0, high - float(value)),
            lower_measurement_uncertainty=max(0.0, float(value) - low),
        )
    return hd.sr.Measurement(name=name, value=float(value), unit=unit, properties=properties)


def compartment_measurements(
    stats: CompartmentSummary, intervals: dict[str, tuple[float, float]] | None = None, name: str = ""
) -> list[hd.sr.Measurement]:
    """H-score, % positive, % per class, counts, area and cellularity of one compartment; the
    H-score and % positive with their intervals where ``intervals`` has them (``name.h_score`` …)."""
    n = stats["cells"]
    found = intervals or {}
    items = [
        _m(H_SCORE, stats["h_score"], ONE, found.get(f"{name}.h_score")),
        _m(PIXEL_H_SCORE, stats.get("pixel_h_score"), ONE),
        _m(POSITIVE_PERCENT, stats["positive_percent"], PERCENT, found.get(f"{name}.positive_percent")),
        *(_m(CLASS_PERCENT[k], 100.0 * stats[k] / n if n else None, PERCENT) for k in ("1+", "2+", "3+")),
        _m(TOTAL_CELLS, n, CELLS),
        *(_m(CELL_COUNT[k], stats[k], CELLS) for k in INTENSITY_LABELS),  # type: ignore[literal-required]
        _m(AREA, stats["area_mm2"], MM2),
        _m(CELLULARITY, stats.get("cells_per_mm2"), PER_MM2),
    ]
    return [m for m in items if m is not None]


def her2_value(category: str, zero_subtype: str | None = None) -> CodedConcept:
    """The HER2 IHC category as a private code of at most 16 characters (a Code Value):
    HER2-0-NULL, HER2-0-ULTRALOW, HER2-1+, HER2-2+, HER2-3+."""
    if category == "0":
        subtype = zero_subtype or "null"
        return _private(f"HER2-0-{subtype.upper()}", f"HER2 0 ({subtype})")
    return _private(f"HER2-{category}", f"HER2 {category}")


def _text_value(meaning: str) -> CodedConcept:
    return _private(meaning.upper().replace(" ", "-"), meaning)


def _intervals(result: SlideResult) -> dict[str, tuple[float, float]]:
    return result.uncertainty.intervals if result.uncertainty else {}


def slide_level_content(result: SlideResult) -> tuple[list[hd.sr.Measurement], list[hd.sr.QualitativeEvaluation]]:
    """Tumour fraction, the profile's clinical score, and the alerts."""
    scores = result.scores
    tissue = result.compartment_stats["tissue"]
    ci = _intervals(result)
    measurements = [
        _m(TUMOUR_FRACTION, 100.0 * result.tumour_fraction, PERCENT),
        _m(TISSUE_AREA, tissue["area_mm2"], MM2),
        _m(KI67_INDEX, scores.get("ki67_index_percent"), PERCENT, ci.get("ki67_index_percent")),
        _m(TPS, scores.get("tps_percent"), PERCENT, ci.get("tps_percent")),
    ]
    if result.qc:
        measurements.append(_m(QC_EXCLUDED_AREA, sum(q["area_mm2"] for q in result.qc.values()), MM2))
        measurements.append(_m(QC_EXCLUDED_PERCENT, sum(q["percent_of_tissue"] for q in result.qc.values()), PERCENT))
    for e in result.explanations:
        for stain, r in (("dab", e.dab_correlation), ("hematoxylin", e.hematoxylin_correlation)):
            if math.isfinite(r):
                measurements.append(_m(ATTRIBUTION_CORRELATION[(e.model, stain)], r, ONE))
    kind = result.settings.scores.kind
    if kind in RECEPTOR_PERCENT:
        measurements.append(
            _m(RECEPTOR_PERCENT[kind], scores.get("positive_percent"), PERCENT, ci.get("positive_percent"))
        )
    for key, concept in ALLRED.items():
        if "allred" in scores:
            measurements.append(_m(concept, scores["allred"][key], ONE))
    evaluations = []
    if scores.get("category") and kind in RECEPTOR_INTERPRETATION:
        category = scores["category"]
        value = RECEPTOR_VALUES.get(category, _text_value(category))
        evaluations.append(hd.sr.QualitativeEvaluation(RECEPTOR_INTERPRETATION[kind], value))
    her2 = scores.get("her2") or {}
    if her2.get("category"):
        evaluations.append(
            hd.sr.QualitativeEvaluation(HER2_SCORE, her2_value(her2["category"], her2.get("zero_subtype")))
        )
    for alert in result.alerts:
        evaluations.append(hd.sr.QualitativeEvaluation(ALERT, ALERT_VALUES[AlertCode(alert["code"])]))
    return [m for m in measurements if m is not None], evaluations


def observation_context(volume: pydicom.Dataset, device: str) -> hd.sr.ObservationContext:
    """Device observer (this installation, UID ``device``) and the slide's specimen as subject."""
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device,
            name=f"{SOFTWARE_NAME} {software_version()}",
            manufacturer_name=SOFTWARE_NAME,
            model_name=SOFTWARE_NAME,
        ),
    )
    specimen = volume.SpecimenDescriptionSequence[0] if "SpecimenDescriptionSequence" in volume else None
    subject = hd.sr.SubjectContext(
        subject_class=codes.DCM.Specimen,
        subject_class_specific_context=hd.sr.SubjectContextSpecimen(
            uid=str(specimen.SpecimenUID) if specimen is not None else str(hd.UID()),
            identifier=str(specimen.SpecimenIdentifier) if specimen is not None else None,
            container_identifier=str(volume.get("ContainerIdentifier", "")) or None,
        ),
    )
    return hd.sr.ObservationContext(observer_device_context=observer, subject_context=subject)


def algorithm(result: SlideResult) -> hd.sr.AlgorithmIdentification:
    """This software, with its parameters for ``result`` (TID 4019 Algorithm Parameters)."""
    return hd.sr.AlgorithmIdentification(
        name=SOFTWARE_NAME, version=software_version(), parameters=algorithm_parameters(result)
    )


def algorithm_parameters(result: SlideResult) -> list[str]:
    """The profile, the marker and every setting that decides a cell's class and the clinical
    call, as ``key=value`` texts."""
    s = result.settings
    n, i, c = s.nuclei, s.intensity, s.scores
    params = [
        f"profile={s.profile}",
        f"marker={MARKERS[c.kind]}",
        f"nuclei.method={n.method}",
        f"nuclei.detection_image={n.detection_image}",
        f"nuclei.threshold={result.detection.get('threshold', n.threshold)}",
        f"nuclei.requested_pixel_size_um={n.requested_pixel_size_um}",
        f"intensity.compartment={i.compartment}",
        f"intensity.statistic={i.statistic}",
        "intensity.thresholds=" + "/".join(f"{t:g}" for t in i.thresholds),
        f"segmentation.method={s.segmentation.method}",
        f"scores.low_tumour_fraction={c.low_tumour_fraction:g}",
    ]
    if i.single_threshold is not None:
        params.append(f"intensity.single_threshold={i.single_threshold:g}")
    if c.kind == "ki67":
        params.append(f"scores.ki67_cutoff_percent={c.ki67_cutoff_percent:g}")
    if c.kind == "her2":
        params.append(f"scores.her2_complete_fraction={c.her2_complete_fraction:g}")
        params.append(f"scores.her2_noise_floor_percent={c.her2_noise_floor_percent:g}")
    return params


def build_measurement_report(
    result: SlideResult,
    volumes: list[pydicom.Dataset],
    segmentation: hd.seg.Segmentation,
    series_number: int = 200,
    previous: Sequence[pydicom.Dataset] = (),
) -> hd.sr.Comprehensive3DSR:
    """The full TID 1500 report referencing ``segmentation``'s segments; ``previous`` are the
    reports it replaces (a re-score), named in its Predecessor Documents Sequence."""
    groups: list[Any] = []
    for number, spec in enumerate(SEGMENTS, start=1):
        stats = result.compartment_stats[spec.name]
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=segment_tracking(segmentation, number),
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=segmentation.SOPClassUID,
                    sop_instance_uid=segmentation.SOPInstanceUID,
                    segment_number=number,
                    source_series=hd.sr.SourceSeriesForSegmentation(volumes[0].SeriesInstanceUID),
                ),
                finding_type=spec.property_type,
                finding_category=spec.category,
                algorithm_id=algorithm(result),
                measurements=compartment_measurements(stats, _intervals(result), spec.name),
            )
        )
    measurements, evaluations = slide_level_content(result)
    measurements.extend(compartment_measurements(result.compartment_stats["tissue"], _intervals(result), "tissue"))
    groups.append(
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="slide"),
            finding_type=CodedConcept("85756007", "SCT", "Tissue"),
            algorithm_id=algorithm(result),
            measurements=measurements,
            qualitative_evaluations=evaluations or None,
        )
    )
    return _unverified_report(
        groups,
        volumes[0],
        [segmentation, volumes[0]],
        series_number,
        f"{result.profile} IHC measurements (unverified)",
        device_uid(result.settings.outputs.device_uid),
        previous,
    )


def segment_tracking(segmentation: pydicom.Dataset, number: int) -> hd.sr.TrackingIdentifier:
    """The SR group's tracking identifier for segment ``number``: the segment's own Tracking ID and
    Tracking UID, so a reader can pair them."""
    item = segmentation.SegmentSequence[number - 1]
    return hd.sr.TrackingIdentifier(uid=str(item.TrackingUID), identifier=str(item.TrackingID))


def _unverified_report(
    groups: list[Any],
    slide: pydicom.Dataset,
    evidence: list[pydicom.Dataset],
    series_number: int,
    description: str,
    device: str,
    previous: Sequence[pydicom.Dataset] = (),
) -> hd.sr.Comprehensive3DSR:
    """A TID 1500 document, COMPLETE, PRELIMINARY and UNVERIFIED: it waits for a pathologist.
    ``device``: the installation's Device Observer UID; ``previous``: documents it replaces
    (Predecessor Documents Sequence)."""
    report = hd.sr.MeasurementReport(
        observation_context=observation_context(slide, device),
        procedure_reported=PROCEDURE,
        imaging_measurements=groups,
        title=codes.DCM.ImagingMeasurementReport,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=SOFTWARE_NAME,
        is_complete=True,
        is_final=False,
        is_verified=False,
        previous_versions=list(previous) or None,
    )
    sr.SeriesDescription = description
    declare_private_scheme(sr)
    return sr


def declare_private_scheme(ds: pydicom.Dataset) -> None:
    """Add the private scheme to the Coding Scheme Identification Sequence."""
    item = pydicom.Dataset()
    item.CodingSchemeDesignator = SCHEME
    item.CodingSchemeName = SCHEME_NAME
    item.CodingSchemeResponsibleOrganization = SOFTWARE_NAME
    existing = list(ds.get("CodingSchemeIdentificationSequence", []))
    ds.CodingSchemeIdentificationSequence = [*existing, item]


# -- the viewer ROI report ---------------------------------------------------------------

#: Tumour regions drawn in the viewer report: the largest ones, up to this many.
MAX_REGIONS = 50
#: Regions smaller than this are not drawn (mm²).
MIN_REGION_MM2 = 0.001


def tumour_regions(result: SlideResult) -> list[tuple[np.ndarray, np.ndarray]]:
    """Outer contours (map px, (row, col)) and cell masks of the largest tumour regions."""
    from scipy import ndimage
    from skimage.measure import approximate_polygon, find_contours

    tumour = result.compartments.labels == TUMOUR
    regions, n = ndimage.label(tumour)
    if n == 0:
        return []
    px_mm2 = (result.compartments.mpp / 1000.0) ** 2
    sizes = np.bincount(regions.ravel(), minlength=n + 1)[1:] * px_mm2
    order = [i + 1 for i in np.argsort(sizes)[::-1] if sizes[i] >= MIN_REGION_MM2][:MAX_REGIONS]
    cell_region = result.compartments.lookup_regions(regions, result.cells["x_um"], result.cells["y_um"])
    boxes = ndimage.find_objects(regions)
    out = []
    for r in order:
        box = boxes[r - 1]
        assert box is not None
        # Only the region's bounding box, padded by one pixel, is traced.
        padded = np.pad(regions[box] == r, 1)
        contours = find_contours(padded.astype(np.float32), 0.5)
        offset = np.array([box[0].start, box[1].start], np.float64)
        outer = max(contours, key=len) - 1.0 + offset  # undo the padding, back to map px
        outer = approximate_polygon(outer, tolerance=0.5)
        if len(outer) < 4:
            continue
        if not np.array_equal(outer[0], outer[-1]):
            outer = np.vstack([outer, outer[:1]])
        out.append((outer, cell_region == r))
    return out


def build_viewer_report(
    result: SlideResult,
    volumes: list[pydicom.Dataset],
    series_number: int = 210,
    previous: Sequence[pydicom.Dataset] = (),
) -> hd.sr.Comprehensive3DSR | None:
    """TID 1410 groups only: tumour regions as SCOORD3D polygons, each with its own measurements
    (H-score, % positive, cells, area); the slide's scores and alerts are in the full report.

    Slim draws only such reports (one slide-level or SEG-referencing group
    makes it reject the whole document), hence a second SR beside the full one.
    Returns None when no tumour region was found.
    """
    from pipeline import scoring

    regions = tumour_regions(result)
    if not regions:
        return None
    base = volumes[0]
    mpp0 = level_mpp(base)
    scale = result.compartments.mpp / mpp0  # map px → level-0 px
    transformer = hd.spatial.ImageToReferenceTransformer.for_image(base, for_total_pixel_matrix=True)
    groups = []
    for i, (contour, cells) in enumerate(regions, start=1):
        # Contour (row, col) in map px → (column, row) in level-0 total pixel matrix → slide mm.
        pixel_xy = np.stack([(contour[:, 1] + 0.5) * scale, (contour[:, 0] + 0.5) * scale], axis=1)
        slide_xyz = transformer(pixel_xy)
        counts = np.bincount(result.cells["intensity_class"][cells].astype(np.int64), minlength=4)[:4]
        area_mm2 = _polygon_area_mm2(slide_xyz)
        region_measurements = [
            m
            for m in (
                _m(H_SCORE, scoring.h_score(counts), ONE),
                _m(POSITIVE_PERCENT, scoring.positive_percent(counts), PERCENT),
                _m(TOTAL_CELLS, int(counts.sum()), CELLS),
                _m(AREA, area_mm2, MM2),
            )
            if m is not None
        ]
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"tumour region {i}"),
                referenced_region=hd.sr.ImageRegion3D(
                    graphic_type=hd.sr.GraphicTypeValues3D.POLYGON,
                    graphic_data=slide_xyz,
                    frame_of_reference_uid=base.FrameOfReferenceUID,
                ),
                finding_type=SEGMENTS[0].property_type,
                finding_category=SEGMENTS[0].category,
                algorithm_id=algorithm(result),
                measurements=region_measurements,
            )
        )
    return _unverified_report(
        groups,
        base,
        [base],
        series_number,
        f"{result.profile} tumour regions for viewers (unverified)",
        device_uid(result.settings.outputs.device_uid),
        previous,
    )


def _polygon_area_mm2(xyz: np.ndarray) -> float:
    x, y = xyz[:, 0], xyz[:, 1]
    return float(abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))) / 2.0)

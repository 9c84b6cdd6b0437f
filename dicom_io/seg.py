"""Segmentation IOD: the tumour / stroma map as a pyramid of BINARY, TILED_SPARSE SEGs.

Built with highdicom from the source slide's *headers only* (read with
``stop_before_pixels``): the SEG shares Study and Frame of Reference with the
slide, references the source level whose resolution is closest to the
pipeline's compartment map (so its pixels are that map, not an upsampled
copy), and ``create_segmentation_pyramid`` adds the coarser levels so a
viewer draws it at every zoom. Empty frames are omitted (TILED_SPARSE):
Slim draws FRACTIONAL + TILED_FULL multi-segment SEGs blank and does not yet
draw LABELMAP.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from config.product import SOFTWARE_NAME, software_version
from dicom_io.wsi_reader import WSI_SOP_CLASS
from pipeline.qc import Artefact, QcMap
from pipeline.segmentation import STROMA, TUMOUR, CompartmentMap

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegmentSpec:
    """One segment: the compartment label it comes from and its codes."""

    label: int
    name: str
    category: hd.sr.CodedConcept
    property_type: hd.sr.CodedConcept
    colour_lab: tuple[int, int, int]


#: Tumour: SCT 108369006 "Neoplasm" (category SCT 49755003 "Morphologically
#: abnormal structure"); stroma: SCT 21793004 "Connective tissue" (category
#: SCT 85756007 "Tissue").
SEGMENTS = (
    SegmentSpec(
        TUMOUR,
        "tumour",
        hd.sr.CodedConcept("49755003", "SCT", "Morphologically abnormal structure"),
        hd.sr.CodedConcept("108369006", "SCT", "Neoplasm"),
        (32768, 53482, 42919),  # red (CIELab scaled to 16 bits)
    ),
    SegmentSpec(
        STROMA,
        "stroma",
        hd.sr.CodedConcept("85756007", "SCT", "Tissue"),
        hd.sr.CodedConcept("21793004", "SCT", "Connective tissue"),
        (46811, 27314, 23254),  # green
    ),
)


def read_headers(files: list[Path]) -> list[pydicom.Dataset]:
    """Headers of the slide's VOLUME instances, finest first (pixel data not read)."""
    volumes: list[pydicom.Dataset] = []
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        image_type = [str(v).upper() for v in ds.get("ImageType", [])]
        if ds.SOPClassUID == WSI_SOP_CLASS and len(image_type) > 2 and image_type[2] == "VOLUME":
            volumes.append(ds)
    volumes.sort(key=lambda ds: -int(ds.TotalPixelMatrixColumns))
    return volumes


def level_mpp(ds: pydicom.Dataset) -> float:
    """µm/px (column spacing) of a WSI instance."""
    spacing = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    return float(spacing[1]) * 1000.0


def labels_on_level(compartments: CompartmentMap, ds: pydicom.Dataset) -> np.ndarray:
    """The compartment map sampled at the pixel centres of a source level (fat/background outside it)."""
    return sample_on_level(compartments.labels, compartments.mpp, ds)


def sample_on_level(labels: np.ndarray, labels_mpp: float, ds: pydicom.Dataset) -> np.ndarray:
    """A label map (``labels_mpp`` µm/px from the slide's origin) sampled at the pixel centres of a
    source level, 0 outside it. Rows and columns are looked up separately (the map is axis-aligned),
    so the memory is that of the result only."""
    rows, cols = int(ds.TotalPixelMatrixRows), int(ds.TotalPixelMatrixColumns)
    mpp = level_mpp(ds)
    h, w = labels.shape
    r = np.floor((np.arange(rows) + 0.5) * mpp / labels_mpp).astype(np.int64)
    c = np.floor((np.arange(cols) + 0.5) * mpp / labels_mpp).astype(np.int64)
    out = np.zeros((rows, cols), np.uint8)
    rin, cin = r < h, c < w
    out[np.ix_(rin, cin)] = labels[np.ix_(r[rin], c[cin])]
    return out


def choose_level(volumes: list[pydicom.Dataset], map_mpp: float) -> int:
    """Index of the source level whose µm/px is closest (in log scale) to the map's."""
    return int(np.argmin([abs(np.log(level_mpp(ds) / map_mpp)) for ds in volumes]))


#: Quality-control areas as segments: category (SCT 260787004) Physical object (CID 7150), type
#: (DCM 111207) Image artifact(s); one segment per kind found, labelled "QC ink" and so on.
QC_CATEGORY = hd.sr.CodedConcept("260787004", "SCT", "Physical object")
QC_TYPE = hd.sr.CodedConcept("111207", "DCM", "Image artifact(s)")
QC_COLOUR_LAB = (60000, 32768, 32768)  # near white: drawn as a pale veil over what was left out


def build_segmentations(
    compartments: CompartmentMap,
    volumes: list[pydicom.Dataset],
    series_number: int = 100,
    series_description: str = "Tumour and stroma (automated)",
    qc_map: QcMap | None = None,
) -> list[hd.seg.Segmentation]:
    """A pyramid of SEG instances for the tumour and stroma segments (one series), and a segment
    for each kind of area quality control left out (``qc_map``)."""
    segs = _build_segmentations(compartments, volumes, series_number, qc_map)
    for seg in segs:
        seg.SeriesDescription = series_description[:64]
    return segs


def _build_segmentations(
    compartments: CompartmentMap, volumes: list[pydicom.Dataset], series_number: int, qc_map: QcMap | None
) -> list[hd.seg.Segmentation]:
    start = choose_level(volumes, compartments.mpp)
    base = volumes[start]
    labels = labels_on_level(compartments, base)
    planes = [labels == s.label for s in SEGMENTS]
    qc_kinds: list[Artefact] = []
    if qc_map is not None and qc_map.mask.any():
        qc_labels = sample_on_level(qc_map.labels, qc_map.mpp, base)
        qc_kinds = [kind for kind in Artefact if kind is not Artefact.NONE and (qc_labels == kind).any()]
        planes += [qc_labels == kind for kind in qc_kinds]
    mask = np.stack(planes, axis=-1).astype(np.uint8)
    family = (
        codes.cid7162.ArtificialIntelligence
        if compartments.method.startswith("model")
        else codes.cid7162.NeighborhoodAnalysis
    )
    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"{SOFTWARE_NAME} {compartments.method} tumour-stroma segmentation",
        version=software_version(),
        family=family,
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i + 1,
            segment_label=s.name,
            segmented_property_category=s.category,
            segmented_property_type=s.property_type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor(*cielab(s.colour_lab)),
            tracking_id=s.name,
            tracking_uid=hd.UID(),
        )
        for i, s in enumerate(SEGMENTS)
    ]
    qc_algorithm = hd.AlgorithmIdentificationSequence(
        name=f"{SOFTWARE_NAME} quality control", version=software_version(), family=codes.cid7162.EdgeDetection
    )
    descriptions += [
        hd.seg.SegmentDescription(
            segment_number=len(SEGMENTS) + i + 1,
            segment_label=f"QC {kind.label}",
            segmented_property_category=QC_CATEGORY,
            segmented_property_type=QC_TYPE,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=qc_algorithm,
            display_color=hd.color.CIELabColor(*cielab(QC_COLOUR_LAB)),
            tracking_id=f"QC {kind.label}",
            tracking_uid=hd.UID(),
        )
        for i, kind in enumerate(qc_kinds)
    ]
    return build_label_pyramid(
        mask,
        descriptions,
        volumes,
        start,
        series_number,
        content_label="TUMOUR_STROMA",
        content_description="Tumour and stroma compartments",
    )


def build_label_pyramid(
    mask: np.ndarray,
    descriptions: list[hd.seg.SegmentDescription],
    volumes: list[pydicom.Dataset],
    start: int,
    series_number: int,
    content_label: str,
    content_description: str,
) -> list[hd.seg.Segmentation]:
    """BINARY, TILED_SPARSE SEG instances of ``mask`` (rows × columns × segments, on the pixel grid
    of ``volumes[start]``): one per source level from ``start`` down, or, where the slide has no
    coarser level, a pyramid highdicom derives (one series)."""
    sources = volumes[start:]
    base = volumes[start]
    tile = int(base.Columns)
    common = _common(descriptions, series_number, tile, content_label, content_description)
    factors = None
    if len(sources) == 1:
        # No coarser source level: let highdicom derive coarser SEG levels itself.
        side = max(mask.shape[:2])
        factors = [float(2**k) for k in range(1, 8) if side / 2**k >= 64] or None
        if factors is None:
            return [
                hd.seg.Segmentation(
                    source_images=sources,
                    pixel_array=mask[None],
                    sop_instance_uid=hd.UID(),
                    instance_number=1,
                    **common,
                )
            ]
    return hd.seg.create_segmentation_pyramid(
        source_images=sources,
        pixel_arrays=[mask[None]],
        downsample_factors=factors,
        **common,
    )


def _common(
    descriptions: list[hd.seg.SegmentDescription],
    series_number: int,
    tile: int,
    content_label: str,
    content_description: str,
) -> dict:
    """Arguments shared by single SEGs and SEG pyramids."""
    return dict(
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        manufacturer=SOFTWARE_NAME,
        manufacturer_model_name=f"{SOFTWARE_NAME} {content_label.lower().replace('_', '-')}",
        software_versions=software_version(),
        device_serial_number="0",
        content_label=content_label,
        content_description=content_description,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        dimension_organization_type=hd.DimensionOrganizationTypeValues.TILED_SPARSE,
        omit_empty_frames=True,
        tile_size=(tile, tile),
    )


def cielab(scaled: tuple[int, int, int]) -> tuple[float, float, float]:
    """DICOM 16-bit CIELab to L* a* b*."""
    L, a, b = scaled
    return L / 65535 * 100.0, a / 65535 * 255.0 - 128.0, b / 65535 * 255.0 - 128.0

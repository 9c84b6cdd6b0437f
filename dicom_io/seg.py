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
    """The compartment map sampled at the pixel centres of a source level (fat/background outside it).

    Rows and columns are looked up separately (the map is axis-aligned), so
    the memory is that of the result only.
    """
    rows, cols = int(ds.TotalPixelMatrixRows), int(ds.TotalPixelMatrixColumns)
    mpp = level_mpp(ds)
    h, w = compartments.labels.shape
    r = np.floor((np.arange(rows) + 0.5) * mpp / compartments.mpp).astype(np.int64)
    c = np.floor((np.arange(cols) + 0.5) * mpp / compartments.mpp).astype(np.int64)
    out = np.zeros((rows, cols), np.uint8)
    rin, cin = r < h, c < w
    out[np.ix_(rin, cin)] = compartments.labels[np.ix_(r[rin], c[cin])]
    return out


def choose_level(volumes: list[pydicom.Dataset], map_mpp: float) -> int:
    """Index of the source level whose µm/px is closest (in log scale) to the map's."""
    return int(np.argmin([abs(np.log(level_mpp(ds) / map_mpp)) for ds in volumes]))


def build_segmentations(
    compartments: CompartmentMap,
    volumes: list[pydicom.Dataset],
    series_number: int = 100,
    series_description: str = "Tumour and stroma (automated)",
) -> list[hd.seg.Segmentation]:
    """A pyramid of SEG instances for the tumour and stroma segments (one series)."""
    segs = _build_segmentations(compartments, volumes, series_number)
    for seg in segs:
        seg.SeriesDescription = series_description[:64]
    return segs


def _build_segmentations(
    compartments: CompartmentMap, volumes: list[pydicom.Dataset], series_number: int
) -> list[hd.seg.Segmentation]:
    start = choose_level(volumes, compartments.mpp)
    base = volumes[start]
    labels = labels_on_level(compartments, base)
    mask = np.stack([labels == s.label for s in SEGMENTS], axis=-1).astype(np.uint8)
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
            display_color=hd.color.CIELabColor(*_lab(s.colour_lab)),
            tracking_id=s.name,
            tracking_uid=hd.UID(),
        )
        for i, s in enumerate(SEGMENTS)
    ]
    sources = volumes[start:]
    tile = int(base.Columns)
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
                    **_common(descriptions, series_number, tile),
                )
            ]
    return hd.seg.create_segmentation_pyramid(
        source_images=sources,
        pixel_arrays=[mask[None]],
        downsample_factors=factors,
        **_common(descriptions, series_number, tile),
    )


def _common(descriptions: list[hd.seg.SegmentDescription], series_number: int, tile: int) -> dict:
    """Arguments shared by single SEGs and SEG pyramids."""
    return dict(
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        manufacturer=SOFTWARE_NAME,
        manufacturer_model_name=f"{SOFTWARE_NAME} tumour-stroma",
        software_versions=software_version(),
        device_serial_number="0",
        content_label="TUMOUR_STROMA",
        content_description="Tumour and stroma compartments",
        transfer_syntax_uid=ExplicitVRLittleEndian,
        dimension_organization_type=hd.DimensionOrganizationTypeValues.TILED_SPARSE,
        omit_empty_frames=True,
        tile_size=(tile, tile),
    )


def _lab(scaled: tuple[int, int, int]) -> tuple[float, float, float]:
    """DICOM 16-bit CIELab to L* a* b*."""
    L, a, b = scaled
    return L / 65535 * 100.0, a / 65535 * 255.0 - 128.0, b / 65535 * 255.0 - 128.0

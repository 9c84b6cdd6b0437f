"""Write a scored slide's results: the DICOM set for DICOM sources, the OME set otherwise.

DICOM (same Study and Frame of Reference as the slide, a new Series per
object type): SEG pyramid, TID 1500 measurement SR, bulk cell annotations,
and a review KOS when an alert fired. Files are named only from UIDs,
checked to be UIDs, under ``out_dir/<StudyInstanceUID>/<SeriesInstanceUID>/``.
Every source also gets ``result.json``; non-DICOM sources get
``compartments.ome.tif`` and ``cells.csv``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pydicom.errors

from config.errors import SlideReadError
from dicom_io.ann import build_annotations
from dicom_io.ko import build_review_flag
from dicom_io.ome_results import write_cell_table, write_json, write_label_ome_tiff
from dicom_io.overviews import write_overviews
from dicom_io.pm import HEATMAPS, build_attribution_map, build_heatmap, build_heatmap_bands
from dicom_io.seg import build_segmentations, read_headers
from dicom_io.sr import build_measurement_report, build_viewer_report
from dicom_io.uids import is_uid
from dicom_io.wsi_reader import DicomWsiSlide
from pipeline.analysis import SlideResult
from pipeline.slide import Slide

log = logging.getLogger(__name__)


@dataclass
class WrittenResults:
    json: Path
    dicom: dict[str, list[Path]] = field(default_factory=dict)
    ome: dict[str, Path] = field(default_factory=dict)
    #: PNG overviews (:mod:`dicom_io.overviews`): heat maps and the outlined thumbnail.
    overviews: dict[str, Path] = field(default_factory=dict)

    def all_dicom(self) -> list[Path]:
        return [p for paths in self.dicom.values() for p in paths]


def uid_path(root: Path, ds: pydicom.Dataset) -> Path:
    """``root/<study>/<series>/<sop instance>.dcm``, refusing anything that is not a UID."""
    parts = [str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)]
    for part in parts:
        if not is_uid(part):
            raise SlideReadError(root, f"refusing to build a path from a non-UID value {part!r}")
    return root.joinpath(parts[0], parts[1], f"{parts[2]}.dcm")


#: Every object we write declares UTF-8: units such as "mm²" and "µm" and names copied from the
#: source are then encoded as declared, whatever character set the source had (or lacked).
CHARACTER_SET = "ISO_IR 192"


def save(ds: pydicom.Dataset, root: Path) -> Path:
    path = uid_path(root, ds)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.SpecificCharacterSet = CHARACTER_SET
    if "TotalPixelMatrixColumns" in ds and "PatientOrientation" not in ds:
        ds.PatientOrientation = ""  # Type 2C of General Image for slide-coordinate images
    tmp = path.with_suffix(".part")
    ds.save_as(tmp, enforce_file_format=True)
    tmp.replace(path)
    return path


def previous_reports(out_dir: Path) -> dict[str, list[pydicom.Dataset]]:
    """The SR documents of an earlier scoring in ``out_dir`` (by kind: ``sr``, ``viewer_sr``), read
    from its ``result.json``; a re-score names them as the documents it replaces."""
    summary = out_dir / "result.json"
    if not summary.is_file():
        return {}
    try:
        outputs = json.loads(summary.read_text()).get("outputs", {})
    except (OSError, ValueError):
        return {}
    found: dict[str, list[pydicom.Dataset]] = {}
    for kind in ("sr", "viewer_sr"):
        for name in outputs.get(kind, []):
            try:
                found.setdefault(kind, []).append(pydicom.dcmread(name, stop_before_pixels=True))
            except (OSError, pydicom.errors.InvalidDicomError):
                log.warning("previous report %s of %s cannot be read; not referenced", name, out_dir)
    return found


def write_results(
    result: SlideResult, slide: Slide, out_dir: Path, previous: dict[str, list[pydicom.Dataset]] | None = None
) -> WrittenResults:
    """Write every result object for ``slide`` under ``out_dir``; ``previous`` (from
    :func:`previous_reports`) are the reports of an earlier scoring that these replace."""
    previous = previous or {}
    out_dir.mkdir(parents=True, exist_ok=True)
    written = WrittenResults(json=out_dir / "result.json")
    if isinstance(slide, DicomWsiSlide):
        volumes = read_headers(slide.files)
        segs = build_segmentations(
            result.compartments,
            volumes,
            series_description=f"{result.profile} tumour and stroma (automated)",
            qc_map=result.qc_map,
        )
        written.dicom["seg"] = [save(seg, out_dir) for seg in segs]
        report = build_measurement_report(result, volumes, segs[0], previous=previous.get("sr", ()))
        written.dicom["sr"] = [save(report, out_dir)]
        viewer = build_viewer_report(result, volumes, previous=previous.get("viewer_sr", ()))
        if viewer is not None:
            written.dicom["viewer_sr"] = [save(viewer, out_dir)]
        written.dicom["ann"] = [save(build_annotations(result, volumes), out_dir)]
        outputs = result.settings.outputs
        # The QC map only where quality control left something out.
        scores = tuple(s for s in HEATMAPS if s != "qc" or result.qc)
        if outputs.heatmap:
            written.dicom["heatmap"] = [
                save(
                    build_heatmap(
                        result,
                        volumes,
                        outputs.heatmap_um,
                        series_number=500 + i,
                        content_qualification=outputs.content_qualification,
                        score=score,
                    ),
                    out_dir,
                )
                for i, score in enumerate(scores)
            ]
        if result.explanations:
            written.dicom["attribution"] = [
                save(
                    build_attribution_map(
                        result, volumes, e, 560 + i, content_qualification=outputs.content_qualification
                    ),
                    out_dir,
                )
                for i, e in enumerate(result.explanations)
                if e.tiles
            ]
        if outputs.heatmap_seg:
            written.dicom["heatmap_seg"] = [
                save(seg, out_dir) for seg in build_heatmap_bands(result, volumes, scores, outputs.heatmap_um)
            ]
        kos = build_review_flag(result, report, volumes[0])
        if kos is not None:
            written.dicom["ko"] = [save(kos, out_dir)]
    else:
        lv0 = slide.levels[0]
        written.ome["labels"] = write_label_ome_tiff(result, out_dir / "compartments.ome.tif")
        written.ome["cells"] = write_cell_table(result, out_dir / "cells.csv", (lv0.mpp_x, lv0.mpp_y))
    written.overviews = write_overviews(result, slide, out_dir)
    write_json(
        result,
        written.json,
        {
            "outputs": {k: [str(p) for p in v] for k, v in written.dicom.items()}
            | {k: str(p) for k, p in written.ome.items()}
            | {k: str(p) for k, p in written.overviews.items()}
        },
    )
    log.info("wrote results for %s to %s", slide.path, out_dir)
    return written

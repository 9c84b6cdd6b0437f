"""DICOM VL Whole Slide Microscopy Image series, read through wsidicom.

Headers are checked with pydicom first (``stop_before_pixels``) so a folder
that holds a CT, or a mix of series, is refused with the reason instead of
wsidicom's generic "no levels found".

Colour: a level whose header says RGB while its JPEG frames declare YCbCr
(a JFIF marker, an Adobe transform, subsampled chroma; see
:mod:`dicom_io.jpeg_colour`) is decoded as the frames say, with a warning in
the log and in ``metadata["warnings"]`` (shown by ``info``). wsidicom
believes the header and would skip the YCbCr-to-RGB conversion: false
colours in every pixel.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, JPEGBaseline8Bit, JPEGExtended12Bit
from wsidicom import WsiDicom
from wsidicom.codec import Decoder

from config.errors import SlideReadError
from dicom_io.jpeg_colour import ColourModel, declared_model
from dicom_io.sniff import is_dicom_file
from pipeline.slide import Level, Slide

log = logging.getLogger(__name__)

#: VL Whole Slide Microscopy Image Storage.
WSI_SOP_CLASS = UID("1.2.840.10008.5.1.4.1.1.77.1.6")


def _patient_value(value: Any) -> Any:
    if value is None:
        return None
    return str(value)


def _identifiers(ds: pydicom.Dataset) -> dict[str, Any]:
    """Identifying metadata of a WSI instance; the patient module as it is."""
    specimens = [
        {
            "identifier": str(item.get("SpecimenIdentifier", "")),
            "uid": str(item.get("SpecimenUID", "")),
        }
        for item in ds.get("SpecimenDescriptionSequence", [])
    ]
    return {
        "study_instance_uid": str(ds.get("StudyInstanceUID", "")),
        "series_instance_uid": str(ds.get("SeriesInstanceUID", "")),
        "frame_of_reference_uid": str(ds.get("FrameOfReferenceUID", "")),
        "container_identifier": str(ds.get("ContainerIdentifier", "")),
        "specimens": specimens,
        "accession_number": str(ds.get("AccessionNumber", "")),
        "study_id": str(ds.get("StudyID", "")),
        "manufacturer": str(ds.get("Manufacturer", "")),
        "patient": {
            "name": _patient_value(ds.get("PatientName")),
            "id": _patient_value(ds.get("PatientID")),
            "birth_date": _patient_value(ds.get("PatientBirthDate")),
            "sex": _patient_value(ds.get("PatientSex")),
        },
    }


def collect_dicom_files(source: Path | Iterable[Path]) -> list[Path]:
    """The DICOM files in a folder (recursively) or a list of files."""
    if isinstance(source, Path) and source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file() and is_dicom_file(p))
        if not files:
            raise SlideReadError(source, "folder holds no DICOM files")
        return files
    if isinstance(source, Path):
        return [source]
    return [Path(p) for p in source]


class DicomWsiSlide(Slide):
    """A DICOM WSI series: one instance per level (TILED_FULL or TILED_SPARSE)."""

    format = "dicom"

    def __init__(self, source: Path | Iterable[Path], mpp: float | None = None):
        files = collect_dicom_files(source)
        name = source if isinstance(source, Path) else files[0]
        volumes = self._check_headers(name, files)
        #: The pyramid (VOLUME) instances, for writers that need the source headers.
        self.files = [p for p, _ in volumes]
        first = volumes[0][1]
        try:
            self._wsi = WsiDicom.open([p for p, _ in volumes])
        except Exception as exc:  # wsidicom raises many types on bad input
            raise SlideReadError(name, f"cannot open DICOM WSI: {exc}") from exc
        compression = {
            (int(ds.TotalPixelMatrixColumns), int(ds.TotalPixelMatrixRows)): UID(ds.file_meta.TransferSyntaxUID).name
            for _, ds in volumes
        }
        levels: list[Level] = []
        for wl in self._wsi.levels:
            spacing = wl.pixel_spacing
            if mpp is not None:
                scale = wl.size.width / self._wsi.levels[0].size.width
                mpp_x = mpp_y = mpp / scale
            elif spacing is None:
                raise SlideReadError(name, "no pixel spacing (µm/px) in the DICOM; give one with --mpp")
            else:
                mpp_x, mpp_y = float(spacing.width) * 1000.0, float(spacing.height) * 1000.0
            levels.append(
                Level(
                    index=wl.level,
                    width=wl.size.width,
                    height=wl.size.height,
                    mpp_x=mpp_x,
                    mpp_y=mpp_y,
                    tile_width=wl.tile_size.width,
                    tile_height=wl.tile_size.height,
                    compression=compression.get((wl.size.width, wl.size.height), "unknown"),
                )
            )
        # wsidicom numbers levels by log2 of the downsample, not by position.
        self._wsi_level = {(wl.size.width, wl.size.height): wl.level for wl in self._wsi.levels}
        warnings = self._decode_as_frames_declare(dict(volumes))
        paths = first.get("OpticalPathSequence", [])
        self.icc_profile = bytes(paths[0].ICCProfile) if paths and "ICCProfile" in paths[0] else None
        meta = _identifiers(first)
        if warnings:
            meta["warnings"] = warnings
        meta["dimension_organization"] = sorted({str(ds.get("DimensionOrganizationType", "")) for _, ds in volumes})
        meta["files"] = len(files)
        super().__init__(name, levels, meta)

    def _decode_as_frames_declare(self, headers: dict[Path, pydicom.Dataset]) -> list[str]:
        """Give every level whose header says RGB but whose JPEG frames declare YCbCr a decoder
        that converts from YCbCr. Returns the warnings."""
        warnings: list[str] = []
        for wl in self._wsi.levels:
            for instance in wl.instances.values():
                data = instance.image_data
                files = [Path(str(f)) for f in getattr(data, "files", [])]
                ds = headers.get(files[0]) if files else None
                if ds is None or str(ds.get("PhotometricInterpretation", "")) != "RGB":
                    continue
                if UID(ds.file_meta.TransferSyntaxUID) not in (JPEGBaseline8Bit, JPEGExtended12Bit):
                    continue
                frame = first_frame(files[0])
                if frame is None or declared_model(frame) is not ColourModel.YCBCR:
                    continue
                data._decoder = Decoder.create(  # type: ignore[attr-defined]
                    UID(ds.file_meta.TransferSyntaxUID),
                    int(ds.SamplesPerPixel),
                    int(ds.BitsStored),
                    wl.tile_size,
                    "YBR_FULL_422",
                )
                message = (
                    f"{files[0].name}: Photometric Interpretation says RGB but its JPEG frames are YCbCr "
                    "(JFIF/Adobe marker or subsampled chroma); decoded as YCbCr"
                )
                log.debug("%s", message)  # analyse() logs the slide's warnings once
                warnings.append(message)
        return warnings

    @staticmethod
    def _check_headers(name: Path, files: list[Path]) -> list[tuple[Path, pydicom.Dataset]]:
        volumes: list[tuple[Path, pydicom.Dataset]] = []
        others: list[str] = []
        series: set[str] = set()
        for path in files:
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
                raise SlideReadError(path, f"not a readable DICOM file: {exc}") from exc
            sop = UID(str(ds.get("SOPClassUID", "")))
            if sop != WSI_SOP_CLASS:
                modality = ds.get("Modality", "?")
                others.append(f"{sop.name or sop or 'no SOP class'} (modality {modality})")
                continue
            series.add(str(ds.get("SeriesInstanceUID", "")))
            image_type = [str(v).upper() for v in ds.get("ImageType", [])]
            if len(image_type) >= 3 and image_type[2] not in ("VOLUME",):
                log.debug("skipping %s image %s", image_type[2], path)
                continue
            volumes.append((path, ds))
        if not volumes:
            found = "; ".join(sorted(set(others))) if others else "no pyramid (VOLUME) images"
            raise SlideReadError(name, f"not a VL Whole Slide Microscopy image: found {found}")
        if len(series) > 1:
            raise SlideReadError(name, f"holds {len(series)} WSI series ({', '.join(sorted(series))}); give one series")
        return volumes

    def _read_level_region(self, level: Level, x: int, y: int, width: int, height: int) -> np.ndarray:
        wsi_level = self._wsi_level[(level.width, level.height)]
        try:
            arr = self._wsi.read_region((x, y), wsi_level, (width, height), as_array=True)
        except Exception as exc:
            raise SlideReadError(self.path, f"cannot decode level {level.index} at ({x}, {y}): {exc}") from exc
        arr = np.asarray(arr)
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        # Always a copy: a region that is one whole tile comes back from wsidicom
        # as its cached tile, and the caller owns what this returns.
        return np.array(arr[:, :, :3], dtype=np.uint8, order="C")

    def close(self) -> None:
        self._wsi.close()


def first_frame(path: Path) -> bytes | None:
    """The first encoded frame of an encapsulated DICOM file, read without loading the rest."""
    try:
        ds = pydicom.dcmread(path, defer_size=1024)
        n = int(ds.get("NumberOfFrames", 1) or 1)
        with path.open("rb") as fh:
            fh.seek(ds.get_item("PixelData", keep_deferred=True).value_tell)  # type: ignore[union-attr,attr-defined]
            return next(generate_frames(fh, number_of_frames=n), None)
    except (OSError, ValueError, KeyError, AttributeError, StopIteration, InvalidDicomError):
        return None


def series_gaps(files: Iterable[Path]) -> list[str]:
    """What a WSI series being received evidently still lacks, from its headers ([] = nothing).

    DICOM has no end-of-series message, but a WSI series says some of its own
    size: a concatenation names its instance count (In-concatenation Total
    Number), and a pyramid's base level is ORIGINAL while scanners write the
    levels resampled from it as DERIVED. Reported: a concatenation with
    instances missing, and VOLUME images without their ORIGINAL base level.
    Files that are not WSI, or unreadable, are left to the reader to refuse.
    """
    concatenations: dict[str, tuple[set[int], int]] = {}
    volumes = originals = 0
    for path in files:
        try:
            ds = pydicom.dcmread(
                path,
                stop_before_pixels=True,
                specific_tags=[
                    "SOPClassUID",
                    "ImageType",
                    "ConcatenationUID",
                    "InConcatenationNumber",
                    "InConcatenationTotalNumber",
                ],
            )
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue
        if UID(str(ds.get("SOPClassUID", ""))) != WSI_SOP_CLASS:
            continue
        image_type = [str(v).upper() for v in ds.get("ImageType", [])]
        if len(image_type) >= 3 and image_type[2] == "VOLUME":
            volumes += 1
            originals += image_type[0] == "ORIGINAL"
        uid = ds.get("ConcatenationUID")
        if uid and ds.get("InConcatenationTotalNumber"):
            seen, total = concatenations.get(str(uid), (set(), 0))
            seen.add(int(ds.get("InConcatenationNumber", 0)))
            concatenations[str(uid)] = (seen, max(total, int(ds.InConcatenationTotalNumber)))
    gaps = [
        f"concatenation {uid} has {len(seen)} of {total} instances"
        for uid, (seen, total) in sorted(concatenations.items())
        if len(seen) < total
    ]
    if volumes and not originals:
        gaps.append(f"{volumes} resampled (DERIVED) level(s) but no ORIGINAL base level")
    return gaps

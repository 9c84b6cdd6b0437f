"""Convert any readable slide into a DICOM WSI series (JPEG tiles, full pyramid).

Used when an OME-TIFF / SVS / TIFF source should get DICOM results: the
results are then written against the converted series. Patient, study and
specimen identifiers come from a sidecar file (JSON or TOML, keys as in
:class:`~dicom_io.sm_image.SlideIdentity`); without one, the series gets new
UIDs and placeholder identifiers derived from the file name.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
import tempfile
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

from config.errors import ConfigError
from dicom_io.pyramid import PyramidBuilder
from dicom_io.sm_image import SlideIdentity, write_sm_series
from dicom_io.tiff_reader import TiffSlide
from pipeline.slide import Slide

log = logging.getLogger(__name__)

_DATE_FIELDS = {"patient_birth_date": dt.date.fromisoformat, "acquisition_datetime": dt.datetime.fromisoformat}


def source_acquisition_datetime(slide: Slide) -> dt.datetime | None:
    """When the source says it was scanned: OME ``AcquisitionDate``, or the Aperio ``Date``
    (and ``Time``) fields; None when it does not say."""
    meta = slide.metadata
    if meta.get("acquisition_date"):
        try:
            return dt.datetime.fromisoformat(str(meta["acquisition_date"]))
        except ValueError:
            log.warning("%s: unreadable acquisition date %r", slide.path, meta["acquisition_date"])
    aperio = meta.get("aperio") or {}
    if aperio.get("Date"):
        text = f"{aperio['Date']} {aperio.get('Time', '00:00:00')}"
        for fmt in ("%m/%d/%y %H:%M:%S", "%m/%d/%Y %H:%M:%S", "%Y-%m-%d %H:%M:%S"):
            try:
                return dt.datetime.strptime(text, fmt)
            except ValueError:
                continue
        log.warning("%s: unreadable Aperio date %r", slide.path, text)
    return None


def identity_from_sidecar(path: Path | None, slide: Slide) -> SlideIdentity:
    """Identifiers for the converted series, from a sidecar file when given."""
    values: dict[str, Any] = {
        "container_identifier": slide.path.stem[:64],
        "specimen_identifier": slide.path.stem[:64],
        "patient_name": "Unknown^Patient",
        "patient_id": slide.path.stem[:64],
        "study_description": f"Converted from {slide.path.name}"[:64],
        "series_description": f"{slide.format} slide converted to DICOM"[:64],
        "study_id": "",
        "accession_number": "",
        "manufacturer": "unknown (converted by ihc-adapter)",
        "model_name": slide.format,
        # Unknown for a converted slide: left out rather than the generator's placeholders.
        "specimen_description": None,
        "stains": (),
        "acquisition_datetime": source_acquisition_datetime(slide),
        "pyramid_description": f"converted from {slide.path.name}"[:64],
        "icc_profile": slide.icc_profile,
    }
    if path is not None:
        try:
            text = path.read_text()
            data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (OSError, ValueError) as exc:
            raise ConfigError("sidecar", str(path), f"cannot read: {exc}") from exc
        known = {f.name for f in fields(SlideIdentity)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError("sidecar", str(path), f"unknown keys {unknown}; known: {sorted(known)}")
        for key, value in data.items():
            try:
                values[key] = _DATE_FIELDS[key](value) if key in _DATE_FIELDS else value
            except ValueError as exc:
                raise ConfigError(f"sidecar.{key}", value, str(exc)) from exc
    return SlideIdentity(**values)


def convert_to_dicom(
    slide: Slide, out_dir: Path, identity: SlideIdentity, tile_size: int = 512, quality: int = 90
) -> list[Path]:
    """Write ``slide``'s finest level as a DICOM WSI pyramid in ``out_dir``.

    Where the finest level is tiled JPEG (most OME-TIFF, SVS and TIFF slides), its own tiles are
    copied, not re-encoded (:meth:`dicom_io.tiff_reader.TiffSlide.jpeg_level`): the DICOM copy
    holds the very pixels of the source, in the source's tile size. Otherwise (JPEG 2000, LZW,
    untiled) the level is encoded as JPEG at ``quality`` in ``tile_size`` tiles. The levels
    below are resampled from it and encoded.
    """
    lv0 = slide.levels[0]
    if abs(lv0.mpp_x - lv0.mpp_y) / lv0.mpp_x > 0.01:
        raise ConfigError("slide", str(slide.path), "non-square pixels cannot be converted")
    tmp = Path(tempfile.mkdtemp(prefix=".pyramid-", dir=out_dir.parent if out_dir.parent.exists() else None))
    try:
        base, why = slide.jpeg_level(0, tmp) if isinstance(slide, TiffSlide) else (None, f"it is {slide.format}")
        if base is not None:
            tile_size = base.tile_size
            log.info("%s: level 0 copied as its own %d px JPEG tiles (%s)", slide.path, tile_size, base.photometric)
        else:
            log.info("%s: level 0 encoded as JPEG (quality %d): %s", slide.path, quality, why)
        builder = PyramidBuilder(lv0.width, lv0.height, lv0.mpp_x, tmp, tile_size, quality, base=base)
        for y in range(0, lv0.height, tile_size):
            h = min(tile_size, lv0.height - y)
            builder.add_band(slide.read_region(0, 0, y, lv0.width, h))
        return write_sm_series(builder.finish(), out_dir, identity)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

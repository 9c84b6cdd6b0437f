"""Open any supported slide by sniffing the file, never by trusting the name."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from config.errors import ConfigError, SlideReadError
from dicom_io.tiff_reader import TiffSlide, is_tiff_file
from dicom_io.wsi_reader import DicomWsiSlide, is_dicom_file
from pipeline.slide import Slide


def open_slide(source: str | Path | Sequence[str | Path], mpp: float | None = None) -> Slide:
    """Open a DICOM WSI (folder, file or list of instances), OME-TIFF, SVS or TIFF.

    ``mpp`` (µm/px of the finest level) overrides what the file says and is
    required for files that carry none.
    """
    if mpp is not None and not mpp > 0:
        raise ConfigError("mpp", mpp, "must be a positive number of µm/px")
    if not isinstance(source, (str, Path)):
        files = [Path(p) for p in source]
        if not files:
            raise ConfigError("source", source, "no files given")
        for f in files:
            if not f.is_file():
                raise SlideReadError(f, "no such file")
        return DicomWsiSlide(files, mpp=mpp)
    path = Path(source)
    if path.is_dir():
        return DicomWsiSlide(path, mpp=mpp)
    if not path.exists():
        raise SlideReadError(path, "no such file or folder")
    if path.stat().st_size == 0:
        raise SlideReadError(path, "file is empty")
    if is_dicom_file(path):
        return DicomWsiSlide(path, mpp=mpp)
    if is_tiff_file(path):
        return TiffSlide(path, mpp=mpp)
    with path.open("rb") as fh:
        head = fh.read(8)
    raise SlideReadError(path, f"not a DICOM or TIFF file (starts with {head!r})")

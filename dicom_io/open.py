"""Open any supported slide by sniffing the file, never by trusting the name."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from config.errors import ConfigError, SlideReadError
from dicom_io.sniff import is_dicom_file, is_tiff_file
from pipeline.slide import Slide

# The backends are imported when a slide of theirs is opened: wsidicom alone
# takes about half a second to import, in every process that opens a TIFF.


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
        return _dicom_slide(files, mpp)
    path = Path(source)
    if path.is_dir():
        return _dicom_slide(path, mpp)
    if not path.exists():
        raise SlideReadError(path, "no such file or folder")
    if path.stat().st_size == 0:
        raise SlideReadError(path, "file is empty")
    if is_dicom_file(path):
        return _dicom_slide(path, mpp)
    if is_tiff_file(path):
        from dicom_io.tiff_reader import TiffSlide

        return TiffSlide(path, mpp=mpp)
    with path.open("rb") as fh:
        head = fh.read(8)
    raise SlideReadError(path, f"not a DICOM or TIFF file (starts with {head!r})")


def _dicom_slide(source: Path | list[Path], mpp: float | None) -> Slide:
    from dicom_io.wsi_reader import DicomWsiSlide

    return DicomWsiSlide(source, mpp=mpp)

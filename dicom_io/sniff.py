"""What kind of slide file this is, from its first bytes (never from its name)."""

from __future__ import annotations

from pathlib import Path

#: Classic and BigTIFF headers, little- and big-endian.
TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def is_dicom_file(path: Path) -> bool:
    """True when ``path`` has the DICOM Part 10 preamble and ``DICM`` prefix."""
    try:
        with path.open("rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def is_tiff_file(path: Path) -> bool:
    """True when ``path`` starts with a TIFF or BigTIFF header."""
    try:
        with path.open("rb") as fh:
            return fh.read(4) in TIFF_MAGICS
    except OSError:
        return False

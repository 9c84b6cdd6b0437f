"""Write a JPEG tile pyramid as a pyramidal OME-TIFF or an Aperio-style SVS, and one RGB image as
a lossless OME-TIFF.

Tiles are copied as encoded (tifffile accepts pre-compressed tile bytes), so
these files carry exactly the pixels of the DICOM series written from the
same pyramid.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile
from ome_types import to_xml
from ome_types.model import OME, Channel, Image, Pixels, Pixels_DimensionOrder, PixelType, UnitsLength

from dicom_io.pyramid import EncodedLevel

#: TIFF tags for JPEG tiles of each DICOM Photometric Interpretation (EncodedLevel.photometric).
_TIFF_JPEG: dict[str, dict[str, object]] = {
    "YBR_FULL_422": {"compression": "jpeg", "photometric": "ycbcr", "subsampling": (2, 1)},
    "YBR_FULL": {"compression": "jpeg", "photometric": "ycbcr", "subsampling": (1, 1)},
    "RGB": {"compression": "jpeg", "photometric": "rgb"},
}


def write_rgb_ome_tiff(pixels: np.ndarray, mpp: float, path: Path) -> Path:
    """``pixels`` (H × W × 3 uint8) as a one-level OME-TIFF at ``mpp`` µm/px, tiled and deflated
    (lossless: a copy that differs from its source only where the pixels were changed)."""
    tifffile.imwrite(
        path,
        pixels,
        ome=True,
        photometric="rgb",
        tile=(256, 256),
        compression="zlib",
        metadata={"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp, "PhysicalSizeXUnit": "µm"},
    )
    return path


def _write_level(tw: tifffile.TiffWriter, level: EncodedLevel, **kwargs: object) -> None:
    tw.write(
        level.iter_tiles(),
        shape=(level.height, level.width, 3),
        dtype=np.uint8,
        tile=(level.tile_size, level.tile_size),
        **_TIFF_JPEG[level.photometric],  # type: ignore[arg-type]
        **kwargs,  # type: ignore[arg-type]
    )


def ome_xml(name: str, width: int, height: int, mpp_x: float, mpp_y: float) -> str:
    """OME-XML for one RGB bright-field image with physical sizes in µm."""
    ome = OME(
        images=[
            Image(
                id="Image:0",
                name=name,
                pixels=Pixels(
                    id="Pixels:0",
                    dimension_order=Pixels_DimensionOrder.XYCZT,
                    type=PixelType.UINT8,
                    size_x=width,
                    size_y=height,
                    size_c=3,
                    size_z=1,
                    size_t=1,
                    physical_size_x=mpp_x,
                    physical_size_x_unit=UnitsLength.MICROMETER,
                    physical_size_y=mpp_y,
                    physical_size_y_unit=UnitsLength.MICROMETER,
                    interleaved=True,
                    channels=[Channel(id="Channel:0:0", name="RGB", samples_per_pixel=3)],
                    metadata_only=True,
                ),
            )
        ],
        creator="ihc-adapter",
    )
    return to_xml(ome)


def write_ome_tiff(levels: Sequence[EncodedLevel], path: Path, name: str) -> Path:
    """Pyramidal OME-TIFF: level 0 with the others as SubIFDs."""
    base = levels[0]
    xml = ome_xml(name, base.width, base.height, base.mpp, base.mpp)
    with tifffile.TiffWriter(path, bigtiff=True, ome=False) as tw:
        _write_level(
            tw,
            base,
            subifds=len(levels) - 1,
            description=xml.encode("utf-8"),
            metadata=None,
            resolution=(1e4 / base.mpp, 1e4 / base.mpp),
            resolutionunit="CENTIMETER",
        )
        for lv in levels[1:]:
            _write_level(
                tw,
                lv,
                subfiletype=1,
                metadata=None,
                resolution=(1e4 / lv.mpp, 1e4 / lv.mpp),
                resolutionunit="CENTIMETER",
            )
    return path


def write_svs(levels: Sequence[EncodedLevel], path: Path, app_mag: int = 20) -> Path:
    """Aperio-style SVS: one page per level, ``MPP = ...`` in the description."""
    base = levels[0]
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for i, lv in enumerate(levels):
            head = (
                f"Aperio Image Library v12.0.0 \r\n{base.width}x{base.height} [0,0 {lv.width}x{lv.height}] "
                f"({lv.tile_size}x{lv.tile_size}) JPEG/RGB Q=90"
            )
            if i == 0:
                desc = (
                    f"{head}|AppMag = {app_mag}|MPP = {base.mpp:.4f}|ScanScope ID = ihc-adapter|Filename = {path.stem}"
                )
            else:
                desc = f"{head}|AppMag = {app_mag}|MPP = {base.mpp:.4f}"
            _write_level(tw, lv, description=desc, metadata=None)  # Aperio levels are not "reduced"
            if i == 0:
                # Aperio puts a stripped thumbnail second; readers expect it there.
                thumb = _decode_single_tile_level(levels[-1])
                tw.write(
                    thumb,
                    photometric="rgb",
                    compression="jpeg",
                    description=f"{head} -> {thumb.shape[1]}x{thumb.shape[0]}",
                    metadata=None,
                )
    return path


def _decode_single_tile_level(level: EncodedLevel) -> np.ndarray:
    """Stitch the (small) last level back into pixels for a thumbnail."""
    t = level.tile_size
    out = np.zeros((level.rows * t, level.columns * t, 3), np.uint8)
    for row in range(level.rows):
        for col in range(level.columns):
            out[row * t : (row + 1) * t, col * t : (col + 1) * t] = imagecodecs.jpeg8_decode(level.read_tile(col, row))
    return np.ascontiguousarray(out[: level.height, : level.width])

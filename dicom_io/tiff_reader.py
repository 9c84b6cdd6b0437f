"""OME-TIFF, Aperio SVS and generic pyramidal TIFF, read through tifffile + zarr.

Pixel size comes from, in this order: the caller (``mpp=``), OME-XML
``PhysicalSizeX/Y`` (via ome-types, any length unit), the Aperio
``MPP = ...`` description field, or the TIFF resolution tags when their unit
is inch or centimetre. A file with none of them is refused.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
import tifffile
from ome_types import from_xml

from config.errors import SlideReadError
from dicom_io.jpeg_colour import ColourModel, parse_header
from dicom_io.pyramid import EncodedLevel
from pipeline.slide import Level, Slide

log = logging.getLogger(__name__)

#: Factor from an OME length unit to micrometres.
_UM_PER_UNIT = {
    "pm": 1e-6,
    "nm": 1e-3,
    "µm": 1.0,
    "um": 1.0,
    "mm": 1e3,
    "cm": 1e4,
    "m": 1e6,
}


def parse_aperio_description(description: str) -> dict[str, str]:
    """``key = value`` fields of an Aperio ImageDescription (after the first ``|``)."""
    fields: dict[str, str] = {}
    for part in description.split("|")[1:]:
        key, sep, value = part.partition("=")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def _ome_mpp(path: Path, xml: str) -> tuple[float, float] | None:
    try:
        ome = from_xml(xml, validate=False)
    except Exception as exc:
        raise SlideReadError(path, f"OME-XML cannot be parsed: {exc}") from exc
    if not ome.images:
        return None
    pixels = ome.images[0].pixels
    if pixels.physical_size_x is None or pixels.physical_size_y is None:
        return None
    ux = _UM_PER_UNIT.get(str(pixels.physical_size_x_unit.value))
    uy = _UM_PER_UNIT.get(str(pixels.physical_size_y_unit.value))
    if ux is None or uy is None:
        raise SlideReadError(path, f"unsupported OME length unit {pixels.physical_size_x_unit.value!r}")
    return float(pixels.physical_size_x) * ux, float(pixels.physical_size_y) * uy


def _ome_metadata(path: Path, xml: str) -> dict[str, Any]:
    ome = from_xml(xml, validate=False)
    if not ome.images:
        return {}
    image = ome.images[0]
    pixels = image.pixels
    return {
        "image_name": image.name,
        "physical_size_x_um": _scaled(pixels.physical_size_x, pixels.physical_size_x_unit.value),
        "physical_size_y_um": _scaled(pixels.physical_size_y, pixels.physical_size_y_unit.value),
        "channels": [c.name for c in pixels.channels],
        "acquisition_date": str(image.acquisition_date) if image.acquisition_date else None,
    }


def _scaled(value: float | None, unit: str) -> float | None:
    if value is None or unit not in _UM_PER_UNIT:
        return None
    return float(value) * _UM_PER_UNIT[unit]


def _resolution_mpp(page: tifffile.TiffPage) -> tuple[float, float] | None:
    unit = page.tags.get("ResolutionUnit")
    xres, yres = page.tags.get("XResolution"), page.tags.get("YResolution")
    if unit is None or xres is None or yres is None:
        return None
    um_per_unit = {2: 25400.0, 3: 10000.0}.get(int(unit.value))
    if um_per_unit is None:
        return None
    (xn, xd), (yn, yd) = xres.value, yres.value
    if not xn or not yn:
        return None
    mpp_x, mpp_y = um_per_unit * xd / xn, um_per_unit * yd / yn
    # 72 or 96 dpi is the default every TIFF writer puts in; not a slide scan.
    if mpp_x > 100:
        return None
    return mpp_x, mpp_y


class TiffSlide(Slide):
    """A pyramidal TIFF flavour: OME-TIFF, SVS or generic tiled TIFF."""

    def __init__(self, path: Path, mpp: float | None = None):
        try:
            self._tif = tifffile.TiffFile(path)
        except Exception as exc:
            raise SlideReadError(path, f"corrupt or unsupported TIFF: {exc}") from exc
        try:
            super().__init__(path, *self._inspect(path, mpp))
        except SlideReadError:
            self._tif.close()
            raise
        except Exception as exc:
            self._tif.close()
            raise SlideReadError(path, f"corrupt TIFF structure: {exc}") from exc

    def _inspect(self, path: Path, mpp: float | None) -> tuple[list[Level], dict[str, Any]]:
        tif = self._tif
        if not tif.series:
            raise SlideReadError(path, "TIFF holds no readable image (file truncated or corrupt)")
        series = tif.series[0]
        self.format = "ome-tiff" if tif.is_ome else "svs" if tif.is_svs else "tiff"
        metadata: dict[str, Any] = {}
        file_mpp: tuple[float, float] | None
        if tif.is_ome:
            xml = tif.ome_metadata or ""
            file_mpp = _ome_mpp(path, xml)
            metadata = _ome_metadata(path, xml)
        elif tif.is_svs:
            fields = parse_aperio_description(tif.pages.first.description)
            kept = ("AppMag", "MPP", "ScanScope ID", "Date", "Time", "Filename")
            metadata = {"aperio": {k: fields[k] for k in kept if k in fields}}
            file_mpp = (float(fields["MPP"]),) * 2 if "MPP" in fields else None  # type: ignore[assignment]
            metadata["associated_images"] = [s.name for s in tif.series[1:] if s.name]
        else:
            file_mpp = _resolution_mpp(tif.pages.first)
        if mpp is not None:
            if file_mpp is not None and abs(file_mpp[0] - mpp) / mpp > 0.01:
                log.warning("%s: using --mpp %.4f instead of %.4f from the file", path, mpp, file_mpp[0])
            file_mpp = (mpp, mpp)
        if file_mpp is None:
            raise SlideReadError(path, "no pixel size (µm/px) in the file; give one with --mpp")
        if not (file_mpp[0] > 0 and file_mpp[1] > 0):
            raise SlideReadError(path, f"invalid pixel size {file_mpp} µm/px")

        self._arrays: dict[int, Any] = {}  # zarr arrays, opened when a level needs them
        self._axes: list[str] = []
        self._pages: list[tifffile.TiffPage | None] = []
        # Neighbouring analysis tiles (with margins) share source tiles: keep recent ones decoded.
        self._tile_cache = _TileCache(max_bytes=64 << 20)
        self._ycbcr: list[bool] = []  # per level: JPEG tiles are YCbCr under an RGB tag, decoded as YCbCr
        warnings: list[str] = []
        tif.filehandle.set_lock(True)  # tiles are read from several threads
        levels: list[Level] = []
        base_w = base_h = 0
        file_size = os.path.getsize(path)
        for i, lvl in enumerate(series.levels):
            axes = lvl.axes
            shape = dict(zip(axes, lvl.shape, strict=True))
            for ax, n in shape.items():
                if ax not in "YXSC" and n != 1:
                    raise SlideReadError(path, f"{n} planes along axis {ax!r}; only 2-D RGB slides are supported")
            samples = shape.get("S", shape.get("C", 1))
            if samples not in (3, 4):
                raise SlideReadError(path, f"not a bright-field RGB image ({samples} channel(s))")
            page = lvl.keyframe
            _check_complete(path, lvl.pages, file_size)
            width, height = shape["X"], shape["Y"]
            base_w, base_h = base_w or width, base_h or height
            self._axes.append(axes)
            # Direct tile decoding for the common layout (tiled, interleaved RGB, one plane).
            direct = page.is_tiled and page.planarconfig == 1 and len(lvl.pages) == 1 and axes.endswith("YXS")
            self._pages.append(page if direct else None)
            self._ycbcr.append(direct and self._mislabelled_ycbcr(page, warnings))
            levels.append(
                Level(
                    index=i,
                    width=width,
                    height=height,
                    mpp_x=file_mpp[0] * base_w / width,
                    mpp_y=file_mpp[1] * base_h / height,
                    tile_width=int(page.tilewidth or width),
                    tile_height=int(page.tilelength or page.rowsperstrip or height),
                    compression=tifffile.COMPRESSION(page.compression).name,
                )
            )
        if warnings:
            metadata["warnings"] = warnings
        icc = series.levels[0].keyframe.tags.get(34675)  # InterColorProfile
        self.icc_profile = bytes(icc.value) if icc is not None and icc.value else None
        return levels, metadata

    def _mislabelled_ycbcr(self, page: tifffile.TiffPage, warnings: list[str]) -> bool:
        """Whether a JPEG level tagged RGB holds YCbCr tiles that tifffile would decode as RGB
        (:mod:`dicom_io.jpeg_colour`), with a warning. Tiles with a JFIF marker are not: tifffile
        converts those itself, as TIFF readers do (OME-TIFFs from Bio-Formats are written so)."""
        if page.compression != tifffile.COMPRESSION.JPEG or page.photometric != tifffile.PHOTOMETRIC.RGB:
            return False
        index = next((i for i, n in enumerate(page.databytecounts) if n), None)
        if index is None:
            return False
        fh = self._tif.filehandle
        fh.seek(page.dataoffsets[index])
        header = parse_header(fh.read(min(int(page.databytecounts[index]), 1 << 16)))
        if header is None or header.model is not ColourModel.YCBCR or header.jfif:
            return False
        warnings.append(
            f"{Path(self._tif.filehandle.path).name} page {page.index}: Photometric says RGB but its JPEG tiles "
            "are YCbCr (JFIF/Adobe marker or subsampled chroma); decoded as YCbCr"
        )
        return True

    def _read_level_region(self, level: Level, x: int, y: int, width: int, height: int) -> np.ndarray:
        page = self._pages[level.index]
        if page is not None:
            try:
                return self._read_tiles(page, x, y, width, height, self._ycbcr[level.index])
            except SlideReadError:
                raise
            except Exception as exc:
                raise SlideReadError(self.path, f"cannot decode level {level.index} at ({x}, {y}): {exc}") from exc
        arr, axes = self._zarr_level(level.index), self._axes[level.index]
        index: list[slice | int] = []
        for ax in axes:
            if ax == "Y":
                index.append(slice(y, y + height))
            elif ax == "X":
                index.append(slice(x, x + width))
            elif ax in "SC":
                index.append(slice(0, 3))
            else:
                index.append(0)
        try:
            data = np.asarray(arr[tuple(index)])
        except Exception as exc:
            raise SlideReadError(self.path, f"cannot decode level {level.index} at ({x}, {y}): {exc}") from exc
        kept = [ax for ax in axes if ax in "YXSC"]
        data = np.moveaxis(data, [kept.index("Y"), kept.index("X")], [0, 1])
        if data.dtype != np.uint8:
            raise SlideReadError(self.path, f"unsupported sample type {data.dtype}; expected 8-bit RGB")
        return np.ascontiguousarray(data)

    def _zarr_level(self, index: int) -> Any:
        """Level ``index`` as a zarr array, for layouts :meth:`_read_tiles` does not
        decode itself (zarr is imported only then: it takes ~0.2 s)."""
        if index not in self._arrays:
            import zarr

            array = zarr.open(self._tif.series[0].aszarr(level=index), mode="r")
            if not isinstance(array, zarr.Array):
                raise SlideReadError(self.path, f"level {index} is not a single image array")
            self._arrays[index] = array
        return self._arrays[index]

    def _read_tiles(
        self, page: tifffile.TiffPage, x: int, y: int, width: int, height: int, ycbcr: bool = False
    ) -> np.ndarray:
        """Read and decode only the tiles under the region (zarr's async layer costs ~3× the decode)."""
        tw, th = int(page.tilewidth), int(page.tilelength)
        columns = -(-int(page.imagewidth) // tw)
        out = np.empty((height, width, 3), np.uint8)
        fh = self._tif.filehandle
        decode = page.decode
        for row in range(y // th, (y + height - 1) // th + 1):
            for col in range(x // tw, (x + width - 1) // tw + 1):
                index = row * columns + col
                offset, count = page.dataoffsets[index], page.databytecounts[index]
                key = (id(page), index)
                tile = self._tile_cache.get(key)
                if tile is None:
                    if count == 0:
                        tile = np.full((th, tw, 3), 255, np.uint8)
                    else:
                        with fh.lock:
                            fh.seek(offset)
                            data = fh.read(count)
                        if ycbcr:
                            tile = imagecodecs.jpeg8_decode(
                                data, tables=page.jpegtables, colorspace="YCBCR", outcolorspace="RGB"
                            )
                        else:
                            segment = decode(data, index, jpegtables=page.jpegtables)[0]
                            if segment is None:
                                raise SlideReadError(self.path, f"tile {index} of {page.index} is empty")
                            tile = segment[0]
                    self._tile_cache.put(key, tile)
                ty0, tx0 = row * th, col * tw
                sy0, sx0 = max(y, ty0), max(x, tx0)
                sy1, sx1 = min(y + height, ty0 + th), min(x + width, tx0 + tw)
                out[sy0 - y : sy1 - y, sx0 - x : sx1 - x] = tile[sy0 - ty0 : sy1 - ty0, sx0 - tx0 : sx1 - tx0, :3]
        return out

    def jpeg_level(self, index: int, workdir: Path) -> tuple[EncodedLevel | None, str]:
        """Level ``index``'s own JPEG tiles as complete streams (shared JPEG tables spliced into each)
        in a file in ``workdir``, for copying into DICOM without re-encoding; with the Photometric
        Interpretation their streams hold (:mod:`dicom_io.jpeg_colour`, the TIFF tag where a stream
        declares nothing). None, and why, where the level cannot be copied so."""
        page = self._pages[index]
        if page is None or page.compression != tifffile.COMPRESSION.JPEG:
            return None, "its tiles are not plain interleaved JPEG"
        if page.tilewidth != page.tilelength or page.tilewidth % 16 or int(page.samplesperpixel) != 3:
            shape = f"{page.tilewidth}x{page.tilelength}"
            return None, f"its {shape} tiles of {page.samplesperpixel} samples are not square RGB"
        if not all(page.databytecounts):
            return None, "it has missing tiles"
        level = self.levels[index]
        tables = bytes(page.jpegtables)[2:-2] if page.jpegtables else b""
        path = workdir / f"source-level{index}.jpegs"
        out = EncodedLevel(level.width, level.height, int(page.tilewidth), level.mpp_x, path)
        fh = self._tif.filehandle
        position = 0
        header = None
        with out.path.open("wb") as dst:
            for offset, count in zip(page.dataoffsets, page.databytecounts, strict=True):
                with fh.lock:
                    fh.seek(offset)
                    data = fh.read(count)
                if data[:2] != b"\xff\xd8":
                    return None, "a tile is not a JPEG stream"
                stream = data[:2] + tables + data[2:]
                header = header or parse_header(stream)
                dst.write(stream)
                out.offsets.append(position)
                out.lengths.append(len(stream))
                position += len(stream)
        if header is None:
            return None, "its JPEG tiles have no readable frame header"
        model = header.model
        if model is ColourModel.UNDECLARED:
            model = ColourModel.YCBCR if page.photometric == tifffile.PHOTOMETRIC.YCBCR else ColourModel.RGB
        if model is ColourModel.RGB:
            out.photometric = "RGB"
        else:
            out.photometric = "YBR_FULL_422" if len(set(header.sampling)) > 1 else "YBR_FULL"
        return out, ""

    def close(self) -> None:
        self._tif.close()


class _TileCache:
    """A small thread-safe LRU of decoded tiles, bounded in bytes."""

    def __init__(self, max_bytes: int):
        from collections import OrderedDict
        from threading import Lock

        self._items: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._bytes = 0
        self._max = max_bytes
        self._lock = Lock()

    def get(self, key: tuple[int, int]) -> np.ndarray | None:
        with self._lock:
            tile = self._items.get(key)
            if tile is not None:
                self._items.move_to_end(key)
            return tile

    def put(self, key: tuple[int, int], tile: np.ndarray) -> None:
        with self._lock:
            if key in self._items:
                return
            self._items[key] = tile
            self._bytes += tile.nbytes
            while self._bytes > self._max and self._items:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.nbytes


def _check_complete(path: Path, pages: Any, file_size: int) -> None:
    """Refuse a file cut short: every tile must lie inside the file."""
    for page in pages:
        if page is None:
            continue
        offsets = getattr(page, "dataoffsets", ())
        counts = getattr(page, "databytecounts", ())
        if offsets and counts:
            end = max(o + c for o, c in zip(offsets, counts, strict=False))
            if end > file_size:
                raise SlideReadError(
                    path,
                    f"file is truncated: image data runs to byte {end} but the file has {file_size} bytes",
                )

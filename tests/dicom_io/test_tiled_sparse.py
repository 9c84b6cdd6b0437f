"""TILED_SPARSE DICOM WSI: frames placed by their plane positions, gaps blank."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import generate_uid

from adapter.synth import SynthOutput
from dicom_io import open_slide


def _to_sparse(src: Path, dst: Path, drop: int) -> tuple[int, int]:
    """Rewrite a TILED_FULL instance as TILED_SPARSE, reversed and without frame ``drop``."""
    ds = pydicom.dcmread(src)
    n = int(ds.NumberOfFrames)
    cols = -(-int(ds.TotalPixelMatrixColumns) // int(ds.Columns))
    frames = list(generate_frames(ds.PixelData, number_of_frames=n))
    keep = [i for i in reversed(range(n)) if i != drop]  # reversed: positions, not order, must count
    per_frame = []
    spacing_mm = float(ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing[0])
    for i in keep:
        row, col = divmod(i, cols)
        pos = pydicom.Dataset()
        pos.ColumnPositionInTotalImagePixelMatrix = col * int(ds.Columns) + 1
        pos.RowPositionInTotalImagePixelMatrix = row * int(ds.Rows) + 1
        pos.XOffsetInSlideCoordinateSystem = round(col * int(ds.Columns) * spacing_mm, 6)
        pos.YOffsetInSlideCoordinateSystem = round(row * int(ds.Rows) * spacing_mm, 6)
        pos.ZOffsetInSlideCoordinateSystem = 0.0
        item = pydicom.Dataset()
        item.PlanePositionSlideSequence = [pos]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.DimensionOrganizationType = "TILED_SPARSE"
    ds.NumberOfFrames = len(keep)
    ds.PixelData = encapsulate([frames[i] for i in keep])
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(dst)
    return divmod(drop, cols)


def test_tiled_sparse_reads_like_tiled_full(small_slide: SynthOutput, tmp_path: Path) -> None:
    assert small_slide.dicom_dir
    files = [p for p in small_slide.dicom_dir.glob("*.dcm")]
    base = max(files, key=lambda p: int(pydicom.dcmread(p, stop_before_pixels=True).TotalPixelMatrixColumns))
    sparse = tmp_path / "sparse.dcm"
    row, col = _to_sparse(base, sparse, drop=5)
    with open_slide(base) as full, open_slide(sparse) as sp:
        assert sp.metadata["dimension_organization"] == ["TILED_SPARSE"]
        w, h = full.size
        a = full.read_region(0, 0, 0, w, h)
        b = sp.read_region(0, 0, 0, w, h)
    t = 256
    missing = np.zeros((h, w), bool)
    missing[row * t : (row + 1) * t, col * t : (col + 1) * t] = True
    assert np.array_equal(a[~missing], b[~missing])
    # The absent frame is blank, not a copy of another tile.
    gap = b[missing]
    assert gap.std() < 1.0 and not np.array_equal(gap, a[missing])

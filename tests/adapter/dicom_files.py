"""Small DICOM files for listener tests: a VL WSI object of chosen UIDs and size, or a file meta
header followed by whatever bytes a test wants sent as the dataset."""

from __future__ import annotations

import os
from pathlib import Path

import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_io.wsi_reader import WSI_SOP_CLASS


def _meta(sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = WSI_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = sop_uid
    return meta


def wsi_object(
    path: Path, sop_uid: str | None = None, series_uid: str | None = None, size: int = 64, seed: int = 0
) -> Path:
    """A (header-only) VL WSI object whose data set carries ``size`` bytes of content; ``seed``
    changes the content, not the UIDs."""
    ds = pydicom.Dataset()
    ds.file_meta = _meta(sop_uid or generate_uid())
    ds.SOPClassUID = WSI_SOP_CLASS
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.Modality = "SM"
    ds.ContentLabel = f"V{seed}"
    ds.add_new(0x00091010, "OB", (bytes([seed % 256]) + os.urandom(size - 1)) if size else b"")
    ds.add_new(0x00090010, "LO", "IHC_ADAPTER_TEST")
    ds.save_as(path, enforce_file_format=True)
    return path


def raw_dataset_file(path: Path, payload: bytes, sop_uid: str | None = None) -> Path:
    """A file meta header followed by ``payload`` as the data set: what a C-STORE sends, unparsed."""
    with path.open("wb") as fh:
        fh.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(fh, _meta(sop_uid or generate_uid()), enforce_standard=True)  # type: ignore[arg-type]
        fh.write(payload)
    return path

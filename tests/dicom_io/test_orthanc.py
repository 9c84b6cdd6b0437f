"""A real Orthanc accepts every result object by C-STORE and returns it by DICOMweb."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from dicom_io.dimse import DimseError, Peer, echo, send_files
from dicom_io.results import WrittenResults
from pipeline.analysis import SlideResult
from tests.conftest import require_tool
from tests.orthanc import DICOMWEB_PLUGIN, free_port, running_orthanc


def test_orthanc_stores_and_serves_every_object(
    dicom_results: tuple[SlideResult, WrittenResults], tmp_path: Path
) -> None:
    require_tool("Orthanc")
    _, written = dicom_results
    files = written.all_dicom()
    with running_orthanc(tmp_path / "orthanc") as pacs:
        assert echo(pacs.peer)
        results = send_files(files, pacs.peer)
        assert [r.ok for r in results] == [True] * len(files), [(r.path.name, hex(r.status)) for r in results]
        stored = set(pacs.get("/instances"))
        assert len(stored) == len(files)
        study = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
        if not DICOMWEB_PLUGIN.exists():
            pytest.fail("orthanc-dicomweb plugin missing")
        found = pacs.get(f"/dicom-web/studies/{study}/instances", accept="application/dicom+json")
        uids = {item["00080018"]["Value"][0] for item in found}
        expected = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}
        assert uids == expected
        for path in files:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            body = pacs.get(
                f"/dicom-web/studies/{study}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}",
                accept='multipart/related; type="application/dicom"',
            )
            assert isinstance(body, bytes) and ds.SOPInstanceUID.encode() in body


def test_unreachable_peer_is_a_clear_error(dicom_results: tuple[SlideResult, WrittenResults]) -> None:
    _, written = dicom_results
    with pytest.raises(DimseError, match=r"NOBODY@127\.0\.0\.1:\d+: association refused"):
        send_files(written.dicom["sr"], Peer("127.0.0.1", free_port(), "NOBODY"), timeout_s=3)

"""The storage SCP with DCMTK as the scanner (loopback, bounded in time)."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest

from adapter.scp import StorageSCP
from adapter.spool import Spool
from adapter.synth import SynthOutput
from config.service import ScpConfig
from tests.conftest import require_tool, self_signed_certificate, storescu_push
from tests.orthanc import free_port


@pytest.fixture()
def scp(tmp_path: Path, request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """A running SCP; ``@pytest.mark.parametrize("scp", [{...}], indirect=True)`` changes its config."""
    done: list[tuple[str, Path]] = []
    event = threading.Event()

    def complete(uid: str, folder: Path) -> None:
        done.append((uid, folder))
        event.set()

    config = ScpConfig(
        ae_title="IHC_ADAPTER",
        host="127.0.0.1",
        port=free_port(),
        allowed_calling_aes=("SCANNER1",),
        series_quiet_seconds=1.0,
        **({"min_free_disk_mb": 1} | getattr(request, "param", {})),
    )
    server = StorageSCP(config, Spool(tmp_path / "spool"), complete)
    server.start()
    try:
        yield server, done, event
    finally:
        server.stop()


def test_storescu_push_is_durable_and_completes_the_series(scp, small_slide: SynthOutput) -> None:  # type: ignore[no-untyped-def]
    server, done, event = scp
    assert small_slide.dicom_dir
    run = storescu_push(server.port, small_slide.dicom_dir)
    assert run.returncode == 0, run.stderr
    assert event.wait(15), "series never completed"
    [(uid, folder)] = done
    sent = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in small_slide.dicom_dir.glob("*.dcm")}
    received = {p.stem: p for p in folder.glob("*.dcm")}
    assert set(received) == set(sent)
    assert not list(folder.glob("*.part"))
    for sop, path in received.items():
        assert path.read_bytes()[132:] != b"" and pydicom.dcmread(path).SOPInstanceUID == sop
    assert uid == pydicom.dcmread(next(iter(sent.values())), stop_before_pixels=True).SeriesInstanceUID


def _split_series(slide_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The series as a scanner might send it: resampled (DERIVED) levels first, the base level later."""
    levels, base = tmp_path / "levels", tmp_path / "base"
    levels.mkdir()
    base.mkdir()
    files = sorted(slide_dir.glob("*.dcm"), key=lambda p: -pydicom.dcmread(p).TotalPixelMatrixColumns)
    shutil.copy(files[0], base)
    for path in files[1:]:
        ds = pydicom.dcmread(path)
        ds.ImageType = ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
        ds.save_as(levels / path.name)
    return levels, base


def test_series_without_its_base_level_waits_for_it(scp, small_slide: SynthOutput, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server, done, event = scp
    assert small_slide.dicom_dir
    levels, base = _split_series(small_slide.dicom_dir, tmp_path)
    assert storescu_push(server.port, levels).returncode == 0
    assert not event.wait(3), "handed over without its base level"  # quiet for 1 s, then kept waiting
    assert storescu_push(server.port, base).returncode == 0
    assert event.wait(15), "series never completed"
    [(_, folder)] = done
    assert len(list(folder.glob("*.dcm"))) == len(list(small_slide.dicom_dir.glob("*.dcm")))


@pytest.mark.parametrize("scp", [{"series_max_wait_seconds": 3.0}], indirect=True)
def test_series_with_gaps_is_handed_over_after_the_longest_wait(scp, small_slide: SynthOutput, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server, done, event = scp
    assert small_slide.dicom_dir
    levels, _ = _split_series(small_slide.dicom_dir, tmp_path)
    assert storescu_push(server.port, levels).returncode == 0
    start = time.monotonic()
    assert event.wait(15), "series never handed over"
    assert time.monotonic() - start >= 2.0  # not at the 1 s quiet time
    [(_, folder)] = done
    assert len(list(folder.glob("*.dcm"))) == len(list(small_slide.dicom_dir.glob("*.dcm"))) - 1


def test_unknown_calling_ae_is_refused(scp) -> None:  # type: ignore[no-untyped-def]
    server, _, _ = scp
    tool = require_tool("echoscu")
    bad = subprocess.run(
        [tool, "-aet", "INTRUDER", "-aec", "IHC_ADAPTER", "127.0.0.1", str(server.port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode != 0
    assert "Calling AE Title Not Recognized" in bad.stdout + bad.stderr
    good = subprocess.run(
        [tool, "-aet", "SCANNER1", "-aec", "IHC_ADAPTER", "127.0.0.1", str(server.port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert good.returncode == 0, good.stderr


def test_tls_listener(tmp_path: Path) -> None:
    """C-ECHO over TLS with a self-signed certificate; plain TCP is then refused."""
    import ssl

    from pynetdicom import AE

    cert, key = self_signed_certificate(tmp_path)
    config = ScpConfig(host="127.0.0.1", port=free_port(), tls={"certificate": cert, "key": key}, min_free_disk_mb=1)
    server = StorageSCP(config, Spool(tmp_path / "spool"), lambda uid, folder: None)
    server.start()
    try:
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
        ae = AE(ae_title="SCANNER1")
        ae.add_requested_context("1.2.840.10008.1.1")
        ae.acse_timeout = ae.network_timeout = 10
        assoc = ae.associate("127.0.0.1", server.port, ae_title="IHC_ADAPTER", tls_args=(client, "localhost"))
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        assoc.release()
        plain = ae.associate("127.0.0.1", server.port, ae_title="IHC_ADAPTER")
        assert not plain.is_established
    finally:
        server.stop()

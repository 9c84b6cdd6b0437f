"""The storage SCP with DCMTK as the scanner (loopback, bounded in time)."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import pydicom
import pytest

from adapter.scp import StorageSCP
from adapter.synth import SynthOutput
from config.service import ScpConfig
from tests.conftest import require_tool
from tests.orthanc import free_port


@pytest.fixture()
def scp(tmp_path: Path):  # type: ignore[no-untyped-def]
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
    )
    server = StorageSCP(config, tmp_path / "spool", complete)
    server.start()
    try:
        yield server, done, event
    finally:
        server.stop()


def test_storescu_push_is_durable_and_completes_the_series(scp, small_slide: SynthOutput) -> None:  # type: ignore[no-untyped-def]
    server, done, event = scp
    tool = require_tool("storescu")
    assert small_slide.dicom_dir
    run = subprocess.run(
        [
            tool,
            "-aet",
            "SCANNER1",
            "-aec",
            "IHC_ADAPTER",
            "-R",
            "-xy",
            "+sd",
            "+r",
            "127.0.0.1",
            str(server.port),
            str(small_slide.dicom_dir),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
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

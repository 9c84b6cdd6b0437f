"""The service end to end with real peers: DCMTK as scanner, Orthanc as PACS (loopback, bounded)."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import pytest

from adapter.service import Service
from adapter.synth import SynthOutput
from config.service import ServiceConfig
from tests.conftest import ct_image, require_tool, shared_file, storescu_push, wait_for
from tests.orthanc import free_port, running_orthanc


def _config(tmp_path: Path, pacs_port: int | None, watch: list[Path] | None = None, **service: object) -> ServiceConfig:
    data: dict = {
        "paths": {"spool": str(tmp_path / "spool"), "output": str(tmp_path / "out")},
        "scoring": {"profile": "ki67", "workers": 1},
        "scp": {
            "host": "127.0.0.1",
            "port": free_port(),
            "ae_title": "IHC_ADAPTER",
            "series_quiet_seconds": 1.0,
            "allowed_calling_aes": ["SCANNER1", "ORTHANC"],
            "min_free_disk_mb": 1,
        },
        "service": {"poll_seconds": 0.2, "retry_base_seconds": 0.5, "http_port": free_port(), **service},
        "watch": {"folders": [str(p) for p in watch or []], "settle_seconds": 0.5},
    }
    if pacs_port:
        data["destinations"] = [{"name": "pacs", "host": "127.0.0.1", "port": pacs_port, "ae_title": "ORTHANC"}]
    return ServiceConfig(**data)


def test_storescu_push_is_scored_and_results_reach_orthanc(small_slide: SynthOutput, tmp_path: Path) -> None:
    with running_orthanc(tmp_path / "orthanc") as pacs:
        service = Service(_config(tmp_path, pacs.peer.port))
        service.start()
        try:
            assert small_slide.dicom_dir
            run = storescu_push(service.config.scp.port, small_slide.dicom_dir)
            assert run.returncode == 0, run.stderr
            wait_for(lambda: service.queue.counts()["done"] == 1, 120, "the job to finish")
            job = service.queue.jobs("done")[0]
            wait_for(lambda: service.queue.delivery_states(job.id).get("pending", 0) == 0, 60, "delivery")
            delivered = service.queue.delivery_states(job.id)["sent"]
            assert delivered >= 5 and len(pacs.get("/instances")) == delivered
            import urllib.request

            base = f"http://127.0.0.1:{service.config.service.http_port}"
            health = json.loads(urllib.request.urlopen(base + "/healthz", timeout=5).read())
            assert health["status"] == "ok" and health["jobs"]["done"] == 1
            metrics = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
            assert 'ihc_adapter_jobs{state="done"} 1.0' in metrics
            assert "ihc_adapter_slide_seconds_count 1.0" in metrics
            assert "ihc_adapter_received_bytes_total" in metrics
        finally:
            service.stop()


def test_folder_drop_and_poison_input(small_slide: SynthOutput, tmp_path: Path) -> None:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    service = Service(_config(tmp_path, None, [incoming]))
    service.start()
    try:
        assert small_slide.ome_tiff
        shutil.copy(shared_file("bad/broken.svs"), incoming / "broken.svs")
        shutil.copy(shared_file("tcga-cr-7395-01a-01-ts1.svs"), incoming / "no-mpp.svs")
        ct_image(incoming / "ct.dcm")
        shutil.copy(small_slide.ome_tiff, incoming / "slide.ome.tif")
        wait_for(lambda: service.queue.counts()["done"] + service.queue.counts()["quarantined"] == 4, 120, "four jobs")
        reasons = sorted(j.reason or "" for j in service.queue.jobs("quarantined"))
        assert len(reasons) == 3
        assert any("broken.svs" in r and "not a DICOM or TIFF" in r for r in reasons)
        assert any("no pixel size" in r for r in reasons)
        assert any("CT Image Storage" in r for r in reasons)
        done = service.queue.jobs("done")[0]
        assert (Path(done.result_dir or "") / "result.json").exists()
        # The same slide dropped again under another name is not scored twice.
        shutil.copy(small_slide.ome_tiff, incoming / "again.ome.tif")
        time.sleep(2)
        assert service.queue.counts()["done"] == 1 and len(service.queue.jobs()) == 4
    finally:
        service.stop()


@pytest.mark.parametrize("allowed", [False, True])
def test_patient_data_is_logged_only_where_allowed(
    small_slide: SynthOutput, tmp_path: Path, caplog: pytest.LogCaptureFixture, allowed: bool
) -> None:
    service = Service(_config(tmp_path, None, log_patient_data=allowed, http_port=0))
    assert small_slide.dicom_dir
    service.series_complete("1.2.3.4", small_slide.dicom_dir)
    with caplog.at_level(logging.INFO, logger="adapter.service"):
        service.start()
        try:
            wait_for(lambda: service.queue.counts()["done"] == 1, 120, "scoring")
        finally:
            service.stop()
    done = [r.getMessage() for r in caplog.records if r.getMessage().startswith("event=done")]
    assert len(done) == 1
    text = "\n".join(r.getMessage() for r in caplog.records)
    # The synthetic slide's patient: ID SYNTH-0001, name Synthetic^Slide, accession SYNTH0001.
    assert "Synthetic^Slide" not in text
    if allowed:
        assert done[0].endswith("accession=SYNTH0001 patient_id=SYNTH-0001")
    else:
        assert "SYNTH-0001" not in text and "SYNTH0001" not in text


def test_destination_down_then_up_delivers_without_rescoring(small_slide: SynthOutput, tmp_path: Path) -> None:
    require_tool("Orthanc")
    port = free_port()
    service = Service(_config(tmp_path, port))
    assert small_slide.dicom_dir
    service.series_complete("1.2.3.4", small_slide.dicom_dir)  # as if a series had just arrived
    service.start()
    try:
        wait_for(lambda: service.queue.counts()["done"] == 1, 120, "scoring")
        job = service.queue.jobs("done")[0]
        failed = lambda: any(a > 0 for *_, a in service.queue.pending_deliveries(now=1e12))  # noqa: E731
        wait_for(failed, 30, "a failed delivery while the PACS is down")
        with running_orthanc(tmp_path / "orthanc", dicom_port=port) as pacs:
            wait_for(lambda: service.queue.delivery_states(job.id).get("pending", 0) == 0, 60, "delivery")
            assert len(pacs.get("/instances")) == service.queue.delivery_states(job.id)["sent"]
        assert service.queue.get(job.id).attempts == 1  # delivered without re-scoring
    finally:
        service.stop()


def test_pacs_initiated_push(small_slide: SynthOutput, tmp_path: Path) -> None:
    """Orthanc sends a stored slide to the service (POST /modalities/<adapter>/store)."""
    from dicom_io.dimse import send_files

    config = _config(tmp_path, None)
    modalities = {"adapter": ["IHC_ADAPTER", "127.0.0.1", config.scp.port]}
    with running_orthanc(tmp_path / "orthanc", modalities=modalities) as pacs:
        assert small_slide.dicom_dir
        files = sorted(small_slide.dicom_dir.glob("*.dcm"))
        assert all(r.ok for r in send_files(files, pacs.peer))
        service = Service(config)
        service.start()
        try:
            pacs.post("/modalities/adapter/store", pacs.get("/instances"))
            wait_for(lambda: service.queue.counts()["done"] == 1, 120, "the pushed slide to be scored")
            job = service.queue.jobs("done")[0]
            assert job.kind == "dicom" and len(list(Path(job.path).glob("*.dcm"))) == len(files)
        finally:
            service.stop()


def test_dicom_series_copied_file_by_file_is_scored_once(small_slide: SynthOutput, tmp_path: Path) -> None:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    service = Service(_config(tmp_path, None, [incoming]))
    service.start()
    try:
        assert small_slide.dicom_dir
        nested = incoming / "scanner" / "slide-1"
        nested.mkdir(parents=True)
        for path in sorted(small_slide.dicom_dir.glob("*.dcm")):
            # As a copy tool writes it: a temporary name first, then renamed.
            part = nested / (path.name + ".part")
            part.write_bytes(path.read_bytes())
            part.rename(nested / path.name)
            time.sleep(0.3)
        wait_for(lambda: service.queue.counts()["done"] == 1, 120, "the series to be scored")
        time.sleep(1.5)
        jobs = service.queue.jobs()
        assert len(jobs) == 1 and jobs[0].kind == "dicom" and jobs[0].attempts == 1
        assert len(list(Path(jobs[0].path).glob("*.dcm"))) == len(list(small_slide.dicom_dir.glob("*.dcm")))
    finally:
        service.stop()

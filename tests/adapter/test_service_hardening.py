"""The service against odd folder drops, re-sends and refusing destinations (real peers, loopback, bounded)."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt

from adapter import http
from adapter import service as service_module
from adapter.cli import main
from adapter.queue import DeliveryState, JobState
from adapter.service import Service
from adapter.synth import SynthOutput
from config.service import ServiceConfig
from pipeline.analysis import analyse
from tests.adapter.dicom_files import wsi_object
from tests.conftest import require_tool, self_signed_certificate, storescu_push, wait_for
from tests.orthanc import free_port, running_orthanc


def _config(tmp_path: Path, folders: list[Path] | None = None, **sections: Any) -> ServiceConfig:
    data: dict[str, Any] = {
        "paths": {"spool": str(tmp_path / "spool"), "output": str(tmp_path / "out")},
        "scoring": {"profile": "ki67", "workers": 1},
        "scp": {
            "host": "127.0.0.1",
            "port": free_port(),
            "series_quiet_seconds": 1.0,
            "allowed_calling_aes": ["SCANNER1"],
            "min_free_disk_mb": 1,
        },
        "service": {"poll_seconds": 0.2, "retry_base_seconds": 0.3, "http_port": free_port()},
        "watch": {"folders": [str(p) for p in folders or []], "settle_seconds": 0.5},
    }
    for name, values in sections.items():
        data[name] = data.get(name, {}) | values if isinstance(values, dict) else values
    return ServiceConfig(**data)


@pytest.fixture()
def incoming(tmp_path: Path) -> Path:
    folder = tmp_path / "incoming"
    folder.mkdir()
    return folder


def _delivered(service: Service, job_id: int) -> bool:
    states = service.queue.delivery_states(job_id)
    return states.get("sent", 0) > 0 and "pending" not in states


def _health(service: Service) -> tuple[int, dict[str, Any]]:
    url = f"http://127.0.0.1:{service.config.service.http_port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_a_dropped_file_cannot_write_outside_the_spool(incoming: Path, tmp_path: Path) -> None:
    escape = tmp_path / "escaped"
    bad_series = wsi_object(tmp_path / "s.dcm", series_uid=f"../../../{escape.name}")
    bad_instance = wsi_object(tmp_path / "i.dcm", sop_uid=str(escape / "X"))
    service = Service(_config(tmp_path, [incoming]))
    service.start()
    try:
        shutil.copy(bad_series, incoming / "series.dcm")
        shutil.copy(bad_instance, incoming / "instance.dcm")
        wait_for(lambda: service.queue.counts()["quarantined"] == 2, 30, "both files to be quarantined")
        reasons = sorted(j.reason or "" for j in service.queue.jobs("quarantined"))
        assert "is not a DICOM UID" in reasons[0] and "is not a DICOM UID" in reasons[1]
        assert not escape.exists() and not (escape / "X.dcm").exists()
        assert not list((tmp_path / "spool" / "incoming").rglob("*.dcm"))
        assert service.queue.counts()["done"] == 0
    finally:
        service.stop()


def test_the_watch_survives_unreadable_files_and_reports_dead_threads(
    incoming: Path, tmp_path: Path, small_slide: SynthOutput
) -> None:
    service = Service(_config(tmp_path, [incoming], watch={"follow_symlinks": True}))
    service.start()
    try:
        (incoming / "loop.svs").symlink_to(incoming / "loop.svs")  # a link to itself
        (incoming / "mem.svs").symlink_to("/proc/self/mem")  # reading it fails (EIO)
        time.sleep(1.5)
        assert small_slide.ome_tiff
        shutil.copy(small_slide.ome_tiff, incoming / "slide.ome.tif")
        wait_for(lambda: service.queue.counts()["done"] == 1, 120, "the good slide after the bad ones")
        reasons = " | ".join(j.reason or "" for j in service.queue.jobs("quarantined"))
        assert "loop.svs" in reasons and "mem.svs" in reasons
        assert _health(service) == (200, {"status": "ok", "jobs": service.queue.counts()})
        assert service.watcher is not None and service.watcher._observer is not None
        service.watcher._observer.stop()  # the file-system observer dies
        service.watcher._observer.join(5)
        code, body = _health(service)
        assert code == 503 and body["status"] == "unhealthy" and body["dead"] == ["watch-observer"]
    finally:
        service.stop()


def test_symbolic_links_out_of_the_watch_folder_are_not_followed(
    incoming: Path, tmp_path: Path, small_slide: SynthOutput
) -> None:
    assert small_slide.ome_tiff
    outside = tmp_path / "elsewhere" / "secret.ome.tif"
    outside.parent.mkdir()
    shutil.copy(small_slide.ome_tiff, outside)
    inside = incoming / "sub" / "real.ome.tif"
    inside.parent.mkdir()
    shutil.copy(small_slide.ome_tiff, inside)
    (incoming / "link-out.ome.tif").symlink_to(outside)
    (incoming / "etc").symlink_to("/etc", target_is_directory=True)  # a link to a folder: not descended
    service = Service(_config(tmp_path, [incoming]))
    service.start()
    try:
        wait_for(lambda: service.queue.counts()["done"] == 1, 120, "the slide inside")
        time.sleep(1)
        [problem] = service.queue.jobs("quarantined")
        assert "link-out.ome.tif" in (problem.reason or "") and "outside the watch folders" in (problem.reason or "")
        assert [j.path for j in service.queue.jobs("done")] == [str(inside)]
        assert len(service.queue.jobs()) == 2  # nothing read from /etc
    finally:
        service.stop()


def test_a_file_that_changes_while_scored_is_never_done_from_the_old_bytes(
    incoming: Path, tmp_path: Path, small_slide: SynthOutput, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert small_slide.ome_tiff
    scoring, resume = threading.Event(), threading.Event()

    def held_analyse(*args: Any, **kwargs: Any) -> Any:
        result = analyse(*args, **kwargs)
        if not resume.is_set():  # the first attempt waits while the file changes under it
            scoring.set()
            resume.wait(30)
        return result

    monkeypatch.setattr(service_module, "analyse", held_analyse)
    service = Service(_config(tmp_path, [incoming], watch={"settle_seconds": 0.3}))
    service.start()
    try:
        target = incoming / "slide.ome.tif"
        shutil.copy(small_slide.ome_tiff, target)
        assert scoring.wait(60), "scoring never started"
        with target.open("ab") as fh:  # the copy was only paused: more bytes arrive
            fh.write(b"\0" * 4096)
        resume.set()
        wait_for(lambda: service.queue.counts()["done"] == 1, 120, "the new version to be scored")
        first, second = service.queue.jobs()
        assert first.state is JobState.SUPERSEDED and "changed" in (first.reason or "")
        assert second.state is JobState.DONE
        assert not (tmp_path / "out" / f"job-{first.id}").exists()
        # A version that only grew after it was scored supersedes that job too.
        with target.open("ab") as fh:
            fh.write(b"\0" * 4096)
        wait_for(lambda: service.queue.get(second.id).state is JobState.SUPERSEDED, 30, "the grown file to supersede")
        wait_for(lambda: len(service.queue.jobs("done")) == 1 and len(service.queue.jobs()) == 3, 120, "third job")
    finally:
        resume.set()
        service.stop()


def test_a_resent_series_gives_one_result_set_and_a_changed_one_an_amendment(
    small_slide: SynthOutput, tmp_path: Path
) -> None:
    require_tool("storescu")
    assert small_slide.dicom_dir
    with running_orthanc(tmp_path / "orthanc") as pacs:
        pacs_dest = {"name": "pacs", "host": "127.0.0.1", "port": pacs.peer.port, "ae_title": "ORTHANC"}
        config = _config(tmp_path, destinations=[pacs_dest])
        service = Service(config)
        service.start()
        try:
            assert storescu_push(config.scp.port, small_slide.dicom_dir).returncode == 0
            wait_for(lambda: service.queue.counts()["done"] == 1, 120, "scoring")
            [job] = service.queue.jobs()
            wait_for(lambda: _delivered(service, job.id), 60, "delivery")
            first = set(pacs.get("/instances"))
            # The scanner never saw the responses and sends everything again.
            assert storescu_push(config.scp.port, small_slide.dicom_dir).returncode == 0
            time.sleep(3)
            assert service.queue.get(job.id).attempts == 1 and set(pacs.get("/instances")) == first
            # A changed series (a label image added): scored again, the new reports name the old ones.
            extra = tmp_path / "extra"
            extra.mkdir()
            base = min(small_slide.dicom_dir.glob("*.dcm"), key=lambda p: p.stat().st_size)
            ds = pydicom.dcmread(base)
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.ImageType = ["ORIGINAL", "PRIMARY", "LABEL", "NONE"]
            ds.save_as(extra / "more.dcm")
            assert storescu_push(config.scp.port, extra).returncode == 0
            wait_for(lambda: service.queue.get(job.id).attempts == 2, 60, "the re-score")
            wait_for(lambda: service.queue.get(job.id).state is JobState.DONE, 120, "the re-score to finish")
            wait_for(lambda: _delivered(service, job.id), 60, "delivery")
            new = set(pacs.get("/instances")) - first
            tags = [pacs.get(f"/instances/{i}/tags?simplify") for i in new]
            srs = [t for t in tags if t["Modality"] == "SR"]
            old_srs = {
                pacs.get(f"/instances/{i}/simplified-tags")["SOPInstanceUID"]
                for i in first
                if pacs.get(f"/instances/{i}/simplified-tags")["Modality"] == "SR"
            }
            assert len(srs) == 2
            for sr in srs:
                [pred] = sr["PredecessorDocumentsSequence"]
                referenced = {
                    item["ReferencedSOPInstanceUID"]
                    for series in pred["ReferencedSeriesSequence"]
                    for item in series["ReferencedSOPSequence"]
                }
                assert referenced <= old_srs and len(referenced) == 1
        finally:
            service.stop()


class _RecordingPacs:
    """A pynetdicom storage SCP answering every C-STORE with ``status``; counts associations."""

    def __init__(self, status: int, tls: ssl.SSLContext | None = None):
        self.status = status
        self.associations = 0
        self.stored: list[str] = []
        ae = AE(ae_title="PACS")
        ae.supported_contexts = AllStoragePresentationContexts
        handlers = [(evt.EVT_C_STORE, self._store), (evt.EVT_ESTABLISHED, self._opened)]
        self.port = free_port()
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers, ssl_context=tls)

    def _opened(self, event: Any) -> None:
        self.associations += 1

    def _store(self, event: Any) -> int:
        self.stored.append(str(event.request.AffectedSOPInstanceUID))
        return self.status

    def stop(self) -> None:
        self.server.shutdown()


def _pacs_destination(pacs: _RecordingPacs) -> dict[str, Any]:
    return {"name": "pacs", "host": "127.0.0.1", "port": pacs.port, "ae_title": "PACS"}


@pytest.fixture()
def scored_job(small_slide: SynthOutput, tmp_path: Path) -> Iterator[tuple[Path, list[Path]]]:
    """Result files of one scored series (scored once, reused by delivery tests)."""
    assert small_slide.dicom_dir
    service = Service(_config(tmp_path / "scoring"))
    service.series_complete("1.2.3.4", small_slide.dicom_dir)
    service.start()
    try:
        wait_for(lambda: service.queue.counts()["done"] == 1, 120, "scoring")
    finally:
        service.stop()
    out = tmp_path / "scoring" / "out" / "job-1"
    yield out, sorted(out.rglob("*.dcm"))


def _deliver(tmp_path: Path, files: list[Path], destination: dict[str, Any]) -> Service:
    service = Service(_config(tmp_path / "delivery", destinations=[destination]))
    job, _ = service.queue.submit("dicom:9.9", "dicom", str(tmp_path))
    service.queue.claim()
    service.queue.finish(job.id, str(tmp_path))
    service.queue.plan_deliveries(job.id, destination["name"], [str(f) for f in files])
    return service


@pytest.mark.parametrize(("status", "final"), [(0xA900, DeliveryState.REJECTED), (0xC000, DeliveryState.REJECTED)])
def test_a_permanent_refusal_is_recorded_and_not_retried(
    scored_job: tuple[Path, list[Path]], tmp_path: Path, status: int, final: DeliveryState
) -> None:
    _, files = scored_job
    pacs = _RecordingPacs(status)
    try:
        service = _deliver(tmp_path, files, _pacs_destination(pacs))
        assert service.deliver_once() == 0
        assert pacs.associations == 1 and len(pacs.stored) == len(files)  # one association for the job
        assert {d[2] for d in service.queue.deliveries(1)} == {final}
        assert service.queue.deliveries(1)[0][3] == f"status 0x{status:04X}"
        time.sleep(0.5)
        assert service.deliver_once() == 0 and pacs.associations == 1  # never tried again
        service.queue.close()
    finally:
        pacs.stop()


def test_out_of_resources_is_retried_until_it_passes(scored_job: tuple[Path, list[Path]], tmp_path: Path) -> None:
    _, files = scored_job
    pacs = _RecordingPacs(0xA700)
    try:
        service = _deliver(tmp_path, files, _pacs_destination(pacs))
        assert service.deliver_once() == 0
        assert {d[2] for d in service.queue.deliveries(1)} == {DeliveryState.PENDING}
        pacs.status = 0x0000
        time.sleep(0.4)  # the first back-off (retry_base_seconds 0.3)
        assert service.deliver_once() == len(files)
        assert pacs.associations == 2
        service.queue.close()
    finally:
        pacs.stop()


def test_results_reach_a_tls_destination(scored_job: tuple[Path, list[Path]], tmp_path: Path) -> None:
    cert, key = self_signed_certificate(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(str(cert), str(key))
    _, files = scored_job
    pacs = _RecordingPacs(0x0000, server_tls)
    try:
        dest = _pacs_destination(pacs)
        plain = _deliver(tmp_path / "plain", files, dest)
        assert plain.deliver_once() == 0  # a plain-text association is not accepted
        plain.queue.close()
        secure = _deliver(tmp_path / "tls", files, dest | {"tls": {"ca": str(cert), "server_name": "localhost"}})
        assert secure.deliver_once() == len(files) and len(pacs.stored) == len(files)
        secure.queue.close()
    finally:
        pacs.stop()


def test_an_open_listener_is_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    open_config = _config(
        tmp_path,
        scp={"host": "0.0.0.0", "port": free_port(), "allowed_calling_aes": [], "min_free_disk_mb": 1},
        service={"http_host": "0.0.0.0", "http_port": free_port(), "poll_seconds": 0.2},
    )
    with caplog.at_level(logging.WARNING, logger="adapter.service"):
        service = Service(open_config)
        service.start()
        service.stop()
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "event=insecure_listener" in messages and "allowed_calling_aes" in messages
    assert "event=open_status_port" in messages
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="adapter.service"):
        closed = Service(_config(tmp_path / "closed"))
        closed.start()
        closed.stop()
    assert not [r for r in caplog.records if "insecure" in r.getMessage() or "open_status" in r.getMessage()]


def test_a_half_open_http_request_is_dropped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http, "REQUEST_TIMEOUT_S", 1.0)
    server = http.StatusServer(free_port(), dict, lambda: (0, 0))
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")  # and never the rest
            started = time.monotonic()
            assert sock.recv(100) == b""
            assert time.monotonic() - started < 5
    finally:
        server.stop()


def test_retention_purges_old_files_and_still_recognises_a_resend(
    small_slide: SynthOutput, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert small_slide.dicom_dir
    config = _config(tmp_path, retention={"keep_days": 30})
    service = Service(config)
    spool_series = tmp_path / "spool" / "incoming" / "1.2.3.4"
    spool_series.mkdir(parents=True)
    for f in small_slide.dicom_dir.glob("*.dcm"):
        shutil.copy(f, spool_series)
    service.series_complete("1.2.3.4", spool_series)
    service.start()
    try:
        wait_for(lambda: service.queue.counts()["done"] == 1, 120, "scoring")
    finally:
        service.stop()
    out = tmp_path / "out" / "job-1"
    assert out.exists() and spool_series.exists()
    cfg = tmp_path / "adapter.toml"
    cfg.write_text(f'[paths]\nspool = "{tmp_path / "spool"}"\noutput = "{tmp_path / "out"}"\n')
    assert main(["jobs", "purge", "--config", str(cfg)]) == 2  # no retention set, no --older-than-days
    assert main(["jobs", "purge", "--config", str(cfg), "--older-than-days", "1"]) == 0
    assert out.exists()  # younger than a day
    assert main(["jobs", "purge", "--config", str(cfg), "--older-than-days", "0", "--dry-run"]) == 0
    assert "would purge job 1" in capsys.readouterr().out and out.exists()
    assert main(["jobs", "purge", "--config", str(cfg), "--older-than-days", "0"]) == 0
    assert not out.exists() and not spool_series.exists()
    # The job stays listed; the same series sent again is recognised, not scored again.
    again = Service(config)
    shutil.copytree(small_slide.dicom_dir, spool_series)
    job = again.series_complete("1.2.3.4", spool_series)
    assert job.state is JobState.DONE and job.attempts == 1
    again.queue.close()
    assert main(["jobs", "--config", str(cfg)]) == 0
    assert "done" in capsys.readouterr().out

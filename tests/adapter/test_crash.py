"""kill -9 the service while it scores or receives; after a restart every acknowledged slide is
scored exactly once and no result object reaches the PACS twice."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adapter.synth import SynthOutput
from tests.conftest import require_tool, storescu_push, wait_for
from tests.orthanc import free_port, running_orthanc


def _write_config(tmp_path: Path, scp_port: int, pacs_port: int, quiet_s: float = 1.0) -> Path:
    cfg = tmp_path / "adapter.toml"
    cfg.write_text(
        f"""
[paths]
spool = "{tmp_path / "spool"}"
output = "{tmp_path / "out"}"
[scoring]
profile = "ki67"
workers = 1
[scp]
host = "127.0.0.1"
port = {scp_port}
series_quiet_seconds = {quiet_s}
min_free_disk_mb = 1
[service]
poll_seconds = 0.2
retry_base_seconds = 0.5
[[destinations]]
name = "pacs"
host = "127.0.0.1"
port = {pacs_port}
ae_title = "ORTHANC"
"""
    )
    return cfg


def _serve(cfg: Path, log: Path, **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "adapter.cli", "serve", "--config", str(cfg)],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        env={**os.environ, **env},
    )


def _jobs(db: Path) -> list[tuple[int, str, int]]:
    if not db.exists():
        return []
    with sqlite3.connect(db) as con:
        return con.execute("SELECT id, state, attempts FROM jobs ORDER BY id").fetchall()


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_kill_during_scoring_and_restart(small_slide: SynthOutput, tmp_path: Path) -> None:
    require_tool("storescu")
    with running_orthanc(tmp_path / "orthanc") as pacs:
        scp_port = free_port()
        cfg = _write_config(tmp_path, scp_port, pacs.peer.port)
        db = tmp_path / "spool" / "jobs.db"
        proc = _serve(cfg, tmp_path / "serve.log")
        try:
            wait_for(lambda: _listening(scp_port), 60, "the service to listen")
            assert small_slide.dicom_dir
            assert storescu_push(scp_port, small_slide.dicom_dir).returncode == 0
            wait_for(lambda: any(state == "running" for _, state, _ in _jobs(db)), 60, "scoring to start")
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            assert [s for _, s, _ in _jobs(db)] == ["running"]
            proc = _serve(cfg, tmp_path / "serve.log")
            wait_for(lambda: [s for _, s, _ in _jobs(db)] == ["done"], 120, "the job to finish after restart")
            [(_, _, attempts)] = _jobs(db)
            assert attempts == 2
            with sqlite3.connect(db) as con:
                wait_for(
                    lambda: (
                        con.execute("SELECT COUNT(*) FROM deliveries WHERE state='pending'").fetchone()[0] == 0
                        and con.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0] > 0
                    ),
                    60,
                    "delivery",
                )
                sent = con.execute("SELECT COUNT(*) FROM deliveries WHERE state='sent'").fetchone()[0]
            # Only the finished attempt's objects reached the PACS: one SEG pyramid, one of each SR.
            instances = pacs.get("/instances")
            assert len(instances) == sent
            modalities = [pacs.get(f"/instances/{i}/simplified-tags")["Modality"] for i in instances]
            assert modalities.count("SR") == 2 and modalities.count("ANN") == 1
        finally:
            proc.kill()
            proc.wait(10)


def test_kill_during_receive_then_resend(small_slide: SynthOutput, tmp_path: Path) -> None:
    require_tool("storescu")
    with running_orthanc(tmp_path / "orthanc") as pacs:
        scp_port = free_port()
        cfg = _write_config(tmp_path, scp_port, pacs.peer.port)
        db = tmp_path / "spool" / "jobs.db"
        proc = _serve(cfg, tmp_path / "serve.log")
        try:
            wait_for(lambda: _listening(scp_port), 60, "the service to listen")
            assert small_slide.dicom_dir
            files = sorted(small_slide.dicom_dir.glob("*.dcm"))
            # Send the first instance, then die before the series is complete.
            first = tmp_path / "first"
            first.mkdir()
            (first / files[0].name).write_bytes(files[0].read_bytes())
            assert storescu_push(scp_port, first).returncode == 0
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            received = list((tmp_path / "spool" / "incoming").rglob("*.dcm"))
            assert len(received) == 1  # acknowledged = on disk
            proc = _serve(cfg, tmp_path / "serve.log")
            wait_for(lambda: _listening(scp_port), 60, "the restarted service to listen")
            # The scanner sends the whole series (again).
            assert storescu_push(scp_port, small_slide.dicom_dir).returncode == 0
            wait_for(lambda: [s for _, s, _ in _jobs(db)] == ["done"], 120, "the series to be scored once")
            assert len(list((tmp_path / "spool" / "incoming").rglob("*.dcm"))) == len(files)
            assert len(_jobs(db)) == 1
            summary = json.loads(next((tmp_path / "out").rglob("result.json")).read_text())
            assert summary["compartments"]["tissue"]["cells"] > 0
        finally:
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_sigterm_stops_the_service_cleanly(tmp_path: Path, log_format: str) -> None:
    scp_port = free_port()
    cfg = _write_config(tmp_path, scp_port, free_port())
    proc = _serve(cfg, tmp_path / "serve.log", IHC_ADAPTER__SERVICE__LOG_FORMAT=log_format)
    try:
        wait_for(lambda: _listening(scp_port), 60, "the service to listen")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert not _listening(scp_port)
        log = (tmp_path / "serve.log").read_text()
        assert "event=shutdown" in log
        if log_format == "json":
            entries = [json.loads(line) for line in log.splitlines()]
            assert [e["event"] for e in entries if "event" in e][-2:] == ["shutdown", "stopped"]
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
def test_a_series_acknowledged_just_before_a_restart_is_scored_once(
    small_slide: SynthOutput, tmp_path: Path, stop: signal.Signals
) -> None:
    """Push a series, stop the service within its quiet time, start it again: exactly one result set."""
    require_tool("storescu")
    with running_orthanc(tmp_path / "orthanc") as pacs:
        scp_port = free_port()
        cfg = _write_config(tmp_path, scp_port, pacs.peer.port, quiet_s=4.0)
        db = tmp_path / "spool" / "jobs.db"
        proc = _serve(cfg, tmp_path / "serve.log")
        try:
            wait_for(lambda: _listening(scp_port), 60, "the service to listen")
            assert small_slide.dicom_dir
            assert storescu_push(scp_port, small_slide.dicom_dir).returncode == 0  # acknowledged
            os.kill(proc.pid, stop)  # the documented restart, or a crash, inside the 4 s quiet time
            proc.wait(60)
            assert _jobs(db) == []  # nothing was queued yet: the series lived only in the spool
            proc = _serve(cfg, tmp_path / "serve.log")
            wait_for(lambda: [s for _, s, _ in _jobs(db)] == ["done"], 180, "the series to be scored after restart")
            with sqlite3.connect(db) as con:
                wait_for(
                    lambda: con.execute("SELECT COUNT(*) FROM deliveries WHERE state='pending'").fetchone()[0] == 0,
                    60,
                    "delivery",
                )
                sent = con.execute("SELECT COUNT(*) FROM deliveries WHERE state='sent'").fetchone()[0]
            # Stop and start once more: nothing is scored or sent again.
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
            proc = _serve(cfg, tmp_path / "serve.log")
            wait_for(lambda: _listening(scp_port), 60, "the service to listen again")
            time.sleep(6)  # longer than the quiet time
            assert [(s, a) for _, s, a in _jobs(db)] == [("done", 1)]
            instances = pacs.get("/instances")
            assert sent > 0 and len(instances) == sent
            modalities = [pacs.get(f"/instances/{i}/simplified-tags")["Modality"] for i in instances]
            assert modalities.count("SR") == 2 and modalities.count("ANN") == 1
            assert "event=restored series=1" in (tmp_path / "serve.log").read_text()
        finally:
            proc.kill()
            proc.wait(10)


def test_leftovers_of_a_cut_transfer_are_never_part_of_a_series(small_slide: SynthOutput, tmp_path: Path) -> None:
    """A ``*.part`` file and a pynetdicom temporary file left by a crash are removed at start-up."""
    assert small_slide.dicom_dir
    spool = tmp_path / "spool"
    series = spool / "incoming" / "1.2.826.0.1.3680043.8.498.77"
    series.mkdir(parents=True)
    (series / ".1.2.3.abcd.part").write_bytes(b"half an object")
    (spool / "tmp").mkdir()
    (spool / "tmp" / "tmpxyz.dcm").write_bytes(b"half a transfer")
    cfg = _write_config(tmp_path, free_port(), free_port())
    proc = _serve(cfg, tmp_path / "serve.log")
    try:
        wait_for(lambda: "partial_transfers_removed count=2" in (tmp_path / "serve.log").read_text(), 60, "clean-up")
        assert not list(spool.rglob("*.part")) and not list((spool / "tmp").iterdir())
        assert _jobs(spool / "jobs.db") == []  # an empty series folder is no series
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)

"""kill -9 the service while it scores or receives; after a restart every acknowledged slide is
scored exactly once and no result object reaches the PACS twice."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from adapter.synth import SynthOutput
from tests.conftest import require_tool, storescu_push, wait_for
from tests.orthanc import free_port, running_orthanc


def _write_config(tmp_path: Path, scp_port: int, pacs_port: int) -> Path:
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
series_quiet_seconds = 1.0
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

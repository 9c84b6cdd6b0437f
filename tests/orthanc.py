"""A real Orthanc PACS for tests: own config and storage in a temporary folder, loopback only."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicom_io.dimse import Peer
from tests.conftest import require_tool

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Orthanc:
    http: str
    peer: Peer
    process: subprocess.Popen[bytes]

    def get(self, path: str, accept: str = "application/json") -> Any:
        req = urllib.request.Request(self.http + path, headers={"Accept": accept})
        with urllib.request.urlopen(req, timeout=30) as resp:
            body = resp.read()
            return json.loads(body) if "json" in resp.headers.get("Content-Type", "") else body

    def post(self, path: str, data: Any) -> Any:
        req = urllib.request.Request(self.http + path, data=json.dumps(data).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=120) as resp:
            return json.loads(resp.read() or b"null")


@contextmanager
def running_orthanc(
    folder: Path, modalities: dict[str, list[Any]] | None = None, dicom_port: int | None = None
) -> Iterator[Orthanc]:
    binary = require_tool("Orthanc")
    http_port, dicom_port = free_port(), dicom_port or free_port()
    config = {
        "Name": "ihc-adapter-test",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowStore": True,
        "UnknownSopClassAccepted": True,
        "DicomModalities": modalities or {},
        "Plugins": [str(DICOMWEB_PLUGIN)] if DICOMWEB_PLUGIN.exists() else [],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "StableAge": 1,
    }
    folder.mkdir(parents=True, exist_ok=True)
    cfg = folder / "orthanc.json"
    cfg.write_text(json.dumps(config))
    log = (folder / "orthanc.log").open("wb")
    proc = subprocess.Popen([binary, str(cfg)], stdout=log, stderr=subprocess.STDOUT)
    server = Orthanc(f"http://127.0.0.1:{http_port}", Peer("127.0.0.1", dicom_port, "ORTHANC"), proc)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {(folder / 'orthanc.log').read_text()[-2000:]}")
            try:
                server.get("/system")
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()

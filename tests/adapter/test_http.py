"""/healthz and /metrics listen where service.http_host says (loopback addresses only here)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from adapter.http import StatusServer
from tests.orthanc import free_port


def test_status_server_listens_on_the_configured_address() -> None:
    port = free_port()
    server = StatusServer(port, lambda: {"done": 2}, lambda: (3, 4096), host="127.0.0.2")
    server.start()
    try:
        health = json.loads(urllib.request.urlopen(f"http://127.0.0.2:{port}/healthz", timeout=5).read())
        assert health == {"status": "ok", "jobs": {"done": 2}}
        metrics = urllib.request.urlopen(f"http://127.0.0.2:{port}/metrics", timeout=5).read().decode()
        assert 'ihc_adapter_jobs{state="done"} 2.0' in metrics
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(f"http://127.0.0.2:{port}/other", timeout=5)
    finally:
        server.stop()

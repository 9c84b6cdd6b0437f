"""Optional ``/healthz`` and Prometheus ``/metrics`` (``service.http_host``: ``service.http_port``).

``/healthz`` answers 200 ``{"status": "ok", …}`` while every component the
service runs (listener, folder watch, workers, sender) is alive, and 503
``{"status": "unhealthy", "dead": [...]}`` when one has died, so a container
runtime restarts the service instead of leaving it deaf. A client that opens
a connection and sends nothing is dropped after ``REQUEST_TIMEOUT_S``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

#: Seconds a client may take to send its request before the connection is dropped.
REQUEST_TIMEOUT_S = 10.0

#: Component name → whether it is alive.
Health = Callable[[], dict[str, bool]]


class ServiceCollector(Collector):
    """Jobs by state and bytes received, read when scraped."""

    def __init__(self, counts: Callable[[], dict[str, int]], received: Callable[[], tuple[int, int]]):
        self._counts = counts
        self._received = received

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("ihc_adapter_jobs", "Jobs by state", labels=["state"])
        for state, n in self._counts().items():
            jobs.add_metric([state], n)
        yield jobs
        objects, size = self._received()
        yield CounterMetricFamily("ihc_adapter_received_objects", "DICOM objects received", value=objects)
        yield CounterMetricFamily("ihc_adapter_received_bytes", "Bytes received by C-STORE", value=size)


class StatusServer:
    def __init__(
        self,
        port: int,
        counts: Callable[[], dict[str, int]],
        received: Callable[[], tuple[int, int]],
        host: str = "127.0.0.1",
        health: Health | None = None,
    ):
        self.registry = CollectorRegistry()
        self.registry.register(ServiceCollector(counts, received))
        self.slide_seconds = Histogram(
            "ihc_adapter_slide_seconds",
            "Seconds to score a slide and write its results",
            buckets=(10, 30, 60, 120, 300, 600, 1200, 3600),
            registry=self.registry,
        )
        registry = self.registry
        components = health or dict

        class Handler(BaseHTTPRequestHandler):
            timeout = REQUEST_TIMEOUT_S  # a half-open request does not hold its thread forever

            def do_GET(self) -> None:
                code = 200
                if self.path == "/healthz":
                    dead = sorted(name for name, alive in components().items() if not alive)
                    status: dict[str, Any] = {"status": "unhealthy" if dead else "ok", "jobs": counts()}
                    if dead:
                        status["dead"] = dead
                        code = 503
                    body, ctype = json.dumps(status).encode(), "application/json"
                elif self.path == "/metrics":
                    body, ctype = generate_latest(registry), "text/plain; version=0.0.4"
                else:
                    self.send_error(404)
                    return
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                return None

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="status-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

"""``ihc-adapter serve``: listener + folder watch → durable queue → scoring → results out.

Threads: the storage SCP (pynetdicom, one thread per association), the
folder watcher, ``concurrency`` workers that claim queued jobs and score
them, and a sender that delivers result files to every destination with
exponential backoff, recording each delivery so nothing is sent twice.
Poison input (unreadable, not a WSI, no µm/px) is quarantined with its
reason; anything else that fails is marked failed and can be retried.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import shutil
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from adapter.http import StatusServer
from adapter.queue import Job, JobQueue
from adapter.scp import StorageSCP
from adapter.watch import FolderWatcher
from config.errors import IhcAdapterError, SlideReadError
from config.service import ServiceConfig
from config.settings import load_settings
from dicom_io import open_slide
from dicom_io.dimse import DimseError, Peer, send_files
from dicom_io.results import write_results
from pipeline.analysis import analyse

log = logging.getLogger(__name__)


def file_key(path: Path) -> str:
    """Content hash of a file, so the same slide under two names is one job."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"


class Service:
    def __init__(self, config: ServiceConfig):
        self.config = config
        self.settings = load_settings(
            config.scoring.profile, [*config.scoring.overrides, f"tiling.workers={config.scoring.workers}"]
        )
        self.queue = JobQueue(config.paths.database)
        self.scp = StorageSCP(config.scp, config.paths.spool, self.series_complete) if config.scp.enabled else None
        self.watcher = (
            FolderWatcher(config.watch, config.paths.spool, self.file_arrived, self.series_from_folder)
            if config.watch.folders
            else None
        )
        self.status = (
            StatusServer(config.service.http_port, self.queue.counts, self._received, config.service.http_host)
            if config.service.http_port
            else None
        )
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sources: dict[int, list[Path]] = {}

    def _received(self) -> tuple[int, int]:
        if self.scp is None:
            return 0, 0
        return self.scp.objects_received, self.scp.bytes_received

    # -- ingest --------------------------------------------------------------------
    def series_complete(self, series_uid: str, folder: Path) -> None:
        job, new = self.queue.submit(f"dicom:{series_uid}", "dicom", str(folder))
        if not new and job.state in ("done", "failed", "quarantined"):
            job, new = self.queue.submit(f"dicom:{series_uid}", "dicom", str(folder), force=True)
            log.info("event=rescore job=%d series=%s", job.id, series_uid)
        elif new:
            log.info("event=queued job=%d kind=dicom series=%s", job.id, series_uid)
        self._wake.set()

    def series_from_folder(self, series_uid: str, folder: Path, sources: list[Path]) -> None:
        self.series_complete(series_uid, folder)
        job = self.queue.by_source(f"dicom:{series_uid}")
        if job is not None:
            self._sources.setdefault(job.id, []).extend(sources)

    def file_arrived(self, path: Path) -> None:
        job, new = self.queue.submit(file_key(path), "file", str(path))
        if new:
            log.info("event=queued job=%d kind=file file=%s", job.id, path.name)
            self._wake.set()

    # -- work ------------------------------------------------------------------------
    def process(self, job: Job) -> None:
        out = self.config.paths.output / f"job-{job.id}"
        try:
            opener = functools.partial(open_slide, Path(job.path))
            with opener() as slide:
                result = analyse(slide, self.settings, opener=opener)
                if out.exists():
                    shutil.rmtree(out)
                written = write_results(result, slide, out)
        except SlideReadError as exc:
            self.queue.quarantine(job.id, str(exc))
            log.warning("event=quarantined job=%d reason=%s", job.id, exc.problem)
            return
        except IhcAdapterError as exc:
            self.queue.fail(job.id, str(exc))
            log.warning("event=failed job=%d reason=%s", job.id, exc)
            return
        except Exception as exc:
            self.queue.fail(job.id, f"{type(exc).__name__}: {exc}")
            log.exception("event=failed job=%d", job.id)
            return
        files = [str(p) for p in written.all_dicom()]
        for dest in self.config.destinations:
            self.queue.plan_deliveries(job.id, dest.name, files)
        self.queue.finish(job.id, str(out))
        alerts = ",".join(a["code"] for a in result.alerts) or "none"
        log.info("event=done job=%d alerts=%s%s", job.id, alerts, self._patient_fields(result.slide))
        self._after(job)

    def _patient_fields(self, slide: dict[str, Any]) -> str:
        """`` accession=… patient_id=…`` where the site allows patient data in logs, else nothing."""
        if not self.config.service.log_patient_data:
            return ""
        meta = slide.get("metadata") or {}
        patient = meta.get("patient") or {}
        accession = str(meta.get("accession_number") or "-").replace(" ", "_")
        patient_id = str(patient.get("id") or "-").replace(" ", "_")
        return f" accession={accession} patient_id={patient_id}"

    def _after(self, job: Job) -> None:
        """Leave, move or delete the watched input files once their job is done."""
        sources = self._sources.pop(job.id, [Path(job.path)] if job.kind == "file" else [])
        mode = self.config.watch.after
        for src in sources:
            if not src.exists() or mode == "leave":
                continue
            if mode == "delete":
                src.unlink()
            elif self.config.watch.done_folder is not None:
                self.config.watch.done_folder.mkdir(parents=True, exist_ok=True)
                shutil.move(str(src), self.config.watch.done_folder / src.name)

    def _worker(self) -> None:
        while not self._stop.is_set():
            job = self.queue.claim()
            if job is None:
                self._wake.wait(self.config.service.poll_seconds)
                self._wake.clear()
                continue
            log.info("event=running job=%d attempt=%d", job.id, job.attempts)
            started = time.monotonic()
            self.process(job)
            if self.status is not None:
                self.status.slide_seconds.observe(time.monotonic() - started)

    def deliver_once(self) -> int:
        """Try every due delivery once; returns how many files were delivered."""
        sent = 0
        destinations = {d.name: d for d in self.config.destinations}
        for job_id, name, file, _attempts in self.queue.pending_deliveries():
            dest = destinations.get(name)
            if dest is None:
                continue
            try:
                [result] = send_files([Path(file)], Peer(dest.host, dest.port, dest.ae_title), dest.calling_ae)
                ok, reason = result.ok, f"status 0x{result.status:04X}"
            except (DimseError, OSError) as exc:
                ok, reason = False, str(exc)
            if ok:
                self.queue.delivered(job_id, name, file)
                sent += 1
            else:
                delay = self.queue.delivery_failed(
                    job_id,
                    name,
                    file,
                    reason,
                    self.config.service.retry_base_seconds,
                    self.config.service.retry_max_seconds,
                )
                log.warning(
                    "event=delivery_retry job=%d destination=%s in=%.0fs reason=%s", job_id, name, delay, reason
                )
                if "association refused" in reason or "unreachable" in reason:
                    break  # the destination is down: leave the rest for the next round
        return sent

    def _sender(self) -> None:
        while not self._stop.wait(self.config.service.poll_seconds):
            self.deliver_once()

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        requeued = self.queue.recover()
        if requeued:
            log.info("event=recovered requeued=%d", requeued)
        if self.scp is not None:
            self.scp.start()
        if self.watcher is not None:
            self.watcher.start()
        if self.status is not None:
            self.status.start()
        for i in range(self.config.service.concurrency):
            self._threads.append(threading.Thread(target=self._worker, name=f"worker-{i}", daemon=True))
        self._threads.append(threading.Thread(target=self._sender, name="sender", daemon=True))
        for t in self._threads:
            t.start()

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stop taking work, let running jobs finish (a job cut off is requeued at the next start)."""
        self._stop.set()
        self._wake.set()
        if self.scp is not None:
            self.scp.stop()
        if self.watcher is not None:
            self.watcher.stop()
        for t in self._threads:
            t.join(timeout_s)
        if self.status is not None:
            self.status.stop()
        self.queue.close()

    def run_forever(self) -> None:
        done = threading.Event()

        def handle(signum: int, frame: FrameType | None) -> None:
            log.info("event=shutdown signal=%d", signum)
            done.set()

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)
        self.start()
        while not done.wait(0.5):  # a bounded wait lets the signal handler run
            pass
        self.stop()
        log.info("event=stopped")

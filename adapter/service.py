"""``ihc-adapter serve``: listener + folder watch → durable queue → scoring → results out.

Threads: the storage SCP (pynetdicom, one thread per association), the
folder watcher, ``concurrency`` workers that claim queued jobs and score
them, and a sender that delivers each job's result files to every
destination over one association, with exponential backoff for what may
pass and a terminal ``rejected`` state for what will not. ``/healthz``
reports a dead thread as unhealthy.

Nothing acknowledged is lost: at start-up the spool is rescanned and every
series there that was not yet scored (or changed since) waits its quiet time
again and is queued, and jobs cut off while running are queued again. A
series sent again with the same content gets no second result set (logged);
changed content is scored again, and the new reports name the ones they
replace. A slide that changes while it is scored is never delivered from
that attempt: a series is scored again, a file's job is superseded by the
job of its new version. Poison input (unreadable, not a WSI, no µm/px) is
quarantined with its reason; anything else that fails is marked failed and
can be retried. Finished jobs' files are deleted after ``retention.keep_days``.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import shutil
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from adapter.http import StatusServer
from adapter.logs import event
from adapter.queue import FINAL_STATES, Job, JobQueue, JobState, Submitted
from adapter.scp import StorageSCP
from adapter.spool import Spool, content_key, file_digest, folder_fingerprint
from adapter.watch import FolderWatcher
from config.errors import IhcAdapterError, SlideReadError
from config.service import Destination, ServiceConfig
from config.settings import load_settings
from dicom_io import open_slide
from dicom_io.dimse import DimseError, Peer, send_files, tls_context
from dicom_io.results import previous_reports, write_results
from pipeline.analysis import analyse

log = logging.getLogger(__name__)


def file_key(path: Path) -> str:
    """Content hash of a file, so the same slide under two names is one job."""
    return f"sha256:{file_digest(path)}"


def file_fingerprint(path: Path) -> str:
    """``size:mtime_ns`` of a file: changes when it grows or is rewritten."""
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def _grew_from(path: Path, old: Job) -> bool:
    """Whether ``path`` now starts with exactly the bytes ``old`` scored (it has grown since)."""
    try:
        prefix = file_digest(path, int((old.fingerprint or "").split(":")[0]))
    except (ValueError, OSError):
        return False
    return prefix is not None and f"sha256:{prefix}" == old.source_key


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class Service:
    def __init__(self, config: ServiceConfig):
        self.config = config
        self.settings = load_settings(
            config.scoring.profile, [*config.scoring.overrides, f"tiling.workers={config.scoring.workers}"]
        )
        self.spool = Spool(config.paths.spool)
        self.queue = JobQueue(config.paths.database)
        self.scp = StorageSCP(config.scp, self.spool, self.series_complete) if config.scp.enabled else None
        self.watcher = (
            FolderWatcher(config.watch, self.spool, self.file_arrived, self.series_from_folder, self.file_problem)
            if config.watch.folders
            else None
        )
        self.status = (
            StatusServer(
                config.service.http_port, self.queue.counts, self._received, config.service.http_host, self.health
            )
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

    def health(self) -> dict[str, bool]:
        """Every thread the service runs, and whether it is alive."""
        parts: dict[str, bool] = {t.name: t.is_alive() for t in self._threads}
        if self.scp is not None:
            parts.update(self.scp.threads())
        if self.watcher is not None:
            parts.update(self.watcher.threads())
        return parts

    # -- ingest --------------------------------------------------------------------
    def series_complete(self, series_uid: str, folder: Path) -> Job:
        instances = sorted(folder.glob("*.dcm"))
        job, outcome = self.queue.submit(
            f"dicom:{series_uid}",
            "dicom",
            str(folder),
            content_key=content_key(instances),
            fingerprint=folder_fingerprint(instances),
        )
        if outcome is Submitted.DUPLICATE:
            event(log, "duplicate_series", job=job.id, series=series_uid, instances=len(instances))
        elif outcome is Submitted.RESCORE:
            event(log, "rescore", job=job.id, series=series_uid, instances=len(instances))
        elif outcome is Submitted.NEW:
            event(log, "queued", job=job.id, kind="dicom", series=series_uid, instances=len(instances))
        if outcome.queued:
            self._wake.set()
        return job

    def series_from_folder(self, series_uid: str, folder: Path, sources: list[Path]) -> None:
        job = self.series_complete(series_uid, folder)
        self._sources.setdefault(job.id, []).extend(sources)

    def file_arrived(self, path: Path) -> None:
        fingerprint = file_fingerprint(path)
        key = file_key(path)
        for old in self.queue.by_path(str(path)):
            if old.kind == "file" and old.source_key.startswith("sha256:") and old.source_key != key:
                self._file_changed(old, path)
        job, outcome = self.queue.submit(key, "file", str(path), fingerprint=fingerprint)
        if outcome is Submitted.NEW:
            event(log, "queued", job=job.id, kind="file", file=path.name)
            self._wake.set()
        elif outcome is Submitted.DUPLICATE:
            event(log, "duplicate_file", job=job.id, file=path.name)

    def _file_changed(self, old: Job, path: Path) -> None:
        """``path`` has new content. A job still queued for the old content is superseded; so is
        a finished one whose file has only grown since (a copy that paused past
        ``settle_seconds`` was scored from a partial file): its results are not delivered. A
        file replaced by another slide under the same name leaves the old job as it was. A
        running job notices the change itself when it ends (:meth:`_unchanged`)."""
        if old.state is JobState.QUEUED or (old.state in FINAL_STATES and _grew_from(path, old)):
            reason = f"{path.name} changed after this job was queued; its new version is a new job"
            cancelled = self.queue.supersede(old.id, reason)
            event(log, "superseded", logging.WARNING, job=old.id, file=path.name, cancelled_deliveries=cancelled)

    def file_problem(self, path: Path, reason: str) -> None:
        """A watched file that cannot be taken: quarantined under its path and version, so the
        operator sees it in ``jobs`` with its reason."""
        try:
            st = path.lstat()
            version = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            version = "?"
        job, outcome = self.queue.submit(f"problem:{path}:{version}", "file", str(path))
        if outcome is Submitted.NEW:
            self.queue.quarantine(job.id, f"{path}: {reason}")
            event(log, "quarantined", logging.WARNING, job=job.id, file=path.name, reason=reason)

    # -- work ------------------------------------------------------------------------
    def _fingerprint(self, job: Job) -> str:
        path = Path(job.path)
        try:
            return folder_fingerprint(sorted(path.glob("*.dcm"))) if job.kind == "dicom" else file_fingerprint(path)
        except OSError as exc:
            return f"unreadable: {exc}"

    def process(self, job: Job) -> None:
        out = self.config.paths.output / f"job-{job.id}"
        before = self._fingerprint(job)
        if job.kind == "file" and job.fingerprint is not None and before != job.fingerprint:
            self.queue.supersede(job.id, f"{Path(job.path).name} changed after it was queued")
            event(log, "superseded", logging.WARNING, job=job.id, file=Path(job.path).name)
            return
        self.queue.set_fingerprint(job.id, before)
        try:
            opener = functools.partial(open_slide, Path(job.path))
            with opener() as slide:
                result = analyse(slide, self.settings, opener=opener)
                previous = previous_reports(out)
                if out.exists():
                    shutil.rmtree(out)
                written = write_results(result, slide, out, previous)
        except SlideReadError as exc:
            self.queue.quarantine(job.id, str(exc))
            event(log, "quarantined", logging.WARNING, job=job.id, reason=exc.problem)
            return
        except IhcAdapterError as exc:
            self.queue.fail(job.id, str(exc))
            event(log, "failed", logging.WARNING, job=job.id, reason=str(exc))
            return
        except Exception as exc:
            self.queue.fail(job.id, f"{type(exc).__name__}: {exc}")
            log.exception("event=failed job=%d", job.id)
            return
        if not self._unchanged(job, before, out):
            return
        files = [str(p) for p in written.all_dicom()]
        for dest in self.config.destinations:
            self.queue.plan_deliveries(job.id, dest.name, files)
        self.queue.finish(job.id, str(out))
        alerts = ",".join(a["code"] for a in result.alerts) or "none"
        event(log, "done", job=job.id, alerts=alerts, **self._patient_fields(result.slide))
        self._after(job)

    def _unchanged(self, job: Job, before: str, out: Path) -> bool:
        """Whether the slide is as it was when scoring began and the job is still wanted; if not,
        the attempt's results are dropped (never delivered)."""
        now = self.queue.get(job.id)
        if now.state is not JobState.RUNNING:  # superseded meanwhile (its file changed)
            shutil.rmtree(out, ignore_errors=True)
            return False
        if self._fingerprint(job) == before:
            return True
        shutil.rmtree(out, ignore_errors=True)
        if job.kind == "dicom":
            self.queue.requeue(job.id, "the series changed while it was scored; scoring it again")
            event(log, "changed_while_scored", logging.WARNING, job=job.id, action="rescore")
            self._wake.set()
        else:
            self.queue.supersede(job.id, f"{Path(job.path).name} changed while it was scored")
            event(log, "changed_while_scored", logging.WARNING, job=job.id, action="superseded")
        return False

    def _patient_fields(self, slide: dict[str, Any]) -> dict[str, str]:
        """``accession`` and ``patient_id`` where the site allows patient data in logs, else nothing."""
        if not self.config.service.log_patient_data:
            return {}
        meta = slide.get("metadata") or {}
        patient = meta.get("patient") or {}
        return {"accession": str(meta.get("accession_number") or "-"), "patient_id": str(patient.get("id") or "-")}

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
            event(log, "running", job=job.id, attempt=job.attempts)
            started = time.monotonic()
            self.process(job)
            if self.status is not None:
                self.status.slide_seconds.observe(time.monotonic() - started)

    # -- delivery ----------------------------------------------------------------------
    def _tls(self, dest: Destination) -> Any:
        if dest.tls is None:
            return None
        context = tls_context(dest.tls.ca, dest.tls.certificate, dest.tls.key)
        return context, dest.tls.server_name or dest.host

    def deliver_once(self) -> int:
        """Try every due delivery once, one association per job and destination; returns how many
        files were delivered."""
        sent = 0
        destinations = {d.name: d for d in self.config.destinations}
        down: set[str] = set()
        for batch in self.queue.due_batches():
            dest = destinations.get(batch.destination)
            if dest is None or dest.name in down:
                continue
            peer = Peer(dest.host, dest.port, dest.ae_title)
            try:
                results = send_files([Path(f) for f in batch.files], peer, dest.calling_ae, tls=self._tls(dest))
                outcomes = [(str(r.path), r.ok, r.permanent, f"status 0x{r.status & 0xFFFF:04X}") for r in results]
            except (DimseError, OSError) as exc:
                outcomes = [(f, False, False, str(exc)) for f in batch.files]
                down.add(dest.name)  # the destination is down: leave the rest for the next round
            for file, ok, permanent, reason in outcomes:
                if ok:
                    self.queue.delivered(batch.job_id, dest.name, file)
                    sent += 1
                elif permanent:
                    self.queue.rejected(batch.job_id, dest.name, file, reason)
                    event(
                        log,
                        "delivery_rejected",
                        logging.ERROR,
                        job=batch.job_id,
                        destination=dest.name,
                        file=Path(file).name,
                        reason=reason,
                    )
                else:
                    delay = self.queue.delivery_failed(
                        batch.job_id,
                        dest.name,
                        file,
                        reason,
                        self.config.service.retry_base_seconds,
                        self.config.service.retry_max_seconds,
                    )
                    event(
                        log,
                        "delivery_retry",
                        logging.WARNING,
                        job=batch.job_id,
                        destination=dest.name,
                        retry_in_s=round(delay),
                        reason=reason,
                    )
        return sent

    def _sender(self) -> None:
        last_purge = 0.0
        while not self._stop.wait(self.config.service.poll_seconds):
            try:
                self.deliver_once()
                retention = self.config.retention
                if retention.keep_days is not None and time.monotonic() - last_purge > retention.purge_interval_seconds:
                    last_purge = time.monotonic()
                    self.purge()
            except Exception:  # a bad delivery or purge must not end the sender
                log.exception("event=sender_failed")

    # -- retention -----------------------------------------------------------------------
    def purge(self, keep_days: float | None = None, dry_run: bool = False) -> list[Job]:
        """Delete received files and results of jobs that ended more than ``keep_days`` ago
        (default ``retention.keep_days``); jobs with deliveries pending are kept while
        ``retention.until_delivered``. The jobs stay in the table, so a re-send is still
        recognised. Returns the jobs purged."""
        days = self.config.retention.keep_days if keep_days is None else keep_days
        if days is None:
            return []
        jobs = self.queue.purgeable(time.time() - days * 86400, self.config.retention.until_delivered)
        purged = []
        for job in jobs:
            targets = [Path(job.result_dir)] if job.result_dir else []
            if job.kind == "dicom":
                targets.append(Path(job.path))
            targets = [t for t in targets if t.exists()]
            if not targets:
                continue
            purged.append(job)
            if dry_run:
                continue
            for target in targets:
                shutil.rmtree(target, ignore_errors=True)
            self.queue.mark_purged(job.id)
            event(log, "purged", job=job.id, removed=len(targets))
        return purged

    # -- lifecycle ---------------------------------------------------------------------
    def _warn_if_open(self) -> None:
        scp = self.config.scp
        if self.scp is not None and not _is_loopback(scp.host) and not scp.allowed_calling_aes:
            event(
                log,
                "insecure_listener",
                logging.WARNING,
                host=scp.host,
                port=scp.port,
                reason="any calling AE title is accepted on a network address: set scp.allowed_calling_aes "
                "(and scp.tls) or listen on 127.0.0.1",
            )
        http = self.config.service
        if http.http_port and not _is_loopback(http.http_host):
            event(
                log,
                "open_status_port",
                logging.WARNING,
                host=http.http_host,
                port=http.http_port,
                reason="/healthz and /metrics are reachable from the network without authentication",
            )

    def _restore(self) -> None:
        """Series in the spool that no finished job covers (the service stopped before handing them
        over, or more instances arrived since) are waited for and queued again."""
        waiting = []
        for uid, folder in self.spool.series():
            job = self.queue.by_source(f"dicom:{uid}")
            if job is None or (
                job.state in FINAL_STATES
                and job.fingerprint is not None  # a job of an older version: left as it is
                and job.fingerprint != folder_fingerprint(sorted(folder.glob("*.dcm")))
            ):
                waiting.append((uid, folder))
        if not waiting:
            return
        event(log, "restored", series=len(waiting))
        if self.scp is not None:
            self.scp.restore(waiting)
        else:
            for uid, folder in waiting:
                self.series_complete(uid, folder)

    def start(self) -> None:
        removed = self.spool.prepare()
        if removed:
            event(log, "partial_transfers_removed", count=removed)
        requeued = self.queue.recover()
        if requeued:
            event(log, "recovered", requeued=requeued)
        self._warn_if_open()
        self._restore()
        if self.scp is not None:
            self.scp.start()
        if self.watcher is not None:
            self.watcher.start()
        for i in range(self.config.service.concurrency):
            self._threads.append(threading.Thread(target=self._worker, name=f"worker-{i}", daemon=True))
        self._threads.append(threading.Thread(target=self._sender, name="sender", daemon=True))
        for t in self._threads:
            t.start()
        if self.status is not None:
            self.status.start()

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
            event(log, "shutdown", signal=signum)
            done.set()

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)
        self.start()
        while not done.wait(0.5):  # a bounded wait lets the signal handler run
            pass
        self.stop()
        event(log, "stopped")

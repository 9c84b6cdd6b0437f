"""The durable job queue: states, idempotency, content keys, crash recovery, deliveries."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from adapter.queue import DeliveryState, JobQueue, JobState, QueueError, Submitted


def test_same_source_is_one_job_unless_forced(tmp_path: Path) -> None:
    q = JobQueue(tmp_path / "jobs.db")
    job, outcome = q.submit("1.2.3", "dicom", "/spool/1.2.3")
    assert outcome is Submitted.NEW and job.state is JobState.QUEUED
    again, outcome = q.submit("1.2.3", "dicom", "/spool/1.2.3")
    assert outcome is Submitted.WAITING and again.id == job.id
    claimed = q.claim()
    assert claimed is not None and claimed.id == job.id and claimed.state == "running" and claimed.attempts == 1
    q.finish(job.id, "/out/1")
    _, outcome = q.submit("1.2.3", "dicom", "/spool/1.2.3")
    assert outcome is Submitted.DUPLICATE
    forced, outcome = q.submit("1.2.3", "dicom", "/spool/1.2.3", force=True)
    assert outcome is Submitted.RESCORE and forced.state == "queued" and forced.rescore


def test_the_same_content_is_scored_once_and_changed_content_again(tmp_path: Path) -> None:
    q = JobQueue(tmp_path / "jobs.db")
    job, _ = q.submit("dicom:1.2", "dicom", "/s/1.2", content_key="sha256:a")
    q.claim()
    q.finish(job.id, "/out/1")
    q.plan_deliveries(job.id, "PACS", ["/out/1/sr.dcm", "/out/1/seg.dcm"])
    q.delivered(job.id, "PACS", "/out/1/sr.dcm")
    # The scanner never saw our response and sends the identical series again.
    same, outcome = q.submit("dicom:1.2", "dicom", "/s/1.2", content_key="sha256:a")
    assert outcome is Submitted.DUPLICATE and same.state is JobState.DONE
    assert q.delivery_states(job.id) == {"pending": 1, "sent": 1}
    # Changed content: scored again; what the old attempt had not yet delivered is cancelled.
    changed, outcome = q.submit("dicom:1.2", "dicom", "/s/1.2", content_key="sha256:b")
    assert outcome is Submitted.RESCORE and changed.state is JobState.QUEUED and changed.content_key == "sha256:b"
    assert q.delivery_states(job.id) == {"cancelled": 1, "sent": 1}
    assert [d[2] for d in q.deliveries(job.id)] == [DeliveryState.CANCELLED, DeliveryState.SENT]


def test_a_failed_series_sent_again_is_scored_again_a_quarantined_one_is_not(tmp_path: Path) -> None:
    q = JobQueue(tmp_path / "jobs.db")
    failed, _ = q.submit("dicom:1", "dicom", "/s/1", content_key="k1")
    poison, _ = q.submit("dicom:2", "dicom", "/s/2", content_key="k2")
    q.claim()
    q.fail(failed.id, "MemoryError")
    q.claim()
    q.quarantine(poison.id, "not a WSI")
    assert q.submit("dicom:1", "dicom", "/s/1", content_key="k1")[1] is Submitted.RESCORE
    assert q.submit("dicom:2", "dicom", "/s/2", content_key="k2")[1] is Submitted.DUPLICATE
    assert q.submit("dicom:2", "dicom", "/s/2", content_key="k3")[1] is Submitted.RESCORE


def test_a_file_job_is_one_per_content(tmp_path: Path) -> None:
    q = JobQueue(tmp_path / "jobs.db")
    job, _ = q.submit("sha256:x", "file", "/in/a.svs")
    q.claim()
    q.fail(job.id, "boom")
    # The same file seen again (a restart re-scans the watch folder) is left as it ended.
    assert q.submit("sha256:x", "file", "/in/a.svs")[1] is Submitted.DUPLICATE
    assert q.get(job.id).state is JobState.FAILED


def test_running_jobs_survive_a_crash(tmp_path: Path) -> None:
    db = tmp_path / "jobs.db"
    q = JobQueue(db)
    a, _ = q.submit("a", "file", "/a")
    q.submit("b", "file", "/b")
    assert q.claim() is not None
    q.close()  # the process dies with job a running
    q2 = JobQueue(db)
    assert q2.recover() == 1
    assert q2.get(a.id).state == "queued" and "interrupted" in (q2.get(a.id).reason or "")
    assert [j.source_key for j in q2.jobs("queued")] == ["a", "b"]


def test_quarantine_and_operator_retry(tmp_path: Path) -> None:
    q = JobQueue(tmp_path / "jobs.db")
    job, _ = q.submit("x", "file", "/x")
    q.claim()
    q.quarantine(job.id, "/x: not a DICOM or TIFF file")
    assert q.counts()["quarantined"] == 1
    assert q.get(job.id).reason == "/x: not a DICOM or TIFF file"
    assert q.retry(job.id).state == "queued"
    with pytest.raises(QueueError, match="job 99: no such job"):
        q.retry(99)
    q.claim()
    with pytest.raises(QueueError, match="is running"):
        q.retry(job.id)


def test_a_superseded_job_delivers_nothing(tmp_path: Path) -> None:
    q = JobQueue(tmp_path / "jobs.db")
    job, _ = q.submit("sha256:partial", "file", "/in/a.svs")
    q.claim()
    q.finish(job.id, "/out/1")
    q.plan_deliveries(job.id, "PACS", ["/out/1/a.dcm", "/out/1/b.dcm"])
    assert len(q.due_batches()) == 1
    assert q.supersede(job.id, "a.svs grew after it was scored") == 2
    assert q.get(job.id).state is JobState.SUPERSEDED
    assert q.due_batches() == [] and q.delivery_states(job.id) == {"cancelled": 2}
    assert q.retry(job.id).state is JobState.QUEUED  # an operator can still score it again


def test_deliveries_batched_per_job_and_destination_with_exponential_backoff(tmp_path: Path) -> None:
    q = JobQueue(tmp_path / "jobs.db")
    job, _ = q.submit("s", "dicom", "/s")
    other, _ = q.submit("t", "dicom", "/t")
    for j in (job, other):
        q.claim()
        q.finish(j.id, f"/o/{j.id}")
    q.plan_deliveries(job.id, "PACS", ["/o/1.dcm", "/o/2.dcm"])
    q.plan_deliveries(job.id, "PACS", ["/o/1.dcm"])  # idempotent
    q.plan_deliveries(job.id, "ARCHIVE", ["/o/1.dcm"])
    q.plan_deliveries(other.id, "PACS", ["/o/3.dcm"])
    batches = q.due_batches()
    assert [(b.job_id, b.destination, b.files) for b in batches] == [
        (job.id, "ARCHIVE", ("/o/1.dcm",)),
        (job.id, "PACS", ("/o/1.dcm", "/o/2.dcm")),
        (other.id, "PACS", ("/o/3.dcm",)),
    ]
    d1 = q.delivery_failed(job.id, "PACS", "/o/1.dcm", "connection refused", base_s=2)
    d2 = q.delivery_failed(job.id, "PACS", "/o/1.dcm", "connection refused", base_s=2)
    assert (d1, d2) == (2, 4)
    assert [p[2] for p in q.pending_deliveries() if p[1] == "PACS" and p[0] == job.id] == ["/o/2.dcm"]
    q.delivered(job.id, "PACS", "/o/2.dcm")
    q.rejected(job.id, "ARCHIVE", "/o/1.dcm", "status 0xA900")
    assert q.delivery_states(job.id) == {"pending": 1, "sent": 1, "rejected": 1}
    # A rejection is final: it is never due again.
    assert all(p[1] != "ARCHIVE" for p in q.pending_deliveries(now=1e12))


def test_deliveries_of_a_job_not_done_wait(tmp_path: Path) -> None:
    q = JobQueue(tmp_path / "jobs.db")
    job, _ = q.submit("s", "dicom", "/s")
    q.plan_deliveries(job.id, "PACS", ["/o/1.dcm"])
    assert q.due_batches() == []  # still queued: its results are not final
    q.claim()
    q.finish(job.id, "/o")
    assert len(q.due_batches()) == 1


def test_purgeable_jobs_ended_long_ago_and_delivered(tmp_path: Path) -> None:
    q = JobQueue(tmp_path / "jobs.db")
    old, _ = q.submit("a", "dicom", "/s/a")
    waiting, _ = q.submit("b", "dicom", "/s/b")
    for j in (old, waiting):
        q.claim()
        q.finish(j.id, f"/o/{j.id}")
    q.plan_deliveries(waiting.id, "PACS", ["/o/x.dcm"])
    later = time.time() + 10
    assert [j.id for j in q.purgeable(later, require_delivered=True)] == [old.id]
    assert [j.id for j in q.purgeable(later, require_delivered=False)] == [old.id, waiting.id]
    assert q.purgeable(time.time() - 3600, require_delivered=False) == []
    q.mark_purged(old.id)
    assert q.get(old.id).result_dir is None and q.get(old.id).state is JobState.DONE


def test_a_database_of_the_previous_version_is_upgraded_in_place(tmp_path: Path) -> None:
    db = tmp_path / "jobs.db"
    with sqlite3.connect(db) as con:
        con.executescript(
            """
            CREATE TABLE jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, source_key TEXT NOT NULL UNIQUE,
                kind TEXT NOT NULL, path TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
                reason TEXT, result_dir TEXT, created REAL NOT NULL, updated REAL NOT NULL,
                rescore INTEGER NOT NULL DEFAULT 0);
            CREATE TABLE deliveries (job_id INTEGER NOT NULL, destination TEXT NOT NULL, file TEXT NOT NULL,
                state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_try REAL NOT NULL DEFAULT 0,
                reason TEXT, PRIMARY KEY (job_id, destination, file));
            INSERT INTO jobs (source_key, kind, path, state, created, updated)
                VALUES ('dicom:1', 'dicom', '/s', 'done', 0, 0);
            INSERT INTO deliveries (job_id, destination, file, state) VALUES (1, 'PACS', '/o/1.dcm', 'pending');
            """
        )
    q = JobQueue(db)
    job = q.get(1)
    assert job.state is JobState.DONE and job.content_key is None and job.fingerprint is None
    assert [b.files for b in q.due_batches()] == [("/o/1.dcm",)]

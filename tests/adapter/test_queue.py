"""The durable job queue: states, idempotency, crash recovery, delivery backoff."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapter.queue import JobQueue, QueueError


def test_same_source_is_one_job_unless_forced(tmp_path: Path) -> None:
    q = JobQueue(tmp_path / "jobs.db")
    job, new = q.submit("1.2.3", "dicom", "/spool/1.2.3")
    assert new and job.state == "queued"
    again, new = q.submit("1.2.3", "dicom", "/spool/1.2.3")
    assert not new and again.id == job.id
    claimed = q.claim()
    assert claimed is not None and claimed.id == job.id and claimed.state == "running" and claimed.attempts == 1
    q.finish(job.id, "/out/1")
    _, new = q.submit("1.2.3", "dicom", "/spool/1.2.3")
    assert not new
    forced, new = q.submit("1.2.3", "dicom", "/spool/1.2.3", force=True)
    assert new and forced.state == "queued" and forced.rescore


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


def test_deliveries_once_with_exponential_backoff(tmp_path: Path) -> None:
    q = JobQueue(tmp_path / "jobs.db")
    job, _ = q.submit("s", "dicom", "/s")
    q.plan_deliveries(job.id, "PACS", ["/o/1.dcm", "/o/2.dcm"])
    q.plan_deliveries(job.id, "PACS", ["/o/1.dcm"])  # idempotent
    assert len(q.pending_deliveries()) == 2
    d1 = q.delivery_failed(job.id, "PACS", "/o/1.dcm", "connection refused", base_s=2)
    d2 = q.delivery_failed(job.id, "PACS", "/o/1.dcm", "connection refused", base_s=2)
    assert (d1, d2) == (2, 4)
    assert [p[2] for p in q.pending_deliveries()] == ["/o/2.dcm"]  # 1.dcm waits
    q.delivered(job.id, "PACS", "/o/2.dcm")
    assert q.delivery_states(job.id) == {"pending": 1, "sent": 1}
    assert [p[2] for p in q.pending_deliveries(now=1e12)] == ["/o/1.dcm"]

"""Durable job queue in SQLite (WAL): every slide is scored once, nothing is lost.

States: ``received`` → ``queued`` → ``running`` → ``done`` | ``failed`` |
``quarantined``. A job is keyed by its source (a DICOM Series Instance UID or
a file's content hash), so the same slide arriving twice is one job unless
forced. On start-up ``running`` jobs go back to ``queued`` (the process that
ran them died). Deliveries of result files to each destination are recorded
so a restart never sends an object twice, and a destination that was down is
retried with exponential backoff without re-scoring.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from config.errors import IhcAdapterError

STATES = ("received", "queued", "running", "done", "failed", "quarantined")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    source_key TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    path TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    reason TEXT,
    result_dir TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    rescore INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE TABLE IF NOT EXISTS deliveries (
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    destination TEXT NOT NULL,
    file TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL DEFAULT 0,
    reason TEXT,
    PRIMARY KEY (job_id, destination, file)
);
"""


class QueueError(IhcAdapterError):
    """A job does not exist or cannot move to the requested state."""


@dataclass(frozen=True)
class Job:
    id: int
    source_key: str
    kind: str
    path: str
    state: str
    attempts: int
    reason: str | None
    result_dir: str | None
    created: float
    updated: float
    rescore: bool


class JobQueue:
    """Thread-safe SQLite job table (one connection, serialised by a lock)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @staticmethod
    def _job(row: sqlite3.Row | None) -> Job | None:
        if row is None:
            return None
        d = dict(row)
        d["rescore"] = bool(d["rescore"])
        return Job(**d)

    # -- submission --------------------------------------------------------
    def submit(self, source_key: str, kind: str, path: str, force: bool = False) -> tuple[Job, bool]:
        """Queue a slide; returns the job and whether it is new or re-queued.

        A known source that is done, failed or quarantined is left alone
        unless ``force``; one still waiting or running is left alone.
        """
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT * FROM jobs WHERE source_key = ?", (source_key,)).fetchone()
            if row is None:
                cur = db.execute(
                    "INSERT INTO jobs (source_key, kind, path, state, created, updated) "
                    "VALUES (?, ?, ?, 'queued', ?, ?)",
                    (source_key, kind, path, now, now),
                )
                job = self._job(db.execute("SELECT * FROM jobs WHERE id = ?", (cur.lastrowid,)).fetchone())
                assert job is not None
                return job, True
            existing = self._job(row)
            assert existing is not None
            if force and existing.state in ("done", "failed", "quarantined"):
                db.execute(
                    "UPDATE jobs SET state='queued', path=?, reason=NULL, updated=?, rescore=1 WHERE id=?",
                    (path, now, existing.id),
                )
                job = self._job(db.execute("SELECT * FROM jobs WHERE id = ?", (existing.id,)).fetchone())
                assert job is not None
                return job, True
            return existing, False

    # -- the worker's side -----------------------------------------------------
    def claim(self) -> Job | None:
        """Take the oldest queued job and mark it running."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM jobs WHERE state='queued' ORDER BY id LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET state='running', attempts=attempts+1, updated=? WHERE id=?", (time.time(), row["id"])
            )
            return self._job(db.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone())

    def finish(self, job_id: int, result_dir: str) -> None:
        self._set(job_id, "done", None, result_dir)

    def fail(self, job_id: int, reason: str) -> None:
        self._set(job_id, "failed", reason)

    def quarantine(self, job_id: int, reason: str) -> None:
        self._set(job_id, "quarantined", reason)

    def requeue(self, job_id: int, reason: str | None = None) -> None:
        self._set(job_id, "queued", reason)

    def _set(self, job_id: int, state: str, reason: str | None, result_dir: str | None = None) -> None:
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET state=?, reason=?, result_dir=COALESCE(?, result_dir), updated=? WHERE id=?",
                (state, reason, result_dir, time.time(), job_id),
            )
            if cur.rowcount == 0:
                raise QueueError(f"job {job_id}: no such job")

    def recover(self) -> int:
        """After a crash: every ``running`` job goes back to ``queued``. Returns how many."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET state='queued', reason='interrupted; requeued at start-up', updated=? "
                "WHERE state='running'",
                (time.time(),),
            )
            return cur.rowcount

    def retry(self, job_id: int) -> Job:
        """Operator retry of a failed or quarantined job (``ihc-adapter retry``)."""
        job = self.get(job_id)
        if job.state not in ("failed", "quarantined", "done"):
            raise QueueError(f"job {job_id} is {job.state}; only failed, quarantined or done jobs can be retried")
        self._set(job_id, "queued", None)
        with self._tx() as db:
            db.execute("UPDATE jobs SET rescore=1 WHERE id=?", (job_id,))
        return self.get(job_id)

    # -- reading ----------------------------------------------------------------
    def get(self, job_id: int) -> Job:
        with self._lock:
            job = self._job(self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())
        if job is None:
            raise QueueError(f"job {job_id}: no such job")
        return job

    def by_source(self, source_key: str) -> Job | None:
        with self._lock:
            return self._job(self._db.execute("SELECT * FROM jobs WHERE source_key = ?", (source_key,)).fetchone())

    def jobs(self, state: str | None = None) -> list[Job]:
        with self._lock:
            if state:
                rows = self._db.execute("SELECT * FROM jobs WHERE state = ? ORDER BY id", (state,)).fetchall()
            else:
                rows = self._db.execute("SELECT * FROM jobs ORDER BY id").fetchall()
        return [j for j in (self._job(r) for r in rows) if j is not None]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        out = dict.fromkeys(STATES, 0)
        out.update({r[0]: r[1] for r in rows})
        return out

    # -- deliveries -------------------------------------------------------------
    def plan_deliveries(self, job_id: int, destination: str, files: list[str]) -> None:
        """Record that ``files`` must reach ``destination`` (idempotent)."""
        with self._tx() as db:
            db.executemany(
                "INSERT OR IGNORE INTO deliveries (job_id, destination, file, state) VALUES (?, ?, ?, 'pending')",
                [(job_id, destination, f) for f in files],
            )

    def pending_deliveries(self, now: float | None = None) -> list[tuple[int, str, str, int]]:
        """``(job_id, destination, file, attempts)`` due now."""
        now = time.time() if now is None else now
        with self._lock:
            rows = self._db.execute(
                "SELECT job_id, destination, file, attempts FROM deliveries WHERE state='pending' AND next_try <= ? "
                "ORDER BY job_id, destination",
                (now,),
            ).fetchall()
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    def delivered(self, job_id: int, destination: str, file: str) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE deliveries SET state='sent', reason=NULL WHERE job_id=? AND destination=? AND file=?",
                (job_id, destination, file),
            )

    def delivery_failed(
        self, job_id: int, destination: str, file: str, reason: str, base_s: float = 5.0, max_s: float = 3600.0
    ) -> float:
        """Back off exponentially; returns the delay until the next try."""
        with self._tx() as db:
            row = db.execute(
                "SELECT attempts FROM deliveries WHERE job_id=? AND destination=? AND file=?",
                (job_id, destination, file),
            ).fetchone()
            attempts = (row[0] if row else 0) + 1
            delay = min(max_s, base_s * 2 ** (attempts - 1))
            db.execute(
                "UPDATE deliveries SET attempts=?, next_try=?, reason=? WHERE job_id=? AND destination=? AND file=?",
                (attempts, time.time() + delay, reason, job_id, destination, file),
            )
        return delay

    def delivery_states(self, job_id: int) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute(
                "SELECT state, COUNT(*) FROM deliveries WHERE job_id=? GROUP BY state", (job_id,)
            ).fetchall()
        return {r[0]: r[1] for r in rows}

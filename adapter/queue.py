"""Durable job queue in SQLite (WAL): every acknowledged slide is scored, its results delivered.

Job states (:class:`JobState`): ``queued`` → ``running`` → ``done`` |
``failed`` | ``quarantined``, or ``superseded`` when the slide changed while
it was scored (its results are never delivered). A job is keyed by its
source (a DICOM Series Instance UID or a file's content hash), so the same
slide arriving twice is one job; each job also records the *content key*
of what it scored (a hash over the series' instances), so a scanner that
re-sends an identical series gets no second result set, while a changed
series is scored again and its results replace the earlier ones. On
start-up ``running`` jobs go back to ``queued`` (the process that ran them
died).

Deliveries (:class:`DeliveryState`) record, per job, destination and file,
whether it is ``pending``, ``sent``, ``rejected`` (the destination refused
it for good, e.g. 0xA9xx or 0xCxxx: not retried) or ``cancelled`` (a newer
attempt of the job replaced it). A destination that is down is retried with
exponential backoff without re-scoring. Delivery is *at least once*: a
crash between the destination's acknowledgement and its record here re-sends
that object at the next start, with the same SOP Instance UID, which a PACS
stores once.
"""

from __future__ import annotations

import enum
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from config.errors import IhcAdapterError


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    QUARANTINED = "quarantined"
    SUPERSEDED = "superseded"


#: States a job leaves only when it is submitted again or retried.
FINAL_STATES = (JobState.DONE, JobState.FAILED, JobState.QUARANTINED, JobState.SUPERSEDED)


class DeliveryState(enum.StrEnum):
    PENDING = "pending"
    SENT = "sent"
    REJECTED = "rejected"
    CANCELLED = "cancelled"


class Submitted(enum.Enum):
    """What :meth:`JobQueue.submit` did."""

    NEW = "new"  #: a new job was queued
    RESCORE = "rescore"  #: a finished job was queued again (changed content, or forced)
    WAITING = "waiting"  #: the job is already queued or running; nothing changed
    DUPLICATE = "duplicate"  #: the same content was already scored: nothing to do

    @property
    def queued(self) -> bool:
        return self in (Submitted.NEW, Submitted.RESCORE)


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

#: Columns added after the first release, with their definitions (added to older databases at open).
_ADDED_COLUMNS = {
    "jobs": {"content_key": "TEXT", "fingerprint": "TEXT", "scored_key": "TEXT"},
    "deliveries": {"planned": "REAL NOT NULL DEFAULT 0", "sent_at": "REAL"},
}


class QueueError(IhcAdapterError):
    """A job does not exist or cannot move to the requested state."""


@dataclass(frozen=True)
class Job:
    id: int
    source_key: str
    kind: str
    path: str
    state: JobState
    attempts: int
    reason: str | None
    result_dir: str | None
    created: float
    updated: float
    rescore: bool
    #: content key of the slide as submitted (series: hash over its instances)
    content_key: str | None = None
    #: cheap fingerprint (names, sizes, mtimes) when the job was queued or claimed
    fingerprint: str | None = None
    #: content key of what the last finished attempt scored
    scored_key: str | None = None


@dataclass(frozen=True)
class DeliveryBatch:
    """Files of one job due for one destination: sent over one association."""

    job_id: int
    destination: str
    files: tuple[str, ...]


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
        for table, columns in _ADDED_COLUMNS.items():
            have = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}
            for name, definition in columns.items():
                if name not in have:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {definition}")

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
        d["state"] = JobState(d["state"])
        return Job(**d)

    def _row(self, db: sqlite3.Connection, job_id: int) -> Job:
        job = self._job(db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())
        if job is None:
            raise QueueError(f"job {job_id}: no such job")
        return job

    # -- submission --------------------------------------------------------
    def submit(
        self,
        source_key: str,
        kind: str,
        path: str,
        force: bool = False,
        content_key: str | None = None,
        fingerprint: str | None = None,
    ) -> tuple[Job, Submitted]:
        """Queue a slide; returns the job and what was done.

        A known source that is queued or running is left alone (its path,
        content key and fingerprint are brought up to date: the worker
        notices a change under a running job). One that finished is queued
        again when ``force``, or when ``content_key`` is given and differs
        from what it scored or the job failed; otherwise it is a
        :attr:`Submitted.DUPLICATE`.
        """
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT * FROM jobs WHERE source_key = ?", (source_key,)).fetchone()
            if row is None:
                cur = db.execute(
                    "INSERT INTO jobs (source_key, kind, path, state, created, updated, content_key, fingerprint) "
                    "VALUES (?, ?, ?, 'queued', ?, ?, ?, ?)",
                    (source_key, kind, path, now, now, content_key, fingerprint),
                )
                assert cur.lastrowid is not None
                return self._row(db, cur.lastrowid), Submitted.NEW
            existing = self._job(row)
            assert existing is not None
            if existing.state in (JobState.QUEUED, JobState.RUNNING):
                db.execute(
                    "UPDATE jobs SET path=?, content_key=COALESCE(?, content_key), updated=? WHERE id=?",
                    (path, content_key, now, existing.id),
                )
                return self._row(db, existing.id), Submitted.WAITING
            # A file's source key is its content hash: without a content key it is the same content,
            # left as it ended (an operator retries it). A series sent again with the same content
            # is left alone once scored or quarantined; after a failure, or changed, it is scored again.
            scored = existing.state in (JobState.DONE, JobState.QUARANTINED) and content_key == existing.scored_key
            if not force and (content_key is None or scored):
                return existing, Submitted.DUPLICATE
            db.execute(
                "UPDATE jobs SET state='queued', path=?, reason=NULL, updated=?, rescore=1, "
                "content_key=COALESCE(?, content_key), fingerprint=? WHERE id=?",
                (path, now, content_key, fingerprint, existing.id),
            )
            self._cancel_in(db, existing.id, "replaced by a new scoring of the slide")
            return self._row(db, existing.id), Submitted.RESCORE

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
            return self._row(db, row["id"])

    def set_fingerprint(self, job_id: int, fingerprint: str, content_key: str | None = None) -> None:
        """What the running attempt is about to score."""
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET fingerprint=?, content_key=COALESCE(?, content_key) WHERE id=?",
                (fingerprint, content_key, job_id),
            )

    def finish(self, job_id: int, result_dir: str, scored_key: str | None = None) -> None:
        with self._tx() as db:
            self._set_in(db, job_id, JobState.DONE, None, result_dir)
            db.execute("UPDATE jobs SET scored_key=COALESCE(?, content_key) WHERE id=?", (scored_key, job_id))

    def fail(self, job_id: int, reason: str) -> None:
        self._set(job_id, JobState.FAILED, reason)

    def quarantine(self, job_id: int, reason: str) -> None:
        """Poison input: the same content sent again is not tried again (a changed one is)."""
        with self._tx() as db:
            self._set_in(db, job_id, JobState.QUARANTINED, reason)
            db.execute("UPDATE jobs SET scored_key=content_key WHERE id=?", (job_id,))

    def supersede(self, job_id: int, reason: str) -> int:
        """The slide changed under this job: it ends without results, its pending deliveries are
        cancelled. Returns how many deliveries were cancelled."""
        with self._tx() as db:
            self._set_in(db, job_id, JobState.SUPERSEDED, reason)
            return self._cancel_in(db, job_id, reason)

    def requeue(self, job_id: int, reason: str | None = None) -> None:
        self._set(job_id, JobState.QUEUED, reason)

    def _set(self, job_id: int, state: JobState, reason: str | None, result_dir: str | None = None) -> None:
        with self._tx() as db:
            self._set_in(db, job_id, state, reason, result_dir)

    @staticmethod
    def _set_in(
        db: sqlite3.Connection, job_id: int, state: JobState, reason: str | None, result_dir: str | None = None
    ) -> None:
        cur = db.execute(
            "UPDATE jobs SET state=?, reason=?, result_dir=COALESCE(?, result_dir), updated=? WHERE id=?",
            (str(state), reason, result_dir, time.time(), job_id),
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
        """Operator retry of a finished job (``ihc-adapter retry``)."""
        with self._tx() as db:
            job = self._row(db, job_id)
            if job.state not in FINAL_STATES:
                raise QueueError(
                    f"job {job_id} is {job.state}; only failed, quarantined, superseded or done jobs can be retried"
                )
            self._set_in(db, job_id, JobState.QUEUED, None)
            db.execute("UPDATE jobs SET rescore=1 WHERE id=?", (job_id,))
            self._cancel_in(db, job_id, "replaced by a retry of the job")
            return self._row(db, job_id)

    # -- reading ----------------------------------------------------------------
    def get(self, job_id: int) -> Job:
        with self._lock:
            return self._row(self._db, job_id)

    def by_source(self, source_key: str) -> Job | None:
        with self._lock:
            return self._job(self._db.execute("SELECT * FROM jobs WHERE source_key = ?", (source_key,)).fetchone())

    def by_path(self, path: str) -> list[Job]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs WHERE path = ? ORDER BY id", (path,)).fetchall()
        return [j for j in (self._job(r) for r in rows) if j is not None]

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
        out = {str(s): 0 for s in JobState}
        out.update({r[0]: r[1] for r in rows})
        return out

    # -- deliveries -------------------------------------------------------------
    def plan_deliveries(self, job_id: int, destination: str, files: list[str]) -> None:
        """Record that ``files`` must reach ``destination`` (idempotent)."""
        now = time.time()
        with self._tx() as db:
            db.executemany(
                "INSERT OR IGNORE INTO deliveries (job_id, destination, file, state, planned) "
                "VALUES (?, ?, ?, 'pending', ?)",
                [(job_id, destination, f, now) for f in files],
            )

    @staticmethod
    def _cancel_in(db: sqlite3.Connection, job_id: int, reason: str) -> int:
        cur = db.execute(
            "UPDATE deliveries SET state='cancelled', reason=? WHERE job_id=? AND state='pending'", (reason, job_id)
        )
        return cur.rowcount

    def pending_deliveries(self, now: float | None = None) -> list[tuple[int, str, str, int]]:
        """``(job_id, destination, file, attempts)`` due now, of jobs that are done."""
        now = time.time() if now is None else now
        with self._lock:
            rows = self._db.execute(
                "SELECT d.job_id, d.destination, d.file, d.attempts FROM deliveries d JOIN jobs j ON j.id = d.job_id "
                "WHERE d.state='pending' AND d.next_try <= ? AND j.state='done' "
                "ORDER BY d.job_id, d.destination, d.planned, d.file",
                (now,),
            ).fetchall()
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    def due_batches(self, now: float | None = None) -> list[DeliveryBatch]:
        """Due deliveries grouped by job and destination, in the order they were planned."""
        batches: dict[tuple[int, str], list[str]] = {}
        for job_id, destination, file, _ in self.pending_deliveries(now):
            batches.setdefault((job_id, destination), []).append(file)
        return [DeliveryBatch(j, d, tuple(files)) for (j, d), files in batches.items()]

    def delivered(self, job_id: int, destination: str, file: str) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE deliveries SET state='sent', reason=NULL, sent_at=? "
                "WHERE job_id=? AND destination=? AND file=?",
                (time.time(), job_id, destination, file),
            )

    def rejected(self, job_id: int, destination: str, file: str, reason: str) -> None:
        """The destination refused the object for good: recorded, never retried."""
        with self._tx() as db:
            db.execute(
                "UPDATE deliveries SET state='rejected', reason=?, attempts=attempts+1 "
                "WHERE job_id=? AND destination=? AND file=?",
                (reason, job_id, destination, file),
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

    def deliveries(self, job_id: int) -> list[tuple[str, str, DeliveryState, str | None]]:
        """``(destination, file, state, reason)`` of every delivery of a job."""
        with self._lock:
            rows = self._db.execute(
                "SELECT destination, file, state, reason FROM deliveries WHERE job_id=? ORDER BY destination, file",
                (job_id,),
            ).fetchall()
        return [(r[0], r[1], DeliveryState(r[2]), r[3]) for r in rows]

    # -- retention --------------------------------------------------------------
    def purgeable(self, finished_before: float, require_delivered: bool) -> list[Job]:
        """Finished jobs last updated before ``finished_before`` (and, if asked, with nothing pending)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM jobs j WHERE state IN ('done', 'failed', 'quarantined', 'superseded') AND updated < ? "
                "AND (? = 0 OR NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.job_id = j.id AND d.state = 'pending')) "
                "ORDER BY id",
                (finished_before, int(require_delivered)),
            ).fetchall()
        return [j for j in (self._job(r) for r in rows) if j is not None]

    def mark_purged(self, job_id: int) -> None:
        """The job's files are gone: it stays in the table (its key still recognises a re-send)."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET result_dir=NULL WHERE id=?", (job_id,))

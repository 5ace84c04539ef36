"""The durable job queue: one row per track, in SQLite (WAL) in the state dir.

A job's life: ``queued`` → ``running`` → ``done`` | ``failed``; a failure
below ``max_attempts`` goes back to ``queued``. Attempts are counted when a
job is *claimed*, so a track that crashes the whole daemon is not retried
forever: at start-up `recover` sends interrupted jobs back to ``queued``, or
to ``failed`` once they have used up their attempts.

`JobQueue` is the interface the daemon uses; `SQLiteQueue` is the one-machine
implementation. Paths are stored as raw bytes so that names that are not
valid UTF-8 survive the round trip.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

SCHEMA_VERSION = 1
STATES = ("queued", "running", "done", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id          INTEGER PRIMARY KEY,
    path        BLOB NOT NULL UNIQUE,
    state       TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed')),
    attempts    INTEGER NOT NULL DEFAULT 0,
    force       INTEGER NOT NULL DEFAULT 0,
    -- set when the file changed while its job was running: run it again after
    dirty       INTEGER NOT NULL DEFAULT 0,
    generation  INTEGER NOT NULL DEFAULT 1,
    reason      TEXT,
    last_error  TEXT,
    size        INTEGER,
    mtime_ns    INTEGER,
    worker      TEXT,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    started_at  REAL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class Job:
    id: int
    path: Path
    state: str
    attempts: int
    force: bool
    generation: int
    reason: str | None
    last_error: str | None
    size: int | None
    mtime_ns: int | None
    worker: str | None
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None

    def as_dict(self) -> dict[str, object]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["path"] = os.fsdecode(self.path).encode("utf-8", "backslashreplace").decode("utf-8")
        return d


class JobQueue(Protocol):
    """What the daemon needs from a queue (SQLite here; shared backends later)."""

    def enqueue(self, path: Path, size: int | None, mtime_ns: int | None, *, reason: str,
                rerun: bool = False, force: bool = False) -> str: ...
    def claim(self) -> Job | None: ...
    def complete(self, job: Job) -> None: ...
    def fail(self, job: Job, error: str, *, permanent: bool = False) -> str: ...
    def release(self, job: Job) -> None: ...
    def recover(self) -> tuple[int, int]: ...
    def retry(self, path: Path | None = None, *, all_failed: bool = False) -> int: ...
    def counts(self) -> dict[str, int]: ...
    def running(self) -> list[Job]: ...
    def recent_failures(self, limit: int = 10) -> list[Job]: ...
    def get(self, path: Path) -> Job | None: ...
    def close(self) -> None: ...


def _worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class SQLiteQueue:
    def __init__(self, path: Path, *, max_attempts: int = 3) -> None:
        self.path = Path(path)
        self.max_attempts = max_attempts
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection shared by the daemon's threads, serialised by a lock:
        # simpler than a pool, and SQLite serialises writers anyway.
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None,
                                   check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=30000")
            self._db.executescript(_SCHEMA)
            self._db.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )
            self._db.execute("PRAGMA quick_check").fetchone()

    # -- transactions ---------------------------------------------------------

    def _tx(self):
        return _Transaction(self._db, self._lock)

    # -- writers --------------------------------------------------------------

    def enqueue(self, path: Path, size: int | None, mtime_ns: int | None, *, reason: str,
                rerun: bool = False, force: bool = False) -> str:
        """Queue a track. Returns what happened: queued, requeued, pending, unchanged.

        A path is never queued twice: a queued job absorbs the request, a
        running job is marked to run again when it finishes. A done or failed
        job is queued again when the file changed (size or mtime), or when
        `rerun` asks for it (stale sidecar, new stem); a failed one only when
        the file changed or `force` (retry) says so.
        """
        key = os.fsencode(path)
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT * FROM jobs WHERE path = ?", (key,)).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO jobs (path, state, force, reason, size, mtime_ns, created_at, updated_at)"
                    " VALUES (?, 'queued', ?, ?, ?, ?, ?, ?)",
                    (key, int(force), reason, size, mtime_ns, now, now),
                )
                return "queued"
            changed = (row["size"], row["mtime_ns"]) != (size, mtime_ns)
            state = row["state"]
            if state == "queued":
                db.execute(
                    "UPDATE jobs SET size = ?, mtime_ns = ?, force = force | ?, updated_at = ? WHERE id = ?",
                    (size, mtime_ns, int(force), now, row["id"]),
                )
                return "unchanged"
            if state == "running":
                if changed or rerun or force:
                    db.execute(
                        "UPDATE jobs SET dirty = 1, size = ?, mtime_ns = ?, force = force | ?,"
                        " reason = ?, updated_at = ? WHERE id = ?",
                        (size, mtime_ns, int(force), reason, now, row["id"]),
                    )
                    return "pending"
                return "unchanged"
            if changed or force or (rerun and state == "done"):
                db.execute(
                    "UPDATE jobs SET state = 'queued', attempts = 0, last_error = NULL, dirty = 0,"
                    " force = ?, generation = generation + 1, reason = ?, size = ?, mtime_ns = ?,"
                    " worker = NULL, started_at = NULL, finished_at = NULL, updated_at = ? WHERE id = ?",
                    (int(force), reason, size, mtime_ns, now, row["id"]),
                )
                return "requeued"
            return "unchanged"

    def claim(self) -> Job | None:
        """Take the oldest queued job and mark it running (one attempt used)."""
        now = time.time()
        with self._tx() as db:
            row = db.execute(
                "UPDATE jobs SET state = 'running', attempts = attempts + 1, worker = ?,"
                " started_at = ?, updated_at = ?"
                " WHERE id = (SELECT id FROM jobs WHERE state = 'queued' ORDER BY id LIMIT 1)"
                " RETURNING *",
                (_worker_name(), now, now),
            ).fetchone()
        return _job(row) if row else None

    def complete(self, job: Job) -> None:
        """Mark done, unless the file changed meanwhile: then it runs again."""
        now = time.time()
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET state = CASE dirty WHEN 1 THEN 'queued' ELSE 'done' END,"
                " attempts = CASE dirty WHEN 1 THEN 0 ELSE attempts END,"
                " generation = generation + dirty, dirty = 0, last_error = NULL,"
                " finished_at = ?, updated_at = ?"
                " WHERE id = ? AND generation = ? AND state = 'running'",
                (now, now, job.id, job.generation),
            )

    def fail(self, job: Job, error: str, *, permanent: bool = False) -> str:
        """Record a failure; returns the job's new state (queued again, or failed)."""
        now = time.time()
        error = " ".join(error.split())[:2000]
        with self._tx() as db:
            row = db.execute("SELECT attempts, dirty FROM jobs WHERE id = ?", (job.id,)).fetchone()
            if row is None:
                return "gone"
            if row["dirty"]:
                state = "queued"  # the file changed under us: the new version gets its own try
                db.execute(
                    "UPDATE jobs SET state = 'queued', attempts = 0, dirty = 0, generation = generation + 1,"
                    " last_error = ?, finished_at = ?, updated_at = ? WHERE id = ?",
                    (error, now, now, job.id),
                )
                return state
            state = "failed" if permanent or row["attempts"] >= self.max_attempts else "queued"
            db.execute(
                "UPDATE jobs SET state = ?, last_error = ?, finished_at = ?, updated_at = ?"
                " WHERE id = ? AND generation = ?",
                (state, error, now, now, job.id, job.generation),
            )
        return state

    def release(self, job: Job) -> None:
        """Give a job back untouched (the daemon is stopping): the attempt does not count."""
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET state = 'queued', attempts = MAX(attempts - 1, 0), worker = NULL,"
                " started_at = NULL, updated_at = ? WHERE id = ? AND state = 'running'",
                (time.time(), job.id),
            )

    def recover(self) -> tuple[int, int]:
        """At start-up: jobs left running by a dead process. Returns (requeued, failed)."""
        now = time.time()
        with self._tx() as db:
            failed = db.execute(
                "UPDATE jobs SET state = 'failed', updated_at = ?, finished_at = ?,"
                " last_error = 'interrupted ' || attempts || ' times (the daemon died during this job)'"
                " WHERE state = 'running' AND attempts >= ?",
                (now, now, self.max_attempts),
            ).rowcount
            requeued = db.execute(
                "UPDATE jobs SET state = 'queued', worker = NULL, started_at = NULL, updated_at = ?"
                " WHERE state = 'running'",
                (now,),
            ).rowcount
        return requeued, failed

    def retry(self, path: Path | None = None, *, all_failed: bool = False) -> int:
        now = time.time()
        with self._tx() as db:
            if all_failed:
                where, args = "state = 'failed'", ()
            elif path is not None:
                where, args = "state IN ('failed', 'done') AND path = ?", (os.fsencode(path),)
            else:
                return 0
            return db.execute(
                "UPDATE jobs SET state = 'queued', attempts = 0, force = 1, last_error = NULL,"
                " generation = generation + 1, reason = 'retry', updated_at = ? WHERE " + where,
                (now, *args),
            ).rowcount

    # -- readers --------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state").fetchall()
        counts = dict.fromkeys(STATES, 0)
        counts.update({r["state"]: r["n"] for r in rows})
        return counts

    def running(self) -> list[Job]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs WHERE state = 'running' ORDER BY started_at").fetchall()
        return [_job(r) for r in rows]

    def recent_failures(self, limit: int = 10) -> list[Job]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM jobs WHERE state = 'failed' ORDER BY finished_at DESC LIMIT ?", (limit,)
            ).fetchall()
        return [_job(r) for r in rows]

    def get(self, path: Path) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE path = ?", (os.fsencode(path),)).fetchone()
        return _job(row) if row else None

    def all(self) -> list[Job]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs ORDER BY id").fetchall()
        return [_job(r) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


class _Transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT``: take the write lock up front, so two
    processes (daemon and ``mirwatch retry``) never deadlock on an upgrade."""

    def __init__(self, db: sqlite3.Connection, lock: threading.RLock) -> None:
        self._db, self._lock = db, lock

    def __enter__(self) -> sqlite3.Connection:
        self._lock.acquire()
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._lock.release()
            raise
        return self._db

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self._lock.release()


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"], path=Path(os.fsdecode(row["path"])), state=row["state"],
        attempts=row["attempts"], force=bool(row["force"]), generation=row["generation"],
        reason=row["reason"], last_error=row["last_error"], size=row["size"],
        mtime_ns=row["mtime_ns"], worker=row["worker"], created_at=row["created_at"],
        updated_at=row["updated_at"], started_at=row["started_at"], finished_at=row["finished_at"],
    )

"""The one-machine queue: one row per track, in SQLite (WAL) in the state dir.

Paths are stored whole, as raw bytes, so that names that are not valid UTF-8
survive the round trip; one machine needs no root names. Schema 1 (before
per-host worker rows) migrates in place: version 2 only adds a table.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from .base import (STATES, Job, QueueSchemaError, default_host_name, enqueue_action, squash_error,
                   worker_name)

SCHEMA_VERSION = 2

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

# Schema version -> what brings the previous version up to it.
_MIGRATIONS = {
    2: """
CREATE TABLE IF NOT EXISTS workers (
    name           TEXT PRIMARY KEY,
    pid            INTEGER,
    current        TEXT,
    current_job    INTEGER,
    started_at     REAL,
    last_heartbeat REAL,
    done           INTEGER NOT NULL DEFAULT 0,
    failed         INTEGER NOT NULL DEFAULT 0,
    stopped        INTEGER NOT NULL DEFAULT 0
);
ALTER TABLE jobs ADD COLUMN claims INTEGER NOT NULL DEFAULT 0;
""",
}

# A claim is ours while the row still carries our worker name and claim token.
_OWNED = "id = ? AND state = 'running' AND worker = ? AND claims = ?"


class SQLiteQueue:
    def __init__(self, path: Path, *, max_attempts: int = 3, host: str | None = None) -> None:
        self.path = Path(path)
        self.max_attempts = max_attempts
        self.host = host or default_host_name()
        self.worker = worker_name(self.host)
        self._registered = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection shared by the daemon's threads, serialised by a lock:
        # simpler than a pool, and SQLite serialises writers anyway.
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None,
                                   check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            _set_wal(self._db)
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=30000")
            self._db.execute("PRAGMA quick_check").fetchone()
            self._migrate()

    def _migrate(self) -> None:
        with self._tx() as db:
            for statement in _split(_SCHEMA):
                db.execute(statement)
            row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = int(row["value"]) if row else 1
            if version > SCHEMA_VERSION:
                raise QueueSchemaError(
                    f"{self.path}: queue schema version {version} is newer than this mirwatch "
                    f"understands ({SCHEMA_VERSION}); upgrade mirwatch")
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _split(_MIGRATIONS[target]):
                    db.execute(statement)
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                       (str(SCHEMA_VERSION),))

    def _tx(self):
        return _Transaction(self._db, self._lock)

    # -- writers --------------------------------------------------------------

    def enqueue(self, path: Path, size: int | None, mtime_ns: int | None, *, reason: str,
                rerun: bool = False, force: bool = False) -> str:
        """Queue a track. Returns what happened: queued, requeued, pending, unchanged."""
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
            action = enqueue_action(row["state"], changed=changed, rerun=rerun, force=force)
            if action == "absorb":
                db.execute(
                    "UPDATE jobs SET size = ?, mtime_ns = ?, force = force | ?, updated_at = ? WHERE id = ?",
                    (size, mtime_ns, int(force), now, row["id"]),
                )
                return "unchanged"
            if action == "pending":
                db.execute(
                    "UPDATE jobs SET dirty = 1, size = ?, mtime_ns = ?, force = force | ?,"
                    " reason = ?, updated_at = ? WHERE id = ?",
                    (size, mtime_ns, int(force), reason, now, row["id"]),
                )
                return "pending"
            if action == "requeue":
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
                "UPDATE jobs SET state = 'running', attempts = attempts + 1, claims = claims + 1, worker = ?,"
                " started_at = ?, updated_at = ?"
                " WHERE id = (SELECT id FROM jobs WHERE state = 'queued' ORDER BY id LIMIT 1)"
                " RETURNING *",
                (self.worker, now, now),
            ).fetchone()
        return _job(row) if row else None

    def complete(self, job: Job) -> bool:
        """Mark done, unless the file changed meanwhile: then it runs again.

        False when the claim is no longer ours (given back, or taken over).
        """
        now = time.time()
        with self._tx() as db:
            changed = db.execute(
                "UPDATE jobs SET state = CASE dirty WHEN 1 THEN 'queued' ELSE 'done' END,"
                " attempts = CASE dirty WHEN 1 THEN 0 ELSE attempts END,"
                " generation = generation + dirty, dirty = 0, last_error = NULL,"
                " finished_at = ?, updated_at = ?"
                f" WHERE {_OWNED} AND generation = ?",
                (now, now, job.id, self.worker, job.claim, job.generation),
            ).rowcount
            if changed:
                self._count(db, "done")
        return bool(changed)

    def fail(self, job: Job, error: str, *, permanent: bool = False) -> str:
        """Record a failure; returns the job's new state (queued, failed), or "lost"."""
        now = time.time()
        error = squash_error(error)
        with self._tx() as db:
            row = db.execute(f"SELECT attempts, dirty FROM jobs WHERE {_OWNED}",
                             (job.id, self.worker, job.claim)).fetchone()
            if row is None:
                return "lost"
            if row["dirty"]:
                # The file changed under us: the new version gets its own try.
                db.execute(
                    "UPDATE jobs SET state = 'queued', attempts = 0, dirty = 0, generation = generation + 1,"
                    " last_error = ?, finished_at = ?, updated_at = ? WHERE id = ?",
                    (error, now, now, job.id),
                )
                return "queued"
            state = "failed" if permanent or row["attempts"] >= self.max_attempts else "queued"
            db.execute(
                "UPDATE jobs SET state = ?, last_error = ?, finished_at = ?, updated_at = ? WHERE id = ?",
                (state, error, now, now, job.id),
            )
            if state == "failed":
                self._count(db, "failed")
        return state

    def release(self, job: Job) -> None:
        """Give a job back untouched (the daemon is stopping): the attempt does not count."""
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET state = 'queued', attempts = MAX(attempts - 1, 0), worker = NULL,"
                f" started_at = NULL, updated_at = ? WHERE {_OWNED}",
                (time.time(), job.id, self.worker, job.claim),
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

    # -- liveness -------------------------------------------------------------

    def heartbeat(self, in_flight: list[Job]) -> list[Job]:
        """Record this host as alive and what it works on. One machine has no leases
        to lose, so nothing is ever returned as lost."""
        now = time.time()
        current = in_flight[0] if in_flight else None
        with self._tx() as db:
            db.execute(
                "INSERT INTO workers (name, pid, started_at, last_heartbeat, current, current_job, stopped)"
                " VALUES (?, ?, ?, ?, ?, ?, 0) ON CONFLICT (name) DO UPDATE SET pid = excluded.pid,"
                " started_at = CASE WHEN workers.pid = excluded.pid AND workers.stopped = 0"
                " THEN workers.started_at ELSE excluded.started_at END,"
                " last_heartbeat = excluded.last_heartbeat, current = excluded.current,"
                " current_job = excluded.current_job, stopped = 0",
                (self.host, os.getpid(), now, now,
                 os.fsdecode(current.path).encode("utf-8", "backslashreplace").decode() if current else None,
                 current.id if current else None),
            )
        self._registered = True
        return []

    def still_owned(self, job: Job) -> bool:
        with self._lock:
            row = self._db.execute(f"SELECT 1 FROM jobs WHERE {_OWNED} AND generation = ?",
                                   (job.id, self.worker, job.claim, job.generation)).fetchone()
        return row is not None

    def _count(self, db: sqlite3.Connection, column: str) -> None:
        db.execute(
            f"INSERT INTO workers (name, pid, {column}) VALUES (?, ?, 1)"
            f" ON CONFLICT (name) DO UPDATE SET {column} = {column} + 1",
            (self.host, os.getpid()),
        )

    # -- readers --------------------------------------------------------------

    def counts(self, *, wait: bool = True) -> dict[str, int]:  # a local file: nothing to wait out
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state").fetchall()
        counts = dict.fromkeys(STATES, 0)
        counts.update({r["state"]: r["n"] for r in rows})
        return counts

    def recent_done(self, window: float, *, wait: bool = True) -> tuple[int, float]:
        now = time.time()
        with self._lock:
            row = self._db.execute("SELECT COUNT(*) AS n, MIN(finished_at) AS first FROM jobs"
                                   " WHERE state = 'done' AND finished_at >= ?", (now - window,)).fetchone()
        return row["n"], (now - row["first"]) if row["n"] else 0.0

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

    def hosts(self) -> list[dict[str, Any]]:
        """Every worker host that reported here: name, current track, last heartbeat, counts."""
        now = time.time()
        with self._lock:
            rows = self._db.execute("SELECT * FROM workers ORDER BY name").fetchall()
        return [{
            "name": r["name"], "pid": r["pid"], "current": r["current"], "current_job": r["current_job"],
            "started_at": r["started_at"], "last_heartbeat": r["last_heartbeat"],
            "heartbeat_age": round(now - r["last_heartbeat"], 1) if r["last_heartbeat"] else None,
            "done": r["done"], "failed": r["failed"], "stopped": bool(r["stopped"]),
        } for r in rows]

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
            if self._registered:
                self._db.execute("UPDATE workers SET stopped = 1, current = NULL, current_job = NULL"
                                 " WHERE name = ? AND pid = ?", (self.host, os.getpid()))
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


def _set_wal(db: sqlite3.Connection) -> None:
    # Two processes opening a brand-new file at once (the daemon starting,
    # `mirwatch status` polling it) race for the switch to WAL, and SQLite
    # answers "locked" at once rather than waiting: try again briefly.
    for attempt in range(50):
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == 49:
                raise
            time.sleep(0.1)


def _split(script: str) -> list[str]:
    # executescript() would commit our open transaction; run statement by statement.
    return [s.strip() for s in script.split(";") if s.strip()]


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"], path=Path(os.fsdecode(row["path"])), state=row["state"],
        attempts=row["attempts"], force=bool(row["force"]), generation=row["generation"],
        reason=row["reason"], last_error=row["last_error"], size=row["size"],
        mtime_ns=row["mtime_ns"], worker=row["worker"], created_at=row["created_at"],
        updated_at=row["updated_at"], started_at=row["started_at"], finished_at=row["finished_at"],
        claim=row["claims"],
    )

"""The shared queue: one PostgreSQL database, any number of hosts.

Same states and rules as the SQLite queue (see `base`), plus what several
machines need:

- Jobs are keyed by (root name, path relative to the root, as bytes), so
  hosts that mount the library at different paths agree on a track, and
  several watchers seeing one file queue it once (``ON CONFLICT``).
- A claim is ``FOR UPDATE SKIP LOCKED`` and carries a lease on the server's
  clock (hosts' clocks need not agree). The daemon's heartbeat renews the
  leases of its jobs in flight; a job whose lease ran out (host dead,
  frozen or cut off) goes back to ``queued`` at the next claim by any host,
  and its old owner's complete/fail/`still_owned` then fail.
- Connection loss is retried with backoff for ``reconnect_timeout``
  seconds, so a server restart or a short network outage only pauses work.

Times are epoch seconds from the server (``clock_timestamp()``).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import psycopg
from psycopg import conninfo as pg_conninfo
from psycopg.rows import dict_row

from .base import (STATES, Job, QueueSchemaError, QueueUnavailable, Roots, default_host_name, display,
                   enqueue_action, squash_error, worker_name)

SCHEMA_VERSION = 1
NOW = "extract(epoch from clock_timestamp())"
T = TypeVar("T")

# Schema version -> the statements that bring the previous version up to it.
_MIGRATIONS: dict[int, list[str]] = {
    1: [
        """CREATE TABLE mirwatch.jobs (
            id          bigserial PRIMARY KEY,
            root        text NOT NULL,
            rel         bytea NOT NULL,
            state       text NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed')),
            attempts    integer NOT NULL DEFAULT 0,
            claims      integer NOT NULL DEFAULT 0,
            force       boolean NOT NULL DEFAULT false,
            dirty       boolean NOT NULL DEFAULT false,
            generation  integer NOT NULL DEFAULT 1,
            reason      text,
            last_error  text,
            size        bigint,
            mtime_ns    bigint,
            worker      text,
            lease_until double precision,
            created_at  double precision NOT NULL,
            updated_at  double precision NOT NULL,
            started_at  double precision,
            finished_at double precision,
            UNIQUE (root, rel)
        )""",
        "CREATE INDEX jobs_queued ON mirwatch.jobs (id) WHERE state = 'queued'",
        "CREATE INDEX jobs_leases ON mirwatch.jobs (lease_until) WHERE state = 'running'",
        "CREATE INDEX jobs_failed ON mirwatch.jobs (finished_at) WHERE state = 'failed'",
        """CREATE TABLE mirwatch.workers (
            name           text PRIMARY KEY,
            pid            integer,
            current        text,
            current_job    bigint,
            started_at     double precision,
            last_heartbeat double precision,
            done           bigint NOT NULL DEFAULT 0,
            failed         bigint NOT NULL DEFAULT 0,
            stopped        boolean NOT NULL DEFAULT false
        )""",
    ],
}

_OWNED = "id = %(id)s AND state = 'running' AND worker = %(worker)s AND claims = %(claim)s"


def redact(dsn: str) -> str:
    """The DSN without any password, for logs and errors."""
    try:
        params = pg_conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<unparsable dsn>"
    params.pop("password", None)
    return pg_conninfo.make_conninfo(**{k: v for k, v in params.items() if v is not None})


class PostgresQueue:
    def __init__(self, dsn: str, *, roots: dict[str, Path], max_attempts: int = 3, host: str | None = None,
                 password: str | None = None, lease_seconds: float = 60.0, reconnect_timeout: float = 600.0,
                 connect_timeout: int = 10, log: Any = None) -> None:
        self.dsn = dsn
        self.roots = Roots(roots)
        self.max_attempts = max_attempts
        self.host = host or default_host_name()
        self.worker = worker_name(self.host)
        self.lease_seconds = lease_seconds
        self.reconnect_timeout = reconnect_timeout
        self.log = log
        self._password = password
        self._connect_timeout = connect_timeout
        # One connection per thread: a thread blocked on a reconnect (or a row
        # lock) never holds up the heartbeat or the watcher.
        self._conns: dict[int, tuple[threading.Thread, psycopg.Connection]] = {}
        self._conns_lock = threading.Lock()
        self._outage_since: float | None = None
        self._registered = False
        self._last_beat = 0.0
        self._last_beat_ids: tuple[int, ...] = ()
        self._run(self._migrate)

    # -- connections ------------------------------------------------------------

    def _connect(self) -> psycopg.Connection:
        kwargs: dict[str, Any] = {
            "autocommit": True, "row_factory": dict_row, "connect_timeout": self._connect_timeout,
            "application_name": f"mirwatch {self.worker}"[:63],
            # Notice a dead server or a cut network within ~25 s rather than hanging.
            "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
            # A host frozen inside a transaction would hold its row locks, and
            # SKIP LOCKED would skip that job forever: let the server end it.
            "options": f"-c idle_in_transaction_session_timeout={max(1000, int(self.lease_seconds * 1000))}",
        }
        if self._password is not None:
            kwargs["password"] = self._password
        return psycopg.connect(self.dsn, **kwargs)

    def _conn(self) -> psycopg.Connection:
        me = threading.current_thread()
        with self._conns_lock:
            for ident, (thread, conn) in list(self._conns.items()):
                if not thread.is_alive():  # a finished scan thread's connection
                    conn.close()
                    del self._conns[ident]
            held = self._conns.get(me.ident or 0)
        if held and not held[1].closed and not held[1].broken:
            return held[1]
        conn = self._connect()
        with self._conns_lock:
            self._conns[me.ident or 0] = (me, conn)
        return conn

    def _drop_conn(self) -> None:
        with self._conns_lock:
            held = self._conns.pop(threading.current_thread().ident or 0, None)
        if held:
            try:
                held[1].close()
            except psycopg.Error:
                pass

    def _run(self, fn: Callable[[psycopg.Connection], T], *, retry: bool = True) -> T:
        """Run `fn` in one transaction; on a lost connection reconnect and run it again."""
        deadline = time.monotonic() + self.reconnect_timeout
        delay = 0.2
        while True:
            try:
                conn = self._conn()
                with conn.transaction():
                    result = fn(conn)
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                conn_gone = not isinstance(exc, psycopg.errors.TransactionRollback)
                if conn_gone:
                    self._drop_conn()
                    self._note_outage(exc)
                if not retry or time.monotonic() >= deadline:
                    raise QueueUnavailable(f"queue server {redact(self.dsn)}: {exc}".strip()) from exc
                time.sleep(delay if conn_gone else 0.05)
                delay = min(delay * 2, 5.0)
                continue
            if self._outage_since is not None:
                self._note_back()
            return result

    def _note_outage(self, exc: Exception) -> None:
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            if self.log:
                self.log.warning("queue_unreachable", dsn=redact(self.dsn),
                                 error=" ".join(str(exc).split())[:300], detail="retrying")

    def _note_back(self) -> None:
        since, self._outage_since = self._outage_since, None
        if self.log and since is not None:
            self.log.info("queue_reconnected", dsn=redact(self.dsn), seconds=round(time.monotonic() - since, 1))

    def _migrate(self, conn: psycopg.Connection) -> None:
        # Hosts starting together: one migrates, the others wait and find it done.
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('mirwatch schema'))")
        conn.execute("CREATE SCHEMA IF NOT EXISTS mirwatch")
        conn.execute("CREATE TABLE IF NOT EXISTS mirwatch.meta (key text PRIMARY KEY, value text NOT NULL)")
        row = conn.execute("SELECT value FROM mirwatch.meta WHERE key = 'schema_version'").fetchone()
        version = int(row["value"]) if row else 0
        if version > SCHEMA_VERSION:
            raise QueueSchemaError(f"queue schema version {version} at {redact(self.dsn)} is newer than this "
                                   f"mirwatch understands ({SCHEMA_VERSION}); upgrade mirwatch on this host")
        for target in range(version + 1, SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[target]:
                conn.execute(statement)
        conn.execute("INSERT INTO mirwatch.meta (key, value) VALUES ('schema_version', %s)"
                     " ON CONFLICT (key) DO UPDATE SET value = excluded.value", (str(SCHEMA_VERSION),))

    # -- writers ----------------------------------------------------------------

    def enqueue(self, path: Path, size: int | None, mtime_ns: int | None, *, reason: str,
                rerun: bool = False, force: bool = False) -> str:
        """Queue a track. Returns what happened: queued, requeued, pending, unchanged."""
        root, rel = self.roots.split(path)
        args = {"root": root, "rel": rel, "size": size, "mtime_ns": mtime_ns, "reason": reason, "force": force}

        def tx(conn: psycopg.Connection) -> str:
            inserted = conn.execute(
                "INSERT INTO mirwatch.jobs (root, rel, state, force, reason, size, mtime_ns, created_at, updated_at)"
                f" VALUES (%(root)s, %(rel)s, 'queued', %(force)s, %(reason)s, %(size)s, %(mtime_ns)s, {NOW}, {NOW})"
                " ON CONFLICT (root, rel) DO NOTHING RETURNING id", args).fetchone()
            if inserted:
                return "queued"
            row = conn.execute("SELECT * FROM mirwatch.jobs WHERE root = %(root)s AND rel = %(rel)s FOR UPDATE",
                               args).fetchone()
            changed = (row["size"], row["mtime_ns"]) != (size, mtime_ns)
            action = enqueue_action(row["state"], changed=changed, rerun=rerun, force=force)
            args["id"] = row["id"]
            if action == "absorb":
                conn.execute(f"UPDATE mirwatch.jobs SET size = %(size)s, mtime_ns = %(mtime_ns)s,"
                             f" force = force OR %(force)s, updated_at = {NOW} WHERE id = %(id)s", args)
                return "unchanged"
            if action == "pending":
                conn.execute(f"UPDATE mirwatch.jobs SET dirty = true, size = %(size)s, mtime_ns = %(mtime_ns)s,"
                             f" force = force OR %(force)s, reason = %(reason)s, updated_at = {NOW}"
                             " WHERE id = %(id)s", args)
                return "pending"
            if action == "requeue":
                conn.execute("UPDATE mirwatch.jobs SET state = 'queued', attempts = 0, last_error = NULL,"
                             " dirty = false, force = %(force)s, generation = generation + 1, reason = %(reason)s,"
                             " size = %(size)s, mtime_ns = %(mtime_ns)s, worker = NULL, lease_until = NULL,"
                             f" started_at = NULL, finished_at = NULL, updated_at = {NOW} WHERE id = %(id)s", args)
                return "requeued"
            return "unchanged"

        return self._run(tx)

    def claim(self) -> Job | None:
        """Take the oldest queued job under this host's roots; first put expired leases back."""
        def tx(conn: psycopg.Connection) -> tuple[list[dict], dict | None]:
            reaped = self._reap(conn)
            row = conn.execute(
                "UPDATE mirwatch.jobs SET state = 'running', attempts = attempts + 1, claims = claims + 1,"
                " worker = %(worker)s,"
                f" started_at = {NOW}, updated_at = {NOW}, lease_until = {NOW} + %(lease)s"
                " WHERE id = (SELECT id FROM mirwatch.jobs WHERE state = 'queued' AND root = ANY(%(roots)s)"
                "             ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)"
                " RETURNING *",
                {"worker": self.worker, "lease": self.lease_seconds, "roots": self.roots.names}).fetchone()
            return reaped, row

        reaped, row = self._run(tx)
        for r in reaped:
            if self.log:
                self.log.warning("lease_expired", job_id=r["id"], track=display(r["root"], r["rel"]),
                                 previous_worker=r["worker"], state=r["state"], attempts=r["attempts"])
        return self._job(row) if row else None

    def _reap(self, conn: psycopg.Connection) -> list[dict]:
        # SKIP LOCKED: two hosts reaping at once split the rows instead of deadlocking.
        return conn.execute(
            "UPDATE mirwatch.jobs SET"
            " state = CASE WHEN NOT dirty AND attempts >= %(max)s THEN 'failed' ELSE 'queued' END,"
            " last_error = CASE WHEN NOT dirty AND attempts >= %(max)s"
            "   THEN 'lease expired ' || attempts || ' times (the host running it died, froze or lost the queue)'"
            "   ELSE last_error END,"
            f" finished_at = CASE WHEN NOT dirty AND attempts >= %(max)s THEN {NOW} ELSE finished_at END,"
            " attempts = CASE WHEN dirty THEN 0 ELSE attempts END,"
            " generation = generation + dirty::integer, dirty = false,"
            f" lease_until = NULL, updated_at = {NOW}"
            " WHERE id IN (SELECT id FROM mirwatch.jobs WHERE state = 'running'"
            f"             AND lease_until < {NOW} FOR UPDATE SKIP LOCKED)"
            " RETURNING id, root, rel, state, worker, attempts",
            {"max": self.max_attempts}).fetchall()

    def complete(self, job: Job) -> bool:
        """Mark done (or queued again if the file changed meanwhile). False: the claim was lost."""
        def tx(conn: psycopg.Connection) -> bool:
            done = conn.execute(
                "UPDATE mirwatch.jobs SET state = CASE WHEN dirty THEN 'queued' ELSE 'done' END,"
                " attempts = CASE WHEN dirty THEN 0 ELSE attempts END,"
                " generation = generation + dirty::integer, dirty = false, last_error = NULL,"
                f" lease_until = NULL, finished_at = {NOW}, updated_at = {NOW}"
                f" WHERE {_OWNED} AND generation = %(generation)s RETURNING id", self._owner(job)).fetchone()
            if done:
                self._count(conn, "done")
            return done is not None

        return self._run(tx)

    def fail(self, job: Job, error: str, *, permanent: bool = False) -> str:
        """Record a failure; returns the job's new state (queued, failed), or "lost"."""
        args = {**self._owner(job), "error": squash_error(error)}

        def tx(conn: psycopg.Connection) -> str:
            row = conn.execute(f"SELECT attempts, dirty FROM mirwatch.jobs WHERE {_OWNED} FOR UPDATE",
                               args).fetchone()
            if row is None:
                return "lost"
            if row["dirty"]:
                conn.execute("UPDATE mirwatch.jobs SET state = 'queued', attempts = 0, dirty = false,"
                             " generation = generation + 1, last_error = %(error)s, lease_until = NULL,"
                             f" finished_at = {NOW}, updated_at = {NOW} WHERE id = %(id)s", args)
                return "queued"
            state = "failed" if permanent or row["attempts"] >= self.max_attempts else "queued"
            conn.execute(f"UPDATE mirwatch.jobs SET state = %(state)s, last_error = %(error)s, lease_until = NULL,"
                         f" finished_at = {NOW}, updated_at = {NOW} WHERE id = %(id)s", {**args, "state": state})
            if state == "failed":
                self._count(conn, "failed")
            return state

        return self._run(tx)

    def release(self, job: Job) -> None:
        """Give a job back untouched (this host is stopping): the attempt does not count."""
        self._run(lambda conn: conn.execute(
            "UPDATE mirwatch.jobs SET state = 'queued', attempts = GREATEST(attempts - 1, 0), worker = NULL,"
            f" lease_until = NULL, started_at = NULL, updated_at = {NOW} WHERE {_OWNED}", self._owner(job)))

    def recover(self) -> tuple[int, int]:
        """At start-up: jobs an earlier process of *this host* left running. Returns (requeued, failed).

        Other hosts' jobs are theirs until their leases expire.
        """
        args = {"prefix": self.host + ":", "worker": self.worker, "max": self.max_attempts}
        mine = "state = 'running' AND left(worker, length(%(prefix)s)) = %(prefix)s AND worker <> %(worker)s"

        def tx(conn: psycopg.Connection) -> tuple[int, int]:
            failed = conn.execute(
                f"UPDATE mirwatch.jobs SET state = 'failed', lease_until = NULL, finished_at = {NOW},"
                f" updated_at = {NOW}, last_error = 'interrupted ' || attempts || ' times"
                f" (the daemon died during this job)' WHERE {mine} AND attempts >= %(max)s", args).rowcount
            requeued = conn.execute(
                "UPDATE mirwatch.jobs SET state = 'queued', worker = NULL, lease_until = NULL, started_at = NULL,"
                f" updated_at = {NOW} WHERE {mine}", args).rowcount
            return requeued, failed

        return self._run(tx)

    def retry(self, path: Path | None = None, *, all_failed: bool = False) -> int:
        if all_failed:
            where, args = "state = 'failed'", {}
        elif path is not None:
            root, rel = self.roots.split(path)
            where, args = "state IN ('failed', 'done') AND root = %(root)s AND rel = %(rel)s", {"root": root, "rel": rel}
        else:
            return 0
        return self._run(lambda conn: conn.execute(
            "UPDATE mirwatch.jobs SET state = 'queued', attempts = 0, force = true, last_error = NULL,"
            f" generation = generation + 1, reason = 'retry', updated_at = {NOW} WHERE " + where, args).rowcount)

    # -- liveness ---------------------------------------------------------------

    def heartbeat(self, in_flight: list[Job]) -> list[Job]:
        """Renew the leases of the jobs in flight and report this host alive.

        Cheap to call every second: it talks to the server every quarter
        lease, or at once when the jobs in flight change. Returns the jobs
        whose claim was lost (taken over after their lease ran out). Never
        blocks on an outage: a missed beat is retried at the next call.
        """
        ids = tuple(sorted(j.id for j in in_flight))
        now = time.monotonic()
        if ids == self._last_beat_ids and now - self._last_beat < self.lease_seconds / 4:
            return []
        current = in_flight[0] if in_flight else None

        def tx(conn: psycopg.Connection) -> set[tuple[int, int]]:
            renewed = conn.execute(
                f"UPDATE mirwatch.jobs SET lease_until = {NOW} + %(lease)s"
                " WHERE id = ANY(%(ids)s) AND state = 'running' AND worker = %(worker)s RETURNING id, claims",
                {"lease": self.lease_seconds, "ids": list(ids), "worker": self.worker}).fetchall()
            conn.execute(
                "INSERT INTO mirwatch.workers (name, pid, started_at, last_heartbeat, current, current_job)"
                f" VALUES (%(host)s, %(pid)s, {NOW}, {NOW}, %(current)s, %(job)s) ON CONFLICT (name) DO UPDATE SET"
                " started_at = CASE WHEN workers.pid = excluded.pid AND NOT workers.stopped"
                "   THEN workers.started_at ELSE excluded.started_at END,"
                " pid = excluded.pid, last_heartbeat = excluded.last_heartbeat, current = excluded.current,"
                " current_job = excluded.current_job, stopped = false",
                {"host": self.host, "pid": _pid(), "job": current.id if current else None,
                 "current": self._display(current) if current else None})
            return {(r["id"], r["claims"]) for r in renewed}

        try:
            renewed = self._run(tx, retry=False)
        except QueueUnavailable:
            return []
        self._registered = True
        self._last_beat, self._last_beat_ids = now, ids
        return [j for j in in_flight if (j.id, j.claim) not in renewed]

    def still_owned(self, job: Job) -> bool:
        """Is the claim still ours? If so, extend its lease, so that the sidecar
        write that follows has a whole lease before anyone may take the job."""
        return self._run(lambda conn: conn.execute(
            f"UPDATE mirwatch.jobs SET lease_until = {NOW} + %(lease)s"
            f" WHERE {_OWNED} AND generation = %(generation)s RETURNING id",
            {**self._owner(job), "lease": self.lease_seconds}).fetchone() is not None)

    def _owner(self, job: Job) -> dict[str, Any]:
        return {"id": job.id, "worker": self.worker, "claim": job.claim, "generation": job.generation}

    def _count(self, conn: psycopg.Connection, column: str) -> None:
        conn.execute(f"INSERT INTO mirwatch.workers (name, pid, {column}) VALUES (%(host)s, %(pid)s, 1)"
                     f" ON CONFLICT (name) DO UPDATE SET {column} = workers.{column} + 1",
                     {"host": self.host, "pid": _pid()})

    # -- readers ----------------------------------------------------------------

    def counts(self, *, wait: bool = True) -> dict[str, int]:
        rows = self._run(lambda conn: conn.execute(
            "SELECT state, COUNT(*) AS n FROM mirwatch.jobs GROUP BY state").fetchall(), retry=wait)
        counts = dict.fromkeys(STATES, 0)
        counts.update({r["state"]: r["n"] for r in rows})
        return counts

    def recent_done(self, window: float, *, wait: bool = True) -> tuple[int, float]:
        row = self._run(lambda conn: conn.execute(
            f"SELECT COUNT(*) AS n, {NOW} - MIN(finished_at) AS span FROM mirwatch.jobs"
            f" WHERE state = 'done' AND finished_at >= {NOW} - %(window)s", {"window": window}).fetchone(),
            retry=wait)
        return row["n"], float(row["span"]) if row["n"] else 0.0

    def running(self) -> list[Job]:
        return self._jobs("SELECT * FROM mirwatch.jobs WHERE state = 'running' ORDER BY started_at")

    def recent_failures(self, limit: int = 10) -> list[Job]:
        return self._jobs("SELECT * FROM mirwatch.jobs WHERE state = 'failed' ORDER BY finished_at DESC"
                          " LIMIT %(limit)s", {"limit": limit})

    def get(self, path: Path) -> Job | None:
        root, rel = self.roots.split(path)
        found = self._jobs("SELECT * FROM mirwatch.jobs WHERE root = %(root)s AND rel = %(rel)s",
                           {"root": root, "rel": rel})
        return found[0] if found else None

    def all(self) -> list[Job]:
        return self._jobs("SELECT * FROM mirwatch.jobs ORDER BY id")

    def hosts(self) -> list[dict[str, Any]]:
        """Every worker host sharing this queue: name, current track, last heartbeat, counts."""
        rows = self._run(lambda conn: conn.execute(
            f"SELECT *, {NOW} - last_heartbeat AS heartbeat_age FROM mirwatch.workers ORDER BY name").fetchall())
        return [{
            "name": r["name"], "pid": r["pid"], "current": r["current"], "current_job": r["current_job"],
            "started_at": r["started_at"], "last_heartbeat": r["last_heartbeat"],
            "heartbeat_age": round(float(r["heartbeat_age"]), 1) if r["heartbeat_age"] is not None else None,
            "done": r["done"], "failed": r["failed"], "stopped": r["stopped"],
        } for r in rows]

    def _jobs(self, sql: str, args: dict[str, Any] | None = None) -> list[Job]:
        rows = self._run(lambda conn: conn.execute(sql, args or {}).fetchall())
        return [self._job(r) for r in rows]

    def _display(self, job: Job) -> str:
        try:
            return display(*self.roots.split(job.path))
        except ValueError:
            return str(job.path)

    def _job(self, row: dict[str, Any]) -> Job:
        return Job(
            id=row["id"], path=self.roots.join(row["root"], bytes(row["rel"])), state=row["state"],
            attempts=row["attempts"], force=row["force"], generation=row["generation"], reason=row["reason"],
            last_error=row["last_error"], size=row["size"], mtime_ns=row["mtime_ns"], worker=row["worker"],
            created_at=row["created_at"], updated_at=row["updated_at"], started_at=row["started_at"],
            finished_at=row["finished_at"], claim=row["claims"],
        )

    def close(self) -> None:
        if self._registered:
            try:
                self._run(lambda conn: conn.execute(
                    "UPDATE mirwatch.workers SET stopped = true, current = NULL, current_job = NULL"
                    " WHERE name = %(host)s AND pid = %(pid)s", {"host": self.host, "pid": _pid()}), retry=False)
            except QueueUnavailable:
                pass
        with self._conns_lock:
            conns, self._conns = list(self._conns.values()), {}
        for _, conn in conns:
            conn.close()


def _pid() -> int:
    return os.getpid()

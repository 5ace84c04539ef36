"""The job queue: states, attempts, dedup, crash recovery, claims that can be lost.

Every behaviour the daemon relies on runs against both backends: the SQLite
file and a real PostgreSQL server (a throwaway cluster, see pgcluster.py).
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import pgcluster
from mirwatch.queue import QueueSchemaError, SQLiteQueue

BACKENDS = ["sqlite", "postgres"]
LIB = Path("/lib")
P = Path("/lib/a/full_mix.flac")


class Backend:
    """Opens queues of one kind on one store (a SQLite file or a fresh database)."""

    def __init__(self, kind: str, tmp_path: Path) -> None:
        self.kind = kind
        self.opened: list = []
        if kind == "sqlite":
            self.file = tmp_path / "q.sqlite3"
        else:
            self.cluster = pgcluster.shared()
            self.db = self.cluster.new_database()

    def open(self, *, max_attempts: int = 3, host: str | None = None, roots: dict | None = None,
             lease: float = 60.0):
        if self.kind == "sqlite":
            q = SQLiteQueue(self.file, max_attempts=max_attempts, host=host)
        else:
            from mirwatch.queue.postgres import PostgresQueue

            q = PostgresQueue(self.cluster.dsn(self.db), roots=roots or {"lib": LIB}, max_attempts=max_attempts,
                              host=host, password=self.cluster.password, lease_seconds=lease,
                              reconnect_timeout=60)
        self.opened.append(q)
        return q

    def run_in_child(self, body: str) -> None:
        """Run queue calls in a separate process that then dies without cleaning up."""
        if self.kind == "sqlite":
            opener = f"SQLiteQueue({str(self.file)!r}, max_attempts=2)"
        else:
            opener = (f"PostgresQueue({self.cluster.dsn(self.db)!r}, roots={{'lib': Path('/lib')}}, max_attempts=2,"
                      f" password={self.cluster.password!r})")
        script = textwrap.dedent(f"""
            import os
            from pathlib import Path
            from mirwatch.queue import SQLiteQueue
            from mirwatch.queue.postgres import PostgresQueue
            q = {opener}
        """) + textwrap.dedent(body) + "\nos._exit(0)\n"
        subprocess.run([sys.executable, "-c", script], check=True, timeout=120)


@pytest.fixture(params=BACKENDS)
def backend(request, tmp_path):
    b = Backend(request.param, tmp_path)
    yield b
    for q in b.opened:
        q.close()


@pytest.fixture
def q(backend):
    return backend.open(max_attempts=2)


def test_same_path_is_queued_once(q):
    assert q.enqueue(P, 10, 1, reason="new") == "queued"
    assert q.enqueue(P, 10, 1, reason="again") == "unchanged"
    assert q.counts()["queued"] == 1


def test_claim_complete_and_replaced_file_runs_again(q):
    q.enqueue(P, 10, 1, reason="new")
    job = q.claim()
    assert job.path == P and job.attempts == 1 and q.claim() is None
    assert q.complete(job) is True
    assert q.get(P).state == "done"
    assert q.enqueue(P, 10, 1, reason="event") == "unchanged"  # same file: nothing to do
    assert q.enqueue(P, 11, 2, reason="replaced") == "requeued"
    assert q.get(P).state == "queued" and q.get(P).attempts == 0


def test_recent_done_counts_done_jobs_only_and_times_the_first(q):
    paths = [P.parent.parent / f"T{i}" / "full_mix.flac" for i in range(5)]
    for path in paths:
        q.enqueue(path, 10, 1, reason="new")
    assert q.recent_done(3600) == (0, 0.0)
    first = q.claim()
    q.complete(first)
    time.sleep(1.5)
    for _ in range(2):
        q.complete(q.claim())
    q.fail(q.claim(), "bad", permanent=True)  # failures are not progress
    done, span = q.recent_done(3600)
    assert done == 3 and 1.5 <= span < 60
    assert q.recent_done(1.2)[0] == 2  # the first one finished before the window


def test_change_while_running_reruns_after(q):
    q.enqueue(P, 10, 1, reason="new")
    job = q.claim()
    assert q.enqueue(P, 12, 3, reason="replaced") == "pending"
    q.complete(job)
    assert q.get(P).state == "queued"
    assert q.claim().generation == job.generation + 1


def test_failures_retry_then_stay_failed_with_reason(q):
    q.enqueue(P, 10, 1, reason="new")
    assert q.fail(q.claim(), "boom") == "queued"
    assert q.fail(q.claim(), "boom again") == "failed"
    job = q.get(P)
    assert job.state == "failed" and job.last_error == "boom again"
    assert q.recent_failures()[0].path == P
    assert q.enqueue(P, 10, 1, reason="scan", rerun=True) == "unchanged"  # failed stays failed
    assert q.retry(all_failed=True) == 1
    assert q.get(P).state == "queued" and q.get(P).force


def test_permanent_failure_skips_retries(q):
    q.enqueue(P, 10, 1, reason="new")
    assert q.fail(q.claim(), "not a FLAC", permanent=True) == "failed"


def test_recover_requeues_interrupted_and_fails_crashers(backend):
    a, b = Path("/lib/a/full_mix.flac"), Path("/lib/b/full_mix.flac")
    backend.run_in_child("""
        q.enqueue(Path('/lib/a/full_mix.flac'), 1, 1, reason='new')
        q.enqueue(Path('/lib/b/full_mix.flac'), 1, 1, reason='new')
        q.claim()
        q.fail(q.claim(), 'x')  # b back to queued after attempt 1
        q.claim()               # b attempt 2, then the process dies
    """)
    q2 = backend.open(max_attempts=2)
    assert q2.recover() == (1, 1)
    assert q2.get(a).state == "queued"
    assert q2.get(b).state == "failed" and "interrupted" in q2.get(b).last_error


def test_release_does_not_use_an_attempt_and_ends_the_claim(q):
    q.enqueue(P, 10, 1, reason="new")
    job = q.claim()
    q.release(job)
    assert q.get(P).state == "queued" and q.get(P).attempts == 0
    # A job given back can no longer be completed or written by its old claim.
    assert not q.still_owned(job) and q.complete(job) is False and q.fail(job, "late") == "lost"
    again = q.claim()
    assert q.still_owned(again) and not q.still_owned(job)


def test_non_utf8_paths_round_trip(q):
    odd = Path(b"/lib/caf\xe9\n'\"/full_mix.flac".decode("utf-8", "surrogateescape"))
    q.enqueue(odd, 1, 1, reason="new")
    assert q.claim().path == odd
    assert q.get(odd).state == "running"


def test_two_connections_never_claim_the_same_job(backend):
    q1, q2 = backend.open(host="one"), backend.open(host="two")
    for i in range(20):
        q1.enqueue(Path(f"/lib/{i}/full_mix.flac"), 1, 1, reason="new")
    claimed = []
    while True:
        got = [j for j in (q1.claim(), q2.claim()) if j]
        if not got:
            break
        claimed += [j.id for j in got]
    assert sorted(claimed) == sorted(set(claimed)) and len(claimed) == 20


def test_hosts_report_heartbeat_current_track_and_counts(backend):
    q = backend.open(host="alpha", max_attempts=1)
    for name in ("x", "y"):
        q.enqueue(Path(f"/lib/{name}/full_mix.flac"), 1, 1, reason="new")
    job = q.claim()
    assert q.heartbeat([job]) == []
    (row,) = q.hosts()
    assert row["name"] == "alpha" and row["current_job"] == job.id and "x" in row["current"]
    assert row["heartbeat_age"] is not None and row["heartbeat_age"] < 30 and not row["stopped"]
    q.complete(job)
    q.fail(q.claim(), "bad", permanent=True)
    q.heartbeat([])
    (row,) = q.hosts()
    assert (row["done"], row["failed"], row["current"]) == (1, 1, None)
    q.close()
    backend.opened.remove(q)
    reader = backend.open(host="reader")  # `mirwatch status` does not register as a worker
    assert [(h["name"], h["stopped"]) for h in reader.hosts()] == [("alpha", True)]


def test_a_newer_schema_is_refused(backend):
    backend.open().close()
    backend.opened.clear()
    if backend.kind == "sqlite":
        with sqlite3.connect(backend.file) as db:
            db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    else:
        import psycopg

        with psycopg.connect(backend.cluster.dsn(backend.db), password=backend.cluster.password) as conn:
            conn.execute("UPDATE mirwatch.meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(QueueSchemaError, match="newer"):
        backend.open()


def test_sqlite_schema_1_file_migrates_in_place(tmp_path):
    path = tmp_path / "q.sqlite3"
    with sqlite3.connect(path) as db:  # what the first release wrote
        db.executescript("""
            CREATE TABLE jobs (id INTEGER PRIMARY KEY, path BLOB NOT NULL UNIQUE, state TEXT NOT NULL,
                attempts INTEGER NOT NULL DEFAULT 0, force INTEGER NOT NULL DEFAULT 0,
                dirty INTEGER NOT NULL DEFAULT 0, generation INTEGER NOT NULL DEFAULT 1, reason TEXT,
                last_error TEXT, size INTEGER, mtime_ns INTEGER, worker TEXT, created_at REAL NOT NULL,
                updated_at REAL NOT NULL, started_at REAL, finished_at REAL);
            CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            INSERT INTO meta VALUES ('schema_version', '1');
            INSERT INTO jobs (path, state, created_at, updated_at) VALUES (X'2f6c69622f612f66756c6c5f6d69782e666c6163', 'queued', 1, 1);
        """)
    q = SQLiteQueue(path, host="h")
    try:
        assert q.claim().path == P
        q.heartbeat([])
        assert [h["name"] for h in q.hosts()] == ["h"]
    finally:
        q.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("2",)


# -- what only a shared queue has -------------------------------------------------


@pytest.fixture
def pg():
    return Backend("postgres", Path("."))


def test_expired_lease_moves_the_job_and_the_late_finisher_loses(pg):
    a, b = pg.open(host="a", lease=1.0), pg.open(host="b", lease=1.0)
    a.enqueue(P, 1, 1, reason="new")
    stale = a.claim()
    assert b.claim() is None  # a's lease is still good
    time.sleep(1.6)  # a froze: no heartbeat
    fresh = b.claim()
    assert fresh is not None and fresh.id == stale.id and fresh.attempts == 2
    assert not a.still_owned(stale)
    assert a.complete(stale) is False and a.fail(stale, "late") == "lost"
    assert a.heartbeat([stale]) == [stale]  # a learns it lost the job
    assert b.still_owned(fresh) and b.complete(fresh) is True
    assert a.get(P).state == "done"


def test_heartbeat_keeps_a_long_job_and_lease_expiry_counts_as_an_attempt(pg):
    a, b = pg.open(host="a", lease=1.0, max_attempts=1), pg.open(host="b", lease=1.0, max_attempts=1)
    a.enqueue(P, 1, 1, reason="new")
    job = a.claim()
    for _ in range(6):  # 2.4 s: more than two leases, renewed every 0.4 s
        time.sleep(0.4)
        assert a.heartbeat([job]) == []
    assert b.claim() is None and a.still_owned(job)
    time.sleep(1.6)  # beats stop: the job was its only attempt, so it fails with a reason
    assert b.claim() is None
    assert "lease expired" in b.get(P).last_error and b.get(P).state == "failed"


def test_hosts_mounting_the_library_elsewhere_share_jobs_and_claim_only_their_roots(pg):
    nas = pg.open(host="nas", roots={"main": Path("/srv/music")})
    gpu = pg.open(host="gpu", roots={"main": Path("/mnt/nas/music"), "extra": Path("/data/x")})
    assert nas.enqueue(Path("/srv/music/Art/T1/full_mix.flac"), 5, 5, reason="new") == "queued"
    assert gpu.enqueue(Path("/mnt/nas/music/Art/T1/full_mix.flac"), 5, 5, reason="new") == "unchanged"
    gpu.enqueue(Path("/data/x/T2/full_mix.flac"), 1, 1, reason="new")
    assert nas.counts()["queued"] == 2
    first = gpu.claim()
    assert first.path == Path("/mnt/nas/music/Art/T1/full_mix.flac")
    assert nas.claim() is None  # "extra" is not mounted on nas
    assert nas.running()[0].path == Path("/srv/music/Art/T1/full_mix.flac")
    with pytest.raises(ValueError, match="not under any library root"):
        nas.enqueue(Path("/elsewhere/full_mix.flac"), 1, 1, reason="new")


def test_many_watchers_queue_one_file_once(pg):
    queues = [pg.open(host=f"w{i}") for i in range(6)]
    outcomes: list[str] = []
    start = threading.Barrier(len(queues))

    def watch(q):
        start.wait()
        for i in range(15):
            outcomes.append(q.enqueue(Path(f"/lib/{i}/full_mix.flac"), 7, 7, reason="new"))

    threads = [threading.Thread(target=watch, args=(q,)) for q in queues]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert outcomes.count("queued") == 15 and outcomes.count("unchanged") == 75
    assert queues[0].counts()["queued"] == 15


def test_recover_takes_back_only_this_hosts_jobs(pg):
    other = pg.open(host="other")
    other.enqueue(P, 1, 1, reason="new")
    other.claim()
    pg.run_in_child("""
        q.host = 'me'; q.worker = 'me:1'
        q.enqueue(Path('/lib/b/full_mix.flac'), 1, 1, reason='new')
        q.claim()
    """)
    me = pg.open(host="me")
    assert me.recover() == (1, 0)
    assert me.get(P).state == "running"  # other's lease is still good


def test_a_dropped_connection_is_reconnected(pg):
    import psycopg

    q = pg.open()
    q.enqueue(P, 1, 1, reason="new")
    with psycopg.connect(pg.cluster.dsn("postgres"), password=pg.cluster.password, autocommit=True) as admin:
        killed = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                               (pg.db,)).fetchall()
    assert killed
    assert q.claim().path == P


def test_wrong_password_is_reported_without_it(pg):
    from mirwatch.queue import QueueUnavailable
    from mirwatch.queue.postgres import PostgresQueue

    with pytest.raises(QueueUnavailable) as err:
        PostgresQueue(pg.cluster.dsn(pg.db), roots={"lib": LIB}, password="hunter2-wrong", reconnect_timeout=0)
    assert "hunter2" not in str(err.value) and "password authentication failed" in str(err.value)

"""The SQLite job queue: states, attempts, dedup, crash recovery."""

from pathlib import Path

import pytest

from mirwatch.queue import SQLiteQueue


@pytest.fixture
def q(tmp_path):
    queue = SQLiteQueue(tmp_path / "q.sqlite3", max_attempts=2)
    yield queue
    queue.close()


P = Path("/lib/a/full_mix.flac")


def test_same_path_is_queued_once(q):
    assert q.enqueue(P, 10, 1, reason="new") == "queued"
    assert q.enqueue(P, 10, 1, reason="again") == "unchanged"
    assert q.counts()["queued"] == 1


def test_claim_complete_and_replaced_file_runs_again(q):
    q.enqueue(P, 10, 1, reason="new")
    job = q.claim()
    assert job.path == P and job.attempts == 1 and q.claim() is None
    q.complete(job)
    assert q.get(P).state == "done"
    assert q.enqueue(P, 10, 1, reason="event") == "unchanged"  # same file: nothing to do
    assert q.enqueue(P, 11, 2, reason="replaced") == "requeued"
    assert q.get(P).state == "queued" and q.get(P).attempts == 0


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


def test_recover_requeues_interrupted_and_fails_crashers(tmp_path):
    path = tmp_path / "q.sqlite3"
    a, b = Path("/lib/a/full_mix.flac"), Path("/lib/b/full_mix.flac")
    q1 = SQLiteQueue(path, max_attempts=2)
    q1.enqueue(a, 1, 1, reason="new")
    q1.enqueue(b, 1, 1, reason="new")
    q1.claim()
    q1.fail(q1.claim(), "x")  # b back to queued after attempt 1
    q1.claim()  # b attempt 2, then the "process dies"
    q1.close()
    q2 = SQLiteQueue(path, max_attempts=2)
    assert q2.recover() == (1, 1)
    assert q2.get(a).state == "queued"
    assert q2.get(b).state == "failed" and "interrupted" in q2.get(b).last_error
    q2.close()


def test_release_does_not_use_an_attempt(q):
    q.enqueue(P, 10, 1, reason="new")
    q.release(q.claim())
    job = q.get(P)
    assert job.state == "queued" and job.attempts == 0


def test_non_utf8_paths_round_trip(q):
    odd = Path(b"/lib/caf\xe9\n'\"/full_mix.flac".decode("utf-8", "surrogateescape"))
    q.enqueue(odd, 1, 1, reason="new")
    assert q.claim().path == odd


def test_two_connections_never_claim_the_same_job(tmp_path):
    path = tmp_path / "q.sqlite3"
    q1, q2 = SQLiteQueue(path), SQLiteQueue(path)
    for i in range(20):
        q1.enqueue(Path(f"/lib/{i}/full_mix.flac"), 1, 1, reason="new")
    claimed = []
    while True:
        got = [j for j in (q1.claim(), q2.claim()) if j]
        if not got:
            break
        claimed += [j.id for j in got]
    assert sorted(claimed) == sorted(set(claimed)) and len(claimed) == 20

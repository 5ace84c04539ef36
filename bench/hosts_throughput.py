"""Throughput of 1, 2 and 3 daemons ("hosts") sharing one PostgreSQL queue.

Not part of CI. Needs the PostgreSQL server binaries and psycopg (see
tests/pgcluster.py), and builds or reuses the tiny model set. Each round
starts N real `mirwatch run` processes on a fresh database, waits until all
are ready, drops the tracks into the library and times until every sidecar
is written. A second table times the queue alone (enqueue + claim +
complete per job) on SQLite and PostgreSQL: the per-job overhead a shared
queue adds.

    .venv/bin/python bench/hosts_throughput.py [--tracks 30] [--seconds 3] [--hosts 1,2,3]

On a machine with few cores the hosts compete for the same CPUs: the point
is that adding hosts costs little, not that it speeds anything up there.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import pgcluster  # noqa: E402
from test_postgres_hosts import Host, add_tracks, start_all, wait_all_done  # noqa: E402


def tiny_models(cache: Path) -> Path:
    from conftest import _tiny_sources_hash

    target = cache / f"models-{_tiny_sources_hash()}"
    if not (target / "checksums.json").exists():
        subprocess.run([sys.executable, "-m", "mirwatch.cli", "models", "make-test", str(target)], check=True)
    return target


def run_hosts(cluster: pgcluster.PgCluster, models: Path, n: int, tracks: int, seconds: float) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"mirwatch-bench-{n}-"))
    library = work / "library"
    library.mkdir()
    db = cluster.new_database("bench")
    hosts = []
    for i in range(n):
        alias = work / f"via-{i}"
        alias.symlink_to(work, target_is_directory=True)
        hosts.append(Host(work / f"host{i}", models, name=f"host{i}", mount=alias / "library",
                          dsn=cluster.dsn(db), cluster=cluster, lease=60))
    try:
        start_all(hosts)
        names = [f"T{i:03d}" for i in range(tracks)]
        started = time.monotonic()
        add_tracks(library, names, seconds=seconds)
        wait_all_done(hosts, names, timeout=3600)
        elapsed = time.monotonic() - started
        per_host = [len(h.tracks("sidecar_written")) for h in hosts]
    finally:
        for h in hosts:
            if h.proc and h.proc.poll() is None:
                h.stop()
    return {"hosts": n, "seconds": elapsed, "tracks_per_min": 60 * tracks / elapsed, "per_host": per_host}


def queue_overhead(cluster: pgcluster.PgCluster, jobs: int) -> dict[str, float]:
    from mirwatch.queue import SQLiteQueue
    from mirwatch.queue.postgres import PostgresQueue

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        queues = {
            "sqlite": SQLiteQueue(Path(tmp) / "q.sqlite3"),
            "postgres": PostgresQueue(cluster.dsn(cluster.new_database("qbench")), roots={"lib": Path("/lib")},
                                      password=cluster.password),
        }
        for name, q in queues.items():
            started = time.perf_counter()
            for i in range(jobs):
                q.enqueue(Path(f"/lib/{i}/full_mix.flac"), 1, 1, reason="bench")
            for _ in range(jobs):
                job = q.claim()
                q.still_owned(job)
                q.complete(job)
            out[name] = 1000 * (time.perf_counter() - started) / jobs
            q.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tracks", type=int, default=30)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--hosts", default="1,2,3")
    ap.add_argument("--queue-jobs", type=int, default=500)
    args = ap.parse_args()
    cluster = pgcluster.shared()
    models = tiny_models(Path.home() / ".cache" / "mirwatch-tests")
    print(f"{args.tracks} tracks of {args.seconds:g} s, tiny models, Essentia + features (no Flamingo)")
    print("hosts  seconds  tracks/min  tracks per host")
    for n in (int(x) for x in args.hosts.split(",")):
        r = run_hosts(cluster, models, n, args.tracks, args.seconds)
        print(f"{r['hosts']:>5}  {r['seconds']:7.1f}  {r['tracks_per_min']:10.1f}  {r['per_host']}")
    print(f"\nqueue alone, {args.queue_jobs} jobs: enqueue + claim + still_owned + complete, ms per job")
    for name, ms in queue_overhead(cluster, args.queue_jobs).items():
        print(f"{name:>9}  {ms:6.2f}")


if __name__ == "__main__":
    main()

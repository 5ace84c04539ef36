"""Faults a real `mirwatch run` must survive: kill -9, full disks, a library changing under it,
a lost queue, broken models, too few inotify watches. Numbers go to docs/reliability.md."""

from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from faultkit import (ESSENTIA_ONLY, LimitedDaemon, can_unshare_userns, debris, fill, info_path, need_root,
                      per_track, small_flac, tmpfs, valid_info, write_track)

# CI kills across 60 jobs; bench/reliability.py kill9 runs the full 200.
KILL_JOBS = int(os.environ.get("MIRWATCH_KILL_JOBS", "60"))


def _stage_at_kill(d) -> str:
    """Where the daemon was when killed, from the last job event it logged."""
    events = [e["event"] for e in d.events() if e.get("event") in
              ("job_started", "analyzer_done", "sidecar_written", "job_done", "job_failed", "ready", "scan_done")]
    last = events[-1] if events else "starting"
    return {"job_started": "decode/analysis", "analyzer_done": "sidecar write + queue commit",
            "sidecar_written": "after commit", "job_done": "between jobs"}.get(last, last)


def test_kill9_at_random_points_loses_and_duplicates_nothing(daemon_factory, tmp_path):
    d = daemon_factory(ESSENTIA_ONLY)
    for i in range(KILL_JOBS):
        write_track(d.lib / f"K{i:03d}", seed=i)
    rng = random.Random(int(os.environ.get("MIRWATCH_KILL_SEED", "6")))
    stages: Counter = Counter()
    runs = 0
    started = time.monotonic()
    while True:
        runs += 1
        d.start()
        d.wait_event("ready", count=runs, timeout=180)
        if runs > 40 or d.status()["counts"]["done"] == KILL_JOBS:
            break
        # Kill after a random number of jobs, then a random moment into the next:
        # paced by progress, not the clock, so kills land on a fast machine too.
        finished = len(d.events("job_done")) + rng.randint(1, 4)
        # (Read from the log: a `mirwatch status` per poll would let several jobs slip by.)
        d.wait_for(lambda: len(d.events("job_done")) >= finished
                   or len({e["path"] for e in d.events("job_done")}) >= KILL_JOBS,
                   timeout=180, what="jobs before the kill")
        time.sleep(rng.uniform(0.0, 0.4))
        stages[_stage_at_kill(d)] += 1
        d.kill9()
        # After every kill: whatever sidecar exists is complete; nothing half-written.
        for folder in d.lib.iterdir():
            if info_path(folder).exists():
                valid_info(folder)
    d.wait_for(lambda: d.status()["counts"]["done"] == KILL_JOBS, timeout=600, what="all jobs done")
    elapsed = time.monotonic() - started
    assert d.stop() == 0

    written = per_track(d, "sidecar_written")
    missing = [f.name for f in d.lib.iterdir() if not info_path(f).exists()]
    twice = {p: n for p, n in written.items() if n > 1}
    for folder in d.lib.iterdir():
        valid_info(folder)
        assert sorted(p.name for p in folder.iterdir()) == sorted(["full_mix.flac", info_path(folder).name])
    counts = d.status()["counts"]
    report = {"jobs": KILL_JOBS, "kills": runs - 1, "stages": dict(stages), "lost": len(missing),
              "analysed_twice": len(twice), "recovered_up_to_date": sum(per_track(d, "job_done",
                                                                                 outcome="up_to_date").values()),
              "seconds": round(elapsed, 1)}
    print("KILL9", json.dumps(report))
    assert not missing and not twice and counts == {"queued": 0, "running": 0, "done": KILL_JOBS, "failed": 0}
    assert runs - 1 >= 5, "too few kills landed to mean anything"
    assert not debris(d.lib)


def test_disk_full_under_the_library_keeps_the_old_info_and_resumes(daemon_factory, tmp_path):
    with tmpfs(tmp_path / "lib", "1m") as lib:
        d = daemon_factory(ESSENTIA_ONLY)
        assert d.lib == lib
        write_track(lib / "Full", seed=1)
        d.start()
        d.wait_event("sidecar_written", timeout=180)
        before = info_path(lib / "Full").read_bytes()
        filler = fill(lib)
        retry = [sys.executable, "-m", "mirwatch.cli", "retry", "--config", str(d.config), str(lib / "Full")]
        subprocess.run(retry, check=True, timeout=60, capture_output=True)
        waiting = d.wait_event("job_waiting", timeout=120)[0]
        assert "No space left on device" in waiting["error"]
        assert info_path(lib / "Full").read_bytes() == before  # the old sidecar, byte for byte
        assert not debris(lib)
        assert d.proc.poll() is None and d.status()["counts"]["failed"] == 0

        filler.unlink()
        d.wait_event("worker_resumed", timeout=180)
        d.wait_event("sidecar_written", count=2, timeout=60)
        after = valid_info(lib / "Full")
        assert after["mirwatch"]["analyzed_at"] >= json.loads(before)["mirwatch"]["analyzed_at"]
        assert d.status()["counts"] == {"queued": 0, "running": 0, "done": 1, "failed": 0}
        assert not debris(lib)
        assert d.stop() == 0


def test_disk_full_under_the_queue_waits_and_loses_no_track(daemon_factory, tmp_path):
    with tmpfs(tmp_path / "state", "2m") as state:
        d = daemon_factory(ESSENTIA_ONLY)
        d.start()
        d.wait_event("ready", timeout=180)
        filler = fill(state)
        for i in range(30):  # more commits than the WAL has room for
            write_track(d.lib / f"Q{i:02d}", seed=i)
        d.wait_for(lambda: d.events("enqueue_failed") or d.events("worker_waiting") or d.events("job_waiting"),
                   timeout=120, what="a disk-full complaint")
        assert d.proc.poll() is None
        filler.unlink()
        d.wait_for(lambda: d.status()["counts"]["done"] == 30, timeout=300, what="all 30 done after space returned")
        for i in range(30):
            valid_info(d.lib / f"Q{i:02d}")
        complaints = d.events("enqueue_failed") + d.events("worker_waiting") + d.events("job_waiting")
        assert all("full" in e["error"] for e in complaints), complaints[:3]
        print("QUEUE_DISK_FULL", dict(Counter(e["event"] for e in complaints)), complaints[0]["error"])
        assert d.stop() == 0


def _replace(mix: Path, seconds: float, seed: int) -> None:
    """The way a tagger or rsync replaces a file: write beside it, rename over it."""
    tmp = mix.with_name(".full_mix.flac.new")
    tmp.write_bytes(small_flac(seconds, seed=seed))
    os.replace(tmp, mix)


def test_library_changing_under_the_daemon(daemon_factory, tmp_path):
    need_root("a read-only bind mount")
    d = daemon_factory(ESSENTIA_ONLY)
    cli = [sys.executable, "-m", "mirwatch.cli"]
    conf = ["--config", str(d.config)]
    # While stopped: two tracks queued, then one deleted and one replaced before any analysis.
    write_track(d.lib / "DeletedQ", seed=1)
    write_track(d.lib / "ReplacedQ", seed=2)
    write_track(d.lib / "ReadOnly", seed=3)
    subprocess.run(cli + ["scan"] + conf, check=True, timeout=60, capture_output=True)
    (d.lib / "DeletedQ" / "full_mix.flac").unlink()
    _replace(d.lib / "ReplacedQ" / "full_mix.flac", 4, seed=22)
    ro = d.lib / "ReadOnly"
    subprocess.run(["mount", "--bind", str(ro), str(ro)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
        d.start()
        d.wait_for(lambda: d.status()["counts"]["failed"] == 2, timeout=180, what="DeletedQ and ReadOnly failed")
        failures = {Path(j["path"]).parent.name: j["last_error"] for j in d.status()["recent_failures"]}
        assert "vanished" in failures["DeletedQ"]
        assert "Read-only file system" in failures["ReadOnly"] and "mirwatch retry" in failures["ReadOnly"]
        assert not info_path(ro).exists() and not debris(d.lib)
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True)
    subprocess.run(cli + ["retry"] + conf + [str(ro / "full_mix.flac")], check=True, timeout=60,
                   capture_output=True)
    d.wait_event("sidecar_written", timeout=120, path=str(ro / "full_mix.flac"))
    valid_info(ro)
    valid_info(d.lib / "ReplacedQ")

    # Replaced while being analysed: the job finishes, then the new file is analysed again.
    long_mix = write_track(d.lib / "Replaced", 900, seed=4)
    d.wait_event("job_started", timeout=120, path=str(long_mix))
    _replace(long_mix, 3, seed=44)
    d.wait_for(lambda: per_track(d, "sidecar_written")[str(long_mix)] == 2, timeout=180,
               what="Replaced analysed again")
    valid_info(d.lib / "Replaced")

    # Renamed while being analysed: nothing is written under the old name, the new one is analysed.
    moving = write_track(d.lib / "Moving", 900, seed=5)
    d.wait_event("job_started", timeout=120, path=str(moving))
    os.rename(d.lib / "Moving", d.lib / "Moved")
    d.wait_event("sidecar_written", timeout=180, path=str(d.lib / "Moved" / "full_mix.flac"))
    valid_info(d.lib / "Moved")
    assert not (d.lib / "Moving").exists()

    # The root removed and restored (as an unmount would): noticed, watched again, new tracks found.
    away = tmp_path / "lib.away"
    os.rename(d.lib, away)
    d.wait_event("root_missing", timeout=60)
    write_track(away / "WhileAway", seed=6)
    os.rename(away, d.lib)
    d.wait_event("root_restored", timeout=60)
    d.wait_event("sidecar_written", timeout=120, path=str(d.lib / "WhileAway" / "full_mix.flac"))
    valid_info(d.lib / "WhileAway")
    assert d.wait_for(lambda: d.status()["counts"]["queued"] == 0 and d.status()["counts"]["running"] == 0,
                      timeout=120, what="queue drained")

    written = per_track(d, "sidecar_written")
    assert written[str(d.lib / "ReplacedQ" / "full_mix.flac")] == 1 and written[str(ro / "full_mix.flac")] == 1
    assert d.proc.poll() is None and not d.events("watcher_error")
    assert not debris(d.lib)
    assert d.stop() == 0


def test_queue_corrupted_or_deleted_is_rebuilt_from_a_scan(daemon_factory):
    d = daemon_factory(ESSENTIA_ONLY)
    for i in range(3):
        write_track(d.lib / f"Q{i}", seed=i)
    d.start()
    d.wait_event("sidecar_written", count=3, timeout=180)
    db = d.root / "state" / "queue.sqlite3"
    assert db.exists(), sorted(p.name for p in db.parent.iterdir())
    # Deleted while the daemon runs; it notices at its next start.
    for side in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        side.unlink(missing_ok=True)
    assert d.stop() == 0
    write_track(d.lib / "New1", seed=7)
    d.start()
    d.wait_event("queue_missing", timeout=120)
    d.wait_event("sidecar_written", count=4, timeout=180)
    assert per_track(d, "sidecar_written")[str(d.lib / "New1" / "full_mix.flac")] == 1
    assert d.stop() == 0

    # Corrupted: garbage over the header and the first pages.
    with open(db, "r+b") as f:
        f.write(os.urandom(8192))
    for side in (Path(f"{db}-wal"), Path(f"{db}-shm")):
        side.unlink(missing_ok=True)
    write_track(d.lib / "New2", seed=8)
    d.start()
    corrupt = d.wait_event("queue_corrupt", timeout=120)[0]
    assert "rebuilding" in corrupt["detail"]
    d.wait_event("sidecar_written", count=5, timeout=180)
    assert list(db.parent.glob("queue.sqlite3.corrupt-*"))
    scan = d.wait_event("scan_done", count=3, timeout=60)[-1]
    assert (scan["tracks"], scan["fresh"], scan["queued"]) == (5, 4, 1)
    written = per_track(d, "sidecar_written")
    assert all(n == 1 for n in written.values()) and len(written) == 5, written  # nothing analysed twice
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert d.stop() == 0


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_a_broken_model_file_stops_start_up_with_one_clear_error(daemon_factory, tiny_models, tmp_path, damage):
    models = tmp_path / "models"
    shutil.copytree(tiny_models, models)
    victim = models / "essentia" / "genre_discogs400-discogs-effnet-1.pb"
    if damage == "missing":
        victim.unlink()
    else:
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
    d = daemon_factory(ESSENTIA_ONLY)
    d.write_config(models, ESSENTIA_ONLY)
    d.start()
    code = d.proc.wait(180)
    assert code == 3
    errors = [e for e in d.events() if e.get("level") in ("error", "critical")]
    assert len(errors) == 1, errors
    assert str(victim) in errors[0]["error"] and "mirwatch models verify" in errors[0]["error"]
    assert not d.events("ready")


def test_too_few_inotify_watches_falls_back_to_polling_and_misses_nothing(daemon_factory, tmp_path,
                                                                           tiny_models):
    why = can_unshare_userns()
    if why:
        pytest.skip(why)
    root = tmp_path / "ns"
    d = LimitedDaemon(root, tiny_models, ESSENTIA_ONLY.replace("[flamingo]", "[library]\npoll_interval = 1.0\n"
                                                                             "[flamingo]", 1))
    # conftest's config already has [library]; put poll_interval there instead of a second table.
    d.config.write_text(d.config.read_text().replace("[library]\npoll_interval = 1.0\n", "")
                        .replace("settle_seconds = 0.5\n", "settle_seconds = 0.5\npoll_interval = 1.0\n", 1))
    for i in range(12):  # 13 folders with the root: more than the 8 watches allowed
        (d.lib / f"Artist{i}").mkdir()
    write_track(d.lib / "Artist0" / "Before", seed=1)
    try:
        d.start()
        limit = d.wait_event("inotify_limit", timeout=180)[0]
        assert "inotify watch limit" in limit["error"] and "polling" in limit["detail"]
        assert d.wait_event("watching", timeout=30)[0]["method"] == "polling"
        d.wait_event("sidecar_written", timeout=120)
        # Deep inside a folder inotify could never have watched.
        deep = write_track(d.lib / "Artist11" / "Album" / "Track", seed=2)
        d.wait_event("sidecar_written", timeout=120, path=str(deep))
        valid_info(deep.parent)
        assert per_track(d, "sidecar_written") == {str(d.lib / "Artist0" / "Before" / "full_mix.flac"): 1,
                                                  str(deep): 1}
        assert d.stop() == 0
    finally:
        if d.proc and d.proc.poll() is None:
            d.proc.kill()


def test_inotify_limit_reached_as_the_library_grows_switches_to_polling(tmp_path, tiny_models):
    why = can_unshare_userns()
    if why:
        pytest.skip(why)
    d = LimitedDaemon(tmp_path / "grow", tiny_models, ESSENTIA_ONLY)
    d.config.write_text(d.config.read_text().replace("settle_seconds = 0.5\n",
                                                     "settle_seconds = 0.5\npoll_interval = 1.0\n", 1))
    try:
        d.start()
        assert d.wait_event("watching", timeout=180)[0]["method"] == "inotify"
        d.wait_event("ready", timeout=60)
        # One folder tree deeper than the 8 watches: everything below the limit is invisible to inotify.
        deep = d.lib / "A" / "B" / "C" / "D" / "E" / "F" / "G" / "H" / "I" / "Track"
        write_track(deep, seed=3)
        d.wait_event("inotify_limit", timeout=60)
        d.wait_event("sidecar_written", timeout=120, path=str(deep / "full_mix.flac"))
        later = write_track(d.lib / "A" / "B" / "C" / "D" / "E" / "F" / "G" / "H" / "I" / "Later", seed=4)
        d.wait_event("sidecar_written", timeout=120, path=str(later))
        assert [e["method"] for e in d.events("watching")] == ["inotify", "polling"]
        assert d.stop() == 0
    finally:
        if d.proc and d.proc.poll() is None:
            d.proc.kill()

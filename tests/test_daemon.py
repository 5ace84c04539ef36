"""The whole daemon, as systemd would run it: real process, real files, tiny real models."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from conftest import NotifySocket, flac_bytes, write_flac

# Flamingo and aesthetics are covered by their own daemon tests; these keep start-up short.
CPU_ONLY = '[flamingo]\nenabled = "off"\n[features]\naesthetics = "off"\n'
ESSENTIA_KEYS = {"essentia_genre", "essentia_mood", "essentia_instrument", "danceability", "atonality"}


def info_of(folder: Path) -> dict:
    return json.loads((folder / f"{folder.name}.INFO").read_text())


def assert_complete_info(folder: Path) -> dict:
    doc = info_of(folder)
    assert ESSENTIA_KEYS <= set(doc), sorted(doc)
    for key in ("essentia_genre", "essentia_mood", "essentia_instrument"):
        probs = list(doc[key].values())
        assert probs == sorted(probs, reverse=True) and len(probs) <= 10
        assert all(0.1 <= p <= 1 for p in probs)
    assert 0 <= doc["danceability"] <= 1 and 0 <= doc["atonality"] <= 1
    prov = doc["mirwatch"]
    assert prov["version"] and prov["source"]["file"] == "full_mix.flac"
    essentia = prov["analyzers"]["essentia"]
    assert essentia["seconds"] >= 0 and essentia["models"]
    assert all(len(sha) == 64 for sha in essentia["models"].values())
    return doc


def no_temp_files(root: Path) -> bool:
    return not [p for p in root.rglob("*.tmp")]


def test_copy_move_and_slow_write_each_get_exactly_one_complete_info(daemon_factory, tmp_path):
    d = daemon_factory(CPU_ONLY).start()
    d.wait_event("ready", timeout=120)

    # 1. cp of a file into a new folder
    (d.lib / "Copied").mkdir()
    src = write_flac(tmp_path / "src" / "a.flac", seconds=5, seed=1)
    shutil.copy(src, d.lib / "Copied" / "full_mix.flac")
    # 2. mv of a whole track folder from outside the root (same filesystem)
    write_flac(tmp_path / "outside" / "Moved In" / "full_mix.flac", seconds=5, seed=2)
    os.rename(tmp_path / "outside" / "Moved In", d.lib / "Moved In")
    # 3. a slow writer, in chunks, pausing less than the settle period
    (d.lib / "Slow").mkdir()
    data = flac_bytes(6, seed=3)
    with open(d.lib / "Slow" / "full_mix.flac", "wb") as f:
        for i in range(0, len(data), len(data) // 5 + 1):
            f.write(data[i:i + len(data) // 5 + 1])
            f.flush()
            time.sleep(0.3)
    # 4. rsync-style: temp name, then rename into place; the folder has a foreign sidecar
    (d.lib / "Rsynced").mkdir()
    (d.lib / "Rsynced" / "Rsynced.INFO").write_text(json.dumps({"caption": "kept", "mirwatch_like": 1}))
    (d.lib / "Rsynced" / ".full_mix.flac.Xy12").write_bytes(flac_bytes(5, seed=4))
    os.rename(d.lib / "Rsynced" / ".full_mix.flac.Xy12", d.lib / "Rsynced" / "full_mix.flac")

    d.wait_event("job_done", count=4, timeout=120)
    time.sleep(2 * 0.5 + 0.5)  # any duplicate event would be queued by now
    for name in ("Copied", "Moved In", "Slow", "Rsynced"):
        assert_complete_info(d.lib / name)
    assert info_of(d.lib / "Rsynced")["caption"] == "kept"
    done = d.events("job_done")
    assert sorted(Path(e["path"]).parent.name for e in done) == ["Copied", "Moved In", "Rsynced", "Slow"]
    status = d.status()
    assert status["counts"] == {"queued": 0, "running": 0, "done": 4, "failed": 0}
    assert no_temp_files(d.lib)
    assert d.stop() == 0
    assert d.events("stopped")


def test_kill9_mid_job_loses_and_duplicates_nothing(daemon_factory):
    d = daemon_factory(CPU_ONLY)
    for i in range(6):
        write_flac(d.lib / f"T{i}" / "full_mix.flac", seconds=40, seed=i)
    d.start()
    d.wait_event("job_started", count=3, timeout=180)
    d.kill9()
    first_run_done = {e["path"] for e in d.events("job_done")}
    for folder in d.lib.iterdir():  # whatever exists is complete, never truncated
        if (folder / f"{folder.name}.INFO").exists():
            assert_complete_info(folder)

    d.start()
    d.wait_for(lambda: d.status()["counts"]["done"] == 6, timeout=240, what="all six done")
    for i in range(6):
        assert_complete_info(d.lib / f"T{i}")
    all_done = [e["path"] for e in d.events("job_done") if e.get("outcome") != "up_to_date"]
    assert sorted(set(all_done)) == sorted(all_done), "a track was analysed twice"
    assert set(all_done) >= set(first_run_done) and len(set(all_done)) == 6
    assert d.events("recovered_jobs")
    assert d.stop() == 0


def test_bad_files_fail_with_reason_and_the_daemon_goes_on(daemon_factory):
    d = daemon_factory(CPU_ONLY)
    d.start()
    d.wait_event("ready", timeout=120)
    good = flac_bytes(5, seed=5)
    (d.lib / "NotAudio").mkdir()
    (d.lib / "NotAudio" / "full_mix.flac").write_text("this is a text file\n" * 50)
    (d.lib / "Truncated").mkdir()
    (d.lib / "Truncated" / "full_mix.flac").write_bytes(good[: len(good) // 2])
    (d.lib / "Corrupt").mkdir()
    (d.lib / "Corrupt" / "full_mix.flac").write_bytes(good[:4] + os.urandom(len(good) - 4))
    (d.lib / "Empty").mkdir()
    (d.lib / "Empty" / "full_mix.flac").write_bytes(b"")
    write_flac(d.lib / "Good" / "full_mix.flac", seconds=5, seed=6)

    d.wait_for(lambda: d.status()["counts"]["failed"] == 4, timeout=120, what="four failures")
    d.wait_event("job_done", timeout=60)
    assert_complete_info(d.lib / "Good")
    failures = {Path(j["path"]).parent.name: j["last_error"] for j in d.status()["recent_failures"]}
    assert set(failures) == {"NotAudio", "Truncated", "Corrupt", "Empty"}
    assert "cannot decode" in failures["NotAudio"]
    assert "truncated" in failures["Truncated"] or "cannot decode" in failures["Truncated"]
    assert "empty file" in failures["Empty"]
    for name in failures:
        assert not (d.lib / name / f"{name}.INFO").exists()
    logged = {Path(e["path"]).parent.name for e in d.events("job_failed")}
    assert logged == set(failures)
    text = subprocess.run([sys.executable, "-m", "mirwatch.cli", "status", "--config", str(d.config)],
                          capture_output=True, text=True, check=True).stdout
    assert "failed 4" in text and "NotAudio" in text
    assert d.proc.poll() is None
    assert d.stop() == 0


def test_files_added_while_down_and_stale_sidecars_are_reconciled_at_start(daemon_factory):
    d = daemon_factory(CPU_ONLY)
    write_flac(d.lib / "Before" / "full_mix.flac", seconds=4, seed=7)
    d.start()
    d.wait_event("job_done", timeout=120)
    assert d.stop() == 0
    first = info_of(d.lib / "Before")
    dance_file = first["mirwatch"]["analyzers"]["essentia"]["files"]["danceability"]
    assert dance_file.startswith("danceability-discogs-effnet")

    write_flac(d.lib / "WhileDown" / "full_mix.flac", seconds=4, seed=8)
    # Switching the danceability model makes the old sidecar stale for Essentia only.
    d.config.write_text(d.config.read_text() + '[essentia]\ndanceability_atonality = "vggish"\n')
    d.start()
    d.wait_for(lambda: d.status()["counts"]["done"] == 2 and d.status()["counts"]["queued"] == 0,
               timeout=180, what="reconciled")
    d.wait_event("job_done", count=3, timeout=60)
    assert_complete_info(d.lib / "WhileDown")
    after = info_of(d.lib / "Before")
    assert after["mirwatch"]["analyzers"]["essentia"]["files"]["danceability"].startswith(
        "danceability-vggish-audioset")
    reran = [e for e in d.events("job_done") if Path(e["path"]).parent.name == "Before"]
    assert reran[-1]["analyzers"] == ["essentia"]  # features were still fresh
    scans = d.events("scan_done")
    assert scans[-1]["queued"] == 2
    assert d.stop() == 0


def test_sd_notify_ready_status_watchdog_and_stopping(daemon_factory, tmp_path):
    with NotifySocket(tmp_path / "notify.sock") as notify:
        d = daemon_factory(CPU_ONLY, env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"})
        write_flac(d.lib / "N" / "full_mix.flac", seconds=3)
        d.start()
        d.wait_for(lambda: "READY=1" in notify.messages, timeout=120, what="READY=1")
        d.wait_for(lambda: notify.messages.count("WATCHDOG=1") >= 2, timeout=30, what="WATCHDOG=1")
        d.wait_for(lambda: any(m.startswith("STATUS=") and "done 1" in m for m in notify.messages), timeout=60,
                   what="STATUS with progress")
        assert d.stop() == 0
        time.sleep(0.5)
    messages = notify.messages
    assert "STOPPING=1" in messages
    assert messages.index("READY=1") < messages.index("STOPPING=1")
    assert any(m.startswith("STATUS=loading models") for m in messages[: messages.index("READY=1")])


def test_sigterm_during_a_job_requeues_or_finishes_it(daemon_factory):
    d = daemon_factory(CPU_ONLY)
    for i in range(3):
        write_flac(d.lib / f"S{i}" / "full_mix.flac", seconds=60, seed=i)
    d.start()
    d.wait_event("job_started", timeout=120)
    assert d.stop() == 0
    counts = d.status()["counts"]
    assert counts["running"] == 0 and counts["failed"] == 0
    assert counts["queued"] + counts["done"] == 3
    for i in range(3):
        folder = d.lib / f"S{i}"
        if (folder / f"S{i}.INFO").exists():
            assert_complete_info(folder)


def test_analyze_command_writes_now_and_reports_failures(daemon_factory, tmp_path):
    d = daemon_factory(CPU_ONLY)
    good = write_flac(tmp_path / "tracks" / "One" / "full_mix.flac", seconds=4)
    bad = tmp_path / "tracks" / "Bad" / "full_mix.flac"
    bad.parent.mkdir()
    bad.write_text("nope")
    cmd = [sys.executable, "-m", "mirwatch.cli", "analyze", "--config", str(d.config)]
    ok = subprocess.run(cmd + [str(good.parent)], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stdout[-2000:]
    assert_complete_info(good.parent)
    mixed = subprocess.run(cmd + [str(good), str(bad)], capture_output=True, text=True, timeout=300)
    assert mixed.returncode == 1
    assert '"track_failed"' in mixed.stdout and "cannot decode" in mixed.stdout


def test_retry_requeues_failed_jobs(daemon_factory):
    d = daemon_factory(CPU_ONLY)
    (d.lib / "Bad").mkdir()
    (d.lib / "Bad" / "full_mix.flac").write_text("not audio")
    d.start()
    d.wait_for(lambda: d.status()["counts"]["failed"] == 1, timeout=120, what="failure")
    assert d.stop() == 0
    retry = [sys.executable, "-m", "mirwatch.cli", "retry", "--config", str(d.config)]
    subprocess.run(retry + ["--all-failed"], check=True, timeout=60, capture_output=True)
    assert d.status()["counts"] == {"queued": 1, "running": 0, "done": 0, "failed": 0}
    # A failure that a restart does not fix is failed again, with its reason, not lost.
    d.start()
    d.wait_for(lambda: d.status()["counts"]["failed"] == 1, timeout=120, what="failed again")
    assert "cannot decode" in d.status()["recent_failures"][0]["last_error"]
    assert d.stop() == 0
    assert subprocess.run(retry + [str(d.lib / "Nowhere")], timeout=60, capture_output=True).returncode == 1


def test_a_track_too_short_for_the_models_fails_once_not_max_attempts_times(daemon_factory):
    d = daemon_factory(CPU_ONLY)
    write_flac(d.lib / "Blip" / "full_mix.flac", seconds=1.0)
    d.start()
    d.wait_for(lambda: d.status()["counts"]["failed"] == 1, timeout=120, what="failure")
    failure = d.status()["recent_failures"][0]
    assert failure["attempts"] == 1 and "too short" in failure["last_error"]
    assert d.stop() == 0


def test_progress_events_and_status_give_the_pace_and_when_the_backlog_is_done(daemon_factory):
    d = daemon_factory("progress_interval = 1.0\n" + CPU_ONLY)  # lands in [logging]
    names = [f"P{i:02d}" for i in range(20)]
    for i, name in enumerate(names):
        write_flac(d.lib / name / "full_mix.flac", seconds=3, seed=i)
    d.start()
    d.wait_event("job_done", count=len(names), timeout=240)
    busy = d.events("progress")
    assert busy and busy[0]["queued"] + busy[0]["running"] > 0
    paced = [e for e in busy if e["done_last_hour"]]
    assert paced, busy
    for e in paced:
        left = e["queued"] + e["running"]
        assert e["per_hour"] > 0 and e["eta_seconds"] == round(left / e["per_hour"] * 3600)
        assert e["done_last_hour"] == e["done"]  # everything this run did was within the hour
    report = d.status()
    assert report["progress"]["done_last_hour"] == len(names)
    assert report["progress"]["eta_seconds"] == 0 and report["progress"]["per_hour"] > 0
    text = subprocess.run([sys.executable, "-m", "mirwatch.cli", "status", "--config", str(d.config)],
                          capture_output=True, text=True, timeout=60, check=True).stdout
    assert f"({len(names)} done in the last hour); nothing left to do" in text
    assert d.stop() == 0

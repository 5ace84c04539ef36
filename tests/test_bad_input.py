"""Bad input against a real daemon: nothing lost, one clear reason per bad file, the daemon goes on,
and a 3-hour file stays inside the stated memory cap."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from faultkit import (ESSENTIA_ONLY, debris, info_path, long_flac, per_track, rss_kib, small_flac, valid_info,
                      write_track)


def _lying(data: bytes, *, rate: int | None = None, total: int | None = None) -> bytes:
    """The same FLAC with STREAMINFO's sample rate or sample count rewritten."""
    assert data[:4] == b"fLaC"
    packed = int.from_bytes(data[18:26], "big")
    if rate is not None:
        packed = (packed & ~(0xFFFFF << 44)) | (rate << 44)
    if total is not None:
        packed = (packed & ~0xFFFFFFFFF) | total
    return data[:18] + packed.to_bytes(8, "big") + data[26:]


def _names(lib: Path) -> dict[str, Path]:
    """Track folders whose names are hard to get right (bytes, so nothing is re-encoded on the way)."""
    base = os.fsencode(lib)
    raw = {
        "newline": b"Line\nBreak",
        "quotes": b"Say \"hi\" it's `now`",
        "latin1": b"Caf\xe9 del Mar \xff",
        "long_ok": b"L" * 250,            # <name>.INFO is exactly 255 bytes
        "too_long": b"M" * 255,           # no room for ".INFO"
        "utf8_long": "é".encode() * 125,  # 250 bytes, 125 characters
    }
    return {k: Path(os.fsdecode(base + b"/" + v)) for k, v in raw.items()}


def test_bad_input_fails_clearly_and_the_daemon_goes_on(daemon_factory, tmp_path):
    d = daemon_factory(ESSENTIA_ONLY)
    d.start()
    d.wait_event("ready", timeout=180)
    good = small_flac(3, seed=1)
    bad = {
        "Truncated": good[: len(good) // 2],
        "Empty": b"",
        "NotAudio": b"#!/bin/sh\necho this is not audio\n" * 100,
        "HugeCount": _lying(good, total=(1 << 36) - 1),
        "AbsurdRate": _lying(good, rate=1),
    }
    for name, data in bad.items():
        (d.lib / name).mkdir()
        (d.lib / name / "full_mix.flac").write_bytes(data)

    # Existing sidecars: malformed, not an object, and 100 MB (sparse: no honest sidecar is that big).
    write_track(d.lib / "Malformed", seed=2)
    info_path(d.lib / "Malformed").write_text('{"caption": "half a sidecar", ')
    write_track(d.lib / "ArraySidecar", seed=3)
    info_path(d.lib / "ArraySidecar").write_text("[1, 2, 3]")
    write_track(d.lib / "Huge", seed=4)
    with open(info_path(d.lib / "Huge"), "wb") as f:
        f.truncate(100 * 1024 * 1024)

    # Symlink loops: never followed, so nothing hangs.
    (d.lib / "Loop").mkdir()
    os.symlink("..", d.lib / "Loop" / "up")
    os.symlink("self", d.lib / "Loop" / "self")
    write_track(d.lib / "Loop" / "Inside", seed=5)

    names = _names(d.lib)
    for i, folder in enumerate(names.values()):
        write_track(folder, seed=10 + i)

    expect_done = ["Malformed", "ArraySidecar", "Huge", "Loop/Inside"] + [
        os.fsdecode(os.fsencode(p)[len(os.fsencode(d.lib)) + 1:]) for k, p in names.items() if k != "too_long"]
    expect_failed = list(bad) + [names["too_long"].name]
    d.wait_for(lambda: d.status()["counts"]["done"] == len(expect_done)
               and d.status()["counts"]["failed"] == len(expect_failed), timeout=300,
               what=f"{len(expect_done)} done, {len(expect_failed)} failed")

    for rel in expect_done:
        valid_info(d.lib / rel)
    failures = {os.fsencode(Path(j["path"]).parent.name): j["last_error"]
                for j in d.status()["recent_failures"]}
    reasons = {k: failures[k.encode()] for k in bad}
    assert "truncated" in reasons["Truncated"] or "cannot decode" in reasons["Truncated"]
    assert "empty file" in reasons["Empty"]
    assert "cannot decode" in reasons["NotAudio"]
    assert "implausible length" in reasons["HugeCount"] or "cannot decode" in reasons["HugeCount"]
    assert "sample rate" in reasons["AbsurdRate"] or "cannot decode" in reasons["AbsurdRate"]
    too_long = [v for k, v in failures.items() if k == os.fsencode(names["too_long"].name)][0]
    assert "255-byte" in too_long
    for name in bad:
        assert not info_path(d.lib / name).exists()
    # Each bad file is a permanent failure: one attempt, not max_attempts.
    attempts = per_track(d, "job_started")
    assert all(attempts[str(d.lib / name / "full_mix.flac")] == 1 for name in bad), attempts

    # Moved aside, not overwritten; the foreign keys of a readable sidecar are not invented.
    for name, size in (("Malformed", None), ("ArraySidecar", None), ("Huge", 100 * 1024 * 1024)):
        moved = list((d.lib / name).glob(f"{name}.INFO.corrupt-*"))
        assert len(moved) == 1, name
        if size:
            assert moved[0].stat().st_size == size
    assert {e["event"] for e in d.events("sidecar_corrupt")} == {"sidecar_corrupt"}
    assert len(d.events("sidecar_corrupt")) == 3
    assert not debris(d.lib)
    assert d.proc.poll() is None
    assert d.stop() == 0


def test_a_three_hour_file_is_analysed_within_the_memory_cap(daemon_factory):
    d = daemon_factory(ESSENTIA_ONLY)
    d.start()
    d.wait_event("ready", timeout=180)
    time.sleep(1.0)
    _, baseline = rss_kib(d.proc.pid)
    long_flac(d.lib / "ThreeHours" / "full_mix.flac", 3)
    d.wait_event("sidecar_written", timeout=300)
    _, peak = rss_kib(d.proc.pid)
    doc = valid_info(d.lib / "ThreeHours")
    source = doc["mirwatch"]["source"]
    assert abs(source["duration"] - 3 * 3600) < 1 and source["truncated_to"] == 1200.0
    grown_mib = (peak - baseline) / 1024
    print("THREE_HOURS", json.dumps({"baseline_mib": round(baseline / 1024), "peak_mib": round(peak / 1024),
                                     "grown_mib": round(grown_mib)}))
    # 1200 s of 44.1 kHz stereo float32 is 404 MiB; with the mono and 16 kHz copies and
    # the model's working set (measured: ~0.9 GiB) the job must stay under 1.25 GiB above idle.
    assert grown_mib < 1280, grown_mib
    assert d.stop() == 0

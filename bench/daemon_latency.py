"""Daemon figures: landing-to-sidecar latency, per-stage times, idle CPU and memory.

Runs a real ``mirwatch run`` on a temp library with the tiny model set (or a
real one with --models), then:
  1. drops N short tracks one at a time (rename into place) and times each
     file's arrival to its ``.INFO`` appearing;
  2. drops one long track (default 300 s) and reports each stage's seconds
     and realtime factor from the daemon's own log events;
  3. leaves the daemon idle and samples its CPU time and resident memory.

    python bench/daemon_latency.py [--models DIR] [--tracks 10] [--long 300] [--idle 30]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf


def write_track(path: Path, seconds: float, seed: int) -> None:
    sr = 44100
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    x = sum(0.15 * np.sin(2 * np.pi * f * t) for f in (220.0, 277.18, 329.63))
    x = x + (np.mod(t, 0.5) < 0.01) * 0.5 + 0.01 * rng.standard_normal(t.size)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.stack([x, x], 1).astype(np.float32), sr)


def events(log: Path, name: str) -> list[dict]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if isinstance(e, dict) and e.get("event") == name:
            out.append(e)
    return out


def wait(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit("timed out")
        time.sleep(0.01)


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, help="model dir (default: a fresh tiny set)")
    ap.add_argument("--tracks", type=int, default=10)
    ap.add_argument("--long", type=float, default=300.0)
    ap.add_argument("--idle", type=float, default=30.0)
    ap.add_argument("--settle", type=float, default=1.0)
    ap.add_argument("--extra", default='[flamingo]\nenabled = "off"\n[features]\naesthetics = "off"\n')
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="mirwatch-bench-"))
    models = args.models
    if models is None:
        models = tmp / "models"
        subprocess.run([sys.executable, "-m", "mirwatch.cli", "models", "make-test", str(models)], check=True)
    lib, staging = tmp / "lib", tmp / "staging"
    lib.mkdir()
    config = tmp / "config.toml"
    config.write_text(
        f'[library]\nroots = ["{lib}"]\nsettle_seconds = {args.settle}\n[state]\ndir = "{tmp / "state"}"\n'
        f'[models]\ndir = "{models}"\n[logging]\nformat = "json"\n' + args.extra
    )
    log = tmp / "daemon.log"
    started = time.monotonic()
    with open(log, "wb") as out:
        daemon = subprocess.Popen([sys.executable, "-m", "mirwatch.cli", "run", "--config", str(config)],
                                  stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "MIRWATCH_NO_JOURNAL": "1"})
    try:
        wait(lambda: events(log, "ready"), 600)
        ready_s = time.monotonic() - started

        latencies = []
        for i in range(args.tracks):
            write_track(staging / f"T{i}" / "full_mix.flac", 10.0, i)
            info = lib / f"T{i}" / f"T{i}.INFO"
            t0 = time.monotonic()
            os.rename(staging / f"T{i}", lib / f"T{i}")
            wait(info.exists, 300)
            latencies.append(time.monotonic() - t0)

        write_track(staging / "Long" / "full_mix.flac", args.long, 99)
        os.rename(staging / "Long", lib / "Long")
        wait((lib / "Long" / "Long.INFO").exists, 1800)
        prov = json.loads((lib / "Long" / "Long.INFO").read_text())["mirwatch"]

        time.sleep(3)
        cpu0, t0 = proc_cpu_seconds(daemon.pid), time.monotonic()
        time.sleep(args.idle)
        idle_cpu = (proc_cpu_seconds(daemon.pid) - cpu0) / (time.monotonic() - t0) * 100
        rss = rss_mib(daemon.pid)
    finally:
        daemon.terminate()
        daemon.wait(120)

    print(f"models: {models}")
    print(f"start to READY (models loaded): {ready_s:.1f} s")
    print(f"landing -> .INFO, {args.tracks} x 10 s tracks, settle {args.settle:g} s: "
          f"median {statistics.median(latencies):.2f} s, max {max(latencies):.2f} s "
          f"(of which settle wait >= {args.settle:g} s)")
    print(f"\n{args.long:.0f} s track, per stage:")
    print(f"  {'stage':<12} {'seconds':>8} {'x realtime':>11}")
    print(f"  {'decode':<12} {prov['decode_seconds']:>8.2f} {args.long / prov['decode_seconds']:>11.0f}")
    for name, a in prov["analyzers"].items():
        print(f"  {name:<12} {a['seconds']:>8.2f} {args.long / a['seconds']:>11.0f}")
    print(f"  {'total':<12} {prov['total_seconds']:>8.2f} {prov['realtime_factor']:>11.0f}")
    print(f"\nidle over {args.idle:.0f} s: CPU {idle_cpu:.2f} % of one core, RSS {rss:.0f} MiB")


if __name__ == "__main__":
    main()

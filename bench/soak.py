"""Load and soak: a real `mirwatch run` on a synthetic library, measured from outside.

One run does, in order:
  1. start-up on a library of --scan-folders track folders (time to READY and to the end of
     the start-up scan, peak RSS, SQLite size);
  2. a burst of --burst folders dropped at once while the worker is busy with the backlog
     (every one queued exactly once; watcher latency p50/p99 from file in place to job_queued);
  3. a steady drip of one new track every --drip-seconds until --minutes have passed, with the
     daemon's RSS and open descriptors sampled every --sample-seconds.
It prints one JSON object; with --check it exits 1 when a leak trend shows (RSS medians of the
last quarter above those of the second quarter by more than --rss-slack-mib, or more open
descriptors at the end than after warm-up, beyond --fd-slack).

    python bench/soak.py --minutes 1440 --sample-seconds 60 --drip-seconds 10   # the 24 h soak
    python bench/soak.py --minutes 1 --scan-folders 20000 --burst 1000          # start-up at 20,000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from conftest import Daemon  # noqa: E402
from faultkit import ESSENTIA_ONLY, open_fds, rss_kib, small_flac  # noqa: E402


def tiny_models(cache: Path) -> Path:
    target = cache / "soak-models"
    if not (target / "checksums.json").exists():
        shutil.rmtree(target, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "mirwatch.cli", "models", "make-test", str(target)], check=True)
    return target


def _stamp(event: dict) -> float:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run(args: argparse.Namespace) -> dict:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="mirwatch-soak-"))
    models = Path(args.models) if args.models else tiny_models(work)
    d = Daemon(work / "run", models, ESSENTIA_ONLY)
    # One real 3 s FLAC, hard-linked everywhere: a big library costs inodes, not gigabytes.
    seed_file = work / "seed.flac"
    seed_file.write_bytes(small_flac(3, seed=1))
    for i in range(args.scan_folders):
        folder = d.lib / f"{i // 100:04d}" / f"Track {i:05d}"
        folder.mkdir(parents=True)
        os.link(seed_file, folder / "full_mix.flac")
    out: dict = {"scan_folders": args.scan_folders, "burst": args.burst, "minutes": args.minutes}

    started = time.monotonic()
    d.start()
    pid = d.proc.pid
    ready = d.wait_event("ready", timeout=600)[0]
    out["seconds_to_ready"] = round(time.monotonic() - started, 2)
    scan = d.wait_event("scan_done", timeout=3600)[0]
    out["seconds_to_scan_done"] = round(time.monotonic() - started, 2)
    out["scan_seconds"] = scan["seconds"]
    out["scan_queued"] = scan["queued"]
    out["rss_mib_after_scan"], out["peak_rss_mib_after_scan"] = (round(v / 1024) for v in rss_kib(pid))
    del ready

    # The burst: half moved in as whole folders (mv), half written in place (cp).
    staging = work / "staging"
    staging.mkdir()
    placed: dict[str, float] = {}
    for i in range(args.burst):
        folder = staging / f"Burst {i:04d}"
        folder.mkdir()
        os.link(seed_file, folder / "full_mix.flac")
    t_burst = time.time()
    for i in range(args.burst):
        name = f"Burst {i:04d}"
        if i % 2:
            os.rename(staging / name, d.lib / name)
        else:
            (d.lib / name).mkdir()
            shutil.copyfile(staging / name / "full_mix.flac", d.lib / name / "full_mix.flac")
        placed[str(d.lib / name / "full_mix.flac")] = time.time()
    out["burst_place_seconds"] = round(time.time() - t_burst, 2)
    if args.burst:
        d.wait_for(lambda: sum(1 for e in d.events("job_queued") if e["path"] in placed) >= args.burst,
                   timeout=600, what="the whole burst queued")
        time.sleep(max(2.0, 3 * 0.5))  # a duplicate would arrive by now
        queued = [e for e in d.events("job_queued") if e["path"] in placed]
        per_path = Counter(e["path"] for e in queued)
        latencies = [_stamp(e) - placed[e["path"]] for e in queued]
        out["burst_queued_once"] = sum(1 for n in per_path.values() if n == 1)
        out["burst_queued_twice_or_more"] = sum(1 for n in per_path.values() if n > 1)
        out["burst_missing"] = len(set(placed) - set(per_path))
        out["watcher_latency_p50_s"] = round(_percentile(latencies, 0.5), 3)
        out["watcher_latency_p99_s"] = round(_percentile(latencies, 0.99), 3)
        out["settle_seconds"] = 0.5

    # The drip, sampled.
    samples: list[tuple[float, int, int]] = []
    dripped: list[str] = []
    end = started + args.minutes * 60
    next_sample = next_drip = time.monotonic()
    while time.monotonic() < end:
        now = time.monotonic()
        if now >= next_sample:
            rss, _ = rss_kib(pid)
            samples.append((now - started, rss, open_fds(pid)))
            next_sample += args.sample_seconds
        if args.drip_seconds and now >= next_drip:
            folder = d.lib / "drip" / f"Drip {len(dripped):06d}"
            folder.mkdir(parents=True)
            (folder / "full_mix.flac").write_bytes(small_flac(3, seed=len(dripped) % 50))
            dripped.append(str(folder / "full_mix.flac"))
            next_drip += args.drip_seconds
        if d.proc.poll() is not None:
            raise SystemExit(f"the daemon exited ({d.proc.returncode}) during the soak\n{d.tail()}")
        time.sleep(0.2)
    rss, peak = rss_kib(pid)
    samples.append((time.monotonic() - started, rss, open_fds(pid)))  # at least one, however short the run
    out["rss_mib_end"], out["peak_rss_mib"] = round(rss / 1024), round(peak / 1024)
    counts = d.status()["counts"]
    out["queue_counts_end"] = counts
    done = d.events("job_done")
    out["jobs_done"] = len(done)
    out["dripped"] = len(dripped)
    queued_drip = {e["path"] for e in d.events("job_queued")} & set(dripped[:-3])
    out["drip_not_queued"] = len(set(dripped[:-3]) - queued_drip)  # the last few may still be settling
    out["sqlite_bytes"] = sum(p.stat().st_size for p in (d.root / "state").glob("queue.sqlite3*"))
    out["exit_code"] = d.stop(timeout=120)

    after_warmup = [s for s in samples if s[0] >= samples[0][0] + 0.2 * (samples[-1][0] - samples[0][0])]
    quarter = max(1, len(after_warmup) // 4)
    early, late = after_warmup[:quarter], after_warmup[-quarter:]
    out["samples"] = len(samples)
    out["rss_growth_mib"] = round((statistics.median(s[1] for s in late)
                                   - statistics.median(s[1] for s in early)) / 1024, 1)
    out["fd_growth"] = max(s[2] for s in late) - max(s[2] for s in early)
    hours = (after_warmup[-1][0] - after_warmup[0][0]) / 3600 if len(after_warmup) > 1 else 0
    if hours > 0:
        xs = [s[0] / 3600 for s in after_warmup]
        ys = [s[1] / 1024 for s in after_warmup]
        out["rss_slope_mib_per_hour"] = round(statistics.linear_regression(xs, ys).slope, 1)
    out["leak"] = out["rss_growth_mib"] > args.rss_slack_mib or out["fd_growth"] > args.fd_slack
    if args.samples_csv:
        Path(args.samples_csv).write_text("seconds,rss_kib,fds\n" + "".join(f"{t:.1f},{r},{f}\n"
                                                                             for t, r, f in samples))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=1440.0)
    p.add_argument("--sample-seconds", type=float, default=60.0)
    p.add_argument("--drip-seconds", type=float, default=10.0)
    p.add_argument("--scan-folders", type=int, default=2000)
    p.add_argument("--burst", type=int, default=1000)
    p.add_argument("--models", help="a model dir (default: a tiny set made with `mirwatch models make-test`)")
    p.add_argument("--workdir")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--samples-csv")
    p.add_argument("--rss-slack-mib", type=float, default=48.0)
    p.add_argument("--fd-slack", type=int, default=4)
    p.add_argument("--check", action="store_true", help="exit 1 on a leak trend or anything lost")
    args = p.parse_args()
    out = run(args)
    print(json.dumps(out, indent=2))
    if args.check:
        bad = out["leak"] or out.get("burst_missing") or out.get("burst_queued_twice_or_more") \
            or out["drip_not_queued"] or out["exit_code"] != 0
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

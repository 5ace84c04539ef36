"""Load held by a real daemon, in CI's budget: start-up on 2,000 track folders, a burst of 1,000
dropped while the worker is busy, then a steady drip with RSS and descriptors sampled, failing on
a leak trend. `bench/soak.py` is the same run at 20,000 folders or for 24 hours."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO

SOAK_MINUTES = os.environ.get("MIRWATCH_SOAK_MINUTES", "5")


def test_startup_scan_burst_and_soak_hold_without_loss_or_leak(tiny_models, tmp_path):
    cmd = [sys.executable, str(REPO / "bench" / "soak.py"), "--minutes", SOAK_MINUTES, "--sample-seconds", "5",
           "--drip-seconds", "2", "--scan-folders", "2000", "--burst", "1000", "--models", str(tiny_models),
           "--workdir", str(tmp_path / "soak"), "--keep", "--samples-csv", str(tmp_path / "samples.csv"), "--check"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=float(SOAK_MINUTES) * 60 + 600)
    assert done.stdout.strip(), done.stderr[-3000:]
    out = json.loads(done.stdout)
    print("SOAK", json.dumps(out))
    assert out["scan_queued"] == 2000 and out["seconds_to_ready"] < 120
    assert (out["burst_queued_once"], out["burst_queued_twice_or_more"], out["burst_missing"]) == (1000, 0, 0)
    assert out["drip_not_queued"] == 0 and out["queue_counts_end"]["failed"] == 0
    assert not out["leak"], f"leak trend: RSS +{out['rss_growth_mib']} MiB, descriptors +{out['fd_growth']}"
    assert out["exit_code"] == 0 and done.returncode == 0

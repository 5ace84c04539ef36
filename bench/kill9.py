"""kill -9 at random points across N jobs (default 200), against a real daemon; prints the counts.

CI runs the same test with 60 jobs. Usage: python bench/kill9.py [--jobs 200] [--seed 6]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--jobs", type=int, default=200)
    p.add_argument("--seed", type=int, default=6)
    args = p.parse_args()
    env = {**os.environ, "MIRWATCH_KILL_JOBS": str(args.jobs), "MIRWATCH_KILL_SEED": str(args.seed)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                           str(REPO / "tests" / "test_faults.py"), "-k", "kill9"],
                          capture_output=True, text=True, env=env, cwd=REPO)
    line = re.search(r"^.*KILL9 (\{.*\})", done.stdout, re.M)
    print(line.group(1) if line else done.stdout[-3000:])
    return done.returncode


if __name__ == "__main__":
    raise SystemExit(main())

"""The log is read by people and by `jq`: every event must arrive as one whole line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import structlog

from conftest import Daemon, write_flac
from mirwatch import logs

CPU_ONLY = '[flamingo]\nenabled = "off"\n[features]\naesthetics = "off"\n'


class _Writes:
    """A write-through stream that remembers each write() call."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def test_each_event_is_one_write_with_its_newline():
    stream = _Writes()
    try:
        logs.configure("json", "info", stream=stream)  # type: ignore[arg-type]
        log = logs.get_logger(job_id=7)
        log.info("job_started", path="/lib/A/full_mix.flac")
        log.warning("job_failed", error="x" * 10_000)
    finally:
        structlog.reset_defaults()
    # Anything another writer (native code on fd 2) puts between two writes lands
    # inside a line; with one write per event it can only land between lines.
    assert len(stream.calls) == 2
    assert all(call.endswith("\n") and call.count("\n") == 1 for call in stream.calls)
    assert [json.loads(c)["event"] for c in stream.calls] == ["job_started", "job_failed"]


def test_essentia_stays_quiet_and_every_line_of_a_multi_track_run_parses(tmp_path, tiny_models):
    # Essentia used to print ~2,000 "No network created" lines per track from the
    # second track on (features built and dropped network-backed algorithms per call),
    # and under PYTHONUNBUFFERED they split JSON lines in two.
    d = Daemon(tmp_path, tiny_models, CPU_ONLY)
    folders = [write_flac(tmp_path / "tracks" / f"T{i}" / "full_mix.flac", seconds=3, seed=i).parent
               for i in range(3)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MIRWATCH_NO_JOURNAL": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "mirwatch.cli", "analyze", "--config", str(d.config),
                           *map(str, folders)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    output = proc.stdout + proc.stderr
    assert "No network created" not in output
    events = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert not [line for line in output.splitlines() if '"event"' in line and not line.startswith("{")]
    assert [e["path"] for e in events if e["event"] == "track_done"] == [str(f / "full_mix.flac") for f in folders]

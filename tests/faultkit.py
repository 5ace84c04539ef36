"""Helpers for the fault, bad-input, security and load tests: real mounts, real limits, short tracks."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import Daemon

# Essentia only: each job is a fraction of a second, so hundreds fit in a CI run.
ESSENTIA_ONLY = '[flamingo]\nenabled = "off"\n[features]\nenabled = false\naesthetics = "off"\n'
ESSENTIA_KEYS = {"essentia_genre", "essentia_mood", "essentia_instrument", "danceability", "atonality"}


def small_flac(seconds: float = 3.0, *, seed: int = 0, sr: int = 16000) -> bytes:
    """Mono at the models' own rate: no resampling, a few tens of kB."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    x = 0.2 * np.sin(2 * np.pi * (200 + 20 * seed % 400) * t) + 0.02 * rng.standard_normal(t.size)
    buf = io.BytesIO()
    sf.write(buf, x.astype(np.float32), sr, format="FLAC")
    return buf.getvalue()


def write_track(folder: Path, seconds: float = 3.0, *, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    mix = folder / "full_mix.flac"
    mix.write_bytes(small_flac(seconds, seed=seed))
    return mix


def info_path(folder: Path) -> Path:
    return folder / (folder.name + ".INFO")


def valid_info(folder: Path) -> dict:
    """The sidecar parses, is complete, and describes the file that is there now."""
    doc = json.loads(info_path(folder).read_bytes())
    assert ESSENTIA_KEYS <= set(doc), sorted(doc)
    prov = doc["mirwatch"]
    st = (folder / "full_mix.flac").stat()
    assert (prov["source"]["size"], prov["source"]["mtime_ns"]) == (st.st_size, st.st_mtime_ns)
    assert set(prov["analyzers"]) == {"essentia"}
    return doc


def debris(root: Path) -> list[Path]:
    """Temp files mirwatch would have left behind."""
    return [p for p in root.rglob("*.tmp")]


def per_track(d: Daemon, event: str, **match) -> Counter:
    return Counter(e["path"] for e in d.events(event) if all(e.get(k) == v for k, v in match.items()))


def need_root(what: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"{what} needs root (mount); not root here")


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A real filesystem of a fixed size, mounted for the test."""
    need_root("a size-limited tmpfs")
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(fs: Path, name: str = "filler") -> Path:
    """Fill the filesystem at `fs` to the last byte."""
    filler = fs / name
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for size in (1 << 16, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    return filler


def can_unshare_userns() -> str:
    """'' if a user namespace with its own inotify limit can be made here; else why not."""
    if not shutil.which("unshare"):
        return "unshare(1) is not installed"
    done = subprocess.run(["unshare", "-U", "-r", "sh", "-c", "echo 8 > /proc/sys/user/max_inotify_watches"],
                          capture_output=True, text=True)
    return "" if done.returncode == 0 else f"no user namespaces here: {done.stderr.strip()}"


class LimitedDaemon(Daemon):
    """`mirwatch run` inside a user namespace whose inotify watch limit is `watches`.

    The kernel counts watches per user per namespace and checks every level,
    so this is the real ENOSPC a user with a small fs.inotify.max_user_watches
    gets, without touching the machine-wide setting.
    """

    watches = 8

    def start(self) -> Daemon:
        env = {**os.environ, "MIRWATCH_NO_JOURNAL": "1", **self.env}
        self._log = open(self.log_path, "ab")
        script = f'echo {self.watches} > /proc/sys/user/max_inotify_watches && exec "$@"'
        self.proc = subprocess.Popen(
            ["unshare", "-U", "-r", "sh", "-c", script, "sh",
             sys.executable, "-m", "mirwatch.cli", "run", "--config", str(self.config)],
            stdout=self._log, stderr=subprocess.STDOUT, env=env,
        )
        return self


def rss_kib(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS) of a process, in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.split()
    return int(fields["VmRSS"][0]), int(fields["VmHWM"][0])


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))

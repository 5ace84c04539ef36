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


def _crc8(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


_CRC16 = []
for _i in range(256):
    _c = _i << 8
    for _ in range(8):
        _c = ((_c << 1) ^ 0x8005) & 0xFFFF if _c & 0x8000 else (_c << 1) & 0xFFFF
    _CRC16.append(_c)


def _crc16(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC16[(crc >> 8) ^ byte]
    return crc


def _utf8_number(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    if n < 0x800:
        return bytes([0xC0 | n >> 6, 0x80 | n & 0x3F])
    if n < 0x10000:
        return bytes([0xE0 | n >> 12, 0x80 | n >> 6 & 0x3F, 0x80 | n & 0x3F])
    return bytes([0xF0 | n >> 18, 0x80 | n >> 12 & 0x3F, 0x80 | n >> 6 & 0x3F, 0x80 | n & 0x3F])


def long_flac(path: Path, hours: float, *, level: int = 300) -> Path:
    """A valid 44.1 kHz stereo 16-bit FLAC of `hours`, written frame by frame in seconds.

    Every frame is 4096 samples of CONSTANT subframes (a small DC level): a real
    stream any decoder plays to the end, without minutes of encoding in CI.
    """
    block, frames = 4096, int(hours * 3600 * 44100) // 4096
    info = (block.to_bytes(2, "big") * 2 + b"\0" * 6
            + ((44100 << 44) | (1 << 41) | (15 << 36) | frames * block).to_bytes(8, "big") + b"\0" * 16)
    body = bytes([0x00]) + level.to_bytes(2, "big", signed=True)  # CONSTANT subframe, 16 bits
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"fLaC" + bytes([0x80, 0, 0, 34]) + info)
        for n in range(frames):
            head = b"\xff\xf8\xc9\x18" + _utf8_number(n)
            frame = head + bytes([_crc8(head)]) + body + body
            f.write(frame + _crc16(frame).to_bytes(2, "big"))
    return path

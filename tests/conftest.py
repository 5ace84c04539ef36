"""Shared fixtures: the tiny model set (built once per run), FLAC writers, a real daemon."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
MODELS_SRC = REPO / "daemon" / "mirwatch" / "models"


def _tiny_sources_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted(MODELS_SRC.glob("tiny_*.py")) + [MODELS_SRC / "testmodels.py"]:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete tiny model set, made through ``mirwatch models make-test``.

    Cached between local runs under ~/.cache keyed by the generators' source;
    CI starts clean and builds it once per run.
    """
    cache_root = Path(os.environ.get("MIRWATCH_TEST_CACHE", Path.home() / ".cache" / "mirwatch-tests"))
    target = cache_root / f"models-{_tiny_sources_hash()}"
    if os.environ.get("CI") or not (target / "checksums.json").exists():
        target = tmp_path_factory.mktemp("tiny-models") if os.environ.get("CI") else target
        building = target.with_name(target.name + ".building")
        shutil.rmtree(building, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "mirwatch.cli", "models", "make-test", str(building)],
                       check=True, timeout=900)
        shutil.rmtree(target, ignore_errors=True)
        building.rename(target)
    return target


def tone_mix(seconds: float = 4.0, sr: int = 44100, *, seed: int = 0, channels: int = 2) -> np.ndarray:
    """A short music-like signal: a chord, a pulse of clicks and a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    x = sum(0.15 * np.sin(2 * np.pi * f * t) for f in (220.0, 277.18, 329.63))
    beat = (np.mod(t, 0.5) < 0.01).astype(float) * 0.5
    x = x + beat + 0.01 * rng.standard_normal(t.size)
    return np.stack([x] * channels, axis=1).astype(np.float32)


def flac_bytes(seconds: float = 4.0, sr: int = 44100, *, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, tone_mix(seconds, sr, seed=seed), sr, format="FLAC")
    return buf.getvalue()


def write_flac(path: Path, seconds: float = 4.0, sr: int = 44100, *, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(flac_bytes(seconds, sr, seed=seed))
    return path


class NotifySocket:
    """What systemd would hear: a unix datagram socket for ``NOTIFY_SOCKET``, read by a thread.

    ``received`` holds (monotonic time, message) pairs; use it as a context manager.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.received: list[tuple[float, str]] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)

    @property
    def messages(self) -> list[str]:
        return [m for _, m in self.received]

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            self.received.append((time.monotonic(), data.decode()))

    def __enter__(self) -> NotifySocket:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close()


class Daemon:
    """A real ``mirwatch run`` subprocess on a temp library, read through its JSON log."""

    def __init__(self, root: Path, models: Path, extra: str = "", env: dict[str, str] | None = None) -> None:
        self.root = root
        self.lib = root / "lib"
        self.lib.mkdir(parents=True, exist_ok=True)
        self.config = root / "config.toml"
        self.log_path = root / "daemon.log"
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.write_config(models, extra)

    def write_config(self, models: Path, extra: str = "") -> None:
        self.config.write_text(
            f'[library]\nroots = ["{self.lib}"]\nsettle_seconds = 0.5\n'
            f'[state]\ndir = "{self.root / "state"}"\n'
            f'[models]\ndir = "{models}"\n'
            f'[worker]\nstop_grace = 5.0\n'
            f'[logging]\nformat = "json"\nlevel = "debug"\n' + extra
        )

    def start(self) -> Daemon:
        # One thread per library: on 2 shared cores, oversubscribed torch decoding crawls.
        env = {**os.environ, "MIRWATCH_NO_JOURNAL": "1", "OMP_NUM_THREADS": "1", **self.env}
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mirwatch.cli", "run", "--config", str(self.config)],
            stdout=self._log, stderr=subprocess.STDOUT, env=env,
        )
        return self

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_bytes().decode("utf-8", "replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and (name is None or event.get("event") == name):
                out.append(event)
        return out

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 90.0, what: str = "") -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = predicate()
            if result:
                return result
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"daemon exited ({self.proc.returncode}) waiting for {what}\n{self.tail()}")
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}\n{self.tail()}")

    def wait_event(self, name: str, count: int = 1, timeout: float = 90.0, **match: Any) -> list[dict]:
        def found():
            hits = [e for e in self.events(name) if all(e.get(k) == v for k, v in match.items())]
            return hits if len(hits) >= count else None

        return self.wait_for(found, timeout, f"{count}x {name} {match}")

    def status(self) -> dict[str, Any]:
        proc = subprocess.run([sys.executable, "-m", "mirwatch.cli", "status", "--json", "--config",
                               str(self.config)], capture_output=True, text=True, timeout=60, check=True)
        return json.loads(proc.stdout)

    def stop(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._log.close()
        return code

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(30)
        self._log.close()

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


@pytest.fixture
def daemon_factory(tmp_path: Path, tiny_models: Path):
    started: list[Daemon] = []

    def make(extra: str = "", env: dict[str, str] | None = None, root: Path | None = None) -> Daemon:
        d = Daemon(root or tmp_path, tiny_models, extra, env)
        started.append(d)
        return d

    yield make
    for d in started:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(30)

"""Realtime factor of the full-mix numeric features on one core, per group.

    taskset -c 0 .venv/bin/python bench/features_speed.py [AUDIO]

AUDIO defaults to 5 minutes of Debian's wesnoth-1.16-music (converted to
FLAC in a temporary folder); without that package a 5-minute synthetic
track (drums, bass line and chords) is used and the output says so.
Threads are pinned to one before numpy/Essentia load, so the number is what
one core of the CPU stage delivers.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "TF_NUM_INTRAOP_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402

WESNOTH = Path("/usr/share/games/wesnoth/1.16/data/core/music")
SECONDS = 300.0
TARGET = 40.0


def five_minutes(folder: Path, source: Path | None) -> tuple[Path, str]:
    out = folder / "bench_track" / "full_mix.flac"
    out.parent.mkdir(parents=True)
    rate = 44_100
    if source is None:
        candidates = sorted(WESNOTH.glob("*.ogg"), key=lambda p: -sf.info(str(p)).duration) if WESNOTH.is_dir() else []
        source = candidates[0] if candidates else None
    if source is not None:
        data, rate = sf.read(str(source), dtype="float32", always_2d=True)
        reps = int(np.ceil(SECONDS * rate / data.shape[0]))
        data = np.tile(data, (reps, 1))[: int(SECONDS * rate)]
        label = f"{source.name} (first {SECONDS:g} s, looped if shorter)"
    else:
        data = synthetic(rate)
        label = "synthetic drums + bass + chords (wesnoth-1.16-music not installed)"
    sf.write(str(out), data, rate)
    return out, label


def synthetic(rate: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    n = int(SECONDS * rate)
    t = np.arange(n) / rate
    beat = 60.0 / 120.0
    phase = (t % beat) / beat
    kick = np.sin(2 * np.pi * 55 * t) * np.exp(-phase * 12)
    hat = rng.standard_normal(n) * np.exp(-(((t + beat / 2) % beat) / beat) * 40) * 0.2
    chord = sum(np.sin(2 * np.pi * f * t) for f in (220.0, 277.18, 329.63)) * 0.1
    mono = (0.5 * kick + hat + chord).astype(np.float32)
    return np.stack([mono, mono], axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("audio", nargs="?", type=Path)
    args = parser.parse_args()

    from mirwatch.analyzers.base import Track
    from mirwatch.analyzers.features import FeaturesAnalyzer
    from mirwatch.audio import decode
    from mirwatch.config import FeaturesConfig

    with tempfile.TemporaryDirectory() as tmp:
        flac, label = five_minutes(Path(tmp), args.audio)
        started = time.perf_counter()
        audio = decode(flac)
        decode_s = time.perf_counter() - started
        analyzer = FeaturesAnalyzer(FeaturesConfig(stems=False, aesthetics="off"), store=None)
        analyzer.load()
        analyzer.analyze(Track(flac, decode(flac)))  # warm-up: first Essentia calls pay for set-up
        started, cpu_started = time.perf_counter(), time.process_time()
        result = analyzer.analyze(Track(flac, audio))
        total, cpu = time.perf_counter() - started, time.process_time() - cpu_started

    duration = audio.duration
    print(f"audio: {label}; {duration:.0f} s, {audio.sample_rate} Hz, {audio.channels} ch")
    print(f"cpu affinity: {sorted(os.sched_getaffinity(0))}")
    print(f"{'group':<12}{'seconds':>9}{'x realtime':>12}")
    for group, seconds in result.provenance["group_seconds"].items():
        print(f"{group:<12}{seconds:>9.2f}{duration / max(seconds, 1e-9):>12.0f}")
    print(f"{'total':<12}{total:>9.2f}{duration / total:>12.1f}   wall clock (target >= {TARGET:g}x)")
    # CPU time is what the work costs; wall time also counts whatever else shares the core.
    print(f"{'total cpu':<12}{cpu:>9.2f}{duration / cpu:>12.1f}   cpu time of this process")
    print(f"{'(decode)':<12}{decode_s:>9.2f}{duration / decode_s:>12.0f}   shared with every analyzer")
    failed = result.provenance["failed"]
    if failed:
        print(f"failed groups: {failed}")


if __name__ == "__main__":
    main()

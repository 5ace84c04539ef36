"""Rhythm keys, from the mono mix at 44.1 kHz.

Onsets come from Essentia's ``OnsetRate`` (HFC + complex-domain detection
functions, 11.6 ms hop); beats from ``RhythmExtractor2013(method="degara")``,
then corrected by this module (octave, see `_fix_octave`). Definitions:

- ``onset_strength_*``: mean / std over frames of the onset-strength envelope:
  the half-wave rectified spectral flux (L2 norm of the per-bin magnitude
  increase between consecutive 2048-sample frames) divided by the track's mean
  spectral magnitude, so that it does not depend on playback level.
- ``onset_count``, ``onset_density`` (onsets per second of audio).
- ``ioi_mean``, ``ioi_std``: inter-onset intervals in seconds.
- ``rhythmic_complexity``: Shannon entropy in bits of the histogram of
  inter-onset intervals (25 ms bins up to 2 s, one bin for anything longer);
  0 for a perfectly regular pulse.
- ``rhythmic_evenness``: 1 / (1 + coefficient of variation of the intervals);
  1 for perfectly even spacing, towards 0 as spacing gets irregular.
- ``bpm``: 60 / the mean beat interval near the median one (`tempo`).
- ``bpm_is_defined``: 1 when the track has a pulse: enough beats, a tempo in
  [40, 210] BPM, and at least `MIN_SUPPORT` of the beats land on a detected
  onset. When 0, ``bpm`` and every beat-derived key are left out, the beat grid
  is empty and ``beat_count`` is 0 (the tracker always emits ticks, even on
  silence; they mean nothing there).
- ``beat_count``, ``beat_regularity`` (std of beat intervals, seconds).
- ``on_beat_ratio``: share of onsets within `_tolerance` of a beat.
- ``syncopation``: share of the onset strength (summed at the onsets) that
  falls off the beat.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from . import Measured, resident
from .spectra import RATE, Spectra

MIN_BPM, MAX_BPM = 40.0, 210.0
MIN_BEATS = 4
# Share of beats that must coincide with an onset for the pulse to count as real.
MIN_SUPPORT = 0.3
IOI_BIN = 0.025
TEMPO_WINDOW = 0.08
IOI_MAX = 2.0


@dataclass(frozen=True)
class Onsets:
    times: np.ndarray
    # Envelope value at each onset.
    strengths: np.ndarray
    # Onset-strength envelope, one value per spectrum frame.
    envelope: np.ndarray
    frame_rate: float

    def strength_at(self, times: np.ndarray) -> np.ndarray:
        """Envelope maximum within one frame of each time (detectors disagree by a frame)."""
        if self.envelope.size == 0:
            return np.zeros(len(times))
        idx = np.rint(np.asarray(times) * self.frame_rate).astype(int)
        env = self.envelope
        picks = [env[np.clip(idx + d, 0, env.size - 1)] for d in (-1, 0, 1)]
        return np.max(picks, axis=0)


def onset_envelope(spectra: Spectra) -> np.ndarray:
    mag = spectra.magnitude
    if mag.shape[0] < 2:
        return np.zeros(mag.shape[0])
    scale = float(np.mean(np.sqrt(np.einsum("ij,ij->i", mag, mag, dtype=np.float64))))
    if scale <= 0.0:
        return np.zeros(mag.shape[0])
    env = np.zeros(mag.shape[0])
    # In blocks: the whole-track difference matrix would be as large as the spectrogram.
    for start in range(1, mag.shape[0], 4096):
        block = mag[start - 1 : start + 4096]
        rise = np.maximum(np.diff(block, axis=0), 0.0)
        env[start : start + rise.shape[0]] = np.linalg.norm(rise, axis=1) / scale
    return env


def detect_onsets(mono44: np.ndarray, spectra: Spectra) -> Onsets:
    import essentia.standard as es

    envelope = onset_envelope(spectra)
    times = np.zeros(0)
    if mono44.size >= spectra.frame:
        times, _ = es.OnsetRate()(np.ascontiguousarray(mono44, dtype=np.float32))
        times = np.asarray(times, dtype=np.float64)
    unweighed = Onsets(times, np.zeros(times.size), envelope, spectra.frame_rate)
    return replace(unweighed, strengths=unweighed.strength_at(times))


def track_beats(mono44: np.ndarray, onsets: Onsets) -> np.ndarray:
    """Beat times in seconds; empty when the track has no pulse."""
    if mono44.size < RATE or onsets.times.size < MIN_BEATS:
        return np.zeros(0)
    _, ticks, _, _, _ = resident.compute(
        "RhythmExtractor2013", {"method": "degara", "minTempo": 40, "maxTempo": 208},
        np.ascontiguousarray(mono44, dtype=np.float32),
    )
    beats = _fix_octave(np.asarray(ticks, dtype=np.float64), onsets)
    if not _has_pulse(beats, onsets):
        return np.zeros(0)
    return beats


def tempo(beats: np.ndarray) -> float:
    """60 / the mean of the beat intervals near the median one.

    The median alone is stuck on the tracker's 11.6 ms frame grid (a 174 BPM
    pulse alternates 29- and 30-frame intervals, 172.3 or 178.2 BPM); the mean
    over the intervals within `TEMPO_WINDOW` of the median averages that grid
    away while a skipped beat, a pause or a tempo change elsewhere in the
    track does not pull the value (a straight-line fit over the whole track
    would be pulled).
    """
    intervals = np.diff(beats)
    median = float(np.median(intervals))
    near = intervals[np.abs(intervals - median) <= TEMPO_WINDOW * median]
    return 60.0 / float(np.mean(near))


def _fix_octave(beats: np.ndarray, onsets: Onsets) -> np.ndarray:
    """Correct the tracker's double/half-tempo errors against the onset strength.

    The degara tracker reads a 174 BPM click as 87 (every other click halfway
    between its beats) and a 60 BPM click as 120 (every other beat on nothing).
    Halfway points as strong as the beats mean the pulse is twice as fast;
    every other beat carrying almost no strength means it is half as fast.
    Energy-weighted strength keeps hi-hat eighths (weak next to kick and snare)
    from doubling a real 90 BPM groove.
    """
    if beats.size < 2 * MIN_BEATS:
        return beats
    intervals = np.diff(beats)
    bpm = 60.0 / float(np.median(intervals))
    on = onsets.strength_at(beats)
    if on.mean() <= 0:
        return beats
    halfway = onsets.strength_at(beats[:-1] + intervals / 2)
    if 2 * bpm <= MAX_BPM and halfway.mean() >= 0.8 * on[:-1].mean():
        return np.sort(np.concatenate([beats, beats[:-1] + intervals / 2]))
    even, odd = on[0::2].mean(), on[1::2].mean()
    if bpm / 2 >= MIN_BPM and min(even, odd) < 0.25 * max(even, odd):
        return beats[0::2] if even >= odd else beats[1::2]
    return beats


def _tolerance(beats: np.ndarray) -> float:
    """How far from a beat an onset still counts as on it: 10% of the beat, at most 70 ms."""
    return min(0.07, 0.1 * float(np.median(np.diff(beats))))


def _distance_to_nearest(times: np.ndarray, grid: np.ndarray) -> np.ndarray:
    pos = np.clip(np.searchsorted(grid, times), 1, grid.size - 1)
    return np.minimum(np.abs(times - grid[pos - 1]), np.abs(times - grid[pos]))


def _has_pulse(beats: np.ndarray, onsets: Onsets) -> bool:
    if beats.size < MIN_BEATS:
        return False
    if not MIN_BPM <= tempo(beats) <= MAX_BPM:
        return False
    if onsets.times.size == 0:
        return False
    support = np.mean(_distance_to_nearest(beats, np.sort(onsets.times)) <= _tolerance(beats))
    return bool(support >= MIN_SUPPORT)


def onset_features(onsets: Onsets, duration: float, suffix: str = "") -> Measured:
    """The onset-only keys (also used per stem)."""
    out = Measured()
    times = onsets.times
    out.put(f"onset_count{suffix}", int(times.size))
    if duration > 0:
        out.put(f"onset_density{suffix}", times.size / duration)
    if onsets.envelope.size:
        out.put(f"onset_strength_mean{suffix}", float(np.mean(onsets.envelope)))
        out.put(f"onset_strength_std{suffix}", float(np.std(onsets.envelope)))
    intervals = np.diff(np.sort(times))
    keys = ("ioi_mean", "ioi_std", "rhythmic_complexity", "rhythmic_evenness")
    if intervals.size == 0:
        for key in keys:
            out.omit(f"{key}{suffix}", f"{times.size} onset(s): no inter-onset interval")
        return out
    out.put(f"ioi_mean{suffix}", float(np.mean(intervals)))
    out.put(f"ioi_std{suffix}", float(np.std(intervals)))
    out.put(f"rhythmic_complexity{suffix}", ioi_entropy(intervals))
    out.put(f"rhythmic_evenness{suffix}", 1.0 / (1.0 + float(np.std(intervals) / np.mean(intervals))))
    return out


def ioi_entropy(intervals: np.ndarray) -> float:
    bins = np.minimum((intervals / IOI_BIN).astype(int), int(IOI_MAX / IOI_BIN))
    counts = np.bincount(bins)
    p = counts[counts > 0] / intervals.size
    return float(max(0.0, -np.sum(p * np.log2(p))))


def syncopation(beats: np.ndarray, onsets: Onsets) -> tuple[float, float] | None:
    """(on_beat_ratio, syncopation), or None when there are no onsets to judge."""
    if onsets.times.size == 0 or beats.size < 2:
        return None
    on_beat = _distance_to_nearest(onsets.times, beats) <= _tolerance(beats)
    ratio = float(np.mean(on_beat))
    total = float(np.sum(onsets.strengths))
    if total <= 0:
        return None
    return ratio, float(np.sum(onsets.strengths[~on_beat]) / total)


def rhythm(mono44: np.ndarray, spectra: Spectra, duration: float) -> tuple[Measured, np.ndarray, Onsets]:
    """All mix rhythm keys, plus the beat and onset times for the aux files."""
    onsets = detect_onsets(mono44, spectra)
    beats = track_beats(mono44, onsets)
    out = onset_features(onsets, duration)
    defined = beats.size > 0
    out.put("bpm_is_defined", int(defined))
    out.put("beat_count", int(beats.size))
    beat_keys = ("bpm", "beat_regularity", "on_beat_ratio", "syncopation")
    if not defined:
        for key in beat_keys:
            out.omit(key, "no pulse (bpm_is_defined = 0)")
        return out, beats, onsets
    out.put("bpm", tempo(beats))
    out.put("beat_regularity", float(np.std(np.diff(beats))))
    judged = syncopation(beats, onsets)
    if judged is None:
        out.omit("on_beat_ratio", "no onsets")
        out.omit("syncopation", "no onsets")
    else:
        out.put("on_beat_ratio", judged[0])
        out.put("syncopation", judged[1])
    return out, beats, onsets


def times_text(times: np.ndarray) -> str:
    """One time in seconds per line, for ``.BEATS_GRID`` and ``.ONSETS``."""
    return "".join(f"{t:.4f}\n" for t in times)

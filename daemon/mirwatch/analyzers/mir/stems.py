"""Per-stem keys (suffix ``_<stem>``), measured on each stem that sits beside the mix.

- ``lufs_<stem>``, ``lra_<stem>``: as `loudness` defines them, for all four stems.
- For drums, bass and other:
  - ``onset_density_average_<stem>``, ``onset_density_variance_<stem>``: onsets
    per second in consecutive `WINDOW_SECONDS` windows (the last, shorter
    remainder is dropped), their mean and (population) variance.
  - ``syncopation_<stem>``: share of the stem's onset strength off the mix's
    beats (the stems are sample-aligned with the mix; the mix has the clearest
    pulse).
  - ``rhythmic_complexity_<stem>``, ``rhythmic_evenness_<stem>``: as `rhythm`
    defines them, on the stem's onsets.
- For bass and other: ``harmonic_movement_<stem>``, ``harmonic_variance_<stem>``
  (`chroma`).
"""

from __future__ import annotations

import numpy as np

from ...audio import Audio
from . import Measured, chroma, rhythm, spectra
from .loudness import loudness

RHYTHMIC_STEMS = ("drums", "bass", "other")
HARMONIC_STEMS = ("bass", "other")
WINDOW_SECONDS = 4.0


def stem_features(stem: str, audio: Audio, mix_beats: np.ndarray | None) -> Measured:
    """Every key for one stem; `mix_beats` None means the mix's beats are unknown."""
    suffix = f"_{stem}"
    out = loudness(audio.samples, audio.sample_rate, suffix=suffix)
    if stem not in RHYTHMIC_STEMS:
        return out
    mono44 = spectra.to_analysis_rate(audio.mono, audio.sample_rate)
    duration = mono44.size / spectra.RATE
    spec = spectra.compute(mono44)
    onsets = rhythm.detect_onsets(mono44, spec)

    out.update(onset_density_windows(onsets.times, duration, suffix))
    evenness = rhythm.onset_features(onsets, duration, suffix)
    for key in ("rhythmic_complexity", "rhythmic_evenness"):
        name = key + suffix
        if name in evenness.values:
            out.put(name, evenness.values[name])
        else:
            out.omit(name, evenness.omitted[name])

    if mix_beats is None:
        out.omit(f"syncopation{suffix}", "the mix's beats are unknown (rhythm group off or failed)")
    elif mix_beats.size == 0:
        out.omit(f"syncopation{suffix}", "the mix has no pulse (bpm_is_defined = 0)")
    else:
        judged = rhythm.syncopation(mix_beats, onsets)
        if judged is None:
            out.omit(f"syncopation{suffix}", "no onsets in this stem")
        else:
            out.put(f"syncopation{suffix}", judged[1])

    if stem in HARMONIC_STEMS:
        out.update(chroma.harmonic_change(spec, suffix))
    return out


def onset_density_windows(times: np.ndarray, duration: float, suffix: str) -> Measured:
    out = Measured()
    average, variance = f"onset_density_average{suffix}", f"onset_density_variance{suffix}"
    n_windows = int(duration // WINDOW_SECONDS)
    if n_windows < 2:
        reason = f"shorter than two {WINDOW_SECONDS:g} s windows"
        out.omit(average, reason)
        out.omit(variance, reason)
        return out
    counts = np.bincount((times[times < n_windows * WINDOW_SECONDS] // WINDOW_SECONDS).astype(int), minlength=n_windows)
    density = counts / WINDOW_SECONDS
    out.put(average, float(np.mean(density)))
    out.put(variance, float(np.var(density)))
    return out

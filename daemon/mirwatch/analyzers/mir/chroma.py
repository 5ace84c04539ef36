"""Pitch-class keys, with Essentia's ``SpectralPeaks`` + ``HPCP`` per frame.

- ``chroma_0`` … ``chroma_11``: the track's pitch-class profile, C = 0,
  C♯ = 1 … B = 11: the mean of the per-frame HPCPs (12 bins, 40 Hz – 5 kHz,
  peaks and their harmonics folded onto pitch classes, tuned to A = 440 Hz),
  scaled so that the strongest class is 1.
- ``harmonic_movement_<stem>``: how much the pitch-class content changes from
  one half-second block to the next: the mean total-variation distance
  (half the L1 distance) between consecutive block profiles, each scaled to
  sum 1: 0 for a drone, 1 when consecutive blocks share no pitch class.
- ``harmonic_variance_<stem>``: the mean over the 12 classes of the variance
  across blocks of the block profiles scaled to a maximum of 1 (0 when the
  harmony never changes, at most 0.25).
"""

from __future__ import annotations

import numpy as np

from . import Measured
from .spectra import Spectra

# Reference of HPCP bin 0: C4, so that index 0 is C.
C4 = 440.0 * 2 ** (-9 / 12)
BLOCK_SECONDS = 0.5


def frame_profiles(spectra: Spectra) -> np.ndarray:
    """One 12-bin HPCP per spectrum frame (all zeros where a frame has no peaks)."""
    import essentia.standard as es

    peaks = es.SpectralPeaks(
        sampleRate=spectra.rate,
        maxPeaks=60,
        magnitudeThreshold=1e-3,
        minFrequency=40,
        maxFrequency=5000,
        orderBy="magnitude",
    )
    hpcp = es.HPCP(
        size=12,
        sampleRate=spectra.rate,
        referenceFrequency=C4,
        minFrequency=40,
        maxFrequency=5000,
        harmonics=4,
        weightType="cosine",
        nonLinear=False,
        normalized="unitMax",
    )
    profiles = np.zeros((spectra.magnitude.shape[0], 12), dtype=np.float64)
    for i, frame in enumerate(spectra.magnitude):
        freqs, mags = peaks(frame)
        if freqs.size:
            profiles[i] = hpcp(freqs, mags)
    return profiles


def chroma(spectra: Spectra) -> Measured:
    out = Measured()
    mean = frame_profiles(spectra).mean(axis=0)
    keys = [f"chroma_{i}" for i in range(12)]
    if not mean.max() > 0:
        for key in keys:
            out.omit(key, "no spectral peaks between 40 Hz and 5 kHz (silence or noise floor)")
        return out
    for key, weight in zip(keys, mean / mean.max()):
        out.put(key, float(weight))
    return out


def harmonic_change(spectra: Spectra, suffix: str) -> Measured:
    out = Measured()
    movement_key, variance_key = f"harmonic_movement{suffix}", f"harmonic_variance{suffix}"
    profiles = frame_profiles(spectra)
    per_block = max(1, int(round(BLOCK_SECONDS * spectra.frame_rate)))
    n_blocks = profiles.shape[0] // per_block
    blocks = profiles[: n_blocks * per_block].reshape(n_blocks, per_block, 12).mean(axis=1)
    blocks = blocks[blocks.max(axis=1) > 0]
    if blocks.shape[0] < 2:
        reason = "fewer than two half-second blocks with pitched content"
        out.omit(movement_key, reason)
        out.omit(variance_key, reason)
        return out
    shares = blocks / blocks.sum(axis=1, keepdims=True)
    out.put(movement_key, float(np.mean(0.5 * np.abs(np.diff(shares, axis=0)).sum(axis=1))))
    peaks = blocks / blocks.max(axis=1, keepdims=True)
    out.put(variance_key, float(np.mean(np.var(peaks, axis=0))))
    return out

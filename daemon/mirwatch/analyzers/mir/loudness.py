"""``lufs`` and ``lra``: ITU-R BS.1770-4 / EBU R128 (Tech 3341, 3342) via Essentia.

- ``lufs``: integrated loudness, gated, in LUFS.
- ``lra``: loudness range in LU (the spread between the 10th and 95th
  percentiles of the gated 3 s short-term loudness).

Measured on the file's own channels at its own rate (K-weighting is defined
per rate). A mono file is measured as one channel, as BS.1770 defines it,
not as two copies (which would read 3 LU louder). More than two channels are
folded to mono: Essentia's meter takes stereo only, and music libraries hold
almost no surround files.
"""

from __future__ import annotations

import numpy as np

from . import Measured, resident

# Essentia reports the absolute gate itself when no block passes it.
ABSOLUTE_GATE = -70.0
# LRA needs at least one 3 s short-term block.
SHORT_TERM_SECONDS = 3.0


def loudness(samples: np.ndarray, rate: int, suffix: str = "") -> Measured:
    out = Measured()
    lufs_key, lra_key = f"lufs{suffix}", f"lra{suffix}"
    stereo = _as_stereo(samples)
    _, _, integrated, loudness_range = resident.compute("LoudnessEBUR128", {"sampleRate": float(rate)}, stereo)
    if not integrated > ABSOLUTE_GATE:
        reason = "no 400 ms block above the -70 LUFS absolute gate (silence)"
        out.omit(lufs_key, reason)
        out.omit(lra_key, reason)
        return out
    out.put(lufs_key, integrated)
    if stereo.shape[0] < SHORT_TERM_SECONDS * rate:
        out.omit(lra_key, f"shorter than the {SHORT_TERM_SECONDS:g} s short-term window LRA needs")
    else:
        out.put(lra_key, loudness_range)
    return out


def _as_stereo(samples: np.ndarray) -> np.ndarray:
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim == 1:
        samples = samples[:, None]
    if samples.shape[1] == 2:
        return np.ascontiguousarray(samples)
    mono = samples[:, 0] if samples.shape[1] == 1 else samples.mean(axis=1)
    # One channel on the left and silence on the right sums to exactly that channel's power.
    return np.ascontiguousarray(np.stack([mono, np.zeros_like(mono)], axis=1), dtype=np.float32)

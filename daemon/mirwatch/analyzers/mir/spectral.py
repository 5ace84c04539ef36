"""Spectral-shape and band-energy keys, from the shared 44.1 kHz spectra.

Computed on the whole spectrogram at once (numpy) rather than frame by frame
through Essentia's per-frame algorithms, which cost more in Python calls than
in arithmetic; `tests/test_features_known_answers.py` checks the shape
statistics against Essentia's ``Flatness`` / ``CentralMoments`` /
``DistributionShape`` on the same frames.

Shape statistics are means over the frames that are not silent (frame power
more than 100 dB below full scale would only measure dither):

- ``spectral_flatness``: geometric over arithmetic mean of the power
  spectrum (Wiener entropy), 0 for a pure tone, about 0.56 for white noise.
- ``spectral_flux``: Euclidean distance between consecutive magnitude
  spectra, each scaled to unit length: 0 for a steady sound, at most √2;
  independent of level.
- ``spectral_skewness``, ``spectral_kurtosis``: third and fourth standardised
  moments of the magnitude spectrum taken as a distribution over frequency
  (kurtosis as excess kurtosis, 0 for a normal shape), as Essentia's
  ``DistributionShape`` defines them.

Band energies are RMS levels in dBFS (a full-scale sine reads -3.01 dB) of the
part of the signal in each band, from the power spectrum by Parseval over
all frames: ``rms_energy_bass`` 20–120 Hz, ``rms_energy_body`` 120–600 Hz,
``rms_energy_mid`` 600–2500 Hz, ``rms_energy_air`` 2500–22000 Hz (bins whose
centre lies in [low, high)).
"""

from __future__ import annotations

import numpy as np

from . import Measured
from .spectra import Spectra

BANDS = {
    "rms_energy_bass": (20.0, 120.0),
    "rms_energy_body": (120.0, 600.0),
    "rms_energy_mid": (600.0, 2500.0),
    "rms_energy_air": (2500.0, 22000.0),
}
SILENT_FRAME_DB = -100.0
BLOCK_FRAMES = 4096
SHAPE_KEYS = ("spectral_flatness", "spectral_flux", "spectral_skewness", "spectral_kurtosis")


def frame_power(spectra: Spectra) -> np.ndarray:
    """Mean signal power of each frame (Parseval: one-sided bins count twice, but DC and Nyquist)."""
    mag = spectra.magnitude
    total = 2.0 * np.einsum("ij,ij->i", mag, mag, dtype=np.float64)
    total -= mag[:, 0].astype(np.float64) ** 2 + mag[:, -1].astype(np.float64) ** 2
    return total / (spectra.frame * spectra.window_power)


def band_power(spectra: Spectra, low: float, high: float) -> float:
    """Mean signal power in [low, high) Hz over the whole signal."""
    freqs = spectra.frequencies
    in_band = (freqs >= low) & (freqs < high)
    mag = spectra.magnitude[:, in_band]
    # Interior bins stand for their negative-frequency twin as well.
    twice = np.where((freqs[in_band] > 0) & (freqs[in_band] < spectra.rate / 2), 2.0, 1.0)
    per_bin = np.einsum("ij,ij->j", mag, mag, dtype=np.float64) / mag.shape[0] if mag.shape[0] else 0.0
    return float(np.sum(twice * per_bin) / (spectra.frame * spectra.window_power))


def spectral_shape(spectra: Spectra) -> Measured:
    out = Measured()
    loud = 10 * np.log10(np.maximum(frame_power(spectra), 1e-30)) > SILENT_FRAME_DB
    if not loud.any():
        for key in SHAPE_KEYS:
            out.omit(key, "no frame above -100 dBFS (silence)")
        return out
    per_frame = {name: [] for name in ("flatness", "flux", "skewness", "kurtosis")}
    # In blocks of frames: a 20-minute track's spectrogram is 200 MB, and each
    # whole-matrix temporary would be as large again.
    for block in range(0, spectra.magnitude.shape[0], BLOCK_FRAMES):
        # One frame of overlap, for the flux across the block boundary.
        first = max(block - 1, 0)
        mag = spectra.magnitude[first : block + BLOCK_FRAMES]
        keep = loud[first : block + BLOCK_FRAMES]
        own = keep[block - first :]
        flatness, skewness, kurtosis = _frame_shape(mag[block - first :][own], spectra.frequencies)
        per_frame["flatness"].append(flatness)
        per_frame["skewness"].append(skewness)
        per_frame["kurtosis"].append(kurtosis)
        norms = np.sqrt(np.einsum("ij,ij->i", mag, mag, dtype=np.float64))
        unit = mag / np.maximum(norms, 1e-30)[:, None].astype(np.float32)
        steps = np.linalg.norm(np.diff(unit, axis=0), axis=1)
        per_frame["flux"].append(steps[keep[1:] & keep[:-1]])
    merged = {name: np.concatenate(parts) for name, parts in per_frame.items()}
    out.put("spectral_flatness", float(np.mean(merged["flatness"])))
    if merged["flux"].size:
        out.put("spectral_flux", float(np.mean(merged["flux"])))
    else:
        out.omit("spectral_flux", "no two consecutive frames above -100 dBFS")
    # A frame whose energy sits in one bin has no spread, so no shape: it is skipped, not zero.
    for name in ("skewness", "kurtosis"):
        values = merged[name][np.isfinite(merged[name])]
        if values.size:
            out.put(f"spectral_{name}", float(np.mean(values)))
        else:
            out.omit(f"spectral_{name}", "no frame with spectral spread")
    return out


def _frame_shape(mag: np.ndarray, freqs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per frame: flatness of the power spectrum, skewness and excess kurtosis of the magnitude."""
    power = mag * mag
    # log(0) from exact zeros would turn a near-tone into -inf; a floor far below any real bin keeps it finite.
    geometric = np.exp(np.log(power + np.float32(1e-20)).mean(axis=1, dtype=np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        flatness = geometric / power.mean(axis=1, dtype=np.float64)
    skewness, kurtosis = _shape_moments(mag, freqs)
    return flatness[np.isfinite(flatness)], skewness, kurtosis


def _shape_moments(mag: np.ndarray, freqs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Skewness and excess kurtosis of each frame's magnitude over frequency (NaN without spread)."""
    # Raw moments by matrix products (one pass each), in kHz so that the fourth power stays small.
    khz = freqs / 1000.0
    wide = mag.astype(np.float64)
    mass = wide.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        raw = [wide @ khz**k / mass for k in (1, 2, 3, 4)]
        c = raw[0]
        m2 = raw[1] - c**2
        m3 = raw[2] - 3 * c * raw[1] + 2 * c**3
        m4 = raw[3] - 4 * c * raw[2] + 6 * c**2 * raw[1] - 3 * c**4
        spread = np.where(m2 > 1e-12, m2, np.nan)
        return m3 / spread**1.5, m4 / spread**2 - 3.0


def band_energy(spectra: Spectra) -> Measured:
    out = Measured()
    for key, (low, high) in BANDS.items():
        total = band_power(spectra, low, high)
        if total <= 0.0:
            out.omit(key, "no energy at all in the band (digital silence)")
        else:
            out.put(key, 10.0 * np.log10(total))
    return out

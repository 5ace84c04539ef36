"""The short-time spectrum shared by the spectral, chroma and rhythm groups.

All of them read the mono mix resampled to 44.1 kHz, because Essentia's beat
tracker and onset detector are built for that rate and one rate keeps every
frame-based definition independent of the file's own rate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...audio import resample

RATE = 44_100
FRAME = 2048
HOP = 1024


@dataclass(frozen=True)
class Spectra:
    """Hann-windowed magnitude spectra, shaped (frames, FRAME // 2 + 1)."""

    magnitude: np.ndarray
    rate: int = RATE
    frame: int = FRAME
    hop: int = HOP

    @property
    def frame_rate(self) -> float:
        return self.rate / self.hop

    @property
    def frequencies(self) -> np.ndarray:
        return np.arange(self.magnitude.shape[1]) * (self.rate / self.frame)

    @property
    def window_power(self) -> float:
        """Sum of the squared window, to turn |X|² back into signal power (Parseval)."""
        import essentia.standard as es

        window = es.Windowing(type="hann", size=self.frame, normalized=False, zeroPhase=False)
        return float(np.sum(window(np.ones(self.frame, dtype=np.float32)).astype(np.float64) ** 2))


def to_analysis_rate(mono: np.ndarray, rate: int) -> np.ndarray:
    """Mono at 44.1 kHz, resampled like everything else in mirwatch (`audio.resample`)."""
    return resample(mono, rate, RATE)


def compute(mono44: np.ndarray) -> Spectra:
    import essentia.standard as es

    signal = np.ascontiguousarray(mono44, dtype=np.float32)
    if signal.size < FRAME:
        signal = np.pad(signal, (0, FRAME - signal.size))
    window = es.Windowing(type="hann", size=FRAME, normalized=False, zeroPhase=False)
    spectrum = es.Spectrum(size=FRAME)
    frames = es.FrameGenerator(signal, frameSize=FRAME, hopSize=HOP, startFromZero=True)
    magnitude = np.array([spectrum(window(frame)) for frame in frames], dtype=np.float32)
    return Spectra(magnitude=magnitude)

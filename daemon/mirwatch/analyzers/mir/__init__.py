"""Numeric MIR features, one module per group; each key is defined where it is computed.

- `loudness`: ``lufs``, ``lra`` (ITU-R BS.1770 / EBU R128, stereo at the file's own rate)
- `rhythm`: ``bpm`` … ``ioi_std`` and the beat/onset times for ``.BEATS_GRID`` / ``.ONSETS``
- `spectral`: ``spectral_flatness``, ``spectral_flux``, ``spectral_skewness``,
  ``spectral_kurtosis`` and the ``rms_energy_*`` bands
- `chroma`: ``chroma_0`` … ``chroma_11`` and the harmonic movement/variance of stems
- `stems`: every ``*_<stem>`` key
- `spectra`: the one short-time spectrum that spectral, chroma and rhythm share

A group never writes a value it could not measure: a feature that has no
value for this signal (silence, too short) goes into `Measured.omitted` with
the reason instead, and so does anything that came out NaN or infinite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class Measured:
    values: dict[str, float | int] = field(default_factory=dict)
    omitted: dict[str, str] = field(default_factory=dict)

    def put(self, key: str, value: float | int) -> None:
        if isinstance(value, (bool, int)) and not isinstance(value, float):
            self.values[key] = int(value)
            return
        value = float(value)
        if math.isfinite(value):
            self.values[key] = value
        else:
            self.omitted[key] = f"computed as {value}"

    def omit(self, key: str, reason: str) -> None:
        self.omitted[key] = reason

    def update(self, other: "Measured") -> None:
        self.values.update(other.values)
        self.omitted.update(other.omitted)

"""The numeric MIR features of a track: rhythm, loudness, spectrum, bands, chroma, stems.

Each feature group is computed in its own try-block: when one fails, its keys
are left out of the sidecar and the reason is logged and kept under
``provenance["failed"][group]``; the other groups still report. Values that a
group cannot define for this signal (LUFS of silence, intervals of a single
onset) are left out the same way, under ``provenance["omitted"][key]``.
Definitions of every key are in the modules of `mirwatch.analyzers.mir`.

Audio Commons timbral features (brightness, warmth, ...) are not computed:
the only implementation, ``timbral_models`` 0.4.0 (2019), does not install
with current numpy/scikit-learn, and no maintained one exists.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable

import numpy as np
import structlog

from ..config import FeaturesConfig
from ..models.store import ModelStore
from .base import STEM_NAMES, Analyzer, Cancelled, ModelLoadError, Result, Track
from .mir import Measured, chroma, loudness, rhythm, spectra, spectral, stems

# Bump when a definition changes: old sidecars become stale.
FEATURES_VERSION = 2  # 2: resampled to 44.1 kHz with soxr (was Essentia's fastest sinc)
GROUPS = ("loudness", "rhythm", "spectral", "bands", "chroma", "stems")
NOT_COMPUTED = {
    "timbral": "timbral_models 0.4.0 (2019), the only Audio Commons implementation, "
    "does not install with current numpy/scikit-learn",
}

log = structlog.get_logger(__name__)


class _Shared:
    """Signals derived once per track and shared by the groups that need them."""

    def __init__(self, track: Track) -> None:
        self.track = track
        # None until the rhythm group ran; stems need the mix's beats.
        self.beats: np.ndarray | None = None

    @functools.cached_property
    def mono44(self) -> np.ndarray:
        audio = self.track.audio
        return spectra.to_analysis_rate(audio.mono, audio.sample_rate)

    @functools.cached_property
    def spectra(self) -> spectra.Spectra:
        return spectra.compute(self.mono44)

    @property
    def duration(self) -> float:
        return self.track.audio.duration


class FeaturesAnalyzer(Analyzer):
    name = "features"
    stage = "cpu"
    version = str(FEATURES_VERSION)

    def __init__(self, cfg: FeaturesConfig, store: ModelStore | None) -> None:
        self.cfg = cfg
        self.store = store

    @property
    def uses_stems(self) -> bool:
        """A stem added or replaced beside the mix makes this analyzer's keys stale."""
        return "stems" in self.enabled_groups()

    def enabled_groups(self) -> tuple[str, ...]:
        if not self.cfg.enabled:
            return ()
        return tuple(g for g in GROUPS if getattr(self.cfg, g))

    def load(self) -> None:
        try:
            import essentia.standard  # noqa: F401
        except ImportError as exc:  # pragma: no cover - essentia is a hard dependency
            raise ModelLoadError(f"essentia is not importable: {exc}") from None

    def model_files(self) -> dict[str, str]:
        return {}

    def settings(self) -> dict[str, Any]:
        return {"version": FEATURES_VERSION, "groups": list(self.enabled_groups())}

    def analyze(self, track: Track) -> Result:
        shared = _Shared(track)
        result = Result()
        failed: dict[str, str] = {}
        omitted: dict[str, str] = {}
        seconds: dict[str, float] = {}
        runners: dict[str, Callable[[_Shared, Result], Measured]] = {
            "loudness": self._loudness,
            "rhythm": self._rhythm,
            "spectral": lambda s, r: spectral.spectral_shape(s.spectra),
            "bands": lambda s, r: spectral.band_energy(s.spectra),
            "chroma": lambda s, r: chroma.chroma(s.spectra),
            "stems": self._stems_into(failed),
        }
        for group in self.enabled_groups():
            track.check_cancelled()
            started = time.perf_counter()
            try:
                measured = runners[group](shared, result)
            except Cancelled:
                raise
            except Exception as exc:  # one group's failure must not take the others down
                reason = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
                failed[group] = reason
                log.warning("feature group failed", group=group, track=str(track.flac), reason=reason)
                continue
            finally:
                seconds[group] = round(time.perf_counter() - started, 4)
            result.values.update(measured.values)
            omitted.update(measured.omitted)
        result.provenance = {
            "version": FEATURES_VERSION,
            "groups": list(self.enabled_groups()),
            "failed": failed,
            "omitted": omitted,
            "not_computed": dict(NOT_COMPUTED),
            "group_seconds": seconds,
        }
        return result

    @staticmethod
    def _loudness(shared: _Shared, result: Result) -> Measured:
        audio = shared.track.audio
        return loudness.loudness(audio.samples, audio.sample_rate)

    @staticmethod
    def _rhythm(shared: _Shared, result: Result) -> Measured:
        measured, beats, onsets = rhythm.rhythm(shared.mono44, shared.spectra, shared.duration)
        shared.beats = beats
        result.aux[".BEATS_GRID"] = rhythm.times_text(beats)
        result.aux[".ONSETS"] = rhythm.times_text(onsets.times)
        return measured

    @staticmethod
    def _stems_into(failed: dict[str, str]) -> Callable[[_Shared, Result], Measured]:
        def run(shared: _Shared, result: Result) -> Measured:
            track = shared.track
            out = Measured()
            for stem in (s for s in STEM_NAMES if s in track.stems):
                track.check_cancelled()
                try:
                    audio = track.stem_audio(stem)
                    out.update(stems.stem_features(stem, audio, shared.beats))
                except Cancelled:
                    raise
                except Exception as exc:
                    reason = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
                    failed[f"stems.{stem}"] = reason
                    log.warning("stem features failed", stem=stem, track=str(track.flac), reason=reason)
            return out

        return run

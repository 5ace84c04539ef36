"""One track through every analyzer: decode once, run, merge into the sidecar.

`Pipeline` owns the analyzers (built from config, loaded once) and knows
nothing about queues or threads; the daemon's `Worker` and ``mirwatch
analyze`` both drive it. A track goes through two halves: `prepare` (decode
plus the CPU analyzers, which may run ahead), then `infer` (the GPU analyzers)
and `write` (the sidecar).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import __version__, sidecar
from .analyzers.base import Analyzer, Result, Track
from .audio import decode
from .config import Config
from .models.store import ModelStore
from .reconcile import fingerprint, source_identity, stale_analyzers


def build_analyzers(cfg: Config, store: ModelStore, log: Any) -> list[Analyzer]:
    """The enabled analyzers, in the order they run. Heavy imports happen here."""
    analyzers: list[Analyzer] = []
    if cfg.essentia.enabled:
        from .analyzers.essentia_tags import EssentiaAnalyzer

        analyzers.append(EssentiaAnalyzer(cfg.essentia, store))
    if cfg.features.enabled:
        from .analyzers.features import FeaturesAnalyzer

        analyzers.append(FeaturesAnalyzer(cfg.features, store))
    if cfg.features.enabled and cfg.features.aesthetics != "off":
        from .analyzers import aesthetics

        wanted, why = aesthetics.AestheticsAnalyzer.wanted(cfg.features)
        if wanted:
            analyzers.append(aesthetics.AestheticsAnalyzer(cfg.features, store))
        else:
            log.info("analyzer_disabled", analyzer="aesthetics", reason=why)
    if cfg.flamingo.enabled != "off":
        from .analyzers import flamingo

        wanted, why = flamingo.FlamingoAnalyzer.wanted(cfg.flamingo)
        if not wanted:
            log.info("analyzer_disabled", analyzer="flamingo", reason=why)
        elif cfg.flamingo.backend == "gguf":
            from .analyzers.flamingo_gguf import FlamingoGGUFAnalyzer

            analyzers.append(FlamingoGGUFAnalyzer(cfg.flamingo, store, log=log))
        else:
            analyzers.append(flamingo.FlamingoAnalyzer(cfg.flamingo, store))
    return analyzers


@dataclass
class Prepared:
    """A track after the CPU half: decoded, with the CPU analyzers' results."""

    track: Track
    selected: set[str]
    # Taken before decoding, so a file replaced mid-job is seen as changed later.
    identity: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Result] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)


class Pipeline:
    def __init__(self, cfg: Config, log: Any, analyzers: list[Analyzer] | None = None) -> None:
        self.cfg = cfg
        self.log = log
        self.store = ModelStore(cfg.models.dir)
        self.analyzers = analyzers if analyzers is not None else build_analyzers(cfg, self.store, log)
        self.fingerprints: dict[str, str] = {}
        self.model_shas: dict[str, dict[str, str]] = {}

    @property
    def stem_users(self) -> frozenset[str]:
        return frozenset(a.name for a in self.analyzers if getattr(a, "uses_stems", False))

    def load(self) -> None:
        """Load every model once. Raises `ModelLoadError` naming the file."""
        for analyzer in self.analyzers:
            started = time.monotonic()
            analyzer.load()
            files = analyzer.model_files()
            self.model_shas[analyzer.name] = files
            self.fingerprints[analyzer.name] = fingerprint(
                str(getattr(analyzer, "version", "1")), analyzer.settings(), files
            )
            self.log.info("models_loaded", analyzer=analyzer.name, stage=analyzer.stage,
                          files=len(files), seconds=round(time.monotonic() - started, 3))

    def close(self) -> None:
        for analyzer in self.analyzers:
            analyzer.close()

    def select(self, flac: Path, *, force: bool) -> set[str]:
        """The analyzers this track needs: all when forced, else the stale ones."""
        if force:
            return set(self.fingerprints)
        return stale_analyzers(flac, self.fingerprints, self.stem_users)

    def prepare(self, flac: Path, selected: set[str], cancel: threading.Event | None = None) -> Prepared:
        started = time.monotonic()
        max_duration = self.cfg.worker.max_duration
        identity = source_identity(flac)
        audio = decode(flac, max_duration=max_duration)
        track = Track(flac=flac, audio=audio, cancel=cancel or threading.Event(), max_duration=max_duration)
        prepared = Prepared(track=track, selected=selected, identity=identity, started=started)
        prepared.seconds["decode"] = time.monotonic() - started
        self._run_stage(prepared, "cpu")
        return prepared

    def infer(self, prepared: Prepared) -> None:
        """The GPU half: analyzers that run on the resident GPU models."""
        self._run_stage(prepared, "gpu")

    def write(self, prepared: Prepared, *, on_corrupt: Any = None) -> Path:
        """Merge every result of the track into its sidecar (and aux files)."""
        track = prepared.track
        track.check_cancelled()
        total = time.monotonic() - prepared.started
        analyzed = {}
        aux: dict[str, str] = {}
        for name, result in prepared.results.items():
            prov = dict(result.provenance)
            prov.update(
                fingerprint=self.fingerprints[name],
                seconds=round(prepared.seconds[name], 3),
                models=self.model_shas.get(name, {}),
            )
            analyzed[name] = (result.values, prov)
            aux.update(result.aux)
        audio = track.audio
        common = {
            "version": __version__,
            "analyzed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": {
                "file": track.flac.name,
                **prepared.identity,
                "duration": round(audio.source_duration or audio.duration, 3),
                "sample_rate": audio.sample_rate,
                "channels": audio.channels,
                "truncated_to": round(audio.duration, 3) if audio.truncated else None,
            },
            "decode_seconds": round(prepared.seconds["decode"], 3),
            "total_seconds": round(total, 3),
            "realtime_factor": round(audio.duration / total, 2) if total > 0 else None,
        }
        return sidecar.update(track.flac, analyzed, common, aux, on_corrupt=on_corrupt)

    def _run_stage(self, prepared: Prepared, stage: str) -> None:
        for analyzer in self.analyzers:
            if analyzer.stage != stage or analyzer.name not in prepared.selected:
                continue
            prepared.track.check_cancelled()
            self.log.debug("analyzer_started", analyzer=analyzer.name, path=str(prepared.track.flac))
            started = time.monotonic()
            prepared.results[analyzer.name] = analyzer.analyze(prepared.track)
            seconds = time.monotonic() - started
            prepared.seconds[analyzer.name] = seconds
            self.log.info("analyzer_done", analyzer=analyzer.name, path=str(prepared.track.flac),
                          seconds=round(seconds, 3),
                          realtime_factor=round(prepared.track.audio.duration / seconds, 1) if seconds else None)

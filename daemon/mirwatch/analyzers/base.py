"""What every analyzer is: load models once, then describe tracks one by one.

An analyzer is built from config, `load()`ed once by the worker at start-up
(before the daemon reports ready), and then called with one `Track` at a time.
It never decodes audio itself: the `Track` carries the decoded signal that all
analyzers of a job share.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from ..audio import Audio, decode

STEM_NAMES = ("drums", "bass", "other", "vocals")
STEM_SUFFIXES = (".flac", ".wav", ".ogg", ".mp3", ".aiff", ".aif")


class AnalysisError(Exception):
    """This track cannot be analysed; the message is the reason, one line.

    ``permanent=True`` says that trying again cannot help (the audio itself
    is unusable), so the job fails at once instead of using up its attempts.
    """

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class Cancelled(Exception):
    """The daemon is stopping; the job goes back to the queue untouched."""


class ModelLoadError(Exception):
    """A model file is missing, corrupt or incompatible (fatal at start-up)."""


@dataclass(eq=False)
class Track:
    """One job's input: the mix, its folder and the decoded audio."""

    flac: Path
    audio: Audio
    cancel: threading.Event = field(default_factory=threading.Event)
    max_duration: float | None = None

    @property
    def folder(self) -> Path:
        return self.flac.parent

    @property
    def name(self) -> str:
        return self.flac.parent.name

    @functools.cached_property
    def stems(self) -> dict[str, Path]:
        """Stem files beside the mix, by stem name (``drums.flac`` -> ``drums``)."""
        return find_stems(self.folder)

    def stem_audio(self, stem: str) -> Audio:
        """Decoded stem, cached for the other analyzers of this job."""
        cache = self.__dict__.setdefault("_stem_cache", {})
        if stem not in cache:
            cache[stem] = decode(self.stems[stem], max_duration=self.max_duration)
        return cache[stem]

    def check_cancelled(self) -> None:
        if self.cancel.is_set():
            raise Cancelled()


def find_stems(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return found
    for entry in entries:
        stem, suffix = entry.stem.lower(), entry.suffix.lower()
        if stem in STEM_NAMES and suffix in STEM_SUFFIXES and stem not in found and entry.is_file():
            found[stem] = entry
    return found


@dataclass
class Result:
    """What one analyzer produced for one track."""

    # Top-level sidecar keys.
    values: dict[str, Any] = field(default_factory=dict)
    # Recorded under ``mirwatch.analyzers.<name>`` (durations are added by the worker).
    provenance: dict[str, Any] = field(default_factory=dict)
    # Files written beside the sidecar: suffix (".BEATS_GRID") -> text.
    aux: dict[str, str] = field(default_factory=dict)


class Analyzer(ABC):
    """Base class. Subclasses set `name` and `stage` and implement the rest."""

    name: ClassVar[str]
    # "cpu" analyzers run in the prefetch thread, ahead of the "gpu" worker thread.
    stage: ClassVar[Literal["cpu", "gpu"]] = "cpu"

    @abstractmethod
    def load(self) -> None:
        """Load every model into memory. Raise `ModelLoadError` with the file name."""

    @abstractmethod
    def model_files(self) -> dict[str, str]:
        """File name -> sha256 of each model file loaded (for provenance and staleness)."""

    def settings(self) -> dict[str, Any]:
        """Settings that change the output; a change makes old sidecars stale."""
        return {}

    @abstractmethod
    def analyze(self, track: Track) -> Result:
        """Describe one track. Raise `AnalysisError` for a per-track failure."""

    def close(self) -> None:
        """Release models (called once at shutdown)."""


def sha256_file(path: Path, *, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()

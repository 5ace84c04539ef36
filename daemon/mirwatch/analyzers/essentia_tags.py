"""Essentia tags: genre, mood, instrument, danceability and atonality.

The Discogs-EffNet embeddings are computed once per track and every head
reads them. Each head's metadata JSON (published beside its ``.pb``) is the
only source of its node names and label order: the published files differ
(``PartitionedCall:0`` vs ``model/Sigmoid``, ``["atonal", "tonal"]``), and a
hard-coded column silently inverts a value. Danceability and atonality come
either from two more heads on the same embeddings ("effnet", the default) or
from the legacy VGGish classifiers on the audio ("vggish", much slower); the
provenance names the files, so a reader knows which a sidecar holds.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import EssentiaConfig
from ..models.store import ModelStore
from .base import Analyzer, AnalysisError, ModelLoadError, Result, Track

FOLDER = "essentia"
EMBEDDING_MODEL = "discogs-effnet-bs64-1"
# sidecar key -> model stem
TAG_HEADS = {
    "essentia_genre": "genre_discogs400-discogs-effnet-1",
    "essentia_mood": "mtg_jamendo_moodtheme-discogs-effnet-1",
    "essentia_instrument": "mtg_jamendo_instrument-discogs-effnet-1",
}
SCALAR_HEADS = {
    "effnet": {"danceability": "danceability-discogs-effnet-1", "atonality": "tonal_atonal-discogs-effnet-1"},
    "vggish": {"danceability": "danceability-vggish-audioset-1", "atonality": "tonal_atonal-vggish-audioset-1"},
}
# The value is the mean probability of the class with this NAME.
SCALAR_LABELS = {"danceability": "danceable", "atonality": "atonal"}
CONFIG_SWITCH = {
    "essentia_genre": "genre",
    "essentia_mood": "mood",
    "essentia_instrument": "instrument",
    "danceability": "danceability",
    "atonality": "atonality",
}
# Discogs-EffNet reads 128 mel frames (hop 256 at 16 kHz) per patch: shorter
# audio yields no patch at all, so there is nothing to average.
MIN_SECONDS = 2.1


@dataclass
class _Head:
    key: str
    stem: str
    classes: list[str]
    algorithm: Any

    @property
    def file(self) -> str:
        return f"{self.stem}.pb"


class EssentiaAnalyzer(Analyzer):
    name = "essentia"
    stage = "cpu"

    def __init__(self, cfg: EssentiaConfig, store: ModelStore) -> None:
        self.cfg = cfg
        self.store = store
        self._embedding: Any = None
        self._effnet_heads: list[_Head] = []
        self._vggish_heads: list[_Head] = []
        self._files: dict[str, str] = {}
        # Essentia algorithms keep per-call state: one track at a time.
        self._lock = threading.Lock()

    # -- configuration -----------------------------------------------------

    def parts(self) -> list[str]:
        """Sidecar keys this configuration produces."""
        if not self.cfg.enabled:
            return []
        return [key for key, switch in CONFIG_SWITCH.items() if getattr(self.cfg, switch)]

    def settings(self) -> dict[str, Any]:
        return {
            "parts": self.parts(),
            "danceability_atonality": self.cfg.danceability_atonality,
            "threshold": self.cfg.threshold,
            "top_k": self.cfg.top_k,
        }

    def _plan(self) -> tuple[dict[str, str], dict[str, str]]:
        """(effnet heads, vggish classifiers) as sidecar key -> model stem."""
        effnet: dict[str, str] = {}
        vggish: dict[str, str] = {}
        scalar_family = SCALAR_HEADS[self.cfg.danceability_atonality]
        for key in self.parts():
            if key in TAG_HEADS:
                effnet[key] = TAG_HEADS[key]
            elif self.cfg.danceability_atonality == "effnet":
                effnet[key] = scalar_family[key]
            else:
                vggish[key] = scalar_family[key]
        return effnet, vggish

    # -- loading -------------------------------------------------------------

    def load(self) -> None:
        effnet, vggish = self._plan()
        if not effnet and not vggish:
            return
        import essentia.standard as es  # deferred: importing essentia starts TensorFlow

        if effnet:
            meta = self._metadata(EMBEDDING_MODEL)
            self._embedding = self._configure(
                EMBEDDING_MODEL, es.TensorflowPredictEffnetDiscogs,
                input=_input_name(meta, EMBEDDING_MODEL), output=_output_name(meta, "embeddings", EMBEDDING_MODEL),
            )
            self._effnet_heads = [self._head(key, stem, es.TensorflowPredict2D) for key, stem in effnet.items()]
        self._vggish_heads = [self._head(key, stem, es.TensorflowPredictVGGish) for key, stem in vggish.items()]
        self._check_widths()

    def _metadata(self, stem: str) -> dict[str, Any]:
        name = f"{FOLDER}/{stem}.json"
        path = self.store.require(name)
        self._files[name] = self.store.sha256(name)
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
            meta["schema"]["inputs"][0]["name"]
            meta["schema"]["outputs"]
        except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
            raise ModelLoadError(f"{path}: not an Essentia model metadata file ({type(exc).__name__}: {exc})") from None
        return meta

    def _configure(self, stem: str, algorithm: Any, **params: str) -> Any:
        name = f"{FOLDER}/{stem}.pb"
        path = self.store.require(name)
        self._files[name] = self.store.sha256(name)
        try:
            return algorithm(graphFilename=str(path), **params)
        except RuntimeError as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "unknown error"
            raise ModelLoadError(f"{path}: Essentia cannot load this graph: {reason}") from None

    def _head(self, key: str, stem: str, algorithm: Any) -> _Head:
        meta = self._metadata(stem)
        classes = meta.get("classes")
        if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
            raise ModelLoadError(f"{FOLDER}/{stem}.json: 'classes' must be a non-empty list of labels")
        wanted = SCALAR_LABELS.get(key)
        if wanted is not None and wanted not in classes:
            raise ModelLoadError(f"{FOLDER}/{stem}.json: no class named {wanted!r} (classes: {classes})")
        algo = self._configure(stem, algorithm, input=_input_name(meta, stem),
                               output=_output_name(meta, "predictions", stem))
        return _Head(key, stem, classes, algo)

    def _check_widths(self) -> None:
        """Run silence through every graph once: a JSON paired with the wrong
        graph shows up here, at start-up, instead of as shifted labels."""
        silence = np.zeros(int(MIN_SECONDS * 16000) + 1600, dtype=np.float32)
        if self._embedding is not None:
            embeddings = self._embed(silence, EMBEDDING_MODEL)
            for head in self._effnet_heads:
                _check_width(head, np.asarray(head.algorithm(embeddings)))
        for head in self._vggish_heads:
            _check_width(head, np.asarray(head.algorithm(silence)))

    def model_files(self) -> dict[str, str]:
        return dict(self._files)

    # -- analysis ------------------------------------------------------------

    def analyze(self, track: Track) -> Result:
        if self._embedding is None and not self._vggish_heads:
            return Result()
        signal = np.ascontiguousarray(track.audio.mono_16k, dtype=np.float32)
        seconds = signal.size / 16000
        if seconds < MIN_SECONDS:
            raise AnalysisError(
                f"too short for the Essentia models: {seconds:.2f} s of audio, at least {MIN_SECONDS} s needed",
                permanent=True,
            )
        values: dict[str, Any] = {}
        files: dict[str, str] = {}
        provenance: dict[str, Any] = {"danceability_atonality": self.cfg.danceability_atonality, "files": files}
        with self._lock:
            if self._embedding is not None:
                track.check_cancelled()
                embeddings = self._embed(signal, track.name)
                files["embeddings"] = f"{EMBEDDING_MODEL}.pb"
                provenance["patches"] = int(embeddings.shape[0])
                for head in self._effnet_heads:
                    track.check_cancelled()
                    values[head.key] = self._summarise(head, _run(head, embeddings))
                    files[head.key] = head.file
            for head in self._vggish_heads:
                track.check_cancelled()
                values[head.key] = self._summarise(head, _run(head, signal))
                files[head.key] = head.file
        # Keys in the configured order, whichever family produced them.
        ordered = {key: values[key] for key in self.parts() if key in values}
        return Result(values=ordered, provenance=provenance)

    def _embed(self, signal: np.ndarray, what: str) -> np.ndarray:
        embeddings = np.asarray(self._embedding(signal), dtype=np.float32)
        if embeddings.ndim != 2 or embeddings.shape[0] == 0:
            raise AnalysisError(f"{what}: Discogs-EffNet produced no embeddings (audio too short?)")
        return embeddings

    def _summarise(self, head: _Head, predictions: np.ndarray) -> Any:
        mean = predictions.mean(axis=0)
        label = SCALAR_LABELS.get(head.key)
        if label is not None:
            return round(float(np.clip(mean[head.classes.index(label)], 0.0, 1.0)), 4)
        return top_labels(head.classes, mean, threshold=self.cfg.threshold, top_k=self.cfg.top_k)

    def close(self) -> None:
        self._embedding = None
        self._effnet_heads = []
        self._vggish_heads = []


def top_labels(classes: list[str], probabilities: np.ndarray, *, threshold: float, top_k: int) -> dict[str, float]:
    """At most `top_k` labels with probability >= `threshold`, highest first."""
    order = np.argsort(-probabilities, kind="stable")[:top_k]
    return {classes[i]: round(float(probabilities[i]), 4) for i in order if probabilities[i] >= threshold}


def _run(head: _Head, data: np.ndarray) -> np.ndarray:
    predictions = np.asarray(head.algorithm(data), dtype=np.float32)
    if predictions.ndim != 2 or predictions.shape[0] == 0:
        raise AnalysisError(f"{head.file} produced no predictions (audio too short?)")
    if not np.isfinite(predictions).all():
        raise AnalysisError(f"{head.file} produced NaN or infinite predictions")
    return predictions


def _check_width(head: _Head, predictions: np.ndarray) -> None:
    width = predictions.shape[-1] if predictions.ndim == 2 else None
    if width != len(head.classes):
        raise ModelLoadError(
            f"{FOLDER}/{head.file}: graph writes {width} columns but {head.stem}.json lists {len(head.classes)} classes"
        )


def _input_name(meta: dict[str, Any], stem: str) -> str:
    inputs = meta["schema"]["inputs"]
    if len(inputs) != 1 or not isinstance(inputs[0].get("name"), str):
        raise ModelLoadError(f"{FOLDER}/{stem}.json: expected exactly one named input in 'schema'")
    return inputs[0]["name"]


def _output_name(meta: dict[str, Any], purpose: str, stem: str) -> str:
    for output in meta["schema"]["outputs"]:
        if output.get("output_purpose") == purpose and isinstance(output.get("name"), str):
            return output["name"]
    raise ModelLoadError(f"{FOLDER}/{stem}.json: no output with output_purpose {purpose!r} in 'schema'")

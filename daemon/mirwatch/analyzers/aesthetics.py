"""Meta's Audiobox Aesthetics: four 1–10 ratings of a track, on the GPU worker.

Keys: ``content_enjoyment``, ``content_usefulness``, ``production_complexity``,
``production_quality`` (the model's axes CE, CU, PC, PQ).

The model (`audiobox_aesthetics.model.aes.AesMultiOutput`, a WavLM encoder
with four heads) is loaded once from ``aesthetics/checkpoint.pt`` in the model
dir, the checkpoint Meta publishes, and kept resident. A track is scored as
the reference implementation scores it: the 16 kHz mono signal is cut into
consecutive 10 s windows, the last one zero-padded and masked; each window's
normalised prediction is mapped back to the rating scale with the
checkpoint's per-axis mean and std; the track's rating is the mean over
windows weighted by the share of each window that is real audio.

The package is installed without its dependencies: its inference module
imports torchaudio, which does not load beside current torch; the model
class needs only torch, and decoding and resampling are mirwatch's own.
"""

from __future__ import annotations

import pickle
import re
from typing import Any

import numpy as np
import structlog

from ..config import FeaturesConfig
from ..models.store import ModelStore
from .base import AnalysisError, Analyzer, ModelLoadError, Result, Track

CHECKPOINT = "aesthetics/checkpoint.pt"
RATE = 16_000
WINDOW_SECONDS = 10
AXES = {
    "CE": "content_enjoyment",
    "CU": "content_usefulness",
    "PC": "production_complexity",
    "PQ": "production_quality",
}
# Constructor arguments the checkpoint records; anything else in model_cfg is training-only.
MODEL_ARGS = (
    "proj_num_layer",
    "proj_ln",
    "proj_act_fn",
    "proj_dropout",
    "nth_layer",
    "use_weighted_layer_sum",
    "precision",
    "normalize_embed",
    "output_dim",
)
# The encoder's first convolution spans 400 samples: shorter audio yields no frame at all.
MIN_SAMPLES = 400

log = structlog.get_logger(__name__)


class AestheticsAnalyzer(Analyzer):
    name = "aesthetics"
    stage = "gpu"
    version = "1"

    def __init__(self, cfg: FeaturesConfig, store: ModelStore, *, device: str | None = None,
                 batch_size: int = 8) -> None:
        self.cfg = cfg
        self.store = store
        self.device_name = device
        # Windows per forward pass: 8 × 10 s fits any GPU the daemon targets with room to spare.
        self.batch_size = batch_size
        self.model: Any = None
        self.transform: dict[str, tuple[float, float]] = {}
        self._files: dict[str, str] = {}

    @staticmethod
    def wanted(cfg: FeaturesConfig) -> tuple[bool, str]:
        if not cfg.enabled or cfg.aesthetics == "off":
            return False, "features.aesthetics is off"
        if cfg.aesthetics == "on":
            return True, "features.aesthetics is on"
        import torch

        if torch.cuda.is_available():
            return True, "CUDA is available"
        return False, "features.aesthetics is auto and no CUDA device is available (about 1 min per 5-min track on a CPU)"

    def load(self) -> None:
        import torch

        path = self.store.require(CHECKPOINT)
        sha = self.store.sha256(CHECKPOINT)
        checkpoint = _read_checkpoint(path)
        try:
            from audiobox_aesthetics.model.aes import AesMultiOutput

            model_cfg, transform = checkpoint["model_cfg"], checkpoint["target_transform"]
            model = AesMultiOutput(**{k: model_cfg[k] for k in MODEL_ARGS}, target_transform=transform)
            state = {re.sub(r"^model\.", "", k): v for k, v in checkpoint["state_dict"].items()}
            model.load_state_dict(state)
            self.transform = {axis: (float(transform[axis]["mean"]), float(transform[axis]["std"])) for axis in AXES}
        except ImportError as exc:
            raise ModelLoadError(f"audiobox_aesthetics is not installed ({exc}); pip install --no-deps audiobox_aesthetics") from None
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"{path}: not an Audiobox Aesthetics checkpoint: {first}") from None
        device = torch.device(self.device_name or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(device).eval()
        self.device = device
        self._files = {CHECKPOINT: sha}

    def model_files(self) -> dict[str, str]:
        return dict(self._files)

    def settings(self) -> dict[str, Any]:
        return {"window_seconds": WINDOW_SECONDS, "rate": RATE}

    def analyze(self, track: Track) -> Result:
        if self.model is None:
            raise AnalysisError("aesthetics model not loaded")
        wav = track.audio.mono_16k
        if wav.size < MIN_SAMPLES:
            reason = f"shorter than {MIN_SAMPLES / RATE * 1000:.0f} ms, the encoder's first frame"
            return Result(provenance={"omitted": {key: reason for key in AXES.values()}})
        windows, masks, weights = windows_of(wav)
        predictions = self.predict(windows, masks, track)
        values, omitted = {}, {}
        for axis, key in AXES.items():
            score = float(np.sum(predictions[axis] * weights) / np.sum(weights))
            if np.isfinite(score):
                values[key] = score
            else:
                omitted[key] = f"model returned {score}"
        return Result(values=values, provenance={"windows": int(weights.size), "device": str(self.device),
                                                 "omitted": omitted})

    def predict(self, windows: np.ndarray, masks: np.ndarray, track: Track | None = None) -> dict[str, np.ndarray]:
        """Per-window ratings on the 1–10 scale, by axis."""
        import torch

        out: dict[str, list[np.ndarray]] = {axis: [] for axis in AXES}
        with torch.inference_mode():
            for start in range(0, windows.shape[0], self.batch_size):
                if track is not None:
                    track.check_cancelled()
                batch = {
                    "wav": torch.from_numpy(windows[start : start + self.batch_size, None, :]).to(self.device),
                    "mask": torch.from_numpy(masks[start : start + self.batch_size, None, :]).to(self.device),
                }
                raw = self.model(batch)
                for axis in AXES:
                    mean, std = self.transform[axis]
                    out[axis].append(raw[axis].float().cpu().numpy() * std + mean)
        return {axis: np.concatenate(parts) for axis, parts in out.items()}

    def close(self) -> None:
        self.model = None
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass


def windows_of(wav: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Consecutive 10 s windows (the last zero-padded), their masks, and each window's real share."""
    size = WINDOW_SECONDS * RATE
    count = max(1, -(-wav.size // size))
    windows = np.zeros((count, size), dtype=np.float32)
    masks = np.zeros((count, size), dtype=bool)
    weights = np.zeros(count, dtype=np.float64)
    for i in range(count):
        piece = wav[i * size : (i + 1) * size]
        windows[i, : piece.size] = piece
        masks[i, : piece.size] = True
        weights[i] = piece.size / size
    return windows, masks, weights


def _read_checkpoint(path) -> dict[str, Any]:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # The published file may hold more than tensors and plain types (it was saved by a
        # training run); it comes from Meta's own URL and has just passed its recorded checksum.
        log.info("aesthetics checkpoint needs full unpickling", path=str(path))
    except (OSError, RuntimeError, EOFError) as exc:
        raise ModelLoadError(f"{path}: unreadable checkpoint: {exc}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ModelLoadError(f"{path}: unreadable checkpoint: {exc}") from None

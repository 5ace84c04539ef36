"""Music Flamingo on llama.cpp: the quantised GGUF builds, served by a resident llama-server.

Same analyzer name, sidecar keys, prompts, token limits, text normalisation
and provenance fields as the transformers backend (`flamingo.py`); only the
engine differs. The model is loaded once, by a llama-server child started in
`load()` with ``--mmproj`` and one slot per prompt (see `llama_server.py` for
why a child process).

All prompts of a track go out at once, one per slot, and the slots decode
together as one batch. Each slot encodes the audio itself: llama-server
(0.3.36's llama.cpp) does not hand a multimodal prefix from one slot to
another (its host-memory prompt cache restored only the 32-token system
turn), and measured on the tiny pair, first computing the prefix in one slot
(``warm_prefix=True``) then fanning out was slower than sending all prompts
cold (bench/flamingo_gguf.py). A slot does keep its own prefix, so a re-run
of the same clip skips the audio.
"""

from __future__ import annotations

import base64
import io
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..config import FlamingoConfig, FlamingoPrompt
from ..llama_server import LlamaServer, LlamaServerError, ServerGone, find_llama_server
from ..models.store import ModelStore
from .base import AnalysisError, Analyzer, Cancelled, ModelLoadError, Result, Track
from .flamingo import (
    SAMPLE_RATE,
    FlamingoAnalyzer,
    cap_audio,
    generation_settings,
    prompt_settings,
    track_result,
    track_seed,
)

# The GGUF conversions are of this checkpoint (AudioFlamingo3 architecture), not of the 2601 one.
GGUF_MODEL_ID = "nvidia/music-flamingo-hf"
MODEL_FOLDER = "flamingo-gguf"
BASE_NAME = "music-flamingo-hf"
# Published as imatrix ("i1") builds only; other quantisations are plain builds.
IMATRIX_QUANTS = frozenset({"Q6_K", "IQ3_M", "IQ3_S", "IQ3_XS", "IQ3_XXS", "IQ2_M", "IQ2_S", "IQ2_XS",
                            "IQ2_XXS", "IQ1_M", "IQ1_S", "IQ4_XS", "IQ4_NL"})
# llama.cpp encodes audio in whole 30 s Whisper windows of 750 tokens each, a
# short last window padded to full length (a 30.0 s clip measured as two).
WINDOW_SECONDS = 30.0
TOKENS_PER_WINDOW = 750
# Chat scaffolding around the audio and the prompt text, generously.
PROMPT_OVERHEAD_TOKENS = 512


@dataclass
class Answer:
    """One prompt's answer (the server returns text and a token count, not ids)."""

    text: str
    tokens: int
    stopped: str  # "eos" or "limit", as in the transformers backend
    seconds: float  # from the start of decoding to this answer's end
    cached_tokens: int = 0  # prompt tokens the slot did not have to compute


@dataclass
class GGUFRun:
    answers: dict[str, Answer]
    mode: str
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def generated_tokens(self) -> int:
        return sum(a.tokens for a in self.answers.values())


def gguf_file(quant: str) -> str:
    """Model-dir path of a published quantisation (``flamingo-gguf/music-flamingo-hf.Q8_0.gguf``)."""
    stem = f"i1-{quant}" if quant in IMATRIX_QUANTS else quant
    return f"{MODEL_FOLDER}/{BASE_NAME}.{stem}.gguf"


class FlamingoGGUFAnalyzer(Analyzer):
    name = "flamingo"
    stage = "gpu"
    wanted = staticmethod(FlamingoAnalyzer.wanted)

    def __init__(self, cfg: FlamingoConfig, store: ModelStore, *, log: Any = None) -> None:
        self.cfg = cfg
        self.store = store
        self.log = log
        self.model_name = cfg.gguf_model or gguf_file(cfg.gguf_quant)
        self.mmproj_name = cfg.gguf_mmproj
        self.server: LlamaServer | None = None
        self._files: dict[str, str] = {}
        self._device = "llama.cpp"

    # ----------------------------------------------------------------- set-up

    def load(self) -> None:
        model = self.store.require(self.model_name)
        mmproj = self.store.require(self.mmproj_name)
        self._files = {name: self.store.sha256(name) for name in (self.model_name, self.mmproj_name)}
        binary = find_llama_server(self.cfg.llama_server or None)
        if binary is None:
            where = self.cfg.llama_server or "$MIRWATCH_LLAMA_SERVER, PATH or ~/.cache/mirwatch-llama"
            raise ModelLoadError(
                f"llama-server not found ({where}): build it with scripts/build_llama_cpp.sh"
                ' or set [flamingo] llama_server'
            )
        per_slot = self.slot_context()
        self.server = LlamaServer(
            binary, model, mmproj,
            parallel=self.cfg.gguf_parallel,
            ctx_size=per_slot * self.cfg.gguf_parallel,
            gpu_layers=None if self.cfg.gguf_gpu_layers < 0 else self.cfg.gguf_gpu_layers,
            log=self._log,
        )
        try:
            self.server.start()
            props = self.server.get("/props")
        except LlamaServerError as exc:
            if self.server is not None:
                self.server.stop()
            raise ModelLoadError(f"{model}: cannot load Music Flamingo GGUF: {exc}") from None
        modalities = props.get("modalities", {})
        if isinstance(modalities, dict) and not modalities.get("audio", False):
            self.server.stop()
            raise ModelLoadError(f"{mmproj}: llama-server reports no audio support for this projector")
        self._device = _device_of(props)

    def slot_context(self) -> int:
        """Context one slot needs: the longest audio, the chat, the longest answer."""
        audio = (math.floor(self.cfg.gguf_max_audio_seconds / WINDOW_SECONDS) + 1) * TOKENS_PER_WINDOW
        longest = max(p.max_new_tokens for p in self.cfg.prompts.values())
        return audio + PROMPT_OVERHEAD_TOKENS + longest

    def _log(self, event: str, **fields: Any) -> None:
        if self.log is not None:
            self.log.info(event, **fields)

    def model_files(self) -> dict[str, str]:
        return dict(self._files)

    def settings(self) -> dict[str, Any]:
        return {
            "backend": "gguf",
            "model_id": GGUF_MODEL_ID,
            "quant": self.cfg.gguf_quant,
            "max_audio_seconds": self.cfg.gguf_max_audio_seconds,
            "generation": generation_settings(self.cfg),
            "prompts": prompt_settings(self.cfg),
        }

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    # ---------------------------------------------------------------- analyze

    def analyze(self, track: Track) -> Result:
        if self.server is None:
            raise AnalysisError("Music Flamingo (GGUF) is not loaded")
        audio, warning = self.cap_duration(track.audio.mono_16k, truncated_before=track.audio.truncated)
        seed = track_seed(self.cfg.seed, track.name)
        run = self.describe(audio, seed=seed, cancel=track.cancel.is_set)
        identity = {"model_id": GGUF_MODEL_ID, "revision": self.model_name.rsplit("/", 1)[-1],
                    "dtype": self.cfg.gguf_quant, "device": self._device, "attn_implementation": "llama.cpp",
                    "backend": "gguf"}
        return track_result(
            self.cfg, identity, audio=audio, seed=seed, warning=warning, mode=run.mode, timings=run.timings,
            answers={name: (a.text, a.tokens, a.stopped, a.seconds) for name, a in run.answers.items()},
        )

    def cap_duration(self, audio: np.ndarray, *, truncated_before: bool = False) -> tuple[np.ndarray, str | None]:
        return cap_audio(audio, self.cfg.gguf_max_audio_seconds, truncated_before=truncated_before)

    def describe(
        self,
        audio: np.ndarray,
        prompts: dict[str, FlamingoPrompt] | None = None,
        *,
        seed: int = 0,
        cancel: Callable[[], bool] | None = None,
        warm_prefix: bool = False,
    ) -> GGUFRun:
        """All prompts over one clip; ``warm_prefix`` first runs the prefix alone (for the benchmark)."""
        assert self.server is not None
        prompts = dict(self.cfg.prompts if prompts is None else prompts)
        cancel = cancel or (lambda: False)
        restarted = self.server.ensure_running()
        start = time.perf_counter()
        clip = wav_base64(audio)
        upload_s = time.perf_counter() - start
        timings: dict[str, float] = {"wav_encode": upload_s}
        if restarted:
            timings["server_restarts"] = 1
        try:
            if warm_prefix and len(prompts) > 1:
                name, prompt = next(iter(prompts.items()))
                t0 = time.perf_counter()
                first = self._call([self._body(clip, prompt, 1, seed)], cancel)[0]
                t = first.get("timings", {})
                timings.update(prefill=time.perf_counter() - t0,
                               prefix_tokens=float(t.get("prompt_n", 0) + t.get("cache_n", 0)))
            decode_start = time.perf_counter()
            bodies = [self._body(clip, p, p.max_new_tokens, seed + i) for i, p in enumerate(prompts.values())]
            answers = self._call(bodies, cancel, t0=decode_start)
        except ServerGone as exc:
            self._recover(exc)
            raise AnalysisError(
                f"llama-server died while describing this track ({exc}); it was restarted and the job will be retried"
            ) from None
        except LlamaServerError as exc:
            raise AnalysisError(str(exc)) from None
        decode_s = time.perf_counter() - decode_start
        run = GGUFRun(
            {name: _answer(answer, prompt.max_new_tokens) for (name, prompt), answer in zip(prompts.items(), answers)},
            mode="parallel" if len(prompts) > 1 else "single",
        )
        generated = run.generated_tokens
        timings.update(
            decode=decode_s,
            decode_tokens_per_second=generated / decode_s if decode_s > 0 else 0.0,
            cached_prefix_tokens=float(min(a.cached_tokens for a in run.answers.values())),
            total=time.perf_counter() - start,
        )
        run.timings = timings
        return run

    def _body(self, clip: str, prompt: FlamingoPrompt, max_tokens: int, seed: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "messages": [{
                "role": "user",
                "content": [
                    {"type": "input_audio", "input_audio": {"data": clip, "format": "wav"}},
                    {"type": "text", "text": prompt.text},
                ],
            }],
            "max_tokens": max_tokens,
            "seed": seed % (1 << 32),
            # transformers applies the penalty to every earlier token, prompt
            # included: a window as long as the slot's context does the same.
            "repeat_penalty": self.cfg.repetition_penalty,
            "repeat_last_n": self.slot_context(),
            "cache_prompt": True,
            "min_p": 0.0,
            "typical_p": 1.0,
        }
        if self.cfg.do_sample:
            body.update(temperature=self.cfg.temperature, top_p=self.cfg.top_p, top_k=0)
        else:
            body.update(temperature=0.0, top_k=1)
        return body

    def _call(self, bodies: list[dict[str, Any]], cancel: Callable[[], bool],
              t0: float | None = None) -> list[dict[str, Any]]:
        """Send the requests at once; each answer gets ``_seconds`` since `t0`."""
        server = self.server
        assert server is not None
        t0 = time.perf_counter() if t0 is None else t0
        answers: list[Any] = [None] * len(bodies)

        def one(i: int) -> None:
            try:
                answer = server.post("/v1/chat/completions", bodies[i])
                answer["_seconds"] = time.perf_counter() - t0
                answers[i] = answer
            except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
                answers[i] = exc

        threads = [threading.Thread(target=one, args=(i,), daemon=True, name=f"flamingo-gguf-{i}")
                   for i in range(len(bodies))]
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(0.05)
                if cancel():
                    server.abort_requests()
                    for other in threads:
                        other.join(5.0)
                    raise Cancelled()
        for answer in answers:
            if isinstance(answer, BaseException):
                raise answer
        return answers

    def _recover(self, exc: BaseException) -> None:
        assert self.server is not None
        try:
            self.server.ensure_running()
        except LlamaServerError as again:
            self._log("llama_server_restart_failed", error=str(again))


def _answer(answer: dict[str, Any], limit: int) -> Answer:
    choice = (answer.get("choices") or [{}])[0]
    text = ((choice.get("message") or {}).get("content") or "").strip()
    usage = answer.get("usage") or {}
    tokens = int(usage.get("completion_tokens", 0))
    stopped = "limit" if choice.get("finish_reason") == "length" or tokens >= limit else "eos"
    cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0))
    return Answer(text=text, tokens=tokens, stopped=stopped, seconds=float(answer.get("_seconds", 0.0)),
                  cached_tokens=cached)


def wav_base64(audio: np.ndarray) -> str:
    """16 kHz mono as 16-bit PCM WAV, base64 (what the server's input_audio takes)."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.clip(audio, -1.0, 1.0), SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _device_of(props: dict[str, Any]) -> str:
    build = props.get("build_info")
    return f"llama.cpp {build}" if build else "llama.cpp"

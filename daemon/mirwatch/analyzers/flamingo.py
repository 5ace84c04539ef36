"""Music Flamingo text descriptions, several prompts per track in one pass.

Every prompt of a track starts with the same tokens: system turn, user
header and the ~750 audio tokens per 30 s window. So the audio is encoded
once, that shared prefix is run through the language model once, and all
prompt tails are decoded together as one batch over copies of the prefix's
key/value cache. Rows are laid out as ``prefix | gap | tail``: the gap pads
shorter tails on the left, is masked out, and since positions come from the
attention mask it does not shift the tail. Each row stops at its own token
limit. In greedy mode this yields the same tokens as one ``generate`` call
per prompt (`describe_naive`, kept as the reference and for the benchmark).
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import structlog
import torch

from ..config import FlamingoConfig, FlamingoPrompt
from ..models.store import ModelStore
from ..textnorm import normalize
from .base import AnalysisError, Analyzer, Cancelled, ModelLoadError, Result, Track

log = structlog.get_logger(__name__)

SAMPLE_RATE = 16_000
KEY_PREFIX = "music_flamingo_"
MODEL_FOLDER = "flamingo"
# config.json's model_type -> the transformers class that runs it. Both take the
# same processor inputs, so one describe() path serves both:
# - musicflamingo: nvidia/music-flamingo-2601-hf (rotary time embeddings, 20 min);
# - audioflamingo3: nvidia/music-flamingo-hf, the checkpoint the GGUF builds are
#   converted from, so `mirwatch ab` can compare transformers and llama.cpp on
#   the same weights.
ARCHITECTURES = {
    "musicflamingo": "MusicFlamingoForConditionalGeneration",
    "audioflamingo3": "AudioFlamingo3ForConditionalGeneration",
}
# The files that make up a checkpoint (weights, configs, tokenizer, templates).
_CHECKPOINT_SUFFIXES = (".json", ".safetensors", ".jinja", ".txt", ".model", ".tiktoken")


def gpu_available() -> bool:
    """True when torch sees a CUDA or ROCm device (ROCm builds answer through torch.cuda)."""
    return bool(torch.cuda.is_available() and torch.cuda.device_count() > 0)


def model_path(model_id: str) -> str:
    """Where a checkpoint lives in the model dir: ``flamingo/<repo name>``."""
    return f"{MODEL_FOLDER}/{model_id.rstrip('/').rsplit('/', 1)[-1]}"


def track_seed(base_seed: int, track_name: str) -> int:
    """Sampling seed of one track: stable across reruns, different across tracks."""
    digest = hashlib.sha256(f"{base_seed}\0{track_name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )




def generation_settings(cfg: FlamingoConfig) -> dict[str, Any]:
    """The decoding settings that change the text (provenance and staleness)."""
    settings: dict[str, Any] = {"do_sample": cfg.do_sample, "repetition_penalty": cfg.repetition_penalty}
    if cfg.do_sample:
        settings.update(temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed)
    return settings


def prompt_settings(cfg: FlamingoConfig) -> dict[str, dict[str, Any]]:
    return {n: {"text": p.text, "max_new_tokens": p.max_new_tokens} for n, p in cfg.prompts.items()}


def cap_audio(audio: np.ndarray, limit_s: float, *, truncated_before: bool = False) -> tuple[np.ndarray, str | None]:
    """At most `limit_s` seconds of 16 kHz audio, and the warning provenance records."""
    limit = int(limit_s * SAMPLE_RATE)
    if len(audio) > limit:
        return audio[:limit], (
            f"audio is {len(audio) / SAMPLE_RATE:.0f} s long; Music Flamingo heard only the first {limit_s:.0f} s"
        )
    if truncated_before:
        return audio, f"audio was cut to {len(audio) / SAMPLE_RATE:.0f} s before analysis (worker.max_duration)"
    return audio, None


def track_result(
    cfg: FlamingoConfig,
    identity: dict[str, Any],
    *,
    audio: np.ndarray,
    seed: int,
    warning: str | None,
    mode: str,
    timings: dict[str, float],
    answers: dict[str, tuple[str, int, str, float]],
) -> Result:
    """What either backend writes for a track: the normalised texts and their provenance.

    `identity` names the model and how it ran (model id, revision, dtype, device...);
    `answers` maps each prompt to (text, tokens, why it stopped, seconds).
    """
    values = {KEY_PREFIX + name: normalize(text) for name, (text, _, _, _) in answers.items()}
    provenance: dict[str, Any] = {
        **identity,
        "generation": generation_settings(cfg) | ({"track_seed": seed} if cfg.do_sample else {}),
        "mode": mode,
        "audio_seconds": round(len(audio) / SAMPLE_RATE, 2),
        "timings": {k: round(v, 4) for k, v in timings.items()},
        "prompts": {
            name: {"tokens": tokens, "stopped": stopped, "seconds": round(seconds, 4)}
            for name, (_, tokens, stopped, seconds) in answers.items()
        },
    }
    if warning:
        provenance["truncated_audio"] = warning
    return Result(values=values, provenance=provenance)


@dataclass
class Description:
    """One prompt's answer."""

    text: str
    token_ids: list[int]
    # "eos" when the model ended the answer, "limit" when max_new_tokens cut it.
    stopped: str
    # From the start of decoding (batched) or of the prompt (naive) to this answer's end.
    seconds: float


@dataclass
class Run:
    """All answers for one track, with where the time went."""

    descriptions: dict[str, Description]
    mode: str  # "batched", "one_by_one" (after running out of memory) or "naive"
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def generated_tokens(self) -> int:
        return sum(len(d.token_ids) for d in self.descriptions.values())


@dataclass
class _Prepared:
    """Model inputs shared by all prompts of a track."""

    prefix_ids: torch.Tensor  # (1, L): system turn, user header, audio tokens
    features: torch.Tensor
    features_mask: torch.Tensor
    tails: dict[str, list[int]]  # prompt name -> ids after the audio
    feature_seconds: float


class FlamingoAnalyzer(Analyzer):
    name = "flamingo"
    stage = "gpu"

    def __init__(self, cfg: FlamingoConfig, store: ModelStore) -> None:
        self.cfg = cfg
        self.store = store
        self.model_name = model_path(cfg.model_id)
        self.model: Any = None
        self.processor: Any = None
        self.device: torch.device | None = None
        self.attn_implementation = cfg.attn_implementation
        self._files: dict[str, str] = {}

    # ----------------------------------------------------------------- set-up

    @staticmethod
    def wanted(cfg: FlamingoConfig) -> tuple[bool, str]:
        """Whether the worker should run this analyzer, and why (one log line)."""
        if cfg.enabled == "off":
            return False, 'Music Flamingo is off ([flamingo] enabled = "off")'
        if cfg.enabled == "on":
            where = "GPU" if gpu_available() else "CPU (slow)"
            return True, f'Music Flamingo forced on ([flamingo] enabled = "on"), running on the {where}'
        if gpu_available():
            return True, "Music Flamingo on: GPU found"
        return False, (
            "Music Flamingo skipped: no CUDA or ROCm GPU visible "
            '(set [flamingo] enabled = "on" to run it on the CPU anyway, very slowly)'
        )

    def load(self) -> None:
        import transformers

        folder = self.store.require(self.model_name)
        config_file = self.store.require(f"{self.model_name}/config.json")
        try:
            declared = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{config_file}: unreadable model config: {exc}") from None
        model_type = declared.get("model_type")
        if model_type not in ARCHITECTURES:
            raise ModelLoadError(
                f"{config_file}: model_type {model_type!r} is not one of {', '.join(map(repr, ARCHITECTURES))}"
                f" (expected a Music Flamingo checkpoint: nvidia/music-flamingo-2601-hf or nvidia/music-flamingo-hf)"
            )
        self._files = {name: self.store.sha256(name) for name in self._checkpoint_files(folder)}

        self.device = torch.device(_resolve_device(self.cfg.device))
        self.attn_implementation = _resolve_attention(self.cfg.attn_implementation, self.device)
        try:
            self.processor = transformers.AutoProcessor.from_pretrained(folder, local_files_only=True)
            self.model = getattr(transformers, ARCHITECTURES[model_type]).from_pretrained(
                folder,
                local_files_only=True,
                dtype=getattr(torch, self.cfg.dtype),
                attn_implementation=self.attn_implementation,
            )
            self.model.to(self.device).eval()
        except (OSError, ValueError, KeyError, RuntimeError, ImportError) as exc:
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"{folder}: cannot load Music Flamingo: {text}") from None
        self.attach(self.model, self.processor)
        log.info("flamingo_loaded", path=str(folder), architecture=ARCHITECTURES[model_type],
                 device=str(self.device), dtype=self.cfg.dtype,
                 attn_implementation=self.attn_implementation)

    def attach(self, model: Any, processor: Any) -> None:
        """Use an already built model (the benchmark's in-memory full-size one)."""
        self.model, self.processor = model, processor
        self.device = model.device
        self._eos_ids = _as_list(model.generation_config.eos_token_id) or _as_list(processor.tokenizer.eos_token_id)
        self._pad_id = model.generation_config.pad_token_id
        if self._pad_id is None:
            self._pad_id = processor.tokenizer.pad_token_id

    def _checkpoint_files(self, folder: Path) -> list[str]:
        names = sorted(
            f"{self.model_name}/{p.relative_to(folder).as_posix()}"
            for p in folder.rglob("*")
            if p.is_file()
            and p.suffix in _CHECKPOINT_SUFFIXES
            # Hub downloads keep bookkeeping under .cache/ inside the folder.
            and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        )
        if not any(n.endswith(".safetensors") for n in names):
            raise ModelLoadError(f"{folder}: no .safetensors weights (run 'mirwatch models fetch')")
        return names

    def model_files(self) -> dict[str, str]:
        return dict(self._files)

    def settings(self) -> dict[str, Any]:
        return {
            "model_id": self.cfg.model_id,
            "revision": self.cfg.revision,
            "dtype": self.cfg.dtype,
            "generation": generation_settings(self.cfg),
            "prompts": prompt_settings(self.cfg),
        }

    def close(self) -> None:
        self.model = self.processor = None
        _release_memory()

    # ---------------------------------------------------------------- analyze

    def analyze(self, track: Track) -> Result:
        if self.model is None:
            raise AnalysisError("Music Flamingo is not loaded")
        audio, warning = self.cap_duration(track.audio.mono_16k, truncated_before=track.audio.truncated)
        seed = track_seed(self.cfg.seed, track.name)
        run = self.describe(audio, seed=seed, cancel=track.cancel.is_set)
        identity = {"model_id": self.cfg.model_id, "revision": self.cfg.revision, "dtype": self.cfg.dtype,
                    "device": str(self.device), "attn_implementation": self.attn_implementation}
        return track_result(
            self.cfg, identity, audio=audio, seed=seed, warning=warning, mode=run.mode, timings=run.timings,
            answers={name: (d.text, len(d.token_ids), d.stopped, d.seconds) for name, d in run.descriptions.items()},
        )

    def cap_duration(self, audio: np.ndarray, *, truncated_before: bool = False) -> tuple[np.ndarray, str | None]:
        return cap_audio(audio, self.processor.max_audio_len, truncated_before=truncated_before)

    def _prompts(self, prompts: dict[str, FlamingoPrompt] | None) -> dict[str, FlamingoPrompt]:
        return dict(self.cfg.prompts if prompts is None else prompts)

    # ------------------------------------------------------- batched (product)

    def describe(
        self,
        audio: np.ndarray,
        prompts: dict[str, FlamingoPrompt] | None = None,
        *,
        seed: int = 0,
        cancel: Callable[[], bool] | None = None,
    ) -> Run:
        """All prompts over one encoding of `audio` (16 kHz mono), decoded as one batch.

        Out of memory (or over `kv_cache_limit_mb`) the prompts are retried one
        at a time over the shared prefix; if that fails too, `AnalysisError`.
        """
        prompts = self._prompts(prompts)
        cancel = cancel or (lambda: False)
        failure = ""
        try:
            return self._describe(audio, prompts, seed=seed, cancel=cancel, batched=True)
        except Exception as exc:  # noqa: BLE001 - only memory errors are handled here
            if not is_out_of_memory(exc):
                raise
            failure = _first_line(exc)
        # Outside the except block, so the traceback's frames (holding the big
        # tensors) are gone before the allocator is asked to give memory back.
        _release_memory()
        log.warning("flamingo_out_of_memory", prompts=len(prompts), error=failure,
                    action="retrying one prompt at a time")
        try:
            run = self._describe(audio, prompts, seed=seed, cancel=cancel, batched=False)
        except Exception as exc:  # noqa: BLE001
            if not is_out_of_memory(exc):
                raise
            failure = _first_line(exc)
        else:
            run.timings["oom_retries"] = 1
            return run
        _release_memory()
        raise AnalysisError(
            f"Music Flamingo ran out of GPU memory even with one prompt at a time"
            f" ({len(audio) / SAMPLE_RATE:.0f} s of audio): {failure}"
        )

    def _describe(
        self,
        audio: np.ndarray,
        prompts: dict[str, FlamingoPrompt],
        *,
        seed: int,
        cancel: Callable[[], bool],
        batched: bool,
    ) -> Run:
        start = time.perf_counter()
        prepared = self._prepare(audio, prompts)
        _check(cancel)
        with torch.inference_mode():
            prefix_cache, encode_s, prefill_s = self._prefill(prepared)
            _check(cancel)
            decode_start = time.perf_counter()
            if batched:
                descriptions = self._decode(prepared, prefix_cache, prompts, seed=seed, cancel=cancel)
            else:
                descriptions = {}
                for i, name in enumerate(prompts):
                    one = {name: prompts[name]}
                    descriptions |= self._decode(prepared, prefix_cache, one, seed=seed + i, cancel=cancel)
            _sync(self.device)
            decode_s = time.perf_counter() - decode_start
        run = Run(descriptions, mode="batched" if batched else "one_by_one")
        run.timings = {
            "features": prepared.feature_seconds,
            "audio_encode": encode_s,
            "prefill": prefill_s,
            "decode": decode_s,
            "decode_tokens_per_second": run.generated_tokens / decode_s if decode_s > 0 else 0.0,
            "prefix_tokens": float(prepared.prefix_ids.shape[1]),
            "total": time.perf_counter() - start,
        }
        return run

    def _prepare(self, audio: np.ndarray, prompts: dict[str, FlamingoPrompt]) -> _Prepared:
        """Features once, and every prompt split into the shared prefix and its own tail."""
        processor = self.processor
        sound = processor.audio_token
        chats = {name: self._chat(p.text) for name, p in prompts.items()}
        heads = {chat.split(sound, 1)[0] for chat in chats.values()}
        if len(heads) != 1 or any(chat.count(sound) != 1 for chat in chats.values()):
            raise AnalysisError("the chat template does not put one shared audio placeholder before each prompt")
        t0 = time.perf_counter()
        inputs = processor(text=[heads.pop() + sound], audio=[audio], return_tensors="pt")
        feature_s = time.perf_counter() - t0
        # The sound end marker is a special token, so the text after it
        # tokenizes the same on its own as inside the whole prompt.
        tails = {
            name: processor.tokenizer(chat.split(sound, 1)[1], add_special_tokens=False)["input_ids"]
            for name, chat in chats.items()
        }
        return _Prepared(
            prefix_ids=inputs["input_ids"],
            features=inputs["input_features"],
            features_mask=inputs["input_features_mask"],
            tails=tails,
            feature_seconds=feature_s,
        )

    def _chat(self, prompt: str) -> str:
        conversation = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)

    def _prefill(self, prepared: _Prepared) -> tuple[Any, float, float]:
        """Encode the audio and run the shared prefix once; returns its cache and both times."""
        model, device = self.model, self.device
        ids = prepared.prefix_ids.to(device)
        t0 = time.perf_counter()
        audio_embeds = model.get_audio_features(
            prepared.features.to(device, model.dtype), prepared.features_mask.to(device), input_ids=ids
        ).pooler_output
        _sync(device)
        t1 = time.perf_counter()
        embeds = model.get_input_embeddings()(ids)
        slots = (ids == model.config.audio_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(slots, audio_embeds.to(embeds.dtype))
        cache = self._new_cache()
        model(
            inputs_embeds=embeds,
            attention_mask=torch.ones_like(ids),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        _sync(device)
        return cache, t1 - t0, time.perf_counter() - t1

    def _new_cache(self, copy_of: Any = None, batch: int = 1) -> Any:
        from transformers import DynamicCache

        # Views of the prefix tensors: the first decode step concatenates onto
        # them, which materialises the per-row copies and leaves the prefix intact.
        data = None
        if copy_of is not None:
            data = [(layer.keys.expand(batch, -1, -1, -1), layer.values.expand(batch, -1, -1, -1))
                    for layer in copy_of.layers]
        limit_mb = self.cfg.kv_cache_limit_mb
        if limit_mb > 0:
            return _CappedCache(data, config=self.model.config, limit_bytes=int(limit_mb * 2**20))
        return DynamicCache(data, config=self.model.config)

    def _decode(
        self,
        prepared: _Prepared,
        prefix_cache: Any,
        prompts: dict[str, FlamingoPrompt],
        *,
        seed: int,
        cancel: Callable[[], bool],
    ) -> dict[str, Description]:
        names = list(prompts)
        tails = [prepared.tails[n] for n in names]
        prefix = prepared.prefix_ids[0]
        width = max(len(t) for t in tails)
        rows, length = len(names), len(prefix) + width
        # The gap holds the prefix's first token: it is masked out anyway, and a
        # token already present leaves repetition penalties exactly as without it.
        ids = torch.full((rows, length), int(prefix[0]), dtype=torch.long)
        mask = torch.zeros((rows, length), dtype=torch.long)
        ids[:, : len(prefix)] = prefix
        mask[:, : len(prefix)] = 1
        for row, tail in enumerate(tails):
            ids[row, length - len(tail):] = torch.tensor(tail, dtype=torch.long)
            mask[row, length - len(tail):] = 1
        limits = [prompts[n].max_new_tokens for n in names]
        stops = _RowStops(length, limits, self._eos_ids, cancel, self.device)
        out = self._generate(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            cache=self._new_cache(prefix_cache, rows),
            max_new_tokens=max(limits),
            stops=stops,
            seed=seed,
        )
        generated = out[:, length:].tolist()
        return {
            name: self._description(generated[row], limits[row], stops.finished_at(row))
            for row, name in enumerate(names)
        }

    def _generate(self, *, stops: "_RowStops", seed: int, max_new_tokens: int, **inputs: Any) -> torch.Tensor:
        from transformers import StoppingCriteriaList

        devices = [self.device] if self.device is not None and self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type="cuda"):
            torch.manual_seed(seed)
            return self.model.generate(
                **inputs,
                generation_config=self._generation_config(max_new_tokens),
                stopping_criteria=StoppingCriteriaList([stops]),
            )

    def _generation_config(self, max_new_tokens: int) -> Any:
        from transformers import GenerationConfig

        # Built from scratch: the checkpoint's own generation_config.json turns
        # sampling on, and only mirwatch's config may decide that.
        options: dict[str, Any] = dict(
            max_new_tokens=max_new_tokens,
            do_sample=self.cfg.do_sample,
            repetition_penalty=self.cfg.repetition_penalty,
            eos_token_id=self._eos_ids,
            pad_token_id=self._pad_id,
            bos_token_id=self.model.generation_config.bos_token_id,
        )
        # Explicit values, not None: None would be filled in from the
        # checkpoint's defaults (top_k 20 and friends) behind the config's back.
        # Greedy decoding ignores them; 50 is the value transformers does not warn about.
        options.update(temperature=1.0, top_p=1.0, top_k=50)
        if self.cfg.do_sample:
            options.update(temperature=self.cfg.temperature, top_p=self.cfg.top_p, top_k=0)
        return GenerationConfig(**options)

    def _description(self, tokens: list[int], limit: int, seconds: float) -> Description:
        kept, stopped = _until_stop(tokens, limit, self._eos_ids)
        text = self.processor.tokenizer.decode(kept, skip_special_tokens=True).strip()
        return Description(text=text, token_ids=kept, stopped=stopped, seconds=seconds)

    # ---------------------------------------------------------- naive (reference)

    def describe_naive(
        self,
        audio: np.ndarray,
        prompts: dict[str, FlamingoPrompt] | None = None,
        *,
        seed: int = 0,
        cancel: Callable[[], bool] | None = None,
    ) -> Run:
        """One full ``generate`` per prompt: audio encoded and prefilled every time.

        The reference the batched path must match token for token in greedy
        mode, and the baseline of ``bench/flamingo_batching.py``.
        """
        prompts = self._prompts(prompts)
        cancel = cancel or (lambda: False)
        descriptions: dict[str, Description] = {}
        start = time.perf_counter()
        with torch.inference_mode():
            for name, prompt in prompts.items():
                t0 = time.perf_counter()
                inputs = self.processor(text=[self._chat(prompt.text)], audio=[audio], return_tensors="pt")
                inputs = inputs.to(self.device)
                inputs["input_features"] = inputs["input_features"].to(self.model.dtype)
                length = inputs["input_ids"].shape[1]
                stops = _RowStops(length, [prompt.max_new_tokens], self._eos_ids, cancel, self.device)
                out = self._generate(**inputs, max_new_tokens=prompt.max_new_tokens, stops=stops, seed=seed)
                _sync(self.device)
                descriptions[name] = self._description(
                    out[0, length:].tolist(), prompt.max_new_tokens, time.perf_counter() - t0
                )
        run = Run(descriptions, mode="naive")
        run.timings = {"total": time.perf_counter() - start}
        return run


class _RowStops:
    """Per-row stop rule for `generate`: own token limit or end of sequence.

    Also the cancellation point: it runs after every decoding step, so a stop
    request ends generation within one token.
    """

    def __init__(self, start: int, limits: list[int], eos_ids: list[int], cancel: Callable[[], bool], device: Any):
        self.start = start
        self.limits = torch.tensor(limits, device=device)
        self.eos = torch.tensor(eos_ids, device=device)
        self.cancel = cancel
        self.t0 = time.perf_counter()
        self.finish = [math.nan] * len(limits)

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        if self.cancel():
            raise Cancelled()
        generated = input_ids.shape[1] - self.start
        done = (generated >= self.limits) | torch.isin(input_ids[:, -1], self.eos)
        now = time.perf_counter() - self.t0
        for row, flag in enumerate(done.tolist()):
            if flag and math.isnan(self.finish[row]):
                self.finish[row] = now
        return done

    def finished_at(self, row: int) -> float:
        value = self.finish[row]
        return time.perf_counter() - self.t0 if math.isnan(value) else value


def _make_capped_cache() -> type:
    from transformers import DynamicCache

    class CappedCache(DynamicCache):
        """A key/value cache that fails like the GPU allocator when it outgrows a budget."""

        limit_bytes: int = 0

        def __init__(self, *args: Any, limit_bytes: int, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.limit_bytes = limit_bytes

        def update(self, key_states: Any, value_states: Any, layer_idx: int, *args: Any, **kwargs: Any) -> Any:
            out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
            used = sum(
                layer.keys.numel() * layer.keys.element_size() * 2
                for layer in self.layers
                if getattr(layer, "is_initialized", False) and layer.keys is not None
            )
            if used > self.limit_bytes:
                raise torch.OutOfMemoryError(
                    f"key/value cache needs {used / 2**20:.1f} MiB, over kv_cache_limit_mb"
                    f" ({self.limit_bytes / 2**20:.1f} MiB)"
                )
            return out

    return CappedCache


def _CappedCache(*args: Any, **kwargs: Any) -> Any:  # noqa: N802 - a class, built lazily (transformers import)
    global _capped_cache_class
    if _capped_cache_class is None:
        _capped_cache_class = _make_capped_cache()
    return _capped_cache_class(*args, **kwargs)


_capped_cache_class: type | None = None


def _until_stop(tokens: list[int], limit: int, eos_ids: list[int]) -> tuple[list[int], str]:
    tokens = tokens[:limit]
    for i, tok in enumerate(tokens):
        if tok in eos_ids:
            return tokens[:i], "eos"
    return tokens, "limit"


def _check(cancel: Callable[[], bool]) -> None:
    if cancel():
        raise Cancelled()


def _resolve_device(name: str) -> str:
    if name != "auto":
        return name
    return "cuda" if gpu_available() else "cpu"


def _resolve_attention(name: str, device: Any) -> str:
    if name != "auto":
        return name
    from transformers.utils import is_flash_attn_2_available

    return "flash_attention_2" if device.type == "cuda" and is_flash_attn_2_available() else "sdpa"


def _sync(device: Any) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def sidecar_keys(cfg: FlamingoConfig) -> list[str]:
    """The sidecar keys a config's prompts write, in prompt order."""
    return [KEY_PREFIX + name for name in cfg.prompts]

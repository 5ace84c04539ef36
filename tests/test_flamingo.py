"""Music Flamingo analyzer on the tiny checkpoint, loaded from disk like the real one."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path

import numpy as np
import pytest

from mirwatch.analyzers.base import AnalysisError, Cancelled, ModelLoadError, Track
from mirwatch.analyzers.flamingo import SAMPLE_RATE, FlamingoAnalyzer, gpu_available, track_seed
from mirwatch.audio import Audio
from mirwatch.config import ConfigError, FlamingoConfig, FlamingoPrompt, from_dict
from mirwatch.models.store import ModelStore
from mirwatch.models.testmodels import make_test
from mirwatch.textnorm import normalize

REPO = Path(__file__).resolve().parents[1]
KEYS = {f"music_flamingo_{n}" for n in ("full", "technical", "genre_mood", "instrumentation", "structure")}
# Tests run on the CPU in float32 so that batched and naive decoding can be
# compared token for token.
CPU = dict(enabled="on", device="cpu", dtype="float32")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # The tiny model's matrices are too small to share among threads; on a
    # busy 2-core runner the thread pool's spinning made decoding 6x slower.
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def flamingo_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("flamingo-models")
    make_test(root, only=("flamingo",))
    return root


def load(models: Path, **changes: object) -> FlamingoAnalyzer:
    analyzer = FlamingoAnalyzer(FlamingoConfig(**(CPU | changes)), ModelStore(models))
    analyzer.load()
    return analyzer


@pytest.fixture(scope="session")
def analyzer(flamingo_models: Path) -> FlamingoAnalyzer:
    return load(flamingo_models)


def music(seconds: float, seed: int = 0) -> np.ndarray:
    """Chords and clicks with a little noise, 16 kHz mono."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    root = 110.0 * 2 ** (rng.integers(0, 12) / 12)
    x = sum(0.2 * np.sin(2 * np.pi * root * r * t) for r in (1.0, 1.26, 1.5))
    x = x + 0.4 * (np.mod(t, 0.5) < 0.01) + 0.02 * rng.standard_normal(t.size)
    return x.astype(np.float32)


def track(tmp_path: Path, name: str = "Artist - Song", seconds: float = 40.0, seed: int = 0,
          truncated: bool = False) -> Track:
    samples = music(seconds, seed)[:, None]
    return Track(flac=tmp_path / name / "full_mix.flac",
                 audio=Audio(samples=samples, sample_rate=SAMPLE_RATE, truncated=truncated))


@pytest.fixture(scope="session")
def clip() -> np.ndarray:
    # Two 30 s windows, the second one partial: exercises the multi-window path.
    return music(40.0)


@pytest.fixture(scope="session")
def batched_run(analyzer: FlamingoAnalyzer, clip: np.ndarray):
    return analyzer.describe(clip)


def test_analyze_writes_every_prompt_normalised_with_provenance(analyzer: FlamingoAnalyzer, tmp_path: Path) -> None:
    result = analyzer.analyze(track(tmp_path))

    assert set(result.values) == KEYS
    raw = analyzer.describe(track(tmp_path).audio.mono_16k)
    for name, description in raw.descriptions.items():
        assert result.values[f"music_flamingo_{name}"] == normalize(description.text)
        assert description.token_ids, name
    prov = result.provenance
    assert prov["model_id"] == "nvidia/music-flamingo-2601-hf"
    assert (prov["dtype"], prov["device"], prov["mode"]) == ("float32", "cpu", "batched")
    assert prov["generation"] == {"do_sample": False, "repetition_penalty": 1.0}
    assert prov["audio_seconds"] == 40.0 and "truncated_audio" not in prov
    assert set(prov["prompts"]) == {k.removeprefix("music_flamingo_") for k in KEYS}
    for name, info in prov["prompts"].items():
        limit = analyzer.cfg.prompts[name].max_new_tokens
        assert 0 < info["tokens"] <= limit
        assert info["stopped"] == ("limit" if info["tokens"] == limit else "eos")
        assert 0 < info["seconds"] <= prov["timings"]["decode"]
    timings = prov["timings"]
    # Two windows of ~750 audio tokens at most, plus the chat header.
    assert 750 < timings["prefix_tokens"] < 1600
    assert timings["decode_tokens_per_second"] > 0
    json.dumps(result.values | {"p": prov})


@pytest.mark.parametrize("penalty", [1.0, 1.1])
def test_batched_decoding_is_token_identical_to_one_generate_per_prompt(
    flamingo_models: Path, analyzer: FlamingoAnalyzer, batched_run, clip: np.ndarray, penalty: float
) -> None:
    subject = analyzer if penalty == 1.0 else load(flamingo_models, repetition_penalty=penalty)
    batched = batched_run if penalty == 1.0 else subject.describe(clip)
    naive = subject.describe_naive(clip)

    assert batched.mode == "batched" and naive.mode == "naive"
    for name in subject.cfg.prompts:
        assert batched.descriptions[name].token_ids == naive.descriptions[name].token_ids, name
        assert batched.descriptions[name].stopped == naive.descriptions[name].stopped
    # The tiny model answers each prompt differently, so a row decoded with
    # the wrong positions or the wrong tail could not pass by accident.
    answers = {tuple(d.token_ids[:20]) for d in batched.descriptions.values()}
    assert len(answers) == len(batched.descriptions)


def test_rows_stop_at_their_own_limits(analyzer: FlamingoAnalyzer, clip: np.ndarray) -> None:
    prompts = {
        "a": FlamingoPrompt("Name the genre.", 3),
        "b": FlamingoPrompt("Describe everything you hear in this recording, at length.", 11),
        "c": FlamingoPrompt("Tempo?", 7),
    }
    run = analyzer.describe(clip, prompts)
    naive = analyzer.describe_naive(clip, prompts)
    for name, prompt in prompts.items():
        assert len(run.descriptions[name].token_ids) <= prompt.max_new_tokens
        assert run.descriptions[name].token_ids == naive.descriptions[name].token_ids


def test_sampling_is_reproducible_per_track(flamingo_models: Path, tmp_path: Path) -> None:
    short = {"genre_mood": FlamingoPrompt("Genre and mood, one line.", 24),
             "instrumentation": FlamingoPrompt("Instruments, as a list.", 16)}
    sampler = load(flamingo_models, do_sample=True, temperature=1.0, top_p=0.95, seed=7, prompts=short)
    song = track(tmp_path, "Song", seconds=12)

    first, again = sampler.analyze(song), sampler.analyze(song)
    assert first.values == again.values
    seed = first.provenance["generation"]["track_seed"]
    assert seed == track_seed(7, "Song") != track_seed(7, "Other Song")

    # The same audio under another folder name gets another seed, so another draw.
    renamed = Track(flac=tmp_path / "Other Song" / "full_mix.flac", audio=song.audio)
    assert sampler.analyze(renamed).values != first.values


def kv_bytes_per_token(analyzer: FlamingoAnalyzer) -> int:
    text = analyzer.model.config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    return text.num_hidden_layers * 2 * text.num_key_value_heads * head_dim * 4  # float32


def test_out_of_memory_retries_one_prompt_at_a_time(
    flamingo_models: Path, analyzer: FlamingoAnalyzer, batched_run, clip: np.ndarray
) -> None:
    # A budget that holds one row of prefix + answer but not five.
    longest_row = batched_run.timings["prefix_tokens"] + 64 + max(p.max_new_tokens for p in analyzer.cfg.prompts.values())
    budget = 1.6 * longest_row * kv_bytes_per_token(analyzer)
    capped = load(flamingo_models, kv_cache_limit_mb=budget / 2**20)

    run = capped.describe(clip)

    assert run.mode == "one_by_one" and run.timings["oom_retries"] == 1
    for name, description in batched_run.descriptions.items():
        assert run.descriptions[name].token_ids == description.token_ids, name


def test_out_of_memory_twice_fails_the_track_and_keeps_the_model(
    flamingo_models: Path, analyzer: FlamingoAnalyzer, batched_run, tmp_path: Path
) -> None:
    # Room for the prefix and a few tokens of one answer, never for 500.
    budget = (batched_run.timings["prefix_tokens"] + 80) * kv_bytes_per_token(analyzer)
    capped = load(flamingo_models, kv_cache_limit_mb=budget / 2**20)

    with pytest.raises(AnalysisError, match="out of GPU memory even with one prompt at a time"):
        capped.analyze(track(tmp_path))

    # Still loaded and usable for work that fits.
    small = capped.describe(track(tmp_path).audio.mono_16k, {"tag": FlamingoPrompt("Genre?", 4)})
    assert small.mode == "batched" and 0 < len(small.descriptions["tag"].token_ids) <= 4


def test_stop_request_mid_generation_raises_cancelled(analyzer: FlamingoAnalyzer, tmp_path: Path) -> None:
    job = track(tmp_path)
    steps = []

    def count_and_stop(*_: object) -> None:
        steps.append(1)
        if len(steps) == 6:  # prefill, then five decoding steps
            job.cancel.set()

    hook = analyzer.model.lm_head.register_forward_hook(count_and_stop)
    try:
        with pytest.raises(Cancelled):
            analyzer.analyze(job)
    finally:
        hook.remove()
    # Stopped within a token of the request, far from the 500-token limit.
    assert len(steps) <= 7
    assert set(analyzer.analyze(track(tmp_path)).values) == KEYS


def test_cancel_before_start_runs_nothing(analyzer: FlamingoAnalyzer, tmp_path: Path) -> None:
    job = track(tmp_path, seconds=5)
    job.cancel.set()
    with pytest.raises(Cancelled):
        analyzer.analyze(job)


def test_audio_over_twenty_minutes_is_cut_with_a_warning(analyzer: FlamingoAnalyzer, tmp_path: Path) -> None:
    long_audio = np.zeros(int(1201.5 * SAMPLE_RATE), dtype=np.float32)
    cut, warning = analyzer.cap_duration(long_audio)
    assert len(cut) == 1200 * SAMPLE_RATE
    assert warning and "first 1200 s" in warning

    short, none = analyzer.cap_duration(long_audio[: 10 * SAMPLE_RATE])
    assert len(short) == 10 * SAMPLE_RATE and none is None

    cut_by_worker = analyzer.analyze(track(tmp_path, seconds=6, truncated=True))
    assert "before analysis" in cut_by_worker.provenance["truncated_audio"]


def test_model_files_are_checksummed_like_a_fetch(flamingo_models: Path, analyzer: FlamingoAnalyzer) -> None:
    recorded = ModelStore(flamingo_models).recorded()
    files = analyzer.model_files()
    assert "flamingo/music-flamingo-2601-hf/model.safetensors" in files
    assert "flamingo/music-flamingo-2601-hf/tokenizer.json" in files
    assert all(recorded[name] == digest for name, digest in files.items())


def test_settings_change_with_prompts_and_generation() -> None:
    store = ModelStore(Path("/nonexistent"))
    base = FlamingoAnalyzer(FlamingoConfig(), store).settings()
    other_prompt = FlamingoConfig(prompts={"full": FlamingoPrompt("Describe it.", 500)})
    assert FlamingoAnalyzer(other_prompt, store).settings() != base
    assert FlamingoAnalyzer(FlamingoConfig(do_sample=True), store).settings() != base
    assert FlamingoAnalyzer(FlamingoConfig(device="cpu"), store).settings() == base


def test_missing_checkpoint_is_a_load_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="flamingo/music-flamingo-2601-hf"):
        FlamingoAnalyzer(FlamingoConfig(**CPU), ModelStore(tmp_path)).load()


def test_other_architecture_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "flamingo" / "qwen2-audio"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2_audio"}))
    cfg = FlamingoConfig(**CPU, model_id="Qwen/qwen2-audio")
    with pytest.raises(ModelLoadError, match="'qwen2_audio' is not one of 'musicflamingo', 'audioflamingo3'"):
        FlamingoAnalyzer(cfg, ModelStore(tmp_path)).load()


def test_the_checkpoint_the_gguf_builds_come_from_loads_and_batches_exactly(tmp_path: Path, clip) -> None:
    # nvidia/music-flamingo-hf is AudioFlamingo3ForConditionalGeneration: `mirwatch ab`
    # needs it on the transformers side to compare with llama.cpp on the same weights.
    from mirwatch.models import tiny_gguf

    tiny_gguf.write_checkpoint(tmp_path / tiny_gguf.CHECKPOINT)
    analyzer = load(tmp_path, model_id="nvidia/music-flamingo-hf")
    assert type(analyzer.model).__name__ == "AudioFlamingo3ForConditionalGeneration"
    batched, naive = analyzer.describe(clip), analyzer.describe_naive(clip)
    assert batched.mode == "batched"
    assert {n: d.token_ids for n, d in batched.descriptions.items()} == \
        {n: d.token_ids for n, d in naive.descriptions.items()}
    assert any(d.token_ids for d in batched.descriptions.values())


def test_corrupted_weights_are_caught_at_load(flamingo_models: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "models"
    shutil.copytree(flamingo_models, copy)
    weights = copy / "flamingo" / "music-flamingo-2601-hf" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="corrupt"):
        load(copy)


def test_enabled_auto_follows_the_gpu() -> None:
    on, why = FlamingoAnalyzer.wanted(FlamingoConfig(enabled="auto"))
    assert on == gpu_available()
    if not on:
        assert "no CUDA or ROCm GPU" in why and 'enabled = "on"' in why
    assert FlamingoAnalyzer.wanted(FlamingoConfig(enabled="on"))[0] is True
    assert FlamingoAnalyzer.wanted(FlamingoConfig(enabled="off"))[0] is False


def test_documented_prompts_are_the_defaults() -> None:
    raw = tomllib.loads((REPO / "docs" / "flamingo-prompts.toml").read_text(encoding="utf-8"))
    cfg = from_dict(raw, base=REPO, check_roots=False)
    assert cfg.flamingo.prompts == FlamingoConfig().prompts
    assert set(cfg.flamingo.prompts) == {k.removeprefix("music_flamingo_") for k in KEYS}


def test_config_adds_and_validates_prompts() -> None:
    raw = {"flamingo": {"prompts": {"foo": {"text": "Is there a saxophone?", "max_new_tokens": 20}}}}
    cfg = from_dict(raw, base=REPO, check_roots=False)
    assert cfg.flamingo.prompts == {"foo": FlamingoPrompt("Is there a saxophone?", 20)}
    for bad in ({"Foo": {"text": "x"}}, {"foo": {"text": " "}}, {"foo": {"text": "x", "max_new_tokens": 0}}, {}):
        with pytest.raises(ConfigError, match="flamingo.prompts"):
            from_dict({"flamingo": {"prompts": bad}}, base=REPO, check_roots=False)
    with pytest.raises(ConfigError, match="attn_implementation"):
        dataclasses.replace(FlamingoConfig(), attn_implementation="fast")

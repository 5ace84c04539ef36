"""The GGUF backend against a real llama-server running the tiny GGUF pair made by llama.cpp's converter."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from conftest import write_flac
from gguf_support import combined_models, require_llama_server, short_prompts, tiny_gguf_dir
from mirwatch.analyzers.base import Cancelled, ModelLoadError, Track
from mirwatch.analyzers.flamingo import KEY_PREFIX, FlamingoAnalyzer
from mirwatch.analyzers.flamingo_gguf import FlamingoGGUFAnalyzer, gguf_file, wav_base64
from mirwatch.audio import decode
from mirwatch.config import ConfigError, FlamingoConfig
from mirwatch.models.store import ModelStore
from mirwatch.textnorm import normalize


def gguf_config(**overrides) -> FlamingoConfig:
    options = dict(enabled="on", dtype="float32", backend="gguf", gguf_quant="f16",
                   gguf_max_audio_seconds=30.0, prompts=short_prompts())
    return FlamingoConfig(**(options | overrides))


@pytest.fixture(scope="module")
def gguf_models() -> Path:
    require_llama_server()
    return tiny_gguf_dir()


@pytest.fixture(scope="module")
def analyzer(gguf_models: Path):
    a = FlamingoGGUFAnalyzer(gguf_config(), ModelStore(gguf_models))
    a.load()
    yield a
    a.close()


@pytest.fixture(scope="module")
def track(tmp_path_factory: pytest.TempPathFactory) -> Track:
    flac = write_flac(tmp_path_factory.mktemp("gguf") / "Some Song" / "full_mix.flac", 8.0)
    return Track(flac=flac, audio=decode(flac))


def test_both_backends_write_the_same_keys(tiny_models: Path, analyzer, track: Track) -> None:
    transformers = FlamingoAnalyzer(gguf_config(backend="transformers"), ModelStore(tiny_models))
    transformers.load()
    try:
        expected = transformers.analyze(track)
    finally:
        transformers.close()
    got = analyzer.analyze(track)

    keys = {KEY_PREFIX + name for name in short_prompts()}
    assert set(expected.values) == set(got.values) == keys
    for text in got.values.values():
        assert isinstance(text, str) and normalize(text) == text
    # Same provenance fields (the GGUF one also says which backend wrote it).
    assert set(expected.provenance) <= set(got.provenance)
    assert got.provenance["backend"] == "gguf"
    for name, limit in ((n, p.max_new_tokens) for n, p in short_prompts().items()):
        stats = got.provenance["prompts"][name]
        assert set(stats) == set(expected.provenance["prompts"][name])
        assert 0 <= stats["tokens"] <= limit and stats["stopped"] in ("eos", "limit")
        assert stats["seconds"] > 0
    assert got.provenance["audio_seconds"] == expected.provenance["audio_seconds"] == 8.0
    # The settings (and so the staleness fingerprint) differ between backends.
    assert analyzer.settings()["backend"] == "gguf" and analyzer.settings() != transformers.settings()


def test_model_files_are_the_pair_with_checksums(analyzer, gguf_models: Path) -> None:
    files = analyzer.model_files()
    assert set(files) == {gguf_file("f16"), "flamingo-gguf/music-flamingo-hf.mmproj-f16.gguf"}
    assert files == {k: v for k, v in ModelStore(gguf_models).recorded().items() if k in files}


def test_a_rerun_reuses_each_slots_audio_prefix(analyzer, track: Track) -> None:
    first = analyzer.describe(track.audio.mono_16k, seed=1)
    again = analyzer.describe(track.audio.mono_16k, seed=1)
    assert first.mode == "parallel" and len(first.answers) == 5
    # 8 s of audio are 200 audio tokens: a slot that kept its prompt skips them.
    assert again.timings["cached_prefix_tokens"] > 200
    assert {n: a.text for n, a in first.answers.items()} == {n: a.text for n, a in again.answers.items()}


def test_greedy_output_is_repeatable(analyzer, track: Track) -> None:
    first = analyzer.analyze(track).values
    second = analyzer.analyze(track).values
    assert first == second


def test_cold_parallel_requests_give_the_same_text(analyzer, track: Track) -> None:
    warm = analyzer.describe(track.audio.mono_16k, seed=3, warm_prefix=True)
    cold = analyzer.describe(track.audio.mono_16k, seed=3)
    assert {n: a.text for n, a in warm.answers.items()} == {n: a.text for n, a in cold.answers.items()}


def test_server_killed_is_restarted_and_the_next_track_runs(gguf_models: Path, track: Track) -> None:
    a = FlamingoGGUFAnalyzer(gguf_config(), ModelStore(gguf_models))
    a.load()
    try:
        before = a.analyze(track).values
        os.kill(a.server.proc.pid, signal.SIGKILL)
        a.server.proc.wait(10)
        after = a.analyze(track)
        assert a.server.starts == 2 and a.server.alive()
        assert after.provenance["timings"]["server_restarts"] == 1
        assert after.values == before
    finally:
        a.close()


def test_close_stops_the_server_and_removes_its_socket(gguf_models: Path) -> None:
    a = FlamingoGGUFAnalyzer(gguf_config(), ModelStore(gguf_models))
    a.load()
    proc, folder = a.server.proc, os.path.dirname(a.server.socket_path)
    assert Path(a.server.socket_path).is_socket()
    assert oct(os.stat(folder).st_mode & 0o777) == "0o700"
    a.close()
    assert proc.poll() is not None and not os.path.exists(folder)


def test_cancel_ends_the_requests(analyzer, track: Track) -> None:
    cancel = threading.Event()
    cancel.set()
    started = time.monotonic()
    with pytest.raises(Cancelled):
        analyzer.describe(track.audio.mono_16k, cancel=cancel.is_set)
    assert time.monotonic() - started < 10
    # The server is still there for the next job.
    assert analyzer.analyze(track).values


def test_missing_binary_or_files_is_a_model_load_error(gguf_models: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="llama-server not found"):
        FlamingoGGUFAnalyzer(gguf_config(llama_server=str(tmp_path / "nope")), ModelStore(gguf_models)).load()
    with pytest.raises(ModelLoadError, match="music-flamingo-hf.i1-IQ3_M.gguf"):
        FlamingoGGUFAnalyzer(gguf_config(gguf_quant="IQ3_M"), ModelStore(gguf_models)).load()


def test_config_options() -> None:
    assert FlamingoConfig().backend == "transformers"
    assert gguf_file("Q8_0") == "flamingo-gguf/music-flamingo-hf.Q8_0.gguf"
    assert gguf_file("IQ3_M") == "flamingo-gguf/music-flamingo-hf.i1-IQ3_M.gguf"
    with pytest.raises(ConfigError):
        FlamingoConfig(gguf_parallel=0)
    with pytest.raises(ConfigError):
        FlamingoConfig(gguf_quant="../x")


def test_wav_is_16k_mono_pcm() -> None:
    import base64
    import io

    import numpy as np
    import soundfile as sf

    data = base64.b64decode(wav_base64(np.full(16000, 0.5, dtype=np.float32)))
    info = sf.info(io.BytesIO(data))
    assert (info.samplerate, info.channels, info.subtype, info.frames) == (16000, 1, "PCM_16", 16000)


def test_combined_model_dir(tmp_path: Path, tiny_models: Path) -> None:
    models = combined_models(tmp_path, tiny_models)
    recorded = ModelStore(models).recorded()
    assert gguf_file("f16") in recorded and any(k.startswith("flamingo/") for k in recorded)

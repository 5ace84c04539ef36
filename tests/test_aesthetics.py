"""Audiobox Aesthetics on the full-size architecture with seeded random weights.

The checkpoint comes from ``mirwatch models make-test`` (see
`mirwatch.models.tiny_aesthetics`); scores are meaningless, but loading,
windowing, batching, the inverse target transform and the weighting of the
last, partial window are the production code's.
"""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest

from mirwatch.analyzers.aesthetics import AXES, CHECKPOINT, RATE, AestheticsAnalyzer, windows_of
from mirwatch.analyzers.base import ModelLoadError, Track
from mirwatch.audio import Audio
from mirwatch.config import FeaturesConfig
from mirwatch.models.store import ModelStore

pytest.importorskip("audiobox_aesthetics")


@pytest.fixture(scope="module")
def analyzer(tiny_models):
    loaded = AestheticsAnalyzer(FeaturesConfig(aesthetics="on"), ModelStore(tiny_models), device="cpu")
    loaded.load()
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def twelve_seconds(analyzer, tmp_path_factory):
    """12 s of noise at 44.1 kHz stereo: one full window and one 20% window."""
    rng = np.random.default_rng(0)
    samples = (0.1 * rng.standard_normal((12 * 44_100, 2))).astype(np.float32)
    folder = tmp_path_factory.mktemp("lib") / "song"
    track = Track(folder / "full_mix.flac", Audio(samples=samples, sample_rate=44_100))
    return track, analyzer.analyze(track)


def test_four_finite_ratings(twelve_seconds, analyzer, tiny_models):
    _, result = twelve_seconds
    assert set(result.values) == set(AXES.values())
    for key, value in result.values.items():
        assert type(value) is float and math.isfinite(value), key
    assert result.provenance["windows"] == 2
    assert analyzer.model_files() == {CHECKPOINT: ModelStore(tiny_models).sha256(CHECKPOINT)}


def test_track_rating_is_the_window_mean_weighted_by_real_audio(twelve_seconds, analyzer):
    track, result = twelve_seconds
    windows, masks, weights = windows_of(track.audio.mono_16k)
    assert weights.tolist() == pytest.approx([1.0, 0.2])
    # One window at a time, so batching cannot hide a mistake either.
    single = [analyzer.predict(windows[i : i + 1], masks[i : i + 1]) for i in range(2)]
    for axis, key in AXES.items():
        per_window = np.array([s[axis][0] for s in single])
        assert result.values[key] == pytest.approx((per_window @ weights) / weights.sum(), abs=1e-4)
        # The weighting matters: the plain mean of these two windows is another number.
        assert abs(per_window[0] - per_window[1]) > 1e-6


def test_windows_cover_the_signal_and_mask_the_padding():
    wav = np.arange(25 * RATE, dtype=np.float32)
    windows, masks, weights = windows_of(wav)
    assert windows.shape == masks.shape == (3, 10 * RATE)
    assert np.array_equal(windows[masks], wav)
    assert not windows[~masks].any()
    assert weights.tolist() == [1.0, 1.0, 0.5]


def test_audio_too_short_for_one_frame_is_omitted_with_a_reason(analyzer, tmp_path):
    track = Track(tmp_path / "s" / "full_mix.flac", Audio(samples=np.zeros((200, 1), np.float32), sample_rate=RATE))
    result = analyzer.analyze(track)
    assert result.values == {}
    assert set(result.provenance["omitted"]) == set(AXES.values())


def test_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(ModelLoadError, match="checkpoint.pt"):
        AestheticsAnalyzer(FeaturesConfig(), ModelStore(tmp_path)).load()


def test_corrupted_checkpoint_is_refused(tiny_models, tmp_path):
    (tmp_path / "aesthetics").mkdir()
    shutil.copy(tiny_models / CHECKPOINT, tmp_path / CHECKPOINT)
    store = ModelStore(tmp_path)
    store.record({CHECKPOINT: store.sha256(CHECKPOINT, verify=False)})
    with open(tmp_path / CHECKPOINT, "r+b") as f:
        f.seek(1000)
        f.write(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="corrupt"):
        AestheticsAnalyzer(FeaturesConfig(), ModelStore(tmp_path)).load()


def test_not_a_checkpoint_is_refused(tmp_path):
    (tmp_path / "aesthetics").mkdir()
    (tmp_path / CHECKPOINT).write_bytes(b"not a torch file" * 64)
    with pytest.raises(ModelLoadError, match="checkpoint"):
        AestheticsAnalyzer(FeaturesConfig(), ModelStore(tmp_path)).load()


def test_wanted_follows_the_config_and_cuda():
    import torch

    assert AestheticsAnalyzer.wanted(FeaturesConfig(aesthetics="off"))[0] is False
    assert AestheticsAnalyzer.wanted(FeaturesConfig(aesthetics="on"))[0] is True
    assert AestheticsAnalyzer.wanted(FeaturesConfig(aesthetics="on", enabled=False))[0] is False
    assert AestheticsAnalyzer.wanted(FeaturesConfig(aesthetics="auto"))[0] is torch.cuda.is_available()

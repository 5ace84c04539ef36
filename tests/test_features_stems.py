"""Per-stem features, on stems synthesised beside a mix and read from FLAC like the daemon does."""

from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile as sf

from mirwatch.analyzers.base import Track
from mirwatch.analyzers.features import FeaturesAnalyzer
from mirwatch.audio import decode
from mirwatch.config import FeaturesConfig

RATE = 44_100
SECONDS = 20.0
BEAT = 0.5  # 120 BPM


def _time() -> np.ndarray:
    return np.arange(int(SECONDS * RATE)) / RATE


def _hits(times: np.ndarray, freq: float, decay: float, level: float) -> np.ndarray:
    out = np.zeros(int(SECONDS * RATE), dtype=np.float32)
    t = np.arange(int(0.25 * RATE)) / RATE
    hit = (level * np.sin(2 * np.pi * freq * t) * np.exp(-t / decay)).astype(np.float32)
    for when in times:
        start = int(round(when * RATE))
        out[start : start + hit.size] += hit[: out.size - start]
    return out


def drums() -> np.ndarray:
    """A click on every beat, from 0.5 s."""
    return _hits(np.arange(0.5, SECONDS - 0.3, BEAT), 2000, 0.004, 0.8)


def offbeat_bass() -> np.ndarray:
    """Bass notes halfway between the beats, the pitch changing every two seconds."""
    out = np.zeros(int(SECONDS * RATE), dtype=np.float32)
    for i, when in enumerate(np.arange(0.75, SECONDS - 0.3, BEAT)):
        freq = (55.0, 73.42, 82.41, 98.0)[int(when // 2) % 4]
        out += _hits([when], freq, 0.08, 0.6)
        out += _hits([when], 2 * freq, 0.05, 0.3)
    return out


def chords() -> np.ndarray:
    """A chord that changes every two seconds (A, D, E, F♯m)."""
    t = _time()
    out = np.zeros(t.size, dtype=np.float32)
    progression = ((220.0, 277.18, 329.63), (293.66, 369.99, 440.0), (329.63, 415.3, 493.88), (369.99, 440.0, 554.37))
    for i, freqs in enumerate(progression * int(SECONDS // 8)):
        part = (t >= 2 * i) & (t < 2 * i + 2)
        out[part] = sum(0.1 * np.sin(2 * np.pi * f * t[part]) for f in freqs)
    return out


def drone() -> np.ndarray:
    t = _time()
    return (0.1 * np.sin(2 * np.pi * 220 * t) + 0.05 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)


def vocals() -> np.ndarray:
    return (10 ** (-23 / 20) * np.sin(2 * np.pi * 1000 * _time())).astype(np.float32)


def write_track(folder, stems: dict[str, np.ndarray]) -> Track:
    folder.mkdir(parents=True, exist_ok=True)
    mix = sum(stems.values()) if stems else drums()
    for name, signal in stems.items():
        sf.write(str(folder / f"{name}.flac"), np.stack([signal, signal], axis=1), RATE, subtype="PCM_24")
    flac = folder / "full_mix.flac"
    sf.write(str(flac), np.stack([mix, mix], axis=1), RATE, subtype="PCM_24")
    return Track(flac, decode(flac))


def analyse(track: Track, **cfg):
    analyzer = FeaturesAnalyzer(FeaturesConfig(**cfg), store=None)
    analyzer.load()
    return analyzer.analyze(track)


STEM_KEYS = {
    **{f"{k}_{s}": s for s in ("drums", "bass", "other", "vocals") for k in ("lufs", "lra")},
    **{
        f"{k}_{s}": s
        for s in ("drums", "bass", "other")
        for k in ("onset_density_average", "onset_density_variance", "syncopation", "rhythmic_complexity",
                  "rhythmic_evenness")
    },
    **{f"{k}_{s}": s for s in ("bass", "other") for k in ("harmonic_movement", "harmonic_variance")},
}


@pytest.fixture(scope="module")
def four_stems(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lib") / "song"
    track = write_track(folder, {"drums": drums(), "bass": offbeat_bass(), "other": chords(), "vocals": vocals()})
    return analyse(track, loudness=False, spectral=False, bands=False, chroma=False)


def test_every_stem_key_is_written(four_stems):
    values = four_stems.values
    assert set(STEM_KEYS) <= set(values), sorted(set(STEM_KEYS) - set(values))
    assert four_stems.provenance["failed"] == {}
    for key in STEM_KEYS:
        assert type(values[key]) is float and math.isfinite(values[key]), key
    assert {k for k in values if k.endswith("_vocals")} == {"lufs_vocals", "lra_vocals"}


def test_stem_loudness(four_stems):
    # A 1 kHz sine at -23 dBFS on both channels: -23 LUFS, no range.
    assert four_stems.values["lufs_vocals"] == pytest.approx(-23.0, abs=0.1)
    assert four_stems.values["lra_vocals"] == pytest.approx(0.0, abs=0.5)


def test_onset_density_of_a_steady_beat(four_stems):
    # Two clicks a second in every 4 s window but the first (which starts at 0.5 s).
    assert four_stems.values["onset_density_average_drums"] == pytest.approx(2.0, abs=0.15)
    assert four_stems.values["onset_density_variance_drums"] < 0.05
    assert four_stems.values["rhythmic_complexity_drums"] < 1.0
    assert four_stems.values["rhythmic_evenness_drums"] > 0.95


def test_off_beat_bass_is_syncopated_and_on_beat_drums_are_not(four_stems):
    assert four_stems.values["syncopation_drums"] < 0.1
    assert four_stems.values["syncopation_bass"] > 0.8


def test_changing_chords_move_more_than_a_drone(four_stems, tmp_path):
    still = analyse(
        write_track(tmp_path / "drone", {"drums": drums(), "other": drone()}),
        loudness=False, spectral=False, bands=False, chroma=False,
    ).values
    moving = four_stems.values
    assert moving["harmonic_movement_other"] > 0.05
    assert still["harmonic_movement_other"] < 0.02
    assert moving["harmonic_variance_other"] > 3 * still["harmonic_variance_other"]


def test_only_present_stems_are_described(tmp_path):
    result = analyse(write_track(tmp_path / "song", {"drums": drums()}), spectral=False, bands=False, chroma=False)
    stem_keys = {k for k in result.values if k in STEM_KEYS}
    assert stem_keys == {k for k, s in STEM_KEYS.items() if s == "drums"}


def test_an_undecodable_stem_is_reported_and_the_others_still_count(tmp_path):
    track = write_track(tmp_path / "song", {"drums": drums(), "vocals": vocals()})
    (track.folder / "bass.flac").write_bytes(b"not audio at all" * 100)
    result = analyse(track, spectral=False, bands=False, chroma=False)
    assert "stems.bass" in result.provenance["failed"]
    assert not any(k.endswith("_bass") for k in result.values)
    assert "lufs_drums" in result.values and "lufs_vocals" in result.values


def test_without_the_mix_beats_stem_syncopation_is_omitted_with_a_reason(tmp_path):
    result = analyse(write_track(tmp_path / "song", {"drums": drums()}), rhythm=False, spectral=False,
                     bands=False, chroma=False, loudness=False)
    assert "syncopation_drums" not in result.values
    assert "rhythm" in result.provenance["omitted"]["syncopation_drums"]
    assert "onset_density_average_drums" in result.values


def test_stems_switched_off(tmp_path):
    analyzer = FeaturesAnalyzer(FeaturesConfig(stems=False), store=None)
    assert not analyzer.uses_stems
    result = analyzer.analyze(write_track(tmp_path / "song", {"drums": drums()}))
    assert not any(k in STEM_KEYS for k in result.values)

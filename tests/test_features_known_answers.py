"""Known answers for the numeric features, on signals synthesised here.

Every number comes from the real Essentia computations the daemon runs; the
expected values follow from how the signals are built (EBU Tech 3341/3342
test cases, click tracks, a triad, band-limited noise).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from mirwatch.analyzers.base import Track
from mirwatch.analyzers.features import FeaturesAnalyzer
from mirwatch.analyzers.mir import chroma, loudness, rhythm, spectra, spectral
from mirwatch.audio import Audio
from mirwatch.config import FeaturesConfig

RATE = 44_100


def sine(freq: float, seconds: float, dbfs: float, rate: int = RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (10 ** (dbfs / 20) * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def stereo(mono: np.ndarray) -> np.ndarray:
    return np.stack([mono, mono], axis=1)


def click_track(bpm: float, seconds: float = 30.0) -> tuple[np.ndarray, np.ndarray]:
    """Short decaying 2 kHz bursts on every beat from 0.5 s; returns (signal, click times)."""
    signal = np.zeros(int(seconds * RATE), dtype=np.float32)
    t = np.arange(int(0.02 * RATE)) / RATE
    burst = (0.8 * np.sin(2 * np.pi * 2000 * t) * np.exp(-t / 0.004)).astype(np.float32)
    times = np.arange(0.5, seconds - 0.1, 60.0 / bpm)
    for when in times:
        start = int(round(when * RATE))
        signal[start : start + burst.size] += burst[: signal.size - start]
    return signal, times


def band_noise(low: float, high: float, seconds: float = 10.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    spectrum = np.fft.rfft(rng.standard_normal(int(seconds * RATE)))
    freqs = np.fft.rfftfreq(int(seconds * RATE), 1 / RATE)
    spectrum[(freqs < low) | (freqs >= high)] = 0
    signal = np.fft.irfft(spectrum, n=int(seconds * RATE))
    return (0.1 * signal / np.sqrt(np.mean(signal**2))).astype(np.float32)


def analyse(tmp_path, samples: np.ndarray, rate: int = RATE, **cfg):
    folder = tmp_path / "track"
    folder.mkdir(exist_ok=True)
    samples = samples if samples.ndim == 2 else samples[:, None]
    track = Track(folder / "full_mix.flac", Audio(samples=np.ascontiguousarray(samples), sample_rate=rate))
    analyzer = FeaturesAnalyzer(FeaturesConfig(**cfg), store=None)
    analyzer.load()
    return analyzer.analyze(track)


def assert_json_safe(values: dict) -> None:
    for key, value in values.items():
        assert type(value) in (int, float), key
        assert math.isfinite(value), key


# Loudness: EBU Tech 3341 / 3342


def test_stereo_sine_at_minus_23_dbfs_reads_minus_23_lufs():
    measured = loudness.loudness(stereo(sine(1000, 20, -23, rate=48_000)), 48_000)
    assert measured.values["lufs"] == pytest.approx(-23.0, abs=0.1)
    assert measured.values["lra"] == pytest.approx(0.0, abs=0.5)


def test_integrated_loudness_does_not_depend_on_sample_rate():
    measured = loudness.loudness(stereo(sine(1000, 20, -23, rate=44_100)), 44_100)
    assert measured.values["lufs"] == pytest.approx(-23.0, abs=0.1)


@pytest.mark.parametrize("first, second, expected_lra", [(-20, -30, 10.0), (-20, -15, 5.0)])
def test_level_step_gives_the_loudness_range_tech_3342_expects(first, second, expected_lra):
    signal = np.concatenate([sine(1000, 20, first, 48_000), sine(1000, 20, second, 48_000)])
    measured = loudness.loudness(stereo(signal), 48_000)
    assert measured.values["lra"] == pytest.approx(expected_lra, abs=1.0)


def test_mono_file_is_one_channel_not_two():
    tone = sine(1000, 10, -23)
    as_stereo = loudness.loudness(stereo(tone), RATE).values["lufs"]
    as_mono = loudness.loudness(tone[:, None], RATE).values["lufs"]
    assert as_stereo - as_mono == pytest.approx(3.01, abs=0.05)


# Rhythm: click tracks


@pytest.fixture(scope="module")
def clicks_measured():
    measured = {}
    for bpm in (90, 120, 128, 174, 60):
        signal, times = click_track(bpm)
        spec = spectra.compute(signal)
        values, beats, onsets = rhythm.rhythm(signal, spec, signal.size / RATE)
        measured[bpm] = (values.values, beats, onsets, times)
    return measured


@pytest.mark.parametrize("bpm", [90, 120, 128, 174])
def test_click_track_tempo_and_beat_count(clicks_measured, bpm):
    values, beats, onsets, clicks = clicks_measured[bpm]
    assert values["bpm_is_defined"] == 1
    assert values["bpm"] == pytest.approx(bpm, abs=1.0)
    assert values["beat_count"] == clicks.size == beats.size
    assert values["onset_count"] == clicks.size


def test_slow_clicks_are_not_read_at_double_tempo(clicks_measured):
    values, *_ = clicks_measured[60]
    assert values["bpm"] == pytest.approx(60, abs=1.0)


@pytest.mark.parametrize("bpm", [120, 174])
def test_beats_and_onsets_land_on_the_clicks(clicks_measured, bpm):
    _, beats, onsets, clicks = clicks_measured[bpm]
    # Essentia's detectors work on 11.6 ms frames; the burst rises within 5 ms.
    assert np.max(np.abs(onsets.times - clicks)) < 0.03
    assert np.median(np.abs(beats - clicks)) < 0.03


def test_regular_clicks_are_even_simple_and_on_the_beat(clicks_measured):
    values, *_ = clicks_measured[120]
    assert values["rhythmic_complexity"] < 1.0
    assert values["rhythmic_evenness"] > 0.95
    assert values["ioi_mean"] == pytest.approx(0.5, abs=0.01)
    assert values["ioi_std"] < 0.02
    assert values["beat_regularity"] < 0.02
    assert values["on_beat_ratio"] > 0.95
    assert values["syncopation"] < 0.05
    assert values["onset_density"] == pytest.approx(59 / 30, abs=0.01)


def test_random_onsets_are_complex_and_uneven():
    rng = np.random.default_rng(3)
    signal = np.zeros(30 * RATE, dtype=np.float32)
    t = np.arange(int(0.02 * RATE)) / RATE
    burst = (0.8 * np.sin(2 * np.pi * 2000 * t) * np.exp(-t / 0.004)).astype(np.float32)
    for when in np.cumsum(rng.uniform(0.1, 1.2, size=40)):
        if when < 29.5:
            start = int(when * RATE)
            signal[start : start + burst.size] += burst
    measured = rhythm.onset_features(rhythm.detect_onsets(signal, spectra.compute(signal)), 30.0)
    assert measured.values["rhythmic_complexity"] > 3.0
    assert measured.values["rhythmic_evenness"] < 0.8


def test_off_beat_accents_raise_syncopation():
    on_beats, _ = click_track(120)
    off_beats, _ = click_track(120)
    # The same clicks a half beat later, four times as strong.
    shifted = np.zeros_like(off_beats)
    shifted[int(0.25 * RATE) :] = 4 * off_beats[: -int(0.25 * RATE)]
    signal = on_beats + shifted
    spec = spectra.compute(signal)
    onsets = rhythm.detect_onsets(signal, spec)
    beats = np.arange(0.5, 29.9, 0.5)
    on_ratio, syncopation = rhythm.syncopation(beats, onsets)
    assert on_ratio == pytest.approx(0.5, abs=0.05)
    assert syncopation > 0.6


# Chroma, spectral shape, bands


def test_a_major_triad_peaks_at_a_c_sharp_e():
    triad = sum(sine(f, 5, -12) for f in (440.0, 554.37, 659.26))
    measured = chroma.chroma(spectra.compute(triad)).values
    weights = np.array([measured[f"chroma_{i}"] for i in range(12)])
    assert set(np.argsort(weights)[-3:]) == {9, 1, 4}
    assert weights.max() == 1.0
    assert np.all((weights >= 0) & (weights <= 1))
    assert np.max(np.delete(weights, [9, 1, 4])) < 0.5


def test_white_noise_is_flat_and_a_sine_is_not():
    rng = np.random.default_rng(1)
    noise = (0.1 * rng.standard_normal(5 * RATE)).astype(np.float32)
    flat_noise = spectral.spectral_shape(spectra.compute(noise)).values["spectral_flatness"]
    flat_sine = spectral.spectral_shape(spectra.compute(sine(1000, 5, -6))).values["spectral_flatness"]
    # Geometric / arithmetic mean of exponentially distributed bin powers: exp(-Euler's gamma).
    assert flat_noise == pytest.approx(math.exp(-0.5772), abs=0.03)
    assert flat_sine < 0.01


def test_steady_tone_has_no_flux_and_alternating_tones_do():
    steady = spectral.spectral_shape(spectra.compute(sine(1000, 5, -6))).values["spectral_flux"]
    t = np.arange(5 * RATE) / RATE
    # Switching every 4096 samples: every other frame boundary changes the spectrum.
    switch = (np.arange(t.size) // 4096) % 2 == 0
    alternating = np.where(switch, np.sin(2 * np.pi * 500 * t), np.sin(2 * np.pi * 3000 * t)).astype(np.float32)
    changing = spectral.spectral_shape(spectra.compute(0.5 * alternating)).values["spectral_flux"]
    assert steady < 0.01
    assert changing > 0.3


def test_spectral_shape_matches_essentias_per_frame_algorithms():
    import essentia.standard as es

    rng = np.random.default_rng(2)
    signal = (band_noise(200, 3000, 2) + 0.3 * sine(440, 2, -6) + 0.01 * rng.standard_normal(2 * RATE)).astype(
        np.float32
    )
    spec = spectra.compute(signal)
    mine = spectral.spectral_shape(spec).values
    moments = es.CentralMoments(range=RATE / 2)
    shape = es.DistributionShape()
    flatness = es.Flatness()
    skews, kurts, flats = [], [], []
    for frame in spec.magnitude:
        _, skew, kurt = shape(moments(frame))
        skews.append(skew)
        kurts.append(kurt)
        flats.append(flatness(frame**2))
    assert mine["spectral_skewness"] == pytest.approx(np.mean(skews), rel=1e-3)
    assert mine["spectral_kurtosis"] == pytest.approx(np.mean(kurts), rel=1e-3)
    assert mine["spectral_flatness"] == pytest.approx(np.mean(flats), rel=1e-3)


@pytest.mark.parametrize(
    "key, low, high",
    [
        ("rms_energy_bass", 40, 90),
        ("rms_energy_body", 200, 450),
        ("rms_energy_mid", 900, 2000),
        ("rms_energy_air", 4000, 15000),
    ],
)
def test_band_limited_noise_lands_in_its_band(key, low, high):
    noise = band_noise(low, high)
    bands = spectral.band_energy(spectra.compute(noise)).values
    # The noise is scaled to an RMS of 0.1: -20 dBFS.
    assert bands[key] == pytest.approx(-20.0, abs=0.5)
    for other, level in bands.items():
        if other != key:
            assert level < bands[key] - 15, other


def test_band_level_of_a_sine_is_its_rms_in_dbfs():
    bands = spectral.band_energy(spectra.compute(sine(1000, 5, -6))).values
    assert bands["rms_energy_mid"] == pytest.approx(-6 - 3.01, abs=0.1)


# The whole analyzer: edge cases, config switches, failure isolation


def test_whole_analyzer_on_a_rhythmic_track(tmp_path):
    signal, clicks = click_track(120)
    signal = signal + sine(220, 30, -30)
    result = analyse(tmp_path, stereo(signal))
    assert_json_safe(result.values)
    assert result.provenance["failed"] == {}
    expected = {"bpm", "bpm_is_defined", "beat_count", "beat_regularity", "syncopation", "on_beat_ratio",
                "onset_count", "onset_density", "onset_strength_mean", "onset_strength_std",
                "rhythmic_complexity", "rhythmic_evenness", "ioi_mean", "ioi_std", "lufs", "lra",
                "spectral_flatness", "spectral_flux", "spectral_skewness", "spectral_kurtosis",
                "rms_energy_bass", "rms_energy_body", "rms_energy_mid", "rms_energy_air",
                *(f"chroma_{i}" for i in range(12))}  # fmt: skip
    assert set(result.values) == expected
    beat_lines = result.aux[".BEATS_GRID"].splitlines()
    assert len(beat_lines) == result.values["beat_count"]
    assert [float(x) for x in result.aux[".ONSETS"].splitlines()] == pytest.approx(clicks, abs=0.03)


def test_silence_is_defined_and_has_no_pulse(tmp_path):
    result = analyse(tmp_path, np.zeros((10 * RATE, 2), dtype=np.float32))
    assert_json_safe(result.values)
    assert result.provenance["failed"] == {}
    assert result.values["bpm_is_defined"] == 0
    assert result.values["beat_count"] == 0
    assert result.values["onset_count"] == 0
    assert result.aux[".BEATS_GRID"] == ""
    for key in ("lufs", "lra", "bpm", "spectral_flatness", "rms_energy_mid", "chroma_0"):
        assert key not in result.values
        assert result.provenance["omitted"][key]


def test_half_second_file_is_defined(tmp_path):
    rng = np.random.default_rng(4)
    result = analyse(tmp_path, stereo((0.1 * rng.standard_normal(RATE // 2)).astype(np.float32)))
    assert_json_safe(result.values)
    assert result.provenance["failed"] == {}
    assert "lufs" in result.values
    assert "lra" not in result.values and "short-term" in result.provenance["omitted"]["lra"]
    assert result.values["bpm_is_defined"] == 0


def test_very_short_file_does_not_crash(tmp_path):
    result = analyse(tmp_path, np.full((100, 2), 0.1, dtype=np.float32))
    assert_json_safe(result.values)
    assert result.provenance["failed"] == {}


def test_48k_file_is_analysed_at_its_true_tempo(tmp_path):
    signal, _ = click_track(128)
    import essentia.standard as es

    at_48k = es.Resample(inputSampleRate=RATE, outputSampleRate=48_000, quality=1)(signal)
    result = analyse(tmp_path, stereo(at_48k), rate=48_000, loudness=False, spectral=False, bands=False, chroma=False)
    assert result.values["bpm"] == pytest.approx(128, abs=1.0)


def test_switched_off_groups_write_nothing(tmp_path):
    signal, _ = click_track(120, seconds=10)
    result = analyse(tmp_path, stereo(signal), rhythm=False, chroma=False)
    assert not any(k.startswith(("bpm", "onset", "ioi", "chroma")) for k in result.values)
    assert result.aux == {}
    assert "lufs" in result.values and "spectral_flux" in result.values
    assert analyse(tmp_path, stereo(signal), enabled=False).values == {}


def test_a_failing_group_is_left_out_with_its_reason(tmp_path, monkeypatch):
    def broken(_spectra):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(spectral, "spectral_shape", broken)
    signal, _ = click_track(120, seconds=10)
    result = analyse(tmp_path, stereo(signal))
    assert result.provenance["failed"] == {"spectral": "RuntimeError: simulated failure"}
    assert not any(k.startswith("spectral_") for k in result.values)
    assert "lufs" in result.values and "rms_energy_mid" in result.values and "bpm" in result.values


def test_cancel_stops_between_groups(tmp_path):
    from mirwatch.analyzers.base import Cancelled

    folder = tmp_path / "track"
    folder.mkdir()
    track = Track(folder / "full_mix.flac", Audio(samples=np.zeros((RATE, 2), np.float32), sample_rate=RATE))
    track.cancel.set()
    with pytest.raises(Cancelled):
        FeaturesAnalyzer(FeaturesConfig(), store=None).analyze(track)

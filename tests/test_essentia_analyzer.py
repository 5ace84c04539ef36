"""EssentiaAnalyzer on tiny models with the real names, on real FLAC files."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from mirwatch.analyzers.base import AnalysisError, Cancelled, ModelLoadError, Track
from mirwatch.analyzers.essentia_tags import EssentiaAnalyzer, top_labels
from mirwatch.audio import decode
from mirwatch.config import EssentiaConfig
from mirwatch.models import tiny_essentia
from mirwatch.models.store import ModelStore
from mirwatch.models.testmodels import make_test

TAG_KEYS = ("essentia_genre", "essentia_mood", "essentia_instrument")
SCALAR_KEYS = ("danceability", "atonality")


@pytest.fixture(scope="session")
def essentia_models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("essentia-models")
    make_test(root, only=("essentia",))
    return root


def _write_track(root: Path, name: str, seconds: float, seed: int, rate: int = 44100) -> Path:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    # A decaying chord every half second over noise: tonal and rhythmic content.
    envelope = np.exp(-6 * (t % 0.5))
    chord = sum(np.sin(2 * np.pi * f * t) for f in (220.0 * (1 + seed % 3), 277.2, 329.6)) / 3
    left = 0.5 * envelope * chord + 0.05 * rng.standard_normal(t.size)
    stereo = np.stack([left, np.roll(left, 100)], axis=1).astype(np.float32)
    folder = root / name
    folder.mkdir(parents=True)
    path = folder / "full_mix.flac"
    sf.write(path, stereo, rate, subtype="PCM_24")
    return path


@pytest.fixture(scope="session")
def flacs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("library")
    return {
        "a": _write_track(root, "Track A", 20.0, seed=1),
        "b": _write_track(root, "Track B", 12.0, seed=2, rate=48000),
        "short": _write_track(root, "Short", 1.5, seed=3),
    }


def _track(path: Path) -> Track:
    return Track(flac=path, audio=decode(path))


def _loaded(models: Path, **options) -> EssentiaAnalyzer:
    analyzer = EssentiaAnalyzer(EssentiaConfig(**options), ModelStore(models))
    analyzer.load()
    return analyzer


@pytest.fixture(scope="module")
def effnet(essentia_models) -> EssentiaAnalyzer:
    return _loaded(essentia_models, threshold=0.0, top_k=1000)


@pytest.fixture(scope="module")
def vggish(essentia_models) -> EssentiaAnalyzer:
    return _loaded(essentia_models, threshold=0.0, top_k=1000, danceability_atonality="vggish")


def _classes(stem: str) -> list[str]:
    return tiny_essentia.metadata(stem)["classes"]


def test_effnet_default_gives_every_key_in_range_with_provenance(effnet, flacs):
    result = effnet.analyze(_track(flacs["a"]))
    assert list(result.values) == [*TAG_KEYS, *SCALAR_KEYS]
    for key, stem in zip(TAG_KEYS, tiny_essentia.EFFNET_HEADS):
        tags = result.values[key]
        # threshold 0 and a huge top_k: every class, each once.
        assert sorted(tags) == sorted(_classes(stem))
        assert all(0.0 <= p <= 1.0 for p in tags.values())
    for key in SCALAR_KEYS:
        assert 0.0 <= result.values[key] <= 1.0
    assert result.provenance["danceability_atonality"] == "effnet"
    assert result.provenance["files"] == {
        "embeddings": "discogs-effnet-bs64-1.pb",
        "essentia_genre": "genre_discogs400-discogs-effnet-1.pb",
        "essentia_mood": "mtg_jamendo_moodtheme-discogs-effnet-1.pb",
        "essentia_instrument": "mtg_jamendo_instrument-discogs-effnet-1.pb",
        "danceability": "danceability-discogs-effnet-1.pb",
        "atonality": "tonal_atonal-discogs-effnet-1.pb",
    }
    # ~1 embedding per second of audio
    assert 15 <= result.provenance["patches"] <= 20
    assert json.loads(json.dumps(result.values)) == result.values


def test_vggish_setting_uses_the_legacy_classifiers(effnet, vggish, flacs):
    track = _track(flacs["a"])
    legacy, default = vggish.analyze(track), effnet.analyze(track)
    assert list(legacy.values) == [*TAG_KEYS, *SCALAR_KEYS]
    for key in SCALAR_KEYS:
        assert 0.0 <= legacy.values[key] <= 1.0
    assert legacy.provenance["files"]["danceability"] == "danceability-vggish-audioset-1.pb"
    assert legacy.provenance["files"]["atonality"] == "tonal_atonal-vggish-audioset-1.pb"
    assert "essentia/danceability-vggish-audioset-1.pb" in vggish.model_files()
    assert "essentia/danceability-discogs-effnet-1.pb" not in vggish.model_files()
    # The tags come from the same embeddings either way; the scalars do not.
    for key in TAG_KEYS:
        assert legacy.values[key] == default.values[key]
    assert (legacy.values["danceability"], legacy.values["atonality"]) != (
        default.values["danceability"], default.values["atonality"])
    assert vggish.settings()["danceability_atonality"] == "vggish"
    assert vggish.settings() != effnet.settings()


def test_tags_respect_threshold_and_top_k(essentia_models, effnet, flacs):
    track = _track(flacs["a"])
    everything = effnet.analyze(track).values
    limited = _loaded(essentia_models, threshold=0.5, top_k=3).analyze(track).values
    for key in TAG_KEYS:
        full = everything[key]
        assert list(full.values()) == sorted(full.values(), reverse=True)
        expected = [label for label, p in full.items() if p >= 0.5][:3]
        assert list(limited[key]) == expected
        assert all(limited[key][label] == full[label] for label in expected)
        assert len(limited[key]) <= 3 and all(p >= 0.5 for p in limited[key].values())
        # Rounded to 4 places.
        assert all(round(p, 4) == p for p in full.values())
    # A threshold above the top prediction leaves an empty (but present) dict.
    top = max(max(everything[key].values()) for key in TAG_KEYS)
    assert top < 0.9999
    strict = _loaded(essentia_models, threshold=top + 0.0001, top_k=10).analyze(track).values
    assert all(strict[key] == {} for key in TAG_KEYS)


def test_top_labels_orders_filters_and_rounds():
    probabilities = np.array([0.2, 0.912345, 0.05, 0.5, 0.5], dtype=np.float32)
    labels = ["a", "b", "c", "d", "e"]
    assert top_labels(labels, probabilities, threshold=0.1, top_k=3) == {"b": 0.9123, "d": 0.5, "e": 0.5}
    assert list(top_labels(labels, probabilities, threshold=0.3, top_k=10)) == ["b", "d", "e"]
    assert top_labels(labels, probabilities, threshold=0.95, top_k=10) == {}


def _swapped_store(source: Path, target: Path, stem: str, classes: list[str]) -> ModelStore:
    shutil.copytree(source, target)
    names = tiny_essentia.write_model(target, stem, classes=classes)
    store = ModelStore(target)
    store.record({name: store.sha256(name, verify=False) for name in names})
    return store


@pytest.mark.parametrize(
    ("family", "stem"),
    [("effnet", "tonal_atonal-discogs-effnet-1"), ("vggish", "tonal_atonal-vggish-audioset-1")],
)
def test_atonality_follows_the_class_named_atonal_not_a_column(essentia_models, flacs, tmp_path, family, stem):
    assert _classes(stem) == ["atonal", "tonal"]
    swapped_store = _swapped_store(essentia_models, tmp_path / "swapped", stem, ["tonal", "atonal"])
    swapped_meta = json.loads((tmp_path / "swapped" / "essentia" / f"{stem}.json").read_text())
    assert swapped_meta["classes"] == ["tonal", "atonal"]
    options = dict(danceability_atonality=family, genre=False, mood=False, instrument=False, danceability=False)
    original = _loaded(essentia_models, **options)
    swapped = EssentiaAnalyzer(EssentiaConfig(**options), swapped_store)
    swapped.load()
    # The two graphs really differ: column 0 is "atonal" in one, "tonal" in the other.
    assert original.model_files()[f"essentia/{stem}.pb"] != swapped.model_files()[f"essentia/{stem}.pb"]
    for name in ("a", "b"):
        track = _track(flacs[name])
        a, b = original.analyze(track).values, swapped.analyze(track).values
        assert list(a) == ["atonality"]
        assert a["atonality"] == pytest.approx(b["atonality"], abs=1e-4)
        # A fixed column index would have read the other class here.
        column0 = swapped._vggish_heads or swapped._effnet_heads
        assert column0[0].classes[0] == "tonal"
        assert abs(a["atonality"] - 0.5) > 1e-3


def test_danceability_reads_the_class_named_danceable(effnet, flacs):
    head = next(h for h in effnet._effnet_heads if h.key == "danceability")
    assert head.classes == ["danceable", "not_danceable"]
    assert 0.0 <= effnet.analyze(_track(flacs["b"])).values["danceability"] <= 1.0


def test_parts_switch_off_and_unneeded_models_are_not_loaded(essentia_models, flacs):
    track = _track(flacs["b"])
    partial = _loaded(essentia_models, genre=False, danceability=False)
    result = partial.analyze(track)
    assert list(result.values) == ["essentia_mood", "essentia_instrument", "atonality"]
    assert "genre" not in json.dumps(result.provenance) and "danceability" not in result.provenance["files"]
    assert "essentia/genre_discogs400-discogs-effnet-1.pb" not in partial.model_files()
    assert partial.settings()["parts"] == ["essentia_mood", "essentia_instrument", "atonality"]

    # Legacy scalars only: no EffNet at all.
    legacy_only = _loaded(essentia_models, genre=False, mood=False, instrument=False,
                          danceability_atonality="vggish")
    assert all("effnet" not in name for name in legacy_only.model_files())
    result = legacy_only.analyze(track)
    assert list(result.values) == ["danceability", "atonality"]
    assert "embeddings" not in result.provenance["files"]

    disabled = _loaded(essentia_models, enabled=False)
    assert disabled.model_files() == {} and disabled.settings()["parts"] == []
    assert disabled.analyze(track).values == {}


def test_audio_shorter_than_one_patch_is_a_clear_analysis_error(effnet, vggish, flacs):
    track = _track(flacs["short"])
    for analyzer in (effnet, vggish):
        with pytest.raises(AnalysisError, match=r"too short .*1\.50 s"):
            analyzer.analyze(track)


def test_cancelled_track_stops_between_heads(effnet, flacs):
    track = _track(flacs["b"])
    track.cancel.set()
    with pytest.raises(Cancelled):
        effnet.analyze(track)


def test_analyze_runs_in_another_thread_than_load(effnet, flacs):
    track = _track(flacs["b"])
    expected = effnet.analyze(track).values
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(effnet.analyze(_track(flacs["b"])).values))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [expected, expected]


def test_metadata_that_does_not_match_its_graph_fails_at_load(essentia_models, tmp_path):
    broken = tmp_path / "models"
    shutil.copytree(essentia_models, broken)
    folder = broken / "essentia"
    # The instrument labels beside the mood graph: 40 names for 56 columns.
    shutil.copy(folder / "mtg_jamendo_instrument-discogs-effnet-1.json",
                folder / "mtg_jamendo_moodtheme-discogs-effnet-1.json")
    store = ModelStore(broken)
    store.record({"essentia/mtg_jamendo_moodtheme-discogs-effnet-1.json":
                  store.sha256("essentia/mtg_jamendo_moodtheme-discogs-effnet-1.json", verify=False)})
    with pytest.raises(ModelLoadError, match="56 columns .* 40 classes"):
        EssentiaAnalyzer(EssentiaConfig(), ModelStore(broken)).load()


def test_missing_or_corrupt_model_files_fail_at_load_naming_the_file(essentia_models, tmp_path):
    broken = tmp_path / "models"
    shutil.copytree(essentia_models, broken)
    pb = broken / "essentia" / "tonal_atonal-discogs-effnet-1.pb"
    pb.write_bytes(pb.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ModelLoadError, match="corrupt: .*tonal_atonal-discogs-effnet-1.pb"):
        EssentiaAnalyzer(EssentiaConfig(), ModelStore(broken)).load()
    (broken / "essentia" / "discogs-effnet-bs64-1.json").unlink()
    with pytest.raises(ModelLoadError, match="missing: .*discogs-effnet-bs64-1.json"):
        EssentiaAnalyzer(EssentiaConfig(), ModelStore(broken)).load()


def test_metadata_without_the_scalar_label_is_refused(essentia_models, tmp_path):
    broken = tmp_path / "models"
    shutil.copytree(essentia_models, broken)
    name = "essentia/danceability-discogs-effnet-1.json"
    meta = json.loads((broken / name).read_text())
    meta["classes"] = ["dance", "not_dance"]
    (broken / name).write_text(json.dumps(meta))
    store = ModelStore(broken)
    store.record({name: store.sha256(name, verify=False)})
    with pytest.raises(ModelLoadError, match="no class named 'danceable'"):
        EssentiaAnalyzer(EssentiaConfig(), store).load()


def test_node_name_missing_from_the_graph_fails_at_load(essentia_models, tmp_path):
    broken = tmp_path / "models"
    shutil.copytree(essentia_models, broken)
    name = "essentia/tonal_atonal-vggish-audioset-1.json"
    meta = json.loads((broken / name).read_text())
    meta["schema"]["outputs"][0]["name"] = "model/Softmax"
    (broken / name).write_text(json.dumps(meta))
    store = ModelStore(broken)
    store.record({name: store.sha256(name, verify=False)})
    with pytest.raises(ModelLoadError, match=r"tonal_atonal-vggish-audioset-1.pb: .*'model/Softmax' is not a valid node"):
        EssentiaAnalyzer(EssentiaConfig(danceability_atonality="vggish"), store).load()

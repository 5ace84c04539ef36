"""Manifest, fetch and verify against a local HTTP server; tiny models vs the manifest."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import threading
from pathlib import Path

import pytest

from mirwatch.analyzers.essentia_tags import EssentiaAnalyzer
from mirwatch.analyzers.flamingo import model_path
from mirwatch.config import Config, EssentiaConfig, FeaturesConfig, FlamingoConfig
from mirwatch.models import tiny_essentia
from mirwatch.models.manifest import (
    FetchError,
    ManifestError,
    default_manifest_path,
    fetch,
    groups_for,
    load_manifest,
    parse_manifest,
    verify,
)
from mirwatch.models.store import ModelStore
from mirwatch.models.testmodels import make_test


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's naming)
        type(self).requests.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A static file server on 127.0.0.1; yields (served folder, base url, request log)."""
    served = tmp_path_factory.mktemp("served")
    handler = functools.partial(_Handler, directory=str(served))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{httpd.server_address[1]}", _Handler.requests
    httpd.shutdown()
    httpd.server_close()


def _publish(served: Path, name: str, data: bytes) -> str:
    (served / name).write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def _manifest(*entries: dict):
    return parse_manifest({"model": list(entries)})


def test_shipped_manifest_lists_every_essentia_model_with_its_real_url():
    manifest = load_manifest()
    assert load_manifest(default_manifest_path()).entries == manifest.entries
    by_path = {e.path: e for e in manifest.entries}
    for stem in tiny_essentia.ALL_MODELS:
        pb, meta = by_path[f"essentia/{stem}.pb"], by_path[f"essentia/{stem}.json"]
        assert pb.url.startswith("https://essentia.upf.edu/models/")
        assert meta.url == pb.url.removesuffix(".pb") + ".json"
        # The metadata's own link (real published JSON where shipped) is where the graph lives.
        assert tiny_essentia.metadata(stem)["link"] == pb.url
        assert pb.group == meta.group == ("essentia-vggish" if "vggish" in stem else "essentia")
    assert by_path["essentia/discogs-effnet-bs64-1.pb"].url == (
        "https://essentia.upf.edu/models/feature-extractors/discogs-effnet/discogs-effnet-bs64-1.pb")


def test_tiny_models_match_the_manifest_and_load(tmp_path):
    written = make_test(tmp_path, only=("essentia",))
    manifest = load_manifest()
    store = ModelStore(tmp_path)
    essentia_paths = {e.path for e in manifest.select({"essentia", "essentia-vggish"})}
    assert set(written) == essentia_paths
    assert verify(store, manifest, {"essentia", "essentia-vggish"}) == []
    for family in ("effnet", "vggish"):
        analyzer = EssentiaAnalyzer(EssentiaConfig(danceability_atonality=family), store)
        analyzer.load()
        assert set(analyzer.model_files()) <= essentia_paths


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"path": "a.pb", "group": "g"}, "exactly one of url or hf_repo"),
        ({"path": "a.pb", "group": "g", "url": "http://x/a", "hf_repo": "o/r"}, "exactly one of url or hf_repo"),
        ({"path": "../a.pb", "group": "g", "url": "http://x/a"}, "relative path inside"),
        ({"path": "/abs/a.pb", "group": "g", "url": "http://x/a"}, "relative path inside"),
        ({"path": "a.pb", "url": "http://x/a"}, "group is required"),
        ({"path": "a.pb", "group": "g", "url": "http://x/a", "sha": "00"}, r"unknown key\(s\) \['sha'\]"),
        ({"path": "a.pb", "group": "g", "url": "http://x/a", "sha256": "abc"}, "64 hex digits"),
        ({"path": "a.pb", "group": "g", "url": "ftp://x/a"}, "http"),
        ({"path": "f/m", "group": "g", "hf_repo": "o/r", "sha256": "0" * 64}, "single files"),
    ],
)
def test_bad_manifest_entries_are_refused_with_the_entry_named(entry, message):
    with pytest.raises(ManifestError, match=message):
        _manifest(entry)


def test_duplicate_and_unreadable_manifests(tmp_path):
    entry = {"path": "a.pb", "group": "g", "url": "http://x/a"}
    with pytest.raises(ManifestError, match="listed twice"):
        _manifest(entry, entry)
    with pytest.raises(ManifestError, match="overlaps"):
        _manifest({"path": "flamingo/m", "group": "g", "hf_repo": "o/r"}, {**entry, "path": "flamingo/m/x"})
    bad = tmp_path / "m.toml"
    bad.write_text("[[model]\n")
    with pytest.raises(ManifestError, match="not valid TOML"):
        load_manifest(bad)
    with pytest.raises(ManifestError, match="no such manifest"):
        load_manifest(tmp_path / "absent.toml")


def test_fetch_records_checksums_then_verifies_without_downloading(server, tmp_path):
    served, base, requests = server
    sha_a = _publish(served, "a.pb", b"graph A" * 1000)
    _publish(served, "a.json", b'{"classes": []}')
    manifest = _manifest(
        {"path": "essentia/a.pb", "group": "one", "url": f"{base}/a.pb"},
        {"path": "essentia/a.json", "group": "one", "url": f"{base}/a.json"},
        {"path": "other/b.pb", "group": "two", "url": f"{base}/missing.pb"},
    )
    store = ModelStore(tmp_path / "models")
    assert verify(store, manifest, {"one"}) == [
        ("essentia/a.pb", "missing (run 'mirwatch models fetch')"),
        ("essentia/a.json", "missing (run 'mirwatch models fetch')"),
    ]
    requests.clear()
    assert fetch(store, manifest, {"one"}) == [("essentia/a.pb", "fetched"), ("essentia/a.json", "fetched")]
    assert requests == ["/a.pb", "/a.json"]
    assert store.recorded()["essentia/a.pb"] == sha_a
    assert (store.root / "essentia/a.pb").read_bytes() == b"graph A" * 1000
    assert not list((store.root / "essentia").glob(".*part*"))
    assert verify(store, manifest, {"one"}) == []

    requests.clear()
    assert fetch(store, manifest, {"one"}) == [("essentia/a.pb", "present"), ("essentia/a.json", "present")]
    assert requests == []


def test_corruption_is_caught_by_verify_and_repaired_by_fetch(server, tmp_path):
    served, base, _ = server
    sha = _publish(served, "c.pb", b"model C" * 500)
    manifest = _manifest({"path": "essentia/c.pb", "group": "g", "url": f"{base}/c.pb"})
    store = ModelStore(tmp_path)
    fetch(store, manifest)
    (tmp_path / "essentia/c.pb").write_bytes(b"model C" * 499 + b"bitrot!")
    [(name, problem)] = verify(store, manifest)
    assert name == "essentia/c.pb" and "checksum mismatch" in problem and sha in problem
    assert fetch(store, manifest) == [("essentia/c.pb", "fetched")]
    assert verify(store, manifest) == []


def test_upstream_change_after_first_fetch_is_refused(server, tmp_path):
    served, base, _ = server
    first = _publish(served, "d.pb", b"version 1")
    manifest = _manifest({"path": "essentia/d.pb", "group": "g", "url": f"{base}/d.pb"})
    store = ModelStore(tmp_path)
    fetch(store, manifest)
    (tmp_path / "essentia/d.pb").unlink()
    _publish(served, "d.pb", b"version 2")
    with pytest.raises(FetchError, match="differs from .* recorded at the first fetch"):
        fetch(store, manifest)
    assert not (tmp_path / "essentia/d.pb").exists()
    assert store.recorded()["essentia/d.pb"] == first


def test_pinned_checksum_mismatch_is_refused_and_nothing_installed(server, tmp_path):
    served, base, _ = server
    real = _publish(served, "e.pb", b"pinned content")
    store = ModelStore(tmp_path)
    wrong = _manifest({"path": "essentia/e.pb", "group": "g", "url": f"{base}/e.pb", "sha256": "0" * 64})
    with pytest.raises(FetchError) as info:
        fetch(store, wrong)
    assert "manifest pins" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "essentia/e.pb").exists()
    assert list((tmp_path / "essentia").iterdir()) == []
    assert "essentia/e.pb" not in store.recorded()

    right = _manifest({"path": "essentia/e.pb", "group": "g", "url": f"{base}/e.pb", "sha256": real.upper()})
    assert fetch(store, right) == [("essentia/e.pb", "fetched")]
    assert verify(store, right) == [] and verify(store, wrong)[0][1].startswith("checksum mismatch")


def test_http_error_is_one_clear_line(server, tmp_path):
    _, base, _ = server
    manifest = _manifest({"path": "essentia/nope.pb", "group": "g", "url": f"{base}/nope.pb"})
    with pytest.raises(FetchError, match=r"essentia/nope.pb: download from .*/nope.pb failed: HTTP 404") as info:
        fetch(ModelStore(tmp_path), manifest)
    assert "\n" not in str(info.value)
    unreachable = _manifest({"path": "x.pb", "group": "g", "url": "http://127.0.0.1:9/x.pb"})
    with pytest.raises(FetchError, match="x.pb: download from http://127.0.0.1:9/x.pb failed"):
        fetch(ModelStore(tmp_path), unreachable)


def test_present_but_unrecorded_file_is_reported_then_recorded_by_fetch(server, tmp_path):
    served, base, _ = server
    sha = _publish(served, "f.pb", b"fff")
    manifest = _manifest({"path": "f.pb", "group": "g", "url": f"{base}/f.pb"})
    (tmp_path / "f.pb").write_bytes(b"fff")
    store = ModelStore(tmp_path)
    assert verify(store, manifest) == [("f.pb", "checksum not recorded (run 'mirwatch models fetch' to download and record it)")]
    fetch(store, manifest)
    assert store.recorded()["f.pb"] == sha and verify(store, manifest) == []


def test_snapshot_entries_record_every_file(tmp_path):
    calls = []

    def fake_snapshot_download(*, repo_id, revision, local_dir):
        # Stands in for the hub: writes what a snapshot would, plus the hub's cache folder.
        calls.append((repo_id, revision))
        root = Path(local_dir)
        (root / "config.json").write_text("{}")
        (root / "weights").mkdir(exist_ok=True)
        (root / "weights" / "model.safetensors").write_bytes(b"\0" * 64)
        (root / ".cache" / "huggingface").mkdir(parents=True, exist_ok=True)
        (root / ".cache" / "huggingface" / "lock").write_text("x")

    manifest = _manifest({"path": "flamingo/m", "group": "flamingo", "hf_repo": "org/m", "revision": "abc123"})
    store = ModelStore(tmp_path)
    assert verify(store, manifest) == [("flamingo/m", "missing (run 'mirwatch models fetch')")]
    assert fetch(store, manifest, snapshot_download=fake_snapshot_download) == [("flamingo/m", "fetched")]
    assert calls == [("org/m", "abc123")]
    assert sorted(n for n in store.recorded() if n.startswith("flamingo/")) == [
        "flamingo/m/config.json", "flamingo/m/weights/model.safetensors"]
    assert verify(store, manifest) == []
    assert fetch(store, manifest, snapshot_download=fake_snapshot_download) == [("flamingo/m", "present")]
    assert len(calls) == 1
    (tmp_path / "flamingo/m/weights/model.safetensors").write_bytes(b"\1" * 64)
    [(name, problem)] = verify(store, manifest)
    assert name == "flamingo/m/weights/model.safetensors" and "checksum mismatch" in problem

    def failing(**_):
        raise RuntimeError("401 Client Error: repository not found\nmore detail")

    other = _manifest({"path": "flamingo/x", "group": "flamingo", "hf_repo": "org/x"})
    with pytest.raises(FetchError, match=r"^flamingo/x: download of org/x@main failed: 401 Client Error"):
        fetch(store, other, snapshot_download=failing)


def test_groups_follow_the_config():
    base = Config(flamingo=FlamingoConfig(enabled="off"), features=FeaturesConfig(aesthetics="off"))
    assert groups_for(base) == {"essentia"}
    legacy = dataclasses.replace(base, essentia=EssentiaConfig(danceability_atonality="vggish"))
    assert groups_for(legacy) == {"essentia", "essentia-vggish"}
    scalars_only = dataclasses.replace(base, essentia=EssentiaConfig(
        danceability_atonality="vggish", genre=False, mood=False, instrument=False))
    assert groups_for(scalars_only) == {"essentia-vggish"}
    assert groups_for(dataclasses.replace(base, essentia=EssentiaConfig(enabled=False))) == set()
    assert {"flamingo", "aesthetics"} <= groups_for(Config())
    manifest = load_manifest()
    # Each checkpoint's group fetches exactly the folder the analyzer loads it from.
    for model_id, group in (("nvidia/music-flamingo-2601-hf", "flamingo"), ("nvidia/music-flamingo-hf", "flamingo-hf")):
        flamingo = dataclasses.replace(base, flamingo=FlamingoConfig(enabled="on", model_id=model_id))
        assert groups_for(flamingo) == {"essentia", group}
        [entry] = manifest.select({group})
        assert entry.hf_repo == model_id and entry.path == model_path(model_id)
    custom = dataclasses.replace(base, flamingo=FlamingoConfig(enabled="on", model_id="me/finetune"))
    assert groups_for(custom) == {"essentia"}
    assert {"essentia", "essentia-vggish"} <= manifest.groups
    selected = {e.path for e in manifest.select(groups_for(base))}
    assert "essentia/genre_discogs400-discogs-effnet-1.pb" in selected
    assert not any("vggish" in p for p in selected)

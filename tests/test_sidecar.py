"""Sidecar merge/write: foreign keys kept, atomic, corrupt files moved aside."""

import json
import os

import pytest

from mirwatch import sidecar


@pytest.fixture
def flac(tmp_path):
    folder = tmp_path / "My Track"
    folder.mkdir()
    path = folder / "full_mix.flac"
    path.write_bytes(b"x")
    return path


def test_path_is_folder_name_dot_info(flac):
    assert sidecar.path_for(flac) == flac.parent / "My Track.INFO"


def test_merge_keeps_foreign_keys_and_drops_own_stale_keys(flac):
    target = sidecar.path_for(flac)
    target.write_text(json.dumps({"caption": "by hand", "bpm_from_other_tool": 99}))
    sidecar.update(flac, {"essentia": ({"danceability": 0.5, "atonality": 0.1}, {"x": 1})}, {"version": "t"})
    doc = json.loads(target.read_text())
    assert doc["caption"] == "by hand" and doc["bpm_from_other_tool"] == 99
    assert doc["danceability"] == 0.5
    assert doc["mirwatch"]["analyzers"]["essentia"]["keys"] == ["atonality", "danceability"]
    # Rerun without atonality (switched off): our old key goes, foreign keys stay.
    sidecar.update(flac, {"essentia": ({"danceability": 0.6}, {})}, {"version": "t"})
    doc = json.loads(target.read_text())
    assert "atonality" not in doc and doc["danceability"] == 0.6 and doc["caption"] == "by hand"


def test_other_analyzers_survive_a_partial_rerun(flac):
    sidecar.update(flac, {"a": ({"k1": 1}, {}), "b": ({"k2": 2}, {})}, {})
    sidecar.update(flac, {"a": ({"k1": 3}, {})}, {})
    doc = json.loads(sidecar.path_for(flac).read_text())
    assert doc["k1"] == 3 and doc["k2"] == 2 and set(doc["mirwatch"]["analyzers"]) == {"a", "b"}


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"\xff\xfe", b""])
def test_corrupt_sidecar_is_moved_aside_not_overwritten(flac, content):
    target = sidecar.path_for(flac)
    target.write_bytes(content)
    moved = []
    sidecar.update(flac, {"a": ({"k": 1}, {})}, {}, on_corrupt=lambda p, why: moved.append((p, why)))
    assert len(moved) == 1 and moved[0][0].read_bytes() == content
    assert moved[0][0].name.startswith("My Track.INFO.corrupt-")
    assert json.loads(target.read_text())["k"] == 1


def test_aux_files_written_and_no_temp_left(flac):
    sidecar.update(flac, {"a": ({"k": 1}, {})}, {}, {".BEATS_GRID": "0.5\n1.0\n"})
    assert (flac.parent / "My Track.BEATS_GRID").read_text() == "0.5\n1.0\n"
    assert sorted(os.listdir(flac.parent)) == ["My Track.BEATS_GRID", "My Track.INFO", "full_mix.flac"]


def test_nan_is_refused_rather_than_written(flac):
    with pytest.raises(ValueError):
        sidecar.update(flac, {"a": ({"k": float("nan")}, {})}, {})
    assert not sidecar.path_for(flac).exists()

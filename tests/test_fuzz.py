"""Property tests over the two parsers that read files other people write: the sidecar
reader/merger and the config loader. Whatever the bytes, they answer with a result or
their own one-line error, never a crash, and a merge never loses a foreign key."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mirwatch import config, sidecar

# Random examples locally (every run explores new inputs; MIRWATCH_FUZZ_EXAMPLES=3000 for a
# longer hunt), a fixed sequence under CI so that a landing does not hinge on a lucky draw.
FUZZ = settings(max_examples=int(os.environ.get("MIRWATCH_FUZZ_EXAMPLES", "150")), deadline=None,
                derandomize=bool(os.environ.get("CI")),
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
sidecar_docs = st.dictionaries(st.text(max_size=12), json_values, max_size=8)
# Bytes that are mostly JSON-shaped, so the fuzzer reaches past the first character.
json_ish = st.one_of(
    st.binary(max_size=300),
    sidecar_docs.map(lambda d: json.dumps(d).encode()),
    st.tuples(sidecar_docs, st.integers(0, 200)).map(lambda t: json.dumps(t[0]).encode()[: t[1]]),
    json_values.map(lambda v: json.dumps(v).encode()),
)


def _track(tmp: Path) -> Path:
    folder = tmp / "Track"
    folder.mkdir(exist_ok=True)
    mix = folder / "full_mix.flac"
    mix.touch()
    return mix


@FUZZ
@given(raw=json_ish, values=st.dictionaries(st.text(min_size=1, max_size=10), json_values, max_size=5))
def test_merge_over_any_existing_bytes_keeps_or_sets_aside_and_never_crashes(raw, values):
    with tempfile.TemporaryDirectory() as tmp:
        mix = _track(Path(tmp))
        target = sidecar.path_for(mix)
        target.write_bytes(raw)
        try:
            before = sidecar.read(target)
        except sidecar.CorruptSidecar:
            before = None
        moved = []
        out = sidecar.update(mix, {"essentia": (values, {"fingerprint": "f"})}, {"version": "x"},
                             on_corrupt=lambda path, why: moved.append((path, why)))
        doc = json.loads(out.read_bytes())
        assert isinstance(doc, dict)
        for key, value in values.items():
            if key != sidecar.PROVENANCE_KEY:
                assert doc[key] == value
        assert doc["mirwatch"]["analyzers"]["essentia"]["keys"] == sorted(values)
        if before is None:
            # Unreadable: moved aside byte for byte, not overwritten.
            assert len(moved) == 1 and Path(moved[0][0]).read_bytes() == raw
        else:
            assert not moved
            old_keys = set(sidecar.provenance(before).get("analyzers", {}).get("essentia", {}).get("keys", [])
                           if isinstance(sidecar.provenance(before).get("analyzers"), dict)
                           and isinstance(sidecar.provenance(before)["analyzers"].get("essentia"), dict)
                           else [])
            for key, value in before.items():
                if key != sidecar.PROVENANCE_KEY and key not in values and key not in old_keys:
                    assert doc[key] == value, key  # a foreign key survives untouched
        assert not [p for p in Path(tmp).rglob("*.tmp")]


@FUZZ
@given(first=st.dictionaries(st.text(min_size=1, max_size=6), json_values, max_size=4),
       second=st.dictionaries(st.text(min_size=1, max_size=6), json_values, max_size=4),
       foreign=st.dictionaries(st.text(min_size=1, max_size=6).map(lambda k: "x_" + k), json_values, max_size=3))
def test_an_analyzer_rerun_replaces_exactly_its_own_keys(first, second, foreign):
    with tempfile.TemporaryDirectory() as tmp:
        mix = _track(Path(tmp))
        sidecar.path_for(mix).write_text(json.dumps(foreign))
        first = {k: v for k, v in first.items() if k not in foreign and k != "mirwatch"}
        second = {k: v for k, v in second.items() if k not in foreign and k != "mirwatch"}
        sidecar.update(mix, {"a": (first, {})}, {})
        doc = json.loads(sidecar.update(mix, {"a": (second, {})}, {}).read_bytes())
        expected = {**foreign, **second}
        assert {k: v for k, v in doc.items() if k != "mirwatch"} == expected


toml_keys = st.sampled_from(["library", "state", "models", "worker", "essentia", "features", "flamingo",
                             "logging", "env", "queue", "bogus"])
toml_scalars = st.one_of(st.integers(-5, 10**6), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                         st.text(max_size=12), st.lists(st.text(max_size=8), max_size=3))
field_names = st.sampled_from(["roots", "settle_seconds", "polling", "poll_interval", "dir", "max_attempts",
                               "prefetch", "job_timeout", "max_duration", "enabled", "threshold", "top_k",
                               "aesthetics", "format", "level", "backend", "typo_key"])


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return {float("inf"): "inf", float("-inf"): "-inf"}.get(v, "nan" if v != v else repr(v))
    if isinstance(v, int):
        return str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(v)


@FUZZ
@given(tables=st.dictionaries(toml_keys, st.dictionaries(field_names, toml_scalars, max_size=4), max_size=5),
       garbage=st.one_of(st.just(b""), st.binary(max_size=40)))
def test_the_config_loader_answers_with_a_config_or_one_line(tables, garbage):
    text = "".join(f"[{t}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in fields.items())
                   for t, fields in tables.items())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.toml"
        path.write_bytes(text.encode() + garbage)
        try:
            cfg = config.load(path, check_roots=False)
        except config.ConfigError as exc:
            message = str(exc)
            assert message and "\n" not in message.strip() and message.startswith(str(path))
            return
        # What the loader promises to validate holds for every config it accepts.
        assert cfg.worker.max_attempts >= 1 and cfg.worker.prefetch >= 0
        assert cfg.logging.level in ("debug", "info", "warning", "error")


@pytest.mark.parametrize("line", ["[worker]\nmax_duration = nan", "[worker]\nmax_duration = -5.0",
                                  "[library]\nsettle_seconds = inf", "[worker]\njob_timeout = 0.0"])
def test_the_config_loader_refuses_durations_that_are_not_positive_and_finite(tmp_path, line):
    path = tmp_path / "config.toml"
    path.write_text(line + "\n")
    with pytest.raises(config.ConfigError):
        config.load(path, check_roots=False)


def test_sidecar_reader_refuses_a_symlink_and_a_huge_file(tmp_path):
    mix = _track(tmp_path)
    target = sidecar.path_for(mix)
    (tmp_path / "elsewhere.json").write_text('{"a": 1}')
    os.symlink(tmp_path / "elsewhere.json", target)
    with pytest.raises(sidecar.CorruptSidecar, match="symlink"):
        sidecar.read(target)
    target.unlink()
    with open(target, "wb") as f:
        f.truncate(sidecar.MAX_BYTES + 1)
    with pytest.raises(sidecar.CorruptSidecar, match="larger than"):
        sidecar.read(target)

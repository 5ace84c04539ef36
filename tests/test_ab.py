"""``mirwatch ab``: the measures on known texts, and a real run of both backends writing the reports."""

from __future__ import annotations

import json
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conftest import write_flac
from gguf_support import combined_models, prompts_toml, require_llama_server, short_prompts
from mirwatch import ab

# The like-for-like reference for the GGUF builds.
REF = "transformers:nvidia/music-flamingo-hf"

# --------------------------------------------------------------- the measures


@pytest.mark.parametrize("text, tempi", [
    ("An upbeat house track at 124 BPM in A minor.", [124.0]),
    ("It moves around 96 bpm, later 98.5 beats per minute.", [96.0, 98.5]),
    ("The tempo of 128 stays steady.", [128.0]),
    ("Tempo: 140, key of D.", [140.0]),
    ("A tempo around 87 with a half-time feel", [87.0]),
    ("The 1970s sound, 4/4 time, 16 bars, no tempo given.", []),
    ("It is 12 bpm", []),  # not a musical tempo
])
def test_stated_tempos(text: str, tempi: list[float]) -> None:
    assert ab.stated_tempos(text) == tempi


def test_tempo_check_uses_three_percent() -> None:
    assert ab.tempo_check("at 120 BPM", 123.5)["agrees"] is True
    assert ab.tempo_check("at 120 BPM", 124.0)["agrees"] is False
    assert ab.tempo_check("at 120 BPM", None)["agrees"] is None
    assert ab.tempo_check("no number here", 120.0) == {"stated": [], "agrees": None}
    # Any stated tempo may match (texts often give a range).
    assert ab.tempo_check("between 60 BPM and 121 BPM", 120.0)["agrees"] is True


def test_genre_check_matches_parent_and_style() -> None:
    genres = {"Electronic---Deep House": 0.8, "Hip Hop---Boom Bap": 0.4, "Folk, World, & Country---Polka": 0.2}
    assert ab.genre_check("A warm deep-house groove.", genres) == {"named": ["deep house"], "overlap": True}
    assert ab.genre_check("Classic hip-hop with boom bap drums", genres)["named"] == ["boom bap", "hip hop"]
    assert ab.genre_check("electronic music", genres)["named"] == ["electronic"]
    assert ab.genre_check("A country ballad", genres)["named"] == ["country"]
    assert ab.genre_check("A string quartet.", genres) == {"named": [], "overlap": False}
    assert ab.genre_check("anything", None) == {"named": [], "overlap": None}
    # Whole words only: "pop" is not in "popular".
    assert ab.genre_check("a popular tune", {"Pop---Europop": 1.0})["overlap"] is False


def test_parse_backends() -> None:
    specs = ab.parse_backends("transformers, gguf:Q8_0,gguf:IQ3_M,transformers:nvidia/music-flamingo-hf")
    assert [(s.label, s.kind, s.quant, s.model_id) for s in specs] == [
        ("transformers", "transformers", None, None), ("gguf:Q8_0", "gguf", "Q8_0", None),
        ("gguf:IQ3_M", "gguf", "IQ3_M", None),
        ("transformers:nvidia/music-flamingo-hf", "transformers", None, "nvidia/music-flamingo-hf")]
    for bad in ("", "vllm", "transformers,transformers", "transformers:x"):
        with pytest.raises(ValueError):
            ab.parse_backends(bad)


def test_similarity_model_is_offline_and_sane() -> None:
    embedder = ab.Embedder.bundled()
    if embedder is None:
        pytest.skip(f"sentence-embedding model not installed ({ab.EMBEDDING_PIP})")
    same = embedder.similarity("A fast techno track with a pounding kick.", "A fast techno track with a pounding kick.")
    close = embedder.similarity("A fast techno track with a pounding kick.", "Driving techno, hard kick drum, quick tempo.")
    far = embedder.similarity("A fast techno track with a pounding kick.", "The invoice is due on Monday.")
    assert same == pytest.approx(1.0, abs=1e-3) and close > far


# ----------------------------------------------------------------- a real run


class _Checker(HTMLParser):
    VOID = {"meta", "br", "img", "hr", "input", "link"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.tags: set[str] = set()
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.add(tag)
        for name, value in attrs:
            if name in ("src", "href") and value and "://" in value:
                self.external.append(value)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        self.tags.add(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()


def test_ab_runs_both_backends_and_writes_reports(tmp_path: Path, tiny_models: Path, capsys) -> None:
    require_llama_server()
    models = combined_models(tmp_path, tiny_models)
    lib = tmp_path / "lib"
    write_flac(lib / "First Song" / "full_mix.flac", 6.0, seed=1)
    write_flac(lib / "Second Song" / "full_mix.flac", 5.0, seed=2)
    config = tmp_path / "config.toml"
    config.write_text(
        f'[library]\nroots = ["{lib}"]\n[state]\ndir = "{tmp_path / "state"}"\n[models]\ndir = "{models}"\n'
        '[logging]\nformat = "json"\n'
        '[flamingo]\nenabled = "on"\ndtype = "float32"\ngguf_max_audio_seconds = 30.0\n' + prompts_toml()
    )
    out = tmp_path / "report"
    # The tiny GGUF pair is converted from the tiny music-flamingo-hf checkpoint: same weights on both sides.
    code = ab.main(["--config", str(config), str(lib), "--backends", f"{REF},gguf:f16", "--out", str(out)])
    assert code == 0, capsys.readouterr().out[-3000:]

    result = json.loads((out / "ab.json").read_text())
    prompts = list(short_prompts())
    assert result["reference"] == REF and list(result["prompts"]) == prompts
    assert [(b["label"], b["model_id"]) for b in result["backends"]] == [(REF, "nvidia/music-flamingo-hf"),
                                                                         ("gguf:f16", None)]
    assert all("error" not in b and b["models"] for b in result["backends"])
    assert sorted(t["name"] for t in result["tracks"]) == ["First Song", "Second Song"]
    for entry in result["tracks"]:
        # Measured by the CPU analyzers (no sidecar yet).
        assert entry["bpm"] > 0 and entry["essentia_genre"]
        for label in (REF, "gguf:f16"):
            rows = entry["results"][label]["prompts"]
            assert list(rows) == prompts
            for name, row in rows.items():
                assert isinstance(row["text"], str) and row["seconds"] > 0
                assert row["tokens"] <= short_prompts()[name].max_new_tokens
            metrics = entry["metrics"][label]
            for name in prompts:
                sim = metrics[name]["similarity"]
                if ab.Embedder.bundled() is not None and rows[name]["text"]:
                    assert sim is not None and -1.0 <= sim <= 1.0001
                assert metrics[name]["genres"]["overlap"] in (True, False)
        assert all(m["similarity"] in (1.0, None) for m in entry["metrics"][REF].values())
    summary = result["summary"]
    assert set(summary) == {REF, "gguf:f16"}
    assert summary["gguf:f16"]["mean_seconds_per_prompt"] > 0 and summary["gguf:f16"]["texts"] == 10

    md = (out / "report.md").read_text()
    assert md.startswith("# Music Flamingo A/B") and "| gguf:f16 |" in md
    for name in prompts:
        assert f"### {name}" in md
    page = (out / "report.html").read_text()
    checker = _Checker()
    checker.feed(page)
    checker.close()
    assert not checker.stack and {"svg", "rect", "table"} <= checker.tags
    assert "script" not in checker.tags and not checker.external
    assert "First Song" in page and "gguf:f16" in page


def test_ab_rejects_bad_arguments(tmp_path: Path, capsys) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[state]\ndir = "{tmp_path}"\n[models]\ndir = "{tmp_path}"\n')
    args = ["--config", str(config), str(tmp_path / "missing"), "--out", str(tmp_path / "o")]
    assert ab.main(args) == 2 and "no such file" in capsys.readouterr().err
    (tmp_path / "t").mkdir()
    assert ab.main(["--config", str(config), str(tmp_path / "t"), "--backends", "vllm", "--out", "x"]) == 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__]))

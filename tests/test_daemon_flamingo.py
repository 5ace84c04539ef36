"""Music Flamingo through the whole daemon, on the tiny checkpoint from make-test."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import write_flac

from mirwatch.textnorm import normalize

FLAMINGO_ON = '[features]\naesthetics = "off"\n[flamingo]\nenabled = "on"\ndevice = "cpu"\ndtype = "float32"\n'
KEYS = {f"music_flamingo_{k}" for k in ("full", "technical", "genre_mood", "instrumentation", "structure")}


def test_sigterm_mid_generation_requeues_then_five_descriptions_land(daemon_factory):
    # First run: eight long prompts decoded together, so that SIGTERM lands mid-generation.
    long_prompt = "".join(f'[flamingo.prompts.long{i}]\ntext = "Describe this music at length, take {i}."\n'
                          "max_new_tokens = 20000\n" for i in range(8))
    d = daemon_factory(FLAMINGO_ON + long_prompt)
    d.config.write_text(d.config.read_text().replace("stop_grace = 5.0", "stop_grace = 0.0"))
    write_flac(d.lib / "Song" / "full_mix.flac", seconds=35, seed=11)
    d.start()
    d.wait_event("analyzer_started", analyzer="flamingo", timeout=240)
    assert d.stop(timeout=60) == 0
    assert not d.events("sidecar_written"), "generation finished before SIGTERM arrived"
    assert d.events("job_requeued"), d.tail()
    assert d.status()["counts"] == {"queued": 1, "running": 0, "done": 0, "failed": 0}
    assert not (d.lib / "Song" / "Song.INFO").exists()

    # Second run, the default five prompts: the requeued job completes.
    d.config.write_text(d.config.read_text().replace(long_prompt, ""))
    d.start()
    d.wait_event("job_done", timeout=300)
    doc = json.loads((d.lib / "Song" / "Song.INFO").read_text())
    assert KEYS <= set(doc) and not any(k.startswith("music_flamingo_long") for k in doc)
    for key in KEYS:
        assert isinstance(doc[key], str) and doc[key] == normalize(doc[key])
    prov = doc["mirwatch"]["analyzers"]["flamingo"]
    assert prov["model_id"] == "nvidia/music-flamingo-2601-hf" and prov["dtype"] == "float32"
    assert set(prov["keys"]) == KEYS
    assert {"essentia", "features", "flamingo"} <= set(doc["mirwatch"]["analyzers"])
    assert d.stop() == 0

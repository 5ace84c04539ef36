"""Music Flamingo through the whole daemon, on the tiny checkpoint from make-test."""

from __future__ import annotations

import json
import os
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


def test_switching_the_backend_to_gguf_in_config_redoes_flamingo_only(tmp_path, tiny_models):
    from conftest import Daemon
    from gguf_support import combined_models, prompts_toml

    models = combined_models(tmp_path / "m", tiny_models)
    base = FLAMINGO_ON + prompts_toml()
    d = Daemon(tmp_path / "run", models, base)
    write_flac(d.lib / "Song" / "full_mix.flac", seconds=12, seed=12)
    d.start()
    d.wait_event("job_done", timeout=300)
    assert d.stop() == 0
    before = json.loads((d.lib / "Song" / "Song.INFO").read_text())

    gguf = base.replace('enabled = "on"', 'enabled = "on"\nbackend = "gguf"\ngguf_quant = "f16"\n'
                        "gguf_max_audio_seconds = 30.0")
    d.write_config(models, gguf)
    d.start()
    d.wait_event("job_done", count=2, timeout=300)
    assert d.stop() == 0
    after = json.loads((d.lib / "Song" / "Song.INFO").read_text())
    assert set(after) == set(before)
    assert after["mirwatch"]["analyzers"]["flamingo"]["backend"] == "gguf"
    assert d.events("job_done")[-1]["analyzers"] == ["flamingo"]
    # The server is the daemon's child: it is gone with the daemon.
    servers = [pid for pid in os.listdir("/proc") if pid.isdigit()
               and Path(_cmdline(pid).split(" ", 1)[0]).name == "llama-server" and str(models) in _cmdline(pid)]
    assert not servers


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""

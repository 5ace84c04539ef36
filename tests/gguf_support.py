"""What the GGUF tests share: the llama-server binary and the tiny GGUF pair (built once per run).

The binary comes from ``scripts/build_llama_cpp.sh`` (found through
$MIRWATCH_LLAMA_SERVER, PATH or its cache). Without it the tests fail under
CI (``CI=true``: .ci/run builds it, so its absence is a bug) and skip locally.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from mirwatch.config import FlamingoPrompt, _default_flamingo_prompts
from mirwatch.llama_server import find_llama_server
from mirwatch.models.store import ModelStore

REPO = Path(__file__).resolve().parents[1]
GENERATORS = [REPO / "daemon/mirwatch/models/tiny_gguf.py", REPO / "daemon/mirwatch/models/tiny_flamingo.py"]
# Short answers: the tiny model's text is noise, its token limits are what matter.
PROMPT_LIMITS = {"full": 12, "technical": 9, "genre_mood": 7, "instrumentation": 5, "structure": 10}


def require_llama_server() -> str:
    binary = find_llama_server()
    if binary is None:
        reason = ("llama-server not found: run scripts/build_llama_cpp.sh (or set MIRWATCH_LLAMA_SERVER);"
                  " the GGUF backend cannot be tested without it")
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return binary


@functools.cache
def tiny_gguf_dir() -> Path:
    """A model dir holding ``flamingo-gguf/`` with the tiny pair and its checksums."""
    from mirwatch.models import tiny_gguf

    binary = require_llama_server()
    digest = hashlib.sha256(str(Path(binary).resolve()).encode())
    for path in GENERATORS:
        digest.update(path.read_bytes())
    if os.environ.get("CI"):
        target = Path(tempfile.mkdtemp(prefix="tiny-gguf-"))
    else:
        root = Path(os.environ.get("MIRWATCH_TEST_CACHE", Path.home() / ".cache" / "mirwatch-tests"))
        target = root / f"gguf-{digest.hexdigest()[:16]}"
        if (target / "checksums.json").exists():
            return target
    building = target.with_name(target.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    names = tiny_gguf.write(building)
    store = ModelStore(building)
    store.record({name: store.sha256(name, verify=False) for name in names}, test_models=True)
    shutil.rmtree(target, ignore_errors=True)
    building.rename(target)
    return target


def combined_models(tmp: Path, tiny_models: Path) -> Path:
    """One model dir with the tiny transformers set and the tiny GGUF pair (links, merged checksums).

    Both sets have a ``flamingo/`` folder (the 2601 checkpoint; the one the pair
    was converted from), so folders are merged one level down.
    """
    gguf = tiny_gguf_dir()
    target = tmp / "models"
    target.mkdir(parents=True, exist_ok=True)
    for source in (tiny_models, gguf):
        for family in source.iterdir():
            if family.is_dir():
                (target / family.name).mkdir(exist_ok=True)
                for entry in family.iterdir():
                    if not (target / family.name / entry.name).exists():
                        (target / family.name / entry.name).symlink_to(entry)
    store = ModelStore(target)
    store.record({**ModelStore(tiny_models).recorded(), **ModelStore(gguf).recorded()}, test_models=True)
    return target


def short_prompts() -> dict[str, FlamingoPrompt]:
    return {name: FlamingoPrompt(p.text, PROMPT_LIMITS[name]) for name, p in _default_flamingo_prompts().items()}


def prompts_toml() -> str:
    lines = []
    for name, prompt in short_prompts().items():
        text = prompt.text.replace("\\", "\\\\").replace('"', '\\"')
        lines += [f"[flamingo.prompts.{name}]", f'text = "{text}"', f"max_new_tokens = {prompt.max_new_tokens}"]
    return "\n".join(lines) + "\n"

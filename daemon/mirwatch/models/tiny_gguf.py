"""A Music Flamingo GGUF pair in miniature, made with llama.cpp's own converter.

The published GGUF builds are conversions of ``nvidia/music-flamingo-hf``
(``AudioFlamingo3ForConditionalGeneration``), so the tiny pair starts from a
tiny checkpoint of that architecture, saved with ``save_pretrained``, and runs
``convert_hf_to_gguf.py`` (text model) and ``convert_hf_to_gguf.py --mmproj``
(audio encoder + projector) from the llama.cpp tree that
``scripts/build_llama_cpp.sh`` keeps beside the binaries. Nothing of llama.cpp
is copied into this repository; the converter is run as published, with two
adjustments made from outside (see `_CONVERT`).

Sizes follow the tiny transformers model, except that the audio encoder has
three layers: the converter reads ``audio_tower.conv1``/``conv2`` as block ids
1 and 2 and cannot map them with fewer blocks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from . import tiny_flamingo

MODEL_FOLDER = "flamingo-gguf"
# Named like the published files, with the type the tiny pair really has.
TEXT_NAME = "music-flamingo-hf.f16.gguf"
MMPROJ_NAME = "music-flamingo-hf.mmproj-f16.gguf"
QUANT = "f16"
# The transformers checkpoint the pair is converted from, named like nvidia/music-flamingo-hf's folder.
CHECKPOINT = "flamingo/music-flamingo-hf"

# Run in a child interpreter: the converter is a script with module state.
# 1. It identifies a BPE pre-tokenizer by hashing what the tokenizer makes of
#    a fixed text and refuses unknown hashes; the tiny tokenizer is trained
#    here, so its hash is new, although it splits text exactly as Qwen2 does.
# 2. Qwen2's vocab loader tries SentencePiece first and imports it even when
#    there is no tokenizer.model; the tiny tokenizer is byte-level BPE only.
_CONVERT = r"""
import runpy, sys
src = sys.argv[1]
sys.path[:0] = [src, src + "/gguf-py"]
from conversion import base, qwen
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
qwen.Qwen2Model.set_vocab = lambda self: self._set_vocab_gpt2()
sys.argv = [src + "/convert_hf_to_gguf.py"] + sys.argv[2:]
runpy.run_path(src + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def llama_src() -> Path | None:
    """The llama.cpp tree with ``convert_hf_to_gguf.py`` (next to the server binary)."""
    from ..llama_server import find_llama_server

    server = find_llama_server()
    if server is None:
        return None
    src = Path(server).resolve().parent.parent / "src"
    return src if (src / "convert_hf_to_gguf.py").is_file() else None


def write_checkpoint(target: Path, *, seed: int = 0) -> Path:
    """A tiny float32 AudioFlamingo3 checkpoint (the transformers side of the pair)."""
    import torch
    from transformers import (
        AudioFlamingo3Config,
        AudioFlamingo3ForConditionalGeneration,
        AudioFlamingo3Processor,
    )

    target.mkdir(parents=True, exist_ok=True)
    mf_processor = tiny_flamingo.build_processor(tiny_flamingo.SIZES["tiny"]["vocab"])
    processor = AudioFlamingo3Processor(
        feature_extractor=mf_processor.feature_extractor,
        tokenizer=mf_processor.tokenizer,
        chat_template=tiny_flamingo.CHAT_TEMPLATE,
        max_audio_len=600,
    )
    mf_config, generation_config = tiny_flamingo.build_config("tiny", processor.tokenizer)
    audio_config = mf_config.audio_config
    audio_config.num_hidden_layers = 3
    config = AudioFlamingo3Config(
        audio_config=audio_config.to_dict(),
        text_config=mf_config.text_config.to_dict(),
        audio_token_id=mf_config.audio_token_id,
    )
    torch.manual_seed(seed)
    model = AudioFlamingo3ForConditionalGeneration(config)
    model.generation_config = generation_config
    model.save_pretrained(target)
    processor.save_pretrained(target)
    return target


def convert(checkpoint: Path, text_out: Path, mmproj_out: Path, *, src: Path, outtype: str = "f16") -> None:
    for extra, out in (([], text_out), (["--mmproj"], mmproj_out)):
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-c", _CONVERT, str(src), str(checkpoint), "--outtype", outtype,
               "--outfile", str(out), *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "NO_LOCAL_GGUF": ""})
        if proc.returncode != 0 or not out.is_file():
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise RuntimeError(f"convert_hf_to_gguf.py {' '.join(extra)} failed ({proc.returncode}):\n{tail}")


def write(root: Path, *, src: Path | None = None) -> list[str]:
    """Write the tiny GGUF pair under ``root/flamingo-gguf/`` and the checkpoint it was converted
    from under ``root/flamingo/music-flamingo-hf/`` (where `models fetch` puts the real one), so
    that transformers and llama.cpp can be compared on the same weights. Returns the names of
    the files written, relative to root."""
    src = src or llama_src()
    if src is None:
        raise FileNotFoundError(
            "llama.cpp's convert_hf_to_gguf.py not found: build llama.cpp with scripts/build_llama_cpp.sh"
            " (or set MIRWATCH_LLAMA_SERVER to its bin/llama-server)"
        )
    root = Path(root)
    checkpoint = write_checkpoint(root / CHECKPOINT)
    folder = root / MODEL_FOLDER
    convert(checkpoint, folder / TEXT_NAME, folder / MMPROJ_NAME, src=src)
    written = sorted(p.relative_to(root).as_posix() for p in checkpoint.rglob("*") if p.is_file())
    return written + [f"{MODEL_FOLDER}/{TEXT_NAME}", f"{MODEL_FOLDER}/{MMPROJ_NAME}"]


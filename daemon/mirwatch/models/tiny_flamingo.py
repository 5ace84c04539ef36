"""A Music Flamingo checkpoint in miniature, written with ``save_pretrained``.

The files have the layout of ``nvidia/music-flamingo-2601-hf`` (config.json,
safetensors, generation config, Qwen2 tokenizer with the sound tokens, chat
template, Whisper-style feature extractor with 128 mel bins), so the analyzer
loads them with exactly the code it uses for the real checkpoint. Weights are
random but seeded: the same files every time, meaningless text always.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MODEL_DIR = "flamingo/music-flamingo-2601-hf"

# Qwen2.5's chat tokens plus the three Music Flamingo adds, in the real order.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<sound>",
    "<|sound_bos|>",
    "<|sound_eos|>",
)

# Same shape as the published processor template: a default system turn, the
# sound placeholder before the text of a user turn, the assistant header last.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "{% for m in messages if m['content'] is not none %}"
    "<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% set has_audio = namespace(v=False) %}{% set text = namespace(v='') %}"
    "{% for c in m['content'] %}"
    "{% if c.get('type') == 'audio' or 'audio' in c %}{% set has_audio.v = True %}"
    "{% elif c.get('type') == 'text' or 'text' in c %}{% set text.v = text.v + c['text'] %}"
    "{% endif %}{% endfor %}"
    "{% if has_audio.v %}<sound>{% endif %}{{ text.v }}"
    "{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Architecture sizes. "tiny" is for tests (a few MB, milliseconds per token);
# "small" gives the CPU benchmark real matrix sizes; "full" mirrors the
# published checkpoint (Whisper-large-v3 encoder, Qwen2.5-7B) for GPU benches.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab=480, enc_layers=1, enc_dim=32, enc_heads=2, enc_ffn=64,
        layers=2, hidden=64, heads=4, kv_heads=2, ffn=128,
    ),
    "small": dict(
        vocab=2048, enc_layers=4, enc_dim=384, enc_heads=6, enc_ffn=1536,
        layers=8, hidden=768, heads=12, kv_heads=2, ffn=2048,
    ),
    "full": dict(
        vocab=151672, enc_layers=32, enc_dim=1280, enc_heads=20, enc_ffn=5120,
        layers=28, hidden=3584, heads=28, kv_heads=4, ffn=18944,
    ),
}

_CORPUS = (
    "The track is an upbeat electronic dance piece at 128 BPM in A minor, built on a four on the floor "
    "kick, rolling bass, bright synth pads, plucked arpeggios and airy female vocals. Production is "
    "clean and wide with sidechain compression, reverb and delay. The mood is euphoric, driving and "
    "warm. Structure: intro, verse, build, drop, breakdown, chorus, bridge and outro; energy rises "
    "and falls. Acoustic guitar, piano, strings, brass, drums, percussion, organ, saxophone, cello."
)


def write(root: Path) -> list[str]:
    """Write the tiny test checkpoint under ``root/flamingo/...``."""
    return write_sized(root, "tiny")


def write_sized(root: Path, size: str = "tiny", *, seed: int = 0) -> list[str]:
    """Write a random-weight float32 checkpoint; returns names relative to root."""
    import torch
    from transformers import MusicFlamingoForConditionalGeneration

    if size == "full":
        raise ValueError("the full-size model is built in memory on the GPU (see build_config), not written")
    root = Path(root)
    target = root / MODEL_DIR
    target.mkdir(parents=True, exist_ok=True)
    processor = build_processor(SIZES[size]["vocab"])
    config, generation_config = build_config(size, processor.tokenizer)
    torch.manual_seed(seed)
    model = MusicFlamingoForConditionalGeneration(config)
    model.generation_config = generation_config
    model.save_pretrained(target)
    processor.save_pretrained(target)
    return sorted(str(p.relative_to(root)) for p in target.rglob("*") if p.is_file())


def build_processor(vocab_size: int):
    from transformers import MusicFlamingoProcessor, WhisperFeatureExtractor

    return MusicFlamingoProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=128, return_attention_mask=True),
        tokenizer=build_tokenizer(vocab_size),
        chat_template=CHAT_TEMPLATE,
        max_audio_len=1200,
    )


def build_config(size: str, tokenizer):
    """Model and generation configs of one size, token ids taken from `tokenizer`."""
    from transformers import AudioFlamingo3EncoderConfig, GenerationConfig, MusicFlamingoConfig, Qwen2Config

    dims = SIZES[size]
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}
    text_config = Qwen2Config(
        vocab_size=max(len(tokenizer), dims["vocab"]),
        hidden_size=dims["hidden"],
        intermediate_size=dims["ffn"],
        num_hidden_layers=dims["layers"],
        num_attention_heads=dims["heads"],
        num_key_value_heads=dims["kv_heads"],
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
        # Wider than the usual 0.02 so that the tiny model's greedy choices
        # depend visibly on the prompt and on positions: a misaligned batch
        # row then produces different tokens instead of the same noise.
        initializer_range=0.02 if size == "full" else 0.3,
    )
    audio_config = AudioFlamingo3EncoderConfig(
        num_mel_bins=128,
        num_hidden_layers=dims["enc_layers"],
        hidden_size=dims["enc_dim"],
        num_attention_heads=dims["enc_heads"],
        intermediate_size=dims["enc_ffn"],
        max_source_positions=1500,
    )
    config = MusicFlamingoConfig(
        audio_config=audio_config,
        text_config=text_config,
        audio_token_id=ids["<sound>"],
        audio_bos_token_id=ids["<|sound_bos|>"],
        audio_eos_token_id=ids["<|sound_eos|>"],
    )
    # The published checkpoint ships sampling defaults; the analyzer must
    # override them explicitly, so the tiny one ships them too.
    generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=True,
        temperature=0.7,
        top_p=0.8,
        top_k=20,
        repetition_penalty=1.05,
    )
    return config, generation_config


def build_tokenizer(vocab_size: int):
    """A byte-level BPE with Qwen2's tokenizer class and the real special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, 4096) - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    state = bpe.model.__getstate__()
    import json

    model_state = json.loads(state) if isinstance(state, (str, bytes)) else state
    tokenizer = Qwen2Tokenizer(
        vocab=model_state["vocab"],
        merges=[tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model_state["merges"]],
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    tokenizer.model_max_length = 131072
    return tokenizer

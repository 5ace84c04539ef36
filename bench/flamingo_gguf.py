"""Per-prompt timings of the GGUF backend, and why it sends prompts the way it does.

    python bench/flamingo_gguf.py [--models DIR] [--quant f16] [--seconds 30] [--repeats 3]

Runs the five default prompts (short token limits unless --full-limits) over
one clip through a resident llama-server in three ways:

- ``cold+parallel`` (the product): all prompts at once, each slot encoding the audio itself;
- ``warm+parallel``: one request computes the audio prefix first, then all
  prompts at once (only the slot that ran it can reuse the prefix);
- ``sequential``: one prompt after another on one slot (the prefix is reused
  from the slot's cache, decoding is not batched).

Each run gets a new clip: a slot keeps its last prompt, so repeating a clip
would measure the cache. Without --models it builds the tiny GGUF pair
(scripts/build_llama_cpp.sh must have run).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


_clips = iter(range(1 << 30))


def clip(seconds: float) -> np.ndarray:
    """A new clip each call: the server keeps each slot's last prompt, and a repeat would hit it."""
    sr = 16000
    t = np.arange(int(seconds * sr)) / sr
    x = sum(0.15 * np.sin(2 * np.pi * f * t) for f in (220.0, 277.18, 329.63)) + (np.mod(t, 0.5) < 0.01) * 0.5
    x = x + 0.01 * np.random.default_rng(next(_clips)).standard_normal(t.size)
    return x.astype(np.float32)


def main() -> int:
    from mirwatch.analyzers.flamingo_gguf import FlamingoGGUFAnalyzer
    from mirwatch.config import FlamingoConfig, FlamingoPrompt, _default_flamingo_prompts
    from mirwatch.models.store import ModelStore

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path)
    parser.add_argument("--quant", default="f16")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--full-limits", action="store_true", help="the default token limits (500/200/...)")
    args = parser.parse_args()

    if args.models is None:
        from gguf_support import tiny_gguf_dir

        args.models = tiny_gguf_dir()
    prompts = _default_flamingo_prompts()
    if not args.full_limits:
        prompts = {n: FlamingoPrompt(p.text, 32) for n, p in prompts.items()}
    cfg = FlamingoConfig(enabled="on", backend="gguf", gguf_quant=args.quant, dtype="float32",
                         gguf_max_audio_seconds=max(30.0, args.seconds), prompts=prompts)
    rows = []

    analyzer = FlamingoGGUFAnalyzer(cfg, ModelStore(args.models))
    t0 = time.perf_counter()
    analyzer.load()
    print(f"llama-server ready in {time.perf_counter() - t0:.2f} s ({analyzer._device})")
    try:
        analyzer.describe(clip(args.seconds))  # first use: page in, allocate
        for label, kwargs in (("cold+parallel", {}), ("warm+parallel", {"warm_prefix": True})):
            rows.append(_measure(label, lambda kw=kwargs: analyzer.describe(clip(args.seconds), **kw), args.repeats))
    finally:
        analyzer.close()

    one = FlamingoGGUFAnalyzer(dataclasses.replace(cfg, gguf_parallel=1), ModelStore(args.models))
    one.load()
    try:
        def sequential():
            totals, answers, audio = 0.0, {}, clip(args.seconds)
            for name, prompt in prompts.items():
                run = one.describe(audio, {name: prompt})
                answers.update(run.answers)
                totals += run.timings["total"]
            return totals, answers

        rows.append(_measure_seq("sequential", sequential, args.repeats))
    finally:
        one.close()

    print(f"\n{args.seconds:.0f} s clip, {len(prompts)} prompts, quant {args.quant}, {args.repeats} repeats (median)")
    print(f"{'mode':<16}{'total s':>9}{'s/prompt':>10}{'tokens':>8}{'tok/s':>8}")
    for label, total, tokens in rows:
        print(f"{label:<16}{total:>9.3f}{total / len(prompts):>10.3f}{tokens:>8d}{tokens / total:>8.1f}")
    return 0


def _measure(label, fn, repeats):
    totals, tokens = [], 0
    for _ in range(repeats):
        run = fn()
        totals.append(run.timings["total"])
        tokens = run.generated_tokens
    return label, statistics.median(totals), tokens


def _measure_seq(label, fn, repeats):
    totals, tokens = [], 0
    for _ in range(repeats):
        total, answers = fn()
        totals.append(total)
        tokens = sum(a.tokens for a in answers.values())
    return label, statistics.median(totals), tokens


if __name__ == "__main__":
    sys.exit(main())

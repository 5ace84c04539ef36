"""Music Flamingo: one generate per prompt (naive) against the shared-prefix batch.

Both paths run in one process on the same tracks and the same random-weight
model, through the analyzer's own code (`describe_naive` and `describe`).

    # CPU, a ~60 M-parameter model written to disk and loaded like the real one
    python bench/flamingo_batching.py --size small --seconds 120 --tracks 2

    # GPU, the published architecture (Whisper-large encoder + Qwen2.5-7B) in bf16
    python bench/flamingo_batching.py --size full --seconds 240 --tracks 3

Audio is synthetic music-like signal unless --audio names real files. Random
weights rarely emit an end token, so every answer runs to its token limit:
the work per track is the same as the real model's worst case.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mirwatch.analyzers.flamingo import SAMPLE_RATE, FlamingoAnalyzer, Run
from mirwatch.audio import decode
from mirwatch.config import FlamingoConfig
from mirwatch.models.store import ModelStore
from mirwatch.models.tiny_flamingo import build_config, build_processor, write_sized


def synthetic_track(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    root = 110.0 * 2 ** (rng.integers(0, 12) / 12)
    x = sum(0.2 * np.sin(2 * np.pi * root * r * t) for r in (1.0, 1.26, 1.5))
    x = x + 0.4 * (np.mod(t, 60 / rng.uniform(80, 160)) < 0.01) + 0.02 * rng.standard_normal(t.size)
    return x.astype(np.float32)


def build_analyzer(args: argparse.Namespace, workdir: Path) -> FlamingoAnalyzer:
    cfg = FlamingoConfig(enabled="on", device=args.device, dtype=args.dtype, attn_implementation=args.attn)
    analyzer = FlamingoAnalyzer(cfg, ModelStore(workdir))
    if args.size != "full":
        write_sized(workdir, args.size)
        analyzer.load()
        return analyzer
    # 8 B parameters of random weights are built on the device, not written:
    # same classes and sizes as the checkpoint, without 16 GB of disk traffic.
    from transformers import MusicFlamingoForConditionalGeneration

    processor = build_processor(4096)
    config, generation_config = build_config("full", processor.tokenizer)
    analyzer.attn_implementation = config._attn_implementation = "sdpa" if args.attn == "auto" else args.attn
    device = torch.device("cuda" if args.device == "auto" else args.device)
    torch.set_default_dtype(getattr(torch, args.dtype))
    with torch.device(device):
        model = MusicFlamingoForConditionalGeneration(config).eval()
    torch.set_default_dtype(torch.float32)
    model.generation_config = generation_config
    analyzer.attach(model, processor)
    return analyzer


def timed(fn, device: torch.device) -> tuple[Run, float, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    run = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return run, time.perf_counter() - start, peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("tiny", "small", "full"), default="small")
    parser.add_argument("--seconds", type=float, default=240.0, help="length of each synthetic track")
    parser.add_argument("--tracks", type=int, default=2)
    parser.add_argument("--audio", type=Path, nargs="*", default=[], help="real audio files instead")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None)
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.size == "full" else "float32")
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="flamingo-bench-") as tmp:
        analyzer = build_analyzer(args, Path(tmp))
        device = analyzer.device
        params = sum(p.numel() for p in analyzer.model.parameters()) / 1e6
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
        print(f"model: {args.size}, {params:.0f} M parameters, {args.dtype}, {analyzer.attn_implementation}; {where}")

        if args.audio:
            tracks = [(p.name, decode(p).mono_16k) for p in args.audio]
        else:
            tracks = [(f"synthetic-{i}", synthetic_track(args.seconds, i)) for i in range(args.tracks)]
        # One short warm-up so that kernel selection/allocation is not billed to track 1.
        analyzer.describe(synthetic_track(5.0, 99), {"w": analyzer.cfg.prompts["instrumentation"]})

        ratios = []
        for name, audio in tracks:
            audio, _ = analyzer.cap_duration(audio)
            naive, naive_s, naive_peak = timed(lambda: analyzer.describe_naive(audio), device)
            batched, batched_s, batched_peak = timed(lambda: analyzer.describe(audio), device)
            same = sum(naive.descriptions[n].token_ids == batched.descriptions[n].token_ids for n in naive.descriptions)
            ratios.append(naive_s / batched_s)
            report(name, len(audio) / SAMPLE_RATE, naive, naive_s, naive_peak, batched, batched_s, batched_peak, same)
        if len(ratios) > 1:
            print(f"\nspeed-up over {len(ratios)} tracks: median {statistics.median(ratios):.2f}x "
                  f"(min {min(ratios):.2f}x, max {max(ratios):.2f}x)")
    return 0


def report(name: str, seconds: float, naive: Run, naive_s: float, naive_peak: float,
           batched: Run, batched_s: float, batched_peak: float, same: int) -> None:
    t = batched.timings
    print(f"\n== {name}: {seconds:.0f} s of audio, prefix {t['prefix_tokens']:.0f} tokens")
    print(f"{'prompt':<16} {'tokens':>6} {'naive s':>8} {'tok/s':>7} {'batched s':>9}")
    for prompt, d in naive.descriptions.items():
        b = batched.descriptions[prompt]
        print(f"{prompt:<16} {len(d.token_ids):>6} {d.seconds:>8.2f} {len(d.token_ids) / d.seconds:>7.1f}"
              f" {b.seconds:>9.2f}")
    print(f"naive   total {naive_s:7.2f} s  {naive.generated_tokens / naive_s:7.1f} tok/s  peak {naive_peak:.2f} GiB")
    print(f"batched total {batched_s:7.2f} s  {batched.generated_tokens / batched_s:7.1f} tok/s  peak {batched_peak:.2f} GiB"
          f"  (features {t['features']:.2f} s, audio encode {t['audio_encode']:.2f} s,"
          f" prefill {t['prefill']:.2f} s, decode {t['decode']:.2f} s at {t['decode_tokens_per_second']:.1f} tok/s)")
    print(f"speed-up {naive_s / batched_s:.2f}x; identical answers: {same}/{len(naive.descriptions)}")


if __name__ == "__main__":
    sys.exit(main())

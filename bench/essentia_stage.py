"""Cost of the Essentia stage per part, "effnet" vs "vggish" danceability/atonality.

    .venv/bin/python bench/essentia_stage.py [--track FILE] [--keep DIR]

Builds full-size graphs with random weights and the real node names (an
EfficientNet-B0 stack on [128, 96] mel patches to 1280-dim embeddings, and
VGGish, ~72 M parameters, under each legacy classifier); weights do not
change the cost. Runs `EssentiaAnalyzer` in both settings on one real track
(default: the 318 s ``battle.ogg`` of Debian's wesnoth-1.16-music, written
to FLAC first) and prints seconds and realtime factors per part, side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import soundfile as sf

from mirwatch.analyzers.base import Track
from mirwatch.analyzers.essentia_tags import EssentiaAnalyzer
from mirwatch.audio import decode
from mirwatch.config import EssentiaConfig
from mirwatch.models import tiny_essentia
from mirwatch.models.graphdef import DT_FLOAT, Attr, Graph, glorot
from mirwatch.models.store import ModelStore

WESNOTH_TRACK = Path("/usr/share/games/wesnoth/1.16/data/core/music/battle.ogg")
TARGET_REALTIME = 80.0
TARGET_RATIO = 5.0

# EfficientNet-B0 stages: (expansion, output channels, repeats, stride, kernel).
B0_STAGES = ((1, 16, 1, 1, 3), (6, 24, 2, 2, 3), (6, 40, 2, 2, 5), (6, 80, 3, 2, 3),
             (6, 112, 3, 1, 5), (6, 192, 4, 2, 5), (6, 320, 1, 1, 3))


class _Net:
    """Conv helpers on `Graph` with unique names and folded batch norm (a bias)."""

    def __init__(self, seed: int) -> None:
        self.g = Graph()
        self.rng = np.random.default_rng(seed)
        self.n = 0

    def name(self, what: str) -> str:
        self.n += 1
        return f"net/{what}_{self.n}"

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int = 1, act: str | None = "swish") -> str:
        y = self.g.conv2d(self.name("conv"), x, glorot(self.rng, (k, k, cin, cout)), stride)
        return self.act(self.g.bias_add(self.name("bias"), y, np.zeros(cout, np.float32)), act)

    def depthwise(self, x: str, c: int, k: int, stride: int) -> str:
        y = self.g.conv2d(self.name("dw"), x, glorot(self.rng, (k, k, c, 1)), stride, depthwise=True)
        return self.act(self.g.bias_add(self.name("bias"), y, np.zeros(c, np.float32)), "swish")

    def act(self, x: str, kind: str | None) -> str:
        if kind is None:
            return x
        if kind == "relu":
            return self.g.unary("Relu", self.name("relu"), x)
        gate = self.g.unary("Sigmoid", self.name("sigmoid"), x)
        return self.g.binary("Mul", self.name("swish" if kind == "swish" else "gate"), x, gate)

    def squeeze_excite(self, x: str, c: int, reduced: int) -> str:
        s = self.g.mean(self.name("se_pool"), x, [1, 2], keep_dims=True)
        s = self.conv(s, c, reduced, 1)
        s = self.g.unary("Sigmoid", self.name("se_gate"), self.conv(s, reduced, c, 1, act=None))
        return self.g.binary("Mul", self.name("se_scale"), x, s)

    def mbconv(self, x: str, cin: int, cout: int, expand: int, stride: int, k: int) -> str:
        mid = cin * expand
        y = self.conv(x, cin, mid, 1) if expand != 1 else x
        y = self.depthwise(y, mid, k, stride)
        y = self.squeeze_excite(y, mid, max(1, cin // 4))
        y = self.conv(y, mid, cout, 1, act=None)
        if stride == 1 and cin == cout:
            y = self.g.binary("AddV2", self.name("residual"), x, y)
        return y


def effnet_b0_graph(meta: dict) -> bytes:
    net = _Net(1)
    g = net.g
    x = g.reshape("net/image", g.placeholder(meta["schema"]["inputs"][0]["name"], [-1, 128, 96]), [-1, 128, 96, 1])
    x = net.conv(x, 1, 32, 3, 2)
    cin = 32
    for expand, cout, repeats, stride, k in B0_STAGES:
        for i in range(repeats):
            x = net.mbconv(x, cin, cout, expand, stride if i == 0 else 1, k)
            cin = cout
    x = net.conv(x, cin, 1280, 1)
    embeddings = g.mean("net/embeddings", x, [1, 2])
    logits = g.dense("net/logits", embeddings, glorot(net.rng, (1280, 400)), np.zeros(400))
    predictions = g.unary("Sigmoid", "net/predictions", logits)
    g.identity_n("PartitionedCall", [predictions, embeddings])
    return g.serialize()


def vggish_graph(meta: dict) -> bytes:
    net = _Net(2)
    g = net.g
    x = g.reshape("model/vggish/image", g.placeholder(meta["schema"]["inputs"][0]["name"], [-1, 96, 64]),
                  [-1, 96, 64, 1])
    cin = 1
    for block in ((64,), (128,), (256, 256), (512, 512)):
        for cout in block:
            x = net.conv(x, cin, cout, 3, act="relu")
            cin = cout
        x = g.max_pool(net.name("pool"), x)
    x = g.reshape("model/vggish/flatten", x, [-1, 6 * 4 * 512])
    for i, (fan_in, width) in enumerate(((6 * 4 * 512, 4096), (4096, 4096))):
        x = g.unary("Relu", f"model/vggish/fc1_{i + 1}/Relu",
                    g.dense(f"model/vggish/fc1_{i + 1}", x, glorot(net.rng, (fan_in, width)), np.zeros(width)))
    x = g.dense("model/vggish/fc2", x, glorot(net.rng, (4096, 128)), np.zeros(128))
    x = g.unary("Relu", "model/fully_connected/Relu",
                g.dense("model/fully_connected", x, glorot(net.rng, (128, 100)), np.zeros(100)))
    logits = g.dense("model/logits", x, glorot(net.rng, (100, 2)), np.zeros(2))
    out = tiny_essentia.output_named(meta, "predictions")["name"].split(":")[0]
    g.add(out, out.rsplit("/", 1)[-1], [logits], T=Attr.type(DT_FLOAT))
    return g.serialize()


def head_graph(meta: dict) -> bytes:
    """A head the size of the published ones: 1280 -> 512 -> classes."""
    g, rng = Graph(), np.random.default_rng(3)
    x = g.placeholder(meta["schema"]["inputs"][0]["name"], [-1, 1280])
    x = g.unary("Relu", "model/dense/Relu", g.dense("model/dense", x, glorot(rng, (1280, 512)), np.zeros(512)))
    logits = g.dense("model/dense_1", x, glorot(rng, (512, len(meta["classes"]))), np.zeros(len(meta["classes"])))
    out = tiny_essentia.output_named(meta, "predictions")
    node = out["name"].split(":")[0]
    g.add(node, out.get("op") or node.rsplit("/", 1)[-1], [logits], T=Attr.type(DT_FLOAT))
    return g.serialize()


def write_full_size(root: Path) -> None:
    folder = root / "essentia"
    folder.mkdir(parents=True, exist_ok=True)
    for stem in tiny_essentia.ALL_MODELS:
        meta = tiny_essentia.metadata(stem)
        (folder / f"{stem}.json").write_text(json.dumps(meta), encoding="utf-8")
        if stem == tiny_essentia.EMBEDDING:
            data = effnet_b0_graph(meta)
        elif stem in tiny_essentia.VGGISH_CLASSIFIERS:
            data = vggish_graph(meta)
        else:
            data = head_graph(meta)
        (folder / f"{stem}.pb").write_bytes(data)
        print(f"  {stem}.pb: {len(data) / 1e6:.1f} MB", file=sys.stderr)


def bench_track(folder: Path, source: Path) -> Path:
    data, rate = sf.read(str(source), dtype="float32", always_2d=True)
    out = folder / source.stem / "full_mix.flac"
    out.parent.mkdir(parents=True)
    sf.write(str(out), data, rate, subtype="PCM_16")
    return out


CPU_SECONDS: dict[str, float] = {}


def timed(fn: Callable[[], object], repeats: int = 1, label: str | None = None) -> tuple[float, object]:
    """Median wall seconds; process CPU seconds are kept under `label`.

    CPU time shows what a part costs when other jobs share the cores, which
    the wall time alone hides on a busy machine.
    """
    times, cpu, result = [], [], None
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = fn()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    if label:
        CPU_SECONDS[label] = statistics.median(cpu)
    return statistics.median(times), result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--track", type=Path, default=WESNOTH_TRACK)
    parser.add_argument("--keep", type=Path, help="build the graphs here (and reuse them if present)")
    args = parser.parse_args()
    if not args.track.is_file():
        print(f"no track at {args.track}: apt-get install -y wesnoth-1.16-music, or pass --track", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="mirwatch-bench-") as tmp:
        models = args.keep or Path(tmp) / "models"
        if not (models / "essentia" / "tonal_atonal-vggish-audioset-1.pb").is_file():
            print("building full-size graphs ...", file=sys.stderr)
            t, _ = timed(lambda: write_full_size(models))
            print(f"  built in {t:.1f} s", file=sys.stderr)
        flac = bench_track(Path(tmp), args.track)
        store = ModelStore(models)
        analyzers = {}
        for family in ("effnet", "vggish"):
            analyzer = EssentiaAnalyzer(EssentiaConfig(danceability_atonality=family), store)
            t, _ = timed(analyzer.load)
            analyzers[family] = analyzer
            print(f"  load {family}: {t:.1f} s", file=sys.stderr)

        decode_s, audio = timed(lambda: decode(flac), label="decode")
        duration = audio.duration
        resample_s, signal = timed(lambda: audio.mono_16k, label="resample")
        rows: dict[str, dict[str, float]] = {f: {"decode": decode_s, "resample": resample_s} for f in analyzers}
        effnet = analyzers["effnet"]
        embed_s, embeddings = timed(lambda: effnet._embed(signal, "bench"), label="embeddings")
        for family, analyzer in analyzers.items():
            rows[family]["embeddings"] = embed_s
            for head in analyzer._effnet_heads:
                rows[family][head.key] = timed(lambda: head.algorithm(embeddings), 3, label=head.key)[0]
            for head in analyzer._vggish_heads:
                part = head.key + " (vggish)"
                rows[family][part] = timed(lambda: head.algorithm(signal), label=part)[0]
        # The product path end to end, plus the decode and resampling it shares with other analyzers.
        totals = {}
        for family, analyzer in analyzers.items():
            track = Track(flac=flac, audio=audio)
            totals[family] = timed(lambda: analyzer.analyze(track), label=f"analyze {family}")[0] + decode_s + resample_s

    parts = list(dict.fromkeys(p for r in rows.values() for p in r))
    print(f"\nEssentia stage on {args.track.name}: {duration:.1f} s of audio, {embeddings.shape[0]} EffNet patches\n")
    print(f"{'part':28}{'effnet s':>10}{'x RT':>8}{'vggish s':>11}{'x RT':>8}{'CPU s':>9}")
    for part in parts:
        cells = []
        for family in ("effnet", "vggish"):
            s = rows[family].get(part)
            cells.append(f"{s:10.3f}{duration / s:8.0f}" if s else f"{'-':>10}{'':8}")
        print(f"{part:28}{cells[0]} {cells[1]}{CPU_SECONDS.get(part, 0.0):9.2f}")
    sums = {f: sum(rows[f].values()) for f in rows}
    print(f"{'sum of parts':28}{sums['effnet']:10.3f}{duration / sums['effnet']:8.1f}"
          f" {sums['vggish']:10.3f}{duration / sums['vggish']:8.1f}")
    print(f"{'decode+resample+analyze()':28}{totals['effnet']:10.3f}{duration / totals['effnet']:8.1f}"
          f" {totals['vggish']:10.3f}{duration / totals['vggish']:8.1f}")
    print(f"CPU seconds in analyze(): effnet {CPU_SECONDS['analyze effnet']:.2f},"
          f" vggish {CPU_SECONDS['analyze vggish']:.2f}; load average at the end {os.getloadavg()[0]:.1f}"
          f" on {os.cpu_count()} CPUs")
    dance_effnet = rows["effnet"]["danceability"] + rows["effnet"]["atonality"]
    dance_vggish = rows["vggish"]["danceability (vggish)"] + rows["vggish"]["atonality (vggish)"]
    ratio = totals["vggish"] / totals["effnet"]
    print(f"\ndanceability+atonality: effnet {dance_effnet:.3f} s vs vggish {dance_vggish:.3f} s"
          f" ({dance_vggish / dance_effnet:.0f}x)")
    print(f"whole stage: effnet is {ratio:.1f}x faster than vggish (target >= {TARGET_RATIO:.0f}x)")
    realtime = duration / totals["effnet"]
    print(f"default stage: {realtime:.0f}x realtime (target >= {TARGET_REALTIME:.0f}x)")
    return 0 if realtime >= TARGET_REALTIME and ratio >= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())

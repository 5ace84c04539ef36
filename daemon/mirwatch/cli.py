"""The ``mirwatch`` command line.

Exit codes: 0 success, 1 some track failed (``analyze``) or a check failed
(``models verify``), 2 bad config or usage, 3 model files missing/corrupt.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from . import __version__, config as config_mod, envdefaults, logs

EXIT_FAILED, EXIT_CONFIG, EXIT_MODELS = 1, 2, 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mirwatch", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"mirwatch {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", help="config file (default: $MIRWATCH_CONFIG, ./config.toml)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("run", parents=[common], help="run the daemon in the foreground (what systemd starts)")
    p = sub.add_parser("analyze", parents=[common], help="analyse tracks now and write their sidecars")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="full_mix.flac files or track folders")
    p = sub.add_parser("status", parents=[common], help="queue counts, current job, recent failures")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    sub.add_parser("scan", parents=[common], help="queue every track whose sidecar is missing or stale")
    p = sub.add_parser("retry", parents=[common], help="queue failed tracks again")
    p.add_argument("path", nargs="?", type=Path, help="a full_mix.flac or track folder")
    p.add_argument("--all-failed", action="store_true", help="every failed job")

    from . import ab

    ab.add_parser(sub, common)
    models = sub.add_parser("models", help="fetch, verify or fake the model files")
    msub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    p = msub.add_parser("fetch", parents=[common], help="download the model files the config needs")
    p.add_argument("--group", action="append", help="manifest group(s) to fetch (default: what the config uses)")
    p.add_argument("--flamingo-gguf", metavar="QUANT", help="also fetch a GGUF build of Music Flamingo")
    p = msub.add_parser("verify", parents=[common], help="check model files against their checksums")
    p.add_argument("--group", action="append")
    p = msub.add_parser("make-test", help="write a tiny model set with the real names and interfaces")
    p.add_argument("dir", type=Path)
    p.add_argument("--only", action="append", help="model family: essentia, flamingo, aesthetics")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "models" and args.models_command == "make-test":
        return _make_test(args)
    try:
        cfg = config_mod.load(args.config, check_roots=args.command == "run")
    except config_mod.ConfigError as exc:
        print(f"mirwatch: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    # The daemon and `analyze` log to stdout (journald); the other commands keep
    # stdout for their answer (`status --json`) and log to stderr.
    stream = sys.stdout if args.command in ("run", "analyze", "ab") else sys.stderr
    logs.configure(cfg.logging.format, cfg.logging.level, stream=stream)
    log = logs.get_logger()
    if args.command in ("run", "analyze", "ab"):
        applied = envdefaults.apply(cfg.env)
        log.debug("env_defaults", applied=sorted(applied))
    handler = {"run": _run, "analyze": _analyze, "status": _status, "scan": _scan, "retry": _retry,
               "models": _models, "ab": _ab}[args.command]
    from .queue import QueueSchemaError, QueueUnavailable

    try:
        return handler(cfg, args, log)
    except (QueueUnavailable, QueueSchemaError) as exc:
        print(f"mirwatch: queue: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _run(cfg: config_mod.Config, args: argparse.Namespace, log: Any) -> int:
    from .service import Daemon

    return Daemon(cfg, log).run()


def _mixes(paths: list[Path]) -> list[Path]:
    from .reconcile import MIX_NAME, iter_mixes

    found: list[Path] = []
    for path in paths:
        path = path.resolve() if path.exists() else path
        if path.is_dir():
            mixes = sorted(iter_mixes(path))
            found.extend(mixes or [path / MIX_NAME])
        else:
            found.append(path)
    return found


def _analyze(cfg: config_mod.Config, args: argparse.Namespace, log: Any) -> int:
    from .analyzers.base import AnalysisError, ModelLoadError
    from .audio import DecodeError
    from .pipeline import Pipeline

    pipeline = Pipeline(cfg, log)
    try:
        pipeline.load()
    except ModelLoadError as exc:
        log.error("model_error", error=str(exc))
        return EXIT_MODELS
    failures = 0
    for flac in _mixes(args.paths):
        tlog = log.bind(path=str(flac))
        started = time.monotonic()
        try:
            prepared = pipeline.prepare(flac, set(pipeline.fingerprints))
            pipeline.infer(prepared)
            written = pipeline.write(prepared, on_corrupt=lambda moved, why: tlog.warning(
                "sidecar_corrupt", moved_to=str(moved), error=why))
        except (DecodeError, AnalysisError, OSError) as exc:
            failures += 1
            tlog.error("track_failed", error=str(exc))
            continue
        seconds = time.monotonic() - started
        tlog.info("track_done", sidecar=str(written), seconds=round(seconds, 3),
                  realtime_factor=round(prepared.track.audio.duration / seconds, 1))
    pipeline.close()
    return EXIT_FAILED if failures else 0


def _status(cfg: config_mod.Config, args: argparse.Namespace, log: Any) -> int:
    from .queue import open_queue

    from . import progress

    jobs = open_queue(cfg, log)
    now = time.time()
    counts = jobs.counts()
    report = {
        "counts": counts,
        "progress": progress.of(jobs, counts),
        "running": [dict(j.as_dict(), elapsed=round(now - (j.started_at or now), 1)) for j in jobs.running()],
        "recent_failures": [j.as_dict() for j in jobs.recent_failures(10)],
        "hosts": jobs.hosts(),
    }
    jobs.close()
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    c = report["counts"]
    print(f"queued {c['queued']}  running {c['running']}  done {c['done']}  failed {c['failed']}")
    p = report["progress"]
    if p["done_last_hour"]:
        backlog = (f"backlog done in {progress.human(p['eta_seconds'])}" if c["queued"] + c["running"]
                   else "nothing left to do")
        print(f"pace {p['per_hour']:g} tracks/h ({p['done_last_hour']} done in the last hour); {backlog}")
    for job in report["running"]:
        print(f"running: {job['path']} ({job['elapsed']:.0f} s, attempt {job['attempts']})")
    for host in report["hosts"]:
        state = " (stopped)" if host["stopped"] else ""
        age = f"{host['heartbeat_age']:.0f} s ago" if host["heartbeat_age"] is not None else "never"
        print(f"host {host['name']}{state}: {host['current'] or 'idle'}, heartbeat {age},"
              f" done {host['done']}, failed {host['failed']}")
    if report["recent_failures"]:
        print("recent failures:")
    for job in report["recent_failures"]:
        print(f"  {job['path']}: {job['last_error']}")
    return 0


def _scan(cfg: config_mod.Config, args: argparse.Namespace, log: Any) -> int:
    from . import reconcile
    from .queue import open_queue
    from .service import load_fingerprints

    fingerprints, stem_users = load_fingerprints(cfg)
    jobs = open_queue(cfg, log)
    counts = reconcile.scan(cfg.library.roots, jobs, fingerprints, stem_users=stem_users, log=log)
    jobs.close()
    log.info("scan_done", **counts)
    return 0


def _retry(cfg: config_mod.Config, args: argparse.Namespace, log: Any) -> int:
    from .queue import open_queue

    if not args.all_failed and args.path is None:
        print("mirwatch: retry needs a PATH or --all-failed", file=sys.stderr)
        return EXIT_CONFIG
    jobs = open_queue(cfg, log)
    if args.all_failed:
        n = jobs.retry(all_failed=True)
    else:
        n = sum(jobs.retry(flac) for flac in _mixes([args.path]))
    jobs.close()
    log.info("retry", requeued=n)
    return 0 if n or args.all_failed else EXIT_FAILED


def _models(cfg: config_mod.Config, args: argparse.Namespace, log: Any) -> int:
    from .models import manifest as manifest_mod
    from .models.store import ModelStore

    store = ModelStore(cfg.models.dir)
    manifest = manifest_mod.load_manifest(cfg.models.manifest)
    groups = set(args.group) if args.group else manifest_mod.groups_for(cfg, manifest)
    if args.models_command == "fetch":
        if args.flamingo_gguf:
            groups |= {f"flamingo-gguf-{args.flamingo_gguf}", "flamingo-gguf-mmproj"}
        try:
            manifest_mod.fetch(store, manifest, groups=groups, log=log)
        except manifest_mod.FetchError as exc:
            log.error("fetch_failed", error=str(exc))
            return EXIT_FAILED
        return 0
    problems = manifest_mod.verify(store, manifest, groups=groups)
    for name, problem in problems:
        log.error("model_problem", file=name, problem=problem)
    if not problems:
        log.info("models_ok", groups=sorted(groups), dir=str(store.root))
    return EXIT_FAILED if problems else 0


def _ab(cfg: config_mod.Config, args: argparse.Namespace, log: Any) -> int:
    from . import ab

    return ab.run(cfg, args, log)


def _make_test(args: argparse.Namespace) -> int:
    from .models.testmodels import make_test

    written = make_test(args.dir, only=tuple(args.only) if args.only else None)
    print(f"wrote {len(written)} tiny model files to {args.dir}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

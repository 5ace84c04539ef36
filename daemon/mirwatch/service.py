"""``mirwatch run``: the daemon's life from start to stop.

Start: recover jobs a dead process left running, load every model once
(systemd sees READY=1 only after that), start watching, start the worker,
then reconcile the library with a scan so files that arrived while the
daemon was down are not lost. Run: keep systemd's STATUS= current and ping
its watchdog while the worker is healthy. Stop (SIGTERM/SIGINT): STOPPING=1,
stop watching, finish or give back the jobs in flight, exit 0.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from . import notify, progress, reconcile, sidecar
from .analyzers.base import ModelLoadError
from .config import Config
from .pipeline import Pipeline
from .queue import QueueUnavailable, SQLiteQueue, open_queue
from .watcher import LibraryWatcher
from .worker import Worker

EXIT_MODELS = 3
FINGERPRINTS_FILE = "fingerprints.json"


def save_fingerprints(cfg: Config, fingerprints: dict[str, str], stem_users: frozenset[str]) -> None:
    """For ``mirwatch scan`` in another process: what "up to date" means right now."""
    from .sidecar import write_atomic

    data = {"fingerprints": fingerprints, "stem_users": sorted(stem_users)}
    write_atomic(cfg.state.dir / FINGERPRINTS_FILE, json.dumps(data, indent=2).encode())


def load_fingerprints(cfg: Config) -> tuple[dict[str, str] | None, frozenset[str]]:
    try:
        data = json.loads((cfg.state.dir / FINGERPRINTS_FILE).read_text())
        return dict(data["fingerprints"]), frozenset(data.get("stem_users", []))
    except (OSError, ValueError, KeyError, TypeError):
        return None, frozenset()


class Daemon:
    def __init__(self, cfg: Config, log: Any) -> None:
        self.cfg = cfg
        self.log = log
        self._stop = threading.Event()
        self._status = ""
        self._pace = ""  # "120 tracks/h, done in 2 h 10 min" for STATUS=, refreshed with each progress check
        self._next_progress = 0.0

    def request_stop(self, signum: int, _frame: Any = None) -> None:
        self.log.info("stop_requested", signal=signal.Signals(signum).name)
        self._stop.set()

    def run(self) -> int:
        cfg, log = self.cfg, self.log
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        cfg.state.dir.mkdir(parents=True, exist_ok=True)
        sidecar.confine(list(cfg.library.roots))
        log.info("starting", config=str(cfg.path), roots=[str(r) for r in cfg.library.roots],
                 state_dir=str(cfg.state.dir), models_dir=str(cfg.models.dir), pid=os.getpid())

        # fingerprints.json is written on every start: with it and no queue, the queue was lost.
        queue_lost = (cfg.state.dir / FINGERPRINTS_FILE).exists() and not cfg.queue_path.exists()
        jobs = open_queue(cfg, log)
        if queue_lost:
            log.warning("queue_missing", path=str(cfg.queue_path),
                        detail="the queue file is gone; rebuilding the queue from a library scan "
                               "(tracks with fresh sidecars are not analysed again)")
        requeued, failed = jobs.recover()
        if requeued or failed:
            log.warning("recovered_jobs", requeued=requeued, failed=failed,
                        detail="jobs left running by a previous process")

        notify.notify("STATUS=loading models")
        pipeline = Pipeline(cfg, log)
        try:
            pipeline.load()
        except ModelLoadError as exc:
            log.error("model_error", error=str(exc))
            notify.notify(f"STATUS=model error: {exc}")
            jobs.close()
            return EXIT_MODELS
        save_fingerprints(cfg, pipeline.fingerprints, pipeline.stem_users)

        worker = Worker(pipeline, jobs, log)

        def on_ready(path: Path, reason: str, rerun: bool) -> None:
            try:
                ident = reconcile.file_identity(path)
            except OSError:
                return
            outcome = jobs.enqueue(path, ident["size"], ident["mtime_ns"], reason=reason, rerun=rerun)
            if outcome != "unchanged":
                log.info("job_queued", path=str(path), reason=reason, outcome=outcome,
                         queue_depth=jobs.counts()["queued"])
                worker.wake()

        watcher = LibraryWatcher(cfg.library.roots, on_ready, log, settle_seconds=cfg.library.settle_seconds,
                                 polling=cfg.library.polling, poll_interval=cfg.library.poll_interval)
        if cfg.library.watch:
            watcher.start()
        worker.start()
        notify.notify("READY=1")
        log.info("ready", analyzers=[a.name for a in pipeline.analyzers], queue=jobs.counts())

        scanner = threading.Thread(target=self._scan, args=(pipeline, jobs, worker), daemon=True,
                                   name="mirwatch-scan")
        scanner.start()
        self._loop(jobs, worker, pipeline, scanner)

        notify.notify("STOPPING=1")
        log.info("stopping", grace=cfg.worker.stop_grace)
        watcher.stop()
        released = worker.stop(cfg.worker.stop_grace)
        for job in released:
            log.info("job_requeued", job_id=job.id, path=str(job.path), reason="daemon stopping")
        pipeline.close()
        log.info("stopped", queue=jobs.counts(), done=worker.done_count, failed=worker.failed_count)
        jobs.close()
        return 0

    def _scan(self, pipeline: Pipeline, jobs: SQLiteQueue, worker: Worker) -> None:
        if not self.cfg.library.watch:
            return  # this host only works through what the hosts that watch queue
        try:
            counts = reconcile.scan(self.cfg.library.roots, jobs, pipeline.fingerprints,
                                    stem_users=pipeline.stem_users, log=self.log)
        except Exception as exc:  # noqa: BLE001 - a failed scan must not take the daemon down
            self.log.error("scan_failed", error=f"{type(exc).__name__}: {exc}")
            return
        self.log.info("scan_done", **counts, queue_depth=jobs.counts()["queued"])
        worker.wake()

    def _loop(self, jobs: SQLiteQueue, worker: Worker, pipeline: Pipeline, scanner: threading.Thread) -> None:
        ping_every = notify.watchdog_interval()
        tick = min(1.0, ping_every) if ping_every else 1.0
        rescan_every = self.cfg.library.rescan_interval
        next_rescan = time.monotonic() + rescan_every if rescan_every > 0 else float("inf")
        complained = False
        while not self._stop.wait(tick):
            try:
                counts = jobs.counts(wait=False)
            except QueueUnavailable:
                counts = None  # the last STATUS= stands; the worker logs the outage
            if counts is not None:
                self._progress(jobs, counts)
                self._update_status(counts, worker)
            self._heartbeat(jobs, worker)
            healthy, why = worker.healthy()
            if healthy:
                if ping_every:
                    notify.notify("WATCHDOG=1")
                complained = False
            elif not complained:
                # Without pings systemd kills and restarts us; the job is retried.
                self.log.error("worker_unhealthy", error=why, detail="watchdog pings stopped")
                complained = True
            if time.monotonic() >= next_rescan and not scanner.is_alive():
                scanner = threading.Thread(target=self._scan, args=(pipeline, jobs, worker), daemon=True,
                                           name="mirwatch-scan")
                scanner.start()
                next_rescan = time.monotonic() + rescan_every

    def _heartbeat(self, jobs: SQLiteQueue, worker: Worker) -> None:
        """Renew the shared queue's leases on the jobs in flight; say when one was lost."""
        try:
            lost = jobs.heartbeat(worker.current())
        except Exception as exc:  # noqa: BLE001 - a missed beat is retried next tick
            self.log.error("heartbeat_failed", error=f"{type(exc).__name__}: {exc}")
            return
        in_flight = worker.current()  # a job that finished meanwhile was not lost
        for job in (j for j in lost if j in in_flight):
            self.log.warning("lease_lost", job_id=job.id, path=str(job.path),
                             detail="another host may take this job over; its result will not be written")

    def _progress(self, jobs: SQLiteQueue, counts: dict[str, int]) -> None:
        """Every ``progress_interval`` while there is work: log the pace and when the backlog will be done."""
        every = self.cfg.logging.progress_interval
        now = time.monotonic()
        if not every or now < self._next_progress:
            return
        self._next_progress = now + every
        if not counts["queued"] and not counts["running"]:
            self._pace = ""
            return
        try:
            estimate = progress.of(jobs, counts, wait=False)
        except Exception as exc:  # noqa: BLE001 - a queue outage is reported by the worker; skip this one
            self.log.debug("progress_unavailable", error=f"{type(exc).__name__}: {exc}")
            return
        self._pace = (f"{estimate['per_hour']:g} tracks/h, done in {progress.human(estimate['eta_seconds'])}"
                      if estimate["done_last_hour"] else "")
        self.log.info("progress", **counts, **estimate, eta=progress.human(estimate["eta_seconds"]))

    def _update_status(self, counts: dict[str, int], worker: Worker) -> None:
        current = worker.current()
        status = f"queued {counts['queued']}, done {counts['done']}, failed {counts['failed']}"
        if self._pace and counts["queued"]:
            status += f" ({self._pace})"
        if current:
            status += f"; analysing {_printable(current[0].path.parent.name)}"
        if getattr(worker, "waiting", ""):
            status += f"; waiting: {worker.waiting}"
        if status != self._status:
            self._status = status
            notify.notify(f"STATUS={status}")


def _printable(name: str) -> str:
    """A file name made safe for one sd_notify line: bytes that are not UTF-8 escaped, and no
    control characters (a newline in a folder name would start a new ``KEY=`` assignment)."""
    text = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)

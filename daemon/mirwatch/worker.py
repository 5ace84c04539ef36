"""The worker: jobs stream from the queue through the resident models.

Two threads share one `Pipeline`. The *prepare* thread claims a job, decodes
it and runs the CPU analyzers (Essentia, numeric features); the *infer*
thread runs the GPU analyzers (Music Flamingo, aesthetics) and writes the
sidecar. A semaphore bounds how far prepare may run ahead (``prefetch``), so
memory stays bounded whatever the queue holds.

Stopping: no new claims; jobs in flight get ``stop_grace`` seconds, then
their cancel flag is set (analyzers check it between steps) and whatever is
still unfinished goes back to the queue untouched. A job is only ever
completed and its sidecar written under `_commit`, so a job given back at
shutdown can no longer write.
"""

from __future__ import annotations

import errno
import queue as stdlib_queue
import sqlite3
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from .analyzers.base import AnalysisError, Cancelled
from .audio import DecodeError
from .pipeline import Pipeline, Prepared
from .queue import Job, JobQueue
from .sidecar import OutsideRoots

# A full disk is not the track's fault: the job waits (its attempt is given
# back) and claims pause, doubling from the first to the last figure, until a
# write succeeds again.
DISK_FULL_BACKOFF = (2.0, 60.0)


@dataclass
class _InFlight:
    job: Job
    started: float = field(default_factory=time.monotonic)
    cancel: threading.Event = field(default_factory=threading.Event)
    stage: str = "prepare"
    abandoned: bool = False


class Worker:
    def __init__(self, pipeline: Pipeline, jobs: JobQueue, log: Any) -> None:
        self.pipeline = pipeline
        self.jobs = jobs
        self.log = log
        cfg = pipeline.cfg.worker
        self.job_timeout = cfg.job_timeout
        self._slots = threading.Semaphore(cfg.prefetch + 1)
        self._handoff: stdlib_queue.Queue[tuple[_InFlight, Prepared]] = stdlib_queue.Queue()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._commit = threading.Lock()
        # Keyed by (job id, claim): a host frozen past its lease can claim the same job
        # again while the stale flight is still winding down; neither may unlist the other.
        self._in_flight: dict[tuple[int, int], _InFlight] = {}
        self._threads: list[threading.Thread] = []
        self.done_count = 0
        self.failed_count = 0
        # Non-empty while claims are paused; service shows it in systemd's STATUS=.
        self.waiting = ""
        self._resume_at = 0.0
        self._backoff = DISK_FULL_BACKOFF[0]

    # -- control ----------------------------------------------------------------

    def start(self) -> None:
        for name, target in (("prepare", self._prepare_loop), ("infer", self._infer_loop)):
            thread = threading.Thread(target=target, name=f"mirwatch-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def wake(self) -> None:
        """New work may be queued: stop waiting."""
        self._wake.set()

    def stop(self, grace: float) -> list[Job]:
        """Stop within about `grace` seconds; returns the jobs given back to the queue."""
        self._stop.set()
        self._wake.set()
        deadline = time.monotonic() + grace
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in self._threads):
            for flight in list(self._in_flight.values()):
                flight.cancel.set()
            for thread in self._threads:
                thread.join(min(5.0, max(1.0, grace / 4)))
        released = []
        with self._commit:
            for flight in list(self._in_flight.values()):
                flight.abandoned = True
                self.jobs.release(flight.job)
                released.append(flight.job)
            self._in_flight.clear()
        return released

    # -- health -----------------------------------------------------------------

    def healthy(self) -> tuple[bool, str]:
        """False when a thread died or a job has run past ``job_timeout`` (a hang)."""
        if not self._stop.is_set():
            for thread in self._threads:
                if not thread.is_alive():
                    return False, f"worker thread {thread.name} died"
        now = time.monotonic()
        for flight in list(self._in_flight.values()):
            if now - flight.started > self.job_timeout:
                return False, f"job {flight.job.id} running for {now - flight.started:.0f} s (job_timeout)"
        return True, ""

    def current(self) -> list[Job]:
        return [f.job for f in list(self._in_flight.values())]

    # -- threads ----------------------------------------------------------------

    def _prepare_loop(self) -> None:
        while not self._stop.is_set():
            if self._resume_at and self._stop.wait(max(0.0, self._resume_at - time.monotonic())):
                break
            if not self._slots.acquire(timeout=0.5):
                continue
            try:
                job = None if self._stop.is_set() else self.jobs.claim()
            except Exception as exc:  # noqa: BLE001 - a queue that cannot be written must not kill the thread
                self._slots.release()
                self._pause(f"queue unavailable: {type(exc).__name__}: {exc}")
                continue
            if job is None:
                self._slots.release()
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            flight = _InFlight(job)
            self._in_flight[(job.id, job.claim)] = flight
            log = self.log.bind(job_id=job.id, path=str(job.path))
            log.info("job_started", attempt=job.attempts, reason=job.reason,
                     queue_depth=self.jobs.counts()["queued"])
            try:
                selected = self.pipeline.select(job.path, force=job.force)
                if not selected:
                    self._finish(flight, log, outcome="up_to_date")
                    continue
                prepared = self.pipeline.prepare(job.path, selected, flight.cancel)
            except BaseException as exc:  # noqa: BLE001 - every failure is the job's, not the thread's
                self._failed(flight, log, exc)
                continue
            flight.stage = "queued_for_infer"
            self._handoff.put((flight, prepared))

    def _infer_loop(self) -> None:
        while True:
            try:
                flight, prepared = self._handoff.get(timeout=0.25)
            except stdlib_queue.Empty:
                if self._stop.is_set() and not self._threads[0].is_alive():
                    return
                continue
            log = self.log.bind(job_id=flight.job.id, path=str(flight.job.path))
            if flight.abandoned:
                self._finish(flight, log, outcome=None)  # already given back by stop()
                continue
            flight.stage = "infer"
            try:
                self._write(flight, prepared, log)
            except BaseException as exc:  # noqa: BLE001
                self._failed(flight, log, exc)

    # -- outcomes ---------------------------------------------------------------

    def _write(self, flight: _InFlight, prepared: Prepared, log: Any) -> None:
        def corrupt(moved: Any, reason: str) -> None:
            log.warning("sidecar_corrupt", moved_to=str(moved), error=reason)

        # Flamingo etc. run outside the commit lock; only the write is inside.
        self.pipeline.infer(prepared)
        with self._commit:
            if flight.abandoned:
                return
            # With a shared queue, a host that froze or was cut off past its
            # lease has lost the job to another host, whose result is newer:
            # check (and extend the lease) right before the sidecar rename.
            if not self.jobs.still_owned(flight.job):
                flight.abandoned = True
                self._in_flight.pop((flight.job.id, flight.job.claim), None)
                self._slots.release()
                log.warning("lease_lost", detail="another host took this job over; this result is discarded")
                return
            path = self.pipeline.write(prepared, on_corrupt=corrupt)
            self.jobs.complete(flight.job)
            self._in_flight.pop((flight.job.id, flight.job.claim), None)
        self._resumed()
        self._slots.release()
        self.done_count += 1
        total = time.monotonic() - prepared.started
        duration = prepared.track.audio.duration
        log.info("sidecar_written", sidecar=str(path))
        log.info("job_done", seconds=round(total, 3), audio_seconds=round(duration, 2),
                 realtime_factor=round(duration / total, 1) if total else None,
                 analyzers=sorted(prepared.results), queue_depth=self.jobs.counts()["queued"])

    def _finish(self, flight: _InFlight, log: Any, *, outcome: str | None) -> None:
        with self._commit:
            if outcome and not flight.abandoned:
                self.jobs.complete(flight.job)
                log.info("job_done", outcome=outcome, queue_depth=self.jobs.counts()["queued"])
            self._in_flight.pop((flight.job.id, flight.job.claim), None)
        self._slots.release()

    def _pause(self, reason: str) -> None:
        self.waiting = reason
        delay = self._backoff
        self._backoff = min(self._backoff * 2, DISK_FULL_BACKOFF[1])
        self._resume_at = time.monotonic() + delay
        self.log.error("worker_waiting", error=reason, retry_in=delay,
                       detail="no job is lost: claims resume when writes succeed again")

    def _resumed(self) -> None:
        if self._resume_at:
            self.log.info("worker_resumed", after=self.waiting)
        self.waiting, self._resume_at, self._backoff = "", 0.0, DISK_FULL_BACKOFF[0]

    def _failed(self, flight: _InFlight, log: Any, exc: BaseException) -> None:
        with self._commit:
            if flight.abandoned:
                pass
            elif _disk_full(exc):
                try:
                    self.jobs.release(flight.job)
                except Exception:  # noqa: BLE001 - the queue is on the full disk too: recover() requeues it
                    pass
                log.error("job_waiting", error=f"disk full: {exc}", state="queued",
                          detail="the existing sidecar is untouched; the job runs again when space returns")
                self._pause(f"disk full: {exc}")
            elif isinstance(exc, Cancelled):
                self.jobs.release(flight.job)
                log.info("job_requeued", reason="daemon stopping")
            else:
                permanent, reason = _describe(exc, flight.job)
                state = self.jobs.fail(flight.job, reason, permanent=permanent)
                self.failed_count += state == "failed"
                fields = {"traceback": traceback.format_exc(limit=8)} if not permanent else {}
                log.error("job_failed", error=reason, state=state, attempt=flight.job.attempts,
                          queue_depth=self.jobs.counts()["queued"], **fields)
            self._in_flight.pop((flight.job.id, flight.job.claim), None)
        self._slots.release()
        if not isinstance(exc, Exception):
            raise exc  # KeyboardInterrupt/SystemExit: not ours to swallow


def _disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # SQLite says SQLITE_FULL as "database or disk is full".
    return isinstance(exc, sqlite3.OperationalError) and "is full" in str(exc)


def _describe(exc: BaseException, job: Job) -> tuple[bool, str]:
    """(permanent?, one-line reason). Bad input is permanent; the rest may be transient."""
    if isinstance(exc, DecodeError):
        return True, str(exc)
    if isinstance(exc, FileNotFoundError):
        return True, f"{job.path.name}: file vanished before it could be analysed"
    if isinstance(exc, OutsideRoots):
        return True, str(exc)
    if isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG:
        return True, f"cannot write the sidecar: {exc.strerror}"
    if isinstance(exc, PermissionError) or (isinstance(exc, OSError) and exc.errno == errno.EROFS):
        return False, (f"cannot write in the track folder ({exc.strerror}: {exc.filename or exc}); "
                       "make it writable, then `mirwatch retry`")
    if isinstance(exc, AnalysisError):
        return exc.permanent, str(exc)
    if isinstance(exc, OSError):
        return False, f"{type(exc).__name__}: {exc}"
    return False, f"internal error: {type(exc).__name__}: {exc}"

"""What every queue backend shares: the job record, the interface, the rules.

A job's life: ``queued`` → ``running`` → ``done`` | ``failed``; a failure
below ``max_attempts`` goes back to ``queued``. Attempts are counted when a
job is *claimed*, so a track that crashes the daemon (or a host) is not
retried forever.

A claim belongs to one worker (``host:pid``) and carries a token (the
job's claim counter, which only ever grows): the pair names the claim. A worker may only complete, fail or
write the sidecar of a job while that claim is still the job's current one;
a claim taken over by another host (its lease expired) is *lost*.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

STATES = ("queued", "running", "done", "failed")


@dataclass(frozen=True)
class Job:
    id: int
    path: Path
    state: str
    attempts: int
    force: bool
    generation: int
    reason: str | None
    last_error: str | None
    size: int | None
    mtime_ns: int | None
    worker: str | None
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    # Which claim of this job this record was handed out by (see `claim`).
    claim: int = 0

    def as_dict(self) -> dict[str, object]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["path"] = os.fsdecode(self.path).encode("utf-8", "backslashreplace").decode("utf-8")
        return d


class JobQueue(Protocol):
    """What the daemon needs from a queue, whichever backend holds it."""

    def enqueue(self, path: Path, size: int | None, mtime_ns: int | None, *, reason: str,
                rerun: bool = False, force: bool = False) -> str: ...
    def claim(self) -> Job | None: ...
    def complete(self, job: Job) -> bool: ...
    def fail(self, job: Job, error: str, *, permanent: bool = False) -> str: ...
    def release(self, job: Job) -> None: ...
    def recover(self) -> tuple[int, int]: ...
    def retry(self, path: Path | None = None, *, all_failed: bool = False) -> int: ...
    def heartbeat(self, in_flight: list[Job]) -> list[Job]: ...
    def still_owned(self, job: Job) -> bool: ...
    # wait=False: raise QueueUnavailable at once during an outage instead of waiting it
    # out. The daemon's main loop reads with it: it must keep pinging systemd's watchdog.
    def counts(self, *, wait: bool = True) -> dict[str, int]: ...
    def running(self) -> list[Job]: ...
    def recent_failures(self, limit: int = 10) -> list[Job]: ...
    def recent_done(self, window: float, *, wait: bool = True) -> tuple[int, float]:
        """(jobs done in the last `window` seconds, seconds since the first of them finished)."""
        ...
    def hosts(self) -> list[dict[str, Any]]: ...
    def get(self, path: Path) -> Job | None: ...
    def close(self) -> None: ...


def default_host_name() -> str:
    return socket.gethostname()


def worker_name(host: str) -> str:
    return f"{host}:{os.getpid()}"


def enqueue_action(state: str, *, changed: bool, rerun: bool, force: bool) -> str:
    """What a request to queue an already known track does, on every backend.

    A path is never queued twice: a queued job absorbs the request, a running
    job is marked to run again when it finishes. A done job is queued again
    when the file changed (size or mtime), or when `rerun` asks for it (stale
    sidecar, new stem); a failed one only when the file changed or `force`
    (retry) says so. Returns ``absorb``, ``pending``, ``requeue`` or ``none``.
    """
    if state == "queued":
        return "absorb"
    if state == "running":
        return "pending" if (changed or rerun or force) else "none"
    if changed or force or (rerun and state == "done"):
        return "requeue"
    return "none"


def squash_error(error: str) -> str:
    return " ".join(error.split())[:2000]


class Roots:
    """Library roots by name, as this host mounts them.

    Hosts may mount one library at different paths, so a shared queue stores
    (root name, path relative to the root as bytes) and each host resolves
    that through its own mapping.
    """

    def __init__(self, mapping: dict[str, Path]) -> None:
        # Longest path first, so nested roots resolve to the innermost one.
        self._by_name = dict(mapping)
        self._ordered = sorted(mapping.items(), key=lambda kv: len(os.fsencode(kv[1])), reverse=True)

    @property
    def names(self) -> list[str]:
        return list(self._by_name)

    def split(self, path: Path) -> tuple[str, bytes]:
        raw = os.fsencode(path)
        for name, root in self._ordered:
            base = os.fsencode(root).rstrip(b"/") + b"/"
            if raw.startswith(base) and len(raw) > len(base):
                return name, raw[len(base):]
        raise ValueError(f"{os.fsdecode(raw)!r} is not under any library root "
                         f"({', '.join(f'{n} = {str(p)!r}' for n, p in self._by_name.items())})")

    def join(self, name: str, rel: bytes) -> Path:
        root = self._by_name.get(name)
        if root is None:
            # Another host's root this host does not mount: shown, never worked on here.
            return Path(f"<{name}>") / os.fsdecode(rel)
        return root / os.fsdecode(rel)


def display(name: str, rel: bytes) -> str:
    return f"{name}:" + rel.decode("utf-8", "backslashreplace")


class QueueSchemaError(Exception):
    """The queue was written by a newer mirwatch: refuse rather than guess."""


class QueueUnavailable(Exception):
    """The shared queue's server could not be reached in time."""

"""Watching the library: filesystem events in, complete tracks out.

watchdog reports creations, writes, closes and renames; none of them says
"this file is finished". A `full_mix.flac` is handed on only after its size
and mtime have stayed the same for ``settle_seconds`` and its header reads
as audio, which covers ``cp`` of a large file, rsync's temp-file-then-rename
and a slow writer alike. A folder moved in (``mv`` from elsewhere on the same
filesystem) produces one event for the folder and none for its files, so
folders are walked. A stem appearing beside a mix re-queues the mix.

Roots on network filesystems, or beyond the inotify watch limit, are polled.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from .audio import DecodeError, probe
from .reconcile import MIX_NAME, STEM_PREFIXES, iter_mixes

# Called with (mix path, reason, rerun) once a file is complete.
ReadyCallback = Callable[[Path, str, bool], None]
# A header that does not decode may still be mid-copy; after this many settle
# periods unchanged it is handed on anyway, so that its job fails with a reason.
UNDECODABLE_PATIENCE = 3


@dataclass
class _Pending:
    reason: str
    rerun: bool
    size: int = -1
    mtime_ns: int = -1
    stable_since: float = 0.0


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: LibraryWatcher) -> None:
        self._watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write", "deleted"):
            return
        path = os.fsdecode(event.dest_path if event.event_type == "moved" else event.src_path)
        self._watcher.note(Path(path), is_dir=event.is_directory, event=event.event_type)


class LibraryWatcher:
    def __init__(self, roots: list[Path], on_ready: ReadyCallback, log: Any, *, settle_seconds: float,
                 polling: bool = False, poll_interval: float = 10.0) -> None:
        self.roots = roots
        self.on_ready = on_ready
        self.log = log
        self.settle = settle_seconds
        self.polling = polling
        self.poll_interval = poll_interval
        self._pending: dict[Path, _Pending] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._observers: list[Any] = []
        self._settler = threading.Thread(target=self._settle_loop, name="mirwatch-settle", daemon=True)

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        for root in self.roots:
            self._watch(root)
        self._settler.start()

    def stop(self) -> None:
        self._stop.set()
        for observer in self._observers:
            observer.stop()
        for observer in self._observers:
            observer.join(timeout=5)

    def _watch(self, root: Path) -> None:
        handler = _Handler(self)
        if not self.polling:
            observer = Observer()
            try:
                observer.schedule(handler, str(root), recursive=True)
                observer.start()
                self._observers.append(observer)
                self.log.info("watching", root=str(root), method="inotify")
                return
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EMFILE):
                    raise
                observer.stop()
                self.log.error(
                    "inotify_limit", root=str(root), error=str(exc),
                    detail="the inotify watch/instance limit is too low for this library; polling "
                           f"every {self.poll_interval:g} s instead. Raise fs.inotify.max_user_watches "
                           "(sysctl) to get instant events back",
                )
        observer = PollingObserver(timeout=self.poll_interval)
        observer.schedule(handler, str(root), recursive=True)
        observer.start()
        self._observers.append(observer)
        self.log.info("watching", root=str(root), method="polling", interval=self.poll_interval)

    # -- events -------------------------------------------------------------------

    def note(self, path: Path, *, is_dir: bool, event: str) -> None:
        """Something changed at `path`: remember what to check once it settles."""
        if is_dir:
            if event in ("created", "moved"):
                for mix in iter_mixes(path):
                    self._add(mix, f"folder_{event}", rerun=False)
            return
        name = path.name
        if name == MIX_NAME:
            self._add(path, f"file_{event}", rerun=False)
        elif name.lower().startswith(STEM_PREFIXES) and not name.startswith("."):
            mix = path.parent / MIX_NAME
            self._add(mix, "stem_changed", rerun=True, watch=path)

    def _add(self, mix: Path, reason: str, *, rerun: bool, watch: Path | None = None) -> None:
        with self._lock:
            pending = self._pending.get(watch or mix)
            if pending is None:
                self._pending[watch or mix] = _Pending(reason=reason, rerun=rerun)
            else:
                pending.stable_since = 0.0  # still changing: wait again
                pending.rerun |= rerun

    # -- settling -----------------------------------------------------------------

    def _settle_loop(self) -> None:
        tick = max(0.05, min(0.5, self.settle / 4))
        while not self._stop.wait(tick):
            try:
                self._settle_once()
            except Exception as exc:  # noqa: BLE001 - the watcher must outlive a bad path
                self.log.error("watcher_error", error=f"{type(exc).__name__}: {exc}")

    def _settle_once(self) -> None:
        now = time.monotonic()
        with self._lock:
            items = list(self._pending.items())
        for watched, pending in items:
            try:
                st = watched.stat()
            except OSError:
                self._drop(watched)  # gone again (a temp file renamed away, a deletion)
                continue
            if (st.st_size, st.st_mtime_ns) != (pending.size, pending.mtime_ns) or not pending.stable_since:
                pending.size, pending.mtime_ns, pending.stable_since = st.st_size, st.st_mtime_ns, now
                continue
            quiet = now - pending.stable_since
            if quiet < self.settle:
                continue
            mix = watched if watched.name == MIX_NAME else watched.parent / MIX_NAME
            if watched.name == MIX_NAME:
                try:
                    probe(watched)
                except DecodeError as exc:
                    if quiet < self.settle * UNDECODABLE_PATIENCE:
                        continue
                    self.log.warning("undecodable_file", path=str(watched), error=str(exc))
            self._drop(watched)
            if mix.is_file():
                self.on_ready(mix, pending.reason, pending.rerun)

    def _drop(self, watched: Path) -> None:
        with self._lock:
            self._pending.pop(watched, None)

    def pending_count(self) -> int:
        with self._lock:
            return len(self._pending)

"""Watching the library: filesystem events in, complete tracks out.

watchdog reports creations, writes, closes and renames; none of them says
"this file is finished". A `full_mix.flac` is handed on only after its size
and mtime have stayed the same for ``settle_seconds`` and its header reads
as audio, which covers ``cp`` of a large file, rsync's temp-file-then-rename
and a slow writer alike. A folder moved in (``mv`` from elsewhere on the same
filesystem) produces one event for the folder and none for its files, so
folders are walked. A stem appearing beside a mix re-queues the mix.

Roots on network filesystems, or beyond the inotify watch limit, are polled.
watchdog takes the root's watch but silently skips subfolders it cannot
watch, so before trusting inotify the watcher checks, in a throwaway inotify
instance, that every folder of the root can get a watch; a folder created
later that cannot get one switches that root to polling, with a rescan of it.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watchdog.events import (DirCreatedEvent, DirMovedEvent, FileClosedEvent, FileCreatedEvent,
                             FileModifiedEvent, FileMovedEvent, FileSystemEvent, FileSystemEventHandler)
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from .audio import DecodeError, probe
from .reconcile import MIX_NAME, STEM_PREFIXES, iter_mixes

# Called with (mix path, reason, rerun) once a file is complete.
ReadyCallback = Callable[[Path, str, bool], None]
# A header that does not decode may still be mid-copy; after this many settle
# periods unchanged it is handed on anyway, so that its job fails with a reason.
UNDECODABLE_PATIENCE = 3
# How often the roots' identity is checked (a stat each).
ROOT_CHECK_INTERVAL = 2.0
# Only events that can mean "a track appeared or changed". Opens, reads and closes
# without writing are left out of the kernel's mask: reading the library (the scan,
# header probes, decoding) must not fill the inotify queue until it overflows.
WATCHED_EVENTS = [FileCreatedEvent, DirCreatedEvent, FileMovedEvent, DirMovedEvent, FileModifiedEvent,
                  FileClosedEvent]
_IN_CREATE, _IN_ONLYDIR = 0x100, 0x01000000
_LIMIT_ERRNOS = (errno.ENOSPC, errno.EMFILE, errno.ENOMEM)


def _folders(root: Path):
    """`root` and every folder below it, symlinks not followed."""
    stack = [os.fsencode(root)]
    while stack:
        folder = stack.pop()
        yield folder
        try:
            with os.scandir(folder) as it:
                stack.extend(e.path for e in it if e.is_dir(follow_symlinks=False))
        except OSError:
            continue


class _OverflowListener(logging.Handler):
    """watchdog says that the kernel's inotify queue overflowed (events were dropped) only
    in its log; hearing it, the watcher looks at every track of its inotify roots again."""

    def __init__(self, watcher: LibraryWatcher) -> None:
        super().__init__(logging.WARNING)
        self._watcher = watcher

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in str(record.msg).lower():
            self._watcher.overflowed()


def inotify_room(folders) -> str:
    """'' if every folder can get an inotify watch now; else why not (the limit hit)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_CLOEXEC)
    if fd < 0:
        return os.strerror(ctypes.get_errno()) + " (inotify instance limit)"
    try:
        for count, folder in enumerate(folders):
            if libc.inotify_add_watch(fd, folder, _IN_CREATE | _IN_ONLYDIR) < 0:
                err = ctypes.get_errno()
                if err in _LIMIT_ERRNOS:
                    return f"{os.strerror(err)} after {count} watches (inotify watch limit)"
    finally:
        os.close(fd)
    return ""


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
        self._observers: dict[Path, Any] = {}
        self.methods: dict[Path, str] = {}
        self._fallbacks: dict[Path, str] = {}
        # (st_dev, st_ino) of each root when its watch started; None while it is missing.
        self._identity: dict[Path, tuple[int, int] | None] = {}
        self._settler = threading.Thread(target=self._settle_loop, name="mirwatch-settle", daemon=True)
        self._overflow = threading.Event()
        self._overflow_listener = _OverflowListener(self)

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        inotify_log = logging.getLogger("watchdog.observers.inotify")
        inotify_log.setLevel(logging.WARNING)
        inotify_log.addHandler(self._overflow_listener)
        for root in self.roots:
            self._watch_if_present(root)
        self._settler.start()

    def _watch_if_present(self, root: Path) -> None:
        try:
            st = root.stat()
            present = os.path.isdir(root)
        except OSError:
            present = False
        if not present:
            self._identity[root] = None
            self.log.error("root_missing", path=str(root),
                           detail="library root is not there (unmounted or removed); watching for it to return")
            return
        self._identity[root] = (st.st_dev, st.st_ino)
        self._watch(root)

    def _check_roots(self) -> None:
        """A root removed, unmounted or mounted over loses its watches: notice, and start again."""
        for root in self.roots:
            try:
                st = root.stat()
                now = (st.st_dev, st.st_ino) if os.path.isdir(root) else None
            except OSError:
                now = None
            before = self._identity.get(root)
            if now == before:
                continue
            old = self._observers.pop(root, None)
            if old is not None:
                old.stop()
                old.join(timeout=5)
            self.methods.pop(root, None)
            if now is None:
                self._identity[root] = None
                self.log.error("root_missing", path=str(root),
                               detail="library root went away (unmounted or removed); watching for it to return")
                continue
            self.log.warning("root_restored", path=str(root), detail="watching again and looking at every track")
            self._watch_if_present(root)
            for mix in iter_mixes(root):
                self._add(mix, "root_restored", rerun=False)

    def stop(self) -> None:
        logging.getLogger("watchdog.observers.inotify").removeHandler(self._overflow_listener)
        self._stop.set()
        for observer in list(self._observers.values()):
            observer.stop()
        for observer in list(self._observers.values()):
            observer.join(timeout=5)

    def _watch(self, root: Path) -> None:
        handler = _Handler(self)
        if not self.polling:
            problem = inotify_room(_folders(root))
            if not problem:
                observer = Observer()
                try:
                    observer.schedule(handler, str(root), recursive=True, event_filter=WATCHED_EVENTS)
                    observer.start()
                    self._observers[root] = observer
                    self.methods[root] = "inotify"
                    self.log.info("watching", root=str(root), method="inotify")
                    return
                except OSError as exc:
                    if exc.errno not in _LIMIT_ERRNOS:
                        raise
                    observer.stop()
                    problem = str(exc)
            self._warn_limit(root, problem)
        observer = PollingObserver(timeout=self.poll_interval)
        observer.schedule(handler, str(root), recursive=True, event_filter=WATCHED_EVENTS)
        observer.start()
        self._observers[root] = observer
        self.methods[root] = "polling"
        self.log.info("watching", root=str(root), method="polling", interval=self.poll_interval)

    def _warn_limit(self, root: Path, problem: str) -> None:
        self.log.warning(
            "inotify_limit", root=str(root), error=problem,
            detail="the inotify watch/instance limit is too low for this library; polling "
                   f"every {self.poll_interval:g} s instead. Raise fs.inotify.max_user_watches "
                   "(sysctl) to get instant events back",
        )

    def _switch_to_polling(self, root: Path, problem: str) -> None:
        """A folder created after start-up got no watch: poll the root, and look at all of it once."""
        old = self._observers.pop(root, None)
        if old is not None:
            old.stop()
            old.join(timeout=5)
        saved, self.polling = self.polling, True
        try:
            self._watch(root)
        finally:
            self.polling = saved
        self._warn_limit(root, problem)
        # Events in folders that had no watch were never seen: settle every mix once.
        for mix in iter_mixes(root):
            self._add(mix, "inotify_fallback", rerun=False)

    # -- events -------------------------------------------------------------------

    def note(self, path: Path, *, is_dir: bool, event: str) -> None:
        """Something changed at `path`: remember what to check once it settles."""
        if is_dir:
            if path.is_symlink():
                return  # never followed: a link to a folder is an alias, or a way out of the roots
            if event in ("created", "moved"):
                self._check_room(path)
                for mix in iter_mixes(path):
                    self._add(mix, f"folder_{event}", rerun=False)
            return
        name = path.name
        if name == MIX_NAME:
            if path.is_symlink():
                # Like the scan: symlinks are never followed, so a link cannot pull in (or
                # point a write at) something outside the roots.
                self.log.warning("symlink_ignored", path=str(path))
                return
            self._add(path, f"file_{event}", rerun=False)
        elif name.lower().startswith(STEM_PREFIXES) and not name.startswith("."):
            mix = path.parent / MIX_NAME
            self._add(mix, "stem_changed", rerun=True, watch=path)

    def _check_room(self, folder: Path) -> None:
        root = next((r for r in self.roots if self.methods.get(r) == "inotify" and folder.is_relative_to(r)), None)
        if root is None or root in self._fallbacks:
            return
        problem = inotify_room(_folders(folder))
        if problem:
            # Not from here: this runs on the observer's own thread, which cannot join itself.
            with self._lock:
                self._fallbacks[root] = problem

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
        next_root_check = 0.0
        while not self._stop.wait(tick):
            try:
                if time.monotonic() >= next_root_check:
                    next_root_check = time.monotonic() + ROOT_CHECK_INTERVAL
                    self._check_roots()
                self._settle_once()
            except Exception as exc:  # noqa: BLE001 - the watcher must outlive a bad path
                self.log.error("watcher_error", error=f"{type(exc).__name__}: {exc}")

    def overflowed(self) -> None:
        self._overflow.set()

    def _rescan_after_overflow(self) -> None:
        self._overflow.clear()
        roots = [r for r in self.roots if self.methods.get(r) == "inotify"]
        self.log.warning("inotify_overflow", roots=[str(r) for r in roots],
                         detail="the kernel dropped file events (too many at once); looking at every track again")
        for root in roots:
            for mix in iter_mixes(root):
                self._add(mix, "inotify_overflow", rerun=False)

    def _settle_once(self) -> None:
        if self._overflow.is_set():
            self._rescan_after_overflow()
        with self._lock:
            fallbacks = [(r, why) for r, why in self._fallbacks.items() if self.methods.get(r) == "inotify"]
        for root, problem in fallbacks:
            self._switch_to_polling(root, problem)
        now = time.monotonic()
        with self._lock:
            items = list(self._pending.items())
        for watched, pending in items:
            try:
                self._settle_one(watched, pending, now)
            except Exception as exc:  # noqa: BLE001 - one bad path must not stall the others, or loop
                self._drop(watched)
                self.log.error("watcher_error", path=str(watched), error=f"{type(exc).__name__}: {exc}",
                               detail="dropped; the next scan looks at it again")

    def _settle_one(self, watched: Path, pending: _Pending, now: float) -> None:
        try:
            st = watched.stat()
        except OSError:
            self._drop(watched)  # gone again (a temp file renamed away, a deletion)
            return
        if (st.st_size, st.st_mtime_ns) != (pending.size, pending.mtime_ns) or not pending.stable_since:
            pending.size, pending.mtime_ns, pending.stable_since = st.st_size, st.st_mtime_ns, now
            return
        quiet = now - pending.stable_since
        if quiet < self.settle:
            return
        mix = watched if watched.name == MIX_NAME else watched.parent / MIX_NAME
        if watched.name == MIX_NAME:
            try:
                probe(watched)
            except DecodeError as exc:
                if quiet < self.settle * UNDECODABLE_PATIENCE:
                    return
                self.log.warning("undecodable_file", path=str(watched), error=str(exc))
        if mix.is_file():
            try:
                self.on_ready(mix, pending.reason, pending.rerun)
            except Exception as exc:  # noqa: BLE001 - e.g. the queue's disk is full: keep it, try again
                pending.stable_since = now
                self.log.error("enqueue_failed", path=str(mix), error=f"{type(exc).__name__}: {exc}",
                               detail=f"kept; trying again in {self.settle:g} s")
                return
        self._drop(watched)

    def _drop(self, watched: Path) -> None:
        with self._lock:
            self._pending.pop(watched, None)

    def pending_count(self) -> int:
        with self._lock:
            return len(self._pending)

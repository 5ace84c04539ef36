"""The ``.INFO`` sidecar: a JSON object beside each track, shared with other tools.

mirwatch owns the ``mirwatch`` provenance object and the keys its analyzers
list there; every other key belongs to someone else and is carried over
untouched. Writes are read–merge–write under an exclusive lock on the track
folder, into a temp file in the same folder, fsynced, then renamed over the
old file: a reader (or a crash) sees the old sidecar or the new one, never a
mix. A sidecar that is not a JSON object is moved aside, not overwritten.

Everything in a folder is done relative to the one descriptor the lock was
taken on, and no file name is followed if it is a symlink; once `confine`
named the roots, a folder whose real path lies outside them (a folder swapped
for a symlink after its job was queued) is refused before anything is written.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

PROVENANCE_KEY = "mirwatch"
SUFFIX = ".INFO"
# Larger sidecars are not parsed: no honest sidecar is this big, and reading
# one into memory per job would let a single bad file stall the daemon.
MAX_BYTES = 64 * 1024 * 1024
# Linux NAME_MAX; a temp name keeps at most TEMP_STEM_BYTES of its target's name.
NAME_MAX = 255
TEMP_STEM_BYTES = 200
# ".<target name, cut to TEMP_STEM_BYTES>.<mkstemp's 8 characters>.tmp"
_TEMP_NAME = re.compile(rb"^\.(.+)\.[A-Za-z0-9_]{8}\.tmp$", re.DOTALL)


class CorruptSidecar(Exception):
    """The existing sidecar is not a JSON object."""


class OutsideRoots(PermissionError):
    """The track folder resolves outside the configured roots: nothing is written there."""


# Real paths of the roots writes are confined to (set by the daemon); None: unconfined.
_allowed_roots: tuple[str, ...] | None = None


def confine(roots: list[Path] | None) -> None:
    """Refuse, from now on, to write sidecars in folders outside `roots`."""
    global _allowed_roots
    _allowed_roots = None if roots is None else tuple(os.path.realpath(r) for r in roots)


def _check_confined(dir_fd: int, folder: Path) -> None:
    if _allowed_roots is None:
        return
    real = os.readlink(f"/proc/self/fd/{dir_fd}")
    if not any(real == root or real.startswith(root.rstrip("/") + "/") for root in _allowed_roots):
        raise OutsideRoots(errno.EPERM, f"{folder} resolves to {real}, outside the library roots; "
                                        "not writing there", str(folder))


class NameTooLong(OSError):
    """The track folder's name leaves no room for ``<name>.INFO`` (255 bytes at most)."""


def path_for(flac: Path) -> Path:
    """``<folder>/<folder name>.INFO`` for a ``<folder>/full_mix.flac``."""
    folder = Path(flac).parent
    return folder / (folder.name + SUFFIX)


def aux_path(flac: Path, suffix: str) -> Path:
    folder = Path(flac).parent
    return folder / (folder.name + suffix)


def read(path: Path, *, dir_fd: int | None = None) -> dict[str, Any] | None:
    """The sidecar as a dict; None if absent. Raises `CorruptSidecar`."""
    try:
        # O_NOFOLLOW: a sidecar that is a symlink (to anywhere) is not read through.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        with open(fd, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_BYTES:
                raise CorruptSidecar(f"{Path(path).name}: {size} bytes, larger than {MAX_BYTES}")
            raw = f.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CorruptSidecar(f"{Path(path).name}: a symlink, not a file; not followed") from None
        raise
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptSidecar(f"{Path(path).name}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise CorruptSidecar(f"{Path(path).name}: JSON {type(doc).__name__}, not an object")
    return doc


def provenance(doc: Mapping[str, Any] | None) -> dict[str, Any]:
    prov = doc.get(PROVENANCE_KEY) if doc else None
    return prov if isinstance(prov, dict) else {}


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[int]:
    """Exclusive advisory lock on the track folder (daemon vs. ``mirwatch analyze``);
    yields the folder's descriptor, checked against the roots `confine` set."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(folder):
            raise OutsideRoots(errno.ELOOP, f"{folder} is now a symlink; not followed for writing",
                               str(folder)) from None
        raise
    try:
        _check_confined(fd, folder)
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


def update(
    flac: Path,
    results: Mapping[str, tuple[dict[str, Any], dict[str, Any]]],
    common: Mapping[str, Any],
    aux: Mapping[str, str] | None = None,
    *,
    on_corrupt: Any = None,
) -> Path:
    """Merge analyzer results into the sidecar of `flac`; return its path.

    `results` maps analyzer name -> (values, provenance). Keys an analyzer
    wrote last time and did not write now are removed; keys of analyzers not
    in `results` (not rerun) and foreign keys are kept. `common` is merged
    into the top of the provenance object. `on_corrupt(moved_to, reason)`
    is called when a corrupt sidecar was moved aside.
    """
    target = path_for(flac)
    longest = max([SUFFIX, *(aux or {})], key=len)
    if len(os.fsencode(target.parent.name + longest)) > NAME_MAX:
        raise NameTooLong(errno.ENAMETOOLONG, f"folder name is {len(os.fsencode(target.parent.name))} bytes: "
                          f"'<name>{longest}' would exceed the {NAME_MAX}-byte file name limit")
    with locked(target.parent) as dir_fd:
        remove_debris(target.parent, already_locked=True)
        try:
            doc = read(target.name, dir_fd=dir_fd) or {}
        except CorruptSidecar as exc:
            moved = target.with_name(f"{target.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
            os.replace(target.name, moved.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            if on_corrupt:
                on_corrupt(moved, str(exc))
            doc = {}
        old_prov = provenance(doc)
        old_analyzers = old_prov.get("analyzers") if isinstance(old_prov.get("analyzers"), dict) else {}
        analyzers = {k: v for k, v in old_analyzers.items() if k not in results}

        merged = dict(doc)
        merged.pop(PROVENANCE_KEY, None)
        for name, (values, prov) in results.items():
            previous = old_analyzers.get(name, {})
            for key in previous.get("keys", []) if isinstance(previous, dict) else []:
                if key != PROVENANCE_KEY:
                    merged.pop(key, None)
            merged.update({k: v for k, v in values.items() if k != PROVENANCE_KEY})
            analyzers[name] = {**prov, "keys": sorted(values)}

        merged[PROVENANCE_KEY] = {**old_prov, **common, "analyzers": analyzers}
        for suffix, text in (aux or {}).items():
            write_atomic(aux_path(flac, suffix), text.encode("utf-8"), dir_fd=dir_fd)
        # The sidecar goes last: its presence says every aux file is complete.
        data = json.dumps(merged, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
        write_atomic(target, data.encode("utf-8"), dir_fd=dir_fd)
    return target


def is_own_temp(folder: Path, name: str | bytes) -> bool:
    """Is `name` a temp file `write_atomic` makes for a sidecar or aux file of this folder?"""
    match = _TEMP_NAME.match(os.fsencode(name))
    if not match:
        return False
    stem, own = match.group(1), os.fsencode(folder.name)
    return stem.startswith(own) if len(own) < TEMP_STEM_BYTES else stem == own[:TEMP_STEM_BYTES]


def remove_debris(folder: Path, *, already_locked: bool = False) -> int:
    """Delete temp files a killed writer left in `folder`; returns how many.

    Only while holding the folder lock (or when it is free right now): a
    writer that holds it may be between its mkstemp and its rename.
    """
    try:
        names = [e.name for e in os.scandir(folder) if e.name.endswith(".tmp") and is_own_temp(folder, e.name)]
    except OSError:
        return 0
    if not names:
        return 0
    if already_locked:
        return _unlink_all(folder, names)
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return 0
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return 0  # someone is writing here now; the next write cleans up
    try:
        return _unlink_all(folder, names)
    finally:
        os.close(fd)


def _unlink_all(folder: Path, names: list[str]) -> int:
    removed = 0
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(folder / name)
            removed += 1
    return removed


def write_atomic(path: Path, data: bytes, *, dir_fd: int | None = None) -> None:
    """Write `data` to `path` so that a crash leaves the old file or the new one.

    With `dir_fd` (the descriptor of ``path.parent``) every step is relative to
    that directory, so a rename of the folder or a symlink put in its place
    cannot redirect the write. A symlink at `path` is replaced, never followed.
    """
    own_fd = dir_fd is None
    if own_fd:
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    name = path.name
    stem = os.fsdecode(os.fsencode(name)[:TEMP_STEM_BYTES])
    try:
        tmp = _create_temp(dir_fd, stem)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
                try:
                    mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode & 0o777
                except FileNotFoundError:
                    mode = 0o644
                os.fchmod(f.fileno(), mode or 0o644)
            os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
        os.fsync(dir_fd)
    finally:
        if own_fd:
            os.close(dir_fd)


def _create_temp(dir_fd: int, stem: str) -> str:
    """A new, empty, uniquely named temp file in the directory: `.{stem}.XXXXXXXX.tmp`."""
    for _ in range(100):
        name = f".{stem}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o600, dir_fd=dir_fd))
            return name
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temp file name")

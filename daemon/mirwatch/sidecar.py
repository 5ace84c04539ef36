"""The ``.INFO`` sidecar: a JSON object beside each track, shared with other tools.

mirwatch owns the ``mirwatch`` provenance object and the keys its analyzers
list there; every other key belongs to someone else and is carried over
untouched. Writes are read–merge–write under an exclusive lock on the track
folder, into a temp file in the same folder, fsynced, then renamed over the
old file: a reader (or a crash) sees the old sidecar or the new one, never a
mix. A sidecar that is not a JSON object is moved aside, not overwritten.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import tempfile
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


class NameTooLong(OSError):
    """The track folder's name leaves no room for ``<name>.INFO`` (255 bytes at most)."""


def path_for(flac: Path) -> Path:
    """``<folder>/<folder name>.INFO`` for a ``<folder>/full_mix.flac``."""
    folder = Path(flac).parent
    return folder / (folder.name + SUFFIX)


def aux_path(flac: Path, suffix: str) -> Path:
    folder = Path(flac).parent
    return folder / (folder.name + suffix)


def read(path: Path) -> dict[str, Any] | None:
    """The sidecar as a dict; None if absent. Raises `CorruptSidecar`."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_BYTES:
                raise CorruptSidecar(f"{path.name}: {size} bytes, larger than {MAX_BYTES}")
            raw = f.read()
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptSidecar(f"{path.name}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise CorruptSidecar(f"{path.name}: JSON {type(doc).__name__}, not an object")
    return doc


def provenance(doc: Mapping[str, Any] | None) -> dict[str, Any]:
    prov = doc.get(PROVENANCE_KEY) if doc else None
    return prov if isinstance(prov, dict) else {}


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Exclusive advisory lock on the track folder (daemon vs. ``mirwatch analyze``)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
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
    with locked(target.parent):
        remove_debris(target.parent, already_locked=True)
        try:
            doc = read(target) or {}
        except CorruptSidecar as exc:
            moved = target.with_name(f"{target.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
            os.replace(target, moved)
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
            write_atomic(aux_path(flac, suffix), text.encode("utf-8"))
        # The sidecar goes last: its presence says every aux file is complete.
        data = json.dumps(merged, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
        write_atomic(target, data.encode("utf-8"))
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


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves the old file or the new one."""
    stem = os.fsdecode(os.fsencode(path.name)[:TEMP_STEM_BYTES])
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            mode = os.stat(path).st_mode & 0o777
        except FileNotFoundError:
            mode = 0o644
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)

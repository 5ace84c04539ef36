"""Which tracks need work: library scans and sidecar staleness.

The sidecar is the source of truth. A track needs analysis when its sidecar
is missing, when the mix or its stems changed since the sidecar was written
(size/mtime recorded in provenance), or when an analyzer's fingerprint (its
models' checksums plus the settings that change its output) differs from the
one recorded. `stale_analyzers` tells the worker which analyzers to rerun, so
changing an Essentia threshold does not rerun Music Flamingo.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from . import sidecar
from .analyzers.base import find_stems

MIX_NAME = "full_mix.flac"
STEM_PREFIXES = ("drums.", "bass.", "other.", "vocals.")


def fingerprint(version: str, settings: Mapping[str, Any], models: Mapping[str, str]) -> str:
    blob = json.dumps({"v": version, "settings": settings, "models": models}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def file_identity(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def source_identity(flac: Path) -> dict[str, Any]:
    """What the sidecar records about its inputs, to notice replaced files and new stems."""
    ident: dict[str, Any] = file_identity(flac)
    ident["stems"] = {name: file_identity(p) for name, p in find_stems(flac.parent).items()}
    return ident


def stale_analyzers(
    flac: Path, fingerprints: Mapping[str, str], stem_users: set[str] | frozenset[str] = frozenset()
) -> set[str]:
    """Names of the analyzers whose output in the sidecar is missing or out of date."""
    try:
        doc = sidecar.read(sidecar.path_for(flac))
    except (sidecar.CorruptSidecar, OSError):
        return set(fingerprints)
    prov = sidecar.provenance(doc)
    if not prov:
        return set(fingerprints)
    source = prov.get("source") if isinstance(prov.get("source"), dict) else {}
    try:
        current = source_identity(flac)
    except OSError:
        return set(fingerprints)
    if (source.get("size"), source.get("mtime_ns")) != (current["size"], current["mtime_ns"]):
        return set(fingerprints)
    recorded = prov.get("analyzers") if isinstance(prov.get("analyzers"), dict) else {}
    stale = {
        name for name, fp in fingerprints.items()
        if not isinstance(recorded.get(name), dict) or recorded[name].get("fingerprint") != fp
    }
    if source.get("stems", {}) != current["stems"]:
        stale |= set(stem_users) & set(fingerprints)
    return stale


def iter_mixes(root: Path, on_error: Callable[[str, OSError], None] | None = None) -> Iterator[Path]:
    """Every ``full_mix.flac`` under `root`; symlinks are never followed."""
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as exc:
            if on_error:
                on_error(str(folder), exc)
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.name == MIX_NAME and entry.is_file(follow_symlinks=False):
                    yield Path(entry.path)
                elif entry.name.endswith(".tmp") and sidecar.is_own_temp(Path(folder), entry.name):
                    # Debris of a writer killed mid-write; removed only if no writer holds the folder.
                    sidecar.remove_debris(Path(folder))
            except OSError as exc:
                if on_error:
                    on_error(entry.path, exc)


def scan(
    roots: list[Path],
    queue: Any,
    fingerprints: Mapping[str, str] | None,
    *,
    stem_users: frozenset[str] = frozenset(),
    log: Any = None,
) -> dict[str, int]:
    """Queue every track whose sidecar is missing or stale. Returns counts.

    Without `fingerprints` (no model information, e.g. a CLI scan before the
    daemon ever ran) only missing sidecars and changed files count as stale.
    """
    counts = {"tracks": 0, "queued": 0, "fresh": 0}
    started = time.monotonic()

    def on_error(where: str, exc: OSError) -> None:
        if log:
            log.warning("scan_unreadable", path=where, error=str(exc))

    for root in roots:
        if not root.is_dir():
            if log:
                log.error("root_missing", path=str(root), detail="library root is not a directory; skipped")
            continue
        for flac in iter_mixes(root, on_error):
            counts["tracks"] += 1
            try:
                ident = file_identity(flac)
            except OSError:
                continue
            if fingerprints is None:
                stale = _missing_or_changed(flac)
            else:
                stale = bool(stale_analyzers(flac, fingerprints, stem_users))
            if not stale:
                counts["fresh"] += 1
                continue
            outcome = queue.enqueue(flac, ident["size"], ident["mtime_ns"], reason="scan", rerun=True)
            if outcome in ("queued", "requeued", "pending"):
                counts["queued"] += 1
    counts["seconds"] = round(time.monotonic() - started, 3)  # type: ignore[assignment]
    return counts


def _missing_or_changed(flac: Path) -> bool:
    """Staleness without model information: only "fingerprint differs" is unknowable."""
    try:
        prov = sidecar.provenance(sidecar.read(sidecar.path_for(flac)))
        source = prov.get("source") if isinstance(prov.get("source"), dict) else None
        if not source:
            return True
        current = source_identity(flac)
    except (sidecar.CorruptSidecar, OSError):
        return True
    return (source.get("size"), source.get("mtime_ns"), source.get("stems", {})) != (
        current["size"], current["mtime_ns"], current["stems"])

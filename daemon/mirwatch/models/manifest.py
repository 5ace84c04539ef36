"""The models manifest: which real model files exist, where they come from.

``models/manifest.toml`` lists every file (or Hugging Face snapshot folder)
by its path in the model dir, its source and, where known, its sha256. A
file without a pinned checksum gets one recorded at its first fetch
(``checksums.json`` in the model dir), and every later fetch or verify holds
it to that: the Essentia site publishes no checksums, so trust-on-first-use
is the most that can be had, and it still catches a swapped or damaged file.
"""

from __future__ import annotations

import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable

from ..analyzers.base import sha256_file
from ..config import read_toml
from .store import LOCK_NAME, ModelStore

# The package's copy is a link to the repo's ``models/manifest.toml`` in a
# source checkout and a plain copy in a built wheel.
PACKAGED_MANIFEST = "manifest.toml"
ENTRY_KEYS = {"path", "group", "url", "hf_repo", "revision", "sha256", "license", "note"}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 1 << 20
TIMEOUT_S = 60.0


class ManifestError(Exception):
    """The manifest itself is wrong; one line naming the entry."""


class FetchError(Exception):
    """A file could not be fetched or did not match its checksum; one line."""


@dataclass(frozen=True)
class Entry:
    path: str
    group: str
    url: str | None = None
    hf_repo: str | None = None
    revision: str = "main"
    sha256: str = ""
    license: str = ""
    note: str = ""

    @property
    def is_snapshot(self) -> bool:
        """A Hugging Face repo snapshot (a folder), not a single file."""
        return self.hf_repo is not None


@dataclass(frozen=True)
class Manifest:
    entries: tuple[Entry, ...]
    source: Path | None = None

    @property
    def groups(self) -> set[str]:
        return {e.group for e in self.entries}

    def select(self, groups: Iterable[str] | None = None) -> list[Entry]:
        if groups is None:
            return list(self.entries)
        wanted = set(groups)
        return [e for e in self.entries if e.group in wanted]


def default_manifest_path() -> Path:
    return Path(str(resources.files("mirwatch.models").joinpath(PACKAGED_MANIFEST)))


def load_manifest(path: Path | str | None = None) -> Manifest:
    """Read and check a manifest (default: the one shipped with mirwatch)."""
    path = Path(path) if path is not None else default_manifest_path()
    return parse_manifest(read_toml(path, ManifestError, "manifest"), source=path)


def parse_manifest(raw: dict[str, Any], *, source: Path | None = None) -> Manifest:
    where = str(source) if source else "manifest"
    unknown = set(raw) - {"model"}
    if unknown:
        raise ManifestError(f"{where}: unknown top-level key(s) {sorted(unknown)}; entries are [[model]] tables")
    tables = raw.get("model", [])
    if not isinstance(tables, list):
        raise ManifestError(f"{where}: 'model' must be an array of tables ([[model]])")
    entries: list[Entry] = []
    seen: set[str] = set()
    for index, table in enumerate(tables):
        entry = _entry(table, f"{where}: model[{index}]")
        if entry.path in seen:
            raise ManifestError(f"{where}: model[{index}]: path {entry.path!r} listed twice")
        for other in seen:
            if entry.path.startswith(other + "/") or other.startswith(entry.path + "/"):
                raise ManifestError(f"{where}: model[{index}]: path {entry.path!r} overlaps {other!r}")
        seen.add(entry.path)
        entries.append(entry)
    return Manifest(tuple(entries), source)


def _entry(table: Any, where: str) -> Entry:
    if not isinstance(table, dict):
        raise ManifestError(f"{where}: must be a table")
    unknown = set(table) - ENTRY_KEYS
    if unknown:
        raise ManifestError(f"{where}: unknown key(s) {sorted(unknown)}")
    for key, value in table.items():
        if not isinstance(value, str):
            raise ManifestError(f"{where}: {key} must be a string, got {value!r}")
    path = table.get("path", "")
    where = f"{where} ({path})" if path else where
    pure = PurePosixPath(path)
    if not path or pure.is_absolute() or ".." in pure.parts or path != str(pure) or path == LOCK_NAME:
        raise ManifestError(f"{where}: path must be a relative path inside the model dir")
    if not table.get("group"):
        raise ManifestError(f"{where}: group is required")
    url, hf_repo = table.get("url"), table.get("hf_repo")
    if (url is None) == (hf_repo is None):
        raise ManifestError(f"{where}: give exactly one of url or hf_repo")
    if url is not None and not re.match(r"^(https?|file)://", url):
        raise ManifestError(f"{where}: url must be http(s):// or file://, got {url!r}")
    sha = table.get("sha256", "").lower()
    if sha and not _SHA256.match(sha):
        raise ManifestError(f"{where}: sha256 must be 64 hex digits (or empty: recorded at first fetch)")
    if sha and hf_repo is not None:
        raise ManifestError(f"{where}: sha256 applies to single files; a snapshot's files are recorded at fetch")
    if "revision" in table and hf_repo is None:
        raise ManifestError(f"{where}: revision applies to hf_repo entries only")
    return Entry(**{**table, "sha256": sha})


def groups_for(config: Any, manifest: Manifest | None = None) -> set[str]:
    """Manifest groups a configuration needs (`manifest`: default, the packaged one).

    The transformers checkpoint's group is that of the entry whose ``hf_repo`` is
    ``[flamingo] model_id``; a model id with no entry (a local fine-tune, say) has
    nothing to fetch: its folder is the user's to fill.
    """
    groups: set[str] = set()
    ess = config.essentia
    if ess.enabled:
        if ess.genre or ess.mood or ess.instrument:
            groups.add("essentia")
        if ess.danceability or ess.atonality:
            groups.add("essentia" if ess.danceability_atonality == "effnet" else "essentia-vggish")
    flamingo = config.flamingo
    if flamingo.enabled != "off":
        if flamingo.backend == "gguf":
            groups |= {f"flamingo-gguf-{flamingo.gguf_quant}", "flamingo-gguf-mmproj"}
        else:
            manifest = manifest or load_manifest()
            groups |= {e.group for e in manifest.entries if e.hf_repo == flamingo.model_id}
    if getattr(config.features, "enabled", False) and getattr(config.features, "aesthetics", "off") != "off":
        groups.add("aesthetics")
    return groups


class _Quiet:
    def __getattr__(self, _name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


# -- fetch -------------------------------------------------------------------


def fetch(
    store: ModelStore,
    manifest: Manifest,
    groups: Iterable[str] | None = None,
    log: Any = None,
    *,
    snapshot_download: Callable[..., Any] | None = None,
) -> list[tuple[str, str]]:
    """Bring every selected file into the model dir; returns (path, what happened).

    `log` is a structlog-style logger (``log.info(event, **fields)``).
    Raises `FetchError` at the first file that cannot be fetched or fails
    its checksum; files fetched before it stay (and stay recorded).
    """
    log = log or _Quiet()
    outcomes: list[tuple[str, str]] = []
    for entry in manifest.select(groups):
        if entry.is_snapshot:
            outcome = _fetch_snapshot(store, entry, log, snapshot_download)
        else:
            outcome = _fetch_file(store, entry, log)
        outcomes.append((entry.path, outcome))
    return outcomes


def _fetch_file(store: ModelStore, entry: Entry, log: Any) -> str:
    dest = store.root / entry.path
    recorded = store.recorded().get(entry.path)
    expected = entry.sha256 or recorded
    if dest.is_file() and expected:
        actual = sha256_file(dest)
        if actual == expected:
            if recorded != actual:
                store.record({entry.path: actual})
            log.info("model_present", file=entry.path)
            return "present"
        log.warning("model_corrupt_refetching", file=entry.path, sha256=actual, expected=expected)
    log.info("model_fetching", file=entry.path, url=entry.url)
    actual, size = _download(entry.url or "", dest, entry.path)
    tmp = _part_path(dest)
    try:
        if entry.sha256 and actual != entry.sha256:
            raise FetchError(
                f"{entry.path}: checksum mismatch: downloaded sha256 {actual} but the manifest pins"
                f" {entry.sha256}; not installed"
            )
        if not entry.sha256 and recorded and actual != recorded:
            raise FetchError(
                f"{entry.path}: downloaded sha256 {actual} differs from {recorded} recorded at the first"
                f" fetch; not installed (if the file changed upstream on purpose, delete its line from"
                f" {store.lock_path} and fetch again)"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    store.record({entry.path: actual})
    log.info("model_fetched", file=entry.path, bytes=size, sha256=actual,
             checksum="pinned" if entry.sha256 else ("recorded" if recorded else "first_recorded"))
    return "fetched"


def _part_path(dest: Path) -> Path:
    # Beside the destination, so the final rename stays on one filesystem.
    return dest.with_name(f".{dest.name}.part")


def _download(url: str, dest: Path, name: str) -> tuple[str, int]:
    """Stream `url` to ``.<dest>.part``; returns (sha256, bytes)."""
    import hashlib

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _part_path(dest)
    digest, size = hashlib.sha256(), 0
    request = urllib.request.Request(url, headers={"User-Agent": "mirwatch-models-fetch"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response, open(tmp, "wb") as out:
            while block := response.read(CHUNK):
                digest.update(block)
                out.write(block)
                size += len(block)
            declared = response.headers.get("Content-Length")
            out.flush()
            os.fsync(out.fileno())
        if declared is not None and declared.isdigit() and int(declared) != size:
            raise FetchError(f"{name}: download from {url} stopped after {size} of {declared} bytes")
    except FetchError:
        tmp.unlink(missing_ok=True)
        raise
    except urllib.error.HTTPError as exc:
        tmp.unlink(missing_ok=True)
        raise FetchError(f"{name}: download from {url} failed: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        tmp.unlink(missing_ok=True)
        reason = getattr(exc, "reason", None) or exc
        raise FetchError(f"{name}: download from {url} failed: {reason}") from None
    return digest.hexdigest(), size


def _snapshot_files(folder: Path) -> list[Path]:
    """Files of a snapshot, without huggingface_hub's own bookkeeping."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and ".cache" not in p.relative_to(folder).parts)


def _fetch_snapshot(store: ModelStore, entry: Entry, log: Any, download: Callable[..., Any] | None) -> str:
    folder = store.root / entry.path
    if folder.is_dir() and not _snapshot_problems(store, entry):
        log.info("model_present", file=entry.path)
        return "present"
    if download is None:
        try:
            from huggingface_hub import snapshot_download as download
        except ImportError:
            raise FetchError(f"{entry.path}: fetching {entry.hf_repo} needs the huggingface_hub package") from None
    log.info("model_fetching", file=entry.path, hf_repo=entry.hf_repo, revision=entry.revision)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        download(repo_id=entry.hf_repo, revision=entry.revision, local_dir=str(folder))
    except Exception as exc:  # the hub client raises many types; all mean "not fetched"
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FetchError(f"{entry.path}: download of {entry.hf_repo}@{entry.revision} failed: {text}") from None
    files = _snapshot_files(folder)
    if not files:
        raise FetchError(f"{entry.path}: {entry.hf_repo}@{entry.revision} downloaded no files")
    # A moving revision ("main") legitimately changes files: what was fetched
    # now is what later verifies compare against.
    # Files gone from the snapshot get a blank record (the store has no delete).
    stale = [name for name in store.recorded() if name.startswith(entry.path + "/")]
    hashes = {f"{entry.path}/{p.relative_to(folder).as_posix()}": sha256_file(p) for p in files}
    store.record({**{name: "" for name in stale if name not in hashes}, **hashes})
    log.info("model_fetched", file=entry.path, files=len(hashes), hf_repo=entry.hf_repo, revision=entry.revision)
    return "fetched"


# -- verify ------------------------------------------------------------------


def verify(store: ModelStore, manifest: Manifest, groups: Iterable[str] | None = None) -> list[tuple[str, str]]:
    """(path, problem) for every selected file that is missing or not as recorded."""
    problems: list[tuple[str, str]] = []
    for entry in manifest.select(groups):
        if entry.is_snapshot:
            problems.extend(_snapshot_problems(store, entry))
        else:
            problem = _file_problem(store, entry)
            if problem:
                problems.append((entry.path, problem))
    return problems


def _file_problem(store: ModelStore, entry: Entry) -> str | None:
    path = store.root / entry.path
    if not path.is_file():
        return "missing (run 'mirwatch models fetch')"
    recorded = store.recorded().get(entry.path)
    if not entry.sha256 and not recorded:
        return "checksum not recorded (run 'mirwatch models fetch' to download and record it)"
    actual = sha256_file(path)
    if entry.sha256 and actual != entry.sha256:
        return f"checksum mismatch: sha256 {actual} but the manifest pins {entry.sha256}"
    if recorded and actual != recorded:
        return f"checksum mismatch: sha256 {actual} but {recorded} was recorded at fetch"
    return None


def _snapshot_problems(store: ModelStore, entry: Entry) -> list[tuple[str, str]]:
    folder = store.root / entry.path
    if not folder.is_dir():
        return [(entry.path, "missing (run 'mirwatch models fetch')")]
    recorded = {name: sha for name, sha in store.recorded().items() if name.startswith(entry.path + "/") and sha}
    if not recorded:
        return [(entry.path, "checksums not recorded (run 'mirwatch models fetch' to download and record them)")]
    problems = []
    for name, expected in sorted(recorded.items()):
        path = store.root / name
        if not path.is_file():
            problems.append((name, "missing (run 'mirwatch models fetch')"))
        elif sha256_file(path) != expected:
            problems.append((name, f"checksum mismatch: sha256 differs from {expected} recorded at fetch"))
    return problems

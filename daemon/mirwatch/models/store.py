"""The model directory: where analyzers find their files, and their checksums.

Files are named by a path relative to the model dir (``essentia/…``,
``flamingo/<repo>/…``, ``aesthetics/…``), the same names the manifest under
``models/`` uses. ``checksums.json`` in the dir records each file's sha256 as
fetched (or as written by ``models make-test``); loading compares against it,
so a corrupted or swapped file is caught at start-up with its name.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from ..analyzers.base import ModelLoadError, sha256_file

LOCK_NAME = "checksums.json"


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._hashes: dict[str, str] = {}

    @property
    def lock_path(self) -> Path:
        return self.root / LOCK_NAME

    def recorded(self) -> dict[str, str]:
        """The checksums recorded at fetch/make-test time ({} if none)."""
        try:
            data = json.loads(self.lock_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{self.lock_path}: unreadable checksum record: {exc}") from None
        files = data.get("files", {}) if isinstance(data, dict) else {}
        return {str(k): str(v) for k, v in files.items()}

    def record(self, updates: dict[str, str], **meta: object) -> None:
        """Merge checksums into the record, atomically."""
        try:
            data = json.loads(self.lock_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = {}
        data.setdefault("files", {}).update(updates)
        data.update(meta)
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".checksums.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.lock_path)

    def require(self, name: str) -> Path:
        """Path of a model file or folder; `ModelLoadError` naming it if absent."""
        path = self.root / name
        if not path.exists():
            raise ModelLoadError(
                f"model file missing: {path} (run 'mirwatch models fetch', then 'mirwatch models verify')"
            )
        return path

    def sha256(self, name: str, *, verify: bool = True) -> str:
        """sha256 of a model file, checked against the record when there is one."""
        if name in self._hashes:
            return self._hashes[name]
        path = self.require(name)
        actual = sha256_file(path)
        expected = self.recorded().get(name)
        if verify and expected and expected != actual:
            raise ModelLoadError(
                f"model file corrupt: {path} (sha256 {actual[:12]}… != recorded {expected[:12]}…;"
                " run 'mirwatch models verify')"
            )
        self._hashes[name] = actual
        return actual

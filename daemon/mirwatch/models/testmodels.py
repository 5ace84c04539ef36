"""``mirwatch models make-test DIR``: a complete tiny model set.

Each ``tiny_*`` module writes files with the real names and interfaces of the
production models, tiny and with seeded random weights, so that the exact
production loading code runs on them in tests and on machines without the
real weights. Outputs of such models are meaningless; their shapes are not.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from .store import ModelStore

# Module per model family; each has ``write(root: Path) -> list[str]`` returning
# the names (relative to root) of the files it wrote.
WRITERS = (
    "mirwatch.models.tiny_essentia",
    "mirwatch.models.tiny_flamingo",
    "mirwatch.models.tiny_aesthetics",
)


def make_test(root: Path, *, only: tuple[str, ...] | None = None) -> list[str]:
    """Write every tiny model family (or those in `only`) into `root`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    store = ModelStore(root)
    written: list[str] = []
    for module_name in WRITERS:
        family = module_name.rsplit(".", 1)[-1].removeprefix("tiny_")
        if only is not None and family not in only:
            continue
        names = importlib.import_module(module_name).write(root)
        store.record({name: store.sha256(name, verify=False) for name in names}, test_models=True)
        written.extend(names)
    return written

"""Essentia algorithms that own a streaming network, built once and kept.

Some of Essentia's standard-mode algorithms (``LoudnessEBUR128``,
``RhythmExtractor2013``) run an internal streaming network. Essentia keeps
one process-wide pointer to the network created last; destroying that
network nulls the pointer, and from then on every time *any* running
network reschedules an algorithm whose output buffer is full (the EffNet
embedding does so thousands of times per track) Essentia prints
``No network created, or last created network has been deleted...``.
Built per call, these two algorithms made every track after the first
print ~2,000 such lines (3 s of audio) to ~10,000 (5 minutes), and those
native writes, landing mid-event, split mirwatch's own JSON lines.

So they are kept for the life of the process, like the models: one
instance per distinct configuration (in practice one per sample rate),
each behind a lock because Essentia algorithms are not thread-safe.
"""

from __future__ import annotations

import threading
from typing import Any

_lock = threading.Lock()
_kept: dict[tuple[str, tuple[tuple[str, Any], ...]], tuple[threading.Lock, Any]] = {}


def compute(name: str, params: dict[str, Any], *inputs: Any) -> Any:
    """Run Essentia's standard ``name`` configured with ``params`` on ``inputs``."""
    key = (name, tuple(sorted(params.items())))
    with _lock:
        held = _kept.get(key)
        if held is None:
            import essentia.standard as es

            held = _kept[key] = (threading.Lock(), getattr(es, name)(**params))
    algo_lock, algorithm = held
    with algo_lock:
        return algorithm(*inputs)

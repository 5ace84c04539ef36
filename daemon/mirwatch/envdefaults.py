"""GPU/threading environment defaults, applied before torch or TensorFlow load.

These variables are read once, when the libraries initialise, so setting them
later does nothing. The process environment always wins: a user who exports
``OMP_NUM_THREADS`` or sets it in the unit file keeps their value.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, MutableMapping

BUILTIN_DEFAULTS: dict[str, str] = {
    # Fewer fragmentation OOMs when prompt batches of varying length come and go.
    "PYTORCH_ALLOC_CONF": "expandable_segments:True",
    # Tuning GEMMs costs minutes on first use; opt in per machine via [env].
    "PYTORCH_TUNABLEOP_ENABLED": "0",
    # ROCm builds of flash-attention only take the Triton path when this is set.
    "FLASH_ATTENTION_TRITON_AMD_ENABLE": "TRUE",
    # Essentia's bundled TensorFlow must not reserve the GPU memory Flamingo needs.
    "TF_FORCE_GPU_ALLOW_GROWTH": "true",
    "TF_CPP_MIN_LOG_LEVEL": "2",
    # essentia-tensorflow's TF 2.5 dies of SIGFPE with oneDNN kernels enabled.
    "TF_ENABLE_ONEDNN_OPTS": "0",
    "TOKENIZERS_PARALLELISM": "false",
    # Models are loaded from the model dir only; never reach for a hub at run time.
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}

HEAVY_MODULES = ("torch", "tensorflow", "essentia")


def apply(
    configured: Mapping[str, str], environ: MutableMapping[str, str] | None = None
) -> dict[str, str]:
    """Set every default the environment lacks; return what was set.

    Raises RuntimeError if torch or essentia were imported already, because
    then the defaults would silently not take effect.
    """
    environ = os.environ if environ is None else environ
    loaded = [m for m in HEAVY_MODULES if m in sys.modules]
    if loaded and environ is os.environ:
        raise RuntimeError(f"environment defaults applied after {', '.join(loaded)} was imported")
    wanted = {**BUILTIN_DEFAULTS, **configured}
    applied = {}
    for name, value in wanted.items():
        if name not in environ:
            environ[name] = value
            applied[name] = value
    return applied

"""Configuration: one TOML file, validated strictly into frozen dataclasses.

Every section is a dataclass below; the loader walks their type hints, so a
new option is one field with a default. Unknown keys and wrong types are
errors that name the key (``essentia.treshold``) rather than being ignored,
because a typo in a daemon's config otherwise shows up weeks later as
"why is nothing happening".
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ENV_VAR = "MIRWATCH_CONFIG"
DEFAULT_PATHS = (Path("/etc/mirwatch/config.toml"),)


class ConfigError(Exception):
    """A config problem, phrased as one line for the user."""


@dataclass(frozen=True)
class LibraryConfig:
    # A list of folders (each named after its last component), or a table
    # name -> folder. A shared queue stores tracks by root *name*, so hosts
    # that mount the library at different paths use the same names.
    # Normalised to a list of paths; the names are in `root_names`.
    roots: list[Path] | dict[str, Path] = field(default_factory=list)
    root_names: tuple[str, ...] = field(default=(), metadata={"derived": True})
    # Whether this host watches and scans the roots; with a shared queue a
    # host may only work through what others queue.
    watch: bool = True
    # inotify does not see changes made by other hosts on NFS/SMB mounts.
    polling: bool = False
    poll_interval: float = 10.0
    # A file is queued once its size and mtime have not changed for this long.
    settle_seconds: float = 5.0
    # How often to scan the whole library for missed or stale tracks (0 = only at start).
    rescan_interval: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.roots, dict):
            names, paths = tuple(self.roots), list(self.roots.values())
        else:
            names, paths = tuple(p.name for p in self.roots), list(self.roots)
        for name in names:
            if not name or not all(c.isalnum() or c in "-_." for c in name):
                raise ConfigError(f"library.roots: root name {name!r} must be letters, digits, '-', '_' or '.'"
                                  " (name roots with a table: [library.roots] main = \"/mnt/music\")")
        if len(set(names)) != len(names):
            raise ConfigError("library.roots: two roots have the same name "
                              f"({', '.join(sorted(names))}); name them with a table: [library.roots]")
        object.__setattr__(self, "roots", paths)
        object.__setattr__(self, "root_names", names)

    @property
    def root_map(self) -> dict[str, Path]:
        return dict(zip(self.root_names, self.roots))


@dataclass(frozen=True)
class StateConfig:
    dir: Path = Path("/var/lib/mirwatch")


@dataclass(frozen=True)
class QueueConfig:
    # "sqlite": a file in the state dir, for one machine. "postgres": one
    # queue shared by several hosts (needs the `postgres` extra).
    backend: Literal["sqlite", "postgres"] = "sqlite"
    # postgresql://user@host:port/dbname, without a password.
    dsn: str = ""
    # Where the password comes from: a file (first line), or an environment
    # variable's name. Neither: libpq's own PGPASSWORD / ~/.pgpass.
    password_file: Path | None = None
    password_env: str = ""
    # This host's name in the shared queue (default: the machine's hostname).
    # Must differ between hosts: a restarting host takes back its own jobs.
    host_name: str = ""
    # A job whose host has not renewed its lease for this long goes to another host.
    lease_seconds: float = 60.0
    # How long to keep retrying an unreachable server before giving up.
    reconnect_timeout: float = 600.0

    def __post_init__(self) -> None:
        if self.backend == "postgres":
            if not self.dsn:
                raise ConfigError('queue.dsn is required with queue.backend = "postgres"')
            if _dsn_has_password(self.dsn):
                raise ConfigError("queue.dsn must not contain a password: use queue.password_file "
                                  "or queue.password_env")
        if self.lease_seconds < 2:
            raise ConfigError("queue.lease_seconds must be at least 2")
        if self.reconnect_timeout < 0:
            raise ConfigError("queue.reconnect_timeout must not be negative")


def _dsn_has_password(dsn: str) -> bool:
    from urllib.parse import urlsplit

    if dsn.startswith(("postgresql://", "postgres://")):
        try:
            parts = urlsplit(dsn)
        except ValueError:
            return False
        return parts.password is not None or "password=" in parts.query
    return any(word.strip().startswith("password") and "=" in word for word in dsn.split())


@dataclass(frozen=True)
class ModelsConfig:
    dir: Path = Path("/var/lib/mirwatch/models")
    # The manifest of real model files; default: the one shipped in the repo/package.
    manifest: Path | None = None


@dataclass(frozen=True)
class WorkerConfig:
    # A job that failed (or crashed the daemon) this many times stays failed.
    max_attempts: int = 3
    # How many tracks the CPU stage may decode/analyse ahead of the GPU stage.
    prefetch: int = 1
    # A single job running longer than this counts as a hang: watchdog pings stop.
    job_timeout: float = 1800.0
    # On SIGTERM, how long to let the current job finish before requeueing it.
    stop_grace: float = 20.0
    # Longest audio analysed, in seconds; longer tracks are cut (memory stays bounded).
    max_duration: float = 1200.0


@dataclass(frozen=True)
class EssentiaConfig:
    enabled: bool = True
    threshold: float = 0.1
    top_k: int = 10
    genre: bool = True
    mood: bool = True
    instrument: bool = True
    danceability: bool = True
    atonality: bool = True
    # "effnet": heads on the shared Discogs-EffNet embeddings (fast);
    # "vggish": the legacy AudioSet-VGGish classifiers (about 10x slower).
    danceability_atonality: Literal["effnet", "vggish"] = "effnet"


@dataclass(frozen=True)
class FlamingoPrompt:
    text: str
    max_new_tokens: int = 200


def _default_flamingo_prompts() -> dict[str, FlamingoPrompt]:
    # Same wording as docs/flamingo-prompts.toml; a [flamingo.prompts] table in
    # config.toml replaces this whole set (so a prompt can also be dropped).
    return {
        "full": FlamingoPrompt(
            "Describe this piece of music completely: its genre and subgenre, the tempo in BPM, "
            "the key and mode, every instrument and voice you can hear, how it is produced and "
            "mixed, and the mood it leaves the listener in. Write it as flowing prose.",
            500,
        ),
        "technical": FlamingoPrompt(
            "Give a compact technical breakdown of this recording as a music critic would: "
            "tempo, key, how the chords move, the textures, the dynamics and the production "
            "techniques. Be precise and brief.",
            200,
        ),
        "genre_mood": FlamingoPrompt(
            "In one or two sentences that could serve as a prompt for a text-to-music model, "
            "name the genre and subgenre of this music and describe its emotional character.",
            150,
        ),
        "instrumentation": FlamingoPrompt(
            "Which instruments and timbres do you hear in this music? Answer with a short "
            "comma-separated list and nothing else.",
            100,
        ),
        "structure": FlamingoPrompt(
            "Walk through the form of this piece section by section: where each part begins, "
            "how the transitions are made, and how the energy builds and releases over time.",
            300,
        ),
    }


@dataclass(frozen=True)
class FlamingoConfig:
    enabled: Literal["auto", "on", "off"] = "auto"
    model_id: str = "nvidia/music-flamingo-2601-hf"
    revision: str = "main"
    # "auto": the first CUDA/ROCm GPU if there is one, else the CPU.
    device: str = "auto"
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    # "sdpa", "flash_attention_2", "eager", or "auto" (flash-attention when installed on a GPU).
    attn_implementation: str = "sdpa"
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    seed: int = 0
    # Upper bound on the decoder's key/value cache, in MiB (0 = none). Going
    # over it is handled like running out of GPU memory: the batch is retried
    # one prompt at a time. Keeps Flamingo inside its share of a shared GPU.
    kv_cache_limit_mb: float = 0.0
    # "gguf": the quantised llama.cpp builds of nvidia/music-flamingo-hf, run by a
    # resident llama-server child (same keys, prompts, limits and normalisation).
    backend: Literal["transformers", "gguf"] = "transformers"
    # Which published quantisation: file flamingo-gguf/music-flamingo-hf.<quant>.gguf
    # (imatrix builds such as Q6_K and IQ3_M as .i1-<quant>.gguf); `gguf_model`
    # names another file in the model dir instead.
    gguf_quant: str = "Q8_0"
    gguf_model: str = ""
    gguf_mmproj: str = "flamingo-gguf/music-flamingo-hf.mmproj-f16.gguf"
    # The llama-server binary; empty: $MIRWATCH_LLAMA_SERVER, PATH, then
    # ~/.cache/mirwatch-llama/*/bin (where scripts/build_llama_cpp.sh puts it).
    llama_server: str = ""
    # Parallel slots (prompts decoded together) and the audio each slot must hold.
    gguf_parallel: int = 5
    gguf_max_audio_seconds: float = 600.0
    # Layers offloaded to the GPU (-1: llama.cpp decides what fits; ignored by a CPU build).
    gguf_gpu_layers: int = -1
    prompts: dict[str, FlamingoPrompt] = field(default_factory=_default_flamingo_prompts)

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ConfigError("flamingo.prompts is empty: give at least one prompt or set flamingo.enabled = \"off\"")
        for name, prompt in self.prompts.items():
            if not name.replace("_", "").isalnum() or not name.isascii() or name != name.lower():
                raise ConfigError(f"flamingo.prompts.{name}: prompt names must be lowercase letters, digits and _")
            if not prompt.text.strip():
                raise ConfigError(f"flamingo.prompts.{name}.text is empty")
            if prompt.max_new_tokens < 1:
                raise ConfigError(f"flamingo.prompts.{name}.max_new_tokens must be at least 1")
        if self.attn_implementation not in ("auto", "sdpa", "flash_attention_2", "eager"):
            raise ConfigError(
                "flamingo.attn_implementation must be one of 'auto', 'sdpa', 'flash_attention_2', 'eager'"
            )
        if self.do_sample and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise ConfigError("flamingo: sampling needs temperature > 0 and 0 < top_p <= 1")
        if self.repetition_penalty <= 0 or self.kv_cache_limit_mb < 0:
            raise ConfigError("flamingo: repetition_penalty must be > 0 and kv_cache_limit_mb >= 0")
        if self.gguf_parallel < 1 or self.gguf_max_audio_seconds <= 0:
            raise ConfigError("flamingo: gguf_parallel must be >= 1 and gguf_max_audio_seconds > 0")
        if not self.gguf_quant or "/" in self.gguf_quant:
            raise ConfigError("flamingo.gguf_quant must be a quantisation name such as 'Q8_0'")


@dataclass(frozen=True)
class FeaturesConfig:
    enabled: bool = True
    rhythm: bool = True
    loudness: bool = True
    spectral: bool = True
    bands: bool = True
    chroma: bool = True
    stems: bool = True
    aesthetics: Literal["auto", "on", "off"] = "auto"


@dataclass(frozen=True)
class LoggingConfig:
    format: Literal["json", "console"] = "json"
    level: Literal["debug", "info", "warning", "error"] = "info"
    # Seconds between `progress` events (pace, backlog ETA) while there is work; 0: none.
    progress_interval: float = 60.0


@dataclass(frozen=True)
class Config:
    library: LibraryConfig = field(default_factory=LibraryConfig)
    state: StateConfig = field(default_factory=StateConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    essentia: EssentiaConfig = field(default_factory=EssentiaConfig)
    flamingo: FlamingoConfig = field(default_factory=FlamingoConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # Environment defaults (PYTORCH_ALLOC_CONF, OMP_NUM_THREADS, ...) applied
    # before torch/TensorFlow are imported; the real environment always wins.
    env: dict[str, str] = field(default_factory=dict)
    path: Path | None = None

    @property
    def queue_path(self) -> Path:
        return self.state.dir / "queue.sqlite3"


def locate(explicit: str | os.PathLike[str] | None) -> Path:
    """The config file to use: ``--config``, then ``$MIRWATCH_CONFIG``, then /etc."""
    if explicit:
        return Path(explicit)
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    for candidate in (Path("config.toml"), *DEFAULT_PATHS):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"no config file: pass --config or set {ENV_VAR}")


def load(path: str | os.PathLike[str] | None = None, *, check_roots: bool = True) -> Config:
    """Read and validate a config file. Raises `ConfigError` with one line."""
    path = locate(path)
    raw = read_toml(path, ConfigError, "config file")
    return from_dict(raw, base=path.resolve().parent, source=path, check_roots=check_roots)


def read_toml(path: Path, error: type[Exception], what: str) -> dict[str, Any]:
    """A TOML file as a dict; every way of failing is one line, as `error`."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: no such {what}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path}: not valid TOML: {exc}") from None


def from_dict(
    raw: dict[str, Any], *, base: Path, source: Path | None = None, check_roots: bool = True
) -> Config:
    where = str(source) if source else "config"
    try:
        cfg = _build(Config, {k: v for k, v in raw.items()}, "", base)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    cfg = dataclasses.replace(cfg, path=source.resolve() if source else None)
    if check_roots:
        if not cfg.library.roots:
            raise ConfigError(f"{where}: library.roots is empty: name at least one folder to watch")
        for root in cfg.library.roots:
            if not root.is_dir():
                raise ConfigError(f"{where}: library.roots: {str(root)!r} is not a directory")
    if cfg.essentia.top_k < 1:
        raise ConfigError(f"{where}: essentia.top_k must be at least 1")
    if not 0.0 <= cfg.essentia.threshold <= 1.0:
        raise ConfigError(f"{where}: essentia.threshold must be between 0 and 1")
    if cfg.worker.max_attempts < 1:
        raise ConfigError(f"{where}: worker.max_attempts must be at least 1")
    if cfg.worker.prefetch < 0:
        raise ConfigError(f"{where}: worker.prefetch must not be negative")
    durations = {
        "library.poll_interval": (cfg.library.poll_interval, False),
        "library.settle_seconds": (cfg.library.settle_seconds, True),
        "library.rescan_interval": (cfg.library.rescan_interval, True),
        "worker.job_timeout": (cfg.worker.job_timeout, False),
        "worker.stop_grace": (cfg.worker.stop_grace, True),
        "worker.max_duration": (cfg.worker.max_duration, False),
        "logging.progress_interval": (cfg.logging.progress_interval, True),
    }
    for key, (value, zero_ok) in durations.items():
        if value < 0 or (value == 0 and not zero_ok):
            raise ConfigError(f"{where}: {key} must be {'zero or more' if zero_ok else 'more than zero'} seconds")
    return cfg


def _build(cls: type, raw: Any, prefix: str, base: Path) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'top level'} must be a table")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name != "path" and not f.metadata.get("derived")}
    for key in raw:
        if key not in names:
            raise ConfigError(f"unknown key {prefix + key!r}")
    kwargs = {key: _convert(hints[key], value, prefix + key, base) for key, value in raw.items()}
    return cls(**kwargs)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            Path: "a path (string)"}.get(tp, getattr(tp, "__name__", str(tp)))


def _convert(tp: Any, value: Any, key: str, base: Path) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _convert(option, value, key, base)
            except ConfigError as exc:
                errors.append((option, exc))
        # Report against the option of the value's own kind (a table's bad
        # entry, not "must be a list"), else against the first option.
        for option, exc in errors:
            if typing.get_origin(option) is type(value):
                raise exc
        if len(options) > 1 and all(typing.get_origin(o) in (list, dict) for o in options):
            raise ConfigError(f"{key} must be a list or a table, got {value!r}")
        raise errors[0][1]
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_convert(item, v, f"{key}[{i}]", base) for i, v in enumerate(value)]
    if origin is dict:
        _, item = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a table, got {value!r}")
        return {str(k): _convert(item, v, f"{key}.{k}", base) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".", base)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key} must be a path (string), got {value!r}")
        p = Path(os.path.expanduser(value))
        return p if p.is_absolute() else (base / p).resolve()
    raise ConfigError(f"{key}: unsupported option type {tp!r}")  # pragma: no cover

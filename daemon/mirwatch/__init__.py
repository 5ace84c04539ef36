"""mirwatch: watch music libraries, describe every track, write ``.INFO`` sidecars."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mirwatch")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

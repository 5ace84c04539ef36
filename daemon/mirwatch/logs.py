"""Structured logs: one event per line, meant to be tailed.

JSON lines by default (what ``journalctl -fu mirwatch -o cat | jq`` wants), a
coloured console renderer for a terminal. Under systemd (``JOURNAL_STREAM``
set and systemd-python importable) every event also goes to journald with
its fields as ``MIRWATCH_*`` journal fields, so ``journalctl
MIRWATCH_EVENT=job_failed`` works.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}


def _journal_sender():
    """journald's ``send`` when we are running under systemd, else None."""
    if not os.environ.get("JOURNAL_STREAM") or os.environ.get("MIRWATCH_NO_JOURNAL"):
        return None
    try:
        from systemd import journal  # type: ignore[import-not-found]
    except ImportError:
        return None
    return journal.send


class _JournalFields:
    """Send the event to journald with structured fields; stdout gets nothing."""

    def __init__(self, send: Any, render: Any) -> None:
        self._send = send
        self._render = render

    def __call__(self, logger: Any, method: str, event_dict: dict[str, Any]) -> Any:
        fields = {
            f"MIRWATCH_{key.upper()}": value if isinstance(value, str) else json.dumps(value, default=str)
            for key, value in event_dict.items()
            if key not in ("timestamp",) and key.replace("_", "").isalnum()
        }
        message = self._render(logger, method, dict(event_dict))
        self._send(message, PRIORITY=_PRIORITY.get(event_dict.get("level", "info"), 6),
                   SYSLOG_IDENTIFIER="mirwatch", **fields)
        raise structlog.DropEvent


class _StdStream:
    """Whatever ``sys.stdout``/``sys.stderr`` is when a line is written.

    structlog keeps the file object it was given; holding the real one would
    break after anything (a test harness, a daemonising wrapper) swaps it.
    """

    def __init__(self, name: str) -> None:
        self._name = name

    def write(self, text: str) -> int:
        return getattr(sys, self._name).write(text)

    def flush(self) -> None:
        getattr(sys, self._name).flush()


def configure(fmt: str = "json", level: str = "info", stream: TextIO | None = None) -> None:
    stream = stream or sys.stdout
    colors = stream.isatty()
    if stream is sys.stdout or stream is sys.stderr:
        stream = _StdStream("stdout" if stream is sys.stdout else "stderr")  # type: ignore[assignment]
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    if fmt == "console":
        render: Any = structlog.dev.ConsoleRenderer(colors=colors)
    else:
        render = structlog.processors.JSONRenderer(default=str, ensure_ascii=False)
    send = _journal_sender()
    if send is not None:
        processors.append(_JournalFields(send, render))
    processors.append(render)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        # One write() per event, newline included. print() (PrintLogger) writes the
        # text and the newline separately; with PYTHONUNBUFFERED, or any write-through
        # stream, a native library's line (Essentia, TensorFlow write straight to
        # fd 2) can land between the two and spoil both lines.
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


def get_logger(**bound: Any) -> Any:
    return structlog.get_logger("mirwatch").bind(**bound)

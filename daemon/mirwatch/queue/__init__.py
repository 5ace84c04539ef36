"""The durable job queue, behind one interface (`JobQueue`).

``[queue] backend = "sqlite"`` (the default) keeps the queue in a file in
the state dir, for one machine; ``"postgres"`` shares one queue between
several hosts through a PostgreSQL database (`postgres.PostgresQueue`,
needs the ``postgres`` extra: psycopg).
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import STATES, Job, JobQueue, QueueSchemaError, QueueUnavailable, Roots
from .sqlite import SCHEMA_VERSION, SQLiteQueue

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["STATES", "SCHEMA_VERSION", "Job", "JobQueue", "QueueSchemaError", "QueueUnavailable", "Roots",
           "SQLiteQueue", "open_queue", "queue_password"]


def open_queue(cfg: Config, log: Any) -> JobQueue:
    """The queue the config names. A corrupt SQLite file is moved aside and rebuilt by the scan."""
    q = cfg.queue
    host = q.host_name or None
    if q.backend == "postgres":
        try:
            from .postgres import PostgresQueue
        except ImportError as exc:  # psycopg missing
            raise QueueUnavailable(
                f"queue.backend = \"postgres\" needs psycopg: pip install 'mirwatch[postgres]' ({exc})") from None
        return PostgresQueue(q.dsn, roots=cfg.library.root_map, max_attempts=cfg.worker.max_attempts,
                             host=host, password=queue_password(cfg), lease_seconds=q.lease_seconds,
                             reconnect_timeout=q.reconnect_timeout, log=log)
    path = cfg.queue_path
    try:
        return SQLiteQueue(path, max_attempts=cfg.worker.max_attempts, host=host)
    except sqlite3.DatabaseError as exc:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for suffix in ("", "-wal", "-shm"):
            side = Path(str(path) + suffix)
            if side.exists():
                os.replace(side, Path(f"{path}{suffix}.corrupt-{stamp}"))
        log.error("queue_corrupt", path=str(path), error=str(exc),
                  detail="moved aside; rebuilding the queue from a library scan")
        return SQLiteQueue(path, max_attempts=cfg.worker.max_attempts, host=host)


def queue_password(cfg: Config) -> str | None:
    """The server password from ``password_file`` or ``password_env``; None lets
    libpq look in its own places (PGPASSWORD, ~/.pgpass)."""
    q = cfg.queue
    if q.password_file is not None:
        try:
            return q.password_file.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise QueueUnavailable(f"queue.password_file: cannot read {str(q.password_file)!r}: "
                                   f"{exc.strerror}") from None
    if q.password_env:
        value = os.environ.get(q.password_env)
        if value is None:
            raise QueueUnavailable(f"queue.password_env: ${q.password_env} is not set")
        return value
    return None

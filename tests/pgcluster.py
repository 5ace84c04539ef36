"""A throwaway PostgreSQL cluster for the shared-queue tests.

initdb in a temp dir, listening on 127.0.0.1 at a free port with its unix
socket in that dir, password authentication over TCP (so the daemon's
password-file path is exercised). initdb refuses to run as root, so under
root the cluster belongs to ``nobody``. One cluster per test session
(`shared()`); each test takes its own database.
"""

from __future__ import annotations

import atexit
import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

USER = "mirwatch"


def _bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgCluster:
    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        # Not under pytest's tmp dirs: those are 0700 to root, and the server runs as nobody.
        self.dir = Path(tempfile.mkdtemp(prefix="mirwatch-pg-"))
        self.data = self.dir / "data"
        self.password = secrets.token_hex(12)
        self.password_file = self.dir / "password"
        self.password_file.write_text(self.password + "\n")
        self.port = _free_port()
        self.logfile = self.dir / "server.log"
        self._seq = 0
        if os.geteuid() == 0:
            shutil.chown(self.dir, "nobody", "nogroup")
            shutil.chown(self.password_file, "nobody", "nogroup")
        self._pg("initdb", "-D", str(self.data), "-U", USER, "--pwfile", str(self.password_file),
                 "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8", "--no-sync")
        self.start()

    def _pg(self, tool: str, *args: str, timeout: float = 120) -> None:
        cmd = [str(self.bindir / tool), *args]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "nobody", "--", *cmd]
        proc = subprocess.run(cmd, cwd=self.dir, capture_output=True, text=True, timeout=timeout)
        if proc.returncode:
            raise RuntimeError(f"{tool} failed ({proc.returncode}): {proc.stdout}{proc.stderr}\n{self.server_log()}")

    def _options(self) -> str:
        # fsync off: a throwaway cluster on a shared test machine; every shutdown here is clean.
        return (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} -c fsync=off "
                "-c full_page_writes=off -c max_connections=200 -c shared_buffers=32MB")

    def start(self) -> None:
        self._pg("pg_ctl", "-D", str(self.data), "-o", self._options(), "-l", str(self.logfile), "-w",
                 "-t", "120", "start")

    def stop(self, mode: str = "fast") -> None:
        self._pg("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "120", "stop")

    def restart(self) -> None:
        self.stop("fast")
        self.start()

    def dsn(self, db: str) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{db}"

    def new_database(self, prefix: str = "t") -> str:
        import psycopg

        self._seq += 1
        name = f"{prefix}_{os.getpid()}_{self._seq}"
        with psycopg.connect(self.dsn("postgres"), password=self.password, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def server_log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def destroy(self) -> None:
        try:
            self._pg("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", timeout=60)
        except (RuntimeError, subprocess.TimeoutExpired):
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


_cluster: PgCluster | None = None


def shared() -> PgCluster:
    """The session's cluster, started on first use; skips (fails under CI) without PostgreSQL."""
    global _cluster
    if _cluster is None:
        try:
            import psycopg  # noqa: F401
        except ImportError:
            _absent("psycopg is not installed (pip install 'mirwatch[postgres]')")
        bindir = _bindir()
        if bindir is None:
            _absent("PostgreSQL server binaries not found (apt-get install postgresql)")
        _cluster = PgCluster(bindir)
        atexit.register(_cluster.destroy)
    return _cluster


def _absent(why: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the shared-queue tests: {why}")
    pytest.skip(why)

"""A resident ``llama-server`` child: started with the model, spoken to over a unix socket.

Why a child process and not llama.cpp in-process: the server already has what
five prompts over one audio clip need (parallel slots that decode as one
batch, each keeping its last prompt so a re-run skips the audio), a crash in native code takes down only the child (the daemon
restarts it and the job is retried), and the daemon keeps its own Python
process free of a second native runtime next to torch and TensorFlow.

The socket lives in a private 0700 directory, so nothing else on the machine
can reach the model; no TCP port is opened.
"""

from __future__ import annotations

import collections
import ctypes
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

ENV_VAR = "MIRWATCH_LLAMA_SERVER"
CACHE_ROOT = Path.home() / ".cache" / "mirwatch-llama"
_PR_SET_PDEATHSIG = 1


class LlamaServerError(Exception):
    """The server could not start, died, or answered with an error; one line."""


class ServerGone(LlamaServerError):
    """The connection broke or the process exited while a request was running."""


def find_llama_server(explicit: str | os.PathLike[str] | None = None) -> str | None:
    """The llama-server binary: config, then $MIRWATCH_LLAMA_SERVER, PATH, the build cache."""
    for candidate in (explicit, os.environ.get(ENV_VAR)):
        if candidate:
            path = Path(candidate).expanduser()
            return str(path) if path.is_file() and os.access(path, os.X_OK) else None
    found = shutil.which("llama-server")
    if found:
        return found
    built = sorted(CACHE_ROOT.glob("*/bin/llama-server"), key=lambda p: p.stat().st_mtime, reverse=True)
    return str(built[0]) if built else None


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    # If the daemon is killed -9 the server must not keep the GPU memory.
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except Exception:  # noqa: BLE001 - not Linux: the daemon's stop() still ends it
        pass
    os.setpgrp()


class LlamaServer:
    """One llama-server process and the model it holds."""

    def __init__(
        self,
        binary: str,
        model: Path,
        mmproj: Path | None,
        *,
        parallel: int = 5,
        ctx_size: int = 0,
        gpu_layers: int | None = None,
        threads: int | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 600.0,
        log: Callable[..., Any] | None = None,
    ) -> None:
        self.binary = binary
        self.model = Path(model)
        self.mmproj = Path(mmproj) if mmproj else None
        self.parallel = parallel
        self.ctx_size = ctx_size
        self.gpu_layers = gpu_layers
        self.threads = threads
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self.log = log or (lambda event, **fields: None)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._dir: str | None = None
        self._output: collections.deque[str] = collections.deque(maxlen=200)
        self._lock = threading.Lock()
        self._open: set[_UnixHTTPConnection] = set()
        self._open_lock = threading.Lock()

    # ------------------------------------------------------------- lifecycle

    @property
    def socket_path(self) -> str:
        assert self._dir is not None
        return os.path.join(self._dir, "llama.sock")

    def command(self) -> list[str]:
        cmd = [self.binary, "-m", str(self.model), "--host", self.socket_path,
               "-np", str(self.parallel), "-c", str(self.ctx_size),
               # One request at a time per slot, all slots in one batch: the
               # five prompts of a track decode together.
               "--cont-batching", "--no-webui"]
        if self.mmproj is not None:
            cmd += ["--mmproj", str(self.mmproj)]
        if self.gpu_layers is not None:
            cmd += ["-ngl", str(self.gpu_layers)]
        if self.threads:
            cmd += ["-t", str(self.threads)]
        return cmd + self.extra_args

    def start(self) -> None:
        """Start the server and wait until the model is loaded; `LlamaServerError` if it cannot."""
        with self._lock:
            self._start_locked()

    def _start_locked(self) -> None:
        self._kill_locked()
        self._dir = tempfile.mkdtemp(prefix="mirwatch-llama-")
        os.chmod(self._dir, 0o700)
        self._output.clear()
        cmd = self.command()
        started = time.monotonic()
        try:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        except OSError as exc:
            raise LlamaServerError(f"cannot start {self.binary}: {exc.strerror or exc}") from None
        self.starts += 1
        threading.Thread(target=self._drain, args=(self.proc,), name="llama-server-output", daemon=True).start()
        deadline = started + self.startup_timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                raise LlamaServerError(f"llama-server exited ({code}) while loading {self.model.name}: {self.tail()}")
            if self._healthy():
                break
            if time.monotonic() > deadline:
                self._kill_locked()
                raise LlamaServerError(f"llama-server did not become ready in {self.startup_timeout:.0f} s")
            time.sleep(0.1)
        self.log("llama_server_ready", pid=self.proc.pid, seconds=round(time.monotonic() - started, 2),
                 model=self.model.name, mmproj=self.mmproj.name if self.mmproj else None, starts=self.starts)

    def _drain(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            self._output.append(raw.decode("utf-8", "replace").rstrip())

    def tail(self, lines: int = 6) -> str:
        """The last lines the server printed (for error messages)."""
        kept = [line for line in list(self._output) if line.strip()][-lines:]
        return " | ".join(kept) if kept else "(no output)"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ensure_running(self) -> bool:
        """Restart the server if it died; True when it had to."""
        with self._lock:
            if self.alive():
                return False
            code = self.proc.returncode if self.proc is not None else None
            self.log("llama_server_restarting", exit_code=code, output=self.tail())
            self._start_locked()
            return True

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._kill_locked(timeout)

    def _kill_locked(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    # --------------------------------------------------------------- requests

    def _healthy(self) -> bool:
        try:
            status, body = self._request("GET", "/health", None, timeout=2.0)
        except (OSError, http.client.HTTPException):
            return False
        return status == 200 and body.get("status") == "ok"

    def get(self, path: str, timeout: float = 10.0) -> dict[str, Any]:
        return self._checked("GET", path, None, timeout)

    def post(self, path: str, body: dict[str, Any], timeout: float = 3600.0) -> dict[str, Any]:
        return self._checked("POST", path, body, timeout)

    def _checked(self, method: str, path: str, body: Any, timeout: float) -> dict[str, Any]:
        if self._dir is None:
            raise ServerGone("llama-server is not running")
        try:
            status, answer = self._request(method, path, body, timeout=timeout)
        except (OSError, http.client.HTTPException) as exc:
            raise ServerGone(f"llama-server connection failed ({type(exc).__name__}: {exc});"
                             f" server {'running' if self.alive() else 'exited'}") from None
        if status != 200:
            error = answer.get("error", answer)
            message = error.get("message", error) if isinstance(error, dict) else error
            raise LlamaServerError(f"llama-server answered {status} to {path}: {message}")
        return answer

    def _request(self, method: str, path: str, body: Any, *, timeout: float) -> tuple[int, dict[str, Any]]:
        conn = _UnixHTTPConnection(self.socket_path, timeout)
        with self._open_lock:
            self._open.add(conn)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if payload is not None else {}
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        finally:
            with self._open_lock:
                self._open.discard(conn)
            conn.close()
        try:
            answer = json.loads(raw) if raw else {}
        except ValueError:
            answer = {"error": raw[:200].decode("utf-8", "replace")}
        return response.status, answer if isinstance(answer, dict) else {"value": answer}

    def abort_requests(self) -> None:
        """Break every open connection; the server stops generating for a closed client."""
        with self._open_lock:
            conns = list(self._open)
        for conn in conns:
            sock = conn.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

"""sd_notify: tell systemd we are ready, what we are doing, and that we are alive.

Uses systemd-python's ``daemon.notify`` when installed; otherwise speaks the
(tiny) protocol itself: one datagram to ``$NOTIFY_SOCKET``. Outside systemd
both are silent no-ops.
"""

from __future__ import annotations

import os
import socket


def _fallback(state: str) -> bool:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode("utf-8", "replace"))
        return True
    except OSError:
        return False


try:
    from systemd import daemon as _sd_daemon  # type: ignore[import-not-found]

    def notify(state: str) -> bool:
        """Send one notification (e.g. ``"READY=1"``). True if it was sent."""
        return bool(_sd_daemon.notify(state))

except ImportError:  # pragma: no cover - depends on the install
    notify = _fallback


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of ``WatchdogSec``), or None if unset."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(0.1, int(usec) / 1e6 / 2)
    except ValueError:
        return None

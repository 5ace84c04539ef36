"""The unit file: what systemd needs to supervise the daemon, and that systemd accepts it."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "mirwatch.service"


def unit_options() -> dict[str, list[str]]:
    options: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, value = line.split("=", 1)
            options.setdefault(key, []).append(value)
    return options


def test_unit_declares_notify_watchdog_restart_and_sandbox():
    o = unit_options()
    assert o["Type"] == ["notify"]
    assert o["Restart"] == ["on-failure"]
    assert int(o["WatchdogSec"][0]) > 0
    assert o["User"] == ["mirwatch"] and o["StateDirectory"] == ["mirwatch"]
    assert o["ProtectSystem"] == ["strict"] and o["NoNewPrivileges"] == ["true"]
    assert o["PrivateTmp"] == ["true"] and o["ReadWritePaths"]
    assert any("nvidia" in v for v in o["DeviceAllow"]) and any("kfd" in v for v in o["DeviceAllow"])
    assert o["ExecStart"][0].endswith("mirwatch run")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify_passes(tmp_path):
    # verify checks that ExecStart exists, so point it at this environment's script.
    script = Path(sys.executable).with_name("mirwatch")
    assert script.exists()
    text = UNIT.read_text().replace("/opt/mirwatch/.venv/bin/mirwatch", str(script))
    unit = tmp_path / "mirwatch.service"
    unit.write_text(text)
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [l for l in (proc.stdout + proc.stderr).splitlines() if "mirwatch.service" in l]
    assert proc.returncode == 0 and not problems, proc.stdout + proc.stderr

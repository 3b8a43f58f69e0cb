"""deploy/safeguard.service: the hardening the README promises, and a unit systemd
itself accepts (`systemd-analyze verify`, where systemd is installed)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "safeguard.service"
REQUIRED = (
    "DynamicUser=yes",
    "ProtectSystem=strict",
    "ReadWritePaths=/var/lib/safeguard",
    "NoNewPrivileges=yes",
    "PrivateTmp=yes",
    "SystemCallFilter=@system-service",
    "Restart=on-failure",
    "RestartSec=5s",
    "RestartPreventExitStatus=2",
)


def test_the_unit_is_hardened():
    lines = set(UNIT.read_text().splitlines())
    missing = [line for line in REQUIRED if line not in lines]
    assert not missing, f"deploy/safeguard.service lacks {missing}"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd not installed")
def test_systemd_accepts_the_unit(tmp_path):
    # verify checks that ExecStart's program exists: point it at this install's.
    program = Path(sys.executable).with_name("safeguard")
    unit = tmp_path / "safeguard.service"
    unit.write_text(
        UNIT.read_text().replace("/opt/matrix-safeguard/venv/bin/safeguard", str(program))
    )
    verified = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert verified.returncode == 0 and "safeguard.service" not in verified.stderr, verified.stderr

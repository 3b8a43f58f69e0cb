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


DEPLOY = UNIT.parent


def test_compose_ties_synapse_postgres_and_the_service_together():
    import yaml

    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "synapse", "safeguard"}
    env = services["safeguard"]["environment"]
    # Synapse reaches the service, and the service Synapse, by their compose names.
    assert env["SAFEGUARD_HOMESERVER__URL"] == "http://synapse:8008"
    assert env["SAFEGUARD_APPSERVICE__URL"] == "http://safeguard:29333"
    assert env["SAFEGUARD_DATABASE__URL"].startswith("postgresql+asyncpg://safeguard:")
    assert env["SAFEGUARD_DATABASE__URL"].endswith("@postgres/safeguard")
    # Synapse reads the registration the service writes into its volume.
    assert "safeguard:/safeguard:ro" in services["synapse"]["volumes"]
    assert env["SAFEGUARD_APPSERVICE__REGISTRATION"] == "/data/registration.yaml"
    assert (
        "app_service_config_files: [/safeguard/registration.yaml]"
        in (DEPLOY / "compose.yaml").read_text()
    )
    # Every ${VAR} it needs is in the example .env.
    example = (DEPLOY / "compose.env.example").read_text()
    for name in ("SERVER_NAME", "POSTGRES_PASSWORD", "STAFF_ROOM", "STAFF"):
        assert f"\n{name}=" in example


def test_the_containerfile_has_what_the_image_promises():
    text = (DEPLOY / "Containerfile").read_text()
    for line in (
        "ARG BASE=",
        "FROM ${BASE} AS build",
        "USER safeguard",
        "VOLUME /data",
        "EXPOSE 29333",
        'CMD ["start", "-c", "/data/config.yaml"]',
    ):
        assert line in text, line
    assert "--uid 1337" in text and "HEALTHCHECK" in text and "/live" in text

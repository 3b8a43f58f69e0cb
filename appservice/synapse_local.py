"""A local Synapse (pip `matrix-synapse`, SQLite) for the dev stack and the test suite.

One module for both, so the suite tests against exactly what `safeguard dev`
runs. Users are created through the shared-secret admin API, as an operator would.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import secrets
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

import aiohttp
import yaml

_LOTS = {"per_second": 10_000, "burst_count": 100_000}


def _rate_limits(kind: Literal["relaxed", "strict"]) -> dict[str, Any]:
    relaxed: dict[str, Any] = {
        "rc_message": _LOTS,
        "rc_registration": _LOTS,
        "rc_login": {"address": _LOTS, "account": _LOTS, "failed_attempts": _LOTS},
        "rc_joins": {"local": _LOTS, "remote": _LOTS},
        "rc_joins_per_room": _LOTS,
        "rc_invites": {"per_room": _LOTS, "per_user": _LOTS, "per_issuer": _LOTS},
        "rc_admin_redaction": _LOTS,
        "rc_room_creation": _LOTS,
        "rc_profile": _LOTS,
        "rc_3pid_validation": _LOTS,
    }
    if kind == "strict":
        # Low enough that a handful of bot messages meets M_LIMIT_EXCEEDED.
        relaxed["rc_message"] = {"per_second": 0.5, "burst_count": 2}
        relaxed["rc_room_creation"] = {"per_second": 0.5, "burst_count": 2}
    return relaxed


def write_homeserver_config(
    directory: Path,
    *,
    server_name: str,
    port: int,
    registration_files: list[Path],
    shared_secret: str,
    rate_limits: Literal["relaxed", "strict"] = "relaxed",
) -> Path:
    """Write homeserver.yaml (and a signing key) into `directory`; returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "server_name": server_name,
        "pid_file": str(directory / "homeserver.pid"),
        "listeners": [
            {
                "port": port,
                "bind_addresses": ["127.0.0.1"],
                "type": "http",
                "tls": False,
                "x_forwarded": False,
                "resources": [{"names": ["client"], "compress": False}],
            }
        ],
        "database": {"name": "sqlite3", "args": {"database": str(directory / "homeserver.db")}},
        "log_config": str(_write_log_config(directory)),
        "media_store_path": str(directory / "media"),
        "signing_key_path": str(directory / "signing.key"),
        "report_stats": False,
        "trusted_key_servers": [],
        "suppress_key_server_warning": True,
        "federation_domain_whitelist": [],
        "enable_registration": False,
        "registration_shared_secret": shared_secret,
        "macaroon_secret_key": secrets.token_urlsafe(32),
        "form_secret": secrets.token_urlsafe(32),
        "app_service_config_files": [str(path) for path in registration_files],
        "presence": {"enabled": False},
        "url_preview_enabled": False,
        **_rate_limits(rate_limits),
    }
    path = directory / "homeserver.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    if not (directory / "signing.key").exists():
        subprocess.run(
            [sys.executable, "-m", "synapse.app.homeserver", "--generate-keys", "-c", str(path)],
            check=True,
            capture_output=True,
        )
    return path


def _write_log_config(directory: Path) -> Path:
    log_config = {
        "version": 1,
        "formatters": {"precise": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
        "handlers": {
            "file": {
                "class": "logging.FileHandler",
                "formatter": "precise",
                "filename": str(directory / "homeserver.log"),
            }
        },
        "root": {"level": "WARNING", "handlers": ["file"]},
        "disable_existing_loggers": False,
    }
    path = directory / "log.yaml"
    path.write_text(yaml.safe_dump(log_config))
    return path


class LocalSynapse:
    """A Synapse subprocess: start, wait until healthy, stop."""

    def __init__(self, config_path: Path, port: int) -> None:
        self.config_path = config_path
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self._process: asyncio.subprocess.Process | None = None
        self._log = config_path.parent / "synapse.stdout.log"

    async def start(self, within: float = 60.0) -> None:
        log = open(self._log, "ab")  # noqa: SIM115 - handed to the subprocess
        try:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "synapse.app.homeserver",
                "-c",
                str(self.config_path),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.config_path.parent,
            )
        finally:
            log.close()
        deadline = asyncio.get_running_loop().time() + within
        async with aiohttp.ClientSession() as session:
            while True:
                if self._process.returncode is not None:
                    raise RuntimeError(f"Synapse exited early:\n{self.log_tail()}")
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with session.get(f"{self.url}/health") as response:
                        if response.status == 200:
                            return
                if asyncio.get_running_loop().time() > deadline:
                    await self.stop()
                    raise RuntimeError(f"Synapse did not start in {within}s:\n{self.log_tail()}")
                await asyncio.sleep(0.1)

    def log_tail(self, lines: int = 30) -> str:
        text = ""
        for path in (self._log, self.config_path.parent / "homeserver.log"):
            if path.exists():
                text += "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) + "\n"
        return text

    async def kill(self) -> None:
        """SIGKILL: Synapse dies mid-whatever, as in a power cut (tests of what it loses)."""
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            process.kill()
            await process.wait()

    async def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()

    async def __aenter__(self) -> LocalSynapse:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class UserExists(Exception):
    pass


async def register_user(
    hs_url: str, shared_secret: str, localpart: str, password: str, *, admin: bool = False
) -> tuple[str, str]:
    """Create a user with the shared-secret admin API; returns (user_id, access_token)."""
    endpoint = f"{hs_url}/_synapse/admin/v1/register"
    async with aiohttp.ClientSession() as session:
        async with session.get(endpoint) as response:
            nonce = (await response.json())["nonce"]
        # HMAC-SHA1 over nonce, user, password and admin flag, NUL-separated.
        parts = (nonce, localpart, password, "admin" if admin else "notadmin")
        digest = hmac.new(
            shared_secret.encode(), b"\x00".join(p.encode() for p in parts), hashlib.sha1
        ).hexdigest()
        body = {
            "nonce": nonce,
            "username": localpart,
            "password": password,
            "admin": admin,
            "mac": digest,
        }
        async with session.post(endpoint, json=body) as response:
            payload = await response.json()
            if response.status == 400 and payload.get("errcode") == "M_USER_IN_USE":
                raise UserExists(localpart)
            if response.status != 200:
                raise RuntimeError(f"registering {localpart} failed: {payload}")
            return payload["user_id"], payload["access_token"]


async def login(hs_url: str, localpart: str, password: str) -> tuple[str, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{hs_url}/_matrix/client/v3/login",
            json={
                "type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": localpart},
                "password": password,
            },
        ) as response,
    ):
        payload = await response.json()
        if response.status != 200:
            raise RuntimeError(f"login as {localpart} failed: {payload}")
        return payload["user_id"], payload["access_token"]


async def ensure_user(
    hs_url: str, shared_secret: str, localpart: str, password: str, *, admin: bool = False
) -> tuple[str, str]:
    """Register, or log in if the user exists already (the dev stack runs again and again)."""
    try:
        return await register_user(hs_url, shared_secret, localpart, password, admin=admin)
    except UserExists:
        return await login(hs_url, localpart, password)

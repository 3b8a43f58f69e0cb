"""The session's real Synapse: one per test session, with the project's own registration."""

from __future__ import annotations

import secrets
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from appservice.config import load_config
from appservice.registration import write_registration
from appservice.synapse_local import LocalSynapse, register_user, write_homeserver_config
from tests.support.matrix_user import MatrixUser

SERVER_NAME = "localhost"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class SynapseHandle:
    process: LocalSynapse
    server_name: str
    shared_secret: str
    registration_path: Path
    as_port: int
    directory: Path
    users: list[MatrixUser] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.process.url

    async def new_user(self, prefix: str, *, admin: bool = False) -> MatrixUser:
        localpart = f"{prefix}-{uuid.uuid4().hex[:8]}"
        user_id, token = await register_user(
            self.url, self.shared_secret, localpart, secrets.token_urlsafe(12), admin=admin
        )
        user = MatrixUser(self.url, user_id, token)
        self.users.append(user)
        return user

    async def restart(self, *, kill: bool = False, down_for: float = 0.0) -> None:
        """Stop Synapse (SIGTERM, or SIGKILL) and start it again on the same port and data."""
        import asyncio

        if kill:
            await self.process.kill()
        else:
            await self.process.stop()
        await asyncio.sleep(down_for)
        await self.process.start()

    async def close(self) -> None:
        for user in self.users:
            await user.close()
        await self.process.stop()


async def start_synapse(
    directory: Path, *, rate_limits: Literal["relaxed", "strict"] = "relaxed"
) -> SynapseHandle:
    """Generate the project's registration as an operator would, then start Synapse with it."""
    directory.mkdir(parents=True, exist_ok=True)
    as_port, hs_port = free_port(), free_port()
    seed = directory / "seed-config.yaml"
    seed.write_text(
        yaml.safe_dump(
            {
                "homeserver": {"url": f"http://127.0.0.1:{hs_port}", "domain": SERVER_NAME},
                "appservice": {"url": f"http://127.0.0.1:{as_port}"},
            }
        )
    )
    registration = directory / "registration.yaml"
    content = write_registration(load_config(seed), registration)
    if rate_limits == "strict":
        content["rate_limited"] = True
        registration.write_text(yaml.safe_dump(content))
    shared_secret = secrets.token_urlsafe(24)
    config = write_homeserver_config(
        directory / "synapse",
        server_name=SERVER_NAME,
        port=hs_port,
        registration_files=[registration],
        shared_secret=shared_secret,
        rate_limits=rate_limits,
    )
    process = LocalSynapse(config, hs_port)
    await process.start()
    return SynapseHandle(process, SERVER_NAME, shared_secret, registration, as_port, directory)

"""The session's real Synapse: one per test session, with the project's own registration."""

from __future__ import annotations

import asyncio
import secrets
import socket
import sqlite3
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import aiohttp
import yaml

from appservice.config import load_config
from appservice.registration import write_registration
from appservice.synapse_local import LocalSynapse, register_user, write_homeserver_config
from tests.support.matrix_user import MatrixUser

SERVER_NAME = "localhost"


MODERATION_LOCALPART = "moderation"


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
    directory: Path,
    *,
    rate_limits: Literal["relaxed", "strict"] = "relaxed",
    other_registrations: Sequence[Path] = (),
) -> SynapseHandle:
    """Generate the project's registration as an operator would, then start Synapse with it
    (and with `other_registrations`: other appservices beside ours, as a benchmark's)."""
    directory.mkdir(parents=True, exist_ok=True)
    as_port, hs_port = free_port(), free_port()
    seed = directory / "seed-config.yaml"
    seed.write_text(
        yaml.safe_dump(
            {
                "homeserver": {"url": f"http://127.0.0.1:{hs_port}", "domain": SERVER_NAME},
                # The moderation user is in the namespace, for the tests that use it.
                "appservice": {
                    "url": f"http://127.0.0.1:{as_port}",
                    "moderation_localpart": MODERATION_LOCALPART,
                },
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
        registration_files=[registration, *other_registrations],
        shared_secret=shared_secret,
        rate_limits=rate_limits,
    )
    process = LocalSynapse(config, hs_port)
    await process.start()
    return SynapseHandle(process, SERVER_NAME, shared_secret, registration, as_port, directory)


async def appservice_delivering(registration_path: Path, homeserver_url: str) -> None:
    """Return once Synapse delivers to the application service again (or after 15 s).

    Between tests no service listens, so Synapse's pushes fail and it retries from a
    queue of its own, with back-off. A service's start pings it (which retries at
    once); but an event Synapse queues while that retry is finishing is only sent at
    the next failure (a race in Synapse's appservice scheduler, seen here as a bot
    invite held until after its test had ended). So a scene starts acting only once
    Synapse's record of the service says it is no longer down, pinging meanwhile.
    """
    database = registration_path.parent / "synapse" / "homeserver.db"
    if not database.exists():
        return
    registration = yaml.safe_load(registration_path.read_text())
    ping = f"{homeserver_url}/_matrix/client/v1/appservice/{registration['id']}/ping"
    headers = {"Authorization": f"Bearer {registration['as_token']}"}

    def down() -> bool:
        try:
            with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=1) as db:
                row = db.execute(
                    "SELECT state FROM application_services_state WHERE as_id = ?",
                    (registration["id"],),
                ).fetchone()
        except sqlite3.Error:
            return True  # busy: look again
        return row is not None and row[0] == "down"

    deadline = asyncio.get_running_loop().time() + 15
    async with aiohttp.ClientSession(headers=headers) as session:
        while await asyncio.to_thread(down):
            if asyncio.get_running_loop().time() > deadline:
                return
            async with session.post(ping, json={}) as response:
                await response.read()
            await asyncio.sleep(0.2)

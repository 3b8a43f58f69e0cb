"""`safeguard dev` as a newcomer uses it: start, flag from the demo moderator, see the removal."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

import pytest

from appservice.synapse_local import login
from tests.support.matrix_user import MatrixUser
from tests.support.scene import until
from tests.support.synapse import free_port

pytestmark = pytest.mark.synapse


async def _read_until(stream: asyncio.StreamReader, marker: str, limit: float) -> str:
    seen = ""
    async with asyncio.timeout(limit):
        while marker not in seen:
            line = await stream.readline()
            if not line:
                raise AssertionError(f"safeguard dev exited early:\n{seen}")
            seen += line.decode()
    return seen


async def test_dev_stack_end_to_end_and_rerun(tmp_path):
    base = tmp_path / "dev"
    hs_port, as_port = free_port(), free_port()
    command = [
        sys.executable,
        "-m",
        "appservice.cli",
        "dev",
        "--dir",
        str(base),
        "--synapse-port",
        str(hs_port),
        "--service-port",
        str(as_port),
    ]

    async def start() -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            *command,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    process = await start()
    try:
        banner = await _read_until(process.stdout, "Stop: Ctrl-C", 90)
        assert "@moderator:localhost" in banner and "password:" in banner
        credentials = json.loads((base / "credentials.json").read_text())
        rooms = json.loads((base / "state.json").read_text())
        url = f"http://127.0.0.1:{hs_port}"
        users = {}
        for name in ("moderator", "member", "staff"):
            user_id, token = await login(url, name, credentials["passwords"][name])
            users[name] = MatrixUser(url, user_id, token)
        group = rooms["group_room"]
        hello = next(
            e
            for e in await users["moderator"].messages(group)
            if e.get("sender") == users["member"].user_id and e["type"] == "m.room.message"
        )
        await users["moderator"].react(group, hello["event_id"], "🚨")

        async def removed() -> bool:
            return (await users["moderator"].members(group)).get(users["member"].user_id) == "leave"

        await until(removed, within=30, what="the demo member's removal")
        for user in users.values():
            await user.close()
    finally:
        process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(process.wait(), 30) == 0

    # A second run reuses .dev/ (same rooms, same passwords) and starts cleanly.
    process = await start()
    try:
        await _read_until(process.stdout, "Stop: Ctrl-C", 90)
        assert json.loads((base / "state.json").read_text()) == rooms
    finally:
        process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(process.wait(), 30) == 0

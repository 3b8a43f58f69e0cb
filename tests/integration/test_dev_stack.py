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


class Output:
    """All a process writes, read as it comes (a pipe nobody reads fills up, and a
    process writing to it then waits for ever)."""

    def __init__(self, stream: asyncio.StreamReader) -> None:
        self.text = ""
        self._task = asyncio.ensure_future(self._drain(stream))

    async def _drain(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self.text += line.decode(errors="replace")

    async def until(self, marker: str, limit: float) -> str:
        async with asyncio.timeout(limit):
            while marker not in self.text:
                if self._task.done():
                    raise AssertionError(f"safeguard dev exited early:\n{self.text}")
                await asyncio.sleep(0.05)
        return self.text


async def _stopped(process: asyncio.subprocess.Process, output: Output) -> None:
    """Ctrl-C, and the process gone within 30 s with exit code 0; else its stacks
    (SIGUSR1: appservice/cli.py) and what it wrote, in the failure."""
    process.send_signal(signal.SIGINT)
    try:
        code = await asyncio.wait_for(process.wait(), 30)
    except TimeoutError:
        process.send_signal(signal.SIGUSR1)
        await asyncio.sleep(2)
        process.kill()
        await process.wait()
        raise AssertionError(f"safeguard dev did not stop:\n{output.text[-20000:]}") from None
    assert code == 0, output.text[-5000:]


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
    output = Output(process.stdout)
    try:
        banner = await output.until("Stop: Ctrl-C", 90)
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
        await _stopped(process, output)

    # A second run reuses .dev/ (same rooms, same passwords) and starts cleanly.
    process = await start()
    output = Output(process.stdout)
    try:
        await output.until("Stop: Ctrl-C", 90)
        assert json.loads((base / "state.json").read_text()) == rooms
    finally:
        await _stopped(process, output)

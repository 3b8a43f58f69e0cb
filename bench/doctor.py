"""`safeguard doctor` on a real Synapse with the staff room and N group rooms the bot
moderates (target: under 5 s at 20 rooms), against its floor: the same Client-Server
calls the doctor's room and homeserver checks make, raw aiohttp, all at once, no project
code (versions, whoami, the appservice ping answered by a bare listener, the keys query,
and each room's /state).

The doctor is timed as an operator meets it: the whole command, a new process
(interpreter start and imports included), and in this process (`diagnose`), the service
stopped, so the doctor answers Synapse's ping itself.
Usage: python bench/doctor.py [--rooms 20] [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import aiohttp
import yaml
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from appservice.doctor import diagnose
from tests.support.scene import (
    BOT,
    build_scene,
    running_service,
    safeguard_cli,
    scene_config,
    until,
)
from tests.support.synapse import start_synapse


async def floor(synapse, config_path: Path, rooms: list[str]) -> float:
    """The doctor's Client-Server calls as fast as raw HTTP makes them."""
    registration = yaml.safe_load(Path(synapse.registration_path).read_text())
    headers = {"Authorization": f"Bearer {registration['as_token']}"}
    as_bot = {"user_id": BOT}
    url = synapse.url

    async def pong(request: web.Request) -> web.Response:
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/_matrix/app/v1/ping", pong)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", synapse.as_port).start()
    began = time.perf_counter()
    async with aiohttp.ClientSession(headers=headers) as session:

        async def get(path: str, params: dict | None = None, body: dict | None = None) -> int:
            method = "POST" if body is not None else "GET"
            async with session.request(method, url + path, params=params, json=body) as r:
                await r.read()
                return r.status

        await get("/_matrix/client/versions")
        await get("/_matrix/client/v3/account/whoami", as_bot)
        await asyncio.gather(
            get(
                f"/_matrix/client/v1/appservice/{registration['id']}/ping",
                body={"transaction_id": "bench"},
            ),
            get("/_matrix/client/v3/keys/query", as_bot, {"device_keys": {BOT: []}}),
            *(get(f"/_matrix/client/v3/rooms/{quote(r, safe='')}/state", as_bot) for r in rooms),
        )
    took = time.perf_counter() - began
    await runner.cleanup()
    return took


async def main(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="safeguard-doctor-"))
    synapse = await start_synapse(work / "synapse")
    try:
        scene = await build_scene(synapse, work)
        config = scene_config(scene)
        rooms = []
        async with running_service(config):
            for n in range(args.rooms):
                room = await scene.staff.create_room(
                    name=f"Group {n}", invite=[BOT], power_levels={"users": {BOT: 50}}
                )
                rooms.append(room)
            for room in rooms:

                async def joined(room: str = room) -> bool:
                    return (await scene.staff.members(room)).get(BOT) == "join"

                await until(joined, within=60, what="the bot to join")
            await asyncio.sleep(2)  # the joins recorded
        in_process, command, floors = [], [], []
        for _ in range(args.runs):
            began = time.perf_counter()
            report = await diagnose(str(config))
            in_process.append(time.perf_counter() - began)
            assert not report.failed, report.text()
            began = time.perf_counter()
            code, out, _ = await safeguard_cli("doctor", "-c", str(config))
            command.append(time.perf_counter() - began)
            assert code == 0, out
            floors.append(await floor(synapse, config, [scene.staff_room, *rooms]))
        checks = len(report.findings)
        p50 = statistics.median
        print(f"doctor, {args.rooms} group rooms + the staff room ({checks} checks):")
        print(f"  safeguard doctor (new process): p50 {p50(command):.2f} s   (target < 5 s)")
        print(f"  diagnose() in process:          p50 {p50(in_process):.3f} s")
        print(f"  floor (the same calls, raw):     p50 {p50(floors):.3f} s")
        print(f"  in process / floor:              {p50(in_process) / p50(floors):.1f}×")
    finally:
        await synapse.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rooms", type=int, default=20)
    parser.add_argument("--runs", type=int, default=5)
    asyncio.run(main(parser.parse_args()))

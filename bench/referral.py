"""Referral latency against a real Synapse: from the moderator's 🚨 to the DM and to the kick.

Measured with Synapse's own clock (origin_server_ts of the reaction, the notice
and the kick), over N cases, for:
  - ours:  the running service, Synapse pushing the reaction to it;
  - floor: the same Client-Server calls our referral makes (read the flagged
    event, the room's create and power levels, the staff room's, m.direct,
    create the DM, send the notice, read the membership, kick), made directly
    with aiohttp as the bot, no project code — started the moment the reaction
    is accepted, so it has no push delay at all. It runs while the service is
    up (the service ignores its 👀 key), in alternating halves with ours, so
    both meet the same Synapse, busy pushing transactions to an appservice.
Timestamps come from Synapse's clock, so the bench polls gently: polling is
load on Synapse, not timing.
Then: one flag sent while 10,000 ordinary events are posted straight to the
transaction endpoint (flags must not queue behind chat traffic).
Usage: python bench/referral.py [--cases 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.scene import (
    BOT,
    build_scene,
    open_group_room,
    running_service,
    service_config,
    until,
)
from tests.support.synapse import start_synapse


def q(value: str) -> str:
    return quote(value, safe="")


async def kick_ts(scene, room: str, member: str) -> int | None:
    """Origin timestamp of the bot's kick of `member`, if it happened."""
    kick = None
    for event in await scene.owner.messages(room, limit=300):
        if (
            event["type"] == "m.room.member"
            and event.get("state_key") == member
            and event["sender"] == BOT
            and event["content"].get("membership") == "leave"
        ):
            kick = event["origin_server_ts"]
    return kick


async def notice_ts(user) -> int | None:
    """Origin timestamp of the bot's first message to `user` (joining its invite first)."""
    for room in await user.invited_rooms():
        await user.join(room)
    for room in await user.joined_rooms():
        for event in await user.messages(room, limit=20):
            if event.get("sender") == BOT and event["type"] == "m.room.message":
                return event["origin_server_ts"]
    return None


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


async def new_member(scene, name: str):
    user = await scene.synapse.new_user(name)
    await scene.owner.invite(scene.group, user.user_id)
    await user.join(scene.group)
    return user


async def react_at(scene, message: str, key: str) -> int:
    """The moderator reacts; returns the reaction's timestamp on Synapse's clock."""
    reaction = await scene.moderator.react(scene.group, message, key)
    event = await scene.moderator.request(
        "GET", f"/_matrix/client/v3/rooms/{q(scene.group)}/event/{q(reaction)}"
    )
    return event["origin_server_ts"]


async def measure_ours(scene, cases: int) -> tuple[list[float], list[float]]:
    kicks, dms = [], []
    for number in range(cases):
        member = await new_member(scene, f"ours{number}")
        said = await member.send_text(scene.group, "I don't feel safe")
        reacted = await react_at(scene, said, "🚨")

        kick = await until(
            lambda member=member: kick_ts(scene, scene.group, member.user_id),
            within=30,
            interval=0.5,
            what="the kick",
        )
        dm = await until(
            lambda member=member: notice_ts(member), within=30, interval=0.5, what="the DM"
        )
        kicks.append(kick - reacted)
        dms.append(dm - reacted)
    return kicks, dms


async def measure_floor(scene, as_token: str, cases: int) -> tuple[list[float], list[float]]:
    """The same calls, straight from aiohttp as the bot, started when the reaction is accepted."""
    url = scene.synapse.url
    headers = {"Authorization": f"Bearer {as_token}"}
    kicks, dms = [], []
    async with aiohttp.ClientSession(headers=headers) as http:

        async def call(method: str, path: str, body=None):
            async with http.request(method, f"{url}{path}", json=body) as response:
                return response.status, await response.json(content_type=None)

        for number in range(cases):
            member = await new_member(scene, f"floor{number}")
            said = await member.send_text(scene.group, "I don't feel safe")
            # A key our service ignores: the floor acts on it itself.
            reacted = await react_at(scene, said, "👀")
            room = q(scene.group)
            await call("GET", f"/_matrix/client/v3/rooms/{room}/event/{q(said)}")
            await call("GET", f"/_matrix/client/v3/rooms/{room}/state/m.room.create/?format=event")
            await call("GET", f"/_matrix/client/v3/rooms/{room}/state/m.room.power_levels/")
            staff = q(scene.staff_room)
            await call("GET", f"/_matrix/client/v3/rooms/{staff}/state/m.room.create/?format=event")
            await call("GET", f"/_matrix/client/v3/rooms/{staff}/state/m.room.power_levels/")
            await call("GET", f"/_matrix/client/v3/user/{q(BOT)}/account_data/m.direct")
            _, created = await call(
                "POST",
                "/_matrix/client/v3/createRoom",
                {
                    "preset": "private_chat",
                    "is_direct": True,
                    "invite": [member.user_id],
                },
            )
            _, sent = await call(
                "PUT",
                f"/_matrix/client/v3/rooms/{q(created['room_id'])}/send/m.room.message/"
                f"{uuid.uuid4().hex}",
                {"msgtype": "m.text", "body": "We're worried about you."},
            )
            await call(
                "GET",
                f"/_matrix/client/v3/rooms/{room}/state/m.room.member/"
                f"{q(member.user_id)}?format=event",
            )
            await call(
                "POST",
                f"/_matrix/client/v3/rooms/{room}/kick",
                {"user_id": member.user_id, "reason": "for your safety"},
            )
            _, dm_event = await call(
                "GET",
                f"/_matrix/client/v3/rooms/{q(created['room_id'])}/event/{q(sent['event_id'])}",
            )
            kick = await kick_ts(scene, scene.group, member.user_id)
            assert kick is not None
            kicks.append(kick - reacted)
            dms.append(dm_event["origin_server_ts"] - reacted)
    return kicks, dms


async def flag_under_chat_load(scene, service, events: int = 10_000) -> tuple[float, float]:
    """Kick latency for one flag while `events` ordinary events hit the transaction endpoint."""
    endpoint = f"http://127.0.0.1:{service.port}/_matrix/app/v1/transactions/"
    headers = {"Authorization": f"Bearer {service.registration.hs_token}"}

    def chat(number: int) -> bytes:
        return json.dumps(
            {
                "events": [
                    {
                        "event_id": f"$chat-{number}-{i}-{uuid.uuid4().hex[:6]}",
                        "room_id": "!busy:l",
                        "type": "m.room.message",
                        "sender": "@chatty:l",
                        "origin_server_ts": 1,
                        "content": {"msgtype": "m.text", "body": "lol same " * 10},
                    }
                    for i in range(100)
                ]
            }
        ).encode()

    bodies = [chat(n) for n in range(events // 100)]
    started = time.perf_counter()

    async def flood() -> float:
        async with aiohttp.ClientSession(headers=headers) as http:
            for number, body in enumerate(bodies):
                async with http.put(
                    f"{endpoint}flood-{uuid.uuid4().hex}-{number}", data=body
                ) as response:
                    assert response.status == 200
        return time.perf_counter() - started

    member = await new_member(scene, "underload")
    said = await member.send_text(scene.group, "I can't cope")
    flood_task = asyncio.create_task(flood())
    await asyncio.sleep(0.05)  # the flag arrives in the middle of the chat traffic
    reacted = await react_at(scene, said, "🚨")
    kick = await until(
        lambda: kick_ts(scene, scene.group, member.user_id),
        within=60,
        interval=0.05,
        what="the kick under load",
    )
    flood_seconds = await flood_task
    return kick - reacted, flood_seconds


async def run(cases: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="safeguard-bench-referral-"))
    synapse = await start_synapse(work / "synapse")
    try:
        scene = await build_scene(synapse, work)
        config = service_config(
            synapse,
            work,
            database_url=f"sqlite+aiosqlite:///{work / 'bench.db'}",
            staff_room=scene.staff_room,
            staff=[scene.staff.user_id],
            policy={"room_notice": False},
        )
        async with running_service(config) as service:
            await open_group_room(scene)
            await scene.owner.set_power_level(scene.group, scene.moderator.user_id, 50)
            # Alternate halves, and run the floor with the service up (it ignores the
            # floor's 👀), so both meet the same Synapse: pushing to an appservice.
            ours_kick, ours_dm, floor_kick, floor_dm = [], [], [], []
            for _ in range(2):
                kicks, dms = await measure_ours(scene, cases // 2)
                ours_kick += kicks
                ours_dm += dms
                kicks, dms = await measure_floor(scene, service.registration.as_token, cases // 2)
                floor_kick += kicks
                floor_dm += dms
            under_load, flood_seconds = await flag_under_chat_load(scene, service)
    finally:
        await synapse.close()

    print(f"referral benchmark: {cases} cases against a real Synapse (ms, Synapse clock)")
    print(f"{'':22} {'p50':>7} {'p95':>7}")
    for label, values in (
        ("floor: reaction→DM", floor_dm),
        ("ours:  reaction→DM", ours_dm),
        ("floor: reaction→kick", floor_kick),
        ("ours:  reaction→kick", ours_kick),
    ):
        print(f"{label:22} {statistics.median(values):>7.0f} {percentile(values, 0.95):>7.0f}")
    ratio = statistics.median(ours_kick) / max(statistics.median(floor_kick), 1)
    print(
        f"kick p50 ratio ours/floor: {ratio:.2f} (target <= 1.25) -> "
        f"{'OK' if ratio <= 1.25 else 'ABOVE'}"
    )
    print(
        f"one flag amid 10,000 chat events posted to the endpoint: reaction→kick "
        f"{under_load:.0f} ms (chat flood took {flood_seconds * 1000:.0f} ms)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=20)
    asyncio.run(run(parser.parse_args().cases))


if __name__ == "__main__":
    main()

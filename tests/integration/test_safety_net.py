"""The bot's own sync behind the push (bot/intake/safety_net.py), against a real Synapse.

- An invite Synapse drops when it restarts is still handled as a pushed one: staff's
  taken, a stranger's declined and told to staff.
- A reply in a closed case's DM, or to a moderator's debrief, that a restart dropped
  still reaches staff (the old per-room catch-up did not read those rooms).
- While the service is idle, what it asks of Synapse does not grow with its rooms.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.support.proxy import HoldingProxy
from tests.support.scene import (
    BOT,
    Scene,
    build_scene,
    open_group_room,
    running_service,
    scene_config,
    until,
)
from tests.support.synapse import free_port

pytestmark = [pytest.mark.synapse, pytest.mark.faults]


async def drop_what_synapse_queues(scene: Scene, proxy: HoldingProxy, act: Any) -> None:
    """Hold a transaction in flight, `act` (Synapse queues its events in memory behind
    it), then kill Synapse: the queue is gone, and the held push fails."""
    proxy.hold(lambda r: "/transactions/" in r.path)
    await scene.owner.send_text(scene.group, "just chatting")
    await asyncio.wait_for(proxy.held_event.wait(), 30)
    await act()
    await asyncio.sleep(1.0)
    await scene.synapse.restart(kill=True)
    proxy.release(drop=True)


async def test_invites_dropped_by_a_synapse_restart_are_handled(restartable_synapse, tmp_path):
    synapse = restartable_synapse
    scene = await build_scene(synapse, tmp_path)
    mallory = await synapse.new_user("mallory")
    service_port = free_port()
    async with HoldingProxy(f"http://127.0.0.1:{service_port}", port=synapse.as_port) as proxy:
        config = scene_config(scene, listen_port=service_port)
        async with running_service(config):
            await open_group_room(scene)
            rooms: dict[str, str] = {}

            async def invite_the_bot() -> None:
                rooms["staff"] = await scene.staff.create_room(name="Another group")
                await scene.staff.invite(rooms["staff"], BOT)
                rooms["mallory"] = await mallory.create_room(name="Trap", invite=[BOT])

            await drop_what_synapse_queues(scene, proxy, invite_the_bot)

            async def joined() -> bool:
                return (await scene.staff.members(rooms["staff"])).get(BOT) == "join"

            async def declined() -> bool:
                return (await mallory.members(rooms["mallory"])).get(BOT) == "leave"

            await until(joined, within=90, what="the bot to take staff's dropped invite")
            await until(declined, within=30, what="the bot to decline the stranger's")
            await until(
                lambda: scene.staff_matching(lambda m: f"{mallory.user_id} tried to add me" in m),
                what="staff told who tried",
            )
            invites = {
                event["event_id"]
                for user, room in ((scene.staff, rooms["staff"]), (mallory, rooms["mallory"]))
                for event in await user.messages(room)
                if event["type"] == "m.room.member"
                and event.get("state_key") == BOT
                and event["content"].get("membership") == "invite"
            }
            assert len(invites) == 2 and not invites & proxy.delivered(), "Synapse dropped both"


async def test_replies_in_a_closed_cases_dm_and_a_debrief_dropped_by_a_restart_reach_staff(
    restartable_synapse, tmp_path
):
    synapse = restartable_synapse
    scene = await build_scene(synapse, tmp_path)
    service_port = free_port()
    async with HoldingProxy(f"http://127.0.0.1:{service_port}", port=synapse.as_port) as proxy:
        config = scene_config(scene, listen_port=service_port)
        async with running_service(config):
            await open_group_room(scene)
            said = await scene.member.send_text(scene.group, "I can't do this any more")
            await scene.moderator.react(scene.group, said, "🚨")
            (dm,) = await until(scene.member.invited_rooms, what="the member's DM")
            await scene.member.join(dm)
            (debrief,) = await until(scene.moderator.invited_rooms, what="the debrief DM")
            await scene.moderator.join(debrief)
            await scene.staff.send_text(scene.staff_room, "!case 1 close spoke to them")
            await until(
                lambda: scene.staff_matching(lambda m: m.startswith("Case #1 closed")),
                what="the case closed",
            )
            replies: dict[str, str] = {}

            async def reply() -> None:
                replies["member"] = await scene.member.send_text(dm, "are you still there")
                replies["moderator"] = await scene.moderator.send_text(debrief, "rough night")

            await drop_what_synapse_queues(scene, proxy, reply)
            for text in ("are you still there", "rough night"):
                await until(
                    lambda text=text: scene.staff_matching(lambda m: text in m),
                    within=90,
                    what=f"{text!r} relayed to staff",
                )
            assert not set(replies.values()) & proxy.delivered(), "Synapse dropped both"


async def idle_requests(proxy: HoldingProxy, seconds: float) -> int:
    before = len(proxy.forwarded)
    await asyncio.sleep(seconds)
    return len(proxy.forwarded) - before


async def quiet(proxy: HoldingProxy, *, for_seconds: float, within: float = 60.0) -> None:
    """Until the service has asked nothing but what it asks all the time (its long poll, the
    probe's whoami) for `for_seconds` (what joining rooms set off is over), `within` at most."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    periodic = ("/sync", "/account/whoami")

    def asked() -> int:
        return sum(1 for _method, path, _body in proxy.forwarded if not path.endswith(periodic))

    seen, since = asked(), loop.time()
    while loop.time() - since < for_seconds:
        assert loop.time() < deadline, "the service never went quiet"
        await asyncio.sleep(0.5)
        if asked() != seen:
            seen, since = asked(), loop.time()


async def test_idle_requests_do_not_grow_with_the_rooms(synapse, tmp_path, short_long_poll):
    scene = await build_scene(synapse, tmp_path)
    async with HoldingProxy(synapse.url) as proxy:
        config = scene_config(scene, homeserver_url=proxy.url)
        async with running_service(config):
            rooms: list[str] = []

            async def add_rooms(count: int) -> None:
                made = await asyncio.gather(
                    *(
                        scene.staff.create_room(name=f"Group {len(rooms) + n}", invite=[BOT])
                        for n in range(count)
                    )
                )
                rooms.extend(made)
                for room in made:

                    async def joined(room: str = room) -> bool:
                        return (await scene.staff.members(room)).get(BOT) == "join"

                    await until(joined, within=60, what="the bot to join")
                # What joining sets off is over: staff told, state read, and the rooms'
                # first timelines, back-filled after the long poll that brought them.
                await quiet(proxy, for_seconds=short_long_poll + 2)

            # Each window holds several long polls and every periodic task (the longest, at
            # 30 s: a per-room cost on such a timer must show).
            window = 35.0
            await add_rooms(5)
            few = await idle_requests(proxy, window)
            await add_rooms(35)
            many = await idle_requests(proxy, window)
            print(f"idle requests in {window:.0f} s: {few} with 5 rooms, {many} with 40")
            assert many <= few + 4, f"{few} requests with 5 rooms, {many} with 40"

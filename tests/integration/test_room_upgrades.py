"""Room upgrades, against real Synapse: the bot follows a moderated room to its replacement,
and a tombstone it should not believe moves nothing (bot/moderation/upgrades.py).

- the group room (invite-only, as the scene makes it) is upgraded by its owner: the bot
  cannot join the replacement by itself, staff are asked to invite it, an invite from
  the room's owner (not staff) is taken because the new room names the old one; then a
  flagged member's case carries on there (`policy.on_rejoin: remove` removes them from
  the new room), and a flag in the new room is acted on;
- a tombstone forged into a push (from a member without the power to send one) is
  ignored, recorded and reported; one "from" the owner naming a room that is no
  replacement is left at once and reported.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from tests.support.appservice_api import put
from tests.support.matrix_user import q
from tests.support.scene import (
    BOT,
    build_scene,
    entries,
    open_group_room,
    running_service,
    scene_config,
    until,
)

pytestmark = pytest.mark.synapse


async def upgrade(user, room: str) -> str:
    version = (await user.state(room, "m.room.create")).get("room_version", "10")
    answer = await user.request(
        "POST", f"/_matrix/client/v3/rooms/{q(room)}/upgrade", {"new_version": version}
    )
    return answer["replacement_room"]


async def kicks_in(scene, room: str, user) -> int:
    return sum(
        1
        for e in await scene.owner.messages(room, limit=200)
        if e["type"] == "m.room.member"
        and e.get("state_key") == user.user_id
        and e["sender"] == BOT
        and e["content"].get("membership") == "leave"
    )


async def at_least(probe, value: int) -> bool:
    return await probe() >= value


async def test_an_upgraded_room_is_followed_and_its_cases_carry_on(synapse, tmp_path):
    scene = await build_scene(synapse, tmp_path)
    config = scene_config(scene, policy={"on_rejoin": "remove"})
    async with running_service(config) as service:
        old = await open_group_room(scene)
        said = await scene.member.send_text(old, "i can't go on")
        await scene.moderator.react(old, said, "🚨")
        await until(lambda: at_least(lambda: kicks_in(scene, old, scene.member), 1), what="kick")

        new = await upgrade(scene.owner, old)
        asked = await until(
            lambda: scene.staff_matching(lambda m: "could not join it" in m and new in m),
            what="staff asked to invite the bot to the replacement",
        )
        assert "upgraded Group chat" in asked[0]
        # The owner is no staff member; the invite is taken because the room replaces ours.
        await scene.owner.invite(new, BOT)
        await until(lambda: scene.bot_joined(new), what="the bot in the new room")
        told = await until(
            lambda: scene.staff_matching(lambda m: "I have joined it" in m),
            what="staff told the upgrade was followed",
        )
        assert f"({new})" in told[0] and "1 open case(s)" in told[0]
        (followed,) = await entries(service, "room_upgraded")
        assert followed.facts["cases_moved"] == 1

        # The flagged member comes back, in the new room: removed from it again.
        await scene.owner.invite(new, scene.member.user_id)
        await scene.member.join(new)
        await until(
            lambda: at_least(lambda: kicks_in(scene, new, scene.member), 1),
            what="removed again from the replacement (policy.on_rejoin: remove)",
        )

        # A flag in the new room is a flag.
        other = await synapse.new_user("other")
        await scene.owner.invite(new, other.user_id)
        await other.join(new)
        await scene.owner.invite(new, scene.moderator.user_id)
        await scene.moderator.join(new)
        said = await other.send_text(new, "nobody would notice if i was gone")
        await scene.moderator.react(new, said, "🚨")
        await until(lambda: at_least(lambda: kicks_in(scene, new, other), 1), what="kick in new")


def tombstone(room: str, sender: str, replacement: str) -> dict:
    return {
        "event_id": f"$forged-{uuid.uuid4().hex}",
        "room_id": room,
        "type": "m.room.tombstone",
        "state_key": "",
        "sender": sender,
        "origin_server_ts": 1,
        "content": {"body": "This room has been replaced", "replacement_room": replacement},
    }


async def test_a_tombstone_not_to_be_believed_moves_nothing(synapse, tmp_path):
    scene = await build_scene(synapse, tmp_path)
    mallory = await synapse.new_user("mallory")
    async with running_service(scene_config(scene)) as service:
        old = await open_group_room(scene)
        lure = await mallory.create_room(name="Lure", preset="public_chat")

        # From a member below the power to send one: not even looked at.
        event = tombstone(old, scene.member.user_id, lure)
        assert (await put(service, "forged-1", {"events": [event]}))[0] == 200
        report = await until(
            lambda: scene.staff_matching(lambda m: "which I ignored" in m),
            what="the forged tombstone reported",
        )
        assert scene.member.user_id in report[0] and "below the power" in report[0]
        (ignored,) = await until(lambda: entries(service, "tombstone_ignored"), what="recorded")
        assert "below the power" in ignored.facts["why"]

        # "From" the owner, naming a room that replaces nothing: joined, found out, left.
        event = tombstone(old, scene.owner.user_id, lure)
        assert (await put(service, "forged-2", {"events": [event]}))[0] == 200
        await until(
            lambda: scene.staff_matching(lambda m: "does not say it replaces" in m),
            what="the false replacement reported",
        )
        await until(lambda: _membership_is(mallory, lure, "leave"), what="the bot out of the lure")
        assert not await entries(service, "room_upgraded")
        assert old in service.rooms.moderated and lure not in service.rooms.moderated
        await asyncio.sleep(0.5)
        assert not await entries(service, "room_upgraded")


async def _membership_is(user, room: str, membership: str) -> bool:
    return (await user.members(room)).get(BOT) == membership

"""`!policy`, against real Synapse (bot/members/policy.py): any member of a moderated room
is told, in a DM of their own, how safeguarding works, with the confidentiality link;
nothing about any case, nothing to staff, and what they write there is answered with
where to talk now (nobody reads it)."""

from __future__ import annotations

import asyncio

import pytest

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

LINK = "https://example.org/confidentiality"


async def bot_texts(user, room: str) -> list[str]:
    return [
        e["content"].get("body", "")
        for e in await user.messages(room)
        if e.get("sender") == BOT and e.get("type") == "m.room.message"
    ]


async def invite_from_bot(user, exclude: set[str] = frozenset()) -> str | None:
    return next((room for room in await user.invites() if room not in exclude), None)


async def test_a_member_asks_how_it_works_and_is_told_privately(synapse, tmp_path):
    scene = await build_scene(synapse, tmp_path)
    config = scene_config(scene, policy={"confidentiality_url": LINK})
    async with running_service(config) as service:
        group = await open_group_room(scene)
        # A member with an open case elsewhere in the room changes nothing of the text.
        said = await scene.member.send_text(group, "nobody cares")
        await scene.moderator.react(group, said, "🚨")
        await until(lambda: entries(service, "step.remove"), what="the case under way")
        dm_of_case = await scene.dm_room_of_member()

        other = await synapse.new_user("curious")
        await scene.owner.invite(group, other.user_id)
        await other.join(group)
        await other.send_text(group, "  !Policy ")
        room = await until(lambda: invite_from_bot(other), what="the DM's invite")
        await other.join(room)
        (text,) = await until(lambda: bot_texts(other, room), what="the explanation")
        for words in (
            "If a moderator is worried",
            "moved out of the group chat",
            "emergency services",
            "check in",
            "999",
            "Samaritans",
            "nobody on our team reads it",
            f"What we share and why: {LINK}",
        ):
            assert words in text, words
        assert scene.member.user_id not in text and "Case" not in text
        (explained,) = await entries(service, "policy_explained")
        assert explained.facts == {"unencrypted": False}

        # Asked again at once: the message is there already; nothing more is sent.
        await other.send_text(group, "!policy")
        await asyncio.sleep(2)
        assert len(await bot_texts(other, room)) == 1

        # What they write there is answered (nobody reads it), once an hour at most.
        await other.send_text(room, "is anyone there? i feel awful")
        await until(lambda: _count(lambda: bot_texts(other, room), 2), what="the automatic answer")
        answer = (await bot_texts(other, room))[-1]
        assert "nobody on our team reads what is written here" in answer and "116 123" in answer
        await other.send_text(room, "hello?")
        await asyncio.sleep(2)
        assert len(await bot_texts(other, room)) == 2

        # Staff hear nothing of it: it was the member's own question.
        staff_texts = await scene.staff_messages()
        assert not any("awful" in t or other.user_id in t for t in staff_texts)
        assert dm_of_case != room
        (written,) = await entries(service, "policy_room_written")
        assert written.facts == {"answered": True} and "awful" not in str(written.personal)


async def _count(probe, value: int) -> bool:
    return len(await probe()) >= value


async def test_policy_in_a_room_the_bot_does_not_moderate_is_nothing(synapse, tmp_path):
    scene = await build_scene(synapse, tmp_path)
    async with running_service(scene_config(scene)) as service:
        room = await scene.member.create_room(name="Elsewhere", invite=[BOT])
        await asyncio.sleep(1)
        await scene.member.send_text(room, "!policy")
        await asyncio.sleep(2)
        assert not await entries(service, "policy_explained")
        assert await invite_from_bot(scene.member, {room}) is None

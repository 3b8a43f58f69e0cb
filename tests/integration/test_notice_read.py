"""Whether the member has read their notice, against a real Synapse (bot/intake/notice_reads.py).

- The member reads the DM (their client posts a read receipt): the case records it
  and `!case N` says when.
- The member does not: staff get one reply to the alert after
  `policy.unread_notice_after`, kept through service restarts before and after it.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.support.matrix_user import q
from tests.support.scene import (
    build_scene,
    export_json,
    open_group_room,
    recorded,
    running_service,
    scene_config,
    until,
)

pytestmark = pytest.mark.synapse
UNREAD = "has not opened the message yet"


@pytest.fixture
async def scene(synapse, tmp_path):
    return await build_scene(synapse, tmp_path)


async def flag_member(scene) -> tuple[str, dict]:
    """The member flagged; their DM joined (not read) and the notice in it."""
    said = await scene.member.send_text(scene.group, "I can't see a way out")
    await scene.moderator.react(scene.group, said, "🚨")
    dm = await until(scene.dm_room_of_member, what="the DM invite")
    await scene.member.join(dm)
    (notice,) = await until(lambda: scene.bot_messages(scene.member, dm), what="the notice")
    await until(lambda: scene.staff_matching(is_alert), what="the staff alert")
    return dm, notice


def is_alert(text: str) -> bool:
    return text.startswith("Case #1") and "\nMember: " in text


async def case_shown(scene, expected: str) -> str:
    """`!case 1` asked by staff, and its answer once it holds `expected`."""
    asked = await scene.staff.send_text(scene.staff_room, "!case 1")

    async def answer() -> str | None:
        for event in await scene.bot_messages(scene.staff, scene.staff_room):
            relates = event["content"].get("m.relates_to") or {}
            if (relates.get("m.in_reply_to") or {}).get("event_id") == asked:
                return event["content"]["body"]
        return None

    body = await until(answer, what="the answer to !case 1")
    assert expected in body, body
    return body


async def unread_replies(scene) -> list[dict]:
    return [
        event
        for event in await scene.bot_messages(scene.staff, scene.staff_room)
        if UNREAD in event["content"].get("body", "")
    ]


async def test_the_member_reads_the_notice_and_staff_see_when(scene):
    config = scene_config(scene)
    async with running_service(config):
        await open_group_room(scene)
        dm, notice = await flag_member(scene)
        await case_shown(scene, "The member has not opened the notice yet")
        # As their client does when they open the DM: a public read receipt on the notice.
        await scene.member.request(
            "POST",
            f"/_matrix/client/v3/rooms/{q(dm)}/receipt/m.read/{q(notice['event_id'])}",
            {},
        )
        await until(lambda: recorded(config, "notice_read"), within=60, what="the read recorded")
        await case_shown(scene, "The member read the notice at ")
    (case,) = (await export_json(config))["cases"]
    (read,) = [entry for entry in case["entries"] if entry["kind"] == "notice_read"]
    assert read["facts"]["receipt_on"] == "notice"
    assert case["notice_read_at"] == read["facts"]["read_at"]
    assert not await unread_replies(scene)


async def test_unread_staff_are_told_once_in_a_reply_to_the_alert_across_restarts(scene):
    config = scene_config(scene, policy={"unread_notice_after": "15s"})
    async with running_service(config):
        await open_group_room(scene)
        await flag_member(scene)
    # Stopped before the reply falls due: the case's record brings it due after the restart.
    async with running_service(config):
        (reply,) = await until(lambda: unread_replies(scene), within=60, what="the unread reply")
        alert = await scene.last_staff_event(is_alert)
        assert alert is not None
        relates = reply["content"]["m.relates_to"]["m.in_reply_to"]
        assert relates["event_id"] == alert["event_id"], "a reply to the case's alert"
        body = reply["content"]["body"]
        assert body.startswith("Case #1: ") and scene.member.user_id in body
        await case_shown(scene, "The member has not opened the notice yet")
    async with running_service(config) as service:
        await asyncio.wait_for(service.steps.ready.wait(), 30)  # the due cases looked at
        await case_shown(scene, "staff told the notice is unread")
        assert len(await unread_replies(scene)) == 1, "never twice"

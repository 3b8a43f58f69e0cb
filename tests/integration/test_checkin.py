"""The next-day check-in against a real Synapse, short delays: exactly once, whatever happens."""

from __future__ import annotations

import asyncio
import signal

import pytest

from tests.support.checkins import checkin_config, checkin_rooms, flag_member, flagged_and_scheduled
from tests.support.processes import run_service_process
from tests.support.proxy import HoldingProxy
from tests.support.scene import (
    BOT,
    build_scene,
    export_json,
    open_group_room,
    recorded,
    running_service,
)
from tests.support.scene import until as eventually

pytestmark = pytest.mark.synapse


async def test_checkin_opens_and_a_staff_claim_is_recorded(synapse, tmp_path):
    scene = await build_scene(synapse, tmp_path)
    config = checkin_config(scene)
    async with running_service(config):
        await open_group_room(scene)
        await flag_member(scene)
        (room,) = await eventually(lambda: checkin_rooms(scene), within=60, what="the check-in")
        await scene.staff.join(room)
        (message,) = [
            e
            for e in await scene.staff.messages(room)
            if e.get("sender") == BOT and e["type"] == "m.room.message"
        ]
        assert "Samaritans" in message["content"]["body"]
        assert "checking in" in message["content"]["body"].lower()
        join_rules = await scene.staff.state(room, "m.room.join_rules")
        assert join_rules["join_rule"] == "invite"
        create = await scene.staff.state(room, "m.room.create")
        assert create.get("additional_creators") in (None, []), "invitees are not creators"
        notice = await eventually(
            lambda: scene.last_staff_event(lambda body: "check-in room is open" in body),
            what="the staff-room notice",
        )
        assert room in notice["content"]["body"]
        await scene.staff.react(scene.staff_room, notice["event_id"], "✋")
        for kind in ("checkin_claimed", "step.checkin", "checkin_staff_joined"):
            await eventually(lambda kind=kind: recorded(config, kind), what=kind)
        (case,) = (await export_json(config))["cases"]
        assert case["checkin_room"] == room


async def test_restart_before_due_time_opens_one_checkin(synapse, tmp_path):
    scene = await build_scene(synapse, tmp_path)
    config = checkin_config(scene, after="6s")
    async with running_service(config):
        await flagged_and_scheduled(scene, config)
    async with running_service(config):
        await eventually(lambda: checkin_rooms(scene), within=30, what="the check-in")
        await asyncio.sleep(2)
        assert len(await checkin_rooms(scene)) == 1


async def test_service_down_across_due_time_opens_late_on_restart(synapse, tmp_path):
    scene = await build_scene(synapse, tmp_path)
    # Due after the first run has stopped, even on a busy machine (a run still stopping
    # at the due time opens the check-in on time), then down well past the threshold.
    config = checkin_config(scene, after="6s")
    async with running_service(config):
        await flagged_and_scheduled(scene, config)
    await asyncio.sleep(18)  # down across the due time, past the lateness threshold
    async with running_service(config):
        await eventually(lambda: checkin_rooms(scene), within=30, what="the late check-in")
        notice = await eventually(
            lambda: scene.last_staff_event(lambda body: "check-in room is open" in body),
            what="the staff notice",
        )
        assert "late" in notice["content"]["body"]


async def test_killed_while_opening_leaves_one_room_and_one_invite(synapse, tmp_path):
    scene = await build_scene(synapse, tmp_path)
    proxy = HoldingProxy(synapse.url)
    await proxy.start()
    # Due well after the first run below has stopped, even on a busy machine: the
    # check-in must be opened by the process that is killed, not by the first run.
    config = checkin_config(scene, after="10s", homeserver_url=proxy.url)
    process = None
    try:
        async with running_service(config):
            await flagged_and_scheduled(scene, config)
        # The check-in room will be created, then the first invite held: kill there.
        proxy.hold(lambda request: request.path.endswith("/invite"))
        process = await run_service_process(config)
        await asyncio.wait_for(proxy.held_event.wait(), 60)
        process.send_signal(signal.SIGKILL)
        await process.wait()
        proxy.release(drop=True)
        async with running_service(config):
            await eventually(lambda: checkin_rooms(scene), within=30, what="the check-in")
            await eventually(lambda: recorded(config, "step.checkin"), what="the record")
        bot_rooms = [r for r in await scene.member.invited_rooms()]
        assert len(await checkin_rooms(scene)) == 1
        assert len(bot_rooms) == 2  # the DM and exactly one check-in room
    finally:
        if process is not None and process.returncode is None:
            process.kill()  # never left holding the appservice's port for later tests
            await process.wait()
        await proxy.stop()


async def test_unclaimed_checkin_is_raised_again_once(synapse, tmp_path):
    scene = await build_scene(synapse, tmp_path)
    config = checkin_config(scene, after="1s", remind_after="2s")
    async with running_service(config):
        await open_group_room(scene)
        await flag_member(scene)
        await eventually(
            lambda: scene.last_staff_event(lambda body: "no one from staff has claimed" in body),
            within=30,
            what="the reminder",
        )
        await asyncio.sleep(3)
        reminders = [
            e
            for e in await scene.bot_messages(scene.staff, scene.staff_room)
            if "no one from staff has claimed" in e["content"]["body"]
        ]
        assert len(reminders) == 1


async def test_a_checkin_kept_through_a_withdrawal_is_still_raised_again(synapse, tmp_path):
    """`!case N withdraw <why> --keep-checkin`: the case is closed, its check-in is not, so
    an unclaimed check-in is raised again as any other (it used to be skipped)."""
    scene = await build_scene(synapse, tmp_path)
    config = checkin_config(scene, after="3s", remind_after="2s")
    async with running_service(config):
        await open_group_room(scene)
        await flag_member(scene)
        await eventually(
            lambda: scene.last_staff_event(lambda body: body.startswith("Case #1")),
            within=30,
            what="the alert",
        )
        await scene.staff.send_text(scene.staff_room, "!case 1 withdraw joke --keep-checkin")
        await eventually(
            lambda: scene.last_staff_event(lambda body: "no one from staff has claimed" in body),
            within=40,
            what="the reminder of the kept check-in",
        )


async def test_dry_run_tells_staff_when_it_would_have_opened(synapse, tmp_path):
    scene = await build_scene(synapse, tmp_path)
    config = checkin_config(scene, after="1s", dry_run=True)
    async with running_service(config):
        await open_group_room(scene)
        await flag_member(scene)
        await eventually(
            lambda: scene.last_staff_event(lambda body: "would have opened" in body),
            within=30,
            what="the dry-run notice",
        )
        assert await scene.member.invited_rooms() == []


async def test_member_who_cannot_be_invited_is_recorded_and_staff_told(synapse, tmp_path):
    scene = await build_scene(synapse, tmp_path)
    config = checkin_config(scene, after="3s")
    async with running_service(config):
        await open_group_room(scene)
        await flag_member(scene)
        await until_dm_sent(config)
        # Now the member blocks every invite: Synapse will refuse the check-in's.
        await scene.member.request(
            "PUT",
            f"/_matrix/client/v3/user/{scene.member.user_id}/account_data/"
            "m.invite_permission_config",
            {"default_action": "block"},
        )
        notice = await eventually(
            lambda: scene.last_staff_event(lambda body: "check-in room is open" in body),
            within=30,
            what="the staff notice",
        )
        assert "could NOT be invited" in notice["content"]["body"]
        # The staff notice is sent a moment before the step's outcome is recorded.
        await eventually(lambda: recorded(config, "step.checkin"), what="the check-in record")
        (case,) = (await export_json(config))["cases"]
        entry = next(e for e in case["entries"] if e["kind"] == "step.checkin")
        assert entry["facts"]["member_invited"] is False
        assert "M_INVITE_BLOCKED" in entry["personal"]["not_invited"][scene.member.user_id]


async def until_dm_sent(config) -> None:
    await eventually(lambda: recorded(config, "step.notify"), what="the notice")


async def test_two_cases_of_one_member_get_two_checkins(synapse, tmp_path):
    scene = await build_scene(synapse, tmp_path)
    config = checkin_config(scene, after="1s")
    async with running_service(config):
        await open_group_room(scene)
        await flag_member(scene)
        await eventually(lambda: checkin_rooms(scene), within=30, what="the first check-in")
        await scene.owner.invite(scene.group, scene.member.user_id)
        await scene.member.join(scene.group)
        await eventually(lambda: recorded(config, "member_rejoined"), what="the rejoin")
        await flag_member(scene)

        async def two() -> bool:
            return len(await checkin_rooms(scene)) == 2

        await eventually(two, within=30, what="a second check-in room")
        document = await export_json(config)
        rooms = {case["checkin_room"] for case in document["cases"]}
        assert len(document["cases"]) == 2 and len(rooms) == 2


async def test_checkin_opens_on_time_while_the_staff_room_refuses_the_bot(synapse, tmp_path):
    """The bot may not post in the staff room: the alert and check-in notice wait; the
    member's check-in does not. Once the power is restored, staff get both, once."""
    scene = await build_scene(synapse, tmp_path, staff_room=False)
    scene.staff_room = await scene.staff.create_room(
        name="Staff", invite=[BOT], power_levels={"events_default": 100}
    )
    config = checkin_config(scene, after="2s")
    async with running_service(config):
        await open_group_room(scene)
        await flag_member(scene)
        (room,) = await eventually(lambda: checkin_rooms(scene), within=60, what="the check-in")
        # The invites land just before the step's record: wait for the record, not the room.
        await eventually(lambda: recorded(config, "step.checkin"), what="the check-in's record")
        (case,) = (await export_json(config))["cases"]
        assert case["steps"]["alert"] == "started", "waiting, not failed"
        assert case["steps"]["checkin"] == "done"
        await scene.staff.set_power_level(scene.staff_room, BOT, 100)
        await eventually(
            lambda: scene.last_staff_event(lambda body: body.startswith("Case #1\n")),
            within=60,
            what="the alert once the bot may post",
        )
        notice = await eventually(
            lambda: scene.last_staff_event(lambda body: "check-in room is open" in body),
            within=60,
            what="the check-in's staff notice",
        )
        assert room in notice["content"]["body"]

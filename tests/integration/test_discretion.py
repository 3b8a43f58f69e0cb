"""Discretion and follow-through, seen from each person's client, against real Synapse.

The room learns nothing it should not (a neutral removal, the flag redacted); the
member's every word reaches staff; closed cases stay quiet; every action by
reaction is answered; the moderator is looked after; a wrong flag can be undone;
a member coming back is seen.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import yaml

from bot.core.ports import Refused
from tests.support.checkins import checkin_config, checkin_rooms
from tests.support.scene import (
    BOT,
    build_scene,
    export_json,
    health,
    open_group_room,
    recorded,
    running_service,
    scene_config,
    until,
)
from tests.support.synapse import MODERATION_LOCALPART

pytestmark = pytest.mark.synapse


def configure(scene, *, checkin: dict | None = None, **policy):
    return scene_config(scene, policy=policy, checkin=checkin)


async def kick_event(scene, user, by: str = BOT) -> dict | None:
    for event in reversed(await scene.owner.messages(scene.group, limit=200)):
        if (
            event["type"] == "m.room.member"
            and event.get("state_key") == user.user_id
            and event["content"].get("membership") == "leave"
            and event["sender"] == by
        ):
            return event
    return None


async def redacted(scene, event_id: str, by: str | None = None) -> bool:
    event = await scene.owner.request(
        "GET", f"/_matrix/client/v3/rooms/{_q(scene.group)}/event/{_q(event_id)}"
    )
    because = event.get("unsigned", {}).get("redacted_because")
    return because is not None and (by is None or because.get("sender") == by)


def _q(value: str) -> str:
    from tests.support.matrix_user import q

    return q(value)


async def reply_to(scene, event_id: str) -> str | None:
    for event in await scene.bot_messages(scene.staff, scene.staff_room):
        relation = event["content"].get("m.relates_to", {})
        if relation.get("m.in_reply_to", {}).get("event_id") == event_id:
            return event["content"]["body"]
    return None


async def test_the_room_sees_a_neutral_removal_and_no_flag(synapse, tmp_path):
    scene = await build_scene(synapse, tmp_path)
    await scene.member.request(
        "PUT",
        f"/_matrix/client/v3/profile/{_q(scene.member.user_id)}/displayname",
        {"displayname": "Zorya"},
    )
    config = configure(scene, redact_flagged_message=True)
    async with running_service(config):
        await open_group_room(scene)
        said = await scene.member.send_text(scene.group, "I have a plan to end it")
        command = await scene.moderator.send_text(
            scene.group, "!safeguard they said they have a plan", reply_to=said
        )
        kick = await until(lambda: kick_event(scene, scene.member), what="the removal")
        assert kick["content"].get("reason") == "Removed by a moderator"
        await until(lambda: redacted(scene, command), what="the command redacted")
        await until(lambda: redacted(scene, said), what="the flagged message redacted")
        notice = await until(lambda: _room_notice(scene), what="the room notice, naming no one")
        for hint in ("Zorya", scene.member.user_id, "safety", "risk", "worried"):
            assert hint not in notice
        alert = (await scene.staff_matching(lambda m: m.startswith("Case #1")))[0]
        assert f"Member: Zorya ({scene.member.user_id})" in alert
        assert f"Room: Group chat ({scene.group})" in alert


async def _room_notice(scene, by: str | None = None) -> str | dict | None:
    """The notice's body (from the bot), or the whole event as the room sees it (`by`)."""
    if by is None:
        for event in await scene.bot_messages(scene.owner, scene.group):
            return event["content"]["body"]
        return None
    for event in await scene.owner.messages(scene.group, limit=200):
        if event.get("sender") == by and event["type"] == "m.room.message":
            return event
    return None


async def test_a_reaction_flag_is_redacted_and_a_refused_one_is_not(synapse, tmp_path):
    scene = await build_scene(synapse, tmp_path)
    bystander = await synapse.new_user("bystander")
    async with running_service(configure(scene)):
        await open_group_room(scene)
        await scene.owner.invite(scene.group, bystander.user_id)
        await bystander.join(scene.group)
        other = await scene.member.send_text(scene.group, "hmm")
        refused = await bystander.react(scene.group, other, "🚨")
        said = await scene.member.send_text(scene.group, "goodbye")
        flag = await scene.moderator.react(scene.group, said, "🚨")
        await until(lambda: redacted(scene, flag), what="the 🚨 redacted")
        await until(lambda: scene.staff_matching(lambda m: "Flag refused" in m), what="refusal")
        assert not await redacted(scene, refused), "a refused flag is not the bot's to remove"


async def test_the_member_waiting_in_the_checkin_room_reaches_staff(synapse, tmp_path):
    scene = await build_scene(synapse, tmp_path)
    config = checkin_config(scene, after="1s", remind_after="4s")
    async with running_service(config):
        await open_group_room(scene)
        said = await scene.member.send_text(scene.group, "I can't")
        await scene.moderator.react(scene.group, said, "🚨")
        (room,) = await until(lambda: checkin_rooms(scene), within=30, what="the check-in")
        await scene.member.join(room)
        await scene.member.send_text(room, "hello? is anyone there")
        relayed = await until(
            lambda: scene.staff_matching(lambda m: "hello? is anyone there" in m),
            what="the relayed message",
        )
        assert relayed[0].startswith("Case #1")
        assert "(no one from staff has joined it yet):" in relayed[0], "not as their words"
        await until(lambda: recorded(config, "checkin_member_wrote"), what="its record")
        reminder = await until(
            lambda: scene.staff_matching(lambda m: "no one from staff has claimed" in m),
            within=30,
            what="the reminder",
        )
        assert "The member has joined and is waiting" in reminder[0]
    (case,) = (await export_json(config))["cases"]
    entry = next(e for e in case["entries"] if e["kind"] == "checkin_member_wrote")
    assert "hello" not in str(entry), "the text is not stored"


async def test_closed_or_dealt_with_cases_are_not_raised_again(synapse, tmp_path):
    scene = await build_scene(synapse, tmp_path)
    async with running_service(configure(scene, ack_within="3s")):
        await open_group_room(scene)
        said = await scene.member.send_text(scene.group, "bye")
        await scene.moderator.react(scene.group, said, "🚨")
        await until(lambda: scene.staff_matching(lambda m: m.startswith("Case #1")), what="alert")
        await scene.staff.send_text(scene.staff_room, "!case 1 es CAD-1 police")
        other = await synapse.new_user("second")
        await scene.owner.invite(scene.group, other.user_id)
        await other.join(scene.group)
        said = await other.send_text(scene.group, "me too")
        await scene.moderator.react(scene.group, said, "🚨")
        await until(lambda: scene.staff_matching(lambda m: m.startswith("Case #2")), what="alert")
        await scene.staff.send_text(scene.staff_room, "!case 2 close false alarm")
        await asyncio.sleep(6)
        assert not await scene.staff_matching(lambda m: "has not been acknowledged" in m)


async def test_actions_by_reaction_are_answered_and_corroboration_told(synapse, tmp_path):
    scene = await build_scene(synapse, tmp_path)
    config = configure(scene, checkin={"after": "1s"})
    async with running_service(config):
        await open_group_room(scene)
        second = await synapse.new_user("mod2")
        await scene.owner.invite(scene.group, second.user_id)
        await second.join(scene.group)
        await scene.owner.set_power_level(scene.group, second.user_id, 50)
        said = await scene.member.send_text(scene.group, "I'm going to do it tonight")
        await scene.moderator.react(scene.group, said, "🚨")
        alert = await until(
            lambda: scene.last_staff_event(lambda m: m.startswith("Case #1")), what="the alert"
        )
        await second.send_text(scene.group, f"!safeguard {scene.member.user_id} she told me too")
        told = await until(lambda: reply_to(scene, alert["event_id"]), what="corroboration")
        assert told.startswith("Case #1") and "she told me too" in told
        await scene.staff.react(scene.staff_room, alert["event_id"], "✅")
        acked = await until(
            lambda: scene.staff_matching(lambda m: "acknowledged by" in m), what="the ✅ answer"
        )
        assert scene.staff.user_id in acked[0]
        notice = await until(
            lambda: scene.last_staff_event(lambda m: "check-in room is open" in m),
            within=30,
            what="the check-in notice",
        )
        await scene.staff.react(scene.staff_room, notice["event_id"], "✋")
        claimed = await until(lambda: reply_to(scene, notice["event_id"]), what="the ✋ answer")
        assert "claimed by" in claimed and scene.staff.user_id in claimed
        # A reaction where it does nothing is answered with where it works.
        await scene.staff.react(scene.staff_room, notice["event_id"], "✅")
        where = await until(
            lambda: scene.staff_matching(lambda m: m.startswith("✅ acknowledges an alert")),
            what="where ✅ works",
        )
        assert "case #1's alert itself" in where[0] and "`!case 1 ack`" in where[0]


async def test_the_moderator_is_debriefed_and_stats_show_who_carries_this(synapse, tmp_path):
    scene = await build_scene(synapse, tmp_path)
    config = configure(scene, moderator_support="Jo, our volunteer lead: #volunteers:localhost")
    async with running_service(config):
        await open_group_room(scene)
        said = await scene.member.send_text(scene.group, "bye all")
        await scene.moderator.react(scene.group, said, "🚨")
        (room,) = await until(scene.moderator.invited_rooms, what="the debrief invite")
        await scene.moderator.join(room)
        debrief = await until(lambda: scene.bot_messages(scene.moderator, room), what="debrief")
        body = debrief[0]["content"]["body"]
        assert "Case #1" in body and "right thing" in body and "Jo, our volunteer lead" in body
        await scene.moderator.send_text(room, "that was hard, can someone call me")
        await until(
            lambda: scene.staff_matching(lambda m: "can someone call me" in m),
            what="the moderator's reply relayed",
        )
        sent = await scene.staff.send_text(scene.staff_room, "!case stats")
        stats = await until(lambda: reply_to(scene, sent), what="the stats")
        assert f"{scene.moderator.user_id}: 1" in stats and f"{scene.group}: 1" in stats


async def test_a_wrong_flag_is_withdrawn_with_an_apology_and_a_way_back(synapse, tmp_path):
    scene = await build_scene(synapse, tmp_path)
    config = configure(scene, checkin={"after": "1h"})
    async with running_service(config):
        await open_group_room(scene)
        said = await scene.member.send_text(scene.group, "just a joke about exams killing me")
        await scene.moderator.react(scene.group, said, "🚨")
        await until(lambda: scene.staff_matching(lambda m: m.startswith("Case #1")), what="alert")
        await scene.staff.send_text(scene.staff_room, "!case 1 withdraw it was a joke")
        done = await until(
            lambda: scene.staff_matching(lambda m: "withdrawn by" in m), what="the report"
        )
        assert "✔ Apology sent" in done[0] and "✔ Invited back" in done[0]
        assert "check-in was cancelled" in done[0]
        invites = await scene.member.invites()
        assert scene.group in invites, "invited back into the (invite-only) room"
        dm = next(room for room in invites if room != scene.group)
        await scene.member.join(dm)
        texts = [e["content"]["body"] for e in await scene.bot_messages(scene.member, dm)]
        assert any("by mistake" in text for text in texts)
        # Nothing more is done to them on a withdrawn case, whoever asks.
        await scene.staff.send_text(scene.staff_room, "!case 1 remove")
        await until(
            lambda: scene.staff_matching(lambda m: "is closed: nothing is sent" in m),
            what="the removal refused on a closed case",
        )
    (case,) = (await export_json(config))["cases"]
    assert case["state"] == "closed" and case["outcome"].startswith("withdrawn")
    assert case["steps"]["checkin"] == "skipped"


async def test_an_apology_reaches_a_member_who_left_the_notice_dm(synapse, tmp_path):
    """The member read the notice and left that DM: the apology comes in a DM they are
    invited to, not into the room they left, and their reply still reaches staff."""
    scene = await build_scene(synapse, tmp_path)
    async with running_service(configure(scene)):
        await open_group_room(scene)
        said = await scene.member.send_text(scene.group, "exams are killing me")
        await scene.moderator.react(scene.group, said, "🚨")
        await until(lambda: scene.staff_matching(lambda m: m.startswith("Case #1")), what="alert")
        notice_dm = await until(
            lambda: _first_other_invite(scene, exclude={scene.group}), what="the notice DM"
        )
        await scene.member.join(notice_dm)
        await scene.member.leave(notice_dm)
        await scene.staff.send_text(scene.staff_room, "!case 1 withdraw it was a joke")
        await until(lambda: scene.staff_matching(lambda m: "withdrawn by" in m), what="report")
        apology_dm = await until(
            lambda: _first_other_invite(scene, exclude={scene.group, notice_dm}),
            what="an invite to a DM the member is not in",
        )
        await scene.member.join(apology_dm)
        texts = [e["content"]["body"] for e in await scene.bot_messages(scene.member, apology_dm)]
        assert any("by mistake" in text for text in texts)
        await scene.member.send_text(apology_dm, "thanks, all good")
        await until(
            lambda: scene.staff_matching(lambda m: "thanks, all good" in m),
            what="the member's reply relayed to staff",
        )


async def _first_other_invite(scene, exclude: set[str]) -> str | None:
    return next((room for room in await scene.member.invites() if room not in exclude), None)


@pytest.mark.parametrize("on_rejoin", ["tell", "remove"])
async def test_a_member_coming_back_is_seen(synapse, tmp_path, on_rejoin):
    scene = await build_scene(synapse, tmp_path)
    async with running_service(configure(scene, on_rejoin=on_rejoin)):
        await open_group_room(scene)
        said = await scene.member.send_text(scene.group, "bye")
        await scene.moderator.react(scene.group, said, "🚨")
        alert = await until(
            lambda: scene.last_staff_event(lambda m: m.startswith("Case #1")), what="the alert"
        )
        await until(lambda: kick_event(scene, scene.member), what="the removal")
        await scene.owner.invite(scene.group, scene.member.user_id)
        await scene.member.join(scene.group)
        told = await until(lambda: reply_to(scene, alert["event_id"]), what="staff told")
        assert told.startswith("Case #1") and "rejoined" in told

        async def kicks() -> int:
            return sum(
                1
                for e in await scene.owner.messages(scene.group, limit=200)
                if e["type"] == "m.room.member"
                and e.get("state_key") == scene.member.user_id
                and e["sender"] == BOT
                and e["content"].get("membership") == "leave"
            )

        if on_rejoin == "remove":
            await until(lambda: _is(kicks, 2), what="removed again")
            # Told why in their DM, each time they come back, before the removal.
            dm = next(room for room in await scene.member.invites() if room != scene.group)
            await scene.member.join(dm)

            async def whys() -> int:
                messages = await scene.bot_messages(scene.member, dm)
                return sum("You came back to Group chat" in e["content"]["body"] for e in messages)

            await until(lambda: _is(whys, 1), what="told why")
            await scene.owner.invite(scene.group, scene.member.user_id)
            await scene.member.join(scene.group)
            await until(lambda: _is(kicks, 3), what="removed again, a second time")
            await until(lambda: _is(whys, 2), what="told why again")
        else:
            await asyncio.sleep(2)
            assert await kicks() == 1


async def _is(probe, value) -> bool:
    return await probe() == value


def with_moderation_user(config):
    data = yaml.safe_load(config.read_text())
    data["appservice"]["moderation_localpart"] = MODERATION_LOCALPART
    config.write_text(yaml.safe_dump(data))
    return config


async def test_a_moderation_user_acts_so_the_room_sees_nothing_of_safeguarding(synapse, tmp_path):
    """appservice.moderation_localpart: the removal, the redactions and the room notice
    come from the moderation user, seated ahead of the flag; nothing the room can read
    (a kick's sender, a notice's source) carries the case."""
    scene = await build_scene(synapse, tmp_path)
    moderation = f"@{MODERATION_LOCALPART}:{synapse.server_name}"
    config = with_moderation_user(configure(scene, redact_flagged_message=True))
    async with running_service(config) as service:
        # The room's owner gave it the power to act; the bot invites it in.
        await open_group_room(scene, power={moderation: 50})
        await until(
            lambda: service.moderation.seated_in(scene.group), what="the moderation user seated"
        )
        said = await scene.member.send_text(scene.group, "I have a plan to end it")
        command = await scene.moderator.send_text(
            scene.group, "!safeguard they said they have a plan", reply_to=said
        )
        kick = await until(lambda: kick_event(scene, scene.member, moderation), what="removal")
        assert kick["content"].get("reason") == "Removed by a moderator"
        await until(lambda: redacted(scene, command, by=moderation), what="command redacted")
        await until(lambda: redacted(scene, said, by=moderation), what="flagged one redacted")
        notice = await until(lambda: _room_notice(scene, moderation), what="the room notice")
        assert "safeguard" not in json.dumps(notice).lower(), notice
        timeline = await scene.owner.messages(scene.group, limit=200)
        acted = [e for e in timeline if e.get("sender") == BOT and e["type"] != "m.room.member"]
        assert acted == [], "the bot did nothing the room can see"
        # The kick again, as a retry whose first answer was lost makes it: Synapse refuses
        # it (they are gone), which is no loss of power: the moderation user stays seated.
        again = await service.homeserver.kick(scene.group, scene.member.user_id, "again")
        assert isinstance(again, Refused) and again.errcode == "M_FORBIDDEN"
        assert service.moderation.seated_in(scene.group), "not unseated for its target"


async def test_a_moderation_user_kicked_from_the_room_stands_aside_and_the_bot_acts(
    synapse, tmp_path
):
    """Kicked, it keeps its power level in the room's state, but cannot act there: its
    refused kick must not be taken for one about the member, who is removed all the same."""
    scene = await build_scene(synapse, tmp_path)
    moderation = f"@{MODERATION_LOCALPART}:{synapse.server_name}"
    config = with_moderation_user(configure(scene))
    async with running_service(config) as service:
        await open_group_room(scene, power={moderation: 50})
        await until(
            lambda: service.moderation.seated_in(scene.group), what="the moderation user seated"
        )
        await scene.owner.kick(scene.group, moderation, "not wanted")
        said = await scene.member.send_text(scene.group, "I can't go on")
        await scene.moderator.react(scene.group, said, "🚨")
        await until(lambda: kick_event(scene, scene.member), what="the removal, by the bot")


async def test_without_power_the_moderation_user_stands_aside_and_the_bot_acts(synapse, tmp_path):
    """Safety before discretion: where the moderation user cannot be given the power to
    act, the bot removes the member all the same, and staff and /health's detail say what
    to do."""
    scene = await build_scene(synapse, tmp_path)
    moderation = f"@{MODERATION_LOCALPART}:{synapse.server_name}"
    config = with_moderation_user(configure(scene))
    async with running_service(config) as service:
        await open_group_room(scene)  # the bot (50) may not change power levels here

        async def not_seated():
            _status, body = await health(service)
            return body["checks"]["moderation_user"]["not_seated"].get(scene.group)

        why = await until(not_seated, what="the room where it cannot act, on /health")
        assert f"give {moderation} power level 50" in why
        told = await until(
            lambda: scene.staff_matching(lambda text: "cannot act in" in text),
            what="staff told where the moderation user cannot act",
        )
        assert f"{moderation} cannot act in {scene.group}" in told[0]
        assert f"give {moderation} power level 50" in told[0]
        said = await scene.member.send_text(scene.group, "I can't do this any more")
        await scene.moderator.react(scene.group, said, "🚨")
        await until(lambda: kick_event(scene, scene.member), what="the removal, by the bot")

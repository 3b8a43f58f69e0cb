"""The referral end to end against a real Synapse: flag → DM → removal → staff alert → record."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from bot.store import ready_rooms
from tests.support.matrix_user import q
from tests.support.scene import (
    BOT,
    build_scene,
    export_json,
    fetch,
    health,
    open_group_room,
    running_service,
    scene_config,
    until,
)

pytestmark = pytest.mark.synapse


@pytest.fixture
async def scene(synapse, tmp_path):
    scene = await build_scene(synapse, tmp_path)
    yield scene


def configure(scene, **policy):
    return scene_config(scene, policy=policy)


async def removed(scene, user) -> bool:
    return await scene.membership(scene.group, user) == "leave"


async def dm_with_notice(scene) -> tuple[str, dict]:
    room = await until(scene.dm_room_of_member, what="the DM invite")
    await scene.member.join(room)
    (notice,) = await until(lambda: scene.bot_messages(scene.member, room), what="the notice")
    return room, notice


async def test_reaction_flag_end_to_end(scene):
    config = configure(scene)
    async with running_service(config) as service:
        await open_group_room(scene)
        said = await scene.member.send_text(scene.group, "I don't want to be here any more")
        await scene.moderator.react(scene.group, said, "🚨")

        await until(lambda: removed(scene, scene.member), what="the member's removal")
        _dm, notice = await dm_with_notice(scene)
        body = notice["content"]["body"]
        for resource in ("Samaritans", "116 123", "Shout", "999"):
            assert resource in body
        kick = next(
            e
            for e in reversed(await scene.owner.messages(scene.group))
            if e["type"] == "m.room.member" and e.get("state_key") == scene.member.user_id
        )
        assert kick["sender"] == BOT
        assert notice["origin_server_ts"] <= kick["origin_server_ts"], "told before removal"
        alert = await until(
            lambda: scene.staff_matching(lambda m: m.startswith("Case #1")),
            what="the staff alert",
        )
        assert scene.member.user_id in alert[0]
        _status, metrics = await fetch(service, "/metrics")
        assert 'safeguard_flags_total{outcome="accepted"} 1.0' in metrics
        assert 'safeguard_steps_total{status="done",step="remove"} 1.0' in metrics
        assert "safeguard_step_seconds_bucket" in metrics
        assert "safeguard_audit_entries " in metrics

    (case,) = (await export_json(config, "--format", "json"))["cases"]
    assert case["member"] == scene.member.user_id and case["room"] == scene.group
    kinds = [entry["kind"] for entry in case["entries"]]
    assert kinds[:4] == ["flagged", "step.notify", "step.remove", "step.alert"]
    assert "step.alert" in kinds
    assert case["entries"][0]["personal"]["flag_event"]


async def invite_event(user, room: str) -> dict:
    """The member's own invite into `room`, as their client sees it before joining."""
    nonce = uuid.uuid4().hex  # Synapse caches identical /sync requests
    sync = await user.request(
        "GET",
        "/_matrix/client/v3/sync",
        filter=f'{{"room":{{"timeline":{{"limit":1,"not_types":["x.{nonce}"]}}}}}}',
        timeout="0",
    )
    events = sync["rooms"]["invite"][room]["invite_state"]["events"]
    return next(
        e for e in events if e["type"] == "m.room.member" and e["state_key"] == user.user_id
    )


async def ready_room_ids(service) -> set[str]:
    async with service.engine.connect() as conn:
        return {room.room_id for room in await ready_rooms.all_rooms(conn) if room.room_id}


async def test_the_notice_comes_in_a_room_made_ahead_invited_as_a_dm(scene):
    config = configure(scene, ready_dm_rooms=2)
    async with running_service(config) as service:
        await open_group_room(scene)
        await until(lambda: service.ready_rooms.ready == 2 or None, what="two DM rooms made ahead")
        made = await ready_room_ids(service)
        assert len(made) == 2
        status, report = await health(service)
        assert status == 200
        assert report["checks"]["ready_dm_rooms"] == {"ok": True, "ready": 2, "wanted": 2}
        said = await scene.member.send_text(scene.group, "I don't want to be here any more")
        await scene.moderator.react(scene.group, said, "🚨")
        await until(lambda: removed(scene, scene.member), what="the member's removal")

        room = await until(scene.dm_room_of_member, what="the DM invite")
        assert room in made, "the notice's room was made before the flag"
        invite = await invite_event(scene.member, room)
        assert invite["sender"] == BOT and invite["content"]["membership"] == "invite"
        assert invite["content"]["is_direct"] is True, "their client shows it as a DM"
        _dm, notice = await dm_with_notice(scene)
        assert "116 123" in notice["content"]["body"]
        members = await scene.member.members(room)
        assert members == {BOT: "join", scene.member.user_id: "join"}, "no one else, ever"

        # Another is made in its place, off the flag's path; the taken one is never reused.
        async def refilled() -> set[str] | None:
            now = await ready_room_ids(service)
            return now if len(now) == 2 and room not in now else None

        assert (await until(refilled, what="the pool refilled")) >= made - {room}


async def test_reply_and_user_command_flags(scene):
    async with running_service(configure(scene)):
        await open_group_room(scene)
        said = await scene.member.send_text(scene.group, "goodbye everyone")
        await scene.moderator.send_text(
            scene.group,
            f"> <{scene.member.user_id}> goodbye everyone\n\n!safeguard they said goodbye",
            reply_to=said,
        )
        await until(lambda: removed(scene, scene.member), what="removal by reply command")
        # The user form, with an Element pill whose plain body has only the display name.
        other = await scene.synapse.new_user("other")
        await scene.owner.invite(scene.group, other.user_id)
        await other.join(scene.group)
        await scene.moderator.send_text(
            scene.group,
            "!safeguard other please",
            formatted_body=(
                f'!safeguard <a href="https://matrix.to/#/{other.user_id}">other</a> please'
            ),
            mentions=[other.user_id],
        )
        await until(lambda: removed(scene, other), what="removal by user command with a pill")


async def test_non_moderator_flag_does_nothing_and_is_reported(scene):
    async with running_service(configure(scene)):
        await open_group_room(scene)
        bystander = await scene.synapse.new_user("bystander")
        await scene.owner.invite(scene.group, bystander.user_id)
        await bystander.join(scene.group)
        said = await scene.member.send_text(scene.group, "hello")
        await bystander.react(scene.group, said, "🚨")
        await until(
            lambda: scene.staff_matching(
                lambda m: "not_moderator" in m or "not a moderator" in m.lower()
            ),
            what="the refusal report",
        )
        assert await scene.membership(scene.group, scene.member) == "join"
        assert await scene.member.invited_rooms() == []


async def test_demoted_moderator_cannot_flag(scene):
    async with running_service(configure(scene)):
        await open_group_room(scene)
        await scene.owner.set_power_level(scene.group, scene.moderator.user_id, 0)
        said = await scene.member.send_text(scene.group, "hi")
        await scene.moderator.react(scene.group, said, "🚨")
        await until(
            lambda: scene.staff_matching(lambda m: "refused" in m.lower()),
            what="the refusal report",
        )
        assert await scene.membership(scene.group, scene.member) == "join"


async def test_moderator_cannot_be_flagged(scene):
    async with running_service(configure(scene)):
        await open_group_room(scene)
        second_mod = await scene.synapse.new_user("mod2")
        await scene.owner.invite(scene.group, second_mod.user_id)
        await second_mod.join(scene.group)
        await scene.owner.set_power_level(scene.group, second_mod.user_id, 50)
        said = await second_mod.send_text(scene.group, "I moderate here")
        await scene.moderator.react(scene.group, said, "🚨")
        await until(
            lambda: scene.staff_matching(lambda m: "refused" in m.lower()),
            what="the refusal report",
        )
        assert await scene.membership(scene.group, second_mod) == "join"


async def test_two_moderators_at_once_make_one_case(scene):
    async with running_service(configure(scene)) as service:
        await open_group_room(scene)
        second_mod = await scene.synapse.new_user("mod2")
        await scene.owner.invite(scene.group, second_mod.user_id)
        await second_mod.join(scene.group)
        await scene.owner.set_power_level(scene.group, second_mod.user_id, 50)
        said = await scene.member.send_text(scene.group, "I can't go on")
        await asyncio.gather(
            scene.moderator.react(scene.group, said, "🚨"),
            second_mod.react(scene.group, said, "🚨"),
        )
        await until(lambda: removed(scene, scene.member), what="removal")
        await until(
            lambda: scene.staff_matching(lambda m: m.startswith("Case #1")),
            what="the alert",
        )
        await asyncio.sleep(1.0)  # let any second flag be processed
        async with service.engine.connect() as conn:
            from bot.store import audit, cases

            assert len(await cases.listing(conn)) == 1
            kinds = [e.kind for e in await audit.entries(conn, case_id=1)]
        assert kinds.count("flagged") == 1 and kinds.count("corroborated") == 1
        assert len(await scene.member.invited_rooms()) == 1
        assert not await scene.staff_matching(lambda m: m.startswith("Case #2"))


async def test_dry_run_alerts_only(scene):
    async with running_service(configure(scene, dry_run=True)):
        await open_group_room(scene)
        said = await scene.member.send_text(scene.group, "hello")
        await scene.moderator.react(scene.group, said, "🚨")
        alert = await until(
            lambda: scene.staff_matching(lambda m: m.startswith("Case #1")),
            what="the dry-run alert",
        )
        assert "dry run" in alert[0].lower()
        assert await scene.membership(scene.group, scene.member) == "join"
        assert await scene.member.invited_rooms() == []


async def test_member_who_already_left_is_recorded(scene):
    async with running_service(configure(scene)) as service:
        await open_group_room(scene)
        said = await scene.member.send_text(scene.group, "bye")
        await scene.member.leave(scene.group)
        await scene.moderator.react(scene.group, said, "🚨")
        await until(
            lambda: scene.staff_matching(lambda m: m.startswith("Case #1")),
            what="the alert",
        )
        async with service.engine.connect() as conn:
            from bot.store import cases

            steps = {s.step: s for s in await cases.steps_of(conn, 1)}
        assert steps["remove"].result["already_gone"] is True


async def test_a_banned_member_stays_banned(scene):
    """A member banned just before the flag: the case goes ahead (they are told, staff
    alerted), and the removal never turns the ban into a mere leave (in Matrix a kick of
    a banned user would lift the ban, if the homeserver allowed it)."""
    async with running_service(configure(scene)) as service:
        await open_group_room(scene)
        said = await scene.member.send_text(scene.group, "bye")
        await scene.owner.request(
            "POST",
            f"/_matrix/client/v3/rooms/{q(scene.group)}/ban",
            {"user_id": scene.member.user_id, "reason": "spam"},
        )
        await scene.moderator.react(scene.group, said, "🚨")
        await until(
            lambda: scene.staff_matching(lambda m: m.startswith("Case #1")), what="the alert"
        )
        async with service.engine.connect() as conn:
            from bot.store import cases

            steps = {s.step: s for s in await cases.steps_of(conn, 1)}
        assert steps["remove"].status == "done"
        assert await scene.membership(scene.group, scene.member) == "ban"


async def test_rejoined_member_flagged_again_opens_a_new_case(scene):
    async with running_service(configure(scene)):
        await open_group_room(scene)
        said = await scene.member.send_text(scene.group, "first time")
        await scene.moderator.react(scene.group, said, "🚨")
        await until(lambda: removed(scene, scene.member), what="first removal")
        await scene.owner.invite(scene.group, scene.member.user_id)
        await scene.member.join(scene.group)
        said = await scene.member.send_text(scene.group, "second time")
        await asyncio.sleep(0.5)  # the rejoin is processed before the next flag
        await scene.moderator.react(scene.group, said, "🚨")
        await until(
            lambda: scene.staff_matching(lambda m: m.startswith("Case #2")),
            what="a second case",
        )


async def test_member_reply_in_dm_is_relayed_to_staff(scene):
    async with running_service(configure(scene)):
        await open_group_room(scene)
        said = await scene.member.send_text(scene.group, "help")
        await scene.moderator.react(scene.group, said, "🚨")
        dm, _ = await dm_with_notice(scene)
        await scene.member.send_text(dm, "ok I will call them")
        await until(
            lambda: scene.staff_matching(lambda m: "Case #1" in m and "ok I will call them" in m),
            what="the relayed reply",
        )


async def test_bot_reports_joining_a_room_and_its_kick_power(scene):
    async with running_service(configure(scene)):
        await open_group_room(scene)
        joined = await until(
            lambda: scene.staff_matching(lambda m: f"{scene.staff.user_id} added me" in m),
            what="the room-joined report",
        )
        assert "can remove" in joined[0].lower()
        await scene.owner.set_power_level(scene.group, BOT, 0)
        await until(
            lambda: scene.staff_matching(
                lambda m: "cannot remove" in m.lower() or "no longer" in m.lower()
            ),
            what="the lost-power report",
        )


async def test_undeliverable_notice_holds_the_removal_until_staff_decide(scene):
    """The member blocks all invites (MSC4380): Synapse refuses the DM. They are never removed
    untold by the bot on its own: staff hear at once, with the truth, and decide."""
    async with running_service(configure(scene)):
        await open_group_room(scene)
        await scene.member.request(
            "PUT",
            f"/_matrix/client/v3/user/{scene.member.user_id}/account_data/"
            "m.invite_permission_config",
            {"default_action": "block"},
        )
        said = await scene.member.send_text(scene.group, "leave me alone")
        await scene.moderator.react(scene.group, said, "🚨")
        alert = await until(
            lambda: scene.staff_matching(lambda m: m.startswith("Case #1")), what="the alert"
        )
        first_line = alert[0].splitlines()[0]
        assert "NOT notified" in first_line and "M_INVITE_BLOCKED" in first_line
        assert "reach them another way" in alert[0]
        assert "!case 1 remove" in alert[0] and "!case 1 notify" in alert[0]
        assert await scene.membership(scene.group, scene.member) == "join", "not removed untold"

        await scene.staff.send_text(scene.staff_room, "!case 1 remove")
        await until(lambda: removed(scene, scene.member), what="the removal staff decided")
        kick = next(
            e
            for e in reversed(await scene.owner.messages(scene.group))
            if e["type"] == "m.room.member" and e.get("state_key") == scene.member.user_id
        )
        # The room learns nothing from the reason.
        assert kick["content"]["reason"] == "Removed by a moderator"
        update = await until(
            lambda: scene.staff_matching(lambda m: "as staff decided" in m),
            what="staff told the removal is done",
        )
        assert update[0].startswith("Case #1: they have now been removed from the room")


async def test_a_reaction_to_an_absurd_event_id_holds_nothing_up(scene):
    """70,000 characters of event id: not a flag (no homeserver call chokes on it).

    Synapse refuses such a reaction from a client, so it comes the way a homeserver
    (or anyone with the hs_token) could deliver it: in a transaction.
    """
    from tests.support.appservice_api import put

    config = configure(scene)
    async with running_service(config) as service:
        await open_group_room(scene)
        absurd = {
            "event_id": "$absurd-relation",
            "room_id": scene.group,
            "type": "m.reaction",
            "sender": scene.moderator.user_id,
            "origin_server_ts": 1,
            "content": {
                "m.relates_to": {
                    "rel_type": "m.annotation",
                    "event_id": "$" + "x" * 70_000,
                    "key": "🚨",
                }
            },
        }
        assert (await put(service, "absurd", {"events": [absurd]}))[0] == 200
        said = await scene.member.send_text(scene.group, "I'm not ok")
        await scene.moderator.react(scene.group, said, "🚨")
        await until(lambda: removed(scene, scene.member), what="the real flag behind it")
        async with service.engine.connect() as conn:
            from bot.store import audit

            kinds = [e.kind for e in await audit.entries(conn)]
        assert "event_failed" not in kinds and kinds.count("flagged") == 1

"""The bot cannot be turned against anyone: tried as a hostile user would, against real Synapse.

- a plain user's own room (they are its creator, so a "moderator" there): the bot
  declines the invite and staff are told who tried;
- a target who is not in the room: refused, nothing sent to them;
- a flood of refused flags: each recorded, staff told once a window, a real flag
  still acted on (its timing is measured by bench/storm.py, not here);
- a staff-room alias moved to a squatter's room: the pinned room stays;
- DEBUG logs: no chat text, no tokens.
"""

from __future__ import annotations

import asyncio
import io
import logging
from urllib.parse import quote

import pytest
import yaml

from appservice.logs import setup_logging
from bot.store import audit, ingest
from tests.support.matrix_user import q
from tests.support.proxy import HoldingProxy
from tests.support.scene import (
    BOT,
    build_scene,
    entries,
    export_json,
    health,
    open_group_room,
    running_service,
    scene_config,
    until,
)

pytestmark = pytest.mark.synapse


def configure(scene, **policy):
    return scene_config(scene, policy=policy)


async def test_a_plain_users_own_room_gets_nothing_from_the_bot(synapse, tmp_path):
    scene = await build_scene(synapse, tmp_path)
    mallory = await synapse.new_user("mallory")
    victim = await synapse.new_user("victim")
    async with running_service(configure(scene)) as service:
        room = await mallory.create_room(name="Trap", invite=[BOT, victim.user_id])
        await victim.join(room)

        async def declined() -> bool:
            return (await mallory.members(room)).get(BOT) == "leave"

        await until(declined, what="the bot to decline the invite")
        report = await until(
            lambda: scene.staff_matching(lambda m: f"{mallory.user_id} tried to add me" in m),
            what="staff told who tried",
        )
        assert room in report[0]
        said = await victim.send_text(room, "hello")
        await mallory.react(room, said, "🚨")
        await mallory.send_text(room, f"!safeguard {victim.user_id}")
        await until(lambda: entries(service, "invite_refused"), what="the refusal's record")
        await asyncio.sleep(2)
        assert await victim.invited_rooms() == [], "no crisis DM to the victim"
        assert not await scene.staff_matching(lambda m: m.startswith("Case #"))


async def test_staff_can_always_invite_and_operators_can_widen_it(synapse, tmp_path):
    scene = await build_scene(synapse, tmp_path)
    config = configure(scene)
    data = yaml.safe_load(config.read_text())
    data["appservice"]["allowed_inviters"] = [scene.owner.user_id]
    config.write_text(yaml.safe_dump(data))
    async with running_service(config):
        room = await scene.owner.create_room(name="Listed", invite=[BOT])

        async def joined() -> bool:
            return (await scene.owner.members(room)).get(BOT) == "join"

        await until(joined, what="the bot to accept a listed inviter")


async def test_a_room_the_bot_cannot_join_is_told_to_staff(synapse, tmp_path):
    """Staff invite the bot, and the invite is withdrawn before it joins: Synapse refuses
    the join; staff learn that room is not watched, rather than assume it is."""
    scene = await build_scene(synapse, tmp_path)
    proxy = HoldingProxy(synapse.url)
    await proxy.start()
    config = scene_config(
        scene,
        homeserver_url=proxy.url,
    )
    try:
        async with running_service(config) as service:
            proxy.hold(lambda request: "/join" in request.path)
            room = await scene.staff.create_room(name="Withdrawn", invite=[BOT])
            await asyncio.wait_for(proxy.held_event.wait(), 30)
            await scene.staff.request(
                "POST", f"/_matrix/client/v3/rooms/{q(room)}/kick", {"user_id": BOT}
            )
            proxy.release()
            told = await until(
                lambda: scene.staff_matching(lambda m: "could not join" in m),
                what="staff told the bot could not join",
            )
            assert room in told[0] and scene.staff.user_id in told[0]
            assert (await scene.staff.members(room)).get(BOT) != "join"
            (failed,) = await entries(service, "join_failed")
            assert failed.personal["room"] == room
    finally:
        await proxy.stop()


async def test_only_people_in_the_room_can_be_flagged(synapse, tmp_path):
    scene = await build_scene(synapse, tmp_path)
    outsider = await synapse.new_user("outsider")
    async with running_service(configure(scene, recent_leave="3s")) as service:
        await open_group_room(scene)
        # Never in the room; and someone who does not exist at all.
        await scene.moderator.send_text(scene.group, f"!safeguard {outsider.user_id}")
        await scene.moderator.send_text(scene.group, "!safeguard @nobody-at-all:localhost")
        refused = await until(
            lambda: _refusals(service, "not_in_room", 2), what="two not_in_room refusals"
        )
        assert {e.personal["member"] for e in refused} == {
            outsider.user_id,
            "@nobody-at-all:localhost",
        }
        assert await outsider.invited_rooms() == [], "nothing sent to them"
        # Someone who left just now is still told, and staff alerted; no removal needed.
        said = await scene.member.send_text(scene.group, "I'm done with all this")
        await scene.member.leave(scene.group)
        await scene.moderator.react(scene.group, said, "🚨")
        alert = await until(
            lambda: scene.staff_matching(lambda m: m.startswith("Case #1")), what="the alert"
        )
        assert "already left" in alert[0]
        assert len(await scene.member.invited_rooms()) == 1, "they were told"
        # Someone who left longer ago than policy.recent_leave: a refusal.
        other = await synapse.new_user("left-long-ago")
        await scene.owner.invite(scene.group, other.user_id)
        await other.join(scene.group)
        said = await other.send_text(scene.group, "bye for now")
        await other.leave(scene.group)
        await asyncio.sleep(4)
        await scene.moderator.react(scene.group, said, "🚨")
        await until(lambda: _refusals(service, "not_in_room", 3), what="a third refusal")
        assert await other.invited_rooms() == []


async def _refusals(service, code: str, count: int) -> list[audit.AuditEntry] | None:
    found = [e for e in await entries(service, "refused") if e.facts.get("code") == code]
    return found if len(found) >= count else None


async def test_a_flood_of_refused_flags_is_recorded_coalesced_and_holds_no_flag_up(
    synapse, tmp_path
):
    scene = await build_scene(synapse, tmp_path)
    troll = await synapse.new_user("troll")
    async with running_service(configure(scene, refusal_report_every="3s")) as service:
        await open_group_room(scene)
        await scene.owner.invite(scene.group, troll.user_id)
        await troll.join(scene.group)
        # Synapse refuses a second identical reaction from one user: 60 different targets.
        targets = [await scene.member.send_text(scene.group, f"m{n}") for n in range(60)]
        storm = [troll.react(scene.group, target, "🚨") for target in targets]
        await asyncio.gather(*storm)
        real = await scene.member.send_text(scene.group, "I have a plan to end it")
        await scene.moderator.react(scene.group, real, "🚨")

        async def removed() -> bool:
            return await scene.membership(scene.group, scene.member) == "leave"

        await until(removed, within=30, what="the real flag's removal amid the storm")
        await until(lambda: _refusals(service, "not_moderator", 60), what="all 60 recorded")
        first = await scene.staff_matching(lambda m: m.startswith("Flag refused"))
        assert len(first) == 1, "staff told once, at once"
        summary = await until(
            lambda: scene.staff_matching(lambda m: "59 more flag(s)" in m),
            within=60,
            what="one summary when the window ends",
        )
        assert troll.user_id in summary[0]


async def test_a_moved_staff_room_alias_does_not_move_the_staff_room(synapse, tmp_path):
    scene = await build_scene(synapse, tmp_path, staff_room=False)
    alias_name = f"staff-{tmp_path.name}"
    alias = f"#{alias_name}:{synapse.server_name}"
    scene.staff_room = await scene.staff.create_room(name="Staff", alias=alias_name, invite=[BOT])
    config = scene_config(
        scene,
        staff_room=alias,
    )
    mallory = await synapse.new_user("mallory")
    async with running_service(config) as service:

        async def staff_room_joined() -> bool:
            return (await scene.staff.members(scene.staff_room)).get(BOT) == "join"

        await until(staff_room_joined, what="the staff room joined")
    # Meanwhile, the alias is pointed at a room a squatter made (and invites the bot to).
    squat = await mallory.create_room(name="Staff (real, honest)", invite=[BOT])
    await scene.staff.request("DELETE", f"/_matrix/client/v3/directory/room/{q(alias)}")
    await mallory.request(
        "PUT", f"/_matrix/client/v3/directory/room/{q(alias)}", {"room_id": squat}
    )
    async with running_service(config) as service:
        _status, body = await until(
            lambda: _unhealthy(service), what="/health to report the moved alias"
        )
        assert "now points to" in body["checks"]["staff_room"]["problem"]
        assert body["checks"]["staff_room"]["room"] == scene.staff_room
        assert (await mallory.members(squat)).get(BOT) != "join", "the squat is not joined"
        await open_group_room(scene)
        said = await scene.member.send_text(scene.group, "help me")
        await scene.moderator.react(scene.group, said, "🚨")
        await until(
            lambda: scene.staff_matching(lambda m: m.startswith("Case #1")),
            what="the alert in the pinned staff room",
        )
        squat_events = await mallory.messages(squat)
        assert not [
            e for e in squat_events if e.get("sender") == BOT and e["type"] == "m.room.message"
        ]


async def _unhealthy(service):
    status, body = await health(service)
    return (status, body) if not body["checks"]["staff_room"]["ok"] else None


async def test_debug_logs_hold_no_chat_text_and_no_tokens(synapse, tmp_path):
    scene = await build_scene(synapse, tmp_path)
    config = configure(scene)
    captured = io.StringIO()
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    setup_logging("DEBUG", "text")
    capture = logging.StreamHandler(captured)
    capture.setFormatter(root.handlers[0].formatter)  # the service's own, as it logs
    root.addHandler(capture)
    try:
        async with running_service(config) as service:
            await open_group_room(scene)
            said = await scene.member.send_text(scene.group, "SECRET-CHAT-TEXT nobody may log")
            await scene.moderator.send_text(
                scene.group, "!safeguard SECRET-REASON they said so", reply_to=said
            )
            dm = await until(scene.dm_room_of_member, what="the DM")
            await scene.member.join(dm)
            await scene.member.send_text(dm, "SECRET-RELAYED-REPLY please help")
            await until(
                lambda: scene.staff_matching(lambda m: "SECRET-RELAYED-REPLY" in m),
                what="the relayed reply",
            )
            tokens = (service.registration.as_token, service.registration.hs_token)
            # A line such as an outage's names the room it waits on: as a pseudonym.
            logging.getLogger("appservice.homeserver").warning(
                "homeserver unavailable for %s", f"/rooms/{quote(scene.group, safe='')}/kick"
            )
    finally:
        root.handlers[:] = saved[1]
        root.setLevel(saved[0])
    text = captured.getvalue()
    assert "INFO bot.cases.engine: case #1: notify done" in text, "the capture works"
    for secret in ("SECRET-CHAT-TEXT", "SECRET-RELAYED-REPLY", "SECRET-REASON", *tokens):
        assert secret not in text, f"{secret[:12]}… reached the logs"
    # No one is named either: ids are keyed pseudonyms, as written or URL-encoded.
    people = (scene.member.user_id, scene.moderator.user_id, scene.staff.user_id)
    for matrix_id in (*people, scene.group, scene.staff_room, dm):
        for written in (matrix_id, quote(matrix_id, safe="")):
            assert written not in text, f"{matrix_id} reached the logs"


async def test_rooms_lists_and_leaves(synapse, tmp_path):
    scene = await build_scene(synapse, tmp_path)
    async with running_service(configure(scene)) as service:
        await open_group_room(scene)
        listing = await _command(scene, "!rooms")
        assert scene.group in listing and scene.staff.user_id in listing
        assert "can remove members: yes" in listing and "can redact: yes" in listing
        left = await _command(scene, f"!rooms leave {scene.group}")
        assert "I have left" in left

        async def gone() -> bool:
            return (await scene.owner.members(scene.group)).get(BOT) == "leave"

        await until(gone, what="the bot to leave")
        assert await entries(service, "room_left")
        assert "moderate no rooms" in await _command(scene, "!rooms")
        await asyncio.sleep(1)  # the bot's own leave event has come back by now
        assert await entries(service, "bot_removed") == [], "its own leave, recorded once"


async def test_staff_are_told_when_someone_removes_the_bot(synapse, tmp_path):
    scene = await build_scene(synapse, tmp_path)
    async with running_service(configure(scene)) as service:
        await open_group_room(scene)
        await scene.owner.kick(scene.group, BOT, "not wanted")
        told = await until(
            lambda: scene.staff_matching(lambda m: "removed me from" in m), what="staff told"
        )
        assert scene.owner.user_id in told[0] and "flags there will not reach me" in told[0]
        assert f"Group chat ({scene.group})" in told[0], "the room named as staff know it"
        (removed,) = await entries(service, "bot_removed")
        assert removed.facts["moderated"] is True
        assert "moderate no rooms" in await _command(scene, "!rooms")
    document = await export_json(config_of(scene))
    assert "refusals" in document


def config_of(scene):
    return scene.directory / "config.yaml"


async def _command(scene, text: str) -> str:
    sent = await scene.staff.send_text(scene.staff_room, text)

    async def reply():
        for event in await scene.bot_messages(scene.staff, scene.staff_room):
            relation = event["content"].get("m.relates_to", {})
            if relation.get("m.in_reply_to", {}).get("event_id") == sent:
                return event["content"]["body"]
        return None

    return await until(reply, what=f"the reply to {text!r}")


async def test_someone_only_invited_cannot_be_flagged(synapse, tmp_path):
    """Anyone who can invite could otherwise make the bot send any user of the homeserver a
    crisis DM, and staff an alert about them: a flag needs the person in the room."""
    scene = await build_scene(synapse, tmp_path)
    stranger = await synapse.new_user("stranger")
    refuser = await synapse.new_user("refuser")
    async with running_service(configure(scene)) as service:
        await open_group_room(scene)
        await scene.moderator.invite(scene.group, stranger.user_id)
        await scene.moderator.invite(scene.group, refuser.user_id)
        await refuser.leave(scene.group)  # an invite refused: never in the room
        await scene.moderator.send_text(scene.group, f"!safeguard {stranger.user_id}")
        await scene.moderator.send_text(scene.group, f"!safeguard {refuser.user_id}")
        refused = await until(
            lambda: _two(entries(service, "refused")), what="both flags refused and recorded"
        )
        details = sorted(e.personal["detail"] for e in refused)
        assert "only invited to that room" in details[1] and "never in that room" in details[0]
        await asyncio.sleep(1)
        assert await stranger.invited_rooms() == [scene.group], "no crisis DM"
        assert not await scene.staff_matching(lambda m: m.startswith("Case #"))


async def test_someone_banned_before_ever_joining_cannot_be_flagged(synapse, tmp_path):
    """A moderator can ban any user of any homeserver, in the room or not: a ban must not
    make a stranger someone who "left lately", or anyone could be sent a crisis DM."""
    scene = await build_scene(synapse, tmp_path)
    stranger = await synapse.new_user("banned-stranger")
    async with running_service(configure(scene)) as service:
        await open_group_room(scene)
        await scene.moderator.request(
            "POST",
            f"/_matrix/client/v3/rooms/{quote(scene.group, safe='')}/ban",
            {"user_id": stranger.user_id, "reason": "spam"},
        )
        await scene.moderator.send_text(scene.group, f"!safeguard {stranger.user_id}")
        (refused,) = await until(
            lambda: _refusals(service, "not_in_room", 1), what="the flag refused"
        )
        assert "banned while not in it" in refused.personal["detail"]
        await asyncio.sleep(1)
        assert await stranger.invited_rooms() == [], "no crisis DM"
        assert not await scene.staff_matching(lambda m: m.startswith("Case #"))


async def _two(found):
    entries_found = await found
    return entries_found if len(entries_found) == 2 else None


async def test_someone_kicked_from_the_staff_room_is_staff_no_more(synapse, tmp_path):
    """Their power level stays in the staff room's state; they may not put the bot in a
    room any more (nor command it). Being in the staff room is what staff are."""
    scene = await build_scene(synapse, tmp_path)
    former = await synapse.new_user("former")
    await scene.staff.invite(scene.staff_room, former.user_id)
    await former.join(scene.staff_room)
    await scene.staff.set_power_level(scene.staff_room, former.user_id, 50)
    config = configure(scene)
    data = yaml.safe_load(config.read_text())
    data["policy"]["staff"] = []  # staff by the staff room's power levels alone
    data["policy"]["staff_power_level"] = 50
    config.write_text(yaml.safe_dump(data))
    async with running_service(config) as service:

        async def bot_in(user, room: str) -> bool:
            return (await user.members(room)).get(BOT) == "join"

        await until(lambda: bot_in(scene.staff, scene.staff_room), what="the bot in the room")
        still = await former.create_room(name="While staff", invite=[BOT])
        await until(lambda: bot_in(former, still), what="a staff member's invite accepted")
        await scene.staff.kick(scene.staff_room, former.user_id)
        room = await former.create_room(name="After", invite=[BOT])

        async def declined() -> bool:
            return (await former.members(room)).get(BOT) == "leave"

        await until(declined, what="the former staff member's invite declined")

        async def refused_theirs() -> bool:
            # (The session's bot may have invites other tests left pending: refused too.)
            refused = await entries(service, "invite_refused")
            return any(e.personal["inviter"] == former.user_id for e in refused)

        await until(refused_theirs, what="its record")


async def test_a_squatter_cannot_become_the_staff_room(synapse, tmp_path):
    """policy.staff_room is an alias nobody created yet: anyone may create it, on a public
    room of theirs. The service never takes that room: no alert, no relayed reply, no
    command obeyed there; /health says why; the member is still told and removed."""
    scene = await build_scene(synapse, tmp_path, staff_room=False)
    squatter = await synapse.new_user("squatter")
    alias_name = f"staff-{tmp_path.name[-20:]}"
    squatted = await squatter.create_room(name="Staff", preset="public_chat", alias=alias_name)
    config = scene_config(scene, staff_room=f"#{alias_name}:{synapse.server_name}")
    async with running_service(config) as service:
        check = await until(
            lambda: _staff_room_refused(service), what="/health to say why the room was not taken"
        )
        assert "anyone can join it" in check["problem"]
        await open_group_room(scene)
        said = await scene.member.send_text(scene.group, "nobody cares")
        await scene.moderator.react(scene.group, said, "🚨")
        await until(lambda: _left_group(scene), what="the member removed all the same")
        await squatter.send_text(squatted, "!case list")
        await asyncio.sleep(3)
        sent = [e for e in await squatter.messages(squatted) if e.get("sender") == BOT]
        assert [e["type"] for e in sent if e["type"] != "m.room.member"] == [], "nothing there"
        assert (await squatter.members(squatted)).get(BOT) in (None, "leave")
        assert service.staff_room.room_id is None, "never pinned"


async def test_a_room_naming_a_staff_member_admin_without_them_is_not_the_staff_room(
    synapse, tmp_path
):
    """An invite-only room of the squatter's, on the alias, with a staff member given power
    100 there (which needs nobody's consent) and never joined: not taken, never pinned."""
    scene = await build_scene(synapse, tmp_path, staff_room=False)
    squatter = await synapse.new_user("squatter-admin")
    alias_name = f"staff-{tmp_path.name[-20:]}"
    squatted = await squatter.create_room(name="Staff", invite=[BOT], alias=alias_name)
    await squatter.set_power_level(squatted, scene.staff.user_id, 100)
    config = scene_config(scene, staff_room=f"#{alias_name}:{synapse.server_name}")
    async with running_service(config) as service:
        check = await until(
            lambda: _staff_room_refused(service), what="/health to say why the room was not taken"
        )
        assert "who has joined it" in check["problem"]
        assert service.staff_room.room_id is None, "never pinned"
        assert (await squatter.members(squatted)).get(BOT) in (None, "leave", "invite")


async def _staff_room_refused(service) -> dict | None:
    """/health's staff_room check, once it says the alias's room was not taken."""
    _status, body = await health(service)
    check = body["checks"]["staff_room"]
    return check if "not a staff room" in check.get("problem", "") else None


async def _left_group(scene) -> bool:
    return await scene.membership(scene.group, scene.member) == "leave"


async def test_a_flag_removed_before_the_bot_reached_it_is_not_acted_on(synapse, tmp_path):
    """A moderator's 🚨 by mistake, taken back at once, while flags queue (the flag lane
    held here): the member gets nothing, and the record says why."""
    scene = await build_scene(synapse, tmp_path)
    # The push, not the safety net, is what this is about: a push Synapse holds back a
    # while (backing off from the last test's service) is waited for, not caught up
    # first by the sync, which would find the reaction already redacted (no flag).
    config = scene_config(scene, reconcile={"settle": "60s"})
    async with running_service(config) as service:
        await open_group_room(scene)
        # The safety net's start (a catch-up of every room) over, and pushes flowing.
        await until(lambda: service.catch_up.rounds >= 1, within=60, what="the first sync")
        probe = await scene.owner.send_text(scene.group, "hello")

        async def pushed() -> bool:
            async with service.engine.connect() as conn:
                return not await ingest.not_seen(conn, {probe})

        await until(pushed, within=60, what="a push")
        await service.flag_worker.stop()  # a backlog: the flag waits its turn
        said = await scene.member.send_text(scene.group, "I'm fine really")
        reaction = await scene.moderator.react(scene.group, said, "🚨")
        await scene.moderator.request(
            "PUT",
            f"/_matrix/client/v3/rooms/{q(scene.group)}/redact/{q(reaction)}/undo",
            {"reason": "wrong message"},
        )

        async def both_queued() -> bool:
            async with service.engine.connect() as conn:
                pending = await ingest.pending(conn)
            return {item.event_type for item in pending} >= {"m.reaction", "m.room.redaction"}

        await until(both_queued, within=60, what="the flag and its removal delivered")
        service.flag_worker.start()
        withdrawn = await until(lambda: entries(service, "flag_withdrawn"), what="the record")
        assert withdrawn[0].facts["event"] == reaction
        await asyncio.sleep(1)
        assert await scene.member.invited_rooms() == [], "no DM"
        assert await scene.membership(scene.group, scene.member) == "join", "not removed"

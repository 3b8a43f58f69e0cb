"""Two communities on one install, against a real Synapse: each room is its community's,
a flag there is decided by that community's settings and told in its language to its
staff alone, and each staff room sees its own cases as if the other's did not exist."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bot.store import cases
from tests.support.scene import (
    BOT,
    build_scene,
    health,
    open_group_room,
    running_service,
    safeguard_cli,
    scene_config,
    until,
)

pytestmark = pytest.mark.synapse


def two_communities(
    scene, staff_b, staff_room_b: str, *, space: str | None = None, staff_of_both: str = ""
) -> Path:
    """The scene's config with its staff room and staff as community `england`'s, and a
    second, Welsh community `wales` with its own staff and staff room."""
    path = scene_config(scene)
    config = yaml.safe_load(path.read_text())
    policy = config["policy"]
    england = {
        "id": "england",
        "name": "Young Voices",
        "staff_room": policy.pop("staff_room"),
        "staff": [*policy.pop("staff"), *filter(None, [staff_of_both])],
    }
    wales = {
        "id": "wales",
        "name": "Young Voices Cymru",
        "staff_room": staff_room_b,
        "staff": [staff_b.user_id, *filter(None, [staff_of_both])],
        "language": "cy",
        "region": "GB-WLS",
        "policy": {"reactions": ["🆘"]},
        **({"space": space} if space else {}),
    }
    config["communities"] = [england, wales]
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    return path


async def case_of(service, number: int) -> cases.Case:
    async with service.engine.connect() as conn:
        case = await cases.get(conn, number)
    assert case is not None
    return case


async def texts_to(user, room: str, matching=lambda text: True) -> list[str]:
    """What the bot said in the room, as `user` reads it (those `matching`)."""
    return [
        body
        for e in await user.messages(room)
        if e.get("sender") == BOT and e.get("type") == "m.room.message"
        if matching(body := e["content"].get("body", ""))
    ]


async def england_and_wales(synapse, tmp_path):
    """The scene (England's) and Wales's staff and staff room: (scene, staff_b,
    staff_room_b, the config of both)."""
    scene = await build_scene(synapse, tmp_path)
    staff_b = await synapse.new_user("staff-cymru")
    staff_room_b = await staff_b.create_room(name="Staff Cymru", invite=[BOT])
    return scene, staff_b, staff_room_b, two_communities(scene, staff_b, staff_room_b)


async def community_is(service, room: str, community: str) -> None:
    """The room is the community's in the service, once it has taken in its join (Synapse
    shows the bot joined a moment before the service has the join's answer)."""
    await until(
        lambda: service.rooms.community_of(room) == community, what=f"the room {community}'s"
    )


async def welsh_group(scene, staff_b) -> str:
    """A group room Wales's staff add the bot to, the scene's moderator and member in it."""
    group_b = await scene.owner.create_room(
        name="Grŵp",
        preset="private_chat",
        invite=[scene.moderator.user_id, scene.member.user_id, staff_b.user_id],
        power_levels={"users": {scene.moderator.user_id: 50, BOT: 50}},
    )
    for user in (scene.moderator, scene.member, staff_b):
        await user.join(group_b)
    await staff_b.invite(group_b, BOT)  # staff of wales add the bot
    await until(lambda: scene.bot_joined(group_b), what="the bot in the Welsh group")
    return group_b


async def test_two_communities_each_see_their_own_alone(synapse, tmp_path):
    scene, staff_b, staff_room_b, config = await england_and_wales(synapse, tmp_path)
    code, out, err = await safeguard_cli("check-config", "-c", str(config))
    assert code == 0, err
    assert "community wales: language 'cy'" in out, "its unreviewed texts, named"

    async with running_service(config) as service:
        await until(lambda: service.staff_rooms.is_staff_room(staff_room_b), what="room B")
        group_a = await open_group_room(scene)  # staff of england add the bot
        group_b = await welsh_group(scene, staff_b)
        await community_is(service, group_a, "england")
        await community_is(service, group_b, "wales")
        await until(
            lambda: texts_to(staff_b, staff_room_b), what="wales told of its room, in Welsh"
        )

        # England's flag key does nothing in Wales (its own is 🆘): no case, nobody told.
        said = await scene.member.send_text(group_b, "Dw i ddim eisiau bod yma")
        await scene.moderator.react(group_b, said, "🚨")
        await scene.moderator.react(group_b, said, "🆘")
        alert_b = await until(
            lambda: texts_to(staff_b, staff_room_b, lambda t: t.startswith("Achos #")),
            what="the Welsh alert, to Welsh staff",
        )
        assert alert_b[0].startswith("Achos #1"), "one case, from the Welsh key alone"
        assert "ffonia 999" in alert_b[0]
        # Wales's DM with the member is in the bot's m.direct before England's flag, so
        # England's case could reuse it if it did not keep communities apart.
        dm_b = (await case_of(service, 1)).dm_room_id
        await until(
            lambda: dm_b in (service.homeserver.direct_rooms_known(scene.member.user_id) or ()),
            what="Wales's DM in the bot's m.direct",
        )

        said = await scene.member.send_text(group_a, "I can't do this")
        await scene.moderator.react(group_a, said, "🚨")
        alert_a = await until(
            lambda: texts_to(scene.staff, scene.staff_room, lambda t: t.startswith("Case #")),
            what="the English alert, to English staff",
        )
        assert alert_a[0].startswith("Case #2")
        dm_a = (await case_of(service, 2)).dm_room_id
        assert dm_a is not None and dm_a != dm_b, "a DM of its own for each community's case"
        # The same member, two cases, neither staff team told of the other's.
        assert not await texts_to(scene.staff, scene.staff_room, lambda t: "#1" in t)
        assert not await texts_to(staff_b, staff_room_b, lambda t: "#2" in t)

        await scene.staff.send_text(scene.staff_room, "!case 1")
        await staff_b.send_text(staff_room_b, "!case list all")
        await until(
            lambda: texts_to(
                scene.staff, scene.staff_room, lambda t: t.startswith("There is no case #1.")
            ),
            what="Wales's case is no case to England",
        )
        listing = await until(
            lambda: texts_to(staff_b, staff_room_b, lambda t: "#1 " in t and "—" in t),
            what="Wales's listing",
        )
        assert "#2" not in listing[0]
        # Its rooms alone, too.
        await staff_b.send_text(staff_room_b, "!rooms")
        (rooms,) = await until(
            lambda: texts_to(staff_b, staff_room_b, lambda t: "!rooms leave" in t),
            what="Wales's rooms",
        )
        assert "Grŵp" in rooms and "Group chat" not in rooms and group_a not in rooms
        await staff_b.send_text(staff_room_b, f"!rooms leave {group_a}")
        await until(
            lambda: texts_to(staff_b, staff_room_b, lambda t: group_a in t),
            what="England's room is not Wales's to leave",
        )
        assert await scene.bot_joined(group_a), "still in England's room"

        # Someone who is no community's staff adds the bot to a room: whose would it be?
        # Declined, and no staff room is told (the operator's log says why).
        stray = await scene.owner.create_room(name="Somewhere else", invite=[BOT])

        async def declined() -> bool:
            return (await scene.owner.members(stray)).get(BOT) == "leave"

        await until(declined, what="the stray invite declined")
        for user, room in ((scene.staff, scene.staff_room), (staff_b, staff_room_b)):
            assert not await texts_to(user, room, lambda t: stray in t or "Somewhere" in t)

        status, report = await health(service)
        assert status == 200, report
        rooms = report["checks"]["staff_room"]["communities"]
        assert set(rooms) == {"england", "wales"} and all(r["ok"] for r in rooms.values())

    code, out, _ = await safeguard_cli(
        "cases", "list", "-c", str(config), "--community", "wales", "--json"
    )
    (case,) = json.loads(out)["cases"]
    assert case["number"] == 1 and case["community"] == "wales"


async def in_space(owner, space: str, name: str, scene) -> str:
    """A group room in the Space, made by `owner` (staff): the moderator at 50, the bot
    able to kick, members of the Space may join it (the bot among them)."""
    room = await owner.create_room(
        name=name,
        invite=[scene.moderator.user_id, scene.member.user_id],
        power_levels={"users": {scene.moderator.user_id: 50, BOT: 50}},
        initial_state=[
            {
                "type": "m.room.join_rules",
                "state_key": "",
                "content": {
                    "join_rule": "restricted",
                    "allow": [{"type": "m.room_membership", "room_id": space}],
                },
            }
        ],
    )
    await scene.moderator.join(room)
    await scene.member.join(room)
    await owner.put_state(space, "m.space.child", {"via": ["localhost"]}, key=room)
    return room


async def test_a_communitys_space_is_its_rooms_and_followed(synapse, tmp_path):
    """Wales names a Space: the rooms in it are Wales's (the bot joins them as a member
    of the Space), a room added later is too, and England's room put into it stays
    England's, with both staff rooms told."""
    scene = await build_scene(synapse, tmp_path)
    staff_b = await synapse.new_user("staff-cymru")
    staff_room_b = await staff_b.create_room(name="Staff Cymru", invite=[BOT])
    space = await staff_b.create_room(
        name="Cymru", invite=[BOT], creation_content={"type": "m.space"}
    )
    first = await in_space(staff_b, space, "Grŵp un", scene)
    config = two_communities(scene, staff_b, staff_room_b, space=space)

    async def bot_in(room: str) -> bool:
        return (await staff_b.members(room)).get(BOT) == "join"

    async with running_service(config) as service:
        await until(lambda: bot_in(first), what="the bot in the Space's room")
        await until(
            lambda: texts_to(staff_b, staff_room_b, lambda t: "Grŵp un" in t),
            what="Wales told of its room",
        )
        assert service.rooms.community_of(first) == "wales"
        second = await in_space(staff_b, space, "Grŵp dau", scene)
        await until(lambda: bot_in(second), what="the bot in a room added to the Space later")
        await community_is(service, second, "wales")

        said = await scene.member.send_text(second, "Dw i ddim yn iawn")
        await scene.moderator.react(second, said, "🆘")
        await until(
            lambda: texts_to(staff_b, staff_room_b, lambda t: t.startswith("Achos #1")),
            what="the Welsh alert, from the Space's room",
        )

        group_a = await open_group_room(scene)  # England's
        await staff_b.invite(space, scene.staff.user_id)
        await scene.staff.join(space)
        await staff_b.put_state(space, "m.space.child", {"via": ["localhost"]}, key=group_a)
        for user, room in ((scene.staff, scene.staff_room), (staff_b, staff_room_b)):
            await until(
                lambda user=user, room=room: texts_to(
                    user, room, lambda t: "Young Voices Cymru" in t
                ),
                what="both staff rooms told of the room claimed twice",
            )
        assert service.rooms.community_of(group_a) == "england"


async def test_a_space_and_an_alias_not_ready_at_start_are_found_later(synapse, tmp_path):
    """Wales names its Space and lists a room by aliases nobody has made yet: /health says
    so (a flag or an invite there would be no one's), and each is found without a
    restart once staff make the Space and invite the bot into it in one go, and make the
    room; then an invite into the listed room from a member (no one's staff) is taken."""
    scene = await build_scene(synapse, tmp_path)
    staff_b = await synapse.new_user("staff-cymru")
    staff_room_b = await staff_b.create_room(name="Staff Cymru", invite=[BOT])
    path = two_communities(scene, staff_b, staff_room_b, space="#cymru-space:localhost")
    config = yaml.safe_load(path.read_text())
    config["communities"][1]["rooms"] = ["#nes-ymlaen:localhost"]
    path.write_text(yaml.safe_dump(config, allow_unicode=True))

    async def community_rooms() -> dict:
        return (await health(service))[1]["checks"]["community_rooms"]

    def slow_retries(service) -> None:
        # Tried again only after 20 s: the Space's invite, not a retry, must find it.
        service._connect_retry = 20.0

    async with running_service(path, prepare=slow_retries) as service:
        await until(
            lambda: _not_ok_with(community_rooms, "wales", "#nes-ymlaen:localhost"),
            what="/health naming the Space and the alias not resolved",
        )
        status, _ = await health(service)
        assert status == 503

        # Made and the bot invited at once: the invite is the Space's, not a group room's.
        space = await staff_b.create_room(
            name="Cymru", alias="cymru-space", invite=[BOT], creation_content={"type": "m.space"}
        )
        first = await in_space(staff_b, space, "Grŵp un", scene)
        await until(lambda: _bot_in(staff_b, first), what="the bot in the Space's room, no restart")
        await community_is(service, first, "wales")
        assert space not in service.rooms.moderated, "the Space is read, not moderated"
        later = await scene.member.create_room(name="Nes ymlaen", alias="nes-ymlaen")
        await until(
            lambda: _ok(community_rooms),
            within=70,
            what="/health: the Space read, the alias resolved",
        )
        await scene.member.invite(later, BOT)  # a member, no one's staff: a listed room
        await until(lambda: _bot_in(scene.member, later), what="the bot in the listed room")
        await until(lambda: service.rooms.community_of(later) == "wales", what="Wales's room")


async def test_the_bot_removed_from_a_space_shows_until_it_is_invited_back(synapse, tmp_path):
    """Staff remove the bot from Wales's Space: Wales's staff are told, and /health says
    so (rooms added to it now would be no one's), not that the Space is read. Invited
    back, the bot walks it again, and a room added while it was out is Wales's."""
    scene = await build_scene(synapse, tmp_path)
    staff_b = await synapse.new_user("staff-cymru")
    staff_room_b = await staff_b.create_room(name="Staff Cymru", invite=[BOT])
    space = await staff_b.create_room(
        name="Cymru", invite=[BOT], creation_content={"type": "m.space"}
    )
    path = two_communities(scene, staff_b, staff_room_b, space=space)

    async def community_rooms() -> dict:
        return (await health(service))[1]["checks"]["community_rooms"]

    async def removed() -> bool:
        error = (await community_rooms()).get("spaces", {}).get("wales", {}).get("error", "")
        return "removed from it" in error

    async with running_service(path) as service:
        await until(lambda: _ok(community_rooms), what="/health: the Space read")
        await staff_b.kick(space, BOT, "tidying up")
        await until(removed, what="/health: the bot removed from the Space")
        status, _ = await health(service)
        assert status == 503

        async def told_staff() -> list[str]:
            return await texts_to(staff_b, staff_room_b, lambda text: space in text)

        # Wales's staff are told, in Welsh; England's hear nothing of Wales's Space.
        await until(told_staff, what="Wales's staff told the bot was removed from the Space")
        (told,) = await told_staff()
        assert staff_b.user_id in told and "Ofod y gymuned hon" in told
        assert f"Cymru ({space})" in told, "the Space named as staff know it"
        assert not await texts_to(scene.staff, scene.staff_room, lambda text: space in text)
        added = await in_space(staff_b, space, "Grŵp dau", scene)  # while the bot is out
        await staff_b.invite(space, BOT)
        await until(lambda: _bot_in(staff_b, added), what="the room added meanwhile, claimed")
        await community_is(service, added, "wales")
        await until(lambda: _ok(community_rooms), what="/health: the Space read again")


async def _bot_in(user, room: str) -> bool:
    return (await user.members(room)).get(BOT) == "join"


async def _ok(check) -> bool:
    return (await check()).get("ok") is True


async def _not_ok_with(check, community: str, alias: str) -> bool:
    found = await check()
    space = found.get("spaces", {}).get(community, {})
    return (
        found["ok"] is False
        and "does not resolve" in space.get("error", "")
        and alias in found.get("unresolved", {})
    )


async def with_staff_of_both(synapse, tmp_path):
    """England (the scene) and Wales, and someone who is staff of both: (scene, staff_b,
    staff_room_b, both, the config)."""
    scene = await build_scene(synapse, tmp_path)
    staff_b = await synapse.new_user("staff-cymru")
    staff_room_b = await staff_b.create_room(name="Staff Cymru", invite=[BOT])
    both = await synapse.new_user("both")
    config = two_communities(scene, staff_b, staff_room_b, staff_of_both=both.user_id)
    return scene, staff_b, staff_room_b, both, config


async def test_a_room_added_by_staff_of_both_is_asked_about_and_claimed(synapse, tmp_path):
    """Someone who is staff of both communities adds the bot to a room: the bot cannot
    tell whose it is, asks both staff rooms, and joins it as the first to claim it, a
    restart in between (the homeserver would not show the invite again)."""
    scene, staff_b, staff_room_b, both, config = await with_staff_of_both(synapse, tmp_path)
    async with running_service(config) as service:
        await until(lambda: service.staff_rooms.is_staff_room(staff_room_b), what="room B")
        room = await both.create_room(name="Pwy?", invite=[BOT])
        for user, staff_room in ((scene.staff, scene.staff_room), (staff_b, staff_room_b)):
            await until(
                lambda user=user, staff_room=staff_room: texts_to(
                    user, staff_room, lambda t: f"!rooms claim {room}" in t
                ),
                what="each staff room asked whose the room is",
            )
    async with running_service(config) as service:
        assert service.rooms.held_invites == {room: {"england", "wales"}}
        await staff_b.send_text(staff_room_b, f"!rooms claim {room}")

        async def joined() -> bool:
            return (await both.members(room)).get(BOT) == "join"

        await until(joined, what="the bot in the claimed room")
        await community_is(service, room, "wales")
        await scene.staff.send_text(scene.staff_room, f"!rooms claim {room}")
        await until(
            lambda: texts_to(scene.staff, scene.staff_room, lambda t: "not waiting" in t),
            what="England told the room is not waiting for it",
        )
        assert service.rooms.community_of(room) == "wales"
        assert not service.rooms.held_invites
    for user, staff_room in ((scene.staff, scene.staff_room), (staff_b, staff_room_b)):
        asked = await texts_to(user, staff_room, lambda t: f"!rooms claim {room}" in t)
        assert len(asked) == 1, "asked once, the restart notwithstanding"
    async with running_service(config) as service:
        assert not service.rooms.held_invites, "claimed: held no more"


async def test_a_held_invite_withdrawn_is_no_longer_claimable(synapse, tmp_path):
    """The invite held for staff to claim is withdrawn by whoever made it: neither kept
    nor claimable, after a restart too (a claim is told nothing is waiting)."""
    _, staff_b, staff_room_b, both, config = await with_staff_of_both(synapse, tmp_path)
    async with running_service(config) as service:
        await until(lambda: service.staff_rooms.is_staff_room(staff_room_b), what="room B")
        room = await both.create_room(name="Pwy?", invite=[BOT])
        await until(lambda: room in service.rooms.held_invites, what="the invite held")
        await both.kick(room, BOT, "wrong room")  # the invite withdrawn
        await until(lambda: room not in service.rooms.held_invites, what="no longer held")
    async with running_service(config) as service:
        assert not service.rooms.held_invites
        await staff_b.send_text(staff_room_b, f"!rooms claim {room}")
        # "I am not waiting to hear whose {room} is", in Welsh.
        await until(
            lambda: texts_to(staff_b, staff_room_b, lambda t: "Dydw i ddim yn aros" in t),
            what="Wales told nothing is waiting to be claimed",
        )
    assert (await both.members(room)).get(BOT) != "join"


async def test_an_upgraded_room_stays_its_communitys(synapse, tmp_path):
    """Wales's room is upgraded by its owner (no one's staff): the invite into the
    replacement is Wales's, the replacement is enrolled in Wales, and only Wales's
    staff hear of it."""
    from tests.integration.test_room_upgrades import upgrade

    scene, staff_b, staff_room_b, config = await england_and_wales(synapse, tmp_path)
    async with running_service(config) as service:
        await until(lambda: service.staff_rooms.is_staff_room(staff_room_b), what="room B")
        old = await scene.owner.create_room(
            name="Grŵp",
            invite=[staff_b.user_id],
            power_levels={"users": {BOT: 50}},
        )
        await staff_b.join(old)
        await staff_b.invite(old, BOT)
        await until(lambda: scene.bot_joined(old), what="the bot in Wales's room")
        new = await upgrade(scene.owner, old)
        await until(
            lambda: texts_to(staff_b, staff_room_b, lambda t: new in t),
            what="Wales asked to let the bot into the replacement",
        )
        await scene.owner.invite(new, BOT)  # the owner is no community's staff
        await until(lambda: scene.bot_joined(new), what="the bot in the replacement")
        await until(lambda: service.rooms.community_of(new) == "wales", what="enrolled in Wales")
        assert not await texts_to(scene.staff, scene.staff_room, lambda t: new in t or old in t)


async def test_a_members_policy_dm_answers_for_the_community_they_asked_in(synapse, tmp_path):
    """A member's `!policy` DM is one, whichever community's room they ask in: what they
    write there is answered in the words (language, crisis resources) of the community
    they last asked in, and asking in another at once is not taken for asking again."""
    scene, staff_b, staff_room_b, config = await england_and_wales(synapse, tmp_path)
    async with running_service(config) as service:
        await until(lambda: service.staff_rooms.is_staff_room(staff_room_b), what="room B")
        group_a = await open_group_room(scene)
        group_b = await welsh_group(scene, staff_b)
        wales, england = service.parts["wales"].texts, service.parts["england"].texts

        async def said_in_dm(dm: str, content: dict) -> list[str]:
            return await texts_to(scene.member, dm, lambda text: text == content["body"])

        await scene.member.send_text(group_b, "!policy")
        dm = await until(scene.dm_room_of_member, what="the policy DM")
        await scene.member.join(dm)
        await until(lambda: said_in_dm(dm, wales.policy_explained()), what="told in Welsh")
        await scene.member.send_text(dm, "Helo? Oes rhywun yna?")
        await until(lambda: said_in_dm(dm, wales.policy_room_reply()), what="answered in Welsh")

        await scene.member.send_text(group_a, "!policy")
        await until(lambda: said_in_dm(dm, england.policy_explained()), what="told in English")
        await scene.member.send_text(dm, "Hello? Is anyone there?")
        await until(lambda: said_in_dm(dm, england.policy_room_reply()), what="answered in English")
        assert wales.policy_room_reply()["body"] != england.policy_room_reply()["body"]

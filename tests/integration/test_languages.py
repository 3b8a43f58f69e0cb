"""A community that speaks Welsh, end to end against a real Synapse: the member, the room,
the moderator and staff each read their text in Welsh, and /health says the Welsh texts are
not yet reviewed by a native speaker until the charity says they are."""

from __future__ import annotations

import pytest

from tests.support.checkins import checkin_rooms
from tests.support.scene import (
    build_scene,
    health,
    open_group_room,
    running_service,
    scene_config,
    until,
)

pytestmark = pytest.mark.synapse


@pytest.fixture
async def scene(synapse, tmp_path):
    yield await build_scene(synapse, tmp_path)


async def test_a_welsh_community_is_told_in_welsh(scene):
    config = scene_config(scene, language="cy", region="GB-WLS")
    async with running_service(config) as service:
        status, report = await health(service)
        assert status == 200, "an unreviewed language is a warning, not a fault"
        messages = report["checks"]["messages"]
        assert messages["ok"] and messages["language"] == "cy"
        assert "not marked reviewed" in messages["warning"]

        await open_group_room(scene)
        said = await scene.member.send_text(scene.group, "Dw i ddim eisiau bod yma rhagor")
        await scene.moderator.react(scene.group, said, "🚨")

        room = await until(scene.dm_room_of_member, what="the DM invite")
        await scene.member.join(room)
        (notice,) = await until(lambda: scene.bot_messages(scene.member, room), what="notice")
        body = notice["content"]["body"]
        assert body.startswith("Rydyn ni'n poeni amdanat ti.")
        assert "0808 164 0123 i siarad yn Gymraeg" in body

        alert = await until(
            lambda: scene.staff_matching(lambda text: text.startswith("Achos #1")),
            what="the alert, in Welsh",
        )
        assert "Aelod:" in alert[0] and "Cysylltwch â'r gwasanaethau brys (ffonia 999" in alert[0]
        assert scene.member.user_id in alert[0]
        # What the room sees: the removal's reason and the room's notice, in Welsh too.
        kick = next(
            e
            for e in reversed(await scene.owner.messages(scene.group))
            if e["type"] == "m.room.member" and e.get("state_key") == scene.member.user_id
        )
        assert kick["content"].get("reason") == "Tynnwyd gan gymedrolwr"
        (room_notice, *_) = await until(
            lambda: scene.bot_messages(scene.owner, scene.group), what="the room notice"
        )
        assert room_notice["content"]["body"].startswith("Mae cymedrolwr wedi camu i mewn yma.")

        # Staff's commands are answered in Welsh too, the case's timeline included.
        await scene.staff.send_text(scene.staff_room, "!case 1")
        (timeline,) = await until(
            lambda: scene.staff_matching(lambda text: text.startswith("Achos #1: ")),
            what="the case's timeline, in Welsh",
        )
        assert "(amseroedd: Europe/London)" in timeline and "wedi'i fflagio" in timeline
        await scene.staff.send_text(scene.staff_room, "!case 99")
        await until(
            lambda: scene.staff_matching(lambda text: text.startswith("Does dim achos #99.")),
            what="no such case, in Welsh",
        )

    reviewed = scene_config(
        scene, language="cy", region="GB-WLS", messages={"reviewed_locales": ["cy"]}
    )
    async with running_service(reviewed) as service:
        _status, report = await health(service)
        assert "warning" not in report["checks"]["messages"]


async def test_the_welsh_check_in_room_and_its_message(scene):
    """The room's default name, who is checking in and the weekday are Welsh too: the
    words code puts into the check-in, not only its template."""
    config = scene_config(scene, language="cy", region="GB-WLS", checkin={"after": "2s"})
    async with running_service(config):
        await open_group_room(scene)
        said = await scene.member.send_text(scene.group, "Alla i ddim")
        await scene.moderator.react(scene.group, said, "🚨")

        (room,) = await until(
            lambda: checkin_rooms(scene, name="Cysylltu â ti"),
            within=60,
            what="the check-in room, named in Welsh",
        )
        await scene.member.join(room)
        (message,) = await until(lambda: scene.bot_messages(scene.member, room), what="message")
        body = message["content"]["body"]
        assert body.startswith("Helo, dyma ystafell breifat i ti ac aelod o'n tîm staff.")
        assert "a member of our staff team" not in body and "ffonia 999" in body
        await until(
            lambda: scene.staff_matching(
                lambda text: "mae'r ystafell gysylltu ar agor" in text and room in text
            ),
            what="the staff room told, in Welsh",
        )

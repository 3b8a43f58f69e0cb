"""Check-ins as the tests drive them: short delays, a flagged member, the check-in room."""

from __future__ import annotations

from pathlib import Path

from tests.support.scene import Scene, open_group_room, recorded, scene_config, until


def checkin_config(
    scene: Scene, *, after: str = "2s", remind_after: str = "1h", homeserver_url=None, **policy
) -> Path:
    """A scene's config with short check-in delays, and the check-in room's name known."""
    checkin = {"after": after, "remind_after": remind_after, "room_name": "Checking in"}
    return scene_config(scene, policy=policy, checkin=checkin, homeserver_url=homeserver_url)


async def flag_member(scene) -> None:
    said = await scene.member.send_text(scene.group, "I can't do this")
    await scene.moderator.react(scene.group, said, "🚨")


async def flagged_and_scheduled(scene, config) -> None:
    """Open the group room, flag the member, wait until the case's check-in is scheduled."""
    await open_group_room(scene)
    await flag_member(scene)
    await until(lambda: recorded(config, "step.schedule"), what="scheduling")


async def checkin_rooms(scene, name: str = "Checking in") -> list[str]:
    """Rooms the member and staff are invited to whose name is the check-in's (not the
    DM): `checkin_config`'s, unless another is given."""
    staff_invites = await scene.staff.invites()
    return [
        room
        for room, state in (await scene.member.invites()).items()
        if state.get("m.room.name", {}).get("name") == name and room in staff_invites
    ]

"""A moderated group room whose people all use real end-to-end clients (matrix-nio with
their own stores, trusting every device), and an encrypted staff room: the rooms a charity
on Element has by default."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.support.e2e_user import E2EUser, new_e2e_user
from tests.support.scene import BOT, service_config, until


@dataclass
class EncryptedScene:
    synapse: object
    owner: object  # a plain client: creates the group room, checks memberships
    moderator: E2EUser
    member: E2EUser
    staff: E2EUser
    staff_room: str
    group: str = ""

    async def close(self) -> None:
        for user in (self.moderator, self.member, self.staff):
            await user.close()


async def encrypted_scene(synapse, tmp_path: Path) -> EncryptedScene:
    stores = tmp_path / "stores"
    owner = await synapse.new_user("owner")
    moderator = await new_e2e_user(synapse, "moderator", stores)
    member = await new_e2e_user(synapse, "member", stores)
    staff = await new_e2e_user(synapse, "staff", stores)
    staff_room = await staff.create_encrypted_room(name="Staff", invite=[BOT])
    return EncryptedScene(synapse, owner, moderator, member, staff, staff_room)


def config_for(
    scene: EncryptedScene,
    directory: Path,
    *,
    encryption: dict[str, Any] | None = None,
    checkin: dict[str, Any] | None = None,
    **extra: Any,
) -> Path:
    path = service_config(
        scene.synapse,
        directory,
        database_url=f"sqlite+aiosqlite:///{directory / 'safeguard.db'}",
        staff_room=scene.staff_room,
        staff=[scene.staff.user_id],
        checkin=checkin or {"after": "4s"},
        **extra,
    )
    data = yaml.safe_load(path.read_text())
    data["encryption"] = {"private_rooms": True, **(encryption or {})}
    path.write_text(yaml.safe_dump(data))
    return path


async def open_encrypted_group(scene: EncryptedScene) -> str:
    room = await scene.owner.create_room(
        name="Group chat",
        invite=[scene.moderator.user_id, scene.member.user_id, scene.staff.user_id],
        power_levels={"users": {scene.moderator.user_id: 50, BOT: 50}},
        encrypted=True,
    )
    for user in (scene.moderator, scene.member, scene.staff):
        await user.join(room)
    await scene.staff.client.room_invite(room, BOT)  # only staff put the bot in a room

    async def bot_in() -> bool:
        return (await scene.owner.members(room)).get(BOT) == "join"

    await until(bot_in, what="the bot to join the encrypted group room")
    # Each client shares its room key with the members it has seen: one that sends before
    # its sync shows the bot's join never gives the bot that key (seen once in CI: the
    # chat stayed unreadable). A person's client has seen the join before they write.
    for user in (scene.moderator, scene.member, scene.staff):
        await until(
            lambda user=user: room in user.client.rooms and BOT in user.client.rooms[room].users,
            what="the bot's join seen by every client",
        )
    scene.group = room
    return room


async def staff_alerts(scene: EncryptedScene, number: int) -> list[str]:
    return [
        body
        for body in scene.staff.texts_in(scene.staff_room, BOT)
        if body.startswith(f"Case #{number}\n")
    ]

"""Who is staff: users named in `policy.staff`, and anyone joined in the staff room with
`policy.staff_power_level` there (read fresh for each command and invite; a flag's
decision uses the staff room's state known ahead, kept current like a group room's:
bot/moderation/room_state.py).

Power alone is not enough to command the bot or put it in a room: someone kicked from
the staff room keeps whatever power levels still say, and a staff room whose
`users_default` reaches the staff level would make everyone staff. Being in the room is
what staff are."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from bot.config.settings import PolicySettings
from bot.core.ports import Homeserver, Refused, RoomState
from bot.moderation.authorization import is_staff
from bot.rooms.staff_room import StaffRoom


class StaffDirectory:
    def __init__(self, homeserver: Homeserver, policy: PolicySettings, room: StaffRoom) -> None:
        self._hs = homeserver
        self._policy = policy
        self._room = room

    async def room_state(self) -> RoomState | None:
        if self._room.room_id is None:
            return None
        state = await self._hs.room_state(self._room.room_id)
        return None if isinstance(state, Refused) else state

    def is_staff_in(self, user_id: str, staff_room: RoomState | None) -> bool:
        return is_staff(
            user_id,
            staff_users=self._policy.staff,
            staff_room=staff_room,
            staff_power_level=self._policy.staff_power_level,
        )

    async def is_staff(self, user_id: str) -> bool:
        if user_id in self._policy.staff:
            return True
        if not self.is_staff_in(user_id, await self.room_state()):
            return False
        assert self._room.room_id is not None  # a state was read, so the room is known
        return await self._hs.membership(self._room.room_id, user_id) == "join"

    def everyone_is_staff(self, staff_room: RoomState | None) -> bool:
        """Whether anyone who joins the staff room gets the staff level by default."""
        levels = staff_room.power_levels if staff_room is not None else None
        default = levels.get("users_default", 0) if isinstance(levels, dict) else 0
        return isinstance(default, int) and default >= self._policy.staff_power_level

    async def may_invite_bot(self, user_id: str, extra_inviters: Sequence[str]) -> bool:
        """Staff, or someone operators listed in appservice.allowed_inviters."""
        if any(fnmatch.fnmatchcase(user_id, pattern) for pattern in extra_inviters):
            return True
        return await self.is_staff(user_id)

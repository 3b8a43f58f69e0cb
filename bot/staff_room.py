"""The staff room: where every alert goes, so the bot must be in it.

`policy.staff_room` may be an alias that does not exist yet, or a room the bot
has not been invited to yet, when the service starts. Neither is fatal (the
service must keep recording flags and protecting members), but neither is
forgotten either: the service keeps trying until the room is resolved and
joined, /health says what is wrong meanwhile, and whatever is for staff waits
for the room rather than being dropped.
"""

from __future__ import annotations

from bot.ports import Homeserver, HomeserverUnavailable, Refused


class StaffRoomUnavailable(HomeserverUnavailable):
    """The staff room cannot take messages yet; whatever was for it waits and is retried."""


class StaffRoom:
    """The staff room as configured, and the room id it resolved to."""

    def __init__(self, configured: str) -> None:
        self.configured = configured
        self.room_id: str | None = configured if configured.startswith("!") else None

    @property
    def address(self) -> str:
        """Where staff messages are queued: the room id once resolved, else the alias,
        which delivery resolves (and waits for) when it can."""
        return self.room_id or self.configured

    def require(self) -> str:
        """The room id, or StaffRoomUnavailable (the caller's work waits for the room)."""
        if self.room_id is None:
            raise StaffRoomUnavailable(f"the staff room {self.configured} is not resolved yet")
        return self.room_id

    def is_staff_room(self, room_id: str) -> bool:
        return room_id == self.room_id

    async def connect(self, homeserver: Homeserver) -> str | None:
        """Resolve the room and make sure the bot is joined.

        Returns None when the bot is in the staff room, or what is wrong, in words
        an operator can act on. Raises HomeserverUnavailable if Synapse cannot be reached.
        """
        room_id = self.room_id or await homeserver.resolve_room(self.configured)
        if isinstance(room_id, Refused):
            return f"the staff room {self.configured} cannot be resolved ({room_id})"
        self.room_id = room_id
        if await homeserver.membership(room_id, homeserver.bot_user_id) == "join":
            return None
        joined = await homeserver.join_room(room_id)
        if isinstance(joined, Refused):
            return f"the bot cannot join the staff room {room_id} ({joined}): invite it"
        return None

    async def problem(self, homeserver: Homeserver) -> str | None:
        """What stops the bot posting in the staff room now, without trying to fix it."""
        if self.room_id is None:
            return f"the staff room {self.configured} is not resolved yet"
        if await homeserver.membership(self.room_id, homeserver.bot_user_id) != "join":
            return f"the bot is not in the staff room {self.room_id}"
        return None

"""The staff room: where every alert goes, so the bot must be in it.

`policy.staff_room` may be an alias that does not exist yet, or a room the bot
has not been invited to yet, when the service starts. Neither is fatal (the
service must keep recording flags and protecting members), but neither is
forgotten either: the service keeps trying until the room is resolved and
joined, /health says what is wrong meanwhile, and a case's staff alert waits
for the room rather than being dropped.
"""

from __future__ import annotations

from bot.context import PolicyContext
from bot.ports import Homeserver, HomeserverUnavailable, Refused


class StaffRoomUnavailable(HomeserverUnavailable):
    """The staff room cannot take messages yet; whatever was for it waits and is retried."""


async def connect_staff_room(homeserver: Homeserver, context: PolicyContext) -> str | None:
    """Resolve `policy.staff_room` and make sure the bot is joined.

    Returns None when the bot is in the staff room, or what is wrong, in words
    an operator can act on. Raises HomeserverUnavailable if Synapse cannot be reached.
    """
    configured = context.policy.staff_room
    if configured is None:
        return "policy.staff_room is not set"
    room_id = context.staff_room_id or await homeserver.resolve_room(configured)
    if isinstance(room_id, Refused):
        return f"the staff room {configured} cannot be resolved ({room_id})"
    context.staff_room_id = room_id
    context.watch(room_id)
    if await homeserver.membership(room_id, context.bot_user_id) == "join":
        return None
    joined = await homeserver.join_room(room_id)
    if isinstance(joined, Refused):
        return f"the bot cannot join the staff room {room_id} ({joined}): invite it"
    return None


async def staff_room_problem(homeserver: Homeserver, context: PolicyContext) -> str | None:
    """What stops the bot posting in the staff room now, without trying to fix it."""
    if context.staff_room_id is None:
        return f"the staff room {context.policy.staff_room} is not resolved yet"
    if await homeserver.membership(context.staff_room_id, context.bot_user_id) != "join":
        return f"the bot is not in the staff room {context.staff_room_id}"
    return None

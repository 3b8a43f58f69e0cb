"""Opening a direct conversation with someone, exactly once, verified.

Used by the member's notice and the moderator's debrief. A room the step
already recorded, or one an earlier attempt created (found by its marker), or
a DM the bot already shares with them, is used; otherwise one is created with
the invite. A found room is only used once the person is verifiably in it (or
invited): an earlier attempt may have died after creating the room and before
inviting them.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from bot.ports import Homeserver, Refused
from bot.steps.base import StepRun

PRESENT_IN_DM = frozenset({"join", "invite"})


@dataclass(frozen=True)
class OpenedDm:
    room_id: str
    created: bool  # by this attempt (the createRoom's answer is the proof of the invite)
    invited_again: bool  # found without them in it: invited now
    direct: dict[str, list[str]] | None  # the bot's m.direct as read, to update it


async def open_dm(
    hs: Homeserver, run: StepRun, user: str, what: str, *, encrypted: bool
) -> OpenedDm | Refused:
    known = run.progress.get(f"{what}_room")
    tag = run.marker(what)
    direct: dict[str, list[str]] | None = None
    room_id: str | None = known
    if room_id is None and run.resumed:
        # The earlier attempt may have created the room and died before recording it.
        room_id = await hs.find_marked_room(tag)
    if room_id is None:
        direct = await hs.direct_rooms()
        room_id = await _shared_dm(hs, user, direct)
    if room_id is None:
        created = await hs.create_room(
            marker=tag, invite=[user], is_direct=True, encrypted=encrypted
        )
        if isinstance(created, Refused):
            return created
        return OpenedDm(created.room_id, True, False, direct)
    invited = await _make_sure_they_are_in(hs, room_id, user)
    if isinstance(invited, Refused):
        return invited
    return OpenedDm(room_id, False, invited, direct)


async def _shared_dm(hs: Homeserver, user: str, direct: dict[str, list[str]]) -> str | None:
    """A DM the bot already has with them, that both are still in."""
    for room_id in reversed(direct.get(user, [])):
        bot, theirs = await asyncio.gather(
            hs.membership(room_id, hs.bot_user_id), hs.membership(room_id, user)
        )
        if bot == "join" and theirs in PRESENT_IN_DM:
            return room_id
    return None


async def _make_sure_they_are_in(hs: Homeserver, room_id: str, user: str) -> bool | Refused:
    """True if they had to be invited (again), False if they were there."""
    if await hs.membership(room_id, user) in PRESENT_IN_DM:
        return False
    invited = await hs.invite(room_id, user)
    if isinstance(invited, Refused):
        # A retried invite can be refused because the first one went through.
        if await hs.membership(room_id, user) in PRESENT_IN_DM:
            return True
        return invited
    return True

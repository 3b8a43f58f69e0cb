"""The moderation user (`appservice.moderation_localpart`): a second user of the
application service that removes members, redacts flags and posts the room notice in
group rooms, so nothing a group room sees comes from a user called "Safeguarding".

It is seated in each moderated room ahead of any flag (invited by the bot, joined, and
given the power it needs by the bot when the bot may change power levels), never on
the flag path: an action in a room where it is not seated — not yet, or it lost its
power — is done by the bot, at once. Safety comes before discretion: the member is
removed either way. Where it cannot be seated, /health's detail and the log say what
power it needs there, and staff are told (once per room and reason, and again once it
can act there after all).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING

from bot.core.ports import HomeserverUnavailable, Refused
from bot.moderation.authorization import event_level, moderation_level, power_level

if TYPE_CHECKING:
    from appservice.homeserver import NioHomeserver

log = logging.getLogger(__name__)

# A room where it could not be seated is tried again this often (an admin may have
# given it power meanwhile).
RETRY_UNSEATED_SECONDS = 300.0
# How often the moderated rooms are looked over for one it is not seated in yet.
LOOK_SECONDS = 5.0


class ModerationUser:
    def __init__(
        self,
        homeserver: NioHomeserver,
        user_id: str,
        displayname: str,
        rooms: Callable[[], Iterable[str]],
        tell_staff: Callable[[str, str | None], Awaitable[None]] | None = None,
    ) -> None:
        self.user_id = user_id
        self._hs = homeserver
        self._displayname = displayname
        self._rooms = rooms
        self._registered = False
        self._seated: set[str] = set()
        # Rooms it could not be seated in: why, and when it was last tried (monotonic).
        self.unseated: dict[str, tuple[str, float]] = {}
        # Told to staff by `run` (room, why; None: it can act there again), in order:
        # `unseat` is called on an action's path, which must not wait for the database.
        self._tell_staff = tell_staff
        self._news: list[tuple[str, str | None]] = []
        self._told: dict[str, str] = {}  # the reason staff were last told, by room

    def seated_in(self, room_id: str) -> bool:
        return room_id in self._seated

    def unseat(self, room_id: str, why: str) -> None:
        """It was refused an action there: the bot acts instead until it is seated again."""
        self._seated.discard(room_id)
        self.unseated[room_id] = (why, time.monotonic())
        log.warning("the moderation user cannot act in %s (%s): the bot acts there", room_id, why)
        self._news_of(room_id, why)

    def _news_of(self, room_id: str, why: str | None) -> None:
        """Staff hear of a room it cannot act in once per reason, and of its return once."""
        if why is None:
            if self._told.pop(room_id, None) is not None:
                self._news.append((room_id, None))
        elif self._told.get(room_id) != why:
            self._told[room_id] = why
            self._news.append((room_id, why))

    async def tell_news(self) -> None:
        """Tell staff what changed, in order; what cannot be told yet is kept for later."""
        while self._news and self._tell_staff is not None:
            room_id, why = self._news[0]
            await self._tell_staff(room_id, why)
            self._news.pop(0)

    def status(self) -> dict[str, object]:
        return {
            "user": self.user_id,
            "seated_rooms": len(self._seated),
            "not_seated": {room: why for room, (why, _at) in self.unseated.items()},
        }

    async def run(self) -> None:
        """Seat it in every moderated room, for as long as the service runs."""
        while True:
            try:
                if not self._registered:
                    await self._hs.register_user(self.user_id, self._displayname)
                    self._registered = True
                await self.seat_everywhere()
            except HomeserverUnavailable as exc:
                log.info("seating the moderation user waits: %s", exc)
            await self.tell_news()
            await asyncio.sleep(LOOK_SECONDS)

    async def seat_everywhere(self) -> None:
        now = time.monotonic()
        for room_id in list(self._rooms()):
            if room_id in self._seated:
                continue
            tried = self.unseated.get(room_id)
            if tried is not None and now - tried[1] < RETRY_UNSEATED_SECONDS:
                continue
            why = await self._seat(room_id)
            if why is None:
                self._seated.add(room_id)
                self.unseated.pop(room_id, None)
                log.info("the moderation user acts in %s", room_id)
            else:
                self.unseated[room_id] = (why, now)
                log.warning("the moderation user cannot act in %s: %s", room_id, why)
            self._news_of(room_id, why)

    async def still_empowered(self, room_id: str) -> bool:
        """Whether it still has the power it was seated with, as the room says now: a
        refusal it met may be about whom it acted on (a kick of someone not in the room,
        as a retried kick whose first answer was lost meets), not about its power."""
        if await self._hs.membership(room_id, self.user_id) != "join":
            return False  # kicked or banned from it: its power there is no use
        state = await self._hs.room_state(room_id)
        if isinstance(state, Refused):
            return False
        return power_level(self.user_id, state) >= moderation_level(state)

    async def _seat(self, room_id: str) -> str | None:
        """Join it to the room with the power it needs; why not, if it cannot be."""
        hs = self._hs
        if await hs.membership(room_id, self.user_id) != "join":
            invited = await hs.invite(room_id, self.user_id)
            if isinstance(invited, Refused) and invited.errcode != "M_FORBIDDEN":
                return f"the bot could not invite it ({invited})"
            with hs.acting_as(self.user_id):
                joined = await hs.join_room(room_id)
            if isinstance(joined, Refused):
                return f"it could not join ({joined})"
        state = await hs.room_state(room_id)
        if isinstance(state, Refused):
            return f"the room's power levels could not be read ({state})"
        needed = moderation_level(state)
        if power_level(self.user_id, state) >= needed:
            return None
        bot = hs.bot_user_id
        bot_power = power_level(bot, state)
        may_edit = bot_power >= event_level(state, "m.room.power_levels", state_event=True)
        if not may_edit or bot_power < needed or not isinstance(state.power_levels, dict):
            return f"give {self.user_id} power level {needed} in this room"
        levels = dict(state.power_levels)
        levels["users"] = {**(levels.get("users") or {}), self.user_id: needed}
        granted = await hs.put_state(room_id, "m.room.power_levels", levels)
        if isinstance(granted, Refused):
            return f"give {self.user_id} power level {needed} in this room ({granted})"
        return None

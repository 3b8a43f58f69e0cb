"""A community's Space: the rooms in it are the community's (README: Communities).

At start the Space is walked to depth 3 (Spaces in it included); from then on its
`m.space.child` events are followed as they come. The bot joins each room it finds
there (a room restricted to the Space's members lets it in; any other must invite
it) and moderates it as if the community's staff had added it. A room in two
communities' Spaces, or listed by another, stays the first claimant's: the log and
both staff rooms say so.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from bot.core.ports import Homeserver, HomeserverUnavailable, Refused
from bot.intake.dispatch import Handling
from bot.rooms.directory import RoomDirectory
from bot.rooms.names import names_of
from bot.texts.wording import place

log = logging.getLogger(__name__)
# How deep a Space is walked (the Spaces in it, and theirs).
DEPTH = 3


class SpaceRooms:
    def __init__(
        self,
        homeserver: Homeserver,
        rooms: RoomDirectory,
        *,
        community: str,
        space: str,
        enrol: Callable[[str, str, Handling | None], Awaitable[None]],
        claimed_twice: Callable[[str, str, str], Awaitable[None]],
    ) -> None:
        """`space`: as configured (an id or an alias). `enrol(room, by, handling)`: join
        the room and moderate it as the community's. `claimed_twice(room, owner, claimant)`:
        tell both communities' staff that this one's Space holds another's room."""
        self._hs = homeserver
        self._rooms = rooms
        self._community = community
        self._configured = space
        self.space_id: str | None = space if space.startswith("!") else None
        self._enrol = enrol
        self._claimed_twice = claimed_twice

    async def load(self) -> None:
        """Find the Space (joining it: staff invite the bot, or it is public) and claim
        every room in it. What cannot be done now is logged and tried again at the next
        start, or when the bot is invited into the Space."""
        try:
            if self.space_id is None:
                resolved = await self._hs.resolve_room(self._configured)
                if isinstance(resolved, Refused):
                    log.warning("the Space %s does not resolve: %s", self._configured, resolved)
                    return
                self.space_id = resolved
            self._rooms.spaces[self.space_id] = self._community
            if await self._hs.membership(self.space_id, self._hs.bot_user_id) != "join":
                joined = await self._hs.join_room(self.space_id)
                if isinstance(joined, Refused):
                    log.warning(
                        "cannot join the Space %s (%s): invite %s into it",
                        self.space_id,
                        joined,
                        self._hs.bot_user_id,
                    )
                    return
            children = await self._hs.space_children(self.space_id, max_depth=DEPTH)
        except HomeserverUnavailable as exc:
            log.warning("the Space %s could not be read now: %s", self._configured, exc)
            return
        if isinstance(children, Refused):
            log.warning("the Space %s could not be read: %s", self.space_id, children)
            return
        # Who "added" the rooms found there: the Space, by its name.
        names = await names_of(self._hs, [self.space_id])
        by = place(self.space_id, names.get(self.space_id))
        for room_id in children:
            await self.claim(room_id, by=by, handling=None)

    async def child_changed(self, handling: Handling) -> None:
        """An `m.space.child` event in the Space: a room added is claimed; a room taken
        out stays moderated (staff say `!rooms leave` to stop), and the log says so."""
        event = handling.item.payload
        child = event.get("state_key")
        content = event.get("content")
        if not isinstance(child, str) or not child.startswith("!"):
            return
        if isinstance(content, dict) and content.get("via"):
            await self.claim(child, by=str(event.get("sender", "")), handling=handling)
        else:
            log.info("%s was taken out of the Space %s", child, handling.item.room_id)

    async def claim(self, room_id: str, *, by: str, handling: Handling | None) -> None:
        owner = self._rooms.community_of(room_id)
        if owner is not None and owner != self._community:
            log.warning(
                "%s is in %s's Space, but it is %s's: it stays %s's",
                room_id,
                self._community,
                owner,
                owner,
            )
            await self._claimed_twice(room_id, owner, self._community)
            return
        self._rooms.listed[room_id] = self._community
        if room_id not in self._rooms.moderated:
            await self._enrol(room_id, by, handling)

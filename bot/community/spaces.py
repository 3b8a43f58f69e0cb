"""A community's Space: the rooms in it are the community's (README: Communities).

At start the Space is walked to depth 3 (Spaces in it included); from then on its
`m.space.child` events are followed as they come. A Space that cannot be read yet (the
homeserver away, its alias not made, the bot not invited) is tried again with a growing
pause, at once when the bot is invited into it, and shown on /health meanwhile; it is
walked again whenever the bot joins it anew. The bot joins each room it finds
there (a room restricted to the Space's members lets it in; any other must invite
it) and moderates it as if the community's staff had added it. A room in two
communities' Spaces, or listed by another, stays the first claimant's: the log and
both staff rooms say so.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from bot.core.ports import Homeserver, HomeserverUnavailable, Refused
from bot.core.retry import until_done
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
        joined: asyncio.Event,
    ) -> None:
        """`space`: as configured (an id or an alias). `enrol(room, by, handling)`: join
        the room and moderate it as the community's. `claimed_twice(room, owner, claimant)`:
        tell both communities' staff that this one's Space holds another's room. `joined`:
        set when the bot joins the Space (bot/moderation/membership.py)."""
        self._hs = homeserver
        self._rooms = rooms
        self._community = community
        self._configured = space
        self.space_id: str | None = space if space.startswith("!") else None
        self._enrol = enrol
        self._claimed_twice = claimed_twice
        self._joined = joined
        # What stops the Space being read now (None: read, and followed): for /health.
        self.problem: str | None = "not read yet"
        # Rooms being claimed now (a walk and an m.space.child event may meet one), and
        # rooms whose staff were told they are another's (told once, not at every walk).
        self._claiming: set[str] = set()
        self._told_twice: set[str] = set()

    @property
    def configured(self) -> str:
        return self._configured

    async def keep_loaded(self, *, first_pause: float, longest_pause: float) -> None:
        """Read the Space now, again with a growing pause until that works, and again each
        time the bot joins it anew (runs until the service stops)."""
        what = f"the Space {self._configured} ({self._community})"
        while True:
            problem = await self.load()
            if problem is not None:
                log.warning("%s: %s", what, problem)
                await until_done(
                    self.load,
                    problem=problem,
                    what=what,
                    first_pause=first_pause,
                    longest_pause=longest_pause,
                    news=self._joined,
                )
            log.info("%s: read; its rooms are this community's", what)
            await self._joined.wait()
            self._joined.clear()

    def left(self, by: str) -> None:
        """The bot was removed from the Space: its rooms added from now on are not seen
        until the bot is back (invited again: the Space is then walked again, and what was
        added meanwhile claimed). /health says so meanwhile."""
        self.problem = (
            f"the bot was removed from it by {by}: rooms added to it are not seen; "
            f"invite {self._hs.bot_user_id} back into it"
        )
        log.warning("the Space %s (%s): %s", self._configured, self._community, self.problem)

    async def is_space(self, room_id: str) -> bool:
        """Whether `room_id` is this community's Space (its alias resolved now if need be)."""
        if self.space_id is None:
            try:
                resolved = await self._hs.resolve_room(self._configured)
            except HomeserverUnavailable:
                return False
            if isinstance(resolved, Refused):
                return False
            self.space_id = resolved
            self._rooms.spaces[resolved] = self._community
        return room_id == self.space_id

    async def load(self) -> str | None:
        """Find the Space (joining it: staff invite the bot, or it is public) and claim
        every room in it. Returns what stopped that (None: done)."""
        try:
            self.problem = await self._load()
        except Exception as exc:  # the database, or a bug of ours: tried again, never lost
            log.exception("the Space %s: could not be read", self._configured)
            self.problem = f"{type(exc).__name__}: {exc}"
        return self.problem

    async def _load(self) -> str | None:
        try:
            if self.space_id is None:
                resolved = await self._hs.resolve_room(self._configured)
                if isinstance(resolved, Refused):
                    return f"it does not resolve ({resolved})"
                self.space_id = resolved
            self._rooms.spaces[self.space_id] = self._community
            if await self._hs.membership(self.space_id, self._hs.bot_user_id) != "join":
                joined = await self._hs.join_room(self.space_id)
                if isinstance(joined, Refused):
                    return f"cannot join it ({joined}): invite {self._hs.bot_user_id} into it"
            children = await self._hs.space_children(self.space_id, max_depth=DEPTH)
            if isinstance(children, Refused):
                return f"cannot read its rooms ({children})"
            # Who "added" the rooms found there: the Space, by its name.
            names = await names_of(self._hs, [self.space_id])
            by = place(self.space_id, names.get(self.space_id))
            for room_id in children:  # one claimed already is passed over when tried again
                await self.claim(room_id, by=by, handling=None)
        except HomeserverUnavailable as exc:
            return f"the homeserver is not reachable ({exc})"
        return None

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
            if room_id in self._told_twice:
                return
            log.warning(
                "%s is in %s's Space, but it is %s's: it stays %s's",
                room_id,
                self._community,
                owner,
                owner,
            )
            await self._claimed_twice(room_id, owner, self._community)
            self._told_twice.add(room_id)
            return
        self._rooms.listed[room_id] = self._community
        if self._rooms.enrolled(room_id) or room_id in self._claiming:
            return
        self._claiming.add(room_id)
        try:
            await self._enrol(room_id, by, handling)
        finally:
            self._claiming.discard(room_id)

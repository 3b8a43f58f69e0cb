"""Which community an event is for, so that community's own handlers decide it.

Every room belongs to one community: a staff room to its community, a group room to
the community that listed it or whose staff added the bot (bot/store/rooms.py), a
member's DM, check-in or debrief room to its case's. The router finds it and hands the
event to that community's handler for its kind; an install with one community skips
the search.

What belongs to no community is handled as a room the bot does not moderate: by the
first community's handlers, which refuse a flag there without telling any staff (the
log says so) and decline an invite no community's staff sent.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping

from bot.intake.dispatch import EventKind, Handler, Handling
from bot.rooms.directory import RoomDirectory

log = logging.getLogger(__name__)


class CommunityRouter:
    def __init__(
        self,
        rooms: RoomDirectory,
        handlers: Mapping[str, Mapping[EventKind, Handler]],
        *,
        invite_community: Callable[[str, str], Awaitable[str | None]],
        decline: Handler,
    ) -> None:
        """`handlers`: each community's, by id, the first the one for what is no one's.
        `invite_community(inviter, room)`: whose an invite of the bot into a room of no
        known community is (None: no community's, or more than one's); `decline`: how
        such an invite is answered (asked about, or declined: bot/community, README)."""
        self._rooms = rooms
        self._handlers = {community: dict(kinds) for community, kinds in handlers.items()}
        self._first = next(iter(self._handlers))
        self._invite_community = invite_community
        self._decline = decline

    def handlers(self) -> dict[EventKind, Handler]:
        """The dispatcher's map: each kind to the router (each to the one community's
        own when there is one)."""
        kinds = {kind for by_kind in self._handlers.values() for kind in by_kind}
        if len(self._handlers) == 1:
            return dict(self._handlers[self._first])
        return {kind: self._routed(kind) for kind in kinds}

    def _routed(self, kind: EventKind) -> Handler:
        async def handle(handling: Handling) -> None:
            community = await self.community_of(handling, kind)
            if community is None and _is_invite(handling, kind):
                # No community's, or claimed by staff of several: whose it is is not
                # the first community's to guess.
                await self._decline(handling)
                return
            if community is not None and community not in self._handlers:
                log.warning(
                    "%s in %s: its community %r is not configured; handled as no one's",
                    kind.value,
                    handling.item.room_id,
                    community,
                )
                community = None
            handler = self._handlers[community or self._first].get(kind)
            if handler is not None:
                await handler(handling)

        return handle

    async def community_of(self, handling: Handling, kind: EventKind) -> str | None:
        """The community the event's room belongs to (None: none's, as far as is known)."""
        item = handling.item
        room_id = item.room_id
        known = await self._rooms.community_of_any(room_id, handling.database)
        if known is not None:
            return known
        if _is_invite(handling, kind):
            community = await self._invite_community(item.payload.get("sender", ""), room_id)
            if community is not None:
                # The room is that community's from the join on (its handlers record it).
                return community
        log.info("%s in %s: the room belongs to no community", kind.value, room_id)
        return None


def _is_invite(handling: Handling, kind: EventKind) -> bool:
    """An invite of the bot into a room."""
    content = handling.item.payload.get("content")
    return (
        kind is EventKind.BOT_MEMBERSHIP
        and isinstance(content, dict)
        and content.get("membership") == "invite"
    )

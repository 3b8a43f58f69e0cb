"""Which kind of room an event comes from, known in memory so the hot path can tell cheaply.

The staff room, the members' DMs and the check-in rooms are the bot's own
conversations: every message there matters (a member's reply, a staff command).
Any other room the bot is in is a group room it moderates.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from enum import Enum

from sqlalchemy.ext.asyncio import AsyncConnection

from bot.rooms.staff_room import StaffRoom, StaffRooms
from bot.store import cases, policy_rooms, retention


class RoomKind(Enum):
    STAFF = "staff"
    DM = "dm"
    CHECKIN = "checkin"
    POLICY = "policy"  # a member's `!policy` DM: read by no one (bot/members/policy.py)
    GROUP = "group"


class RoomDirectory:
    def __init__(self, staff_rooms: StaffRoom | StaffRooms) -> None:
        self.staff_rooms = StaffRooms.of(staff_rooms)
        # The community of each group room the bot moderates (bot/store/rooms.py), and of
        # each room a community lists in the config (ids and aliases as written).
        self.community: dict[str, str] = {}
        self.listed: dict[str, str] = {}
        # Each community's Space (bot/community/spaces.py): read and followed, not moderated.
        self.spaces: dict[str, str] = {}
        # Invites held while the communities whose staff the inviter is say whose the
        # room is (`!rooms claim`): room -> those communities. Not kept over a restart:
        # the bot's sync shows the invite again, and they are asked again.
        self.held_invites: dict[str, set[str]] = {}
        self._dms: set[str] = set()
        self._checkins: set[str] = set()
        self._policy: set[str] = set()
        # Both together, so the hot path's test is one lookup (read, never written, by
        # the intake's filter).
        self.conversations: set[str] = set()
        # The group rooms staff put the bot in (and it has not left): only there can a flag
        # be acted on, so only there does one take the flag lane (bot/intake/accept.py).
        self.moderated: set[str] = set()
        # Joined, their enrolment not recorded yet (the homeserver or the database away as
        # it was): moderated all the same, so a flag already raised there is acted on (the
        # bot is in the room, put there by staff); the invite's retry records them.
        self.unrecorded: set[str] = set()
        # (room, member) of every active case: the only people whose membership of a
        # group room the policy acts on (their return ends the case, or removes them
        # again). Added before the case is written, never taken away while running:
        # one too many only queues an event that needs nothing.
        self._watched: set[tuple[str, str]] = set()

    def know(
        self,
        *,
        watched: Iterable[tuple[str, str]] = (),
        dms: Iterable[str] = (),
        checkins: Iterable[str] = (),
        moderated: Iterable[str] = (),
        policy: Iterable[str] = (),
    ) -> None:
        """Many at once (what the cases and rooms hold, read at start), at set speed."""
        self.moderated.update(moderated)
        self._watched.update(watched)
        self._dms.update(dms)
        self._checkins.update(checkins)
        self._policy.update(policy)
        self.conversations.update(self._dms, self._checkins, self._policy)

    def add_dm(self, room_id: str) -> None:
        self._dms.add(room_id)
        self.conversations.add(room_id)

    def add_policy_room(self, room_id: str) -> None:
        self._policy.add(room_id)
        self.conversations.add(room_id)

    def add_checkin(self, room_id: str) -> None:
        self._checkins.add(room_id)
        self.conversations.add(room_id)

    def forget(self, room_id: str) -> None:
        """The bot left one of its own rooms (its case purged): nothing there is ours now."""
        self._dms.discard(room_id)
        self._checkins.discard(room_id)
        self.conversations.discard(room_id)

    def moderate(self, room_id: str, community: str | None = None) -> None:
        self.moderated.add(room_id)
        if community is not None:
            self.community[room_id] = community

    def enrolled(self, room_id: str) -> bool:
        """Moderated, and recorded so: nothing left to do for an invite to it."""
        return room_id in self.moderated and room_id not in self.unrecorded

    def community_of(self, room_id: str) -> str | None:
        """The community a group room or staff room belongs to (None: none known)."""
        # A staff room is its community's whatever else names it.
        return (
            self.staff_rooms.community_of(room_id)
            or self.community.get(room_id)
            or self.listed.get(room_id)
            or self.spaces.get(room_id)
        )

    async def community_of_any(
        self,
        room_id: str,
        database: Callable[[], contextlib.AbstractAsyncContextManager[AsyncConnection]],
    ) -> str | None:
        """The community of any room the bot knows: a staff or group room's from memory,
        a case's DM or check-in room's through its case (a purged case's room the bot
        could not leave: as recorded with it), a member's `!policy` DM's as the community
        they last asked in (one read). None: none's."""
        known = self.community_of(room_id)
        if known is not None:
            return known
        kind = self.kind(room_id)
        if kind in (RoomKind.DM, RoomKind.CHECKIN):
            async with database() as conn:
                # Else a purged case's room the bot could not leave: its case's community.
                return await cases.community_of_room(
                    conn, room_id
                ) or await retention.community_of_former_room(conn, room_id)
        if kind is RoomKind.POLICY:  # the community the member last asked in
            async with database() as conn:
                return await policy_rooms.community_of(conn, room_id)
        return None

    def stop_moderating(self, room_id: str) -> None:
        """The bot left it: whose it was is forgotten too (added again, it is whoever's
        staff add it)."""
        self.moderated.discard(room_id)
        self.unrecorded.discard(room_id)
        self.community.pop(room_id, None)

    def watch_member(self, room_id: str, member_id: str) -> None:
        self._watched.add((room_id, member_id))

    def is_watched(self, room_id: str, member_id: str) -> bool:
        return (room_id, member_id) in self._watched

    def kind(self, room_id: str) -> RoomKind:
        if self.staff_rooms.is_staff_room(room_id):
            return RoomKind.STAFF
        if room_id in self._dms:
            return RoomKind.DM
        if room_id in self._checkins:
            return RoomKind.CHECKIN
        if room_id in self._policy:
            return RoomKind.POLICY
        return RoomKind.GROUP

    def is_private(self, room_id: str) -> bool:
        """The staff room, a DM or a check-in room: every event there may need acting on."""
        return room_id in self.conversations or self.staff_rooms.is_staff_room(room_id)

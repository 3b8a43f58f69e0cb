"""The staff room: where every alert goes, so the bot must be in it — and only it.

`policy.staff_room` may be an alias that does not exist yet, or a room the bot
has not been invited to yet, when the service starts. Neither is fatal (the
service must keep recording flags and protecting members), but neither is
forgotten either: the service keeps trying until the room is resolved and
joined, /health says what is wrong meanwhile, and whatever is for staff waits
for the room rather than being dropped.

An alias is resolved once and the room id pinned in the database: whoever later
points the alias at another room does not become the staff room. A moved alias is
logged and shown on /health; configuring a room id avoids the question altogether.

An alias that does not exist yet can be created by anyone on the homeserver. So the
room it first resolves to is taken only if staff made it theirs: its creator, or an
admin there (power 100) who has joined it, is named in `policy.staff`, and nobody can
join it without an invite. (Power can be given to anyone without their consent; joining
cannot.) Any other room is left at once, never posted in, never pinned; the log
and /health say why, and the service keeps looking (staff can still make theirs).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from bot.core.ports import Homeserver, HomeserverUnavailable, Refused
from bot.store import pins

log = logging.getLogger(__name__)
PIN = "staff_room"


# What resolve() answers for a room the alias points to that is not (yet) staff's.
NOT_STAFFS = "SAFEGUARD_NOT_STAFF_ROOM"
# Join rules that need staff's say-so to get in (an invite, or a knock they accept).
INVITE_ONLY = frozenset({"invite", "private", "knock"})


def not_staffs_room(events: Iterable[Any], staff: Sequence[str]) -> str | None:
    """Why a room (its whole state, as read) is not one staff made theirs; None if it is.

    Its creator (the create event's sender) made it. Anyone else it names — an admin
    (power 100), or an additional creator (room version 12) — counts only once joined:
    whoever creates a room can name anyone there without their consent, and could
    otherwise make a room of theirs the staff room by naming a staff member in it."""
    creator: str | None = None
    named: set[str] = set()
    joined: set[str] = set()
    join_rule = "invite"  # the spec's default when the room has no join rules
    for event in events:
        if not isinstance(event, dict):
            continue
        content = event.get("content") if isinstance(event.get("content"), dict) else {}
        kind = event.get("type")
        state_key = event.get("state_key")
        if kind == "m.room.member":
            if isinstance(state_key, str) and content.get("membership") == "join":
                joined.add(state_key)
            continue
        if state_key != "":
            continue
        if kind == "m.room.create":
            creator = str(event.get("sender"))
            extra = content.get("additional_creators")
            if isinstance(extra, list):
                named.update(user for user in extra if isinstance(user, str))
        elif kind == "m.room.power_levels":
            users = content.get("users")
            if isinstance(users, dict):
                named.update(u for u, level in users.items() if level == 100)
        elif kind == "m.room.join_rules":
            join_rule = str(content.get("join_rule"))
    if join_rule not in INVITE_ONLY:
        return f"anyone can join it (join rule {join_rule!r})"
    if not ({creator} | (named & joined)) & set(staff):
        return (
            "neither its creator nor an admin there (power 100) who has joined it is named "
            "in policy.staff"
        )
    return None


class StaffRoomUnavailable(HomeserverUnavailable):
    """The staff room cannot take messages yet; whatever was for it waits and is retried."""


class StaffRoom:
    """The staff room as configured, and the room id it resolved to (pinned)."""

    def __init__(
        self,
        configured: str,
        db: AsyncEngine | None = None,
        *,
        staff: Sequence[str] = (),
        pin: str = PIN,
    ) -> None:
        self.configured = configured
        self._db = db
        # Where its alias's room is pinned: one pin a community (the first keeps the
        # name it always had, so an install that gains communities keeps its room).
        self._pin = pin
        self._staff = tuple(staff)
        self.room_id: str | None = configured if configured.startswith("!") else None
        # Why the room the alias points to was not taken (None: none refused).
        self.refused: str | None = None
        self._refused_room: str | None = None

    @property
    def is_alias(self) -> bool:
        return not self.configured.startswith("!")

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

    async def load_pin(self) -> None:
        """At start: the room an alias was pinned to before, if it was."""
        if not self.is_alias or self._db is None:
            return
        async with self._db.connect() as conn:
            pinned = await pins.get(conn, self._pin)
        if pinned is not None and pinned.source == self.configured:
            self.room_id = pinned.value

    async def resolve(self, homeserver: Homeserver) -> str | Refused:
        """The room id; an alias is resolved (and pinned) the first time only."""
        if self.room_id is not None:
            return self.room_id
        room_id = await homeserver.resolve_room(self.configured)
        if isinstance(room_id, Refused):
            return room_id
        refused = await self._vet(homeserver, room_id)
        if refused is not None:
            return Refused(NOT_STAFFS, refused)
        if self._db is not None:
            async with self._db.begin() as conn:
                await pins.put(conn, self._pin, room_id, self.configured, dt.datetime.now(dt.UTC))
        log.info("staff room %s pinned to %s", self.configured, room_id)
        self.room_id = room_id
        return room_id

    async def _vet(self, homeserver: Homeserver, room_id: str) -> str | None:
        """Whether the room an alias first resolved to is staff's (None), read from inside
        it: the bot joins to read it, and leaves it again at once if it is not (and does
        not go back while the alias still points there)."""
        if room_id == self._refused_room and self.refused is not None:
            return self.refused
        if await homeserver.membership(room_id, homeserver.bot_user_id) != "join":
            joined = await homeserver.join_room(room_id)
            if isinstance(joined, Refused):
                self.refused = None
                return f"the bot cannot join the staff room {room_id} ({joined}): invite it"
        state = await homeserver.room_state_events(room_id)
        why = str(state) if isinstance(state, Refused) else not_staffs_room(state, self._staff)
        if why is None:
            self.refused = None
            return None
        await homeserver.leave_room(room_id)
        self._refused_room = room_id
        self.refused = (
            f"{self.configured} points to {room_id}, which is not a staff room: {why}. Nothing "
            "is posted there; make the staff room invite-only with a staff member from "
            "policy.staff as its creator (or as an admin who has joined it), or configure "
            "policy.staff_room as a room id"
        )
        log.error("%s", self.refused)
        return self.refused

    async def connect(self, homeserver: Homeserver) -> str | None:
        """Resolve the room and make sure the bot is joined.

        Returns None when the bot is in the staff room, or what is wrong, in words
        an operator can act on. Raises HomeserverUnavailable if Synapse cannot be reached.
        """
        room_id = await self.resolve(homeserver)
        if isinstance(room_id, Refused):
            if room_id.errcode == NOT_STAFFS:
                return room_id.reason  # taken by someone else, or not joinable yet
            return f"the staff room {self.configured} cannot be resolved ({room_id})"
        if await homeserver.membership(room_id, homeserver.bot_user_id) == "join":
            return None
        joined = await homeserver.join_room(room_id)
        if isinstance(joined, Refused):
            return f"the bot cannot join the staff room {room_id} ({joined}): invite it"
        return None

    async def problem(self, homeserver: Homeserver) -> str | None:
        """What stops the bot posting in the staff room now, or makes it doubtful."""
        if self.room_id is None:
            return self.refused or f"the staff room {self.configured} is not resolved yet"
        if await homeserver.membership(self.room_id, homeserver.bot_user_id) != "join":
            return f"the bot is not in the staff room {self.room_id}"
        if self.is_alias:
            now = await homeserver.resolve_room(self.configured)
            if not isinstance(now, Refused) and now != self.room_id:
                log.warning(
                    "%s now points to %s; the staff room stays %s",
                    self.configured,
                    now,
                    self.room_id,
                )
                return (
                    f"{self.configured} now points to {now}, not to the staff room "
                    f"{self.room_id} (pinned when it was first resolved): find out who "
                    "moved it; to use another room, configure its room id"
                )
        return None


class StaffRooms:
    """Every community's staff room (one, without communities): which room is whose."""

    def __init__(self, rooms: Mapping[str, StaffRoom]) -> None:
        self.by_community = dict(rooms)
        self._all = tuple(self.by_community.values())

    @classmethod
    def of(cls, rooms: StaffRoom | StaffRooms) -> StaffRooms:
        """The set itself, or one staff room as the only community's (`default`)."""
        return rooms if isinstance(rooms, StaffRooms) else cls({"default": rooms})

    def __iter__(self) -> Iterator[StaffRoom]:
        return iter(self._all)

    def __len__(self) -> int:
        """How many communities the install has (each has its staff room)."""
        return len(self._all)

    def is_staff_room(self, room_id: str) -> bool:
        # On the intake's hot path: a plain loop over a handful, no generator.
        for room in self._all:  # noqa: SIM110
            if room.room_id == room_id:
                return True
        return False

    def community_of(self, room_id: str) -> str | None:
        """The community whose staff room this is (None: none's)."""
        for community, room in self.by_community.items():
            if room.room_id == room_id:
                return community
        return None

    def by_address(self, address: str) -> StaffRoom | None:
        """The staff room a message was queued for (its alias as configured, or its id)."""
        for room in self.by_community.values():
            if address in (room.configured, room.room_id):
                return room
        return None

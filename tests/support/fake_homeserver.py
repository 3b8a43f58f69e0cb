"""An in-memory homeserver for the policy core's unit tests (Draupnir-style small fake).

Only for logic our code decides (ordering, resumption, idempotency). Anything
Synapse decides — power levels, kicks, invites, rate limits — is tested against
the real Synapse in tests/integration.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bot.core.ports import (
    MESSAGE_MARKER_KEY,
    ROOM_MARKER_KEY,
    Done,
    EncryptionUnavailable,
    HomeserverUnavailable,
    Refused,
    RoomCreated,
    RoomState,
    Sent,
    TimelinePage,
    message_txn_id,
)


class Crash(BaseException):
    """The process died here: nothing after this point ran, nothing was recorded."""


@dataclass
class FakeRoom:
    room_id: str
    members: dict[str, str] = field(default_factory=dict)
    state: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)


class FakeHomeserver:
    def __init__(self, bot_user_id: str = "@safeguard:localhost") -> None:
        self._bot = bot_user_id
        self.moderator: str | None = None  # the moderation user, who kicks when set
        self.rooms: dict[str, FakeRoom] = {}
        self.direct: dict[str, list[str]] = {}
        self.calls: list[str] = []
        self.kicks: list[tuple[str, str]] = []
        # (room, txn id) -> event id, forgotten when "Synapse restarts": Synapse dedupes a
        # send by its path (the room's in it) and transaction id.
        self.txn_ids: dict[tuple[str, str], str] = {}
        self.crash_at: int | None = None
        self.unavailable_for: set[str] = set()
        self.refuse: dict[str, Refused] = {}
        self.refuse_sends_in: dict[str, Refused] = {}  # one room refusing every message
        self.down = False  # what check() reports: the whole homeserver away
        self.display_names: dict[str, str] = {}
        self.redactions: list[tuple[str, str, str]] = []
        # Synapse creating a room, then dying before it sent the invites (seen in real life).
        self.create_dies_before_invites = False
        self.invites: list[tuple[str, str, bool]] = []  # (room, user, is_direct), in order
        self.expected_members: list[tuple[str, str]] = []  # told ahead of an invite's answer
        # End-to-end encryption, as the bot's device sees it: the encrypted rooms, and
        # why it cannot encrypt for them now (None: it can).
        self.encrypted_rooms: set[str] = set()
        self.encryption_broken: str | None = None
        self._ids = itertools.count(1)

    @property
    def bot_user_id(self) -> str:
        return self._bot

    def is_ours(self, user_id: object) -> bool:
        return user_id in (self._bot, self.moderator)

    def _enter(self, verb: str) -> None:
        self.calls.append(verb)
        if self.crash_at is not None and len(self.calls) == self.crash_at:
            raise Crash(verb)
        if verb in self.unavailable_for:
            raise HomeserverUnavailable(verb)

    def _after(self, verb: str) -> None:
        # A crash just after the homeserver acted, before we could record it.
        if self.crash_at is not None and -len(self.calls) == self.crash_at:
            raise Crash(f"after {verb}")

    def add_room(self, room_id: str, members: dict[str, str], power: dict[str, int]) -> FakeRoom:
        room = FakeRoom(room_id, dict(members))
        room.state[("m.room.create", "")] = {"room_version": "10", "creator": "@mod:localhost"}
        room.state[("m.room.power_levels", "")] = {"users": power, "kick": 50}
        self.rooms[room_id] = room
        return room

    def messages_in(self, room_id: str) -> list[dict[str, Any]]:
        return [e for e in self.rooms[room_id].events if e["type"] == "m.room.message"]

    # ---- bot.core.ports.Homeserver ----

    async def room_state(self, room_id: str) -> RoomState | Refused:
        self._enter("room_state")
        room = self.rooms[room_id]
        create = room.state[("m.room.create", "")]
        return RoomState(
            room_id,
            create.get("creator", ""),
            create,
            room.state.get(("m.room.power_levels", "")),
            create["room_version"],
        )

    async def room_state_events(self, room_id: str) -> list[Any] | Refused:
        self._enter("room_state_events")
        room = self.rooms[room_id]
        events: list[Any] = [
            {
                "type": kind,
                "state_key": key,
                "sender": content.get("creator") or self._bot,
                "content": content,
                "origin_server_ts": 1,
            }
            for (kind, key), content in room.state.items()
        ]
        events += [self._member_event(room, user) for user in room.members]
        return events

    def _member_event(self, room: FakeRoom, user_id: str) -> dict[str, Any] | None:
        for event in reversed(room.events):
            if event["type"] == "m.room.member" and event.get("state_key") == user_id:
                return {"origin_server_ts": 1, **event}
        membership = room.members.get(user_id)
        if membership is None:
            return None
        return {
            "type": "m.room.member",
            "state_key": user_id,
            "sender": user_id,
            "content": {"membership": membership},
            "origin_server_ts": 1,
        }

    async def get_event(self, room_id: str, event_id: str) -> dict[str, Any] | Refused:
        self._enter("get_event")
        for event in self.rooms[room_id].events:
            if event["event_id"] == event_id:
                return event
        return Refused("M_NOT_FOUND", "no such event", 404)

    async def membership(self, room_id: str, user_id: str) -> str | None:
        self._enter("membership")
        return self.rooms[room_id].members.get(user_id)

    async def check(self) -> str | None:
        return "the homeserver is down" if self.down else None

    async def member_event(self, room_id: str, user_id: str) -> dict[str, Any] | Refused | None:
        self._enter("member_event")
        if "member_event" in self.refuse:
            return self.refuse["member_event"]
        return self._member_event(self.rooms[room_id], user_id)

    async def resolve_room(self, room_id_or_alias: str) -> str | Refused:
        return room_id_or_alias

    async def display_name(self, user_id: str) -> str | None:
        self._enter("display_name")
        return self.display_names.get(user_id)

    async def room_name(self, room_id: str) -> str | None:
        self._enter("room_name")
        return self.rooms[room_id].state.get(("m.room.name", ""), {}).get("name")

    async def redact(
        self, room_id: str, event_id: str, *, reason: str, txn_id: str
    ) -> Done | Refused:
        self._enter("redact")
        if "redact" in self.refuse:
            return self.refuse["redact"]
        self.redactions.append((room_id, event_id, reason))
        self._after("redact")
        return Done()

    async def is_redacted(self, room_id: str, event_id: str) -> bool | None:
        self._enter("is_redacted")
        return any(r[:2] == (room_id, event_id) for r in self.redactions)

    async def space_children(self, space_id: str, *, max_depth: int) -> list[str] | Refused:
        return []

    async def join_room(self, room_id: str) -> Done | Refused:
        self._enter("join_room")
        self.rooms[room_id].members[self._bot] = "join"
        return Done()

    async def leave_room(self, room_id: str) -> Done | Refused:
        self._enter("leave_room")
        if room_id in self.rooms:
            self.rooms[room_id].members[self._bot] = "leave"
        return Done()

    async def find_marked_room(self, marker: str) -> str | None:
        self._enter("find_marked_room")
        for room in self.rooms.values():
            marked = room.state.get(("m.room.create", ""), {}).get(ROOM_MARKER_KEY) == marker
            if room.members.get(self._bot) == "join" and marked:
                return room.room_id
        return None

    async def create_room(
        self,
        *,
        marker: str,
        invite: list[str],
        name: str | None = None,
        topic: str | None = None,
        is_direct: bool = False,
        encrypted: bool = False,
    ) -> RoomCreated | Refused:
        self._enter("create_room")
        if "create_room" in self.refuse:
            return self.refuse["create_room"]
        for known in self.rooms.values():
            # As Synapse does through the marker's alias: one room per marker, ever.
            if known.state.get(("m.room.create", ""), {}).get(ROOM_MARKER_KEY) == marker:
                return RoomCreated(known.room_id, existing=True)
        room_id = f"!created{next(self._ids)}:localhost"
        room = FakeRoom(room_id, {self._bot: "join"})
        room.state[("m.room.create", "")] = {"room_version": "12", ROOM_MARKER_KEY: marker}
        self.rooms[room_id] = room
        if encrypted:
            self.encrypted_rooms.add(room_id)
        if self.create_dies_before_invites:
            raise Crash("create_room, before its invites")
        room.members.update({user: "invite" for user in invite})
        self._after("create_room")
        return RoomCreated(room_id)

    async def direct_rooms(self) -> Mapping[str, Sequence[str]]:
        self._enter("direct_rooms")
        return {user: list(rooms) for user, rooms in self.direct.items()}

    def direct_rooms_known(self, user_id: str) -> Sequence[str] | None:
        return self.direct.get(user_id, [])

    async def remember_direct_room(
        self, user_id: str, room_id: str, *, known: Mapping[str, Sequence[str]] | None = None
    ) -> Done | Refused:
        self._enter("remember_direct_room")
        rooms = self.direct.setdefault(user_id, [])
        if room_id not in rooms:
            rooms.append(room_id)
        return Done()

    async def forget_direct_rooms(self, room_ids: Collection[str]) -> Done | Refused:
        self._enter("forget_direct_rooms")
        for user in list(self.direct):
            self.direct[user] = [room for room in self.direct[user] if room not in room_ids]
            if not self.direct[user]:
                del self.direct[user]
        return Done()

    def expect_member(self, room_id: str, user_id: str) -> None:
        self.expected_members.append((room_id, user_id))

    async def invite(
        self, room_id: str, user_id: str, *, is_direct: bool = False
    ) -> Done | Refused:
        self._enter("invite")
        if "invite" in self.refuse:
            return self.refuse["invite"]
        self.rooms[room_id].members[user_id] = "invite"
        self.invites.append((room_id, user_id, is_direct))
        self._after("invite")
        return Done()

    async def kick(self, room_id: str, user_id: str, reason: str) -> Done | Refused:
        self._enter("kick")
        if "kick" in self.refuse:
            return self.refuse["kick"]
        room = self.rooms[room_id]
        if room.members.get(user_id) not in ("join", "invite"):
            return Refused("M_FORBIDDEN", "not in room", 403)
        room.members[user_id] = "leave"
        self.kicks.append((room_id, user_id))
        room.events.append(
            {
                "type": "m.room.member",
                "state_key": user_id,
                "reason": reason,
                "sender": self.moderator or self._bot,
                "content": {"membership": "leave"},
                "event_id": f"$kick{next(self._ids)}",
                "order": next(self._ids),
            }
        )
        self._after("kick")
        return Done()

    async def send(
        self,
        room_id: str,
        content: dict[str, Any],
        *,
        txn_id: str,
        event_type: str = "m.room.message",
        plain: bool = False,
        encrypt_by: Any = None,
    ) -> Sent | Refused:
        self._enter("send")
        encrypting = room_id in self.encrypted_rooms and not plain
        if encrypting and self.encryption_broken is not None:
            raise EncryptionUnavailable(self.encryption_broken)
        if "send" in self.refuse:
            return self.refuse["send"]
        if room_id in self.refuse_sends_in:
            return self.refuse_sends_in[room_id]
        if (room_id, txn_id) in self.txn_ids:  # Synapse's own dedupe, while it remembers
            return Sent(self.txn_ids[room_id, txn_id])
        event_id = f"$ev{next(self._ids)}"
        self.rooms[room_id].events.append(
            {
                "type": event_type,
                "event_id": event_id,
                "sender": self._bot,
                "content": content,
                "order": next(self._ids),
                "encrypted": encrypting,
                # As Synapse shows it to the sender alone.
                "unsigned": {"transaction_id": txn_id},
            }
        )
        self.txn_ids[room_id, txn_id] = event_id
        self._after("send")
        return Sent(event_id)

    def encryption_problem(self) -> str | None:
        return self.encryption_broken

    async def find_marked_message(
        self, room_id: str, marker: str, *, limit: int = 200
    ) -> str | None:
        self._enter("find_marked_message")
        for event in reversed(self.rooms[room_id].events):
            tag = event.get("content", {}).get(MESSAGE_MARKER_KEY)
            if isinstance(tag, dict) and tag.get("marker") == marker:
                return event["event_id"]
            if event.get("unsigned", {}).get("transaction_id") == message_txn_id(marker):
                return event["event_id"]
        return None

    # ---- bot.core.ports.Timeline (a token is a position in the room's event list) ----

    async def current_position(self, room_id: str) -> str | Refused:
        return str(len(self.rooms[room_id].events))

    async def read_forward(self, room_id: str, token: str, *, limit: int) -> TimelinePage | Refused:
        events = self.rooms[room_id].events[int(token) : int(token) + limit]
        return TimelinePage(
            [e | {"room_id": room_id} for e in events],
            str(int(token) + len(events)) if events else None,
        )

    async def read_back(
        self, room_id: str, token: str | None, *, limit: int
    ) -> TimelinePage | Refused:
        end = len(self.rooms[room_id].events) if token is None else int(token)
        start = max(0, end - limit)
        events = self.rooms[room_id].events[start:end]
        return TimelinePage(
            [e | {"room_id": room_id} for e in reversed(events)], str(start) if start else None
        )

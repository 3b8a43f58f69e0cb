"""Membership and power changes: the rooms the bot moderates, and members coming back.

The moderated rooms are the rooms the bot was invited to. Each time it joins
one, staff are told who added it and whether it can remove members there, and
told again if that power is taken away later.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from bot.authorization import can_kick, power_level
from bot.deployment import Deployment
from bot.dispatch import Handling
from bot.ports import Homeserver, Refused
from bot.rooms import RoomDirectory, RoomKind
from bot.staff_room import StaffRoom
from bot.store import audit, cases, outbox, rooms
from bot.templates import render_kick_power_lost, render_room_joined

log = logging.getLogger(__name__)

ABSENT = frozenset({"leave", "ban", None})


def _membership(content: object) -> str | None:
    if isinstance(content, Mapping):
        value = content.get("membership")
        return value if isinstance(value, str) else None
    return None


class Membership:
    def __init__(
        self,
        db: AsyncEngine,
        homeserver: Homeserver,
        deployment: Deployment,
        staff_room: StaffRoom,
        room_directory: RoomDirectory,
        *,
        on_outbox: Callable[[], None],
        on_staff_room_joined: Callable[[], None],
    ) -> None:
        self._db = db
        self._hs = homeserver
        self._deployment = deployment
        self._staff_room = staff_room
        self._rooms = room_directory
        self._on_outbox = on_outbox
        # Told when the bot joins the staff room on an invite (alerts may be waiting for it).
        self._on_staff_room_joined = on_staff_room_joined

    async def bot_membership(self, handling: Handling) -> None:
        """The bot was invited somewhere, or removed from a room."""
        membership = _membership(handling.item.payload.get("content"))
        if membership == "invite":
            await self._invited(handling)
        elif membership in ("leave", "ban"):
            await self._removed(handling, membership)

    async def member_event(self, handling: Handling) -> None:
        """Someone's membership changed in a group room: a member coming back ends their case."""
        item = handling.item
        event = item.payload
        user = event.get("state_key")
        membership = _membership(event.get("content"))
        unsigned = event.get("unsigned") if isinstance(event.get("unsigned"), Mapping) else {}
        previous = _membership(unsigned.get("prev_content"))
        # A display-name change is a join after a join: only a real return ends the case.
        if membership != "join" or previous == "join" or not isinstance(user, str):
            return
        now = dt.datetime.now(dt.UTC)
        async with handling.transaction() as conn:
            case_id = await cases.end_active(conn, item.room_id, user, now)
            if case_id is not None:
                await audit.append(
                    conn,
                    self._deployment.provenance,
                    "member_rejoined",
                    case_id=case_id,
                    facts={"note": "later flags in this room open a new case"},
                    personal={"room": item.room_id, "member": user},
                    at=now,
                )

    async def _invited(self, handling: Handling) -> None:
        item = handling.item
        inviter = item.payload.get("sender", "")
        room_id = item.room_id
        now = dt.datetime.now(dt.UTC)
        if not self._deployment.may_invite(inviter):
            await self._hs.leave_room(room_id)  # rejects the invite
            await self._record(
                handling,
                "invite_refused",
                {"why": "inviter not allowed"},
                {"room": room_id, "inviter": inviter},
            )
            return
        joined = await self._hs.join_room(room_id)
        if isinstance(joined, Refused):
            await self._record(
                handling,
                "join_failed",
                {"error": str(joined)},
                {"room": room_id, "inviter": inviter},
            )
            return
        if self._staff_room.room_id is None:
            # The staff room's alias may only now exist (this may be that room's invite).
            await self._staff_room.connect(self._hs)
        if self._staff_room.is_staff_room(room_id):
            await self._record(
                handling, "staff_room_joined", {}, {"room": room_id, "inviter": inviter}
            )
            self._on_staff_room_joined()
            return
        kick = await self._can_kick(room_id)
        async with handling.transaction() as conn:
            await rooms.joined(conn, room_id, inviter=inviter, at=now, can_kick=kick)
            await audit.append(
                conn,
                self._deployment.provenance,
                "room_joined",
                facts={"can_kick": kick},
                personal={"room": room_id, "inviter": inviter},
                at=now,
            )
            await outbox.queue(
                conn,
                self._staff_room.address,
                render_room_joined(inviter=inviter, room=room_id, can_kick=bool(kick)),
                now,
            )
        self._on_outbox()

    async def _removed(self, handling: Handling, membership: str) -> None:
        item = handling.item
        now = dt.datetime.now(dt.UTC)
        async with handling.transaction() as conn:
            await rooms.left(conn, item.room_id, at=now)
            await audit.append(
                conn,
                self._deployment.provenance,
                "bot_removed",
                facts={"membership": membership},
                personal={"room": item.room_id, "by": item.payload.get("sender")},
                at=now,
            )

    async def power_levels_changed(self, handling: Handling) -> None:
        """Only moderated rooms (the bot was invited in) matter; not rooms the bot made."""
        item = handling.item
        room_id = item.room_id
        if self._rooms.kind(room_id) is not RoomKind.GROUP:
            return
        async with self._db.connect() as conn:
            known = await rooms.get(conn, room_id)
        if known is None:
            return  # not a room we were invited to moderate
        kick = await self._can_kick(room_id)
        if known.can_kick == kick:
            return
        now = dt.datetime.now(dt.UTC)
        async with handling.transaction() as conn:
            await rooms.set_can_kick(conn, room_id, kick)
            await audit.append(
                conn,
                self._deployment.provenance,
                "kick_power_changed",
                facts={"can_kick": kick},
                personal={"room": room_id, "by": item.payload.get("sender")},
                at=now,
            )
            if not kick:
                await outbox.queue(
                    conn, self._staff_room.address, render_kick_power_lost(room=room_id), now
                )
        self._on_outbox()

    async def _can_kick(self, room_id: str) -> bool | None:
        state = await self._hs.room_state(room_id)
        if isinstance(state, Refused):
            return None
        # Members sit at users_default; the bot must outrank them to remove them.
        default = power_level("@nobody:invalid", state)
        return can_kick(self._deployment.bot_user_id, default, state)

    async def _record(
        self, handling: Handling, kind: str, facts: dict[str, Any], personal: dict[str, Any]
    ) -> None:
        async with handling.transaction() as conn:
            await audit.append(
                conn,
                self._deployment.provenance,
                kind,
                facts=facts,
                personal=personal,
                at=dt.datetime.now(dt.UTC),
            )

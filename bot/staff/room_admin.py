"""The rooms the bot moderates, as staff see and manage them: `!rooms`, `!rooms leave`."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Iterable

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from bot.config.deployment import Deployment
from bot.core.ports import Homeserver, Refused
from bot.moderation.authorization import room_powers
from bot.moderation.room_state import RoomStateCache
from bot.rooms.directory import RoomDirectory
from bot.rooms.names import names_of
from bot.store import audit, rooms
from bot.texts.wording import place, when

MAX_LISTED = 60


def _yes_no(value: bool | None) -> str:
    return "unknown" if value is None else ("yes" if value else "NO")


class RoomAdmin:
    def __init__(
        self,
        db: AsyncEngine,
        homeserver: Homeserver,
        deployment: Deployment,
        room_state: RoomStateCache,
        room_directory: RoomDirectory,
    ) -> None:
        self._rooms = room_directory
        self._db = db
        self._hs = homeserver
        self._deployment = deployment
        self._room_state = room_state

    async def names(self, ids: Iterable[str]) -> dict[str, str | None]:
        """Rooms' and people's names (what case replies name them by)."""
        return await names_of(self._hs, ids)

    async def listing(self) -> str:
        """One line a room, its powers read now (not as they were when the bot joined)."""
        async with self._db.connect() as conn:
            moderated = await rooms.moderated(conn)
        if not moderated:
            return "I moderate no rooms yet. A staff member can invite me into one."
        shown = moderated[:MAX_LISTED]
        states, names = await asyncio.gather(
            asyncio.gather(*(self._room_state.fresh(r.room_id) for r in shown)),
            names_of(self._hs, (r.room_id for r in shown)),
        )
        zone = self._deployment.checkin.zone
        lines = [f"I moderate {len(moderated)} room(s) (times: {zone}):"]
        for room, state in zip(shown, states, strict=True):
            if isinstance(state, Refused):
                kick = redact = None
            else:
                kick, redact = room_powers(self._deployment.bot_user_id, state)
            added = when(room.joined_at, zone) if room.joined_at else "?"
            lines.append(
                f"{place(room.room_id, names[room.room_id])} — added by {room.inviter or '?'} "
                f"on {added}; "
                f"can remove members: {_yes_no(kick)}; can redact: {_yes_no(redact)}"
            )
        if len(moderated) > MAX_LISTED:
            lines.append(f"… and {len(moderated) - MAX_LISTED} more.")
        lines.append("`!rooms leave <room>` makes me leave one.")
        return "\n".join(lines)

    async def leave(self, room: str, by: str) -> tuple[str, str | None]:
        """Leave a moderated room. Returns (reply, the room id left or None)."""
        room_id = await self._hs.resolve_room(room)
        if isinstance(room_id, Refused):
            return f"I cannot find {room} ({room_id}).", None
        async with self._db.connect() as conn:
            known = await rooms.get(conn, room_id)
        if known is None or known.left_at is not None:
            return f"I do not moderate {room}: `!rooms` lists the rooms I do.", None
        left = await self._hs.leave_room(room_id)
        if isinstance(left, Refused):
            return f"I could not leave {room_id} ({left}).", None
        self._rooms.stop_moderating(room_id)  # flags there no longer take the flag lane
        return (
            f"I have left {room_id}, as {by} asked. Flags there will no longer reach me.",
            room_id,
        )

    async def record_left(
        self, conn: AsyncConnection, room_id: str, by: str, now: dt.datetime
    ) -> None:
        await rooms.left(conn, room_id, at=now)
        await audit.append(
            conn,
            self._deployment.provenance,
            "room_left",
            facts={"asked_by_staff": True},
            personal={"room": room_id, "by": by},
            at=now,
        )

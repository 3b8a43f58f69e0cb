"""The rooms the bot moderates, as staff see and manage them: `!rooms`, `!rooms leave`."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable, Iterable

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from bot.config.deployment import Deployment
from bot.core.ports import Homeserver, Refused
from bot.moderation.authorization import room_powers
from bot.moderation.room_state import RoomStateCache
from bot.rooms.directory import RoomDirectory
from bot.rooms.names import names_of
from bot.store import audit, rooms
from bot.texts.catalogues import N_, Language, language
from bot.texts.wording import place, when

MAX_LISTED = 60


def _yes_no(value: bool | None, language: Language) -> str:
    return language._(N_("unknown") if value is None else (N_("yes") if value else N_("NO")))


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
        self._language = language(deployment.language)
        self._ = self._language._

    async def names(self, ids: Iterable[str]) -> dict[str, str | None]:
        """Rooms' and people's names (what case replies name them by)."""
        return await names_of(self._hs, ids)

    async def listing(self) -> str:
        """One line a room, its powers read now (not as they were when the bot joined)."""
        async with self._db.connect() as conn:
            # Its own community's rooms alone: another's are not its staff's to see.
            moderated = await rooms.moderated(conn, community=self._deployment.community)
        if not moderated:
            return self._("I moderate no rooms yet. A staff member can invite me into one.")
        shown = moderated[:MAX_LISTED]
        states, names = await asyncio.gather(
            asyncio.gather(*(self._room_state.fresh(r.room_id) for r in shown)),
            names_of(self._hs, (r.room_id for r in shown)),
        )
        zone = self._deployment.checkin.zone
        _ = self._
        lines = [
            _("I moderate {count} room(s) (times: {zone}):").format(count=len(moderated), zone=zone)
        ]
        for room, state in zip(shown, states, strict=True):
            if isinstance(state, Refused):
                kick = redact = None
            else:
                kick, redact = room_powers(self._deployment.bot_user_id, state)
            added = when(room.joined_at, zone, self._language) if room.joined_at else "?"
            lines.append(
                _(
                    "{room} — added by {inviter} on {added}; can remove members: {kick}; "
                    "can redact: {redact}"
                ).format(
                    room=place(room.room_id, names[room.room_id]),
                    inviter=room.inviter or "?",
                    added=added,
                    kick=_yes_no(kick, self._language),
                    redact=_yes_no(redact, self._language),
                )
            )
        if len(moderated) > MAX_LISTED:
            lines.append(_("… and {count} more.").format(count=len(moderated) - MAX_LISTED))
        lines.append(_("`!rooms leave <room>` makes me leave one."))
        return "\n".join(lines)

    async def leave(self, room: str, by: str) -> tuple[str, str | None]:
        """Leave a moderated room. Returns (reply, the room id left or None)."""
        room_id = await self._hs.resolve_room(room)
        if isinstance(room_id, Refused):
            return self._("I cannot find {room} ({why}).").format(room=room, why=room_id), None
        async with self._db.connect() as conn:
            known = await rooms.get(conn, room_id)
        if (
            known is None
            or known.community != self._deployment.community  # another community's
            or known.left_at is not None
        ):
            return (
                self._("I do not moderate {room}: `!rooms` lists the rooms I do.").format(
                    room=room
                ),
                None,
            )
        left = await self._hs.leave_room(room_id)
        if isinstance(left, Refused):
            return self._("I could not leave {room} ({why}).").format(room=room_id, why=left), None
        self._rooms.stop_moderating(room_id)  # flags there no longer take the flag lane
        return (
            self._(
                "I have left {room}, as {by} asked. Flags there will no longer reach me."
            ).format(room=room_id, by=by),
            room_id,
        )

    async def claim(self, room: str, by: str, enrol: Callable[[str, str], Awaitable[None]]) -> str:
        """`!rooms claim <room>`: a room the bot was invited to by someone who is staff
        of several communities, claimed by one of them (the first to say wins)."""
        room_id = await self._hs.resolve_room(room)
        if isinstance(room_id, Refused):
            return self._("I cannot find {room} ({why}).").format(room=room, why=room_id)
        held = self._rooms.held_invites.get(room_id)
        community = self._deployment.community
        # This claim, retried: joined for this community then, its record not made.
        retried = (
            room_id in self._rooms.unrecorded and self._rooms.community_of(room_id) == community
        )
        if not retried and (held is None or community not in held):
            return self._(
                "I am not waiting to hear whose {room} is: only a room I asked about here "
                "can be claimed."
            ).format(room=room)
        self._rooms.held_invites.pop(room_id, None)
        await enrol(room_id, by)
        # After the join: a restart between the two finds the room moderated, not held.
        async with self._db.begin() as conn:
            await rooms.release_invite(conn, room_id)
        return self._("{room} is this community's now, as {by} said.").format(room=room, by=by)

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

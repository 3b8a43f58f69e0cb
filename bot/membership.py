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

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.authorization import can_kick, power_level
from bot.context import PolicyContext
from bot.ports import Homeserver, Refused
from bot.staff_room import connect_staff_room
from bot.store import audit, cases, outbox
from bot.store.ingest import InboxItem, finish
from bot.store.schema import rooms
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
        engine: AsyncEngine,
        homeserver: Homeserver,
        context: PolicyContext,
        *,
        on_outbox: Callable[[], None],
        finish_later: Callable[[InboxItem], None],
    ) -> None:
        self._engine = engine
        self._hs = homeserver
        self._ctx = context
        self._on_outbox = on_outbox
        self._done = finish_later
        # Told when the bot joins the staff room on an invite (alerts may be waiting for it).
        self.on_staff_room_joined: Callable[[], None] = lambda: None

    def _is_group_room(self, room_id: str) -> bool:
        return room_id != self._ctx.staff_room_id and room_id not in self._ctx.watched_rooms

    async def member_event(self, item: InboxItem) -> None:
        event = item.payload
        user = event.get("state_key")
        membership = _membership(event.get("content"))
        unsigned = event.get("unsigned") if isinstance(event.get("unsigned"), Mapping) else {}
        previous = _membership(unsigned.get("prev_content"))
        if user == self._ctx.bot_user_id:
            if membership == "invite":
                await self._invited(item)
            elif membership in ("leave", "ban"):
                await self._removed(item, membership)
            else:
                self._done(item)
            return
        # A display-name change is a join after a join: only a real return ends the case.
        if membership == "join" and previous != "join" and isinstance(user, str):
            now = dt.datetime.now(dt.UTC)
            async with self._engine.begin() as conn:
                case_id = await cases.end_active(conn, item.room_id, user, now)
                if case_id is not None:
                    await audit.append(
                        conn,
                        self._ctx.provenance,
                        "member_rejoined",
                        case_id=case_id,
                        facts={"note": "later flags in this room open a new case"},
                        personal={"room": item.room_id, "member": user},
                        at=now,
                    )
                await finish(conn, item.seq, now)
            return
        self._done(item)

    async def _invited(self, item: InboxItem) -> None:
        inviter = item.payload.get("sender", "")
        room_id = item.room_id
        now = dt.datetime.now(dt.UTC)
        if not self._ctx.may_invite(inviter):
            await self._hs.leave_room(room_id)  # rejects the invite
            await self._record(
                item,
                "invite_refused",
                {"why": "inviter not allowed"},
                {"room": room_id, "inviter": inviter},
            )
            return
        joined = await self._hs.join_room(room_id)
        if isinstance(joined, Refused):
            await self._record(
                item, "join_failed", {"error": str(joined)}, {"room": room_id, "inviter": inviter}
            )
            return
        if self._ctx.staff_room_id is None:
            # The staff room's alias may only now exist (this may be that room's invite).
            await connect_staff_room(self._hs, self._ctx)
        if room_id == self._ctx.staff_room_id:
            await self._record(item, "staff_room_joined", {}, {"room": room_id, "inviter": inviter})
            self.on_staff_room_joined()
            return
        kick = await self._can_kick(room_id)
        async with self._engine.begin() as conn:
            await self._upsert_room(conn, room_id, inviter=inviter, joined_at=now, can_kick=kick)
            await audit.append(
                conn,
                self._ctx.provenance,
                "room_joined",
                facts={"can_kick": kick},
                personal={"room": room_id, "inviter": inviter},
                at=now,
            )
            await outbox.queue(
                conn,
                self._ctx.staff_room,
                render_room_joined(inviter=inviter, room=room_id, can_kick=bool(kick)),
                now,
            )
            await finish(conn, item.seq, now)
        self._on_outbox()

    async def _removed(self, item: InboxItem, membership: str) -> None:
        now = dt.datetime.now(dt.UTC)
        async with self._engine.begin() as conn:
            await conn.execute(
                rooms.update().where(rooms.c.room_id == item.room_id).values(left_at=now)
            )
            await audit.append(
                conn,
                self._ctx.provenance,
                "bot_removed",
                facts={"membership": membership},
                personal={"room": item.room_id, "by": item.payload.get("sender")},
                at=now,
            )
            await finish(conn, item.seq, now)

    async def power_levels_changed(self, item: InboxItem) -> None:
        """Only moderated rooms (the bot was invited in) matter; not rooms the bot made."""
        room_id = item.room_id
        async with self._engine.connect() as conn:
            moderated = (
                await conn.execute(sa.select(rooms.c.room_id).where(rooms.c.room_id == room_id))
            ).first()
        if moderated is None or not self._is_group_room(room_id):
            self._done(item)
            return
        kick = await self._can_kick(room_id)
        now = dt.datetime.now(dt.UTC)
        async with self._engine.begin() as conn:
            known = (
                await conn.execute(sa.select(rooms.c.can_kick).where(rooms.c.room_id == room_id))
            ).first()
            if known is not None and known.can_kick != kick:
                await conn.execute(
                    rooms.update().where(rooms.c.room_id == room_id).values(can_kick=kick)
                )
                await audit.append(
                    conn,
                    self._ctx.provenance,
                    "kick_power_changed",
                    facts={"can_kick": kick},
                    personal={"room": room_id, "by": item.payload.get("sender")},
                    at=now,
                )
                if not kick:
                    await outbox.queue(
                        conn, self._ctx.staff_room, render_kick_power_lost(room=room_id), now
                    )
            await finish(conn, item.seq, now)
        self._on_outbox()

    async def _can_kick(self, room_id: str) -> bool | None:
        state = await self._hs.room_state(room_id)
        if isinstance(state, Refused):
            return None
        # Members sit at users_default; the bot must outrank them to remove them.
        default = power_level("@nobody:invalid", state)
        return can_kick(self._ctx.bot_user_id, default, state)

    async def _upsert_room(self, conn: Any, room_id: str, **values: Any) -> None:
        updated = await conn.execute(
            rooms.update().where(rooms.c.room_id == room_id).values(**values)
        )
        if not updated.rowcount:
            await conn.execute(rooms.insert().values(room_id=room_id, **values))

    async def _record(
        self, item: InboxItem, kind: str, facts: dict[str, Any], personal: dict[str, Any]
    ) -> None:
        now = dt.datetime.now(dt.UTC)
        async with self._engine.begin() as conn:
            await audit.append(
                conn, self._ctx.provenance, kind, facts=facts, personal=personal, at=now
            )
            await finish(conn, item.seq, now)

"""Every message from the member reaches staff: replies in the DM, and words in the
check-in room before any staff member has joined it.

The text goes to the staff room only; the case records the event id and that it
was relayed, never the text.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping

from sqlalchemy.ext.asyncio import AsyncEngine

from bot.deployment import Deployment
from bot.dispatch import Handling
from bot.rooms import RoomDirectory, RoomKind
from bot.staff_room import StaffRoom
from bot.store import audit, cases, outbox
from bot.templates import render_relay


class Relay:
    def __init__(
        self,
        db: AsyncEngine,
        deployment: Deployment,
        staff_room: StaffRoom,
        room_directory: RoomDirectory,
        *,
        on_outbox: Callable[[], None],
    ) -> None:
        self._db = db
        self._deployment = deployment
        self._staff_room = staff_room
        self._rooms = room_directory
        self._on_outbox = on_outbox

    async def __call__(self, handling: Handling) -> None:
        item = handling.item
        event = item.payload
        content = event.get("content")
        body = content.get("body") if isinstance(content, Mapping) else None
        if item.event_type != "m.room.message" or not isinstance(body, str):
            return
        in_checkin = self._rooms.kind(item.room_id) is RoomKind.CHECKIN
        async with self._db.connect() as conn:
            case = await (
                cases.by_checkin_room(conn, item.room_id)
                if in_checkin
                else cases.by_dm_room(conn, item.room_id)
            )
        if case is None or event.get("sender") != case.member_id:
            return
        if in_checkin and case.checkin_staff_joined_at is not None:
            return  # staff are in the room with them: they read it there
        now = dt.datetime.now(dt.UTC)
        async with handling.transaction() as conn:
            await outbox.queue(
                conn,
                self._staff_room.address,
                render_relay(
                    case_number=case.id,
                    member=case.member_id or "",
                    text=body,
                    where="check-in room" if in_checkin else "DM",
                ),
                now,
            )
            await audit.append(
                conn,
                self._deployment.provenance,
                "checkin_member_wrote" if in_checkin else "member_replied",
                case_id=case.id,
                facts={"relayed_to_staff": True, "event": item.event_id},
                personal={"member": case.member_id},
                at=now,
            )
        self._on_outbox()

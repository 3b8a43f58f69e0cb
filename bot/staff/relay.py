"""Every message from the member reaches staff: replies in the DM, and words in the
check-in room before any staff member has joined it — and the moderator's reply to
their debrief.

The text goes to the staff room only; the case records the event id and that it
was relayed, never the text.

A message in the room of a case being purged, or purged (the bot could not leave),
is a former member's: they are told the chat is closed and where to get help now,
and staff only that someone wrote — no text, no name, no case.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Mapping

from sqlalchemy.ext.asyncio import AsyncEngine

from bot.config.deployment import Deployment
from bot.core.ports import MESSAGE_MARKER_KEY, Homeserver, Refused, message_txn_id
from bot.intake.dispatch import Handling
from bot.rooms.directory import RoomDirectory, RoomKind
from bot.rooms.staff_room import StaffRoom
from bot.store import audit, cases, outbox, retention
from bot.texts.messages import Texts

log = logging.getLogger(__name__)


class CaseNotOpenYet(Exception):
    """A member wrote in their DM before the case their notice went ahead of was opened."""


class Relay:
    def __init__(
        self,
        db: AsyncEngine,
        homeserver: Homeserver,
        deployment: Deployment,
        staff_room: StaffRoom,
        room_directory: RoomDirectory,
        *,
        texts: Texts,
        on_outbox: Callable[[], None],
        awaits_case: Callable[[str], bool] = lambda room_id: False,
    ) -> None:
        # Whether a room is a member's DM whose notice went ahead of their case, the case
        # not opened yet (bot/steps/notify_ahead.py): what they write waits for it.
        self._awaits_case = awaits_case
        self._hs = homeserver
        self._texts = texts
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
        sender = event.get("sender")
        async with self._db.connect() as conn:
            if in_checkin:
                case, where = await cases.by_checkin_room(conn, item.room_id), "check-in room"
            else:
                case, where = await cases.by_dm_room(conn, item.room_id), "DM"
                if case is None or sender != case.member_id:
                    case, where = await cases.by_debrief_room(conn, item.room_id), "debrief"
            if case is None:
                former = await retention.is_former_room(conn, item.room_id)
            else:
                # Theirs to write in: the member's (or, in a debrief room, the moderator's).
                theirs = where == "debrief" or sender == case.member_id
                former = theirs and await retention.retiring(conn, case.id)
        if former and sender != self._deployment.bot_user_id:
            await self._former_member(handling)
            return
        if case is None:
            if self._awaits_case(item.room_id):
                # Retried (bot/intake/dispatch.py) until the case that takes it is open.
                raise CaseNotOpenYet(f"the case of the DM {item.room_id} is being opened")
            return
        if where == "debrief":
            await self._relay(handling, case, str(sender), body, where)
            return
        if sender != case.member_id:
            return
        if in_checkin and case.checkin_staff_joined_at is not None:
            return  # staff are in the room with them: they read it there
        await self._relay(handling, case, case.member_id or "", body, where)

    async def _former_member(self, handling: Handling) -> None:
        """The chat's case is gone (or going): where to get help now, once, and staff told
        that someone wrote — nothing of what, nor who."""
        item = handling.item
        marker = f"former:{item.event_id}"
        told = bool(item.attempts) and (
            await self._hs.find_marked_message(item.room_id, marker) is not None
        )
        if not told:
            answer = await self._hs.send(
                item.room_id,
                self._texts.farewell() | {MESSAGE_MARKER_KEY: {"marker": marker}},
                txn_id=message_txn_id(marker),
            )
            told = not isinstance(answer, Refused)
            if not told:
                log.warning("could not answer a former member: %s", answer)
        now = dt.datetime.now(dt.UTC)
        async with handling.transaction() as conn:
            await outbox.queue(
                conn, self._staff_room.address, self._texts.former_member_wrote(), now
            )
            await audit.append(
                conn,
                self._deployment.provenance,
                "former_member_wrote",
                facts={"told_where_to_get_help": told},
                at=now,
            )
        self._on_outbox()

    async def _relay(
        self, handling: Handling, case: cases.Case, sender: str, body: str, where: str
    ) -> None:
        item = handling.item
        now = dt.datetime.now(dt.UTC)
        async with handling.transaction() as conn:
            await outbox.queue(
                conn,
                self._staff_room.address,
                self._texts.relay(case_number=case.id, member=sender, text=body, where=where),
                now,
                case_id=case.id,
            )
            await audit.append(
                conn,
                self._deployment.provenance,
                {"check-in room": "checkin_member_wrote", "debrief": "moderator_replied"}.get(
                    where, "member_replied"
                ),
                case_id=case.id,
                facts={"relayed_to_staff": True, "event": item.event_id},
                personal={"member" if where != "debrief" else "moderator": sender},
                at=now,
            )
        self._on_outbox()

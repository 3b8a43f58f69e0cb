"""Delivering the outbox: staff-room messages that belong to no case step, each exactly once.

Messages go out in order. A staff room that cannot take them (not resolved, the
bot not allowed to post) holds the queue — /health says why — and nothing is
dropped. Any other refusal is retried a few times, then recorded as failed,
logged, and counted on /health, where an operator sees it. An encrypted staff
room the bot cannot encrypt for holds the queue too; once the first message has
waited `encryption.fallback_after`, one short plain note (naming no case) tells
staff that messages are waiting, and why, once per such wait.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable

from sqlalchemy.ext.asyncio import AsyncEngine

from bot.core.ports import (
    MESSAGE_MARKER_KEY,
    EncryptionUnavailable,
    Homeserver,
    HomeserverUnavailable,
    Refused,
    message_txn_id,
)
from bot.rooms.staff_room import StaffRoom, StaffRooms
from bot.store import outbox
from bot.texts.messages import Texts

log = logging.getLogger(__name__)
MAX_FAILURES = 3
FAILURE_DELAYS = (2.0, 10.0, 30.0)


class OutboxDelivery:
    def __init__(
        self,
        db: AsyncEngine,
        homeserver: Homeserver,
        texts: Texts | Callable[[str], Texts],
        staff_rooms: StaffRoom | StaffRooms,
        *,
        plain_after: dt.timedelta | None = None,
    ) -> None:
        self._staff_rooms = StaffRooms.of(staff_rooms)
        self._db = db
        self._hs = homeserver
        # The texts of the community whose staff room a note goes to (its language).
        self._texts_for = texts if callable(texts) else (lambda room_id: texts)
        # A message waiting this long for encryption: staff hear, in the clear, that
        # messages wait (None: encryption.fallback none).
        self._plain_after = plain_after
        self._waiting_for: str | None = None  # why the queue is held, logged once per hold
        # The rooms told in the clear that messages wait for encryption, once per wait.
        self._told_waiting: set[str] = set()

    async def work_once(self) -> bool:
        """Send what is due, in order in each room. A room that cannot take messages now
        holds its own queue, never another's (one community's staff room not resolved
        yet does not keep another's alert back); the homeserver away holds them all."""
        now = dt.datetime.now(dt.UTC)
        async with self._db.connect() as conn:
            queued = await outbox.pending(conn, now=now)
        held: dict[str, str] = {}  # room (as queued) -> why it holds its queue
        by_encryption: dict[str, str] = {}  # rooms whose encrypted messages wait
        sent_any = False
        for message in queued:
            # Queued while the staff room's alias did not resolve yet: the room it was
            # pinned to since, never what the alias points to now (anyone may have made
            # it point to a room of theirs). Held by room, however it was queued.
            room_id = self._where(message.room_id)
            room = room_id or message.room_id
            if room in held or (room in by_encryption and not message.plain):
                continue  # waits, in order; a plain message need not wait for encryption
            try:
                if room_id is None:
                    held[room] = f"the staff room {room} is not resolved yet"
                    continue
                event_id = None
                if message.attempts:
                    # A previous attempt may have been sent before a crash or a lost answer.
                    event_id = await self._hs.find_marked_message(room_id, message.marker)
                if event_id is None:
                    # Intent first: after a crash, the next attempt looks before sending.
                    async with self._db.begin() as conn:
                        await outbox.mark(conn, message.id, status="pending", now=now)
                    content = message.content | {MESSAGE_MARKER_KEY: {"marker": message.marker}}
                    sent = await self._hs.send(
                        room_id,
                        content,
                        txn_id=message_txn_id(message.marker),
                        plain=message.plain,
                    )
                    if isinstance(sent, Refused) and sent.errcode == "M_FORBIDDEN":
                        # Not (yet) in the staff room, or not allowed to post: an operator
                        # can fix that (/health says so), and nothing for staff is dropped.
                        held[room] = f"cannot post in {room_id} ({sent})"
                        continue
                    if isinstance(sent, Refused):
                        await self._refused(message, sent, now)
                        continue
                    event_id = sent.event_id
            except EncryptionUnavailable as exc:
                await self._tell_waiting(room_id, message, exc, now)
                by_encryption[room] = f"cannot encrypt for {room_id} ({exc})"
                continue
            except HomeserverUnavailable as exc:
                log.warning("staff message %d waits for the homeserver: %s", message.id, exc)
                return False
            async with self._db.begin() as conn:
                await outbox.mark(conn, message.id, status="sent", now=now, event_id=event_id)
            sent_any = True
            if room not in by_encryption:
                self._told_waiting.discard(room)
        if held or by_encryption:
            self._hold("; ".join([*held.values(), *by_encryption.values()]))
            return sent_any
        self._waiting_for = None
        return bool(queued)

    def _where(self, address: str) -> str | None:
        room = self._staff_rooms.by_address(address)
        if room is not None:
            return room.room_id
        return address if address.startswith("!") else None

    async def _tell_waiting(
        self, room_id: str, message: outbox.Outgoing, why: Exception, now: dt.datetime
    ) -> None:
        """Encryption holds the queue: past the fall-back time, one plain note says so."""
        if self._plain_after is None or room_id in self._told_waiting:
            return
        if message.created_at is None or now - message.created_at < self._plain_after:
            return
        content = self._texts_for(room_id).encryption_failing(case_number=None)
        try:
            sent = await self._hs.send(
                room_id, content, txn_id=f"safeguard.waiting.{message.id}", plain=True
            )
        except HomeserverUnavailable as exc:
            log.warning("could not say that staff messages wait: %s", exc)
            return
        if isinstance(sent, Refused):
            log.warning("could not say that staff messages wait: %s", sent)
            return
        self._told_waiting.add(room_id)
        log.error("staff messages wait for encryption (%s): staff told, unencrypted", why)

    async def _refused(self, message: outbox.Outgoing, sent: Refused, now: dt.datetime) -> None:
        failures = message.failures + 1
        async with self._db.begin() as conn:
            if failures >= MAX_FAILURES:
                await outbox.mark(conn, message.id, status="failed", now=now, error=str(sent))
                log.error("staff message %d refused for good: %s", message.id, sent)
                return
            delay = dt.timedelta(seconds=FAILURE_DELAYS[failures - 1])
            await outbox.retry_later(conn, message.id, now + delay, error=str(sent))
        log.warning("staff message %d refused (%s); retrying", message.id, sent)

    def _hold(self, why: str) -> None:
        """Keep the rooms' queues (in order) until the next round; say why once."""
        if why != self._waiting_for:
            log.error("staff messages wait: %s", why)
            self._waiting_for = why

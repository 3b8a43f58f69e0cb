"""Delivering the outbox: staff-room messages that belong to no case step, each exactly once.

Messages go out in order. A staff room that cannot take them (not resolved, the
bot not allowed to post) holds the queue — /health says why — and nothing is
dropped. Any other refusal is retried a few times, then recorded as failed,
logged, and counted on /health, where an operator sees it.
"""

from __future__ import annotations

import datetime as dt
import logging

from sqlalchemy.ext.asyncio import AsyncEngine

from bot.ports import MESSAGE_MARKER_KEY, Homeserver, HomeserverUnavailable, Refused
from bot.store import outbox

log = logging.getLogger(__name__)
MAX_FAILURES = 3
FAILURE_DELAYS = (2.0, 10.0, 30.0)


class OutboxDelivery:
    def __init__(self, db: AsyncEngine, homeserver: Homeserver) -> None:
        self._db = db
        self._hs = homeserver
        self._waiting_for: str | None = None  # why the queue is held, logged once per hold

    async def work_once(self) -> bool:
        now = dt.datetime.now(dt.UTC)
        async with self._db.connect() as conn:
            queued = await outbox.pending(conn, now=now)
        for message in queued:
            try:
                # Queued while the staff room's alias did not resolve yet: resolve it now.
                room_id = await self._hs.resolve_room(message.room_id)
                if isinstance(room_id, Refused):
                    return self._hold(f"{message.room_id} does not resolve ({room_id})")
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
                        room_id, content, txn_id=f"safeguard.{message.marker}"
                    )
                    if isinstance(sent, Refused) and sent.errcode == "M_FORBIDDEN":
                        # Not (yet) in the staff room, or not allowed to post: an operator
                        # can fix that (/health says so), and nothing for staff is dropped.
                        return self._hold(f"cannot post in {room_id} ({sent})")
                    if isinstance(sent, Refused):
                        await self._refused(message, sent, now)
                        continue
                    event_id = sent.event_id
            except HomeserverUnavailable as exc:
                log.warning("staff message %d waits for the homeserver: %s", message.id, exc)
                return False
            async with self._db.begin() as conn:
                await outbox.mark(conn, message.id, status="sent", now=now, event_id=event_id)
            self._waiting_for = None
        return bool(queued)

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

    def _hold(self, why: str) -> bool:
        """Keep the queue (in order) until the next round; say why once, not every round."""
        if why != self._waiting_for:
            log.error("staff messages wait: %s", why)
            self._waiting_for = why
        return False

"""Delivering the outbox: staff-room messages that belong to no case step, each exactly once."""

from __future__ import annotations

import datetime as dt
import logging

from sqlalchemy.ext.asyncio import AsyncEngine

from bot.context import PolicyContext
from bot.ports import MESSAGE_MARKER_KEY, Homeserver, HomeserverUnavailable, Refused
from bot.store import outbox

log = logging.getLogger(__name__)


class OutboxDelivery:
    def __init__(self, engine: AsyncEngine, homeserver: Homeserver, context: PolicyContext) -> None:
        self._engine = engine
        self._hs = homeserver
        self._ctx = context

    async def work_once(self) -> bool:
        async with self._engine.connect() as conn:
            queued = await outbox.pending(conn)
        for message in queued:
            now = dt.datetime.now(dt.UTC)
            try:
                event_id = None
                if message.attempts:
                    # A previous attempt may have been sent before a crash.
                    event_id = await self._hs.find_marked_message(message.room_id, message.marker)
                if event_id is None:
                    # Intent first: after a crash, the next attempt looks before sending.
                    async with self._engine.begin() as conn:
                        await outbox.mark(conn, message.id, status="pending", now=now)
                    content = message.content | {MESSAGE_MARKER_KEY: {"marker": message.marker}}
                    sent = await self._hs.send(
                        message.room_id, content, txn_id=f"safeguard.{message.marker}"
                    )
                    if isinstance(sent, Refused):
                        async with self._engine.begin() as conn:
                            await outbox.mark(
                                conn, message.id, status="failed", now=now, error=str(sent)
                            )
                        log.error("staff message %d refused: %s", message.id, sent)
                        continue
                    event_id = sent.event_id
            except HomeserverUnavailable as exc:
                log.warning("staff message %d waits for the homeserver: %s", message.id, exc)
                return False
            async with self._engine.begin() as conn:
                await outbox.mark(conn, message.id, status="sent", now=now, event_id=event_id)
        return bool(queued)

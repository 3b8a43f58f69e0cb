"""Draining the inbox: each recorded event goes to the handler the policy has for it.

Events are handled one at a time in arrival order. A homeserver outage leaves
the event queued and is retried with backoff (nothing is lost, order is kept);
an event that breaks its handler is recorded as failed, counted, audited and
reported to staff — it never blocks the events behind it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from bot.context import PolicyContext
from bot.membership import Membership
from bot.ports import Homeserver, HomeserverUnavailable
from bot.referral import Referral
from bot.store import audit, cases, ingest, outbox
from bot.store.ingest import InboxItem
from bot.templates import render_processing_failed, render_relay
from bot.triggers import recognise_flag

log = logging.getLogger(__name__)

# A handler may add itself here for events the referral issue does not cover
# (staff commands, check-in claims): (item) -> handled?
ExtraHandler = Callable[[InboxItem], Any]


class Dispatcher:
    def __init__(
        self,
        engine: AsyncEngine,
        homeserver: Homeserver,
        context: PolicyContext,
        *,
        on_case: Callable[[int], None],
        on_outbox: Callable[[], None],
        retry_delays: tuple[float, ...] = (0.5, 1, 2, 5, 10, 30),
    ) -> None:
        self._engine = engine
        self._ctx = context
        self._on_outbox = on_outbox
        self.referral = Referral(engine, homeserver, context, on_case=on_case, on_outbox=on_outbox)
        self._noops: list[int] = []
        self.membership = Membership(
            engine, homeserver, context, on_outbox=on_outbox, finish_later=self.finish_later
        )
        self.extra_handlers: list[ExtraHandler] = []
        self._retry_delays = retry_delays
        self._outage = 0

    async def work_once(self) -> bool:
        async with self._engine.connect() as conn:
            items = await ingest.pending(conn, limit=50)
        try:
            for item in items:
                try:
                    await self._handle(item)
                except HomeserverUnavailable as exc:
                    # Keep the event (and everything behind it) queued; try again later.
                    delay = self._retry_delays[min(self._outage, len(self._retry_delays) - 1)]
                    self._outage += 1
                    log.warning("homeserver unavailable (%s); retrying in %.1fs", exc, delay)
                    self._ctx.metrics.errors.labels("homeserver").inc()
                    await asyncio.sleep(delay)
                    return True
                except Exception as exc:
                    log.exception("event %s could not be processed", item.event_id)
                    await self._poisoned(item, exc)
                self._outage = 0
        finally:
            await self._flush_noops()
        return bool(items)

    def finish_later(self, item: InboxItem) -> None:
        """An event that needed nothing: marked done with the batch, in one write.

        Safe to lose in a crash: handling it again does nothing either.
        """
        self._noops.append(item.seq)

    async def _flush_noops(self) -> None:
        if self._noops:
            seqs, self._noops = self._noops, []
            async with self._engine.begin() as conn:
                await ingest.finish_many(conn, seqs, dt.datetime.now(dt.UTC))

    async def _handle(self, item: InboxItem) -> None:
        event = item.payload
        event_type = item.event_type
        for handler in self.extra_handlers:
            if await handler(item):
                return
        if event_type == "m.room.member":
            await self.membership.member_event(item)
            return
        if event_type == "m.room.power_levels":
            await self.membership.power_levels_changed(item)
            return
        if item.room_id in self._ctx.watched_rooms and item.room_id != self._ctx.staff_room_id:
            await self._relay_dm_reply(item)
            return
        if item.room_id != self._ctx.staff_room_id:
            flag = recognise_flag(
                event, reactions=self._ctx.policy.reactions, command=self._ctx.policy.command
            )
            if flag is not None:
                await self.referral.handle(item, flag)
                return
        await self._finish(item)

    async def _relay_dm_reply(self, item: InboxItem) -> None:
        event = item.payload
        content = event.get("content")
        body = content.get("body") if isinstance(content, Mapping) else None
        now = dt.datetime.now(dt.UTC)
        async with self._engine.begin() as conn:
            case = await cases.case_for_dm_room(conn, item.room_id)
            sender = event.get("sender")
            if (
                case is not None
                and sender == case.member_id
                and event.get("type") == "m.room.message"
                and isinstance(body, str)
            ):
                await outbox.queue(
                    conn,
                    self._ctx.staff_room,
                    render_relay(case_number=case.id, member=sender, text=body),
                    now,
                )
                await audit.append(
                    conn,
                    self._ctx.provenance,
                    "member_replied",
                    case_id=case.id,
                    facts={"relayed_to_staff": True, "event": item.event_id},
                    personal={"member": sender},
                    at=now,
                )
            await ingest.finish(conn, item.seq, now)
        self._on_outbox()

    async def _finish(self, item: InboxItem) -> None:
        self.finish_later(item)

    async def _poisoned(self, item: InboxItem, exc: Exception) -> None:
        now = dt.datetime.now(dt.UTC)
        self._ctx.metrics.errors.labels("event").inc()
        error = f"{type(exc).__name__}: {exc}"[:500]
        async with self._engine.begin() as conn:
            await ingest.finish(conn, item.seq, now, error=error)
            await audit.append(
                conn,
                self._ctx.provenance,
                "event_failed",
                facts={"event": item.event_id, "type": item.event_type, "error": error},
                personal={"room": item.room_id},
                at=now,
            )
            # A failed event might have been a flag: a person must look at it.
            await outbox.queue(
                conn,
                self._ctx.staff_room,
                render_processing_failed(event_id=item.event_id, room=item.room_id),
                now,
            )
        self._on_outbox()

"""A moderator's flag becomes a case, or a recorded refusal: the referral decision.

Authorisation always runs on room state fetched now, never on a cached copy:
a moderator demoted a second ago cannot flag.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from bot.authorization import Refusal, decide_flag, is_staff
from bot.checkin_time import due_at
from bot.context import PolicyContext
from bot.ports import Homeserver, Refused, RoomState
from bot.store import audit, cases, outbox
from bot.store.ingest import InboxItem, finish
from bot.templates import render_refusal
from bot.triggers import Flag

log = logging.getLogger(__name__)

# Case steps, in the order the policy runs them (see workflow.py).
CASE_STEPS = ["notify", "remove", "room_notice", "alert", "schedule", "checkin"]


def event_time(event: Mapping[str, Any], fallback: dt.datetime) -> dt.datetime:
    ts = event.get("origin_server_ts")
    if isinstance(ts, int) and not isinstance(ts, bool) and ts > 0:
        try:
            return dt.datetime.fromtimestamp(ts / 1000, dt.UTC)
        except (OverflowError, OSError, ValueError):
            return fallback
    return fallback


class Referral:
    def __init__(
        self,
        engine: AsyncEngine,
        homeserver: Homeserver,
        context: PolicyContext,
        *,
        on_case: Callable[[int], None],
        on_outbox: Callable[[], None],
    ) -> None:
        self._engine = engine
        self._hs = homeserver
        self._ctx = context
        self._on_case = on_case
        self._on_outbox = on_outbox

    async def handle(self, item: InboxItem, flag: Flag) -> None:
        # The three reads are independent: fetch them together (each one is fresh).
        flagged, room, staff_room = await asyncio.gather(
            self._flagged_sender(flag), self._hs.room_state(flag.room_id), self.staff_room_state()
        )
        if isinstance(flagged, Refusal):
            await self._refuse(item, flag, None, flagged)
            return
        target = flagged
        if isinstance(room, Refused):
            why = f"the bot cannot read the room's power levels ({room.errcode})"
            await self._refuse(item, flag, target, Refusal("room_unreadable", why))
            return
        refusal = decide_flag(
            flagger=flag.flagger,
            target=target,
            room=room,
            bot_user_id=self._ctx.bot_user_id,
            moderator_power_level=self._ctx.policy.moderator_power_level,
            target_is_staff=self._staff(target, staff_room),
        )
        if refusal is not None:
            await self._refuse(item, flag, target, refusal)
            return
        await self._open(item, flag, target)

    async def _flagged_sender(self, flag: Flag) -> str | Refusal:
        """The member the flag names: given, or the flagged message's sender."""
        if flag.target_user is not None:
            return flag.target_user
        if flag.target_event_id is None:
            return Refusal("target_unknown", "no member was named")
        flagged = await self._hs.get_event(flag.room_id, flag.target_event_id)
        if isinstance(flagged, Refused):
            return Refusal(
                "target_unknown", f"the flagged message could not be read ({flagged.errcode})"
            )
        sender = flagged.get("sender")
        return sender if isinstance(sender, str) else Refusal("target_unknown", "no sender")

    async def staff_room_state(self) -> RoomState | None:
        if self._ctx.staff_room_id is None:
            return None
        state = await self._hs.room_state(self._ctx.staff_room_id)
        return None if isinstance(state, Refused) else state

    async def is_staff(self, user_id: str) -> bool:
        if user_id in self._ctx.policy.staff:
            return True
        return self._staff(user_id, await self.staff_room_state())

    def _staff(self, user_id: str, staff_room: RoomState | None) -> bool:
        policy = self._ctx.policy
        return is_staff(
            user_id,
            staff_users=policy.staff,
            staff_room=staff_room,
            staff_power_level=policy.staff_power_level,
        )

    async def _open(self, item: InboxItem, flag: Flag, target: str) -> None:
        now = dt.datetime.now(dt.UTC)
        flagged_at = event_time(item.payload, item.received_at)
        new_flag = cases.NewFlag(
            room_id=flag.room_id,
            member_id=target,
            flagger=flag.flagger,
            method=flag.method,
            flag_event_id=flag.flag_event_id,
            target_event_id=flag.target_event_id,
            reason=flag.reason,
            flagged_at=flagged_at,
            received_at=item.received_at,
        )
        dry_run = self._ctx.policy.dry_run
        async with self._engine.begin() as conn:
            opened = await cases.open_or_corroborate(
                conn,
                self._ctx.provenance,
                new_flag,
                steps=CASE_STEPS,
                dry_run=dry_run,
                due_at=due_at(flagged_at, self._ctx.checkin),
            )
            await finish(conn, item.seq, now)
        self._ctx.metrics.flags.labels("accepted" if opened.created else "corroborated").inc()
        log.info(
            "case #%d %s by %s flag",
            opened.case_id,
            "opened" if opened.created else "corroborated",
            flag.method,
            extra={"case": opened.case_id},
        )
        if opened.created:
            self._on_case(opened.case_id)

    async def _refuse(
        self, item: InboxItem, flag: Flag, target: str | None, refusal: Refusal
    ) -> None:
        now = dt.datetime.now(dt.UTC)
        async with self._engine.begin() as conn:
            await audit.append(
                conn,
                self._ctx.provenance,
                "refused",
                facts={"code": refusal.code, "method": flag.method, "detail": refusal.detail},
                personal={
                    "room": flag.room_id,
                    "flagger": flag.flagger,
                    "member": target,
                    "flag_event": flag.flag_event_id,
                    "flagged_event": flag.target_event_id,
                },
                at=now,
            )
            # The bot's own events are not worth a staff message; every other refusal is.
            if refusal.code != "own_event":
                await outbox.queue(
                    conn,
                    self._ctx.staff_room,
                    render_refusal(
                        self._ctx.messages,
                        flagger=flag.flagger,
                        member=target,
                        room=flag.room_id,
                        method=flag.method,
                        refusal=refusal,
                    ),
                    now,
                )
            await finish(conn, item.seq, now)
        self._ctx.metrics.flags.labels(f"refused_{refusal.code}").inc()
        log.info("flag refused: %s", refusal.code)
        self._on_outbox()

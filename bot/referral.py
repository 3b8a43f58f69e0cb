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

from bot.authorization import Refusal, decide_flag
from bot.checkin_time import due_at
from bot.deployment import Deployment
from bot.dispatch import Handling
from bot.metrics import Metrics
from bot.ports import Homeserver, Refused
from bot.staff import StaffDirectory
from bot.staff_room import StaffRoom
from bot.steps import CASE_STEPS
from bot.store import audit, cases, outbox
from bot.templates import render_refusal
from bot.triggers import Flag, recognise_flag

log = logging.getLogger(__name__)


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
        homeserver: Homeserver,
        deployment: Deployment,
        staff: StaffDirectory,
        staff_room: StaffRoom,
        metrics: Metrics,
        *,
        on_case: Callable[[int], None],
        on_outbox: Callable[[], None],
    ) -> None:
        self._hs = homeserver
        self._deployment = deployment
        self._policy = deployment.policy
        self._staff = staff
        self._staff_room = staff_room
        self._metrics = metrics
        self._on_case = on_case
        self._on_outbox = on_outbox

    async def __call__(self, handling: Handling) -> None:
        """Dispatcher entry: a possible flag in a group room."""
        flag = recognise_flag(
            handling.item.payload, reactions=self._policy.reactions, command=self._policy.command
        )
        if flag is not None:
            await self.handle(handling, flag)

    async def handle(self, handling: Handling, flag: Flag) -> None:
        # The three reads are independent: fetch them together (each one is fresh).
        flagged, room, staff_room = await asyncio.gather(
            self._flagged_sender(flag), self._hs.room_state(flag.room_id), self._staff.room_state()
        )
        if isinstance(flagged, Refusal):
            await self._refuse(handling, flag, None, flagged)
            return
        target = flagged
        if isinstance(room, Refused):
            why = f"the bot cannot read the room's power levels ({room.errcode})"
            await self._refuse(handling, flag, target, Refusal("room_unreadable", why))
            return
        refusal = decide_flag(
            flagger=flag.flagger,
            target=target,
            room=room,
            bot_user_id=self._deployment.bot_user_id,
            moderator_power_level=self._policy.moderator_power_level,
            target_is_staff=self._staff.is_staff_in(target, staff_room),
        )
        if refusal is not None:
            await self._refuse(handling, flag, target, refusal)
            return
        await self._open(handling, flag, target)

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

    async def _open(self, handling: Handling, flag: Flag, target: str) -> None:
        item = handling.item
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
            caught_up=item.caught_up,
        )
        async with handling.transaction() as conn:
            opened = await cases.open_or_corroborate(
                conn,
                self._deployment.provenance,
                new_flag,
                steps=CASE_STEPS,
                dry_run=self._policy.dry_run,
                due_at=due_at(flagged_at, self._deployment.checkin),
            )
        self._metrics.flags.labels("accepted" if opened.created else "corroborated").inc()
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
        self, handling: Handling, flag: Flag, target: str | None, refusal: Refusal
    ) -> None:
        now = dt.datetime.now(dt.UTC)
        async with handling.transaction() as conn:
            await audit.append(
                conn,
                self._deployment.provenance,
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
                    self._staff_room.address,
                    render_refusal(
                        self._deployment.messages,
                        flagger=flag.flagger,
                        member=target,
                        room=flag.room_id,
                        method=flag.method,
                        refusal=refusal,
                    ),
                    now,
                )
        self._metrics.flags.labels(f"refused_{refusal.code}").inc()
        log.info("flag refused: %s", refusal.code)
        self._on_outbox()

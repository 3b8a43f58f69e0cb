"""What staff are told of refusals — refused flags, refused invites — coalesced.

Every refusal is recorded in the audit log, one entry each. Staff hear of the
first one from a (who, where) pair at once; more from the same pair within
`policy.refusal_report_every` are counted, and told in one message when that
window ends. A user cannot drown the staff room, nor slow a real flag down by
trying.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from bot.rooms.staff_room import StaffRoom
from bot.store import outbox, refusal_reports
from bot.store.cases import DEFAULT_COMMUNITY
from bot.texts.messages import Texts


class RefusalReports:
    def __init__(
        self,
        db: AsyncEngine,
        staff_room: StaffRoom,
        every: dt.timedelta,
        *,
        texts: Texts,
        on_outbox: Callable[[], None],
        community: str = DEFAULT_COMMUNITY,
    ) -> None:
        self._texts = texts
        self._community = community  # its windows, told to its staff room alone
        self._db = db
        self._staff_room = staff_room
        self._every = every
        self._on_outbox = on_outbox

    async def refused(
        self,
        conn: AsyncConnection,
        *,
        kind: str,
        actor: str,
        room_id: str,
        report: dict[str, Any],
        now: dt.datetime,
    ) -> bool:
        """In the caller's transaction: queue `report` if it is the first of its window.

        Returns whether it was queued (the caller wakes the outbox)."""
        first = await refusal_reports.note(
            conn,
            kind=kind,
            actor=actor,
            room_id=room_id,
            now=now,
            every=self._every,
            community=self._community,
        )
        if first:
            await outbox.queue(conn, self._staff_room.address, report, now)
        return first

    async def flush(self) -> None:
        """Periodic: one message for each window that ended with refusals untold."""
        now = dt.datetime.now(dt.UTC)
        queued = False
        async with self._db.begin() as conn:
            for pending in await refusal_reports.due(conn, now, self._every, self._community):
                await outbox.queue(
                    conn,
                    self._staff_room.address,
                    self._texts.refusals_summary(
                        kind=pending.kind,
                        actor=pending.actor,
                        room=pending.room_id,
                        count=pending.suppressed,
                        since=pending.window_started_at,
                    ),
                    now,
                )
                await refusal_reports.reported(conn, pending.key, now)
                queued = True
            await refusal_reports.forget_quiet(conn, now - 2 * self._every, self._community)
        if queued:
            self._on_outbox()

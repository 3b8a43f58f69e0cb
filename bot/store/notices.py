"""The members' notices still unread, and the moment one is read."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from bot.store.schema import cases

# The most DMs the sync asks read receipts of (the newest cases' first): their ids go in
# the sync's filter, in its URL, so it must stay short however many notices are unread.
WATCH_LIMIT = 50


@dataclass(frozen=True)
class Unread:
    """A notice sent and not read yet: the case, the member's DM with the bot, the member,
    and the notice's event there."""

    case_id: int
    room_id: str
    member_id: str
    notice_event_id: str


async def unread(conn: AsyncConnection, *, limit: int = WATCH_LIMIT) -> list[Unread]:
    """Open cases whose notice was sent and not read, newest first (index: ix_cases_state)."""
    rows = await conn.execute(
        sa.select(cases.c.id, cases.c.dm_room_id, cases.c.member_id, cases.c.notice_event_id)
        .where(
            cases.c.state == "open",
            cases.c.notice_read_at.is_(None),
            cases.c.notice_event_id.is_not(None),
            cases.c.dm_room_id.is_not(None),
            cases.c.member_id.is_not(None),
        )
        .order_by(cases.c.id.desc())
        .limit(limit)
    )
    return [Unread(*row) for row in rows]


async def record_read(
    conn: AsyncConnection, case_id: int, notice_event_id: str, at: dt.datetime
) -> bool:
    """The member read the notice at `at`: recorded once (False: already, or the case has
    another notice since)."""
    updated = await conn.execute(
        cases.update()
        .where(
            cases.c.id == case_id,
            cases.c.notice_event_id == notice_event_id,
            cases.c.notice_read_at.is_(None),
        )
        .values(notice_read_at=at)
    )
    return updated.rowcount == 1

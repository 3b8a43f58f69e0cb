"""Retention: erase the personal data of long-closed cases, keep a tombstone and the chain.

A case that left something on the homeserver (staff-room messages, its DM, check-in
and debrief rooms) is handed to its `purge` step (bot/steps/purge.py), which undoes
that first and erases here last; one that left nothing is erased at once.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from bot.store import audit
from bot.store.cases import UNFINISHED, rearm_step, set_next_attempt
from bot.store.schema import (
    audit_entries,
    case_steps,
    cases,
    former_rooms,
    outbox,
    room_positions,
    staff_posts,
)

PURGE_STEP = "purge"
# Case columns that identify people or rooms, or hold free text about them.
PERSONAL_CASE_COLUMNS = (
    "room_id",
    "member_id",
    "active_key",
    "dm_room_id",
    "checkin_room_id",
    "checkin_claimed_by",
    "alert_acked_by",
    "outcome",
    "checkin_notice_event_id",
    "alert_event_id",
    "debrief_room_id",
    "notice_event_id",
)
PRIVATE_ROOM_COLUMNS = ("dm_room_id", "checkin_room_id", "debrief_room_id")


@dataclass(frozen=True)
class Purged:
    cases: int  # erased now
    entries: int
    caseless: int = 0  # entries outside any case (refusals, rejected invites, ...)
    # Handed to their purge step now: the homeserver's side first, then erased.
    scheduled: tuple[int, ...] = ()


@dataclass(frozen=True)
class DueCase:
    id: int
    flagged_at: dt.datetime
    closed_at: dt.datetime


def tombstone(flagged_at: dt.datetime, closed_at: dt.datetime | None, entries: int) -> dict:
    """What a purged case's `purged` entry keeps: counts and times, nothing of anyone."""
    return {
        "entries_purged": entries,
        "flagged_at": flagged_at.isoformat(),
        "closed_at": closed_at.isoformat() if closed_at else None,
    }


async def due_cases(conn: AsyncConnection, cutoff: dt.datetime) -> list[DueCase]:
    """Cases closed before `cutoff`, not on hold, not yet purged."""
    rows = await conn.execute(
        sa.select(cases.c.id, cases.c.flagged_at, cases.c.closed_at)
        .where(
            cases.c.state == "closed",
            cases.c.closed_at < cutoff,
            cases.c.hold_reason.is_(None),
            cases.c.purged_at.is_(None),
        )
        .order_by(cases.c.id)
    )
    return [DueCase(row.id, row.flagged_at, row.closed_at) for row in rows]


async def on_the_homeserver(conn: AsyncConnection, case_id: int) -> bool:
    """Whether the case may have left anything on the homeserver: a room or message on its
    row, a staff post or outbox message of its own, or any step that ever ran."""
    row = (
        await conn.execute(
            sa.select(
                *(cases.c[name] for name in PRIVATE_ROOM_COLUMNS),
                cases.c.alert_event_id,
                cases.c.checkin_notice_event_id,
            ).where(cases.c.id == case_id)
        )
    ).one()
    if any(row):
        return True
    found = sa.union_all(
        sa.select(staff_posts.c.case_id).where(staff_posts.c.case_id == case_id),
        sa.select(outbox.c.case_id).where(outbox.c.case_id == case_id),
        sa.select(case_steps.c.case_id).where(
            case_steps.c.case_id == case_id,
            case_steps.c.attempts > 0,
            case_steps.c.step != PURGE_STEP,
        ),
    )
    return (await conn.execute(sa.select(found.subquery()).limit(1))).first() is not None


async def schedule(
    conn: AsyncConnection, case_id: int, position: int, cutoff: dt.datetime, now: dt.datetime
) -> bool:
    """Give the case its purge step, due now (False: it has one under way or done already).
    `cutoff`: a case closed again after it (reopened meanwhile) is not purged by it."""
    status = (
        await conn.execute(
            sa.select(case_steps.c.status).where(
                case_steps.c.case_id == case_id, case_steps.c.step == PURGE_STEP
            )
        )
    ).scalar_one_or_none()
    if status not in (None, "skipped"):
        return False
    await rearm_step(conn, case_id, PURGE_STEP, position, {"cutoff": cutoff.isoformat()})
    await set_next_attempt(conn, case_id, now)
    return True


async def retiring(conn: AsyncConnection, case_id: int) -> bool:
    """The case is being purged, or was: what reaches its rooms is from a former member."""
    query = sa.select(case_steps.c.status).where(
        case_steps.c.case_id == case_id,
        case_steps.c.step == PURGE_STEP,
        case_steps.c.status != "skipped",
    )
    return (await conn.execute(query)).first() is not None


async def staff_messages(conn: AsyncConnection, case_id: int) -> list[str]:
    """The staff-room messages of the case: its steps' posts, and what the outbox sent."""
    posted = sa.select(staff_posts.c.event_id).where(staff_posts.c.case_id == case_id)
    sent = sa.select(outbox.c.event_id).where(
        outbox.c.case_id == case_id, outbox.c.event_id.is_not(None)
    )
    rows = await conn.execute(sa.union(posted, sent))
    return sorted(rows.scalars())


async def undelivered(conn: AsyncConnection, case_id: int) -> int:
    """Staff messages of the case still waiting to go (each may be sent any moment)."""
    query = (
        sa.select(sa.func.count())
        .select_from(outbox)
        .where(outbox.c.case_id == case_id, outbox.c.status == "pending")
    )
    return (await conn.execute(query)).scalar_one()


async def record_staff_post(
    conn: AsyncConnection, case_id: int, event_id: str, now: dt.datetime
) -> None:
    """A step posted into the staff room (again, if resumed: recorded once)."""
    known = await conn.execute(
        sa.select(staff_posts.c.event_id).where(
            staff_posts.c.case_id == case_id, staff_posts.c.event_id == event_id
        )
    )
    if known.first() is None:
        await conn.execute(
            staff_posts.insert().values(case_id=case_id, event_id=event_id, posted_at=now)
        )


async def shared_rooms(conn: AsyncConnection, case_id: int, rooms: Iterable[str]) -> set[str]:
    """Those of `rooms` another case not yet purged still has (a DM reused by a later
    case, the moderator's debrief room): they are that case's to keep."""
    wanted = list(rooms)
    if not wanted:
        return set()
    columns = [cases.c[name] for name in PRIVATE_ROOM_COLUMNS]
    rows = await conn.execute(
        sa.select(*columns).where(
            cases.c.id != case_id,
            cases.c.purged_at.is_(None),
            sa.or_(*(column.in_(wanted) for column in columns)),
        )
    )
    return {room for row in rows for room in row if room in wanted}


async def former_room_ids(conn: AsyncConnection) -> list[str]:
    return list((await conn.execute(sa.select(former_rooms.c.room_id))).scalars())


async def is_former_room(conn: AsyncConnection, room_id: str) -> bool:
    query = sa.select(former_rooms.c.room_id).where(former_rooms.c.room_id == room_id)
    return (await conn.execute(query)).first() is not None


async def community_of_former_room(conn: AsyncConnection, room_id: str) -> str | None:
    """The community of the purged case whose room this was (None: not a former room, or
    one recorded before communities were)."""
    query = sa.select(former_rooms.c.community).where(former_rooms.c.room_id == room_id)
    return (await conn.execute(query)).scalar()


async def erase(
    conn: AsyncConnection,
    case_id: int,
    now: dt.datetime,
    *,
    keep: Iterable[str] = (),
    stayed: Iterable[str] = (),
) -> int:
    """Erase everything personal the database holds of the case, in the caller's
    transaction; returns how many audit entries had their personal fields erased.

    The case keeps its number, its times and its state; its entries keep their facts
    and digests (the chain verifies); its steps keep their status, not what they learnt
    (the purge step's own record is its caller's to write). Its staff-message
    bookkeeping and its rooms' read positions go, except for rooms in `keep` (another
    case still uses them); rooms in `stayed` (the bot could not leave them) are
    remembered without any case but its community, so a former member who writes there
    is answered in its words.
    """
    *rooms, community = (
        await conn.execute(
            sa.select(*(cases.c[name] for name in PRIVATE_ROOM_COLUMNS), cases.c.community).where(
                cases.c.id == case_id
            )
        )
    ).one()
    kept = set(keep)
    gone = [room for room in dict.fromkeys(rooms) if room and room not in kept]
    entries = (
        await conn.execute(
            sa.select(sa.func.count())
            .select_from(audit_entries)
            .where(audit_entries.c.case_id == case_id)
        )
    ).scalar_one()
    await conn.execute(
        audit_entries.update()
        .where(audit_entries.c.case_id == case_id)
        .values(personal=sa.null())  # SQL NULL: None would be stored as JSON 'null'
    )
    others = sa.and_(case_steps.c.case_id == case_id, case_steps.c.step != PURGE_STEP)
    # Nothing is left to do for the case: a step still waiting would act on nothing.
    await conn.execute(
        case_steps.update()
        .where(others, case_steps.c.status.in_(UNFINISHED))
        .values(status="skipped", finished_at=now, not_before=None)
    )
    await conn.execute(
        case_steps.update().where(others).values(progress=None, result=None, error=None)
    )
    await conn.execute(outbox.delete().where(outbox.c.case_id == case_id))
    await conn.execute(staff_posts.delete().where(staff_posts.c.case_id == case_id))
    if gone:
        await conn.execute(room_positions.delete().where(room_positions.c.room_id.in_(gone)))
    for room in stayed:
        if not await is_former_room(conn, room):
            await conn.execute(
                former_rooms.insert().values(room_id=room, since=now, community=community)
            )
    await conn.execute(
        cases.update()
        .where(cases.c.id == case_id)
        .values(purged_at=now, next_attempt_at=None, **dict.fromkeys(PERSONAL_CASE_COLUMNS))
    )
    return entries


async def erase_now(
    conn: AsyncConnection, provenance: audit.Provenance, case: DueCase, now: dt.datetime
) -> int:
    """Erase a case that left nothing on the homeserver, with its tombstone entry."""
    entries = await erase(conn, case.id, now)
    await audit.append(
        conn,
        provenance,
        "purged",
        case_id=case.id,
        facts=tombstone(case.flagged_at, case.closed_at, entries),
        at=now,
    )
    return entries


# Personal fields left: not SQL NULL, nor JSON 'null' (what earlier purges wrote: counted
# again, and a tombstone added, at every purge since).
_has_personal = sa.and_(
    audit_entries.c.personal.is_not(None),
    sa.cast(audit_entries.c.personal, sa.Text) != "null",
)


async def purge_caseless_before(
    conn: AsyncConnection, provenance: audit.Provenance, cutoff: dt.datetime, now: dt.datetime
) -> int:
    """Erase the personal fields of entries that belong to no case (refused flags, rejected
    invites, refused commands, rooms joined...) recorded before `cutoff`; one tombstone."""
    condition = sa.and_(
        audit_entries.c.case_id.is_(None),
        audit_entries.c.at < cutoff,
        _has_personal,
        audit_entries.c.kind != "purged",
    )
    span = (
        await conn.execute(
            sa.select(
                sa.func.count(), sa.func.min(audit_entries.c.at), sa.func.max(audit_entries.c.at)
            ).where(condition)
        )
    ).one()
    count, first, last = span
    if not count:
        return 0
    await conn.execute(audit_entries.update().where(condition).values(personal=sa.null()))
    facts: dict[str, Any] = {
        "entries_purged": count,
        "outside_cases": True,
        "from": first.isoformat(),
        "to": last.isoformat(),
    }
    await audit.append(conn, provenance, "purged", facts=facts, at=now)
    return count

"""Retention: erase the personal fields of long-closed cases, keep a tombstone and the chain."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from bot.store import audit
from bot.store.schema import audit_entries, case_steps, cases

# Case columns that identify people or rooms, or hold free text about them.
PERSONAL_CASE_COLUMNS = (
    "room_id",
    "member_id",
    "dm_room_id",
    "checkin_room_id",
    "checkin_claimed_by",
    "alert_acked_by",
    "outcome",
    "checkin_notice_event_id",
    "alert_event_id",
    "debrief_room_id",
)


@dataclass(frozen=True)
class Purged:
    cases: int
    entries: int
    caseless: int = 0  # entries outside any case (refusals, rejected invites, ...)


async def purge_closed_before(
    conn: AsyncConnection, provenance: audit.Provenance, cutoff: dt.datetime, now: dt.datetime
) -> Purged:
    """Purge cases closed before `cutoff` that are not on hold; one tombstone entry each."""
    due = (
        await conn.execute(
            sa.select(cases.c.id, cases.c.flagged_at, cases.c.closed_at).where(
                cases.c.state == "closed",
                cases.c.closed_at < cutoff,
                cases.c.hold_reason.is_(None),
                cases.c.purged_at.is_(None),
            )
        )
    ).all()
    total_entries = 0
    for case in due:
        entry_count = (
            await conn.execute(
                sa.select(sa.func.count())
                .select_from(audit_entries)
                .where(audit_entries.c.case_id == case.id)
            )
        ).scalar_one()
        await conn.execute(
            audit_entries.update().where(audit_entries.c.case_id == case.id).values(personal=None)
        )
        await conn.execute(
            case_steps.update()
            .where(case_steps.c.case_id == case.id)
            .values(progress=None, result=None, error=None)
        )
        await conn.execute(
            cases.update()
            .where(cases.c.id == case.id)
            .values(purged_at=now, **dict.fromkeys(PERSONAL_CASE_COLUMNS))
        )
        await audit.append(
            conn,
            provenance,
            "purged",
            case_id=case.id,
            facts={
                "entries_purged": entry_count,
                "flagged_at": case.flagged_at.isoformat(),
                "closed_at": case.closed_at.isoformat(),
            },
            at=now,
        )
        total_entries += entry_count
    return Purged(len(due), total_entries)


async def purge_caseless_before(
    conn: AsyncConnection, provenance: audit.Provenance, cutoff: dt.datetime, now: dt.datetime
) -> int:
    """Erase the personal fields of entries that belong to no case (refused flags, rejected
    invites, refused commands, rooms joined...) recorded before `cutoff`; one tombstone."""
    condition = sa.and_(
        audit_entries.c.case_id.is_(None),
        audit_entries.c.at < cutoff,
        audit_entries.c.personal.is_not(None),
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
    await conn.execute(audit_entries.update().where(condition).values(personal=None))
    await audit.append(
        conn,
        provenance,
        "purged",
        facts={
            "entries_purged": count,
            "outside_cases": True,
            "from": first.isoformat(),
            "to": last.isoformat(),
        },
        at=now,
    )
    return count

"""Cases and their steps: the durable state machine's rows."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from bot.store import audit
from bot.store.schema import case_steps, cases


def active_key(room_id: str, member_id: str) -> str:
    return f"{room_id}|{member_id}"


@dataclass(frozen=True)
class Case:
    id: int
    room_id: str | None
    member_id: str | None
    state: str
    dry_run: bool
    flagged_at: dt.datetime
    received_at: dt.datetime
    due_at: dt.datetime | None
    dm_room_id: str | None
    checkin_room_id: str | None
    rejoined_at: dt.datetime | None
    closed_at: dt.datetime | None
    outcome: str | None
    hold_reason: str | None
    purged_at: dt.datetime | None
    checkin_notice_event_id: str | None
    checkin_opened_at: dt.datetime | None
    checkin_claimed_by: str | None
    checkin_staff_joined_at: dt.datetime | None
    checkin_member_joined_at: dt.datetime | None
    checkin_reminded_at: dt.datetime | None
    alert_event_id: str | None
    alert_acked_by: str | None
    alert_raised_again_at: dt.datetime | None

    @property
    def active(self) -> bool:
        return self.rejoined_at is None


@dataclass(frozen=True)
class Step:
    case_id: int
    step: str
    position: int
    status: str
    attempts: int
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    progress: dict[str, Any]
    result: dict[str, Any]
    error: str | None

    @property
    def finished(self) -> bool:
        return self.status in ("done", "failed", "skipped")


def _case(row: sa.Row[Any]) -> Case:
    return Case(**{field: getattr(row, field) for field in Case.__dataclass_fields__})


def _step(row: sa.Row[Any]) -> Step:
    values = {field: getattr(row, field) for field in Step.__dataclass_fields__}
    values["progress"] = row.progress or {}
    values["result"] = row.result or {}
    return Step(**values)


@dataclass(frozen=True)
class NewFlag:
    """A flag that passed authorisation, as the case records it."""

    room_id: str
    member_id: str
    flagger: str
    method: str
    flag_event_id: str
    target_event_id: str | None
    reason: str | None
    flagged_at: dt.datetime
    received_at: dt.datetime


@dataclass(frozen=True)
class Opened:
    case_id: int
    created: bool  # False: the flag corroborated the member's active case


def _flag_personal(flag: NewFlag) -> dict[str, Any]:
    return {
        "room": flag.room_id,
        "member": flag.member_id,
        "flagger": flag.flagger,
        "flag_event": flag.flag_event_id,
        "flagged_event": flag.target_event_id,
        "reason": flag.reason,
    }


def _flag_facts(flag: NewFlag) -> dict[str, Any]:
    late = (flag.received_at - flag.flagged_at).total_seconds()
    return {
        "method": flag.method,
        "flagged_at": flag.flagged_at.isoformat(),
        "late_seconds": round(max(late, 0.0), 3),
    }


async def open_or_corroborate(
    conn: AsyncConnection,
    provenance: audit.Provenance,
    flag: NewFlag,
    *,
    steps: list[str],
    dry_run: bool,
    due_at: dt.datetime | None,
) -> Opened:
    """Open a case for the flag, or record it on the member's active case in that room.

    Runs inside the caller's transaction: case, first entry and steps commit together.
    """
    key = active_key(flag.room_id, flag.member_id)
    existing = (
        await conn.execute(sa.select(cases.c.id).where(cases.c.active_key == key))
    ).scalar_one_or_none()
    if existing is None:
        try:
            async with conn.begin_nested():
                case_id = (
                    await conn.execute(
                        cases.insert()
                        .values(
                            room_id=flag.room_id,
                            member_id=flag.member_id,
                            active_key=key,
                            state="open",
                            dry_run=dry_run,
                            flagged_at=flag.flagged_at,
                            received_at=flag.received_at,
                            due_at=due_at,
                            next_attempt_at=flag.received_at,
                        )
                        .returning(cases.c.id)
                    )
                ).scalar_one()
        except IntegrityError:
            # Another flag opened it between our read and our insert.
            existing = (
                await conn.execute(sa.select(cases.c.id).where(cases.c.active_key == key))
            ).scalar_one()
        else:
            await conn.execute(
                case_steps.insert(),
                [
                    {"case_id": case_id, "step": name, "position": index, "status": "pending"}
                    for index, name in enumerate(steps)
                ],
            )
            facts = _flag_facts(flag) | {"dry_run": dry_run}
            if due_at is not None:
                facts["checkin_due_at"] = due_at.isoformat()
            await audit.append(
                conn,
                provenance,
                "flagged",
                case_id=case_id,
                facts=facts,
                personal=_flag_personal(flag),
                at=flag.received_at,
            )
            return Opened(case_id, created=True)
    await audit.append(
        conn,
        provenance,
        "corroborated",
        case_id=existing,
        facts=_flag_facts(flag),
        personal=_flag_personal(flag),
        at=flag.received_at,
    )
    return Opened(existing, created=False)


async def get(conn: AsyncConnection, case_id: int) -> Case | None:
    row = (await conn.execute(sa.select(cases).where(cases.c.id == case_id))).first()
    return _case(row) if row else None


async def listing(conn: AsyncConnection, state: str = "all") -> list[Case]:
    query = sa.select(cases).order_by(cases.c.id)
    if state in ("open", "closed"):
        query = query.where(cases.c.state == state)
    return [_case(row) for row in await conn.execute(query)]


async def steps_of(conn: AsyncConnection, case_id: int) -> list[Step]:
    rows = await conn.execute(
        sa.select(case_steps).where(case_steps.c.case_id == case_id).order_by(case_steps.c.position)
    )
    return [_step(row) for row in rows]


async def due_for_work(conn: AsyncConnection, now: dt.datetime) -> list[int]:
    """Cases with an unfinished step whose next attempt is due."""
    unfinished = (
        sa.select(case_steps.c.case_id)
        .where(case_steps.c.status.in_(("pending", "started")))
        .where(case_steps.c.step != "checkin")
        .distinct()
    )
    rows = await conn.execute(
        sa.select(cases.c.id)
        .where(cases.c.id.in_(unfinished))
        .where(sa.or_(cases.c.next_attempt_at.is_(None), cases.c.next_attempt_at <= now))
        .order_by(cases.c.id)
    )
    return list(rows.scalars())


async def defer(conn: AsyncConnection, case_id: int, until: dt.datetime) -> None:
    await conn.execute(cases.update().where(cases.c.id == case_id).values(next_attempt_at=until))


async def end_deferrals(conn: AsyncConnection, now: dt.datetime) -> None:
    """Make every deferred case due now (what held them back has been fixed)."""
    await conn.execute(
        cases.update().where(cases.c.next_attempt_at > now).values(next_attempt_at=now)
    )


async def start_step(conn: AsyncConnection, case_id: int, step: str, now: dt.datetime) -> None:
    """Write the intent before the network call: a restart then knows to look before acting."""
    await conn.execute(
        case_steps.update()
        .where(case_steps.c.case_id == case_id, case_steps.c.step == step)
        .values(
            status="started",
            attempts=case_steps.c.attempts + 1,
            started_at=sa.func.coalesce(case_steps.c.started_at, now),
        )
    )


async def save_progress(
    conn: AsyncConnection, case_id: int, step: str, progress: dict[str, Any]
) -> None:
    await conn.execute(
        case_steps.update()
        .where(case_steps.c.case_id == case_id, case_steps.c.step == step)
        .values(progress=progress)
    )


async def finish_step(
    conn: AsyncConnection,
    case_id: int,
    step: str,
    *,
    status: str,
    result: dict[str, Any],
    error: str | None,
    now: dt.datetime,
) -> None:
    await conn.execute(
        case_steps.update()
        .where(case_steps.c.case_id == case_id, case_steps.c.step == step)
        .values(status=status, result=result, error=error, finished_at=now)
    )


async def set_fields(conn: AsyncConnection, case_id: int, **values: Any) -> None:
    await conn.execute(cases.update().where(cases.c.id == case_id).values(**values))


async def end_active(
    conn: AsyncConnection, room_id: str, member_id: str, now: dt.datetime
) -> int | None:
    """The member is back in the room: their case stops collecting flags. Returns its number."""
    key = active_key(room_id, member_id)
    case_id = (
        await conn.execute(sa.select(cases.c.id).where(cases.c.active_key == key))
    ).scalar_one_or_none()
    if case_id is not None:
        await conn.execute(
            cases.update().where(cases.c.id == case_id).values(active_key=None, rejoined_at=now)
        )
    return case_id


async def has_active(conn: AsyncConnection, room_id: str, member_id: str) -> bool:
    key = active_key(room_id, member_id)
    query = sa.select(cases.c.id).where(cases.c.active_key == key)
    return (await conn.execute(query)).first() is not None


async def case_for_dm_room(conn: AsyncConnection, room_id: str) -> Case | None:
    row = (
        await conn.execute(
            sa.select(cases)
            .where(cases.c.dm_room_id == room_id)
            .order_by(cases.c.id.desc())
            .limit(1)
        )
    ).first()
    return _case(row) if row else None


async def dm_room_ids(conn: AsyncConnection) -> set[str]:
    rows = await conn.execute(sa.select(cases.c.dm_room_id).where(cases.c.dm_room_id.is_not(None)))
    return set(rows.scalars())


async def with_pending_checkin(conn: AsyncConnection) -> list[Case]:
    """Cases whose check-in has not opened yet (the scheduler's truth at start)."""
    pending_checkin = sa.select(case_steps.c.case_id).where(
        case_steps.c.step == "checkin", case_steps.c.status.in_(("pending", "started"))
    )
    rows = await conn.execute(
        sa.select(cases).where(cases.c.id.in_(pending_checkin)).order_by(cases.c.due_at)
    )
    return [_case(row) for row in rows]


async def awaiting_staff(conn: AsyncConnection) -> list[Case]:
    """Opened check-ins no staff member has claimed or joined, not yet reminded."""
    rows = await conn.execute(
        sa.select(cases).where(
            cases.c.checkin_opened_at.is_not(None),
            cases.c.checkin_claimed_by.is_(None),
            cases.c.checkin_staff_joined_at.is_(None),
            cases.c.checkin_reminded_at.is_(None),
        )
    )
    return [_case(row) for row in rows]


async def by_column(conn: AsyncConnection, column: str, value: str) -> Case | None:
    row = (
        await conn.execute(
            sa.select(cases).where(cases.c[column] == value).order_by(cases.c.id.desc()).limit(1)
        )
    ).first()
    return _case(row) if row else None


async def unacknowledged_alerts(conn: AsyncConnection) -> list[tuple[Case, dt.datetime]]:
    """Alerts sent but neither acknowledged nor raised again, with when they were sent."""
    rows = await conn.execute(
        sa.select(cases, case_steps.c.finished_at.label("alert_sent_at"))
        .join(case_steps, sa.and_(case_steps.c.case_id == cases.c.id, case_steps.c.step == "alert"))
        .where(
            cases.c.alert_event_id.is_not(None),
            cases.c.alert_acked_by.is_(None),
            cases.c.alert_raised_again_at.is_(None),
        )
    )
    return [(_case(row), row.alert_sent_at) for row in rows]


@dataclass(frozen=True)
class CheckinCounts:
    pending: int
    overdue: int
    unclaimed: int


async def checkin_counts(
    conn: AsyncConnection, now: dt.datetime, grace: dt.timedelta
) -> CheckinCounts:
    """Check-ins waiting to open, past due by more than `grace`, and open but unclaimed."""
    waiting = await with_pending_checkin(conn)
    overdue = sum(1 for case in waiting if case.due_at and case.due_at < now - grace)
    unclaimed = (
        await conn.execute(
            sa.select(sa.func.count())
            .select_from(cases)
            .where(
                cases.c.checkin_opened_at.is_not(None),
                cases.c.checkin_claimed_by.is_(None),
                cases.c.checkin_staff_joined_at.is_(None),
            )
        )
    ).scalar_one()
    return CheckinCounts(len(waiting) - overdue, overdue, unclaimed)

"""Cases and their steps: the durable state machine's rows."""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from bot.store import audit
from bot.store.schema import case_steps, cases

FINISHED = frozenset({"done", "failed", "skipped"})
UNFINISHED = ("pending", "started")
# What a step that raised (a bug of ours) records as its error, and /health looks for.
INTERNAL_ERROR = "internal error"
# The community of an install without `communities:` (its one), and of every case
# recorded before there were communities.
DEFAULT_COMMUNITY = "default"


def active_key(room_id: str, member_id: str) -> str:
    return f"{room_id}|{member_id}"


def room_of_key(key: str, member_id: str) -> str:
    """The room of an `active_key` (the room it was opened in, or its replacement)."""
    return key[: -len(member_id) - 1]


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
    next_attempt_at: dt.datetime | None = None  # when the step engine looks at it next
    nonce: str | None = None  # random, set when the case is opened (None: an older case)
    # When staff first acted on it (ack, ✅, es, a note, a claim, joining the check-in):
    # the alert is not raised again after that.
    dealt_with_at: dt.datetime | None = None
    debrief_room_id: str | None = None  # the DM with the moderator who flagged
    notice_event_id: str | None = None  # the member's notice, in their DM
    notice_read_at: dt.datetime | None = None  # their first read receipt on or after it
    community: str = DEFAULT_COMMUNITY  # whose staff see it (the room's community)

    @property
    def active(self) -> bool:
        return self.rejoined_at is None

    @property
    def tag(self) -> str:
        """The case as its markers name it: number and nonce (cases opened before the nonce
        existed keep the plain number, so their steps still find what they did); a nonce
        chosen before the case had a number (its notice sent ahead) alone."""
        if self.nonce is None:
            return f"case:{self.id}"
        if self.nonce.startswith(AHEAD_NONCE_PREFIX):
            return ahead_tag(self.nonce)
        return f"case:{self.id}.{self.nonce}"


# The nonce of a case whose notice was sent before it was opened (bot/steps/notify_ahead.py):
# chosen with the flag's push, so its markers cannot hold the case's number.
AHEAD_NONCE_PREFIX = "ahead."


def ahead_tag(nonce: str) -> str:
    """`Case.tag` of the case with this nonce chosen ahead of it."""
    return f"case:{nonce}"


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
    not_before: dt.datetime | None = None
    failures: int = 0

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


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
    # Found by reconciliation: the homeserver never delivered it to us.
    caught_up: bool = False
    community: str = DEFAULT_COMMUNITY  # the flagged room's
    # Chosen ahead with the member's notice, sent before the case was opened
    # (bot/steps/notify_ahead.py); None: a new random one.
    nonce: str | None = None


@dataclass(frozen=True)
class Opened:
    case_id: int
    created: bool  # False: the flag corroborated the member's active case
    seq: int = 0  # the audit entry that recorded the flag
    # A case opened: as written (what a read in the same transaction would return).
    case: Case | None = None
    steps: tuple[Step, ...] = ()


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
    facts: dict[str, Any] = {
        "method": flag.method,
        "flagged_at": flag.flagged_at.isoformat(),
        "late_seconds": round(max(late, 0.0), 3),
    }
    if flag.caught_up:
        facts["caught_up"] = True
    return facts


# Statements of every step of every case, built once: building one with its values
# costs more than SQLite takes to run it. An update sets the columns its parameters name.
_ACTIVE_CASE = sa.select(cases.c.id).where(cases.c.active_key == sa.bindparam("key"))
# A new case, unless the member has an active one in that room (`active_key` is unique):
# then nothing is inserted, and nothing is returned. No savepoint is needed around it (a
# failed insert would need one on PostgreSQL), and on SQLite no read before it.
_NEW_CASE = {
    "sqlite": sqlite_insert(cases)
    .on_conflict_do_nothing(index_elements=[cases.c.active_key])
    .returning(cases.c.id),
    "postgresql": postgresql_insert(cases)
    .on_conflict_do_nothing(index_elements=[cases.c.active_key])
    .returning(cases.c.id),
}
_INSERT_STEPS = case_steps.insert()
_CASE = sa.select(cases).where(cases.c.id == sa.bindparam("b_case"))
# One community's case: another's number reads as a number that does not exist.
_CASE_OF = _CASE.where(cases.c.community == sa.bindparam("b_community"))
_UPDATE_CASE = cases.update().where(cases.c.id == sa.bindparam("b_case"))
_STEPS_OF = (
    sa.select(case_steps)
    .where(case_steps.c.case_id == sa.bindparam("b_case"))
    .order_by(case_steps.c.position)
)
_UPDATE_STEP = case_steps.update().where(
    case_steps.c.case_id == sa.bindparam("b_case"), case_steps.c.step == sa.bindparam("b_step")
)
_FINISH_STEP = _UPDATE_STEP.where(case_steps.c.status != "pending")
_START_STEPS = (
    case_steps.update()
    .where(
        case_steps.c.case_id == sa.bindparam("b_case"),
        case_steps.c.step.in_(sa.bindparam("b_steps", expanding=True)),
    )
    .values(
        status="started",
        attempts=case_steps.c.attempts + 1,
        # Typed as the column, so a datetime is stored as every other one (UTC).
        started_at=sa.func.coalesce(
            case_steps.c.started_at, sa.bindparam("b_now", type_=case_steps.c.started_at.type)
        ),
    )
)

_UNSTART_STEP = _UPDATE_STEP.where(
    case_steps.c.status == "started", case_steps.c.attempts == sa.bindparam("b_attempts")
)


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
    values = {
        "room_id": flag.room_id,
        "member_id": flag.member_id,
        "active_key": key,
        "state": "open",
        "dry_run": dry_run,
        "flagged_at": flag.flagged_at,
        "received_at": flag.received_at,
        "due_at": due_at,
        "next_attempt_at": flag.received_at,
        "nonce": flag.nonce or secrets.token_hex(8),
        "community": flag.community,
    }
    existing: int | None = None
    if conn.dialect.name != "sqlite":
        # PostgreSQL takes the next case number before an insert finds the conflict: a
        # second flag must not use one up (staff would look for the missing case). SQLite
        # takes none then, and needs no read: every writer there begins with the write
        # lock (BEGIN IMMEDIATE), so no flag opens the case between the two.
        existing = (await conn.execute(_ACTIVE_CASE, {"key": key})).scalar_one_or_none()
    case_id: int | None = None
    if existing is None:
        case_id = (await conn.execute(_NEW_CASE[conn.dialect.name], values)).scalar_one_or_none()
        if case_id is None:  # opened by another flag since the read
            existing = (await conn.execute(_ACTIVE_CASE, {"key": key})).scalar_one()
    if existing is not None:
        facts, personal = _flag_facts(flag), _flag_personal(flag)
        if flag.nonce is not None:
            # A notice went ahead to a member whose case was reopened meanwhile: said so.
            facts["told_ahead"] = True
        seq = await audit.append(
            conn,
            provenance,
            "corroborated",
            case_id=existing,
            facts=facts,
            personal=personal,
            at=flag.received_at,
        )
        return Opened(existing, created=False, seq=seq)
    assert case_id is not None  # inserted: a conflict leaves `existing` set
    new_steps = tuple(
        Step(case_id, name, index, "pending", 0, None, None, {}, {}, None)
        for index, name in enumerate(steps)
    )
    await conn.execute(
        _INSERT_STEPS,
        [
            {"case_id": case_id, "step": s.step, "position": s.position, "status": s.status}
            for s in new_steps
        ],
    )
    facts = _flag_facts(flag) | {"dry_run": dry_run}
    if flag.nonce is not None:
        # Decided as its push was recorded, on what was known then, and the member told
        # at once: the case was opened after.
        facts["told_ahead"] = True
    if due_at is not None:
        facts["checkin_due_at"] = due_at.isoformat()
    seq = await audit.append(
        conn,
        provenance,
        "flagged",
        case_id=case_id,
        facts=facts,
        personal=_flag_personal(flag),
        at=flag.received_at,
    )
    # Every field the insert did not set is empty in a new case.
    written = values | {"id": case_id}
    case = Case(**{name: written.get(name) for name in Case.__dataclass_fields__})
    return Opened(case_id, created=True, seq=seq, case=case, steps=new_steps)


async def get(conn: AsyncConnection, case_id: int, *, community: str | None = None) -> Case | None:
    """The case; with `community`, only if it is that community's (None: any)."""
    if community is None:
        row = (await conn.execute(_CASE, {"b_case": case_id})).first()
    else:
        row = (await conn.execute(_CASE_OF, {"b_case": case_id, "b_community": community})).first()
    return _case(row) if row else None


def _chosen(query: Any, state: str, community: str | None) -> Any:
    """`query` narrowed to the cases in `state` (open, closed or all) of `community` (None:
    every community's)."""
    if state in ("open", "closed"):
        query = query.where(cases.c.state == state)
    if community is not None:
        query = query.where(cases.c.community == community)
    return query


async def listing(
    conn: AsyncConnection, state: str = "all", *, community: str | None = None
) -> list[Case]:
    query = _chosen(sa.select(cases).order_by(cases.c.id), state, community)
    return [_case(row) for row in await conn.execute(query)]


async def community_of_room(conn: AsyncConnection, room_id: str) -> str | None:
    """The community of the case whose member's DM, check-in or moderator's debrief
    this room is (the newest such case); None if none's."""
    case = (
        await by_dm_room(conn, room_id)
        or await by_checkin_room(conn, room_id)
        or await by_debrief_room(conn, room_id)
    )
    return None if case is None else case.community


async def private_rooms_of_others(
    conn: AsyncConnection, rooms: list[str], community: str
) -> set[str]:
    """Which of `rooms` a case of another community uses as its member's DM or its
    moderator's debrief."""
    query = sa.select(cases.c.dm_room_id, cases.c.debrief_room_id).where(
        cases.c.community != community,
        sa.or_(cases.c.dm_room_id.in_(rooms), cases.c.debrief_room_id.in_(rooms)),
    )
    return {room for row in await conn.execute(query) for room in row if room in rooms}


async def communities_with_cases(conn: AsyncConnection) -> set[str]:
    """The communities with cases not yet purged: their steps still run (a purge, at
    the least) and their staff must still be reachable."""
    query = sa.select(cases.c.community).where(cases.c.purged_at.is_(None)).distinct()
    return set((await conn.execute(query)).scalars())


async def steps_of(conn: AsyncConnection, case_id: int) -> list[Step]:
    rows = await conn.execute(_STEPS_OF, {"b_case": case_id})
    return [_step(row) for row in rows]


# The most cases the step engine starts from one look (the rest at its next, at once).
DUE_BATCH = 100


async def due(conn: AsyncConnection, now: dt.datetime, *, limit: int = DUE_BATCH) -> list[int]:
    """Cases the step engine should look at now, the longest-waiting first."""
    rows = await conn.execute(
        sa.select(cases.c.id)
        .where(cases.c.next_attempt_at <= now)
        .order_by(cases.c.next_attempt_at, cases.c.id)
        .limit(limit)
    )
    return list(rows.scalars())


async def next_due_at(conn: AsyncConnection) -> dt.datetime | None:
    """When the step engine next has something to do (one timer for every case)."""
    # min() keeps the column's type, so the value comes back as an aware UTC datetime.
    return (await conn.execute(sa.select(sa.func.min(cases.c.next_attempt_at)))).scalar_one()


async def set_next_attempt(conn: AsyncConnection, case_id: int, when: dt.datetime | None) -> None:
    await conn.execute(_UPDATE_CASE, {"b_case": case_id, "next_attempt_at": when})


async def retry_started_now(
    conn: AsyncConnection, now: dt.datetime, *, case_id: int | None = None
) -> None:
    """Steps waiting to be retried (started, backing off) become due now (of one case).
    A step that keeps raising keeps its backoff: what was fixed is not what breaks it."""
    started = sa.and_(
        case_steps.c.status == "started",
        sa.or_(case_steps.c.error.is_(None), ~case_steps.c.error.startswith(INTERNAL_ERROR)),
    )
    if case_id is not None:
        started = sa.and_(started, case_steps.c.case_id == case_id)
    waiting = sa.select(case_steps.c.case_id).where(started)
    await conn.execute(case_steps.update().where(started).values(not_before=None))
    await conn.execute(
        cases.update()
        .where(
            cases.c.id.in_(waiting),
            sa.or_(cases.c.next_attempt_at.is_(None), cases.c.next_attempt_at > now),
        )
        .values(next_attempt_at=now)
    )


async def add_steps(
    conn: AsyncConnection, case_id: int, names: list[str], positions: dict[str, int]
) -> None:
    """Give a case steps it does not have yet (e.g. a withdrawal); existing ones stay."""
    have = set(
        (
            await conn.execute(sa.select(case_steps.c.step).where(case_steps.c.case_id == case_id))
        ).scalars()
    )
    new = [
        {"case_id": case_id, "step": name, "position": positions[name], "status": "pending"}
        for name in names
        if name not in have
    ]
    if new:
        await conn.execute(case_steps.insert(), new)


async def skip_pending(
    conn: AsyncConnection, case_id: int, steps: list[str], why: str, now: dt.datetime
) -> list[str]:
    """Steps not yet begun that are no longer wanted (a closed case's check-in): skipped.

    Returns the ones skipped (a step already under way finishes as it would have)."""
    rows = await conn.execute(
        sa.select(case_steps.c.step).where(
            case_steps.c.case_id == case_id,
            case_steps.c.step.in_(steps),
            case_steps.c.status == "pending",
        )
    )
    skipped = list(rows.scalars())
    if skipped:
        await conn.execute(
            case_steps.update()
            .where(case_steps.c.case_id == case_id, case_steps.c.step.in_(skipped))
            .values(status="skipped", result={"why": why}, finished_at=now)
        )
    return skipped


async def rearm_step(
    conn: AsyncConnection,
    case_id: int,
    step: str,
    position: int,
    progress: dict[str, Any] | Callable[[dict[str, Any]], dict[str, Any]],
) -> None:
    """Make a step due again (a new flag to redact, the member back again), or add it.

    `progress`: the step's progress from now on, or a function of what it was (`{}` for
    a step not there yet) — so what an earlier run did is kept where it matters.
    """
    if callable(progress):
        row = (
            await conn.execute(
                sa.select(case_steps.c.progress).where(
                    case_steps.c.case_id == case_id, case_steps.c.step == step
                )
            )
        ).first()
        progress = progress(dict((row.progress if row else None) or {}))
    updated = await conn.execute(
        case_steps.update()
        .where(case_steps.c.case_id == case_id, case_steps.c.step == step)
        .values(status="pending", not_before=None, failures=0, progress=progress, error=None)
    )
    if not updated.rowcount:
        await conn.execute(
            case_steps.insert().values(
                case_id=case_id, step=step, position=position, status="pending", progress=progress
            )
        )


async def start_steps(
    conn: AsyncConnection, case_id: int, steps: Sequence[str], now: dt.datetime
) -> None:
    """Write the intent of each of `steps` before the network call, in one statement: a
    restart then knows to look before acting."""
    await conn.execute(_START_STEPS, {"b_case": case_id, "b_steps": list(steps), "b_now": now})


async def unstart_step(conn: AsyncConnection, case_id: int, was: Step) -> None:
    """An intent written ahead and never acted on: the step as it was before (`was`), if
    its row is still as that intent left it (started, that one attempt counted)."""
    await conn.execute(
        _UNSTART_STEP,
        {
            "b_case": case_id,
            "b_step": was.step,
            "b_attempts": was.attempts + 1,
            "status": was.status,
            "attempts": was.attempts,
            "started_at": was.started_at,
        },
    )


async def save_progress(
    conn: AsyncConnection, case_id: int, step: str, progress: dict[str, Any]
) -> None:
    await conn.execute(_UPDATE_STEP, {"b_case": case_id, "b_step": step, "progress": progress})


async def retry_step_later(
    conn: AsyncConnection,
    case_id: int,
    step: str,
    *,
    not_before: dt.datetime,
    failed: bool,
    error: str | None,
) -> None:
    """The step stays started (its next attempt looks before acting) until `not_before`;
    `error` says why it waits (an outage) or what went wrong (`failed`: counted)."""
    values: dict[str, Any] = {"not_before": not_before, "error": error}
    if failed:
        values["failures"] = case_steps.c.failures + 1
    await conn.execute(
        case_steps.update()
        .where(case_steps.c.case_id == case_id, case_steps.c.step == step)
        .values(**values)
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
) -> bool:
    """The step's outcome; False, and the row left as it is, if it was armed again while
    this attempt ran (a new flag to tell staff of, or to redact; the member back again):
    it is pending, and runs again for what was added meanwhile."""
    finished = await conn.execute(
        _FINISH_STEP,
        {
            "b_case": case_id,
            "b_step": step,
            "status": status,
            "result": result,
            "error": error,
            "finished_at": now,
            "not_before": None,
        },
    )
    return bool(finished.rowcount)


async def set_fields(conn: AsyncConnection, case_id: int, **values: Any) -> None:
    # A name that is no column would be left out of the update without a word.
    unknown = values.keys() - cases.c.keys()
    if unknown:
        raise ValueError(f"cases have no field {', '.join(sorted(unknown))}")
    if values:
        await conn.execute(_UPDATE_CASE, {"b_case": case_id, **values})


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


async def reactivate(conn: AsyncConnection, case: Case) -> bool:
    """A reopened case gathers flags again, unless the member is back in the room or has
    another case there that does (a flag opened one while it was closed)."""
    if case.rejoined_at is not None or case.room_id is None or case.member_id is None:
        return False
    try:
        async with conn.begin_nested():
            await conn.execute(
                cases.update()
                .where(cases.c.id == case.id)
                .values(active_key=active_key(case.room_id, case.member_id))
            )
    except IntegrityError:
        return False
    return True


async def active_case(conn: AsyncConnection, room_id: str, member_id: str) -> Case | None:
    """The member's case in that room that later flags would corroborate, if any."""
    return await _latest_where(conn, cases.c.active_key == active_key(room_id, member_id))


async def _active_in(conn: AsyncConnection, room_id: str) -> list[tuple[int, str]]:
    """(case, member) of every case in that room that later flags would corroborate."""
    rows = await conn.execute(
        sa.select(cases.c.id, cases.c.member_id, cases.c.active_key).where(
            cases.c.active_key.startswith(f"{room_id}|", autoescape=True)
        )
    )
    # A room whose id merely begins the same way is another room.
    return [
        (row.id, row.member_id)
        for row in rows
        if row.member_id is not None and row.active_key == active_key(room_id, row.member_id)
    ]


async def active_members(conn: AsyncConnection, room_id: str) -> list[str]:
    """The members with a case in that room that later flags would corroborate."""
    return [member for _, member in await _active_in(conn, room_id)]


async def follow_upgrade(conn: AsyncConnection, old_room_id: str, new_room_id: str) -> list[str]:
    """The room was upgraded: its members' active cases now belong to the replacement, so
    a flag there corroborates them and a return there is a return (`policy.on_rejoin`).
    The case keeps the room it was opened in. Returns the members whose cases moved."""
    moved = await _active_in(conn, old_room_id)
    for case_id, member in moved:
        await conn.execute(
            cases.update()
            .where(cases.c.id == case_id)
            .values(active_key=active_key(new_room_id, member))
        )
    return [member for _, member in moved]


async def has_active(conn: AsyncConnection, room_id: str, member_id: str) -> bool:
    key = active_key(room_id, member_id)
    query = sa.select(cases.c.id).where(cases.c.active_key == key)
    return (await conn.execute(query)).first() is not None


async def _latest_where(
    conn: AsyncConnection, condition: Any, community: str | None = None
) -> Case | None:
    query = _chosen(sa.select(cases).where(condition), "all", community)
    row = (await conn.execute(query.order_by(cases.c.id.desc()).limit(1))).first()
    return _case(row) if row else None


async def by_dm_room(conn: AsyncConnection, room_id: str) -> Case | None:
    """The newest case whose member's DM is this room."""
    return await _latest_where(conn, cases.c.dm_room_id == room_id)


async def by_debrief_room(conn: AsyncConnection, room_id: str) -> Case | None:
    """The newest case whose moderator's debrief is in this room."""
    return await _latest_where(conn, cases.c.debrief_room_id == room_id)


async def by_checkin_room(conn: AsyncConnection, room_id: str) -> Case | None:
    return await _latest_where(conn, cases.c.checkin_room_id == room_id)


async def by_checkin_notice(
    conn: AsyncConnection, event_id: str, *, community: str | None = None
) -> Case | None:
    """The case whose check-in notice in the staff room is this event (✋ claims it)."""
    return await _latest_where(conn, cases.c.checkin_notice_event_id == event_id, community)


async def by_alert(
    conn: AsyncConnection, event_id: str, *, community: str | None = None
) -> Case | None:
    """The case whose staff alert is this event (✅ acknowledges it)."""
    return await _latest_where(conn, cases.c.alert_event_id == event_id, community)


@dataclass(frozen=True)
class RoomsOfCases:
    """What the intake must know of the cases before the first transaction."""

    # (room, member) of every case later flags would corroborate (see `active_case`).
    watched: set[tuple[str, str]]
    # The DM and check-in rooms the bot opened: their members' messages reach staff.
    dms: set[str]
    checkins: set[str]


_ROOMS_OF_CASES = (
    "SELECT room_id, member_id, active_key, dm_room_id, debrief_room_id, checkin_room_id"
    f" FROM {cases.name} WHERE active_key IS NOT NULL OR dm_room_id IS NOT NULL"
    " OR debrief_room_id IS NOT NULL OR checkin_room_id IS NOT NULL"
)


async def rooms_of_cases(conn: AsyncConnection) -> RoomsOfCases:
    """Read at every start, in one pass over the cases, with the driver directly.

    With 10,000 open cases this is most of what they add to a start: one query (not
    one per set, nor a UNION, whose sort costs more than the rows), and the driver's
    rows as they come (SQLAlchemy's row objects took as long again as the query).
    """
    driver = (await conn.get_raw_connection()).driver_connection
    if conn.dialect.name == "postgresql":
        rows = await driver.fetch(_ROOMS_OF_CASES)
    else:
        rows = await (await driver.execute(_ROOMS_OF_CASES)).fetchall()
    return RoomsOfCases(
        # Where later flags would corroborate: the active key's room (a room upgraded
        # since the case opened moved it to the replacement: `follow_upgrade`).
        watched={(room_of_key(row[2], row[1]), row[1]) for row in rows if row[2]},
        dms={row[3] for row in rows if row[3]} | {row[4] for row in rows if row[4]},
        checkins={row[5] for row in rows if row[5]},
    )


async def open_private_rooms(conn: AsyncConnection) -> set[str]:
    """DM and check-in rooms of open cases (watched for events the homeserver never sent)."""
    rows = await conn.execute(
        sa.select(cases.c.dm_room_id, cases.c.checkin_room_id).where(cases.c.state == "open")
    )
    return {room for row in rows for room in row if room}


async def failed_alerts(conn: AsyncConnection) -> list[int]:
    """Open cases whose staff alert could not be delivered: a person must be told another way."""
    rows = await conn.execute(
        sa.select(cases.c.id)
        .join(case_steps, case_steps.c.case_id == cases.c.id)
        .where(case_steps.c.step == "alert", case_steps.c.status == "failed")
        .where(cases.c.state == "open")
        .order_by(cases.c.id)
    )
    return list(rows.scalars())


async def late_alerts(conn: AsyncConnection, received_before: dt.datetime) -> list[int]:
    """Open cases flagged before `received_before` whose alert is still not posted: staff
    were promised it by now (policy.alert_deadline)."""
    rows = await conn.execute(
        sa.select(cases.c.id)
        .join(case_steps, case_steps.c.case_id == cases.c.id)
        .where(case_steps.c.status.in_(UNFINISHED), case_steps.c.step == "alert")
        .where(cases.c.state == "open", cases.c.received_at < received_before)
        .order_by(cases.c.id)
    )
    return list(rows.scalars())


async def crashing(conn: AsyncConnection) -> list[int]:
    """Cases with a step whose last attempt raised (a bug of ours): it is retried, and what
    needs it waits, until an operator looks."""
    rows = await conn.execute(
        sa.select(case_steps.c.case_id)
        .where(case_steps.c.status == "started", case_steps.c.error.startswith(INTERNAL_ERROR))
        .distinct()
        .order_by(case_steps.c.case_id)
    )
    return list(rows.scalars())


@dataclass(frozen=True)
class CheckinCounts:
    pending: int
    overdue: int
    unclaimed: int


async def checkin_counts(
    conn: AsyncConnection, now: dt.datetime, grace: dt.timedelta
) -> CheckinCounts:
    """Check-ins waiting to open, past due by more than `grace`, and open but unclaimed.

    Aggregates only: the cost is the same with ten pending check-ins or ten thousand.
    """
    waiting = (
        sa.select(
            sa.func.count().label("pending"),
            sa.func.count(sa.case((cases.c.due_at < now - grace, 1))).label("overdue"),
        )
        .select_from(cases.join(case_steps, case_steps.c.case_id == cases.c.id))
        # Not "the case is open": a check-in staff kept through a withdrawal is due all
        # the same. One cancelled with its case was skipped, so it is not unfinished.
        .where(case_steps.c.step == "checkin", case_steps.c.status.in_(UNFINISHED))
    )
    counts = (await conn.execute(waiting)).one()
    unclaimed = (
        await conn.execute(
            sa.select(sa.func.count())
            .select_from(cases.join(case_steps, case_steps.c.case_id == cases.c.id))
            .where(
                # Live: its reminder was not cancelled (with the case) or found not needed.
                case_steps.c.step == "checkin_reminder",
                case_steps.c.status != "skipped",
                cases.c.checkin_opened_at.is_not(None),
                cases.c.checkin_claimed_by.is_(None),
                cases.c.checkin_staff_joined_at.is_(None),
            )
        )
    ).scalar_one()
    return CheckinCounts(counts.pending - counts.overdue, counts.overdue, unclaimed)


async def count(conn: AsyncConnection, state: str = "all", *, community: str | None = None) -> int:
    query = _chosen(sa.select(sa.func.count()).select_from(cases), state, community)
    return (await conn.execute(query)).scalar_one()


async def page(
    conn: AsyncConnection,
    state: str,
    *,
    offset: int,
    limit: int,
    community: str | None = None,
) -> list[Case]:
    """One page of the listing, oldest first."""
    query = _chosen(sa.select(cases), state, community)
    query = query.order_by(cases.c.id).offset(offset).limit(limit)
    return [_case(row) for row in await conn.execute(query)]

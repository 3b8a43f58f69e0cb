"""Open cases as they look while they wait for their check-in, written by the store's own
functions: shared by bench/checkin.py (room ids the bot is not in) and bench/scale.py (real
rooms on a real Synapse).

Each case is opened by `open_or_corroborate`, every immediate step finished (the notice
sent, the member removed, the alert acknowledged, the debrief sent), the check-in and the
two staff steps that follow it pending, the case's `next_attempt_at` at the check-in's due
time: flagged over the past week, due over the next (`CHECKIN_AFTER` after the flag).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from appservice.config import load_config
from appservice.database import create_engine, upgrade
from appservice.digest_key import load_digest_key
from bot.steps import CASE_STEPS
from bot.store import cases
from bot.store.audit import Provenance
from bot.store.schema import case_steps
from bot.store.schema import cases as cases_table

CHECKIN_AFTER = dt.timedelta(days=7)  # flagged over the past week, due over the next
# What a case waiting for its check-in has done already, and what waits on the check-in.
WAITING = ("checkin", "checkin_notice", "checkin_reminder")
SKIPPED = {"escalate": "staff have dealt with it"}


@dataclass(frozen=True)
class WaitingCase:
    """One open case waiting for its check-in: whom it is about, and its private rooms."""

    member: str
    dm_room: str
    debrief_room: str


async def seed_waiting_cases(
    config_path: Path, group_room: str, flagger: str, waiting: list[WaitingCase]
) -> None:
    """Cases 1.. len(waiting), in that order, in the config's (new or empty) database; all
    flagged in `group_room` by `flagger`, each due within the next week (case 1 first)."""
    config = load_config(config_path)
    provenance = Provenance(
        config.policy.policy_version,
        config.config_hash,
        digest_key=load_digest_key(config, create=True) or b"",
    )
    engine = create_engine(config.database_url)
    await upgrade(engine)
    now = dt.datetime.now(dt.UTC)
    server = config.bot_user_id.split(":", 1)[1]
    span = dt.timedelta(days=7) - dt.timedelta(hours=1)
    done_steps = [s for s in CASE_STEPS if s not in WAITING and s not in SKIPPED]
    step_rows: list[dict[str, Any]] = []
    case_rows: list[dict[str, Any]] = []
    count = len(waiting)
    async with engine.begin() as conn:
        for number, case in enumerate(waiting, start=1):
            due = now + dt.timedelta(hours=1) + span * (number / count)
            flagged = due - CHECKIN_AFTER
            flag = cases.NewFlag(
                room_id=group_room,
                member_id=case.member,
                flagger=flagger,
                method="reaction",
                flag_event_id=f"$flag-{number}",
                target_event_id=f"$said-{number}",
                reason=None,
                flagged_at=flagged,
                received_at=flagged,
            )
            opened = await cases.open_or_corroborate(
                conn, provenance, flag, steps=list(CASE_STEPS), dry_run=False, due_at=due
            )
            assert opened.created and opened.case_id == number
            finished = flagged + dt.timedelta(seconds=2)
            for step in done_steps:
                result = {"due_at": due.isoformat()} if step == "schedule" else {}
                step_rows.append({"c": number, "s": step, "st": "done", "r": result, "f": finished})
            acked = finished + dt.timedelta(minutes=5)
            for step, why in SKIPPED.items():
                step_rows.append(
                    {"c": number, "s": step, "st": "skipped", "r": {"why": why}, "f": acked}
                )
            case_rows.append(
                {
                    "c": number,
                    "dm": case.dm_room,
                    "debrief": case.debrief_room,
                    "alert": f"$alert-{number}",
                    "acked": f"@staff:{server}",
                    "dealt": acked,
                    # What the engine sets after the last immediate step: the check-in's time.
                    "next": due,
                }
            )
        if case_rows:
            await finish_seeded_steps(conn, step_rows, case_rows)
    await engine.dispose()


async def finish_seeded_steps(
    conn: AsyncConnection, step_rows: list[dict[str, Any]], case_rows: list[dict[str, Any]]
) -> None:
    """What the engine recorded as each immediate step finished, all at once."""
    param = sa.bindparam
    await conn.execute(
        case_steps.update()
        .where(case_steps.c.case_id == param("c"), case_steps.c.step == param("s"))
        .values(
            status=param("st"),
            attempts=1,
            started_at=param("f"),
            finished_at=param("f"),
            result=param("r"),
        ),
        step_rows,
    )
    await conn.execute(
        cases_table.update()
        .where(cases_table.c.id == param("c"))
        .values(
            dm_room_id=param("dm"),
            debrief_room_id=param("debrief"),
            alert_event_id=param("alert"),
            alert_acked_by=param("acked"),
            dealt_with_at=param("dealt"),
            next_attempt_at=param("next"),
        ),
        case_rows,
    )

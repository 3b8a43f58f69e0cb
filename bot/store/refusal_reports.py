"""Coalescing what staff are told of refusals: one report per (who, where, what) per window."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from bot.store.cases import DEFAULT_COMMUNITY
from bot.store.schema import refusal_reports


@dataclass(frozen=True)
class Pending:
    key: str
    kind: str
    actor: str
    room_id: str
    suppressed: int
    window_started_at: dt.datetime


def report_key(kind: str, actor: str, room_id: str) -> str:
    return f"{kind}|{actor}|{room_id}"


async def note(
    conn: AsyncConnection,
    *,
    kind: str,
    actor: str,
    room_id: str,
    now: dt.datetime,
    every: dt.timedelta,
    community: str = DEFAULT_COMMUNITY,
) -> bool:
    """Count a refusal; True if staff should be told now (the first in its window).
    `community`: whose staff are told (its windows are summarised to them alone)."""
    key = report_key(kind, actor, room_id)
    row = (
        await conn.execute(sa.select(refusal_reports).where(refusal_reports.c.key == key))
    ).first()
    if row is None:
        await conn.execute(
            refusal_reports.insert().values(
                key=key,
                kind=kind,
                actor=actor,
                room_id=room_id,
                window_started_at=now,
                suppressed=0,
                community=community,
            )
        )
        return True
    if now - row.window_started_at >= every and row.suppressed == 0:
        await conn.execute(
            refusal_reports.update()
            .where(refusal_reports.c.key == key)
            .values(window_started_at=now)
        )
        return True
    await conn.execute(
        refusal_reports.update()
        .where(refusal_reports.c.key == key)
        .values(suppressed=refusal_reports.c.suppressed + 1)
    )
    return False


async def due(
    conn: AsyncConnection,
    now: dt.datetime,
    every: dt.timedelta,
    community: str = DEFAULT_COMMUNITY,
) -> list[Pending]:
    """The community's windows that have ended with refusals its staff were not yet told
    about."""
    rows = await conn.execute(
        sa.select(refusal_reports).where(
            refusal_reports.c.suppressed > 0,
            refusal_reports.c.window_started_at <= now - every,
            refusal_reports.c.community == community,
        )
    )
    return [
        Pending(r.key, r.kind, r.actor, r.room_id, r.suppressed, r.window_started_at) for r in rows
    ]


async def reported(conn: AsyncConnection, key: str, now: dt.datetime) -> None:
    """The summary was queued: a new window starts, with nothing suppressed yet."""
    await conn.execute(
        refusal_reports.update()
        .where(refusal_reports.c.key == key)
        .values(window_started_at=now, suppressed=0)
    )


async def forget_quiet(
    conn: AsyncConnection, before: dt.datetime, community: str = DEFAULT_COMMUNITY
) -> None:
    """The community's windows long over with nothing pending hold names for no reason:
    drop them."""
    await conn.execute(
        refusal_reports.delete().where(
            refusal_reports.c.suppressed == 0,
            refusal_reports.c.window_started_at < before,
            refusal_reports.c.community == community,
        )
    )

"""Values the service settles once and keeps (the staff room an alias first resolved to)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from bot.store.schema import pinned


@dataclass(frozen=True)
class Pin:
    value: str
    source: str
    pinned_at: dt.datetime


async def get(conn: AsyncConnection, name: str) -> Pin | None:
    row = (await conn.execute(sa.select(pinned).where(pinned.c.name == name))).first()
    return Pin(row.value, row.source, row.pinned_at) if row else None


async def put(conn: AsyncConnection, name: str, value: str, source: str, now: dt.datetime) -> None:
    """Pin `value` (what `source` resolved to), replacing a pin of another source."""
    await conn.execute(pinned.delete().where(pinned.c.name == name))
    await conn.execute(pinned.insert().values(name=name, value=value, source=source, pinned_at=now))

"""How far each watched room's timeline has been read (a homeserver stream token), and
from when on this database has been keeping track at all."""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from bot.store.schema import database_info, room_positions


async def database_first_started(conn: AsyncConnection) -> dt.datetime | None:
    """When this database first started (None: a database older than the record of it)."""
    query = sa.select(database_info.c.first_started_at).where(database_info.c.id == 1)
    return (await conn.execute(query)).scalar_one_or_none()


async def get(conn: AsyncConnection, room_id: str) -> str | None:
    query = sa.select(room_positions.c.token).where(room_positions.c.room_id == room_id)
    return (await conn.execute(query)).scalar_one_or_none()


async def put(conn: AsyncConnection, room_id: str, token: str, now: dt.datetime) -> None:
    updated = await conn.execute(
        room_positions.update()
        .where(room_positions.c.room_id == room_id)
        .values(token=token, updated_at=now)
    )
    if not updated.rowcount:
        await conn.execute(
            room_positions.insert().values(room_id=room_id, token=token, updated_at=now)
        )

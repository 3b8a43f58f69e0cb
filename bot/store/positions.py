"""How far each watched room's timeline has been read (a homeserver stream token), how far
the bot's sync has been (its `next_batch`, under a key no room id can be), and from when
on this database has been keeping track at all."""

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


async def get_with_time(conn: AsyncConnection, key: str) -> tuple[str, dt.datetime] | None:
    """The token kept under `key`, and when it was stored."""
    query = sa.select(room_positions.c.token, room_positions.c.updated_at).where(
        room_positions.c.room_id == key
    )
    row = (await conn.execute(query)).one_or_none()
    return None if row is None else (row.token, row.updated_at)


async def forget(conn: AsyncConnection, key: str) -> None:
    await conn.execute(room_positions.delete().where(room_positions.c.room_id == key))


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

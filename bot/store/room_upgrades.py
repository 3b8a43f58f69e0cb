"""Upgrades of moderated rooms: which replacement a tombstone named, and whether the bot
moderates it yet (bot/moderation/upgrades.py)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from bot.store.schema import room_upgrades


@dataclass(frozen=True)
class RoomUpgrade:
    new_room_id: str
    old_room_id: str
    upgraded_by: str
    upgraded_at: dt.datetime
    followed_at: dt.datetime | None


async def noted(
    conn: AsyncConnection, *, old_room_id: str, new_room_id: str, by: str, at: dt.datetime
) -> RoomUpgrade:
    """The upgrade as recorded: the first tombstone naming that replacement wins (the same
    event, caught up by the sync after its push, changes nothing)."""
    found = await get(conn, new_room_id)
    if found is not None:
        return found
    await conn.execute(
        room_upgrades.insert().values(
            new_room_id=new_room_id, old_room_id=old_room_id, upgraded_by=by, upgraded_at=at
        )
    )
    return RoomUpgrade(new_room_id, old_room_id, by, at, None)


async def get(conn: AsyncConnection, new_room_id: str) -> RoomUpgrade | None:
    row = (
        await conn.execute(
            sa.select(room_upgrades).where(room_upgrades.c.new_room_id == new_room_id)
        )
    ).first()
    if row is None:
        return None
    return RoomUpgrade(
        row.new_room_id, row.old_room_id, row.upgraded_by, row.upgraded_at, row.followed_at
    )


async def followed(conn: AsyncConnection, new_room_id: str, at: dt.datetime) -> None:
    await conn.execute(
        room_upgrades.update()
        .where(room_upgrades.c.new_room_id == new_room_id)
        .values(followed_at=at)
    )

"""The rooms the bot moderates: who added it, when, and whether it can remove members there."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from bot.store.cases import DEFAULT_COMMUNITY
from bot.store.schema import held_invites, rooms


@dataclass(frozen=True)
class ModeratedRoom:
    room_id: str
    inviter: str | None
    joined_at: dt.datetime | None
    can_kick: bool | None
    left_at: dt.datetime | None
    can_redact: bool | None = None
    community: str = DEFAULT_COMMUNITY


def _room(row: sa.Row) -> ModeratedRoom:  # type: ignore[type-arg]
    return ModeratedRoom(
        row.room_id,
        row.inviter,
        row.joined_at,
        row.can_kick,
        row.left_at,
        row.can_redact,
        row.community,
    )


async def joined(
    conn: AsyncConnection,
    room_id: str,
    *,
    inviter: str,
    at: dt.datetime,
    can_kick: bool | None,
    can_redact: bool | None,
    community: str = DEFAULT_COMMUNITY,
) -> None:
    values = {
        "community": community,
        "inviter": inviter,
        "joined_at": at,
        "can_kick": can_kick,
        "can_redact": can_redact,
        "left_at": None,
    }
    updated = await conn.execute(rooms.update().where(rooms.c.room_id == room_id).values(**values))
    if not updated.rowcount:
        await conn.execute(rooms.insert().values(room_id=room_id, **values))


async def left(conn: AsyncConnection, room_id: str, *, at: dt.datetime) -> None:
    await conn.execute(rooms.update().where(rooms.c.room_id == room_id).values(left_at=at))


async def get(conn: AsyncConnection, room_id: str) -> ModeratedRoom | None:
    row = (await conn.execute(sa.select(rooms).where(rooms.c.room_id == room_id))).first()
    return _room(row) if row else None


async def set_powers(
    conn: AsyncConnection, room_id: str, *, can_kick: bool | None, can_redact: bool | None
) -> None:
    await conn.execute(
        rooms.update()
        .where(rooms.c.room_id == room_id)
        .values(can_kick=can_kick, can_redact=can_redact)
    )


async def moderated(conn: AsyncConnection, *, community: str | None = None) -> list[ModeratedRoom]:
    """Rooms the bot is in to moderate (joined, not since removed); of one community's."""
    query = sa.select(rooms).where(rooms.c.left_at.is_(None)).order_by(rooms.c.joined_at)
    if community is not None:
        query = query.where(rooms.c.community == community)
    rows = await conn.execute(query)
    return [_room(row) for row in rows]


async def hold_invite(
    conn: AsyncConnection, room_id: str, communities: set[str], now: dt.datetime
) -> None:
    """An invite into a room of no community, held for the staff of one of `communities`
    to claim (`!rooms claim`); held again, it is asked about anew."""
    await release_invite(conn, room_id)
    await conn.execute(
        held_invites.insert().values(room_id=room_id, communities=sorted(communities), since=now)
    )


async def held(conn: AsyncConnection) -> dict[str, set[str]]:
    """Each held invite's room, and the communities whose staff may claim it."""
    rows = await conn.execute(sa.select(held_invites.c.room_id, held_invites.c.communities))
    return {row.room_id: set(row.communities) for row in rows}


async def release_invite(conn: AsyncConnection, room_id: str) -> None:
    """A held invite claimed or withdrawn: no longer held."""
    await conn.execute(held_invites.delete().where(held_invites.c.room_id == room_id))

"""DM rooms made ahead of a flag: planned, created, handed to a case (bot/rooms/ready_rooms.py),
or reserved for a member's notice sent ahead of their case (bot/steps/notify_ahead.py)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from bot.store.schema import notices_ahead, ready_rooms


@dataclass(frozen=True)
class ReadyRoom:
    marker: str
    room_id: str | None  # None: planned, its creation not known to have happened
    encrypted: bool


async def all_rooms(conn: AsyncConnection) -> list[ReadyRoom]:
    rows = await conn.execute(
        sa.select(ready_rooms.c.marker, ready_rooms.c.room_id, ready_rooms.c.encrypted).order_by(
            ready_rooms.c.planned_at, ready_rooms.c.marker
        )
    )
    return [ReadyRoom(row.marker, row.room_id, row.encrypted) for row in rows]


async def plan(conn: AsyncConnection, marker: str, *, encrypted: bool, now: dt.datetime) -> None:
    """The intent, before the room is created: a crash after that finds it by `marker`."""
    await conn.execute(
        ready_rooms.insert().values(marker=marker, encrypted=encrypted, planned_at=now)
    )


async def created(conn: AsyncConnection, marker: str, room_id: str) -> None:
    await conn.execute(
        ready_rooms.update().where(ready_rooms.c.marker == marker).values(room_id=room_id)
    )


async def forget(conn: AsyncConnection, marker: str) -> None:
    await conn.execute(ready_rooms.delete().where(ready_rooms.c.marker == marker))


# The oldest created room of a kind (`b_encrypted`), and taking it: one statement on the
# flag's path (in the transaction that opens the case), where a read and a delete were two.
_OLDEST = (
    sa.select(ready_rooms.c.marker)
    .where(
        ready_rooms.c.room_id.is_not(None),
        ready_rooms.c.encrypted == sa.bindparam("b_encrypted"),
    )
    .order_by(ready_rooms.c.planned_at, ready_rooms.c.marker)
    .limit(1)
)
_TAKE_OLDEST = (
    ready_rooms.delete()
    .where(ready_rooms.c.marker == _OLDEST.scalar_subquery())
    .returning(ready_rooms.c.room_id)
)


async def take(conn: AsyncConnection, *, encrypted: bool) -> str | None:
    """Hand over the oldest created room of that kind (gone from the table in this
    transaction), or None if there is none.

    The delete decides, so two takers at once never get the same room, on either
    backend: the one whose delete removed nothing (the other took that room first)
    tries the next, if there is one.
    """
    while True:
        taken = (await conn.execute(_TAKE_OLDEST, {"b_encrypted": encrypted})).scalar()
        if taken is not None:
            return str(taken)
        if (await conn.execute(_OLDEST, {"b_encrypted": encrypted})).first() is None:
            return None


@dataclass(frozen=True)
class Reservation:
    """A room made ahead, taken for a member's notice as their flag's push was recorded
    (bot/store/ingest.py writes it, in that transaction), with the nonce their case will
    have: what the notice was marked with before the case existed."""

    flag_event_id: str
    group_room_id: str
    member_id: str
    room_id: str
    nonce: str


async def reservations(conn: AsyncConnection) -> list[Reservation]:
    """Every notice reserved and not yet taken over by a case (at start: a crash between)."""
    rows = await conn.execute(
        sa.select(
            notices_ahead.c.flag_event_id,
            notices_ahead.c.group_room_id,
            notices_ahead.c.member_id,
            notices_ahead.c.room_id,
            notices_ahead.c.nonce,
        ).order_by(notices_ahead.c.reserved_at)
    )
    return [Reservation(*row) for row in rows]


_TAKE_RESERVED = (
    notices_ahead.delete()
    .where(
        notices_ahead.c.group_room_id == sa.bindparam("b_group_room"),
        notices_ahead.c.member_id == sa.bindparam("b_member"),
    )
    .returning(notices_ahead.c.flag_event_id)
)


async def take_reserved(conn: AsyncConnection, group_room_id: str, member_id: str) -> bool:
    """The member's reservation in that room taken over by the case opening for them (in
    its transaction): True if there was one."""
    taken = await conn.execute(
        _TAKE_RESERVED, {"b_group_room": group_room_id, "b_member": member_id}
    )
    return taken.first() is not None
